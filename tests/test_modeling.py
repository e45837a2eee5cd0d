"""The core model on tiny configs: external references, the properties the design promises, the API."""

import importlib.util

import pytest
import torch
from conftest import (
    ABLATIONS,
    IMAGE_TOKEN,
    TINY_TEXT,
    TINY_VISION,
    assert_adalns_are_plain_layer_norms,
    prompt,
    randomize_,
    tiny_config,
    tiny_model,
)
from transformers import (
    AutoModelForImageTextToText,
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLVisionConfig,
    InternVLVisionModel,
)

from pvc import PVCConfig, PVCForConditionalGeneration

HF_VISION = dict(
    hidden_size=TINY_VISION["hidden_size"],
    num_hidden_layers=TINY_VISION["num_hidden_layers"],
    num_attention_heads=TINY_VISION["num_attention_heads"],
    intermediate_size=TINY_VISION["intermediate_size"],
    image_size=TINY_VISION["image_size"],
    patch_size=TINY_VISION["patch_size"],
    attention_bias=True,
    layer_norm_eps=1e-6,
    use_mean_pooling=True,  # InternViT has no final norm
)


# InternViT-6B's options (InternVL2-26B and larger): RMSNorm everywhere, q/k normalisation, no qkv bias.
INTERNVIT_6B_STYLE = dict(norm_type="rms_norm", use_qk_norm=True, attention_bias=False)


def internvl_reference(pvc_model, **vision):
    """transformers' own InternVL with the same shapes, loaded with the PVC model's state dict (same names)."""
    config = InternVLConfig(
        vision_config=dict(HF_VISION, **vision),
        text_config=dict(TINY_TEXT),
        image_token_id=IMAGE_TOKEN,
        downsample_ratio=0.5,
        tie_word_embeddings=False,
    )
    config._attn_implementation = "eager"
    reference = InternVLForConditionalGeneration(config).eval()
    reference.load_state_dict(pvc_model.state_dict(), strict=True)
    return reference


@pytest.mark.parametrize("vision", [{}, INTERNVIT_6B_STYLE], ids=["internvit-300m", "internvit-6b"])
def test_row_a_equals_transformers_internvl(pixels, vision):
    model = tiny_model("a", attn_implementation="eager", vision=vision)
    reference = internvl_reference(model, **vision)
    tiles = torch.tensor([3, 1, 2])  # three images of several tiles
    pixel_values = pixels(int(tiles.sum()))
    input_ids = prompt(16 * int(tiles.sum()))
    with torch.no_grad():
        ours = model(input_ids=input_ids, pixel_values=pixel_values, image_num_tiles=tiles).logits
        theirs = reference(input_ids=input_ids, pixel_values=pixel_values).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_fresh_vit_equals_internvit_and_gates_make_static_frames_differ(pixels):
    model = tiny_model("pvc", randomize=False)
    # Give the InternViT part of the tower random weights; the PVC parts keep their fresh initialisation.
    generator = torch.Generator().manual_seed(7)
    tower = model.model.vision_tower
    with torch.no_grad():
        for name, param in tower.named_parameters():
            if "temporal" not in name:
                param.add_(0.1 * torch.randn(param.shape, generator=generator))
    config = InternVLVisionConfig(**HF_VISION)
    internvit = InternVLVisionModel(config).eval()
    missing, unexpected = internvit.load_state_dict(tower.state_dict(), strict=False)
    assert not missing and all("temporal" in key for key in unexpected)

    images = pixels(3)
    with torch.no_grad():
        expected = internvit(images).last_hidden_state  # [3, N, C]
        frames = tower(images, num_frames=4, static=True).last_hidden_state.view(3, 4, *expected.shape[1:])
    for t in range(4):
        torch.testing.assert_close(frames[:, t], expected, rtol=1e-6, atol=1e-6)

    randomize_(model, seed=3)
    with torch.no_grad():
        frames = tower(images, num_frames=4, static=True).last_hidden_state.view(3, 4, *expected.shape[1:])
        tokens = model.model.encode_clips(images, 4, static=True)  # [3, 4, M, D]
    for t in range(1, 4):
        assert not torch.allclose(frames[:, t], frames[:, 0], atol=1e-4)
        assert not torch.allclose(tokens[:, t], tokens[:, 0], atol=1e-4)


def test_frame_causality(pixels):
    model = tiny_model("pvc")
    video = pixels(6)
    changed = video.clone()
    changed[3] = torch.randn(3, 56, 56)
    with torch.no_grad():
        before = model.model.encode_clips(video, 6)[0]  # [T, M, D]
        after = model.model.encode_clips(changed, 6)[0]
    assert torch.equal(before[:3], after[:3])
    for t in range(3, 6):
        assert not torch.allclose(before[t], after[t], atol=1e-4)


def test_static_clip_dedup_is_exact(pixels):
    model = tiny_model("pvc")
    tiles = pixels(2)
    repeated = tiles.repeat_interleave(4, dim=0)  # each tile as an explicit 4-frame stream
    with torch.no_grad():
        deduplicated = model.model.encode_clips(tiles, 4, static=True)
        explicit = model.model.encode_clips(repeated, 4, static=False)
    torch.testing.assert_close(deduplicated, explicit, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("chunk", [1, 3])
def test_frame_chunking_does_not_change_results(pixels, chunk):
    model = tiny_model("pvc")
    video = pixels(7)
    with torch.no_grad():
        whole = model.model.vision_tower(video, num_frames=7, frame_chunk_size=None).last_hidden_state
        chunked = model.model.vision_tower(video, num_frames=7, frame_chunk_size=chunk).last_hidden_state
    torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=1e-6)


def test_frame_chunking_does_not_change_gradients(pixels):
    """Training runs chunked too (frame_chunk_size defaults to 16): gradients flow through the chunks unchanged."""
    video = pixels(7)
    gradients = []
    for chunk in (None, 2):
        model = tiny_model("pvc").train()
        model.model.vision_tower(
            video, num_frames=7, frame_chunk_size=chunk
        ).last_hidden_state.square().mean().backward()
        gradients.append({name: param.grad for name, param in model.named_parameters() if param.grad is not None})
    assert gradients[0].keys() == gradients[1].keys() and len(gradients[0]) > 0
    for name, gradient in gradients[0].items():
        torch.testing.assert_close(gradients[1][name], gradient, rtol=1e-5, atol=1e-6, msg=name)


def test_frame_chunk_size_bounds_the_temporal_attention_too(pixels):
    """Several streams (tiles) at once: each temporal attention call holds at most chunk_size frames' tokens."""
    model = tiny_model("pvc")
    tower = model.model.vision_tower
    tokens_per_frame = tower.embeddings.grid[0] * tower.embeddings.grid[1] + 1
    chunk, streams, frames = 2, 3, 4
    seen = []
    hooks = [
        layer.temporal_attention.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape))
        for layer in tower.encoder.layer
        if hasattr(layer, "temporal_attention")
    ]
    images = pixels(streams)
    with torch.no_grad():
        chunked = tower(images, num_frames=frames, static=True, frame_chunk_size=chunk).last_hidden_state
    for hook in hooks:
        hook.remove()
    with torch.no_grad():
        whole = tower(images, num_frames=frames, static=True, frame_chunk_size=None).last_hidden_state
    torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=1e-6)
    assert len(seen) > len(hooks)  # the temporal attention did run in chunks
    assert all(batch * length <= chunk * tokens_per_frame for batch, length, _ in seen)  # [(S n), T, C]


@pytest.mark.parametrize("row", sorted(ABLATIONS))
def test_token_counts_per_ablation_row(pixels, row):
    model = tiny_model(row)
    config = model.config
    per_frame = 16 if config.downsample_ratio == 0.5 else 4
    assert config.tokens_per_frame == per_frame
    with torch.no_grad():
        (image,) = model.get_image_features(pixels(3), torch.tensor([3])).pooler_output
        (video,) = model.get_video_features(pixels(5), torch.tensor([5])).pooler_output
    assert image.shape == (per_frame * config.image_repeat * 3, TINY_TEXT["hidden_size"])
    assert video.shape == (per_frame * 5, TINY_TEXT["hidden_size"])
    names = dict(model.named_parameters())
    assert any("temporal_attention" in name for name in names) == (ABLATIONS[row]["num_temporal_layers"] > 0)
    assert ("model.multi_modal_projector.layer_norm.weight" in names) != ABLATIONS[row]["projector_adaln"]


def test_image_tokens_are_frame_major(pixels):
    """An image of P tiles gives frame 1 (tile 1 .. tile P), frame 2, ...: compare with each tile alone."""
    model = tiny_model("pvc")
    tiles = pixels(2)
    with torch.no_grad():
        (together,) = model.get_image_features(tiles, torch.tensor([2])).pooler_output
        together = together.view(4, 2, 4, -1)  # [T, P, M, D]
        alone = [model.get_image_features(tiles[p : p + 1]).pooler_output[0].view(4, 4, -1) for p in range(2)]
    for p in range(2):
        torch.testing.assert_close(together[:, p], alone[p], rtol=1e-5, atol=1e-6)


def mixed_sample(model, pixels, order):
    """One sample with an image (2 tiles) and a video (3 frames) in `order`, plus its separate inputs."""
    image, video = pixels(2), pixels(3)
    count = {"image": 4 * 4 * 2, "video": 4 * 3}
    ids = [1, 2]
    for kind in order:
        ids += [125] + [IMAGE_TOKEN] * count[kind] + [126, 7]
    inputs = dict(
        input_ids=torch.tensor([ids]),
        pixel_values=image,
        image_num_tiles=torch.tensor([2]),
        pixel_values_videos=video,
        video_num_frames=torch.tensor([3]),
        visual_order=torch.tensor([0 if kind == "image" else 1 for kind in order]),
    )
    return inputs


def test_mixed_batch_matches_samples_one_by_one(pixels):
    model = tiny_model("pvc")
    first = mixed_sample(model, pixels, ["image", "video"])
    second = mixed_sample(model, pixels, ["video", "image"])
    batch = dict(
        input_ids=torch.cat([first["input_ids"], second["input_ids"]]),
        pixel_values=torch.cat([first["pixel_values"], second["pixel_values"]]),
        image_num_tiles=torch.tensor([2, 2]),
        pixel_values_videos=torch.cat([first["pixel_values_videos"], second["pixel_values_videos"]]),
        video_num_frames=torch.tensor([3, 3]),
        visual_order=torch.tensor([0, 1, 1, 0]),
    )
    with torch.no_grad():
        batched = model(**batch).logits
        one_by_one = torch.cat([model(**first).logits, model(**second).logits])
    torch.testing.assert_close(batched, one_by_one, rtol=1e-5, atol=1e-5)

    batch.pop("visual_order")
    with pytest.raises(ValueError, match="visual_order"):
        model(**batch)
    with pytest.raises(ValueError, match="visual_order"):
        model(**dict(batch, visual_order=torch.tensor([0, 0, 0, 1])))


def test_visual_layout_reads_the_counts_in_either_layout():
    """`visual_layout`, the model's one reading of the count inputs: per-item counts and the grid rows of vLLM's layout
    give the same layout; an image without counts has one tile, a video's frame one tile; a batch without pixels (a
    decoding step after the prefill) leaves its counts and order unread; wrong counts and orders are named."""
    from pvc.visuals_pvc import VisualLayout, as_grids, visual_layout

    images, videos = torch.zeros(5, 3, 2, 2), torch.zeros(3 + 2 * 2, 3, 2, 2)
    counts = dict(
        image_num_tiles=torch.tensor([2, 3]),
        video_num_frames=torch.tensor([3, 2]),
        video_num_tiles=torch.tensor([1, 2]),
        visual_order=torch.tensor([1, 0, 0, 1]),
    )
    expected = VisualLayout(image_tiles=(2, 3), video_frames=(3, 2), video_tiles=(1, 2), order=(1, 0, 0, 1))
    assert visual_layout(images, videos, **counts) == expected
    assert visual_layout(images, videos, **as_grids(counts)) == expected
    assert expected.video_rows == (3, 4)
    assert expected.in_text_order(["image 1", "image 2"], ["video 1", "video 2"]) == [
        "video 1",
        "image 1",
        "image 2",
        "video 2",
    ]
    assert visual_layout(images[:2]) == VisualLayout(image_tiles=(1, 1), order=(0, 0))
    one_video = VisualLayout(video_frames=(3,), video_tiles=(1,), order=(1,))
    assert visual_layout(pixel_values_videos=videos[:3], video_num_frames=[3]) == one_video
    assert visual_layout(**counts) == VisualLayout()
    with pytest.raises(ValueError, match=r"needs video_num_frames \(or video_grid_thw\)"):
        visual_layout(pixel_values_videos=videos)
    with pytest.raises(ValueError, match=r"image_num_tiles \[2, 2\] must be positive and add up to the 5 rows"):
        visual_layout(images, image_num_tiles=torch.tensor([2, 2]))
    with pytest.raises(ValueError, match=r"video_num_frames \(x video_num_tiles\) \[3, 2\] must be positive"):
        visual_layout(pixel_values_videos=videos, video_num_frames=torch.tensor([3, 2]))
    with pytest.raises(ValueError, match=r"video_num_frames counts 2 videos \(\[4, 4\]\), video_num_tiles 1 \(\[2\]\)"):
        # (zipped, the counts matched the 8 rows and one video went missing later, a bare StopIteration)
        visual_layout(pixel_values_videos=torch.zeros(8, 3, 28, 28), video_num_frames=[4, 4], video_num_tiles=[2])
    assert visual_layout(images[:3], image_num_tiles=torch.tensor(3)).image_tiles == (3,)  # a 0-d count: one item
    with pytest.raises(ValueError, match="Pass `visual_order`"):
        visual_layout(images, videos, **dict(counts, visual_order=None))
    with pytest.raises(ValueError, match=r"visual_order \[0, 0, 0, 1\] must hold one 0 per image \(2 given\)"):
        visual_layout(images, videos, **dict(counts, visual_order=torch.tensor([0, 0, 0, 1])))


def test_every_parameter_gets_a_gradient(pixels):
    model = tiny_model("pvc").train()
    inputs = mixed_sample(model, pixels, ["image", "video"])
    labels = inputs["input_ids"].clone()
    labels[labels == IMAGE_TOKEN] = -100
    model(**inputs, labels=labels).loss.backward()
    dead = [name for name, param in model.named_parameters() if param.grad is None or not param.grad.any()]
    assert not dead


def test_fresh_gates_receive_a_gradient(pixels):
    """At initialisation the temporal branch contributes nothing, but its gate must still learn."""
    model = tiny_model("pvc", randomize=False).train()
    inputs = mixed_sample(model, pixels, ["video"]) | {"pixel_values": None, "visual_order": None}
    inputs["input_ids"] = prompt(12)
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    for layer in model.model.vision_tower.encoder.layer[-2:]:
        assert layer.temporal_gate.weight.grad is not None and layer.temporal_gate.weight.grad.abs().sum() > 0


def test_gradient_checkpointing_gives_the_same_gradients(pixels):
    inputs = dict(input_ids=prompt(4 * 4 * 2), pixel_values=pixels(2), image_num_tiles=torch.tensor([2]))
    grads = []
    for checkpointing in (False, True):
        model = tiny_model("pvc", vision=dict(frame_chunk_size=2)).train()
        if checkpointing:
            if hasattr(model, "activation_checkpointing_enable"):  # the name since transformers 5.2x
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            assert all(layer.gradient_checkpointing for layer in model.model.vision_tower.encoder.layer)
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
        grads.append({name: param.grad for name, param in model.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_eager_and_sdpa_agree(pixels):
    inputs = dict(input_ids=prompt(4 * 4 * 2), pixel_values=pixels(2), image_num_tiles=torch.tensor([2]))
    logits = {}
    for implementation in ("eager", "sdpa"):
        model = tiny_model("pvc", attn_implementation=implementation)
        assert model.model.vision_tower.config._attn_implementation == implementation
        with torch.no_grad():
            logits[implementation] = model(**inputs).logits
    torch.testing.assert_close(logits["sdpa"], logits["eager"], rtol=1e-5, atol=1e-5)


def test_save_and_reload_with_remote_code(tmp_path, pixels):
    model = tiny_model("pvc")
    model.save_pretrained(tmp_path)
    for name in ("modeling_pvc.py", "configuration_pvc.py", "config.json", "model.safetensors"):
        assert (tmp_path / name).exists(), name
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path, trust_remote_code=True, dtype=torch.float32)
    assert type(reloaded).__name__ == "PVCForConditionalGeneration"
    assert type(reloaded).__module__ != PVCForConditionalGeneration.__module__  # really the saved code
    inputs = dict(input_ids=prompt(4 * 4 * 2), pixel_values=pixels(2), image_num_tiles=torch.tensor([2]))
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(**inputs).logits, model(**inputs).logits, rtol=0, atol=0)


def greedy_by_hand(model, inputs, steps):
    ids = inputs["input_ids"]
    for _ in range(steps):
        with torch.no_grad():
            logits = model(**dict(inputs, input_ids=ids)).logits
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


@pytest.mark.parametrize("kind", ["images", "video"])
def test_generate_equals_greedy_loop_over_forward(pixels, kind):
    model = tiny_model("pvc")
    if kind == "images":
        inputs = dict(input_ids=prompt(4 * 4 * 3), pixel_values=pixels(3), image_num_tiles=torch.tensor([2, 1]))
    else:
        inputs = dict(input_ids=prompt(4 * 5), pixel_values_videos=pixels(5), video_num_frames=torch.tensor([5]))
    generated = model.generate(**inputs, max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(generated, greedy_by_hand(model, inputs, 6))


def test_token_count_mismatch_names_both_counts(pixels):
    model = tiny_model("pvc")
    with pytest.raises(ValueError, match=r"31 image tokens.*32 features"):
        model(input_ids=prompt(31), pixel_values=pixels(2), image_num_tiles=torch.tensor([2]))
    with pytest.raises(ValueError, match="image_num_tiles"):
        model(input_ids=prompt(32), pixel_values=pixels(2), image_num_tiles=torch.tensor([3]))


def test_config_errors_name_the_problem():
    with pytest.raises(ValueError, match="model_type"):
        PVCConfig(text_config={"hidden_size": 8})
    with pytest.raises(ValueError, match="downsample_ratio"):
        tiny_config(downsample_ratio=0.3)
    with pytest.raises(ValueError, match="num_temporal_layers"):
        tiny_config(vision=dict(num_temporal_layers=9))
    with pytest.raises(ValueError, match="adaln_hidden_size must be a positive width"):
        tiny_config(vision=dict(adaln_hidden_size=0))
    with pytest.raises(ValueError, match="projector_adaln_hidden_size must be a positive width"):
        tiny_config(projector_adaln_hidden_size=-1)
    with pytest.raises(ValueError, match="projector_adaln_condition must be one of 'input\\+timestamp', 'timestamp'"):
        tiny_config(projector_adaln_condition="x+te")


def test_config_round_trip(tmp_path):
    config = tiny_config("pvc")
    config.save_pretrained(tmp_path)
    loaded = PVCConfig.from_pretrained(tmp_path)
    assert loaded.text_config.model_type == "qwen2"
    assert loaded.vision_config.num_temporal_layers == 2
    assert loaded.tokens_per_frame == 4
    assert loaded.auto_map["AutoModelForImageTextToText"] == "modeling_pvc.PVCForConditionalGeneration"


# The CPU always; CUDA and flash-attn where the machine has them (the GPU checks of benchmarks/README.md).
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("implementation", ["eager", "sdpa", "flash_attention_2"])
def test_bfloat16_stays_close_to_float32(device, implementation, pixels):
    """The whole model in bf16 (images and a video, every attention of the tower and the language model through
    `implementation`) against the float32 eager model on the CPU: within bf16's precision, no lost timestamps or
    broken kernel."""
    if implementation == "flash_attention_2" and (device != "cuda" or importlib.util.find_spec("flash_attn") is None):
        pytest.skip("flash_attention_2 needs CUDA and the flash-attn package")
    reference = tiny_model("pvc", attn_implementation="eager")
    inputs = mixed_sample(reference, pixels, ["image", "video"])  # float32 pixels: the model casts them
    model = tiny_model("pvc", attn_implementation=implementation).to(device, torch.bfloat16)
    with torch.no_grad():
        expected = reference(**inputs).logits
        logits = model(**{key: value.to(device) for key, value in inputs.items()}).logits
    assert logits.dtype == torch.bfloat16
    # bf16 keeps 8 significant bits (rounding 2**-9 per operation); a few dozen roundings in a row stay within a
    # few percent. Timestamps rounded to bf16 before the sinusoid (t * 1000 on 8 bits) already exceed the bound.
    error = (logits.float().cpu() - expected).norm() / expected.norm()
    assert error < 0.05, f"bf16 {implementation} on {device}: relative error {error:.4f}"


def test_beam_expansion_keeps_each_samples_visuals_together(pixels):
    """Beam search and num_return_sequences repeat every sample; its multi-tile images and videos must follow it
    whole: the expanded batch gives each copy the logits of its sample alone."""
    model = tiny_model("pvc")
    first = mixed_sample(model, pixels, ["image", "video"])
    second = mixed_sample(model, pixels, ["video", "image"])
    batch = dict(
        pixel_values=torch.cat([first["pixel_values"], second["pixel_values"]]),
        image_num_tiles=torch.tensor([2, 2]),
        pixel_values_videos=torch.cat([first["pixel_values_videos"], second["pixel_values_videos"]]),
        video_num_frames=torch.tensor([3, 3]),
        visual_order=torch.tensor([0, 1, 1, 0]),
    )
    input_ids = torch.cat([first["input_ids"], second["input_ids"]])
    input_ids, expanded = model._expand_inputs_for_generation(expand_size=3, input_ids=input_ids, **batch)
    with torch.no_grad():
        logits = model(input_ids=input_ids, **expanded).logits
        expected = torch.cat([model(**first).logits] * 3 + [model(**second).logits] * 3)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    beams = model.generate(input_ids=input_ids[::3], **batch, max_new_tokens=3, num_beams=3, pad_token_id=0)
    assert beams.shape[0] == 2


def test_device_map_auto_with_offload_gives_the_same_logits(tmp_path, pixels):
    """accelerate's dispatch (here to CPU and disk, the only devices a CI machine has) keeps the layers whole and
    moves features where the embeddings are."""
    model = tiny_model("pvc")
    model.save_pretrained(tmp_path / "model")
    dispatched = AutoModelForImageTextToText.from_pretrained(
        tmp_path / "model",
        trust_remote_code=True,
        dtype=torch.float32,
        device_map="auto",
        max_memory={"cpu": "2MB"},
        offload_folder=str(tmp_path / "offload"),
    )
    assert "disk" in set(dispatched.hf_device_map.values())
    inputs = dict(input_ids=prompt(4 * 4 * 2), pixel_values=pixels(2), image_num_tiles=torch.tensor([2]))
    with torch.no_grad():
        torch.testing.assert_close(dispatched(**inputs).logits, model(**inputs).logits, rtol=1e-5, atol=1e-5)


def test_videos_of_several_shapes_batched_equal_each_alone(pixels):
    """Videos of one shape go through the tower together; mixed shapes must come back in their own order."""
    model = tiny_model("pvc")
    shapes = [(3, 1), (2, 2), (3, 1), (4, 1)]  # (frames, tiles per frame)
    clips = [pixels(frames * tiles) for frames, tiles in shapes]
    with torch.no_grad():
        together = model.model.get_video_features(
            torch.cat(clips), torch.tensor([f for f, _ in shapes]), torch.tensor([t for _, t in shapes])
        ).pooler_output
        alone = [
            model.model.get_video_features(clip, torch.tensor([f]), torch.tensor([t])).pooler_output[0]
            for clip, (f, t) in zip(clips, shapes)
        ]
    assert [len(x) for x in together] == [4 * f * t for f, t in shapes]
    for batched, single in zip(together, alone):
        torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-5)


def test_temporal_gate_init_option():
    """Zero by default (the paper); `temporal_gate_init` starts every gate channel at the value given."""
    assert all(
        float(p.abs().max()) == 0 for n, p in tiny_model(randomize=False).named_parameters() if "temporal_gate" in n
    )
    model = tiny_model(randomize=False, vision={"temporal_gate_init": 0.05})
    gates = [p for n, p in model.named_parameters() if "temporal_gate" in n]
    assert len(gates) == 2 and all(torch.equal(g, torch.full_like(g, 0.05)) for g in gates)


def test_generate_with_a_cache_passed_in(pixels):
    """A cache given to `generate` (reused across turns, offloaded, quantized) is used, under the name the installed
    transformers gives it (`past_key_values` in 5.0, `cache` later)."""
    import inspect

    from transformers import DynamicCache
    from transformers.models.qwen2.modeling_qwen2 import Qwen2Model

    name = "cache" if "cache" in inspect.signature(Qwen2Model.forward).parameters else "past_key_values"
    model = tiny_model("pvc")
    inputs = dict(input_ids=prompt(4 * 4), pixel_values=pixels(1), image_num_tiles=torch.tensor([1]))
    plain = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    cache = DynamicCache(config=model.config.text_config)
    with_cache = model.generate(**inputs, **{name: cache}, max_new_tokens=4, do_sample=False)
    assert torch.equal(plain, with_cache)
    assert cache.get_seq_length() == plain.shape[1] - 1  # the cache passed in is the one that was filled


def sinusoid_by_hand(num_frames, scale=1000.0, size=256):
    """What the README documents, computed independently: t_k = k / (T - 1) (t = 0 for one frame), times 1000,
    then [cos(t f_i), sin(t f_i)] with f_i = 10000^(-i / 128), i = 0..127."""
    import math

    times = [k / (num_frames - 1) if num_frames > 1 else 0.0 for k in range(num_frames)]
    half = size // 2
    rows = []
    for t in times:
        angles = [t * scale * math.exp(-math.log(10000.0) * i / half) for i in range(half)]
        rows.append([math.cos(a) for a in angles] + [math.sin(a) for a in angles])
    return torch.tensor(rows)


@pytest.mark.parametrize("num_frames", [1, 3, 5])
def test_temporal_embeddings_see_the_documented_timestamps(pixels, num_frames):
    """Both temporal embedders (the tower's and the projector's) get the sinusoid of t_k = k / (T - 1) x 1000, in
    frame order, for a video and for an image's static clip."""
    model = tiny_model("pvc")
    seen = {}
    embedders = {
        "tower": model.model.vision_tower.temporal_embedding,
        "projector": model.model.multi_modal_projector.temporal_embedding,
    }
    hooks = [
        module.linear_1.register_forward_hook(
            lambda m, inputs, out, name=name: seen.setdefault(name, []).append(inputs[0])
        )
        for name, module in embedders.items()
    ]
    with torch.no_grad():
        model.model.get_video_features(pixels(num_frames), torch.tensor([num_frames]))
    expected = sinusoid_by_hand(num_frames)
    for name in embedders:
        torch.testing.assert_close(seen[name][-1].float(), expected, rtol=1e-4, atol=1e-4, msg=name)
    seen.clear()
    with torch.no_grad():
        model.model.get_image_features(pixels(1))
    for hook in hooks:
        hook.remove()
    for name in embedders:  # an image: a static clip of image_repeat = 4 frames
        torch.testing.assert_close(seen[name][-1].float(), sinusoid_by_hand(4), rtol=1e-4, atol=1e-4, msg=name)


def test_fresh_adaln_is_the_plain_layer_norm(pixels):
    """The paper's initialisation: a new AdaLN computes LayerNorm(x) without affine, whatever the condition."""
    # as built (and as conversion initialises the new modules)
    assert_adalns_are_plain_layer_norms(tiny_model("pvc", randomize=False), seed=5)


def test_position_embeddings_at_another_resolution_as_transformers_internvl():
    """Tiles of another size interpolate the learned positions as InternViT does (bicubic): transformers' InternVL
    embeddings are the reference."""
    model = tiny_model("a", attn_implementation="eager")
    reference = internvl_reference(model)
    generator = torch.Generator().manual_seed(7)
    for size in (42, 70, 98):  # 6x6, 10x10, 14x14 patch grids against the trained 8x8
        pixel_values = torch.randn(2, 3, size, size, generator=generator)
        with torch.no_grad():
            ours = model.model.vision_tower.embeddings(pixel_values)
            theirs = reference.model.vision_tower.embeddings(pixel_values)
        theirs = theirs[0] if isinstance(theirs, tuple) else theirs  # (embeddings, grid) in some versions
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5, msg=f"{size}px")


def test_stochastic_depth(pixels):
    """drop_path_rate: rates rise linearly over the layers (InternViT's rule, by hand); evaluation is unchanged; in
    training whole branches of a sample are dropped, and the expectation is kept."""
    model = tiny_model("pvc", vision={"drop_path_rate": 0.3})
    layers = model.model.vision_tower.encoder.layer
    assert [layer.drop_path.rate for layer in layers] == pytest.approx([0.0, 0.15, 0.3])
    plain = tiny_model("pvc")
    frames = pixels(3)
    with torch.no_grad():
        evaluated = model.model.vision_tower(frames, num_frames=3).last_hidden_state
        torch.testing.assert_close(evaluated, plain.model.vision_tower(frames, num_frames=3).last_hidden_state)
    drop = layers[2].drop_path.train()
    branch = torch.ones(4000, 2, 3)
    torch.manual_seed(0)
    out = drop(branch)
    kept = out[:, 0, 0] != 0
    assert torch.equal(out[kept], torch.full_like(out[kept], 1 / 0.7))  # whole samples, rescaled
    assert abs(kept.float().mean().item() - 0.7) < 0.03 and abs(out.mean().item() - 1) < 0.05
    model.train()
    torch.manual_seed(1)
    trained = model.model.vision_tower(frames, num_frames=3).last_hidden_state
    assert not torch.allclose(trained, evaluated)
    with pytest.raises(ValueError, match="drop_path_rate"):
        tiny_model("pvc", vision={"drop_path_rate": 1.0})


def test_text_only_training_batches_touch_every_parameter():
    """DDP with find_unused_parameters=False (pvc-finetune's setting), FSDP and DeepSpeed need a gradient for every
    trainable parameter on every step, also when a batch holds no image or video; the loss is unchanged."""
    model = tiny_model("pvc").train()
    input_ids = prompt(0)
    loss = model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    missing = [name for name, param in model.named_parameters() if param.grad is None]
    assert not missing, missing
    visual = [p.grad for n, p in model.named_parameters() if "vision_tower" in n or "multi_modal_projector" in n]
    assert all(not grad.any() for grad in visual)  # zero: the text-only loss does not depend on them
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=input_ids, labels=input_ids).loss, loss.detach())
        assert torch.equal(model.eval()(input_ids=input_ids).logits, model.train()(input_ids=input_ids).logits)


@pytest.mark.parametrize("condition", ["input+timestamp", "timestamp"])
def test_projector_adaln_condition(pixels, condition):
    """The projector computes MLP(LayerNorm(x) * (1 + scale(z)) + shift(z)) with z = x_hat + TE' (the paper) or
    z = TE' alone (Table 3's TE row), worked out here from its parts; with TE' alone the affine is one per frame."""
    model = tiny_model(projector_adaln_condition=condition)
    projector = model.model.multi_modal_projector
    with torch.no_grad():
        vision = model.model.vision_tower(pixels(2), num_frames=4, static=True).last_hidden_state  # [8, N, C]
        shuffled = projector.pixel_shuffle(vision, 4)  # [2, 4, M, 16C]
        embeds = projector.temporal_embedding(torch.linspace(0, 1, 4))[None, :, None]  # t_k = k / 3: [1, 4, 1, 16C]
        z = shuffled + embeds if condition == "input+timestamp" else embeds.expand_as(shuffled)
        adaln = projector.adaln
        normed = torch.nn.functional.layer_norm(shuffled, shuffled.shape[-1:], eps=1e-5)
        expected = normed * (1 + adaln.scale(z)) + adaln.shift(z)
        expected = projector.linear_2(torch.nn.functional.gelu(projector.linear_1(expected)))
        torch.testing.assert_close(projector(vision, 4), expected, rtol=1e-5, atol=1e-6)
        scale = adaln.scale(z)  # [2, 4, M, 16C]
        same_for_every_token = torch.allclose(scale, scale[:1, :, :1].expand_as(scale))
        assert same_for_every_token == (condition == "timestamp")


def test_set_attn_implementation_switches_the_vision_tower_too(pixels):
    """`set_attn_implementation` after loading reaches the vision attention (transformers lets a model switch when
    its attention goes through the attention interface): each switch gives what a model built that way gives."""
    images = pixels(2)
    ids = torch.tensor([[5] + [IMAGE_TOKEN] * 16 + [6], [7] + [IMAGE_TOKEN] * 16 + [8]])
    built = {name: tiny_model(attn_implementation=name) for name in ("eager", "sdpa")}
    switched = tiny_model(attn_implementation="sdpa")
    calls = []
    with torch.no_grad():
        for name in ("eager", "sdpa"):
            switched.set_attn_implementation(name)
            assert switched.model.vision_tower.config._attn_implementation == name
            attention = switched.model.vision_tower.encoder.layer[0].attention
            calls.append(attention.attention_interface().__name__)
            expected = built[name](input_ids=ids, pixel_values=images).logits
            torch.testing.assert_close(switched(input_ids=ids, pixel_values=images).logits, expected)
    assert calls[0] == "eager_attention_forward" and calls[1] != "eager_attention_forward"


def test_tied_embedding_and_head_are_sharded_together():
    """The tensor-parallel plan splits the language-model head whenever it splits the input embedding it may be tied
    to (transformers 5.0's plans split neither; later releases split the embedding)."""
    plan = tiny_model().tp_plan
    assert ("lm_head" in plan) == ("model.language_model.embed_tokens" in plan)


def test_generate_from_embeddings_equals_generate_from_ids(pixels):
    """`generate(inputs_embeds=...)` (the embeddings of the ids, image tokens included) answers what
    `generate(input_ids=...)` answers for the same image."""
    model = tiny_model()
    images = pixels(1)
    ids = torch.tensor([[5, 6] + [IMAGE_TOKEN] * 16 + [7, 8]])  # 4 tokens per frame x 4 repeats
    mask = torch.ones_like(ids)
    with torch.no_grad():
        from_ids = model.generate(
            input_ids=ids, attention_mask=mask, pixel_values=images, max_new_tokens=6, do_sample=False
        )
        embeds = model.get_input_embeddings()(ids)
        from_embeds = model.generate(
            inputs_embeds=embeds, attention_mask=mask, pixel_values=images, max_new_tokens=6, do_sample=False
        )
    assert from_embeds.tolist() == from_ids[:, ids.shape[1] :].tolist()


def test_feature_methods_give_transformers_outputs(pixels):
    """get_image_features / get_video_features, on both classes: a ModelOutput by default (a tuple with
    return_dict=False) whose pooler_output has one [tokens, D] entry per item, and the vision tower's per-layer
    states and attention weights on request."""
    model = tiny_model("pvc").eval()
    model.set_attn_implementation("eager")
    layers, heads = TINY_VISION["num_hidden_layers"], TINY_VISION["num_attention_heads"]
    tiles = pixels(3)
    with torch.no_grad():
        for owner in (model, model.model):
            images = owner.get_image_features(tiles, torch.tensor([2, 1]), output_hidden_states=True)
            assert [item.shape for item in images.pooler_output] == [(4 * 4 * 2, 48), (4 * 4, 48)]
            as_tuple = owner.get_image_features(tiles, torch.tensor([2, 1]), return_dict=False)
            assert isinstance(as_tuple, tuple)
            torch.testing.assert_close(torch.cat(as_tuple[1]), torch.cat(images.pooler_output))
        # the tower's states: embeddings first, the last layer's output last; one row per tile and frame
        assert len(images.hidden_states) == layers + 1 and images.last_hidden_state.shape == (3, 4, 65, 32)
        embedded = model.model.vision_tower.embeddings(tiles)  # [3, N, C], each image's 4 frames alike
        torch.testing.assert_close(images.hidden_states[0].view(3, 4, 65, 32), embedded[:, None].expand(-1, 4, -1, -1))
        torch.testing.assert_close(images.hidden_states[-1].view(3, 4, 65, 32), images.last_hidden_state)
        video = model.get_video_features(pixels(5), torch.tensor([5]), output_attentions=True)
    assert len(video.pooler_output) == 1 and video.pooler_output[0].shape == (4 * 5, 48)
    assert len(video.attentions) == layers and video.attentions[0].shape == (5, heads, 65, 65)
    (temporal,) = video.temporal_attentions[-1]  # the last progressive layer, the only video: [P, N, H, T, T]
    assert len(video.temporal_attentions) == TINY_VISION["num_temporal_layers"] and temporal.shape == (1, 65, 4, 5, 5)
    # softmax rows over the frames a frame may see: none after it (frame-causal)
    torch.testing.assert_close(temporal.sum(-1), torch.ones(1, 65, heads, 5))
    seen = torch.ones(5, 5, dtype=torch.bool).tril()
    assert float(temporal[..., ~seen].abs().max()) == 0.0 and float(temporal[..., seen].min()) > 0.0


def test_video_outputs_come_back_in_the_input_order(pixels):
    """Videos of several shapes are encoded by shape; every per-row output (last state, hidden states, attention
    weights) must come back in pixel_values_videos' own order: frame-major rows, tile after tile."""
    model = tiny_model("pvc").eval()
    model.set_attn_implementation("eager")
    shapes = [(3, 2), (2, 1), (3, 2)]  # (frames, tiles per frame)
    clips = [pixels(frames * tiles) for frames, tiles in shapes]
    options = dict(output_hidden_states=True, output_attentions=True)
    with torch.no_grad():
        together = model.get_video_features(
            torch.cat(clips), torch.tensor([f for f, _ in shapes]), torch.tensor([t for _, t in shapes]), **options
        )
        start = 0
        for index, (clip, (frames, tiles)) in enumerate(zip(clips, shapes)):
            rows = slice(start, start + frames * tiles)
            start += frames * tiles
            # the tower by hand on this video alone: one stream per tile position, frames in order
            streams = clip.view(frames, tiles, 3, 56, 56).transpose(0, 1).reshape(-1, 3, 56, 56)
            alone = model.model.vision_tower(streams, num_frames=frames, **options)

            def frame_major(tensor):  # [(P T), ...] -> [(T P), ...]
                return tensor.unflatten(0, (tiles, frames)).transpose(0, 1).flatten(0, 1)

            torch.testing.assert_close(together.last_hidden_state[rows], frame_major(alone.last_hidden_state))
            for mixed, single in zip(
                together.hidden_states + together.attentions, alone.hidden_states + alone.attentions
            ):
                torch.testing.assert_close(mixed[rows], frame_major(single), rtol=1e-5, atol=1e-6)
            for mixed, single in zip(together.temporal_attentions, alone.temporal_attentions):
                torch.testing.assert_close(mixed[index], single, rtol=1e-5, atol=1e-6)


def test_model_output_carries_the_image_and_video_outputs(pixels):
    """forward returns the encoders' outputs beside the language model's (`image_outputs`, `video_outputs`), the
    features it placed in the text; `return_dict=False` turns them into tuples too."""
    model = tiny_model("pvc").eval()
    ids = torch.cat([prompt(16), prompt(4 * 3)], dim=1)  # an image of one tile, then a video of 3 frames
    inputs = dict(
        input_ids=ids,
        pixel_values=pixels(1),
        pixel_values_videos=pixels(3),
        video_num_frames=torch.tensor([3]),
        visual_order=torch.tensor([0, 1]),
    )
    with torch.no_grad():
        out = model(**inputs)
        placed = model.model.get_input_embeddings()(ids)
        features = torch.cat([*out.image_outputs.pooler_output, *out.video_outputs.pooler_output])
        placed[ids == IMAGE_TOKEN] = features
        by_hand = model.lm_head(model.model.language_model(inputs_embeds=placed).last_hidden_state)
        as_tuple = model(**inputs, return_dict=False)
    torch.testing.assert_close(out.logits, by_hand, rtol=1e-5, atol=1e-5)
    assert out.image_outputs.hidden_states is None and out.video_outputs.last_hidden_state.shape[0] == 3
    torch.testing.assert_close(as_tuple[0], out.logits)
    assert all(not isinstance(item, dict) for item in as_tuple)


def test_static_cache_and_a_compiled_decoding_step(pixels):
    """`_can_compile_fullgraph`: generating with a static cache gives the dynamic cache's logits, and a decoding step
    compiles as one graph (no break; dynamo with the eager backend, which needs no compiler)."""
    from transformers import StaticCache

    from pvc.modeling_pvc import CACHE_NAME

    model = tiny_model("pvc").eval()
    assert PVCForConditionalGeneration._can_compile_fullgraph
    ids, image = prompt(16), pixels(1)
    settings = dict(max_new_tokens=4, do_sample=False, return_dict_in_generate=True, output_logits=True)
    dynamic = model.generate(input_ids=ids, pixel_values=image, **settings)
    static = model.generate(input_ids=ids, pixel_values=image, cache_implementation="static", **settings)
    for a, b in zip(dynamic.logits, static.logits):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        cache = StaticCache(config=model.config.get_text_config(), max_cache_len=64)
        prefill = model(input_ids=ids, pixel_values=image, use_cache=True, **{CACHE_NAME: cache})
        token, position = prefill.logits[:, -1:].argmax(-1), torch.tensor([ids.shape[1]])
        step = dict(input_ids=token, use_cache=True, cache_position=position, position_ids=position[None])
        compiled = torch.compile(model.forward, fullgraph=True, backend="eager")(**step, **{CACHE_NAME: cache})
    torch.testing.assert_close(compiled.logits[:, -1], dynamic.logits[1], rtol=1e-5, atol=1e-5)


def test_visuals_that_do_not_end_on_a_samples_boundary_are_an_error(pixels):
    """A batch whose visual_order disagrees with its samples' placeholders: sample 0 holds a video's 12 tokens,
    sample 1 an image's 16, but the order says image first. The totals agree (28), so a walk that lets a sample
    overshoot would give sample 0 the image and sample 1 the video; beam expansion and forward must refuse."""
    model = tiny_model("pvc")
    video_ids = [1, 125] + [IMAGE_TOKEN] * 12 + [126, 2, 3, 4, 5]  # padded to one length with text
    image_ids = [1, 125] + [IMAGE_TOKEN] * 16 + [126]
    batch = dict(
        input_ids=torch.tensor([video_ids, image_ids]),
        pixel_values=pixels(1),
        pixel_values_videos=pixels(3),
        video_num_frames=torch.tensor([3]),
        visual_order=torch.tensor([0, 1]),  # wrong: sample 0's video comes first in text
    )
    with pytest.raises(ValueError, match="Sample 0 holds 12 image tokens"):
        model._expand_inputs_for_generation(expand_size=2, **batch)
    with pytest.raises(ValueError, match="Sample 0 holds 12 image tokens"), torch.no_grad():
        model(**batch)
    # the right order works, and the expansion gives each copy its own sample's visuals
    batch["visual_order"] = torch.tensor([1, 0])
    input_ids, expanded = model._expand_inputs_for_generation(expand_size=2, **batch)
    assert expanded["visual_order"].tolist() == [1, 1, 0, 0]
    with torch.no_grad():
        logits = model(input_ids=input_ids, **expanded).logits
        alone = model(input_ids=batch["input_ids"][1:], pixel_values=batch["pixel_values"]).logits
    torch.testing.assert_close(logits[3:], alone, rtol=1e-5, atol=1e-5)
