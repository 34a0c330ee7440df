"""Agent faults: SIGKILL mid-checkpoint (nothing half-visible, the worker runs, the job says failed), 100 requests at once."""
from __future__ import annotations

import asyncio
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from agent_helpers import AgentProc

pytestmark = [pytest.mark.criu, pytest.mark.root]


@pytest.fixture
def sockdir():
    d = Path(tempfile.mkdtemp(prefix="dynsnap-agent-test-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def agents():
    made: list[AgentProc] = []
    yield made
    for a in made:
        a.stop()


def _wait_running(w, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while w.state() in ("T", "t"):
        assert time.monotonic() < end, "the worker stayed stopped"
        time.sleep(0.02)


@pytest.mark.parametrize("phase", ["criu dump", "persist"])
def test_sigkill_mid_checkpoint(phase, agents, workload, tmp_path, sockdir):
    home = tmp_path / "home"
    a = AgentProc(home, sockdir / "agent.sock").start()
    agents.append(a)
    w = workload("--mem-mb", "400")
    before = w.request()
    job = a.client.post("/v1/snapshots", json={"pid": w.pid, "name": "k"}).json()
    # kill as soon as the job reports the phase (or a later one, should a poll miss it: still mid-checkpoint)
    later = {"criu dump": ("criu dump", "persist"), "persist": ("persist",)}[phase]
    end = time.monotonic() + 120
    while True:
        j = a.client.get(f"/v1/jobs/{job['id']}").json()
        if j["phase"] in later:
            break
        assert j["state"] in ("queued", "running") and time.monotonic() < end, j
        time.sleep(0.005)
    assert j["state"] == "running", j
    dead = a.popen.pid
    a.kill(signal.SIGKILL)
    _wait_running(w)
    # the worker goes on: same process, its state intact
    after = w.request()
    assert after["all_ok"] and after["pid"] == w.pid and after["counter"] == before["counter"] + 1

    b = AgentProc(home, sockdir / "agent.sock").start()     # the stale socket is replaced
    agents.append(b)
    j = b.client.get(f"/v1/jobs/{job['id']}").json()
    assert j["state"] == "failed" and j["error"]["error"] == "AgentRestarted"
    seen = j["phase"]
    assert seen in later
    listing = sorted(os.listdir(home / "snapshots"))
    if listing == ["k"]:
        # the agent died in the instant after the commit: the snapshot is complete, and the job says so
        assert seen == "persist"
        import dynsnap_core as ds
        assert ds.open_snapshot(home / "snapshots" / "k").verify() > 0
        assert j["error"]["message"] == ("the agent stopped while this job was running (during persist); the "
                                         "snapshot k was committed on this node before that and is complete")
        b.client.delete("/v1/snapshots/k")
    else:
        assert listing == [], "no staging and no half snapshot left"
        assert j["error"]["message"] == (f"the agent stopped while this job was running (during {seen}); "
                                         "nothing it started was kept")
    assert b.client.get("/v1/snapshots").json() == []
    assert not [p for p in os.listdir("/dev/shm") if p.startswith(f"dynsnap-dump-{dead}-")]
    # and the worker can be snapshotted by the new agent
    again = b.client.post("/v1/snapshots", json={"pid": w.pid, "name": "k", "leave_running": True}).json()
    assert b.wait_job(again["id"])["state"] == "succeeded"
    assert w.request()["all_ok"]


def test_hundred_concurrent_requests(agents, workload, tmp_path, sockdir):
    """list, check and snapshots of different workers at once: all answered, no snapshot lost or mixed up."""
    a = AgentProc(tmp_path / "home", sockdir / "agent.sock").start()
    agents.append(a)
    base_w = workload()
    first = a.client.post("/v1/snapshots", json={"pid": base_w.pid, "name": "base", "leave_running": True}).json()
    assert a.wait_job(first["id"])["state"] == "succeeded"
    workers = [workload("--mem-mb", "8") for _ in range(4)]
    pids_before = {w.pid: w.request()["counter"] for w in workers}

    async def fire() -> list:
        transport = httpx.AsyncHTTPTransport(uds=str(a.sock))
        async with httpx.AsyncClient(transport=transport, base_url="http://agent", timeout=300) as c:
            reqs = []
            for i in range(100):
                if i % 25 == 0:
                    w = workers[i // 25]
                    reqs.append(c.post("/v1/snapshots", json={"pid": w.pid, "name": f"c{i // 25}",
                                                              "leave_running": True}))
                elif i % 3 == 0:
                    reqs.append(c.post("/v1/snapshots/base/check"))
                elif i % 3 == 1:
                    reqs.append(c.get("/v1/snapshots"))
                else:
                    reqs.append(c.get("/healthz"))
            return await asyncio.gather(*reqs)
    answers = asyncio.run(fire())
    assert len(answers) == 100
    assert [r.status_code for r in answers if r.status_code not in (200, 202)] == []
    jobs = [r.json() for r in answers if r.status_code == 202]
    assert len(jobs) == 4
    for r in answers:
        if r.request.url.path == "/v1/snapshots/base/check":
            assert [f["name"] for f in r.json()["facts"] if f["status"] == "refuse"] == ["pids"]
        elif r.request.url.path == "/v1/snapshots" and r.request.method == "GET":
            assert "base" in [x["name"] for x in r.json()]
    for j in jobs:
        done = a.wait_job(j["id"])
        assert done["state"] == "succeeded", done
    listing = {x["name"]: x["pid"] for x in a.client.get("/v1/snapshots").json()}
    assert listing == {"base": base_w.pid, **{f"c{i}": workers[i].pid for i in range(4)}}
    for i, w in enumerate(workers):
        m = a.client.get(f"/v1/snapshots/c{i}").json()["manifest"]
        assert m["root_pid"] == w.pid and m["cmdline"] == [str(x) for x in w.popen.args]
        assert w.request()["counter"] == pids_before[w.pid] + 1
