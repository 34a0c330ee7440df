"""The GPU memory service's wire protocol: framing, request validation, and the client.

Transport: an AF_UNIX SOCK_STREAM socket. A message is a 4-byte little-endian length followed by that many
bytes of UTF-8 JSON (one object); file descriptors travel as SCM_RIGHTS attached to the first byte of a
reply (the service never accepts fds from clients). Requests are at most ``MAX_REQUEST`` bytes, replies at
most ``MAX_REPLY``.

Every request carries ``"v": VERSION`` and an ``"op"``::

    {"v": 1, "op": "ping"}
    {"v": 1, "op": "status"}
    {"v": 1, "op": "ensure", "set": NAME_OR_PATH, "timeout": S}       -> resident (loads once; others wait)
    {"v": 1, "op": "open", "set": ..., "layout_hash": H|null, "timeout": S}
                                      -> {size, layout, layout_hash, read_only} + one fd (SCM_RIGHTS); a hold
    {"v": 1, "op": "close", "set": ...}                                -> drops one hold of this connection
    {"v": 1, "op": "evict", "set": ...}                                -> frees an unheld set

Replies: ``{"v": 1, "ok": true, ...}`` or ``{"v": 1, "ok": false, "error": CODE, "message": SENTENCE}``.
A malformed message (bad frame, not JSON, wrong version, unknown op, a field of the wrong type or size)
gets the ``bad_request`` reply and the service closes that connection; a well-formed request the service
refuses (not_found, denied, mismatch, no_memory, held, busy, failed, timeout, cuda_unavailable) leaves the
connection open. Holds belong to the connection: when it closes (the worker exits or is killed), its
holds are dropped.
"""
from __future__ import annotations

import json
import os
import re
import socket
import struct
import time
from typing import Any, Optional, Sequence

from .. import config, unixsock
from ..errors import DynsnapError

__all__ = ["VERSION", "MAX_REQUEST", "MAX_REPLY", "OPS", "GmsError", "ProtocolError", "send", "recv",
           "validate", "Client", "bind_private", "drain", "peer_refusal", "default_socket"]

VERSION = 1
MAX_REQUEST = 64 << 10
MAX_REPLY = 64 << 20
MAX_FDS = 4
_HDR = struct.Struct("<I")
OPS = ("ping", "status", "ensure", "open", "close", "evict")
_SET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,199}$")
_HASH = re.compile(r"^sha256:[0-9a-f]{64}$")
# the fields each op may carry (besides v and op), with a checker each
_FIELDS = {"ping": (), "status": (), "ensure": ("set", "timeout"), "open": ("set", "layout_hash", "timeout"),
           "close": ("set",), "evict": ("set",)}
_REQUIRED = {"ensure": ("set",), "open": ("set",), "close": ("set",), "evict": ("set",)}


def default_socket() -> str:
    """The service's socket unless --socket says otherwise: ``$DYNSNAP_GMS_SOCKET`` or ``RUN_DIR/gms.sock``
    (``/run/dynsnap/gms.sock`` for root; see dynsnap_core/config.py)."""
    return config.get("gms_socket") or os.path.join(config.run_dir(), "gms.sock")


class GmsError(DynsnapError):
    """The GPU memory service refused or failed a request; ``code`` says why (not_found, mismatch, ...)."""

    def __init__(self, message: str, *, code: str = "internal", **kw: Any):
        kw.setdefault("stage", "gms")
        super().__init__(message, **kw)
        self.code = code

    def to_dict(self) -> dict:
        return {**super().to_dict(), "code": self.code}


class ProtocolError(Exception):
    """A malformed message: answered with bad_request, then the connection is closed."""


def _close_all(fds: Sequence[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def send(sock: socket.socket, obj: dict, fds: Sequence[int] = ()) -> None:
    """One length-prefixed JSON message, ``fds`` attached to its first byte."""
    body = json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()
    data = _HDR.pack(len(body)) + body
    sent = socket.send_fds(sock, [data], list(fds)) if fds else sock.send(data)
    if sent < len(data):
        sock.sendall(data[sent:])


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        more = sock.recv(min(n - len(buf), 1 << 20))
        if not more:
            raise ConnectionError("connection closed mid-message")
        buf += more
    return bytes(buf)


def recv(sock: socket.socket, max_bytes: int = MAX_REQUEST) -> tuple[Any, list[int]]:
    """(decoded JSON, fds) of one message. ConnectionError on EOF before a message; ProtocolError (fds closed)
    when the message is larger than ``max_bytes`` or not UTF-8 JSON. The length is checked before the body
    is read, so an oversized message costs nothing."""
    head, fds, flags, _addr = socket.recv_fds(sock, _HDR.size, MAX_FDS)
    fds = list(fds)
    if flags & socket.MSG_CTRUNC:
        _close_all(fds)
        raise ProtocolError("too many file descriptors attached")
    if not head:
        _close_all(fds)
        raise ConnectionError("connection closed")
    try:
        if len(head) < _HDR.size:
            head += _recv_exact(sock, _HDR.size - len(head))
        (n,) = _HDR.unpack(head)
        if n > max_bytes:
            raise ProtocolError(f"message of {n} bytes is larger than the limit of {max_bytes}")
        body = _recv_exact(sock, n)
        try:
            return json.loads(body.decode("utf-8")), fds
        except (UnicodeDecodeError, ValueError) as e:
            raise ProtocolError(f"the message is not JSON ({e})") from None
    except BaseException:
        _close_all(fds)
        raise


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v


def validate(req: Any) -> dict:
    """The request if well formed, else ProtocolError with one sentence saying what is wrong."""
    if not isinstance(req, dict):
        raise ProtocolError("a request is a JSON object")
    v = req.get("v")
    if v != VERSION or isinstance(v, bool):
        raise ProtocolError(f"protocol version {v!r} is not supported (this service speaks version {VERSION})")
    op = req.get("op")
    if not isinstance(op, str) or op not in OPS:
        raise ProtocolError(f"unknown request {op!r} (one of {', '.join(OPS)})")
    extra = sorted(k for k in req if k not in ("v", "op") and k not in _FIELDS[op])
    if extra:
        raise ProtocolError(f"request {op!r} has unknown fields {', '.join(map(repr, extra[:5]))}")
    for k in _REQUIRED.get(op, ()):
        if k not in req:
            raise ProtocolError(f"request {op!r} needs {k!r}")
    if "set" in req:
        s = req["set"]
        ok = isinstance(s, str) and (_SET_NAME.match(s) is not None or (
            s.startswith("/") and 1 < len(s) <= 4096 and "\0" not in s))
        if not ok:
            raise ProtocolError("'set' must be a weight set name (letters, digits, . _ + -) or an absolute path")
    if "layout_hash" in req and req["layout_hash"] is not None:
        h = req["layout_hash"]
        if not isinstance(h, str) or not _HASH.match(h):
            raise ProtocolError("'layout_hash' must be null or 'sha256:' and 64 hex digits")
    if "timeout" in req:
        t = req["timeout"]
        if not _is_num(t) or not 0 < t <= 86400:
            raise ProtocolError("'timeout' must be a number of seconds in (0, 86400]")
    return req


# ---------------------------------------------------------------- service-side helpers

def drain(conn: socket.socket, limit: int = 1 << 20, seconds: float = 1.0) -> None:
    """Before closing a refused connection: say we are done writing and read what the peer still sends (at most
    ``limit`` bytes or ``seconds``), so that closing with unread data does not reset the connection before the
    peer has read our reply."""
    try:
        conn.shutdown(socket.SHUT_WR)
        conn.settimeout(seconds)
        end, got = time.monotonic() + seconds, 0
        while got < limit and time.monotonic() < end:
            b = conn.recv(65536)
            if not b:
                break
            got += len(b)
    except OSError:
        pass


def peer_refusal(conn: socket.socket) -> Optional[str]:
    """Why the peer of ``conn`` may not use the service (SO_PEERCRED, set by the kernel), or None: only root
    and the service's own user may."""
    return unixsock.peer_refusal(conn, lambda uid, pid: f"uid {uid} (pid {pid}) may not use this GPU memory service "
                                                        f"(only root and uid {os.geteuid()} may)")


def bind_private(path: str) -> tuple[socket.socket, tuple[int, int]]:
    """A listening SOCK_STREAM socket at ``path``, private by construction (the scheme of the host memory
    service, :func:`dynsnap_core.unixsock.bind_private`): bound inside a fresh 0700 directory, chmod 0600 there,
    then hard-linked into place, which never replaces anything; the directory of ``path`` is created if missing.
    A stale socket at the path is removed; a live one or a non-socket is refused (GmsError).
    Returns (socket, (st_dev, st_ino)) so the owner later unlinks only its own socket."""
    return unixsock.bind_private(path, kind=socket.SOCK_STREAM, what="GPU memory service", prefix=".gms-",
                                 error=GmsError, make_parent=True)


# ---------------------------------------------------------------- client

class Client(unixsock.Closing):
    """One connection to the service (a context manager). Holds taken with :meth:`open` last as long as the
    connection."""

    def __init__(self, path: Optional[str] = None, *, timeout: Optional[float] = 600.0):
        self.path = path or default_socket()
        self.sock: Optional[socket.socket] = None
        try:
            self.sock = unixsock.connect(self.path, socket.SOCK_STREAM, timeout)
        except OSError as e:
            raise GmsError(f"cannot reach the GPU memory service at {self.path}: {e.strerror or e} "
                           "(is `dynsnap gms serve` running?)", code="unreachable", path=self.path,
                           errno=e.errno) from None

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def request(self, op: str, **fields: Any) -> tuple[dict, list[int]]:
        """The reply and its fds; GmsError when the service refuses or the connection breaks."""
        if self.sock is None:
            raise GmsError("this GPU memory service connection is closed", code="closed", path=self.path)
        try:
            send(self.sock, {"v": VERSION, "op": op, **fields})
            reply, fds = recv(self.sock, MAX_REPLY)
        except (OSError, ConnectionError, ProtocolError) as e:
            self.close()
            raise GmsError(f"the GPU memory service at {self.path} went away during {op!r} ({e})",
                           code="unreachable", path=self.path) from None
        if not isinstance(reply, dict) or not reply.get("ok"):
            _close_all(fds)
            r = reply if isinstance(reply, dict) else {}
            raise GmsError(str(r.get("message") or f"malformed reply to {op!r}"), code=str(r.get("error")),
                           path=self.path)
        return reply, fds

    def ping(self) -> dict:
        return self.request("ping")[0]

    def status(self) -> dict:
        return self.request("status")[0]

    def ensure(self, set_ref: str, timeout: float = 3600.0) -> dict:
        return self.request("ensure", set=set_ref, timeout=timeout)[0]

    def open(self, set_ref: str, layout_hash: Optional[str] = None, timeout: float = 3600.0) -> tuple[dict, int]:
        """(reply with size, layout, layout_hash; the allocation's fd: the caller closes it). A hold until
        :meth:`close_set` or until this connection closes."""
        reply, fds = self.request("open", set=set_ref, layout_hash=layout_hash, timeout=timeout)
        if len(fds) != 1:
            _close_all(fds)
            raise GmsError(f"the GPU memory service sent {len(fds)} fds for {set_ref!r}, expected 1", code="internal",
                           path=self.path)
        return reply, fds[0]

    def close_set(self, set_ref: str) -> None:
        self.request("close", set=set_ref)

    def evict(self, set_ref: str) -> dict:
        return self.request("evict", set=set_ref)[0]
