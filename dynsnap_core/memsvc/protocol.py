"""The memory service's wire protocol: one length-prefixed JSON message per request and reply on a Unix socket
(SOCK_SEQPACKET for the service; any type works), fds attached with SCM_RIGHTS; and the peer's credentials.

Requests (``{"op": ...}``): ``ping``, ``load`` (regions: [{name, path, offset, length, digest}]), ``get`` (name,
wait, timeout), ``create`` (name, size) + ``publish`` (name), ``release``, ``list``, ``drop`` (name, force),
``save`` (names, store), ``quiesce``/``resume`` bookkeeping, ``shutdown``. Replies: ``{"ok": true, ...}`` or
``{"ok": false, "error": CODE, "message": TEXT}`` with CODE in not_found, busy, failed, exists, held,
bad_request, timeout, internal. ``memfd.MemFd.send``/``receive`` use the same framing.
"""
from __future__ import annotations

import json
import os
import socket
import struct
from typing import Sequence

__all__ = ["send_message", "recv_message", "peer_cred", "peer_groups"]


_MAX_FDS = 64


_HDR = struct.Struct("<I")


def send_message(sock: socket.socket, obj: dict, fds: Sequence[int] = ()) -> None:
    """One JSON message (length-prefixed) with optional fds (SCM_RIGHTS) on a Unix socket of any type."""
    body = json.dumps(obj, separators=(",", ":")).encode()
    data = _HDR.pack(len(body)) + body
    if fds:
        sent = socket.send_fds(sock, [data], list(fds))
    else:
        sent = sock.send(data)
    if sent < len(data):
        sock.sendall(data[sent:])


def recv_message(sock: socket.socket, max_bytes: int = 1 << 16) -> tuple[dict, list[int]]:
    """Receive one ``send_message`` message; returns (obj, fds). Raises ConnectionError on EOF."""
    if sock.type == socket.SOCK_STREAM:
        head, fds, _fl, _a = socket.recv_fds(sock, _HDR.size, _MAX_FDS)
        while head and len(head) < _HDR.size:
            more = sock.recv(_HDR.size - len(head))
            if not more:
                break
            head += more
        if len(head) < _HDR.size:
            for fd in fds:
                os.close(fd)
            raise ConnectionError("connection closed")
        (n,) = _HDR.unpack(head)
        body = b""
        while len(body) < n:
            more = sock.recv(n - len(body))
            if not more:
                for fd in fds:
                    os.close(fd)
                raise ConnectionError("connection closed mid-message")
            body += more
    else:
        data, fds, _fl, _a = socket.recv_fds(sock, max_bytes + _HDR.size, _MAX_FDS)
        if not data:
            for fd in fds:
                os.close(fd)
            raise ConnectionError("connection closed")
        (n,) = _HDR.unpack(data[:_HDR.size])
        body = data[_HDR.size:_HDR.size + n]
    if len(body) > max_bytes:
        for fd in fds:
            os.close(fd)
        raise ConnectionError(f"message of {len(body)} bytes is larger than {max_bytes}")
    return json.loads(body), list(fds)


def peer_cred(conn: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process that connected (SO_PEERCRED: set by the kernel, not by the client)."""
    raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


def peer_groups(conn: socket.socket, pid: int) -> list[int]:
    """The peer's supplementary groups (SO_PEERGROUPS, Linux >= 4.13)."""
    so_peergroups = getattr(socket, "SO_PEERGROUPS", 59)
    try:
        raw = conn.getsockopt(socket.SOL_SOCKET, so_peergroups, 4 * 256)
    except OSError:
        return []
    return list(struct.unpack(f"{len(raw) // 4}I", raw[:len(raw) // 4 * 4]))
