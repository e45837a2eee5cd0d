"""Training memory and step time of the vision tower: PVC's against transformers' InternVL tower, at InternViT-300M's
width (1024, 16 heads, 1025 tokens a 448px frame). `python benchmarks/bench.py --parts train-memory` prints the tables.

Two measures, neither of them the inference table's (part 3 measures the activation peak of a forward without
autograd):
- saved: the bytes autograd keeps for the backward pass after a forward in training mode, counted with
  `torch.autograd.graph.saved_tensors_hooks` (each storage once; parameters left out). Torch's non-reentrant
  checkpoint keeps its inputs as saved tensors, so they count; what it recomputes does not.
- peak: the process's resident-set peak during one forward + backward (fresh process, glibc's mmap threshold set
  low so that the resident set follows the live tensors), minus the peak after building the tower and its input.
"""

import functools
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from pvc import PVCVisionConfig
from pvc.modeling_pvc import PVCVisionLayer, PVCVisionModel, PVCVisionProgressiveLayer

FULL = dict(hidden_size=1024, num_attention_heads=16, intermediate_size=4096, image_size=448, layers=24)
QUICK = dict(hidden_size=64, num_attention_heads=4, intermediate_size=256, image_size=112, layers=3)  # a test runs it
FRAMES = 2  # frames of one stream (the temporal attention needs two or more)
MIB = 2**20
SHAPE = dict(FULL)  # `train_memory_part(quick=True)` measures the QUICK shape


def tokens() -> int:
    return 1 + (SHAPE["image_size"] // 14) ** 2


def widths() -> dict:
    return {key: SHAPE[key] for key in ("hidden_size", "num_attention_heads", "intermediate_size", "image_size")}


def pvc_config(layers: int | None = None, progressive: int | None = None) -> PVCVisionConfig:
    """PVC's tower: the last third of its layers progressive (8 of InternViT-300M's 24), as the paper's."""
    layers = SHAPE["layers"] if layers is None else layers
    progressive = layers // 3 if progressive is None else progressive
    config = PVCVisionConfig(**widths(), num_hidden_layers=layers, num_temporal_layers=progressive, patch_size=14)
    config._attn_implementation = "sdpa"
    return config


def internvl_config(layers: int | None = None):
    from transformers.models.internvl import InternVLVisionConfig

    config = InternVLVisionConfig(
        **widths(),
        num_hidden_layers=SHAPE["layers"] if layers is None else layers,
        attention_bias=True,
        layer_norm_eps=1e-6,
        use_mean_pooling=True,
        patch_size=14,
    )
    config._attn_implementation = "sdpa"
    return config


def checkpointed(tower):
    """Gradient checkpointing of every layer, non-reentrant (later 5.x releases call it activation checkpointing)."""
    if hasattr(tower, "activation_checkpointing_enable"):
        tower.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        tower.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def saved_bytes(module, run) -> int:
    """Bytes autograd saves for backward while `run()` runs a forward: each storage once, `module`'s parameters out."""
    parameters = {parameter.untyped_storage().data_ptr() for parameter in module.parameters()}
    kept = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = run()
    del output
    return sum(kept.values())


def layer_saved(dtype) -> dict:
    """Saved bytes per 448px frame of one layer of each kind, on `FRAMES` frames of one stream."""
    from transformers.models.internvl.modeling_internvl import InternVLVisionLayer

    torch.manual_seed(0)
    frames = torch.randn(FRAMES, tokens(), SHAPE["hidden_size"], dtype=dtype, requires_grad=True)
    embeds = torch.randn(FRAMES, SHAPE["hidden_size"], dtype=dtype, requires_grad=True)
    layers = {
        "internvl": InternVLVisionLayer(internvl_config(1)),
        "pvc": PVCVisionLayer(pvc_config(1, 0)),
        "pvc progressive": PVCVisionProgressiveLayer(pvc_config(1, 1)),
    }
    result = {}
    for name, layer in layers.items():
        layer = layer.to(dtype).train()
        args = (frames, embeds, 1) if name == "pvc progressive" else (frames,)
        result[name] = saved_bytes(layer, lambda: layer(*args)) / FRAMES
    return result


def build_tower(name: str, dtype=torch.float32, checkpointing: bool = False):
    from transformers.models.internvl import InternVLVisionModel

    torch.manual_seed(0)
    tower = InternVLVisionModel(internvl_config()) if name == "internvl" else PVCVisionModel(pvc_config())
    tower = tower.to(dtype).train()
    if checkpointing:
        checkpointed(tower)
    pixels = torch.randn(FRAMES, 3, SHAPE["image_size"], SHAPE["image_size"], dtype=dtype)
    return tower, functools.partial(tower, pixels, **({} if name == "internvl" else {"num_frames": FRAMES}))


def tower_saved(name: str, dtype: str, checkpointing: bool, quick: bool) -> float:
    """Run in a child process: saved bytes per frame of a whole tower, from one forward on `FRAMES` frames."""
    SHAPE.update(QUICK if quick else FULL)
    tower, forward = build_tower(name, getattr(torch, dtype), checkpointing)
    return saved_bytes(tower, forward) / FRAMES


def peak_probe(name: str, checkpointing: bool, quick: bool) -> float:
    """Run in a child process: resident-set peak in bytes per frame of one forward + backward of a tower, over the
    peak after building it and its input, less its parameters' gradients (a fixed cost, not a frame's: PVC's tower
    has a fifth more parameters)."""
    SHAPE.update(QUICK if quick else FULL)

    from bench import resident_peak

    tower, forward = build_tower(name, checkpointing=checkpointing)
    peak = resident_peak(lambda: forward().last_hidden_state.float().square().mean().backward())
    gradients = sum(parameter.grad.nbytes for parameter in tower.parameters() if parameter.grad is not None)
    return (peak - gradients) / FRAMES


def measured(call: str, quick: bool) -> float:
    """`train_memory.<call>`, in a fresh process at the full shape; in this one at the quick shape (saved-tensor
    counts do not depend on the process, and the quick towers' tensors are small)."""
    return eval(call, globals()) if quick else in_child(call)  # noqa: S307 (calls written above)


def in_child(call: str) -> float:
    """`train_memory.<call>` evaluated in a fresh process, whose memory goes back to the system as it is freed
    (glibc's mmap threshold set low): a 24-layer tower's saved tensors are gigabytes."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    code = f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import train_memory; print(train_memory.{call})"
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    return float(output.stdout.strip().splitlines()[-1])


def step_time(repeats: int = 5) -> dict:
    """CPU seconds of a forward + backward of 3-layer towers (one progressive, as 8 of 24) on `FRAMES` frames,
    interleaved, median: InternVL's, PVC's, and PVC's with its temporal branch kept whole for backward (as before it
    was recomputed); and the FLOPs ratio of the same towers' forward (eager attention on the meta device; the
    backward of every matmul is twice its forward, so the ratio holds for the step)."""
    from transformers.models.internvl import InternVLVisionModel

    def build(name, device="cpu", attn="sdpa"):
        config = internvl_config(3) if name == "internvl" else pvc_config(3, 1)
        config._attn_implementation = attn
        with torch.device(device):
            torch.manual_seed(0)
            return (InternVLVisionModel(config) if name == "internvl" else PVCVisionModel(config)).train()

    def step(name, tower, pixels):
        kwargs = {} if name == "internvl" else {"num_frames": FRAMES}
        return lambda: tower(pixels, **kwargs).last_hidden_state.square().mean().backward()

    def kept_whole(run):
        def step():
            recomputed = PVCVisionProgressiveLayer.temporal_branch
            PVCVisionProgressiveLayer.temporal_branch = PVCVisionProgressiveLayer.temporal_block
            try:
                run()
            finally:
                PVCVisionProgressiveLayer.temporal_branch = recomputed

        return step

    flops = {}
    for name in ("internvl", "pvc"):
        tower, size = build(name, "meta", "eager"), SHAPE["image_size"]
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            tower(
                torch.empty(FRAMES, 3, size, size, device="meta"), **({} if name == "internvl" else {"num_frames": 2})
            )
        flops[name] = counter.get_total_flops()
    pixels = torch.randn(FRAMES, 3, SHAPE["image_size"], SHAPE["image_size"])
    steps = {name: step(name, build(name), pixels) for name in ("internvl", "pvc")}
    steps["pvc, branch kept whole"] = kept_whole(steps["pvc"])
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, run in steps.items():
            started = time.process_time()
            run()
            times[name].append(time.process_time() - started)
    seconds = {name: statistics.median(values) for name, values in times.items()}
    return {"seconds": seconds, "flops": flops}


def progress(what: str, values: dict):
    print(f"{what}: " + ", ".join(f"{name} {value / MIB:.1f} MiB" for name, value in values.items()), flush=True)


def train_memory_part(quick: bool = False) -> dict:
    SHAPE.update(QUICK if quick else FULL)
    results = {"layers": {}, "towers": {}, "peaks_fp32": {}, "frames": FRAMES, "shape": dict(SHAPE)}
    names = ("internvl", "pvc")
    for dtype in ("float32", "bfloat16"):
        results["layers"][dtype] = layer_saved(getattr(torch, dtype))
        progress(f"layers, {dtype}", results["layers"][dtype])
        for setting, on in (("no checkpointing", False), ("checkpointing", True)):
            towers = {name: measured(f"tower_saved({name!r}, {dtype!r}, {on}, {quick})", quick) for name in names}
            results["towers"].setdefault(dtype, {})[setting] = towers
            progress(f"towers, {setting}, {dtype}", towers)
    for on in (False, True):
        results["peaks_fp32"][on] = {name: in_child(f"peak_probe({name!r}, {on}, {quick})") for name in names}
        progress(f"peaks, checkpointing {on}", results["peaks_fp32"][on])
    results["step"] = step_time()
    return results


def print_train_memory(results):
    shape = results["shape"]
    print(
        f"\n| saved for backward, per {shape['image_size']}px frame ({results['frames']} frames, width "
        f"{shape['hidden_size']}) | InternVL | PVC | PVC / InternVL |"
    )
    print("|---|---|---|---|")
    for dtype, layers in results["layers"].items():
        internvl, pvc, progressive = layers["internvl"], layers["pvc"], layers["pvc progressive"]
        print(
            f"| one ordinary layer, {dtype} | {internvl / MIB:.1f} MiB | {pvc / MIB:.1f} MiB | {pvc / internvl:.2f} |"
        )
        print(
            f"| one progressive layer, {dtype} | - | {progressive / MIB:.1f} MiB | {progressive / pvc:.2f} of an "
            "ordinary layer |"
        )
        for setting, towers in results["towers"][dtype].items():
            internvl, pvc = towers["internvl"], towers["pvc"]
            print(
                f"| {shape['layers']} layers, {setting}, {dtype} | {internvl / MIB:.1f} MiB | {pvc / MIB:.1f} MiB | {pvc / internvl:.2f} |"
            )
    print(
        "\n| peak of one training step over the tower and input, less the gradients, per frame, fp32 | InternVL | PVC "
        "| PVC / InternVL |"
    )
    print("|---|---|---|---|")
    for checkpointing, peaks in results["peaks_fp32"].items():
        setting = "gradient checkpointing" if checkpointing else "no checkpointing"
        internvl, pvc = peaks["internvl"], peaks["pvc"]
        print(
            f"| {results['shape']['layers']} layers, {setting} | {internvl / MIB:.1f} MiB | {pvc / MIB:.1f} MiB | {pvc / internvl:.2f} |"
        )
    step = results["step"]
    seconds, flops = step["seconds"], step["flops"]
    flops_ratio = flops["pvc"] / flops["internvl"]
    print(
        f"\n| forward + backward, 3-layer towers (1 progressive), {results['frames']} frames | CPU s | / InternVL "
        "| / (InternVL x FLOPs ratio) |"
    )
    print("|---|---|---|---|")
    for name, value in seconds.items():
        ratio = value / seconds["internvl"]
        print(f"| {name} | {value:.2f} | {ratio:.3f} | {ratio / (1 if name == 'internvl' else flops_ratio):.3f} |")
    print(f"FLOPs: PVC / InternVL {flops_ratio:.3f} (target: PVC's time ratio / FLOPs ratio <= 1.10)")
