"""GPU checkpoint/restore benchmark: `dynsnap checkpoint/restore` of a torch worker against GPU bytes, beside the
plain baseline (bare driver calls + the `criu dump` / `criu restore` CLI) on the same worker size.

    python3 benches/bench_gpu.py --sizes 1,4,16 [--json out.json] [--repeat 1] [--workdir DIR]

Needs root, a GPU with the driver checkpoint API, torch, and CRIU (DYNSNAP_CRIU or criu on PATH).
Prints the machine, the configuration, the physical limits measured in this run (pinned H2D/D2H, disk write),
then one table: per size and phase dynsnap, baseline, and baseline/dynsnap (> 1 means dynsnap is faster).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)                 # gpu_harness.py, worker_torch.py: shared with tests/gpu

from gpu_harness import Worker, find_key, json_out, run_cli, subreaper  # noqa: E402

PHASES_CKPT = ["lock", "gpu_checkpoint", "criu_dump", "persist", "checkpoint_total"]
PHASES_REST = ["criu_restore", "gpu_restore", "unlock", "restore_total", "first_answer"]


def criu_path() -> str:
    path = os.environ.get("DYNSNAP_CRIU") or shutil.which("criu")
    if not path:
        sys.exit("bench_gpu: no CRIU (set DYNSNAP_CRIU or put criu on PATH)")
    return path


def dir_bytes(path: str) -> int:
    total = 0
    for dp, _, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(dp, f))
            except OSError:
                pass
    return total


def wait_correct(w: Worker, expect: str, timeout: float = 600.0) -> None:
    got = w.wait_answer("matmul", timeout=timeout)
    if got != expect:
        raise RuntimeError(f"restored worker answered matmul {got[:16]}..., expected {expect[:16]}...")


def limits(workdir: str) -> Dict[str, float]:
    """Physical limits in this run: pinned host<->device copies (torch) and durable disk write."""
    out: Dict[str, float] = {}
    try:
        import torch
        n = 1 << 30
        host = torch.empty(n, dtype=torch.uint8, pin_memory=True)
        dev = torch.empty(n, dtype=torch.uint8, device="cuda")
        for name, fn in (("pinned_h2d_gbs", lambda: dev.copy_(host, non_blocking=True)),
                         ("pinned_d2h_gbs", lambda: host.copy_(dev, non_blocking=True))):
            fn()
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(4):
                fn()
            torch.cuda.synchronize()
            out[name] = 4 * n / (time.perf_counter() - t) / 1e9
        del host, dev
        torch.cuda.empty_cache()
    except Exception as exc:  # noqa: BLE001 - a limit we cannot measure is reported as missing
        print(f"bench_gpu: could not measure copy limits: {exc}")
    path = os.path.join(workdir, "ddtest")
    buf = os.urandom(16 << 20)
    t = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(128):   # 2 GiB
            f.write(buf)
        f.flush()
        os.fsync(f.fileno())
    out["disk_write_gbs"] = 128 * len(buf) / (time.perf_counter() - t) / 1e9
    os.unlink(path)
    return out


def run_dynsnap(gb: float, workdir: str) -> Dict[str, Any]:
    w = Worker(gb, workdir).wait_ready()
    try:
        m0, s0 = w.request("matmul"), w.request("sum")
        snap = os.path.join(workdir, f"snap-{gb}")
        t = time.perf_counter()
        r = run_cli("checkpoint", "--pid", str(w.pid), "--out", snap, "--json")
        ckpt_wall = time.perf_counter() - t
        if r.returncode != 0:
            raise RuntimeError(f"dynsnap checkpoint failed: {r.stderr.strip()[-1500:]}")
        out = json_out(r)
        tim = find_key(out, "timings") or {}
        res: Dict[str, Any] = {k: tim.get(k) for k in ("lock", "gpu_checkpoint", "criu_dump", "persist")}
        res["checkpoint_total"] = ckpt_wall
        res["image_bytes"] = dir_bytes(snap)
        w.kill()
        t = time.perf_counter()
        r = run_cli("restore", snap, "--json")
        rest_wall = time.perf_counter() - t
        if r.returncode != 0:
            raise RuntimeError(f"dynsnap restore failed: {r.stderr.strip()[-1500:]}")
        out = json_out(r)
        w.pid = int(out["pid"])
        wait_correct(w, m0)
        res["first_answer"] = time.perf_counter() - t
        tim = find_key(out, "timings") or {}
        res.update({k: tim.get(k) for k in ("criu_restore", "gpu_restore", "unlock")})
        res["restore_total"] = rest_wall
        res["verified"] = w.request("sum") == s0
        shutil.rmtree(snap, ignore_errors=True)
        return res
    finally:
        w.kill()


def run_baseline(gb: float, workdir: str, criu: str) -> Dict[str, Any]:
    import dynsnap_core.cuda as cuda
    w = Worker(gb, workdir).wait_ready()
    images = os.path.join(workdir, f"baseline-{gb}")
    os.makedirs(images, exist_ok=True)
    try:
        m0, s0 = w.request("matmul"), w.request("sum")
        res: Dict[str, Any] = {}
        t0 = time.perf_counter()
        t = time.perf_counter()
        cuda.lock(w.pid, 10000)
        res["lock"] = time.perf_counter() - t
        t = time.perf_counter()
        cuda.checkpoint(w.pid)
        res["gpu_checkpoint"] = time.perf_counter() - t
        t = time.perf_counter()
        r = subprocess.run([criu, "dump", "--tree", str(w.pid), "--images-dir", images, "--log-file", "dump.log",
                            "-v4"], capture_output=True, text=True)
        res["criu_dump"] = time.perf_counter() - t
        if r.returncode != 0:
            raise RuntimeError(f"criu dump failed ({images}/dump.log): {r.stderr.strip()[-800:]}")
        res["persist"] = 0.0
        res["checkpoint_total"] = time.perf_counter() - t0
        res["image_bytes"] = dir_bytes(images)
        w.kill()
        pidfile = os.path.join(images, "restored.pid")
        t0 = time.perf_counter()
        r = subprocess.run([criu, "restore", "--images-dir", images, "--log-file", "restore.log", "-v4",
                            "--restore-detached", "--pidfile", pidfile], capture_output=True, text=True)
        res["criu_restore"] = time.perf_counter() - t0
        if r.returncode != 0:
            raise RuntimeError(f"criu restore failed ({images}/restore.log): {r.stderr.strip()[-800:]}")
        with open(pidfile) as f:
            w.pid = int(f.read().strip())
        t = time.perf_counter()
        cuda.restore(w.pid)
        res["gpu_restore"] = time.perf_counter() - t
        t = time.perf_counter()
        cuda.unlock(w.pid)
        res["unlock"] = time.perf_counter() - t
        res["restore_total"] = time.perf_counter() - t0
        wait_correct(w, m0)
        res["first_answer"] = time.perf_counter() - t0
        res["verified"] = w.request("sum") == s0
        return res
    finally:
        try:
            cuda.CudaTree([w.pid]).rollback()
        except Exception:  # noqa: BLE001
            pass
        w.kill()
        shutil.rmtree(images, ignore_errors=True)


def fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, float):
        return f"{v * 1000:.1f}ms" if v < 0.1 else f"{v:.2f}s"
    return str(v)


def table(rows: List[Dict[str, Any]]) -> str:
    cols = ["size", "path"] + PHASES_CKPT + PHASES_REST + ["image", "verified"]
    lines = []
    for r in rows:
        d, b = r.get("dynsnap") or {}, r.get("baseline") or {}
        for name, src in (("dynsnap", d), ("baseline", b)):
            lines.append([f"{r['gb']:g}GB", name] + [fmt(src.get(k)) for k in PHASES_CKPT + PHASES_REST]
                         + [f"{src['image_bytes'] / 2**30:.1f}GiB" if src.get("image_bytes") else "-",
                            fmt(src.get("verified")) if src else (r.get("error") or "-")])
        ratio = []
        for k in PHASES_CKPT + PHASES_REST:
            dv, bv = d.get(k), b.get(k)
            ratio.append(f"{bv / dv:.2f}x" if isinstance(dv, float) and isinstance(bv, float) and dv > 0 else "-")
        lines.append([f"{r['gb']:g}GB", "base/dyn"] + ratio + ["", ""])
    widths = [max(len(c), *(len(l[i]) for l in lines)) for i, c in enumerate(cols)]
    out = [" | ".join(c.ljust(w) for c, w in zip(cols, widths))]
    out.append("-+-".join("-" * w for w in widths))
    out += [" | ".join(v.ljust(w) for v, w in zip(l, widths)) for l in lines]
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1,4,16", help="GB of GPU data per worker, comma separated")
    ap.add_argument("--json", help="write all results here")
    ap.add_argument("--repeat", type=int, default=1, help="runs per size and path (the best is reported)")
    ap.add_argument("--workdir", default=None, help="where snapshots and images go (default: a temp dir on /var/tmp)")
    ap.add_argument("--no-baseline", action="store_true")
    args = ap.parse_args()
    sizes = [float(s) for s in args.sizes.split(",") if s.strip()]
    if os.geteuid() != 0:
        sys.exit("bench_gpu: needs root (CRIU)")
    import dynsnap_core.cuda as cuda
    if not cuda.is_available():
        sys.exit(f"bench_gpu: {cuda.driver_info()['reason']}")
    criu = criu_path()
    subreaper()
    workdir = tempfile.mkdtemp(prefix="dynsnap-bench-gpu-", dir=args.workdir or "/var/tmp")
    devs = cuda.devices()
    crv = subprocess.run([criu, "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    machine = {"host": socket.gethostname(), "kernel": platform.release(), "cpus": os.cpu_count(),
               "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
               "gpus": devs, "driver": cuda.driver_info(), "criu": crv, "python": platform.python_version(),
               "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "workdir": workdir}
    print(f"bench_gpu: {machine['host']}, {machine['cpus']} cores, {machine['mem_gib']} GiB, kernel "
          f"{machine['kernel']}, {', '.join(d['name'] for d in devs)}, CUDA driver API "
          f"{machine['driver']['driver_version']}, {crv}")
    print(f"bench_gpu: sizes {sizes} GB, repeat {args.repeat}, workdir {workdir}")
    lim = limits(workdir)
    print("bench_gpu: limits " + ", ".join(f"{k} {v:.1f}" for k, v in lim.items()))
    rows: List[Dict[str, Any]] = []
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    try:
        for gb in sizes:
            row: Dict[str, Any] = {"gb": gb}
            for name, fn in (("dynsnap", lambda: run_dynsnap(gb, workdir)),
                             ("baseline", lambda: run_baseline(gb, workdir, criu))):
                if name == "baseline" and args.no_baseline:
                    continue
                best = None
                for _ in range(max(1, args.repeat)):
                    try:
                        got = fn()
                    except Exception as exc:  # noqa: BLE001 - report and go on with the next
                        row["error"] = f"{name}: {exc}"
                        print(f"bench_gpu: {gb:g} GB {name} failed: {exc}", flush=True)
                        break
                    if best is None or (got.get("first_answer") or 1e9) < (best.get("first_answer") or 1e9):
                        best = got
                row[name] = best
                print(f"bench_gpu: {gb:g} GB {name}: {json.dumps(best)}", flush=True)
            rows.append(row)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    print()
    print("== table ==")
    print(table(rows))
    print("limits: " + ", ".join(f"{k} {v:.1f}" for k, v in lim.items())
          + f"; child CPU time {cpu:.1f} s; base/dyn > 1 means dynsnap is faster")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "limits": lim, "results": rows, "child_cpu_s": cpu}, f, indent=2)
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
