"""The model under transformers' and accelerate's machinery: device maps with offloaded parts, the attention
backends transformers dispatches to, and every way `generate` decodes."""

import itertools

import pytest
import torch
from conftest import prompt, tiny_model
from transformers import AutoModelForImageTextToText
from transformers.utils import is_torch_flex_attn_available

# --------------------------------------------------------------------------------------------------------------
# device_map: parts offloaded by accelerate
# --------------------------------------------------------------------------------------------------------------

PARTS = ("model.vision_tower", "model.multi_modal_projector", "model.language_model")


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    """A tiny PVC saved to disk, a prompt with an image of 2 tiles and one with a video of 3 frames, and the logits
    the model in memory gives them."""
    model = tiny_model("pvc")
    path = tmp_path_factory.mktemp("pvc")
    model.save_pretrained(path)
    generator = torch.Generator().manual_seed(0)
    image = dict(
        input_ids=prompt(4 * 4 * 2),
        pixel_values=torch.randn(2, 3, 56, 56, generator=generator),
        image_num_tiles=torch.tensor([2]),
    )
    video = dict(
        input_ids=prompt(4 * 3),
        pixel_values_videos=torch.randn(3, 3, 56, 56, generator=generator),
        video_num_frames=torch.tensor([3]),
    )
    with torch.no_grad():
        expected = [model(**inputs).logits for inputs in (image, video)]
    return model, path, (image, video), expected


def device_map_with(model, offloaded) -> dict:
    """The modules named in `offloaded` on "disk", everything beside them on the CPU (their siblings, those of each
    of their parents), as one writes a device_map by hand."""

    def place(name, module):
        if name in offloaded:
            return {name: "disk"}
        if not any(other.startswith(f"{name}.") or not name for other in offloaded):
            return {name: "cpu"}
        prefix = f"{name}." if name else ""
        own = {prefix + key: "cpu" for key, _ in module.named_parameters(recurse=False)}  # a layer's scales
        return own | {
            key: device
            for child_name, child in module.named_children()
            if any(True for _ in child.parameters())
            for key, device in place(prefix + child_name, child).items()
        }

    return place("", model)


# Every combination of the three parts on disk (the rest on the CPU), and single modules inside them: the patch
# embedding, a per-frame and a progressive layer, a temporal attention, the temporal embeddings, the projector's AdaLN.
OFFLOADED = [
    [part for part, on_disk in zip(PARTS, switches) if on_disk]
    for switches in itertools.product([False, True], repeat=3)
    if any(switches)
] + [
    ["model.vision_tower.embeddings"],
    ["model.vision_tower.encoder.layer.0"],
    ["model.vision_tower.encoder.layer.2"],
    ["model.vision_tower.encoder.layer.2.temporal_attention"],
    ["model.vision_tower.temporal_embedding", "model.multi_modal_projector.temporal_embedding"],
    ["model.multi_modal_projector.adaln", "model.language_model.embed_tokens"],
]


# accelerate warns of a device_map key that names a parameter (a layer's own scales), and places it all the same
@pytest.mark.filterwarnings("ignore:The following device_map keys do not match any submodules")
@pytest.mark.parametrize("offloaded", OFFLOADED, ids=["+".join(names) for names in OFFLOADED])
def test_offloaded_parts_give_the_logits_of_the_model_in_memory(saved_model, tmp_path, offloaded):
    """`from_pretrained(device_map=...)` with any part on disk: accelerate keeps the offloaded weights on the meta
    device until its hooks load them, so nothing may move inputs to where such a weight says it is."""
    model, path, inputs, expected = saved_model
    dispatched = AutoModelForImageTextToText.from_pretrained(
        path,
        trust_remote_code=True,
        dtype=torch.float32,
        device_map=device_map_with(model, offloaded),
        offload_folder=str(tmp_path),
    )
    assert {name for name, device in dispatched.hf_device_map.items() if device == "disk"} == set(offloaded)
    with torch.no_grad():
        for one, logits in zip(inputs, expected):
            torch.testing.assert_close(dispatched(**one).logits, logits, rtol=1e-5, atol=1e-5)
        # the placeholders found by their embedding (the text embedding may be offloaded too)
        image, logits = dict(inputs[0]), expected[0]
        image["inputs_embeds"] = model.get_input_embeddings()(image.pop("input_ids"))
        torch.testing.assert_close(dispatched(**image).logits, logits, rtol=1e-5, atol=1e-5)


def test_generate_with_the_vision_tower_on_disk(saved_model, tmp_path):
    """Greedy and assisted decoding with the weights that come first (the vision tower's) offloaded."""
    model, path, inputs, _ = saved_model
    dispatched = AutoModelForImageTextToText.from_pretrained(
        path,
        trust_remote_code=True,
        dtype=torch.float32,
        device_map=device_map_with(model, ["model.vision_tower"]),
        offload_folder=str(tmp_path),
    )
    assert dispatched.device == torch.device("cpu")  # where accelerate computes, not the tower's meta weights
    settings = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    for one in inputs:
        expected = model.generate(**one, **settings).tolist()
        assert dispatched.generate(**one, **settings).tolist() == expected
        # assisted decoding puts the candidates on `model.device`
        assert dispatched.generate(**one, **settings, assistant_model=model).tolist() == expected


# --------------------------------------------------------------------------------------------------------------
# flex attention
# --------------------------------------------------------------------------------------------------------------

needs_flex = pytest.mark.skipif(not is_torch_flex_attn_available(), reason="this torch has no flex attention")


@needs_flex
def test_flex_attention_loads_and_equals_sdpa(saved_model):
    """`attn_implementation="flex_attention"` reaches the vision tower and the language model, and gives sdpa's
    logits on an image and a video (float32 on the CPU, where torch compiles flex attention: about 20 s the first
    time)."""
    model, path, inputs, _ = saved_model
    loaded = {
        name: AutoModelForImageTextToText.from_pretrained(
            path, trust_remote_code=True, dtype=torch.float32, attn_implementation=name
        ).eval()
        for name in ("sdpa", "flex_attention")
    }
    flex = loaded["flex_attention"]
    assert flex.model.vision_tower.config._attn_implementation == "flex_attention"
    assert flex.model.language_model.config._attn_implementation == "flex_attention"
    image, video = inputs
    mixed = dict(
        input_ids=torch.cat([image["input_ids"], video["input_ids"]], dim=1),
        **{key: value for one in inputs for key, value in one.items() if key != "input_ids"},
        visual_order=torch.tensor([0, 1]),
    )
    with torch.no_grad():
        expected = loaded["sdpa"](**mixed).logits
        torch.testing.assert_close(flex(**mixed).logits, expected, rtol=1e-5, atol=1e-5)


@needs_flex
def test_flex_attention_keeps_the_temporal_attention_frame_causal(saved_model):
    """Under flex attention (which takes no `is_causal`), changing frame t + 1 leaves the features of frames <= t
    as they were, and changes those after."""
    model = tiny_model("pvc", attn_implementation="flex_attention")
    video = saved_model[2][1]["pixel_values_videos"]  # 3 frames, the shapes the test above compiled for
    with torch.no_grad():
        before = model.model.encode_clips(video, 3)[0]  # [T, M, D]
        for t in (0, 1):
            changed = video.clone()
            changed[t + 1] = torch.randn(changed[t + 1].shape, generator=torch.Generator().manual_seed(t))
            after = model.model.encode_clips(changed, 3)[0]
            torch.testing.assert_close(after[: t + 1], before[: t + 1], rtol=1e-6, atol=1e-6)
            assert not torch.allclose(after[t + 1 :], before[t + 1 :], atol=1e-4)
        # and the same features as sdpa's
        model.set_attn_implementation("sdpa")
        torch.testing.assert_close(model.model.encode_clips(video, 3)[0], before, rtol=1e-5, atol=1e-5)
