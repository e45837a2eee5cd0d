"""The lmms-eval presets and entry point, without lmms-eval (scripts/lmms_eval_check.py runs lmms-eval itself)."""

import re
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from pvc.evaluation.presets import PRESETS, get_preset, mvbench_prompt

ROOT = Path(__file__).resolve().parents[1]


def test_mvbench_prompt_is_the_official_one():
    """As InternVL2's and PVC's evaluate_mvbench.py writes it: instruction (ending in a newline), a newline, the
    question and options with the trailing newline stripped, then the question prompt."""
    doc = {"question": "What did the person do?", "candidates": ["Sat down.", "Stood up.", "Left."], "answer": "Left."}
    expected = (
        "Carefully watch the video and pay attention to the cause and sequence of events, the detail and movement "
        "of objects, and the action and pose of persons. Based on your observations, select the best option that "
        "accurately addresses the question.\n"
        "\n"
        "Question: What did the person do?\n"
        "Options:\n"
        "(A) Sat down.\n"
        "(B) Stood up.\n"
        "(C) Left."
        "\nOnly give the best option."
    )
    assert mvbench_prompt(doc) == expected


def test_mvbench_prompt_names_what_a_record_lacks():
    with pytest.raises(ValueError, match="no candidates .*they have answers, question"):
        mvbench_prompt({"question": "Q?", "answers": ["x"]})


def test_the_papers_settings():
    """The settings the issue and PVC's released evaluation code give."""
    assert PRESETS["mvbench"].settings == {"num_frames": 96, "video_max_tiles": 1, "num_beams": 5}
    assert PRESETS["mvbench"].prompt is mvbench_prompt
    tiles = {name: PRESETS[name].settings["max_tiles"] for name in ("chartqa", "docvqa", "infovqa", "image")}
    assert tiles == {"chartqa": 12, "docvqa": 18, "infovqa": 24, "image": 6}
    assert all(PRESETS[name].settings["num_beams"] == 1 for name in tiles)


def test_an_unknown_preset_is_named():
    with pytest.raises(ValueError, match="Unknown preset 'mvbnch'; the presets are mvbench, chartqa"):
        get_preset("mvbnch")
    assert get_preset(None) is None


def test_the_readme_table_matches_the_presets():
    """Each preset's row in the README's benchmark table names its benchmark, tasks and settings as the code has
    them."""
    text = (ROOT / "README.md").read_text()
    for name, preset in PRESETS.items():
        rows = [line for line in text.splitlines() if line.startswith("|") and f"| `{name}` |" in line]
        assert len(rows) == 1, name
        cells = [cell.strip() for cell in rows[0].strip("|").split("|")]
        assert cells[0] == preset.benchmark, (name, cells[0])
        assert cells[3] == preset.describe(), (name, cells[3])
        assert set(re.findall(r"`([^`]+)`", cells[1])) == set(preset.tasks), name
        assert f"preset={name}" in cells[4]


def test_lmms_eval_finds_the_model_through_the_entry_point():
    (entry,) = [entry for entry in entry_points(group="lmms_eval.models") if entry.name == "pvc"]
    assert entry.value == "pvc.evaluation:lmms_eval_models"
    import pvc.evaluation

    assert callable(entry.load()) and entry.load() is pvc.evaluation.lmms_eval_models
