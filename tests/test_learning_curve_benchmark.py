"""The learning-curve benchmark's pure parts (benchmarks/learning_curve.py): which cases each (size, seed) fold
trains on, the epochs for a size, where curves cross. No training here."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from learning_curve import (crossings, draw_subset, labelled_node_counts, learning_folds,  # noqa: E402
                            training_epochs)
from lnm_auto.planning.splits import split_file_problems  # noqa: E402


def nodes_table(n_labelled_cases: int = 40, n_unlabelled_cases: int = 12, seed: int = 0) -> pd.DataFrame:
    """A nodes_index-like table: 3-12 nodes a case, ~30 % positive; unlabelled cases carry label -1."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_labelled_cases + n_unlabelled_cases):
        labelled = i < n_labelled_cases
        for node in range(1, int(rng.integers(3, 13)) + 1):
            rows.append({"case": f"case_{i:03d}", "node": node,
                         "label": int(rng.random() < 0.3) if labelled else -1})
    return pd.DataFrame(rows)


def test_counts_per_case():
    nodes = pd.DataFrame({"case": ["a", "a", "a", "b", "b"], "node": [1, 2, 3, 1, 2], "label": [1, 0, -1, -1, -1]})
    counts = labelled_node_counts(nodes)
    assert counts.loc["a"].tolist() == [2, 1]
    assert counts.loc["b"].tolist() == [0, 0]


@pytest.mark.parametrize("target", [30, 60, 120])
def test_subset_reaches_the_requested_labelled_node_count(target):
    counts = labelled_node_counts(nodes_table())
    for seed in range(5):
        subset = draw_subset(counts, target, seed)
        n = int(counts.loc[subset, "n_labelled"].sum())
        # cases hold at most 12 nodes: the closest prefix is within half a case of the target
        assert abs(n - target) <= 6, (seed, n)
        n_pos = int(counts.loc[subset, "n_positive"].sum())
        assert 0 < n_pos < n   # both classes, or radiomics cannot fit
        assert set(subset) <= set(counts.index[counts.n_labelled > 0])


def test_subsets_are_deterministic_per_seed_nested_and_differ_between_seeds():
    counts = labelled_node_counts(nodes_table())
    assert draw_subset(counts, 60, 3) == draw_subset(counts, 60, 3)
    assert draw_subset(counts, 60, 3) != draw_subset(counts, 60, 4)
    assert set(draw_subset(counts, 30, 3)) <= set(draw_subset(counts, 120, 3))


def test_folds_are_valid_splits_and_leave_test_cases_out():
    nodes = nodes_table()
    test_cases = {"test_000", "test_001"}   # held out: never in the node table the pool is drawn from
    counts = labelled_node_counts(nodes)
    folds = learning_folds(counts, [30, 60, 120], [0, 1])
    assert [(f["size"], f["seed"], f["fold"]) for f in folds] == [
        (30, 0, 0), (30, 1, 1), (60, 0, 2), (60, 1, 3), (120, 0, 4), (120, 1, 5)]
    splits = [{"train": f["train"], "val": f["val"]} for f in folds]
    assert split_file_problems(splits, sorted(counts.index)) == []   # what lnm_train's load_splits accepts
    unlabelled = set(counts.index[counts.n_labelled == 0])
    for f in folds:
        assert not (set(f["train"]) | set(f["val"])) & test_cases
        assert set(f["val"]) <= unlabelled and len(f["val"]) == 1
        assert set(f["train"]) - set(f["labelled_cases"]) == unlabelled - set(f["val"])   # PGLS's unlabelled nodes
        assert f["n_nodes"] == int(counts.loc[f["labelled_cases"], "n_labelled"].sum())
        assert f["labelled_cases"] == draw_subset(counts, f["size"], f["seed"])


def test_too_few_unlabelled_cases_for_the_folds_is_said():
    counts = labelled_node_counts(nodes_table(n_unlabelled_cases=3))
    with pytest.raises(ValueError, match="6 folds need more than as many cases without node labels, the dataset has 3"):
        learning_folds(counts, [30, 60, 120], [0, 1])


def test_epochs_give_small_subsets_as_many_steps():
    assert training_epochs(30, 16, 16, 2) == 8      # 2 steps an epoch
    assert training_epochs(120, 16, 16, 2) == 2     # 8 steps an epoch
    assert training_epochs(500, 16, 16, 2) == 2     # at least min_epochs
    assert training_epochs(5, 16, 16, 1) == 16


def test_crossings_name_the_sizes_between_which_order_changes():
    curves = {"a": {30: 0.6, 60: 0.7, 120: 0.9}, "b": {30: 0.8, 60: 0.75, 120: 0.7}, "c": {30: 0.5, 60: 0.55, 120: 0.6}}
    assert crossings(curves) == ["a overtakes b between n=60 and 120"]


def _part(name: str, dataset: str, sizes: list[int], rule_auroc: float, steps: int = 16) -> tuple[dict, dict]:
    """A part as learning_curve.py writes it: (<name>_runs.json, <name>.json)."""
    from learning_curve import SIZE_RULE, run_row
    runs = [{"dataset": dataset, "method": SIZE_RULE, "size": None, "seed": -1, "n_train_nodes": 0,
             "n_train_positive": 0, "epochs": None, "auroc": rule_auroc, "auroc_ci95": (0.7, 0.9), "n_nodes": 50,
             "n_positive": 15, "train_s": 0.0}]
    for size in sizes:
        for seed in (0, 1):
            runs.append({"dataset": dataset, "method": "radiomics", "size": size, "seed": seed, "n_train_nodes": size,
                         "n_train_positive": size // 3, "epochs": None, "auroc": 0.5 + size / 1000 + seed / 100,
                         "auroc_ci95": (0.4, 0.9), "n_nodes": 50, "n_positive": 15, "train_s": 1.0})
    args = {"workdir": f"/tmp/{name}", "sizes": sizes, "datasets": [dataset], "name": name, "steps": steps}
    return ({"rows": [run_row(r) for r in runs]},
            {"benchmark": name, "machine": {}, "notes": [f"arguments: {args}", "wall time 1 s"]})


def test_parts_merge_into_one_curve_and_different_data_is_refused():
    from learning_curve import summary_rows
    from learning_curve_merge import merge
    rows, settings = merge([_part("small", "lidc", [30, 60], 0.8), _part("large", "lidc", [120], 0.8)])
    assert settings == {"steps": 16}
    assert sum(r["method"] == "size rule (short axis)" for r in rows) == 1       # one size-rule row per dataset
    table = {r["method"]: r for r in summary_rows(rows, [30, 60, 120])}
    assert table["radiomics"]["n~30"] == "53.5 [53.0, 54.0]"
    assert table["radiomics"]["n~120"] == "62.5 [62.0, 63.0]"
    with pytest.raises(SystemExit, match="size rule on lidc scores 0.750"):
        merge([_part("small", "lidc", [30], 0.8), _part("large", "lidc", [120], 0.75)])
    with pytest.raises(SystemExit, match="settings"):
        merge([_part("small", "lidc", [30], 0.8), _part("large", "lidc", [120], 0.8, steps=120)])
