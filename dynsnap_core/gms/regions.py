"""Releasable GPU regions in the worker: weights mapped from the GPU memory service, private memory (KV cache).

A :class:`Region` is one virtual address reservation (``cuMemAddressReserve``) kept for the life of the
process; parts of it are carved out, in order, for:

- :class:`WeightsRegion` (``region.map_weights(socket, set)``): the service's allocation of a weight set,
  imported from its fd and mapped read-only (``read_only`` says whether the driver allowed it);
  ``.tensors()`` gives torch views (zero copy), ``.cuda_array_interface(name)`` the same for other users.
- :class:`PrivateRegion` (``PrivateRegion(size, device)`` or ``region.private(size)``): this process's own
  ``cuMemCreate`` memory, for a KV cache or a scratch pool; ``.tensor(dtype, shape)`` views it.

Both have ``release()`` (unmap, free the physical memory, close every fd and the connection to the service;
the reservation stays; idempotent) and ``reacquire()`` (map again at the same address: weights re-opened from
the service with the same layout hash, so other weights are never mapped there; private memory created anew,
its content lost unless ``keep=True``, which copies it to host memory on release and back on reacquire).
Tensors made before a release stay valid objects and see the memory again after reacquire. Every region
registers itself with this process's agent (:mod:`.agent`): quiesce releases it, resume reacquires it.

Writing to a read-only weights mapping is an illegal address error on the GPU (the CUDA context is lost).
"""
from __future__ import annotations

import contextlib
import ctypes
import glob
import mmap
import os
import threading
import time
from typing import Any, Iterator, Optional

from . import agent as _agent, layout as L, protocol as P, vmm

__all__ = ["Region", "WeightsRegion", "PrivateRegion", "map_weights", "torch_dtype", "RegionError", "pool_library",
           "pool_lib", "pool_stats"]


class RegionError(P.GmsError):
    """A region operation failed (wrong state, a size that does not fit, a set whose layout changed)."""


def torch_dtype(torch: Any, name: str) -> Any:
    t = {"BOOL": "bool", "U8": "uint8", "I8": "int8", "I16": "int16", "U16": "uint16", "F16": "float16",
         "BF16": "bfloat16", "I32": "int32", "U32": "uint32", "F32": "float32", "I64": "int64", "U64": "uint64",
         "F64": "float64", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}[name]
    dt = getattr(torch, t, None)
    if dt is None:
        raise RegionError(f"this torch has no dtype for {name}", code="bad_request")
    return dt


class _Cai:
    def __init__(self, ptr: int, nbytes: int, typestr: str = "|u1", shape: Optional[tuple] = None):
        self.__cuda_array_interface__ = {"shape": shape if shape is not None else (nbytes,), "typestr": typestr,
                                         "data": (int(ptr), False), "version": 3, "strides": None}


def _bytes_view(ptr: int, nbytes: int, device: int) -> Any:
    import torch
    return torch.as_tensor(_Cai(ptr, nbytes), device=f"cuda:{device}")


def _map_handle(va: int, size: int, handle: int, device: int, *, read_only: bool) -> bool:
    """Map ``handle`` at ``va`` and make it accessible (read-only when asked; returns whether it is). On a failure
    nothing stays mapped and the handle is released."""
    try:
        vmm.map(va, size, handle, 0, device)
        try:
            return vmm.set_access(va, size, device, read_only=read_only)
        except BaseException:
            vmm.unmap(va, size, device)
            raise
    except BaseException:
        vmm.release(handle, device)
        raise


class _Mapped:
    """What both kinds of region share: ``_acquire()`` maps physical memory at ``va`` (``_handle`` set while it
    is), ``release()`` lets it go; :meth:`_start` maps it and registers the region with this process's agent."""

    _handle: Optional[int] = None

    @property
    def mapped(self) -> bool:
        return self._handle is not None

    def _acquire(self) -> None:
        raise NotImplementedError

    def _start(self) -> None:
        self._acquire()
        _agent.track(self)


class Region:
    """One VA reservation of ``size`` bytes (rounded up to the granularity) on ``device``, carved in order."""

    def __init__(self, size: int, device: int = 0):
        if not isinstance(size, int) or size <= 0:
            raise RegionError(f"a region needs a positive size in bytes, not {size!r}", code="bad_request")
        self.device = int(device)
        self.granularity = vmm.granularity(self.device)
        self.size = vmm.round_up(size, self.granularity)
        self.va = vmm.reserve(self.size, self.granularity, self.device)
        self._next = 0
        self._lock = threading.Lock()

    def carve(self, nbytes: int) -> int:
        """The address of the next ``nbytes`` (granularity-rounded) of the reservation."""
        n = vmm.round_up(nbytes, self.granularity)
        with self._lock:
            if self._next + n > self.size:
                raise RegionError(f"region at {self.va:#x} has {self.size - self._next} bytes left, {n} asked",
                                  code="no_memory")
            va = self.va + self._next
            self._next += n
            return va

    def map_weights(self, client: Any, set_ref: str, layout_hash: Optional[str] = None) -> "WeightsRegion":
        return WeightsRegion(client, set_ref, layout_hash, region=self)

    def private(self, size: int, *, keep: bool = False) -> "PrivateRegion":
        return PrivateRegion(size, self.device, keep=keep, region=self)

    def __repr__(self) -> str:
        return f"Region(cuda:{self.device}, va={self.va:#x}, size={self.size}, used={self._next})"


class WeightsRegion(_Mapped):
    """A weight set of the service mapped read-only at a fixed address (see the module doc)."""

    def __init__(self, client: Any, set_ref: str, layout_hash: Optional[str] = None, *,
                 region: Optional[Region] = None, device: Optional[int] = None, timeout: float = 3600.0):
        self.socket_path = client.path if isinstance(client, P.Client) else str(client or P.default_socket())
        self.set_ref, self.layout_hash, self.timeout = set_ref, layout_hash, timeout
        self.region = region
        self.device = region.device if region is not None else int(device or 0)
        self.va: Optional[int] = None
        self.size = 0
        self.layout: list = []
        self.read_only: Optional[bool] = None
        self._handle: Optional[int] = None
        self._client: Optional[P.Client] = None
        self._lock = threading.RLock()
        self._views: Optional[dict] = None
        self.timings: dict = {}
        self._start()

    def _acquire(self) -> None:
        t0 = time.perf_counter()
        client = P.Client(self.socket_path, timeout=self.timeout + 30)
        fd = -1
        try:
            reply, fd = client.open(self.set_ref, self.layout_hash, self.timeout)
            size, table, h = int(reply["size"]), reply["layout"], str(reply["layout_hash"])
            L.check_table(table, size)
            if L.layout_hash(table) != h or (self.layout_hash is not None and h != self.layout_hash):
                raise RegionError(f"the service's layout for {self.set_ref!r} ({h}) does not match what this worker "
                                  f"mapped ({self.layout_hash})", code="mismatch")
            if self.va is None:
                if self.region is None:
                    self.region = Region(size, self.device)
                self.va = self.region.carve(size)
                self.size = vmm.round_up(size, self.region.granularity)
            elif size > self.size:
                raise RegionError(f"weight set {self.set_ref!r} now needs {size} bytes, {self.size} are reserved at "
                                  f"{self.va:#x}", code="mismatch")
            t1 = time.perf_counter()
            handle = vmm.import_fd(fd, self.device)
            self.read_only = _map_handle(self.va, size, handle, self.device, read_only=True)
            self._handle, self._mapped_size = handle, size
            self.layout, self.layout_hash = table, h
            self._client = client
            self.timings = {"open_s": t1 - t0, "map_s": time.perf_counter() - t1}
        except BaseException:
            client.close()
            raise
        finally:
            if fd >= 0:
                os.close(fd)

    def release(self) -> None:
        """Unmap, drop the physical memory and the hold, close the connection; the reservation stays."""
        with self._lock:
            if self._handle is None:
                return
            h, self._handle = self._handle, None
            try:
                vmm.unmap(self.va, self._mapped_size, self.device)
                vmm.release(h, self.device)
            finally:
                c, self._client = self._client, None
                if c is not None:
                    try:
                        if c.sock is not None:
                            c.sock.settimeout(10)   # a hung service must not hold up a quiesce
                        c.close_set(self.set_ref)
                    except P.GmsError:
                        pass          # the service is gone: our hold went with the connection
                    c.close()

    def reacquire(self) -> None:
        """Map the set again at the same address (the service re-opens it with the same layout hash)."""
        with self._lock:
            if self._handle is None:
                self._acquire()

    def tensors(self) -> dict:
        """Tensor name -> torch tensor viewing the mapping (zero copy; the same objects on every call)."""
        with self._lock:
            if self._views is None:
                import torch
                base = _bytes_view(self.va, self.size, self.device)
                out = {}
                for t in self.layout:
                    v = base[t["offset"]:t["offset"] + t["nbytes"]].view(torch_dtype(torch, t["dtype"]))
                    out[t["name"]] = v.view(t["shape"])
                self._views = out
            return dict(self._views)

    def cuda_array_interface(self, name: str) -> dict:
        for t in self.layout:
            if t["name"] == name:
                return _Cai(self.va + t["offset"], t["nbytes"], L.TYPESTR[t["dtype"]],
                            tuple(t["shape"])).__cuda_array_interface__
        raise KeyError(name)

    def info(self) -> dict:
        return {"kind": "weights", "set": self.set_ref, "layout_hash": self.layout_hash, "va": self.va,
                "size": self.size, "mapped": self.mapped, "read_only": self.read_only, "service": self.socket_path}

    def __repr__(self) -> str:
        return f"WeightsRegion({self.set_ref!r}, va={self.va:#x}, size={self.size}, mapped={self.mapped})"


class PrivateRegion(_Mapped):
    """This process's own GPU memory at a fixed address (KV cache, scratch pools); see the module doc."""

    def __init__(self, size: int, device: int = 0, *, keep: bool = False, region: Optional[Region] = None):
        if region is None:
            region = Region(size, device)
        self.region, self.device, self.keep = region, region.device, keep
        self.size = vmm.round_up(size, region.granularity)
        self.va = region.carve(self.size)
        self._handle: Optional[int] = None
        self._saved: Optional[mmap.mmap] = None
        self._pool: Optional[tuple] = None
        self._lock = threading.RLock()
        self._start()

    def _acquire(self) -> None:
        h = vmm.create(self.size, self.device, exportable=False)
        _map_handle(self.va, self.size, h, self.device, read_only=False)
        self._handle = h

    def release(self) -> None:
        with self._lock:
            if self._handle is None:
                return
            if self.keep:
                self._saved = self._copy_out()
            h, self._handle = self._handle, None
            vmm.unmap(self.va, self.size, self.device)
            vmm.release(h, self.device)

    def reacquire(self) -> None:
        with self._lock:
            if self._handle is not None:
                return
            self._acquire()
            if self._saved is not None:
                saved, self._saved = self._saved, None
                self._copy_in(saved)
                saved.close()

    def _copy_out(self) -> mmap.mmap:
        """The content in anonymous host memory (plain memory, so CRIU dumps it like any other; pinned only for
        the duration of the copy)."""
        m = mmap.mmap(-1, self.size)
        addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
        pinned = vmm.host_register(addr, self.size, self.device)
        try:
            vmm.copy_dtoh(addr, self.va, self.size, self.device)
        finally:
            if pinned:
                vmm.host_unregister(addr, self.device)
        return m

    def _copy_in(self, m: mmap.mmap) -> None:
        addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
        pinned = vmm.host_register(addr, self.size, self.device)
        try:
            vmm.copy_htod(self.va, addr, self.size, self.device)
        finally:
            if pinned:
                vmm.host_unregister(addr, self.device)

    def tensor(self, dtype: Any = None, shape: Optional[Any] = None, offset: int = 0) -> Any:
        """A torch view of the region (uint8 over all of it by default)."""
        base = _bytes_view(self.va + offset, self.size - offset, self.device)
        if dtype is not None:
            base = base.view(dtype) if shape is None else base[:_nbytes(dtype, shape)].view(dtype)
        return base if shape is None else base.view(shape)

    def cuda_array_interface(self) -> dict:
        return _Cai(self.va, self.size).__cuda_array_interface__

    @contextlib.contextmanager
    def torch_pool(self) -> Iterator[Any]:
        """Route torch's CUDA allocations made inside the block into this region (a ``torch.cuda.MemPool`` over
        a pluggable allocator, :func:`pool_library`): an engine allocates its KV cache as usual, and quiesce /
        resume release and bring back that memory at the same addresses. One region at a time per process (the
        allocator has one process-wide slot); the pool (and this region) must outlive the tensors made in it."""
        import torch
        lib = pool_lib()
        rc = lib.gms_pool_set(ctypes.c_uint64(self.va), ctypes.c_uint64(self.size), ctypes.c_int(self.device))
        if rc != 0:
            raise RegionError("another PrivateRegion's torch pool still has live allocations; only one region "
                              "can back torch allocations at a time" if rc == -16 else
                              f"cannot use region {self.va:#x} as a torch pool (error {rc})", code="busy")
        if self._pool is None:
            alloc = torch.cuda.memory.CUDAPluggableAllocator(pool_library(), "gms_pool_alloc", "gms_pool_free")
            self._pool = (alloc, torch.cuda.MemPool(alloc.allocator()))
        with torch.cuda.use_mem_pool(self._pool[1], device=torch.device("cuda", self.device)):
            yield self._pool[1]

    def info(self) -> dict:
        return {"kind": "private", "va": self.va, "size": self.size, "mapped": self.mapped, "keep": self.keep}

    def __repr__(self) -> str:
        return f"PrivateRegion(va={self.va:#x}, size={self.size}, mapped={self.mapped})"


def pool_library() -> str:
    """Path of the bump allocator torch's CUDAPluggableAllocator loads (bindings/gms/gms_pool.c, built by setup.py)."""
    here = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "_lib")
    found = sorted(glob.glob(os.path.join(here, "_gmspool*.so")))
    if not found:
        raise RegionError(f"the torch pool allocator (_gmspool*.so) is not built in {here}: reinstall the package "
                          "or run `python setup.py build_ext --inplace`", code="internal")
    return found[0]


_POOL_LIB: Optional[ctypes.CDLL] = None


def pool_lib() -> ctypes.CDLL:
    """The pool allocator loaded with ctypes (the same library object torch's dlopen gets)."""
    global _POOL_LIB
    if _POOL_LIB is None:
        lib = ctypes.CDLL(pool_library())
        lib.gms_pool_set.argtypes = [ctypes.c_uint64, ctypes.c_uint64, ctypes.c_int]
        lib.gms_pool_set.restype = ctypes.c_int
        lib.gms_pool_clear.argtypes = []
        lib.gms_pool_clear.restype = ctypes.c_int
        lib.gms_pool_stats.argtypes = [ctypes.POINTER(ctypes.c_uint64)] * 4
        lib.gms_pool_stats.restype = None
        lib.gms_pool_alloc.argtypes = [ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
        lib.gms_pool_alloc.restype = ctypes.c_void_p
        lib.gms_pool_free.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
        lib.gms_pool_free.restype = None
        _POOL_LIB = lib
    return _POOL_LIB


def pool_stats() -> dict:
    """{base, size, used, live} of the torch pool allocator's slot."""
    vals = [ctypes.c_uint64(0) for _ in range(4)]
    pool_lib().gms_pool_stats(*[ctypes.byref(v) for v in vals])
    return dict(zip(("base", "size", "used", "live"), (v.value for v in vals)))


def _nbytes(dtype: Any, shape: Any) -> int:
    n = dtype.itemsize if hasattr(dtype, "itemsize") else 1
    for x in (shape if isinstance(shape, (list, tuple)) else [shape]):
        n *= int(x)
    return n


def map_weights(client: Any, set_ref: str, layout_hash: Optional[str] = None, device: int = 0) -> WeightsRegion:
    """Weights of the service in a reservation of their own size."""
    return WeightsRegion(client, set_ref, layout_hash, device=device)
