"""``lnm_train DATASET deep_radiomics FOLD``: the radiomics configuration with each node's frozen-backbone
embedding (``networks.frozen_embedding``) joined to its radiomics features.

Everything else is RadiomicsTrainer's: the folds, the label levels, the classifier chosen by inner CV (its model
family and the logistic model's penalty), ``fold_<k>/radiomics_model.json`` (JSON, no pickle), the validation
outputs. The embeddings are computed once per case from the crop caches (the crops the networks train on, read
through ``CropStore`` with the plans' normalization) and cached beside the radiomics features, in
``<preprocessed>/<plans>_deep_radiomics/<case>.npz``, keyed by the topology (the weights' SHA-256 included), the
crop scales, the normalization and the case's crop cache.
"""
from __future__ import annotations

import hashlib
import json
import time
import zipfile

import numpy as np
import pandas as pd

from lnm_auto.networks.frozen_embedding import check_weights, embedding_columns, node_embeddings
from lnm_auto.plans.deep_radiomics_topology import DeepRadiomicsTopology
from lnm_auto.radiomics.deep_features import joined_features
from lnm_auto.radiomics.features import FEATURE_COLUMNS
from lnm_auto.training.data import load_batch
from lnm_auto.training.radiomics_trainer import RadiomicsTrainer
from lnm_auto.utils.dataclass_json import to_dict
from lnm_auto.utils.io import atomic_path
from lnm_auto.utils.write_errors import make_folder

CACHE_FORMAT = 1


class DeepRadiomicsTrainer(RadiomicsTrainer):
    """Fits the radiomics classifier on [radiomics features, frozen-backbone embedding] of the fold's nodes."""

    topology_type = DeepRadiomicsTopology

    @property
    def topology(self) -> DeepRadiomicsTopology:
        return self.config.network

    def check_configuration(self) -> None:
        """Also the frozen backbone's weights (SHA-256), before any feature is computed."""
        super().check_configuration()
        check_weights(self.topology)

    def radiomics_settings(self):
        """The radiomics part of the plan: the same feature cache as the radiomics configuration."""
        return self.topology.radiomics

    def feature_columns(self) -> list[str]:
        """The 87 radiomics features, then the embedding."""
        return list(FEATURE_COLUMNS) + embedding_columns(self.topology)

    def compute_features(self) -> pd.DataFrame:
        """Radiomics features joined to the embeddings of the fold's cases (index (case, node))."""
        radiomics = super().compute_features()
        embeddings = self.fold_embeddings()
        cases = radiomics.index.get_level_values("case").isin(embeddings.index.get_level_values("case"))
        return joined_features(radiomics[cases], embeddings)

    @property
    def embedding_cache(self):
        return self.preprocessed_dataset / f"{self.plans.plans_name}_deep_radiomics"

    def fold_embeddings(self) -> pd.DataFrame:
        """The embeddings of every node of the fold's training and validation cases (index (case, node))."""
        cases = sorted(set(self.train_cases) | set(self.val_cases))
        t0, computed = time.time(), []
        tables = [self.case_embeddings(case, computed) for case in cases]
        nodes = sum(len(t) for t in tables)
        self.log.print(f"frozen {self.topology.backbone} embeddings ({self.topology.weights_id}, "
                       f"{len(self.feature_columns()) - len(FEATURE_COLUMNS)} columns) of {nodes} nodes in "
                       f"{len(cases)} cases: {len(computed)} case(s) computed in {time.time() - t0:.1f} s, the others "
                       f"read from {self.embedding_cache}")
        return pd.concat(tables)

    def case_embeddings(self, case: str, computed: list[str]) -> pd.DataFrame:
        """One case's embeddings from the cache, or computed from its cached crops and cached (``computed`` gets
        the case then)."""
        path = self.embedding_cache / f"{case}.npz"
        key = self.settings_key(case)
        cached = _read_cache(path, key)
        if cached is None:
            records = self.nodes[self.nodes["case"] == case].sort_values("index")
            self.store.unpack([case])
            batch = load_batch(self.store, records, self.topology.embedding_scales)
            cached = (records["node"].to_numpy(np.int64), node_embeddings(batch, self.topology, self.plans))
            make_folder(self.embedding_cache)
            with atomic_path(path, suffix=".npz") as tmp:
                np.savez(tmp, node=cached[0], embedding=cached[1], settings=np.asarray(key))
            computed.append(case)
        node, embedding = cached
        index = pd.MultiIndex.from_arrays([[case] * len(node), node], names=["case", "node"])
        return pd.DataFrame(embedding, index=index, columns=embedding_columns(self.topology))

    def settings_key(self, case: str) -> str:
        """What a case's embedding depends on: the topology (weights' SHA-256 included), the embedded scales, the
        plans' normalization and the case's crop cache (rewritten when the case is preprocessed again)."""
        npz = self.crops_dir / f"{case}.npz"
        stat = npz.stat() if npz.is_file() else None
        scales = [to_dict(self.plans.scales[s]) for s in self.topology.embedding_scales]
        parts = [CACHE_FORMAT, to_dict(self.topology), scales, to_dict(self.plans.normalization),
                 [stat.st_size, stat.st_mtime_ns] if stat else None]
        return hashlib.sha1(json.dumps(parts).encode()).hexdigest()[:16]


def _read_cache(path, key: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(node ids, embeddings) of a cache file written for ``key``; None when absent, stale or unreadable (it is
    then computed and written again)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            if str(f["settings"]) != key:
                return None
            return f["node"].astype(np.int64), f["embedding"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None
