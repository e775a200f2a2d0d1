"""Loading user-supplied weights into a network: names matched across prefixes, shapes checked, a report of
what was loaded (``-pretrained_weights``, WSP pre-training results, DINOv2 files). Files are read with
``torch.load(weights_only=True)``: nothing in them is executed."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from lnm_auto.utils.errors import LNMError

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
