"""Exception hierarchy of dynsnap: everything it raises on purpose derives from DynsnapError."""
from __future__ import annotations

import errno as _errno
import os
from typing import Optional

__all__ = [
    "DynsnapError", "InvalidArgument", "PermissionDenied", "ProcessNotFound", "InvalidTarget", "CriuUnavailable",
    "CriuError", "SnapshotExists", "SnapshotCorrupt", "SnapshotNotFound", "StorageError",
    "CudaError", "CudaUnavailable", "CudaNotCudaProcess", "CudaStateError", "CudaTimeout",
    "CudaDeviceMismatch", "IncompatibleSnapshot", "oserror",
]


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
        self.stage = stage
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
        return {"error": type(self).__name__, "message": str(self), "stage": self.stage,
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
