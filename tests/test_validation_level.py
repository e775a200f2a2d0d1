"""What a fold validates on (training/validation.py): the finest level whose labels hold both classes."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from lnm_auto.training.validation import passed_over, validation_level, validation_units


def nodes(label, patient_label, station_label) -> pd.DataFrame:
    """Six validation nodes: cases a, b, c with two nodes each in stations 4R and 7."""
    return pd.DataFrame({"case": list("aabbcc"), "node": [1, 2] * 3, "station": ["4R", "7"] * 3,
                         "label": label, "patient_label": patient_label, "station_label": station_label})


@pytest.mark.parametrize("label, patient_label, station_label, expected", [
    ([1, 0, -1, -1, -1, -1], [1, 1, 0, 0, 1, 1], [1, 0, 0, 0, 1, 0], "node"),      # both classes in nodes
    ([0, 0, -1, -1, -1, -1], [1, 1, 0, 0, 1, 1], [1, 0, 0, 0, 1, 0], "patient"),   # nodes one class only
    ([-1] * 6, [1, 1, 1, 1, -1, -1], [1, 0, 0, 0, -1, -1], "station"),              # patients one class only
    ([0, 0, -1, -1, -1, -1], [1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1], "node"),      # none has both: finest kept
    ([-1] * 6, [-1] * 6, [-1] * 6, None),                                          # nothing labelled
])
def test_level_is_the_first_with_both_classes(label, patient_label, station_label, expected):
    assert validation_level(nodes(label, patient_label, station_label)) == expected


def test_patient_units_roll_up_by_max_and_score_like_sklearn():
    val = nodes([0, 0, -1, -1, -1, -1], [1, 1, 0, 0, 1, 1], [1, 0, 0, 0, 1, 0])
    probabilities = np.array([0.2, 0.9, 0.3, 0.1, 0.4, 0.6])
    units = validation_units(val, probabilities, validation_level(val)).sort_values("case")
    assert units["case"].tolist() == ["a", "b", "c"]
    np.testing.assert_allclose(units["probability"], [0.9, 0.3, 0.6])
    assert units["label"].tolist() == [1, 0, 1]
    assert roc_auc_score(units["label"], units["probability"]) == 1.0


def test_station_units_keep_each_station_label():
    val = nodes([-1] * 6, [1, 1, 1, 1, -1, -1], [1, 0, 0, 0, -1, -1])
    units = validation_units(val, np.array([0.8, 0.1, 0.3, 0.2, 0.5, 0.5]), "station")
    assert len(units) == 4 and sorted(units["label"].tolist()) == [0, 0, 0, 1]
    assert units.loc[units["label"] == 1, "probability"].item() == pytest.approx(0.8)


def test_the_log_says_why_a_finer_level_was_passed_over():

    val = nodes([0, 0, -1, -1, -1, -1], [1, 1, 0, 0, 1, 1], [1, 0, 0, 0, 1, 0])
    assert passed_over(val, "patient") == " (the node labels here hold one class only)"
    assert passed_over(val, "node") == ""
