"""The node agent: an HTTP API over dynsnap's Python API, served on a root-only Unix socket or TCP with a token."""
from __future__ import annotations

import json
import socket
from typing import Optional

from .service import DEFAULT_SOCKET, Agent, AgentConfig

__all__ = ["Agent", "AgentConfig", "DEFAULT_SOCKET", "serve", "probe", "create_app"]


def serve(agent: Agent, **kw) -> int:
    """Serve ``agent`` until SIGTERM/SIGINT (see dynsnap_core.agent.server.serve)."""
    from .server import serve as _serve
    return _serve(agent, **kw)


def create_app(agent: Agent, **kw):
    """The ASGI application of ``agent`` (see dynsnap_core.agent.app.create_app)."""
    from .app import create_app as _create
    return _create(agent, **kw)


def probe(socket_path: Optional[str] = None, timeout: float = 5.0) -> int:
    """GET /healthz over the Unix socket with the standard library only: 0 when the agent answers ok, else 1."""
    path = socket_path or DEFAULT_SOCKET
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(path)
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
    except OSError as e:
        print(f"dynsnap agent: no answer on {path}: {e.strerror or e}")
        return 1
    head, _, body = data.partition(b"\r\n\r\n")
    ok = head.startswith(b"HTTP/1.1 200") and json.loads(body or b"{}").get("status") == "ok"
    print(f"dynsnap agent on {path}: {'ok' if ok else head.splitlines()[0].decode(errors='replace') if head else 'no reply'}")
    return 0 if ok else 1
