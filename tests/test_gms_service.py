"""The GPU memory service without a GPU: framing, request validation, who may connect, status, refusals.

A real service (in this process on a thread, or `dynsnap gms serve` as a subprocess) on a real Unix socket;
real clients (including one running as another uid). Without a CUDA driver, ensure/open must refuse with the
driver's sentence while status keeps working.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from dynsnap_core import cuda
from dynsnap_core.gms import protocol as P
from dynsnap_core.gms.service import GpuMemoryService
from helpers import ROOT, cli

pytestmark = pytest.mark.timeout(120)

NO_CUDA = cuda.driver_info()["reason"]


@pytest.fixture
def pubdir():
    """A directory another user can traverse (pytest's tmp_path is private to root)."""
    d = Path(tempfile.mkdtemp(prefix="dynsnap-gms-test-", dir="/tmp"))
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def store(tmp_path):
    np = pytest.importorskip("numpy")
    from dynsnap_core import weights
    s = tmp_path / "store"
    weights.save({"a": np.arange(1000, dtype=np.float32), "b": np.ones((3, 5), np.int64)}, "tiny", store=s)
    return s


@pytest.fixture
def svc(pubdir, store):
    logs: list[str] = []
    s = GpuMemoryService(str(pubdir / "gms.sock"), store=str(store), log=logs.append)
    t = s.start()
    s.logs = logs
    yield s
    s.stop()
    t.join(10)
    assert not t.is_alive()


def raw(path, data: bytes, fds=()) -> tuple[object, bool]:
    """Send raw bytes; (the decoded reply or None, whether the service then closed the connection)."""
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.settimeout(10)
    c.connect(str(path))
    try:
        if fds:
            socket.send_fds(c, [data], list(fds))
        else:
            c.sendall(data)
        try:
            reply, _ = P.recv(c, P.MAX_REPLY)
        except ConnectionError:
            reply = None
        try:
            closed = c.recv(1) == b""
        except socket.timeout:
            closed = False
        return reply, closed
    finally:
        c.close()


def frame(obj) -> bytes:
    body = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
    return struct.pack("<I", len(body)) + body


# ---------------------------------------------------------------- framing and validation (no service)

def test_framing_round_trip_with_fds():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    r, w = os.pipe()
    try:
        P.send(a, {"v": 1, "x": "é" * 10}, [r])
        msg, fds = P.recv(b)
        assert msg == {"v": 1, "x": "é" * 10} and len(fds) == 1
        os.write(w, b"hi")
        assert os.read(fds[0], 2) == b"hi"
        os.close(fds[0])
    finally:
        for x in (a, b):
            x.close()
        os.close(r)
        os.close(w)


def test_oversized_length_is_refused_before_the_body_is_read():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        a.sendall(struct.pack("<I", P.MAX_REQUEST + 1))       # no body follows: recv must not wait for it
        b.settimeout(5)
        with pytest.raises(P.ProtocolError, match=f"larger than the limit of {P.MAX_REQUEST}"):
            P.recv(b)


@pytest.mark.parametrize("req,why", [
    ([], "a request is a JSON object"),
    ({"op": "ping"}, "protocol version None is not supported"),
    ({"v": 2, "op": "ping"}, "protocol version 2 is not supported"),
    ({"v": True, "op": "ping"}, "protocol version True is not supported"),
    ({"v": 1, "op": "explode"}, "unknown request 'explode'"),
    ({"v": 1, "op": 3}, "unknown request 3"),
    ({"v": 1, "op": "ping", "x": 1}, "unknown fields 'x'"),
    ({"v": 1, "op": "ensure"}, "needs 'set'"),
    ({"v": 1, "op": "open", "set": 5}, "'set' must be"),
    ({"v": 1, "op": "open", "set": "../etc/passwd"}, "'set' must be"),
    ({"v": 1, "op": "open", "set": "a" * 300}, "'set' must be"),
    ({"v": 1, "op": "open", "set": "ok", "layout_hash": "md5:00"}, "'layout_hash' must be"),
    ({"v": 1, "op": "open", "set": "ok", "layout_hash": 7}, "'layout_hash' must be"),
    ({"v": 1, "op": "ensure", "set": "ok", "timeout": -1}, "'timeout' must be"),
    ({"v": 1, "op": "ensure", "set": "ok", "timeout": "5"}, "'timeout' must be"),
    ({"v": 1, "op": "ensure", "set": "ok", "timeout": True}, "'timeout' must be"),
])
def test_validate_refuses_with_a_sentence(req, why):
    with pytest.raises(P.ProtocolError, match=why.replace("(", r"\(").replace(")", r"\)")):
        P.validate(req)


def test_validate_accepts_well_formed_requests():
    for req in ({"v": 1, "op": "ping"}, {"v": 1, "op": "status"},
                {"v": 1, "op": "open", "set": "qwen3-0.6b", "layout_hash": None, "timeout": 30},
                {"v": 1, "op": "open", "set": "/var/lib/x/sets/a.json", "layout_hash": "sha256:" + "0" * 64},
                {"v": 1, "op": "close", "set": "a"}, {"v": 1, "op": "evict", "set": "a.b-c+d_e"}):
        assert P.validate(req) is req


# ---------------------------------------------------------------- the service

def test_status_of_an_empty_service_without_a_gpu(svc):
    with P.Client(svc.socket_path) as c:
        st = c.status()
        assert c.ping()["pid"] == os.getpid()
    assert st["ok"] is True and st["v"] == P.VERSION
    assert st["sets"] == [] and st["resident_bytes"] == 0
    assert st["service"]["pid"] == os.getpid() and st["service"]["uid"] == os.geteuid()
    assert st["service"]["device"] == 0 and st["service"]["max_bytes"] is None
    if NO_CUDA:
        assert st["gpu"] == {"device": 0, "free": None, "total": None, "error": NO_CUDA}
    assert stat.S_IMODE(os.lstat(svc.socket_path).st_mode) == 0o600


@pytest.mark.skipif(not NO_CUDA, reason="this machine has a CUDA driver")
def test_ensure_and_open_refuse_without_cuda(svc):
    with P.Client(svc.socket_path) as c:
        for op in ("ensure", "open"):
            with pytest.raises(P.GmsError) as e:
                c.request(op, set="tiny")
            assert e.value.code == "cuda_unavailable" and str(e.value) == NO_CUDA
        assert c.status()["sets"] == []          # nothing half-made is visible
    assert not any(n.startswith("gms-load") for n in _thread_names())


def _thread_names():
    import threading
    return [t.name for t in threading.enumerate()]


def test_missing_set_and_paths_outside_the_roots_are_refused(svc, tmp_path):
    with P.Client(svc.socket_path) as c:
        with pytest.raises(P.GmsError) as e:
            c.ensure("no-such-set")
        assert e.value.code == "not_found"
        assert "weight set 'no-such-set' is not resident and cannot be loaded" in str(e.value)
        with pytest.raises(P.GmsError) as e:
            c.open("/etc/passwd")
        assert e.value.code == "denied" and "/etc/passwd is outside the directories this service may open" in str(e.value)
        with pytest.raises(P.GmsError) as e:
            c.evict("tiny")
        assert e.value.code == "not_found" and str(e.value) == "weight set 'tiny' is not resident"
        assert c.ping()["ok"]                    # refusals keep the connection


@pytest.mark.parametrize("data,why", [
    (b"\x05\x00\x00\x00{nope", "malformed message: the message is not JSON"),
    (struct.pack("<I", 1 << 30), "malformed message: message of 1073741824 bytes is larger than the limit"),
    (frame({"v": 9, "op": "status"}), "malformed request: protocol version 9 is not supported"),
    (frame({"v": 1, "op": "rm -rf"}), "malformed request: unknown request 'rm -rf'"),
    (frame({"v": 1, "op": "open", "set": ["x"]}), "malformed request: 'set' must be"),
    (frame({"v": 1, "op": "status", "extra": {}}), "malformed request: request 'status' has unknown fields"),
    (frame(b"[1, 2]"), "malformed request: a request is a JSON object"),
    (frame(b"\xff\xfe"), "malformed message: the message is not JSON"),
])
def test_malformed_messages_get_an_error_and_a_closed_connection(svc, data, why):
    with P.Client(svc.socket_path) as other:        # a client connected all along keeps being served
        reply, closed = raw(svc.socket_path, data)
        assert reply["ok"] is False and reply["error"] == "bad_request" and reply["v"] == P.VERSION
        assert reply["message"].startswith(why), reply["message"]
        assert closed
        assert other.status()["ok"]
    with P.Client(svc.socket_path) as c:
        assert c.ping()["ok"]
    assert not any("Traceback" in m for m in svc.logs)


def test_client_fds_are_refused_and_closed(svc):
    r, w = os.pipe()
    pipe = os.readlink(f"/proc/self/fd/{r}")

    def copies() -> int:     # the service runs in this process: a leaked received fd would show up here
        n = 0
        for fd in os.listdir("/proc/self/fd"):
            try:
                n += os.readlink(f"/proc/self/fd/{fd}") == pipe
            except OSError:
                pass
        return n

    try:
        assert copies() == 2
        reply, closed = raw(svc.socket_path, frame({"v": 1, "op": "ping"}), fds=[r])
        assert reply["error"] == "bad_request" and "never send file descriptors" in reply["message"] and closed
        assert copies() == 2
    finally:
        os.close(r)
        os.close(w)


NOBODY_CLIENT = r'''
import json, os, socket, struct, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(10)
s.connect(sys.argv[1])
body = json.dumps({"v": 1, "op": "status"}).encode()
s.sendall(struct.pack("<I", len(body)) + body)
head = s.recv(4)
n = struct.unpack("<I", head)[0]
data = b""
while len(data) < n:
    data += s.recv(n - len(data))
print(json.dumps({"uid": os.getuid(), "reply": json.loads(data), "eof": s.recv(1) == b""}))
'''


@pytest.mark.root
def test_another_uid_is_refused_even_through_a_world_writable_socket(svc):
    if os.geteuid() != 0:
        pytest.skip("needs root to run a client as nobody")
    os.chmod(svc.socket_path, 0o666)        # what a careless operator might do: SO_PEERCRED still refuses
    # the system python: the test's interpreter may live where nobody cannot reach (/root/.pyenv)
    py = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
    r = subprocess.run([py, "-I", "-S", "-c", NOBODY_CLIENT, svc.socket_path], user=65534, group=65534,
                       extra_groups=[], capture_output=True, text=True, timeout=60, cwd="/")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["uid"] == 65534 and out["eof"] is True
    assert out["reply"]["ok"] is False and out["reply"]["error"] == "denied"
    assert out["reply"]["message"].startswith("uid 65534 (pid ") and \
        out["reply"]["message"].endswith(f"may not use this GPU memory service (only root and uid {os.geteuid()} may)")
    with P.Client(svc.socket_path) as c:        # root still gets in
        assert c.status()["ok"]


def test_socket_path_never_replaces_a_file_or_a_live_service(svc, pubdir):
    f = pubdir / "file"
    f.write_text("keep me")
    with pytest.raises(P.GmsError, match="exists and is not a socket; refusing to replace it"):
        GpuMemoryService(str(f)).bind()
    assert f.read_text() == "keep me"
    with pytest.raises(P.GmsError, match="another GPU memory service is serving at"):
        GpuMemoryService(svc.socket_path).bind()


def test_cli_serve_status_json_and_sigterm(pubdir, tmp_path):
    sock = pubdir / "cli.sock"
    log = open(tmp_path / "serve.log", "wb")
    p = subprocess.Popen([sys.executable, "-m", "dynsnap_core.cli", "gms", "serve", "--socket", str(sock),
                          "--store", str(tmp_path / "st"), "--max-bytes", "2G"], stdout=log, stderr=subprocess.STDOUT,
                         cwd=ROOT)
    try:
        end = time.monotonic() + 60
        while not sock.exists():
            assert p.poll() is None and time.monotonic() < end, (tmp_path / "serve.log").read_text()
            time.sleep(0.05)
        r = cli("gms", "status", "--socket", sock, "--json")
        assert r.returncode == 0, r.stderr
        st = json.loads(r.stdout)
        assert st["sets"] == [] and st["service"]["pid"] == p.pid and st["service"]["max_bytes"] == 2 << 30
        assert st["service"]["store"] == str(tmp_path / "st")
        r = cli("gms", "evict", "nothing", "--socket", sock)
        assert r.returncode == 1 and r.stderr == "dynsnap gms: weight set 'nothing' is not resident\n"
        r = cli("gms", "status", "--socket", sock)
        assert r.returncode == 0 and r.stdout.startswith(f"service pid {p.pid} on cuda:0")
        p.send_signal(signal.SIGTERM)
        assert p.wait(30) == 0
        assert not sock.exists()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        log.close()
    r = cli("gms", "status", "--socket", sock, "--json")
    assert r.returncode == 1 and "cannot reach the GPU memory service at" in r.stderr


def test_cli_refuses_a_bad_budget():
    r = cli("gms", "serve", "--max-bytes", "lots")
    assert r.returncode == 2 and "'lots' is not a byte count (e.g. 80G)" in r.stderr


def test_ensure_sets_of_a_manifest_entry(svc):
    from dynsnap_core.gms import agent_client as AC
    assert AC.ensure_sets({"agent": None, "weight_sets": []}) == {}
    entry = {"weight_sets": [{"set": "tiny", "layout_hash": "sha256:" + "0" * 64, "service": svc.socket_path}]}
    with pytest.raises(P.GmsError) as e:
        AC.ensure_sets(entry)
    if NO_CUDA:
        assert e.value.code == "cuda_unavailable" and str(e.value) == NO_CUDA
    else:
        assert e.value.code == "mismatch"
    entry["weight_sets"][0]["set"] = "absent"
    with pytest.raises(P.GmsError) as e:
        AC.ensure_sets(entry)
    assert e.value.code == "not_found"
