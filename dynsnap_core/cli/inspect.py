"""dynsnap inspect: describe a snapshot directory, or decode any single file dynsnap writes (kinds in formats.KINDS)."""
from __future__ import annotations

import json
import os
import stat
import struct
from pathlib import Path

from .. import formats
from ..snapshot import manifest as mf
from ..errors import SnapshotCorrupt, SnapshotNotFound

__all__ = ["inspect", "format_text"]

# CRIU's image headers (criu/include/magic.h): a common/service magic word, then the image's own magic.
_CRIU_COMMON = {formats.CRIU_IMG_COMMON_MAGIC: "IMG_COMMON_MAGIC", formats.CRIU_IMG_SERVICE_MAGIC: "IMG_SERVICE_MAGIC"}


def _criu_image(path: Path) -> dict:
    head = mf.read_limited(path, 1 << 60)[:8] if path.stat().st_size < 4096 else _head(path, 8)
    info: dict = {"kind": "criu image", "path": str(path), "size": path.stat().st_size}
    if path.name.startswith("pages-"):
        info["format"] = "raw memory pages (described by the matching pagemap image)"
        return info
    if len(head) >= 8:
        first, second = struct.unpack("<II", head)
        if first in _CRIU_COMMON:
            info.update(header=_CRIU_COMMON[first], magic=f"0x{second:08x}")
        else:
            info.update(magic=f"0x{first:08x}")
    info["decode"] = "crit decode -i " + str(path)
    return info


def _head(path: Path, n: int) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    try:
        return os.pread(fd, n, 0)
    finally:
        os.close(fd)


def inspect(path: str) -> dict:
    """Describe a snapshot directory or decode one file; anything unreadable or malformed is SnapshotCorrupt
    with one sentence (never a hang: FIFOs and devices are refused before they are opened)."""
    from ..snapshot import resolve
    p = resolve(path)
    if not p.exists():
        raise SnapshotNotFound(f"no such snapshot or file: {path}", stage="inspect", path=str(path))
    if not p.is_dir():
        st = os.stat(p)
        if not stat.S_ISREG(st.st_mode):
            raise SnapshotCorrupt(f"{p} is not a regular file: dynsnap inspect decodes snapshots and their files",
                                  stage="inspect", path=str(p))
    try:
        return _inspect(p)
    except (TypeError, AttributeError, KeyError) as e:
        raise SnapshotCorrupt(f"{p} is malformed: unexpected structure ({type(e).__name__}: {e})", stage="inspect",
                              path=str(p)) from None
    except OSError as e:
        raise SnapshotCorrupt(f"{p} cannot be read: {e.strerror or e}", stage="inspect", path=str(p),
                              errno=e.errno) from None


def _inspect(p: Path) -> dict:
    if p.is_dir():
        m = mf.read(p)
        by_kind: dict[str, int] = {}
        for f in m["files"]:
            kind = "pages" if Path(f["path"]).name.startswith("pages-") else Path(f["path"]).suffix or "other"
            by_kind[kind] = by_kind.get(kind, 0) + f["size"]
        return {"kind": "snapshot", "path": str(p), "manifest": m, "bytes_by_kind": by_kind}
    if p.suffix == ".json":
        try:
            m = json.loads(mf.read_limited(p))
        except RecursionError:
            raise SnapshotCorrupt(f"{p} is malformed: nested too deeply", stage="inspect", path=str(p)) from None
        except ValueError as e:
            raise SnapshotCorrupt(f"{p} is malformed: {e}", stage="inspect", path=str(p)) from None
        if isinstance(m, dict) and m.get("magic") == mf.MAGIC:
            mf.validate(m, p)
        k = formats.kind_of_json(m)
        if k is None:
            raise SnapshotCorrupt(f"{p} is not a dynsnap file (no known magic)", stage="inspect", path=str(p))
        if k is formats.WEIGHT_SET:
            tensors = m.get("tensors", [])
            return {"kind": k.name, "path": str(p), "magic": m.get("magic"), "format": m.get("format"),
                    "name": m.get("name"), "tensors": len(tensors),
                    "bytes": sum(t.get("nbytes", 0) for t in tensors),
                    "shards": sorted({t.get("shard") for t in tensors if t.get("shard")}), "manifest": m}
        return {"kind": "manifest", "path": str(p), "magic": m.get("magic"), "format": m.get("format"),
                "manifest": m}
    if p.suffix == ".img":
        return _criu_image(p)
    if p.parent.name == "objects" and "-" in p.name:
        digest, _, size = p.name.rpartition("-")
        return {"kind": "weight object", "path": str(p), "digest": digest, "size": p.stat().st_size,
                "size_in_name": int(size) if size.isdigit() else None}
    if p.suffix == ".log":
        size = p.stat().st_size
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            tail = os.pread(fd, 65536, max(0, size - 65536))
        finally:
            os.close(fd)
        return {"kind": "log", "path": str(p), "size": size,
                "tail": tail.decode(errors="replace").splitlines()[-10:]}
    return {"kind": "unknown", "path": str(p), "size": p.stat().st_size}


def format_text(info: dict) -> str:
    if info["kind"] != "snapshot":
        if info["kind"] == "manifest":
            return json.dumps(info["manifest"], indent=2, sort_keys=True)
        return "\n".join(f"{k}: {v}" for k, v in info.items() if k != "manifest")
    m = info["manifest"]
    lines = [
        f"snapshot   {info['path']}",
        f"format     {m['magic']} v{m['format']}, checksum {m['checksum']}",
        f"created    {m['created']} on {m.get('host')} (kernel {m.get('kernel')}, {m.get('arch')})",
        f"versions   dynsnap {m.get('dynsnap_version')}, CRIU {m.get('criu_version')}",
        f"process    pid {m['root_pid']} ({len(m.get('pids', []))} processes): {' '.join(m.get('cmdline', []))}",
        f"size       {m['total_bytes']} bytes in {len(m['files'])} files "
        + ", ".join(f"{k}: {v}" for k, v in sorted(info["bytes_by_kind"].items())),
        "timings    " + ", ".join(f"{k} {v:.3f} s" for k, v in m.get("timings", {}).items()),
    ]
    restore = ("into a fresh pid namespace: any pids may be in use, copies can run side by side"
               if m.get("pid_namespace") else "with its original pids, which must be free")
    if m.get("mount_namespace"):
        restore += "; its own mount namespace and /proc, the node's other mounts bound at the same paths"
    if m.get("shell_job"):
        restore += "; a shell job: restore from a terminal"
    lines.append(f"restores   {restore}")
    if m.get("weights"):              # shape checked by manifest.validate
        w = m["weights"]
        lines.append(f"weights    {len(w['regions'])} region(s) outside the image, "
                     f"{sum(r['size'] for r in w['regions'])} bytes in {w['store']}")
    if m.get("cuda"):
        c = m["cuda"]
        lines.append(f"gpu        pids {c.get('pids')}, driver {c.get('driver_version')}, devices "
                     + "; ".join(f"{d.get('name')} {d.get('uuid')}" for d in c.get("devices", [])))
    return "\n".join(lines)
