"""Reproducible HDF5 files: the object times that HDF5 records, set to zero.

ITK writes composite transforms (``*_xfm.h5``) with HDF5's default of recording, in every
version-2 object header, when the object was created, modified and accessed. Two runs that compute
the same transform therefore write different bytes. :func:`strip_object_times` sets those times
to 0 and recomputes each header's checksum, so that the same transform gives the same file; HDF5
readers (ITK, h5py) read the result as before.

The layout is the one of the HDF5 file format specification, section IV.A.1.b ("Version 2 Data
Object Header Prefix"); checksums are Bob Jenkins' lookup3 ``hashlittle`` with an initial value
of 0, as in HDF5's ``H5_checksum_lookup3``.
"""

from __future__ import annotations

import logging
import struct
from pathlib import Path

LOGGER = logging.getLogger(__name__)

_MASK = 0xFFFFFFFF
_SIGNATURE = b"OHDR"
_TIMES_STORED = 0x20
_PHASE_CHANGE_STORED = 0x10


def _rot(value: int, shift: int) -> int:
    return ((value << shift) | (value >> (32 - shift))) & _MASK


def lookup3(data: bytes, initval: int = 0) -> int:
    """Bob Jenkins' lookup3 ``hashlittle`` of ``data`` (HDF5's metadata checksum).

    >>> hex(lookup3(b""))
    '0xdeadbeef'
    >>> hex(lookup3(b"Four score and seven years ago"))
    '0x17770551'
    """
    length = len(data)
    a = b = c = (0xDEADBEEF + length + initval) & _MASK
    if length == 0:
        return c
    blocks = (length - 1) // 12  # the last 1-12 bytes go through the final mix
    for index in range(blocks):
        x, y, z = struct.unpack_from("<III", data, 12 * index)
        a, b, c = (a + x) & _MASK, (b + y) & _MASK, (c + z) & _MASK
        a = (a - c) & _MASK; a ^= _rot(c, 4); c = (c + b) & _MASK  # noqa: E702
        b = (b - a) & _MASK; b ^= _rot(a, 6); a = (a + c) & _MASK  # noqa: E702
        c = (c - b) & _MASK; c ^= _rot(b, 8); b = (b + a) & _MASK  # noqa: E702
        a = (a - c) & _MASK; a ^= _rot(c, 16); c = (c + b) & _MASK  # noqa: E702
        b = (b - a) & _MASK; b ^= _rot(a, 19); a = (a + c) & _MASK  # noqa: E702
        c = (c - b) & _MASK; c ^= _rot(b, 4); b = (b + a) & _MASK  # noqa: E702
    x, y, z = struct.unpack("<III", data[12 * blocks:].ljust(12, b"\0"))
    a, b, c = (a + x) & _MASK, (b + y) & _MASK, (c + z) & _MASK
    c ^= b; c = (c - _rot(b, 14)) & _MASK  # noqa: E702
    a ^= c; a = (a - _rot(c, 11)) & _MASK  # noqa: E702
    b ^= a; b = (b - _rot(a, 25)) & _MASK  # noqa: E702
    c ^= b; c = (c - _rot(b, 16)) & _MASK  # noqa: E702
    a ^= c; a = (a - _rot(c, 4)) & _MASK  # noqa: E702
    b ^= a; b = (b - _rot(a, 14)) & _MASK  # noqa: E702
    c ^= b; c = (c - _rot(b, 24)) & _MASK  # noqa: E702
    return c


def strip_object_times(path: str | Path) -> int:
    """Set the times of every version-2 object header of an HDF5 file to 0, in place.

    A candidate header is changed only when its stored checksum matches the recomputed one, so
    bytes of data that happen to spell ``OHDR`` are never touched.

    Returns
    -------
    int
        The number of object headers changed.
    """
    path = Path(path)
    content = bytearray(path.read_bytes())
    changed = 0
    start = content.find(_SIGNATURE)
    while start >= 0:
        header_end = _header_end(content, start)
        if header_end is not None and content[start + 5] & _TIMES_STORED:
            stored = struct.unpack_from("<I", content, header_end)[0]
            if stored == lookup3(bytes(content[start:header_end])):
                content[start + 6:start + 22] = bytes(16)
                struct.pack_into("<I", content, header_end,
                                 lookup3(bytes(content[start:header_end])))
                changed += 1
        start = content.find(_SIGNATURE, start + 4)
    if changed:
        path.write_bytes(bytes(content))
    LOGGER.debug("%s: times cleared in %d object headers", path, changed)
    return changed


def _header_end(content: bytearray, start: int) -> int | None:
    """Offset of the checksum of the version-2 object header at ``start`` (None: not one)."""
    if start + 6 > len(content) or content[start + 4] != 2:
        return None
    flags = content[start + 5]
    offset = start + 6
    if flags & _TIMES_STORED:
        offset += 16
    if flags & _PHASE_CHANGE_STORED:
        offset += 4
    size_bytes = 1 << (flags & 0x03)
    if offset + size_bytes > len(content):
        return None
    chunk_size = int.from_bytes(content[offset:offset + size_bytes], "little")
    end = offset + size_bytes + chunk_size
    return end if end + 4 <= len(content) else None
