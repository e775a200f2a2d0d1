"""An nnU-Net v2 raw dataset (imagesTr/, labelsTr/, dataset.json) -> an lnm_auto raw dataset.

The lymph-node label is taken from dataset.json "labels" by name (``--label "lymph node"``, case
insensitive) or value (``--label 3``); without ``--label`` every label whose name mentions a lymph
node (``lymph``, ``node``, ``LN``) is used, or the only foreground label. Each case's LN voxels are
split into node instances (``components.split_components``) -> nodesTr/, images are copied (or hard
linked), and nodes.csv lists every node with its label from an optional CSV (case,node,label), or
empty. A CSV with case,label only gives patients.csv instead. imagesTs/ (+ labelsTs/) come along.

The dataset is written to a hidden folder next to the target and renamed at the end, so an
interrupted conversion never leaves a half dataset under the final name.
"""
from __future__ import annotations

import difflib
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk

from lnm_auto.conversion.components import DEFAULT_MIN_VOLUME_MM3, nodes_skeleton, split_components
from lnm_auto.conversion.split_dataset import write_mask
from lnm_auto.datasets.raw_dataset import CHANNEL_SUFFIX, read_image
from lnm_auto.utils.errors import LNMError
from lnm_auto.utils.io import load_json, save_csv_atomic, save_json
from lnm_auto.utils.labels import parse_label
from lnm_auto.utils.paths import DATASET_DIR_PATTERN, dataset_folder_name

LN_NAME = re.compile(r"lymph|node|nodal|(?<![a-z])lnn?(?![a-z])", re.IGNORECASE)


@dataclass
class ConversionSummary:
    output: Path
    node_counts: dict[str, int]          # case -> nodes (training cases)
    test_node_counts: dict[str, int]     # case -> nodes (test cases with labelsTs/)
    label_values: list[int]
    lines: list[str]


def find_ln_label_values(labels: dict, wanted: str | None, json_file: Path) -> dict[int, str]:
    """Value -> name of the lymph-node label(s) in an nnU-Net "labels" dict {name: value or [values]}."""
    def values_of(v) -> list[int]:
        """A label's value or list of values, as a list of ints."""
        return [int(x) for x in (v if isinstance(v, list) else [v])]
    foreground = {str(n): values_of(v) for n, v in labels.items() if values_of(v) != [0]}
    if wanted is not None:
        by_name = {n.lower(): n for n in foreground}
        if wanted.strip().lower() in by_name:
            name = by_name[wanted.strip().lower()]
            return {v: name for v in foreground[name]}
        if wanted.strip().isdigit() and any(int(wanted) in v for v in foreground.values()):
            return {int(wanted): next(n for n, v in foreground.items() if int(wanted) in v)}
        close = difflib.get_close_matches(wanted.lower(), list(by_name), n=1, cutoff=0.4)
        hint = f"; did you mean '{by_name[close[0]]}'?" if close else ""
        raise LNMError(f"{json_file}: no label named or valued '{wanted}' in \"labels\" "
                       f"({', '.join(f'{n}={v}' for n, v in foreground.items())}){hint}")
    matches = [n for n in foreground if LN_NAME.search(n)]
    if not matches and len(foreground) == 1:
        matches = list(foreground)
    if not matches:
        raise LNMError(f"{json_file}: no label looks like a lymph node ({', '.join(foreground)}); "
                       "pass --label NAME_OR_VALUE")
    value_names: dict[int, str] = {}
    for n in matches:
        for v in foreground[n]:
            value_names.setdefault(v, n)
    return dict(sorted(value_names.items()))


def _case_files(folder: Path, ending: str) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(f for f in folder.iterdir() if f.is_file() and f.name.endswith(ending) and not f.name.startswith("."))


def _place(src: Path, dst: Path, link: bool) -> None:
    """Hard link (same file system, no extra space) or copy ``src`` to ``dst``."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if link:
        try:
            os.link(src, dst)
            return
        except OSError:
            pass    # another file system: fall back to a copy
    shutil.copyfile(src, dst)


def _convert_split(src: Path, dst: Path, split: str, ending: str, n_channels: int, values: dict[int, str],
                   min_volume_mm3: float, link: bool) -> tuple[dict[str, int], dict[str, list[str]], list[str]]:
    """images<split> + labels<split> -> images<split> + nodes<split>; (nodes per case, sources, problems)."""
    counts: dict[str, int] = {}
    sources: dict[str, list[str]] = {}
    problems: list[str] = []
    label_files = {f.name[: -len(ending)]: f for f in _case_files(src / f"labels{split}", ending)}
    image_cases = {m.group("case") for f in _case_files(src / f"images{split}", ending)
                   if (m := CHANNEL_SUFFIX.match(f.name[: -len(ending)]))}
    for case in sorted(image_cases | set(label_files)):
        images = [src / f"images{split}" / f"{case}_{c:04d}{ending}" for c in range(n_channels)]
        missing = [f for f in images if not f.is_file()]
        if missing:
            problems.append(f"{missing[0]}: missing (case '{case}' has a label file but not all channels)")
            continue
        for f in images:
            _place(f, dst / f"images{split}" / f.name, link)
        if case not in label_files:
            if split == "Tr":
                problems.append(f"{src / 'labelsTr' / (case + ending)}: missing (case '{case}' has images)")
            continue
        labels = read_image(label_files[case])
        arr = sitk.GetArrayViewFromImage(labels)
        # other labels -> 0; each LN label keeps its value, so touching nodes of two LN labels stay two nodes
        ln = sitk.GetImageFromArray(np.where(np.isin(arr, list(values)), arr, 0).astype(np.uint16))
        ln.CopyInformation(labels)
        result = split_components(ln, min_volume_mm3)
        write_mask(result.mask, dst / f"nodes{split}" / f"{case}{ending}")
        counts[case] = result.n_nodes
        sources[case] = [values[v] for v in result.source_values]
    return counts, sources, problems


def _apply_labels_csv(csv: Path, nodes: pd.DataFrame, training_cases: set[str], out: Path) -> list[str]:
    """Node labels (case,node,label[,station]) into ``nodes``, or patient labels (case,label) -> patients.csv."""
    try:
        table = pd.read_csv(csv, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise LNMError(f"{csv}: cannot be read as CSV ({str(e).splitlines()[0]})") from None
    if not {"case", "label"} <= set(table.columns):
        raise LNMError(f"{csv}: needs the columns case,node,label (node labels) or case,label (patient labels)")
    for i, text in enumerate(table["label"]):
        try:
            parse_label(text)
        except ValueError:
            raise LNMError(f"{csv}: line {i + 2}: label '{text}' is not 1, 0 or empty") from None
    table["case"] = table["case"].str.strip()
    if "node" not in table.columns:
        unknown = sorted(set(table["case"]) - training_cases)
        if unknown:
            raise LNMError(f"{csv}: case '{unknown[0]}' is not a training case of the dataset")
        save_csv_atomic(table[["case", "label"] + (["patient"] if "patient" in table else [])], out / "patients.csv")
        return [f"patients.csv: {len(table)} patient label(s) from {csv.name}"]
    key = {(c, int(n)): i for i, (c, n) in enumerate(zip(nodes["case"], nodes["node"]))}
    for i, row in table.iterrows():
        try:
            k = key[(row["case"], int(str(row["node"]).strip()))]
        except (KeyError, ValueError):
            raise LNMError(f"{csv}: line {i + 2}: node '{row['node']}' of case '{row['case']}' is not in the converted "
                           "masks (nodes are numbered by position; see nodes.csv of a conversion without labels)") from None
        nodes.loc[k, "label"] = str(row["label"]).strip()
        if "station" in table.columns:
            nodes.loc[k, "station"] = str(row["station"]).strip()
    return [f"nodes.csv: {len(table)} node label(s) from {csv.name}"]


def convert_nnunet_dataset(source: Path, raw_root: Path, dataset_id: int, name: str | None = None,
                           label: str | None = None, labels_csv: Path | None = None, link: bool = False,
                           min_volume_mm3: float = DEFAULT_MIN_VOLUME_MM3) -> ConversionSummary:
    """Write ``raw_root/DatasetYYY_Name`` from the nnU-Net v2 raw dataset folder ``source``."""
    source = Path(source)
    json_file = source / "dataset.json"
    if not json_file.is_file():
        raise LNMError(f"{json_file}: missing; -i must be an nnU-Net raw dataset folder (DatasetXXX_Name)")
    try:
        meta = load_json(json_file)
    except ValueError as e:
        raise LNMError(f"{json_file}: not valid JSON ({e})") from None
    channels = meta.get("channel_names", meta.get("modality"))
    if not isinstance(channels, dict) or not isinstance(meta.get("labels"), dict):
        raise LNMError(f"{json_file}: needs \"channel_names\" and \"labels\" (nnU-Net v2 dataset.json)")
    ending = str(meta.get("file_ending", ".nii.gz"))
    labels = meta["labels"]
    if all(str(k).strip().isdigit() for k in labels):      # nnU-Net v1 order {"1": "name"}: make it {name: value}
        labels = {str(v): int(k) for k, v in labels.items()}
    values = find_ln_label_values(labels, label, json_file)
    m = DATASET_DIR_PATTERN.match(source.name)
    name = name or (m.group(2) if m else re.sub(r"[^A-Za-z0-9_\-]", "_", source.name))
    out = Path(raw_root) / dataset_folder_name(dataset_id, name)
    taken = [p.name for p in Path(raw_root).glob(f"Dataset{dataset_id:03d}_*")] if Path(raw_root).is_dir() else []
    if taken:
        raise LNMError(f"{Path(raw_root) / taken[0]}: dataset id {dataset_id:03d} is taken; choose another -d or "
                       "remove that folder")
    staging = Path(raw_root) / f".{out.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        counts, sources, problems = _convert_split(source, staging, "Tr", ending, len(channels), values,
                                                   min_volume_mm3, link)
        test_counts, test_sources, test_problems = _convert_split(source, staging, "Ts", ending, len(channels),
                                                                  values, min_volume_mm3, link)
        problems += test_problems
        if problems:
            raise LNMError("\n".join(problems))
        if not counts:
            raise LNMError(f"{source / 'labelsTr'}: no cases found (expected <case>{ending} beside imagesTr/<case>_0000{ending})")
        nodes = nodes_skeleton(counts, sources)
        lines = [f"{case}: {n} node(s)" for case, n in counts.items()]
        if labels_csv is not None:
            lines += _apply_labels_csv(Path(labels_csv), nodes, set(counts), staging)
        save_csv_atomic(nodes, staging / "nodes.csv")
        if test_counts:
            save_csv_atomic(nodes_skeleton(test_counts, test_sources), staging / "nodesTs.csv")
        save_json({"name": name, "channel_names": {str(k): v for k, v in channels.items()}, "file_ending": ending,
                   "numTraining": len(counts),
                   "description": f"converted from the nnU-Net dataset {source.name}: lymph-node label(s) "
                                  f"{', '.join(sorted(set(values.values())))} (value(s) {list(values)}) split into "
                                  "26-connected components "
                                  f"of at least {min_volume_mm3:g} mm^3",
                   **({"reference": meta["reference"]} if "reference" in meta else {})}, staging / "dataset.json")
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ConversionSummary(out, counts, test_counts, list(values), lines)
