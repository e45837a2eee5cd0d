"""Figure-3-style plots of a toy_ablation report (matplotlib, the `plots` extra).

python -m pvc.experiments.plots experiments/results/toy_ablation.json
"""

import json
import sys
from pathlib import Path

LABELS = {"a": "(a) InternVL2, 16 tokens", "b": "(b) 4 tokens x repeats", "c": "(c) + progressive", "pvc": "PVC"}
STYLES = {"a": "k:", "b": "s--", "c": "^-.", "pvc": "o-"}
COLOURS = {"a": "black", "b": "tab:blue", "c": "tab:orange", "pvc": "tab:green"}  # the same row, the same colour


def plot_report(report: dict, folder: Path) -> list[Path]:
    """figure3.png: video accuracy against frames (left) and image accuracy against repeats (right), mean and
    standard deviation over seeds, as the paper's Figure 3; table4.png: the rows' image accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    figure.tight_layout()
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / "figure3.png", folder / "table4.png"]
    figure.savefig(paths[0], dpi=120)
    plt.close(figure)

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
    figure.tight_layout()
    figure.savefig(paths[1], dpi=120)
    plt.close(figure)
    return paths


if __name__ == "__main__":
    report_path = Path(sys.argv[1])
    for path in plot_report(json.loads(report_path.read_text()), report_path.parent):
        print(f"wrote {path}")
