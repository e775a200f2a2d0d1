"""Node features of every case of a raw dataset, cached in the preprocessed folder (one CSV per case,
written atomically, redone when the case's files or the feature settings change)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pandas as pd

from lnm_auto.datasets.raw_dataset import RawCase, RawDataset, read_image
from lnm_auto.plans.radiomics_topology import RadiomicsTopology
from lnm_auto.radiomics.features import FEATURE_COLUMNS, node_features
from lnm_auto.utils.io import save_csv_atomic
from lnm_auto.utils.processes import map_in_workers


def case_node_features(case: RawCase, topology: RadiomicsTopology) -> pd.DataFrame:
    """Feature table (index = node id) of one raw case's instance mask, error lines naming the files."""
    image = read_image(case.image_files[topology.image_channel])
    mask = read_image(case.node_mask_file)
    return node_features(image, mask, modality_hint=topology.modality_hint, texture_mode=topology.texture_mode)


def case_inputs(images: list, mask, topology: RadiomicsTopology) -> dict:
    """What a radiomics model scores for one new case: node ids and their feature rows (lnm_predict)."""
    table = node_features(images[topology.image_channel], mask, modality_hint=topology.modality_hint,
                          texture_mode=topology.texture_mode)
    return {"node_ids": table.index.to_numpy(), "radiomics_features": table[list(FEATURE_COLUMNS)]}


def _settings_key(case: RawCase, topology: RadiomicsTopology) -> str:
    files = [case.image_files[topology.image_channel], case.node_mask_file]
    stamp = [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    return hashlib.sha1(json.dumps([stamp, repr(topology), FEATURE_COLUMNS]).encode()).hexdigest()[:16]


def _cached_or_computed(args) -> pd.DataFrame:
    case, topology, cache_dir = args
    path = Path(cache_dir) / f"{case.case_id}.csv"
    key = _settings_key(case, topology)
    if path.is_file():
        cached = pd.read_csv(path, dtype={"case": str, "settings": str})
        if len(cached) and (cached["settings"] == key).all():
            return cached
    table = case_node_features(case, topology).reset_index()
    table.insert(0, "case", case.case_id)
    table["settings"] = key
    save_csv_atomic(table, path)
    return table


def dataset_node_features(raw_dataset: Path, topology: RadiomicsTopology, cache_dir: Path,
                          num_processes: int = 1, log=print) -> pd.DataFrame:
    """Features of every node of every training case (case, node, FEATURE_COLUMNS), computed once and cached."""
    ds = RawDataset.load(raw_dataset)
    cases = ds.cases("Tr")
    todo = [(c, topology, cache_dir) for c in cases]
    log(f"radiomics features of {len(cases)} cases ({topology.modality_hint}, {topology.texture_mode} texture); "
        f"cached in {cache_dir}")
    tables = map_in_workers(_cached_or_computed, todo, num_processes, "radiomics features", progress=False)
    return pd.concat(tables, ignore_index=True).drop(columns="settings")
