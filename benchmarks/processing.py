"""PVC's image processor against transformers' InternVL image and video processors: CPU seconds on one thread, the
same inputs, the same pixels. Prints a table, writes JSON.

    python benchmarks/processing.py                 # the full table (a few minutes on 2 CPU cores)
    python benchmarks/processing.py --quick         # small inputs, one run each (seconds)
    python benchmarks/processing.py --repeats 3 --out processing.json

Needs torchvision (transformers' processors are built on it): `pip install torch==2.14.1 torchvision==0.29.1`
(constraints-vision.txt).

Inputs (synthetic, fixed seeds): a 1600x1200 photo (smooth gradients, soft waves, a few hard-edged shapes, noise) cut
into 4 x 3 tiles of 448px plus a thumbnail (at most 12 tiles, InternVL2's setting); 8 such photos with other seeds,
given as PIL images; a 64-frame 720p video given as frames, a uint8 array [64, 720, 1280, 3], each frame resized to
one 448px tile. Rows:
- PVC torchvision / PVC PIL: `PVCImageProcessor(backend=...)`; the video through `PVCVideoProcessor(backend=...)`
  with `do_sample_frames=False`.
- transformers torchvision: `GotOcr2ImageProcessor` (transformers' InternVL image processor) with InternVL2's settings
  (crop_to_patches, 1..12 patches of 448px, ImageNet mean and std, bicubic); the video through
  `InternVLVideoProcessor` (448x448, the same normalisation, `do_sample_frames=False`).
- transformers PIL: `GotOcr2ImageProcessorPil`, the same settings. transformers has no PIL video processor; its
  video row gives the frames to `GotOcr2ImageProcessorPil` as images without tiling (one 448px tile each).
CPU seconds are `time.process_time()` with `torch.set_num_threads(1)`: the least of `--repeats` runs after one warm-up,
the rows of an input taken in turn in each run. Every row's output is checked against transformers' torchvision one:
the same tiles in the same order ([tiles, 3, 448, 448]; transformers' video output [1, 64, ...] is one video of 64)
and, normalisation undone, every pixel within 2/255; the exit status is 1 where a row fails it.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
TOLERANCE = 2 / 255  # two 8-bit levels, in 0..1 units
PROCESSORS = ("pvc_torchvision", "pvc_pil", "transformers_torchvision", "transformers_pil")
NEEDS_TORCHVISION = (
    "benchmarks/processing.py needs torchvision, which does not load here (transformers' InternVL processors are "
    "built on it): pip install torch==2.14.1 torchvision==0.29.1 (see constraints-vision.txt)."
)


# ------------------------------------------------------------------------------------------------ the inputs


def picture(width: int, height: int, seed: int) -> np.ndarray:
    """A natural-looking uint8 picture [H, W, 3]: a gradient, soft waves, a few hard-edged ellipses, sensor noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32) / max(width, height)
    pixels = np.empty((height, width, 3), dtype=np.float32)
    for channel in range(3):
        a, b = rng.uniform(-80, 80, 2)
        layer = 128 + a * (x - 0.5) + b * (y - 0.5)
        for _ in range(3):  # 0.5-4 cycles across the picture
            fx, fy, phase = *rng.uniform(0.5, 4, 2), rng.uniform(0, 2 * np.pi)
            layer += rng.uniform(8, 25) * np.sin(2 * np.pi * (fx * x + fy * y) + phase)
        pixels[..., channel] = layer
    for _ in range(6):  # objects: ellipses of one colour with hard edges
        cx, cy, rx, ry = rng.uniform(0, x.max()), rng.uniform(0, y.max()), *rng.uniform(0.03, 0.15, 2)
        inside = ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1
        pixels[inside] = 0.4 * pixels[inside] + 0.6 * rng.uniform(0, 255, 3)
    pixels += rng.normal(0, 3, pixels.shape).astype(np.float32)
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


def video_frames(width: int, height: int, count: int, seed: int = 100) -> np.ndarray:
    """[count, H, W, 3] uint8: one picture panning 4 pixels a frame, with fresh noise in each frame."""
    rng = np.random.default_rng(seed)
    scene = picture(width + 4 * count, height, seed)
    frames = np.empty((count, height, width, 3), dtype=np.uint8)
    for index in range(count):
        view = scene[:, 4 * index : 4 * index + width].astype(np.int16)
        frames[index] = np.clip(view + rng.integers(-3, 4, view.shape, dtype=np.int16), 0, 255)
    return frames


def inputs(quick: bool) -> list[dict]:
    """The workloads: name, the images or video, and the tile limit."""
    from PIL import Image

    if quick:  # a 2 x 1 grid plus a thumbnail, 2 photos, 8 frames of 320x180
        (width, height), max_tiles, photos, (frame_width, frame_height), frames = (600, 300), 4, 2, (320, 180), 8
    else:
        (width, height), max_tiles, photos, (frame_width, frame_height), frames = (1600, 1200), 12, 8, (1280, 720), 64
    images = [Image.fromarray(picture(width, height, seed)) for seed in range(photos)]
    return [
        {"name": f"1 photo {width}x{height}", "images": images[:1], "max_tiles": max_tiles},
        {"name": f"{photos} photos {width}x{height}", "images": images, "max_tiles": max_tiles},
        {"name": f"{frames}-frame {frame_height}p video", "video": video_frames(frame_width, frame_height, frames)},
    ]


# ------------------------------------------------------------------------------------------------ the processors


def processors(max_tiles: int) -> dict:
    """Each row's processor, configured with InternVL2's settings."""
    from transformers import GotOcr2ImageProcessor, GotOcr2ImageProcessorPil, InternVLVideoProcessor
    from transformers.image_utils import PILImageResampling

    from pvc.image_processing_pvc import PVCImageProcessor
    from pvc.video_processing_pvc import PVCVideoProcessor

    internvl2 = dict(
        crop_to_patches=True,
        min_patches=1,
        max_patches=max_tiles,
        size={"height": 448, "width": 448},
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
        resample=PILImageResampling.BICUBIC,
    )
    video = dict(
        size={"height": 448, "width": 448},
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
        resample=PILImageResampling.BICUBIC,
        do_sample_frames=False,
    )
    return {
        "pvc_torchvision": PVCImageProcessor(backend="torchvision", max_tiles=max_tiles),
        "pvc_pil": PVCImageProcessor(backend="pil", max_tiles=max_tiles),
        "pvc_video_torchvision": PVCVideoProcessor(backend="torchvision"),
        "pvc_video_pil": PVCVideoProcessor(backend="pil"),
        "transformers_torchvision": GotOcr2ImageProcessor(**internvl2),
        "transformers_pil": GotOcr2ImageProcessorPil(**internvl2),
        "transformers_video": InternVLVideoProcessor(**video),
        "transformers_pil_frames": GotOcr2ImageProcessorPil(**{**internvl2, "crop_to_patches": False}),
    }


def calls(workload: dict, made: dict) -> dict:
    """Each row's call on this workload -> its pixels [tiles, 3, S, S]."""
    if "video" in workload:
        frames = workload["video"]
        return {
            "pvc_torchvision": lambda: made["pvc_video_torchvision"](videos=frames, do_sample_frames=False)[
                "pixel_values_videos"
            ],
            "pvc_pil": lambda: made["pvc_video_pil"](videos=frames, do_sample_frames=False)["pixel_values_videos"],
            "transformers_torchvision": lambda: made["transformers_video"](videos=frames, return_tensors="pt")[
                "pixel_values_videos"
            ].flatten(0, 1),  # [1 video, T, 3, S, S] -> [T, 3, S, S]
            "transformers_pil": lambda: made["transformers_pil_frames"](images=list(frames), return_tensors="pt")[
                "pixel_values"
            ],
        }
    images = workload["images"]
    return {
        "pvc_torchvision": lambda: made["pvc_torchvision"](images=images)["pixel_values"],
        "pvc_pil": lambda: made["pvc_pil"](images=images)["pixel_values"],
        "transformers_torchvision": lambda: made["transformers_torchvision"](images=images, return_tensors="pt")[
            "pixel_values"
        ],
        "transformers_pil": lambda: made["transformers_pil"](images=images, return_tensors="pt")["pixel_values"],
    }


def unnormalised(pixels: torch.Tensor) -> torch.Tensor:
    """Normalised pixels [n, 3, S, S] back to 0..1."""
    std, mean = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    return pixels.float() * std + mean


# ------------------------------------------------------------------------------------------------ measuring


def cpu_seconds(call) -> float:
    start = time.process_time()
    call()
    return time.process_time() - start


def measure(workload: dict, repeats: int) -> list[dict]:
    """The rows of one workload: least CPU seconds of `repeats` runs after a warm-up, and the pixel check."""
    made = processors(workload.get("max_tiles", 1))
    runs = calls(workload, made)
    reference = runs["transformers_torchvision"]()  # the warm-up of this row
    rows = {}
    for name in PROCESSORS:
        pixels = reference if name == "transformers_torchvision" else runs[name]()  # warm-up
        same_shape = tuple(pixels.shape) == tuple(reference.shape)
        difference = (unnormalised(pixels) - unnormalised(reference)).abs().max().item() if same_shape else None
        rows[name] = {
            "input": workload["name"],
            "processor": name,
            "tiles": pixels.shape[0],
            "shape": list(pixels.shape),
            "reference_shape": list(reference.shape),
            "max_difference": difference,
            "pixels_agree": same_shape and difference <= TOLERANCE + 1e-6,  # + float32 rounding
            "times": [],
        }
        del pixels
    for _ in range(repeats):  # the rows in turn, so that a slow spell of the machine spreads over all of them
        for name in PROCESSORS:
            rows[name]["times"].append(cpu_seconds(runs[name]))
    for row in rows.values():
        row["cpu_s"] = min(row["times"])
        row["ms_per_tile"] = 1000 * row["cpu_s"] / row["tiles"]
    for row in rows.values():
        row["ratio"] = row["cpu_s"] / rows["transformers_torchvision"]["cpu_s"]
    return list(rows.values())


LABELS = {
    "pvc_torchvision": "PVC torchvision",
    "pvc_pil": "PVC PIL",
    "transformers_torchvision": "transformers torchvision",
    "transformers_pil": "transformers PIL",
}


def table(rows: list[dict]) -> str:
    lines = [
        "| input | processor | CPU s | ms per tile | / transformers torchvision | max difference (0..1) | pixels |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        label = LABELS[row["processor"]]
        if row["processor"] == "transformers_pil" and "video" in row["input"]:
            label += " (frames as images)"
        difference = row["max_difference"]
        difference = "-" if difference is None else f"{difference:.5f} ({255 * difference:.2f}/255)"
        if row["pixels_agree"]:
            check = "ok"
        elif row["shape"] != row["reference_shape"]:
            check = f"FAILED: shape {row['shape']}, transformers' {row['reference_shape']}"
        else:
            check = "FAILED: pixels differ"
        lines.append(
            f"| {row['input']} | {label} | {row['cpu_s']:.4f} | {row['ms_per_tile']:.2f} | {row['ratio']:.3f} | "
            f"{difference} | {check} |"
        )
    return "\n".join(lines)


def goals(rows: list[dict]) -> dict:
    """PVC torchvision <= transformers torchvision, PVC PIL <= transformers PIL, on each input."""
    by = {(row["input"], row["processor"]): row["cpu_s"] for row in rows}
    names = list(dict.fromkeys(row["input"] for row in rows))
    result = {}
    for ours, theirs in (("pvc_torchvision", "transformers_torchvision"), ("pvc_pil", "transformers_pil")):
        ratios = {name: by[name, ours] / by[name, theirs] for name in names}
        result[f"{ours} <= {theirs}"] = {"met": all(r <= 1 for r in ratios.values()), "ratios": ratios}
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a 600x300 photo (2 x 1 tiles + thumbnail), 2 photos, an 8-frame 180p video; one run each",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        help="timed runs of each row after a warm-up; the least counts (default 5, 1 with --quick)",
    )
    parser.add_argument("--out", type=Path, help="write the results as JSON")
    args = parser.parse_args(argv)
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 5)
    if repeats < 1:
        parser.error(f"--repeats must be at least 1; got {repeats}.")
    from pvc.image_processing_pvc import torchvision_loads

    if not torchvision_loads():
        print(NEEDS_TORCHVISION, file=sys.stderr)
        raise SystemExit(2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows = []
        print("\n".join(table([]).splitlines()), flush=True)
        for workload in inputs(args.quick):
            measured = measure(workload, repeats)
            print("\n".join(table(measured).splitlines()[2:]), flush=True)
            rows += measured
    finally:
        torch.set_num_threads(threads)
    met = goals(rows)
    print()
    print(table(rows))
    print()
    for goal, result in met.items():
        ratios = ", ".join(f"{name}: {ratio:.3f}" for name, ratio in result["ratios"].items())
        print(f"goal {goal}: {'met' if result['met'] else 'NOT met'} ({ratios})")
    agree = all(row["pixels_agree"] for row in rows)
    print(f"pixels within 2/255 of transformers torchvision, same shapes: {'yes' if agree else 'NO'}")
    results = {"rows": rows, "goals": met, "pixels_agree": agree, "repeats": repeats, "quick": args.quick}
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    raise SystemExit(0 if main()["pixels_agree"] else 1)
