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
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk

from lnm_auto.imaging.components import DEFAULT_MIN_VOLUME_MM3, nodes_skeleton, split_components
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


def _label_values(name: str, value, json_file: Path) -> list[int]:
    """A label's value or list of values (nnU-Net regions) as ints; 1.5, "a" or true are refused, not truncated."""
    values = value if isinstance(value, list) else [value]
    for v in values:
        integral = isinstance(v, int) and not isinstance(v, bool) or isinstance(v, float) and v.is_integer()
        if not integral or v < 0:
            raise LNMError(f"{json_file}: label '{name}' has value {json.dumps(v)}; nnU-Net label values are "
                           "integers 0, 1, 2, ...")
    return [int(v) for v in values]


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


@dataclass
class _SplitConversion:
    """What converting imagesXx/ + labelsXx/ found."""
    counts: dict[str, int] = field(default_factory=dict)             # case -> nodes
    sources: dict[str, list[str]] = field(default_factory=dict)      # case -> label name of each node
    problems: list[str] = field(default_factory=list)
    values_seen: set[int] = field(default_factory=set)               # every label value in the label files
    n_removed: int = 0                                               # LN components below the minimum volume


def _label_map_values(arr: np.ndarray, path: Path) -> list[int]:
    """The values of a label map, sorted; a non-integer value (1.5, NaN) is refused: rounding it would move voxels
    between labels. Slice by slice, so a CT-sized label map costs no whole-volume copies."""
    present: set[int] = set()
    for plane in arr:
        if np.issubdtype(plane.dtype, np.floating):
            fractional = plane[plane != np.rint(plane)]      # NaN != NaN, so NaN lands here too
            if fractional.size:
                raise LNMError(f"{path}: label value {float(fractional.flat[0]):g} is not an integer; nnU-Net label "
                               "maps hold integer labels 0, 1, 2, ... (resampled with linear interpolation?)")
        values = plane.ravel().astype(np.int64)
        if values.size and 0 <= values.min() and values.max() < 2 ** 16:
            present.update(np.flatnonzero(np.bincount(values)).tolist())
        else:
            present.update(np.unique(values).tolist())
    return sorted(present)


def _convert_split(src: Path, dst: Path, split: str, ending: str, n_channels: int, values: dict[int, str],
                   listed: dict[int, str], min_volume_mm3: float, link: bool, json_file: Path) -> _SplitConversion:
    """images<split> + labels<split> -> images<split> + nodes<split>. ``listed``: every value of "labels" -> name."""
    out = _SplitConversion()
    label_files = {f.name[: -len(ending)]: f for f in _case_files(src / f"labels{split}", ending)}
    image_cases = {m.group("case") for f in _case_files(src / f"images{split}", ending)
                   if (m := CHANNEL_SUFFIX.match(f.name[: -len(ending)]))}
    for case in sorted(image_cases | set(label_files)):
        images = [src / f"images{split}" / f"{case}_{c:04d}{ending}" for c in range(n_channels)]
        missing = [f for f in images if not f.is_file()]
        if missing:
            out.problems.append(f"{missing[0]}: missing (case '{case}' has a label file but not all channels)")
            continue
        for f in images:
            _place(f, dst / f"images{split}" / f.name, link)
        if case not in label_files:
            if split == "Tr":
                out.problems.append(f"{src / 'labelsTr' / (case + ending)}: missing (case '{case}' has images)")
            continue
        labels = read_image(label_files[case])
        arr = sitk.GetArrayViewFromImage(labels)
        try:
            found = _label_map_values(arr, label_files[case])
        except LNMError as e:
            out.problems.append(str(e))
            continue
        unlisted = [v for v in found if v not in listed]
        if unlisted:       # a value "labels" does not name: silently making it background would lose nodes
            out.problems.append(f"{label_files[case]}: label value(s) {unlisted} not listed in {json_file.name} "
                                f"\"labels\" ({', '.join(f'{n}={v}' for v, n in listed.items())}); fix the mask or "
                                "add the label")
            continue
        out.values_seen.update(found)
        # other labels -> 0; each LN label keeps its value, so touching nodes of two LN labels stay two nodes
        ln = sitk.GetImageFromArray(np.where(np.isin(arr, list(values)), arr, 0).astype(np.uint16))
        ln.CopyInformation(labels)
        result = split_components(ln, min_volume_mm3)
        write_mask(result.mask, dst / f"nodes{split}" / f"{case}{ending}")
        out.counts[case] = result.n_nodes
        out.sources[case] = [values[v] for v in result.source_values]
        out.n_removed += result.n_removed
    return out


def _check_nodes_found(train: _SplitConversion, values: dict[int, str], labels_dir: Path,
                       min_volume_mm3: float) -> None:
    """Refuse a conversion whose training cases hold no node: the label chosen is not the one drawn."""
    if sum(train.counts.values()) or not train.counts:
        return
    named = ", ".join(f"'{n}' (value {v})" for v, n in values.items())
    if train.n_removed:
        raise LNMError(f"{labels_dir}: all {train.n_removed} component(s) of the lymph-node label {named} are "
                       f"smaller than --min_volume {min_volume_mm3:g} mm^3; lower --min_volume")
    raise LNMError(f"{labels_dir}: no training case holds the lymph-node label {named} (the label files hold "
                   f"value(s) {sorted(train.values_seen)}); pass --label with the label that marks the nodes")


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
    if not ending.startswith("."):
        raise LNMError(f"{json_file}: \"file_ending\" '{ending}' must start with a dot (e.g. '.{ending}')")
    labels = meta["labels"]
    if all(str(k).strip().isdigit() for k in labels):      # nnU-Net v1 order {"1": "name"}: make it {name: value}
        labels = {str(v): int(k) for k, v in labels.items()}
    listed = {v: str(n) for n, value in labels.items() for v in _label_values(str(n), value, json_file)}
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
        train = _convert_split(source, staging, "Tr", ending, len(channels), values, listed, min_volume_mm3, link,
                               json_file)
        test = _convert_split(source, staging, "Ts", ending, len(channels), values, listed, min_volume_mm3, link,
                              json_file)
        problems = train.problems + test.problems
        if problems:
            raise LNMError("\n".join(problems))
        counts, sources, test_counts, test_sources = train.counts, train.sources, test.counts, test.sources
        if not counts:
            assumed = "" if "file_ending" in meta else f"; {json_file.name} names no \"file_ending\", so {ending} was assumed"
            raise LNMError(f"{source / 'labelsTr'}: no cases found (expected <case>{ending} beside "
                           f"imagesTr/<case>_0000{ending}{assumed})")
        _check_nodes_found(train, values, source / "labelsTr", min_volume_mm3)
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
