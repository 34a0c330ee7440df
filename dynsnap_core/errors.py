"""Every exception dynsnap raises on purpose (all derive from DynsnapError), the ``Stage`` vocabulary, and the
one mapping from a C engine's errno to an exception (``from_engine``).

A bottom module: it imports nothing from dynsnap_core.
"""
from __future__ import annotations

import enum
import errno as _errno
import os
from typing import Any, Optional, Union

__all__ = [
    "DynsnapError", "InvalidArgument", "PermissionDenied", "ProcessNotFound", "InvalidTarget", "CriuUnavailable",
    "CriuError", "SnapshotExists", "SnapshotCorrupt", "SnapshotNotFound", "StorageError",
    "CudaError", "CudaUnavailable", "CudaNotCudaProcess", "CudaStateError", "CudaTimeout",
    "CudaDeviceMismatch", "IncompatibleSnapshot", "oserror", "Stage", "Interrupted", "MemfdError",
    "WeightsError", "WeightSetNotFound", "ShardCorrupt", "TensorMismatch", "WeightsOutOfMemory", "GpuUnavailable",
    "PathUnavailable", "from_engine",
]


class Stage(str, enum.Enum):
    """Where a failure happened (``DynsnapError.stage``). A ``str``: ``err.stage == "verify"`` still holds.

    A stage not listed here (the name of a failed driver or memory-service call) stays the plain string."""

    # taking and restoring a snapshot
    PREFLIGHT = "preflight"
    LOCK = "lock"
    GPU_CHECKPOINT = "gpu checkpoint"
    DUMP = "dump"
    PERSIST = "persist"
    COMMIT = "commit"
    VERIFY = "verify"
    RESTORE = "restore"
    GPU_RESTORE = "gpu restore"
    LAZY_RESTORE = "lazy restore"
    MEMFD_CREATE = "memfd create"
    MEMFD_DUMP = "memfd dump"
    MEMFD_RESTORE = "memfd restore"
    REMOVE = "remove"
    LIST = "list"
    LOOKUP = "lookup"
    CHECK = "check"
    INSPECT = "inspect"
    RUN = "run"
    # CUDA driver calls and the cuda commands
    CHECKPOINT = "checkpoint"
    UNLOCK = "unlock"
    STATE = "state"
    RESTORE_TID = "restore_tid"
    DEVICES = "devices"
    TOGGLE = "toggle"
    PROBE = "probe"
    # memfds, the memory service and weights
    SEAL = "seal"
    RECEIVE = "receive"
    VIEW = "view"
    SPAWN = "spawn"
    BIND = "bind"
    CONNECT = "connect"
    REATTACH = "reattach"
    STORE = "store"
    WEIGHTS = "weights"
    # the GPU memory service and the in-worker agent
    GMS = "gms"
    QUIESCE = "quiesce"
    RESUME = "resume"
    # remote storage and the agent
    STORAGE = "storage"
    UPLOAD = "upload"
    DOWNLOAD = "download"
    AGENT = "agent"
    # presentation
    BENCH = "bench"
    DEMO = "demo"

    def __str__(self) -> str:
        return self.value

    @classmethod
    def of(cls, value: Union[str, "Stage", None]) -> Union["Stage", str, None]:
        """The member for ``value``, or ``value`` itself when it names no stage (a driver call's name)."""
        if value is None or isinstance(value, Stage):
            return value
        try:
            return cls(value)
        except ValueError:
            return value


class DynsnapError(Exception):
    """Base of all dynsnap errors. ``str(err)`` is one sentence a user understands.

    Attributes carry the context: ``stage`` (lock, checkpoint, dump, persist, verify, restore, ...),
    ``pid``, ``path``, ``errno`` (an errno number or None), ``driver_error`` (a CUDA error name or None)
    and ``log`` (the path of a tool log worth reading, e.g. CRIU's).
    """

    def __init__(self, message: str, *, stage: Optional[str] = None, pid: Optional[int] = None,
                 path: Optional[str] = None, errno: Optional[int] = None,
                 driver_error: Optional[str] = None, log: Optional[str] = None):
        super().__init__(message)
        self.message = message
        self.stage = Stage.of(stage)
        self.pid = pid
        self.path = path
        self.errno = errno
        self.driver_error = driver_error
        self.log = log

    def __str__(self) -> str:
        if self.log:
            return f"{self.message} (log: {self.log})"
        return self.message

    def to_dict(self) -> dict:
        return {"error": type(self).__name__, "message": str(self),
                "stage": str(self.stage) if self.stage is not None else None,
                "pid": self.pid, "path": self.path, "errno": self.errno,
                "driver_error": self.driver_error, "log": self.log}


class InvalidArgument(DynsnapError, ValueError):
    """A bad argument or setting (wrong type, out of range, unknown name): nothing was touched."""


class PermissionDenied(DynsnapError):
    """The operation needs root or CAP_CHECKPOINT_RESTORE (or similar)."""


class ProcessNotFound(DynsnapError):
    """No process with the given pid."""


class InvalidTarget(DynsnapError):
    """The pid exists but must not be checkpointed (pid 1, dynsnap itself, a kernel thread, ...)."""


class CriuUnavailable(DynsnapError):
    """No usable CRIU: missing, or too old for this kernel."""


class CriuError(DynsnapError):
    """CRIU ran and failed; ``log`` points at its log file."""


class SnapshotExists(DynsnapError):
    """The output directory already exists."""


class SnapshotNotFound(DynsnapError):
    """No snapshot at the given path or name."""


class SnapshotCorrupt(DynsnapError):
    """A snapshot failed verification (missing or malformed manifest, truncated or altered file)."""


class IncompatibleSnapshot(DynsnapError):
    """The restore-compatibility check refused: this node lacks something the snapshot needs (nothing was touched)."""


class StorageError(DynsnapError):
    """Writing or reading snapshot data failed (ENOSPC, EIO, short read...)."""


class Interrupted(DynsnapError):
    """dynsnap was asked to stop (SIGINT/SIGTERM/SIGHUP) and rolled back."""


class MemfdError(DynsnapError):
    """Creating or mapping memfds failed (memfd_create unavailable, no hugetlb pages, ...)."""


class CudaError(DynsnapError):
    """A CUDA driver checkpoint call failed; ``driver_error`` holds the driver's error name."""


class CudaUnavailable(CudaError):
    """No CUDA driver, no cuda-python bindings, or a driver without the checkpoint API."""


class CudaNotCudaProcess(CudaError):
    """The process does not use CUDA."""


class CudaStateError(CudaError):
    """The process is in the wrong CUDA checkpoint state for the requested action."""


class CudaTimeout(CudaError):
    """Locking timed out (e.g. a long kernel kept running)."""


class CudaDeviceMismatch(CudaError):
    """The snapshot was taken on different GPUs (chip type or count) than this machine has."""


def oserror(neg_or_pos_errno: int, what: str, path: Optional[str] = None) -> OSError:
    """The one place that turns an errno (C's ``-errno`` or a plain errno) into the right OSError subclass.

    ``what`` names the operation (``"write"``, ``"open"``...), and the message reads
    ``"<what> <path>: <strerror>"``. ``OSError(errno, ...)`` picks FileNotFoundError, PermissionError, ...
    """
    err = abs(int(neg_or_pos_errno)) or _errno.EIO
    text = os.strerror(err)
    msg = f"{what} {path}: {text}" if path else f"{what}: {text}"
    exc = OSError(err, msg)
    exc.filename = path
    return exc


class WeightsError(DynsnapError):
    """A weight store or weight loading operation failed; ``tensor`` and ``shard`` name what, when known."""

    def __init__(self, message: str, *, tensor: Optional[str] = None, shard: Optional[str] = None,
                 **kw: Any):
        kw.setdefault("stage", "weights")
        super().__init__(message, **kw)
        self.tensor = tensor
        self.shard = shard

    def to_dict(self) -> dict:
        return {**super().to_dict(), "tensor": self.tensor, "shard": self.shard}


class WeightSetNotFound(WeightsError):
    """No weight set (manifest) of that name or path."""


class ShardCorrupt(WeightsError, SnapshotCorrupt):
    """A shard is missing, truncated or fails its checksum, or a manifest is malformed."""


class TensorMismatch(WeightsError):
    """A caller-provided buffer (``into=``) does not match the manifest's dtype, shape or device."""


class WeightsOutOfMemory(WeightsError):
    """The device has not enough free memory for the weight set (nothing is returned)."""


#: No CUDA driver or no such GPU for loading weights: the same failure as the driver API's CudaUnavailable.
GpuUnavailable = CudaUnavailable


class PathUnavailable(WeightsError):
    """The requested load path cannot run here (e.g. kvikio not installed)."""


#: C operations (``OSError.op`` from the engines) whose failure means the input is damaged, whatever the errno.
_CORRUPT_OPS = ("segment", "verify")
#: Errnos the engines document as "the data is not what it claims": memfd.h: -EIO when a file turns out
#: shorter while reading, -EBADMSG when a checked digest does not match.
_CORRUPT_ERRNOS = {"read": (_errno.EIO, _errno.EBADMSG)}
#: C operations on memfds and mappings (memfd.h): their failures are MemfdError.
_MEMFD_OPS = ("memfd_create", "mmap", "munmap", "madvise", "fstat", "ftruncate", "seal")


def from_engine(e: OSError, stage: str) -> BaseException:
    """The one errno -> exception mapping for the C engines' OSErrors (they carry the C operation in ``op``):
    SnapshotCorrupt for damaged input, MemfdError for memfd/mapping failures, else the OSError itself."""
    op = getattr(e, "op", "")
    msg = e.strerror or str(e)
    if op in _CORRUPT_OPS or e.errno in _CORRUPT_ERRNOS.get(op, ()):
        return SnapshotCorrupt(msg, stage=stage, path=e.filename, errno=e.errno)
    if op in _MEMFD_OPS:
        return MemfdError(msg, stage=stage, path=e.filename, errno=e.errno)
    out = OSError(e.errno, msg)
    out.filename = e.filename
    return out


class MemsvcError(DynsnapError):
    """The memory service refused or failed a request; ``code`` says why (busy, not_found, failed, ...)."""

    def __init__(self, message: str, *, code: str = "internal", **kw: Any):
        super().__init__(message, **kw)
        self.code = code
