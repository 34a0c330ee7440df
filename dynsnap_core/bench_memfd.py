"""memfd restore benchmark: parallel fill vs a single-threaded pread loop (what CRIU does) vs memcpy bandwidth.

One run measures, for 1, 2, 4, 8, 16 threads where the cores allow: the parallel fill of a fresh
memfd from a file in the page cache and from cold storage (after drop_caches, root only), the
single-threaded ``pread`` loop into a fresh memfd mapping (the baseline), and the machine's
multi-thread memcpy bandwidth between two populated mappings (the physical limit). GB/s = 10**9 B/s.
Self-contained: ``python3 -m dynsnap_core.cli bench memfd --json``.
"""
from __future__ import annotations

import datetime as _dt
import mmap
import os
import platform
import statistics
import tempfile
import time
from typing import Any, Callable, Optional, Sequence

from dynsnap_core import memfd
from dynsnap_core.benchutil import cpu_time, drop_caches, fmt_opt

__all__ = ["run", "format_table", "thread_counts"]

_BLOCK = 1 << 20


def thread_counts(spec: Optional[str | Sequence[int]] = None) -> list[int]:
    """1, 2, 4, 8, 16 up to the number of CPUs (at least 1 and 2), or the given list."""
    if spec:
        if isinstance(spec, str):
            return sorted({int(x) for x in spec.split(",") if x.strip()})
        return sorted(set(int(x) for x in spec))
    cpus = os.cpu_count() or 1
    return [t for t in (1, 2, 4, 8, 16) if t <= max(cpus, 2)]


def _read(path: str, default: str = "") -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return default


def _machine(dir: str) -> dict:
    model = ""
    for line in _read("/proc/cpuinfo").splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    mem = 0
    for line in _read("/proc/meminfo").splitlines():
        if line.startswith("MemTotal:"):
            mem = int(line.split()[1]) << 10
    return {"cpu_count": os.cpu_count(), "cpu_model": model, "kernel": platform.release(),
            "host": platform.node(), "mem_bytes": mem, "dir": dir,
            "thp_shmem": _read("/sys/kernel/mm/transparent_hugepage/shmem_enabled", "?")}


def _measure(fn: Callable[[], Any], nbytes: int, repeats: int, cold: bool) -> dict:
    """Best-of and median of ``repeats`` runs; caches dropped before each run when ``cold``."""
    secs, cpus = [], []
    for _ in range(repeats):
        if cold:
            drop_caches()
        c0, t0 = cpu_time(), time.perf_counter()
        fn()
        secs.append(time.perf_counter() - t0)
        cpus.append(cpu_time() - c0)
    best = min(secs)
    gb = nbytes / 1e9
    return {"gbps": round(gb / best, 3) if best > 0 else 0.0, "gbps_median": round(gb / statistics.median(secs), 3),
            "seconds": round(best, 4), "cpu_s_per_gb": round(statistics.median(cpus) / gb, 3) if gb else 0.0,
            "runs": repeats}


def _pread_loop(path: str, size: int) -> None:
    """The baseline: one thread, 1 MiB preads straight into a fresh memfd mapping."""
    with memfd.create(size, "bench-baseline") as m:
        mm = mmap.mmap(m.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        mv = memoryview(mm)
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            off = 0
            while off < size:
                n = os.preadv(fd, [mv[off:off + _BLOCK]], off)
                if n <= 0:
                    raise OSError(f"short read of {path} at {off}")
                off += n
        finally:
            os.close(fd)
            mv.release()
            mm.close()


def _fill(path: str, size: int, threads: int, direct: bool = False) -> None:
    for m in memfd.restore([memfd.Segment(path, 0, size, name="bench")], threads, direct=direct):
        m.close()


def run(dir: Optional[str] = None, size_mb: int = 1024, threads: Optional[str | Sequence[int]] = None,
        cold: bool = True, repeats: int = 3, progress: Optional[Callable[[str], Any]] = None) -> dict:
    """Measure and return a JSON-able dict: date, machine, config, rows, limits, notes. Files are removed."""
    say = progress or (lambda msg: None)
    dir = os.path.abspath(dir or os.getcwd())
    size = size_mb << 20
    counts = thread_counts(threads)
    notes: list[str] = []
    rows: list[dict] = []
    work = tempfile.mkdtemp(prefix="dynsnap-bench-memfd-", dir=dir)
    path = os.path.join(work, "image")
    can_drop = cold and os.geteuid() == 0 and drop_caches()
    if cold and not can_drop:
        notes.append("cold rows skipped: drop_caches needs root")

    def add(mode: str, tool: str, t: int, m: dict, note: str = "") -> None:
        rows.append({"mode": mode, "tool": tool, "threads": t, **m, "note": note})
        say(f"{mode:10} {tool:30} threads {t:2}: {m['gbps']:.2f} GB/s")

    try:
        say(f"writing a {size_mb} MiB image in {work}")
        chunk = os.urandom(min(64 << 20, size) or 1)
        with open(path, "wb") as f:
            left = size
            while left > 0:
                f.write(chunk[:min(left, len(chunk))])
                left -= min(left, len(chunk))
            f.flush()
            os.fsync(f.fileno())
        # memcpy limit: populated source and destination mappings
        src = memfd.create(size, "bench-src")
        dst = memfd.create(size, "bench-dst")
        try:
            sv, dv = src.view(), dst.view()
            memfd.copy(dv, sv, max(counts))         # populate both
            memfd.copy(sv, dv, max(counts))
            for t in counts:
                add("memory", "memcpy (populated)", t, _measure(lambda: memfd.copy(dv, sv, t), size, repeats, False))
            sv.release()
            dv.release()
        finally:
            src.close()
            dst.close()
        memcpy_best = max(r["gbps"] for r in rows)
        # page cache
        with open(path, "rb") as f:
            while f.read(64 << 20):
                pass
        base = _measure(lambda: _pread_loop(path, size), size, repeats, False)
        add("page cache", "pread loop, 1 thread (baseline)", 1, base)
        for t in counts:
            add("page cache", "dynsnap parallel fill", t, _measure(lambda: _fill(path, size, t), size, repeats, False))
        if can_drop:
            cbase = _measure(lambda: _pread_loop(path, size), size, 1, True)
            add("cold", "pread loop, 1 thread (baseline)", 1, cbase)
            for t in counts:
                add("cold", "dynsnap parallel fill", t, _measure(lambda: _fill(path, size, t), size, 1, True))
                add("cold", "dynsnap parallel fill O_DIRECT", t,
                    _measure(lambda: _fill(path, size, t, direct=True), size, 1, True))
    finally:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        os.rmdir(work)
    baselines = {r["mode"]: r["gbps"] for r in rows if r["tool"].startswith("pread loop")}
    memcpy = {r["threads"]: r["gbps"] for r in rows if r["mode"] == "memory"}
    for r in rows:
        b = baselines.get(r["mode"])
        r["vs_baseline"] = round(r["gbps"] / b, 2) if b and r["mode"] != "memory" else None
        mc = memcpy_best
        r["vs_memcpy"] = round(r["gbps"] / mc, 2) if mc and r["mode"] != "memory" else None
        r["vs_memcpy_same_threads"] = (round(r["gbps"] / memcpy[r["threads"]], 2)
                                       if r["mode"] != "memory" and memcpy.get(r["threads"]) else None)
    notes.append("fill = memfd_create + ftruncate + MADV_POPULATE_WRITE + pread into a shared mapping + inline "
                 "chunk digests, into a fresh memfd each run (page allocation included); baseline = one thread, "
                 "1 MiB preads into a fresh memfd mapping, no checksum; memcpy between two populated mappings")
    return {
        "date": _dt.date.today().isoformat(), "machine": _machine(dir),
        "config": {"size_mb": size_mb, "threads": counts, "repeats": repeats, "cold": bool(can_drop),
                   "block_kb": _BLOCK >> 10, "chunk_mb": memfd.HASH_CHUNK >> 20},
        "rows": rows, "limits": {"memcpy_best_gbps": memcpy_best, "memcpy_gbps_by_threads": memcpy},
        "notes": notes,
    }


def format_table(result: dict) -> str:
    """A Markdown table of a run() result, with its machine and configuration."""
    m, c = result["machine"], result["config"]
    lines = [f"{result['date']}: {m['cpu_count']} CPUs ({m['cpu_model']}), Linux {m['kernel']}, "
             f"{m['mem_bytes'] / 2**30:.0f} GiB, shmem THP {m['thp_shmem']}; {c['size_mb']} MiB image at {m['dir']}, "
             f"best of {c['repeats']} (cold: 1 run each)",
             "",
             "| source | tool | threads | GB/s | vs baseline | vs best memcpy | vs memcpy same threads | CPU s/GB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['mode']} | {r['tool']} | {r['threads']} | {r['gbps']:.2f} | {fmt_opt(r['vs_baseline'])} | "
                     f"{fmt_opt(r['vs_memcpy'])} | {fmt_opt(r['vs_memcpy_same_threads'])} | {r['cpu_s_per_gb']:.2f} |")
    lines += [f"- {n}" for n in result["notes"]]
    return "\n".join(lines)
