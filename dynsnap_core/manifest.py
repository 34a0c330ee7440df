"""The snapshot manifest (manifest.json): format, atomic write, parsing and verification of every file it lists."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Optional

from .durable import fsync_path
from .errors import SnapshotCorrupt, SnapshotNotFound
from .formats import SNAPSHOT_MANIFEST as _KIND

__all__ = ["MAGIC", "FORMAT_VERSION", "MANIFEST_NAME", "CHECKSUM", "write", "read", "verify_files",
           "check_sizes"]

MAGIC = _KIND.magic
FORMAT_VERSION = _KIND.format
MANIFEST_NAME = "manifest.json"
CHECKSUM = "xxh3-64"

# Every kind of file dynsnap writes is listed in dynsnap_core.formats (dynsnap inspect decodes each).

_REQUIRED = ("magic", "format", "created", "root_pid", "files", "total_bytes", "checksum")


def write(directory: Path, manifest: dict) -> None:
    """Write manifest.json into ``directory`` durably: temp file, fsync, rename, fsync of the directory."""
    data = json.dumps(manifest, indent=2, sort_keys=True).encode() + b"\n"
    tmp = directory / (MANIFEST_NAME + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, directory / MANIFEST_NAME)
    fsync_path(directory)


def read(directory: Path) -> dict:
    """Parse and check the manifest of a snapshot directory; raise SnapshotCorrupt naming the problem."""
    directory = Path(directory)
    if not directory.is_dir():
        raise SnapshotNotFound(f"no snapshot at {directory}", stage="verify", path=str(directory))
    path = directory / MANIFEST_NAME
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise SnapshotCorrupt(f"{path} is missing: this is not a complete dynsnap snapshot",
                              stage="verify", path=str(path)) from None
    try:
        m = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise SnapshotCorrupt(f"{path} is malformed: not valid JSON ({e})", stage="verify",
                              path=str(path)) from None
    if not isinstance(m, dict) or m.get("magic") != MAGIC:
        raise SnapshotCorrupt(f"{path} is malformed: it is not a dynsnap manifest (bad magic)",
                              stage="verify", path=str(path))
    missing = [k for k in _REQUIRED if k not in m]
    if missing:
        raise SnapshotCorrupt(f"{path} is malformed: missing field(s) {', '.join(missing)}",
                              stage="verify", path=str(path))
    if m["format"] != FORMAT_VERSION:
        raise SnapshotCorrupt(f"{path} has format version {m['format']}; this dynsnap reads version "
                              f"{FORMAT_VERSION}", stage="verify", path=str(path))
    if m["checksum"] != CHECKSUM:
        raise SnapshotCorrupt(f"{path} uses checksum {m['checksum']!r}; this dynsnap knows {CHECKSUM}",
                              stage="verify", path=str(path))
    files = m["files"]
    if not isinstance(files, list) or not all(
            isinstance(f, dict) and isinstance(f.get("path"), str) and isinstance(f.get("size"), int)
            and isinstance(f.get("xxh3"), str) for f in files):
        raise SnapshotCorrupt(f"{path} is malformed: bad 'files' list", stage="verify", path=str(path))
    for f in files:
        p = Path(f["path"])
        if p.is_absolute() or ".." in p.parts:
            raise SnapshotCorrupt(f"{path} is malformed: file path {f['path']!r} escapes the snapshot",
                                  stage="verify", path=str(path))
    return m


def check_sizes(directory: Path, manifest: dict) -> None:
    """The cheap half of verification: every listed file exists with its recorded size."""
    directory = Path(directory)
    for f in manifest["files"]:
        path = directory / f["path"]
        try:
            st = path.stat()
        except FileNotFoundError:
            raise SnapshotCorrupt(f"{path} is missing from the snapshot", stage="verify",
                                  path=str(path)) from None
        if st.st_size != f["size"]:
            raise SnapshotCorrupt(f"{path} has {st.st_size} bytes, the manifest says {f['size']} "
                                  "(truncated or altered)", stage="verify", path=str(path))


def verify_files(directory: Path, manifest: dict, *, engine: str = "auto", direct: bool = True,
                 threads: int = 4, progress: Optional[Callable[[int, int], Any]] = None) -> int:
    """Check size and xxh3 of every listed file with the C engine; raise SnapshotCorrupt naming the first bad one.

    Files are hashed by ``threads`` workers at once (largest first; the C engine releases the GIL).
    ``direct=False`` reads through the page cache: restore uses it so that verifying also prefetches the
    images CRIU reads next (one pass over the disk instead of two). Returns the number of bytes checked.
    """
    import concurrent.futures as cf
    import threading

    from . import io as dio

    directory = Path(directory)
    check_sizes(directory, manifest)
    files = sorted(manifest["files"], key=lambda f: -f["size"])
    total = sum(f["size"] for f in files)
    done = [0]
    lock = threading.Lock()

    def one(f: dict) -> Optional[SnapshotCorrupt]:
        path = directory / f["path"]
        try:
            got = dio.hash_file(str(path), engine=engine, direct=direct)
        except OSError as e:
            return SnapshotCorrupt(f"{path} cannot be read: {e.strerror or e}", stage="verify",
                                   path=str(path), errno=e.errno)
        if got.size != f["size"]:
            return SnapshotCorrupt(f"{path} has {got.size} bytes, the manifest says {f['size']} "
                                   "(truncated or altered)", stage="verify", path=str(path))
        if got.xxh3 != f["xxh3"]:
            return SnapshotCorrupt(f"{path} does not match its checksum (xxh3 {got.xxh3}, manifest says "
                                   f"{f['xxh3']}): the file was altered or damaged", stage="verify",
                                   path=str(path))
        with lock:
            done[0] += f["size"]
            if progress:
                progress(done[0], total)
        return None

    with cf.ThreadPoolExecutor(max_workers=max(1, min(threads, len(files) or 1))) as pool:
        results = list(pool.map(one, files))
    errors = {id(f): e for f, e in zip(files, results) if e is not None}
    for f in manifest["files"]:            # report the first bad file in manifest order
        if id(f) in errors:
            raise errors[id(f)]
    return done[0]
