"""The snapshot manifest (manifest.json): the format, its atomic write, bounded parsing and validation (checking
the files it lists is ``verify``)."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
from pathlib import Path
from typing import Any, Callable, Optional

from ..durable import write_atomic
from ..errors import SnapshotCorrupt, SnapshotNotFound
from ..formats import SNAPSHOT_MANIFEST as _KIND

__all__ = ["MAGIC", "FORMAT_VERSION", "MANIFEST_NAME", "CHECKSUM", "write", "read", "validate", "seal",
           "root_digest", "MAX_MANIFEST_BYTES", "MAX_FILES"]

MAGIC = _KIND.magic
FORMAT_VERSION = _KIND.format          # 2: a root digest covers the manifest's own metadata
READABLE_FORMATS = (1, 2)              # format 1 (no root digest) still verifies: its files are checked as ever
MANIFEST_NAME = "manifest.json"
CHECKSUM = "xxh3-64"
ROOT_KEY = "root_digest"

# Limits of what a manifest may be, so that a hostile or damaged one is one sentence, never a hang or a crash.
MAX_MANIFEST_BYTES = 16 << 20
MAX_FILES = 100_000
MAX_DEPTH = 32
MAX_PATH = 1024
MAX_FILE_SIZE = 1 << 60
PID_MAX = 4194304                      # PID_MAX_LIMIT of a 64-bit kernel

# Every kind of file dynsnap writes is listed in dynsnap_core.formats (dynsnap inspect decodes each).

_REQUIRED = ("magic", "format", "created", "root_pid", "files", "total_bytes", "checksum")


def _canonical(manifest: dict) -> bytes:
    body = {k: v for k, v in manifest.items() if k != ROOT_KEY}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def root_digest(manifest: dict) -> str:
    """The digest of everything in the manifest but the digest itself (canonical JSON, SHA-256)."""
    return "sha256:" + hashlib.sha256(_canonical(manifest)).hexdigest()


def seal(manifest: dict) -> dict:
    """``manifest`` with its root digest set (format 2): damage to any of its metadata is then detected."""
    out = {k: v for k, v in manifest.items() if k != ROOT_KEY}
    out["format"] = FORMAT_VERSION
    out[ROOT_KEY] = root_digest(out)
    return out


def write(directory: Path, manifest: dict) -> None:
    """Write manifest.json (sealed with its root digest) into ``directory`` durably: temp file, fsync, rename,
    fsync of the directory."""
    data = json.dumps(seal(manifest), indent=2, sort_keys=True, allow_nan=False).encode() + b"\n"
    write_atomic(directory / MANIFEST_NAME, data, tmp=directory / (MANIFEST_NAME + ".tmp"))


def _corrupt(path: Path, what: str) -> SnapshotCorrupt:
    return SnapshotCorrupt(f"{path} {what}", stage="verify", path=str(path))


def read_limited(path: Path, limit: int = MAX_MANIFEST_BYTES) -> bytes:
    """A file's bytes, refusing (SnapshotCorrupt) a symlink, anything but a regular file (a FIFO never blocks:
    O_NONBLOCK), and more than ``limit`` bytes."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY)
    except FileNotFoundError:
        raise _corrupt(path, "is missing: this is not a complete dynsnap snapshot") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise _corrupt(path, "is a symbolic link: a snapshot holds only regular files") from None
        raise SnapshotCorrupt(f"{path} cannot be read: {e.strerror}", stage="verify", path=str(path),
                              errno=e.errno) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _corrupt(path, f"is not a regular file ({_kind(st.st_mode)}): a snapshot holds only regular files")
        if st.st_size > limit:
            raise _corrupt(path, f"is malformed: {st.st_size} bytes, more than the {limit >> 20} MiB a manifest "
                                 "may have")
        chunks, total = [], 0
        while True:
            b = os.read(fd, 1 << 20)
            if not b:
                break
            total += len(b)
            if total > limit:
                raise _corrupt(path, f"is malformed: more than the {limit >> 20} MiB a manifest may have")
            chunks.append(b)
        return b"".join(chunks)
    except OSError as e:
        raise SnapshotCorrupt(f"{path} cannot be read: {e.strerror}", stage="verify", path=str(path),
                              errno=e.errno) from None
    finally:
        os.close(fd)


def _kind(mode: int) -> str:
    return ("a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "a socket"
            if stat.S_ISSOCK(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else
            "a symbolic link" if stat.S_ISLNK(mode) else "not a regular file")


def _depth_ok(obj: Any, limit: int) -> bool:
    todo = [(obj, 1)]
    nodes = 0
    while todo:
        o, d = todo.pop()
        nodes += 1
        if d > limit or nodes > 20 * MAX_FILES:
            return False
        if isinstance(o, dict):
            todo += [(v, d + 1) for v in o.values()]
        elif isinstance(o, list):
            todo += [(v, d + 1) for v in o]
    return True


def _is_int(v: Any, lo: int = 0, hi: int = MAX_FILE_SIZE) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf")


_HEX16 = frozenset("0123456789abcdef")


def _pid_list(v: Any) -> bool:
    return isinstance(v, list) and 0 < len(v) <= MAX_FILES and all(_is_int(p, 1, PID_MAX) for p in v)

# optional fields dynsnap writes, with what each must be
_OPTIONAL: dict[str, tuple[Callable[[Any], bool], str]] = {
    "pids": (_pid_list, "a list of pids"),
    "cmdline": (lambda v: isinstance(v, list) and all(isinstance(a, str) for a in v), "a list of strings"),
    "comm": (lambda v: isinstance(v, str), "a string"),
    "shell_job": (lambda v: isinstance(v, bool), "true or false"),
    "pid_namespace": (lambda v: isinstance(v, bool), "true or false"),
    "leave_running": (lambda v: isinstance(v, bool), "true or false"),
    "host_rss_bytes": (_is_int, "a byte count"),
    "created_unix": (_is_num, "a number"),
    "timings": (lambda v: isinstance(v, dict) and all(_is_num(x) for x in v.values()), "an object of numbers"),
    "cuda": (lambda v: v is None or isinstance(v, dict) and _pid_list(v.get("pids", [1])) and isinstance(
        v.get("devices", []), list) and all(isinstance(d, dict) for d in v.get("devices", [])),
        "null or an object with 'pids' (a list of pids) and 'devices' (a list of objects)"),
    "weights": (lambda v: isinstance(v, dict) and isinstance(v.get("store"), str) and isinstance(
        v.get("regions"), list) and all(isinstance(r, dict) and isinstance(r.get("name"), str) and isinstance(
            r.get("digest"), str) and _is_int(r.get("size")) for r in v["regions"]),
        "an object with 'store' and 'regions' [{name, digest, size}]"),
    "gms": (lambda v: isinstance(v, dict) and isinstance(v.get("agents"), list) and all(
        isinstance(a, dict) and isinstance(a.get("agent"), str) and isinstance(a.get("weight_sets", []), list)
        and all(isinstance(w, dict) and isinstance(w.get("set"), str) and isinstance(w.get("layout_hash"), str)
                for w in a.get("weight_sets", [])) for a in v["agents"]),
        "an object with 'agents' [{agent, weight_sets: [{set, layout_hash, ...}]}]"),
    **{k: (lambda v: isinstance(v, str), "a string")
       for k in ("dynsnap_version", "criu_version", "kernel", "host", "arch", "io_engine", "dump_staging")},
}


def _check_path(p: Any) -> Optional[str]:
    """Why a listed file path is not acceptable, or None."""
    if not isinstance(p, str) or not p:
        return "is not a non-empty string"
    if len(p) > MAX_PATH or "\0" in p:
        return "is too long or holds a NUL byte"
    parts = p.split("/")
    if p.startswith("/") or any(x in ("", ".", "..") for x in parts):
        return "escapes the snapshot or is not a plain relative path"
    if parts[0] != "criu" or len(parts) != 2:
        return "is not a file of the snapshot's criu/ directory"
    return None


def validate(m: Any, path: Path) -> dict:
    """Check a parsed manifest's shape, types and limits; raise SnapshotCorrupt with one sentence."""
    if not isinstance(m, dict) or m.get("magic") != MAGIC:
        raise _corrupt(path, "is malformed: it is not a dynsnap manifest (bad magic)")
    missing = [k for k in _REQUIRED if k not in m]
    if missing:
        raise _corrupt(path, f"is malformed: missing field(s) {', '.join(missing)}")
    if not _is_int(m["format"], 0, 1 << 31) or m["format"] not in READABLE_FORMATS:
        raise _corrupt(path, f"has format version {m['format']!r}; this dynsnap reads versions "
                             f"{', '.join(map(str, READABLE_FORMATS))}")
    if m["checksum"] != CHECKSUM:
        raise _corrupt(path, f"uses checksum {m['checksum']!r}; this dynsnap knows {CHECKSUM}")
    if not _depth_ok(m, MAX_DEPTH):
        raise _corrupt(path, f"is malformed: nested deeper than {MAX_DEPTH} levels or too many values")
    if m["format"] >= 2:
        want = m.get(ROOT_KEY)
        try:
            got = root_digest(m)
        except ValueError:
            got = "(not computable: the manifest holds a non-finite number)"
        if want != got:
            raise _corrupt(path, f"is damaged: its metadata does not match its root digest (recorded {want!r}, "
                                 f"computed {got})")
    if not isinstance(m["created"], str):
        raise _corrupt(path, "is malformed: 'created' is not a string")
    if not _is_int(m["root_pid"], 1, PID_MAX):
        raise _corrupt(path, f"is malformed: 'root_pid' is not a pid (1..{PID_MAX})")
    for key, (ok, what) in _OPTIONAL.items():
        if key in m and not ok(m[key]):
            raise _corrupt(path, f"is malformed: {key!r} is not {what}")
    files = m["files"]
    if not isinstance(files, list):
        raise _corrupt(path, "is malformed: 'files' is not a list")
    if not files:
        raise _corrupt(path, "is malformed: it lists no files (a snapshot holds at least CRIU's inventory.img)")
    if len(files) > MAX_FILES:
        raise _corrupt(path, f"is malformed: it lists {len(files)} files, more than the {MAX_FILES} allowed")
    seen = set()
    total = 0
    for i, f in enumerate(files):
        if not isinstance(f, dict) or set(f) != {"path", "size", "xxh3"}:
            raise _corrupt(path, f"is malformed: entry {i} of 'files' is not {{path, size, xxh3}}")
        why = _check_path(f["path"])
        if why:
            raise _corrupt(path, f"is malformed: file path {f['path']!r} {why}")
        if f["path"] in seen:
            raise _corrupt(path, f"is malformed: file {f['path']!r} is listed twice")
        seen.add(f["path"])
        if not _is_int(f["size"]):
            raise _corrupt(path, f"is malformed: the size of {f['path']!r} is not a byte count")
        x = f["xxh3"]
        if not isinstance(x, str) or len(x) != 16 or not set(x) <= _HEX16:
            raise _corrupt(path, f"is malformed: the checksum of {f['path']!r} is not 16 hex digits")
        total += f["size"]
    if "criu/inventory.img" not in seen:
        raise _corrupt(path, "is malformed: it does not list criu/inventory.img, which every CRIU image set has")
    if not _is_int(m["total_bytes"]) or m["total_bytes"] != total:
        raise _corrupt(path, f"is malformed: 'total_bytes' is {m['total_bytes']!r} but its files hold {total} bytes")
    return m


def read(directory: Path) -> dict:
    """Parse and check the manifest of a snapshot directory; raise SnapshotCorrupt naming the problem.

    The file is opened without following a symlink and without blocking (a FIFO is refused, not waited on),
    read up to MAX_MANIFEST_BYTES, and checked for shape, types and limits (see ``validate``)."""
    directory = Path(directory)
    try:
        if not stat.S_ISDIR(os.stat(directory).st_mode):
            raise FileNotFoundError
    except (OSError, ValueError):
        raise SnapshotNotFound(f"no snapshot at {directory}", stage="verify", path=str(directory)) from None
    path = directory / MANIFEST_NAME
    raw = read_limited(path)
    try:
        m = json.loads(raw)
    except RecursionError:
        raise _corrupt(path, f"is malformed: nested deeper than {MAX_DEPTH} levels") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise SnapshotCorrupt(f"{path} is malformed: not valid JSON ({e})", stage="verify",
                              path=str(path)) from None
    return validate(m, path)


