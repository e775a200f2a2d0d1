"""The label convention shared by every table: 1 (metastatic / positive), 0, or empty = unknown."""
from __future__ import annotations

UNKNOWN = -1  # label value for "not known" in typed tables and caches


def parse_label(text) -> int:
    """'1' -> 1, '0' -> 0, '' -> UNKNOWN; anything else raises ValueError."""
    t = str(text).strip()
    if t in ("", "nan", "NaN"):
        return UNKNOWN
    if t in ("1", "1.0"):
        return 1
    if t in ("0", "0.0"):
        return 0
    raise ValueError(f"label must be 1, 0 or empty, got '{t}'")
