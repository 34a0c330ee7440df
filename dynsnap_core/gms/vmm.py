"""Thin wrappers over the CUDA driver's virtual memory management API (cuMem*), with typed errors.

Every function takes and returns plain ints (virtual addresses, allocation handles, fds, sizes). A failing
driver call raises :class:`VmmError` (a :class:`dynsnap_core.errors.CudaError`) whose message is one sentence
naming the call and the driver's error name; out-of-memory raises :class:`VmmOutOfMemory`. Without a driver
or cuda-python every function raises :class:`dynsnap_core.errors.CudaUnavailable` with the sentence of
``dynsnap_core.cuda.driver_info()``.

The driver is initialised (cuInit) and the device's primary context retained once per process (thread-safe);
each call makes the primary context current on the calling thread, which is what torch uses too.

    gran = vmm.granularity(0)
    va = vmm.reserve(size, gran)                      # kept for the process lifetime
    h = vmm.create(size, 0, exportable=True)          # POSIX-fd shareable physical memory
    vmm.map(va, size, h); vmm.set_access(va, size, 0, read_only=False)
    fd = vmm.export_fd(h)                             # hand over SCM_RIGHTS; the peer: import_fd(fd)
    vmm.unmap(va, size); vmm.release(h)               # physical memory freed, reservation kept
"""
from __future__ import annotations

import threading
from typing import Any, Optional

from .. import cuda as _cuda
from ..errors import CudaError, CudaUnavailable

__all__ = ["VmmError", "VmmOutOfMemory", "available", "unavailable_reason", "granularity", "reserve",
           "free_reservation", "create", "export_fd", "import_fd", "map", "set_access", "unmap", "release",
           "mem_info", "synchronize", "copy_htod", "copy_dtoh", "memset", "host_register", "host_unregister",
           "round_up"]


class VmmError(CudaError):
    """A CUDA virtual memory call failed; ``driver_error`` holds the driver's error name."""


class VmmOutOfMemory(VmmError):
    """The GPU has not enough free memory (CUDA_ERROR_OUT_OF_MEMORY)."""


_lock = threading.Lock()
_drv: Any = None
_ctx: dict[int, Any] = {}


def unavailable_reason() -> Optional[str]:
    """None when the CUDA driver and cuda-python are usable here, else the sentence saying why not."""
    info = _cuda.driver_info()
    if info.get("available"):
        return None
    return str(info.get("reason") or "no usable CUDA driver on this machine")


def available() -> bool:
    return unavailable_reason() is None


def _name(err: Any) -> str:
    n = getattr(err, "name", None)
    return n if n else f"CUresult({int(err)})"


def _driver() -> Any:
    global _drv
    if _drv is not None:
        return _drv
    why = unavailable_reason()
    if why is not None:
        raise CudaUnavailable(why, stage="gms")
    with _lock:
        if _drv is None:
            from cuda.bindings import driver as drv  # type: ignore[import-not-found]
            try:
                (err,) = drv.cuInit(0)
            except Exception as exc:  # noqa: BLE001 - the loader's own errors
                raise CudaUnavailable(f"the CUDA driver does not load: {exc}", stage="gms") from None
            if _name(err) != "CUDA_SUCCESS":
                raise CudaUnavailable(f"the CUDA driver failed to initialize (cuInit: {_name(err)})", stage="gms",
                                      driver_error=_name(err))
            _drv = drv
    return _drv


def _check(res: Any, what: str) -> Any:
    """The value(s) of a cuda-python result tuple, or the typed error naming ``what`` and the driver error."""
    err = res[0] if isinstance(res, tuple) else res
    name = _name(err)
    if name != "CUDA_SUCCESS":
        cls = VmmOutOfMemory if name == "CUDA_ERROR_OUT_OF_MEMORY" else VmmError
        raise cls(f"{what} failed with {name}", stage="gms", driver_error=name)
    if isinstance(res, tuple):
        return res[1] if len(res) == 2 else (res[1:] if len(res) > 2 else None)
    return None


def _context(device: int) -> Any:
    """The driver module with ``device``'s primary context current on this thread (retained once per process)."""
    drv = _driver()
    ctx = _ctx.get(device)
    if ctx is None:
        with _lock:
            ctx = _ctx.get(device)
            if ctx is None:
                dev = _check(drv.cuDeviceGet(int(device)), f"cuDeviceGet({device})")
                ctx = _check(drv.cuDevicePrimaryCtxRetain(dev), f"cuDevicePrimaryCtxRetain(cuda:{device})")
                _ctx[device] = ctx
    _check(drv.cuCtxSetCurrent(ctx), f"cuCtxSetCurrent(cuda:{device})")
    return drv


def _prop(drv: Any, device: int, exportable: bool) -> Any:
    p = drv.CUmemAllocationProp()
    p.type = drv.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
    p.location.type = drv.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
    p.location.id = int(device)
    if exportable:
        p.requestedHandleTypes = drv.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR
    return p


def round_up(n: int, gran: int) -> int:
    return (int(n) + gran - 1) // gran * gran


def granularity(device: int = 0, *, recommended: bool = False) -> int:
    """The allocation granularity (bytes) of ``device`` for exportable device memory (2 MiB on current GPUs)."""
    drv = _context(device)
    flag = drv.CUmemAllocationGranularity_flags
    opt = flag.CU_MEM_ALLOC_GRANULARITY_RECOMMENDED if recommended else flag.CU_MEM_ALLOC_GRANULARITY_MINIMUM
    return int(_check(drv.cuMemGetAllocationGranularity(_prop(drv, device, True), opt),
                      f"cuMemGetAllocationGranularity(cuda:{device})"))


def reserve(size: int, alignment: int = 0, device: int = 0) -> int:
    """Reserve ``size`` bytes of GPU virtual address space (no physical memory); returns the address."""
    drv = _context(device)
    va = _check(drv.cuMemAddressReserve(int(size), int(alignment), 0, 0), f"cuMemAddressReserve of {size} bytes")
    return int(va)


def free_reservation(va: int, size: int, device: int = 0) -> None:
    drv = _context(device)
    _check(drv.cuMemAddressFree(drv.CUdeviceptr(int(va)), int(size)), f"cuMemAddressFree({va:#x}, {size})")


def create(size: int, device: int = 0, *, exportable: bool = True) -> int:
    """Physical memory of ``size`` bytes (a granularity multiple) on ``device``; POSIX-fd shareable when
    ``exportable``. Returns the allocation handle."""
    drv = _context(device)
    h = _check(drv.cuMemCreate(int(size), _prop(drv, device, exportable), 0),
               f"cuMemCreate of {size} bytes on cuda:{device}")
    return int(h)


def export_fd(handle: int, device: int = 0) -> int:
    """A new file descriptor for the allocation (the caller closes it)."""
    drv = _context(device)
    fd = _check(drv.cuMemExportToShareableHandle(
        drv.CUmemGenericAllocationHandle(int(handle)),
        drv.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR, 0), "cuMemExportToShareableHandle")
    return int(fd)


def import_fd(fd: int, device: int = 0) -> int:
    """The allocation behind a POSIX fd exported by another process (the fd may be closed afterwards)."""
    drv = _context(device)
    h = _check(drv.cuMemImportFromShareableHandle(
        int(fd), drv.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR),
        "cuMemImportFromShareableHandle")
    return int(h)


def map(va: int, size: int, handle: int, offset: int = 0, device: int = 0) -> None:  # noqa: A001 - the driver's name
    drv = _context(device)
    _check(drv.cuMemMap(drv.CUdeviceptr(int(va)), int(size), int(offset),
                        drv.CUmemGenericAllocationHandle(int(handle)), 0), f"cuMemMap at {va:#x} ({size} bytes)")


def set_access(va: int, size: int, device: int = 0, read_only: bool = False) -> bool:
    """Make ``[va, va+size)`` accessible from ``device``; read-only when asked and the driver allows it.
    Returns whether the mapping is read-only: a driver that refuses PROT_READ (NOT_SUPPORTED / INVALID_VALUE)
    gets a read-write mapping instead."""
    drv = _context(device)

    def desc(flags: Any) -> Any:
        d = drv.CUmemAccessDesc()
        d.location.type = drv.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        d.location.id = int(device)
        d.flags = flags
        return d

    F = drv.CUmemAccess_flags
    ptr = drv.CUdeviceptr(int(va))
    if read_only:
        (err,) = drv.cuMemSetAccess(ptr, int(size), [desc(F.CU_MEM_ACCESS_FLAGS_PROT_READ)], 1)
        if _name(err) == "CUDA_SUCCESS":
            return True
        if _name(err) not in ("CUDA_ERROR_NOT_SUPPORTED", "CUDA_ERROR_INVALID_VALUE"):
            _check((err,), f"cuMemSetAccess(read-only) at {va:#x}")
    _check(drv.cuMemSetAccess(ptr, int(size), [desc(F.CU_MEM_ACCESS_FLAGS_PROT_READWRITE)], 1),
           f"cuMemSetAccess at {va:#x}")
    return False


def unmap(va: int, size: int, device: int = 0) -> None:
    drv = _context(device)
    _check(drv.cuMemUnmap(drv.CUdeviceptr(int(va)), int(size)), f"cuMemUnmap at {va:#x} ({size} bytes)")


def release(handle: int, device: int = 0) -> None:
    drv = _context(device)
    _check(drv.cuMemRelease(drv.CUmemGenericAllocationHandle(int(handle))), "cuMemRelease")


def mem_info(device: int = 0) -> tuple[int, int]:
    """(free, total) bytes of ``device`` as the driver reports them."""
    drv = _context(device)
    free, total = _check(drv.cuMemGetInfo(), f"cuMemGetInfo(cuda:{device})")
    return int(free), int(total)


def synchronize(device: int = 0) -> None:
    drv = _context(device)
    _check(drv.cuCtxSynchronize(), f"cuCtxSynchronize(cuda:{device})")


def copy_htod(dst: int, src_addr: int, size: int, device: int = 0) -> None:
    drv = _context(device)
    _check(drv.cuMemcpyHtoD(drv.CUdeviceptr(int(dst)), int(src_addr), int(size)), "cuMemcpyHtoD")


def copy_dtoh(dst_addr: int, src: int, size: int, device: int = 0) -> None:
    drv = _context(device)
    _check(drv.cuMemcpyDtoH(int(dst_addr), drv.CUdeviceptr(int(src)), int(size)), "cuMemcpyDtoH")


def memset(va: int, value: int, size: int, device: int = 0) -> None:
    drv = _context(device)
    _check(drv.cuMemsetD8(drv.CUdeviceptr(int(va)), int(value) & 0xFF, int(size)), "cuMemsetD8")


def host_register(addr: int, size: int, device: int = 0) -> bool:
    """Pin host memory for fast copies; False (never raises) when the driver refuses."""
    drv = _context(device)
    (err,) = drv.cuMemHostRegister(int(addr), int(size), 0)
    return _name(err) == "CUDA_SUCCESS"


def host_unregister(addr: int, device: int = 0) -> None:
    drv = _context(device)
    _check(drv.cuMemHostUnregister(int(addr)), "cuMemHostUnregister")
