"""The host memory service with real processes: load/verify/get, busy while restoring, corrupt input, dying clients,
create/publish, weight-directory dedup, bad requests. The service survives all of it."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dynsnap_core import memfd, memsvc
from dynsnap_core.weights.store import WeightDir
from helpers import kill_proc, request_json, wait_ready

HERE = Path(__file__).parent
MiB = 1 << 20


class Service:
    def __init__(self, tmp: Path, **env: str):
        self.path = tmp / f"svc{time.monotonic_ns()}.sock"
        self.log = open(tmp / "memsvc.log", "ab")
        self.popen = memsvc.spawn(self.path, threads=2, log=self.log, env=env, allow=[tmp])

    def client(self) -> memsvc.Client:
        return memsvc.Client(self.path, timeout=60)

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self.log.close()


class ClientProc:
    """tests/workloads/memsvc_client.py: attaches a region and answers control requests."""

    def __init__(self, tmp: Path, service: Path, region: str):
        tag = time.monotonic_ns()
        self.sock, self.ready = tmp / f"c{tag}.sock", tmp / f"c{tag}.ready"
        self.log = open(tmp / "client.log", "ab")
        self.popen = subprocess.Popen(
            [sys.executable, str(HERE / "workloads" / "memsvc_client.py"), "--service", str(service),
             "--region", region, "--sock", str(self.sock), "--ready", str(self.ready)],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log, start_new_session=True,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
        self.pid = self.popen.pid
        wait_ready(self.popen, self.ready, tmp / "client.log", "client failed")

    def request(self, what: str) -> dict:
        return request_json(self.sock, what, timeout=90)

    def kill(self) -> None:
        kill_proc(self.popen)
        self.log.close()


@pytest.fixture
def service(tmp_path):
    made: list[Service] = []

    def start(**env: str) -> Service:
        s = Service(tmp_path, **env)
        made.append(s)
        return s
    yield start
    for s in made:
        s.stop()


@pytest.fixture
def client_proc(tmp_path):
    made: list[ClientProc] = []

    def start(service: Path, region: str) -> ClientProc:
        c = ClientProc(tmp_path, service, region)
        made.append(c)
        return c
    yield start
    from dynsnap_core.proc import reap_children
    for c in made:
        c.kill()
    time.sleep(0.05)
    reap_children()


def load_ready(c: memsvc.Client, name: str, path: Path, digest: str) -> None:
    """Load a region and wait until the service has verified it (get, close, release): ready to attach."""
    c.load(name, path, digest=digest)
    c.get(name).close()
    c.release(name)


@pytest.fixture
def weights(tmp_path):
    data = os.urandom(24 * MiB + 77)
    p = tmp_path / "weights.bin"
    p.write_bytes(data)
    return p, data, memfd.digest(data)


def test_load_verify_get(service, weights):
    p, data, dig = weights
    svc = service()
    with svc.client() as c:
        assert c.load("w", p, digest=dig) in ("loading", "ready")
        with c.get("w", wait=True) as m:
            assert m.sealed and m.size == len(data) and m.digest == dig
            assert bytes(m.view()) == data
        [info] = c.list()
        assert info["state"] == "ready" and info["holders"] == 1 and info["digest"] == dig
        assert c.load("w", p, digest=dig) == "ready"          # same content: nothing to do
        with pytest.raises(memsvc.MemsvcError) as ei:
            c.get("missing")
        assert ei.value.code == "not_found"


def test_busy_while_restoring_then_handed_out_verified(service, weights):
    p, data, dig = weights
    svc = service(DYNSNAP_MEMSVC_LOAD_DELAY="1.0")
    with svc.client() as a, svc.client() as b:
        a.load("w", p, digest=dig)
        with pytest.raises(memsvc.MemsvcError, match="being restored") as ei:
            b.get("w", wait=False)
        assert ei.value.code == "busy"
        with b.get("w", wait=True) as m:
            assert m.digest == dig and memfd.digest(m.view()) == dig


def test_corrupt_input_is_never_handed_out(service, weights, tmp_path):
    p, data, dig = weights
    svc = service()
    bad = tmp_path / "bad.bin"
    bad.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    with svc.client() as c:
        c.load("flipped", bad, digest=dig)
        with pytest.raises(memsvc.MemsvcError, match="checksum mismatch") as ei:
            c.get("flipped", wait=True)
        assert ei.value.code == "failed"
        c.load("short", p, offset=0, length=len(data) + 4096, digest=dig)
        with pytest.raises(memsvc.MemsvcError, match="beyond the end of the file"):
            c.get("short", wait=True)
        c.load("good", p, digest=dig)
        with c.get("good") as m:
            assert m.digest == dig
        states = {r["name"]: r["state"] for r in c.list()}
        assert states == {"flipped": "failed", "short": "failed", "good": "ready"}
        with pytest.raises(memsvc.MemsvcError) as ei:
            c.request({"op": "frobnicate"})
        assert ei.value.code == "bad_request"
        assert c.ping()["pid"] == svc.popen.pid


def test_client_dying_while_holding_a_region(service, weights, client_proc):
    p, data, dig = weights
    svc = service()
    with svc.client() as c:
        load_ready(c, "w", p, dig)
        cp = client_proc(svc.path, "w")
        info = cp.request("info")
        assert info["attached"] and info["digest"] == dig and info["mapped"] and info["memfd_fds"] == 0
        assert [r["holders"] for r in c.list()] == [1]
        with pytest.raises(memsvc.MemsvcError) as ei:
            c.drop("w")
        assert ei.value.code == "held"
        os.kill(cp.pid, signal.SIGKILL)
        cp.popen.wait(timeout=10)
        end = time.monotonic() + 10
        while c.list()[0]["holders"] and time.monotonic() < end:
            time.sleep(0.02)
        assert c.list()[0]["holders"] == 0
        with c.get("w") as m:                     # still served to the others
            assert bytes(m.view()) == data
        c.drop("w")
        assert c.list() == []


def test_create_fill_publish_and_share(service):
    svc = service()
    payload = os.urandom(5 * MiB + 3)
    with svc.client() as a, svc.client() as b:
        att = memsvc.Attachment.create(a, "made", len(payload), lambda v: v.__setitem__(slice(None), payload))
        try:
            assert att.attached and att.digest == memfd.digest(payload)
            assert bytes(att.view()) == payload
            with b.get("made") as m:
                assert m.sealed and bytes(m.view()) == payload
                with pytest.raises(PermissionError):
                    m.view(writable=True)
        finally:
            att.close()
        with pytest.raises(memsvc.MemsvcError) as ei:
            b.create("made", 10)
        assert ei.value.code == "exists"


def test_unpublished_region_of_a_dead_client_is_dropped(service):
    svc = service()
    code = ("import sys, os; from dynsnap_core import memsvc; c = memsvc.Client(sys.argv[1]); "
            "m = c.create('half', 4096); print('made', flush=True); os._exit(0)")
    out = subprocess.run([sys.executable, "-c", code, str(svc.path)], capture_output=True, text=True, timeout=60)
    assert "made" in out.stdout
    with svc.client() as c:
        end = time.monotonic() + 10
        while c.list() and time.monotonic() < end:
            time.sleep(0.02)
        assert c.list() == []


def test_save_stores_content_once(service, weights, tmp_path):
    p, data, dig = weights
    svc = service()
    store = tmp_path / "store"
    with svc.client() as c:
        c.load_many([{"name": "a", "path": p, "digest": dig}, {"name": "b", "path": p, "digest": dig}])
        c.get("a").close()
        c.get("b").close()
        saved = c.save(["a", "b"], store)
        assert saved["a"]["digest"] == saved["b"]["digest"] == dig
        assert [saved["a"]["written"], saved["b"]["written"]] == [True, False]
        again = c.save(["a"], store)
        assert again["a"]["written"] is False
    objs = WeightDir(store).list()
    assert len(objs) == 1 and objs[0].digest == dig and Path(objs[0].path).read_bytes() == data
