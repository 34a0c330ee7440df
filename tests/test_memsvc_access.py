"""Who may use the host memory service, with a real second user created for the test (useradd, then userdel).

The socket is private by construction (0600, or 0660 for a configured group, whatever the umask); every request
is checked against the peer's credentials (SO_PEERCRED), so even a socket someone made world-writable lets no
one else in; the files the service opens lie under the weight store, the snapshot root or --allow directories;
--socket never replaces a file; malformed requests get bad_request and no traceback in the log.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from helpers import ROOT

pytestmark = [pytest.mark.root, pytest.mark.timeout(120)]

# A client that needs nothing but the standard library (the other user cannot import the package from here):
# one request per argument, each reply printed as a JSON line, or {"error": ...} when the connection fails.
RAW_CLIENT = r'''
import json, socket, struct, sys
for req in sys.argv[2:]:
    try:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        s.settimeout(20)
        s.connect(sys.argv[1])
        body = req.encode()
        s.send(struct.pack("<I", len(body)) + body)
        data = s.recv(1 << 17)
        print(json.dumps(json.loads(data[4:4 + struct.unpack("<I", data[:4])[0]])) if data else '{"error": "eof"}')
        s.close()
    except OSError as e:
        print(json.dumps({"error": e.strerror}))
'''


@pytest.fixture(scope="module")
def other_user():
    """A real unprivileged user (and its own group), removed afterwards."""
    if os.geteuid() != 0 or not shutil.which("useradd"):
        pytest.skip("needs root and useradd")
    name = f"dsnap{uuid.uuid4().hex[:8]}"
    r = subprocess.run(["useradd", "--system", "--no-create-home", "--user-group", "--shell", "/usr/sbin/nologin",
                        name], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"useradd failed: {r.stderr.strip()}")
    import pwd
    pw = pwd.getpwnam(name)
    yield name, pw.pw_uid, pw.pw_gid
    subprocess.run(["userdel", name], capture_output=True)
    subprocess.run(["groupdel", name], capture_output=True)


@pytest.fixture
def public_dir():
    """A directory the other user can reach (pytest's tmp_path is private to root)."""
    d = Path(tempfile.mkdtemp(prefix="dynsnap-memsvc-test-", dir="/tmp"))
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


class Svc:
    def __init__(self, d: Path, *args: str, umask: int = 0o022):
        self.sock = d / "svc.sock"
        self.logf = d / "svc.log"
        self.log = open(self.logf, "ab")
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "dynsnap_core.cli", "memsvc", "--socket", str(self.sock), *args],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log, cwd=ROOT, start_new_session=True,
            preexec_fn=lambda: os.umask(umask), env={**os.environ, "DYNSNAP_HOME": str(d / "home")})
        end = time.monotonic() + 30
        while True:                   # until it answers (a stale socket at the path exists before it binds)
            assert self.popen.poll() is None and time.monotonic() < end, self.logf.read_text()
            with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as c:
                try:
                    c.connect(str(self.sock))
                    break
                except OSError:
                    time.sleep(0.02)

    def ask(self, *reqs: dict, user=None) -> list[dict]:
        cmd = [sys.executable, "-I", "-S", "-c", RAW_CLIENT, str(self.sock), *map(json.dumps, reqs)]
        if user is not None:
            cmd = ["setpriv", f"--reuid={user[1]}", f"--regid={user[2]}", "--clear-groups", "--inh-caps=-all"] + cmd
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        return [json.loads(ln) for ln in r.stdout.splitlines()]

    def stop(self) -> str:
        if self.popen.poll() is None:
            self.popen.terminate()
            self.popen.wait(timeout=20)
        self.log.close()
        return self.logf.read_text()


@pytest.fixture
def svc(public_dir):
    made: list[Svc] = []

    def start(*args: str, **kw) -> Svc:
        s = Svc(public_dir, *args, **kw)
        made.append(s)
        return s
    yield start
    for s in made:
        s.stop()


def test_socket_is_private_even_under_umask_0(svc, other_user):
    s = svc(umask=0)
    st = os.lstat(s.sock)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert s.ask({"op": "ping"})[0]["ok"] is True                            # root may
    assert s.ask({"op": "list"}, user=other_user) == [{"error": "Permission denied"}]
    assert [p.name for p in s.sock.parent.iterdir() if p.name.startswith(".memsvc-")] == []   # no temp left


def test_peer_credentials_are_checked_on_every_request(svc, other_user):
    """Even a socket made world-writable by mistake lets no other user in: SO_PEERCRED decides."""
    s = svc()
    os.chmod(s.sock, 0o666)
    name, uid, _gid = other_user
    for req in ({"op": "list"}, {"op": "load", "regions": [{"name": "x", "path": "/etc/shadow"}]},
                {"op": "save", "names": ["x"], "store": "/tmp"}, {"op": "drop", "name": "x", "force": True}):
        [reply] = s.ask(req, user=other_user)
        assert reply["ok"] is False and reply["error"] == "denied", reply
        assert reply["message"].startswith(f"uid {uid} (pid ") and reply["message"].endswith(
            ") may not use this memory service")
    assert "Traceback" not in s.stop()


def test_group_members_may_use_it_within_its_directories(svc, other_user, public_dir):
    name, uid, gid = other_user
    allowed = public_dir / "weights"
    allowed.mkdir()
    (allowed / "w.bin").write_bytes(b"w" * 8192)
    s = svc("--group", name, "--allow", str(allowed), umask=0)
    st = os.lstat(s.sock)
    assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == gid
    ping, shadow, escape, save = s.ask(
        {"op": "ping"}, {"op": "load", "regions": [{"name": "s", "path": "/etc/shadow"}]},
        {"op": "load", "regions": [{"name": "e", "path": str(allowed / ".." / "svc.log")}]},
        {"op": "save", "names": ["s"], "store": "/tmp/elsewhere"}, user=other_user)
    assert ping["ok"] is True
    assert shadow == {"ok": False, "error": "denied", "message": (
        "region file /etc/shadow is outside the directories this service may open "
        f"({', '.join(sorted([str(allowed), str(public_dir / 'home' / 'snapshots'), str(public_dir / 'home' / 'weights')]))}); "
        "start it with --allow DIR")}
    assert escape["error"] == "denied" and save["error"] == "denied"
    [ok] = s.ask({"op": "load", "regions": [{"name": "w", "path": str(allowed / "w.bin"), "length": 8192}]},
                 user=other_user)
    assert ok == {"ok": True, "states": {"w": "loading"}}
    # root is held to the same directories
    [root_shadow] = s.ask({"op": "load", "regions": [{"name": "s", "path": "/etc/shadow"}]})
    assert root_shadow["error"] == "denied"


def test_socket_path_never_replaces_a_file(public_dir, svc):
    victim = public_dir / "svc.sock"
    victim.write_text("precious")
    r = subprocess.run([sys.executable, "-m", "dynsnap_core.cli", "memsvc", "--socket", str(victim)], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and r.stderr == (f"dynsnap memsvc: {victim} exists and is not a socket; refusing to "
                                              "replace it (choose another --socket)\n")
    assert victim.read_text() == "precious"
    victim.unlink()
    # a stale socket (its service died) is replaced; a live one is refused
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    stale.bind(str(victim))
    stale.close()
    s = svc()
    assert s.ask({"op": "ping"})[0]["ok"] is True
    r = subprocess.run([sys.executable, "-m", "dynsnap_core.cli", "memsvc", "--socket", str(victim)], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and r.stderr == f"dynsnap memsvc: another memory service is serving at {victim}\n"
    assert s.ask({"op": "ping"})[0]["ok"] is True


def test_malformed_requests_are_bad_request_without_traceback(svc):
    s = svc()
    bad = [[1, 2], {"op": 5}, {"op": "load", "regions": [1]}, {"op": "load", "regions": [{"name": 1}]},
           {"op": "load", "regions": [{"name": "a", "path": str(s.sock.parent / "nope"), "offset": "x"}]},
           {"op": "get", "name": "a", "timeout": "soon"}, {"op": "create", "name": "c", "size": -1},
           {"op": "create", "name": "c", "size": 2 ** 80}, {"op": "save", "names": "x"},
           {"op": "release", "name": None}, "just a string"]
    replies = s.ask(*bad)
    assert [r.get("error") for r in replies] == ["bad_request"] * len(bad), replies
    # a frame that is not even JSON
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as c:
        c.settimeout(20)
        c.connect(str(s.sock))
        c.send(struct.pack("<I", 3) + b"\xff\xfe{")
        data = c.recv(4096)
        assert json.loads(data[4:])["error"] == "bad_request"
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as c:
        c.connect(str(s.sock))
        c.send(b"\x01")                                        # shorter than a header
        c.settimeout(20)
        assert json.loads(c.recv(4096)[4:])["error"] == "bad_request"
    assert s.ask({"op": "ping"})[0]["ok"] is True
    log = s.stop()
    assert "Traceback" not in log and "Exception in thread" not in log, log
