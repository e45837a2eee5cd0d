"""The model under transformers' and accelerate's machinery: device maps with offloaded parts, the attention
backends transformers dispatches to, and every way `generate` decodes."""

import itertools

import pytest
import torch
from conftest import IMAGE_TOKEN, prompt, tiny_model
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


# --------------------------------------------------------------------------------------------------------------
# torch.compile
# --------------------------------------------------------------------------------------------------------------


def test_the_vision_path_compiles_without_graph_breaks():
    """Once the counts are read (`visual_layout`, where inputs enter the model), the vision path reads no tensor's
    values: compiled, the features of images (2 tiles, then 1) and of videos of two shapes (3 frames of 1 tile, 2 of
    2 tiles) are one graph each, without a break, and equal the eager ones. Dynamo with the eager backend, which
    needs no compiler (seconds; a whole forward takes 20 s more); without `fullgraph`, under which torch 2.13 traces
    a tensor's values as symbols where a plain compile breaks."""
    from torch._dynamo.utils import counters

    from pvc.visuals_pvc import visual_layout

    model = tiny_model("pvc")
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(3, 3, 56, 56, generator=generator)
    videos = torch.randn(3 + 2 * 2, 3, 56, 56, generator=generator)
    layout = visual_layout(
        images,
        videos,
        image_num_tiles=torch.tensor([2, 1]),
        video_num_frames=torch.tensor([3, 2]),
        video_num_tiles=torch.tensor([1, 2]),
        visual_order=torch.tensor([0, 1, 1, 0]),
    )
    for features, pixels in ((model.model.image_features, images), (model.model.video_features, videos)):
        torch._dynamo.reset()
        counters.clear()
        with torch.no_grad():
            compiled = torch.compile(features, backend="eager")(pixels, layout)
            expected = features(pixels, layout)
        assert not counters["graph_break"], list(counters["graph_break"])
        assert counters["stats"]["unique_graphs"] == 1
        for ours, eager in zip(compiled.pooler_output, expected.pooler_output, strict=True):
            torch.testing.assert_close(ours, eager)


# --------------------------------------------------------------------------------------------------------------
# generate: beam search, sampling and assisted decoding, from ids or embeddings
# --------------------------------------------------------------------------------------------------------------


def prompt_with(kinds, generator):
    """One prompt holding an image of 2 tiles and/or a video of 3 frames (in `kinds`' order) and its visual inputs,
    the pixels first (as a processor's output may list them; `generate` must not count samples in them)."""
    tokens = {"image": 4 * 4 * 2, "video": 4 * 3}
    ids = [1, 2]
    for kind in kinds:
        ids += [125] + [IMAGE_TOKEN] * tokens[kind] + [126, 7]
    inputs = {}
    if "image" in kinds:
        inputs.update(pixel_values=torch.randn(2, 3, 56, 56, generator=generator), image_num_tiles=torch.tensor([2]))
    if "video" in kinds:
        inputs.update(
            pixel_values_videos=torch.randn(3, 3, 56, 56, generator=generator), video_num_frames=torch.tensor([3])
        )
    if len(kinds) == 2:
        inputs["visual_order"] = torch.tensor([0 if kind == "image" else 1 for kind in kinds])
    return torch.tensor([ids]), inputs


KINDS = {"image": ["image"], "video": ["video"], "both": ["video", "image"]}
DECODING = {
    "beam search": dict(num_beams=2),
    "beams returned": dict(num_beams=3, num_return_sequences=2),
    "sampling": dict(do_sample=True, top_k=8),
    "samples returned": dict(do_sample=True, num_return_sequences=2),
}
SETTINGS = dict(max_new_tokens=5, pad_token_id=0, eos_token_id=126)


def generate_with_seed(model, **inputs):
    torch.manual_seed(0)
    return model.generate(**inputs).tolist()


@pytest.mark.parametrize("decoding", DECODING)
@pytest.mark.parametrize("kind", KINDS)
def test_decoding_from_embeddings_equals_decoding_from_ids(kind, decoding):
    """`generate(inputs_embeds=...)` (the embeddings of the ids) with pixels: beam search (each sample's visuals
    repeated with its beams), sampling with a fixed seed and several sequences per prompt answer what they answer
    from the ids."""
    model = tiny_model("pvc")
    ids, visual = prompt_with(KINDS[kind], torch.Generator().manual_seed(0))
    options = dict(SETTINGS, **DECODING[decoding])
    from_ids = generate_with_seed(model, **visual, input_ids=ids, **options)
    embeds = model.get_input_embeddings()(ids).detach()
    from_embeds = generate_with_seed(model, **visual, inputs_embeds=embeds, **options)
    assert from_embeds == [row[ids.shape[1] :] for row in from_ids]


@pytest.mark.parametrize("decoding", ["beam search", "samples returned"])
def test_batched_decoding_from_embeddings_equals_each_prompt_alone(decoding):
    """Two prompts with their own image and video, by embeddings: each answers as it does alone."""
    model = tiny_model("pvc")
    generator = torch.Generator().manual_seed(0)
    prompts = [prompt_with(["image", "video"], generator), prompt_with(["video", "image"], generator)]
    options = dict(SETTINGS, **DECODING[decoding])
    embeds = [model.get_input_embeddings()(ids).detach() for ids, _ in prompts]
    alone = [generate_with_seed(model, inputs_embeds=e, **visual, **options) for e, (_, visual) in zip(embeds, prompts)]
    first, second = prompts[0][1], prompts[1][1]
    batch = dict(
        pixel_values=torch.cat([first["pixel_values"], second["pixel_values"]]),
        image_num_tiles=torch.tensor([2, 2]),
        pixel_values_videos=torch.cat([first["pixel_values_videos"], second["pixel_values_videos"]]),
        video_num_frames=torch.tensor([3, 3]),
        visual_order=torch.tensor([0, 1, 1, 0]),
    )
    together = generate_with_seed(model, **batch, inputs_embeds=torch.cat(embeds), **options)
    if decoding == "beam search":
        assert together == alone[0] + alone[1]
    else:  # sampling draws for the whole batch at once: the same shapes, and each row a possible answer
        assert len(together) == 4 and all(len(row) == len(alone[0][0]) for row in together)


@pytest.mark.parametrize("kind", KINDS)
def test_assisted_decoding_equals_greedy(kind):
    """Assisted decoding (another model's candidates, or the prompt's n-grams) with images and videos keeps the
    model's greedy answer. From embeddings alone it is refused, in one line that names input_ids: it works on the
    prompt's ids (transformers 5.0 fails on it for any model, later releases mask the prompt where it has padding)."""
    model, assistant = tiny_model("pvc"), tiny_model("pvc", seed=1)
    ids, visual = prompt_with(KINDS[kind], torch.Generator().manual_seed(0))
    ids = torch.cat([ids, torch.tensor([[5, 6, 7, 5, 6, 7, 5, 6]])], dim=1)  # n-grams to look up
    greedy = model.generate(input_ids=ids, **visual, **SETTINGS, do_sample=False).tolist()
    embeds = model.get_input_embeddings()(ids).detach()
    for assistance in (dict(assistant_model=assistant), dict(prompt_lookup_num_tokens=2)):
        assert model.generate(input_ids=ids, **visual, **SETTINGS, **assistance).tolist() == greedy
        with pytest.raises(ValueError, match="Assisted decoding.*inputs_embeds has none: pass input_ids"):
            model.generate(inputs_embeds=embeds, **visual, **SETTINGS, **assistance)


# --------------------------------------------------------------------------------------------------------------
# transformers' output plumbing
# --------------------------------------------------------------------------------------------------------------


def test_return_dict_false_gives_tuples_everywhere(pixels):
    """`return_dict=False` (an argument, or the config's) turns each output into a tuple (transformers'
    `can_return_tuple`): the vision tower, the feature methods, the base model and the generation model."""
    model = tiny_model("pvc")
    inputs = dict(input_ids=prompt(4 * 4), pixel_values=pixels(1))
    with torch.no_grad():
        expected = model(**inputs).logits
        assert isinstance(model(**inputs, return_dict=False), tuple)
        assert isinstance(model.model(**inputs, return_dict=False), tuple)
        assert isinstance(model.get_image_features(inputs["pixel_values"], return_dict=False), tuple)
        assert isinstance(model.get_video_features(pixels(2), torch.tensor([2]), return_dict=False), tuple)
        assert isinstance(model.model.vision_tower(pixels(2), num_frames=2, return_dict=False), tuple)
        model.config.return_dict = False
        as_tuple = model(**inputs)
        assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], expected)
        assert not isinstance(model(**inputs, return_dict=True), tuple)


def test_the_cache_under_its_old_name():
    """Where the installed transformers calls the language model's cache `cache`, `past_key_values` is deprecated as
    in its own models (a FutureWarning naming both, then used as `cache`); in 5.0 it is the name, without warning."""
    import warnings

    from transformers import DynamicCache

    from pvc.modeling_pvc import CACHE_NAME

    model = tiny_model("pvc")
    ids = prompt(0)
    cache = DynamicCache(config=model.config.text_config)
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        model(input_ids=ids, past_key_values=cache, use_cache=True)
    ours = [w for w in caught if "PVCForConditionalGeneration.forward" in str(w.message)]
    if CACHE_NAME == "cache":
        assert len(ours) == 1 and issubclass(ours[0].category, FutureWarning)
        assert "`past_key_values` is deprecated" in str(ours[0].message) and "Use `cache`" in str(ours[0].message)
    else:
        assert not ours
    assert cache.get_seq_length() == ids.shape[1]  # the cache given is the one filled
