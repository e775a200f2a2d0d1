"""The label convention shared by every table (nodes.csv, stations.csv, patients.csv, lnm_evaluate's reference
tables, lnm_convert's label CSVs): 1 (metastatic / positive), 0, or an empty cell = unknown.

One rule, one way to say each thing: ``1`` / ``0`` (also as ``1.0`` / ``0.0``, what spreadsheets export) and an
empty cell for "not known". Everything else is refused with its line and value, ``NaN``, ``NA`` and ``nan``
included: such text is as likely a failed formula or an export of another convention as a deliberate "unknown",
and ``yes`` / ``true`` / ``2`` are refused for the same reason.
"""
from __future__ import annotations

UNKNOWN = -1  # label value for "not known" in typed tables and caches
LABEL_RULE = "1, 0 or empty (unknown)"


def parse_label(text) -> int:
    """'1' -> 1, '0' -> 0, '' -> UNKNOWN; anything else (NaN text included) raises ValueError."""
    t = str(text).strip()
    if t == "":
        return UNKNOWN
    if t in ("1", "1.0"):
        return 1
    if t in ("0", "0.0"):
        return 0
    raise ValueError(f"label must be {LABEL_RULE}, got '{t}'{unknown_hint(t)}")


def unknown_hint(text: str) -> str:
    """A pointer to the empty cell, for text that was probably meant as "unknown"."""
    return "; leave the cell empty for an unknown label" if str(text).strip().lower() in UNKNOWN_WORDS else ""


UNKNOWN_WORDS = ("nan", "na", "n/a", "none", "null", "unknown", "?", "-")
