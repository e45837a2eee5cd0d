"""The paper's evaluation settings where they differ from the defaults, one preset per benchmark.

A preset is chosen by name (`--model_args pretrained=PATH,preset=mvbench`); options given beside it
(`num_frames=...`, ...) win over it. The settings are those of PVC's released evaluation code (InternVL2's): MVBench
reads 96 frames of one tile each and asks in the official prompt with 5 beams; the image benchmarks tile each image
into at most 12 (ChartQA), 18 (DocVQA), 24 (InfoVQA) or 6 (the others) tiles and decode greedily (InternVL2's
evaluation turns beam search off with dynamic tiling). What a preset leaves unset is the task's own (lmms-eval's
prompt, `max_new_tokens`) or the checkpoint's (`num_frames`, `max_tiles` of its processor).

Nothing here imports lmms-eval.
"""

import string
from collections.abc import Callable
from dataclasses import dataclass, field

# The official MVBench instruction (InternVL2's and PVC's `evaluate_mvbench.py`), between the frames and the question
MVBENCH_INSTRUCTION = (
    "Carefully watch the video and pay attention to the cause and sequence of events, the detail and movement of "
    "objects, and the action and pose of persons. Based on your observations, select the best option that accurately "
    "addresses the question.\n"
)
MVBENCH_QUESTION_SUFFIX = "\nOnly give the best option."


def mvbench_prompt(doc: dict) -> str:
    """The text after the video in the official MVBench evaluation, from an MVBench record (`question`,
    `candidates`): the instruction, a blank line, `Question: ...`, `Options:` and `(A) ...` lines, then
    "Only give the best option."."""
    missing = [key for key in ("question", "candidates") if key not in doc]
    if missing:
        raise ValueError(
            f"The mvbench preset builds MVBench's official prompt from a record's question and candidates; this "
            f"task's records have no {', '.join(missing)} (they have {', '.join(sorted(doc)) or 'no fields'}). Use the "
            "preset with MVBench tasks only."
        )
    options = "".join(f"({string.ascii_uppercase[i]}) {option}\n" for i, option in enumerate(doc["candidates"]))
    question = f"Question: {doc['question']}\nOptions:\n{options}".rstrip()
    return MVBENCH_INSTRUCTION + "\n" + question + MVBENCH_QUESTION_SUFFIX


@dataclass(frozen=True)
class Preset:
    benchmark: str  # as the paper names it
    tasks: tuple[str, ...]  # lmms-eval's task (or group) names
    settings: dict = field(default_factory=dict)  # model options: num_frames, video_max_tiles, max_tiles, num_beams
    prompt: Callable[[dict], str] | None = None  # the user text from a task record, in place of the task's

    def describe(self) -> str:
        parts = [f"{key}={value}" for key, value in self.settings.items()]
        return ", ".join(parts + (["the official prompt"] if self.prompt else []))


IMAGE_TASKS = ("ai2d", "scienceqa_img", "textvqa_val", "mmbench_en_test", "mme", "mmmu_val", "seedbench", "ocrbench")
PRESETS = {
    "mvbench": Preset(
        "MVBench",
        ("mvbench",),
        dict(num_frames=96, video_max_tiles=1, num_beams=5),
        mvbench_prompt,
    ),
    "chartqa": Preset("ChartQA", ("chartqa",), dict(max_tiles=12, num_beams=1)),
    "docvqa": Preset("DocVQA", ("docvqa_test", "docvqa_val"), dict(max_tiles=18, num_beams=1)),
    "infovqa": Preset("InfoVQA", ("infovqa_test", "infovqa_val"), dict(max_tiles=24, num_beams=1)),
    "image": Preset(
        "AI2D, ScienceQA, TextVQA, MMBench, MME, MMMU, SEED, OCRBench", IMAGE_TASKS, dict(max_tiles=6, num_beams=1)
    ),
}


def get_preset(name: str | None) -> Preset | None:
    if name is None:
        return None
    if name not in PRESETS:
        raise ValueError(f"Unknown preset {name!r}; the presets are {', '.join(PRESETS)} (see pvc.evaluation.presets).")
    return PRESETS[name]
