"""GPU state of other processes through the CUDA driver's checkpoint API (cuCheckpointProcess*), via cuda-python.

The driver (>= 570, CUDA 12.8) can lock a CUDA process, copy its device memory into that process's host
memory (checkpoint), bring it back (restore, optionally onto other GPUs of the same chip type) and unlock
it. Importing this module never needs a GPU, a driver or cuda-python: everything is loaded on first use,
and :func:`is_available` answers cheaply. Every failure raises a typed error from :mod:`dynsnap_core.errors`
whose message is one sentence and whose ``driver_error`` is the driver's error name.

Typical use for a process tree (lock all before checkpointing any, restore all before unlocking any)::

    with CudaTree(cuda_pids(tree_pids), timeout_ms=10000) as tree:   # rolls back on an exception
        tree.lock_all(); tree.checkpoint_all()
        ...  # CRIU dump
"""
from __future__ import annotations

import concurrent.futures
import ctypes
import enum
import os
import shutil
import subprocess
import threading
import time
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional

from ..errors import (CudaError, CudaNotCudaProcess, CudaStateError, CudaTimeout, CudaUnavailable,
                     DynsnapError, InvalidTarget, ProcessNotFound)
from ..once import once

__all__ = [
    "is_available", "driver_info", "CudaState", "state", "restore_thread_id", "lock", "checkpoint",
    "restore", "unlock", "cuda_pids", "devices", "process_gpu_memory", "process_gpus", "CudaTree",
    "parse_device_map",
    "format_uuid", "MIN_DRIVER_API_VERSION",
]

#: cuDriverGetVersion() of the first driver with cuCheckpointProcess* (R570 = CUDA 12.8).
MIN_DRIVER_API_VERSION = 12080
_LIBCUDA = "libcuda.so.1"
_CHECKPOINT_SYMBOLS = ("cuCheckpointProcessLock", "cuCheckpointProcessCheckpoint", "cuCheckpointProcessRestore",
                       "cuCheckpointProcessUnlock", "cuCheckpointProcessGetState",
                       "cuCheckpointProcessGetRestoreThreadId")

MSG_NO_DRIVER = "no CUDA driver on this machine (libcuda.so.1 not found)"
MSG_NO_BINDINGS = "cuda-python is not installed: pip install 'dynsnap-core[gpu]'"
MSG_OLD_BINDINGS = ("cuda-python {version} has no checkpoint API (cuCheckpointProcess*): "
                    "pip install -U 'dynsnap-core[gpu]'")
MSG_OLD_DRIVER = ("the CUDA driver is too old for checkpointing ({detail}): "
                  "it needs driver >= 570 / CUDA 12.8")

# Driver results that mean "the driver holds no CUDA state for this pid" (as CRIU's cuda plugin reads them).
_NOT_CUDA_ERRORS = ("CUDA_ERROR_INVALID_VALUE", "CUDA_ERROR_NOT_INITIALIZED", "CUDA_ERROR_NOT_FOUND")
_TIMEOUT_ERRORS = ("CUDA_ERROR_TIMEOUT", "CUDA_ERROR_NOT_READY")


class CudaState(enum.Enum):
    """Checkpoint state of a CUDA process, as the driver reports it (CUprocessState)."""
    RUNNING = "running"
    LOCKED = "locked"
    CHECKPOINTED = "checkpointed"
    FAILED = "failed"


# ---------------------------------------------------------------------------------------------------------
# loading and probing

_lock = threading.Lock()
_initialized = False                 # cuInit(0) done in this process


def _import_driver() -> Any:
    """The cuda.bindings.driver module, or CudaUnavailable with the install sentence."""
    try:
        from cuda.bindings import driver  # type: ignore[import-not-found]
        return driver
    except ImportError:
        pass
    try:  # cuda-python < 12.6 layout
        from cuda import cuda as driver  # type: ignore[import-not-found,no-redef]
        return driver
    except ImportError:
        raise CudaUnavailable(MSG_NO_BINDINGS, stage="probe") from None


def _bindings_version() -> str:
    try:
        from cuda.bindings import __version__  # type: ignore[import-not-found]
        return str(__version__)
    except Exception:  # noqa: BLE001 - only for a message
        return "(unknown version)"


def _do_probe() -> dict:
    info: Dict[str, Any] = {"available": False, "reason": None, "driver_version": None, "checkpoint_api": False,
                            "_libcuda": False, "_bindings": False}
    # libcuda first, through ctypes: cheap, and it tells "no driver" apart from "no bindings".
    lib = None
    try:
        lib = ctypes.CDLL(_LIBCUDA)
        info["_libcuda"] = True
    except OSError:
        pass
    if lib is not None:
        ver = ctypes.c_int(0)
        try:
            if lib.cuDriverGetVersion(ctypes.byref(ver)) == 0:
                info["driver_version"] = int(ver.value)
        except AttributeError:
            pass
        missing = [s for s in _CHECKPOINT_SYMBOLS if not hasattr(lib, s)]
        info["checkpoint_api"] = not missing and (info["driver_version"] or 0) >= MIN_DRIVER_API_VERSION
        info["_missing_symbols"] = missing
    try:
        drv = _import_driver()
        info["_bindings"] = True
    except CudaUnavailable as exc:
        info["reason"] = exc.message
        return info
    if not all(hasattr(drv, s) for s in _CHECKPOINT_SYMBOLS):
        info["reason"] = MSG_OLD_BINDINGS.format(version=_bindings_version())
        return info
    if lib is None:
        info["reason"] = MSG_NO_DRIVER
        return info
    if not info["checkpoint_api"]:
        if info.get("_missing_symbols"):
            detail = f"libcuda.so.1 has no {info['_missing_symbols'][0]}"
        else:
            detail = f"driver API version {_fmt_version(info['driver_version'])}"
        info["reason"] = MSG_OLD_DRIVER.format(detail=detail)
        return info
    info["available"] = True
    return info


def _fmt_version(v: Optional[int]) -> str:
    if not v:
        return "unknown"
    return f"{v // 1000}.{(v % 1000) // 10}"


@once
def _get_probe() -> dict:
    """driver_info() plus private keys, probed once per process."""
    return _do_probe()


def is_available() -> bool:
    """True when cuda-python is importable, libcuda.so.1 loads and the driver has the checkpoint API.

    Cheap (no cuInit, no GPU work) and cached for the life of the process.
    """
    return bool(_get_probe()["available"])


def driver_info() -> dict:
    """``{"available", "reason", "driver_version", "checkpoint_api"}``; ``reason`` is None when available.

    ``driver_version`` is cuDriverGetVersion()'s number (e.g. 13000 for CUDA 13.0) when libcuda loads.
    """
    p = _get_probe()
    return {k: p[k] for k in ("available", "reason", "driver_version", "checkpoint_api")}


def _driver(stage: str, pid: Optional[int] = None) -> Any:
    """The driver module after cuInit(0), or CudaUnavailable. cuInit is needed by restore (unless persistence
    mode is on) and harmless for the rest; it creates no context."""
    global _initialized
    p = _get_probe()
    if not p["available"]:
        raise CudaUnavailable(p["reason"], stage=stage, pid=pid)
    drv = _import_driver()
    with _lock:
        if not _initialized:
            try:
                res = drv.cuInit(0)
            except Exception as exc:  # noqa: BLE001 - DynamicLibNotFoundError, RuntimeError from the loader
                raise CudaUnavailable(f"{MSG_NO_DRIVER}: {exc}", stage=stage, pid=pid) from None
            err = _result(res)
            if _ename(err) != "CUDA_SUCCESS":
                name = _ename(err)
                if name == "CUDA_ERROR_NO_DEVICE":
                    msg = "the CUDA driver sees no GPU on this machine (cuInit: CUDA_ERROR_NO_DEVICE)"
                else:
                    msg = f"the CUDA driver failed to initialize (cuInit: {name}: {_estr(drv, err)})"
                raise CudaUnavailable(msg, stage=stage, pid=pid, driver_error=name)
            _initialized = True
    return drv


def _result(res: Any) -> Any:
    return res[0] if isinstance(res, tuple) else res


def _ename(err: Any) -> str:
    name = getattr(err, "name", None)
    return name if name else f"CUresult({int(err)})"


def _estr(drv: Any, err: Any) -> str:
    try:
        r = drv.cuGetErrorString(err)
        if _ename(r[0]) == "CUDA_SUCCESS" and r[1]:
            s = r[1]
            return s.decode(errors="replace") if isinstance(s, bytes) else str(s)
    except Exception:  # noqa: BLE001 - only for a message
        pass
    return "no description"


# ---------------------------------------------------------------------------------------------------------
# pids

def _check_pid(pid: int, stage: str) -> int:
    if isinstance(pid, bool) or not isinstance(pid, int):
        try:
            pid = int(pid)
        except (TypeError, ValueError):
            raise InvalidTarget(f"{pid!r} is not a process id", stage=stage) from None
    if pid <= 0:
        raise InvalidTarget(f"{pid} is not a process id", stage=stage, pid=pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        raise ProcessNotFound(f"no process with pid {pid}", stage=stage, pid=pid) from None
    except PermissionError:
        pass
    tgid = _tgid(pid)
    if tgid is not None and tgid != pid:
        # The driver accepts a thread id and acts on its process (NVIDIA/cuda-checkpoint#41): refuse instead.
        raise InvalidTarget(f"{pid} is a thread of process {tgid}, not a process: use pid {tgid}",
                            stage=stage, pid=pid)
    return pid


def _tgid(pid: int) -> Optional[int]:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Tgid:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


# ---------------------------------------------------------------------------------------------------------
# calls

_STATE_BY_NAME = {
    "CU_PROCESS_STATE_RUNNING": CudaState.RUNNING,
    "CU_PROCESS_STATE_LOCKED": CudaState.LOCKED,
    "CU_PROCESS_STATE_CHECKPOINTED": CudaState.CHECKPOINTED,
    "CU_PROCESS_STATE_FAILED": CudaState.FAILED,
}

_OP_NAMES = {"lock": "cuCheckpointProcessLock", "checkpoint": "cuCheckpointProcessCheckpoint",
             "restore": "cuCheckpointProcessRestore", "unlock": "cuCheckpointProcessUnlock",
             "state": "cuCheckpointProcessGetState", "restore_tid": "cuCheckpointProcessGetRestoreThreadId"}
# the state each action needs, and the sentence for each wrong state
_NEEDS = {"lock": CudaState.RUNNING, "checkpoint": CudaState.LOCKED, "restore": CudaState.CHECKPOINTED,
          "unlock": CudaState.LOCKED}
_WRONG_STATE = {
    ("lock", CudaState.LOCKED): "process {pid} is already locked",
    ("lock", CudaState.CHECKPOINTED): "process {pid} is checkpointed, not running: restore and unlock it first",
    ("checkpoint", CudaState.RUNNING): "process {pid} is running, not locked: lock it first",
    ("checkpoint", CudaState.CHECKPOINTED): "process {pid} is already checkpointed",
    ("restore", CudaState.RUNNING): "process {pid} is running, not checkpointed: there is nothing to restore",
    ("restore", CudaState.LOCKED): "process {pid} is locked, not checkpointed: there is nothing to restore "
                                   "(unlock it to let it run)",
    ("unlock", CudaState.RUNNING): "process {pid} is running, not locked: there is nothing to unlock",
    ("unlock", CudaState.CHECKPOINTED): "process {pid} is checkpointed, not locked: restore it first",
}
_FAILED = ("process {pid} is in the CUDA 'failed' state: the driver cannot bring it back; "
           "restart the process")


def _raw_call(drv: Any, op: str, pid: int, *args: Any) -> Any:
    fn = getattr(drv, _OP_NAMES[op])
    try:
        return fn(pid, *args)
    except DynsnapError:
        raise
    except Exception as exc:  # noqa: BLE001 - symbol missing in libcuda, loader errors, binding mismatches
        text = str(exc)
        if "not found" in text and "cuCheckpoint" in text:
            raise CudaUnavailable(MSG_OLD_DRIVER.format(detail=f"libcuda.so.1 has no {_OP_NAMES[op]}"),
                                  stage=op, pid=pid) from None
        if isinstance(exc, RuntimeError):   # cuda.pathfinder's DynamicLibNotFoundError and friends
            raise CudaUnavailable(f"{MSG_NO_DRIVER}: {text}", stage=op, pid=pid) from None
        raise CudaError(f"could not call {_OP_NAMES[op]} through cuda-python {_bindings_version()}: "
                        f"{type(exc).__name__}: {text}", stage=op, pid=pid) from None


def _query_state(drv: Any, pid: int) -> Optional[CudaState]:
    """The state, or None when the driver has no CUDA state for pid (or cannot say)."""
    try:
        res = _raw_call(drv, "state", pid)
    except DynsnapError:
        return None
    if _ename(res[0]) != "CUDA_SUCCESS":
        return None
    return _STATE_BY_NAME.get(_ename(res[1]))


def _fail(drv: Any, op: str, pid: int, err: Any, **extra: Any) -> CudaError:
    """Turn a failed result of ``op`` on ``pid`` into the right typed error with one clear sentence."""
    name = _ename(err)
    kw = dict(stage=op, pid=pid, driver_error=name)
    if op in ("state", "restore_tid"):
        if name in _NOT_CUDA_ERRORS:
            return CudaNotCudaProcess(f"process {pid} does not use CUDA (the driver holds no CUDA state for it)",
                                      **kw)
    else:
        if op == "lock" and name in _TIMEOUT_ERRORS:
            return CudaTimeout(_timeout_msg(pid, extra.get("timeout_ms")), **kw)
        now = _query_state(drv, pid)
        if now is None and name in _NOT_CUDA_ERRORS:
            return CudaNotCudaProcess(f"process {pid} does not use CUDA (the driver holds no CUDA state for it)",
                                      **kw)
        if now is CudaState.FAILED:
            return CudaStateError(_FAILED.format(pid=pid), **kw)
        if now is not None and now is not _NEEDS[op]:
            return CudaStateError(_WRONG_STATE[(op, now)].format(pid=pid), **kw)
        if op == "lock" and now is CudaState.RUNNING and extra.get("timeout_ms") and \
                extra.get("elapsed", 0.0) * 1000 >= 0.9 * extra["timeout_ms"]:
            return CudaTimeout(_timeout_msg(pid, extra.get("timeout_ms")), **kw)
    if name == "CUDA_ERROR_NOT_SUPPORTED":
        return CudaError(f"the CUDA driver cannot {_VERB[op]} process {pid} ({name}): the process may use "
                         "managed (UVM) or CUDA IPC memory, or have forked after cuInit, which the driver's "
                         "checkpoint API does not support", **kw)
    if name == "CUDA_ERROR_OUT_OF_MEMORY" and op == "restore":
        return CudaError(f"not enough free GPU memory to restore process {pid} ({name}): free GPU memory and "
                         "retry (the driver may refuse further restores of this process)", **kw)
    return CudaError(f"could not {_VERB[op]} process {pid}: {_OP_NAMES[op]} failed with {name} "
                     f"({_estr(drv, err)})", **kw)


_VERB = {"lock": "lock", "checkpoint": "checkpoint the GPU state of", "restore": "restore the GPU state of",
         "unlock": "unlock", "state": "get the CUDA state of", "restore_tid": "get the CUDA restore thread of"}


def _timeout_msg(pid: int, timeout_ms: Optional[int]) -> str:
    return (f"process {pid} did not lock within {timeout_ms} ms (CUDA work already submitted is still running); "
            "it keeps running: retry later or with a longer timeout")


def _query(pid: int, op: str) -> Any:
    """One driver query about ``pid`` (``state``, ``restore_tid``): its result tuple, or the typed error."""
    pid = _check_pid(pid, op)
    drv = _driver(op, pid)
    res = _raw_call(drv, op, pid)
    if _ename(res[0]) != "CUDA_SUCCESS":
        raise _fail(drv, op, pid, res[0])
    return res


def state(pid: int) -> CudaState:
    """The CUDA checkpoint state of process ``pid`` (CudaNotCudaProcess if it does not use CUDA)."""
    res = _query(pid, "state")
    st = _STATE_BY_NAME.get(_ename(res[1]))
    if st is None:
        raise CudaStateError(f"process {pid} is in CUDA state {_ename(res[1])}, which dynsnap does not handle",
                             stage="state", pid=pid, driver_error=_ename(res[1]))
    return st


def restore_thread_id(pid: int) -> int:
    """The thread id of the driver's restore thread inside ``pid`` (what CRIU's CUDA plugin must let run)."""
    return int(_query(pid, "restore_tid")[1])


def lock(pid: int, timeout_ms: int = 10000) -> None:
    """Lock ``pid``: block its further CUDA calls and wait for submitted work. RUNNING -> LOCKED.

    ``timeout_ms`` 0 waits forever; on a timeout the process stays RUNNING and CudaTimeout is raised.
    """
    pid = _check_pid(pid, "lock")
    if isinstance(timeout_ms, bool) or int(timeout_ms) < 0:
        raise ValueError("timeout_ms must be an int >= 0")
    drv = _driver("lock", pid)
    args = drv.CUcheckpointLockArgs()
    args.timeoutMs = int(timeout_ms)
    t0 = time.monotonic()
    res = _raw_call(drv, "lock", pid, args)
    err = _result(res)
    if _ename(err) != "CUDA_SUCCESS":
        elapsed = time.monotonic() - t0
        # A lock that failed but left the process locked would hang it: unlock (as CRIU's plugin does).
        if _query_state(drv, pid) is CudaState.LOCKED and _ename(err) not in ("CUDA_ERROR_ILLEGAL_STATE",):
            _raw_call(drv, "unlock", pid, None)
        raise _fail(drv, "lock", pid, err, timeout_ms=int(timeout_ms), elapsed=elapsed)


def _action(pid: int, op: str, make_args: Optional[Callable[[Any], Any]] = None) -> None:
    """One driver action on ``pid`` (``checkpoint``, ``restore``, ``unlock``), or the typed error."""
    pid = _check_pid(pid, op)
    drv = _driver(op, pid)
    err = _result(_raw_call(drv, op, pid, make_args(drv) if make_args else None))
    if _ename(err) != "CUDA_SUCCESS":
        raise _fail(drv, op, pid, err)


def checkpoint(pid: int) -> None:
    """Copy the GPU memory of locked ``pid`` into its host memory and release its GPUs. LOCKED -> CHECKPOINTED."""
    _action(pid, "checkpoint")


def restore(pid: int, device_map: Optional[Mapping[str, str]] = None) -> None:
    """Re-acquire GPUs and copy the memory back. CHECKPOINTED -> LOCKED.

    ``device_map`` maps checkpointed GPU UUIDs ("GPU-...") to UUIDs of this machine; identity when None.
    The driver wants a pair for every GPU, so GPUs the map does not name are completed (identity where free).
    """
    _action(pid, "restore", (lambda drv: _restore_args(drv, device_map)) if device_map else None)


def unlock(pid: int) -> None:
    """Let ``pid`` make CUDA calls again. LOCKED -> RUNNING."""
    _action(pid, "unlock")


# ---------------------------------------------------------------------------------------------------------
# device map

def format_uuid(raw: bytes) -> str:
    """16 bytes -> "GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx" (nvidia-smi's spelling)."""
    h = bytes(raw).hex()
    return f"GPU-{h[0:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"


def _uuid_bytes(text: str) -> bytes:
    s = str(text).strip()
    for prefix in ("GPU-", "MIG-"):
        if s.upper().startswith(prefix):
            s = s[len(prefix):]
    try:
        raw = bytes.fromhex(s.replace("-", ""))
    except ValueError:
        raw = b""
    if len(raw) != 16:
        raise ValueError(f"{text!r} is not a GPU UUID (expected GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx)")
    return raw


def parse_device_map(text: str) -> Dict[str, str]:
    """``"old=new,old=new"`` -> {old: new}, UUIDs normalised; ValueError with a clear sentence on bad input."""
    out: Dict[str, str] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        if "=" not in part:
            raise ValueError(f"device map entry {part!r} is not old=new")
        old, new = (x.strip() for x in part.split("=", 1))
        o, n = format_uuid(_uuid_bytes(old)), format_uuid(_uuid_bytes(new))
        if o in out:
            raise ValueError(f"GPU {o} appears twice in the device map")
        out[o] = n
    if len(set(out.values())) != len(out):
        raise ValueError("two GPUs of the device map are mapped onto the same GPU")
    return out


def _complete_map(device_map: Mapping[str, str], present: List[str]) -> Dict[str, str]:
    """Complete a partial map to a permutation over this machine's GPUs (the driver wants every GPU)."""
    full = {format_uuid(_uuid_bytes(k)): format_uuid(_uuid_bytes(v)) for k, v in device_map.items()}
    olds = [u for u in present if u not in full]
    free = [u for u in present if u not in set(full.values())]
    for u in list(olds):
        if u in free:
            full[u] = u
            olds.remove(u)
            free.remove(u)
    for u, v in zip(olds, free):
        full[u] = v
    return full


def _restore_args(drv: Any, device_map: Mapping[str, str]) -> Any:
    if not hasattr(drv, "CUcheckpointGpuPair"):
        raise CudaUnavailable(f"cuda-python {_bindings_version()} cannot remap GPUs on restore (no "
                              "CUcheckpointGpuPair): pip install -U 'dynsnap-core[gpu]'", stage="restore")
    try:
        present = [d["uuid"] for d in devices()]
    except CudaError:
        present = []
    full = _complete_map(device_map, present)
    pairs = []
    for old, new in full.items():
        pair = drv.CUcheckpointGpuPair()
        for attr, text in (("oldUuid", old), ("newUuid", new)):
            u = drv.CUuuid()
            ctypes.memmove(u.getPtr(), _uuid_bytes(text), 16)   # CUuuid.bytes is read-only
            setattr(pair, attr, u)
        pairs.append(pair)
    args = drv.CUcheckpointRestoreArgs()
    args.gpuPairs = pairs
    args.gpuPairsCount = len(pairs)
    return args


# ---------------------------------------------------------------------------------------------------------
# discovery

def cuda_pids(pids: Iterable[int]) -> List[int]:
    """The pids among ``pids`` that use CUDA, asking the driver for each (cuCheckpointProcessGetState succeeds).

    Threads and vanished pids are skipped. Without libcuda no process can use CUDA, so the answer is [];
    with libcuda but no usable checkpoint API this raises CudaUnavailable (CUDA processes cannot be handled).
    """
    wanted = []
    for pid in pids:
        try:
            wanted.append(_check_pid(int(pid), "probe"))
        except DynsnapError:
            continue
    if not wanted:
        return []
    p = _get_probe()
    if not p["_libcuda"]:
        return []
    drv = _driver("probe")
    found = []
    for pid in wanted:
        res = _raw_call(drv, "state", pid)
        name = _ename(res[0])
        if name == "CUDA_SUCCESS":
            found.append(pid)
        elif name not in _NOT_CUDA_ERRORS:
            raise _fail(drv, "state", pid, res[0])
    return found


def devices() -> List[dict]:
    """Every GPU this process sees: index, uuid ("GPU-..."), name, total_memory (bytes), compute_capability.

    Calls cuInit in this process (creates no context). Honours CUDA_VISIBLE_DEVICES.
    """
    drv = _driver("devices")

    def ok(res: Any, what: str) -> Any:
        if _ename(res[0]) != "CUDA_SUCCESS":
            raise CudaError(f"{what} failed with {_ename(res[0])}", stage="devices", driver_error=_ename(res[0]))
        return res[1] if len(res) == 2 else res[1:]

    out = []
    for i in range(int(ok(drv.cuDeviceGetCount(), "cuDeviceGetCount"))):
        dev = ok(drv.cuDeviceGet(i), "cuDeviceGet")
        name = ok(drv.cuDeviceGetName(256, dev), "cuDeviceGetName")
        if isinstance(name, bytes):
            name = name.split(b"\0", 1)[0].decode(errors="replace")
        uuid = ok(drv.cuDeviceGetUuid(dev), "cuDeviceGetUuid")
        mem = ok(drv.cuDeviceTotalMem(dev), "cuDeviceTotalMem")
        A = drv.CUdevice_attribute
        major = ok(drv.cuDeviceGetAttribute(A.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev), "attribute")
        minor = ok(drv.cuDeviceGetAttribute(A.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev), "attribute")
        out.append({"index": i, "uuid": format_uuid(bytes(uuid.bytes)[:16]), "name": str(name),
                    "total_memory": int(mem), "compute_capability": f"{major}.{minor}"})
    return out


def process_gpus(pid: int) -> Optional[Dict[str, int]]:
    """GPU UUID -> bytes of GPU memory that ``pid`` holds there, from nvidia-smi; {} when nvidia-smi lists
    no such process (e.g. checkpointed), None when it cannot be asked."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return None
    try:
        out = subprocess.run([smi, "--query-compute-apps=pid,gpu_uuid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    found: Dict[str, int] = {}
    for line in out.stdout.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) >= 3 and parts[0].isdigit() and int(parts[0]) == int(pid):
            try:
                found[parts[1]] = found.get(parts[1], 0) + int(float(parts[2]) * 1024 * 1024)   # MiB
            except ValueError:
                continue
    return found


def process_gpu_memory(pid: int) -> Optional[int]:
    """Bytes of GPU memory that ``pid`` holds on all GPUs (see :func:`process_gpus`), or None."""
    per_gpu = process_gpus(pid)
    return None if per_gpu is None else sum(per_gpu.values())


# ---------------------------------------------------------------------------------------------------------
# several processes

class CudaTree:
    """The CUDA processes of one tree, moved together: lock all before checkpointing any, restore all before
    unlocking any. On any exception, call :meth:`rollback` (the context manager does it for you).

    ``timings`` holds seconds per phase (lock, gpu_checkpoint, gpu_restore, unlock); ``pid_timings`` the same
    per pid. Checkpoint and restore of several processes run in parallel threads (the driver calls release
    the GIL), so a tensor-parallel engine with one process per GPU pays for its largest GPU, not the sum.
    """

    def __init__(self, pids: Iterable[int], timeout_ms: int = 10000):
        self.pids: List[int] = [int(p) for p in pids]
        self.timeout_ms = int(timeout_ms)
        self.timings: Dict[str, float] = {}
        self.pid_timings: Dict[int, Dict[str, float]] = {p: {} for p in self.pids}
        self._device_map: Optional[Dict[str, str]] = None

    def __enter__(self) -> "CudaTree":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            self.rollback()

    def _each(self, phase: str, fn: Callable[[int], None], parallel: bool) -> None:
        t0 = time.monotonic()

        def one(pid: int) -> None:
            t = time.monotonic()
            try:
                fn(pid)
            finally:
                self.pid_timings.setdefault(pid, {})[phase] = time.monotonic() - t

        try:
            if parallel and len(self.pids) > 1:
                with concurrent.futures.ThreadPoolExecutor(max_workers=min(16, len(self.pids))) as pool:
                    futs = [pool.submit(one, p) for p in self.pids]
                    errors = [f.exception() for f in futs]
                first = next((e for e in errors if e is not None), None)
                if first is not None:
                    raise first
            else:
                for pid in self.pids:
                    one(pid)
        finally:
            self.timings[phase] = time.monotonic() - t0

    def _require(self, needed: CudaState, action: str) -> None:
        for pid in self.pids:
            now = state(pid)
            if now is not needed:
                key = (action, now)
                msg = _WRONG_STATE.get(key, _FAILED).format(pid=pid)
                raise CudaStateError(msg, stage=action, pid=pid)

    def lock_all(self) -> None:
        """Lock every process (each with ``timeout_ms``); processes already locked are left as they are."""
        def one(pid: int) -> None:
            if state(pid) is not CudaState.LOCKED:
                lock(pid, self.timeout_ms)
        self._each("lock", one, parallel=False)

    def checkpoint_all(self) -> None:
        """Checkpoint every process; all must be locked first."""
        self._require(CudaState.LOCKED, "checkpoint")
        self._each("gpu_checkpoint", checkpoint, parallel=True)

    def restore_all(self, device_map: Optional[Mapping[str, str]] = None) -> None:
        """Restore every checkpointed process (identity device map when None); none is unlocked here."""
        self._device_map = dict(device_map) if device_map else None

        def one(pid: int) -> None:
            if state(pid) is CudaState.CHECKPOINTED:
                restore(pid, self._device_map)
        self._each("gpu_restore", one, parallel=True)

    def unlock_all(self) -> None:
        """Unlock every locked process; all must be restored (not checkpointed) first."""
        for pid in self.pids:
            if state(pid) is CudaState.CHECKPOINTED:
                raise CudaStateError(_WRONG_STATE[("unlock", CudaState.CHECKPOINTED)].format(pid=pid),
                                     stage="unlock", pid=pid)

        def one(pid: int) -> None:
            if state(pid) is CudaState.LOCKED:
                unlock(pid)
        self._each("unlock", one, parallel=False)

    def rollback(self) -> List[str]:
        """Best effort: bring every process back to RUNNING from whatever state it is in (restore what is
        checkpointed, then unlock what is locked). Never raises; returns one sentence per problem."""
        problems: List[str] = []
        states: Dict[int, Optional[CudaState]] = {}
        for pid in self.pids:
            try:
                states[pid] = state(pid)
            except ProcessNotFound:
                states[pid] = None          # gone: nothing to bring back
            except Exception as exc:  # noqa: BLE001 - rollback never raises
                states[pid] = None
                problems.append(str(exc))
        for pid, st in states.items():
            if st is CudaState.CHECKPOINTED:
                try:
                    restore(pid, self._device_map)
                    states[pid] = CudaState.LOCKED
                except Exception as exc:  # noqa: BLE001
                    problems.append(str(exc))
            elif st is CudaState.FAILED:
                problems.append(_FAILED.format(pid=pid))
        for pid, st in states.items():
            if st is CudaState.LOCKED:
                try:
                    unlock(pid)
                except Exception as exc:  # noqa: BLE001
                    problems.append(str(exc))
        return problems
