"""The one reader for the project's CSV tables (nodes.csv, stations.csv, patients.csv, predictions).

Cells are kept as stripped text (a UTF-8 byte-order mark, CRLF line endings and spaces after commas are
accepted); node ids are normalised here once: ``1``, ``1.0``, `` 1 `` -> 1. Anything else is one line
naming the file and the row.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from lnm_auto.utils.errors import LNMError

_INTEGER_TEXT = re.compile(r"^[+]?\d+(\.0*)?$")


def read_csv_text(path: str | Path, what: str = "table", required: tuple[str, ...] = ()) -> pd.DataFrame:
    """A CSV as stripped text cells; a missing file, unreadable CSV or missing column is one LNMError line."""
    path = Path(path)
    if not path.is_file():
        raise LNMError(f"{path}: {what} file not found")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True, encoding="utf-8-sig")
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise LNMError(f"{path}: cannot be read as CSV ({first})") from None
    df.columns = [str(c).strip() for c in df.columns]
    for c in df.columns:
        df[c] = df[c].astype(str).str.strip()
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise LNMError(f"{path}: column(s) {', '.join(missing)} missing; the {what} file needs columns "
                       f"{','.join(required)} (found: {','.join(df.columns) or 'none'})")
    return df


def parse_node_id(text) -> int:
    """'3', '3.0', ' 03' -> 3; anything else (empty, 'A', 0, -1, 2.5) raises ValueError."""
    t = str(text).strip()
    if not _INTEGER_TEXT.match(t) or int(t.split(".")[0]) <= 0:
        raise ValueError(f"node id '{t}' must be a positive integer")
    return int(t.split(".")[0])


def node_id_problems(column: pd.Series, path: Path) -> list[str]:
    """One line per row whose node id is not a positive integer (CSV line numbers, header = line 1)."""
    problems = []
    for i, text in enumerate(column.to_list()):
        try:
            parse_node_id(text)
        except ValueError:
            problems.append(f"{path}: line {i + 2}: node id '{str(text).strip()}' must be a positive integer")
    return problems


def node_ids(column: pd.Series, path: str | Path) -> pd.Series:
    """The node column as ints; the first bad row becomes one LNMError line naming the file and row."""
    bad = node_id_problems(column, Path(path))
    if bad:
        raise LNMError(bad[0])
    return column.map(parse_node_id).astype(np.int64)
