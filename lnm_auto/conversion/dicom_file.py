"""Is a DICOM file whole? pydicom reads a truncated file without a word: the elements past the cut are just
missing, so a cut RTSTRUCT loses ROIs or contours silently, or fails later with an AttributeError deep inside.

``damage(path)`` walks the file's element structure once (tags and lengths only, values skipped) and
says where a declared length runs past the end of the file, or a sequence or item is never closed.
Part 10 files (the ``DICM`` preamble) in implicit or explicit VR little endian or explicit big endian are
walked; other files (deflated, raw datasets without a preamble) are not judged.
"""
from __future__ import annotations

import struct
from pathlib import Path

from lnm_auto.utils.errors import LNMError

PREAMBLE_END = 132
ITEM, ITEM_END, SEQUENCE_END = (0xFFFE, 0xE000), (0xFFFE, 0xE00D), (0xFFFE, 0xE0DD)
UNDEFINED = 0xFFFFFFFF
LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
IMPLICIT_LITTLE = "1.2.840.10008.1.2"
EXPLICIT_BIG = "1.2.840.10008.1.2.2"
DEFLATED = ("1.2.840.10008.1.2.1.99",)


class _Damaged(Exception):
    """Where the walk found the file cut short or malformed."""


def _header(data: bytes, pos: int, limit: int, explicit: bool, endian: str) -> tuple[tuple[int, int], bytes | None, int, int]:
    """(tag, VR or None, value length, value start) of the element at ``pos``."""
    if pos + 8 > limit:
        raise _Damaged(f"an element header at byte {pos} runs past the end of the file ({limit} bytes)")
    tag = struct.unpack(endian + "HH", data[pos:pos + 4])
    if tag[0] == 0xFFFE or not explicit:      # items and delimiters never carry a VR
        return tag, None, struct.unpack(endian + "I", data[pos + 4:pos + 8])[0], pos + 8
    vr = data[pos + 4:pos + 6]
    if vr in LONG_VRS:
        if pos + 12 > limit:
            raise _Damaged(f"element ({tag[0]:04X},{tag[1]:04X}) at byte {pos} runs past the end of the file")
        return tag, vr, struct.unpack(endian + "I", data[pos + 8:pos + 12])[0], pos + 12
    return tag, vr, struct.unpack(endian + "H", data[pos + 6:pos + 8])[0], pos + 8


def _walk_elements(data: bytes, pos: int, limit: int, explicit: bool, endian: str, in_open_item: bool) -> int:
    """Walk data elements from ``pos``; returns where they end (after the item delimiter of an open item)."""
    while pos < limit:
        tag, vr, length, start = _header(data, pos, limit, explicit, endian)
        if tag == ITEM_END and in_open_item:
            return start
        if length == UNDEFINED:              # a sequence (or encapsulated pixel data): items until a delimiter
            pos = _walk_items(data, start, limit, explicit and vr != b"UN", endian)
        elif start + length > limit:
            raise _Damaged(f"element ({tag[0]:04X},{tag[1]:04X}) declares {length} bytes from byte {start}, "
                           f"but the file ends at byte {limit}")
        else:
            pos = start + length
    if in_open_item:
        raise _Damaged(f"the file ends at byte {limit} inside a sequence item")
    return pos


def _walk_items(data: bytes, pos: int, limit: int, explicit: bool, endian: str) -> int:
    """Walk the items of an undefined-length sequence from ``pos``; returns where its delimiter ends."""
    while True:
        tag, _, length, start = _header(data, pos, limit, explicit, endian)
        if tag == SEQUENCE_END:
            return start
        if tag != ITEM:
            raise _Damaged(f"({tag[0]:04X},{tag[1]:04X}) at byte {pos} where a sequence item should start")
        if length == UNDEFINED:
            pos = _walk_elements(data, start, limit, explicit, endian, in_open_item=True)
        elif start + length > limit:
            raise _Damaged(f"a sequence item declares {length} bytes from byte {start}, but the file ends at byte {limit}")
        else:
            pos = start + length


def _transfer_syntax(data: bytes) -> tuple[str, int]:
    """(transfer syntax UID, where the data set starts) from the file meta group (explicit VR little endian)."""
    pos, syntax = PREAMBLE_END, ""
    while pos + 8 <= len(data) and struct.unpack("<H", data[pos:pos + 2])[0] == 0x0002:
        tag, _, length, start = _header(data, pos, len(data), True, "<")
        if start + length > len(data):
            raise _Damaged(f"the file meta information ends past the end of the file ({len(data)} bytes)")
        if tag == (0x0002, 0x0010):
            syntax = data[start:start + length].rstrip(b"\0 ").decode("ascii", "replace")
        pos = start + length
    return syntax, pos


def damage(path: Path) -> str | None:
    """Why the DICOM file ``path`` is cut short or malformed, or None when it is whole (or not judged)."""
    data = Path(path).read_bytes()
    if len(data) < PREAMBLE_END or data[128:PREAMBLE_END] != b"DICM":
        return None
    try:
        syntax, pos = _transfer_syntax(data)
        if syntax in DEFLATED:
            return None
        _walk_elements(data, pos, len(data), syntax != IMPLICIT_LITTLE, ">" if syntax == EXPLICIT_BIG else "<", False)
    except _Damaged as e:
        return str(e)
    return None


def check_whole(path: Path) -> None:
    """Refuse a truncated or malformed DICOM file with one line naming it."""
    problem = damage(path)
    if problem:
        raise LNMError(f"{path}: damaged or truncated DICOM file ({problem}); copy or export it again")
