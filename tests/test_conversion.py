"""pvc-convert against the tiny InternVL2 fixtures, whose reference outputs come from the original code."""

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import IMAGE_TOKEN, assert_adalns_are_plain_layer_norms
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

from pvc.conversion.cli import main as convert
from pvc.conversion.rules import convert_projector

# Tiny checkpoints in the original InternVL2 layout with the original code's outputs, kept in the repo (how they were
# made: fixtures/internvl2/README.md); $PVC_FIXTURES points elsewhere.
DEFAULT_FIXTURES = Path(__file__).resolve().parent / "fixtures" / "internvl2"
FIXTURES = Path(os.environ.get("PVC_FIXTURES", DEFAULT_FIXTURES))
VARIANTS = ["internlm2", "qwen2", "phi3"]


def fixture(variant: str) -> Path:
    """A fixture checkpoint's folder. A missing one fails the test that asks for it, never skips it: these are the
    converter's strongest check, and a suite that passes without them has not checked the converter."""
    folder = FIXTURES / variant
    if not (folder / "config.json").is_file() or not (folder / "reference.safetensors").is_file():
        where = "$PVC_FIXTURES" if "PVC_FIXTURES" in os.environ else "the checkout"
        pytest.fail(
            f"The InternVL2 fixture {variant!r} is missing at {folder} (from {where}): tests/fixtures/internvl2 is "
            "part of the repository; restore it (git checkout -- tests/fixtures) or point $PVC_FIXTURES at a copy.",
            pytrace=False,
        )
    return folder


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Each fixture converted once per ablation row asked for."""
    cache = {}

    def get(variant, ablation="a", *extra):
        key = (variant, ablation, extra)
        if key not in cache:
            destination = tmp_path_factory.mktemp("converted") / f"{variant}-{ablation}"
            assert (
                convert(
                    [
                        "--src",
                        str(fixture(variant)),
                        "--dst",
                        str(destination),
                        "--ablation",
                        ablation,
                        "--max-shard-size",
                        "300KB",
                        *extra,
                    ]
                )
                == 0
            )
            cache[key] = destination
        return cache[key]

    return get


def load(folder):
    model = AutoModelForImageTextToText.from_pretrained(
        folder, trust_remote_code=True, dtype=torch.float32, attn_implementation="eager"
    )
    return model.eval()


def assert_relative(actual, expected, tolerance=1e-4):
    error = ((actual - expected).abs().max() / expected.abs().max()).item()
    assert error <= tolerance, f"relative error {error:.2e}"


@pytest.mark.parametrize("variant", VARIANTS)
def test_row_a_reproduces_the_original_implementation(converted, variant):
    reference = load_file(fixture(variant) / "reference.safetensors")
    folder = converted(variant, "a")
    model = load(folder)
    assert type(model).__module__ != "pvc.modeling_pvc"  # the code files written beside the weights
    pixels, tiles = reference["pixel_values"], torch.tensor([2])
    mm = dict(
        input_ids=reference["input_ids_mm"],
        attention_mask=reference["attention_mask_mm"],
        pixel_values=pixels,
        image_num_tiles=tiles,
    )
    with torch.no_grad():
        vit = model.model.vision_tower(pixels).last_hidden_state
        features = torch.cat(model.get_image_features(pixels, tiles).pooler_output)
        text_logits = model(input_ids=reference["input_ids_text"]).logits
        mm_logits = model(**mm).logits
        generated = model.generate(**mm, max_new_tokens=5, do_sample=False)
    assert_relative(vit, reference["vit_last_hidden_state"])
    assert_relative(features, reference["vit_embeds"].flatten(0, 1))
    assert_relative(text_logits, reference["logits_text"])
    assert_relative(mm_logits, reference["logits_mm"])
    assert generated[:, mm["input_ids"].shape[1] :].tolist() == reference["generated_ids"].tolist()


@pytest.mark.parametrize("variant", VARIANTS)
def test_processor_rebuilds_the_original_prompt(converted, variant):
    """The converted chat template, tokenizer and placeholder expansion give chat()'s exact input ids."""
    reference = load_file(fixture(variant) / "reference.safetensors")
    processor = AutoProcessor.from_pretrained(converted(variant, "a"), trust_remote_code=True)
    assert processor.tokens_per_frame == 256 and processor.image_repeat == 1
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image in detail."}]}
    ]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    text = text.replace("<image>", processor.image_prompt(2))
    ids = processor.tokenizer(text, return_tensors="pt")["input_ids"]
    assert ids.tolist() == reference["input_ids_mm"].tolist()


@pytest.mark.parametrize("variant", VARIANTS)
def test_pvc_conversion_keeps_the_vit(converted, variant):
    reference = load_file(fixture(variant) / "reference.safetensors")
    model = load(converted(variant, "pvc"))
    config = model.config
    assert config.downsample_ratio == 0.25 and config.image_repeat == 4 and config.projector_adaln
    assert config.vision_config.num_temporal_layers == 1  # a third of the fixture's 4 layers
    with torch.no_grad():
        frames = model.model.vision_tower(reference["pixel_values"], num_frames=4, static=True).last_hidden_state
    for t in range(4):
        assert_relative(frames[t::4], reference["vit_last_hidden_state"])
    with torch.no_grad():  # and the whole model runs
        (tokens,) = model.get_image_features(reference["pixel_values"], torch.tensor([2])).pooler_output
    assert tokens.shape == (64 * 4 * 2, config.text_config.hidden_size) and torch.isfinite(tokens).all()


def test_internlm2_tokenizer_matches_sentencepiece(converted):
    import sentencepiece

    model = sentencepiece.SentencePieceProcessor(model_file=str(fixture("internlm2") / "tokenizer.model"))
    # trust_remote_code=False: the tokenizer needs none (the config's auto_map would otherwise prompt)
    tokenizer = AutoTokenizer.from_pretrained(converted("internlm2", "a"), trust_remote_code=False)
    assert type(tokenizer).__module__.startswith("transformers.")

    def original(text):
        """InternLM2's tokenizer: split at special tokens, sentencepiece on each segment (with its dummy prefix)."""
        ids = []
        for segment in re.split(r"(<\|im_start\|>|<\|im_end\|>)", text):
            if segment in ("<|im_start|>", "<|im_end|>"):
                ids.append(model.piece_to_id(segment))
            elif segment:
                ids += model.encode(segment)
        return ids

    strings = [
        "The quick brown fox jumps over the lazy dog.",
        "  two leading spaces, two  inner and a trailing one ",
        "line one\nline two\n\n\ttabbed",
        "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型",
        "naïve café — ünïcödé ✓ 😀",
        "<|im_start|>user\nHi<|im_end|><|im_start|>assistant\n",
        "1234567890 !@#$%^&*()",
    ]
    for text in strings:
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == original(text), text
        assert tokenizer(text)["input_ids"] == [model.bos_id()] + original(text), text
    internvl = ["<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>"]
    ids = tokenizer("".join(internvl), add_special_tokens=False)["input_ids"]
    assert ids == list(range(500, 509))
    assert tokenizer.decode(model.encode("Hello  world, 你好")) == "Hello  world, 你好"


def test_configs_carry_rope_settings_and_stop_tokens(converted):
    llama = json.loads((converted("internlm2", "a") / "config.json").read_text())["text_config"]
    assert llama["model_type"] == "llama"
    rope = llama.get("rope_parameters") or {}
    assert rope.get("rope_type") == "dynamic" and rope.get("factor") == 2.0 and rope.get("rope_theta") == 1e6
    phi3 = json.loads((converted("phi3", "a") / "config.json").read_text())["text_config"]
    rope = phi3.get("rope_parameters") or {}
    assert rope.get("rope_type") == "longrope" and rope.get("original_max_position_embeddings") == 4096
    assert rope.get("short_factor") == [1.0, 1.05, 1.1, 1.2, 1.35, 1.5, 1.8, 2.2]
    for variant, stop in (("internlm2", 498), ("qwen2", 402), ("phi3", 407)):
        generation = json.loads((converted(variant, "a") / "generation_config.json").read_text())
        assert stop in generation["eos_token_id"], variant


def test_output_is_a_complete_repo(converted):
    folder = converted("qwen2", "pvc")
    for name in (
        "config.json",
        "generation_config.json",
        "model.safetensors.index.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "processor_config.json",
        "chat_template.jinja",
        "README.md",
        "modeling_pvc.py",
        "configuration_pvc.py",
        "processing_pvc.py",
        "image_processing_pvc.py",
        "visuals_pvc.py",
        "video_decoding_pvc.py",
        "video_processing_pvc.py",
        "video_preprocessor_config.json",
    ):
        assert (folder / name).exists(), name
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"]["AutoModelForImageTextToText"] == "modeling_pvc.PVCForConditionalGeneration"
    assert "base_model:" in (folder / "README.md").read_text()
    assert not list(folder.parent.glob(".*partial*"))


@pytest.mark.parametrize("ablation", ["b", "pvc"])
def test_warm_projector_on_uniform_groups_equals_internvl2(ablation):
    """A 4x4 group whose four 2x2 sub-groups are the same InternVL2 token goes through the warm-started projector
    exactly as that token through InternVL2's: the norm's statistics and the mean over sub-groups coincide."""
    from conftest import tiny_config

    torch.manual_seed(0)
    channels, width = 32, 48
    source = {
        "norm.weight": 1 + 0.3 * torch.randn(4 * channels),
        "norm.bias": 0.2 * torch.randn(4 * channels),
        "linear_1.weight": torch.randn(width, 4 * channels) / 11,
        "linear_1.bias": 0.1 * torch.randn(width),
        "linear_2.weight": torch.randn(width, width) / 7,
        "linear_2.bias": 0.1 * torch.randn(width),
    }
    config = tiny_config(ablation)
    from pvc.modeling_pvc import PVCMultiModalProjector

    projector = PVCMultiModalProjector(config).eval()
    tensors = convert_projector(source, config, "warm")
    projector.load_state_dict(
        {k.removeprefix("model.multi_modal_projector."): v for k, v in tensors.items()}, strict=False
    )
    if ablation == "pvc":  # fresh AdaLN: the identity-affine LayerNorm
        for name, param in projector.named_parameters():
            if "fc2" in name:
                torch.nn.init.zeros_(param)
    token = torch.randn(3, 4 * channels)  # InternVL2 tokens, channels ordered (i', j', c)
    group = token.view(3, 2, 2, channels).repeat(1, 2, 2, 1).reshape(3, 1, 1, 16 * channels)  # [S, T, M, 16C]
    expected = torch.nn.functional.layer_norm(token, (4 * channels,), source["norm.weight"], source["norm.bias"])
    expected = torch.nn.functional.gelu(expected @ source["linear_1.weight"].T + source["linear_1.bias"])
    expected = expected @ source["linear_2.weight"].T + source["linear_2.bias"]
    with torch.no_grad():
        if ablation == "pvc":
            hidden = projector.adaln(group, group + projector.temporal_embedding(torch.zeros(1))[None, :, None])
        else:
            hidden = projector.layer_norm(group)
        actual = projector.linear_2(projector.act(projector.linear_1(hidden)))
    torch.testing.assert_close(actual.view(3, width), expected, rtol=1e-5, atol=1e-5)


def test_random_projector_init_starts_afresh(converted):
    """--projector-init random: the first projector layer is the model's own initialisation (normal, std
    initializer_range, zero bias), not the warm start from InternVL2's layer."""
    folder = converted("qwen2", "c", "--projector-init", "random", "--dtype", "bf16")
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)
    assert model.dtype == torch.bfloat16
    assert model.config.vision_config.num_temporal_layers == 1 and not model.config.projector_adaln
    random = model.model.multi_modal_projector
    warm = load(converted("qwen2", "c")).model.multi_modal_projector
    assert not torch.allclose(random.linear_1.weight.float(), warm.linear_1.weight, atol=1e-3)
    std, weight = model.config.initializer_range, random.linear_1.weight.float()
    assert abs(weight.std().item() - std) < 0.2 * std and abs(weight.mean().item()) < 0.1 * std
    assert not random.linear_1.bias.any()
    # the second layer is InternVL2's either way
    torch.testing.assert_close(random.linear_2.weight.float(), warm.linear_2.weight, rtol=0, atol=1e-2)


def test_converted_pvc_starts_as_the_paper_says(converted):
    """A fresh conversion's new modules compute what the paper's initialisation says, on their outputs: every gate
    is zero and every AdaLN is the affine-free LayerNorm, whatever its condition."""
    model = load(converted("qwen2", "pvc"))
    assert_adalns_are_plain_layer_norms(model)
    gates = [
        layer.temporal_gate.weight
        for layer in model.model.vision_tower.encoder.layer
        if hasattr(layer, "temporal_gate")
    ]
    assert gates and all(not gate.any() for gate in gates)


def test_sizes_of_the_new_modules_are_chosen_on_the_command_line(converted, tmp_path, capsys):
    """--num-temporal-layers, --adaln-hidden-size and --projector-adaln-hidden-size shape the new modules; the
    converted tower still computes InternViT's features. Impossible sizes fail before anything is written."""
    options = ("--num-temporal-layers", "2", "--adaln-hidden-size", "8", "--projector-adaln-hidden-size", "24")
    model = load(converted("qwen2", "pvc", *options))
    config, tower = model.config, model.model.vision_tower
    width = config.vision_config.hidden_size
    assert config.vision_config.num_temporal_layers == 2 and config.projector_adaln_hidden_size == 24
    progressive = [layer for layer in tower.encoder.layer if hasattr(layer, "temporal_attention")]
    assert len(progressive) == 2 and progressive[0] is tower.encoder.layer[-2]
    assert progressive[0].temporal_norm.scale.fc1.weight.shape == (8, width)
    assert model.model.multi_modal_projector.adaln.shift.fc1.weight.shape == (24, 16 * width)
    reference = load_file(fixture("qwen2") / "reference.safetensors")
    with torch.no_grad():
        frames = tower(reference["pixel_values"], num_frames=4, static=True).last_hidden_state
    assert_relative(frames[3::4], reference["vit_last_hidden_state"])
    # more layers than the source's ViT has (sizes no ViT can have stop earlier: test_bad_option_values_...)
    message = "num_temporal_layers must lie in [0, num_hidden_layers=4]"
    assert_fails_cleanly(fixture("qwen2"), tmp_path, capsys, message, "--num-temporal-layers", "99")


def copy_fixture(variant, tmp_path):
    folder = tmp_path / f"{variant}-source"
    shutil.copytree(fixture(variant), folder)
    for path in folder.iterdir():
        path.chmod(0o644)
    return folder


def assert_fails_cleanly(source, tmp_path, capsys, message, *options):
    destination = tmp_path / "out" / "converted"
    assert convert(["--src", str(source), "--dst", str(destination), *options]) == 1
    assert message in capsys.readouterr().err
    assert not destination.exists()
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())  # no partial folder left


def test_truncated_shard_fails_cleanly(tmp_path, capsys):
    source = copy_fixture("internlm2", tmp_path)
    shard = source / "model-00003-of-00006.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1000])
    assert_fails_cleanly(source, tmp_path, capsys, "model-00003-of-00006.safetensors is truncated")


def test_missing_key_fails_cleanly(tmp_path, capsys):
    source = copy_fixture("qwen2", tmp_path)
    tensors = load_file(source / "model.safetensors")
    del tensors["language_model.model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, source / "model.safetensors", metadata={"format": "pt"})
    assert_fails_cleanly(source, tmp_path, capsys, "model.language_model.layers.1.mlp.up_proj.weight")


def test_unknown_key_fails_and_known_extras_are_dropped(tmp_path, capsys):
    source = copy_fixture("qwen2", tmp_path)
    tensors = load_file(source / "model.safetensors")
    save_file(tensors | {"mystery.weight": torch.zeros(2)}, source / "model.safetensors", metadata={"format": "pt"})
    assert_fails_cleanly(source, tmp_path, capsys, "mystery.weight")
    extra = {"language_model.model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)}
    save_file(tensors | extra, source / "model.safetensors", metadata={"format": "pt"})
    assert convert(["--src", str(source), "--dst", str(tmp_path / "ok"), "--ablation", "a"]) == 0
    assert "| dropped | 1 | 8 |" in capsys.readouterr().out


def test_pytorch_bin_shards_convert_like_safetensors(tmp_path, converted, monkeypatch):
    """Old `.bin` checkpoints: the same output as from safetensors, each shard read once however keys interleave."""
    source = copy_fixture("internlm2", tmp_path)
    tensors = {}
    for shard in sorted(source.glob("model-*.safetensors")):
        tensors |= load_file(shard)
        shard.unlink()
    (source / "model.safetensors.index.json").unlink()
    shards, weight_map = 3, {}
    for number in range(shards):  # round robin: neighbouring keys in different shards
        name = f"pytorch_model-0000{number + 1}-of-0000{shards}.bin"
        part = {key: tensor for index, (key, tensor) in enumerate(sorted(tensors.items())) if index % shards == number}
        torch.save(part, source / name)
        weight_map |= dict.fromkeys(part, name)
    (source / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))

    loads = []
    real_load = torch.load
    monkeypatch.setattr(
        torch, "load", lambda path, *args, **kwargs: loads.append(path) or real_load(path, *args, **kwargs)
    )
    destination = tmp_path / "from-bin"
    assert convert(["--src", str(source), "--dst", str(destination), "--ablation", "a"]) == 0
    assert len(loads) <= 2 * shards  # the projector's tensors, then all of them, file by file

    (source / "pytorch_model.bin.index.json").unlink()  # without an index, the keys are listed by loading each file
    assert convert(["--src", str(source), "--dst", str(tmp_path / "no-index"), "--ablation", "a"]) == 0

    ours = {}
    for shard in destination.glob("*.safetensors"):
        ours |= load_file(shard)
    expected = {}
    for shard in converted("internlm2", "a").glob("*.safetensors"):
        expected |= load_file(shard)
    assert ours.keys() == expected.keys()
    for key, tensor in expected.items():
        assert torch.equal(ours[key], tensor), key


def test_unknown_architecture_fails_cleanly(tmp_path, capsys):
    source = copy_fixture("phi3", tmp_path)
    config = json.loads((source / "config.json").read_text())
    config["model_type"], config["architectures"] = "llava", ["LlavaForConditionalGeneration"]
    (source / "config.json").write_text(json.dumps(config))
    assert_fails_cleanly(source, tmp_path, capsys, "Unknown architecture")


def full_disk(error):
    """A writer that fails as it does on a full disk, with the error it raises there (measured on a full tmpfs)."""

    def write(*args, **kwargs):
        raise error

    return write


# Where a conversion writes, and what each writer raises when the disk is full.
FULL_DISK = {
    "shard": (
        "save_file",
        SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),
    ),
    "code file": ("shutil.copyfile", OSError(errno.ENOSPC, "No space left on device")),
    "tokenizer": ("PVCProcessor.save_pretrained", Exception("No space left on device (os error 28)")),
}


@pytest.mark.parametrize("where", FULL_DISK)
def test_a_full_disk_fails_in_one_line_and_keeps_nothing_but_an_earlier_conversion(tmp_path, capsys, where):
    """A disk that fills up while the shards, a code file or the tokenizer are written: one line that names --dst and
    what to do (no SafetensorError traceback), no partial folder left, an earlier conversion that --overwrite would
    have replaced left as it was."""
    from pvc.conversion import writing

    name, error = FULL_DISK[where]
    owner = writing
    for part in name.split(".")[:-1]:
        owner = getattr(owner, part)
    destination = tmp_path / "out" / "converted"
    assert convert(["--src", str(fixture("qwen2")), "--dst", str(destination), "--ablation", "a"]) == 0
    capsys.readouterr()
    before = tree(tmp_path / "out")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(owner, name.split(".")[-1], full_disk(error))
        assert convert(["--src", str(fixture("qwen2")), "--dst", str(destination), "--overwrite"]) == 1
        fresh = tmp_path / "elsewhere" / "converted"
        assert convert(["--src", str(fixture("qwen2")), "--dst", str(fresh)]) == 1
    error = capsys.readouterr().err
    lines = [line for line in error.splitlines() if line.strip() and not line.startswith("Converting tensors")]
    message = [line for line in lines if line.startswith("pvc-convert: error: ")]  # the rest is tqdm's
    assert len(message) == len(lines) == 2 and "Traceback" not in error, error[-3000:]
    assert message[0].startswith(f"pvc-convert: error: Writing {destination} failed and nothing was kept (the earlier")
    for line in message:
        assert "No space left on device. Free space under" in line and "or choose another --dst" in line, line
    assert tree(tmp_path / "out") == before and [p.name for p in (tmp_path / "out").iterdir()] == ["converted"]
    assert list((tmp_path / "elsewhere").iterdir()) == []


def test_a_failed_final_move_puts_the_earlier_conversion_back(tmp_path, capsys, monkeypatch):
    """--overwrite moves the earlier conversion aside, then the new one into place: should the second move fail, the
    earlier conversion goes back where it was."""
    from pvc.conversion import writing

    destination = tmp_path / "out" / "converted"
    assert convert(["--src", str(fixture("qwen2")), "--dst", str(destination), "--ablation", "a"]) == 0
    before = tree(tmp_path / "out")
    replace = os.replace

    def failing_move(source, target):
        if Path(target) == destination and ".partial-" in str(source):
            raise OSError(errno.EIO, "Input/output error")
        replace(source, target)

    monkeypatch.setattr(writing.os, "replace", failing_move)
    assert convert(["--src", str(fixture("qwen2")), "--dst", str(destination), "--overwrite"]) == 1
    assert "Input/output error" in capsys.readouterr().err
    assert tree(tmp_path / "out") == before and [p.name for p in (tmp_path / "out").iterdir()] == ["converted"]


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("--max-shard-size", "0", "a shard must hold at least one byte, got '0'; use e.g. 5GB, 400MB or 300KB"),
        ("--max-shard-size", "0.5", "a shard must hold at least one byte, got '0.5'; use e.g. 5GB, 400MB or 300KB"),
        ("--max-shard-size", "5TB", "cannot read the shard size '5TB'; use e.g. 5GB, 400MB or 300KB"),
        ("--dst", "", "expected a path, got ''"),
        ("--src", " ", "expected a path, got ' '"),
        ("--num-temporal-layers", "-1", "expected a whole number of at least 0, got '-1'"),
        ("--adaln-hidden-size", "0", "expected a whole number of at least 1, got '0'"),
        ("--projector-adaln-hidden-size", "0", "expected a whole number of at least 1, got '0'"),
        ("--projector-adaln-hidden-size", "1.5", "expected a whole number of at least 1, got '1.5'"),
    ],
)
def test_bad_option_values_stop_before_anything_is_read(tmp_path, capsys, option, value, message):
    """One line naming the option, before the source is read: a shard size of 0 wrote one file per tensor, and an
    empty --dst was the working folder (reported as `.`)."""
    options = {"--src": str(fixture("qwen2")), "--dst": str(tmp_path / "out"), option: value}
    with pytest.raises(SystemExit) as stop:
        convert([part for pair in options.items() for part in pair])
    assert stop.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"pvc-convert: error: argument {option}: {message}"
    assert list(tmp_path.iterdir()) == []


def test_an_unknown_source_fails_cleanly(tmp_path, capsys):
    # A Hub id (no such folder here); the tests run offline (HF_HUB_OFFLINE), so it cannot be fetched.
    assert_fails_cleanly("someone/no-such-model", tmp_path, capsys, "is not a local folder")


def test_hub_sources_fetch_bin_weights_only_without_safetensors(tmp_path, monkeypatch):
    import huggingface_hub

    from pvc.conversion.reading import resolve_source

    repos = {"has/safetensors": ["model.safetensors", "pytorch_model.bin"], "has/bin-only": ["pytorch_model.bin"]}
    asked = {}

    def snapshot_download(repo, allow_patterns):
        asked[repo] = allow_patterns
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda repo: repos[repo])
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    for repo in repos:
        assert resolve_source(repo) == tmp_path
    assert "*.safetensors" in asked["has/safetensors"] and "pytorch_model*.bin" not in asked["has/safetensors"]
    assert "pytorch_model*.bin" in asked["has/bin-only"]


def test_existing_destination_is_kept_unless_overwrite(tmp_path, capsys, converted):
    destination = tmp_path / "taken"
    destination.mkdir()
    (destination / "keep.txt").write_text("mine")
    source = fixture("qwen2")
    assert convert(["--src", str(source), "--dst", str(destination), "--ablation", "a"]) == 1
    assert "--overwrite" in capsys.readouterr().err and (destination / "keep.txt").exists()
    # --overwrite replaces an earlier conversion only, never a folder of other things
    assert convert(["--src", str(source), "--dst", str(destination), "--ablation", "a", "--overwrite"]) == 1
    assert "not one" in capsys.readouterr().err and (destination / "keep.txt").read_text() == "mine"
    (destination / "keep.txt").unlink()
    assert convert(["--src", str(source), "--dst", str(destination), "--ablation", "a"]) == 0
    (destination / "notes").mkdir()  # something a user added inside a conversion: kept, and the run refused
    assert convert(["--src", str(source), "--dst", str(destination), "--ablation", "pvc", "--overwrite"]) == 1
    assert "notes" in capsys.readouterr().err
    (destination / "notes").rmdir()
    assert convert(["--src", str(source), "--dst", str(destination), "--ablation", "pvc", "--overwrite"]) == 0
    assert json.loads((destination / "config.json").read_text())["vision_config"]["num_temporal_layers"] == 1


def test_overwrite_never_replaces_a_fine_tuned_model(tmp_path, capsys, converted):
    """A conversion that a user fine-tuned in place (save_pretrained over it, their own files beside it), or any PVC
    checkpoint that pvc-convert did not write, is refused by --overwrite, with the files named, and left untouched;
    an earlier conversion exactly as written is replaced."""
    source = fixture("qwen2")
    destination = tmp_path / "model"
    shutil.copytree(converted("qwen2", "pvc"), destination)  # an earlier conversion, as written
    model = load(destination)
    with torch.no_grad():
        model.model.multi_modal_projector.linear_2.bias.add_(1.0)
    model.save_pretrained(destination)  # fine-tuned in place
    (destination / "eval_results.json").write_text('{"accuracy": 0.9}')
    (destination / "train.py").write_text("print('mine')")
    before = tree(destination)
    assert convert(["--src", str(source), "--dst", str(destination), "--overwrite"]) == 1
    error = capsys.readouterr().err
    assert "eval_results.json" in error and "train.py" in error and "model.safetensors" in error
    assert tree(destination) == before
    # a fine-tuning output folder (no conversion record at all) is refused too
    (destination / "pvc_conversion.json").unlink()
    assert convert(["--src", str(source), "--dst", str(destination), "--overwrite"]) == 1
    assert "no pvc_conversion.json" in capsys.readouterr().err
    # a conversion left as it was written is replaced
    fresh = tmp_path / "fresh"
    assert convert(["--src", str(source), "--dst", str(fresh), "--ablation", "a"]) == 0
    # ... but not once a file it wrote was changed in place (the user's notes in the model card, new weights)
    card = (fresh / "README.md").read_text()
    (fresh / "README.md").write_text(card + "\nMy results: ...\n")
    assert convert(["--src", str(source), "--dst", str(fresh), "--ablation", "pvc", "--overwrite"]) == 1
    assert "changed since: README.md" in capsys.readouterr().err
    assert (fresh / "README.md").read_text().endswith("My results: ...\n")
    shutil.rmtree(fresh)
    assert convert(["--src", str(source), "--dst", str(fresh), "--ablation", "a"]) == 0
    assert convert(["--src", str(source), "--dst", str(fresh), "--ablation", "pvc", "--overwrite"]) == 0
    assert json.loads((fresh / "config.json").read_text())["projector_adaln"] is True


def tree(folder):
    """Every file below `folder` (symlinks not followed) and its bytes."""
    return {
        os.path.join(root, name): Path(root, name).read_bytes()
        for root, _, names in os.walk(folder)
        for name in names
        if not Path(root, name).is_symlink()
    }


def test_destination_overlapping_the_source_is_refused(tmp_path, capsys):
    source = copy_fixture("qwen2", tmp_path / "models")
    (tmp_path / "models" / "unrelated.txt").write_text("a file beside the source")
    before = tree(tmp_path)
    (tmp_path / "link").symlink_to(source)
    for destination in (
        source,
        source / "pvc",
        tmp_path / "models",
        tmp_path,
        tmp_path / "link",
        tmp_path / "link" / "x",
    ):
        assert convert(["--src", str(source), "--dst", str(destination), "--overwrite"]) == 1, destination
        assert "elsewhere" in capsys.readouterr().err
        assert tree(tmp_path) == before, destination  # nothing touched
    # the same through a symlinked source
    assert convert(["--src", str(tmp_path / "link"), "--dst", str(source / "out"), "--overwrite"]) == 1
    assert tree(tmp_path) == before


def test_destination_that_is_a_file_or_a_hub_without_network_fails_in_one_line(tmp_path, capsys, monkeypatch):
    import huggingface_hub

    (tmp_path / "a-file").write_text("x")
    assert convert(["--src", str(fixture("qwen2")), "--dst", str(tmp_path / "a-file")]) == 1
    error = capsys.readouterr().err
    assert "is a file" in error and len(error.strip().splitlines()) == 1

    class ConnectError(Exception):  # as httpx's: not an OSError
        pass

    def offline(repo):
        raise ConnectError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(huggingface_hub, "list_repo_files", offline)
    assert convert(["--src", "OpenGVLab/InternVL2-1B", "--dst", str(tmp_path / "out")]) == 1
    error = capsys.readouterr().err
    assert "name resolution" in error and len(error.strip().splitlines()) == 1


def test_output_permissions_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        fresh = tmp_path / "fresh"
        assert convert(["--src", str(fixture("qwen2")), "--dst", str(fresh), "--ablation", "a"]) == 0
        assert fresh.stat().st_mode & 0o777 == 0o755
        assert {p.name: p.stat().st_mode & 0o777 for p in fresh.iterdir()} == {p.name: 0o644 for p in fresh.iterdir()}
        kept = tmp_path / "kept"
        kept.mkdir(mode=0o750)
        kept.chmod(0o750)
        assert convert(["--src", str(fixture("qwen2")), "--dst", str(kept), "--ablation", "a"]) == 0
        assert kept.stat().st_mode & 0o777 == 0o750
    finally:
        os.umask(old)


def start_slow_conversion(tmp_path, ignored=()):
    """A conversion in a child process, slowed down so that signals reach it mid-write; returned once it has started
    writing. The child starts with every stopping signal at its default disposition except those in `ignored`
    (SIG_IGN, as `nohup` or a background job of a shell would start it), whatever the suite inherited: a suite run in
    the background has SIGINT ignored, and its children would inherit that."""
    destination = tmp_path / "out" / "converted"
    slow_conversion = (
        "import sys, time; import pvc.conversion.writing as writing\n"
        "add = writing.ShardWriter.add\n"
        "def slow(self, *args):\n    time.sleep(0.05); add(self, *args)\n"
        "writing.ShardWriter.add = slow\n"
        "from pvc.conversion.cli import main\n"
        f"sys.exit(main(['--src', {str(fixture('qwen2'))!r}, '--dst', {str(destination)!r}]))\n"
    )

    def dispositions():
        for number in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(number, signal.SIG_IGN if number in ignored else signal.SIG_DFL)

    process = subprocess.Popen(
        [sys.executable, "-c", slow_conversion], stderr=subprocess.PIPE, text=True, preexec_fn=dispositions
    )
    deadline = time.monotonic() + 120
    while not any((tmp_path / "out").glob(".converted.partial-*")):
        assert process.poll() is None and time.monotonic() < deadline, "the conversion never started writing"
        time.sleep(0.02)
    return process


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stopped_conversion_leaves_nothing(tmp_path, signum):
    """kill/timeout/batch schedulers send SIGTERM, Ctrl-C SIGINT: the staging folder goes, and one line says so."""
    process = start_slow_conversion(tmp_path)
    process.send_signal(signum)
    _, error = process.communicate(timeout=60)
    assert process.returncode == 128 + signum, error
    assert signal.Signals(signum).name in error and "Traceback" not in error
    assert list((tmp_path / "out").iterdir()) == []


def test_a_conversion_started_with_sigint_and_sighup_ignored_keeps_them_ignored(tmp_path):
    """Started as a background job (SIGINT ignored) or under nohup (SIGHUP ignored), a conversion is not stopped by
    Ctrl-C or a closing terminal, as POSIX asks; kill (SIGTERM) still stops it, leaving nothing."""
    process = start_slow_conversion(tmp_path, ignored=(signal.SIGINT, signal.SIGHUP))
    process.send_signal(signal.SIGINT)
    process.send_signal(signal.SIGHUP)
    time.sleep(0.5)
    assert process.poll() is None, process.communicate()[1]
    process.send_signal(signal.SIGTERM)
    _, error = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM and "SIGTERM" in error, error
    assert list((tmp_path / "out").iterdir()) == []


def test_transformers_layout_source(tmp_path):
    """A checkpoint saved by transformers' own InternVLForConditionalGeneration converts losslessly (row a)."""
    from conftest import TINY_TEXT
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    tokenizer = AutoTokenizer.from_pretrained(fixture("qwen2"))
    text = dict(TINY_TEXT, vocab_size=len(tokenizer))
    config = InternVLConfig(
        vision_config=dict(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            image_size=56,
            patch_size=7,
            attention_bias=True,
        ),
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    reference = InternVLForConditionalGeneration(config).eval()
    with torch.no_grad():
        for param in reference.parameters():
            param.add_(0.05 * torch.randn_like(param))
    source = tmp_path / "internvl-hf"
    reference.save_pretrained(source)
    tokenizer.save_pretrained(source)
    assert convert(["--src", str(source), "--dst", str(tmp_path / "out"), "--ablation", "a"]) == 0
    model = load(tmp_path / "out")
    ids = torch.tensor([[1, 2, 3] + [config.image_token_id] * 32 + [4, 5]])
    pixels = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        expected = reference(input_ids=ids, pixel_values=pixels).logits
        actual = model(input_ids=ids, pixel_values=pixels, image_num_tiles=torch.tensor([2])).logits
    assert_relative(actual, expected, 1e-5)


def test_qwen2_tokenizer_without_tokenizer_json(tmp_path):
    """InternVL2-1B ships vocab.json + merges.txt only: transformers' own Qwen2 class rebuilds it, no remote code."""
    source = copy_fixture("qwen2", tmp_path)
    (source / "tokenizer.json").unlink()
    destination = tmp_path / "out"
    assert convert(["--src", str(source), "--dst", str(destination), "--ablation", "a"]) == 0
    reference = load_file(fixture("qwen2") / "reference.safetensors")
    tokenizer = AutoTokenizer.from_pretrained(destination, trust_remote_code=False)
    text = "The quick brown fox jumps over the lazy dog. Hello world, this is a tiny test."
    assert tokenizer(text)["input_ids"] == reference["input_ids_text"][0].tolist()


def test_new_parameters_are_recorded_and_get_the_larger_learning_rate(converted):
    """The paper's 10x is for randomly initialised parameters: conversion records which those are, so the
    projector's first layer counts with --projector-init random and not with the warm start."""
    from pvc.training.trainer import parameter_groups

    def rates(folder):
        model = load(folder)
        groups = parameter_groups(model, 1.0, 10.0, 0.0)
        by_id = {id(param): group["lr"] for group in groups for param in group["params"]}
        return {name: by_id[id(param)] for name, param in model.named_parameters()}, model.config.new_parameters

    random_rates, recorded = rates(converted("qwen2", "c", "--projector-init", "random", "--dtype", "bf16"))
    warm_rates, warm_recorded = rates(converted("qwen2", "c"))
    first_layer = "model.multi_modal_projector.linear_1.weight"
    assert first_layer in recorded and first_layer not in warm_recorded
    assert random_rates[first_layer] == 10.0 and warm_rates[first_layer] == 1.0
    gate = "model.vision_tower.encoder.layer.3.temporal_gate.weight"  # the fixture's last of 4 layers
    assert random_rates[gate] == warm_rates[gate] == 10.0
    assert random_rates["model.multi_modal_projector.linear_2.weight"] == 1.0  # copied from InternVL2
    assert all(rate == 1.0 for name, rate in warm_rates.items() if ".language_model." in name)


@pytest.fixture(scope="module")
def row_a_checkpoint(tmp_path_factory):
    """A trained-looking row (a) PVC model (random non-trivial weights) saved with `save_pretrained`, with a
    processor whose chat template has its own system message: what a user who fine-tuned `--ablation a` has."""
    from conftest import randomize_, tiny_config

    from pvc import PVCForConditionalGeneration, PVCImageProcessor, PVCProcessor, build_chat_template
    from pvc.experiments.toy_task import tiny_tokenizer

    folder = tmp_path_factory.mktemp("row-a") / "internvl2-as-pvc"
    model = randomize_(PVCForConditionalGeneration(tiny_config("a")), seed=3).eval()
    model.save_pretrained(folder)
    template = build_chat_template("chatml", system_message="A model of my own.")
    processor = PVCProcessor(
        PVCImageProcessor(image_size=56, max_tiles=2),
        tiny_tokenizer(),
        chat_template=template,
        tokens_per_frame=16,
        image_repeat=1,
    )
    processor.save_pretrained(folder)
    return folder, model


def convert_row_a(source, destination, ablation, *extra):
    command = ["--src", str(source), "--dst", str(destination), "--ablation", ablation, "--num-temporal-layers", "2"]
    assert convert([*command, *extra]) == 0
    return destination


def test_a_row_a_pvc_checkpoint_converts_like_internvl2(row_a_checkpoint, tmp_path):
    """pvc-convert reads PVC's own row (a) (InternVL2 in PVC's names): converted back to (a) it is the same model
    (logits equal the saved model's); converted to PVC its tower computes the source's features, and the source's
    chat template and image settings are kept."""
    source, original = row_a_checkpoint
    pixels = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([[5, 6, 125] + [IMAGE_TOKEN] * 16 + [126, 7]])
    copy = load(convert_row_a(source, tmp_path / "a", "a"))
    with torch.no_grad():
        expected = original(input_ids=ids, pixel_values=pixels[:1]).logits
        torch.testing.assert_close(copy(input_ids=ids, pixel_values=pixels[:1]).logits, expected, rtol=1e-4, atol=1e-5)
    pvc_folder = convert_row_a(source, tmp_path / "pvc", "pvc")
    model = load(pvc_folder)
    assert model.config.vision_config.num_temporal_layers == 2 and model.config.projector_adaln
    with torch.no_grad():
        features = original.model.vision_tower(pixels).last_hidden_state  # [2, N, C], the source's own tower
        frames = model.model.vision_tower(pixels, num_frames=4, static=True).last_hidden_state  # [2 * 4, N, C]
    for frame in range(4):
        torch.testing.assert_close(frames[frame::4], features, rtol=1e-5, atol=1e-6)
    processor = AutoProcessor.from_pretrained(pvc_folder, trust_remote_code=True)
    assert "A model of my own." in processor.chat_template
    assert processor.image_processor.max_tiles == 2 and processor.tokens_per_frame == 4


def test_conversion_is_reproducible_and_rows_share_their_new_modules(row_a_checkpoint, tmp_path):
    """The new modules draw from a generator of --seed and their name: the same seed gives the same weights, another
    seed other random weights, and rows (c) and PVC start equal in every module they share."""
    source, _ = row_a_checkpoint
    tensors = {}
    for name, ablation, seed in (
        ("c", "c", "0"),
        ("pvc", "pvc", "0"),
        ("pvc-again", "pvc", "0"),
        ("pvc-1", "pvc", "1"),
    ):
        folder = convert_row_a(source, tmp_path / name, ablation, "--seed", seed)
        tensors[name] = load_file(folder / "model.safetensors")
    assert tensors["pvc"].keys() == tensors["pvc-again"].keys()
    assert all(torch.equal(tensors["pvc"][key], tensors["pvc-again"][key]) for key in tensors["pvc"])
    random_init = [key for key in tensors["pvc"] if "temporal_attention" in key and key.endswith("weight")]
    assert random_init and all(not torch.equal(tensors["pvc"][k], tensors["pvc-1"][k]) for k in random_init)
    shared = [key for key in tensors["c"] if key in tensors["pvc"] and "multi_modal_projector" not in key]
    assert any("temporal" in key for key in shared)
    assert all(torch.equal(tensors["c"][key], tensors["pvc"][key]) for key in shared)


def test_a_pvc_checkpoint_beyond_row_a_is_refused(row_a_checkpoint, tmp_path, capsys):
    source, _ = row_a_checkpoint
    already = convert_row_a(source, tmp_path / "c", "c")
    message = "only InternVL2-equivalent PVC checkpoints (ablation row a"
    assert_fails_cleanly(already, tmp_path, capsys, message)


def test_a_local_path_that_is_missing_is_not_sent_to_the_hub(tmp_path, capsys, monkeypatch):
    """`./InternVL2-2B` (a typo, a folder not there yet) can only be a local path: it is said to be missing at once,
    never looked up on the Hub (a Hub-id syntax error there, or a long wait offline)."""
    import huggingface_hub

    def no_hub(*args, **kwargs):
        raise AssertionError("the Hub was asked")

    monkeypatch.setattr(huggingface_hub, "list_repo_files", no_hub)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_hub)
    for name in ("./InternVL2-2B", str(tmp_path / "models" / "nowhere"), "~/no-such-model-folder"):
        assert_fails_cleanly(name, tmp_path, capsys, f"{name}: no such folder (a local path")
