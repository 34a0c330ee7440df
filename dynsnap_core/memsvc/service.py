"""The memory service daemon (``dynsnap memsvc --socket PATH``): it owns named memfd regions (weights) outside
the worker, keeps them as sealed memfds, loads them from files (e.g. a content-addressed weight directory) with
parallel memfd restoration, and hands them to clients over a SOCK_SEQPACKET Unix socket with SCM_RIGHTS
(``protocol``). A region is handed out only once its fill is complete and its digest matched; while it loads,
``get`` answers ``busy`` or waits. A client that dies only drops its holds; the service keeps serving the others.
Clients and the worker side live in ``client``; snapshots with regions in ``dynsnap_core.snapshot.regions``.
"""
from __future__ import annotations

import functools
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

from .. import config, memfd
from ..errors import DynsnapError, MemsvcError
from ..unixsock import Server, allowed_roots, bind_private, outside_roots, peer_refusal, within_roots
from .client import Client
from .protocol import recv_message, send_message

__all__ = ["MemoryService", "spawn", "main"]


class _Refuse(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class _Region:
    name: str
    state: str                       # loading | ready | failed | writable
    size: int = 0
    digest: Optional[str] = None
    mfd: Optional[memfd.MemFd] = None
    error: Optional[str] = None
    source: Optional[dict] = None
    owner: Optional[int] = None      # connection that created a writable region
    holders: dict = field(default_factory=dict)   # connection id -> count
    loaded_s: Optional[float] = None

    def info(self) -> dict:
        return {"name": self.name, "state": self.state, "size": self.size, "digest": self.digest,
                "error": self.error, "holders": sum(self.holders.values()), "load_s": self.loaded_s,
                "source": self.source}


def _group_id(group: str | int) -> int:
    import grp
    if isinstance(group, int) and not isinstance(group, bool):
        return group
    if isinstance(group, str) and group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(str(group)).gr_gid
    except KeyError:
        raise MemsvcError(f"no group named {group!r}", code="bad_request", stage="bind") from None


def _nonneg_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 1 << 62


class MemoryService(Server):
    """The daemon: regions by name, one thread per connection, loads on their own threads."""

    name = "memsvc"

    def __init__(self, socket_path: str | os.PathLike, *, threads: Optional[int] = None,
                 log: Optional[Callable[[str], Any]] = None, allow: Iterable[str | os.PathLike] = (),
                 group: Optional[str | int] = None):
        super().__init__(str(socket_path), log)
        self.gid = _group_id(group) if group is not None else None
        self.roots = allowed_roots(allow)
        self.threads = threads or memfd.default_threads()
        self.regions: dict[str, _Region] = {}
        self._load_delay = float(config.test_hook("MEMSVC_LOAD_DELAY") or 0)

    # ---- lifecycle ----
    def bind(self) -> None:
        """Create the listening socket (idempotent), private by construction: bound inside a fresh 0700 directory,
        set to 0600 (0660 and the service's group with ``group``) there, then hard-linked into place, which never
        replaces anything. A stale socket at the path is removed; a live one, or anything that is not a socket, is
        refused (never unlinked)."""
        if self._sock is None:
            self._sock, self._sock_id = bind_private(
                self.socket_path, kind=socket.SOCK_SEQPACKET, what="memory service", prefix=".memsvc-",
                error=functools.partial(MemsvcError, stage="bind"), gid=self.gid)

    def _banner(self) -> str:
        return f"memsvc: serving on {self.socket_path} with {self.threads} fill threads"

    def _drop_all(self) -> None:
        for r in self.regions.values():
            if r.mfd is not None:
                r.mfd.close()
        self.regions.clear()

    # ---- connections ----
    def _refusal(self, conn: socket.socket) -> Optional[str]:
        """Why the peer of ``conn`` may not use the service (SO_PEERCRED), or None: root, the service's own user,
        and with a configured group its members, may; nobody else."""
        return peer_refusal(conn, lambda uid, pid: f"uid {uid} (pid {pid}) may not use this memory service",
                            self.gid)

    def _serve_conn(self, conn: socket.socket, cid: int) -> None:
        try:
            while not self._stop.is_set():
                try:
                    req, fds = recv_message(conn)
                except (ConnectionError, OSError):
                    break
                except Exception:  # noqa: BLE001 - a malformed frame: answer once, then hang up
                    try:
                        send_message(conn, {"ok": False, "error": "bad_request",
                                                  "message": "malformed message (not one JSON object in a frame)"})
                    except OSError:
                        pass
                    break
                for fd in fds:        # clients never send fds
                    os.close(fd)
                out_fds: list[int] = []
                try:
                    why = self._refusal(conn)       # every request is checked against the peer's credentials
                    if why is not None:
                        self.log(f"memsvc: refused a request: {why}")
                        raise _Refuse("denied", why)
                    if not isinstance(req, dict):
                        raise _Refuse("bad_request", "a request is a JSON object with an 'op'")
                    reply, out_fds = self._handle(req, cid)
                except _Refuse as r:
                    reply = {"ok": False, "error": r.code, "message": r.message}
                except (TypeError, ValueError, KeyError, AttributeError, OverflowError) as e:
                    reply = {"ok": False, "error": "bad_request", "message": f"malformed request: {e}"}
                except Exception as e:  # noqa: BLE001 - one bad request must not kill the service
                    reply = {"ok": False, "error": "internal", "message": f"{type(e).__name__}: {e}"}
                try:
                    send_message(conn, reply, out_fds)
                except OSError:
                    break
                if isinstance(req, dict) and req.get("op") == "shutdown" and reply.get("ok"):
                    self.stop()
                    break
        finally:
            with self.cond:
                self._conns.pop(cid, None)
                for r in list(self.regions.values()):
                    if r.holders.pop(cid, None):
                        self.log(f"memsvc: connection {cid} went away holding {r.name!r}; released")
                    if r.state == "writable" and r.owner == cid:
                        self.log(f"memsvc: connection {cid} went away before publishing {r.name!r}; dropped")
                        self._forget(r)
                self.cond.notify_all()
            conn.close()

    def _allowed(self, path: Any, what: str) -> str:
        """``path`` resolved, if it lies under one of the service's roots (the weight store, the snapshot root,
        ``--allow`` directories); else the refusal."""
        if not isinstance(path, str) or not path or "\0" in path:
            raise _Refuse("bad_request", f"{what} must be a path")
        real = within_roots(path, self.roots)
        if real is None:
            raise _Refuse("denied", f"{what} {outside_roots(path, self.roots)}")
        return real

    def _forget(self, r: _Region) -> None:
        if r.mfd is not None:
            r.mfd.close()
        self.regions.pop(r.name, None)

    def _handle(self, req: dict, cid: int) -> tuple[dict, list[int]]:
        op = req.get("op")
        h = getattr(self, f"_op_{op}", None) if isinstance(op, str) else None
        if h is None:
            raise _Refuse("bad_request", f"unknown request {op!r}")
        return h(req, cid)

    @staticmethod
    def _need(req: dict, key: str, kind: type) -> Any:
        if not isinstance(req, dict):
            raise _Refuse("bad_request", "each region is a JSON object")
        v = req.get(key)
        if not isinstance(v, kind) or isinstance(v, bool) and kind is int:
            raise _Refuse("bad_request", f"request {req.get('op')!r} needs {key!r} ({kind.__name__})")
        return v

    def _region(self, name: str) -> _Region:
        """The region called name (caller holds self.cond), or the not_found refusal."""
        r = self.regions.get(name)
        if r is None:
            raise _Refuse("not_found", f"no region named {name!r}")
        return r

    # ---- operations ----
    def _op_ping(self, req: dict, cid: int) -> tuple[dict, list[int]]:
        return {"ok": True, "pid": os.getpid(), "threads": self.threads}, []

    def _op_list(self, req: dict, cid: int) -> tuple[dict, list[int]]:
        with self.cond:
            return {"ok": True, "regions": [r.info() for r in self.regions.values()]}, []

    def _op_load(self, req: dict, cid: int) -> tuple[dict, list[int]]:
        specs = req.get("regions")
        if not isinstance(specs, list) or not specs:
            raise _Refuse("bad_request", "load needs 'regions': [{name, path, offset, length, digest}]")
        todo: list[_Region] = []
        states = {}
        with self.cond:
            for s in specs:
                name = self._need(s, "name", str)
                raw_path = self._need(s, "path", str)
                digest = s.get("digest")
                offset, length = s.get("offset") or 0, s.get("length")
                if not _nonneg_int(offset) or not (length is None or _nonneg_int(length)) or not (
                        digest is None or isinstance(digest, str)):
                    raise _Refuse("bad_request", f"region {name!r}: offset and length are byte counts, digest a "
                                                 "string")
                path = self._allowed(raw_path, "region file")
                import stat as _stat
                try:
                    if not _stat.S_ISREG(os.stat(path).st_mode):
                        raise _Refuse("bad_request", f"region file {path} is not a regular file")
                except OSError as e:
                    raise _Refuse("not_found", f"region file {path}: {e.strerror}") from None
                r = self.regions.get(name)
                if r is not None and r.state in ("ready", "loading") and digest and r.digest == digest:
                    states[name] = r.state             # same content already here or on its way
                    continue
                if r is not None and r.state != "failed":
                    raise _Refuse("exists", f"region {name!r} already exists ({r.state}, digest {r.digest}); "
                                  "drop it first")
                src = {"path": path, "offset": offset, "length": length}
                r = _Region(name, "loading", size=s.get("length") or 0, digest=digest, source=src)
                self.regions[name] = r
                todo.append(r)
                states[name] = "loading"
        if todo:
            threading.Thread(target=self._load, args=(todo,), daemon=True,
                             name=f"memsvc-load-{todo[0].name}").start()
        return {"ok": True, "states": states}, []

    def _load(self, regions: list[_Region]) -> None:
        t0 = time.perf_counter()
        if self._load_delay:
            time.sleep(self._load_delay)
        segs = [memfd.Segment(r.source["path"], r.source["offset"], r.source["length"], name=r.name,
                              digest=r.digest) for r in regions]
        try:
            got = memfd.restore(segs, self.threads, seal=True, populate=True)
        except Exception as e:  # noqa: BLE001 - reported to every client that asks
            msg = str(e) if isinstance(e, DynsnapError) else (getattr(e, "strerror", None) or str(e))
            with self.cond:
                for r in regions:
                    r.state, r.error = "failed", f"loading region {r.name!r} failed: {msg}"
                    self.log(f"memsvc: {r.error}")
                self.cond.notify_all()
            return
        dt = time.perf_counter() - t0
        with self.cond:
            for r, m in zip(regions, got):
                if self.regions.get(r.name) is not r:   # dropped meanwhile
                    m.close()
                    continue
                r.mfd, r.size, r.digest, r.state, r.loaded_s = m, m.size, m.digest, "ready", dt
                self.log(f"memsvc: loaded {r.name!r} ({m.size} bytes, digest {m.digest}) in {dt:.3f} s")
            self.cond.notify_all()

    def _op_get(self, req: dict, cid: int) -> tuple[dict, list[int]]:
        name = self._need(req, "name", str)
        wait = bool(req.get("wait", False))
        timeout = req.get("timeout") or 300
        if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not 0 < timeout < 1e7:
            raise _Refuse("bad_request", "'timeout' must be a positive number of seconds")
        end = time.monotonic() + timeout
        with self.cond:
            while True:
                r = self._region(name)
                if r.state == "ready":
                    break
                if r.state == "failed":
                    raise _Refuse("failed", r.error or f"region {name!r} failed to load")
                if r.state == "writable":
                    raise _Refuse("busy", f"region {name!r} is being written by its creator and not published yet")
                if not wait:
                    raise _Refuse("busy", f"region {name!r} is being restored; ask again or wait for it")
                left = end - time.monotonic()
                if left <= 0 or self._stop.is_set():
                    raise _Refuse("timeout", f"region {name!r} was still loading after {timeout:.0f} s")
                self.cond.wait(min(left, 1.0))
            r.holders[cid] = r.holders.get(cid, 0) + 1
            assert r.mfd is not None
            return {"ok": True, "memfd": r.mfd.header()}, [r.mfd.fd]

    def _op_create(self, req: dict, cid: int) -> tuple[dict, list[int]]:
        name = self._need(req, "name", str)
        size = self._need(req, "size", int)
        if not 0 <= size <= 1 << 46:
            raise _Refuse("bad_request", "'size' must be a byte count (at most 64 TiB)")
        with self.cond:
            if name in self.regions:
                raise _Refuse("exists", f"region {name!r} already exists ({self.regions[name].state})")
            m = memfd.create(size, name)
            self.regions[name] = _Region(name, "writable", size=size, mfd=m, owner=cid,
                                         source={"created_by": cid})
            return {"ok": True, "memfd": m.header()}, [m.fd]

    def _op_publish(self, req: dict, cid: int) -> tuple[dict, list[int]]:
        name = self._need(req, "name", str)
        with self.cond:
            r = self._region(name)
            if r.state != "writable" or r.owner != cid:
                raise _Refuse("bad_request", f"region {name!r} is {r.state}; only its creator publishes it once")
            assert r.mfd is not None
            try:
                r.mfd.seal()
            except memfd.MemfdError as e:
                raise _Refuse("busy", f"cannot publish {name!r}: unmap the writable mapping first ({e})") from None
            r.digest = r.mfd.digest = r.mfd.compute_digest(self.threads)
            r.state, r.owner = "ready", None
            self.cond.notify_all()
            return {"ok": True, "digest": r.digest, "size": r.size}, []

    def _op_release(self, req: dict, cid: int) -> tuple[dict, list[int]]:
        name = self._need(req, "name", str)
        with self.cond:
            r = self.regions.get(name)
            if r is not None and r.holders.get(cid):
                r.holders[cid] -= 1
                if not r.holders[cid]:
                    del r.holders[cid]
            return {"ok": True}, []

    def _op_drop(self, req: dict, cid: int) -> tuple[dict, list[int]]:
        name = self._need(req, "name", str)
        with self.cond:
            r = self._region(name)
            others = {c: n for c, n in r.holders.items() if c != cid}
            if others and not req.get("force"):
                raise _Refuse("held", f"region {name!r} is held by {len(others)} client(s); use force")
            self._forget(r)
            self.cond.notify_all()
            return {"ok": True}, []

    def _op_save(self, req: dict, cid: int) -> tuple[dict, list[int]]:
        from ..weights.store import WeightDir
        names = req.get("names")
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise _Refuse("bad_request", "save needs 'names': [str]")
        store = WeightDir(self._allowed(req.get("store"), "weight store"))
        picked = []
        with self.cond:
            for n in names:
                r = self.regions.get(n)
                if r is None or r.state != "ready" or r.mfd is None:
                    raise _Refuse("not_found" if r is None else "busy",
                                  f"region {n!r} is {'missing' if r is None else r.state}; only ready regions are saved")
                picked.append((n, r.mfd))
        out = {}
        for n, m in picked:      # the memfd is sealed: safe to read without the lock
            out[n] = store.put(m, self.threads).to_dict()
        return {"ok": True, "store": str(store.root), "regions": out}, []

    def _op_shutdown(self, req: dict, cid: int) -> tuple[dict, list[int]]:
        return {"ok": True}, []


# ---------------------------------------------------------------- client


def spawn(socket_path: str | os.PathLike, *, threads: Optional[int] = None, log: Any = None,
          env: Optional[dict] = None, timeout: float = 30.0, allow: Iterable[str | os.PathLike] = (),
          group: Optional[str] = None) -> subprocess.Popen:
    """Start ``dynsnap memsvc`` as a child process and wait until it answers."""
    cmd = [sys.executable, "-m", "dynsnap_core.cli", "memsvc", "--socket", str(socket_path)]
    if threads:
        cmd += ["--threads", str(threads)]
    for d in allow:
        cmd += ["--allow", str(d)]
    if group is not None:
        cmd += ["--group", str(group)]
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log or subprocess.DEVNULL,
                         stderr=log or subprocess.DEVNULL, start_new_session=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), **(env or {})})
    end = time.monotonic() + timeout
    while True:
        if p.poll() is not None:
            raise MemsvcError(f"the memory service exited with status {p.returncode} at start",
                              code="unreachable", stage="spawn")
        try:
            with Client(socket_path, timeout=5) as c:
                c.ping()
            return p
        except MemsvcError:
            if time.monotonic() > end:
                p.kill()
                p.wait()
                raise
            time.sleep(0.02)




def main(socket_path: str, threads: Optional[int] = None, quiet: bool = False, allow: Iterable[str] = (),
         group: Optional[str] = None) -> int:
    """``dynsnap memsvc``: serve until SIGTERM/SIGINT or a shutdown request."""
    import signal

    svc = MemoryService(socket_path, threads=threads, allow=allow, group=group,
                        log=None if quiet else (lambda s: print(s, file=sys.stderr, flush=True)))
    svc.bind()

    def stop(signum, frame):
        svc.stop()
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    svc.serve_forever()
    return 0
