"""dynsnap bench restore: time from restore to first correct answer, our paths against plain CRIU, cold and warm.

One run: a demo worker with N MiB of state is snapshotted once; then, with the page cache dropped (cold) or
holding the images (warm), or with only the images evicted (cold-images), it is restored by dynsnap (its default:
lazy where userfaultfd works, checksums verified in parallel with CRIU; eager; eager with THP; eager with the
images copied and checked into tmpfs first; the `dynsnap restore` command itself, with Python's start and imports,
which returns as soon as the tree runs) and by a plain `criu restore` of the same images (no verification: the
baseline), each followed by a request whose answer must match the one given before the snapshot. "all memory":
when a lazy restore's daemon had every page in (not known for the command). The disk's O_DIRECT read of the same
images (dd, 16 MiB blocks) is the limit.
"""
from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

from .. import proc
from .util import drop_caches, evict, warm
from ..criu import find_criu, require_privilege
from ..demo.worker import request
from ..snapshot import checkpoint, default_home, restore

__all__ = ["run", "format_table"]

# restore() keyword arguments per method (None: the CLI or plain CRIU); the default is lazy where userfaultfd works
METHOD_KW: dict = {"dynsnap (default)": {}, "dynsnap (eager)": {"lazy": False},
                   "dynsnap (eager, thp)": {"lazy": False, "thp": True},
                   "dynsnap (eager, prefetch=tmpfs)": {"lazy": False, "prefetch": "tmpfs"},
                   "dynsnap restore command (default)": None, "criu restore (baseline)": None}
METHODS = tuple(METHOD_KW)
BASELINE = METHODS[-1]


def _start_worker(work: Path, mb: int) -> tuple[subprocess.Popen, Path]:
    sock, ready = work / "w.sock", work / "ready"
    log = open(work / "worker.log", "wb")
    p = subprocess.Popen([sys.executable, "-m", "dynsnap_core.demo.worker", "--socket", str(sock), "--mb", str(mb),
                          "--rounds", "1", "--ready", str(ready)], stdin=subprocess.DEVNULL, stdout=log,
                         stderr=log, start_new_session=True, cwd=work,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    log.close()
    end = time.monotonic() + 300
    while not (ready.exists() and sock.exists()):
        if p.poll() is not None or time.monotonic() > end:
            raise RuntimeError("bench worker failed to start: " + (work / "worker.log").read_text()[-500:])
        time.sleep(0.01)
    return p, sock


def _gone(pid: int) -> None:
    proc.kill_and_reap([pid])


def _dd_read(images: Path) -> float:
    total, t0 = 0, time.perf_counter()
    for f in images.iterdir():
        if f.stat().st_size >= 1 << 20:
            subprocess.run(["dd", f"if={f}", "of=/dev/null", "bs=16M", "iflag=direct"], capture_output=True)
            total += f.stat().st_size
    return total / 1e9 / (time.perf_counter() - t0)


def run(dir: Optional[str] = None, size_mb: int = 1024, repeat: int = 1,
        progress: Optional[Callable[[str], Any]] = None) -> dict:
    require_privilege("bench restore")
    criu = find_criu()
    proc.set_child_subreaper()
    say = progress or (lambda s: None)
    base = Path(dir) if dir else default_home() / "bench"
    base.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="restore-", dir=base))
    rows: list[dict] = []
    try:
        worker, sock = _start_worker(work, size_mb)
        want = request(str(sock), "query 7")
        snap = checkpoint(worker.pid, work / "snap")
        worker.wait(timeout=30)
        images = snap.path / "criu"
        say(f"snapshot of a {size_mb} MiB worker: {snap.total_bytes / 2**20:.0f} MiB")
        can_drop = drop_caches()
        limit = _dd_read(images) if can_drop else None
        # cold: the whole page cache dropped (Python, CRIU and the images); cold-images: only the images evicted, as
        # on a node whose tools ran before (the agent, a previous restore)
        for cache in (("cold", "cold-images", "warm") if can_drop else ("cold-images", "warm")):
            for method in METHODS:
                for _ in range(repeat):
                    if cache == "cold":
                        drop_caches()
                    elif cache == "cold-images":
                        evict([images])
                    else:
                        warm([images])
                    t0 = time.perf_counter()
                    r = None
                    if METHOD_KW[method] is not None:
                        r = restore(snap.path, **METHOD_KW[method])
                        pid = r.pid
                    elif method.startswith("dynsnap"):     # the command: Python start, imports, all memory in
                        subprocess.run([sys.executable, "-m", "dynsnap_core.cli", "restore", str(snap.path)],
                                       check=True, capture_output=True, stdin=subprocess.DEVNULL)
                        pid = snap.root_pid
                    else:
                        logd = Path(tempfile.mkdtemp(dir=work))
                        criu.run(["restore", "-D", str(images), "-W", str(logd), "-d"], log=logd / "r.log",
                                 stage="restore")
                        pid = snap.root_pid
                    t_restore = time.perf_counter() - t0
                    got = request(str(sock), "query 7")
                    t_answer = time.perf_counter() - t0
                    lazy = r is not None and r.fill is not None
                    filled = r.wait_filled() if lazy else (None if r is None and method.startswith("dynsnap")
                                                           else t_restore)
                    _gone(pid)
                    row = {"cache": cache, "method": method, "restore_s": t_restore, "first_answer_s": t_answer,
                           "all_memory_s": None if filled is None else max(filled, t_restore), "lazy": lazy,
                           "phases": {k: v for k, v in (r.timings if r else {}).items() if k != "total"},
                           "ok": got == want, "gbps": snap.total_bytes / 1e9 / t_answer}
                    rows.append(row)
                    say(f"{cache:4} {method:30} {t_answer:6.2f} s {'ok' if row['ok'] else 'WRONG ANSWER'}")
        for r in rows:
            base_row = next(x for x in rows if x["cache"] == r["cache"] and x["method"] == BASELINE)
            r["vs_baseline"] = base_row["first_answer_s"] / r["first_answer_s"]
            r["vs_limit"] = (r["gbps"] / limit) if limit and r["cache"].startswith("cold") else None
        return {"machine": {"cpus": os.cpu_count(), "kernel": platform.release(), "criu": criu.version_str,
                            "date": time.strftime("%Y-%m-%d")},
                "image_bytes": snap.total_bytes, "state_mb": size_mb, "disk_read_gbps": limit, "rows": rows}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def format_table(res: dict) -> str:
    m = res["machine"]
    lim = res["disk_read_gbps"]
    out = [f"{m['date']}: {m['cpus']} CPUs, Linux {m['kernel']}, CRIU {m['criu']}; image "
           f"{res['image_bytes'] / 2**20:.0f} MiB; disk O_DIRECT read (dd 16 MiB) "
           + (f"{lim:.2f} GB/s" if lim else "not measured (no drop_caches)"), "",
           "| cache | method | restore | first answer | all memory | GB/s | vs baseline | vs disk | same answer |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        vl = f"{r['vs_limit']:.2f}" if r.get("vs_limit") else ""
        mem = f"{r['all_memory_s']:.2f} s" if r.get("all_memory_s") is not None else ""
        out.append(f"| {r['cache']} | {r['method']}{' [lazy]' if r.get('lazy') else ''} | {r['restore_s']:.2f} s | "
                   f"{r['first_answer_s']:.2f} s | {mem} | {r['gbps']:.2f} | {r['vs_baseline']:.2f}x | {vl} | "
                   f"{'yes' if r['ok'] else 'NO'} |")
    return "\n".join(out)
