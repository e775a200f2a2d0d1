"""Self-configuration of the *learning*: which trainer(s) a dataset's label mix calls for, and the plan of
the classical ``radiomics`` configuration. Pure functions of the fingerprint, unit-tested on hand-made ones.

Label-mix rule (documentation/planning.md, "Learning scheme"); L = node-labelled nodes, P = those labelled 1,
N = all nodes, S = unlabelled nodes whose station has a pathology label:
* L >= 0.5 N and 1 <= P < L                           -> LNMTrainer (node labels are plentiful)
* P >= 3, L >= 10 and S >= 0.2 (N - L)                -> LNMTrainer, then LNMTrainerPGLS from it
* P >= 3, L >= 10 (no usable station labels)          -> LNMTrainer, then LNMTrainerMeanTeacher from it
* otherwise, with station or patient labels           -> LNMTrainerWeak (multiple-instance learning)
* otherwise                                           -> LNMTrainer (it will say it has too few labels)
"""
from __future__ import annotations

from dataclasses import dataclass


PLENTIFUL_FRACTION = 0.5
MIN_POSITIVE_SEMI = 3
MIN_LABELLED_SEMI = 10
MIN_STATION_COVERAGE = 0.2


def label_mix(fingerprint: dict) -> dict[str, int]:
    """Counts the rule uses: nodes, labelled, positive, unlabelled with a station label, weakly labelled nodes."""
    nodes = fingerprint["nodes"]
    unlabelled = [n for n in nodes if n["label"] < 0]
    return {
        "nodes": len(nodes),
        "labelled": sum(1 for n in nodes if n["label"] >= 0),
        "positive": sum(1 for n in nodes if n["label"] == 1),
        "unlabelled_with_station": sum(1 for n in unlabelled if n.get("station_label", -1) >= 0),
        "weakly_labelled": sum(1 for n in nodes if n.get("station_label", -1) >= 0 or n.get("patient_label", -1) >= 0),
    }


def plan_learning_scheme(fingerprint: dict) -> tuple[list[str], str]:
    """(trainers to run in order, each starting from the previous one; why) for the dataset's label mix."""
    m = label_mix(fingerprint)
    counts = (f"{m['labelled']} of {m['nodes']} nodes node-labelled ({m['positive']} positive), "
              f"{m['unlabelled_with_station']} unlabelled nodes with a station label")
    unlabelled = m["nodes"] - m["labelled"]
    if m["labelled"] >= PLENTIFUL_FRACTION * m["nodes"] and 0 < m["positive"] < m["labelled"]:
        return ["LNMTrainer"], f"{counts}: node labels are plentiful -> supervised"
    if m["positive"] >= MIN_POSITIVE_SEMI and m["labelled"] >= MIN_LABELLED_SEMI and unlabelled:
        if m["unlabelled_with_station"] >= MIN_STATION_COVERAGE * unlabelled:
            return ["LNMTrainer", "LNMTrainerPGLS"], (f"{counts}: scarce node labels + station pathology -> "
                                                      "supervised, then pathology-guided label sharpening")
        return ["LNMTrainer", "LNMTrainerMeanTeacher"], f"{counts}: scarce node labels -> supervised, then mean teacher"
    if m["weakly_labelled"]:
        return ["LNMTrainerWeak"], f"{counts}: too few node labels -> multiple-instance learning on station/patient labels"
    return ["LNMTrainer"], f"{counts}: no weak labels either; supervised on what there is"
