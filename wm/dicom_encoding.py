"""Is a received DICOM file's encoding complete? A walk over its element headers, never its values.

A sender whose file was cut short (truncated pixel data, a lost disk block) still sends a well-formed
C-STORE: the data set simply ends early, and pydicom reads such a file "successfully" (a short last value)
or with a warning. `encoding_problem` walks every element header of a Part-10 file, including the items of
sequences and of encapsulated pixel data, seeking over the values, and says where an element, item or
sequence runs past the end of the file. It reads a few bytes per element: a 512 KB CT slice costs about a
hundred small reads. A deflated data set cannot be walked without inflating it and is not checked.
"""

from __future__ import annotations

import os
import struct
from typing import IO

__all__ = ["IncompleteEncoding", "encoding_problem"]

IMPLICIT_LITTLE = "1.2.840.10008.1.2"
EXPLICIT_BIG = "1.2.840.10008.1.2.2"
DEFLATED = ("1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.8.1")
LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
"""Explicit-VR value representations with a 4-byte length (after 2 reserved bytes)."""
UNDEFINED = 0xFFFFFFFF
ITEM, ITEM_END, SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
MAX_DEPTH = 64


class IncompleteEncoding(ValueError):
    """The file's encoding is not complete; the message says where."""


def encoding_problem(path: str | os.PathLike[str]) -> str | None:
    """None when every element of the Part-10 file at ``path`` ends within the file, else what is wrong."""
    with open(path, "rb") as stream:
        try:
            _check(stream, os.fstat(stream.fileno()).st_size)
        except IncompleteEncoding as exc:
            return str(exc)
    return None


def _check(stream: IO[bytes], size: int) -> None:
    if stream.read(132)[128:] != b"DICM":
        raise IncompleteEncoding("no DICOM Part-10 preamble")
    syntax = _file_meta_syntax(stream, size)
    if syntax in DEFLATED:
        return
    walker = _Walker(stream, size, implicit=syntax == IMPLICIT_LITTLE, little=syntax != EXPLICIT_BIG)
    walker.elements(stop=None, depth=0)


def _file_meta_syntax(stream: IO[bytes], size: int) -> str:
    """Walk the file meta (group 2, always explicit VR little endian); its transfer syntax UID."""
    walker = _Walker(stream, size, implicit=False, little=True)
    syntax = ""
    while stream.tell() + 2 <= size:
        start = stream.tell()
        (group,) = struct.unpack("<H", stream.read(2))
        stream.seek(start)
        if group != 0x0002:
            break
        tag, length = walker.header()
        if tag == 0x00020010:
            syntax = stream.read(length).decode("ascii", "replace").strip(" \x00")
        else:
            walker.skip(tag, length)
    return syntax


class _Walker:
    """Reads element and item headers, seeks over values, raises `IncompleteEncoding` at any overrun."""

    def __init__(self, stream: IO[bytes], size: int, *, implicit: bool, little: bool) -> None:
        self.stream, self.size, self.implicit = stream, size, implicit
        self.order = "<" if little else ">"

    def read(self, count: int, what: str) -> bytes:
        data = self.stream.read(count)
        if len(data) < count:
            raise IncompleteEncoding(f"{what} cut short at byte {self.stream.tell()} of {self.size}")
        return data

    def header(self) -> tuple[int, int]:
        """The next tag and value length (items and delimiters have no VR, whatever the syntax)."""
        raw = self.read(8, "element header")
        group, element = struct.unpack(self.order + "HH", raw[:4])
        tag = group << 16 | element
        if self.implicit or group == 0xFFFE:
            return tag, struct.unpack(self.order + "I", raw[4:])[0]
        if raw[4:6] in LONG_VRS:
            return tag, struct.unpack(self.order + "I", self.read(4, "element header"))[0]
        return tag, struct.unpack(self.order + "H", raw[6:])[0]

    def skip(self, tag: int, length: int) -> None:
        left = self.size - self.stream.tell()
        if length > left:
            raise IncompleteEncoding(
                f"element ({tag >> 16:04X},{tag & 0xFFFF:04X}) has {length} bytes of value, the file only "
                f"{left} more"
            )
        self.stream.seek(length, os.SEEK_CUR)

    def elements(self, stop: int | None, depth: int) -> None:
        """Walk elements to the end of the file, or up to the delimiter ``stop`` (which must come)."""
        if depth > MAX_DEPTH:
            raise IncompleteEncoding("sequences nested too deep")
        while self.stream.tell() < self.size:
            tag, length = self.header()
            if tag == stop:
                return
            if length == UNDEFINED:
                self.items(depth + 1)
            else:
                self.skip(tag, length)
        if stop is not None:
            raise IncompleteEncoding(f"an item of undefined length has no end: the file ends at {self.size}")

    def items(self, depth: int) -> None:
        """Walk the items of a sequence or encapsulated pixel data of undefined length, to its delimiter."""
        while True:
            tag, length = self.header()
            if tag == SEQUENCE_END:
                return
            if tag != ITEM:
                raise IncompleteEncoding(f"expected an item, found ({tag >> 16:04X},{tag & 0xFFFF:04X})")
            if length == UNDEFINED:
                self.elements(stop=ITEM_END, depth=depth)
            else:
                self.skip(tag, length)
