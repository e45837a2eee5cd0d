"""PVC against transformers' InternVL on one GPU, bf16, at the real 8B shape (random weights): throughput and memory.

    python benchmarks/gpu_bench.py [--attn sdpa flash_attention_2] [--out gpu.json]

For each attention implementation (flash_attention_2 only when flash-attn is installed): image prefill
(448x448 + 2048 text tokens) samples/s, 16- and 64-frame video prefill samples/s (`--video-frames`), decode
tokens/s, the activation peak of each prefill (GPU memory above the resident weights) and the weights' size;
PVC and InternVL2 (transformers' InternVLForConditionalGeneration, same shapes) interleaved, median of repeats.
Made to finish within 5 minutes on an H100.
"""

import argparse
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import INTERNVIT_300M, LLMS, internvl_config, make_config  # noqa: E402

from pvc import PVCForConditionalGeneration  # noqa: E402


def build(model_class, config, device):
    """Random weights initialised straight on the GPU in bf16 (no CPU copy of 8B parameters)."""
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = model_class(config)
    finally:
        torch.set_default_dtype(torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "temporal_gate" in name:
                param.fill_(0.1)  # as after training: the temporal branch contributes
    return model.eval()


def internvl(config, attn, device):
    from transformers import InternVLForConditionalGeneration

    return build(InternVLForConditionalGeneration, internvl_config(config, attn), device)


SHAPES = {
    "8B": (LLMS["8B"], INTERNVIT_300M),
    # A small stand-in that runs anywhere: checks the script itself (tests run it on the CPU).
    "tiny": (
        dict(
            model_type="qwen2",
            vocab_size=92553,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=8192,
        ),
        dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=128),
    ),
}


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(function, repeats, device) -> tuple[float, float | None]:
    """Median seconds of a call, and its memory peak above what was allocated before (GiB, on CUDA; both models'
    weights stay resident, so the peak is the call's own activations)."""
    synchronize(device)
    if device.type == "cuda":
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        synchronize(device)
        started = time.perf_counter()
        function()
        synchronize(device)
        times.append(time.perf_counter() - started)
    peak = (torch.cuda.max_memory_allocated() - before) / 2**30 if device.type == "cuda" else None
    return statistics.median(times), peak


def weights_gib(model) -> float:
    return sum(param.numel() * param.element_size() for param in model.parameters()) / 2**30


def run(attn: str, repeats: int, device: torch.device, shape: str = "8B", video_frames=(16,)) -> dict:
    llm, vision = SHAPES[shape]
    config = make_config(llm, "pvc", vision, attn=attn)
    pvc = build(PVCForConditionalGeneration, config, device)
    reference = internvl(config, attn, device)
    token = config.image_token_id
    image = torch.randn(1, 3, 448, 448, device=device, dtype=torch.bfloat16)

    def ids(visual, text):
        words = torch.randint(0, 90000, (1, text), device=device)
        return torch.cat([words[:, :8], torch.full((1, visual), token, device=device), words[:, 8:]], dim=1)

    cases = {  # Table 5's image workload
        "image_prefill": (
            dict(input_ids=ids(256, 2048), pixel_values=image, image_num_tiles=torch.tensor([1])),
            dict(input_ids=ids(256, 2048), pixel_values=image),
        ),
    }
    for count in video_frames:  # videos with their frame prompts and 64 text tokens
        video = torch.randn(count, 3, 448, 448, device=device, dtype=torch.bfloat16)
        cases[f"video{count}_prefill"] = (
            dict(
                input_ids=ids(64 * count, 64 + 6 * count),
                pixel_values_videos=video,
                video_num_frames=torch.tensor([count]),
            ),
            dict(input_ids=ids(256 * count, 64 + 6 * count), pixel_values=video),
        )
    results = {}
    with torch.inference_mode():
        for name, (ours, theirs) in cases.items():
            entry = {}
            for label, model, inputs in (("pvc", pvc, ours), ("internvl2", reference, theirs)):

                def call():
                    return model(**inputs, use_cache=False)

                call()  # warm-up
                seconds, peak = measure(call, repeats, device)
                entry[label] = {"samples_per_s": 1 / seconds, "activation_peak_gib": peak}
            results[name] = entry
        entry = {}
        new_tokens = 64
        for label, model, inputs in (
            ("pvc", pvc, cases["image_prefill"][0]),
            ("internvl2", reference, cases["image_prefill"][1]),
        ):
            options = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
            # Warm-up at the same lengths: cuDNN's attention builds a plan for each new key length and keeps it for
            # the process, so without this the model measured first pays for both (3x slower decoding on an H200).
            model.generate(**inputs, **options)
            seconds, _ = measure(lambda: model.generate(**inputs, **options), max(1, repeats // 2), device)
            entry[label] = {"tokens_per_s": new_tokens / seconds}
        results["generate_64"] = entry
        results["weights"] = {"pvc": {"gib": weights_gib(pvc)}, "internvl2": {"gib": weights_gib(reference)}}
    del pvc, reference
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--attn", nargs="+", default=["sdpa", "flash_attention_2"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="8B")
    parser.add_argument("--video-frames", type=int, nargs="+", default=[16, 64], help="video lengths to time")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else args.device
    print(f"device: {name}  torch {torch.__version__}")
    results = {"device": name, "shape": args.shape}
    for attn in args.attn:
        if attn == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
            print("flash-attn is not installed: skipping flash_attention_2")
            continue
        results[attn] = run(attn, args.repeats, device, args.shape, args.video_frames)
        print(f"\n| {attn}, bf16 | PVC | InternVL2 | PVC / InternVL2 |\n|---|---|---|---|")
        for case, entry in results[attn].items():
            for metric in entry["pvc"]:
                ours, theirs = entry["pvc"][metric], entry["internvl2"][metric]
                if ours is not None and theirs is not None:
                    print(f"| {case} {metric} | {ours:.2f} | {theirs:.2f} | {ours / theirs:.3f} |")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
