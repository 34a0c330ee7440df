"""I/O engine benchmark: our engines against fio (device limit), cp and shutil, on one file system in one run."""
from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import tempfile
import time
from typing import Any, Callable, Iterable, Optional

from dynsnap_core import config, io
from dynsnap_core.bench.util import cpu_time, drop_caches, fmt_opt, md_table
from dynsnap_core.durable import fsync_path

__all__ = ["run", "sweep", "format_table", "find_fio"]

_CHUNK = 64 << 20
#: block sizes (KiB) and queue depths of the sweep table
SWEEP_BLOCK_KB = (1024, 4096, 8192, 16384)
SWEEP_QD = (4, 8, 16, 32)


def find_fio() -> Optional[str]:
    """fio to measure the device limit with: $DYNSNAP_FIO (e.g. the GPU bundle's static build), else PATH."""
    env = config.get("fio")
    if env and os.access(env, os.X_OK):
        return env
    return shutil.which("fio")


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
    return cpu_time(children=True)   # fio, dd and cp run as children


def _drop_caches(cold: bool) -> bool:
    return drop_caches() if cold else False


def _timed(fn: Callable[[], Any], nbytes: int, cold: bool) -> dict:
    dropped = _drop_caches(cold)
    c0, t0 = _cpu(), time.perf_counter()
    fn()
    t1, c1 = time.perf_counter(), _cpu()
    secs = t1 - t0
    gb = nbytes / 1e9
    return {"seconds": round(secs, 4), "gbps": round(gb / secs, 3) if secs > 0 else 0.0,
            "cpu_s_per_gb": round((c1 - c0) / gb, 3) if gb else 0.0, "cold": dropped}


def _fio(fio: str, path: str, rw: str, size_mb: int, block_kb: int, qd: int, engine: str = "libaio") -> dict:
    return _fio_jobs(fio, [(rw, path)], size_mb, block_kb, qd, engine)


def _fio_copy(fio: str, src: str, dst: str, size_mb: int, block_kb: int, qd: int, engine: str) -> dict:
    """fio reading src while it writes dst (two jobs at once, O_DIRECT): the device's limit for a copy whose
    reads and writes overlap. A copy of N bytes moves N each way, so its limit is the slower of the two."""
    return _fio_jobs(fio, [("read", src), ("write", dst)], size_mb, block_kb, qd, engine)


def _fio_jobs(fio: str, jobs: list[tuple[str, str]], size_mb: int, block_kb: int, qd: int, engine: str) -> dict:
    """One fio run of O_DIRECT jobs ``(read|write, path)`` at once, same pattern each; the row of the slowest."""
    cmd = [fio, "--output-format=json", f"--bs={block_kb}k", f"--iodepth={qd}", f"--ioengine={engine}",
           "--direct=1", f"--size={size_mb}M"]
    for rw, path in jobs:
        cmd += [f"--name={rw}", f"--filename={path}", f"--rw={rw}",
                "--end_fsync=1" if rw == "write" else "--invalidate=1"]
    c0 = _cpu()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    cpu = _cpu() - c0
    if r.returncode:
        raise RuntimeError(f"fio failed: {r.stderr.strip()[-300:]}")
    out = json.loads(r.stdout[r.stdout.index("{"):])["jobs"]
    gbps = min(j[rw]["bw_bytes"] for j, (rw, _) in zip(out, jobs)) / 1e9
    nbytes = size_mb << 20
    return {"seconds": round(nbytes / 1e9 / gbps, 4) if gbps else 0.0, "gbps": round(gbps, 3),
            "cpu_s_per_gb": round(cpu / (nbytes / 1e9), 3)}


def _dd(path: str, rw: str, size_mb: int, cold: bool) -> dict:
    """dd with 16 MiB O_DIRECT blocks (conv=fsync on write): the second physical-limit reference."""
    bs_mb = 16
    count = max(1, size_mb // bs_mb)
    if rw == "write":
        cmd = ["dd", "if=/dev/zero", f"of={path}", f"bs={bs_mb}M", f"count={count}", "oflag=direct",
               "conv=fsync", "status=none"]
    else:
        cmd = ["dd", f"if={path}", "of=/dev/null", f"bs={bs_mb}M", "iflag=direct", "status=none"]
    m = _timed(lambda: subprocess.run(cmd, check=True, capture_output=True, timeout=900), count * (bs_mb << 20),
               cold)
    return m


def sweep(dir: str, size_mb: int = 1024, block_kb: Iterable[int] = SWEEP_BLOCK_KB,
          qds: Iterable[int] = SWEEP_QD, engine: str = "io_uring", cold: bool = True,
          progress: Optional[Callable[[str], Any]] = None) -> dict:
    """GB/s of write_buffers (O_DIRECT) and hash_file (O_DIRECT) for every block size x queue depth."""
    say = progress or (lambda msg: None)
    if engine not in io.available_engines():
        engine = io.available_engines()[0]
    nbytes = size_mb << 20
    chunk = os.urandom(min(_CHUNK, nbytes) or 1)
    bufs = [memoryview(chunk)[:min(len(chunk), nbytes - o)] for o in range(0, nbytes, len(chunk))]
    work = tempfile.mkdtemp(prefix="dynsnap-bench-sweep-", dir=dir)
    cells: list[dict] = []
    try:
        path = os.path.join(work, "f")
        for bk in block_kb:
            for qd in qds:
                say(f"sweep {bk} KiB x QD {qd}")
                w = _timed(lambda: io.write_buffers(path, bufs, engine=engine, block_size=bk << 10,
                                                    queue_depth=qd), nbytes, cold)
                r = _timed(lambda: io.hash_file(path, engine=engine, block_size=bk << 10, queue_depth=qd),
                           nbytes, cold)
                cells.append({"block_kb": bk, "qd": qd, "write_gbps": w["gbps"], "read_gbps": r["gbps"],
                              "write_cpu_s_per_gb": w["cpu_s_per_gb"], "read_cpu_s_per_gb": r["cpu_s_per_gb"]})
                os.unlink(path)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"engine": engine, "size_mb": size_mb, "cells": cells}


def run(dir: str, size_mb: int = 1024, block_kb: Optional[int] = None, qd: Optional[int] = None,
        engines: Optional[Iterable[str]] = None, cold: bool = True,
        progress: Optional[Callable[[str], Any]] = None, sweep_mb: Optional[int] = None,
        do_sweep: Optional[bool] = None) -> dict:
    """Measure sequential write, read and copy of one ``size_mb`` file in ``dir``.

    Rows: each of our engines (write_buffers, hash_file with O_DIRECT, copy_tree with O_DIRECT),
    fio (libaio and io_uring, O_DIRECT, same block size and queue depth: the device limit), dd with
    16 MiB O_DIRECT blocks (a second limit), ``cp`` and ``shutil.copyfile`` (both followed by fsync),
    plain Python write/read. Caches are dropped before each measurement when ``cold`` and root.
    Block size and queue depth default to the engine's defaults. With ``do_sweep`` (default:
    $DYNSNAP_IO_SWEEP=1) a block size x queue depth table of ``sweep_mb`` (default: $DYNSNAP_IO_SWEEP_MB,
    else min(size_mb, 1024)) is added under "sweep". Returns a JSON-able dict; files are removed.
    """
    say = progress or (lambda msg: None)
    block_kb = block_kb or io.DEFAULT_BLOCK_SIZE >> 10
    qd = qd or io.DEFAULT_QUEUE_DEPTH
    if do_sweep is None:
        do_sweep = (config.get("io_sweep") or "") not in ("", "0")
    if sweep_mb is None:
        sweep_mb = int(config.get("io_sweep_mb") or min(size_mb, 1024))
    engines = [e for e in (engines or io.available_engines()) if e in io.available_engines()]
    nbytes = size_mb << 20
    bs = block_kb << 10
    work = tempfile.mkdtemp(prefix="dynsnap-bench-io-", dir=dir)
    notes: list[str] = []
    rows: list[dict] = []
    can_drop = cold and _drop_caches(True)
    if cold and not can_drop:
        notes.append("cache not dropped (needs root): read figures may come from the page cache")
    fio = find_fio()
    if not fio:
        notes.append("fio not found ($DYNSNAP_FIO or PATH): no fio device-limit rows")
    fio_engines = ("libaio", "io_uring")

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
                _timed(lambda: io.write_buffers(path, bufs, engine=eng, block_size=bs, queue_depth=qd), nbytes, cold),
                "O_DIRECT + xxh3 + fdatasync")
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
        for fe in fio_engines if fio else ():
            say(f"write fio {fe}")
            add("write", "fio", fe, _fio(fio, os.path.join(work, "fio"), "write", size_mb, block_kb, qd, fe),
                "O_DIRECT, device limit")
            _drop_caches(cold)
        if shutil.which("dd"):
            say("write dd")
            add("write", "dd", "", _dd(os.path.join(work, "dd"), "write", size_mb, cold),
                "16 MiB O_DIRECT + fsync, limit")
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
        for fe in fio_engines if fio else ():
            say(f"read fio {fe}")
            _drop_caches(cold)
            add("read", "fio", fe, _fio(fio, os.path.join(work, "fio"), "read", size_mb, block_kb, qd, fe),
                "O_DIRECT, device limit")
        if fio:
            os.unlink(os.path.join(work, "fio"))
        if os.path.exists(os.path.join(work, "dd")):
            say("read dd")
            add("read", "dd", "", _dd(os.path.join(work, "dd"), "read", size_mb, cold), "16 MiB O_DIRECT, limit")
            os.unlink(os.path.join(work, "dd"))
        # ---- copy
        for eng in engines:
            say(f"copy {eng}")
            dst = os.path.join(work, f"c-{eng}")
            add("copy", "dynsnap copy_tree", eng,
                _timed(lambda: io.copy_tree(src_dir, dst, engine=eng, block_size=bs, queue_depth=qd),
                       nbytes, cold), "O_DIRECT + xxh3 + fsync")
            shutil.rmtree(dst)
        if engines:
            eng = engines[0]
            say(f"copy {eng} buffered")
            dst = os.path.join(work, f"c-{eng}-buf")
            add("copy", "dynsnap copy_tree", eng,
                _timed(lambda: io.copy_tree(src_dir, dst, engine=eng, direct=False, block_size=bs,
                                            queue_depth=qd), nbytes, cold), "buffered + xxh3 + fsync")
            shutil.rmtree(dst)
        say("copy cp")
        dst = os.path.join(work, "c-cp")
        add("copy", "cp", "", _timed(lambda: (subprocess.run(["cp", src, dst], check=True), fsync_path(dst)),
                                     nbytes, cold), "+ fsync")
        os.unlink(dst)
        say("copy shutil")
        add("copy", "shutil.copyfile", "", _timed(lambda: (shutil.copyfile(src, dst), fsync_path(dst)),
                                                  nbytes, cold), "baseline, + fsync")
        os.unlink(dst)
        for fe in fio_engines if fio else ():
            say(f"copy fio {fe}")
            _drop_caches(cold)
            add("copy", "fio read || write", fe, _fio_copy(fio, src, os.path.join(work, "fio-copy"), size_mb,
                                                          block_kb, qd, fe), "O_DIRECT, concurrent, device limit")
            os.unlink(os.path.join(work, "fio-copy"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    sweep_res = sweep(dir, sweep_mb, cold=cold, progress=say) if do_sweep and engines else None
    # ratios: to the best fio of the same op (copy: overlapped or back to back, the faster), to the baseline
    fio_of: dict[str, float] = {}
    for r in rows:
        if r["tool"].startswith("fio"):
            fio_of[r["op"]] = max(fio_of.get(r["op"], 0.0), r["gbps"])
    serial = None
    if "read" in fio_of and "write" in fio_of and fio_of["read"] and fio_of["write"]:
        serial = 1 / (1 / fio_of["read"] + 1 / fio_of["write"])
        fio_of["copy"] = max(fio_of.get("copy", 0.0), serial)   # the better of overlapped and back to back
    base_of = {r["op"]: r["gbps"] for r in rows if "baseline" in r["note"]}
    for r in rows:
        r["ratio_fio"] = round(r["gbps"] / fio_of[r["op"]], 3) if fio_of.get(r["op"]) else None
        r["ratio_baseline"] = round(r["gbps"] / base_of[r["op"]], 3) if base_of.get(r["op"]) else None
    if "copy" in fio_of:
        notes.append(f"copy vs fio is against the faster of fio reading while writing (the overlapped limit) and "
                     f"fio read then write back to back ({serial or 0:.3f} GB/s, the serial limit): "
                     f"{fio_of['copy']:.3f} GB/s")
    if fio:
        notes.append(f"fio: {fio}; vs fio = against the faster fio engine of the same op")
    return {
        "date": time.strftime("%Y-%m-%d"),
        "machine": {"cpu_count": os.cpu_count(), "kernel": platform.release(), "fs_type": _fs_type(dir),
                    "dir": os.path.abspath(dir), "python": platform.python_version()},
        "config": {"size_mb": size_mb, "block_kb": block_kb, "queue_depth": qd, "cold": can_drop,
                   "engines": engines},
        "rows": rows,
        "notes": notes,
        "sweep": sweep_res,
    }


def format_table(result: dict) -> str:
    """A Markdown table of a run() result, with its machine and configuration."""
    m, c = result["machine"], result["config"]
    lines = [f"{result['date']}: {m['cpu_count']} CPUs, Linux {m['kernel']}, {m['fs_type']} at {m['dir']}; "
             f"{c['size_mb']} MiB, {c['block_kb']} KiB blocks, QD {c['queue_depth']}, "
             f"{'cold cache' if c['cold'] else 'warm cache'}",
             ""]
    lines += md_table(("op", "tool", "engine", "GB/s", "vs fio", "vs baseline", "CPU s/GB", "note"),
                      ((r["op"], r["tool"], r["engine"], f"{r['gbps']:.2f}", fmt_opt(r["ratio_fio"]),
                        fmt_opt(r["ratio_baseline"]), f"{r['cpu_s_per_gb']:.2f}", r["note"]) for r in result["rows"]))
    lines += [f"- {n}" for n in result["notes"]]
    sw = result.get("sweep")
    if sw:
        qds = sorted({c["qd"] for c in sw["cells"]})
        lines += ["", f"sweep ({sw['engine']}, {sw['size_mb']} MiB, O_DIRECT, cold): GB/s write / read "
                  "(write_buffers / hash_file)", ""]
        rows = []
        for bk in sorted({c["block_kb"] for c in sw["cells"]}):
            cell = {c["qd"]: c for c in sw["cells"] if c["block_kb"] == bk}
            rows.append([f"{bk // 1024} MiB"] + [f"{cell[q]['write_gbps']:.2f} / {cell[q]['read_gbps']:.2f}"
                                                 if q in cell else "" for q in qds])
        lines += md_table(["block \\ QD"] + [str(q) for q in qds], rows)
    return "\n".join(lines)
