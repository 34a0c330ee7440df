"""Test helpers that edit CRIU images the way damage would: pagemap entries' page counts (import as `criu_images`)."""
from __future__ import annotations

import json
import struct
from pathlib import Path


def _varint(b: bytes, i: int) -> tuple[int, int]:
    shift = v = 0
    while True:
        c = b[i]
        i += 1
        v |= (c & 0x7F) << shift
        shift += 7
        if not c & 0x80:
            return v, i


def _encode(v: int, n: int) -> bytes:
    """v as a protobuf varint of exactly n bytes (padded with continuation bits)."""
    out = bytearray()
    for k in range(n):
        out.append((v & 0x7F) | (0x80 if k < n - 1 else 0))
        v >>= 7
    assert v == 0, "value does not fit"
    return bytes(out)


def pagemap_entries(data: bytes) -> list[tuple[int, int, int]]:
    """(offset of the nr_pages varint, its value, its length) of every pagemap entry (after the head entry).

    A CRIU image: two 32-bit magics, then entries, each a 32-bit size and a protobuf message. pagemap_entry
    has vaddr (field 1), nr_pages (field 2), in_parent (3), flags (4)."""
    i, out, first = 8, [], True
    while i + 4 <= len(data):
        (n,) = struct.unpack_from("<I", data, i)
        i += 4
        end = i + n
        j = i
        while not first and j < end:
            tag, j = _varint(data, j)
            kind = tag & 7
            if kind == 0:
                start = j
                v, j = _varint(data, j)
                if tag >> 3 == 2:
                    out.append((start, v, j - start))
            elif kind == 1:
                j += 8
            elif kind == 5:
                j += 4
            elif kind == 2:
                ln, j = _varint(data, j)
                j += ln
        first = False
        i = end
    return out


def raise_nr_pages(pagemap: Path, index: int = 0, by: int = 1) -> tuple[int, int]:
    """Raise the page count of one pagemap entry in place (same varint length); returns (old, new)."""
    data = bytearray(pagemap.read_bytes())
    off, v, n = pagemap_entries(bytes(data))[index]
    data[off:off + n] = _encode(v + by, n)
    pagemap.write_bytes(bytes(data))
    return v, v + by


def reseal(snapshot: Path, *changed: Path) -> None:
    """Re-record the size and checksum of ``changed`` files in the manifest (and its root digest), as a hostile
    editor would, so that verification passes and CRIU sees the edited bytes."""
    from dynsnap_core import io as dio
    from dynsnap_core.snapshot import manifest as mf
    m = json.loads((snapshot / "manifest.json").read_text())
    for path in changed:
        rel = str(path.relative_to(snapshot))
        r = dio.hash_file(str(path), direct=False)
        for f in m["files"]:
            if f["path"] == rel:
                f["size"], f["xxh3"] = r.size, r.xxh3
    m["total_bytes"] = sum(f["size"] for f in m["files"])
    (snapshot / "manifest.json").write_text(json.dumps(mf.seal(m), indent=2, sort_keys=True))


def pagemap(snapshot: Path) -> Path:
    return sorted((snapshot / "criu").glob("pagemap-*.img"))[0]
