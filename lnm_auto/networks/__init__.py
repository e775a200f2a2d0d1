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

from lnm_auto.planning.network_topology import ResEncTopology, TwoStreamTopology
from lnm_auto.utils.errors import LNMError

__all__ = ["build_network", "load_pretrained_weights", "count_parameters"]


def build_network(topology: "TwoStreamTopology | ResEncTopology", in_channels: int) -> nn.Module:
    """Build the network of a planned topology.

    ``in_channels``: channels C of the input volumes (image channels, + 1 if the plan feeds the node
    mask). For ``2d25`` each 2D image then has 3 * C channels.
    """
    if int(in_channels) < 1:
        raise ValueError(f"in_channels must be >= 1, got {in_channels}")
    if isinstance(topology, TwoStreamTopology):
        from lnm_auto.networks.two_stream import TwoStreamNet
        return TwoStreamNet(topology, in_channels)
    if isinstance(topology, ResEncTopology):
        from lnm_auto.networks.resenc_classifier import ResEncClassifier
        return ResEncClassifier(topology, in_channels)
    raise TypeError(f"no network for topology of type {type(topology).__name__}")


def count_parameters(network: nn.Module) -> int:
    return sum(p.numel() for p in network.parameters())


_WRAPPER_KEYS = ("network_weights", "state_dict", "model", "model_state_dict")


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
    weights. ``prefix_hint`` is tried as well, in both roles. Only same-shape tensors are copied.

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
    hint = [prefix_hint if prefix_hint.endswith(".") or not prefix_hint else prefix_hint + "."] if prefix_hint else []
    strip_candidates = _prefixes(source) | set(hint)
    add_candidates = _prefixes(target) | set(hint)

    def mapping(strip: str, add: str) -> dict[str, str]:
        m = {}
        for k in source:
            if k.startswith(strip):
                t = add + k[len(strip):]
                if t in target:
                    m[k] = t
        return m

    # best strip prefix: by the best single add prefix; then all add prefixes that tie with it
    best = (0, None, [])
    for strip in sorted(strip_candidates, key=len):
        counts = {add: len(mapping(strip, add)) for add in add_candidates}
        top = max(counts.values())
        if top > best[0]:
            adds = sorted((a for a, c in counts.items() if c == top), key=len)
            # a shorter add prefix that ties subsumes nothing; keep only disjoint targets
            best = (top, strip, adds)
    n_best, strip, adds = best
    if n_best == 0:
        raise LNMError(f"Pretrained weights file {path}: none of its {len(source)} keys match the network's "
                       f"parameter names (even after stripping/adding a prefix).")

    new_state, used_src, mismatch = {}, set(), []
    for add in adds:
        for k, t in mapping(strip, add).items():
            if t in new_state:
                continue
            used_src.add(k)
            if tuple(source[k].shape) != tuple(target[t].shape):
                mismatch.append(f"{t}: file {tuple(source[k].shape)} vs network {tuple(target[t].shape)}")
                continue
            new_state[t] = source[k].to(dtype=target[t].dtype)
    if not new_state:
        raise LNMError(f"Pretrained weights file {path}: {len(mismatch)} key(s) match the network by name but "
                       f"none by shape (first: {mismatch[0]}).")
    network.load_state_dict(new_state, strict=False)
    return {
        "matched": sorted(new_state),
        "missing": sorted(k for k in target if k not in new_state and not any(m.startswith(k + ":") for m in mismatch)),
        "unexpected": sorted(k for k in source if k not in used_src),
        "shape_mismatch": mismatch,
        "source_prefix": strip,
        "target_prefixes": adds,
    }
