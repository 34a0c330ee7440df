"""Container targets through the agent: real cgroups laid out as containerd, CRI-O and kubelet's cgroupfs driver do."""
from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from pathlib import Path

import pytest

from agent_helpers import AgentProc

pytestmark = [pytest.mark.criu, pytest.mark.root]

LAYOUTS = {
    "containerd": "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid}.slice/cri-containerd-{id}.scope",
    "cri-o": "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{uid}.slice/crio-{id}.scope",
    "cgroupfs": "kubepods/burstable/pod{uid}/{id}",
}


def _v2_hierarchy() -> Path | None:
    """The cgroup v2 tree: /sys/fs/cgroup itself, or /sys/fs/cgroup/unified on a hybrid host."""
    for cand in (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified")):
        try:
            if (cand / "cgroup.procs").exists() and "cgroup2" in _fstype(cand):
                return cand
        except OSError:
            continue
    return None


def _fstype(p: Path) -> str:
    for line in Path("/proc/self/mounts").read_text().splitlines():
        parts = line.split()
        if len(parts) > 2 and parts[1] == str(p):
            return parts[2]
    return ""


@pytest.fixture
def cgroups():
    """Make cgroups under a test directory of the real v2 hierarchy; processes are moved back and the directories
    removed afterwards. Skips (with the reason) where cgroups cannot be created."""
    h = _v2_hierarchy()
    if h is None:
        pytest.skip("no cgroup v2 hierarchy on this host")
    base = h / f"dynsnap-test-{secrets.token_hex(4)}"
    try:
        base.mkdir()
    except OSError as e:
        pytest.skip(f"cannot create cgroups under {h}: {e.strerror}")
    made: list[Path] = [base]

    def make(rel: str, pids: list[int]) -> Path:
        d = base / rel
        d.mkdir(parents=True)
        made.extend(p for p in [d, *d.parents] if str(p).startswith(str(base)) and p not in made)
        for pid in pids:
            (d / "cgroup.procs").write_text(str(pid))
        return d
    yield h, base, make
    for d in sorted(set(made), key=lambda p: -len(p.parts)):
        try:
            for pid in (d / "cgroup.procs").read_text().split():
                try:
                    (h / "cgroup.procs").write_text(pid)
                except OSError:
                    pass
            d.rmdir()
        except OSError:
            pass


@pytest.fixture
def agent(tmp_path):
    d = Path(tempfile.mkdtemp(prefix="dynsnap-agent-test-"))
    a = AgentProc(tmp_path / "home", d / "agent.sock").start()
    yield a
    a.stop()
    shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_snapshot_by_container_id_and_cgroup_path(layout, cgroups, agent, workload):
    h, base, make = cgroups
    w = workload("--child", "--mem-mb", "8")
    before = w.request()
    cid = secrets.token_hex(32)
    rel = LAYOUTS[layout].format(uid=secrets.token_hex(4), id=cid)
    cg = make(rel, w.tree_pids)
    assert sorted(int(x) for x in (cg / "cgroup.procs").read_text().split()) == sorted(w.tree_pids)

    r = agent.client.post("/v1/snapshots", json={"container": cid[:12], "name": "by-id", "leave_running": True})
    assert r.status_code == 202, r.text
    assert r.json()["request"]["pid"] == w.pid and r.json()["request"]["target"] == f"cgroup {cg}"
    done = agent.wait_job(r.json()["id"])
    assert done["state"] == "succeeded", done
    assert done["result"]["pid"] == w.pid

    # the same container by its cgroup path, as /proc/PID/cgroup writes it, and with the runtime's prefix
    path_in_proc = "/" + str(cg.relative_to(h))
    r = agent.client.post("/v1/snapshots", json={"cgroup": path_in_proc, "name": "by-path", "leave_running": True})
    assert r.status_code == 202, r.text
    assert agent.wait_job(r.json()["id"])["result"]["pid"] == w.pid
    runtime = {"containerd": "containerd://", "cri-o": "cri-o://", "cgroupfs": "containerd://"}[layout]
    r = agent.client.post("/v1/snapshots", json={"container": runtime + cid, "name": "by-status-id",
                                                 "leave_running": True})
    assert agent.wait_job(r.json()["id"])["result"]["pid"] == w.pid
    m = agent.client.get("/v1/snapshots/by-path").json()["manifest"]
    assert m["root_pid"] == w.pid and sorted(m["pids"]) == sorted(w.tree_pids)
    after = w.request()
    assert after["all_ok"] and after["counter"] == before["counter"] + 1


def test_container_refusals(cgroups, agent, workload):
    h, base, make = cgroups
    r = agent.client.post("/v1/snapshots", json={"container": "ab" * 32})
    assert r.status_code == 404
    assert r.json()["message"].startswith(f"no container {'ab' * 32} under /sys/fs/cgroup")
    empty = make(f"kubepods/burstable/podx/{'cd' * 32}", [])
    r = agent.client.post("/v1/snapshots", json={"container": "cd" * 32})
    assert r.status_code == 404 and r.json()["message"] == f"cgroup {empty} has no processes"
    w1, w2 = workload(), workload()
    two = make(f"kubepods/burstable/pody/{'ef' * 32}", [w1.pid, w2.pid])
    r = agent.client.post("/v1/snapshots", json={"cgroup": str(two)})
    assert r.status_code == 400
    assert r.json()["message"].startswith(f"cgroup {two} holds 2 separate process trees")
    make(f"kubepods/burstable/podz/{'ef' * 31}00", [])
    r = agent.client.post("/v1/snapshots", json={"container": "ef" * 6})
    assert r.status_code == 400
    assert r.json()["message"] == f"container id {'ef' * 6} is ambiguous (2 containers match); give more digits"
    r = agent.client.post("/v1/snapshots", json={"cgroup": "/no/such/cgroup"})
    assert r.status_code == 400 and r.json()["message"] == "no cgroup /no/such/cgroup under /sys/fs/cgroup"
    assert agent.client.get("/v1/snapshots").json() == []
    assert w1.request()["all_ok"] and w2.request()["all_ok"]
    assert os.path.exists(f"/proc/{w1.pid}")
