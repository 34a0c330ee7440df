"""The node agent over its real HTTP API (uvicorn on a Unix socket or TCP): snapshots, restores, checks, jobs."""
from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
import pytest

from agent_helpers import AgentProc, free_port
from helpers import ROOT

pytestmark = [pytest.mark.criu, pytest.mark.root]


@pytest.fixture
def sockdir():
    """A directory other users may enter (tmp_path's parents are root-only), removed afterwards."""
    d = Path(tempfile.mkdtemp(prefix="dynsnap-agent-test-"))
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def agent(tmp_path, sockdir):
    made: list[AgentProc] = []

    def start(*args: str, home: Path | None = None, env: dict | None = None) -> AgentProc:
        a = AgentProc(home or tmp_path / "home", sockdir / "agent.sock", *args, env=env)
        made.append(a)
        return a.start()
    yield start
    for a in made:
        a.stop()


def metric(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample in Prometheus text, parsed by prometheus-client's own parser."""
    from prometheus_client.parser import text_string_to_metric_families
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and s.labels == labels:
                return s.value
    return None


def _tree_listing(d: Path) -> list:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*")) if d.exists() else []


def test_socket_is_root_only_and_openapi_lists_every_endpoint(agent, sockdir):
    a = agent()
    st = os.stat(a.sock)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == 0
    doc = a.client.get("/openapi.json").json()
    assert doc["info"]["title"] == "dynsnap agent"
    paths = {(p, m.upper()) for p, ops in doc["paths"].items() for m in ops}
    assert paths >= {("/v1/snapshots", "POST"), ("/v1/snapshots", "GET"), ("/v1/snapshots/{name}", "GET"),
                     ("/v1/snapshots/{name}", "DELETE"), ("/v1/snapshots/{name}/restore", "POST"),
                     ("/v1/snapshots/{name}/check", "POST"), ("/v1/snapshots/{name}/upload", "POST"),
                     ("/v1/jobs/{job_id}", "GET"),
                     ("/v1/jobs/{job_id}/events", "GET"), ("/healthz", "GET"), ("/metrics", "GET")}
    h = a.client.get("/healthz").json()
    assert h["status"] == "ok" and h["root"] == str(a.home / "snapshots")


def test_snapshot_list_check_stream_metrics_delete(agent, workload):
    a = agent()
    w = workload("--mem-mb", "16")
    before = w.request()
    r = a.client.post("/v1/snapshots", json={"pid": w.pid, "name": "w1", "leave_running": True})
    assert r.status_code == 202, r.text
    job = r.json()
    assert r.headers["location"] == f"/v1/jobs/{job['id']}"
    assert job["kind"] == "checkpoint" and job["request"]["pid"] == w.pid
    # live progress: one JSON object per line until the job ends
    lines = []
    with a.client.stream("GET", f"/v1/jobs/{job['id']}/events") as s:
        assert s.headers["content-type"] == "application/x-ndjson"
        for line in s.iter_lines():
            lines.append(json.loads(line))
    phases = [x["event"].get("phase") for x in lines if "event" in x]
    assert "criu dump" in phases and "persist" in phases
    assert lines[-1]["job"]["state"] == "succeeded"
    done = a.wait_job(job["id"])
    assert done["state"] == "succeeded" and done["result"]["pid"] == w.pid
    assert done["progress"]["phase"] == "persist" and done["progress"]["fraction"] == 1.0
    assert w.alive() and w.request()["counter"] == before["counter"] + 1

    rows = a.client.get("/v1/snapshots").json()
    assert [(x["name"], x["status"], x["location"], x["pid"]) for x in rows] == [("w1", "ok", ["local"], w.pid)]
    one = a.client.get("/v1/snapshots/w1").json()
    assert one["manifest"]["root_pid"] == w.pid and one["path"] == str(a.home / "snapshots" / "w1")
    rep = a.client.post("/v1/snapshots/w1/check").json()
    assert rep["ok"] is False
    assert [f["name"] for f in rep["facts"] if f["status"] == "refuse"] == ["pids"]

    text = a.client.get("/metrics").text
    assert metric(text, "dynsnap_snapshots_stored", location="local") == 1
    assert metric(text, "dynsnap_phase_seconds_count", operation="checkpoint", phase="criu_dump") == 1
    assert metric(text, "dynsnap_bytes_total", operation="checkpoint") == done["result"]["bytes"]
    assert metric(text, "dynsnap_jobs_finished_total", operation="checkpoint", state="succeeded") == 1
    assert metric(text, "dynsnap_jobs", state="succeeded") == 1

    assert f"job {job['id']} checkpoint w1: succeeded in " in a.log()
    r = a.client.delete("/v1/snapshots/w1")
    assert r.status_code == 200 and r.json() == {"name": "w1", "removed": ["local"]}
    assert a.client.get("/v1/snapshots").json() == []
    r = a.client.delete("/v1/snapshots/w1")
    assert r.status_code == 404 and r.json()["message"] == "no snapshot w1"
    assert metric(a.client.get("/metrics").text, "dynsnap_snapshots_stored", location="local") == 0


def test_restore_through_the_agent(agent, workload):
    a = agent()
    w = workload("--mem-mb", "8", "--child")
    before = w.request()
    job = a.client.post("/v1/snapshots", json={"pid": w.pid, "name": "r1"}).json()
    assert a.wait_job(job["id"])["state"] == "succeeded"
    w.reap_original()
    r = a.client.post("/v1/snapshots/r1/restore", json={})
    assert r.status_code == 202, r.text
    done = a.wait_job(r.json()["id"])
    assert done["state"] == "succeeded", done
    assert done["result"]["pid"] == w.pid and done["result"]["timings"]["criu_restore"] > 0
    after = w.request()
    assert after["all_ok"] and after["counter"] == before["counter"] + 1
    # the pids are taken now: a second restore is refused by the check, as a failed job with the reason
    r = a.client.post("/v1/snapshots/r1/restore")
    failed = a.wait_job(r.json()["id"])
    assert failed["state"] == "failed" and failed["error"]["error"] == "IncompatibleSnapshot"
    assert failed["error"]["message"].startswith(f"pid {w.pid} is in use by a running process")
    text = a.client.get("/metrics").text
    assert metric(text, "dynsnap_failures_total", operation="restore", stage="check") == 1


BAD_NAMES = ["..", "../x", "a/b", "/etc/passwd", "a\x00b", ".hidden", "", "x" * 129]


def test_bad_input_is_refused_and_touches_nothing(agent, workload, tmp_path):
    a = agent()
    w = workload()
    outside = _tree_listing(tmp_path)
    for name in BAD_NAMES:
        r = a.client.post("/v1/snapshots", json={"pid": w.pid, "name": name})
        assert r.status_code in (400, 422), (name, r.text)
        assert "name" in r.json()["message"], r.text
    for raw in ("..%2F..%2Fetc", "a%00b", "%2Fetc"):
        for method, path in (("GET", f"/v1/snapshots/{raw}"), ("DELETE", f"/v1/snapshots/{raw}"),
                             ("POST", f"/v1/snapshots/{raw}/restore"), ("POST", f"/v1/snapshots/{raw}/check")):
            r = a.client.request(method, path)
            assert r.status_code in (400, 404), (method, path, r.text)
            assert r.json()["message"], r.text
    r = a.client.post("/v1/snapshots", content=b'{"pid": 1', headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["message"].startswith("the request body is not valid JSON")
    r = a.client.post("/v1/snapshots", json={"pid": w.pid, "name": "ok", "rm_rf": True})
    assert r.status_code == 422 and r.json()["message"] == "unknown field 'rm_rf'"
    r = a.client.post("/v1/snapshots", json=[1, 2])
    assert r.status_code == 422
    r = a.client.post("/v1/snapshots", json={"pid": "12; rm -rf /"})
    assert r.status_code == 422 and r.json()["message"].startswith("field 'pid': ")
    r = a.client.post("/v1/snapshots", content=b'{"pid": 1, "name": "' + b"x" * (70 << 10) + b'"}',
                      headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["message"] == "the request body is larger than 65536 bytes"
    r = a.client.post("/v1/snapshots", json={"pid": w.pid, "container": "ab" * 32})
    assert r.status_code == 400 and r.json()["message"] == "give exactly one target: pid, container or cgroup"
    r = a.client.post("/v1/snapshots", json={})
    assert r.status_code == 400
    r = a.client.post("/v1/snapshots", json={"pid": 4000000})
    assert r.status_code == 404 and r.json()["message"] == "no such process: 4000000"
    r = a.client.post("/v1/snapshots", json={"pid": 1})
    assert r.status_code == 400 and "pid 1" in r.json()["message"]
    r = a.client.post("/v1/snapshots", json={"cgroup": "/../../etc"})
    assert r.status_code == 400 and r.json()["message"] == "cgroup path '/../../etc' is not a plain path"
    r = a.client.post("/v1/snapshots", json={"container": "not-an-id"})
    assert r.status_code == 400 and r.json()["message"] == "'not-an-id' is not a container id (12 to 64 hex digits)"
    r = a.client.get("/v1/jobs/nope")
    assert r.status_code == 404 and r.json()["message"] == "no job nope"
    r = a.client.get("/v1/nothing")
    assert r.status_code == 404 and r.json()["message"] == "no such endpoint: GET /v1/nothing"
    assert a.client.get("/v1/snapshots").json() == []
    assert _tree_listing(a.home / "snapshots") == []
    assert _tree_listing(tmp_path) == outside
    assert w.alive() and w.state() not in ("T", "t") and w.request()["all_ok"]


def test_other_users_are_refused_on_the_socket(agent, sockdir):
    """nobody cannot connect (0600); even with the socket opened up, the peer check answers 403."""
    a = agent()
    client = ("import socket,sys\n"
              "s=socket.socket(socket.AF_UNIX)\n"
              "try:\n    s.connect(sys.argv[1])\n"
              "except OSError as e:\n    print('connect', e.errno); sys.exit(0)\n"
              "s.settimeout(30)\n"
              "s.sendall(b'GET /v1/snapshots HTTP/1.1\\r\\nHost: a\\r\\nConnection: close\\r\\n\\r\\n')\n"
              "d=b''\n"
              "while True:\n    c=s.recv(65536)\n    if not c: break\n    d+=c\n"
              "print(d.decode())\n")

    def as_nobody() -> str:
        r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all",
                            sys.executable, "-c", client, str(a.sock)], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        return r.stdout
    import errno
    assert as_nobody().strip() == f"connect {errno.EACCES}"
    os.chmod(a.sock, 0o666)            # a misconfiguration: the peer credentials still keep others out
    out = as_nobody()
    assert out.startswith("HTTP/1.1 403 Forbidden")
    assert "only root may use the dynsnap agent's socket (peer uid 65534)" in out
    assert a.client.get("/v1/snapshots").status_code == 200


def test_tcp_needs_a_token(agent, tmp_path):
    port = free_port()
    r = subprocess.run([sys.executable, "-m", "dynsnap_core.cli", "agent", "--listen", f"127.0.0.1:{port}"],
                       capture_output=True, text=True, timeout=60, cwd=ROOT,
                       env={**os.environ, "DYNSNAP_HOME": str(tmp_path / "h")})
    assert r.returncode == 1
    assert r.stderr.strip() == ("dynsnap agent: TCP (--listen) needs --token-file: the agent never serves TCP "
                                "without a bearer token")
    token = tmp_path / "token"
    token.write_text("s3cr3t-token-0123456789abcdef\n")
    os.chmod(token, 0o644)
    r = subprocess.run([sys.executable, "-m", "dynsnap_core.cli", "agent", "--listen", f"127.0.0.1:{port}",
                        "--token-file", str(token)], capture_output=True, text=True, timeout=60, cwd=ROOT,
                       env={**os.environ, "DYNSNAP_HOME": str(tmp_path / "h")})
    assert r.returncode == 1
    assert r.stderr.strip() == f"dynsnap agent: the token file {token} is readable by others (mode 644); " \
                               f"chmod 600 {token}"
    os.chmod(token, 0o600)
    a = agent("--listen", f"127.0.0.1:{port}", "--token-file", str(token))
    base = f"http://127.0.0.1:{port}"
    with httpx.Client(base_url=base, timeout=30) as c:
        assert c.get("/healthz").status_code == 200          # liveness needs no token
        r = c.get("/v1/snapshots")
        assert r.status_code == 401 and r.headers["www-authenticate"] == 'Bearer realm="dynsnap"'
        assert r.json()["message"] == "this agent needs a bearer token (Authorization: Bearer <token>)"
        for bad in ("Bearer wrong", "Bearer s3cr3t-token-0123456789abcde", "Basic czNjcjN0", "Bearer"):
            r = c.get("/v1/snapshots", headers={"Authorization": bad})
            assert r.status_code == 401, bad
            assert r.json()["message"] == "the bearer token is wrong"
        r = c.post("/v1/snapshots", json={"pid": 1}, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401
        ok = {"Authorization": "Bearer s3cr3t-token-0123456789abcdef"}
        assert c.get("/v1/snapshots", headers=ok).json() == []
        assert c.get("/metrics", headers=ok).status_code == 200
    assert "s3cr3t" not in a.log()
    # the Unix socket, served too, carries the same token requirement
    assert a.client.get("/v1/snapshots").status_code == 401


def test_same_tree_serialized_different_trees_concurrent(agent, workload):
    """Two snapshots of one tree run one after the other; the job on another tree does not wait for them."""
    a = agent()
    w1, w2 = workload("--mem-mb", "32"), workload("--mem-mb", "8")
    j1 = a.client.post("/v1/snapshots", json={"pid": w1.pid, "name": "a1", "leave_running": True}).json()
    j2 = a.client.post("/v1/snapshots", json={"pid": w1.pid, "name": "a2", "leave_running": True}).json()
    j3 = a.client.post("/v1/snapshots", json={"pid": w2.pid, "name": "b1", "leave_running": True}).json()
    d1, d2, d3 = (a.wait_job(j["id"]) for j in (j1, j2, j3))
    assert [d["state"] for d in (d1, d2, d3)] == ["succeeded"] * 3
    assert d2["started"] >= d1["finished"], "the second job on the same tree waited for the first"
    assert [e["state"] for e in d2["events"]][:2] == ["queued", "running"]
    names = {r["name"]: r["pid"] for r in a.client.get("/v1/snapshots").json()}
    assert names == {"a1": w1.pid, "a2": w1.pid, "b1": w2.pid}
    # the same name twice is refused at once
    r = a.client.post("/v1/snapshots", json={"pid": w2.pid, "name": "b1"})
    assert r.status_code == 409 and r.json()["message"] == "snapshot b1 already exists on this node"
    assert w1.request()["all_ok"] and w2.request()["all_ok"]


def test_job_manager_keys(tmp_path):
    """Scheduling with real threads: a job on a held key waits; a job on another key runs meanwhile."""
    import threading

    from dynsnap_core.agent.jobs import JobManager
    jm = JobManager(tmp_path / "jobs", workers=4)
    gate, started = threading.Event(), threading.Event()

    def blocker(job):
        started.set()
        assert gate.wait(60)
        return {"ok": 1}
    a = jm.submit("t", ["tree:1"], {}, blocker)
    assert started.wait(60)
    b = jm.submit("t", ["tree:2"], {}, lambda job: {"ok": 2})
    c = jm.submit("t", ["tree:1"], {}, lambda job: {"ok": 3})
    sig = jm.signature(b)
    while b.state != "succeeded":
        sig = jm.wait_change(b, sig, 10)
    assert a.state == "running" and c.state == "queued" and jm.busy("tree:1")
    gate.set()
    sig = jm.signature(c)
    while c.state != "succeeded":
        sig = jm.wait_change(c, sig, 10)
    assert c.started >= a.finished and c.result == {"ok": 3}
    # the queue of waiting jobs is bounded: past max_pending, submit refuses at once
    from dynsnap_core.agent.jobs import TooManyJobs
    jm.max_pending = 2
    gate2 = threading.Event()
    held = jm.submit("t", ["tree:5"], {}, lambda job: gate2.wait(60) and {})
    waiting = [jm.submit("t", ["tree:5"], {}, lambda job: {}) for _ in range(2)]
    with pytest.raises(TooManyJobs, match="^2 jobs are already waiting; try again when some have finished$"):
        jm.submit("t", ["tree:6"], {}, lambda job: {})
    gate2.set()
    for j in [held, *waiting]:
        sig = jm.signature(j)
        while j.state not in ("succeeded", "failed"):
            sig = jm.wait_change(j, sig, 10)
    # a restarted manager reports what an earlier one left unfinished as failed: rewrite a finished job's file
    # as an agent killed during its persist phase would have left it
    jm.close(timeout=30)
    path = tmp_path / "jobs" / f"{b.id}.json"
    data = json.loads(path.read_text())
    data.update(state="running", phase="persist")
    path.write_text(json.dumps(data))
    again = JobManager(tmp_path / "jobs")
    lost = {j.id: j for j in again.interrupted}
    assert list(lost) == [b.id] and lost[b.id].state == "failed"
    assert lost[b.id].error == {"error": "AgentRestarted", "stage": "persist", "message": "the agent stopped while "
                                "this job was running (during persist)"}
    again.amend(lost[b.id], "said more")
    assert json.loads(path.read_text())["error"]["message"] == "said more"
    assert again.get(a.id).state == "succeeded" and again.get(c.id).result == {"ok": 3}
    assert json.loads(path.read_text())["state"] == "failed"


def test_probe_and_graceful_stop(agent, sockdir, tmp_path):
    """`dynsnap agent --probe` (the chart's liveness probe) answers 0 only while an agent serves; SIGTERM removes
    the socket; a second agent on a live socket is refused without touching it."""
    a = agent()
    r = subprocess.run([sys.executable, "-m", "dynsnap_core.cli", "agent", "--probe", "--socket", str(a.sock)],
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.strip() == f"dynsnap agent on {a.sock}: ok"
    r = subprocess.run([sys.executable, "-m", "dynsnap_core.cli", "agent", "--socket", str(a.sock)],
                       capture_output=True, text=True, timeout=60, cwd=ROOT,
                       env={**os.environ, "DYNSNAP_HOME": str(tmp_path / "other")})
    assert r.returncode == 1 and r.stderr.strip() == f"dynsnap agent: another agent is listening on {a.sock}"
    assert a.client.get("/healthz").status_code == 200
    a.stop()
    assert a.popen.returncode == 0 and not a.sock.exists()
    r = subprocess.run([sys.executable, "-m", "dynsnap_core.cli", "agent", "--probe", "--socket", str(a.sock)],
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 1 and r.stdout.startswith(f"dynsnap agent: no answer on {a.sock}: ")
