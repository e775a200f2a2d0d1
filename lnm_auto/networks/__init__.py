"""Classification networks: ``build_network`` (topology -> nn.Module) and ``load_pretrained_weights``.

Contract of every network: ``forward(batch: dict[str, Tensor]) -> dict[str, Tensor]``; each output
is a logit tensor of shape (B,) (also for B == 1); ``"fused"`` is always present and is the
prediction; side heads add ``"global"`` / ``"local"``. The trainer sums BCE over all keys.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from lnm_auto.networks.resenc_classifier import ResEncClassifier
from lnm_auto.networks.two_stream import TwoStreamNet
from lnm_auto.planning.global_local_topology import WegaTopology
from lnm_auto.planning.network_topology import ResEncTopology, TwoStreamTopology
from lnm_auto.planning.plans import ConfigurationPlan, Plans
from lnm_auto.utils.errors import LNMError

__all__ = ["build_network", "network_for", "load_pretrained_weights", "count_parameters", "global_branch_for"]


def build_network(topology: "TwoStreamTopology | ResEncTopology | WegaTopology", in_channels: int,
                  mask_channel: bool = False) -> nn.Module:
    """Build the network of a planned topology.

    ``in_channels``: channels C the first layer sees (image channels, + 1 when ``mask_channel``: the
    network then appends ``mask_<scale>`` to ``image_<scale>`` itself). For ``2d25`` each 2D image then
    has 3 * C channels.
    """
    if int(in_channels) < 1 + int(mask_channel):
        raise ValueError(f"in_channels must be >= {1 + int(mask_channel)}, got {in_channels}")
    if isinstance(topology, TwoStreamTopology):
        return TwoStreamNet(topology, in_channels, mask_channel)
    if isinstance(topology, ResEncTopology):
        return ResEncClassifier(topology, in_channels, mask_channel)
    if isinstance(topology, WegaTopology):
        from lnm_auto.networks.wega import WegaNet   # lazy: timm is only imported when wega is used
        return WegaNet(topology, in_channels, mask_channel)
    raise TypeError(f"no network for topology of type {type(topology).__name__}")


def network_for(plans: "Plans", config: "ConfigurationPlan") -> nn.Module:
    """The network of one configuration of the plans, with the input channels the plans count.

    With the configuration's multi-task switch on (``config.multitask``): ``MultiTaskNet`` around the
    base network, the base built without the mask channel (the mask enters through the soft pooling)."""
    if config.multitask is not None:
        from lnm_auto.networks.multitask import MultiTaskNet   # lazy: imports every network module
        return MultiTaskNet(build_network(config.network, len(plans.normalization), False), config.multitask)
    n_in = len(plans.normalization) + int(config.use_mask_channel)
    return build_network(config.network, n_in, config.use_mask_channel)


def count_parameters(network: nn.Module) -> int:
    """Number of parameters."""
    return sum(p.numel() for p in network.parameters())


_WRAPPER_KEYS = ("network_weights", "state_dict", "model", "model_state_dict")
# keys every ViT state dict has (Meta's DINOv2 files and timm's), after any prefix
_VIT_KEYS = ("pos_embed", "cls_token", "patch_embed.proj.weight")


def global_branch_for(network: nn.Module, path: "str | os.PathLike") -> nn.Module | None:
    """The ``WegaNet`` of ``network`` (itself, or the base of a multi-task net) when ``path`` holds the
    weights of a bare ViT (a DINOv2 file: ``pos_embed``, ``cls_token``, ``patch_embed.proj.weight`` and no
    ``global_vit.`` keys); else None, and the file is for :func:`load_pretrained_weights`.

    Such a file goes through ``WegaNet.load_global_weights``, which also resamples the position embedding
    to the planned token grid (DINOv2: 518 px -> 37 x 37 patches)."""
    from lnm_auto.networks.wega import WegaNet
    wega = next((m for m in network.modules() if isinstance(m, WegaNet)), None)
    if wega is None or not Path(path).is_file():
        return None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - unreadable files get load_pretrained_weights' one-line error
        return None
    if isinstance(obj, dict):
        obj = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), dict)), obj)
    keys = [k for k in obj if isinstance(k, str)] if isinstance(obj, dict) else []
    if any("global_vit." in k for k in keys):
        return None
    vit_like = all(any(k == v or k.endswith("." + v) for k in keys) for v in _VIT_KEYS)
    return wega if vit_like else None


def _prefixes(keys, max_depth: int = 3) -> set[str]:
    """Every dotted prefix ('a.', 'a.b.', ...) up to max_depth components, plus ''."""
    out = {""}
    for k in keys:
        parts = k.split(".")
        for d in range(1, min(max_depth, len(parts) - 1) + 1):
            out.add(".".join(parts[:d]) + ".")
    return out


def load_pretrained_weights(network: nn.Module, path: "str | os.PathLike", prefix_hint: str | None = None) -> dict:
    """Copy the tensors of a weights file into ``network`` where names and shapes match.

    The file (``torch.load(..., weights_only=True)``) is a state dict, or a checkpoint holding one
    under ``network_weights`` / ``state_dict`` / ``model`` / ``model_state_dict``. Keys match
    exactly, or after stripping a prefix shared by the file's keys ("module.", "_orig_mod.",
    "encoder.", ...) and/or adding a prefix of the network's modules (a saved encoder into
    ``encoder.``). The (strip, add) pair matching the most keys wins; when several network
    prefixes tie (one MobileNetV3 state dict fits both streams of ``2d25``), all of them get the
    weights. ``prefix_hint`` (e.g. "global_stream.backbone.") is tried as a prefix to strip from the
    file and wins ties as the network prefix to load into. Only same-shape tensors are copied.

    Returns ``dict(matched, missing, unexpected, shape_mismatch, source_prefix, target_prefixes)``:
    network keys loaded, network keys not loaded, file keys not used, and "key: file shape vs
    network shape" lines. Raises LNMError if the file is missing or unreadable, or nothing matches.
    """
    path = Path(path)
    if not path.is_file():
        raise LNMError(f"Pretrained weights file {path} does not exist.")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling problem is the user's file
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LNMError(f"Pretrained weights file {path} could not be read as a torch weights file ({msg}).") from None
    if isinstance(obj, dict):
        for key in _WRAPPER_KEYS:
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict):
        raise LNMError(f"Pretrained weights file {path} holds a {type(obj).__name__}, not a state dict.")
    source = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not source:
        raise LNMError(f"Pretrained weights file {path} holds no tensors.")

    target = network.state_dict()
    hint = (prefix_hint if prefix_hint.endswith(".") else prefix_hint + ".") if prefix_hint else None
    strip_candidates = _prefixes(source) | ({hint} if hint else set())
    # every way to write a network key as <add prefix> + <suffix>, the prefix ending at a dot
    prefixes_of_suffix: dict[str, list[str]] = {}
    for t in target:
        prefixes_of_suffix.setdefault(t, []).append("")
        for i, ch in enumerate(t):
            if ch == ".":
                prefixes_of_suffix.setdefault(t[i + 1:], []).append(t[:i + 1])

    def counts_for(strip: str) -> dict[str, int]:
        """Add prefix -> number of source keys that match a network key once ``strip`` is removed."""
        counts: dict[str, int] = {}
        for k in source:
            if k.startswith(strip):
                for add in prefixes_of_suffix.get(k[len(strip):], ()):
                    counts[add] = counts.get(add, 0) + 1
        return counts

    # the strip prefix with the best single add prefix; then every add prefix tying with it
    n_best, strip, adds = 0, "", []
    for cand in sorted(strip_candidates, key=lambda p: (len(p), p)):
        counts = counts_for(cand)
        if hint and hint in counts:
            counts[hint] += 0.5  # the hint breaks ties
        if counts and max(counts.values()) > n_best:
            n_best = max(counts.values())
            strip, adds = cand, sorted(a for a, c in counts.items() if c == n_best)
    if n_best == 0:
        raise LNMError(f"Pretrained weights file {path}: none of its {len(source)} keys match the network's "
                       f"parameter names (even after stripping/adding a prefix).")

    new_state, used_src, mismatch, mismatched_keys = {}, set(), [], set()
    for add in adds:
        for k in source:
            if not k.startswith(strip):
                continue
            t = add + k[len(strip):]
            if t not in target or t in new_state or t in mismatched_keys:
                continue
            used_src.add(k)
            if tuple(source[k].shape) != tuple(target[t].shape):
                mismatched_keys.add(t)
                mismatch.append(f"{t}: file {tuple(source[k].shape)} vs network {tuple(target[t].shape)}")
                continue
            new_state[t] = source[k].to(dtype=target[t].dtype)
    if not new_state:
        raise LNMError(f"Pretrained weights file {path}: {len(mismatch)} key(s) match the network by name but "
                       f"none by shape (first: {mismatch[0]}).")
    network.load_state_dict(new_state, strict=False)
    return {
        "matched": sorted(new_state),
        "missing": sorted(k for k in target if k not in new_state and k not in mismatched_keys),
        "unexpected": sorted(k for k in source if k not in used_src),
        "shape_mismatch": mismatch,
        "source_prefix": strip,
        "target_prefixes": adds,
    }
