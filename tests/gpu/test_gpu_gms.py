"""The GPU memory service and releasable regions on a real GPU (issue #11). Every test prints what it measured.

    sudo -E .venv/bin/python -m pytest tests/gpu/test_gpu_gms.py -v -s -m gpu

The snapshot round trip also needs root and CRIU (marker ``criu``). ``DYNSNAP_GMS_TEST_GB`` sets the size of
the large weight set of the snapshot test (default 8).
"""
from __future__ import annotations

import ctypes
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid

import pytest

torch = pytest.importorskip("torch")

from gpu_harness import ROOT, alive, reap, report_fact, subreaper  # noqa: E402

from dynsnap_core import weights as W  # noqa: E402
from dynsnap_core.gms import agent_client as AC, protocol as P, regions, vmm  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(900)]

HERE = os.path.dirname(os.path.abspath(__file__))
GiB = 1 << 30


def say(what: str, **kw) -> None:
    """A measured fact: printed, and in the run's summary (gpu-check.sh's $DYNSNAP_GPU_FACTS)."""
    report_fact(f"gms: {what}", {k: (v if isinstance(v, (int, float, str, bool, type(None))) else str(v))
                                 for k, v in kw.items()})


def _source_small() -> dict:
    g = torch.Generator(device="cuda:0").manual_seed(11)
    out = {}
    for i, s in enumerate([(1024, 4096), (4097,), (3, 5, 7), (0, 8), (2048, 1031)]):
        for dt in (torch.bfloat16, torch.float16, torch.float32):
            out[f"t{i}.{str(dt)[6:]}"] = torch.randn(s, dtype=dt, device="cuda:0", generator=g)
    out["ids"] = torch.randint(-1000, 1000, (12345,), dtype=torch.int64, device="cuda:0", generator=g)
    return out


def _host_bytes(t) -> bytes:
    """The bytes of a 1-D uint8 tensor (copied to the host; no numpy needed)."""
    c = t.contiguous().cpu()
    return ctypes.string_at(c.data_ptr(), c.numel()) if c.numel() else b""


def _sha(tensors: dict) -> str:
    h = hashlib.sha256()
    for n in sorted(tensors):
        t = tensors[n]
        if t.numel():
            flat = t.reshape(-1).view(torch.uint8)
            for i in range(0, flat.numel(), 256 << 20):
                h.update(_host_bytes(flat[i:i + (256 << 20)]))
    return h.hexdigest()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    d = tmp_path_factory.mktemp("gms-store")
    src = _source_small()
    ws = W.save(src, "small", store=d, shard_bytes=16 << 20)
    return {"dir": str(d), "small": ws, "small_sha": _sha(src), "small_src": src}


@pytest.fixture(scope="module")
def big(store):
    """A weight set of DYNSNAP_GMS_TEST_GB GiB (bf16 tensors of 1 GiB), saved from the GPU once."""
    gb = int(os.environ.get("DYNSNAP_GMS_TEST_GB", "8"))
    g = torch.Generator(device="cuda:0").manual_seed(5)
    src = {f"w{i}": torch.randn(16384, 32768, dtype=torch.bfloat16, device="cuda:0", generator=g) for i in range(gb)}
    t0 = time.perf_counter()
    ws = W.save(src, "big", store=store["dir"])
    sha = _sha(src)
    say("big set saved", gib=gb, seconds=round(time.perf_counter() - t0, 2))
    del src
    torch.cuda.empty_cache()
    return {"ws": ws, "sha": sha, "bytes": ws.nbytes}


class Service:
    def __init__(self, tmp, store_dir: str, *extra: str):
        self.sock = os.path.join(str(tmp), f"gms-{uuid.uuid4().hex[:8]}.sock")
        self.logf = os.path.join(str(tmp), f"gms-{uuid.uuid4().hex[:8]}.log")
        self.store_dir, self.extra = store_dir, extra
        self.proc = None
        self.start()

    def start(self) -> None:
        env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
        with open(self.logf, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "dynsnap_core.cli", "gms", "serve", "--socket",
                                          self.sock, "--store", self.store_dir, "--device", "0", *self.extra],
                                         stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env,
                                         start_new_session=True)
        end = time.monotonic() + 60
        while True:                                      # (a killed predecessor may have left its socket file)
            assert self.proc.poll() is None and time.monotonic() < end, self.log()
            try:
                with P.Client(self.sock, timeout=5) as c:
                    if c.ping()["pid"] == self.proc.pid:
                        return
            except P.GmsError:
                pass
            time.sleep(0.05)

    def log(self) -> str:
        with open(self.logf) as f:
            return f.read()[-4000:]

    def client(self) -> P.Client:
        return P.Client(self.sock)

    def status(self) -> dict:
        with self.client() as c:
            return c.status()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture
def service(tmp_path, store):
    made = []

    def make(*extra: str, store_dir: str = None) -> Service:
        s = Service(tmp_path, store_dir or store["dir"], *extra)
        made.append(s)
        return s

    yield make
    for s in made:
        s.stop()


class GmsWorker:
    def __init__(self, tmp, sock: str, set_ref: str, kv_mb: int = 256):
        self.name = "dynsnap-gms-w-" + uuid.uuid4().hex[:10]
        self.ready = os.path.join(str(tmp), f"ready-{uuid.uuid4().hex[:8]}")
        self.logf = os.path.join(str(tmp), f"worker-{uuid.uuid4().hex[:8]}.log")
        env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               "DYNSNAP_RUN_DIR": os.path.join(str(tmp), "run")}
        with open(self.logf, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, os.path.join(HERE, "worker_gms.py"), "--sock", self.name,
                                          "--ready", self.ready, "--gms", sock, "--set", set_ref, "--kv-mb", str(kv_mb)],
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True, cwd=str(tmp), env=env)
        self.pid = self.proc.pid
        self.info: dict = {}

    def wait_ready(self, timeout: float = 300) -> "GmsWorker":
        end = time.monotonic() + timeout
        while not os.path.exists(self.ready):
            if self.proc.poll() is not None or time.monotonic() > end:
                raise AssertionError(f"GMS worker did not start: {self.log()}")
            time.sleep(0.05)
        with open(self.ready) as f:
            self.info = json.load(f)
        return self

    def log(self) -> str:
        with open(self.logf) as f:
            return f.read()[-4000:]

    def ask(self, op: str, timeout: float = 300) -> dict:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        s.connect("\0" + self.name)
        with s, s.makefile("rwb") as f:
            f.write((json.dumps({"op": op}) + "\n").encode())
            f.flush()
            rep = json.loads(f.readline())
        assert rep.get("ok"), f"{op}: {rep} ({self.log()})"
        return rep

    def kill(self) -> None:
        if alive(self.pid):
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            reap(self.pid)
        except Exception:  # noqa: BLE001
            pass
        self.proc.poll()        # reaped above (ECHILD): Popen records it and does not warn "still running"


@pytest.fixture
def workers(tmp_path):
    made = []

    def make(sock: str, set_ref: str, kv_mb: int = 256, wait: bool = True) -> GmsWorker:
        w = GmsWorker(tmp_path, sock, set_ref, kv_mb)
        made.append(w)
        return w.wait_ready() if wait else w

    yield make
    for w in made:
        w.kill()


def _wait(pred, timeout: float = 30, what: str = "condition") -> None:
    end = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.1)


# ---------------------------------------------------------------- sharing, release, reacquire

def test_two_workers_map_one_copy_and_compute_the_same(service, workers, store):
    svc = service()
    free0 = svc.status()["gpu"]["free"]
    w1 = workers(svc.sock, "small", wait=False)       # both ask at once: the service loads once
    w2 = workers(svc.sock, "small", wait=False)
    w1.wait_ready()
    w2.wait_ready()
    st = svc.status()
    assert len(st["sets"]) == 1, st
    s = st["sets"][0]
    assert s["state"] == "resident" and sorted(s["holders"]) == sorted([w1.pid, w2.pid]), s
    assert svc.log().count("resident (") == 1, svc.log()
    h1, h2 = w1.ask("hash")["sha256"], w2.ask("hash")["sha256"]
    assert h1 == h2 == store["small_sha"]
    m1, m2 = w1.ask("matmul"), w2.ask("matmul")
    assert m1 == m2
    assert w1.info["layout_hash"] == w2.info["layout_hash"] == s["layout_hash"]
    say("two workers, one copy", set_bytes=s["bytes"], load_s=round(s["load_s"], 3), load=s["load"],
        map_s=[round(w1.info["map_s"], 4), round(w2.info["map_s"], 4)], read_only=w1.info["read_only"],
        gpu_free_drop=free0 - st["gpu"]["free"])


def test_release_and_reacquire_at_the_same_address(service, store):
    svc = service()
    wr = regions.map_weights(svc.sock, "small", device=0)
    t = wr.tensors()
    ptrs = {n: x.data_ptr() for n, x in t.items()}
    src = store["small_src"]
    for n, x in src.items():
        assert torch.equal(t[n].view(torch.uint8) if x.numel() else t[n], x.view(torch.uint8) if x.numel() else x), n
    assert svc.status()["sets"][0]["holders"] == [os.getpid()]
    t0 = time.perf_counter()
    wr.release()
    t_rel = time.perf_counter() - t0
    wr.release()                                        # idempotent
    assert not wr.mapped
    _wait(lambda: svc.status()["sets"][0]["holders"] == [], what="the hold to drop")
    t0 = time.perf_counter()
    wr.reacquire()
    t_acq = time.perf_counter() - t0
    t2 = wr.tensors()
    assert {n: x.data_ptr() for n, x in t2.items()} == ptrs
    assert all(t2[n] is t[n] for n in t)                # the same tensor objects, valid again
    assert _sha(t) == store["small_sha"]
    cai = wr.cuda_array_interface("t0.bfloat16")
    assert cai["data"][0] == ptrs["t0.bfloat16"] and cai["typestr"] == "<u2" and cai["shape"] == (1024, 4096)
    say("release/reacquire weights", release_ms=round(t_rel * 1e3, 2), reacquire_ms=round(t_acq * 1e3, 2),
        open_ms=round(wr.timings["open_s"] * 1e3, 2), map_ms=round(wr.timings["map_s"] * 1e3, 2),
        read_only=wr.read_only)
    wr.release()


def test_private_region_release_frees_memory_and_comes_back_at_the_same_address():
    size = 4 * GiB
    pr = regions.PrivateRegion(size, 0)
    kv = pr.tensor()
    kv.fill_(7)
    torch.cuda.synchronize()
    free_mapped, _ = vmm.mem_info(0)
    pr.release()
    free_released, _ = vmm.mem_info(0)
    assert free_released - free_mapped >= size - (64 << 20), (free_mapped, free_released)
    pr.reacquire()
    free_back, _ = vmm.mem_info(0)
    assert free_released - free_back >= size - (64 << 20)
    assert pr.tensor().data_ptr() == kv.data_ptr() == pr.va
    kv.fill_(3)                                         # the old tensor object works again
    torch.cuda.synchronize()
    assert int(kv[:1 << 20].sum()) == 3 << 20
    pr.release()
    # keep=True: the content survives a release (through host memory)
    k = regions.PrivateRegion(256 << 20, 0, keep=True)
    kt = k.tensor()
    pat = (torch.arange(kt.numel(), device="cuda:0", dtype=torch.int64) % 251).to(torch.uint8)
    kt.copy_(pat)
    t0 = time.perf_counter()
    k.release()
    t_rel = time.perf_counter() - t0
    t0 = time.perf_counter()
    k.reacquire()
    t_acq = time.perf_counter() - t0
    assert torch.equal(kt, pat)
    k.release()
    say("private region", freed_gib=round((free_released - free_mapped) / GiB, 3),
        keep_256MiB_release_ms=round(t_rel * 1e3, 1), keep_256MiB_reacquire_ms=round(t_acq * 1e3, 1))


def test_torch_pool_hook_puts_torch_allocations_in_a_releasable_region():
    size = 2 * GiB
    pr = regions.PrivateRegion(size, 0)
    with pr.torch_pool():
        kv = torch.empty(GiB, dtype=torch.uint8, device="cuda:0")     # what an engine does for its KV cache
        small = torch.zeros(1000, dtype=torch.float32, device="cuda:0")
    outside = torch.empty(1 << 20, dtype=torch.uint8, device="cuda:0")
    assert pr.va <= kv.data_ptr() < pr.va + pr.size and pr.va <= small.data_ptr() < pr.va + pr.size
    assert not pr.va <= outside.data_ptr() < pr.va + pr.size
    stats = regions.pool_stats()
    assert stats["base"] == pr.va and stats["live"] >= 1
    kv.fill_(5)
    torch.cuda.synchronize()
    free0 = vmm.mem_info(0)[0]
    pr.release()
    free1 = vmm.mem_info(0)[0]
    assert free1 - free0 >= size - (64 << 20)
    pr.reacquire()
    kv.fill_(9)
    small += 1
    torch.cuda.synchronize()
    assert int(kv[:1 << 20].sum()) == 9 << 20 and float(small.sum()) == 1000.0
    say("torch pool hook", kv_ptr=hex(kv.data_ptr()), region=hex(pr.va), pool=stats,
        freed_gib=round((free1 - free0) / GiB, 3))
    del kv, small
    pr.release()


# ---------------------------------------------------------------- faults

def test_layout_hash_mismatch_is_refused(service):
    svc = service()
    bad = "sha256:" + "0" * 64
    with svc.client() as c:
        good = c.ensure("small")["layout_hash"]
        with pytest.raises(P.GmsError) as e:
            c.open("small", bad)
        assert e.value.code == "mismatch"
        assert str(e.value) == (f"weight set 'small' has layout hash {good}, the worker asked for {bad}: refusing to "
                                "map other weights at its addresses")
        assert c.status()["sets"][0]["holders"] == []
    say("layout mismatch refused", message=str(e.value))


def test_missing_set_without_a_store_is_refused(service, tmp_path):
    empty = tmp_path / "empty-store"
    empty.mkdir()
    svc = service(store_dir=str(empty))
    with svc.client() as c:
        with pytest.raises(P.GmsError) as e:
            c.open("small")
        assert e.value.code == "not_found"
        assert str(e.value).startswith("weight set 'small' is not resident and cannot be loaded: ")
        assert c.status()["sets"] == []
    say("missing set refused", message=str(e.value))


def test_a_set_larger_than_free_gpu_memory_is_refused_and_nothing_leaks(service, store):
    svc = service()
    assert svc.status()["gpu"]["free"]                   # the service's context exists before the GPU fills up
    hog = []                                             # leave less free memory than the set needs
    while True:
        left = vmm.mem_info(0)[0] - (24 << 20)
        if left < (2 << 20):
            break
        try:
            hog.append(torch.empty(min(left, GiB), dtype=torch.uint8, device="cuda:0"))
        except torch.OutOfMemoryError:
            break
    try:
        with svc.client() as c:
            with pytest.raises(P.GmsError) as e:
                c.ensure("small")
            assert e.value.code == "failed" and "needs" in str(e.value) and "of GPU memory is free" in str(e.value)
            st = c.status()
            assert st["resident_bytes"] == 0 and st["sets"][0]["state"] == "failed"
    finally:
        del hog
        torch.cuda.empty_cache()
    with svc.client() as c:                              # a failed set is retried on the next ensure
        assert c.ensure("small")["state"] == "resident"
    # and the budget is a limit of its own
    svc2 = service("--max-bytes", "16M")
    with svc2.client() as c:
        with pytest.raises(P.GmsError, match=r"more than this service's budget \(--max-bytes 16.0 MiB\)"):
            c.ensure("small")
    say("too large refused", message=str(e.value))


def test_a_corrupt_shard_fails_the_load_and_frees_its_memory(service, store, tmp_path):
    import shutil
    bad = tmp_path / "bad-store"
    shutil.copytree(store["dir"], bad)
    shard = store["small"].shard_path(0).replace(store["dir"], str(bad))
    with open(shard, "r+b") as f:                        # one flipped byte in the first shard
        f.seek(4096 + 17)
        b = f.read(1)
        f.seek(4096 + 17)
        f.write(bytes([b[0] ^ 0xFF]))
    svc = service(store_dir=str(bad))
    free0 = svc.status()["gpu"]["free"]
    with svc.client() as c:
        with pytest.raises(P.GmsError) as e:
            c.open("small")
        assert e.value.code == "failed" and str(e.value).startswith("loading weight set 'small' failed: ")
        st = c.status()
    assert st["sets"][0]["state"] == "failed" and st["resident_bytes"] == 0 and st["sets"][0]["holders"] == []
    assert st["gpu"]["free"] >= free0 - (64 << 20)       # the allocation of the failed load is gone
    say("corrupt shard refused", message=str(e.value))


def test_service_killed_while_a_worker_holds_a_mapping(service, workers, store, tmp_path, monkeypatch):
    """In a worker process, so that a CUDA error (if the driver behaved otherwise) cannot poison this one."""
    monkeypatch.setenv("DYNSNAP_RUN_DIR", str(tmp_path / "run"))
    svc = service()
    w = workers(svc.sock, "small")
    p0 = w.ask("ptrs")
    svc.kill()
    # the imported allocation keeps its memory while the worker holds it: never wrong data
    assert w.ask("hash")["sha256"] == store["small_sha"]
    name = AC.find([w.pid])
    AC.quiesce(name)                                   # release works without the service
    with pytest.raises(AC.AgentError) as e:
        AC.resume(name)                                # reacquire needs the service: a clear error
    assert f"resume failed in pid {w.pid}: GmsError: cannot reach the GPU memory service at {svc.sock}" in str(e.value)
    svc.start()                                        # restarted: it loads the set again, same layout hash
    AC.resume(name)
    assert w.ask("ptrs") == p0
    assert w.ask("hash")["sha256"] == store["small_sha"]
    say("service killed and restarted", resume_error=str(e.value))


def test_service_killed_mid_load_leaks_nothing(service, big):
    svc = service()
    free0 = vmm.mem_info(0)[0]
    errs = []

    def ensure():
        try:
            with svc.client() as c:
                c.ensure("big")
        except P.GmsError as e:
            errs.append(e)

    th = threading.Thread(target=ensure)
    th.start()
    _wait(lambda: any(s["state"] == "loading" for s in svc.status()["sets"]), what="the load to start")
    svc.kill()                                           # (the load imports torch first: seconds in "loading")
    th.join(60)
    assert not errs or errs[0].code == "unreachable", errs
    _wait(lambda: vmm.mem_info(0)[0] >= free0 - (256 << 20), what="the GPU memory to come back")
    svc.start()
    st = svc.status()
    assert st["sets"] == [] and st["resident_bytes"] == 0
    say("killed mid-load", error=str(errs[0]) if errs else "(it finished first)", free_gib=round(vmm.mem_info(0)[0] / GiB, 2))


def test_worker_killed_holding_a_set_drops_its_hold(service, workers):
    svc = service()
    w = workers(svc.sock, "small")
    assert svc.status()["sets"][0]["holders"] == [w.pid]
    w.kill()
    _wait(lambda: svc.status()["sets"][0]["holders"] == [], what="the dead worker's hold to drop")
    free_before = svc.status()["gpu"]["free"]
    set_bytes = svc.status()["sets"][0]["bytes"]
    with svc.client() as c:
        r = c.evict("small")
    assert r["freed_bytes"] == set_bytes > 0
    st = svc.status()
    assert st["sets"] == [] and st["resident_bytes"] == 0
    assert st["gpu"]["free"] >= free_before + r["freed_bytes"] - (64 << 20)
    say("worker killed", freed=r["freed_bytes"], free_after=st["gpu"]["free"])


# ---------------------------------------------------------------- snapshot round trip

@pytest.mark.criu
def test_snapshot_round_trip_keeps_weights_and_kv_out_of_the_image(service, workers, big, tmp_path, monkeypatch):
    import dynsnap_core
    subreaper()
    monkeypatch.setenv("DYNSNAP_RUN_DIR", str(tmp_path / "run"))     # where the workers' agents write their files
    svc = service()
    w = workers(svc.sock, "big", kv_mb=1024)
    h0, m0 = w.ask("hash")["sha256"], w.ask("matmul")
    p0 = w.ask("ptrs")
    assert h0 == big["sha"]
    w.ask("kv_write")
    # dynsnap checkpoint quiesces the worker through its agent (regions released, the manifest names the set)
    t0 = time.perf_counter()
    snap = dynsnap_core.checkpoint(w.pid, str(tmp_path / "snap"), leave_running=False)
    t_ckpt = time.perf_counter() - t0
    entry = snap.manifest["gms"]["agents"][0]
    assert entry["agent"] == w.info["agent"]
    assert entry["weight_sets"][0]["layout_hash"] == w.info["layout_hash"] and entry["service_sockets"] == [svc.sock]
    assert entry["weight_sets"][0]["service"] == svc.sock and entry["weight_sets"][0]["set"] == "big"
    assert svc.status()["sets"][0]["holders"] == []           # the quiesced worker let go of the set
    image = snap.total_bytes
    w.kill()
    r = None
    try:
        t0 = time.perf_counter()
        r = dynsnap_core.restore(str(tmp_path / "snap"))     # sets made resident beside CRIU, agent resumed
        t_rest = time.perf_counter() - t0
        assert r.pid == w.pid and r.timings["gms_resume"] >= 0
        assert w.ask("ptrs") == p0                     # same addresses
        assert w.ask("hash")["sha256"] == h0
        assert w.ask("matmul") == m0
        w.ask("kv_write")                               # KV content is not kept (fresh memory), but the pool
        assert w.ask("kv_check")["same"] is True        # is there, at its address, and writable
        assert image < big["bytes"] / 2, (image, big["bytes"])
        say("snapshot round trip", weights_bytes=big["bytes"], image_bytes=image, checkpoint_s=round(t_ckpt, 2),
            checkpoint_timings=snap.manifest.get("timings"), restore_s=round(t_rest, 2), restore_timings=r.timings)
    finally:
        if r is not None:
            r.kill()
            try:
                reap(r.pid)
            except Exception:  # noqa: BLE001
                pass


# ---------------------------------------------------------------- the reference worker

def _e2e(tmp_path, *extra: str):
    sock, ready = tmp_path / f"e2e-{uuid.uuid4().hex[:8]}.sock", tmp_path / f"ready-{uuid.uuid4().hex[:8]}"
    log = tmp_path / f"e2e-{uuid.uuid4().hex[:8]}.log"
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "DYNSNAP_RUN_DIR": str(tmp_path / "run")}
    with open(log, "ab") as lf:
        p = subprocess.Popen([sys.executable, "-m", "dynsnap_core.demo.llm_worker", "--model", "tiny", "--weights",
                              str(tmp_path / "weights"), "--sock", str(sock), "--ready", str(ready), "--kv-gb", "0.5",
                              *extra], stdout=lf, stderr=subprocess.STDOUT, cwd=ROOT, env=env, start_new_session=True)
    end = time.monotonic() + 600
    while not ready.exists():
        assert p.poll() is None and time.monotonic() < end, log.read_text()[-4000:]
        time.sleep(0.1)
    return p, json.loads(ready.read_text()), str(sock)


def _ask_e2e(sock: str, req: dict) -> dict:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(300)
    s.connect(sock)
    with s, s.makefile("rwb") as f:
        f.write((json.dumps(req) + "\n").encode())
        f.flush()
        rep = json.loads(f.readline())
    assert rep.get("ok"), rep
    return rep


def test_reference_worker_tokens_identical_with_gms(service, store, tmp_path):
    pytest.importorskip("transformers")
    from dynsnap_core.demo.llm_worker import PROMPT
    svc = service()
    procs = []
    try:
        p1, r1, s1 = _e2e(tmp_path)                     # writes the random weights file once
        procs.append(p1)
        p2, r2, s2 = _e2e(tmp_path, "--gms", svc.sock, "--weights-store", store["dir"])
        procs.append(p2)
        assert r2["agent"] and r1["tokens"] == r2["tokens"], (r1, r2)
        st = svc.status()
        assert [x["holders"] for x in st["sets"] if x["name"].startswith("tiny-")] == [[p2.pid]]
        tq = AC.quiesce(r2["agent"])
        _wait(lambda: all(x["holders"] == [] for x in svc.status()["sets"]), what="the quiesced worker to let go")
        tr = AC.resume(r2["agent"])
        got = _ask_e2e(s2, {"op": "generate", "tokens": PROMPT, "max_new": 16})["tokens"]
        assert got == r1["tokens"]
        say("reference worker on GMS", tokens=got[:8], load_s=round(r2["load_s"], 3),
            load_s_plain=round(r1["load_s"], 3), quiesce=tq, resume=tr)
    finally:
        for p in procs:
            p.kill()
            p.wait()
