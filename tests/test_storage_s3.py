"""Object storage against a real S3-compatible server (moto's standalone server): upload, list, download, faults."""
from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
from pathlib import Path

import pytest

from agent_helpers import AgentProc, FaultProxy, MotoServer

pytestmark = [pytest.mark.criu, pytest.mark.root]

SECRET = "dynsnap-test-secret-key-never-logged"
BUCKET = "dynsnap-test"


@pytest.fixture
def s3(tmp_path, monkeypatch):
    """A moto server with one bucket; credentials in the environment (as boto3 reads them)."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "dynsnap-test-access")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "DYNSNAP_S3_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    srv = MotoServer(tmp_path / "moto.log")
    import boto3
    client = boto3.client("s3", endpoint_url=srv.url)
    client.create_bucket(Bucket=BUCKET)
    srv.client = client
    yield srv
    client.close()
    srv.stop()


@pytest.fixture
def sockdir():
    d = Path(tempfile.mkdtemp(prefix="dynsnap-agent-test-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def proxies():
    """FaultProxy instances in front of the store; every one is cut (its sockets closed) at the end."""
    made: list[FaultProxy] = []

    def make(port: int) -> FaultProxy:
        p = FaultProxy(port)
        made.append(p)
        return p
    yield make
    for p in made:
        p.cut()


@pytest.fixture
def agents():
    made: list[AgentProc] = []
    yield made
    for a in made:
        a.stop()


def _keys(s3, prefix: str = "") -> list[str]:
    resp = s3.client.list_objects_v2(Bucket=BUCKET, Prefix=prefix)
    return sorted(o["Key"] for o in resp.get("Contents", []))


def _start(agents, home: Path, sock: Path, endpoint: str, *args: str) -> AgentProc:
    a = AgentProc(home, sock, "--storage", f"s3://{BUCKET}/nodes", *args,
                  env={"DYNSNAP_S3_ENDPOINT": endpoint})
    agents.append(a)
    return a.start()


def _no_secret(a: AgentProc) -> None:
    assert SECRET not in a.log()
    for p in (a.home / "agent").rglob("*"):
        if p.is_file():
            assert SECRET not in p.read_text(errors="replace")


def test_store_round_trip_with_multipart(s3, workload, tmp_path, home):
    """Upload with per-part sha256 and the marker last; listed only when complete; verified parallel download."""
    import dynsnap_core as ds
    from dynsnap_core.storage.s3 import COMPLETE, S3Store
    w = workload("--mem-mb", "24")
    snap = ds.checkpoint(w.pid, tmp_path / "snaps" / "big", leave_running=True)
    store = S3Store(f"s3://{BUCKET}/p", endpoint_url=s3.url, part_size=5 << 20)
    seen = []
    res = store.upload(snap.path, progress=lambda ph, d, t: seen.append((ph, d, t)))
    assert res["url"] == f"s3://{BUCKET}/p/big"
    assert seen[-1][1] == seen[-1][2] == res["bytes"] and {ph for ph, _, _ in seen} == {"upload"}
    keys = _keys(s3, "p/big/")
    assert keys == sorted([f"p/big/{f['path']}" for f in snap.manifest["files"]] + ["p/big/manifest.json",
                                                                                    f"p/big/{COMPLETE}"])
    marker = json.loads(s3.client.get_object(Bucket=BUCKET, Key=f"p/big/{COMPLETE}")["Body"].read())
    biggest = max(snap.manifest["files"], key=lambda f: f["size"])
    assert biggest["size"] > 10 << 20
    assert len(marker["parts_sha256"][biggest["path"]]) == -(-biggest["size"] // (5 << 20))
    assert [r["name"] for r in store.list()] == ["big"]

    cache = tmp_path / "cache"
    got = store.download("big", cache, progress=lambda *a: None)
    assert got == cache / "big" and sorted(os.listdir(cache)) == ["big"]
    assert ds.open_snapshot(got).verify() == snap.total_bytes
    for f in snap.manifest["files"]:
        assert (got / f["path"]).read_bytes() == (snap.path / f["path"]).read_bytes()
    # an upload under a name that is complete in the bucket is refused
    from dynsnap_core.errors import SnapshotExists
    with pytest.raises(SnapshotExists, match=f"s3://{BUCKET}/p/big already holds a complete snapshot"):
        store.upload(snap.path)
    # without its marker a snapshot is invisible and cannot be downloaded
    s3.client.delete_object(Bucket=BUCKET, Key=f"p/big/{COMPLETE}")
    assert store.list() == []
    from dynsnap_core.errors import SnapshotNotFound
    with pytest.raises(SnapshotNotFound, match=f"no complete snapshot s3://{BUCKET}/p/big"):
        store.download("big", tmp_path / "cache2")
    assert not (tmp_path / "cache2").exists()


def test_agent_uploads_then_restores_from_the_bucket(s3, agents, workload, tmp_path, sockdir):
    home = tmp_path / "home"
    a = _start(agents, home, sockdir / "agent.sock", s3.url)
    w = workload("--mem-mb", "8", "--child")
    before = w.request()
    job = a.client.post("/v1/snapshots", json={"pid": w.pid, "name": "up1"}).json()
    done = a.wait_job(job["id"])
    assert done["state"] == "succeeded", done
    assert done["result"]["uploaded"] is True and done["result"]["url"] == f"s3://{BUCKET}/nodes/up1"
    assert "upload" in [e.get("phase") for e in done["events"]]
    rows = a.client.get("/v1/snapshots").json()
    assert [(r["name"], r["location"]) for r in rows] == [("up1", ["local", "remote"])]
    # the node loses its copy; the bucket still has it
    assert a.client.delete("/v1/snapshots/up1", params={"remote": "false"}).json()["removed"] == ["local"]
    assert [(r["name"], r["location"]) for r in a.client.get("/v1/snapshots").json()] == [("up1", ["remote"])]
    one = a.client.get("/v1/snapshots/up1").json()
    assert one["location"] == ["remote"] and one["url"] == f"s3://{BUCKET}/nodes/up1"
    assert one["manifest"]["root_pid"] == w.pid
    w.reap_original()
    rep = a.client.post("/v1/snapshots/up1/check").json()
    assert rep["ok"] is True, rep
    assert {f["name"]: f["detail"] for f in rep["facts"]}["snapshot files"].endswith(
        "files in object storage (verified at download)")
    r = a.client.post("/v1/snapshots/up1/restore")
    done = a.wait_job(r.json()["id"])
    assert done["state"] == "succeeded", done
    assert done["result"]["pid"] == w.pid and done["result"]["path"] == str(home / "cache" / "snapshots" / "up1")
    assert "download" in [e.get("phase") for e in done["events"]]
    after = w.request()
    assert after["all_ok"] and after["counter"] == before["counter"] + 1
    text = a.client.get("/metrics").text
    from test_agent_api import metric
    assert metric(text, "dynsnap_bytes_total", operation="upload") > 0
    assert metric(text, "dynsnap_bytes_total", operation="download") > 0
    assert metric(text, "dynsnap_snapshots_stored", location="remote") == 1
    r = a.client.delete("/v1/snapshots/up1")
    assert r.json()["removed"] == ["remote"]
    assert _keys(s3, "nodes/") == [] and a.client.get("/v1/snapshots").json() == []
    _no_secret(a)


def test_damaged_object_is_never_restored(s3, agents, workload, tmp_path, sockdir):
    home = tmp_path / "home"
    a = _start(agents, home, sockdir / "agent.sock", s3.url)
    w = workload("--mem-mb", "8")
    job = a.client.post("/v1/snapshots", json={"pid": w.pid, "name": "bad"}).json()
    assert a.wait_job(job["id"])["state"] == "succeeded"
    a.client.delete("/v1/snapshots/bad", params={"remote": "false"})
    w.reap_original()
    key = max((k for k in _keys(s3, "nodes/bad/criu/")),
              key=lambda k: s3.client.head_object(Bucket=BUCKET, Key=k)["ContentLength"])
    data = bytearray(s3.client.get_object(Bucket=BUCKET, Key=key)["Body"].read())
    data[len(data) // 2] ^= 1
    s3.client.put_object(Bucket=BUCKET, Key=key, Body=bytes(data))
    done = a.wait_job(a.client.post("/v1/snapshots/bad/restore").json()["id"])
    assert done["state"] == "failed" and done["error"]["error"] == "SnapshotCorrupt"
    assert done["error"]["message"] == (f"s3://{BUCKET}/{key} part 1 does not match its sha256 in COMPLETE "
                                        f"({len(data)} bytes): the object was altered or damaged")
    assert not (home / "cache" / "snapshots").exists() or os.listdir(home / "cache" / "snapshots") == []
    assert not os.path.exists(f"/proc/{w.pid}"), "nothing was restored from damaged data"


def test_store_unreachable_keeps_the_local_snapshot(agents, workload, tmp_path, sockdir, monkeypatch):
    from agent_helpers import free_port
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    a = _start(agents, tmp_path / "home", sockdir / "agent.sock", f"http://127.0.0.1:{free_port()}")
    w = workload("--mem-mb", "8")
    done = a.wait_job(a.client.post("/v1/snapshots", json={"pid": w.pid, "name": "nostore",
                                                           "leave_running": True}).json()["id"])
    assert done["state"] == "failed" and done["error"]["stage"] == "upload"
    msg = done["error"]["message"]
    assert msg.startswith(f"uploading {tmp_path / 'home' / 'snapshots' / 'nostore'} to s3://{BUCKET}/nodes/nostore "
                          "failed: ")
    assert msg.endswith("; the local snapshot is intact and nothing was listed in the bucket")
    rows = a.client.get("/v1/snapshots", params={"location": "local"}).json()
    assert [(r["name"], r["status"]) for r in rows] == [("nostore", "ok")]
    r = a.client.get("/v1/snapshots")
    assert r.status_code == 502 and r.json()["message"].startswith(f"listing s3://{BUCKET}/nodes/ failed: ")
    import dynsnap_core as ds
    assert ds.open_snapshot(tmp_path / "home" / "snapshots" / "nostore").verify() > 0
    assert w.request()["all_ok"]
    _no_secret(a)


def test_store_fails_mid_upload_and_mid_download(s3, agents, proxies, workload, tmp_path, sockdir):
    """The connection to the store is cut in the middle of the transfer: a clear error, the local snapshot intact,
    nothing listed in the bucket; a cut download restores nothing and leaves nothing in the cache."""
    home = tmp_path / "home"
    proxy = proxies(s3.port)
    a = _start(agents, home, sockdir / "agent.sock", proxy.url)
    w = workload("--mem-mb", "40")
    proxy.stall_after("up", 8 << 20)
    job = a.client.post("/v1/snapshots", json={"pid": w.pid, "name": "cut", "leave_running": True}).json()
    assert proxy.stalled.wait(120), a.log()
    proxy.cut()
    done = a.wait_job(job["id"])
    assert done["state"] == "failed" and done["error"]["stage"] == "upload", done
    assert done["error"]["message"].endswith("; the local snapshot is intact and nothing was listed in the bucket")
    import dynsnap_core as ds
    assert ds.open_snapshot(home / "snapshots" / "cut").verify() > 0
    assert _keys(s3, "nodes/cut/") == [] or "nodes/cut/COMPLETE" not in _keys(s3, "nodes/cut/")
    from dynsnap_core.storage.s3 import S3Store
    assert S3Store(f"s3://{BUCKET}/nodes", endpoint_url=s3.url).list() == []
    assert w.request()["all_ok"]
    a.stop()

    # the store is back: the kept local snapshot is uploaded again, then a download is cut half-way
    proxy2 = proxies(s3.port)
    b = _start(agents, home, sockdir / "agent.sock", proxy2.url)
    up = b.wait_job(b.client.post("/v1/snapshots/cut/upload").json()["id"])
    assert up["state"] == "succeeded" and up["result"]["url"] == f"s3://{BUCKET}/nodes/cut", up
    r = b.client.post("/v1/snapshots/cut/upload")
    assert r.status_code == 409 and r.json()["message"] == f"s3://{BUCKET}/nodes/cut already holds a complete snapshot"
    r = b.client.post("/v1/snapshots/nothing/upload")
    assert r.status_code == 404 and r.json()["message"] == "no snapshot nothing on this node"
    up = b.wait_job(b.client.post("/v1/snapshots", json={"pid": w.pid, "name": "cut2"}).json()["id"])
    assert up["state"] == "succeeded", up
    b.client.delete("/v1/snapshots/cut2", params={"remote": "false"})
    w.reap_original()
    proxy2.stall_after("down", 8 << 20)
    job = b.client.post("/v1/snapshots/cut2/restore").json()
    assert proxy2.stalled.wait(120), b.log()
    proxy2.cut()
    done = b.wait_job(job["id"])
    assert done["state"] == "failed" and done["error"]["stage"] == "download", done
    assert done["error"]["message"].startswith(f"downloading s3://{BUCKET}/nodes/cut2 failed: ")
    assert done["error"]["message"].endswith("; nothing was restored")
    assert os.listdir(home / "cache" / "snapshots") == []
    assert not os.path.exists(f"/proc/{w.pid}")
    _no_secret(b)


def test_sigkill_mid_upload(s3, agents, proxies, workload, tmp_path, sockdir):
    """The agent dies while uploading: after restart the job is failed, the bucket holds nothing of it (the
    partial objects and pending multipart uploads are removed), the local snapshot is complete, the worker runs."""
    home = tmp_path / "home"
    proxy = proxies(s3.port)
    a = _start(agents, home, sockdir / "agent.sock", proxy.url)
    w = workload("--mem-mb", "40")
    proxy.stall_after("up", 12 << 20)
    job = a.client.post("/v1/snapshots", json={"pid": w.pid, "name": "dies", "leave_running": True}).json()
    assert proxy.stalled.wait(120), a.log()
    assert a.client.get(f"/v1/jobs/{job['id']}").json()["phase"] == "upload"
    r = a.client.delete("/v1/snapshots/dies")
    assert r.status_code == 409 and r.json()["message"] == "a job is using snapshot dies; delete it when the job is done"
    a.kill(signal.SIGKILL)
    proxy.cut()
    pending = s3.client.list_multipart_uploads(Bucket=BUCKET, Prefix="nodes/dies/").get("Uploads", [])
    assert _keys(s3, "nodes/dies/") or pending, "the upload had started"
    b = _start(agents, home, sockdir / "agent.sock", s3.url)
    j = b.client.get(f"/v1/jobs/{job['id']}").json()
    assert j["state"] == "failed" and j["error"]["error"] == "AgentRestarted"
    assert j["error"]["message"] == ("the agent stopped while this job was running (during upload); the snapshot "
                                     "dies was committed on this node before that and is complete (not uploaded: "
                                     "POST /v1/snapshots/dies/upload)")
    assert _keys(s3, "nodes/dies/") == []
    assert s3.client.list_multipart_uploads(Bucket=BUCKET, Prefix="nodes/dies/").get("Uploads", []) == []
    rows = b.client.get("/v1/snapshots").json()
    assert [(r["name"], r["location"]) for r in rows] == [("dies", ["local"])]
    import dynsnap_core as ds
    assert ds.open_snapshot(home / "snapshots" / "dies").verify() > 0
    assert w.request()["all_ok"]
    # as the message says: the kept snapshot uploads again
    up = b.wait_job(b.client.post("/v1/snapshots/dies/upload").json()["id"])
    assert up["state"] == "succeeded", up
    assert [(r["name"], r["location"]) for r in b.client.get("/v1/snapshots").json()] == [("dies", ["local", "remote"])]


def test_cli_push_check_and_restore_from_the_bucket(s3, workload, tmp_path, home):
    """`dynsnap push`, `dynsnap check s3://...` and `dynsnap restore s3://...` (download into the node cache)."""
    from helpers import cli
    env = {"DYNSNAP_S3_ENDPOINT": s3.url}
    w = workload("--mem-mb", "8")
    before = w.request()
    out = tmp_path / "snap"
    assert cli("checkpoint", "--pid", w.pid, "--out", out).returncode == 0
    w.reap_original()
    r = cli("push", out, f"s3://{BUCKET}/cli", "--name", "w1", "--json", env=env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["url"] == f"s3://{BUCKET}/cli/w1"
    r = cli("push", out, f"s3://{BUCKET}/cli", "--name", "w1", env=env)
    assert r.returncode == 1 and r.stderr.strip() == (f"dynsnap push: s3://{BUCKET}/cli/w1 already holds a complete "
                                                      "snapshot")
    r = cli("check", f"s3://{BUCKET}/cli/w1", "--json", env=env)
    assert r.returncode == 0, r.stdout
    r = cli("restore", f"s3://{BUCKET}/cli/nope", env=env)
    assert r.returncode == 1 and r.stderr.strip() == f"dynsnap restore: no complete snapshot s3://{BUCKET}/cli/nope"
    r = cli("restore", "s3://bucket-only", env=env)
    assert r.returncode == 1 and "does not name a snapshot: use s3://BUCKET[/PREFIX]/NAME" in r.stderr
    r = cli("restore", f"s3://{BUCKET}/cli/w1", "--json", env=env)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["pid"] == w.pid and res["snapshot"] == str(home / "cache" / "snapshots" / "w1")
    assert w.request()["counter"] == before["counter"] + 1
    assert SECRET not in r.stdout + r.stderr
