"""dynsnap demo: warm a sample worker, answer a request, snapshot it, kill it, restore it, answer again, compare;
then restore a second copy of the same snapshot beside the first (the worker runs in its own pid namespace)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from .. import proc
from .worker import request
from ..errors import DynsnapError
from ..launch import launch
from ..snapshot import checkpoint, default_home, restore
from ..cli.ui import Reporter, _human

__all__ = ["main", "run"]


def _wait_ready(ended: Callable[[], bool], ready: Path, sock: Path, timeout: float = 300) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if ended():
            raise DynsnapError("the demo worker exited during warm-up (see worker.log with --keep)", stage="demo")
        if ready.exists() and sock.exists():
            return
        time.sleep(0.01)
    raise DynsnapError("the demo worker did not become ready in time", stage="demo")


def run(mb: int = 512, keep: bool = False, rep: Reporter | None = None, memsvc: bool = False,
        rounds: int = 4) -> dict:
    """One demo round; with ``memsvc`` the worker's state lives in a host memory service region: it is stored
    once in a weight directory, left out of the CRIU image, and loaded by the service during the restore."""
    rep = rep or Reporter()
    proc.set_child_subreaper()
    base = default_home() / "demo"
    base.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="run-", dir=base))
    sock, ready, snapdir = work / "worker.sock", work / "ready", work / "snapshot"
    cmd = [sys.executable, "-m", "dynsnap_core.demo.worker", "--socket", str(sock), "--mb", str(mb),
           "--rounds", str(rounds), "--ready", str(ready)]
    log = open(work / "worker.log", "wb")
    restored_pid = None
    worker = None
    svc = None
    if memsvc:
        from .. import memsvc as ms
        from ..snapshot import regions
        svc_sock = work / "memsvc.sock"
        svc_log = open(work / "memsvc.log", "wb")     # not the worker's log: CRIU checks that file's size
        svc = ms.spawn(svc_sock, log=svc_log, allow=[work])
        svc_log.close()
        cmd += ["--memsvc", str(svc_sock)]
    second_pid = None
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    try:
        t0 = time.perf_counter()
        with rep.step(f"cold start: worker computes {mb} MiB of state ({rounds} passes)"):
            if svc is None:
                # in its own pid namespace (dynsnap run): the snapshot can be restored twice side by side
                target = launch(cmd, log=work / "worker.log", cwd=work, env=env)
                _wait_ready(lambda: not proc.exists(target), ready, sock)
            else:
                worker = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                          start_new_session=True, cwd=work, env=env)
                target = worker.pid
                _wait_ready(lambda: worker.poll() is not None, ready, sock)
            before = request(str(sock), "query 7")
        cold = time.perf_counter() - t0
        rep.say(f"worker pid {target} ready; answer to 'query 7': {before}")

        t0 = time.perf_counter()
        if svc is not None:
            snap = regions.checkpoint_with_regions(target, snapdir, service=svc_sock, regions=["demo-state"],
                                              store=work / "weights", progress=rep.update,
                                              quiesce_worker=lambda: request(str(sock), "detach"))
        else:
            snap = checkpoint(target, snapdir, progress=rep.update)
        rep.finish()
        ckpt = time.perf_counter() - t0
        if worker is not None:
            worker.wait(timeout=30)      # reap it: the restored worker needs its pid back
        else:
            end = time.monotonic() + 30
            while proc.exists(target) and time.monotonic() < end:       # a zombie does not exist
                time.sleep(0.01)
        rep.say(f"snapshot {_human(snap.total_bytes)} at {snapdir}; worker stopped and killed")

        t0 = time.perf_counter()
        if svc is not None:
            with ms.Client(svc_sock) as c:      # as on a fresh node: the service must load the weights again
                c.drop("demo-state", force=True)
            t0 = time.perf_counter()
            r = regions.restore_with_regions(snapdir, service=svc_sock, progress=rep.update)
            request(str(sock), "attach")
        else:
            r = restore(snapdir, progress=rep.update)
        rep.finish()
        t_restore = time.perf_counter() - t0
        restored_pid = r.pid
        after = request(str(sock), "query 7")
        first_answer = time.perf_counter() - t0
        stats = json.loads(request(str(sock), "stats"))
        same = after == before
        rep.say(f"restored pid {r.pid}; answer to 'query 7': {after} ({'identical' if same else 'DIFFERENT'})")
        second = None
        if svc is None:
            os.rename(sock, work / "worker-1.sock")   # the first copy keeps serving there; the second binds anew
            t0 = time.perf_counter()
            r2 = restore(snapdir, progress=rep.update)
            rep.finish()
            second_pid = r2.pid
            answer2 = request(str(sock), "query 7")
            second = {"pid": r2.pid, "first_answer_s": time.perf_counter() - t0, "answer": answer2,
                      "ok": answer2 == before and request(str(work / "worker-1.sock"), "query 7") == before}
            rep.say(f"second copy of the same snapshot: pid {r2.pid}, beside pid {r.pid}; answer: {answer2} "
                    f"({'identical' if second['ok'] else 'DIFFERENT'})")
        size = snap.total_bytes
        return {
            "ok": same and (second is None or second["ok"]), "answer_before": before, "answer_after": after,
            "pid": target, "second_copy": second,
            "restored_pid": r.pid, "requests_served_by_restored": stats["served"],
            "cold_start_s": cold, "checkpoint_s": ckpt, "restore_s": t_restore,
            "first_answer_after_restore_s": first_answer, "image_bytes": size,
            "checkpoint_mb_s": size / 1e6 / ckpt, "restore_mb_s": size / 1e6 / t_restore,
            "speedup_vs_cold": cold / first_answer, "snapshot": str(snapdir) if keep else None,
            "checkpoint_timings": snap.timings, "restore_timings": r.timings, "memsvc": memsvc,
            "weights_bytes": (mb << 20) if memsvc else 0,
        }
    finally:
        for pid in (restored_pid, second_pid):
            if pid and proc.exists(pid):
                os.kill(pid, signal.SIGKILL)
        if worker is not None and worker.poll() is None:
            worker.kill()
            worker.wait()
        if svc is not None and svc.poll() is None:
            svc.terminate()
            svc.wait(timeout=10)
        time.sleep(0.05)
        proc.reap_children()
        log.close()
        if not keep:
            shutil.rmtree(work, ignore_errors=True)


def format_table(res: dict) -> str:
    rows = [
        ("cold start (spawn -> first answer)", f"{res['cold_start_s']:.2f} s"),
        ("checkpoint (dump + persist + commit)", f"{res['checkpoint_s']:.2f} s"),
        ("restore (verify + CRIU restore)", f"{res['restore_s']:.2f} s"),
        ("time to first answer after restore", f"{res['first_answer_after_restore_s']:.2f} s"),
        ("image size", _human(res["image_bytes"])),
        ("checkpoint throughput", f"{res['checkpoint_mb_s']:.0f} MB/s"),
        ("restore throughput", f"{res['restore_mb_s']:.0f} MB/s"),
        ("first answer vs cold start", f"{res['speedup_vs_cold']:.1f}x faster"),
        ("same answer after restore", "yes" if res["ok"] else "NO"),
    ]
    if res.get("second_copy"):
        rows.insert(-1, ("second copy side by side (restore -> answer)",
                         f"{res['second_copy']['first_answer_s']:.2f} s"))
    w = max(len(a) for a, _ in rows)
    return "\n".join(f"{a:<{w}}  {b}" for a, b in rows)


def format_comparison(plain: dict, svc: dict) -> str:
    """Image size and restore time without and with the host memory service."""
    rows = [("", "without memory service", "with memory service"),
            ("image size", _human(plain["image_bytes"]), _human(svc["image_bytes"])),
            ("weights outside the image", "-", _human(svc["weights_bytes"])),
            ("checkpoint", f"{plain['checkpoint_s']:.2f} s", f"{svc['checkpoint_s']:.2f} s"),
            ("restore (CRIU + memfd restore in parallel)", f"{plain['restore_s']:.2f} s", f"{svc['restore_s']:.2f} s"),
            ("time to first answer after restore", f"{plain['first_answer_after_restore_s']:.2f} s",
             f"{svc['first_answer_after_restore_s']:.2f} s"),
            ("same answer after restore", "yes" if plain["ok"] else "NO", "yes" if svc["ok"] else "NO")]
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    return "\n".join(f"{a:<{w0}}  {b:<{w1}}  {c}" for a, b, c in rows)


def main(mb: int = 512, keep: bool = False, as_json: bool = False, memsvc: bool = False, rounds: int = 4) -> int:
    with Reporter(quiet=as_json) as rep:
        res = run(mb=mb, keep=keep, rep=rep, rounds=rounds)
        with_svc = run(mb=mb, keep=keep, rep=rep, memsvc=True, rounds=rounds) if memsvc else None
    if with_svc is not None:
        if as_json:
            print(json.dumps({**res, "with_memsvc": with_svc}, indent=2, sort_keys=True))
        else:
            print(format_table(res))
            print()
            print(format_comparison(res, with_svc))
        return 0 if res["ok"] and with_svc["ok"] else 1
    if as_json:
        print(json.dumps(res, indent=2, sort_keys=True))
    else:
        print(format_table(res))
    return 0 if res["ok"] else 1
