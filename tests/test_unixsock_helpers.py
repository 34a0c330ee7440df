"""dynsnap_core.unixsock: the socket and peer helpers both services (memsvc, gms) share. The services' own
tests cover the sentences end to end; these pin the helpers' edges on real sockets and real directories."""
from __future__ import annotations

import os
import socket
import stat

import pytest

from dynsnap_core import unixsock


class _Err(Exception):
    def __init__(self, message, **kw):
        super().__init__(message)
        self.kw = kw


def _bind(path, **kw):
    return unixsock.bind_private(str(path), kind=socket.SOCK_STREAM, what="test service", prefix=".t-", error=_Err,
                                 **kw)


def test_bind_private_modes_and_leaves_no_temporary_directory(tmp_path):
    s, sid = _bind(tmp_path / "a.sock")
    g, gid_ = _bind(tmp_path / "g.sock", gid=os.getegid())
    try:
        st = os.lstat(tmp_path / "a.sock")
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600 and sid == (st.st_dev, st.st_ino)
        st = os.lstat(tmp_path / "g.sock")
        assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == os.getegid()
        assert sorted(os.listdir(tmp_path)) == ["a.sock", "g.sock"]
        c = unixsock.connect(str(tmp_path / "a.sock"), socket.SOCK_STREAM, 5)
        conn, _ = s.accept()
        with c, conn:
            assert unixsock.peer_cred(conn) == (os.getpid(), os.geteuid(), os.getegid())
            assert unixsock.peer_refusal(conn, lambda uid, pid: "never") is None
    finally:
        s.close()
        g.close()


def test_bind_private_refuses_live_and_foreign_and_replaces_stale(tmp_path):
    path = tmp_path / "s.sock"
    s, sid = _bind(path)
    with pytest.raises(_Err, match=f"^another test service is serving at {path}$") as e:
        _bind(path)
    assert e.value.kw == {"code": "exists", "path": str(path)}
    s.close()                                   # now stale: the next bind replaces it
    s2, _ = _bind(path)
    try:
        with unixsock.connect(str(path), socket.SOCK_STREAM, 5):
            pass
    finally:
        s2.close()
    (tmp_path / "file").write_text("keep")
    with pytest.raises(_Err, match="exists and is not a socket; refusing to replace it"):
        _bind(tmp_path / "file")
    assert (tmp_path / "file").read_text() == "keep"


def test_bind_private_make_parent_and_its_refusal(tmp_path):
    s, _ = _bind(tmp_path / "new" / "dir" / "s.sock", make_parent=True)
    s.close()
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")        # a parent that cannot be made
    with pytest.raises(_Err, match=f"^cannot create the socket directory {tmp_path}/dangling: File exists$") as e:
        _bind(tmp_path / "dangling" / "s.sock", make_parent=True)
    assert e.value.kw == {"code": "internal", "path": f"{tmp_path}/dangling", "errno": 17}


def test_unlink_own_removes_only_the_same_inode(tmp_path):
    path = tmp_path / "s.sock"
    s, sid = _bind(path)
    s.close()
    os.rename(path, tmp_path / "moved.sock")    # still linked: its inode cannot be reused
    other, other_id = _bind(path)               # someone else's socket at the path now
    other.close()
    unixsock.unlink_own(str(path), sid)
    assert path.exists()
    unixsock.unlink_own(str(path), other_id)
    assert not path.exists()
    unixsock.unlink_own(str(tmp_path / "gone.sock"), sid)      # nothing there: no error


def test_roots_resolve_and_refuse_escapes_and_prefix_siblings(tmp_path):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (tmp_path / "rootx").mkdir()
    (root / "link").symlink_to(tmp_path / "rootx")
    roots = [os.path.realpath(root)]
    assert unixsock.within_roots(str(root / "sub" / ".." / "sub"), roots) == os.path.realpath(root / "sub")
    assert unixsock.within_roots(str(root), roots) == roots[0]
    assert unixsock.within_roots(str(tmp_path / "rootx"), roots) is None
    assert unixsock.within_roots(str(root / "link"), roots) is None
    assert unixsock.outside_roots("/x", ["/a", "/b"]) == ("/x is outside the directories this service may open "
                                                          "(/a, /b); start it with --allow DIR")
    got = unixsock.allowed_roots([str(root), str(root / "sub" / "..")])
    assert got == sorted(set(got)) and got.count(roots[0]) == 1


def test_connect_failure_is_the_oserror(tmp_path):
    with pytest.raises(FileNotFoundError):
        unixsock.connect(str(tmp_path / "none.sock"), socket.SOCK_SEQPACKET, 5)


def test_closing_closes_on_exit():
    class C(unixsock.Closing):
        closed = 0

        def close(self):
            self.closed += 1

    with C() as c:
        assert c.closed == 0
    assert c.closed == 1
