"""Figure-3-style plots of a toy_ablation report (matplotlib, the `plots` extra).

python -m pvc.experiments.plots experiments/results/toy_ablation.json   # or toy_convert.json, toy_budget.json
"""

import json
import sys
from pathlib import Path

LABELS = {"a": "(a) InternVL2, 16 tokens", "b": "(b) 4 tokens x repeats", "c": "(c) + progressive", "pvc": "PVC"}
STYLES = {"a": "k:", "b": "s--", "c": "^-.", "pvc": "o-"}
COLOURS = {"a": "black", "b": "tab:blue", "c": "tab:orange", "pvc": "tab:green"}  # the same row, the same colour


def pyplot():
    """matplotlib's pyplot on the Agg backend (files only, no display), imported when a plot is made."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def saved(figure, path: Path) -> Path:
    """`figure` laid out, written to `path` (its folder made) and closed."""
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    pyplot().close(figure)
    return path


def plot_report(report: dict, folder: Path) -> list[Path]:
    """figure3.png: video accuracy against frames (left) and image accuracy against repeats (right), mean and
    standard deviation over seeds, as the paper's Figure 3; table4.png: the rows' image accuracy."""
    plt = pyplot()
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for axis, section, xlabel, title in (
        (left, "video", "frames per video", "Video: last frame's grid"),
        (right, "repeats", "image repeats at test time (trained at 4)", "Image: the grid"),
    ):
        for row, values in report[section].items():
            xs = sorted(values, key=int)
            axis.errorbar(
                [int(x) for x in xs],
                [values[x]["mean"] for x in xs],
                yerr=[values[x]["std"] for x in xs],
                fmt=STYLES[row],
                color=COLOURS[row],
                capsize=3,
                label=LABELS[row],
            )
        if section == "repeats" and "a" in report["rows"]:
            axis.axhline(report["rows"]["a"]["mean"], color="k", linestyle=":", label=LABELS["a"])
        axis.axhline(0.25, color="grey", linewidth=0.8, label="chance")
        axis.set_xticks(sorted({int(x) for values in report[section].values() for x in values}))
        axis.set_xlabel(xlabel)
        axis.set_ylabel("share of cells right")
        axis.set_title(title)
        axis.set_ylim(0, 1.02)
        axis.legend(fontsize=8)
    paths = [saved(figure, folder / "figure3.png")]

    figure, axis = plt.subplots(figsize=(5, 3.5))
    rows = list(report["rows"])
    axis.bar(
        [LABELS[row].replace(", ", "\n").replace(" x ", "\nx ").replace(" + ", "\n+ ") for row in rows],
        [report["rows"][row]["mean"] for row in rows],
        yerr=[report["rows"][row]["std"] for row in rows],
        capsize=4,
        color=[COLOURS[row] for row in rows],
    )
    axis.axhline(0.25, color="grey", linewidth=0.8)
    axis.set_ylabel("image task: share of cells right")
    axis.set_ylim(0, 1.02)
    axis.tick_params(axis="x", labelsize=7)
    return [*paths, saved(figure, folder / "table4.png")]


CONVERT_STYLES = {
    "b": ("s--", "tab:blue"),
    "pvc": ("o-", "tab:green"),
    "b-drawn": ("s:", "tab:cyan"),
    "pvc-drawn": ("o:", "tab:olive"),
}


def plot_convert(report: dict, folder: Path) -> list[Path]:
    """convert_figure3.png, the convert protocol: image score against repeats at test time for (b) and PVC trained at
    4 repeats and trained with the repeat drawn per batch (left), and each row's image and video scores (right)."""
    plt = pyplot()
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for row, (style, colour) in CONVERT_STYLES.items():
        values = report["repeats"].get(row)
        if not values:
            continue
        xs = sorted(values, key=int)
        trained = "repeat drawn per batch" if row.endswith("-drawn") else "trained at 4"
        left.errorbar(
            [int(x) for x in xs],
            [values[x]["mean"] for x in xs],
            yerr=[values[x]["std"] for x in xs],
            fmt=style,
            color=colour,
            capsize=3,
            label=f"{row.removesuffix('-drawn')} ({trained})",
        )
    left.set_xticks(sorted({int(x) for values in report["repeats"].values() for x in values}))
    left.set_xlabel("image repeats at test time")
    left.set_title("Convert protocol: image score by repeats")
    rows = [row for row in ("a", "b", "c", "pvc", "pvc-te") if row in report["rows"]]
    tasks = ["image"] + [f"video {f}" for f in sorted(report["rows"][rows[0]]["video"], key=int)] if rows else []
    width = 0.8 / max(1, len(tasks))
    for index, task in enumerate(tasks):
        values = [
            report["rows"][row]["image"] if task == "image" else report["rows"][row]["video"][task.split()[1]]
            for row in rows
        ]
        positions = [r + (index - (len(tasks) - 1) / 2) * width for r in range(len(rows))]
        right.bar(positions, [v["mean"] for v in values], width, yerr=[v["std"] for v in values], capsize=2, label=task)
    right.set_xticks(range(len(rows)), rows)
    right.set_title("Convert protocol: Table 4 (+ pvc-te)")
    for axis in (left, right):
        axis.axhline(0.25, color="grey", linewidth=0.8)
        axis.set_ylabel("share of cells right")
        axis.set_ylim(0, 1.02)
        axis.legend(fontsize=7)
    return [saved(figure, folder / "convert_figure3.png")]


BUDGET_STYLES = {row: (STYLES[row].lstrip("k"), COLOURS[row]) for row in STYLES} | {"a-kept": ("x--", "grey")}


def plot_budget(report: dict, folder: Path) -> list[Path]:
    """budget_flashes.png, video at an equal token budget: each row's fine-tuning loss against the step, mean over
    seeds, with the uniform plateau (left), and its share of flashes right per frame (right)."""
    plt = pyplot()
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    every = report["budget"]["log_every"]
    for row, values in report["rows"].items():
        style, colour = BUDGET_STYLES.get(row, ("-", None))
        tokens = values["visual_tokens"] // values["frames_seen"]
        label = f"{row}: {values['frames_seen']} frames x {tokens} tokens"
        curve = values["losses"]
        left.plot([every * (step + 1) for step in range(len(curve))], curve, style, color=colour, label=label)
        frames = range(1, len(values["by_frame"]) + 1)
        right.plot(frames, values["by_frame"], style, color=colour, label=label)
    left.axhline(report["uniform_plateau"], color="grey", linewidth=0.8, label="uniform plateau")
    left.set_xlabel("fine-tuning step")
    left.set_ylabel("loss (mean over seeds)")
    left.set_yscale("log")
    left.set_title("Flashes: fine-tuning loss")
    right.axhline(0.25, color="grey", linewidth=0.8, label="chance")
    right.set_xlabel("frame")
    right.set_ylabel("share of flashes right (mean over seeds)")
    right.set_ylim(0, 1.02)
    right.set_title("Flashes: share right per frame")
    for axis in (left, right):
        axis.legend(fontsize=7)
    return [saved(figure, folder / "budget_flashes.png")]


PLOTS = {"convert": plot_convert, "budget": plot_budget}

if __name__ == "__main__":
    report_path = Path(sys.argv[1])
    report = json.loads(report_path.read_text())
    plot = PLOTS.get(report.get("protocol"), plot_report)
    for path in plot(report, report_path.parent):
        print(f"wrote {path}")
