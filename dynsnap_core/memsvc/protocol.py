"""The memory service's wire protocol: one length-prefixed JSON message per request and reply on a Unix socket
(SOCK_SEQPACKET for the service; any type works), fds attached with SCM_RIGHTS. The peer's credentials
(``peer_cred``, ``peer_groups``) come from :mod:`dynsnap_core.unixsock`, shared with the GPU memory service.

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

from ..unixsock import peer_cred, peer_groups  # noqa: F401 - the shared peer checks, under their old names

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
