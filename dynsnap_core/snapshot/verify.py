"""Checking a snapshot's files against its manifest: the closed set (nothing extra, missing, not regular or of
the wrong size) and every file's xxh3, hashed by the C engine on several threads at once."""
from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any, Callable, Optional

from ..errors import SnapshotCorrupt
from .manifest import MANIFEST_NAME, MAX_FILES, _corrupt, _kind

__all__ = ["check_closed", "check_sizes", "verify_files", "is_bulk", "SMALL_FILE", "BULK_BYTES"]


SMALL_FILE = 1 << 20                   # below this, verification reads with psync


BULK_BYTES = 64 << 20                  # files above this (and all pages-*.img) are checked while CRIU restores


def is_bulk(f: dict) -> bool:
    """Memory pages and other large files: restore checks them while CRIU runs; everything else before."""
    return f["path"].rsplit("/", 1)[-1].startswith("pages-") or f["size"] > BULK_BYTES


def check_closed(directory: Path, manifest: dict) -> None:
    """The snapshot is a closed set: its directory holds exactly manifest.json and the listed files, all regular
    files (no symlink anywhere, ``criu/`` included), each with its recorded size. Raise SnapshotCorrupt naming the
    first file that is extra, missing, not regular, or of the wrong size."""
    directory = Path(directory)
    listed = {f["path"]: f for f in manifest["files"]}
    dirs = {p.rsplit("/", 1)[0] for p in listed if "/" in p}
    seen: set[str] = set()
    todo = [""]
    budget = MAX_FILES + 16
    while todo:
        rel_dir = todo.pop()
        here = directory / rel_dir if rel_dir else directory
        try:
            with os.scandir(here) as it:
                entries = []
                for e in it:
                    budget -= 1
                    if budget < 0:
                        raise _corrupt(directory, f"holds more than the {MAX_FILES} files a snapshot may have")
                    entries.append(e)
        except OSError as e:
            raise SnapshotCorrupt(f"{here} cannot be listed: {e.strerror}", stage="verify", path=str(here),
                                  errno=e.errno) from None
        for e in sorted(entries, key=lambda x: x.name):
            rel = f"{rel_dir}/{e.name}" if rel_dir else e.name
            path = directory / rel
            try:
                st = e.stat(follow_symlinks=False)
            except OSError as err:
                raise SnapshotCorrupt(f"{path} cannot be examined: {err.strerror}", stage="verify", path=str(path),
                                      errno=err.errno) from None
            if stat.S_ISLNK(st.st_mode):
                raise _corrupt(path, "is a symbolic link: a snapshot holds only regular files")
            if stat.S_ISDIR(st.st_mode):
                if rel not in dirs:
                    raise _corrupt(path, "is a directory the manifest does not list (not part of the snapshot)")
                todo.append(rel)
                continue
            if not stat.S_ISREG(st.st_mode):
                raise _corrupt(path, f"is {_kind(st.st_mode)}: a snapshot holds only regular files")
            if rel == MANIFEST_NAME:
                continue
            f = listed.get(rel)
            if f is None:
                raise _corrupt(path, "is not listed in the manifest: an extra file is not part of the snapshot")
            if st.st_size != f["size"]:
                raise SnapshotCorrupt(f"{path} has {st.st_size} bytes, the manifest says {f['size']} "
                                      "(truncated or altered)", stage="verify", path=str(path))
            seen.add(rel)
    for f in manifest["files"]:
        if f["path"] not in seen:
            path = directory / f["path"]
            raise SnapshotCorrupt(f"{path} is missing from the snapshot", stage="verify", path=str(path))


def check_sizes(directory: Path, manifest: dict) -> None:
    """The cheap half of verification: the closed-set check (see ``check_closed``)."""
    check_closed(directory, manifest)


def verify_files(directory: Path, manifest: dict, *, engine: str = "auto", direct: bool = True,
                 threads: int = 4, progress: Optional[Callable[[int, int], Any]] = None,
                 only: Optional[Callable[[dict], bool]] = None, closed: bool = True,
                 cancel: Optional[Any] = None) -> int:
    """Check size and xxh3 of every listed file with the C engine; raise SnapshotCorrupt naming the first bad one.

    First the closed-set check (``check_closed``; skipped with ``closed=False`` when the caller just did it).
    Files are hashed by ``threads`` workers at once (largest first; the C engine releases the GIL).
    ``direct=False`` reads through the page cache: restore uses it so that verifying also prefetches the
    images CRIU reads next (one pass over the disk instead of two). ``only`` picks the files to hash;
    ``cancel`` (a threading.Event) stops before the next file. Returns the number of bytes checked.
    """
    import concurrent.futures as cf
    import threading

    from .. import io as dio

    directory = Path(directory)
    if closed:
        check_closed(directory, manifest)
    files = sorted((f for f in manifest["files"] if only is None or only(f)), key=lambda f: -f["size"])
    total = sum(f["size"] for f in files)
    done = [0]
    lock = threading.Lock()

    def one(f: dict) -> Optional[SnapshotCorrupt]:
        path = directory / f["path"]
        if cancel is not None and cancel.is_set():
            return None
        # a small file: plain reads (setting up an io_uring ring costs ~6 ms, more than reading the file)
        eng = "psync" if engine == "auto" and f["size"] < SMALL_FILE else engine
        try:
            got = dio.hash_file(str(path), engine=eng, direct=direct)
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
