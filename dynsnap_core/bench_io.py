"""I/O engine benchmark: our engines against fio (device limit), cp and shutil, on one file system in one run."""
from __future__ import annotations

import json
import os
import platform
import resource
import shutil
import subprocess
import tempfile
import time
from typing import Any, Callable, Iterable, Optional

from dynsnap_core import io

__all__ = ["run", "format_table"]

_CHUNK = 64 << 20


def _fs_type(path: str) -> str:
    try:
        out = subprocess.run(["findmnt", "-n", "-o", "FSTYPE", "-T", path], capture_output=True,
                             text=True, timeout=10).stdout.strip()
        if out:
            return out
    except (OSError, subprocess.SubprocessError):
        pass
    best, fstype = "", "unknown"
    with open("/proc/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) > 2 and os.path.abspath(path).startswith(parts[1]) and len(parts[1]) > len(best):
                best, fstype = parts[1], parts[2]
    return fstype


def _cpu() -> float:
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def _drop_caches(cold: bool) -> bool:
    if not cold:
        return False
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _timed(fn: Callable[[], Any], nbytes: int, cold: bool) -> dict:
    dropped = _drop_caches(cold)
    c0, t0 = _cpu(), time.perf_counter()
    fn()
    t1, c1 = time.perf_counter(), _cpu()
    secs = t1 - t0
    gb = nbytes / 1e9
    return {"seconds": round(secs, 4), "gbps": round(gb / secs, 3) if secs > 0 else 0.0,
            "cpu_s_per_gb": round((c1 - c0) / gb, 3) if gb else 0.0, "cold": dropped}


def _fio(path: str, rw: str, size_mb: int, block_kb: int, qd: int) -> Optional[dict]:
    cmd = ["fio", "--name=dynsnap-bench", f"--filename={path}", f"--rw={rw}", f"--bs={block_kb}k",
           f"--iodepth={qd}", "--ioengine=libaio", "--direct=1", f"--size={size_mb}M",
           "--end_fsync=1" if rw == "write" else "--invalidate=1", "--output-format=json"]
    c0 = _cpu()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    cpu = _cpu() - c0
    if r.returncode:
        raise RuntimeError(f"fio failed: {r.stderr.strip()[-300:]}")
    job = json.loads(r.stdout[r.stdout.index("{"):])["jobs"][0]
    side = job["write" if rw == "write" else "read"]
    gbps = side["bw_bytes"] / 1e9
    nbytes = size_mb << 20
    return {"seconds": round(nbytes / 1e9 / gbps, 4) if gbps else 0.0, "gbps": round(gbps, 3),
            "cpu_s_per_gb": round(cpu / (nbytes / 1e9), 3)}


def run(dir: str, size_mb: int = 1024, block_kb: int = 1024, qd: int = 32,
        engines: Optional[Iterable[str]] = None, cold: bool = True,
        progress: Optional[Callable[[str], Any]] = None) -> dict:
    """Measure sequential write, read and copy of one ``size_mb`` file in ``dir``.

    Rows: each of our engines (write_buffers, hash_file with O_DIRECT, copy_tree with O_DIRECT),
    fio (libaio, O_DIRECT, same block size and queue depth: the device limit), ``cp`` and
    ``shutil.copyfile`` (both followed by fsync), plain Python write/read. Caches are dropped
    before each measurement when ``cold`` and root. Returns a JSON-able dict; files are removed.
    """
    say = progress or (lambda msg: None)
    engines = [e for e in (engines or io.available_engines()) if e in io.available_engines()]
    nbytes = size_mb << 20
    bs = block_kb << 10
    work = tempfile.mkdtemp(prefix="dynsnap-bench-io-", dir=dir)
    notes: list[str] = []
    rows: list[dict] = []
    can_drop = cold and _drop_caches(True)
    if cold and not can_drop:
        notes.append("cache not dropped (needs root): read figures may come from the page cache")
    fio = shutil.which("fio")
    if not fio:
        notes.append("fio not found: no device-limit rows")

    def add(op: str, tool: str, engine: str, m: dict, note: str = "") -> None:
        rows.append({"op": op, "tool": tool, "engine": engine, **m, "note": note})

    chunk = os.urandom(min(_CHUNK, nbytes) or 1)
    bufs = []
    left = nbytes
    while left:
        n = min(left, len(chunk))
        bufs.append(memoryview(chunk)[:n])
        left -= n
    try:
        src_dir = os.path.join(work, "src")
        os.mkdir(src_dir)
        src = os.path.join(src_dir, "data")
        # ---- sequential write
        for eng in engines:
            say(f"write {eng}")
            path = os.path.join(work, f"w-{eng}")
            add("write", "dynsnap write_buffers", eng,
                _timed(lambda: io.write_buffers(path, bufs, engine=eng), nbytes, cold), "buffered + fdatasync")
            os.replace(path, src) if not os.path.exists(src) else os.unlink(path)
        say("write python")

        def py_write():
            with open(os.path.join(work, "w-py"), "wb") as f:
                for b in bufs:
                    f.write(b)
                f.flush()
                os.fsync(f.fileno())
        add("write", "python write+fsync", "", _timed(py_write, nbytes, cold), "baseline")
        os.unlink(os.path.join(work, "w-py"))
        if fio:
            say("write fio")
            add("write", "fio", "libaio", _fio(os.path.join(work, "fio"), "write", size_mb, block_kb, qd),
                "O_DIRECT, device limit")
        # ---- sequential read
        for eng in engines:
            say(f"read {eng}")
            add("read", "dynsnap hash_file", eng,
                _timed(lambda: io._io.hash_file(src, engine=eng, direct=True, block_size=bs, queue_depth=qd),
                       nbytes, cold), "O_DIRECT + xxh3")
        say("read python")

        def py_read():
            buf = bytearray(bs)
            with open(src, "rb", buffering=0) as f:
                while f.readinto(buf):
                    pass
        add("read", "python readinto", "", _timed(py_read, nbytes, cold), "baseline")
        if fio:
            say("read fio")
            _drop_caches(cold)
            add("read", "fio", "libaio", _fio(os.path.join(work, "fio"), "read", size_mb, block_kb, qd),
                "O_DIRECT, device limit")
            os.unlink(os.path.join(work, "fio"))
        # ---- copy
        for eng in engines:
            say(f"copy {eng}")
            dst = os.path.join(work, f"c-{eng}")
            add("copy", "dynsnap copy_tree", eng,
                _timed(lambda: io.copy_tree(src_dir, dst, engine=eng, block_size=bs, queue_depth=qd),
                       nbytes, cold), "O_DIRECT + xxh3 + fsync")
            shutil.rmtree(dst)
        say("copy cp")
        dst = os.path.join(work, "c-cp")
        add("copy", "cp", "", _timed(lambda: (subprocess.run(["cp", src, dst], check=True), _fsync_path(dst)),
                                     nbytes, cold), "+ fsync")
        os.unlink(dst)
        say("copy shutil")
        add("copy", "shutil.copyfile", "", _timed(lambda: (shutil.copyfile(src, dst), _fsync_path(dst)),
                                                  nbytes, cold), "baseline, + fsync")
        os.unlink(dst)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    # ratios: to fio of the same op (copy: to fio's read and write back to back), to the baseline
    fio_of = {r["op"]: r["gbps"] for r in rows if r["tool"] == "fio"}
    if "read" in fio_of and "write" in fio_of and fio_of["read"] and fio_of["write"]:
        fio_of["copy"] = 1 / (1 / fio_of["read"] + 1 / fio_of["write"])
    base_of = {r["op"]: r["gbps"] for r in rows if "baseline" in r["note"]}
    for r in rows:
        r["ratio_fio"] = round(r["gbps"] / fio_of[r["op"]], 3) if fio_of.get(r["op"]) else None
        r["ratio_baseline"] = round(r["gbps"] / base_of[r["op"]], 3) if base_of.get(r["op"]) else None
    if "copy" in fio_of:
        notes.append("copy ratio_fio is against fio read and write run back to back "
                     f"({fio_of['copy']:.3f} GB/s), the serial limit of one disk")
    return {
        "date": time.strftime("%Y-%m-%d"),
        "machine": {"cpu_count": os.cpu_count(), "kernel": platform.release(), "fs_type": _fs_type(dir),
                    "dir": os.path.abspath(dir), "python": platform.python_version()},
        "config": {"size_mb": size_mb, "block_kb": block_kb, "queue_depth": qd, "cold": can_drop,
                   "engines": engines},
        "rows": rows,
        "notes": notes,
    }


def format_table(result: dict) -> str:
    """A Markdown table of a run() result, with its machine and configuration."""
    m, c = result["machine"], result["config"]
    lines = [f"{result['date']}: {m['cpu_count']} CPUs, Linux {m['kernel']}, {m['fs_type']} at {m['dir']}; "
             f"{c['size_mb']} MiB, {c['block_kb']} KiB blocks, QD {c['queue_depth']}, "
             f"{'cold cache' if c['cold'] else 'warm cache'}",
             "",
             "| op | tool | engine | GB/s | vs fio | vs baseline | CPU s/GB | note |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        fmt = lambda v: "" if v is None else f"{v:.2f}"  # noqa: E731
        lines.append(f"| {r['op']} | {r['tool']} | {r['engine']} | {r['gbps']:.2f} | {fmt(r['ratio_fio'])} | "
                     f"{fmt(r['ratio_baseline'])} | {r['cpu_s_per_gb']:.2f} | {r['note']} |")
    lines += [f"- {n}" for n in result["notes"]]
    return "\n".join(lines)
