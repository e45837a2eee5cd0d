"""The toy ablation runs end to end, and the committed demo model answers its task."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# A quick run's row sees the pictures if it beats the best score of any model that does not see them (the share of
# the commonest answer on the held-out samples, `blind_ceiling`) by at least this much (fixed from a pilot: working
# rows scored 0.73 where the commonest answer's share is near 0.3).
SEES_THE_PICTURES = 0.15


def image_blind_ceiling(report: dict) -> float:
    """The best image score of a model blind to the pixels, on the held-out samples of a quick report (seed 0)."""
    from pvc.experiments.toy_ablation import blind_ceiling
    from pvc.experiments.toy_task import ToyConfig, grid_image

    toy = ToyConfig(**report["config"]["toy"])
    assert toy.grid == 1, "the bound holds for one-character answers (the quick form's one-cell pictures)"
    return blind_ceiling(lambda rng: grid_image(toy, rng), toy.eval_samples, seed=0)


def test_quick_ablation_writes_the_report(tmp_path):
    from pvc.experiments.toy_ablation import main

    out = tmp_path / "report.json"
    main(["--quick", "--out", str(out), "--workers", "1"])
    report = json.loads(out.read_text())
    for row in ("a", "b", "c", "pvc"):
        values = report["rows"][row]
        assert len(values["runs"]) == 1 and 0 <= values["mean"] <= 1 and values["std"] >= 0
    for row in ("b", "pvc"):
        assert sorted(report["repeats"][row]) == ["1", "2", "3", "4"]
        assert all(0 <= report["repeats"][row][r]["mean"] <= 1 for r in report["repeats"][row])
        assert sorted(report["video"][row], key=int) == ["2", "4"]
    # by construction, row (b)'s repeated frames give identical compressed tokens; PVC has gates to report
    (b_diagnostics,) = report["diagnostics"]["b"]
    assert b_diagnostics["frame_token_cosine_mean_off_diagonal"] == pytest.approx(1.0, abs=1e-5)
    (pvc_diagnostics,) = report["diagnostics"]["pvc"]
    assert len(pvc_diagnostics["gate_mean_abs"]) == 2 and len(pvc_diagnostics["attention_to_earlier_frames"]) == 2
    assert report["config"]["toy"]["steps"] == 20
    # every row learned to read the pictures: a row that cannot see them (a broken projector, zeroed visual tokens)
    # scores at most the blind ceiling
    ceiling = image_blind_ceiling(report)
    for row in ("a", "b", "c", "pvc"):
        assert report["rows"][row]["mean"] >= ceiling + SEES_THE_PICTURES, (row, report["rows"][row], ceiling)
    # a second run with the same settings reuses the finished runs (resumable), and gives the same report
    main(["--quick", "--out", str(out), "--workers", "1", "--rows", "b"])
    assert json.loads(out.read_text())["rows"]["b"] == report["rows"]["b"]


def test_quick_convert_protocol_writes_the_report(tmp_path):
    """The user's path at quick size: row (a) trained and saved, converted with pvc-convert to every row, each
    fine-tuned with PVCTrainer on one data stream. A fresh (c) and PVC compute what the converted (b) computes (zero
    gates, identity AdaLN) and every row sees the same batches, so the first fine-tuning loss of (b), (c), PVC and
    the Table 3 variant is the same number."""
    from pvc.experiments.toy_ablation import CONVERT_ROWS, main

    out = tmp_path / "convert.json"
    main(["--quick", "--protocol", "convert", "--out", str(out), "--workers", "1"])
    report = json.loads(out.read_text())
    assert list(report["rows"]) == list(CONVERT_ROWS)
    for values in report["rows"].values():
        assert values["seeds"] == [0] and 0 <= values["image"]["mean"] <= 1
        assert sorted(values["video"], key=int) == ["2", "4"]
    assert sorted(report["repeats"]["pvc-drawn"]) == ["1", "2", "3", "4"] and "a" not in report["repeats"]
    assert 0 <= report["pretrained"]["image"]["mean"] <= 1
    ceiling = image_blind_ceiling(report)  # every row reads the pictures (see the scratch test)
    for row, values in report["rows"].items():
        assert values["image"]["mean"] >= ceiling + SEES_THE_PICTURES, (row, values["image"], ceiling)
    runs = [json.loads(line)["result"] for line in out.with_name(out.name + ".runs.jsonl").read_text().splitlines()]
    first = {run["row"]: run["losses"][0] for run in runs}
    for row in ("c", "pvc", "pvc-te", "c-wide", "pvc-flat"):
        assert first[row] == pytest.approx(first["b"], rel=1e-5), row
    # the controls: c-wide's projector matches PVC's in size (to 0.1%) and rate, pvc-flat's is PVC's own
    budget = {run["row"]: run["parameters"] for run in runs}
    assert budget["pvc-flat"] == budget["pvc"]
    assert abs(budget["c-wide"]["projector_new"] / budget["pvc"]["projector_new"] - 1) < 1e-3
    assert budget["c"]["projector_new"] == 0 and budget["c-wide"]["new_rate"] == budget["pvc"]["new_rate"]
    assert budget["a"]["new"] == 0  # row (a) is the source: nothing in it is new
    assert (tmp_path / "convert.json.work" / "seed0" / "a-pretrained" / "config.json").exists()
    # the READMEs' tables are written from this JSON: the numbers in them are the report's
    import pvc.experiments.report as writer

    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "toy_convert.json").write_text(out.read_text())
    (tmp_path / "results" / "toy_controls.json").write_text(out.read_text())
    writer.RESULTS = tmp_path / "results"
    tables = writer.sections()
    control = report["rows"]["c-wide"]["image"]["mean"] - report["rows"]["c"]["image"]["mean"]
    assert f"| c-wide - c | {control:+.3f} | {control:+.3f} | " in tables["controls"]
    assert f"| pvc | {writer.parameters_cell(budget['pvc'])} |" in tables["convert-parameters"]
    assert "5.51M of it at 0.002" in writer.parameters_cell(budget["pvc"])
    pvc_image, c_image = report["rows"]["pvc"]["image"]["mean"], report["rows"]["c"]["image"]["mean"]
    assert f"| convert | image | {pvc_image - c_image:+.3f} |" in tables["paired-differences"]
    assert f"| pvc | {pvc_image:.3f} +- 0.000 |" in tables["convert-table4"]
    readme = "x\n<!-- report:convert-table3 -->\nold\n<!-- /report:convert-table3 -->\ny"
    assert (
        writer.rewrite(readme, tables)
        == f"x\n<!-- report:convert-table3 -->\n{tables['convert-table3']}\n<!-- /report:convert-table3 -->\ny"
    )


def test_a_quick_run_tells_a_row_that_cannot_see_the_pictures_from_one_that_can(tmp_path, monkeypatch):
    """The quick runs' check of every row (above) is not passed blind: with its visual tokens zeroed, row (c) scores
    no more than the blind ceiling, where row (b), trained beside it in the same quick run, clears it."""
    import pvc.experiments.toy_ablation as toy_ablation

    build = toy_ablation.build_model

    def build_broken_c(row, *args, **kwargs):
        model = build(row, *args, **kwargs)
        if row == "c":  # the planted bug: the language model gets zeros where the visual tokens go
            model.model.multi_modal_projector.register_forward_hook(lambda module, inputs, output: output * 0)
        return model

    monkeypatch.setattr(toy_ablation, "build_model", build_broken_c)
    out = tmp_path / "broken.json"
    toy_ablation.main(
        ["--quick", "--task", "image", "--rows", "b,c", "--repeats", "4", "--out", str(out), "--workers", "1"]
    )
    report = json.loads(out.read_text())
    ceiling = image_blind_ceiling(report)
    assert report["rows"]["c"]["mean"] <= ceiling + 1e-9
    assert report["rows"]["b"]["mean"] >= ceiling + SEES_THE_PICTURES


def test_projector_condition_controls():
    """The experiment's projector forward computes the model's own with the model's own condition; pvc-flat's
    condition is the same for every frame of a clip, c-wide's is x_hat alone (its TE' removed)."""
    import copy

    from pvc.experiments.toy_ablation import build_model, projector_condition, set_projector_condition
    from pvc.experiments.toy_task import ToyConfig, tiny_tokenizer

    model = build_model("pvc", ToyConfig(), 0, tiny_tokenizer())
    projector = model.model.multi_modal_projector
    with torch.no_grad():  # a trained-looking AdaLN, so that the condition matters
        for param in projector.adaln.parameters():
            param.normal_(0, 0.05)
    features = torch.randn(2 * 4, 65, 64)  # 2 clips x 4 frames, CLS + 8 x 8 patches, width 64
    own = projector(features, 4)
    flat = set_projector_condition(copy.deepcopy(model), "frame-mean").model.multi_modal_projector
    wide = set_projector_condition(copy.deepcopy(model), "input").model.multi_modal_projector
    projector.toy_condition = None  # the model's own condition through the experiment's forward
    from pvc.experiments.toy_ablation import _controlled_projector_forward

    torch.testing.assert_close(_controlled_projector_forward(projector, features, 4), own)
    shuffled = projector.pixel_shuffle(features, 4)
    condition = projector_condition(flat, shuffled, 4)
    torch.testing.assert_close(condition, condition[:, :1].expand_as(condition))
    assert not torch.allclose(flat(features, 4), own)
    assert not hasattr(wide, "temporal_embedding")
    torch.testing.assert_close(projector_condition(wide, shuffled, 4), shuffled)


def test_blind_ceiling_is_the_commonest_answers_share_on_the_scored_samples():
    """Counted by hand on the draws `evaluate` makes (held_out_rng, in batches), for a task with a known answer."""
    from pvc.experiments.toy_ablation import blind_ceiling, held_out_rng

    answers = lambda rng: (None, "xy"[int(rng.integers(0, 2))] + "z")  # noqa: E731
    rng = held_out_rng(3)
    drawn = [answers(rng)[1] for _ in range(70)]
    share_x = sum(answer[0] == "x" for answer in drawn) / 70
    expected = (max(share_x, 1 - share_x) + 1.0) / 2  # the second character is always "z"
    assert blind_ceiling(answers, 70, seed=3, batch_size=64) == pytest.approx(expected)


def test_flash_video_is_a_still_scene_with_one_flash_per_frame():
    """The equal-budget task: the grey scene is the same in every frame (up to the pixel noise), one cell per frame
    holds a colour of the palette, and the answer lists those colours in frame order; a frame left out of `visible`
    has no flash, though its colour stays in the answer."""
    from pvc.experiments.toy_task import COLOUR_NAMES, GREYS, PALETTE, ToyConfig, flash_video

    toy = ToyConfig()
    side = toy.image_size // toy.grid
    frames, answer = flash_video(toy, 8, np.random.default_rng(0))
    assert frames.shape == (8, 32, 32, 3) and len(answer) == 8
    cells = frames.reshape(8, toy.grid, side, toy.grid, side, 3).astype(int).mean(axis=(2, 4))  # [T, g, g, 3]
    nearest = lambda colours: np.abs(cells[..., None, :] - colours).sum(-1).argmin(-1)  # noqa: E731
    coloured = np.abs(cells[..., None, :] - PALETTE).sum(-1).min(-1) < np.abs(cells[..., None, :] - GREYS).sum(-1).min(
        -1
    )
    assert (coloured.sum(axis=(1, 2)) == 1).all()  # one flash per frame
    assert "".join(COLOUR_NAMES[nearest(PALETTE)[t][coloured[t]][0]] for t in range(8)) == answer
    greys = nearest(GREYS)
    for t in range(1, 8):  # the scene is still: outside the flashes, every cell keeps its grey
        still = ~coloured[0] & ~coloured[t]
        assert (greys[t][still] == greys[0][still]).all()
    quadrants, _ = flash_video(toy, 8, np.random.default_rng(0), size=4)  # the protocol's flash: a quadrant
    means = quadrants.reshape(8, 2, 16, 2, 16, 3).astype(int).mean(axis=(2, 4))  # [T, 2, 2, 3]
    in_colour = np.abs(means[..., None, :] - PALETTE).sum(-1).min(-1) < 3 * toy.noise
    assert (in_colour.sum(axis=(1, 2)) == 1).all()  # one whole quadrant in one colour, per frame
    hidden, same_answer = flash_video(toy, 8, np.random.default_rng(0), visible=[1, 5])
    assert same_answer == answer
    shown = np.abs(hidden.astype(int) - frames.astype(int)).max(axis=(1, 2, 3)) > 2 * toy.noise
    assert shown.tolist() == [True, False, True, True, True, False, True, True]  # only the hidden flashes differ


def test_the_budget_rows_see_the_frames_the_video_processor_keeps_at_equal_tokens(tmp_path):
    """Row (a) at T/4 frames sees the frames PVCVideoProcessor keeps of a T-frame video (segment midpoints), and
    the rows of the equal-budget report get the same number of visual tokens, (a) at T frames 4x as many. A quick
    run: the converted (b), (c) and PVC compute the same first loss (as in the convert protocol)."""
    from pvc.experiments.toy_ablation import main
    from pvc.experiments.toy_task import BudgetConfig
    from pvc.video_decoding_pvc import sample_indices

    budget = BudgetConfig()
    assert budget.kept() == list(sample_indices(budget.frames, budget.kept_frames, None, None, None))
    out = tmp_path / "budget.json"
    main(["--quick", "--protocol", "budget", "--rows", "a-kept,b,pvc", "--out", str(out), "--workers", "1"])
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert [rows[row]["visual_tokens"] for row in ("a-kept", "b", "pvc")] == [32, 32, 32]
    assert rows["a-kept"]["frames_seen"] == budget.kept_frames and rows["pvc"]["frames_seen"] == budget.frames
    assert len(rows["pvc"]["by_frame"]) == budget.frames == len(rows["a-kept"]["by_frame"])
    assert "flashes_only_in_kept_frames" in rows["pvc"] and "flashes_only_in_kept_frames" not in rows["a-kept"]
    runs = [json.loads(line)["result"] for line in out.with_name(out.name + ".runs.jsonl").read_text().splitlines()]
    first = {run["row"]: run["losses"][0] for run in runs}
    assert first["pvc"] == pytest.approx(first["b"], rel=1e-5)
    assert report["uniform_plateau"] == pytest.approx(8 * np.log(4) / 9)
    from pvc.experiments.toy_ablation import table_budget

    score = rows["pvc"]["score"]["mean"]
    assert f"| pvc | 8 x 4 = 32 | {score:.3f} +- 0.000 |" in table_budget(report)


def test_z_order_reads_blocks_whole():
    """Consecutive groups of 4 cells are 2x2 blocks, groups of 16 are 4x4 blocks (what a token of each row holds)."""
    from pvc.experiments.toy_task import z_order

    cells = z_order(8)
    assert sorted(cells) == [(r, c) for r in range(8) for c in range(8)]
    for size in (2, 4):
        for start in range(0, 64, size * size):
            block = cells[start : start + size * size]
            assert {(r // size, c // size) for r, c in block} == {(block[0][0] // size, block[0][1] // size)}


def test_demo_model_code_files_are_links_to_the_root_files():
    """The demo checkpoint runs the repository's own code: its code files are links to the root files, not copies
    that could drift from them."""
    from pvc.conversion.options import CODE_FILES

    for name in CODE_FILES:
        path = ROOT / "demo_model" / name
        assert path.is_symlink(), f"demo_model/{name} is a copy; make it a link: ln -sf ../{name} demo_model/{name}"
        assert path.resolve() == (ROOT / name).resolve(), f"demo_model/{name} links elsewhere: {path.resolve()}"


@pytest.fixture(scope="module")
def demo_model():
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = ROOT / "demo_model"
    model = AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=True, dtype=torch.float32)
    return model.eval(), AutoProcessor.from_pretrained(path, trust_remote_code=True)


def test_demo_model_answers_well_above_chance_and_random_weights_do_not(demo_model):
    from pvc.demo import toy_scores

    model, processor = demo_model
    # Guessing a colour gets 1 cell in 4 right; the trained model must clear 0.3 on both tasks, where the same
    # architecture untrained must not.
    trained = toy_scores(model, processor, samples=32, seed=123)
    assert np.mean(trained["image"]) > 0.3 and np.mean(trained["video"]) > 0.3
    torch.manual_seed(0)
    random = type(model)(model.config).eval()  # the same architecture, untrained
    untrained = toy_scores(random, processor, samples=8, seed=123)
    assert np.mean(untrained["image"] + untrained["video"]) < 0.3


def test_plain_generate_on_the_demo_model_stops_at_the_end_of_the_turn(demo_model):
    """Without the demo's own decoding: `generate` with the checkpoint's generation config ends each answer with
    <|im_end|> (the chat template's end of turn) and adds nothing after it."""
    from pvc.experiments.toy_task import IMAGE_QUESTION, ToyConfig, grid_image

    model, processor = demo_model
    rng = np.random.default_rng(5)
    conversations = [
        [
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": grid_image(ToyConfig(), rng)[0]},
                    {"type": "text", "text": IMAGE_QUESTION},
                ],
            }
        ]
        for _ in range(2)
    ]
    inputs = processor.apply_chat_template(
        conversations, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=120, do_sample=False)
    end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    for answer in output[:, inputs["input_ids"].shape[1] :].tolist():
        assert end in answer, "generate ran past the end of the turn"
        stop = answer.index(end)
        assert stop < 120 - 1 and set(answer[stop + 1 :]) <= {processor.tokenizer.pad_token_id}, answer


def test_demo_command_prints_accuracy_last(demo_model, capsys):
    from pvc.demo import main

    main(["--eval", "8", "--seed", "3"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    found = re.fullmatch(r"accuracy (\d\.\d+) on 8 samples", last)
    assert found and 0 <= float(found.group(1)) <= 1
    main(["--seed", "4"])
    out = capsys.readouterr().out
    assert "question: 'Colours of the cells?'" in out and "cells right" in out


def test_setup_says_what_it_does_once_and_then_reuses_the_environment(tmp_path):
    """scripts/setup_env.sh (what scripts/demo.sh runs first) says that it is installing, and a second run with the
    same spec calls no pip at all; another spec sets the environment up again."""
    import subprocess

    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    log = tmp_path / "calls.log"
    fake = venv / "bin" / "python"  # stands in for the environment's python: records each call
    fake.write_text(f'#!/bin/sh\necho "$@" >> {log}\n')
    fake.chmod(0o755)

    def setup(spec):
        command = ["bash", str(ROOT / "scripts" / "setup_env.sh"), str(venv), spec]
        return subprocess.run(command, capture_output=True, text=True, timeout=60)

    first = setup("transformers>=5.0,<6")
    assert first.returncode == 0 and "Setting up" in first.stderr and "-m pip install" in log.read_text()
    calls = log.read_text()
    again = setup("transformers>=5.0,<6")
    assert again.returncode == 0 and again.stderr == "" and log.read_text() == calls
    other = setup("transformers==5.0.0")
    assert other.returncode == 0 and "Setting up" in other.stderr and log.read_text() != calls
