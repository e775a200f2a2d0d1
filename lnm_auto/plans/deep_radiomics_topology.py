"""Configuration ``deep_radiomics``: the radiomics features of a node joined to its embedding by a *frozen*
ImageNet-pretrained 2.5D backbone, fed to the radiomics classifier (documentation/radiomics.md).

Pure planning arithmetic, no torch: the embedding itself is ``lnm_auto.networks.frozen_embedding``.
"""
from __future__ import annotations

from dataclasses import dataclass

from lnm_auto.plans.crop_scale import CropScale
from lnm_auto.plans.radiomics_topology import RadiomicsTopology
from lnm_auto.plans.two_stream_topology import (BACKBONE_SPECS, DEFAULT_PRETRAINED_WEIGHTS, IMAGENET_INPUT_WINDOW,
                                                IMAGENET_WEIGHTS, slice_group_starts)

# The 2d25 plan's two views: the node in its context and the zoomed-in node.
EMBEDDING_SCALES = ("global", "local")
# Backbone levels pooled (timm features_only indices): the last one (stride 32, 320 channels for
# efficientnet_lite0), so the embedding has 2 x 320 columns next to the 87 radiomics features.
FEATURE_LEVELS = (-1,)


@dataclass(frozen=True)
class DeepRadiomicsTopology:
    """``deep_radiomics``: the radiomics settings (as :class:`RadiomicsTopology`, so both configurations share one
    feature cache) plus the frozen backbone: its timm name, the ImageNet weights (id and the SHA-256 their file
    must have), the z-score window mapped onto [0, 1] before ImageNet's normalisation, the crop scales embedded
    (each one stream: its slice triplets through the backbone) and the backbone levels pooled."""

    image_channel: int
    modality_hint: str
    texture_mode: str
    backbone: str
    weights_id: str
    weights_sha256: str
    image_window: tuple[float, float]
    embedding_scales: tuple[str, ...]
    feature_levels: tuple[int, ...]

    config_name = "deep_radiomics"

    @property
    def radiomics(self) -> RadiomicsTopology:
        """The radiomics part: equal to the ``radiomics`` configuration's topology when planned together."""
        return RadiomicsTopology(self.image_channel, self.modality_hint, self.texture_mode)


def plan_deep_radiomics(radiomics: RadiomicsTopology) -> DeepRadiomicsTopology:
    """The radiomics plan of the dataset with the default ImageNet backbone (the one 2d25 fine-tunes) frozen on
    top. Always pretrained: a frozen randomly initialised backbone would embed noise."""
    weights = IMAGENET_WEIGHTS[DEFAULT_PRETRAINED_WEIGHTS]
    return DeepRadiomicsTopology(radiomics.image_channel, radiomics.modality_hint, radiomics.texture_mode,
                                 weights.backbone, weights.weights_id, weights.sha256, IMAGENET_INPUT_WINDOW,
                                 EMBEDDING_SCALES, FEATURE_LEVELS)


def estimate_embedding_gflops(topology: DeepRadiomicsTopology, scales: dict[str, CropScale]) -> float:
    """Forward GFLOPs of one node's embedding: the backbone (up to stride 32, as ``BackboneSpec`` counts it) on
    every slice triplet of every embedded scale's ROI; pooling is not counted (FlopCounterMode's rule)."""
    spec = BACKBONE_SPECS[topology.backbone]
    flops = 0
    for name in topology.embedding_scales:
        z, y, x = scales[name].roi_shape
        flops += len(slice_group_starts(z)) * spec.flops(y, x, 1)
    return flops / 1e9
