"""A worker running the dynsnap agent through real CRIU checkpoints and restores (CPU: engine callbacks only).

What the checkpoint/restore wiring relies on: the agent's abstract listening socket and thread survive a dump
and a restore, the agent answers afterwards, find() locates it again (the agent file's start time no longer
matches the restored process: the bound name is found instead), quiesce leaves no connected socket in the
worker, and a second cycle works the same.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from dynsnap_core.gms import agent_client as AC, wiring
from helpers import ROOT, wait_ready

pytestmark = [pytest.mark.criu, pytest.mark.root, pytest.mark.timeout(300)]

WORKER = r'''
import os, sys, time
from dynsnap_core.gms import agent
log = sys.argv[1]
def note(what):
    with open(log, "a") as f:
        f.write(what + "\n")
agent.register(quiesce=lambda: note("quiesce"), resume=lambda: note("resume"))
agent.start()
open(sys.argv[2], "w").close()
while True:
    time.sleep(0.05)
'''


def _kill(pid: int) -> None:
    from dynsnap_core.proc import kill_and_reap
    kill_and_reap([pid])


def test_agent_worker_survives_checkpoint_and_restore_twice(tmp_path, home, monkeypatch):
    """dynsnap checkpoint quiesces the worker through its agent and records the agent in the manifest; restore
    resumes it; once stopped by the checkpoint, once left running (then the source is resumed right after the
    dump and the restored copy is resumed again after its restore)."""
    import dynsnap_core as ds
    monkeypatch.setenv("DYNSNAP_RUN_DIR", str(tmp_path / "run"))
    events, ready, logp = tmp_path / "events", tmp_path / "ready", tmp_path / "worker.log"
    with open(logp, "ab") as log:
        p = subprocess.Popen([sys.executable, "-c", WORKER, str(events), str(ready)], cwd=ROOT,
                             stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
                             env={**os.environ, "DYNSNAP_RUN_DIR": str(tmp_path / "run")})
    pid = p.pid
    try:
        wait_ready(p, ready, logp, "agent worker failed to start")
        name = AC.find([pid])
        assert name is not None and name.startswith(f"dynsnap-agent-{pid}-")
        assert wiring.before_checkpoint([os.getpid()]) is None       # no agent in that tree: checkpoint as today
        for cycle, leave in ((1, False), (2, True)):
            snap = ds.checkpoint(pid, tmp_path / f"snap{cycle}", leave_running=leave)
            m = snap.manifest
            assert m["root_pid"] == pid
            assert [a["agent"] for a in m["gms"]["agents"]] == [name]
            assert m["gms"]["agents"][0]["weight_sets"] == [] and m["gms"]["agents"][0]["pid"] == pid
            assert m["timings"]["gms_quiesce"] >= 0
            if leave:
                assert m["timings"]["gms_resume"] >= 0
                assert AC.ping(name)["state"] == "running"     # the source serves again after the dump
                _kill(pid)
            else:
                p.wait(30)                             # the checkpoint stopped the original: reap it
            r = ds.restore(snap.path)
            assert r.pid == pid and r.timings["gms_resume"] >= 0
            name2 = AC.find([pid])
            assert name2 == name                       # nobody took the name meanwhile: no rename
            assert AC.ping(name2)["state"] == "running"
            assert AC.resume(name2).get("already") is True             # resuming a running worker: a no-op
        # cycle 1: quiesce (checkpoint), resume (restore); cycle 2: quiesce, resume (source), resume (restored copy)
        assert events.read_text().split() == ["quiesce", "resume", "quiesce", "resume", "resume"]
    finally:
        _kill(pid)


def test_agent_of_a_worker_under_dynsnap_run_is_found_and_quiesced(tmp_path, home, monkeypatch):
    """Under `dynsnap run` the worker knows itself by another pid (its own pid namespace): the checkpoint still
    finds its agent (by the socket it holds) and quiesces it, and the restore resumes it."""
    import dynsnap_core as ds
    from dynsnap_core import proc
    from dynsnap_core.launch import launch
    monkeypatch.setenv("DYNSNAP_RUN_DIR", str(tmp_path / "run"))
    events, ready = tmp_path / "events", tmp_path / "ready"
    env = {**os.environ, "DYNSNAP_RUN_DIR": str(tmp_path / "run"),
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    pid = launch([sys.executable, "-c", WORKER, str(events), str(ready)], log=str(tmp_path / "worker.log"),
                 cwd=str(tmp_path), env=env)
    try:
        end = time.monotonic() + 60
        while not ready.exists():
            assert time.monotonic() < end, (tmp_path / "worker.log").read_text()
            time.sleep(0.02)
        tree = proc.tree(pid)
        name = AC.find(tree)
        assert name is not None and name.startswith("dynsnap-agent-")
        assert not name.startswith(f"dynsnap-agent-{tree[-1]}-")     # it named itself by its pid inside
        snap = ds.checkpoint(pid, tmp_path / "snap")
        assert [a["agent"] for a in snap.manifest["gms"]["agents"]] == [name]
        _kill(pid)
        r = ds.restore(snap.path)
        pid = r.pid
        assert AC.ping(AC.find(proc.tree(r.pid)))["state"] == "running"
        assert events.read_text().split() == ["quiesce", "resume"]
    finally:
        for p in reversed(proc.tree(pid)):
            _kill(p)


FAILING_WORKER = r'''
import os, sys, time
from dynsnap_core.gms import agent
def refuse():
    raise RuntimeError("drain refused")
agent.register(quiesce=refuse)
agent.start()
open(sys.argv[1], "w").close()
while True:
    time.sleep(0.05)
'''


def test_a_refused_quiesce_fails_the_checkpoint_before_anything_freezes(tmp_path, home, monkeypatch):
    """An engine that refuses to quiesce: the checkpoint fails with the agent's sentence, no snapshot appears,
    the worker was never stopped and serves on (its half-done quiesce undone)."""
    import dynsnap_core as ds
    from dynsnap_core import proc
    monkeypatch.setenv("DYNSNAP_RUN_DIR", str(tmp_path / "run"))
    ready, logp = tmp_path / "ready", tmp_path / "worker.log"
    with open(logp, "ab") as log:
        p = subprocess.Popen([sys.executable, "-c", FAILING_WORKER, str(ready)], cwd=ROOT, stdin=subprocess.DEVNULL,
                             stdout=log, stderr=log, start_new_session=True,
                             env={**os.environ, "DYNSNAP_RUN_DIR": str(tmp_path / "run")})
    try:
        wait_ready(p, ready, logp, "agent worker failed to start")
        with pytest.raises(AC.AgentError) as e:
            ds.checkpoint(p.pid, tmp_path / "snap")
        assert str(e.value) == f"quiesce failed in pid {p.pid}: RuntimeError: drain refused"
        assert not (tmp_path / "snap").exists()
        assert [x.name for x in tmp_path.iterdir() if ".dynsnap-staging." in x.name] == []
        assert p.poll() is None and proc.state(p.pid) in ("S", "R")
        assert AC.ping(AC.find([p.pid]))["state"] == "running"
    finally:
        _kill(p.pid)
        p.wait(10)


def test_restore_whose_weight_set_cannot_be_provided_runs_nothing(tmp_path, home, monkeypatch):
    """A snapshot whose worker mapped a weight set from a GPU memory service this node does not run: the restore
    fails with the service's sentence and the restored tree is killed, so no worker runs without its weights."""
    import dynsnap_core as ds
    from dynsnap_core.gms.protocol import GmsError
    from helpers import write_manifest
    monkeypatch.setenv("DYNSNAP_RUN_DIR", str(tmp_path / "run"))
    ready, logp = tmp_path / "ready", tmp_path / "worker.log"
    with open(logp, "ab") as log:
        p = subprocess.Popen([sys.executable, "-c", WORKER, str(tmp_path / "events"), str(ready)], cwd=ROOT,
                             stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
                             env={**os.environ, "DYNSNAP_RUN_DIR": str(tmp_path / "run")})
    pid = p.pid
    try:
        wait_ready(p, ready, logp, "agent worker failed to start")
        snap = ds.checkpoint(pid, tmp_path / "snap")
        p.wait(30)
        m = dict(snap.manifest)
        gone = str(tmp_path / "no-service" / "gms.sock")
        m["gms"]["agents"][0]["weight_sets"] = [{"set": "qwen", "layout_hash": "sha256:" + "ab" * 32,
                                                 "bytes": 1 << 20, "va": 1 << 40, "service": gone}]
        write_manifest(snap.path, m)
        with pytest.raises(GmsError) as e:
            ds.restore(snap.path)
        assert str(e.value).startswith(f"cannot reach the GPU memory service at {gone}")
        end = time.monotonic() + 10
        while os.path.exists(f"/proc/{pid}") and time.monotonic() < end:
            time.sleep(0.02)
        assert not os.path.exists(f"/proc/{pid}")          # the restored tree was killed, not left running
    finally:
        _kill(pid)


GROUP_WORKER = r'''
import os, subprocess, sys, time
from dynsnap_core.gms import agent
rank, log, ready, refuse = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4] == "1"
def note(what):
    with open(log, "a") as f:
        f.write(f"{rank}:{what}\n")
def quiesce():
    if refuse:
        raise RuntimeError(f"rank {rank} is mid-collective")
    note("quiesce")
agent.register(quiesce=quiesce, resume=lambda: note("resume"))
agent.start()
if rank == 0:        # the group's first rank starts the second, as a launcher would
    child = subprocess.Popen([sys.executable, "-c", sys.argv[5], "1", log, ready + ".1", sys.argv[6], sys.argv[5],
                              "0"])
    while not os.path.exists(ready + ".1"):
        time.sleep(0.02)
open(ready, "w").close()
while True:
    time.sleep(0.05)
'''


@pytest.mark.parametrize("refusing_rank", [None, 1])
def test_a_group_of_agent_workers_is_quiesced_and_resumed_together(tmp_path, home, monkeypatch, refusing_rank):
    """Two workers of one tree (ranks of a tensor-parallel group) each run an agent: the checkpoint quiesces both
    before freezing anything and the restore resumes both; when one rank refuses, the checkpoint fails and the
    rank already quiesced is resumed, so the whole group serves on."""
    import dynsnap_core as ds
    from dynsnap_core import proc
    monkeypatch.setenv("DYNSNAP_RUN_DIR", str(tmp_path / "run"))
    ready, logp, events = tmp_path / "ready", tmp_path / "worker.log", tmp_path / "events"
    refuse1 = "1" if refusing_rank == 1 else "0"
    with open(logp, "ab") as log:
        p = subprocess.Popen([sys.executable, "-c", GROUP_WORKER, "0", str(events), str(ready), "0", GROUP_WORKER,
                              refuse1], cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                             start_new_session=True, env={**os.environ, "DYNSNAP_RUN_DIR": str(tmp_path / "run")})
    pid = p.pid
    try:
        wait_ready(p, ready, logp, "group worker failed to start")
        tree = proc.tree(pid)
        assert len(tree) == 2 and len(AC.find_all(tree)) == 2
        if refusing_rank is not None:
            with pytest.raises(AC.AgentError, match="rank 1 is mid-collective"):
                ds.checkpoint(pid, tmp_path / "snap")
            assert not (tmp_path / "snap").exists()
            # rank 0 is put back; rank 1's half-done quiesce is undone by its resume callbacks
            assert sorted(events.read_text().split()) == ["0:quiesce", "0:resume", "1:resume"]
            assert [AC.ping(n)["state"] for n in AC.find_all(tree)] == ["running", "running"]
            assert all(proc.state(x) in ("S", "R") for x in tree)
            return
        snap = ds.checkpoint(pid, tmp_path / "snap")
        assert len(snap.manifest["gms"]["agents"]) == 2
        p.wait(30)
        for x in tree:
            _kill(x)
        r = ds.restore(snap.path)
        pid = r.pid
        assert sorted(events.read_text().split()) == ["0:quiesce", "0:resume", "1:quiesce", "1:resume"]
        assert [AC.ping(n)["state"] for n in AC.find_all(proc.tree(r.pid))] == ["running", "running"]
    finally:
        for x in proc.tree(pid) if proc.exists(pid) else []:   # parent first: its child is then ours to reap
            _kill(x)
        _kill(pid)
        p.poll()
