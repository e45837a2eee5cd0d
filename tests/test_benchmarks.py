"""The benchmark's method (not its targets): the FLOP counter it relies on, and that the scripts compile."""

import importlib.util
import py_compile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def load_bench():
    spec = importlib.util.spec_from_file_location("bench", REPO / "benchmarks" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_flop_counter_matches_the_analytic_count_of_a_layer():
    check = load_bench().check_counter()
    assert check["counted"] == check["analytic"]


def test_static_clip_dedup_shows_in_the_flop_count():
    """The image's per-frame layers run once, not once per repeated frame: PVC's vision FLOPs on an image are
    those of 1 frame through the per-frame layers plus 4 frames through the progressive ones."""
    bench = load_bench()
    from pvc import PVCForConditionalGeneration

    vision = dict(hidden_size=64, num_hidden_layers=6, num_attention_heads=4, intermediate_size=128)
    text = dict(bench.MID_LLM, num_hidden_layers=1)
    with torch.device("meta"):
        pvc = PVCForConditionalGeneration(bench.make_config(text, "pvc", vision)).eval()
    image = bench.workload_flops(pvc, "image")["vision"]
    video = bench.workload_flops(pvc, "video", frames=4)["vision"]  # the same 4 frames, nothing shared
    tower = pvc.model.vision_tower
    size = tower.config.image_size
    frame = torch.empty(1, 3, size, size, device="meta")
    embedding = bench.count(lambda: tower.embeddings(frame))
    tokens = tower.embeddings(frame)
    layer = bench.count(lambda: tower.encoder.layer[0](tokens))
    per_frame_layers = tower.encoder.num_frame_layers
    spatial = bench.count(lambda: tower.encoder.layer[per_frame_layers].spatial_block(tokens))
    # the image skips 3 of 4 frames in the patch embedding, every per-frame layer and the spatial attention of the
    # first progressive layer (frames split only at its temporal attention), and nothing else
    assert video - image == 3 * (embedding + per_frame_layers * layer + spatial)


def test_scripts_compile():
    for path in [*REPO.glob("benchmarks/*.py"), *REPO.glob("examples/*.py")]:
        py_compile.compile(str(path), doraise=True)


def test_gpu_script_runs_on_a_small_shape():
    """The GPU comparison itself, on the CPU with a small stand-in shape: every case runs for both models."""
    import sys

    sys.path.insert(0, str(REPO / "benchmarks"))
    import gpu_bench

    results = gpu_bench.main(
        ["--device", "cpu", "--shape", "tiny", "--attn", "sdpa", "--repeats", "1", "--video-frames", "2", "3"]
    )
    for case in ("image_prefill", "video2_prefill", "video3_prefill", "generate_64"):
        for model in ("pvc", "internvl2"):
            measured = results["sdpa"][case][model]
            speeds = [value for key, value in measured.items() if key != "activation_peak_gib"]
            assert speeds and all(value is not None and value > 0 for value in speeds), (case, model, measured)
            assert measured.get("activation_peak_gib") is None  # measured on CUDA only


def test_gpu_check_script_runs_on_the_cpu(tmp_path):
    """benchmarks/gpu_check.sh, the one command for a GPU machine, run here with the benchmark's CPU stand-in."""
    import os
    import subprocess
    import sys

    options = ["--device", "cpu", "--shape", "tiny", "--attn", "sdpa", "--repeats", "1", "--video-frames", "2"]
    subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_check.sh"), str(tmp_path), *options],
        env=dict(os.environ, PYTHON=sys.executable, DEMO_DEVICE="cpu", DEMO_SAMPLES="2"),
        check=True,
        capture_output=True,
    )
    numerics = (tmp_path / "gpu_numerics.txt").read_text()
    assert "passed" in numerics and "failed" not in numerics
    assert "image_prefill" in (tmp_path / "gpu_bench.txt").read_text() and (tmp_path / "gpu.json").exists()
    assert (tmp_path / "gpu_demo.txt").read_text().count("accuracy") == 2  # float32 and bf16


def test_decoding_benchmark_quick_form_runs_and_its_floor_reads_the_same_frames(tmp_path):
    """benchmarks/decoding.py --quick measures every method on a small video; its floor (the benchmark's own decoder
    of just the needed groups of pictures) returns the frames PVC's decoder returns, pixel for pixel."""
    import numpy as np

    spec = importlib.util.spec_from_file_location("decoding_bench", REPO / "benchmarks" / "decoding.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.main(["--quick", "--videos", str(tmp_path), "--repeats", "1", "--methods", "pvc", "linear", "floor"])
    assert [row["keyframes"] for row in rows] == list(bench.GOPS)
    for row in rows:
        for method in ("pvc", "linear", "floor"):
            assert row["results"][method]["cpu_s"] > 0 and row["results"][method]["peak_mib"] > 0, row
        path = str(tmp_path / "0.333333min-160p-10s.mp4")
    indices = bench.picks(path, 16)
    ours = [np.asarray(frame) for frame in bench.run_pvc(path, 16, indices)]
    floor = [np.asarray(frame) for frame in bench.run_floor(path, 16, indices)]
    linear = list(bench.run_linear(path, 16, indices))
    assert all(np.array_equal(a, b) and np.array_equal(a, c) for a, b, c in zip(ours, floor, linear))


def test_processing_benchmark_quick_form_times_every_row_and_its_pixels_agree(tmp_path):
    """benchmarks/processing.py --quick times PVC's image processor (both backends) against transformers' InternVL
    processors on a photo, two photos and a video, and every row's pixels match transformers' torchvision ones."""
    import json

    import pytest

    from pvc.image_processing_pvc import torchvision_loads

    if not torchvision_loads():
        pytest.skip("transformers' InternVL processors need torchvision (constraints-vision.txt)")
    spec = importlib.util.spec_from_file_location("processing_bench", REPO / "benchmarks" / "processing.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    threads = torch.get_num_threads()
    results = bench.main(["--quick", "--out", str(tmp_path / "processing.json")])
    assert torch.get_num_threads() == threads  # one thread while measuring, given back after
    rows = results["rows"]
    assert len(rows) == 3 * len(bench.PROCESSORS)
    for row in rows:
        assert row["cpu_s"] > 0 and row["pixels_agree"], row
        assert row["shape"] == row["reference_shape"] and row["max_difference"] <= 2 / 255 + 1e-6, row
    # a 2 x 1 grid and its thumbnail, twice that for 2 photos, one tile per frame of 8
    assert [row["tiles"] for row in rows[:: len(bench.PROCESSORS)]] == [3, 6, 8]
    assert json.loads((tmp_path / "processing.json").read_text())["pixels_agree"] is True


def test_training_memory_benchmark_quick_form_measures_both_towers():
    """bench.py --parts train-memory --quick: every table entry measured for both towers, in fp32 and bf16, and the
    step time beside its FLOPs ratio."""
    import sys

    sys.path.insert(0, str(REPO / "benchmarks"))
    import train_memory

    results = train_memory.train_memory_part(quick=True)
    train_memory.print_train_memory(results)
    for dtype in ("float32", "bfloat16"):
        assert all(value > 0 for value in results["layers"][dtype].values())
        for towers in results["towers"][dtype].values():
            assert set(towers) == {"internvl", "pvc"} and all(value > 0 for value in towers.values())
    # bf16 keeps half of fp32's bytes
    layers = results["layers"]
    assert abs(layers["bfloat16"]["pvc"] / layers["float32"]["pvc"] - 0.5) < 0.05
    assert all(peak > 0 for peaks in results["peaks_fp32"].values() for peak in peaks.values())
    step = results["step"]
    assert step["flops"]["pvc"] > step["flops"]["internvl"] > 0 and min(step["seconds"].values()) > 0
