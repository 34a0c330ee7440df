"""The in-worker agent's quiesce/resume protocol with a real worker process (engine callbacks only: no GPU).

The worker starts the agent (abstract socket + agent file), registers two engine callbacks that log to a
file, and sleeps. dynsnap's side (agent_client) finds it, pings, quiesces, resumes; the agent closes every
accepted connection itself, so the worker holds only its listening socket between requests.
"""
from __future__ import annotations

import json
import os
import re
import socket
import struct
import subprocess
import sys
import time

import pytest

from dynsnap_core.gms import agent as A, agent_client as AC
from helpers import ROOT

pytestmark = pytest.mark.timeout(120)

WORKER = r'''
import os, sys, time
from dynsnap_core.gms import agent
log = sys.argv[1]
def note(what):
    with open(log, "a") as f:
        f.write(what + "\n")
def q():
    note("quiesce")
    if os.environ.get("FAIL_QUIESCE"):
        raise RuntimeError("drain refused")
def r():
    note("resume")
agent.register(quiesce=q, resume=r)
agent.register(quiesce=lambda: note("quiesce2"), resume=lambda: note("resume2"))
name = agent.start()
with open(sys.argv[2] + ".tmp", "w") as f:
    f.write(name)
os.replace(sys.argv[2] + ".tmp", sys.argv[2])
while True:
    time.sleep(1)
'''


@pytest.fixture
def rundir(tmp_path, monkeypatch):
    d = tmp_path / "run"
    monkeypatch.setenv("DYNSNAP_RUN_DIR", str(d))
    return d


@pytest.fixture
def start_worker(tmp_path, rundir):
    procs = []

    def start(**env):
        log, ready = tmp_path / f"events{len(procs)}", tmp_path / f"ready{len(procs)}"
        with open(tmp_path / "err", "ab") as err:
            p = subprocess.Popen([sys.executable, "-c", WORKER, str(log), str(ready)], cwd=ROOT,
                                 env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=err)
        procs.append(p)
        end = time.monotonic() + 60
        while not ready.exists():
            assert p.poll() is None and time.monotonic() < end, (tmp_path / "err").read_text()
            time.sleep(0.02)
        return p, ready.read_text(), log

    yield start
    for p in procs:
        p.kill()
        p.wait()


def events(log) -> list[str]:
    return log.read_text().split() if log.exists() else []


def sockets(pid: int) -> int:
    n = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            n += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
        except OSError:
            pass
    return n


def test_find_ping_quiesce_resume(start_worker, rundir):
    p, name, log = start_worker()
    assert re.fullmatch(rf"dynsnap-agent-{p.pid}-[0-9a-f]{{16}}", name)
    rec = json.loads((rundir / "agents" / f"{p.pid}.json").read_text())
    assert rec["pid"] == p.pid and rec["name"] == name and rec["start_time"] == A._start_time(p.pid)
    assert AC.find([os.getpid(), p.pid]) == name
    base = sockets(p.pid)
    assert AC.ping(name)["state"] == "running"
    t = AC.quiesce(name)
    assert events(log) == ["quiesce", "quiesce2"]
    assert t["regions"] == 0 and set(t) >= {"callbacks_s", "release_s", "total_s", "client_s"}
    assert sockets(p.pid) == base          # the agent closed the accepted connection before we saw EOF
    assert AC.ping(name)["state"] == "quiesced"
    t = AC.resume(name)
    assert events(log) == ["quiesce", "quiesce2", "resume2", "resume"]
    assert set(t) >= {"reacquire_s", "callbacks_s", "total_s", "client_s"}
    assert AC.manifest_entry(name) == {"agent": name, "pid": p.pid, "weight_sets": [], "service_sockets": [],
                                       "private_bytes": 0}
    assert sockets(p.pid) == base and p.poll() is None


def test_a_failing_quiesce_is_reported_and_the_worker_keeps_running(start_worker):
    p, name, log = start_worker(FAIL_QUIESCE="1")
    with pytest.raises(AC.AgentError) as e:
        AC.quiesce(name)
    assert str(e.value) == f"quiesce failed in pid {p.pid}: RuntimeError: drain refused"
    # the worker lives; its state says a quiesce stopped half-way, and resume undoes it
    assert p.poll() is None and AC.ping(name)["state"] == "quiescing"
    assert AC.resume(name).get("already") is None
    assert AC.ping(name)["state"] == "running"


def test_malformed_agent_requests_are_answered_and_the_agent_keeps_serving(start_worker):
    p, name, _log = start_worker()
    for data in (b"\x03\x00\x00\x00abc", struct.pack("<I", 1 << 20), b'\x0f\x00\x00\x00{"op": "reboot"}'):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(10)
        s.connect("\0" + name)
        s.sendall(data)
        body = b""
        while True:
            b = s.recv(65536)
            if not b:
                break
            body += b
        s.close()
        rep = json.loads(body[4:])
        assert rep["ok"] is False and ("malformed agent request" in rep["error"] or "unknown agent request" in rep["error"])
    assert AC.ping(name)["ok"] and p.poll() is None


def test_find_without_an_agent_a_stale_file_and_a_renamed_socket(start_worker, rundir):
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        assert AC.find([sleeper.pid]) is None                     # a worker without the agent: checkpoint as today
        (rundir / "agents").mkdir(parents=True, exist_ok=True)
        (rundir / "agents" / f"{sleeper.pid}.json").write_text(json.dumps(
            {"pid": sleeper.pid, "name": f"dynsnap-agent-{sleeper.pid}-0123456789abcdef", "start_time": 1}))
        assert AC.find([sleeper.pid]) is None                     # stale record, no such socket
    finally:
        sleeper.kill()
        sleeper.wait()
    p, name, _log = start_worker()
    os.unlink(rundir / "agents" / f"{p.pid}.json")
    assert AC.find([p.pid]) == name                               # found by its bound name alone
    assert AC.find([]) is None


def test_renamed_maps_a_restored_name():
    old = "dynsnap-agent-42-0123456789abcdef"
    new = "dynsnap-agent-42-0123fedcba987654"
    assert AC.renamed(old, {b"\0" + old.encode(): b"\0" + new.encode()}) == new
    assert AC.renamed(old, {}) == old


def test_unreachable_agent_is_one_sentence():
    with pytest.raises(AC.AgentError, match=r"^cannot reach the worker's agent @dynsnap-agent-0-none: "):
        AC.ping("dynsnap-agent-0-none", timeout=2)


def test_wiring_without_an_agent_a_failed_quiesce_and_renamed_agents(start_worker, tmp_path):
    from dynsnap_core.gms import protocol as P, wiring
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        assert wiring.before_checkpoint([sleeper.pid]) is None     # no agent: the checkpoint goes on as today
        assert AC.find_all([sleeper.pid]) == []
    finally:
        sleeper.kill()
        sleeper.wait()
    assert wiring.after_restore(None) == {} and wiring.after_restore({"agents": []}) == {}
    assert wiring.before_restore({"agents": [{"weight_sets": []}]}).wait() == {}
    # two workers with agents (one fails its quiesce): both are resumed again, the error is raised
    good, gname, glog = start_worker()
    bad, bname, blog = start_worker(FAIL_QUIESCE="1")
    assert AC.find_all([good.pid, os.getpid(), bad.pid]) == [gname, bname]
    with pytest.raises(AC.AgentError, match="drain refused"):
        wiring.before_checkpoint([good.pid, bad.pid])
    assert events(glog) == ["quiesce", "quiesce2", "resume2", "resume"]
    assert events(blog) == ["quiesce", "resume2", "resume"]         # nothing stays paused
    assert AC.ping(gname)["state"] == AC.ping(bname)["state"] == "running"
    # a restore that renamed both agents' sockets: after_restore resumes them under their new names
    p2, name2, log2 = start_worker()
    q = wiring.before_checkpoint([p2.pid, good.pid])
    assert q.names == [name2, gname] and len(q.manifest["agents"]) == 2
    olds = [n[:-16] + "0" * 16 for n in (name2, gname)]
    gms = {"agents": [{**e, "agent": o} for e, o in zip(q.manifest["agents"], olds)]}
    renames = {b"\0" + o.encode(): b"\0" + n.encode() for o, n in zip(olds, (name2, gname))}
    t = wiring.after_restore(gms, wiring.before_restore(gms), renames)
    assert t["gms_agents"] == [name2, gname] and events(log2) == ["quiesce", "quiesce2", "resume2", "resume"]
    assert AC.ping(gname)["state"] == "running"
    # weight sets whose service is gone: waiting for them raises the service's sentence
    gms = {"agents": [{"agent": name2, "weight_sets": [{"set": "x", "layout_hash": None,
                                                        "service": str(tmp_path / "no.sock")}]}]}
    pre = wiring.before_restore(gms)
    with pytest.raises(P.GmsError, match="cannot reach the GPU memory service at"):
        pre.wait(30)
    with pytest.raises(P.GmsError, match="cannot reach the GPU memory service at"):
        wiring.after_restore(gms, pre, {})
