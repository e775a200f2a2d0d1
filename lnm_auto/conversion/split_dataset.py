"""``lnm_plan_and_preprocess --split_components``: a raw dataset's binary node masks -> instance masks, in place.

Only masks that look binary (``components.needs_splitting``) are rewritten; instance masks are left
alone, so the flag is safe to pass on every run. The original of every rewritten mask is kept in
``nodesTr_binary/`` (``nodesTs_binary/``), and the nodes table before the first change as
``nodesTr_binary/nodes.csv`` (``nodesTs_binary/nodesTs.csv``). Every write is atomic; a run that was
interrupted is completed by the next one (a mask with a backup counts as converted).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk

from lnm_auto.imaging.components import DEFAULT_MIN_VOLUME_MM3, NODES_CSV_COLUMNS, nodes_skeleton, split_if_binary
from lnm_auto.datasets.raw_dataset import RawDataset, read_image
from lnm_auto.utils.errors import LNMError
from lnm_auto.utils.io import atomic_copy, atomic_path, save_csv_atomic

NODE_TABLES = {"Tr": "nodes.csv", "Ts": "nodesTs.csv"}


def write_mask(mask: sitk.Image, path: Path) -> None:
    """Write a mask atomically, compressed, keeping the file's ending (the format)."""
    ending = next((e for e in (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd") if path.name.endswith(e)), path.suffix)
    with atomic_path(path, suffix=ending) as tmp:
        sitk.WriteImage(mask, str(tmp), useCompression=True)


def split_dataset_components(ds: RawDataset, min_volume_mm3: float = DEFAULT_MIN_VOLUME_MM3) -> list[str]:
    """Split every binary node mask of nodesTr/ and nodesTs/ into instances; one line per converted case."""
    lines: list[str] = []
    for split, table_name in NODE_TABLES.items():
        folder, backup = ds.root / f"nodes{split}", ds.root / f"nodes{split}_binary"
        if not folder.is_dir():
            continue
        node_counts: dict[str, int] = {}
        unchanged = 0
        for case_id in ds.case_ids(split):
            path = folder / f"{case_id}{ds.file_ending}"
            try:
                mask = read_image(path)
            except LNMError:
                continue          # missing or unreadable: verification names it
            if mask.GetDimension() != 3 or mask.GetNumberOfComponentsPerPixel() != 1:
                continue
            result = split_if_binary(mask, min_volume_mm3)
            if result is None:
                if (backup / path.name).is_file():    # converted by an earlier, interrupted run
                    node_counts[case_id] = int(sitk.GetArrayViewFromImage(mask).max())
                else:
                    unchanged += 1
                continue
            kept = backup / path.name
            if not kept.is_file():
                atomic_copy(path, kept)
            elif kept.read_bytes() != path.read_bytes():   # the copy is of an earlier mask: this one would be lost
                raise LNMError(f"{path}: a binary mask to split again, but {kept} keeps the original of an earlier "
                               "split; move that file away first, so that this mask is kept too")
            write_mask(result.mask, path)
            node_counts[case_id] = result.n_nodes
            values = sorted(set(result.source_values))
            lines.append(f"{case_id}: {path.relative_to(ds.root)} had label value(s) {values} -> "
                         f"{result.summary(min_volume_mm3)}; original kept in {backup.relative_to(ds.root)}/")
        if node_counts:
            lines.append(_update_node_table(ds.root / table_name, backup, node_counts))
        if unchanged:
            lines.append(f"{folder.relative_to(ds.root)}/: {unchanged} instance mask(s) left unchanged")
    return lines


def _update_node_table(table_path: Path, backup: Path, node_counts: dict[str, int]) -> str:
    """Give every converted case rows 1..n (empty station and label) unless it already lists exactly those."""
    if table_path.is_file():
        table = pd.read_csv(table_path, dtype=str, keep_default_na=False, skipinitialspace=True)
        if not {"case", "node"} <= set(table.columns):
            raise LNMError(f"{table_path}: needs the columns {','.join(NODES_CSV_COLUMNS)} before nodes can be added")
        if not (backup / table_path.name).is_file():
            atomic_copy(table_path, backup / table_path.name)
    else:
        table = pd.DataFrame(columns=NODES_CSV_COLUMNS)
    cases = table["case"].str.strip()
    ids = pd.to_numeric(table["node"], errors="coerce")
    replaced = {c: n for c, n in node_counts.items()
                if set(ids[cases == c].dropna()) != set(np.arange(1, n + 1, dtype=float))}
    if not replaced:
        return f"{table_path.name}: already lists the nodes of the converted case(s)"
    kept = table[~cases.isin(replaced)]
    table = pd.concat([kept, nodes_skeleton(replaced)], ignore_index=True).fillna("")
    order = np.argsort(table["case"].astype(str).str.strip().to_numpy(), kind="stable")   # cases together
    save_csv_atomic(table.iloc[order], table_path)
    return (f"{table_path.name}: {len(replaced)} case(s) now list nodes 1..n with empty station and label; "
            "fill in the labels you know" + (f" (previous table kept in {backup.name}/)" if (backup / table_path.name).is_file() else ""))
