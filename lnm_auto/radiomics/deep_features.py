"""``deep_radiomics`` inputs: each node's radiomics features joined to its frozen-backbone embedding
(``networks.frozen_embedding``), one row per node, the columns a fitted classifier reads by name."""
from __future__ import annotations

import pandas as pd

from lnm_auto.networks.frozen_embedding import embedding_table
from lnm_auto.plans.deep_radiomics_topology import DeepRadiomicsTopology
from lnm_auto.plans.plans import Plans
from lnm_auto.preprocessing.crops import preprocess_images
from lnm_auto.radiomics.dataset_features import case_inputs as radiomics_case_inputs


def joined_features(radiomics: pd.DataFrame, embeddings: pd.DataFrame) -> pd.DataFrame:
    """The radiomics rows (their index and order) with the embedding columns of the same nodes appended."""
    missing = radiomics.index.difference(embeddings.index)
    if len(missing):   # both come from the same node mask: a node without an embedding is a bug of ours
        raise ValueError(f"no embedding for node(s) {list(missing[:3])}")
    return pd.concat([radiomics, embeddings.loc[radiomics.index]], axis=1)


def case_inputs(images: list, mask, plans: Plans, topology: DeepRadiomicsTopology) -> dict:
    """What a deep_radiomics model scores for one new case (lnm_predict): node ids and their joined rows, the
    embeddings from the crops ``preprocess_images`` cuts (what training read from its caches)."""
    radiomics = radiomics_case_inputs(images, mask, topology.radiomics)
    embeddings = embedding_table(preprocess_images(images, mask, plans), topology, plans)
    table = radiomics["radiomics_features"]
    return {"node_ids": radiomics["node_ids"], "radiomics_features": joined_features(table, embeddings)}
