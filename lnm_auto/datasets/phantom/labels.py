"""The phantom's reference labels: which training cases keep their node labels, and the label tables.

Node labels are the truth of every generated node; a training case outside the labelled fraction keeps
its nodes in nodes.csv with an empty label (its station and patient labels stay known), while
truth_nodes.csv keeps every label. Test cases get their own nodesTs / stationsTs / patientsTs tables.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from lnm_auto.datasets.phantom.case import PhantomCase, PhantomConfig
from lnm_auto.utils.io import save_csv_atomic

TABLE_COLUMNS = {"nodes": ["case", "node", "station", "label"], "stations": ["case", "station", "label"],
                 "patients": ["case", "label"]}


def labeled_cases(config: PhantomConfig) -> set[int]:
    """Indices of the training cases whose node labels are kept (``labeled_fraction`` of them, at least one)."""
    n = config.n_cases
    k = int(math.floor(config.labeled_fraction * n + 0.5))
    if config.labeled_fraction > 0 and k == 0:
        k = 1
    k = min(k, n)
    rng = np.random.default_rng([int(config.seed) & 0xFFFFFFFF, 2 ** 20, 7])
    return set(int(i) for i in rng.choice(n, k, replace=False)) if k else set()


class LabelTables:
    """Node, station and patient label rows of a phantom dataset, collected case by case."""

    def __init__(self):
        self.node_rows, self.truth_rows, self.station_rows, self.patient_rows = [], [], [], []
        self.ts_nodes, self.ts_stations, self.ts_patients = [], [], []

    def add(self, case: PhantomCase, test: bool, node_labels_shown: bool) -> None:
        """Record one case's labels (node labels blanked in nodes.csv unless ``node_labels_shown``)."""
        for n in case.nodes:
            row = {"case": case.case_id, "node": n.node, "station": n.station, "label": str(n.label)}
            if test:
                self.ts_nodes.append(row)
            else:
                self.truth_rows.append(row)
                self.node_rows.append({**row, "label": row["label"] if node_labels_shown else ""})
        stations = [{"case": case.case_id, "station": st, "label": str(lab)}
                    for st, lab in case.station_labels().items()]
        patient = {"case": case.case_id, "label": str(case.patient_label)}
        (self.ts_stations if test else self.station_rows).extend(stations)
        (self.ts_patients if test else self.patient_rows).append(patient)

    def n_training_nodes(self) -> tuple[int, int]:
        """(training nodes, metastatic training nodes)."""
        return len(self.truth_rows), sum(int(r["label"]) for r in self.truth_rows)

    def save(self, root: Path, with_test: bool) -> None:
        """Write the training tables (and, ``with_test``, the test tables) as CSV files under root."""
        cols = TABLE_COLUMNS
        save_csv_atomic(pd.DataFrame(self.node_rows, columns=cols["nodes"]), root / "nodes.csv")
        save_csv_atomic(pd.DataFrame(self.truth_rows, columns=cols["nodes"]), root / "truth_nodes.csv")
        save_csv_atomic(pd.DataFrame(self.station_rows, columns=cols["stations"]), root / "stations.csv")
        save_csv_atomic(pd.DataFrame(self.patient_rows, columns=cols["patients"]), root / "patients.csv")
        if with_test:
            save_csv_atomic(pd.DataFrame(self.ts_nodes, columns=cols["nodes"]), root / "nodesTs.csv")
            save_csv_atomic(pd.DataFrame(self.ts_stations, columns=cols["stations"]), root / "stationsTs.csv")
            save_csv_atomic(pd.DataFrame(self.ts_patients, columns=cols["patients"]), root / "patientsTs.csv")
