"""The toy ablation's tables, written from the JSON reports into the READMEs (no number is typed by hand).

    python -m pvc.experiments.report            # rewrites the marked sections of README.md and experiments/README.md
    python -m pvc.experiments.report --print    # prints them instead

Reads experiments/results/: toy_convert.json (the convert protocol), toy_controls.json (its controls of the image
result, issue 32), toy_budget.json (video at an equal token budget, issue 32), toy_paired.json (from scratch, rows
paired) and toy_ablation.json (from scratch, the first report, rows not paired). A section is the text between
`<!-- report:NAME -->` and `<!-- /report:NAME -->`; a report that is missing leaves its sections as they are.
"""

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np

from .toy_ablation import diagnostics_table, row_parameter_budget, table, table_budget, table_convert
from .toy_task import ToyConfig

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
TARGETS = [ROOT / "README.md", ROOT / "experiments" / "README.md"]


def _cell(values: dict) -> str:
    return f"{values['mean']:.3f} +- {values['std']:.3f}"


def _runs(values: dict) -> str:
    return ", ".join(f"{run:.3f}" for run in values["runs"])


def table3(convert: dict) -> str:
    """Table 3 at toy scale: what the projector AdaLN is conditioned on (convert protocol)."""
    rows = {"none (the LayerNorm: row c)": "c", "TE' only (pvc-te)": "pvc-te", "x_hat + TE' (PVC)": "pvc"}
    frames = sorted(convert["rows"]["pvc"]["video"], key=int) if "pvc" in convert["rows"] else []
    lines = [
        "| projector AdaLN condition | image | image per seed | "
        + " | ".join(f"video, {f} frames" for f in frames)
        + " |",
        "|---|---|---|" + "---|" * len(frames),
    ]
    for label, row in rows.items():
        if row in convert["rows"]:
            values = convert["rows"][row]
            video = " | ".join(_cell(values["video"][f]) for f in frames)
            lines.append(f"| {label} | {_cell(values['image'])} | {_runs(values['image'])} | {video} |")
    return "\n".join(lines)


def paired_differences(convert: dict | None, scratch: dict | None) -> str:
    """PVC minus (c), seed by seed (the rows start from the same weights for all they share, see the protocol), on
    the image task, and per frame count on the video task of the convert protocol."""
    lines = ["| protocol | task | PVC - (c) per seed | mean | seeds where PVC >= (c) |", "|---|---|---|---|---|"]

    def add(protocol, task, pvc_runs, c_runs):
        differences = np.array(pvc_runs) - np.array(c_runs)
        wins = int((differences >= 0).sum())
        cells = ", ".join(f"{d:+.3f}" for d in differences)
        lines.append(f"| {protocol} | {task} | {cells} | {differences.mean():+.3f} | {wins} of {len(differences)} |")

    if convert and {"c", "pvc"} <= set(convert["rows"]):
        c, pvc = convert["rows"]["c"], convert["rows"]["pvc"]
        if c["seeds"] == pvc["seeds"]:
            add("convert", "image", pvc["image"]["runs"], c["image"]["runs"])
            for frames in sorted(pvc["video"], key=int):
                add("convert", f"video, {frames} frames", pvc["video"][frames]["runs"], c["video"][frames]["runs"])
    if scratch and {"c", "pvc"} <= set(scratch["rows"]):
        c, pvc = scratch["rows"]["c"]["runs"], scratch["rows"]["pvc"]["runs"]
        if len(c) == len(pvc):
            add("from scratch, paired", "image", pvc, c)
    return "\n".join(lines)


def figure3(convert: dict) -> str:
    """Image score at 1..4 repeats: rows trained at 4 repeats, and rows trained with the repeat drawn per batch."""
    sections = convert["repeats"]
    wanted = [row for row in ("b", "pvc", "b-drawn", "pvc-drawn") if row in sections]
    keys = sorted({key for row in wanted for key in sections[row]}, key=int)
    lines = [
        "| row (trained at) \\ repeats at test time | seeds | " + " | ".join(keys) + " |",
        "|---|---|" + "---|" * len(keys),
    ]
    for row in wanted:
        trained = "1..4, drawn per batch" if row.endswith("-drawn") else "4"
        seeds = ", ".join(str(seed) for seed in convert["rows"][row]["seeds"])
        cells = " | ".join(_cell(sections[row][key]) for key in keys)
        lines.append(f"| {row} ({trained}) | {seeds} | {cells} |")
    return "\n".join(lines)


def _millions(count: int) -> str:
    return f"{count / 1e6:.2f}M"


def parameters_cell(counts: dict) -> str:
    """A row's parameters and rates: all, those at the larger rate (what the converter initialised), the rest."""
    base, new = counts["base_rate"], counts["new_rate"]
    return (
        f"{_millions(counts['all'])}: {_millions(counts['new'])} at {new:g}, {_millions(counts['all'] - counts['new'])} "
        f"at {base:g} (projector {_millions(counts['projector'])}, {_millions(counts['projector_new'])} of it at {new:g})"
    )


def convert_parameters(convert: dict) -> str:
    """Parameters and learning rates of the convert protocol's rows, counted on each row as its runs start (the
    runs logged before runs recorded it are counted on a freshly converted row: the counts do not depend on the
    weights)."""
    toy = ToyConfig(**convert["config"]["toy"])
    lines = ["| row | parameters: all: at the larger rate, at the base rate (projector) |", "|---|---|"]
    for row in convert["rows"]:
        counts = convert["rows"][row].get("parameters") or row_parameter_budget(row, toy)
        lines.append(f"| {row} | {parameters_cell(counts)} |")
    return "\n".join(lines)


def controls(report: dict) -> str:
    """The controls of the image result (issue 32): each row's scores, parameters and rates, the projector AdaLN's
    gain and the visual tokens' size, and the differences seed by seed against the row each control changes."""
    rows = report["rows"]
    frames = sorted({f for values in rows.values() for f in values["video"]}, key=int)
    lines = [
        "| row | image (mean +- std) | image per seed | "
        + " | ".join(f"video, {f} frames" for f in frames)
        + " | parameters: all: at the larger rate, at the base rate (projector) |",
        "|---|---|---|" + "---|" * len(frames) + "---|",
    ]
    start = report.get("pretrained")
    if start:
        video = " | ".join(_cell(start["video"][f]) for f in frames)
        lines.append(f"| (a) before fine-tuning | {_cell(start['image'])} | {_runs(start['image'])} | {video} | - |")
    for row, values in rows.items():
        video = " | ".join(_cell(values["video"][f]) for f in frames)
        counts = values.get("parameters")
        cell = parameters_cell(counts) if counts else "-"
        lines.append(f"| {row} | {_cell(values['image'])} | {_runs(values['image'])} | {video} | {cell} |")
    lines += ["", "| control - the row it changes | image per seed | mean | seeds where the control >= the row |"]
    lines.append("|---|---|---|---|")
    for control, against in (("c-wide", "c"), ("c-wide", "pvc"), ("pvc-flat", "pvc"), ("pvc-flat", "c"), ("pvc", "c")):
        if {control, against} <= set(rows) and rows[control]["seeds"] == rows[against]["seeds"]:
            differences = np.array(rows[control]["image"]["runs"]) - np.array(rows[against]["image"]["runs"])
            cells = ", ".join(f"{d:+.3f}" for d in differences)
            wins = int((differences >= 0).sum())
            lines.append(
                f"| {control} - {against} | {cells} | {differences.mean():+.3f} | {wins} of {len(differences)} |"
            )
    return "\n".join(lines + diagnostics_table(report["diagnostics"]))


def run_time(names: dict) -> str:
    """Runs and time of each report, from its log of finished runs (a run's seconds include, for the first run of
    a seed in the convert protocol, training that seed's row (a)); wall time of the last invocation that wrote it."""
    lines = ["| report | runs | process-minutes (summed over runs) | wall minutes of the invocation that wrote it |"]
    lines.append("|---|---|---|---|")
    for label, name in names.items():
        log = RESULTS / f"{name}.runs.jsonl"
        if not log.exists():
            continue
        records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        seconds = sum(record["result"]["seconds"] for record in records)
        report = RESULTS / name
        wall = json.loads(report.read_text())["config"].get("seconds") or 0 if report.exists() else 0
        wall_cell = f"{wall / 60:.0f}" if wall else "- (collected afterwards)"
        lines.append(f"| {label} | {len(records)} | {seconds / 60:.0f} | {wall_cell} |")
    return "\n".join(lines)


def sections() -> dict:
    """Every section's Markdown, by name, from the reports that exist."""
    load = lambda name: json.loads((RESULTS / name).read_text()) if (RESULTS / name).exists() else None  # noqa: E731
    convert, paired, first = load("toy_convert.json"), load("toy_paired.json"), load("toy_ablation.json")
    controls_report, budget = load("toy_controls.json"), load("toy_budget.json")
    out = {}
    if convert:
        out["convert-table4"] = table_convert(dict(convert, repeats={}, diagnostics={}))
        out["convert-table3"] = table3(convert)
        out["convert-figure3"] = figure3(convert)
        out["convert-diagnostics"] = "\n".join(diagnostics_table(convert["diagnostics"])).strip()
        out["convert-parameters"] = convert_parameters(convert)
    if controls_report:
        out["controls"] = controls(controls_report)
    if budget:
        out["budget"] = table_budget(budget)
    if paired:
        out["scratch-paired"] = table(dict(paired, diagnostics={}))
        out["scratch-paired-diagnostics"] = "\n".join(diagnostics_table(paired["diagnostics"])).strip()
    if first:
        out["scratch-first"] = table(dict(first, diagnostics={}))
    out["paired-differences"] = paired_differences(convert, paired)
    out["run-time"] = run_time(
        {
            "convert protocol": "toy_convert.json",
            "controls of the image result (issue 32)": "toy_controls.json",
            "video at an equal token budget (issue 32)": "toy_budget.json",
            "from scratch, paired": "toy_paired.json",
            "from scratch, first report": "toy_ablation.json",
        }
    )
    return out


def rewrite(text: str, found: dict) -> str:
    for name, body in found.items():
        pattern = re.compile(
            rf"(<!-- report:{re.escape(name)} -->\n)(?:.*?\n)?(<!-- /report:{re.escape(name)} -->)", re.S
        )
        text = pattern.sub(lambda match, body=body: match.group(1) + body + "\n" + match.group(2), text)
    return text


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--print", action="store_true", help="print the sections instead of rewriting the READMEs")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    found = sections()
    if args.print:
        for name, body in found.items():
            print(f"<!-- report:{name} -->\n{body}\n")
        return
    for path in TARGETS:
        text = path.read_text()
        updated = rewrite(text, found)
        if updated != text:
            path.write_text(updated)
            print(f"rewrote {path}")


if __name__ == "__main__":
    main()
