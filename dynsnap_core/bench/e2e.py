"""End-to-end benchmark: a warmed LLM worker, from `restore` to its first correct answer, stock tools vs dynsnap.

One run measures, for the reference worker (dynsnap_core/demo/llm_worker.py: Qwen3 architecture, random weights
from a local safetensors file, an engine-sized KV pool):
- cold start: process start -> first token (imports, weights, warm-up generation);
- the stock path: CRIU's CLI (`criu dump` / `criu restore -d`) plus the driver's checkpoint API called directly,
  on a worker started with setsid; with the KV pool kept, and freed through the worker's quiesce hook;
- dynsnap: `checkpoint` / `restore` (durable, checksummed) of a worker started by `dynsnap run`, plain, with
  the KV pool released, and (GPU) with its weights mapped from the GPU memory service and its KV pool in a
  releasable region, quiesced and resumed by dynsnap through the worker's agent (a cold row also evicts the
  weights from the service, so the restore loads them from the weight store);
each restored with the page cache warm and, as root, cold (drop_caches). Every row records checkpoint time,
image size, the restore's phases and restore -> first token, and compares the greedy tokens with those of the
cold-started worker. ``dynsnap bench e2e --model qwen3-0.6b [--json] [--plot FILE]``; on a machine without a
GPU, ``--device cpu --model tiny`` runs the same rows on the CPU.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

from .. import proc
from .util import drop_caches, warm
from ..durable import tree_bytes
from ..errors import DynsnapError

__all__ = ["run", "format_table", "plot", "ROWS", "ROW_KEYS"]

# (row name, how the worker starts, release the KV pool before the checkpoint, tool); dynsnap's rows add one
# feature at a time
ROWS = [("stock criu + driver, KV kept", "setsid", False, "stock"),
        ("stock criu + driver, KV freed", "setsid", True, "stock"),
        ("dynsnap, KV kept", "run", False, "dynsnap"),
        ("dynsnap, KV released", "run", True, "dynsnap"),
        ("dynsnap, KV released, --thp", "run", True, "dynsnap-thp"),
        ("dynsnap, KV released, --no-lazy", "run", True, "dynsnap-eager"),
        ("dynsnap, KV released, --lazy", "run", True, "dynsnap-lazy"),
        # the worker maps its weights from the GPU memory service and keeps its KV pool in a releasable region;
        # dynsnap checkpoint/restore quiesce and resume it through its agent (no request from the bench)
        ("dynsnap, GPU memory service", "run", True, "dynsnap-gms")]
# short names for --rows
ROW_KEYS = {"stock-kept": ROWS[0][0], "stock-freed": ROWS[1][0], "dynsnap-kept": ROWS[2][0],
            "dynsnap-released": ROWS[3][0], "dynsnap-thp": ROWS[4][0], "dynsnap-eager": ROWS[5][0],
            "dynsnap-lazy": ROWS[6][0], "gms": ROWS[7][0]}
# restore() keywords per dynsnap tool (the default restore is lazy on CPU snapshots, eager with CUDA state)
_RESTORE_KW = {"dynsnap": {}, "dynsnap-thp": {"thp": True}, "dynsnap-eager": {"lazy": False},
               "dynsnap-lazy": {"lazy": True}, "dynsnap-gms": {}}


def _request(sock: str, req: dict, timeout: float = 600) -> dict:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(sock)
        s.sendall((json.dumps(req) + "\n").encode())
        buf = b""
        while not buf.endswith(b"\n"):
            part = s.recv(1 << 16)
            if not part:
                break
            buf += part
    rep = json.loads(buf)
    if not rep.get("ok"):
        raise DynsnapError(f"the e2e worker refused {req.get('op')}: {rep.get('error')}", stage="bench")
    return rep


class _Run:
    """One bench run's state: where things go, the worker's arguments, the processes to clean up."""

    def __init__(self, model: str, device: str, kv_gb: float, work: str, weights_dir: str, max_new: int,
                 say: Callable[[str], None]) -> None:
        self.model, self.device, self.kv_gb, self.work, self.max_new, self.say = model, device, kv_gb, work, max_new, say
        self.weights_dir = weights_dir
        self.cuda = device.startswith("cuda")
        self.owned: list[int] = []            # roots to kill at the end
        self.rows_seen: list[dict] = []
        self.popens: list[subprocess.Popen] = []
        self.n = 0
        self.gms: Optional[subprocess.Popen] = None       # the GPU memory service, started for the gms row
        self.gms_import_s = 0.0
        self.gms_sock = os.path.join(work, "gms.sock")
        self.gms_store = os.path.join(weights_dir, "store")

    def start_gms(self) -> None:
        """`dynsnap gms serve` for this run (weights from the bench's weight store), once. The weight set is
        imported into the store here, as an operator does once per model (`dynsnap weights import`), not by the
        worker: the import's buffers would stay in the worker's heap and travel in every image."""
        if self.gms is not None:
            return
        from ..demo import llm_worker
        from ..gms import worker as gw
        path = llm_worker.weights_path(self.model, self.weights_dir)
        t0 = time.perf_counter()
        gw.ensure_set(path, os.path.basename(path).rsplit(".", 1)[0], self.gms_store)
        self.gms_import_s = time.perf_counter() - t0
        from ..gms.protocol import Client, GmsError
        logp = os.path.join(self.work, "gms.log")
        cmd = [sys.executable, "-m", "dynsnap_core.cli", "gms", "serve", "--socket", self.gms_sock, "--device",
               self.device.split(":")[1] if ":" in self.device else "0", "--store", self.gms_store]
        with open(logp, "ab") as log:
            self.gms = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        end = time.monotonic() + 120
        while True:
            try:
                with Client(self.gms_sock, timeout=10) as c:
                    c.request("ping")
                return
            except (OSError, GmsError):
                if self.gms.poll() is not None or time.monotonic() > end:
                    with open(logp, errors="replace") as fh:
                        raise DynsnapError(f"the GPU memory service did not start: {fh.read()[-2000:]}",
                                           stage="bench") from None
                time.sleep(0.05)

    def gms_evict_all(self) -> None:
        """Nothing resident in the service (a cold row: the restore loads the weight set from the store)."""
        from ..gms.protocol import Client, GmsError
        end = time.monotonic() + 30
        with Client(self.gms_sock, timeout=60) as c:
            for x in c.status().get("sets", []):
                while True:
                    try:
                        c.request("evict", set=x["name"])
                        break
                    except GmsError as e:      # the killed worker's hold drops when the service sees it go
                        if e.code != "held" or time.monotonic() > end:
                            raise
                        time.sleep(0.05)

    def worker_cmd(self, sock: str, ready: str, gms: bool = False) -> list[str]:
        return [sys.executable, "-m", "dynsnap_core.demo.llm_worker", "--model", self.model, "--weights",
                self.weights_dir, "--sock", sock, "--ready", ready, "--device", self.device, "--kv-gb",
                str(self.kv_gb), "--max-new", str(self.max_new),
                *(["--gms", self.gms_sock, "--weights-store", self.gms_store] if gms else [])]

    def start(self, how: str, gms: bool = False) -> tuple[int, str, dict, float]:
        """Start a worker; (pid to checkpoint, socket, its ready report, seconds from start to first token)."""
        self.n += 1
        d = os.path.join(self.work, f"w{self.n}")
        os.makedirs(d)
        sock, ready, log = os.path.join(d, "sock"), os.path.join(d, "ready"), os.path.join(d, "log")
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # above dynsnap_core/
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
        t0 = time.perf_counter()
        if how == "run":
            from ..launch import launch
            pid = launch(self.worker_cmd(sock, ready, gms), log=log, cwd=d, env=env)
        else:
            with open(log, "ab") as lf:
                p = subprocess.Popen(self.worker_cmd(sock, ready, gms), stdin=subprocess.DEVNULL, stdout=lf, stderr=lf,
                                     cwd=d, env=env, start_new_session=True)
            pid = p.pid
            self.popens.append(p)
        self.owned.append(pid)
        while not os.path.exists(ready):
            proc.reap_children()
            if not proc.exists(pid):
                with open(log, errors="replace") as fh:
                    raise DynsnapError(f"the e2e worker exited while starting: {fh.read()[-2000:]}", stage="bench")
            time.sleep(0.02)
        first = time.perf_counter() - t0
        with open(ready) as fh:
            info = json.load(fh)
        return pid, sock, info, first

    def kill(self, pid: int) -> None:
        """SIGKILL the tree and wait until its pids are free again (reaped: we are the subreaper)."""
        proc.kill_and_reap(list(reversed(proc.tree(pid))), timeout=30)
        for p in self.popens:
            p.poll()                          # reaped above (ECHILD): Popen records it and stays quiet

    def cleanup(self) -> None:
        for pid in self.owned:
            if proc.exists(pid):
                self.kill(pid)
        if self.gms is not None and self.gms.poll() is None:
            self.gms.terminate()
            try:
                self.gms.wait(30)
            except subprocess.TimeoutExpired:
                self.gms.kill()
                self.gms.wait()


def _stock_checkpoint(r: _Run, pid: int, images: str) -> dict:
    from ..criu import find_criu
    criu = find_criu()
    t: dict[str, float] = {}
    tree = proc.tree(pid)
    ctree = None
    if r.cuda:
        from .. import cuda
        ctree = cuda.CudaTree(cuda.cuda_pids(tree))
        ctree.lock_all()
        ctree.checkpoint_all()
        t.update(ctree.timings)
    os.makedirs(images)
    t["criu_dump"] = criu.run(["dump", "-t", str(pid), "-D", images, "--file-locks"], log=Path(images) / "dump.log",
                              stage="dump", pid=pid)
    return {"timings": t, "cuda_pids": ctree.pids if ctree else []}


def _stock_restore(r: _Run, images: str, cuda_pids: list[int], tag: str) -> tuple[int, dict]:
    from ..criu import find_criu
    criu = find_criu()
    t: dict[str, float] = {}
    wd = os.path.join(r.work, f"restore-{tag}-{time.monotonic_ns()}")
    os.makedirs(wd)
    t["criu_restore"] = criu.run(["restore", "-D", images, "-W", wd, "-d", "--pidfile", os.path.join(wd, "pid"),
                                  "--file-locks"], log=Path(wd) / "restore.log", stage="restore")
    with open(os.path.join(wd, "pid")) as fh:
        pid = int(fh.read())
    r.owned.append(pid)
    if cuda_pids:
        from .. import cuda
        ctree = cuda.CudaTree(cuda_pids)
        ctree.restore_all()
        ctree.unlock_all()
        t.update(ctree.timings)
    return pid, t


def _row(r: _Run, name: str, how: str, release: bool, tool: str, ref: list[int], caches: list[str]) -> list[dict]:
    from .. import snapshot
    gms = tool == "dynsnap-gms"
    if gms:
        r.start_gms()
    r.say(f"{name}: starting a worker")
    pid, sock, _info, _ = r.start(how, gms)
    before = _request(sock, {"op": "memory"})
    t0 = time.perf_counter()
    # the gms worker is quiesced by dynsnap checkpoint itself, through its agent
    released = _request(sock, {"op": "quiesce"})["released_bytes"] if release and not gms else 0
    t_quiesce = time.perf_counter() - t0
    r.say(f"{name}: checkpoint")
    where = os.path.join(r.work, f"snap-{r.n}")
    t0 = time.perf_counter()
    if tool == "stock":
        ck = _stock_checkpoint(r, pid, where)
        ck_t, cuda_pids = ck["timings"], ck["cuda_pids"]
    else:
        s = snapshot.checkpoint(pid, where)
        ck_t, cuda_pids = dict(s.manifest.get("timings", {})), []
    ck_s = time.perf_counter() - t0 + t_quiesce
    r.kill(pid)
    image = tree_bytes(where)
    rows = []
    for cache in caches:
        if cache == "cold" and not drop_caches():
            continue
        if cache == "warm":
            warm([where])     # dynsnap persists with O_DIRECT: its images are not in the page cache until read
        elif gms:
            r.gms_evict_all()  # cold: the weights are not resident either; the restore loads them from the store
        r.say(f"{name}: restore, page cache {cache}")
        t0 = time.perf_counter()
        if tool == "stock":
            rpid, phases = _stock_restore(r, where, cuda_pids, cache)
        else:
            rp = snapshot.restore(where, **_RESTORE_KW[tool])
            rpid, phases = rp.pid, rp.timings       # a lazy restore adds memory_filled below
            r.owned.append(rpid)
        t_restore = time.perf_counter() - t0
        t1 = time.perf_counter()
        if release and not gms:
            _request(sock, {"op": "resume"})
        t_resume = time.perf_counter() - t1
        t1 = time.perf_counter()
        rep = _request(sock, {"op": "generate", "tokens": _prompt(), "max_new": r.max_new})
        t_first = time.perf_counter() - t1
        if tool != "stock" and rp.fill is not None:
            rp.wait_filled()                  # memory_filled: seconds from the restore's start to every page in
            phases = {k: v for k, v in rp.timings.items() if k != "total"}
        elif tool != "stock":
            phases = {k: v for k, v in phases.items() if k != "total"}
        rows.append({"row": name, "cache": cache, "tool": tool.split("-")[0], "kv_released": release, "gms": gms,
                     "checkpoint_s": ck_s, "checkpoint_phases": ck_t, "image_bytes": image,
                     "released_bytes": released, "gpu_bytes_before": before.get("allocated", 0),
                     "restore_s": t_restore, "restore_phases": phases, "resume_s": t_resume,
                     "first_generation_s": t_first, "first_answer_s": time.perf_counter() - t0,
                     "tokens_match": rep["tokens"] == ref})
        r.kill(rpid)
    shutil.rmtree(where, ignore_errors=True)
    return rows


def _prompt() -> list[int]:
    from ..demo.llm_worker import PROMPT
    return list(PROMPT)


def run(model: str = "qwen3-0.6b", device: str = "cuda:0", kv_gb: Optional[float] = None, dir: str = "/var/tmp",
        cold: bool = True, max_new: int = 16, rows: Optional[list[str]] = None,
        progress: Optional[Callable[[str], None]] = None) -> dict:
    """Run the benchmark; returns a JSON-able dict (machine, config, cold start, one entry per row and cache)."""
    from ..criu import require_privilege
    say = progress or (lambda s: None)
    if rows:
        unknown = [x for x in rows if x not in ROW_KEYS and x not in [n for n, *_ in ROWS]]
        if unknown:
            raise DynsnapError(f"unknown bench e2e row(s) {', '.join(unknown)}: use {', '.join(ROW_KEYS)}",
                               stage="bench")
        rows = [ROW_KEYS.get(x, x) for x in rows]
    require_privilege("bench e2e")
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        raise DynsnapError(f"bench e2e needs torch and transformers for its reference worker ({e.name} is missing)",
                           stage="bench") from None
    from ..demo import llm_worker as e2e_worker
    if model not in e2e_worker.MODELS:
        raise DynsnapError(f"unknown model {model!r}: use one of {', '.join(e2e_worker.MODELS)}", stage="bench")
    if kv_gb is None:
        kv_gb = 16.0 if device.startswith("cuda") else 0.25
    proc.set_child_subreaper()
    weights_dir = os.path.join(dir, "dynsnap-e2e-weights")
    say(f"weights: {e2e_worker.weights_path(model, weights_dir)} (written once)")
    e2e_worker.ensure_weights(model, weights_dir)
    work = tempfile.mkdtemp(prefix="dynsnap-bench-e2e-", dir=dir)
    r = _Run(model, device, kv_gb, work, weights_dir, max_new, say)
    res: dict = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                 "machine": {"host": platform.node(), "kernel": platform.release(), "cpus": os.cpu_count()},
                 "config": {"model": model, "device": device, "kv_gb": kv_gb, "max_new": max_new}, "rows": []}
    try:
        say("cold start: process start -> first token")
        if cold:
            drop_caches()
        pid, sock, info, first = r.start("run")
        ref = _request(sock, {"op": "generate", "tokens": _prompt(), "max_new": max_new})["tokens"]
        warm_gen = min(_request(sock, {"op": "generate", "tokens": _prompt(), "max_new": max_new})["seconds"]
                       for _ in range(3))
        res["cold_start"] = {"first_token_s": first, "import_s": info["import_s"], "load_s": info["load_s"],
                             "warm_s": info["warm_s"], "tokens": ref, "warm_generation_s": warm_gen}
        r.kill(pid)
        caches = (["warm", "cold"] if cold else ["warm"])
        for name, how, release, tool in ROWS:
            if rows and name not in rows:
                continue
            if tool == "dynsnap-gms" and not r.cuda:
                continue                      # the GPU memory service holds GPU memory: no row on the CPU
            try:
                res["rows"] += _row(r, name, how, release, tool, ref, caches)
            except DynsnapError as e:         # one row's failure is reported; the other rows still run
                say(f"{name}: FAILED: {e}")
                res["rows"].append({"row": name, "tool": tool.split("-")[0], "error": str(e)})
                for pid in list(r.owned):
                    if proc.exists(pid):
                        r.kill(pid)
            r.rows_seen = res["rows"]
        if r.gms is not None:
            res["gms_weights_import_s"] = r.gms_import_s     # once per model, into the weight store
        res["limits"] = _limits(r, cold)
        _lower_bounds(res)
    finally:
        r.cleanup()
        shutil.rmtree(work, ignore_errors=True)
    return res


def _limits(r: _Run, cold: bool) -> dict:
    """Read bandwidth of a scratch file the size of the largest image: from the page cache (all cores) and, as
    root, from the disk with O_DIRECT (the C engine, the fastest way this machine reads a file)."""
    from .. import io as dio
    size = max([x["image_bytes"] for x in r.rows_seen if "image_bytes" in x] or [256 << 20])
    path = os.path.join(r.work, "limit.bin")
    dio.write_buffers(path, [os.urandom(1 << 20)] * max(1, size >> 20))
    out: dict = {"bytes": os.path.getsize(path)}
    dio.hash_file(path, direct=False)                  # into the page cache
    out["pagecache_read_gbps"] = max(_parallel_read(path) for _ in range(3))
    if cold and drop_caches():
        t0 = time.perf_counter()
        dio.hash_file(path, direct=True)
        out["disk_read_gbps"] = out["bytes"] / (time.perf_counter() - t0) / 1e9
    os.unlink(path)
    return out


def _parallel_read(path: str, chunk: int = 16 << 20) -> float:
    """GB/s of reading ``path`` with one thread per core, each its own range (pread releases the GIL)."""
    import concurrent.futures as cf
    size = os.path.getsize(path)
    threads = os.cpu_count() or 1
    per = -(-size // threads)

    def part(k: int) -> int:
        buf, n = bytearray(chunk), 0
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            off, end = k * per, min(size, (k + 1) * per)
            while off < end:
                got = os.preadv(fd, [memoryview(buf)[:min(chunk, end - off)]], off)
                if got <= 0:
                    break
                off, n = off + got, n + got
        finally:
            os.close(fd)
        return n
    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(max_workers=threads) as pool:
        total = sum(pool.map(part, range(threads)))
    return total / (time.perf_counter() - t0) / 1e9


def _lower_bounds(res: dict) -> None:
    """Per row: the least restore -> first answer could take on this machine, from this run's limits: reading the
    image once (page cache warm, disk cold) plus one generation on a warm worker. No process start, no GPU copy."""
    lim, gen = res.get("limits", {}), res.get("cold_start", {}).get("warm_generation_s", 0.0)
    for x in [x for x in res["rows"] if "error" not in x]:
        rate = lim.get("pagecache_read_gbps") if x["cache"] == "warm" else lim.get("disk_read_gbps")
        if rate:
            x["lower_bound_s"] = x["image_bytes"] / (rate * 1e9) + gen
            x["vs_lower_bound"] = x["first_answer_s"] / x["lower_bound_s"]


def format_table(res: dict) -> str:
    c = res["config"]
    cs = res.get("cold_start", {})
    lines = [f"machine: {res['machine']}", f"config: {c}",
             f"cold start -> first token {cs.get('first_token_s', 0):.2f} s (imports {cs.get('import_s', 0):.2f}, "
             f"weights {cs.get('load_s', 0):.2f}, warm-up {cs.get('warm_s', 0):.2f})",
             "== table ==",
             f"limits: page cache read {res.get('limits', {}).get('pagecache_read_gbps', 0):.2f} GB/s, disk read "
             f"{res.get('limits', {}).get('disk_read_gbps', 0):.2f} GB/s; warm generation "
             f"{cs.get('warm_generation_s', 0):.3f} s",
             f"{'row':<32} {'cache':<5} {'ckpt s':>7} {'image GiB':>9} {'restore s':>9} {'1st gen s':>9} "
             f"{'answer s':>8} {'vs stock':>8} {'bound s':>8} same"]
    stock = {(x["cache"], x["kv_released"]): x["first_answer_s"] for x in res["rows"]
             if x["tool"] == "stock" and "error" not in x}
    for x in res["rows"]:
        if "error" in x:
            lines.append(f"{x['row']:<32} FAILED: {x['error']}")
            continue
        b = stock.get((x["cache"], x["kv_released"]))
        ratio = f"{b / x['first_answer_s']:.2f}x" if b else "-"
        bound = f"{x['lower_bound_s']:.2f}" if x.get("lower_bound_s") else "-"
        lines.append(f"{x['row']:<32} {x['cache']:<5} {x['checkpoint_s']:7.2f} {x['image_bytes'] / 2**30:9.2f} "
                     f"{x['restore_s']:9.2f} {x['first_generation_s']:9.2f} {x['first_answer_s']:8.2f} {ratio:>8} "
                     f"{bound:>8} {'yes' if x['tokens_match'] else 'NO'}")
    return "\n".join(lines)


def plot(res: dict, path: str) -> str:
    """A PNG of restore -> first answer per row, split into its phases (needs matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise DynsnapError("--plot needs matplotlib (pip install matplotlib)", stage="bench") from None
    rows = [x for x in res["rows"] if "error" not in x]
    labels = [f"{x['row']}\n({x['cache']})" for x in rows]
    parts = {"restore": [x["restore_s"] for x in rows], "resume hook": [x["resume_s"] for x in rows],
             "first generation": [x["first_generation_s"] for x in rows]}
    fig, ax = plt.subplots(figsize=(10, 0.6 * len(rows) + 1.5))
    left = [0.0] * len(rows)
    for name, vals in parts.items():
        ax.barh(labels, vals, left=left, label=name)
        left = [a + b for a, b in zip(left, vals)]
    for i, x in enumerate(rows):
        ax.text(left[i], i, f" {x['first_answer_s']:.2f} s" + ("" if x["tokens_match"] else " (tokens differ)"),
                va="center")
    ax.invert_yaxis()
    ax.set_xlabel("seconds from restore to the first correct answer")
    ax.set_title(f"{res['config']['model']} on {res['config']['device']}, {res['date'][:10]}")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
