"""CRIU image files read and edited without pycriu: the bound abstract UNIX socket names in files.img.

A CUDA process holds a bound abstract UNIX socket (the driver's UVM fd listener), and any worker may bind
abstract names of its own. Abstract names live in the network namespace, which copies of a snapshot restored
side by side share with the node: the second copy's CRIU restore fails with "Address already in use". Before
such a restore, :func:`rename_taken_abstract_sockets` gives each name that is taken on the node right now a
fresh one of the same length, in a copy of files.img (the snapshot itself is never changed); names that are
free keep their value, so the first copy answers where the original did.

Format (CRIU 4.x, images/fdinfo.proto and sk-unix.proto): two u32 magics (IMG_COMMON_MAGIC, FILES_MAGIC),
then entries, each a u32 little-endian size and a protobuf ``file_entry``; a UNIX socket is type 5 (UNIXSK)
with its ``unix_sk_entry`` in field 16, whose field 11 is the name (bytes, abstract when it starts with NUL).
CRIU binds exactly those bytes and finds peers by inode, so a same-length rewrite of every entry that carries a
name (the bound socket, accepted sockets, external peers) is a byte patch that keeps the file valid.
"""
from __future__ import annotations

import os
import secrets
import socket
import struct
from typing import Callable, Iterator

from .errors import SnapshotCorrupt
from .formats import CRIU_FILES_MAGIC, CRIU_IMG_COMMON_MAGIC

__all__ = ["FILES_MAGICS", "abstract_names", "rename_abstract", "name_taken", "rename_taken_abstract_sockets"]

IMG_COMMON_MAGIC = CRIU_IMG_COMMON_MAGIC
FILES_MAGIC = CRIU_FILES_MAGIC
FILES_MAGICS = struct.pack("<II", IMG_COMMON_MAGIC, FILES_MAGIC)
FD_TYPE_UNIXSK = 5
FILE_ENTRY_USK = 16
UNIX_SK_TYPE = 3
UNIX_SK_NAME = 11
_MAX_ENTRY = 1 << 20            # a file_entry is a few hundred bytes; anything this large is damage


def _varint(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise ValueError("truncated varint")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7


def _fields(buf: bytes, pos: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """(field number, wire type, start, end) of each field of the message in buf[pos:end]; for a varint the
    value is in start and end == -1."""
    while pos < end:
        key, pos = _varint(buf, pos, end)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos, end)
            yield field, wire, value, -1
        elif wire == 2:
            n, pos = _varint(buf, pos, end)
            if pos + n > end:
                raise ValueError("field overruns its message")
            yield field, wire, pos, pos + n
            pos += n
        elif wire == 1:
            pos += 8
            yield field, wire, pos - 8, pos
        elif wire == 5:
            pos += 4
            yield field, wire, pos - 4, pos
        else:
            raise ValueError(f"unsupported wire type {wire}")
        if pos > end:
            raise ValueError("field overruns its message")


def abstract_names(data: bytes, what: str = "files.img") -> list[tuple[int, int, int]]:
    """(offset, length, socket type) in ``data`` (a files.img) of every UNIX socket name that is abstract (starts
    with NUL, longer than the NUL alone). Raises SnapshotCorrupt for anything that is not a files.img CRIU 4.x
    writes."""
    if data[:8] != FILES_MAGICS:
        raise SnapshotCorrupt(f"{what} is not a CRIU files image (magic {data[:8].hex()})", stage="restore")
    out = []
    pos = 8
    try:
        while pos < len(data):
            if pos + 4 > len(data):
                raise ValueError("truncated entry size")
            (size,) = struct.unpack_from("<I", data, pos)
            start, end = pos + 4, pos + 4 + size
            if size > _MAX_ENTRY or end > len(data):
                raise ValueError(f"entry of {size} bytes at {pos} overruns the file")
            ftype, usk = None, None
            for field, wire, a, b in _fields(data, start, end):
                if field == 1 and wire == 0:
                    ftype = a
                elif field == FILE_ENTRY_USK and wire == 2:
                    usk = (a, b)
            if ftype == FD_TYPE_UNIXSK and usk is not None:
                name, sktype = None, None
                for field, wire, a, b in _fields(data, *usk):
                    if field == UNIX_SK_NAME and wire == 2 and b - a > 1 and data[a] == 0:
                        name = (a, b - a)
                    elif field == UNIX_SK_TYPE and wire == 0:
                        sktype = a
                if name is not None:
                    out.append((*name, sktype or socket.SOCK_STREAM))
            pos = end
    except ValueError as e:
        raise SnapshotCorrupt(f"{what} is damaged: {e}", stage="restore") from None
    return out


def rename_abstract(data: bytes, renames: dict[bytes, bytes]) -> bytes:
    """``data`` with every abstract name in ``renames`` replaced (same lengths only)."""
    out = bytearray(data)
    for off, n, _ in abstract_names(data):
        new = renames.get(bytes(data[off:off + n]))
        if new is not None:
            if len(new) != n:
                raise ValueError("an abstract name can only be replaced by one of the same length")
            out[off:off + n] = new
    return bytes(out)


def name_taken(name: bytes, sktype: int) -> bool:
    """Whether an abstract UNIX socket name is bound in this network namespace right now, for sockets of type
    ``sktype`` (the kernel keeps one abstract name space per socket type)."""
    with socket.socket(socket.AF_UNIX, sktype) as s:
        try:
            s.bind(name)
        except OSError as e:
            if e.errno == 98:       # EADDRINUSE
                return True
            raise
    return False


def _fresh(name: bytes, sktype: int) -> bytes:
    """A free abstract name of the same length: the tail replaced by random hex (the head kept for readers)."""
    for _ in range(64):
        k = min(len(name) - 1, 12)
        new = name[:len(name) - k] + secrets.token_hex(8)[:k].encode()
        if new != name and not name_taken(new, sktype):
            return new
    raise OSError(f"no free abstract socket name like {name!r}")


def rename_taken_abstract_sockets(images: os.PathLike | str, out_dir: os.PathLike | str,
                                  check: Callable[[str], None]) -> dict[bytes, bytes]:
    """When files.img of ``images`` holds abstract UNIX socket names that are taken on the node right now,
    prepare ``out_dir`` as CRIU's images directory for this restore: a symbolic link to each image and a copy
    of files.img with those names replaced by free ones of the same length. ``check(path)`` verifies the copy
    against the snapshot's manifest before it is changed (raises on a mismatch), so CRIU reads only verified
    bytes. Returns the renames; empty (and ``out_dir`` untouched) when every name is free."""
    images, out_dir = os.fspath(images), os.fspath(out_dir)
    src = os.path.join(images, "files.img")
    try:
        with open(src, "rb") as fh:
            data = fh.read(64 << 20)
    except FileNotFoundError:
        return {}
    renames: dict[bytes, bytes] = {}
    for off, n, sktype in abstract_names(data, src):
        name = data[off:off + n]
        if name not in renames and name_taken(name, sktype):
            renames[name] = _fresh(name, sktype)
    if not renames:
        return {}
    os.makedirs(out_dir)
    copy = os.path.join(out_dir, "files.img")
    with open(copy, "wb") as fh:
        fh.write(data)
    check(copy)
    patched = rename_abstract(data, renames)
    with open(copy, "wb") as fh:
        fh.write(patched)
    for entry in os.listdir(images):
        if entry != "files.img":
            os.symlink(os.path.join(images, entry), os.path.join(out_dir, entry))
    return renames
