"""PVC against InternVL2: FLOPs at the real shapes, CPU time and vision-tower memory. Prints tables, writes JSON.

    python benchmarks/bench.py                 # all parts (about 5 minutes on 2 CPU cores)
    python benchmarks/bench.py --flops-only    # part 1 alone (under a minute)
    python benchmarks/bench.py --out results.json

1. FLOPs, counted with torch's FlopCounterMode on the meta device (no weights, no compute) for the 8B and 2B
   shapes: PVC against its ablation row (a), which is InternVL2 exactly. Convention: a multiply-add is 2 FLOPs;
   attention is counted as the full score matrix even where causal (eager attention, so that the counter sees
   the matmuls: on CPU it sees nothing inside fused SDPA); the LM head counts every position. Workloads: Table 5's
   448x448 image with 2048 text tokens; videos of 16, 64 and 96 frames, each frame's prompt (visual tokens plus
   `FRAME_PROMPT_TOKENS` for "FrameN: <img></img>\\n") plus 64 text tokens.
2. CPU wall time (fp32, sdpa) of a mid-size model (real 448px tiles and token counts, narrow and shallow
   layers), PVC against transformers' InternVLForConditionalGeneration of the same shape on the same inputs,
   interleaved repeats, median: image prefill, 16-frame video prefill, one decode step.
3. Peak memory of the vision tower on 16, 64 and 96 frames at 448px, each in a fresh process: activation peak
   (process peak RSS minus the peak after loading) at InternViT-300M's width, which does not depend on depth in
   inference, plus the fp32 weights of the full 24-layer tower.
4. `--parts train-memory` (not in the default parts; about 15 minutes): training memory and step time of the vision
   tower against transformers' InternVL tower, see train_memory.py. `--quick` runs it on a small shape.
"""

import argparse
import contextlib
import copy
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from pvc import PVCConfig, PVCForConditionalGeneration
from pvc.conversion.options import ABLATIONS

FRAME_PROMPT_TOKENS = 6  # "Frame12: " + <img> + </img> + "\n" in InternLM2's tokenizer, about
TEXT_TOKENS_IMAGE = 2048
TEXT_TOKENS_VIDEO = 64

INTERNVIT_300M = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)
LLMS = {
    "8B": dict(
        model_type="llama",
        vocab_size=92553,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=32768,
    ),
    "2B": dict(
        model_type="llama",
        vocab_size=92553,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=24,
        num_attention_heads=16,
        num_key_value_heads=8,
        max_position_embeddings=32768,
    ),
}
# Rows (a) and PVC of the paper's Table 4 (the converter's table); PVC with its 8 progressive layers
ROWS = {"internvl2": ABLATIONS["a"], "pvc": ABLATIONS["pvc"]}
PROGRESSIVE_LAYERS = 8


def make_config(llm: dict, row: str, vision: dict = INTERNVIT_300M, attn="eager") -> PVCConfig:
    switches = dict(ROWS[row])
    temporal = min(PROGRESSIVE_LAYERS, vision["num_hidden_layers"] // 3) if switches.pop("temporal") else 0
    config = PVCConfig(vision_config=dict(vision, num_temporal_layers=temporal), text_config=dict(llm), **switches)
    config._attn_implementation = attn
    return config


# ------------------------------------------------------------------------------------------------------------------
# Part 1: FLOPs
# ------------------------------------------------------------------------------------------------------------------


def count(function) -> int:
    with FlopCounterMode(display=False) as counter:
        function()
    return counter.get_total_flops()


@contextlib.contextmanager
def rotary_on_meta(language_model):
    """Rotary cos/sin as empty meta tensors of the right shape while counting. Older transformers 5.x releases
    cannot run the rotary embedding on meta tensors (autocast has no meta backend); what it skips, the product of
    head_dim / 2 frequencies with the positions, is below 1e-7 of a workload."""
    rotary = language_model.rotary_emb
    width = 2 * rotary.inv_freq.shape[-1]

    def forward(hidden_states, position_ids, *args, **kwargs):
        shape = (*position_ids.shape, width)
        return (torch.empty(shape, dtype=hidden_states.dtype, device="meta"),) * 2

    rotary.forward = forward
    try:
        yield
    finally:
        del rotary.forward


def workload_flops(model, kind: str, frames: int = 1) -> dict:
    """FLOPs of the vision tower, projector and language model (with head) for one workload, on meta tensors."""
    config, inner = model.config, model.model
    size = config.vision_config.image_size
    if kind == "image":
        pixels = torch.empty(1, 3, size, size, device="meta")
        num_frames, static = config.image_repeat, True
        text = TEXT_TOKENS_IMAGE
    else:
        pixels = torch.empty(frames, 3, size, size, device="meta")
        num_frames, static = frames, False
        text = TEXT_TOKENS_VIDEO + FRAME_PROMPT_TOKENS * frames
    result = {}
    with torch.no_grad(), rotary_on_meta(model.model.language_model):
        result["vision"] = count(lambda: inner.vision_tower(pixels, num_frames=num_frames, static=static))
        hidden = inner.vision_tower(pixels, num_frames=num_frames, static=static).last_hidden_state
        result["projector"] = count(lambda: inner.multi_modal_projector(hidden, num_frames))
        visual = config.tokens_per_frame * num_frames
        length = visual + text
        embeds = torch.empty(1, length, config.text_config.hidden_size, device="meta")
        # A ready 4-D mask and explicit positions: building them from a 2-D mask reads values, which meta tensors lack.
        mask = torch.empty(1, 1, length, length, device="meta")
        positions = torch.arange(length, device="meta")[None]
        result["llm"] = count(
            lambda: model.lm_head(
                inner.language_model(
                    inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=False
                )[0]
            )
        )
    result["tokens"] = visual
    result["total"] = result["vision"] + result["projector"] + result["llm"]
    return result


def check_counter() -> dict:
    """FlopCounterMode against the analytic count of one InternViT layer (eager attention)."""
    from pvc.modeling_pvc import PVCVisionLayer

    config = make_config(LLMS["2B"], "internvl2").vision_config
    with torch.device("meta"):
        layer = PVCVisionLayer(config)
    tokens, width, inner = 1025, config.hidden_size, config.intermediate_size
    analytic = 2 * tokens * width * 4 * width + 2 * 2 * tokens * tokens * width + 2 * 2 * tokens * width * inner
    counted = count(lambda: layer(torch.empty(1, tokens, width, device="meta")))
    return {"analytic": analytic, "counted": counted}


def flops_part() -> dict:
    results = {"counter_check": check_counter()}
    for shape, llm in LLMS.items():
        models = {}
        for row in ROWS:
            with torch.device("meta"):
                models[row] = PVCForConditionalGeneration(make_config(llm, row)).eval()
        entry = {}
        for name, kind, frames in [
            ("image", "image", 1),
            ("video16", "video", 16),
            ("video64", "video", 64),
            ("video96", "video", 96),
        ]:
            entry[name] = {row: workload_flops(models[row], kind, frames) for row in ROWS}
            entry[name]["ratio"] = entry[name]["pvc"]["total"] / entry[name]["internvl2"]["total"]
        results[shape] = entry
    results["image_ratio_8b"] = results["8B"]["image"]["ratio"]
    results["video64_ratio_8b"] = results["8B"]["video64"]["ratio"]
    return results


def print_flops(results):
    check = results["counter_check"]
    print(
        f"FlopCounterMode on one InternViT-300M layer: {check['counted'] / 1e9:.2f} GFLOPs counted, "
        f"{check['analytic'] / 1e9:.2f} analytic"
    )
    print(
        "\n| shape | workload | model | visual tokens | vision TFLOPs | projector TFLOPs | LLM TFLOPs | total TFLOPs "
        "| PVC / InternVL2 |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for shape in LLMS:
        for workload, entry in results[shape].items():
            for row in ROWS:
                r = entry[row]
                ratio = f"{entry['ratio']:.3f}" if row == "pvc" else ""
                print(
                    f"| {shape} | {workload} | {row} | {r['tokens']} | {r['vision'] / 1e12:.3f} | "
                    f"{r['projector'] / 1e12:.3f} | {r['llm'] / 1e12:.2f} | {r['total'] / 1e12:.2f} | {ratio} |"
                )


# ------------------------------------------------------------------------------------------------------------------
# Part 2: CPU time against transformers' InternVL
# ------------------------------------------------------------------------------------------------------------------

MID_VISION = dict(hidden_size=256, num_hidden_layers=6, num_attention_heads=4, intermediate_size=1024)
MID_LLM = dict(
    model_type="qwen2",
    vocab_size=4096,
    hidden_size=512,
    intermediate_size=1536,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    max_position_embeddings=8192,
    tie_word_embeddings=False,
)


def internvl_config(config: PVCConfig, attn: str):
    """transformers' InternVL config with the shapes of a PVC config's row (a) (InternVL2)."""
    from transformers import InternVLConfig

    vision = config.vision_config
    reference = InternVLConfig(
        vision_config=dict(
            hidden_size=vision.hidden_size,
            num_hidden_layers=vision.num_hidden_layers,
            num_attention_heads=vision.num_attention_heads,
            intermediate_size=vision.intermediate_size,
            attention_bias=True,
            layer_norm_eps=1e-6,
            use_mean_pooling=True,
            image_size=vision.image_size,
            patch_size=vision.patch_size,
        ),
        text_config=config.text_config.to_dict(),
        image_token_id=config.image_token_id,
        downsample_ratio=0.5,
        tie_word_embeddings=False,
    )
    reference._attn_implementation = attn
    return reference


def timed(function, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return times


def cpu_part(repeats: int = 5) -> dict:
    torch.manual_seed(0)
    pvc_config = make_config(MID_LLM, "pvc", MID_VISION, attn="sdpa")
    pvc_config.image_token_id = MID_LLM["vocab_size"] - 1
    pvc = PVCForConditionalGeneration(pvc_config).eval()
    from transformers import InternVLForConditionalGeneration

    reference = InternVLForConditionalGeneration(internvl_config(pvc_config, "sdpa")).eval()
    token = pvc_config.image_token_id
    image = torch.randn(1, 3, 448, 448)
    video = torch.randn(16, 3, 448, 448)

    def ids(visual, text):
        return torch.cat(
            [torch.randint(0, 1000, (1, 8)), torch.full((1, visual), token), torch.randint(0, 1000, (1, text - 8))],
            dim=1,
        )

    image_ids = ids(256, TEXT_TOKENS_IMAGE)  # both models: 256 visual tokens for one tile
    inputs = {
        "image": (
            dict(input_ids=image_ids, pixel_values=image, image_num_tiles=torch.tensor([1])),
            dict(input_ids=image_ids, pixel_values=image),
        ),
        "video16": (
            dict(
                input_ids=ids(64 * 16, 64 + 16 * FRAME_PROMPT_TOKENS),
                pixel_values_videos=video,
                video_num_frames=torch.tensor([16]),
            ),
            dict(input_ids=ids(256 * 16, 64 + 16 * FRAME_PROMPT_TOKENS), pixel_values=video),
        ),
    }
    results = {}
    with torch.inference_mode():
        for name, (ours, theirs) in inputs.items():
            times = {"pvc": [], "internvl": []}
            for _ in range(repeats):  # interleaved, so that drifts of the machine hit both alike
                times["pvc"] += timed(lambda: pvc(**ours, use_cache=False), 1)
                times["internvl"] += timed(lambda: reference(**theirs, use_cache=False), 1)
            results[name] = {model: statistics.median(values) for model, values in times.items()}
        # One decode step after the image prompt, each model with its own cache.
        caches = {
            "pvc": pvc(**inputs["image"][0], use_cache=True),
            "internvl": reference(**inputs["image"][1], use_cache=True),
        }
        step = torch.randint(0, 1000, (1, 1))
        times = {"pvc": [], "internvl": []}
        for _ in range(repeats * 4):
            for name, model in (("pvc", pvc), ("internvl", reference)):
                cache = copy.deepcopy(_cache_of(caches[name]))  # the prompt's cache, fresh for every step
                times[name] += timed(
                    lambda: model(input_ids=step, **{_cache_name(caches[name]): cache}, use_cache=True), 1
                )
        results["decode_step"] = {model: statistics.median(values) for model, values in times.items()}
    flops_ours = workload_flops_for(pvc_config, "pvc")
    flops_theirs = workload_flops_for(pvc_config, "internvl2")
    return {
        **{name: {**value, "ratio": value["pvc"] / value["internvl"]} for name, value in results.items()},
        "image_flops_ratio": flops_ours / flops_theirs,
        "image_time_ratio": results["image"]["pvc"] / results["image"]["internvl"],
        "decode_step_ratio": results["decode_step"]["pvc"] / results["decode_step"]["internvl"],
    }


def _cache_name(output) -> str:
    return "cache" if "cache" in output else "past_key_values"


def _cache_of(output):
    return output[_cache_name(output)]


def workload_flops_for(config: PVCConfig, row: str) -> int:
    vision = {key: getattr(config.vision_config, key) for key in MID_VISION}
    with torch.device("meta"):
        model = PVCForConditionalGeneration(make_config(MID_LLM, row, vision)).eval()
    return workload_flops(model, "image")["total"]


def print_cpu(results):
    print("\n| CPU, fp32, sdpa (mid-size) | PVC s | transformers InternVL s | ratio |")
    print("|---|---|---|---|")
    for name in ("image", "video16", "decode_step"):
        r = results[name]
        print(f"| {name} | {r['pvc']:.4f} | {r['internvl']:.4f} | {r['ratio']:.3f} |")
    print(
        f"image FLOPs ratio of this shape: {results['image_flops_ratio']:.3f}; time ratio / FLOPs ratio: "
        f"{results['image_time_ratio'] / results['image_flops_ratio']:.3f} (target <= 1.10); decode-step overhead: "
        f"{(results['decode_step_ratio'] - 1) * 100:+.1f}% (target <= 3%)"
    )


# ------------------------------------------------------------------------------------------------------------------
# Part 3: vision-tower memory on long videos
# ------------------------------------------------------------------------------------------------------------------

MEMORY_VISION = dict(hidden_size=1024, num_hidden_layers=2, num_attention_heads=16, intermediate_size=4096)


def memory_probe(frames: int, chunk: int | None) -> int:
    """Run in a child process: activation peak in bytes of the vision tower on `frames` 448px frames, sampled from
    the resident set every 2 ms (large allocations go straight back to the system, see `memory_part`)."""

    from pvc import PVCVisionConfig
    from pvc.modeling_pvc import PVCVisionModel

    config = PVCVisionConfig(**MEMORY_VISION, num_temporal_layers=1, frame_chunk_size=chunk)
    config._attn_implementation = "sdpa"
    tower = PVCVisionModel(config).eval()
    pixels = torch.randn(frames, 3, 448, 448)
    with torch.inference_mode():
        return resident_peak(lambda: tower(pixels, num_frames=frames))


def resident_peak(run) -> int:
    """Bytes the resident set rises to while `run()` runs, over where it stood before, sampled every 2 ms."""
    import os
    import threading

    def resident() -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    baseline = peak = resident()
    done = threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, resident())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        run()
    finally:
        done.set()
        sampler.join()
    return max(peak, resident()) - baseline


def memory_part(frame_counts=(16, 64, 96), chunk=8) -> dict:
    """Activation peaks in fresh processes; glibc's mmap threshold is fixed low so that freed tensors leave the
    resident set at once and it follows the live tensors."""
    import os

    from pvc import PVCVisionConfig
    from pvc.modeling_pvc import PVCVisionModel

    with torch.device("meta"):
        full = PVCVisionModel(PVCVisionConfig(**INTERNVIT_300M))
    weights = sum(param.numel() for param in full.parameters()) * 4
    results = {"weights_bytes": weights, "frames": {}}
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    for setting, size, counts in (
        ("chunked", chunk, frame_counts),
        ("unchunked", None, (frame_counts[0], frame_counts[-1])),
    ):
        for frames in counts:
            code = (
                f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import bench; "
                f"print(bench.memory_probe({frames}, {size}))"
            )
            output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
            activation = int(output.stdout.strip().splitlines()[-1])
            results["frames"].setdefault(setting, {})[frames] = {"activation": activation, "peak": activation + weights}
    chunked = results["frames"]["chunked"]
    results["vit_96_over_16"] = chunked[96]["peak"] / chunked[16]["peak"]
    results["activation_96_over_16"] = chunked[96]["activation"] / chunked[16]["activation"]
    results["frame_chunk_size"] = chunk
    return results


def print_memory(results):
    print("\n| vision tower, 448px frames | activation peak MiB | with fp32 InternViT-300M weights MiB |")
    print("|---|---|---|")
    for setting, frames in results["frames"].items():
        for count_, value in frames.items():
            print(f"| {count_} frames, {setting} | {value['activation'] / 2**20:.0f} | {value['peak'] / 2**20:.0f} |")
    print(
        f"96 / 16 frames, chunk {results['frame_chunk_size']}: {results['vit_96_over_16']:.2f}x with weights "
        f"(target <= 2), {results['activation_96_over_16']:.2f}x activations alone"
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flops-only", action="store_true", help="part 1 alone")
    parser.add_argument("--parts", default="flops,cpu,memory", help="comma-separated parts to run (default: all)")
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="train-memory on a small shape (a test runs it)")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    parts = {"flops"} if args.flops_only else set(args.parts.split(","))
    results = {}
    if "flops" in parts:
        results["flops"] = flops_part()
        print_flops(results["flops"])
    if "cpu" in parts:
        results["cpu"] = cpu_part(args.repeats)
        print_cpu(results["cpu"])
    if "memory" in parts:
        results["memory"] = memory_part()
        print_memory(results["memory"])
    if "train-memory" in parts:
        sys.path.insert(0, str(Path(__file__).parent))
        import train_memory

        results["train_memory"] = train_memory.train_memory_part(quick=args.quick)
        train_memory.print_train_memory(results["train_memory"])
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2, default=str) + "\n")
    return results


if __name__ == "__main__":
    main()
