"""Container targets: the process tree of a cgroup path or a container id under containerd, CRI-O and Docker layouts."""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional

from ..errors import InvalidTarget, ProcessNotFound

__all__ = ["CGROUP_ROOT", "hierarchies", "resolve_cgroup", "find_container", "cgroup_pids", "tree_root",
           "CONTAINER_ID"]

CGROUP_ROOT = Path("/sys/fs/cgroup")
#: A container id as the runtimes write it: hex, 12 to 64 characters (a unique prefix is enough).
CONTAINER_ID = re.compile(r"^[0-9a-f]{12,64}$")
# How each runtime names a container's cgroup: systemd driver scopes, then the cgroupfs driver's bare id.
_LAYOUTS = (re.compile(r"^(?:cri-containerd|crio|docker|libpod)-([0-9a-f]{12,64})\.scope$"),
            re.compile(r"^([0-9a-f]{64})$"))


def hierarchies(root: Path = CGROUP_ROOT) -> list[Path]:
    """The cgroup hierarchies under ``root`` that list processes: the v2 tree, or v1's unified/systemd/pids trees."""
    root = Path(root)
    if (root / "cgroup.procs").exists():
        return [root]
    out = [root / n for n in ("unified", "systemd", "pids", "memory", "cpu") if (root / n / "cgroup.procs").exists()]
    return out


def resolve_cgroup(path: str, root: Path = CGROUP_ROOT) -> Path:
    """A cgroup given as a path under ``root`` (absolute, or as /proc/PID/cgroup writes it); InvalidTarget if absent.

    Only directories inside ``root`` are accepted: ``..`` or a path elsewhere is refused.
    """
    root = Path(root)
    if "\0" in path or ".." in Path(path).parts:
        raise InvalidTarget(f"cgroup path {path!r} is not a plain path", stage="preflight")
    p = Path(path)
    cands = [p] if p.is_absolute() and str(p).startswith(str(root) + os.sep) else []
    rel = str(p).lstrip("/")
    cands += [h / rel for h in hierarchies(root)]
    for c in cands:
        real = Path(os.path.realpath(c))
        if (real == root or str(real).startswith(str(root) + os.sep)) and (real / "cgroup.procs").is_file():
            return real
    raise InvalidTarget(f"no cgroup {path} under {root}", stage="preflight")


def find_container(container_id: str, root: Path = CGROUP_ROOT) -> Path:
    """The cgroup of a container by id (or a unique prefix of at least 12 hex digits), in any hierarchy."""
    cid = container_id.strip().lower()
    for prefix in ("containerd://", "cri-o://", "docker://"):     # as Kubernetes' containerStatuses write it
        if cid.startswith(prefix):
            cid = cid[len(prefix):]
    if not CONTAINER_ID.match(cid):
        raise InvalidTarget(f"{container_id!r} is not a container id (12 to 64 hex digits)", stage="preflight")
    found: list[Path] = []
    for h in hierarchies(root):
        for dirpath, dirnames, _ in os.walk(h):
            for d in dirnames:
                for pat in _LAYOUTS:
                    m = pat.match(d)
                    if m and m.group(1).startswith(cid):
                        found.append(Path(dirpath) / d)
        if found:
            break
    ids = {p.name for p in found}
    if not found:
        raise ProcessNotFound(f"no container {cid} under {root} (looked for containerd, CRI-O and Docker cgroups)",
                              stage="preflight")
    if len(ids) > 1:
        raise InvalidTarget(f"container id {cid} is ambiguous ({len(ids)} containers match); give more digits",
                            stage="preflight")
    return found[0]


def cgroup_pids(cg: Path) -> list[int]:
    """Every process in the cgroup and its descendant cgroups."""
    pids: set[int] = set()
    for dirpath, _, files in os.walk(cg):
        if "cgroup.procs" in files:
            try:
                pids.update(int(x) for x in Path(dirpath, "cgroup.procs").read_text().split())
            except (OSError, ValueError):
                continue
    return sorted(pids)


def _ppid(pid: int) -> Optional[int]:
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
        return int(data[data.rindex(")") + 2:].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def tree_root(cg: Path) -> int:
    """The one process of the cgroup whose parent is outside it (the container's init); refuse none or several."""
    pids = cgroup_pids(cg)
    if not pids:
        raise ProcessNotFound(f"cgroup {cg} has no processes", stage="preflight")
    inside = set(pids)
    roots = [p for p in pids if _ppid(p) not in inside]
    if len(roots) != 1:
        raise InvalidTarget(f"cgroup {cg} holds {len(roots)} separate process trees (roots "
                            f"{', '.join(map(str, roots[:5]))}); checkpoint one of them by pid", stage="preflight")
    return roots[0]
