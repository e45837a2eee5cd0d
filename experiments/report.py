"""The toy ablation's tables, written from the JSON reports into the READMEs (no number is typed by hand).

    python -m pvc.experiments.report            # rewrites the marked sections of README.md and experiments/README.md
    python -m pvc.experiments.report --print    # prints them instead

Reads experiments/results/: toy_convert.json (the convert protocol), toy_paired.json (from scratch, rows paired)
and toy_ablation.json (from scratch, the first report, rows not paired). A section is the text between
`<!-- report:NAME -->` and `<!-- /report:NAME -->`; a report that is missing leaves its sections as they are.
"""

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np

from .toy_ablation import diagnostics_table, table, table_convert

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
    out = {}
    if convert:
        out["convert-table4"] = table_convert(dict(convert, repeats={}, diagnostics={}))
        out["convert-table3"] = table3(convert)
        out["convert-figure3"] = figure3(convert)
        out["convert-diagnostics"] = "\n".join(diagnostics_table(convert["diagnostics"])).strip()
    if paired:
        out["scratch-paired"] = table(dict(paired, diagnostics={}))
        out["scratch-paired-diagnostics"] = "\n".join(diagnostics_table(paired["diagnostics"])).strip()
    if first:
        out["scratch-first"] = table(dict(first, diagnostics={}))
    out["paired-differences"] = paired_differences(convert, paired)
    out["run-time"] = run_time(
        {
            "convert protocol": "toy_convert.json",
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
