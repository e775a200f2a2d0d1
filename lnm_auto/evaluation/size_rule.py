"""The clinician's baseline: the short-axis size rule, as a score on the same nodes as any model.

Each node's in-plane short axis (radiological definition, ``preprocessing.geometry.inplane_axes_mm``) is mapped
monotonically into [0, 1] as ``s / (s + 10 mm)``: 10 mm, the classic short-axis cut-off for a suspicious node,
becomes 0.5, and the AUROC (which only needs the order) is the short axis's own. Roll-ups (max over a station's
or patient's nodes) then read "the largest node".
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from lnm_auto.datasets.raw_dataset import read_image
from lnm_auto.imaging.geometry import measure_nodes
from lnm_auto.utils.io import save_csv_atomic

CUT_OFF_MM = 10.0


def size_rule_score(short_axis_mm) -> float:
    """short axis -> [0, 1), 0.5 at the 10 mm cut-off."""
    return float(short_axis_mm) / (float(short_axis_mm) + CUT_OFF_MM)


def size_rule_predictions(node_masks: dict[str, Path]) -> pd.DataFrame:
    """case, node, short_axis_mm, probability (the size-rule score) of every node of the given instance masks."""
    rows = []
    for case, path in sorted(node_masks.items()):
        rows += [{"case": case, "node": n.node, "short_axis_mm": round(n.short_axis_mm, 2),
                  "probability": size_rule_score(n.short_axis_mm)} for n in measure_nodes(read_image(path))]
    return pd.DataFrame(rows, columns=["case", "node", "short_axis_mm", "probability"])


def write_size_rule_predictions(nodes_folder: Path, out_csv: Path, file_ending: str = ".nii.gz") -> pd.DataFrame:
    """The size rule on every mask ``<case><ending>`` of a folder (a raw dataset's nodesTs/), as a nodes.csv
    that lnm_evaluate reads like any prediction (e.g. ``--compare``)."""
    masks = {p.name[: -len(file_ending)]: p for p in sorted(Path(nodes_folder).glob(f"*{file_ending}"))}
    table = size_rule_predictions(masks)
    save_csv_atomic(table, out_csv)
    return table
