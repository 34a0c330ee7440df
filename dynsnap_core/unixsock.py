"""Unix socket plumbing both services share: the host memory service (:mod:`dynsnap_core.memsvc`) and the GPU
memory service (:mod:`dynsnap_core.gms`).

- :func:`bind_private`: a listening socket private by construction (bound inside a fresh 0700 directory, its
  mode set there, then hard-linked into place, which never replaces anything); :func:`unlink_own` removes it
  again only if it is still the same inode.
- :func:`peer_cred`, :func:`peer_groups`, :func:`peer_refusal`: who is on the other end (SO_PEERCRED and
  SO_PEERGROUPS, set by the kernel, not by the client) and whether they may use the service.
- :func:`allowed_roots`, :func:`within_roots`, :func:`outside_roots`: the directories a service may open files in.
- :func:`connect`, :class:`Closing`: the client side.
- :class:`Server`: the accept loop, one thread per connection, and the shutdown that closes every connection.

Each service keeps its own wire protocol and its own exceptions: the functions here take the service's name
for their sentences and an ``error`` factory for what they raise. This module imports only ``config``.
"""
from __future__ import annotations

import errno
import os
import socket
import stat
import struct
import tempfile
import threading
from typing import Any, Callable, Iterable, Optional, TypeVar

from . import config

__all__ = ["peer_cred", "peer_groups", "peer_refusal", "allowed_roots", "within_roots", "outside_roots",
           "bind_private", "unlink_own", "connect", "Closing", "Server"]


# ---------------------------------------------------------------- peers

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


def peer_refusal(conn: socket.socket, denied: Callable[[int, int], str], gid: Optional[int] = None) -> Optional[str]:
    """Why the peer of ``conn`` may not use the service, or None: root, the service's own user and, with ``gid``,
    members of that group may. ``denied(uid, pid)`` words the refusal of anyone else."""
    try:
        pid, uid, peer_gid = peer_cred(conn)
    except OSError as e:
        return f"cannot read the peer's credentials: {e.strerror}"
    if uid == 0 or uid == os.geteuid():
        return None
    if gid is not None and (peer_gid == gid or gid in peer_groups(conn, pid)):
        return None
    return denied(uid, pid)


# ---------------------------------------------------------------- allowed directories

def allowed_roots(extra: Iterable[str | os.PathLike]) -> list[str]:
    """The directories a service may open files in: the weight store, the snapshot root, and ``extra``
    (resolved, sorted, each once)."""
    roots = [config.weights_store(), config.snapshots_root(), *extra]
    return sorted({os.path.realpath(str(r)) for r in roots})


def within_roots(path: str, roots: Iterable[str]) -> Optional[str]:
    """``path`` resolved, if it lies under one of ``roots`` (resolved directories, see :func:`allowed_roots`);
    else None."""
    real = os.path.realpath(path)
    for root in roots:
        if real == root or real.startswith(root.rstrip("/") + "/"):
            return real
    return None


def outside_roots(path: str, roots: Iterable[str]) -> str:
    """The refusal of a path that :func:`within_roots` did not accept."""
    return f"{path} is outside the directories this service may open ({', '.join(roots)}); start it with --allow DIR"


# ---------------------------------------------------------------- the listening socket

def bind_private(path: str, *, kind: int, what: str, prefix: str, error: Callable[..., Exception],
                 gid: Optional[int] = None, make_parent: bool = False) -> tuple[socket.socket, tuple[int, int]]:
    """A listening AF_UNIX socket of type ``kind`` at ``path``, private by construction: bound inside a fresh 0700
    directory (named ``prefix`` + random, next to ``path``), set to 0600 (0660 and group ``gid`` with ``gid``)
    there, then hard-linked into place, which never replaces anything. A stale socket at the path is removed; a
    live one, or anything that is not a socket, is refused (never unlinked). ``make_parent`` creates the
    directory of ``path`` first. Refusals are ``error(sentence, code=..., path=..., [errno=...])``, the sentences
    naming the service as ``what``. Returns (socket, (st_dev, st_ino)) so the owner later unlinks only its own
    socket (:func:`unlink_own`)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None:
        if not stat.S_ISSOCK(st.st_mode):
            raise error(f"{path} exists and is not a socket; refusing to replace it (choose another --socket)",
                        code="exists", path=path)
        probe = socket.socket(socket.AF_UNIX, kind)
        try:
            probe.connect(path)
            live = True
        except OSError:
            live = False
        finally:
            probe.close()
        if live:
            raise error(f"another {what} is serving at {path}", code="exists", path=path)
        os.unlink(path)                                   # a stale socket of a dead service
    parent = os.path.dirname(os.path.abspath(path))
    if make_parent:
        try:
            os.makedirs(parent, mode=0o755, exist_ok=True)
        except OSError as e:
            raise error(f"cannot create the socket directory {parent}: {e.strerror}", code="internal",
                        path=parent, errno=e.errno) from None
    tmpdir = tempfile.mkdtemp(prefix=prefix, dir=parent)   # 0700: nobody else can reach what is inside
    tmp = os.path.join(tmpdir, "s")
    s = socket.socket(socket.AF_UNIX, kind)
    try:
        s.bind(tmp)
        if gid is not None:
            os.chown(tmp, -1, gid)
            os.chmod(tmp, 0o660)
        else:
            os.chmod(tmp, 0o600)
        os.link(tmp, path)                                # EEXIST rather than replacing what appeared
        st = os.lstat(path)
        s.listen(64)
    except OSError as e:
        s.close()
        raise error(f"cannot create the {what} socket at {path}: {e.strerror}",
                    code="exists" if e.errno == errno.EEXIST else "internal", path=path, errno=e.errno) from None
    finally:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        os.rmdir(tmpdir)
    return s, (st.st_dev, st.st_ino)


def unlink_own(path: str, sock_id: Optional[tuple[int, int]]) -> None:
    """Remove the socket ``bind_private`` made at ``path``; never what someone put there meanwhile."""
    try:
        st = os.lstat(path)
        if sock_id == (st.st_dev, st.st_ino):
            os.unlink(path)
    except FileNotFoundError:
        pass


# ---------------------------------------------------------------- clients

def connect(path: str, kind: int, timeout: Optional[float]) -> socket.socket:
    """A connected AF_UNIX socket of type ``kind``; the OSError of a failed connect (the socket closed)."""
    s = socket.socket(socket.AF_UNIX, kind)
    s.settimeout(timeout)
    try:
        s.connect(path)
    except BaseException:
        s.close()
        raise
    return s


_C = TypeVar("_C", bound="Closing")


class Closing:
    """A context manager that calls ``self.close()`` on exit (the services' clients)."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self: _C) -> _C:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ---------------------------------------------------------------- the accept loop

class Server:
    """The accept loop of a service: ``bind()`` (the subclass's), then one daemon thread per connection running
    ``_serve_conn(conn, cid)`` until ``stop()``; on the way out every connection is shut down, the socket is
    unlinked (only our own, see :func:`unlink_own`) and ``_drop_all()`` runs with ``cond`` held.
    ``name`` names the threads (``NAME``, ``NAME-conn-ID``)."""

    name = "server"

    def __init__(self, socket_path: str, log: Optional[Callable[[str], Any]]):
        self.socket_path = socket_path
        self.log = log or (lambda s: None)
        self.cond = threading.Condition()
        self._sock: Optional[socket.socket] = None
        self._sock_id: Optional[tuple[int, int]] = None
        self._stop = threading.Event()
        self._ids = 0
        self._conns: dict[int, socket.socket] = {}

    # what a service fills in
    def bind(self) -> None:
        raise NotImplementedError

    def _banner(self) -> str:
        return f"{self.name}: serving on {self.socket_path}"

    def _serve_conn(self, conn: socket.socket, cid: int) -> None:
        raise NotImplementedError

    def _drop_all(self) -> None:
        """Free what the service holds (called once on the way out, with ``cond`` held)."""

    # the loop
    def serve_forever(self) -> None:
        """Accept clients until ``stop()`` (or a request that stops the service)."""
        self.bind()
        assert self._sock is not None
        self._sock.settimeout(0.2)
        self.log(self._banner())
        try:
            while not self._stop.is_set():
                try:
                    conn, _ = self._sock.accept()
                except socket.timeout:
                    continue
                except OSError:
                    if self._stop.is_set():
                        break
                    raise
                conn.settimeout(None)
                with self.cond:
                    self._ids += 1
                    cid = self._ids
                    self._conns[cid] = conn
                threading.Thread(target=self._serve_conn, args=(conn, cid), daemon=True,
                                 name=f"{self.name}-conn-{cid}").start()
        finally:
            self._close()

    def start(self) -> threading.Thread:
        """Serve on a background thread (in-process use and tests)."""
        self.bind()
        t = threading.Thread(target=self.serve_forever, daemon=True, name=self.name)
        t.start()
        return t

    def stop(self) -> None:
        self._stop.set()

    def _close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        unlink_own(self.socket_path, self._sock_id)
        with self.cond:
            for c in self._conns.values():
                try:
                    c.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            self._drop_all()
            self.cond.notify_all()
