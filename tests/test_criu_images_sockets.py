"""criu_images: abstract UNIX socket names found and rewritten in a files.img, damage refused in one sentence."""
from __future__ import annotations

import socket
import struct

import pytest

from dynsnap_core import criu_images as ci
from dynsnap_core.errors import SnapshotCorrupt


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(num: int, payload: bytes) -> bytes:
    return _varint(num << 3 | 2) + _varint(len(payload)) + payload


def _int(num: int, v: int) -> bytes:
    return _varint(num << 3) + _varint(v)


def _usk(id_: int, name: bytes, sktype: int = socket.SOCK_SEQPACKET) -> bytes:
    # id, ino, type, state, flags, uflags, backlog, peer, fown (empty), opts (empty), name
    body = (_int(1, id_) + _int(2, 1000 + id_) + _int(3, sktype) + _int(4, 10) + _int(5, 2) + _int(6, 0)
            + _int(7, 4) + _int(8, 0) + _field(9, b"") + _field(10, b"") + _field(11, name))
    return _int(1, ci.FD_TYPE_UNIXSK) + _int(2, id_) + _field(ci.FILE_ENTRY_USK, body)


def _img(*entries: bytes) -> bytes:
    return ci.FILES_MAGICS + b"".join(struct.pack("<I", len(e)) + e for e in entries)


def test_finds_abstract_names_only_and_rewrites_them_in_place():
    reg = _int(1, 1) + _int(2, 1) + _field(3, _field(2, b"/usr/lib/libfoo.so"))   # a regular file entry
    data = _img(reg, _usk(2, b"\0cuda-uvm-4242"), _usk(3, b"/tmp/path.sock"), _usk(4, b""),
                _usk(5, b"\0cuda-uvm-4242", socket.SOCK_STREAM), _usk(6, b"\0"))
    found = ci.abstract_names(data)
    assert [(data[o:o + n], t) for o, n, t in found] == [(b"\0cuda-uvm-4242", socket.SOCK_SEQPACKET),
                                                       (b"\0cuda-uvm-4242", socket.SOCK_STREAM)]
    out = ci.rename_abstract(data, {b"\0cuda-uvm-4242": b"\0cuda-uvm-abcd"})
    assert len(out) == len(data) and out.count(b"\0cuda-uvm-abcd") == 2 and b"cuda-uvm-4242" not in out
    assert out.replace(b"\0cuda-uvm-abcd", b"\0cuda-uvm-4242") == data
    with pytest.raises(ValueError, match="same length"):
        ci.rename_abstract(data, {b"\0cuda-uvm-4242": b"\0short"})


@pytest.mark.parametrize("damage, msg", [
    (lambda d: b"\0" * 8 + d[8:], "is not a CRIU files image"),
    (lambda d: d[:-3], "is damaged: "),
    (lambda d: d[:8] + struct.pack("<I", 1 << 30) + d[12:], "is damaged: entry of 1073741824 bytes at 8 overruns"),
])
def test_damaged_files_image_is_one_sentence(damage, msg):
    data = damage(_img(_usk(2, b"\0name-of-a-socket")))
    with pytest.raises(SnapshotCorrupt, match=msg):
        ci.abstract_names(data, "criu/files.img")


def test_name_taken_per_socket_type():
    name = b"\0dynsnap-test-taken-" + str(id(object())).encode()
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
        s.bind(name)
        assert ci.name_taken(name, socket.SOCK_SEQPACKET)
        assert not ci.name_taken(name, socket.SOCK_STREAM)     # one abstract name space per socket type
    assert not ci.name_taken(name, socket.SOCK_SEQPACKET)
