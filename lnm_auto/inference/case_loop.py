"""The prediction loop: each case read and checked once, prepared for every member (in background workers),
scored, combined (``members.combine``), calibrated and written: its probability map, then ``cases/<case>.csv``
(written last: the case is done, a rerun skips it).

A case that cannot be run (bad input, members scoring different nodes) is one line in ``failures``; the others
go on. A damaged model (a non-finite probability) or a full disk stops the run (LNMError).
"""
from __future__ import annotations

import os
import sys
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk

from lnm_auto.configurations import kind_of
from lnm_auto.imaging.components import as_instance_mask
from lnm_auto.datasets.raw_dataset import read_instance_mask
from lnm_auto.evaluation.calibration import apply_calibration
from lnm_auto.inference.cases import InputCase, read_case_images
from lnm_auto.inference.detection_step import detection_values
from lnm_auto.inference.domain import case_samples, domain_warning
from lnm_auto.inference.members import UNCALIBRATED, Member, NodeMismatch, combine
from lnm_auto.inference.output_folder import CASE_ROWS
from lnm_auto.plans.plans import ConfigurationPlan, Plans
from lnm_auto.imaging.geometry import measure_nodes
from lnm_auto.preprocessing.preprocessor import check_case_images
from lnm_auto.training.progress import progress_bar, show_progress
from lnm_auto.utils.errors import LNMError
from lnm_auto.utils.io import atomic_path, save_csv_atomic
from lnm_auto.utils.processes import worker_process_init


@dataclass
class PreprocessedCase:
    """What a worker hands back: each member's prepared inputs (crops, features, short axes), or the one-line
    reason the case failed; for a binary node mask, the line saying it was split into components and where the
    instance mask was written; the line saying the case does not look like the training data, if it does not."""
    case_id: str
    inputs: list[dict] | None = None
    error: str = ""
    split_note: str | None = None
    instance_mask_file: Path | None = None
    domain_warning: str = ""

    @property
    def crops(self) -> dict | None:
        """The first (for one model: the only) member's inputs."""
        return self.inputs[0] if self.inputs else None


def member_inputs(images: list[sitk.Image], mask: sitk.Image, plans: Plans,
                  configuration: ConfigurationPlan | None, size_rule: bool) -> dict:
    """One member's inputs of a case: its short axes (size rule: measured as the crops measure them; no crop is
    cut), radiomics features, or the plans' crops."""
    if size_rule:
        nodes = measure_nodes(mask)
        return {"node_ids": np.asarray([n.node for n in nodes], dtype=np.int32),
                "short_axis_mm": np.asarray([n.short_axis_mm for n in nodes], dtype=np.float32)}
    return kind_of(configuration).case_inputs(images, mask, plans, configuration)


def prepare_case(case: InputCase, specs: list[tuple], output_dir: Path, reference: dict | None = None
                 ) -> PreprocessedCase:
    """Read, check and prepare one case for every member (``specs``: ``Member.spec()``; runs in a worker
    process). A binary node mask is split into its 26-connected components, written as ``<case>_nodes.nii.gz``
    into ``output_dir`` so the node ids of the outputs point to voxels. ``reference``: the training intensities
    (``domain.training_reference``) the case is compared with. Bad input (LNMError, SimpleITK read errors) is
    handed back as the case's one-line error; anything else is a bug of ours and surfaces with its traceback."""
    try:
        images, modality = read_case_images(case)
        mask, split_note = as_instance_mask(read_instance_mask(case.node_mask_file), str(case.node_mask_file))
        check_case_images(images, case.image_files or [case.dicom_dir], mask, case.node_mask_file)
    except LNMError as e:
        return PreprocessedCase(case.case_id, error=str(e))
    warning = domain_warning(case.case_id, case_samples(images, mask), reference, modality)
    instance_file = None
    if split_note:
        instance_file = Path(output_dir) / f"{case.case_id}_nodes.nii.gz"
        with atomic_path(instance_file, suffix=".nii.gz") as tmp:
            sitk.WriteImage(mask, str(tmp), useCompression=True)
        split_note += f"; instances written to {instance_file}"
    inputs = [member_inputs(images, mask, *spec) for spec in specs]
    return PreprocessedCase(case.case_id, inputs, "", split_note, instance_file, warning)


def load_and_preprocess(case: InputCase, plans: Plans, output_dir: Path,
                        configuration: ConfigurationPlan | None = None,
                        reference: dict | None = None, size_rule: bool = False) -> PreprocessedCase:
    """``prepare_case`` for one model (``configuration``; ``size_rule``: only each node's short axis)."""
    return prepare_case(case, [(plans, configuration, size_rule)], output_dir, reference)


def write_probability_map(mask_file: Path, probabilities: dict[int, float], out_file: Path) -> None:
    """The node mask with every node's voxels set to its probability, in the input's exact geometry."""
    mask = read_instance_mask(mask_file)
    ids = sitk.GetArrayViewFromImage(mask).astype(np.int64)
    lut = np.zeros(int(ids.max()) + 1, dtype=np.float32)
    for k, p in probabilities.items():
        lut[k] = p
    out = sitk.GetImageFromArray(lut[ids])
    out.CopyInformation(mask)
    with atomic_path(out_file, suffix=".nii.gz") as tmp:
        sitk.WriteImage(out, str(tmp), useCompression=True)


def predict_cases(todo: list[InputCase], members: list[Member], columns: list[str], calibration: dict | None,
                  output_dir: Path, reference: dict | None, num_processes: int, save_probmaps: bool,
                  progress: bool, failures: list[str], warnings: dict[str, str]) -> None:
    """Prepare, score and write every case of ``todo``; failed cases' reasons go to ``failures``, domain warnings
    (also printed) to ``warnings``. ``columns``: the node table's columns after case and node."""
    prepare = partial(prepare_case, specs=[m.spec() for m in members], output_dir=output_dir, reference=reference)
    one_line_per_case = progress and not show_progress()
    bar = progress_bar(len(todo), "predict", unit="case") if progress else None
    by_id, t_case = {c.case_id: c for c in todo}, time.time()
    for i, prepared in enumerate(_preprocessed(todo, prepare, num_processes), 1):
        case_id, state = prepared.case_id, "failed"
        if prepared.error:
            failures.append(prepared.error)
        else:
            if prepared.split_note:
                print(prepared.split_note, flush=True)
                by_id[case_id].node_mask_file = prepared.instance_mask_file
            if prepared.domain_warning:
                print(f"warning: {prepared.domain_warning}", file=sys.stderr, flush=True)
                warnings[case_id] = prepared.domain_warning
            try:
                n_nodes = _write_case(prepared, by_id[case_id], members, columns, calibration, output_dir,
                                      save_probmaps)
                state = f"{n_nodes} node(s)"
            except NodeMismatch as e:
                failures.append(str(e))
        if bar is not None:
            bar.update()
        if one_line_per_case:
            print(f"predict {i}/{len(todo)}: {case_id} {state} ({time.time() - t_case:.1f} s)", flush=True)
            t_case = time.time()
    if bar is not None:
        bar.close()


def _write_case(prepared: PreprocessedCase, case: InputCase, members: list[Member], columns: list[str],
                calibration: dict | None, output_dir: Path, save_probmaps: bool) -> int:
    """Score one prepared case, write its probability map and then its rows (last: the case is done). A run that
    detects (``columns`` holding ``detected``) also writes each node's detection values and detected station."""
    mask_file = case.node_mask_file
    ids, raw, values = combine(members, prepared.inputs, prepared.case_id, mask_file)
    probability = apply_calibration(calibration, raw)
    extra = ["station"] if "detected" in columns else []
    if extra:
        values = {**values, **detection_values(case, ids.tolist())}
    rows = pd.DataFrame({"case": prepared.case_id, "node": ids, "probability": probability, UNCALIBRATED: raw,
                         **values}, columns=["case", "node"] + columns + extra)
    if save_probmaps:
        write_probability_map(mask_file, dict(zip(ids.tolist(), probability.tolist())),
                              output_dir / f"{prepared.case_id}_probmap.nii.gz")
    save_csv_atomic(rows, output_dir / CASE_ROWS / f"{prepared.case_id}.csv")
    return len(ids)


def _preprocessed(cases: list[InputCase], prepare, num_processes: int):
    """Yield each case's PreprocessedCase (``prepare(case)``) in order: in this process (``num_processes`` 0), or
    by that many background workers (which end with this process) while the caller scores the previous case, at
    most 2 x workers cases in flight."""
    if num_processes <= 0:
        for c in cases:
            yield prepare(c)
        return
    with ProcessPoolExecutor(num_processes, initializer=worker_process_init, initargs=(os.getpid(),)) as pool:
        pending: deque = deque()
        it = iter(cases)
        for c in it:
            pending.append(pool.submit(prepare, c))
            if len(pending) >= 2 * num_processes:
                break
        while pending:
            yield pending.popleft().result()
            nxt = next(it, None)
            if nxt is not None:
                pending.append(pool.submit(prepare, nxt))
