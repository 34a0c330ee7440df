"""The GPU memory service: a long-lived process that owns weight sets in GPU memory and hands them to workers.

``dynsnap gms serve --socket PATH --device N [--store DIR] [--allow DIR] [--max-bytes N]``. A weight set (a
name in the weight store, or the path of a set's manifest or store directory under an allowed root) is loaded
once into ONE exportable ``cuMemCreate`` allocation (POSIX-fd handle), with the weights code's fastest path
(``dynsnap_core.weights.load`` into the allocation, every shard's digest checked), tensors at the offsets of
:mod:`.layout`. Workers ``open`` it and get the allocation's fd (SCM_RIGHTS) plus the tensor table and layout
hash, and map it read-only. Each set moves ``loading -> resident`` or ``loading -> failed``; only a resident
set is ever handed out, concurrent ensures of one set load it once (the others wait), and a failed load frees
what it allocated. Holds belong to connections (the peer pid comes from SO_PEERCRED); a set is freed only when
nobody holds it and ``evict`` asks or another set needs the memory (:mod:`.policy`: LRU among unheld sets,
``--max-bytes`` budget). Only root and the service's own uid may connect.

The service starts without a GPU (status works); ensure/open then answer with the CudaUnavailable sentence.
"""
from __future__ import annotations

import os
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

from ..errors import CudaUnavailable, DynsnapError
from ..unixsock import Server, allowed_roots, outside_roots, peer_cred, within_roots
from . import layout as L, policy, protocol as P, vmm

__all__ = ["GpuMemoryService", "serve_main", "status_main", "evict_main"]


class _Refuse(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message


@dataclass
class _Set:
    key: str                      # the manifest's real path: one entry per weight set on disk
    name: str
    state: str                    # loading | resident | failed
    nbytes: int = 0               # allocation size
    handle: Optional[int] = None
    table: list = field(default_factory=list)
    layout_hash: Optional[str] = None
    error: Optional[str] = None
    holders: dict = field(default_factory=dict)     # connection id -> hold count
    load_s: Optional[float] = None
    details: dict = field(default_factory=dict)
    last_used: float = 0.0
    refs: set = field(default_factory=set)          # the names/paths requests used for it

    def info(self, pids: dict) -> dict:
        return {"name": self.name, "manifest": self.key, "state": self.state, "bytes": self.nbytes,
                "layout_hash": self.layout_hash, "tensors": len(self.table), "error": self.error,
                "holders": sorted({pids.get(c, -1) for c in self.holders}), "holds": sum(self.holders.values()),
                "load_s": self.load_s, "load": self.details, "refs": sorted(self.refs)}


class GpuMemoryService(Server):
    """The service: sets by manifest path, one thread per connection, one load at a time."""

    name = "gms"

    def __init__(self, socket_path: str, *, device: int = 0, store: Optional[str] = None,
                 allow: Iterable[str] = (), max_bytes: Optional[int] = None, memsvc: Optional[str] = None,
                 log: Optional[Callable[[str], Any]] = None):
        from ..weights import Store
        super().__init__(str(socket_path), log)
        self.device = int(device)
        self.store = Store(store)
        self.roots = allowed_roots([*allow, str(self.store.root)])
        self.max_bytes = max_bytes
        self.memsvc = memsvc               # shards from the host memory service (weights' memfd path) when set
        self.sets: dict[str, _Set] = {}
        self._load_lock = threading.Lock()
        self._pids: dict[int, int] = {}
        self._t0 = time.time()

    # ---- lifecycle ----
    def bind(self) -> None:
        if self._sock is None:
            self._sock, self._sock_id = P.bind_private(self.socket_path)

    def _banner(self) -> str:
        return f"gms: serving cuda:{self.device} on {self.socket_path} (store {self.store.root})"

    def _drop_all(self) -> None:
        for s in list(self.sets.values()):
            if s.state == "resident":
                self._free(s)
        self.sets.clear()

    # ---- connections ----
    def _serve_conn(self, conn: socket.socket, cid: int) -> None:
        try:
            why = P.peer_refusal(conn)
            if why is not None:
                self.log(f"gms: refused a connection: {why}")
                self._reply(conn, {"ok": False, "error": "denied", "message": why})
                P.drain(conn)
                return
            try:
                self._pids[cid] = int(peer_cred(conn)[0])
            except OSError:
                self._pids[cid] = -1
            while not self._stop.is_set():
                try:
                    req, fds = P.recv(conn, P.MAX_REQUEST)
                except (ConnectionError, OSError):
                    return
                except P.ProtocolError as e:
                    self._reply(conn, {"ok": False, "error": "bad_request", "message": f"malformed message: {e}"})
                    P.drain(conn)
                    return
                if fds:
                    P._close_all(fds)
                    self._reply(conn, {"ok": False, "error": "bad_request",
                                       "message": "malformed message: clients never send file descriptors"})
                    P.drain(conn)
                    return
                try:
                    req = P.validate(req)
                except P.ProtocolError as e:
                    self._reply(conn, {"ok": False, "error": "bad_request", "message": f"malformed request: {e}"})
                    P.drain(conn)
                    return
                out_fds: list[int] = []
                try:
                    reply, out_fds = getattr(self, f"_op_{req['op']}")(req, cid)
                except _Refuse as r:
                    reply = {"ok": False, "error": r.code, "message": r.message}
                except CudaUnavailable as e:
                    reply = {"ok": False, "error": "cuda_unavailable", "message": str(e)}
                except DynsnapError as e:
                    reply = {"ok": False, "error": "failed", "message": str(e)}
                except Exception as e:  # noqa: BLE001 - one bad request must not kill the service
                    reply = {"ok": False, "error": "internal", "message": f"{type(e).__name__}: {e}"}
                try:
                    if not self._reply(conn, reply, out_fds):
                        if reply.get("ok") and req["op"] == "open":
                            self._drop_hold(req, cid)
                        return
                finally:
                    P._close_all(out_fds)
        finally:
            with self.cond:
                self._conns.pop(cid, None)
                pid = self._pids.pop(cid, None)
                for s in self.sets.values():
                    if s.holders.pop(cid, None):
                        s.last_used = time.monotonic()
                        self.log(f"gms: pid {pid} went away holding {s.name!r}; its hold is dropped")
                self.cond.notify_all()
            conn.close()

    @staticmethod
    def _reply(conn: socket.socket, obj: dict, fds: Iterable[int] = ()) -> bool:
        try:
            P.send(conn, {"v": P.VERSION, **obj}, list(fds))
            return True
        except OSError:
            return False

    # ---- sets ----
    def _resolve(self, ref: str) -> Any:
        """The WeightSet a request names: a set name in the store, or a manifest / store directory path under an
        allowed root."""
        from ..weights import WeightsError, open_set
        if ref.startswith("/"):
            real = within_roots(ref, self.roots)
            if real is None:
                raise _Refuse("denied", outside_roots(ref, self.roots))
            target: Any = real
        else:
            target = ref
        try:
            return open_set(target, None if ref.startswith("/") else self.store)
        except WeightsError as e:
            code = "not_found" if type(e).__name__ == "WeightSetNotFound" else "failed"
            raise _Refuse(code, f"weight set {ref!r} is not resident and cannot be loaded: {e}") from None
        except OSError as e:
            raise _Refuse("not_found", f"weight set {ref!r} is not resident and cannot be loaded: "
                                       f"{e.strerror or e}") from None

    def _find(self, ref: str) -> Optional[_Set]:
        for s in self.sets.values():
            if ref in s.refs:
                return s
        return None

    def _ensure(self, ref: str, timeout: float) -> _Set:
        """The resident set (loading it if needed, once; concurrent callers wait), or a refusal."""
        with self.cond:
            s = self._find(ref)
            if s is not None and s.state == "resident":
                return s
        why = vmm.unavailable_reason()
        ws = self._resolve(ref)
        if why is not None:
            raise _Refuse("cuda_unavailable", why)
        key = os.path.realpath(ws.manifest_path or ref)
        end = time.monotonic() + timeout
        with self.cond:
            s = self.sets.get(key)
            if s is None or s.state == "failed":
                s = _Set(key, ws.name or ref, "loading")
                s.refs.add(ref)
                self.sets[key] = s
                threading.Thread(target=self._load, args=(s, ws), daemon=True, name=f"gms-load-{s.name}").start()
            s.refs.add(ref)
            while s.state == "loading":
                left = end - time.monotonic()
                if left <= 0 or self._stop.is_set():
                    raise _Refuse("timeout", f"weight set {s.name!r} was still loading after {timeout:.0f} s")
                self.cond.wait(min(left, 1.0))
            if s.state == "failed":
                raise _Refuse("failed", s.error or f"weight set {s.name!r} failed to load")
            return s

    def _load(self, s: _Set, ws: Any) -> None:
        """loading -> resident | failed. Nothing is visible to workers until resident."""
        handle = va = None
        size = 0
        dev = self.device
        t0 = time.perf_counter()
        try:
            with self._load_lock:
                gran = vmm.granularity(dev)
                size = L.allocation_size(ws, gran)
                self._make_room(s, size)
                handle = vmm.create(size, dev, exportable=True)
                va = vmm.reserve(size, gran, dev)
                vmm.map(va, size, handle, 0, dev)
                vmm.set_access(va, size, dev, read_only=False)
                table = L.table_of(ws)
                details = self._fill(ws, va, table)
                vmm.synchronize(dev)
                vmm.unmap(va, size, dev)
                vmm.free_reservation(va, size, dev)
                va = None
        except BaseException as e:  # noqa: BLE001 - reported to every waiting client
            msg = str(e) if isinstance(e, (DynsnapError, _Refuse)) else f"{type(e).__name__}: {e}"
            if isinstance(e, _Refuse):
                msg = e.message
            for fn in ((lambda: vmm.unmap(va, size, dev)) if va is not None else None,
                       (lambda: vmm.free_reservation(va, size, dev)) if va is not None else None,
                       (lambda: vmm.release(handle, dev)) if handle is not None else None):
                if fn is not None:
                    try:
                        fn()
                    except Exception:  # noqa: BLE001 - best effort cleanup after a failure
                        pass
            with self.cond:
                s.state, s.error, s.nbytes = "failed", f"loading weight set {s.name!r} failed: {msg}", 0
                self.log(f"gms: {s.error}")
                self.cond.notify_all()
            return
        with self.cond:
            s.handle, s.nbytes, s.table, s.layout_hash = handle, size, table, L.layout_hash(table)
            s.load_s, s.details, s.state = time.perf_counter() - t0, details, "resident"
            s.last_used = time.monotonic()
            self.log(f"gms: {s.name!r} resident ({size} bytes, {len(table)} tensors, {s.layout_hash}) in "
                     f"{s.load_s:.3f} s")
            self.cond.notify_all()

    def _fill(self, ws: Any, base: int, table: list) -> dict:
        """Load the set's bytes into the mapping at ``base`` with the weights code (digests checked)."""
        from ..weights import load
        into = {t["name"]: _Target(base + t["offset"], t["dtype"], t["shape"]) for t in table}
        got = load(ws, device=f"cuda:{self.device}", into=into, verify=True, memsvc=self.memsvc)
        return {"path": got.path, "seconds": got.seconds, "gbps": got.gbps,
                **{k: v for k, v in got.details.items() if isinstance(v, (int, float, str, bool))}}

    def _make_room(self, s: _Set, need: int) -> None:
        """Free unheld sets (LRU) so ``need`` fits the budget and the GPU, or refuse (policy.plan)."""
        free, _total = vmm.mem_info(self.device)
        with self.cond:
            res = [policy.Resident(k, x.nbytes, bool(x.holders), x.last_used) for k, x in self.sets.items()
                   if x.state == "resident"]
            pl = policy.plan(res, need, budget=self.max_bytes, free=free, what=f"weight set {s.name!r}")
            if not pl.ok:
                raise _Refuse("no_memory", str(pl.reason))
            for k in pl.evict:
                x = self.sets.get(k)
                if x is not None and not x.holders and x.state == "resident":
                    self.log(f"gms: evicting {x.name!r} ({x.nbytes} bytes, least recently used) for {s.name!r}")
                    self._free(x)
                    del self.sets[k]

    def _free(self, s: _Set) -> None:
        if s.handle is not None:
            h, s.handle = s.handle, None
            try:
                vmm.release(h, self.device)
            except Exception as e:  # noqa: BLE001 - logged; the entry goes anyway
                self.log(f"gms: releasing {s.name!r} failed: {e}")
        s.state = "freed"

    def _drop_hold(self, req: dict, cid: int) -> None:
        with self.cond:
            s = self._find(req["set"])
            if s is not None and s.holders.get(cid):
                s.holders[cid] -= 1
                if not s.holders[cid]:
                    del s.holders[cid]
                s.last_used = time.monotonic()

    # ---- operations ----
    def _op_ping(self, req: dict, cid: int) -> tuple[dict, list[int]]:
        return {"ok": True, "pid": os.getpid(), "device": self.device}, []

    def _op_status(self, req: dict, cid: int) -> tuple[dict, list[int]]:
        gpu: dict = {"device": self.device, "free": None, "total": None, "error": vmm.unavailable_reason()}
        if gpu["error"] is None:
            try:
                gpu["free"], gpu["total"] = vmm.mem_info(self.device)
            except DynsnapError as e:
                gpu["error"] = str(e)
        with self.cond:
            sets = [s.info(self._pids) for s in self.sets.values()]
        return {"ok": True, "service": {"pid": os.getpid(), "uid": os.geteuid(), "socket": self.socket_path,
                                        "device": self.device, "store": str(self.store.root),
                                        "allowed_roots": self.roots, "max_bytes": self.max_bytes,
                                        "memsvc": self.memsvc,
                                        "started": self._t0},
                "gpu": gpu, "sets": sets, "resident_bytes": sum(s["bytes"] for s in sets if s["state"] == "resident"),
                "connections": len(self._conns)}, []

    def _op_ensure(self, req: dict, cid: int) -> tuple[dict, list[int]]:
        s = self._ensure(req["set"], float(req.get("timeout", 3600)))
        return {"ok": True, "name": s.name, "state": s.state, "bytes": s.nbytes, "layout_hash": s.layout_hash,
                "load_s": s.load_s}, []

    def _op_open(self, req: dict, cid: int) -> tuple[dict, list[int]]:
        s = self._ensure(req["set"], float(req.get("timeout", 3600)))
        want = req.get("layout_hash")
        with self.cond:
            if s.state != "resident" or s.handle is None:
                raise _Refuse("busy", f"weight set {s.name!r} was freed meanwhile; ask again")
            if want is not None and want != s.layout_hash:
                raise _Refuse("mismatch", f"weight set {s.name!r} has layout hash {s.layout_hash}, the worker asked "
                                          f"for {want}: refusing to map other weights at its addresses")
            fd = vmm.export_fd(s.handle, self.device)
            s.holders[cid] = s.holders.get(cid, 0) + 1
            s.last_used = time.monotonic()
            return {"ok": True, "name": s.name, "size": s.nbytes, "layout": s.table, "layout_hash": s.layout_hash,
                    "device": self.device}, [fd]

    def _op_close(self, req: dict, cid: int) -> tuple[dict, list[int]]:
        self._drop_hold(req, cid)
        return {"ok": True}, []

    def _op_evict(self, req: dict, cid: int) -> tuple[dict, list[int]]:
        with self.cond:
            s = self._find(req["set"])
            if s is None:
                raise _Refuse("not_found", f"weight set {req['set']!r} is not resident")
            if s.state == "loading":
                raise _Refuse("busy", f"weight set {s.name!r} is loading; evict it once it is resident")
            if s.holders:
                pids = sorted({self._pids.get(c, -1) for c in s.holders})
                raise _Refuse("held", f"weight set {s.name!r} is held by worker pid(s) "
                                      f"{', '.join(map(str, pids))}; it is freed once they let go")
            freed = s.nbytes
            self._free(s)
            del self.sets[s.key]
            self.cond.notify_all()
            return {"ok": True, "freed_bytes": freed}, []


class _Target:
    """A load destination inside the allocation (what ``weights.load(into=...)`` accepts)."""

    def __init__(self, ptr: int, dtype: str, shape: list[int]):
        self.__cuda_array_interface__ = {"shape": tuple(shape), "typestr": L.TYPESTR[dtype], "data": (ptr, False),
                                         "version": 3, "strides": None}


# ---------------------------------------------------------------- CLI bodies

def serve_main(a: Any) -> int:
    import signal
    import sys
    svc = GpuMemoryService(a.socket or P.default_socket(), device=a.device, store=a.store, allow=a.allow or (),
                           max_bytes=a.max_bytes, memsvc=getattr(a, "memsvc", None), log=lambda m: print(m, file=sys.stderr, flush=True))
    svc.bind()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: svc.stop())
    svc.serve_forever()
    return 0


def status_main(a: Any) -> dict:
    with P.Client(a.socket or P.default_socket(), timeout=30) as c:
        return c.status()


def evict_main(a: Any) -> dict:
    with P.Client(a.socket or P.default_socket(), timeout=30) as c:
        return c.evict(a.set)
