"""Resolution tags on every level of a slide's label pyramid, after GDAL has written it.

Why: a slide's label TIFF tells viewers its pixel size through TIFF resolution tags, and GDAL writes them on the
full-resolution image only; its overview pages have none, so a reader that takes each level's pixel size from its
own page (tifffile, Bio-Formats, QuPath's image server) sees levels 1.. without one. Neither GDAL nor tifffile
can add tags to a written page, so each overview's directory is copied to the end of the file with three more
entries (XResolution, YResolution, ResolutionUnit = centimetre, at that level's own pixel size) and the chain of
directories is relinked to the copies. The pixel data stay where they are. The COG layout (directories before
data) no longer holds, so GDAL's layout note in the file is marked ``KNOWN_INCOMPATIBLE_EDITION=YES`` as GDAL
does itself for a file edited after its creation: slide label pyramids are read whole by viewers, not by HTTP
range requests.
"""

from __future__ import annotations

import struct
from pathlib import Path

X_RESOLUTION, Y_RESOLUTION, RESOLUTION_UNIT = 282, 283, 296
IMAGE_WIDTH = 256
RATIONAL, SHORT, LONG, LONG8 = 5, 3, 4, 16
CENTIMETRE = 3


class _Layout:
    """Classic TIFF or BigTIFF, in its byte order: the sizes and formats of a directory's parts."""

    def __init__(self, head: bytes) -> None:
        self.e = "<" if head[:2] == b"II" else ">"
        self.big = struct.unpack(self.e + "H", head[2:4])[0] == 43
        self.count, self.entry, self.offset = ("Q", 20, "Q") if self.big else ("H", 12, "I")
        self.first = 8 if self.big else 4  # where the header holds the first directory's offset

    def size(self, fmt: str) -> int:
        return struct.calcsize(self.e + fmt)


def _entries(f, lay: _Layout, at: int) -> tuple[list[bytes], int]:  # noqa: ANN001 - a binary file
    """The raw entries of the directory at ``at`` and the offset of the next directory."""
    f.seek(at)
    n = struct.unpack(lay.e + lay.count, f.read(lay.size(lay.count)))[0]
    raw = f.read(n * lay.entry)
    nxt = struct.unpack(lay.e + lay.offset, f.read(lay.size(lay.offset)))[0]
    return [raw[k * lay.entry:(k + 1) * lay.entry] for k in range(n)], nxt


def _tag(entry: bytes, lay: _Layout) -> int:
    return struct.unpack(lay.e + "H", entry[:2])[0]


def _width(entry: bytes, lay: _Layout) -> int:
    typ = struct.unpack(lay.e + "H", entry[2:4])[0]
    value = entry[12:] if lay.big else entry[8:]
    fmt = {SHORT: "H", LONG: "I", LONG8: "Q"}[typ]
    return struct.unpack(lay.e + fmt, value[:struct.calcsize(fmt)])[0]


def _entry(lay: _Layout, tag: int, typ: int, value: int) -> bytes:
    """One entry of count 1 whose value (or the offset of its value) is ``value``."""
    if lay.big:
        return struct.pack(lay.e + "HHQQ", tag, typ, 1, value)
    if typ == SHORT:
        return struct.pack(lay.e + "HHIHH", tag, typ, 1, value, 0)
    return struct.pack(lay.e + "HHII", tag, typ, 1, value)


def add_level_resolutions(path: str | Path, mpp: tuple[float, float]) -> int:
    """Give every page of the TIFF at ``path`` that lacks them resolution tags in pixels per centimetre, from
    ``mpp`` (µm per pixel of the first page) scaled by each page's width; returns how many pages gained them."""
    p = Path(path)
    with p.open("r+b") as f:
        lay = _Layout(f.read(16))
        f.seek(lay.first)
        pointer, at = lay.first, struct.unpack(lay.e + lay.offset, f.read(lay.size(lay.offset)))[0]
        width0, added = None, 0
        while at:
            entries, nxt = _entries(f, lay, at)
            tags = {_tag(e, lay): e for e in entries}
            width = _width(tags[IMAGE_WIDTH], lay)
            width0 = width0 or width
            if X_RESOLUTION in tags:
                pointer = at + lay.size(lay.count) + len(entries) * lay.entry
                at = nxt
                continue
            pointer = _rewrite(f, lay, entries, nxt, pointer, [1e4 / (m * width0 / width) for m in mpp])
            added += 1
            at = nxt
        _mark_edited(f)
    return added


def _rewrite(f, lay: _Layout, entries: list[bytes], nxt: int, pointer: int,  # noqa: ANN001 - a binary file
             per_cm: list[float]) -> int:
    """Append the directory with resolution entries and point ``pointer`` at it; returns where its own
    next-directory offset lies (the next pointer to follow)."""
    f.seek(0, 2)
    end = f.tell()
    end += end % 2  # TIFF values and directories begin on a word boundary
    rationals = b"".join(struct.pack(lay.e + "II", round(v * 1000), 1000) for v in per_cm)
    directory = end + len(rationals)
    added = [_entry(lay, X_RESOLUTION, RATIONAL, end), _entry(lay, Y_RESOLUTION, RATIONAL, end + 8),
             _entry(lay, RESOLUTION_UNIT, SHORT, CENTIMETRE)]
    all_entries = sorted([*entries, *added], key=lambda e: _tag(e, lay))
    body = struct.pack(lay.e + lay.count, len(all_entries)) + b"".join(all_entries)
    f.seek(end)
    f.write(rationals + body + struct.pack(lay.e + lay.offset, nxt))
    f.seek(pointer)
    f.write(struct.pack(lay.e + lay.offset, directory))
    return directory + len(body)


def _mark_edited(f) -> None:  # noqa: ANN001 - a binary file
    """Say in GDAL's layout note (when the file has one) that the COG layout no longer holds."""
    f.seek(0)
    head = f.read(400)
    old, new = b"KNOWN_INCOMPATIBLE_EDITION=NO\n ", b"KNOWN_INCOMPATIBLE_EDITION=YES\n"
    at = head.find(old)
    if at >= 0:
        f.seek(at)
        f.write(new)
