"""Plant known bugs one at a time in a temporary copy of the repository and report which ones the tests miss.

    .venv/bin/python tests/mutations.py                 # every planted bug (several minutes)
    .venv/bin/python tests/mutations.py timestamps      # those whose name contains "timestamps"

Not part of CI (it runs the relevant tests once per bug). A bug that "SURVIVED" is a way for the model to be
wrong while CI stays green: give it a test against an independent reference. Each entry: a name, the file, the text
to replace (which must occur exactly once), its replacement, and the tests to run.
"""

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

MUTATIONS = [
    # timestamps and the temporal embedding
    (
        "timestamps reversed",
        "modeling_pvc.py",
        "torch.linspace(0, 1, num_frames, device=device)",
        "torch.linspace(1, 0, num_frames, device=device)",
        "tests/test_modeling.py",
    ),
    (
        "timestamp_scale ignored",
        "modeling_pvc.py",
        "(timestamps.float() * self.timestamp_scale)[:, None]",
        "timestamps.float()[:, None]",
        "tests/test_modeling.py",
    ),
    (
        "frame indices instead of k/(T-1)",
        "modeling_pvc.py",
        "torch.linspace(0, 1, num_frames, device=device) if num_frames > 1",
        "torch.arange(num_frames, device=device, dtype=torch.float32) if num_frames > 1",
        "tests/test_modeling.py",
    ),
    (
        "constant timestamp in the projector",
        "modeling_pvc.py",
        "            timestamps = relative_timestamps(num_frames, hidden_states.device)\n",
        "            timestamps = torch.zeros(num_frames, device=hidden_states.device)\n",
        "tests/test_modeling.py",
    ),
    (
        "sinusoid halves swapped",
        "modeling_pvc.py",
        "torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)",
        "torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)",
        "tests/test_modeling.py",
    ),
    # the mechanism
    (
        "AdaLN last layers random",
        "modeling_pvc.py",
        "        if isinstance(module, PVCZeroInitLinear):\n            init.zeros_(module.weight)",
        "        if isinstance(module, PVCZeroInitLinear):\n            init.normal_(module.weight, std=0.02)",
        "tests/test_modeling.py",
    ),
    (
        "AdaLN condition ignored (x instead of x + TE)",
        "modeling_pvc.py",
        "condition = hidden_states + temporal_embeds[:, None]",
        "condition = hidden_states",
        "tests/test_modeling.py",
    ),
    (
        "temporal attention not causal",
        "modeling_pvc.py",
        "self.temporal_attention = PVCVisionAttention(config, is_causal=True)",
        "self.temporal_attention = PVCVisionAttention(config, is_causal=False)",
        "tests/test_modeling.py",
    ),
    (
        "video tokens tile-major",
        "modeling_pvc.py",
        '                    rearrange(clip_features, "p t m d -> (t p m) d"),',
        '                    rearrange(clip_features, "p t m d -> (p t m) d"),',
        "tests/test_modeling.py tests/test_processing.py",
    ),
    # position embeddings
    (
        "bilinear position interpolation",
        "modeling_pvc.py",
        'size=(grid_h, grid_w), mode="bicubic"',
        'size=(grid_h, grid_w), mode="bilinear"',
        "tests/test_modeling.py",
    ),
    # pixels
    (
        "tiles column-major",
        "image_processing_pvc.py",
        "            for r in range(rows)\n            for c in range(columns)\n",
        "            for c in range(columns)\n            for r in range(rows)\n",
        "tests/test_processing.py",
    ),
    (
        "thumbnail from the resized grid",
        "image_processing_pvc.py",
        "tiles.append(image.resize((size, size), Image.BICUBIC))",
        "tiles.append(resized.resize((size, size), Image.BICUBIC))",
        "tests/test_processing.py",
    ),
    (
        "normalisation x / std - mean",
        "image_processing_pvc.py",
        'scale, shift = scale / std, -torch.tensor(settings["image_mean"], dtype=torch.float32) / std',
        'scale, shift = scale / std, -torch.tensor(settings["image_mean"], dtype=torch.float32)',
        "tests/test_processing.py",
    ),
    (
        "video prompt ignores tiles per frame",
        "processing_pvc.py",
        "tokens = visual_tokens(self.tokens_per_frame, self.image_repeat, VIDEO, num_tiles)  # one frame's",
        "tokens = visual_tokens(self.tokens_per_frame, self.image_repeat, VIDEO, 1)  # one frame's",
        "tests/test_processing.py tests/test_modeling.py",
    ),
    # conversion
    (
        "--projector-init random does the warm start",
        "conversion/rules.py",
        "init: str) -> dict[str, torch.Tensor]:\n",
        'init: str) -> dict[str, torch.Tensor]:\n    init = "warm"\n',
        "tests/test_conversion.py",
    ),
    (
        "display matrix read as a rotation only",
        "video_decoding_pvc.py",
        "    return ImageOps.mirror(image) if mirrored else image\n",
        "    return image\n",
        "tests/test_processing.py",
    ),
    (
        "variable frame rate: the frame after each instant",
        "video_decoding_pvc.py",
        "        if after == len(seconds) or (after > 0 and instant - seconds[after - 1] <= seconds[after] - instant):\n",
        "        if after == len(seconds):\n",
        "tests/test_processing.py",
    ),
    (
        "grid layout: one tile per image",
        "visuals_pvc.py",
        "torch.stack([torch.ones_like(tiles), torch.ones_like(tiles), tiles], dim=1)",
        "torch.stack([torch.ones_like(tiles), torch.ones_like(tiles), torch.ones_like(tiles)], dim=1)",
        "tests/test_serving.py",
    ),
    (
        "data parallel: loss not averaged over all ranks' tokens",
        "training/finetune.py",
        "        ddp_find_unused_parameters=False,\n",
        "        ddp_find_unused_parameters=False,\n        average_tokens_across_devices=False,\n",
        "tests/test_training.py -k data_parallel",
    ),
    # conversion, fine-tuning and inputs (issue 19 and 22)
    (
        "conversion: the new modules ignore --seed",
        "conversion/rules.py",
        "init_seeded(init_owner, module, seed, owner)",
        "init_seeded(init_owner, module, 0, owner)",
        "tests/test_conversion.py -k reproducible",
    ),
    (
        "conversion: --overwrite misses a file changed in place",
        "conversion/writing.py",
        'if entry is None or (stat.st_size, stat.st_mtime_ns) != (entry["size"], entry["mtime_ns"]):',
        "if entry is None:",
        "tests/test_conversion.py -k overwrite",
    ),
    (
        "projector AdaLN: the TE-only condition still sees x_hat",
        "modeling_pvc.py",
        "condition = hidden_states + temporal_embeds if self.condition_on_input else temporal_embeds",
        "condition = hidden_states + temporal_embeds",
        "tests/test_modeling.py -k adaln_condition",
    ),
    (
        "fine-tuning: --bf16 trains bf16 weights",
        "training/finetune.py",
        "dtype = torch.bfloat16 if args.bf16_weights else torch.float32",
        "dtype = torch.bfloat16 if args.bf16_weights or args.bf16 else torch.float32",
        "tests/test_training.py -k small_updates",
    ),
    (
        "pixel arrays: signed integers read as floats in 0..1",
        "image_processing_pvc.py",
        '    elif array.dtype.kind == "i":\n',
        '    elif array.dtype.kind == "?":\n',
        "tests/test_processing.py -k pixel_arrays",
    ),
    (
        "toy ablation: the rows see different data",
        "experiments/toy_ablation.py",
        "stream = ToyStream(convert_tasks(processor, toy), toy, seed, drawn)",
        'stream = ToyStream(convert_tasks(processor, toy), toy, seed + (row == "pvc"), drawn)',
        "tests/test_experiments.py -k convert_protocol",
    ),
    # transformers' conventions (the conformance issue)
    (
        "video outputs left in tower order",
        "modeling_pvc.py",
        '        return rearrange(tensor[frames], "(p t) ... -> (t p) ...", p=num_tiles)',
        "        return tensor[frames]",
        "tests/test_modeling.py",
    ),
    (
        "hidden states without the embeddings",
        "modeling_pvc.py",
        "        states = [hidden_states] if output_hidden_states else None",
        "        states = [] if output_hidden_states else None",
        "tests/test_modeling.py",
    ),
    (
        "assistant mask not moved past grown placeholders",
        "processing_pvc.py",
        "        start, end = start + shift[start], end + shift[end]",
        "        pass",
        "tests/test_processing.py",
    ),
    (
        "pixel options of a call ignored",
        "image_processing_pvc.py",
        "settings = {key: normalisation.get(key, getattr(self, key)) for key in NORMALISATION}",
        "settings = {key: getattr(self, key) for key in NORMALISATION}",
        "tests/test_processing.py",
    ),
    (
        "unknown options in images_kwargs let through",
        "processing_pvc.py",
        'problems += [f"{modality}[{key!r}]" for key in sorted(set(given) - allowed)]',
        "pass",
        "tests/test_processing.py",
    ),
    (
        "vLLM profiles a square image",
        "image_processing_pvc.py",
        "    return max(grids, key=lambda grid: (grid[0] * grid[1], -abs(grid[0] - grid[1]), grid[0]))",
        "    return (math.isqrt(max_tiles),) * 2",
        "tests/test_serving.py",
    ),
    # one home for the visual bookkeeping (issue 23)
    (
        "a sample may take more visual tokens than it holds",
        "visuals_pvc.py",
        "        if filled != wanted:",
        "        if filled < wanted:",
        "tests/test_modeling.py",
    ),
    (
        "collator labels from the wrong spans",
        "training/data.py",
        "start = len(render(messages[:index], True))",
        "start = len(render(messages[:index], False))",
        "tests/test_training.py",
    ),
    # writes cut short, resumes and option checks (issue 31)
    (
        "conversion: a full disk's SafetensorError escapes as a traceback",
        "conversion/writing.py",
        "        reason = write_failure(error)\n",
        "        reason = error.strerror if isinstance(error, OSError) else None\n",
        "tests/test_conversion.py -k full_disk",
    ),
    (
        "conversion: an inherited ignored SIGHUP is caught (nohup defeated)",
        "conversion/signals.py",
        " if signal.getsignal(number) != signal.SIG_IGN]",
        "]",
        "tests/test_conversion.py -k ignored",
    ),
    (
        "conversion: --max-shard-size 0 accepted",
        "conversion/options.py",
        "    if value < 1:\n",
        "    if value < 0:\n",
        "tests/test_conversion.py -k bad_option_values",
    ),
    (
        "fine-tuning: --resume takes a checkpoint cut short",
        "training/finetune.py",
        "            reason = incomplete_because(folder)\n",
        "            reason = None\n",
        "tests/test_training.py -k last_complete_checkpoint",
    ),
    (
        "fine-tuning: a checkpoint save failed on a full disk leaves its half",
        "training/trainer.py",
        "                shutil.rmtree(folder, ignore_errors=True)\n",
        "                pass\n",
        "tests/test_training.py -k full_disk_while",
    ),
    (
        "fine-tuning: --max-tiles 0 accepted",
        "training/finetune.py",
        '"--max-tiles", type=whole_number(1)',
        '"--max-tiles", type=int',
        "tests/test_training.py -k options_are_checked",
    ),
    (
        "demo: --image and --video unchecked before the model loads",
        "demo.py",
        "    check_media(parser, args)\n",
        "",
        "tests/test_training.py -k the_demo_names_a_bad",
    ),
    (
        "tile count without the thumbnail",
        "image_processing_pvc.py",
        "        return columns * rows + int(thumbnail)",
        "        return columns * rows",
        "tests/test_serving.py tests/test_processing.py",
    ),
    # issue 30: offloaded parts, flex attention, generate from embeddings
    (
        "pixels sent to an offloaded (meta) weight's device",
        "modeling_pvc.py",
        "device = None if projection.weight.is_meta else projection.weight.device",
        "device = projection.weight.device",
        "tests/test_model_machinery.py -k offloaded",
    ),
    (
        "model.device meta where the first weights are offloaded",
        "modeling_pvc.py",
        '        device = super().device\n        if device.type != "meta":',
        "        device = super().device\n        if True:",
        "tests/test_model_machinery.py -k generate_with_the_vision_tower_on_disk",
    ),
    (
        "flex attention refused",
        "modeling_pvc.py",
        "    _supports_flex_attn = True",
        "    _supports_flex_attn = False",
        "tests/test_model_machinery.py -k flex",
    ),
    (
        "flex attention: temporal attention without its causal mask",
        "modeling_pvc.py",
        "causal_block_mask(length, hidden_states.device) if flex and self.is_causal else None",
        "None",
        "tests/test_model_machinery.py -k flex",
    ),
    (
        "beam expansion counts placeholders in the ids only",
        "modeling_pvc.py",
        'mask = self.model.placeholder_mask(text, None if text is not None else model_kwargs.get("inputs_embeds"))',
        "mask = input_ids == self.config.image_token_id",
        "tests/test_model_machinery.py -k decoding",
    ),
    (
        "generate counts samples in pixel rows",
        "modeling_pvc.py",
        "key=lambda item: item[0] in self.VISUAL_INPUTS + GRID_INPUTS",
        "key=lambda item: 0",
        "tests/test_model_machinery.py -k decoding",
    ),
    (
        "assisted decoding from embeddings alone not refused",
        "modeling_pvc.py",
        'if assisted and kwargs.get("inputs_embeds") is not None and not has_ids:',
        "if False:",
        "tests/test_model_machinery.py -k assisted",
    ),
    # issue 30: one count resolver, a vision path without graph breaks
    (
        "the vision path reads its counts from a tensor",
        "modeling_pvc.py",
        "        tiles = layout.image_tiles\n",
        "        tiles = torch.tensor(layout.image_tiles).tolist()\n",
        "tests/test_model_machinery.py -k compiles",
    ),
    (
        "visual_order checked where decoding steps have no pixels",
        "visuals_pvc.py",
        "    if order is None or not num_images + num_videos:",
        "    if order is None:",
        "tests/test_modeling.py -k beam_expansion",
    ),
]


def copy_repository(folder: Path) -> Path:
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True
    ).stdout.split()
    copy = folder / "pvc"
    for name in files:
        source = ROOT / name
        if source.is_file() or source.is_symlink():
            target = copy / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target, follow_symlinks=False)
    return copy


def run(name_filter: str = "") -> int:
    chosen = [m for m in MUTATIONS if name_filter in m[0]]
    survived = []
    with tempfile.TemporaryDirectory(prefix="pvc-mutations-") as folder:
        copy = copy_repository(Path(folder))
        # `import pvc` must find the copy, not the installed checkout: the copy's folder is named pvc
        env = dict(os.environ, PYTHONPATH=folder, OMP_NUM_THREADS="1")
        for name, path, old, new, tests in chosen:
            original = (copy / path).read_text()
            if original.count(old) != 1:
                print(f"{name:50s} STALE (the text to replace occurs {original.count(old)} times in {path})")
                survived.append(name)
                continue
            (copy / path).write_text(original.replace(old, new))
            try:
                result = subprocess.run(
                    [sys.executable, "-m", "pytest", *tests.split(), "-x", "-q", "-p", "no:cacheprovider"],
                    cwd=copy,
                    env=env,
                    capture_output=True,
                    text=True,
                )
            finally:
                (copy / path).write_text(original)
            caught = result.returncode == 1
            verdict = "caught" if caught else ("SURVIVED" if result.returncode == 0 else f"error {result.returncode}")
            print(f"{name:50s} {verdict}", flush=True)
            if not caught:
                survived.append(name)
    print(f"\n{len(chosen) - len(survived)} of {len(chosen)} planted bugs caught")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(run(sys.argv[1] if len(sys.argv) > 1 else ""))
