"""Facts about this node and a process tree that decide whether a snapshot can restore here (recorded at checkpoint)."""
from __future__ import annotations

import ctypes
import os
import platform
import re
import threading
from pathlib import Path
from typing import Iterable, Optional

__all__ = ["COMPAT_VERSION", "ISA_FLAG", "kernel", "cpu", "memory", "gpu", "nvml_gpus", "tree_files", "hash_file",
           "save_hash_cache", "same_mount_namespace", "tree_paths", "collect"]

#: Version of the ``compat`` section of the manifest (absent in snapshots taken before it existed).
COMPAT_VERSION = 1

# CPU flags that name instructions a process may have chosen at start-up (glibc's ifuncs, numpy, torch): a
# restored process keeps using them, so the restoring CPU must have them. Flags about the machine itself
# (hypervisor, constant_tsc, bugs...) do not matter to a restored process.
ISA_FLAG = re.compile(r"^(fpu|mmx|mmxext|sse\d?|sse4_[12]|sse4a|ssse3|pni|avx.*|amx.*|fma4?|f16c|bmi[12]|aes|vaes|"
                      r"pclmulqdq|vpclmulqdq|sha_ni|gfni|xsave|xsaveopt|xsavec|xsaves|popcnt|movbe|adx|rdrand|"
                      r"rdseed|abm|lzcnt|erms|fsrm|cx8|cx16|cmov|clflushopt|clwb|"
                      # aarch64 'Features'
                      r"fp|asimd|asimdhp|asimddp|asimdrdm|atomics|crc32|sha[123]|sha512|pmull|sve.*|sm[34]|"
                      r"i8mm|bf16|dcpop|lrcpc|ilrcpc|jscvt|fcma|uscat|flagm)$")


def kernel() -> dict:
    """Release (``uname -r``), version string and the kernel interfaces CRIU's restore needs."""
    feats = {
        # CRIU puts each process back at its pid through ns_last_pid or clone3(set_tid) (Linux >= 5.5)
        "ns_last_pid": Path("/proc/sys/kernel/ns_last_pid").exists(),
        "map_files": Path("/proc/self/map_files").exists(),      # CONFIG_CHECKPOINT_RESTORE
        "pid_namespaces": Path("/proc/self/ns/pid").exists(),
        "memfd": _has_memfd(),
    }
    return {"release": platform.release(), "version": platform.version(), "features": feats}


def _has_memfd() -> bool:
    try:
        fd = os.memfd_create("dynsnap-probe", os.MFD_CLOEXEC)
    except (AttributeError, OSError):
        return False
    os.close(fd)
    return True


def cpu() -> dict:
    """Architecture, vendor, model and the instruction-set flags of this CPU (from /proc/cpuinfo)."""
    vendor = model = ""
    flags: set[str] = set()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("vendor_id", "CPU implementer") and not vendor:
            vendor = value.strip()
        elif key in ("model name", "CPU part") and not model:
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = set(value.split())
    return {"arch": platform.machine(), "vendor": vendor, "model": model,
            "flags": sorted(f for f in flags if ISA_FLAG.match(f))}


def memory() -> dict:
    """Total and available host memory in bytes (/proc/meminfo)."""
    out = {"total": 0, "available": 0}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                out["total"] = int(line.split()[1]) * 1024
            elif line.startswith("MemAvailable:"):
                out["available"] = int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return out


class _NvmlMemory(ctypes.Structure):
    _fields_ = [("total", ctypes.c_ulonglong), ("free", ctypes.c_ulonglong), ("used", ctypes.c_ulonglong)]


def nvml_gpus() -> Optional[dict]:
    """Per GPU UUID: free memory and MIG mode from NVML (libnvidia-ml.so.1), or None without NVML.

    NVML answers without creating a CUDA context, so the check costs no GPU memory.
    """
    try:
        lib = ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return None
    if lib.nvmlInit_v2() != 0:
        return None
    out: dict = {}
    try:
        count = ctypes.c_uint(0)
        if lib.nvmlDeviceGetCount_v2(ctypes.byref(count)) != 0:
            return None
        for i in range(count.value):
            h = ctypes.c_void_p()
            if lib.nvmlDeviceGetHandleByIndex_v2(i, ctypes.byref(h)) != 0:
                continue
            buf = ctypes.create_string_buffer(96)
            if lib.nvmlDeviceGetUUID(h, buf, 96) != 0:
                continue
            mem = _NvmlMemory()
            cur, pend = ctypes.c_uint(0), ctypes.c_uint(0)
            mig = None
            if lib.nvmlDeviceGetMigMode(h, ctypes.byref(cur), ctypes.byref(pend)) == 0:
                mig = bool(cur.value)
            free = mem.free if lib.nvmlDeviceGetMemoryInfo(h, ctypes.byref(mem)) == 0 else None
            out[buf.value.decode()] = {"free_memory": free, "mig": mig}
    finally:
        lib.nvmlShutdown()
    return out


def gpu() -> dict:
    """The driver and GPUs as dynsnap_core.cuda sees them, with NVML's free memory and MIG mode where it answers.

    ``{"available": bool, "reason", "driver_version", "checkpoint_api", "devices": [...]}``; ``devices`` is empty
    when the driver or its bindings are missing (``reason`` says which).
    """
    from .. import cuda
    from ..errors import DynsnapError
    info = dict(cuda.driver_info())
    devs: list = []
    if info.get("available"):
        try:
            devs = cuda.devices()
        except DynsnapError as e:
            info["reason"] = str(e)
    extra = nvml_gpus() if devs else None
    for d in devs:
        more = (extra or {}).get(d["uuid"], {})
        d["free_memory"] = more.get("free_memory")
        d["mig"] = more.get("mig") if more.get("mig") is not None else (" MIG " in f" {d['name']} ")
    info["devices"] = devs
    return info


_hash_lock = threading.Lock()
_hash_cache: dict[str, list] = {}
_hash_cache_loaded: list[Optional[Path]] = []


def _cache_path() -> Path:
    from ..config import home
    return home() / "cache" / "file-hashes.json"


def _load_cache() -> None:
    """Read the on-disk hash cache once per process (a damaged or missing cache is simply empty)."""
    import json
    if _hash_cache_loaded:
        return
    path = _cache_path()
    _hash_cache_loaded.append(path)
    try:
        data = json.loads(path.read_text())
        if isinstance(data, dict):
            _hash_cache.update({k: v for k, v in data.items() if isinstance(v, list) and len(v) == 6})
    except (OSError, ValueError):
        pass


def save_hash_cache() -> None:
    """Write the hash cache next to the snapshots (temp file + rename); failures only cost speed later."""
    import json
    if not _hash_cache_loaded or _hash_cache_loaded[0] is None:
        return
    path = _hash_cache_loaded[0]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}")
        with _hash_lock:
            tmp.write_text(json.dumps(_hash_cache))
        os.replace(tmp, path)
    except OSError:
        pass


def hash_file(path: str) -> tuple[int, str]:
    """(size, xxh3) of a file with the C engine, remembered per (device, inode, size, mtime, ctime).

    A file's ctime changes with any change to it and cannot be set back from user space, so a remembered hash
    is only reused for the very same bytes. The cache lives in the dynsnap home (cache/file-hashes.json).
    """
    st = os.stat(path)
    key = [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]
    with _hash_lock:
        _load_cache()
        cached = _hash_cache.get(path)
    if cached is not None and cached[:5] == key:
        return st.st_size, cached[5]
    from .. import io as dio
    res = dio.hash_file(path, direct=False)
    with _hash_lock:
        _hash_cache[path] = key + [res.xxh3]
    return res.size, res.xxh3


def _mapped_files(pid: int) -> tuple[Optional[str], list[str]]:
    """(executable, file-backed mappings) of a process; deleted files and special mappings are left out."""
    try:
        exe: Optional[str] = os.readlink(f"/proc/{pid}/exe")
    except OSError:
        exe = None
    files: list[str] = []
    try:
        maps = Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        maps = ""
    for line in maps.splitlines():
        parts = line.split(None, 5)
        if len(parts) < 6:
            continue
        name = parts[5].strip()
        if not name.startswith("/") or name.endswith(" (deleted)") or name.startswith(("/dev/", "/memfd:")):
            continue
        files.append(name)
    if exe is not None and exe.endswith(" (deleted)"):
        exe = None
    return exe, files


def same_mount_namespace(pid: int) -> bool:
    """True when ``pid`` sees the node's file system: the same mount namespace, or one of its own over the same
    root (``dynsnap run``'s private copy of the node's mounts); False for a container with its own root."""
    from ..proc import mount_namespace
    return mount_namespace(pid) != "other-root"


BIG_DATA_FILE = 64 << 20        # a mapped non-ELF file above this is compared by size (weights mmaps: GBs)


def elf_build_id(path: str) -> Optional[str]:
    """The GNU build-id of a 64-bit little-endian ELF file (hex), or None (not ELF, none recorded)."""
    import struct
    try:
        with open(path, "rb") as f:
            head = f.read(64)
            if len(head) < 64 or head[:4] != b"\x7fELF" or head[4] != 2 or head[5] != 1:
                return None
            phoff, = struct.unpack_from("<Q", head, 0x20)
            phentsize, phnum = struct.unpack_from("<HH", head, 0x36)
            if phentsize < 56 or phnum > 4096:
                return None
            f.seek(phoff)
            table = f.read(phentsize * phnum)
            for i in range(phnum):
                p_type, = struct.unpack_from("<I", table, i * phentsize)
                if p_type != 4:                                    # PT_NOTE
                    continue
                p_offset, = struct.unpack_from("<Q", table, i * phentsize + 8)
                p_filesz, = struct.unpack_from("<Q", table, i * phentsize + 32)
                f.seek(p_offset)
                notes = f.read(min(p_filesz, 1 << 16))
                pos = 0
                while pos + 12 <= len(notes):
                    namesz, descsz, ntype = struct.unpack_from("<III", notes, pos)
                    name_at = pos + 12
                    desc_at = name_at + ((namesz + 3) & ~3)
                    if ntype == 3 and notes[name_at:name_at + namesz] == b"GNU\0":   # NT_GNU_BUILD_ID
                        return notes[desc_at:desc_at + descsz].hex() or None
                    pos = desc_at + ((descsz + 3) & ~3)
    except (OSError, struct.error):
        return None
    return None


def file_identity(path: str) -> dict:
    """What identifies a mapped file's content cheaply: ``size`` always, plus the ELF build-id (what the linker
    derived from the code; CRIU checks the same), else the xxh3 of a file up to BIG_DATA_FILE, else nothing more
    (a large data file mapped by the worker, such as a weights file, is compared by size, as CRIU does)."""
    size = os.stat(path).st_size
    bid = elf_build_id(path)
    if bid:
        return {"size": size, "build_id": bid}
    if size <= BIG_DATA_FILE:
        return {"size": size, "xxh3": hash_file(path)[1]}
    return {"size": size}


def tree_files(pids: Iterable[int]) -> list[dict]:
    """The executables and libraries mapped by a process tree, each with its identity (sorted by path; see
    :func:`file_identity`: size and ELF build-id, or xxh3 for a small non-ELF file).

    These are not in the image: CRIU maps them again from the restoring node's file system, and refuses (or
    worse, maps different code) when they differ. Files of a process in another mount namespace (a container)
    are read through /proc/PID/root and marked ``"namespace": "worker"``: they are the container's, not the node's.
    """
    import concurrent.futures as cf
    kinds: dict[str, str] = {}
    where: dict[str, Optional[int]] = {}
    for pid in pids:
        exe, mapped = _mapped_files(pid)
        inside = None if same_mount_namespace(pid) else pid
        for f in mapped:
            kinds.setdefault(f, "mapped")
            where.setdefault(f, inside)
        if exe is not None:
            kinds[exe] = "executable"
            where.setdefault(exe, inside)

    def one(path: str) -> Optional[dict]:
        via = path
        if where[path] is not None:
            # the kernel prints a path from our root when the file is reachable from it (a container's rootfs
            # under the node's tree), else from the process's own root
            inner = f"/proc/{where[path]}/root{path}"
            via = inner if os.path.exists(inner) else path
        try:
            with open(via, "rb"):
                pass
            ident = file_identity(via)
        except OSError:
            return None            # unreadable or gone: CRIU keeps its own record; nothing to compare
        row = {"path": path, "kind": kinds[path], **ident}
        if where[path] is not None:
            row["namespace"] = "worker"
        return row
    with cf.ThreadPoolExecutor(max_workers=4) as pool:
        rows = [r for r in pool.map(one, sorted(kinds)) if r is not None]
    save_hash_cache()
    return rows


_SKIP_PATHS = ("/dev/", "/proc/", "/sys/", "/memfd:")


def tree_paths(pids: Iterable[int]) -> list[dict]:
    """Paths a process tree holds open that CRIU opens again at restore: regular files, directories and each
    process's working directory (deleted files are in the image; devices, /proc and /sys are not paths to
    check). Paths in another mount namespace are marked ``"namespace": "worker"``."""
    import stat as st_
    out: dict[str, dict] = {}
    for pid in pids:
        ns = {} if same_mount_namespace(pid) else {"namespace": "worker"}
        links = [("cwd", f"/proc/{pid}/cwd")]
        try:
            links += [("fd", f"/proc/{pid}/fd/{n}") for n in os.listdir(f"/proc/{pid}/fd")]
        except OSError:
            pass
        for what, link in links:
            try:
                target = os.readlink(link)
                mode = os.stat(link).st_mode
            except OSError:
                continue
            if not target.startswith("/") or target.endswith(" (deleted)") or target.startswith(_SKIP_PATHS):
                continue
            if what == "cwd":
                kind = "working directory"
            elif st_.S_ISREG(mode):
                kind = "open file"
            elif st_.S_ISDIR(mode):
                kind = "open directory"
            else:
                continue
            out.setdefault(target, {"path": target, "kind": kind, **ns})
    return [out[k] for k in sorted(out)]


def collect(pids: list[int], *, host_rss: int = 0) -> dict:
    """The ``compat`` section of a manifest: what the snapshot needs from the node that restores it.

    The checkpoint adds ``gpu`` (devices, MIG mode, bytes needed per GPU) when the tree uses CUDA.
    """
    return {
        "version": COMPAT_VERSION,
        "kernel": kernel(),
        "cpu": cpu(),
        "memory": {"host_total": memory()["total"], "host_needed": host_rss},
        "files": tree_files(pids),
        "paths": tree_paths(pids),
    }
