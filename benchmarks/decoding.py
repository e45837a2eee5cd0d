"""Sampling frames from long videos: CPU seconds and peak memory of PVC's decoder against decord, a linear PyAV decode
(transformers' `read_video_pyav`) and the floor. Prints a table, writes JSON.

    python benchmarks/decoding.py                   # the full table (about an hour on 2 CPU cores; videos cached)
    python benchmarks/decoding.py --quick           # a 20-second 160p video, every method once (under a minute)
    python benchmarks/decoding.py --durations 1 10 --heights 360 --out decoding.json

Videos: H.264 in MP4, 30 fps, a fixed random texture with a block sliding over it (costs an I-frame like a real
picture and a P-frame like a mostly still scene), keyframes every 2 s, every 10 s or only the first frame. Videos with
regular keyframes are one encoded minute repeated (its packets muxed again with later timestamps), so a 60-minute
1080p file takes seconds to make; single-keyframe videos are encoded whole. They are kept in `--videos`.

Each row samples the same frames with each method: the authors' rule (segment middles, `sample_indices`) over the
frame count, every frame returned as an RGB image or array at full resolution. Each measurement runs in a fresh
process that imports only what its method needs: CPU seconds are the process's user + system time (every thread)
spent reading (the least of `--repeats` runs), peak memory its maximum resident set size during the first run.
- pvc: `video_decoding_pvc.read_video` (the file this repo's processor uses).
- decord: `VideoReader(path).get_batch(indices)` (decord 0.6, an optional extra: `pip install decord`).
- linear: transformers' `read_video_pyav`, which decodes every frame up to the last pick.
- floor: the least decoding these picks need, written out here: for each group of pictures that holds a pick, a seek
  to its keyframe and a decode up to its last pick.
- processor (with `--methods processor`, not a decoder): `PVCVideoProcessor(backend="pil")` on the file, decoding,
  tiling and normalising, for the memory the processor needs (frames are tiled as they are decoded).
A measurement that runs past `--limit` seconds is stopped and shown as "> limit".
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RATE = 30
GOPS = {"2 s": 2 * RATE, "10 s": 10 * RATE, "one": None}
METHODS = ("pvc", "decord", "linear", "floor")
# Not a decoder: the whole video processor (decoding, tiling, normalising), for its memory (`--methods processor`).
EXTRA_METHODS = ("processor",)


# ------------------------------------------------------------------------------------------------ the videos


def texture_frames(width: int, height: int, count: int, start: int = 0):
    import numpy as np

    rng = np.random.default_rng(0)
    texture = rng.integers(0, 256, (height // 8 + 1, width // 8 + 1), dtype=np.uint8).repeat(8, 0).repeat(8, 1)
    texture = texture[:height, :width]
    side = max(16, height // 4)
    for index in range(start, start + count):
        frame = texture.copy()
        x = (index * 8) % (width - side)
        frame[height // 4 : height // 4 + side, x : x + side] ^= 255  # a block sliding to the right
        yield frame


def encode(path: Path, width: int, height: int, count: int, gop: int | None):
    import av

    keyint = gop or 10 * count + 1  # longer than the video: the first frame is the only keyframe
    options = {"preset": "ultrafast", "x264-params": f"keyint={keyint}:min-keyint={keyint}:scenecut=0"}
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=RATE, options=options)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for frame in texture_frames(width, height, count):
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="gray")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def repeat(source: Path, path: Path, times: int):
    """`source` played `times` times in a row: its packets muxed again with shifted timestamps."""
    import av

    with av.open(str(source)) as reader, av.open(str(path), "w") as writer:
        template = reader.streams.video[0]
        stream = writer.add_stream_from_template(template)
        packets = [packet for packet in reader.demux(template) if packet.size]
        span = max(packet.pts for packet in packets) - min(packet.pts for packet in packets) + packets[1].duration
        for copy in range(times):
            for packet in packets:
                packet.stream = stream
                packet.pts, packet.dts = packet.pts + (span if copy else 0), packet.dts + (span if copy else 0)
                writer.mux(packet)


def video(folder: Path, minutes: float, height: int, gop_name: str) -> Path:
    width = (height * 16 // 9) // 2 * 2
    gop = GOPS[gop_name]
    name = f"{minutes:g}min-{height}p-{gop_name.replace(' ', '')}.mp4"
    path = folder / name
    if path.exists():
        return path
    part = path.with_suffix(".part.mp4")
    if gop is None or minutes <= 1:
        encode(part, width, height, round(minutes * 60 * RATE), gop)
    else:
        minute = video(folder, 1, height, gop_name)
        repeat(minute, part, round(minutes))
    part.rename(path)
    return path


# ------------------------------------------------------------------------------------------------ one measurement


def picks(path: str, count: int) -> list[int]:
    """The authors' rule over the file's frames (counted from its packets, as every method below sees them)."""
    import av

    decoding = load_decoding()
    with av.open(path) as container:
        total = sum(1 for packet in container.demux(video=0) if packet.size)
    return decoding.sample_indices(total, count, None, None, None)


def load_decoding():
    """video_decoding_pvc.py by itself (numpy, PIL, PyAV), without importing the rest of PVC (torch)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("video_decoding_pvc", REPO / "video_decoding_pvc.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_pvc(path, count, indices):
    return load_decoding().read_video(path, count)


def run_decord(path, count, indices):
    import decord

    return decord.VideoReader(path, ctx=decord.cpu(0)).get_batch(indices).asnumpy()


def run_linear(path, count, indices):
    from transformers.video_utils import read_video_pyav

    return read_video_pyav(path, sample_indices_fn=lambda metadata, **kwargs: indices)[0]


def run_processor(path, count, indices):
    from pvc.video_processing_pvc import PVCVideoProcessor

    out = PVCVideoProcessor(backend="pil")(path, num_frames=count)
    return list(out["pixel_values_videos"])


def run_floor(path, count, indices):
    import bisect

    import av

    with av.open(path) as container:
        stream = container.streams.video[0]
        packets = [(p.pts, p.is_keyframe) for p in container.demux(stream) if p.size and p.pts is not None]
        times = sorted(pts for pts, _ in packets)
        keyframes = sorted(times.index(pts) for pts, key in packets if key)
        groups = {}
        for index in indices:
            keyframe = keyframes[bisect.bisect_right(keyframes, index) - 1]
            groups.setdefault(keyframe, []).append(index)
        frames = {}
        for keyframe, wanted in sorted(groups.items()):
            container.seek(times[keyframe], stream=stream, backward=True)
            for frame in container.decode(stream):
                position = bisect.bisect_left(times, frame.pts)
                if position in wanted:
                    frames[position] = frame.to_image()
                if position >= wanted[-1]:
                    break
    return [frames[index] for index in indices]


def measure(method: str, path: str, count: int, repeats: int = 1) -> dict:
    """In this (fresh) process: CPU seconds (the least of `repeats` runs) and peak memory of one method, after the
    imports it needs."""
    if method == "decord":
        import decord  # noqa: F401
    if method == "linear":
        import transformers.video_utils  # noqa: F401
    if method == "processor":
        import pvc.video_processing_pvc  # noqa: F401
    import av  # noqa: F401
    import numpy  # noqa: F401
    from PIL import Image  # noqa: F401

    indices = picks(path, count)
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times, peak = [], None
    for _ in range(repeats):
        start = time.process_time()
        frames = globals()[f"run_{method}"](path, count, indices)
        times.append(time.process_time() - start)
        assert len(frames) == count, (method, len(frames), count)
        del frames
        # the first run's peak: later runs reuse (or fragment) the memory the first one freed
        peak = peak or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    seconds = min(times)
    return {"cpu_s": seconds, "peak_mib": peak / 1024, "added_mib": (peak - baseline) / 1024}


def measured(method: str, path: Path, count: int, limit: float, repeats: int) -> dict:
    command = [sys.executable, __file__, "--measure", method, str(path), str(count), str(repeats)]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=limit, env=env)
    except subprocess.TimeoutExpired:
        return {"cpu_s": None, "over": limit}
    if done.returncode != 0:
        return {"cpu_s": None, "error": done.stderr.strip().splitlines()[-1][:200]}
    return json.loads(done.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------ the table


def cell(result: dict) -> str:
    if result.get("cpu_s") is not None:
        return f"{result['cpu_s']:.2f} s / {result['peak_mib']:.0f} MiB"
    if "over" in result:
        return f"> {result['over']:g} s"
    return "error"


def table(rows: list[dict], methods) -> str:
    head = "| video | keyframes | frames | " + " | ".join(methods) + " | pvc / decord | pvc / linear | pvc / floor |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for row in rows:
        results = row["results"]

        def ratio(other):
            a, b = results.get("pvc", {}).get("cpu_s"), results.get(other, {}).get("cpu_s")
            return f"{a / b:.2f}" if a is not None and b else "-"

        lines.append(
            f"| {row['video']} | {row['keyframes']} | {row['frames']} | "
            + " | ".join(cell(results[m]) for m in methods)
            + f" | {ratio('decord')} | {ratio('linear')} | {ratio('floor')} |"
        )
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a 20-second 160p video, 16 frames, every method")
    parser.add_argument("--durations", type=float, nargs="+", default=[1, 10, 60], help="minutes")
    parser.add_argument("--heights", type=int, nargs="+", default=[360, 1080])
    parser.add_argument("--keyframes", nargs="+", default=list(GOPS), choices=list(GOPS))
    parser.add_argument("--frames", type=int, nargs="+", default=[16, 64, 96])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS + EXTRA_METHODS)
    parser.add_argument("--videos", type=Path, default=Path(tempfile.gettempdir()) / "pvc-decoding-videos")
    parser.add_argument("--limit", type=float, default=300.0, help="seconds a measurement may take")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each measurement; the least CPU time counts")
    parser.add_argument("--out", type=Path, help="write the results as JSON")
    parser.add_argument("--measure", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        method, path, count, repeats = args.measure
        print(json.dumps(measure(method, path, int(count), int(repeats))))
        return []
    if args.quick:
        args.durations, args.heights, args.frames = [1 / 3], [160], [16]
    methods = [m for m in args.methods if m != "decord" or _has("decord")]
    args.videos.mkdir(parents=True, exist_ok=True)
    rows = []
    for minutes in args.durations:
        for height in args.heights:
            for gop in args.keyframes:
                path = video(args.videos, minutes, height, gop)
                for count in args.frames:
                    results = {method: measured(method, path, count, args.limit, args.repeats) for method in methods}
                    rows.append(
                        {
                            "video": f"{minutes:g} min {height}p" if minutes >= 1 else f"{minutes * 60:g} s {height}p",
                            "keyframes": gop,
                            "frames": count,
                            "results": results,
                        }
                    )
                    print(table(rows[-1:], methods).splitlines()[-1], flush=True)
    print()
    print(table(rows, methods))
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))
    return rows


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


if __name__ == "__main__":
    main()
