"""memfd restore benchmark: parallel fill vs a single-threaded pread loop (what CRIU does) vs memcpy bandwidth.

One run measures, for 1, 2, 4, 8, 16 threads where the cores allow: the parallel fill of a fresh
memfd from a file in the page cache (4 KiB pages; THP when the kernel allows shmem THP; hugetlb when
``vm.nr_hugepages`` has enough free pages; else the row is listed as skipped with the command that
enables it) and from cold storage (after drop_caches, root only), the single-threaded ``pread`` loop
into a fresh memfd mapping (the baseline), the same preads into an already populated memfd (copy
only: separates page allocation from copying), and the machine's multi-thread memcpy bandwidth
between two populated mappings (the physical limit) and into fresh memory (faults + copy). Issue
#4's targets (>= 80% of the best memcpy, >= 3x the baseline) are checked against the best fill.
GB/s = 10**9 B/s.
Self-contained: ``python3 -m dynsnap_core.cli bench memfd --json``.
"""
from __future__ import annotations

import ctypes
import datetime as _dt
import errno
import itertools
import mmap
import os
import platform
import statistics
import tempfile
import threading
import time
from typing import Any, Callable, Optional, Sequence

from dynsnap_core import memfd
from dynsnap_core.bench.util import cpu_time, drop_caches, fmt_opt

__all__ = ["run", "format_table", "thread_counts"]

_BLOCK = 1 << 20
_UNIT = 8 << 20       # the engine's work unit (copy-only rows use it too)
_HPAGE = 2 << 20


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
    h = memfd.hugetlb_pages()
    mem = 0
    for line in _read("/proc/meminfo").splitlines():
        if line.startswith("MemTotal:"):
            mem = int(line.split()[1]) << 10
    return {"cpu_count": os.cpu_count(), "cpu_model": model, "kernel": platform.release(),
            "host": platform.node(), "mem_bytes": mem, "dir": dir,
            "thp_shmem": _read(f"{memfd.THP_DIR}/shmem_enabled", "?"),
            "thp_shmem_pmd": _read(f"{memfd.THP_DIR}/hugepages-2048kB/shmem_enabled", "?"),
            "hugetlb": f"{h['available']} of {h['total']} {h['page_size'] >> 10} kB pages free"}


def _measure(fn: Callable[[], Any], nbytes: int, repeats: int, cold: bool) -> dict:
    """Best-of and median of ``repeats`` runs; caches dropped before each run when ``cold``."""
    secs, cpus = [], []
    for _ in range(repeats):
        if cold:
            drop_caches()
        sec, cpu = _timed(fn)
        secs.append(sec)
        cpus.append(cpu)
    best = min(secs)
    gb = nbytes / 1e9
    return {"gbps": round(gb / best, 3) if best > 0 else 0.0, "gbps_median": round(gb / statistics.median(secs), 3),
            "seconds": round(best, 4), "cpu_s_per_gb": round(statistics.median(cpus) / gb, 3) if gb else 0.0,
            "runs": repeats}


def _timed(fn: Callable[[], Any]) -> tuple[float, float]:
    """Wall and CPU seconds of ``fn()``; a callable it returns (freeing what it made) runs after the clock stops."""
    c0, t0 = cpu_time(), time.perf_counter()
    done = fn()
    sec, cpu = time.perf_counter() - t0, cpu_time() - c0
    if callable(done):
        done()
    return sec, cpu


def _pread_loop(path: str, size: int) -> Callable[[], None]:
    """The baseline: one thread, 1 MiB preads straight into a fresh memfd mapping."""
    m = memfd.create(size, "bench-baseline")
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

    def free() -> None:
        mv.release()
        mm.close()
        m.close()
    return free


def _fill(path: str, size: int, threads: int, direct: bool = False, thp: bool = False,
          hugetlb: bool = False) -> Callable[[], None]:
    got = memfd.restore([memfd.Segment(path, 0, size, name="bench")], threads, direct=direct, thp=thp,
                        hugetlb=hugetlb)
    return lambda: [m.close() for m in got]


def _fill_kind(path: str, size: int, threads: int, **kw: Any) -> str:
    """The page kind a fill really got (one untimed fill, then /proc/self/smaps)."""
    got = memfd.restore([memfd.Segment(path, 0, size, name="bench")], threads, **kw)
    try:
        return got[0].page_kind()
    finally:
        for m in got:
            m.close()


_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_MADV_HUGEPAGE = getattr(mmap, "MADV_HUGEPAGE", 14)


def _aligned_map(size: int, thp: bool, name: str) -> tuple[memoryview, Callable[[], None]]:
    """A new memfd mapped writable at a 2 MiB boundary (like the fill's mapping), MADV_HUGEPAGE with ``thp``;
    returns its view and the function that frees it."""
    m = memfd.create(size, name)
    base = memfd.reserve(size + _HPAGE)
    at = (base + _HPAGE - 1) // _HPAGE * _HPAGE
    memfd.attach(m.fd, at, size, writable=True)
    if thp and _libc.madvise(at, size, _MADV_HUGEPAGE) != 0:
        e = ctypes.get_errno()
        if e != errno.EINVAL:
            memfd.release(base, size + _HPAGE)
            m.close()
            raise OSError(e, f"madvise(MADV_HUGEPAGE): {os.strerror(e)}")
    v = memfd.view_at(at, size)

    def free() -> None:
        v.release()
        memfd.release(base, size + _HPAGE)
        m.close()
    return v, free


def _fresh_copy(src: memoryview, size: int, threads: int, thp: bool) -> Callable[[], None]:
    """memcpy with ``threads`` threads into a fresh memfd mapped at a 2 MiB boundary (the fill's mapping),
    MADV_HUGEPAGE with ``thp``: page allocation + zeroing + copy, no file."""
    dv, free = _aligned_map(size, thp, "bench-fresh")
    memfd.copy(dv, src, threads)
    return free


def _pread_into(path: str, dst: memoryview, size: int, threads: int) -> None:
    """Copy only: ``threads`` Python threads (GIL released in each pread) read the file in 8 MiB units of
    1 MiB preads into an already populated mapping: no page allocation, so it isolates the copy."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    units = itertools.count()
    errors: list[BaseException] = []

    def work() -> None:
        try:
            while True:
                u = next(units) * _UNIT
                if u >= size:
                    return
                end = min(u + _UNIT, size)
                off = u
                while off < end:
                    n = os.preadv(fd, [dst[off:min(off + _BLOCK, end)]], off)
                    if n <= 0:
                        raise OSError(f"short read of {path} at {off}")
                    off += n
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller
            errors.append(e)

    try:
        if threads <= 1:
            work()
        else:
            ts = [threading.Thread(target=work) for _ in range(threads)]
            for th in ts:
                th.start()
            for th in ts:
                th.join()
    finally:
        os.close(fd)
    if errors:
        raise errors[0]


def run(dir: Optional[str] = None, size_mb: int = 1024, threads: Optional[str | Sequence[int]] = None,
        cold: bool = True, repeats: int = 3, progress: Optional[Callable[[str], Any]] = None) -> dict:
    """Measure and return a JSON-able dict: date, machine, config, rows, limits, targets, skipped, notes.
    Files are removed."""
    say = progress or (lambda msg: None)
    dir = os.path.abspath(dir or os.getcwd())
    size = size_mb << 20
    counts = thread_counts(threads)
    notes: list[str] = []
    rows: list[dict] = []
    skipped: list[dict] = []
    work = tempfile.mkdtemp(prefix="dynsnap-bench-memfd-", dir=dir)
    path = os.path.join(work, "image")
    can_drop = cold and os.geteuid() == 0 and drop_caches()
    if cold and not can_drop:
        notes.append("cold rows skipped: drop_caches needs root")
    thp = memfd.shmem_thp()
    huge = memfd.hugetlb_pages()

    def add(mode: str, tool: str, t: int, m: dict, note: str = "", pages: str = "4k",
            pages_seen: Optional[str] = None) -> None:
        rows.append({"mode": mode, "tool": tool, "threads": t, **m, "note": note, "pages": pages,
                     "pages_seen": pages_seen})
        say(f"{mode:10} {tool:44} threads {t:2}: {m['gbps']:.2f} GB/s")

    def skip(mode: str, tool: str, reason: str, fix: str) -> None:
        skipped.append({"mode": mode, "tool": tool, "reason": reason, "fix": fix, "row": len(rows)})
        say(f"{mode:10} {tool:44} skipped: {reason}")

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
        # memcpy limits: populated source and destination mappings; fresh destination memory
        src = memfd.create(size, "bench-src")
        dst = memfd.create(size, "bench-dst")
        sv = dv = None
        try:
            sv, dv = src.view(), dst.view()
            memfd.copy(dv, sv, max(counts))         # populate both
            memfd.copy(sv, dv, max(counts))
            for t in counts:
                add("memory", "memcpy (populated)", t, _measure(lambda: memfd.copy(dv, sv, t), size, repeats, False))
            if thp["allowed"]:   # the same copy between huge-page mappings: no TLB misses to speak of
                hs, free_s = _aligned_map(size, True, "bench-src-thp")
                hd, free_d = _aligned_map(size, True, "bench-dst-thp")
                try:
                    memfd.copy(hd, sv, max(counts))
                    memfd.copy(hs, hd, max(counts))
                    for t in counts:
                        add("memory", "memcpy (populated, THP)", t,
                            _measure(lambda: memfd.copy(hd, hs, t), size, repeats, False), pages="thp")
                finally:
                    free_s()
                    free_d()
            for t in counts:
                add("memory", "memcpy into fresh memory (faults + copy)", t,
                    _measure(lambda: _fresh_copy(sv, size, t, False), size, repeats, False))
            if thp["allowed"]:
                for t in counts:
                    add("memory", "memcpy into fresh THP memory (faults + copy)", t,
                        _measure(lambda: _fresh_copy(sv, size, t, True), size, repeats, False), pages="thp")
            sv.release()
            sv = None
            src.close()
            # page cache
            with open(path, "rb") as f:
                while f.read(64 << 20):
                    pass
            base = _measure(lambda: _pread_loop(path, size), size, repeats, False)
            add("page cache", "pread loop, 1 thread (baseline)", 1, base)
            for t in counts:
                add("page cache", "dynsnap parallel fill", t,
                    _measure(lambda: _fill(path, size, t), size, repeats, False))
            tool = "dynsnap parallel fill, THP memfd"
            if thp["allowed"]:
                seen = _fill_kind(path, size, max(counts), thp=True)
                for t in counts:
                    add("page cache", tool, t, _measure(lambda: _fill(path, size, t, thp=True), size, repeats, False),
                        pages="thp", pages_seen=seen)
            else:
                skip("page cache", tool, f"shmem THP '{thp['shmem_enabled']}' (hugepages-{thp['pmd_kb']}kB: "
                     f"'{thp['pmd_shmem_enabled']}'): memfds get 4 KiB pages only",
                     f"echo advise > {memfd.THP_DIR}/shmem_enabled")
            tool = "dynsnap parallel fill, hugetlb memfd"
            need = -(-size // huge["page_size"])
            if huge["available"] >= need:
                for t in counts:
                    add("page cache", tool, t,
                        _measure(lambda: _fill(path, size, t, hugetlb=True), size, repeats, False), pages="hugetlb",
                        pages_seen="hugetlb")
            else:
                skip("page cache", tool, f"{huge['available']} free hugetlb pages of {huge['page_size'] >> 10} kB, "
                     f"{need} needed for {size_mb} MiB (HugePages_Total {huge['total']})",
                     f"sysctl -w vm.nr_hugepages={huge['total'] + need - huge['available']}")
            for t in counts:
                add("page cache", "copy only: pread into a populated memfd", t,
                    _measure(lambda: _pread_into(path, dv, size, t), size, repeats, False))
        finally:
            for v in (sv, dv):
                if v is not None:
                    v.release()
            src.close()
            dst.close()
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
    populated = [r for r in rows if r["tool"] == "memcpy (populated)"]
    memcpy_best = max(r["gbps"] for r in populated)
    memcpy = {r["threads"]: r["gbps"] for r in populated}
    memcpy_thp = {r["threads"]: r["gbps"] for r in rows if r["tool"] == "memcpy (populated, THP)"}
    machine_best = max([memcpy_best, *memcpy_thp.values()])
    fresh = {r["threads"]: r["gbps"] for r in rows if r["tool"] == "memcpy into fresh memory (faults + copy)"}
    fresh_thp = {r["threads"]: r["gbps"] for r in rows if r["tool"] == "memcpy into fresh THP memory (faults + copy)"}
    baselines = {r["mode"]: r["gbps"] for r in rows if r["tool"].startswith("pread loop")}
    for r in rows:
        b = baselines.get(r["mode"])
        own = r["tool"].startswith("memcpy (populated")
        r["vs_baseline"] = round(r["gbps"] / b, 2) if b and r["mode"] != "memory" else None
        r["vs_memcpy"] = round(r["gbps"] / memcpy_best, 2) if memcpy_best and not own else None
        r["vs_memcpy_same_threads"] = (round(r["gbps"] / memcpy[r["threads"]], 2)
                                       if not own and memcpy.get(r["threads"]) else None)
        f = (fresh_thp if r["pages"] in ("thp", "hugetlb") and fresh_thp else fresh).get(r["threads"])
        r["vs_fresh_memcpy_same_threads"] = (round(r["gbps"] / f, 2) if f and r["mode"] != "memory" else None)
    fills = [r for r in rows if r["mode"] == "page cache" and r["tool"].startswith("dynsnap parallel fill")]
    best = max(fills, key=lambda r: r["gbps"]) if fills else None
    pb = baselines.get("page cache")
    targets = {"memcpy_fraction": 0.8, "memcpy_best_gbps": machine_best, "memcpy_gbps": round(0.8 * machine_best, 3),
               "baseline_factor": 3.0,
               "baseline_gbps": round(3 * pb, 3) if pb else None,
               "best_fill": ({**{k: best[k] for k in ("tool", "threads", "gbps", "vs_memcpy", "vs_baseline")},
                              "vs_best_memcpy": round(best["gbps"] / machine_best, 2) if machine_best else None}
                             if best else None)}
    targets["met"] = bool(best and best["gbps"] >= targets["memcpy_gbps"]
                          and targets["baseline_gbps"] is not None and best["gbps"] >= targets["baseline_gbps"])
    notes.append("fill = memfd_create + ftruncate + pread into a shared mapping (MADV_POPULATE_WRITE first for "
                 "4 KiB pages) + inline chunk digests, into a fresh memfd each run (page allocation included; 'dynsnap parallel fill' "
                 "forces 4 KiB pages with thp=False, the THP row maps 2 MiB-aligned with MADV_HUGEPAGE); baseline = "
                 "one thread, 1 MiB preads into a fresh memfd mapping, no checksum; memcpy (populated) between two "
                 "populated 4 KiB-page mappings ('populated, THP': between 2 MiB-page mappings; the target uses the "
                 "best of both, the 'vs ... memcpy' columns the 4 KiB one); fresh memcpy = threads copy into a new "
                 "memfd (page allocation + zeroing + copy); "
                 "copy only = Python threads, 8 MiB units of 1 MiB preads into a populated memfd (no allocation, no "
                 "checksum). Freeing each run's memory (munmap, close) happens after the clock stops")
    return {
        "date": _dt.date.today().isoformat(), "machine": _machine(dir),
        "config": {"size_mb": size_mb, "threads": counts, "repeats": repeats, "cold": bool(can_drop),
                   "block_kb": _BLOCK >> 10, "chunk_mb": memfd.HASH_CHUNK >> 20},
        "rows": rows,
        "limits": {"memcpy_best_gbps": memcpy_best, "memcpy_gbps_by_threads": memcpy,
                   "memcpy_thp_gbps_by_threads": memcpy_thp,
                   "memcpy_fresh_gbps_by_threads": fresh, "memcpy_fresh_thp_gbps_by_threads": fresh_thp},
        "targets": targets, "skipped": skipped, "notes": notes,
    }


def _pct(v: Optional[float]) -> str:
    return "" if v is None else f"{100 * v:.0f}%"


def _x(v: Optional[float]) -> str:
    return "" if v is None else f"{v:.2f}x"


def format_table(result: dict) -> str:
    """A Markdown table of a run() result, with its machine, configuration, the issue's targets and what was skipped."""
    m, c = result["machine"], result["config"]
    pmd = "" if m.get("thp_shmem_pmd") in (None, "?") else f" (2 MiB: {m['thp_shmem_pmd']})"
    huge = "" if m.get("hugetlb") is None else f", hugetlb {m['hugetlb']}"
    lines = [f"{result['date']}: {m['cpu_count']} CPUs ({m['cpu_model']}), Linux {m['kernel']}, "
             f"{m['mem_bytes'] / 2**30:.0f} GiB, shmem THP {m['thp_shmem']}{pmd}{huge}; "
             f"{c['size_mb']} MiB image at {m['dir']}, best of {c['repeats']} (cold: 1 run each)"]
    tg = result.get("targets")
    if tg:
        best = tg.get("best_fill")
        lines.append(f"target (issue #4): >= {tg['memcpy_gbps']:.2f} GB/s (80% of the best memcpy, "
                     f"{tg.get('memcpy_best_gbps') or tg['memcpy_gbps'] / 0.8:.2f} GB/s) and "
                     f">= {fmt_opt(tg['baseline_gbps'])} GB/s (3x the 1-thread pread loop); best fill: "
                     + (f"{best['tool']}, {best['threads']} threads, {best['gbps']:.2f} GB/s = "
                        f"{_pct(best.get('vs_best_memcpy', best['vs_memcpy']))} of the best memcpy, "
                        f"{_x(best['vs_baseline'])} baseline -> {'MET' if tg['met'] else 'not met'}"
                        if best else "none"))
    header = ("| source | tool | pages | threads | GB/s | vs baseline | vs best memcpy | vs memcpy same threads | "
              "vs fresh memcpy same threads | CPU s/GB |")
    lines += ["", header, "|---|---|---|---|---|---|---|---|---|---|"]
    skips = {}
    for s in result.get("skipped", []):
        skips.setdefault(s.get("row", len(result["rows"])), []).append(
            f"| {s['mode']} | {s['tool']} | | | skipped: {s['reason']}; to run it: `{s['fix']}` | | | | | |")
    for i, r in enumerate(result["rows"]):
        lines += skips.pop(i, [])
        pages = r.get("pages", "4k")
        if r.get("pages_seen") and r["pages_seen"] != pages:
            pages += f" (got {r['pages_seen']})"
        lines.append(f"| {r['mode']} | {r['tool']} | {pages} | {r['threads']} | {r['gbps']:.2f} | "
                     f"{_x(r['vs_baseline'])} | {_pct(r['vs_memcpy'])} | {_pct(r['vs_memcpy_same_threads'])} | "
                     f"{_pct(r.get('vs_fresh_memcpy_same_threads'))} | {r['cpu_s_per_gb']:.2f} |")
    for left in skips.values():
        lines += left
    lines += [f"- {n}" for n in result["notes"]]
    return "\n".join(lines)
