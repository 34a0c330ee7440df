"""Serving the agent with uvicorn: a root-only Unix socket (peer credentials checked) or TCP with a bearer token."""
from __future__ import annotations

import asyncio
import errno
import os
import signal
import socket
import stat
import struct
import sys
from pathlib import Path
from typing import Optional

from ..errors import DynsnapError, PermissionDenied

__all__ = ["unix_socket", "tcp_socket", "read_token", "serve", "peer_allowed"]


def peer_allowed(uid: int) -> bool:
    """Who may talk to the agent over its Unix socket: root and the agent's own user."""
    return uid in (0, os.geteuid())


def _forbidden(uid: int):
    """An ASGI app answering 403 to a Unix-socket peer that is not root (the request is read, never handled)."""
    from starlette.responses import JSONResponse
    resp = JSONResponse({"error": "Forbidden",
                         "message": f"only root may use the dynsnap agent's socket (peer uid {uid})"}, status_code=403)

    async def app(scope, receive, send):
        if scope["type"] == "http":
            await resp(scope, receive, send)
    return app


def _peer_checked_h11():
    """uvicorn's h11 protocol; a Unix-socket peer (SO_PEERCRED) that is another user gets 403 for every request."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class PeerCheckedH11(H11Protocol):
        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            sock = transport.get_extra_info("socket")
            if sock is None or sock.family != socket.AF_UNIX:
                return
            try:
                _, uid, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                                struct.calcsize("3i")))
            except OSError:
                uid = -1
            if not peer_allowed(uid):
                self.app = _forbidden(uid)      # this connection only: every request is answered 403
    return PeerCheckedH11


def unix_socket(path: str | os.PathLike) -> socket.socket:
    """A listening Unix socket at ``path``, mode 0600 from its creation (umask), in a 0755 directory.

    A stale socket left by a killed agent is replaced; a live one (another agent answers) is refused.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    if path.exists() or path.is_symlink():
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise DynsnapError(f"{path} exists and is not a socket; refusing to replace it", stage="agent",
                               path=str(path))
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError as e:
            if e.errno not in (errno.ECONNREFUSED, errno.ENOENT):
                raise
            path.unlink()
        else:
            raise DynsnapError(f"another agent is listening on {path}", stage="agent", path=str(path))
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(128)
    sock.set_inheritable(False)
    return sock


def tcp_socket(listen: str) -> socket.socket:
    """A listening TCP socket for ``HOST:PORT`` (``[v6]:PORT`` too)."""
    host, _, port = listen.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    try:
        port_n = int(port)
    except ValueError:
        raise DynsnapError(f"--listen {listen!r} is not HOST:PORT", stage="agent") from None
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port_n))
    except OSError as e:
        sock.close()
        raise DynsnapError(f"cannot listen on {listen}: {e.strerror}", stage="agent", errno=e.errno) from None
    sock.listen(128)
    return sock


def read_token(path: str | os.PathLike) -> str:
    """The bearer token from a file that only its owner can read; refused when others can read it or it is empty."""
    path = Path(path)
    try:
        st = path.stat()
        text = path.read_text().strip()
    except OSError as e:
        raise DynsnapError(f"cannot read the token file {path}: {e.strerror}", stage="agent", path=str(path)) from None
    if st.st_mode & 0o077:
        raise PermissionDenied(f"the token file {path} is readable by others (mode {st.st_mode & 0o777:o}); "
                               f"chmod 600 {path}", stage="agent", path=str(path))
    if len(text) < 16:
        raise DynsnapError(f"the token in {path} is shorter than 16 characters; use a long random token",
                           stage="agent", path=str(path))
    return text


def serve(agent, *, socket_path: Optional[str] = None, listen: Optional[str] = None,
          token_file: Optional[str] = None, max_body: int = 64 << 10, log_level: str = "warning",
          drain: float = 300) -> int:
    """Serve until SIGTERM/SIGINT. Unix socket by default; TCP (``listen``) only with ``token_file``.

    On SIGTERM the agent stops listening, fails queued jobs and waits up to ``drain`` seconds for running ones.
    """
    import uvicorn

    from .app import create_app
    if listen and not token_file:
        raise DynsnapError("TCP (--listen) needs --token-file: the agent never serves TCP without a bearer token",
                           stage="agent")
    token = read_token(token_file) if listen else None
    sockets = []
    where = []
    mine: Optional[tuple[str, int]] = None          # the socket we created, removed at exit
    try:
        if listen:
            sockets.append(tcp_socket(listen))
            where.append(f"http://{listen}")
        if socket_path or not listen:
            from .service import DEFAULT_SOCKET
            sp = socket_path or DEFAULT_SOCKET
            sockets.append(unix_socket(sp))
            mine = (sp, os.stat(sp).st_ino)
            where.append(f"unix:{sp}")
        app = create_app(agent, token=token, max_body=max_body)
        http = _peer_checked_h11() if not listen else "h11"
        if listen and socket_path:
            # both: the token guards TCP and also the socket; peer credentials still guard the socket
            http = _peer_checked_h11()
        config = uvicorn.Config(app, http=http, lifespan="off", log_level=log_level, access_log=False,
                                timeout_graceful_shutdown=5)
        server = uvicorn.Server(config)
        print(f"dynsnap agent {os.getpid()} serving on {', '.join(where)}; snapshots in {agent.root}"
              + (f", object storage {agent.remote.url}" if agent.remote is not None else ""),
              file=sys.stderr, flush=True)
        # uvicorn re-raises the signal that stopped it once it is done; a handler of ours turns that into a
        # normal return, so the socket is removed and running jobs finish below
        stop = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            asyncio.run(server.serve(sockets=sockets))
        finally:
            for sig, old in stop.items():
                signal.signal(sig, old)
    finally:
        for s in sockets:
            s.close()
        if mine is not None:
            try:
                if os.stat(mine[0]).st_ino == mine[1]:
                    os.unlink(mine[0])
            except OSError:
                pass
        agent.close(timeout=drain)
    return 0
