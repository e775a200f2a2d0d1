"""``lnm_predict``: every node of every input case scored by every fold; probabilities averaged.

Input layouts (``-i FOLDER``):
  * ``<case>_0000<ending>`` (one per channel) with the node mask ``<case>_nodes<ending>`` beside them;
  * a raw dataset's ``imagesTs/`` (or ``imagesTr/``): masks are found in ``nodesTs/<case><ending>``;
  * one sub-folder per case holding a DICOM series and the node mask as NIfTI/NRRD/MHA.
An optional ``nodes.csv`` (case,node,station[,...]) in the input folder — or the raw dataset's
``nodesTs.csv`` next to ``imagesTs/`` — names each node's station.
"""
from __future__ import annotations

import datetime
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk
import torch
from tqdm import tqdm

import lnm_auto
from lnm_auto.conversion.components import as_instance_mask
from lnm_auto.datasets.raw_dataset import CHANNEL_SUFFIX, read_image
from lnm_auto.datasets.verify import geometry_mismatches
from lnm_auto.evaluation.rollup import rollup
from lnm_auto.inference.model import TrainedModel
from lnm_auto.networks.node_predictor import predict_node_crops
from lnm_auto.planning.plans import Plans
from lnm_auto.preprocessing.preprocessor import preprocess_images, read_instance_mask
from lnm_auto.utils.errors import LNMError
from lnm_auto.utils.io import atomic_path, save_csv_atomic, save_json
from lnm_auto.utils.tables import node_ids, read_csv_text

IMAGE_ENDINGS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


@dataclass
class InputCase:
    case_id: str
    image_files: list[Path] = field(default_factory=list)   # one per channel (empty for DICOM)
    dicom_dir: Path | None = None
    node_mask_file: Path | None = None


def _ending(name: str) -> str | None:
    return next((e for e in IMAGE_ENDINGS if name.endswith(e)), None)


def discover_cases(input_dir: Path, num_channels: int) -> tuple[list[InputCase], list[str]]:
    """Cases in ``input_dir`` and one problem line per case that cannot be run."""
    input_dir = Path(input_dir)
    if not input_dir.is_dir():
        raise LNMError(f"-i {input_dir}: no such folder")
    cases, problems = [], []
    files = [f for f in sorted(input_dir.iterdir()) if f.is_file() and _ending(f.name)]
    channel_files: dict[str, dict[int, Path]] = {}
    for f in files:
        m = CHANNEL_SUFFIX.match(f.name[: -len(_ending(f.name))])
        if m:
            channel_files.setdefault(m.group("case"), {})[int(m.group("channel"))] = f
    sibling_masks = input_dir.parent / input_dir.name.replace("images", "nodes", 1) \
        if input_dir.name.startswith("images") else None
    for case_id, chans in sorted(channel_files.items()):
        ending = _ending(chans[min(chans)].name)
        missing = [c for c in range(num_channels) if c not in chans]
        if missing:
            problems.append(f"{input_dir / f'{case_id}_{missing[0]:04d}{ending}'}: missing channel {missing[0]} of "
                            f"case '{case_id}' (the model needs {num_channels} channel(s))")
            continue
        candidates = [input_dir / f"{case_id}_nodes{ending}"]
        if sibling_masks is not None:
            candidates.append(sibling_masks / f"{case_id}{ending}")
        others = [c.parent / c.name.replace(ending, e) for c in candidates for e in IMAGE_ENDINGS if e != ending]
        mask = next((c for c in candidates + others if c.is_file()), None)
        if mask is None:
            problems.append(f"{candidates[-1]}: node mask of case '{case_id}' not found (expected "
                            f"{' or '.join(str(c) for c in candidates)})")
            continue
        cases.append(InputCase(case_id, [chans[c] for c in range(num_channels)], node_mask_file=mask))
    for sub in sorted(p for p in input_dir.iterdir() if p.is_dir()):
        series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(sub))
        if not series:
            continue
        masks = [f for f in sorted(sub.iterdir()) if f.is_file() and _ending(f.name)]
        if num_channels != 1:
            problems.append(f"{sub}: DICOM input holds one channel, the model needs {num_channels}")
        elif len(series) > 1:
            problems.append(f"{sub}: {len(series)} DICOM series in one folder; keep one series per case folder")
        elif len(masks) != 1:
            problems.append(f"{sub}: expected exactly one node mask (NIfTI/NRRD/MHA) beside the DICOM series, "
                            f"found {len(masks)}")
        else:
            cases.append(InputCase(sub.name, dicom_dir=sub, node_mask_file=masks[0]))
    if not cases and not problems:
        raise LNMError(f"-i {input_dir}: no cases found (expected <case>_0000.nii.gz + <case>_nodes.nii.gz, an "
                       "imagesTs/ folder beside nodesTs/, or one DICOM folder per case)")
    return cases, problems


def read_case_images(case: InputCase) -> list[sitk.Image]:
    if case.dicom_dir is not None:
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(case.dicom_dir)))
        try:
            return [reader.Execute()]
        except RuntimeError as e:
            raise LNMError(f"{case.dicom_dir}: DICOM series cannot be read ({str(e).strip().splitlines()[-1][:150]})") from None
    return [read_image(f) for f in case.image_files]


@dataclass
class PreprocessedCase:
    """What a worker hands back: the crops, or the one-line reason the case failed; for a binary node mask,
    the line saying it was split into components and where the instance mask was written."""
    case_id: str
    crops: dict | None = None
    error: str = ""
    split_note: str | None = None
    instance_mask_file: Path | None = None


def load_and_preprocess(case: InputCase, plans: Plans, output_dir: Path) -> PreprocessedCase:
    """Read, check and crop one case (runs in a worker process). A binary node mask is split into its
    26-connected components, written as ``<case>_nodes.nii.gz`` into ``output_dir`` so the node ids of the
    outputs point to voxels."""
    try:
        images = read_case_images(case)
        mask, split_note = as_instance_mask(read_instance_mask(case.node_mask_file), str(case.node_mask_file))
        instance_file = None
        if split_note:
            instance_file = Path(output_dir) / f"{case.case_id}_nodes.nii.gz"
            with atomic_path(instance_file, suffix=".nii.gz") as tmp:
                sitk.WriteImage(mask, str(tmp), useCompression=True)
            split_note += f"; instances written to {instance_file}"
        for img, source in zip(images, case.image_files or [case.dicom_dir]):
            if img.GetDimension() != 3 or img.GetNumberOfComponentsPerPixel() != 1:
                raise LNMError(f"{source}: must be a 3D single-component image")
            arr = sitk.GetArrayViewFromImage(img)
            if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
                raise LNMError(f"{source}: NaN/Inf voxels; replace them with a finite value")
        for img, source in zip(images[1:], case.image_files[1:]):
            bad = geometry_mismatches(images[0], img)
            if bad:
                raise LNMError(f"{source}: {bad[0]} of channel 0; all channels must share one grid")
        bad = geometry_mismatches(images[0], mask)
        if bad:
            raise LNMError(f"{case.node_mask_file}: {bad[0]}; the node mask must have the image's geometry")
        return PreprocessedCase(case.case_id, preprocess_images(images, mask, plans), "", split_note, instance_file)
    except LNMError as e:
        return PreprocessedCase(case.case_id, error=str(e))
    except (RuntimeError, ValueError, IndexError) as e:
        return PreprocessedCase(case.case_id, error=f"{case.node_mask_file}: case '{case.case_id}' cannot be "
                                                    f"preprocessed ({str(e).strip().splitlines()[-1][:150]})")


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


def station_table(input_dir: Path) -> pd.DataFrame | None:
    """Stations from ``nodes.csv`` in the input folder, or ``nodesTs.csv`` beside ``imagesTs/``."""
    candidates = [input_dir / "nodes.csv"]
    if input_dir.name.startswith("images"):
        candidates.append(input_dir.parent / (input_dir.name.replace("images", "nodes", 1) + ".csv"))
    for p in candidates:
        if p.is_file():
            df = read_csv_text(p, "node table")
            if {"case", "node", "station"} <= set(df.columns):
                return pd.DataFrame({"case": df["case"], "node": node_ids(df["node"], p), "station": df["station"]})
    return None


def predict_folder(input_dir: Path, output_dir: Path, model_folder: Path, folds: list[str] | None = None,
                   checkpoint: str = "checkpoint_final.pth", device: str = "cpu", num_processes: int = 1,
                   mirror: bool = True, save_probmaps: bool = True, progress: bool = True) -> dict:
    """Predict every case; returns a summary. Raises LNMError at the end if any case failed."""
    t0 = time.time()
    model = TrainedModel.load(model_folder)
    dev = torch.device(device)
    networks = model.load_networks(folds, checkpoint, dev)
    cases, failures = discover_cases(Path(input_dir), len(model.plans.normalization))
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    stations = station_table(Path(input_dir))
    rows = []
    bar = tqdm(total=len(cases), desc="predict", unit="case", disable=not progress)
    by_id = {c.case_id: c for c in cases}
    split_cases = set()
    for done in _preprocessed(cases, model.plans, num_processes, output_dir):
        bar.update()
        case_id, crops = done.case_id, done.crops
        if done.error:
            failures.append(done.error)
            continue
        if done.split_note:
            print(done.split_note, flush=True)
            split_cases.add(case_id)
            by_id[case_id].node_mask_file = done.instance_mask_file
        per_fold = {f: predict_node_crops(net, crops, model.plans, model.configuration, dev,
                                     model.configuration.recipe.batch_size, mirror) for f, net in networks.items()}
        mean = np.mean(list(per_fold.values()), axis=0)
        node_ids = crops["node_ids"].tolist()
        for i, k in enumerate(node_ids):
            rows.append({"case": case_id, "node": int(k), "probability": float(mean[i]),
                         **{f"probability_fold{f}": float(p[i]) for f, p in per_fold.items()}})
        if save_probmaps:
            write_probability_map(by_id[case_id].node_mask_file, dict(zip(node_ids, mean.tolist())),
                                  output_dir / f"{case_id}_probmap.nii.gz")
    bar.close()
    nodes = pd.DataFrame(rows, columns=["case", "node", "probability"] + [f"probability_fold{f}" for f in networks])
    nodes.insert(2, "station", "")
    if stations is not None and split_cases:   # split masks have new node ids: their station rows do not apply
        stations = stations[~stations["case"].isin(split_cases)]
    if stations is not None and len(nodes):
        merged = nodes.drop(columns="station").merge(stations, on=["case", "node"], how="left")
        nodes = merged[nodes.columns].fillna({"station": ""})
    save_csv_atomic(nodes, output_dir / "nodes.csv")
    if len(nodes):
        with_station = nodes[nodes["station"] != ""]
        if len(with_station):
            save_csv_atomic(rollup(with_station, "station"), output_dir / "stations.csv")
        save_csv_atomic(rollup(nodes, "patient"), output_dir / "patients.csv")
    info = {"model_folder": str(model.folder), "trainer": model.trainer_name, "configuration": model.configuration.name,
            "plans_name": model.plans.plans_name, "plans_version": model.plans.plans_version,
            "folds": list(networks), "checkpoint": checkpoint, "test_time_mirroring": mirror,
            "lnm_auto_version": lnm_auto.__version__, "device": device, "n_cases": len(nodes["case"].unique()),
            "n_nodes": len(nodes), "failed": failures, "rollup": "max over nodes (documentation/evaluation.md)",
            "finished": datetime.datetime.now().isoformat(timespec="seconds"),
            "wall_time_s": round(time.time() - t0, 1)}
    save_json(info, output_dir / "predict_info.json")
    if failures:
        raise LNMError(f"{len(failures)} case(s) failed (the others are in {output_dir}):\n" + "\n".join(failures))
    return info


def _preprocessed(cases: list[InputCase], plans: Plans, num_processes: int, output_dir: Path):
    """Yield each case's PreprocessedCase in order; with workers, at most 2 x workers cases in flight."""
    if num_processes <= 1:
        for c in cases:
            yield load_and_preprocess(c, plans, output_dir)
        return
    with ProcessPoolExecutor(num_processes) as pool:
        pending: deque = deque()
        it = iter(cases)
        for c in it:
            pending.append(pool.submit(load_and_preprocess, c, plans, output_dir))
            if len(pending) >= 2 * num_processes:
                break
        while pending:
            yield pending.popleft().result()
            nxt = next(it, None)
            if nxt is not None:
                pending.append(pool.submit(load_and_preprocess, nxt, plans, output_dir))
