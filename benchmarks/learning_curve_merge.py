"""Merge learning-curve runs written by separate invocations into one table, findings and plot.

    python benchmarks/learning_curve_merge.py --name learning_curve_large PART_runs.json [PART_runs.json ...]

The largest curves do not fit one process on a 2-core machine: each dataset (and sizes 30-60 apart from
120-500) runs as its own ``learning_curve.py --datasets ... --sizes ... --name PART`` on one core. The
datasets are a pure function of their seed and settings, so every part scores the same test nodes; this
script refuses parts whose size-rule AUROC on the same dataset differs (different data) or whose settings
other than sizes and datasets differ. It reads only the parts' ``*_runs.json`` (AUROC rounded there to 0.1 %).
"""
from __future__ import annotations

import argparse
import ast
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS_DIR, write_results  # noqa: E402
from learning_curve import SIZE_RULE, findings, plot, run_row, summary_rows  # noqa: E402

PER_PART = ("sizes", "datasets", "name", "workdir")      # the settings a part may choose for itself


def rows_of(part: dict) -> list[dict]:
    """The part's run rows back in learning_curve.py's internal form."""
    return [{"dataset": r["dataset"], "method": r["method"], "size": r["size"] or None, "seed": r["seed"],
             "n_train_nodes": r["train nodes"], "n_train_positive": r["train pos"], "epochs": r["epochs"] or None,
             "auroc": r["AUROC %"] / 100, "auroc_ci95": (r["CI low"] / 100, r["CI high"] / 100),
             "n_nodes": r["test nodes"], "n_positive": r["test pos"], "train_s": r["train s"]} for r in part["rows"]]


def settings_of(summary: dict) -> dict:
    """The part's arguments (from its summary's notes) less those each part chooses."""
    note = next(n for n in summary["notes"] if n.startswith("arguments: "))
    args = ast.literal_eval(note[len("arguments: "):])
    return {k: v for k, v in args.items() if k not in PER_PART}


def merge(parts: list[tuple[dict, dict]]) -> tuple[list[dict], dict]:
    """(runs, summary) per part -> all run rows (one size-rule row per dataset) and the common settings."""
    settings = settings_of(parts[0][1])
    rows, rule = [], {}
    for runs, summary in parts:
        if settings_of(summary) != settings:
            raise SystemExit(f"{summary['benchmark']}: settings {settings_of(summary)} differ from {settings}")
        for r in rows_of(runs):
            if r["method"] == SIZE_RULE:
                if r["dataset"] in rule:
                    if abs(rule[r["dataset"]] - r["auroc"]) > 1e-9:
                        raise SystemExit(f"{summary['benchmark']}: the size rule on {r['dataset']} scores "
                                         f"{r['auroc']:.3f}, another part {rule[r['dataset']]:.3f}: not the same data")
                    continue
                rule[r["dataset"]] = r["auroc"]
            rows.append(r)
    rows.sort(key=lambda r: (r["dataset"], r["method"] != SIZE_RULE, r["size"] or 0, r["seed"]))
    return rows, settings


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("parts", nargs="+", type=Path, help="the parts' <name>_runs.json")
    ap.add_argument("--name", required=True)
    args = ap.parse_args()
    parts = []
    for path in args.parts:
        summary_path = path.with_name(path.name.replace("_runs.json", ".json"))
        parts.append((json.loads(path.read_text()), json.loads(summary_path.read_text())))
    rows, settings = merge(parts)
    sizes = sorted({r["size"] for r in rows if r["size"]})
    header = parts[0][1]["machine"]
    notes = [f"merged from {', '.join(p[1]['benchmark'] for p in parts)} (each one learning_curve.py process on one "
             f"core; machine header of the first); common settings: {settings}",
             f"wall time of the parts: {', '.join(n for p in parts for n in p[1]['notes'] if n.startswith('wall'))}",
             *[n for n in parts[0][1]["notes"] if n.startswith(("cells:", "networks:"))],
             *findings(rows)]
    write_results(args.name, header, summary_rows(rows, sizes), notes)
    write_results(args.name + "_runs", header, [run_row(r) for r in rows],
                  ["AUROC CI: patient-bootstrap (percentile, 95 %) on the held-out test cases"])
    plot(rows, RESULTS_DIR / f"{args.name}.png")
    print(f"written: {RESULTS_DIR / f'{args.name}.png'}")


if __name__ == "__main__":
    main()
