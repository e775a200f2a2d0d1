"""Reading and checking what the evaluation of detection needs: which cases were detected, their mask files and
the masks themselves (reference and detected, on one grid). Every problem is one LNMError line naming the file."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk

from lnm_auto.datasets.raw_dataset import read_instance_mask
from lnm_auto.datasets.verify import geometry_mismatches
from lnm_auto.utils.errors import LNMError

MASK_ENDINGS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")   # what SimpleITK reads (as lnm_predict)
_TRUE, _FALSE = ("true", "1", "1.0", "yes"), ("false", "0", "0.0", "no")


def find_mask(folder: Path, case: str) -> Path | None:
    """``<case>_nodes<ending>`` or ``<case><ending>`` in ``folder``; None when there is none, one line when two
    files could be the case's mask."""
    names = [f"{case}_nodes{e}" for e in MASK_ENDINGS] + [f"{case}{e}" for e in MASK_ENDINGS]
    found = [folder / n for n in names if (folder / n).is_file()]
    if len(found) > 1:
        raise LNMError(f"{folder}: case {case} has {len(found)} mask files ({', '.join(p.name for p in found)}); "
                       "keep one of them")
    return found[0] if found else None


def detected_flags(pred: pd.DataFrame, path: Path) -> dict[str, bool] | None:
    """case -> whether lnm_predict detected its nodes (the ``detected`` column, true/false); None when the file
    has no such column. A case must be all detected or all given."""
    if "detected" not in pred.columns:
        return None
    text = pred["detected"].str.lower()
    bad = ~text.isin(_TRUE + _FALSE)
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise LNMError(f"{path}: line {i + 2}: column 'detected' must be true or false, got "
                       f"'{pred['detected'].iat[i]}'")
    flag = text.isin(_TRUE)
    mixed = flag.groupby(pred["case"]).nunique() > 1
    if mixed.any():
        raise LNMError(f"{path}: case {mixed[mixed].index[0]} has detected and given nodes; a case's nodes come "
                       "from one mask")
    return flag.groupby(pred["case"]).first().to_dict()


def detected_cases(ref: pd.DataFrame, pred: pd.DataFrame, flags: dict[str, bool] | None, pred_path: Path,
                   ref_path: Path, pred_masks: Path) -> tuple[list[str], list[str]]:
    """(cases evaluated by overlap, cases predicted on the given masks). A reference case without rows in the
    predictions counts as detected with nothing found when its detected mask is in ``pred_masks``; a detected
    case the reference does not list, or a reference case neither predicted nor detected, is one line."""
    ref_cases, pred_cases = list(dict.fromkeys(ref["case"])), set(pred["case"])
    flags = flags if flags is not None else {c: True for c in pred_cases}
    outside = sorted(c for c in pred_cases if flags[c] and c not in set(ref_cases))
    if outside:
        raise LNMError(f"{pred_path}: detected case(s) {', '.join(outside[:5])} have no nodes in {ref_path.name}; "
                       "give a reference that lists every evaluated case, or leave their rows out")
    detected, given = [], []
    for case in ref_cases:
        if case in pred_cases:
            (detected if flags[case] else given).append(case)
        elif find_mask(pred_masks, case) is not None:
            detected.append(case)           # lnm_predict writes no rows for a case where it detected nothing
        else:
            raise LNMError(f"{pred_path}: case {case} of {ref_path.name} has no rows and {pred_masks} holds no "
                           f"detected mask {case}_nodes.nii.gz for it; predict it (lnm_predict)")
    return detected, given


def _mask_ids(arr: np.ndarray) -> set[int]:
    ids = np.unique(arr)
    return {int(i) for i in ids[ids > 0]}


def read_case_masks(case: str, ref_masks: Path, pred_masks: Path, ref_nodes: list[int], pred_nodes: list[int]
                    ) -> tuple[np.ndarray, np.ndarray]:
    """The reference and detected instance masks of one case as arrays, checked: both exist, share one grid, and
    hold exactly the node ids of their tables (reference: the reference CSV; detected: the prediction rows)."""
    ref_path = find_mask(ref_masks, case)
    if ref_path is None:
        raise LNMError(f"{ref_masks}: no reference mask for case {case} ({case}.nii.gz or {case}_nodes.nii.gz)")
    det_path = find_mask(pred_masks, case)
    if det_path is None:
        raise LNMError(f"{pred_masks}: no detected mask {case}_nodes.nii.gz for case {case}, which the predictions "
                       "say was detected; give the folder lnm_predict wrote with --pred_masks")
    ref_img, det_img = read_instance_mask(ref_path), read_instance_mask(det_path)
    mismatches = geometry_mismatches(ref_img, det_img)
    if mismatches:
        raise LNMError(f"{det_path}: not on the grid of the reference mask {ref_path} ({'; '.join(mismatches)}); "
                       "both must be on the case image's grid")
    ref_arr, det_arr = sitk.GetArrayFromImage(ref_img), sitk.GetArrayFromImage(det_img)
    _check_ids(_mask_ids(ref_arr), set(ref_nodes), ref_path, "the reference nodes file")
    _check_ids(_mask_ids(det_arr), set(pred_nodes), det_path, "the predictions")
    return ref_arr, det_arr


def _check_ids(in_mask: set[int], in_table: set[int], mask_path: Path, table: str) -> None:
    if in_table - in_mask:
        raise LNMError(f"{mask_path}: node id(s) {sorted(in_table - in_mask)[:6]} of {table} are not in this mask; "
                       "the table and the mask must name the same nodes")
    if in_mask - in_table:
        raise LNMError(f"{mask_path}: node id(s) {sorted(in_mask - in_table)[:6]} of this mask are not in {table}; "
                       "the table and the mask must name the same nodes")
