"""The restore-compatibility check: each fact a snapshot needs, compared with this node (ok, refuse, or unknown)."""
from __future__ import annotations

import os
import platform
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

from ..errors import DynsnapError, IncompatibleSnapshot, SnapshotCorrupt
from ..units import human_bytes as _human
from . import facts

__all__ = ["Fact", "Report", "check", "require", "format_text"]

OK, REFUSE, UNKNOWN = "ok", "refuse", "unknown"
NOT_RECORDED = "not recorded (snapshot taken before dynsnap recorded it)"


@dataclass
class Fact:
    """One line of the check: what was compared, the verdict, and for a refusal the reason and what to change."""

    name: str
    status: str
    detail: str
    fix: Optional[str] = None


@dataclass
class Report:
    """The check of one snapshot on this node; ``ok`` is False when any fact refuses the restore."""

    snapshot: str
    facts: list[Fact]

    @property
    def ok(self) -> bool:
        return not self.refusals

    @property
    def refusals(self) -> list[Fact]:
        return [f for f in self.facts if f.status == REFUSE]

    def to_dict(self) -> dict:
        return {"snapshot": self.snapshot, "ok": self.ok, "facts": [asdict(f) for f in self.facts]}


def _kver(release: str) -> Optional[tuple[int, int]]:
    try:
        major, minor = release.split(".")[:2]
        return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)
    except ValueError:
        return None


def _arch(m: dict) -> Fact:
    want, have = m.get("arch"), platform.machine()
    if not want:
        return Fact("architecture", UNKNOWN, f"this node is {have}; snapshot's {NOT_RECORDED}")
    if want != have:
        return Fact("architecture", REFUSE, f"snapshot was taken on {want} but this node is {have}",
                    f"restore on a {want} node")
    return Fact("architecture", OK, have)


def _kernel(m: dict, compat: Optional[dict]) -> list[Fact]:
    have = facts.kernel()
    want_rel = (compat or {}).get("kernel", {}).get("release") or m.get("kernel")
    out = []
    if not want_rel:
        out.append(Fact("kernel", UNKNOWN, f"Linux {have['release']} here; snapshot's kernel {NOT_RECORDED}"))
    else:
        w, h = _kver(want_rel), _kver(have["release"])
        if w and h and h < w:
            out.append(Fact("kernel", REFUSE, f"snapshot was taken on Linux {want_rel}, this node runs the older "
                            f"Linux {have['release']}", f"restore on a node with Linux >= {w[0]}.{w[1]}"))
        elif want_rel == have["release"]:
            out.append(Fact("kernel", OK, f"Linux {have['release']} (same as at checkpoint)"))
        else:
            out.append(Fact("kernel", OK, f"Linux {have['release']} (checkpoint on Linux {want_rel}; "
                            "CRIU restores on the same or a newer kernel)"))
    feats = (compat or {}).get("kernel", {}).get("features")
    if feats is None:
        if m.get("pid_namespace") and not have["features"]["pid_namespaces"]:
            out.append(Fact("kernel features", REFUSE, "the snapshot restores into a fresh pid namespace but this "
                            "kernel has no pid namespaces", "use a kernel with CONFIG_PID_NS=y"))
        else:
            out.append(Fact("kernel features", UNKNOWN, f"kernel features {NOT_RECORDED}"))
        return out
    missing = sorted(k for k, v in feats.items() if v and not have["features"].get(k))
    if missing:
        out.append(Fact("kernel features", REFUSE, f"this kernel lacks {', '.join(missing)}, which the snapshot's "
                        "node had", "use a kernel built with CONFIG_CHECKPOINT_RESTORE, CONFIG_PID_NS and memfd "
                        "(as the checkpointing node)"))
    else:
        out.append(Fact("kernel features", OK, ", ".join(sorted(k for k, v in feats.items() if v)) or "none needed"))
    return out


def _criu(m: dict) -> Fact:
    from ..criu import find_criu
    try:
        criu = find_criu(required=True)
    except DynsnapError as e:
        return Fact("CRIU", REFUSE, f"no usable CRIU on this node: {e.message}",
                    "install CRIU >= 4.1 (scripts/setup.sh does it) or set DYNSNAP_CRIU")
    want = m.get("criu_version")
    if not want:
        return Fact("CRIU", UNKNOWN, f"CRIU {criu.version_str} here; snapshot's CRIU version {NOT_RECORDED}")
    try:
        wv = tuple(int(x) for x in str(want).split("."))
    except ValueError:
        return Fact("CRIU", UNKNOWN, f"CRIU {criu.version_str} here; snapshot's CRIU version {want!r} not understood")
    if tuple(criu.version) < wv[:len(criu.version)]:
        return Fact("CRIU", REFUSE, f"snapshot was dumped by CRIU {want}, this node has the older CRIU "
                    f"{criu.version_str}, which may not read its images", f"install CRIU >= {want}")
    return Fact("CRIU", OK, f"CRIU {criu.version_str} (dumped by {want})")


def _cpu(compat: Optional[dict]) -> Fact:
    have = facts.cpu()
    want = (compat or {}).get("cpu")
    if not want:
        return Fact("CPU", UNKNOWN, f"{have['model'] or have['arch']} here; snapshot's CPU flags {NOT_RECORDED}")
    missing = sorted(set(want.get("flags", [])) - set(have["flags"]))
    if missing:
        return Fact("CPU", REFUSE, f"this CPU ({have['model'] or '?'}) lacks instruction set flag(s) "
                    f"{', '.join(missing)} that the checkpointing CPU ({want.get('model') or '?'}) had; the restored "
                    "process may use those instructions", "restore on a node with the same or a newer CPU "
                    "generation")
    same = " (same model)" if want.get("model") == have["model"] else f" (checkpoint on {want.get('model') or '?'})"
    return Fact("CPU", OK, f"{have['model'] or have['arch']}{same}: all {len(want.get('flags', []))} instruction set "
                "flags present")


def _host_memory(m: dict) -> Fact:
    need = m.get("host_rss_bytes")
    avail = facts.memory()["available"]
    if need is None:
        return Fact("host memory", UNKNOWN, f"{_human(avail)} available; snapshot's memory need {NOT_RECORDED}")
    if need > avail:
        return Fact("host memory", REFUSE, f"the snapshot needs {_human(need)} of memory but only {_human(avail)} "
                    "is available on this node", f"free {_human(need - avail)} of memory or restore on a node "
                    "with more")
    return Fact("host memory", OK, f"needs {_human(need)}, {_human(avail)} available")


def _gpu(m: dict, compat: Optional[dict]) -> list[Fact]:
    gpu = m.get("cuda")
    if not gpu:
        return [Fact("GPU", OK, "no GPU state in the snapshot")]
    have = facts.gpu()
    if not have.get("available"):
        reason = have.get("reason") or "no CUDA driver with the checkpoint API"
        return [Fact("GPU driver", REFUSE, f"this snapshot holds GPU state but this machine cannot restore it: "
                     f"{reason}", "restore on a GPU node whose driver has the checkpoint API (>= 570)")]
    out = []
    want_drv, have_drv = gpu.get("driver_version"), have.get("driver_version")
    if want_drv and have_drv and have_drv < want_drv:
        out.append(Fact("GPU driver", REFUSE, f"snapshot was taken with CUDA driver API {want_drv}, this node's "
                        f"driver offers {have_drv}", "upgrade the NVIDIA driver to the checkpointing node's version"))
    else:
        out.append(Fact("GPU driver", OK, f"driver API {have_drv} with the checkpoint API"
                        + (f" (checkpoint on {want_drv})" if want_drv else "")))
    want_devs = gpu.get("devices") or []
    have_devs = have.get("devices") or []
    want_names = sorted(str(d.get("name")) for d in want_devs)
    have_names = sorted(str(d.get("name")) for d in have_devs)[:len(want_names)]
    if want_names != have_names:
        out.append(Fact("GPU chip", REFUSE, f"snapshot was taken on {', '.join(want_names)} but this machine has "
                        f"{', '.join(have_names) or 'no GPU'}; CUDA restore needs the same chip type",
                        f"restore on a node with {', '.join(want_names)}"))
        return out
    out.append(Fact("GPU chip", OK, ", ".join(want_names)))
    want_c = (compat or {}).get("gpu") or {}
    rec = {d.get("uuid"): d for d in want_c.get("devices") or []}
    pairs = list(zip(sorted(want_devs, key=lambda d: d.get("index", 0)),
                     sorted(have_devs, key=lambda d: d.get("index", 0))))
    # memory size and MIG mode of each GPU the snapshot used
    for w, h in pairs:
        wm = (rec.get(w.get("uuid")) or w).get("total_memory")
        if wm and h.get("total_memory") and h["total_memory"] < wm:
            out.append(Fact("GPU memory size", REFUSE, f"GPU {h.get('index')} has {_human(h['total_memory'])}, "
                            f"the snapshot's GPU had {_human(wm)}", "restore on GPUs of the same memory size"))
        wmig = (rec.get(w.get("uuid")) or {}).get("mig")
        if wmig is not None and h.get("mig") is not None and bool(wmig) != bool(h["mig"]):
            out.append(Fact("MIG mode", REFUSE, f"GPU {h.get('index')} has MIG {'on' if h['mig'] else 'off'}, the "
                            f"snapshot's GPU had it {'on' if wmig else 'off'}", "set the same MIG mode "
                            "(nvidia-smi -mig) or restore on a node configured like the checkpointing one"))
    need = want_c.get("memory_needed") or {}
    if not need:
        out.append(Fact("GPU free memory", UNKNOWN, f"GPU memory need {NOT_RECORDED}"))
        return out
    for w, h in pairs:
        n = need.get(w.get("uuid"))
        if n is None:
            continue
        free = h.get("free_memory")
        if free is None:
            out.append(Fact("GPU free memory", UNKNOWN, f"GPU {h.get('index')}: free memory unknown (NVML not "
                            f"available); the snapshot needs {_human(n)}"))
        elif free < n:
            out.append(Fact("GPU free memory", REFUSE, f"GPU {h.get('index')} has {_human(free)} free, the snapshot "
                            f"needs {_human(n)}", "stop what uses that GPU or restore on another GPU "
                            "(--device-map)"))
        else:
            out.append(Fact("GPU free memory", OK, f"GPU {h.get('index')}: needs {_human(n)}, {_human(free)} free"))
    return out


def _files(compat: Optional[dict]) -> Fact:
    rows = (compat or {}).get("files")
    if rows is None:
        return Fact("executable and libraries", UNKNOWN, f"the worker's files {NOT_RECORDED}")
    inside = [r for r in rows if r.get("namespace") == "worker"]
    rows = [r for r in rows if r.get("namespace") != "worker"]
    if inside and not rows:
        return Fact("executable and libraries", UNKNOWN, f"{len(inside)} files are inside the worker's own mount "
                    "namespace (its container image): they cannot be compared from the node")
    bad = []
    for r in rows:
        path = r["path"]
        try:
            st = os.stat(path)
        except OSError as e:
            bad.append(f"{path} is missing ({e.strerror})")
            continue
        if st.st_size != r["size"]:
            bad.append(f"{path} has {st.st_size} bytes, at checkpoint it had {r['size']}")
            continue
        if "build_id" in r:
            got = facts.elf_build_id(path)
            if got != r["build_id"]:
                bad.append(f"{path} is another build than at checkpoint (ELF build-id {got}, recorded "
                           f"{r['build_id']})")
            continue
        if "xxh3" not in r:
            continue                # a large data file: its size is what CRIU checks too
        try:
            _, x = facts.hash_file(path)
        except OSError as e:
            bad.append(f"{path} cannot be read ({e.strerror})")
            continue
        if x != r["xxh3"]:
            bad.append(f"{path} differs from the file at checkpoint (xxh3 {x}, recorded {r['xxh3']})")
    facts.save_hash_cache()
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        return Fact("executable and libraries", REFUSE, f"{bad[0]}{more}; the restored process would map "
                    "different code", "install the same versions of the worker's executable and libraries "
                    "(the same container image) on this node")
    return Fact("executable and libraries", OK, f"{len(rows)} files match (size, and ELF build-id or xxh3)")


def _paths(compat: Optional[dict]) -> Fact:
    rows = (compat or {}).get("paths")
    if rows is None:
        return Fact("open files and directories", UNKNOWN, f"the paths the worker held open {NOT_RECORDED}")
    rows = [r for r in rows if r.get("namespace") != "worker"]
    missing = [r for r in rows if not os.path.lexists(r["path"])]
    if missing:
        r = missing[0]
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        what = "as its working directory" if r["kind"] == "working directory" else f"open ({r['kind']})"
        return Fact("open files and directories", REFUSE, f"{r['path']} is missing; the worker had it {what}{more}",
                    "provide the same paths on this node (the same volumes mounted at the same places)")
    return Fact("open files and directories", OK, f"{len(rows)} paths present")


def _images(path: Path, m: dict) -> Fact:
    from ..snapshot import verify as sv
    try:
        sv.check_sizes(path, m)
    except SnapshotCorrupt as e:
        return Fact("snapshot files", REFUSE, e.message, "fetch the snapshot again or take a new one")
    return Fact("snapshot files", OK, f"{len(m['files'])} files present with their recorded sizes")


def _pids(m: dict) -> Fact:
    from .. import proc
    if m.get("pid_namespace"):
        return Fact("pids", OK, "restores into a fresh pid namespace: the node's pids do not matter")
    for p in m.get("pids") or [m["root_pid"]]:
        if proc.exists(p):
            return Fact("pids", REFUSE, f"pid {p} is in use by a running process ({proc.comm(p)}); a snapshot "
                        "restores with its original pids, so stop that process first",
                        f"stop pid {p}, or start workers with `dynsnap run` so that their snapshots restore "
                        "with any pids")
        if proc.state(p) == "Z":
            return Fact("pids", REFUSE, f"pid {p} is held by a zombie that its parent (pid {proc.parent(p)}) has "
                        "not reaped yet; a snapshot restores with its original pids",
                        f"have pid {proc.parent(p)} reap its children")
    return Fact("pids", OK, f"the snapshot's {len(m.get('pids') or [1])} pid(s) are free")


def _privilege() -> Fact:
    from ..criu import has_checkpoint_privilege
    if has_checkpoint_privilege():
        return Fact("privilege", OK, "root" if os.geteuid() == 0 else "CAP_CHECKPOINT_RESTORE")
    return Fact("privilege", REFUSE, f"restore needs root or CAP_CHECKPOINT_RESTORE (running as uid {os.geteuid()})",
                "run dynsnap as root")


def check(snapshot: Any, *, images: bool = True) -> Report:
    """Compare what ``snapshot`` (a Snapshot, or a path/name) needs with this node; touches nothing.

    ``images=False`` skips the snapshot's own files (a snapshot still in object storage, checked before its
    download, which verifies every byte).
    """
    if isinstance(snapshot, (str, os.PathLike)):
        from ..snapshot import manifest as mf
        from ..snapshot.store import resolve
        path = resolve(snapshot)
        m = mf.read(path)
    else:                                          # a Snapshot (anything with .path and .manifest)
        path, m = Path(snapshot.path), snapshot.manifest
    compat = m.get("compat") if isinstance(m.get("compat"), dict) else None
    files = _images(path, m) if images else Fact("snapshot files", OK, f"{len(m['files'])} files in object "
                                                                              "storage (verified at download)")
    out: list[Fact] = [_privilege(), files, _arch(m)]
    out += _kernel(m, compat)
    out += [_criu(m), _cpu(compat), _host_memory(m)]
    out += _gpu(m, compat)
    out += [_files(compat), _paths(compat), _pids(m)]
    return Report(str(path), out)


def require(snapshot: Any, *, images: bool = True) -> Report:
    """Run the check and raise IncompatibleSnapshot with the first refusal (and how many more) if any."""
    rep = check(snapshot, images=images)
    bad = rep.refusals
    if bad:
        more = f" ({len(bad) - 1} more: dynsnap check {rep.snapshot})" if len(bad) > 1 else ""
        raise IncompatibleSnapshot(bad[0].detail + more, stage="check", path=rep.snapshot)
    return rep


def format_text(rep: Report) -> str:
    """One line per fact: verdict, name, detail, and for a refusal what to change."""
    lines = [f"{rep.snapshot}: {'can restore here' if rep.ok else 'cannot restore here'}"]
    mark = {OK: "ok", REFUSE: "REFUSE", UNKNOWN: "unknown"}
    for f in rep.facts:
        lines.append(f"  {mark[f.status]:<8} {f.name:<26} {f.detail}")
        if f.fix and f.status == REFUSE:
            lines.append(f"  {'':<8} {'':<26} fix: {f.fix}")
    return "\n".join(lines)
