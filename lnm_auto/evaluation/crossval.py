"""Cross-validation results of trained models and the choice of the model (or ensemble) to use.

``accumulate_crossval_results``: the out-of-fold predictions of a model folder's folds, pooled (every training
case is predicted once, by the fold that did not train on it). ``find_best_configuration``: scores every model
whose folds are all complete and every ensemble of 2-3 of them (mean probability), at node, station and patient
level with patient-bootstrap 95% CIs, beside the size rule (short axis) on the same nodes, and picks the best.

Selection rule (documentation/model_selection.md): highest node-level CV AUROC (patient level when the dataset
has no node labels); candidates within ``TIE_TOLERANCE`` of the best count as tied and the simplest wins (fewest
members, then the cheapest: radiomics < 3d_resenc < 2d25 < others, then the name). Choosing the best of many
candidates on the same folds is optimistic: the chosen model's CV AUROC overstates what it will do on new
data, so the held-out test set (lnm_predict + lnm_evaluate) is the number to report.
"""
from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pandas as pd

from lnm_auto.evaluation.rollup import rollup
from lnm_auto.evaluation.metrics import auroc
from lnm_auto.evaluation.statistics import bootstrap_ci
from lnm_auto.utils.errors import LNMError
from lnm_auto.utils.io import atomic_path, atomic_write_text, load_json, save_csv_atomic, save_json
from lnm_auto.utils.plotting import pyplot
from lnm_auto.utils.tables import node_ids, read_csv_text

PREDICTIONS_FILE = "validation/predictions.csv"
TIE_TOLERANCE = 0.005
SIMPLICITY = {"radiomics": 0, "3d_resenc": 1, "2d25": 2}
LEVELS = ("node", "station", "patient")
INSTRUCTIONS_FILE = "inference_instructions.json"


def model_folders(dataset_results: Path) -> list[Path]:
    """Every ``<Trainer>__<Plans>__<configuration>`` folder of a dataset's results."""
    return sorted(p for p in Path(dataset_results).glob("*__*__*") if p.is_dir())


def accumulate_crossval_results(model_folder: Path, n_folds: int) -> pd.DataFrame | None:
    """Out-of-fold predictions of folds 0..n_folds-1 (case, node, station, label, station_label, patient_label,
    probability), written to ``crossval_results/nodes.csv``; None when a fold has none yet."""
    parts = []
    for k in range(n_folds):
        path = Path(model_folder) / f"fold_{k}" / PREDICTIONS_FILE
        if not path.is_file():
            return None
        df = read_csv_text(path, "validation predictions", ("case", "node", "probability"))
        parts.append(df.assign(node=node_ids(df["node"], path), fold=k))
    pooled = pd.concat(parts, ignore_index=True)
    for c in ("label", "station_label", "patient_label"):
        pooled[c] = pd.to_numeric(pooled[c]).astype(int)
    pooled["probability"] = pd.to_numeric(pooled["probability"])
    if pooled.duplicated(["case", "node"]).any():
        raise LNMError(f"{model_folder}: a node is predicted by two folds; the folds' validation sets overlap "
                       "(were the splits changed after training?)")
    save_csv_atomic(pooled, Path(model_folder) / "crossval_results" / "nodes.csv")
    return pooled


def level_units(nodes: pd.DataFrame, level: str) -> pd.DataFrame:
    """Labelled units of a level with their probability (max roll-up) and their patient (bootstrap group)."""
    if level == "node":
        units = nodes[nodes["label"] >= 0][["case", "probability", "label"]]
    else:
        column = f"{level}_label"
        units = rollup(nodes[["case", "station", "probability"]], level)
        keys = ["case", "station"] if level == "station" else ["case"]
        labels = nodes.groupby(keys)[column].first().reset_index()
        units = units.merge(labels, on=keys).rename(columns={column: "label"})
        units = units[units["label"] >= 0]
    return units.reset_index(drop=True)


def score(nodes: pd.DataFrame, n_bootstrap: int = 1000, seed: int = 0) -> dict:
    """{level: {"n", "n_positive", "auroc", "ci95"}} of one set of node predictions (levels with both classes)."""
    out = {}
    for level in LEVELS:
        units = level_units(nodes, level)
        y, p = units["label"].to_numpy(int), units["probability"].to_numpy(float)
        if len(y) and 0 < y.sum() < len(y):
            ci = bootstrap_ci(y, p, units["case"].to_numpy(), n_bootstrap, seed)["ci"]["auroc"] if n_bootstrap else \
                (float("nan"), float("nan"))
            out[level] = {"n": int(len(y)), "n_positive": int(y.sum()), "auroc": auroc(y, p), "ci95": list(ci)}
    return out


def _selection_level(scores: dict) -> str:
    for level in ("node", "patient", "station"):
        if level in scores:
            return level
    raise LNMError("no labelled unit of both classes in the cross-validation predictions: nothing to select by")


def _complexity(members: tuple[str, ...]) -> tuple:
    configs = [m.split("__")[2] for m in members]
    return (len(members), sum(SIMPLICITY.get(c, 3) for c in configs), members)


def find_best_configuration(dataset_results: Path, n_folds: int = 5, max_members: int = 3,
                            n_bootstrap: int = 1000, size_rule: pd.DataFrame | None = None) -> dict:
    """Score every complete model and ensemble; write ``inference_instructions.json`` and the CV table."""
    dataset_results = Path(dataset_results)
    pooled, skipped = {}, []
    for folder in model_folders(dataset_results):
        nodes = accumulate_crossval_results(folder, n_folds)
        if nodes is None:
            skipped.append(folder.name)
        else:
            pooled[folder.name] = nodes
    if not pooled:
        raise LNMError(f"{dataset_results}: no model has all {n_folds} folds trained with validation predictions; "
                       f"train every fold (lnm_train DATASET CONFIG 0..{n_folds - 1})"
                       + (f" (incomplete: {', '.join(skipped)})" if skipped else ""))
    key = ["case", "node"]
    reference = next(iter(pooled.values()))
    candidates = {}
    for r in range(1, min(max_members, len(pooled)) + 1):
        for members in itertools.combinations(sorted(pooled), r):
            probs = [pooled[m].set_index(key)["probability"] for m in members]
            common = probs[0].index
            for p in probs[1:]:
                common = common.intersection(p.index)
            mean = sum(p.loc[common] for p in probs) / len(probs)
            nodes = reference.set_index(key).loc[common].drop(columns="probability").assign(probability=mean)
            candidates[members] = score(nodes.reset_index(), n_bootstrap)
    level = _selection_level(next(iter(candidates.values())))
    best_auroc = max(s[level]["auroc"] for s in candidates.values() if level in s)
    tied = [m for m, s in candidates.items() if level in s and s[level]["auroc"] >= best_auroc - TIE_TOLERANCE]
    chosen = min(tied, key=_complexity)
    rows = [{"candidate": " + ".join(m), "members": list(m), **{f"{lv}": s.get(lv) for lv in LEVELS}}
            for m, s in sorted(candidates.items(), key=lambda kv: -kv[1].get(level, {}).get("auroc", -1))]
    if size_rule is not None:
        merged = reference.merge(size_rule, on=key)
        rows.append({"candidate": "size rule (short axis)", "members": [],
                     **score(merged.assign(probability=_rank01(merged["short_axis_mm"])), n_bootstrap)})
    instructions = {
        "selected_by": f"{level}-level cross-validation AUROC (ties within {TIE_TOLERANCE}: the simplest)",
        "chosen": [{"model_folder": m, "trainer": m.split("__")[0], "plans": m.split("__")[1],
                    "configuration": m.split("__")[2]} for m in chosen],
        "folds": [str(k) for k in range(n_folds)],
        "ensemble": "mean of the members' fold-ensemble probabilities",
        "cv": candidates[chosen],
        "optimism": "the chosen candidate's CV AUROC is the best of several tried on the same folds, so it is "
                    "optimistic; report the held-out test set",
        "incomplete_models": skipped,
    }
    save_json(instructions, dataset_results / INSTRUCTIONS_FILE)
    write_table(rows, dataset_results / "crossval_table.md", chosen)
    plot_table(rows, dataset_results / "crossval_table.png", chosen, level)
    return {"instructions": instructions, "rows": rows, "chosen": chosen}


def _rank01(values: pd.Series) -> np.ndarray:
    """Scores mapped monotonically into [0, 1] (AUROC only needs the order; the roll-up needs [0, 1])."""
    v = values.to_numpy(dtype=float)
    return (v - v.min()) / (v.max() - v.min()) if v.max() > v.min() else np.zeros_like(v)


def _cell(entry: dict | None) -> str:
    if not entry:
        return "-"
    lo, hi = entry["ci95"]
    ci = f" [{lo:.3f}, {hi:.3f}]" if np.isfinite([lo, hi]).all() else ""
    return f"{entry['auroc']:.3f}{ci} (n={entry['n']})"


def write_table(rows: list[dict], path: Path, chosen: tuple[str, ...]) -> None:
    """The CV table as Markdown (AUROC [patient-bootstrap 95% CI] per level, the chosen one marked)."""
    lines = ["| candidate | node AUROC | station AUROC | patient AUROC |", "|---|---|---|---|"]
    for r in rows:
        mark = " **(chosen)**" if tuple(r["members"]) == tuple(chosen) else ""
        lines.append(f"| {r['candidate']}{mark} | {_cell(r['node'])} | {_cell(r['station'])} | {_cell(r['patient'])} |")
    atomic_write_text(path, "\n".join(lines) + "\n")


def plot_table(rows: list[dict], path: Path, chosen: tuple[str, ...], level: str) -> None:
    """Horizontal bars of the selection level's CV AUROC with its CI, the chosen candidate highlighted."""
    shown = [r for r in rows if r.get(level)]
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(shown) + 1.2))
    for i, r in enumerate(shown):
        e = r[level]
        lo, hi = e["ci95"]
        colour = "tab:red" if tuple(r["members"]) == tuple(chosen) else ("tab:gray" if not r["members"] else "tab:blue")
        ax.barh(i, e["auroc"], color=colour)
        if np.isfinite([lo, hi]).all():
            ax.plot([lo, hi], [i, i], color="black", lw=1.2)
    ax.set_yticks(range(len(shown)), [r["candidate"] for r in shown], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0.0, 1.0)
    ax.axvline(0.5, color="black", lw=0.5, ls=":")
    ax.set_xlabel(f"{level}-level cross-validation AUROC (patient-bootstrap 95% CI); red = chosen, grey = size rule")
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=90)
    plt.close(fig)


def size_rule_table(crops_dir: Path) -> pd.DataFrame:
    """(case, node, short_axis_mm) of every cached node: the clinician's size rule as a score."""
    rows = []
    for path in sorted(Path(crops_dir).glob("*.npz")):
        with np.load(path, allow_pickle=False) as f:
            rows += [{"case": str(f["case_id"]), "node": int(k), "short_axis_mm": float(s)}
                     for k, s in zip(f["node_ids"], f["short_axis_mm"])]
    return pd.DataFrame(rows, columns=["case", "node", "short_axis_mm"])


def load_instructions(dataset_results: Path) -> dict | None:
    """The chosen model(s) of a dataset, or None when lnm_find_best_configuration has not run."""
    path = Path(dataset_results) / INSTRUCTIONS_FILE
    return load_json(path) if path.is_file() else None
