"""What serving with vLLM relies on, checked without vLLM (scripts/test_vllm.sh runs vLLM itself): the grid layout
of per-item counts, placeholder offsets, token counts without media, the video sub-processor, feature methods in
transformers' convention, tensor parallelism of the vision tower, and the pvc-serve command."""

import importlib.util
import json
import re

import numpy as np
import pytest
import torch
from conftest import IMAGE_TOKEN, tiny_model, tiny_processor
from PIL import Image

from pvc import PVCImageProcessor, PVCProcessor
from pvc.modeling_pvc import PVCVisionAttention
from pvc.video_processing_pvc import PVCVideoProcessor


def image(width, height, seed=0):
    return Image.fromarray(np.random.RandomState(seed).randint(0, 255, (height, width, 3), dtype=np.uint8))


def video(frames, seed=0, height=40, width=48):
    return np.random.RandomState(seed).randint(0, 255, (frames, height, width, 3), dtype=np.uint8)


def test_grid_layout_has_one_row_per_item_and_gives_the_same_logits():
    """vLLM splits every per-item field by the item's rows of pixels, except `*_grid_thw`, which it keeps one row per
    item; the grid layout carries the same counts there, and the model reads either layout alike."""
    processor = tiny_processor(max_tiles=4)
    text = ["<video> then <image> and <image>", "<image> only"]
    media = dict(images=[[image(112, 56, 1), image(56, 56, 2)], [image(168, 56, 3)]], videos=[video(5, 4)])
    counts = processor(text=text, **media)
    grids = processor(text=text, **media, grid_layout=True)
    for name in ("image_num_tiles", "video_num_frames", "video_num_tiles"):
        assert name in counts and name not in grids
    tiles = counts["image_num_tiles"]
    assert tiles.tolist() == [3, 1, 4]  # 2x1 + thumbnail, 1, 3x1 + thumbnail
    assert grids["image_grid_thw"].tolist() == [[1, 1, int(count)] for count in tiles]
    assert grids["video_grid_thw"].tolist() == [[4, 1, 1]]  # 4 frames of 1 tile
    torch.testing.assert_close(grids["pixel_values"], counts["pixel_values"])
    model = tiny_model()
    with torch.no_grad():
        expected = model(**counts).logits
        torch.testing.assert_close(model(**grids).logits, expected)
        grid_processor = tiny_processor(max_tiles=4, grid_layout=True)  # the processor's default, as vLLM sets it
        torch.testing.assert_close(model(**grid_processor(text=text, **media)).logits, expected)


def test_placeholder_offsets_locate_each_replacement():
    processor = tiny_processor(max_tiles=4)
    text = ["a <image> b <video> c", "<image><image>"]
    out = processor(
        text=text,
        images=[image(112, 56), image(56, 56), image(56, 112)],
        videos=[video(3)],
        return_text_replacement_offsets=True,
        padding=False,
        return_tensors=None,
    )
    offsets = out["text_replacement_offsets"]
    assert [[entry["type"] for entry in sample] for sample in offsets] == [["image", "video"], ["image", "image"]]
    for sample, entries, ids in zip(text, offsets, out["input_ids"]):
        expanded = processor.tokenizer.decode(ids)
        for entry in entries:
            start, end = entry["span"]
            assert sample[start:end] == entry["text"] == f"<{entry['type']}>"
            start, end = entry["new_span"]
            assert expanded[start:end] == entry["replacement"]
            assert entry["replacement"].startswith("<img>") or entry["replacement"].startswith("Frame1: <img>")
        # the text between placeholders is untouched
        assert re.sub(r"<image>|<video>", "", sample) == re.sub(
            r"(Frame\d+: )?<img>(<IMG_CONTEXT>)*</img>\n?", "", expanded
        )


@pytest.mark.parametrize("max_tiles", [1, 4, 6])
def test_token_counts_without_media_match_the_processor(max_tiles):
    """`_get_num_multimodal_tokens` (what vLLM budgets and profiles with) against what processing real media gives:
    the `<IMG_CONTEXT>` tokens of each image and video, and each image's tiles."""
    processor = tiny_processor(max_tiles=max_tiles)
    sizes = [(56, 56), (56, 168), (100, 30), (400, 90), (57, 300)]  # (height, width)
    counts = processor._get_num_multimodal_tokens(image_sizes=sizes, video_sizes=[(7, 40, 48), (2, 100, 300)])
    for (height, width), tokens, tiles in zip(sizes, counts["num_image_tokens"], counts["num_image_patches"]):
        out = processor(text="<image>", images=[image(width, height)])
        assert int((out["input_ids"] == IMAGE_TOKEN).sum()) == tokens
        assert int(out["image_num_tiles"][0]) == tiles
    for frames, expected in zip((video(7), video(2, height=100, width=300)), counts["num_video_tokens"]):
        out = processor(text="<video>", videos=[frames], video_max_tiles=1)
        assert int((out["input_ids"] == IMAGE_TOKEN).sum()) == expected
    tiled = processor._get_num_multimodal_tokens(video_sizes=[(3, 56, 168)], video_max_tiles=4)["num_video_tokens"]
    out = processor(text="<video>", videos=[video(3, height=56, width=168)], video_max_tiles=4)
    assert int((out["input_ids"] == IMAGE_TOKEN).sum()) == tiled[0]


def test_video_processor_takes_the_image_processors_settings_and_saves_its_own(tmp_path):
    """Built from an image processor, the video processor takes its video settings and pixels; set apart, its own
    settings save and load with the processor."""
    processor = tiny_processor()
    videos = processor.video_processor
    assert isinstance(videos, PVCVideoProcessor) and videos.num_frames == processor.image_processor.num_frames
    clip = video(9)
    ours = videos(videos=[clip], num_frames=3)
    theirs = PVCVideoProcessor(image_size=56, num_frames=4)(videos=[clip], num_frames=3)
    assert set(ours) == set(videos.model_input_names)
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key])
    videos.num_frames = 5
    processor.save_pretrained(tmp_path)
    loaded = PVCProcessor.from_pretrained(tmp_path, trust_remote_code=True)
    assert loaded.video_processor.num_frames == 5 and loaded.image_processor.num_frames == 4


def test_feature_methods_follow_transformers_conventions():
    model = tiny_model()
    processor = tiny_processor(max_tiles=4)
    out = processor(text="<image><image><video>", images=[image(112, 56), image(56, 56)], videos=[video(4)])
    grids = processor(
        text="<image><image><video>", images=[image(112, 56), image(56, 56)], videos=[video(4)], grid_layout=True
    )
    with torch.no_grad():
        images = model.model.get_image_features(out["pixel_values"], out["image_num_tiles"]).pooler_output
        pooled = model.model.get_image_features(
            grids["pixel_values"], image_grid_thw=grids["image_grid_thw"], return_dict=True, unused=1
        )
        torch.testing.assert_close(pooled.pooler_output, images)
        clips = model.model.get_video_features(
            out["pixel_values_videos"], out["video_num_frames"], out["video_num_tiles"]
        ).pooler_output
        pooled = model.model.get_video_features(
            grids["pixel_values_videos"], video_grid_thw=grids["video_grid_thw"], return_dict=True
        )
        torch.testing.assert_close(pooled.pooler_output, clips)
    assert sum(len(features) for features in images + clips) == int((out["input_ids"] == IMAGE_TOKEN).sum())


def test_vision_attention_split_by_heads_sums_to_the_whole():
    """Tensor parallelism as the plan says it (q, k, v split by heads, the output projection by rows, the partial
    outputs summed), done by hand on two shards: equal to the unsplit attention."""
    model = tiny_model()
    attention = model.model.vision_tower.encoder.layer[1].temporal_attention
    hidden = torch.randn(3, 5, attention.embed_dim)
    half = attention.embed_dim // 2
    shards = []
    for rows in (slice(0, half), slice(half, None)):
        shard = PVCVisionAttention(attention.config, is_causal=attention.is_causal)
        with torch.no_grad():
            for name in ("q_proj", "k_proj", "v_proj"):
                full = getattr(attention, name)
                getattr(shard, name).weight = torch.nn.Parameter(full.weight[rows])
                getattr(shard, name).bias = torch.nn.Parameter(full.bias[rows])
            shard.projection_layer.weight = torch.nn.Parameter(attention.projection_layer.weight[:, rows])
            shard.projection_layer.bias = torch.nn.Parameter(attention.projection_layer.bias / 2)
        shards.append(shard.eval())
    with torch.no_grad():
        torch.testing.assert_close(sum(shard(hidden)[0] for shard in shards), attention.eval()(hidden)[0])
    # and the plan names real modules
    plan = model.model.tp_plan
    linear = [name for name, module in model.model.named_modules() if isinstance(module, torch.nn.Linear)]
    vision = {pattern for pattern in plan if pattern.startswith("vision_tower.")}
    assert vision and all(
        any(re.fullmatch(pattern.replace("*", r"\d+"), name) for name in linear) for pattern in vision
    )


def test_serve_command_adds_pvc_options_and_merges_the_users(tmp_path):
    from pvc.serving import AUTO_MAP
    from pvc.serving.cli import code_problem, command

    arguments = command([str(tmp_path), "--port", "9000", "--mm-processor-kwargs", '{"num_frames": 32}'])
    assert arguments[1:5] == ["-m", "vllm.entrypoints.openai.api_server", "--model", str(tmp_path)]
    options = dict(zip(arguments[5:], arguments[6:]))
    assert (
        json.loads(options["--hf-overrides"])["auto_map"]["AutoModel"]
        == AUTO_MAP["AutoModel"]
        == "modeling_pvc.PVCModel"
    )
    assert json.loads(options["--mm-processor-kwargs"]) == {"grid_layout": True, "num_frames": 32}
    assert arguments.count("--mm-processor-kwargs") == 1 and options["--port"] == "9000"
    assert "--trust-remote-code" in arguments and options["--model-impl"] == "transformers"
    with pytest.raises(ValueError, match="takes JSON"):
        command([str(tmp_path), "--hf-overrides", "{not json"])
    # a checkpoint whose copied code predates serving is named, with the fix
    (tmp_path / "processing_pvc.py").write_text("class PVCProcessor: ...\n")
    assert "predate serving" in code_problem(str(tmp_path))
    tiny_processor().save_pretrained(tmp_path / "new")
    tiny_model().save_pretrained(tmp_path / "new")
    assert code_problem(str(tmp_path / "new")) is None


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_serve_without_vllm_says_what_to_install(capsys, tmp_path):
    from pvc.serving.cli import main

    assert main([str(tmp_path)]) == 1
    assert "pip install vllm" in capsys.readouterr().err


def test_image_processor_declares_image_inputs_only():
    """vLLM attributes each output to the sub-processor that declares it: video inputs belong to the video one."""
    assert not set(PVCImageProcessor.model_input_names) & set(PVCVideoProcessor.model_input_names)
    assert set(tiny_processor().model_input_names) >= {"pixel_values", "pixel_values_videos", "video_num_frames"}


@pytest.mark.parametrize("max_tiles", [1, 4, 6, 7, 12])
def test_the_size_vllm_profiles_gives_the_most_image_tokens(max_tiles):
    """vLLM sizes its encoder cache from the image it profiles, at the image processor's `size`: no image the
    processor takes may give more tokens (a 4:3 photo at 12 tiles gives 13, a square 10)."""
    processor = tiny_processor(max_tiles=max_tiles)
    size = processor.image_processor.size
    profiled = processor._get_num_multimodal_tokens(image_sizes=[(size["height"], size["width"])])
    tile = 56
    shapes = [(h, w) for h in range(tile // 2, 13 * tile, tile // 2) for w in range(tile // 2, 13 * tile, tile // 2)]
    counted = processor._get_num_multimodal_tokens(image_sizes=shapes)["num_image_tokens"]
    assert max(counted) == profiled["num_image_tokens"][0]
    # and the count is what the processor makes of such an image
    image = Image.new("RGB", (size["width"], size["height"]))
    out = processor(text="<image>", images=[image])
    assert int((out["input_ids"] == IMAGE_TOKEN).sum()) == profiled["num_image_tokens"][0]
