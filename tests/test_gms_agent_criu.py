"""A worker running the dynsnap agent through real CRIU checkpoints and restores (CPU: engine callbacks only).

What the checkpoint/restore wiring relies on: the agent's abstract listening socket and thread survive a dump
and a restore, the agent answers afterwards, find() locates it again (the agent file's start time no longer
matches the restored process: the bound name is found instead), quiesce leaves no connected socket in the
worker, and a second cycle works the same.
"""
from __future__ import annotations

import os
import signal
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
    from dynsnap_core.proc import reap_children
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    end = time.monotonic() + 10
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < end:
        reap_children()
        time.sleep(0.01)


def test_agent_worker_survives_checkpoint_and_restore_twice(tmp_path, home, monkeypatch):
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
        for cycle in (1, 2):
            if cycle == 1:                             # the raw agent_client calls
                t = AC.quiesce(name)
                assert t["regions"] == 0
                gms = {"agents": [AC.manifest_entry(name)]}
            else:                                      # the wiring the checkpoint/restore will call
                q = wiring.before_checkpoint([pid])
                assert q is not None and q.names == [name] and q.manifest["agents"][0]["agent"] == name
                assert set(q.timings) == {"gms_quiesce", "gms_quiesce_workers"}
                gms = q.manifest
            assert AC.ping(name)["state"] == "quiesced"
            snap = ds.checkpoint(pid, tmp_path / f"snap{cycle}")
            assert snap.manifest["root_pid"] == pid
            if cycle == 1:
                p.wait(30)                             # the checkpoint stopped the original: reap it
                wiring.after_checkpoint(None, kept_running=True)      # no agent: nothing to do
            else:
                wiring.after_checkpoint(q, kept_running=False)        # stopped: nothing to resume
                _kill(pid)
            pre = wiring.before_restore(gms)         # no weight sets: nothing to prepare
            r = ds.restore(snap.path)
            assert r.pid == pid
            name2 = AC.find([pid])
            assert name2 == name                       # nobody took the name meanwhile: no rename
            assert AC.ping(name2)["state"] == "quiesced"
            if cycle == 1:
                AC.resume(name2)
            else:
                t = wiring.after_restore(gms, pre, {})
                assert t["gms_agents"] == [name] and t["gms_sets"] == {}
            assert AC.ping(name2)["state"] == "running"
        assert events.read_text().split() == ["quiesce", "resume"] * 2
    finally:
        _kill(pid)
