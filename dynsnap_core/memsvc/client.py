"""The memory service's clients: ``Client`` (one connection: load, get, create/publish, save, ...) and the
worker side, ``Attachment``: a region mapped read-only at an address the worker reserved. Before a checkpoint the
worker calls ``quiesce`` (detach: the mapping becomes an empty PROT_NONE reservation, no memfd fd stays open, the
connection is closed); after restore ``resume`` re-attaches at the same address, so pointers stay valid.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

from .. import memfd
from ..errors import MemsvcError
from ..unixsock import Closing, connect
from .protocol import recv_message, send_message

__all__ = ["Client", "Attachment", "quiesce", "resume"]


class Client(Closing):
    """A connection to the memory service (a context manager). It connects on first use; ``close()`` before a
    checkpoint."""

    def __init__(self, socket_path: str | os.PathLike, *, timeout: float = 300.0):
        self.socket_path = str(socket_path)
        self.timeout = timeout
        self._sock: Optional[socket.socket] = None

    def _conn(self) -> socket.socket:
        if self._sock is None:
            try:
                self._sock = connect(self.socket_path, socket.SOCK_SEQPACKET, self.timeout)
            except OSError as e:
                raise MemsvcError(f"cannot reach the memory service at {self.socket_path}: {e.strerror or e}",
                                  code="unreachable", stage="connect", path=self.socket_path,
                                  errno=e.errno) from None
        return self._sock

    def request(self, obj: dict) -> tuple[dict, list[int]]:
        """Send one request, return (reply, fds); raises MemsvcError for a refusal."""
        s = self._conn()
        try:
            send_message(s, obj)
            reply, fds = recv_message(s)
        except (OSError, ConnectionError) as e:
            self.close()
            raise MemsvcError(f"memory service at {self.socket_path} went away during {obj.get('op')}: {e}",
                              code="unreachable", stage=str(obj.get("op")), path=self.socket_path) from None
        if not reply.get("ok"):
            for fd in fds:
                os.close(fd)
            raise MemsvcError(reply.get("message", "request failed"), code=reply.get("error", "internal"),
                              stage=str(obj.get("op")))
        return reply, fds

    def ping(self) -> dict:
        return self.request({"op": "ping"})[0]

    def load(self, name: str, path: str | os.PathLike, offset: int = 0, length: Optional[int] = None,
             digest: Optional[str] = None) -> str:
        """Start loading one region from a file; returns its state (loading or ready)."""
        return self.load_many([{"name": name, "path": str(path), "offset": offset, "length": length,
                                "digest": digest}])[name]

    def load_many(self, regions: Iterable[dict]) -> dict:
        """Start loading regions ({name, path, offset, length, digest}) in one parallel fill."""
        specs = []
        for r in regions:
            r = dict(r)
            r["path"] = os.path.abspath(str(r["path"]))
            if r.get("length") is None:
                r["length"] = os.stat(r["path"]).st_size - int(r.get("offset") or 0)
            specs.append(r)
        return self.request({"op": "load", "regions": specs})[0]["states"]

    def get(self, name: str, *, wait: bool = True, timeout: Optional[float] = None) -> memfd.MemFd:
        """The region's sealed memfd once it is loaded and verified (``wait=False``: MemsvcError busy)."""
        reply, fds = self.request({"op": "get", "name": name, "wait": wait, "timeout": timeout})
        for fd in fds[1:]:
            os.close(fd)
        return memfd.MemFd.from_message(reply["memfd"], fds[0])

    def create(self, name: str, size: int) -> memfd.MemFd:
        """A new writable region; fill it, unmap it, then ``publish``."""
        reply, fds = self.request({"op": "create", "name": name, "size": size})
        return memfd.MemFd.from_message(reply["memfd"], fds[0])

    def publish(self, name: str) -> str:
        return self.request({"op": "publish", "name": name})[0]["digest"]

    def release(self, name: str) -> None:
        self.request({"op": "release", "name": name})

    def list(self) -> list[dict]:
        return self.request({"op": "list"})[0]["regions"]

    def drop(self, name: str, *, force: bool = False) -> None:
        self.request({"op": "drop", "name": name, "force": force})

    def save(self, names: list[str], store: str | os.PathLike | None = None) -> dict:
        """Store regions in a content-addressed weight directory (the service writes them); name -> entry."""
        from ..weights.store import default_store
        return self.request({"op": "save", "names": names, "store": str(store or default_store())})[0]["regions"]

    def shutdown(self) -> None:
        try:
            self.request({"op": "shutdown"})
        finally:
            self.close()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


@dataclass(eq=False)
class Attachment:
    """A service region mapped read-only at a fixed address of this process.

    ``address`` stays reserved from ``attach`` to ``close``: between ``detach`` and ``reattach`` it is
    an empty PROT_NONE reservation (nothing for CRIU to dump), and no fd of the memfd is kept.
    """

    name: str
    address: int
    size: int
    map_size: int
    digest: Optional[str]
    attached: bool = field(default=False, init=False)

    @classmethod
    def attach(cls, client: Client, name: str, *, wait: bool = True,
               timeout: Optional[float] = None) -> "Attachment":
        """Reserve address space, map the region there, close the fd."""
        with client.get(name, wait=wait, timeout=timeout) as m:
            a = cls(name, memfd.reserve(max(m.map_size, 4096)), m.size, max(m.map_size, 4096), m.digest)
            if m.size:
                memfd.attach(m.fd, a.address, m.map_size, writable=False)
        a.attached = True
        return a

    @classmethod
    def create(cls, client: Client, name: str, size: int, fill: Callable[[memoryview], Any]) -> "Attachment":
        """Create a region in the service, fill it in place at its final address, publish it, map it read-only."""
        with client.create(name, size) as m:
            a = cls(name, memfd.reserve(max(m.map_size, 4096)), m.size, max(m.map_size, 4096), None)
            try:
                if m.size:
                    memfd.attach(m.fd, a.address, m.map_size, writable=True)
                    v = memfd.view_at(a.address, m.size)
                    try:
                        fill(v)
                    finally:
                        v.release()
                memfd.detach(a.address, a.map_size)      # no writable mapping may remain for the seal
            except BaseException:
                memfd.release(a.address, a.map_size)
                raise
        a.digest = client.publish(name)
        a.reattach(client)
        return a

    def view(self) -> memoryview:
        """Zero-copy memoryview of the region (only while attached)."""
        if not self.attached:
            raise MemsvcError(f"region {self.name!r} is detached", code="detached", stage="view")
        return memfd.view_at(self.address, self.size)

    def detach(self, client: Optional[Client] = None) -> None:
        """Unmap the region, keep the address range reserved; tell the service (when connected)."""
        if not self.attached:
            return
        memfd.detach(self.address, self.map_size)
        self.attached = False
        if client is not None:
            try:
                client.release(self.name)
            except MemsvcError:
                pass

    def reattach(self, client: Client, *, wait: bool = True, timeout: Optional[float] = None) -> None:
        """Map the region again at the same address; refuses different content (size or digest)."""
        if self.attached:
            return
        with client.get(self.name, wait=wait, timeout=timeout) as m:
            if m.size != self.size or (self.digest and m.digest != self.digest):
                raise MemsvcError(f"region {self.name!r} changed: {m.size} bytes digest {m.digest}, this process "
                                  f"had {self.size} bytes digest {self.digest}", code="changed", stage="reattach")
            if m.size:
                memfd.attach(m.fd, self.address, m.map_size, writable=False)
        self.digest = self.digest or m.digest
        self.attached = True

    def close(self) -> None:
        """Unmap and give the address range back."""
        memfd.release(self.address, self.map_size)
        self.attached = False


def quiesce(attachments: Iterable[Attachment], client: Client) -> None:
    """Before a checkpoint: detach every region (reservations stay) and close the service connection."""
    for a in attachments:
        a.detach(client)
    client.close()


def resume(attachments: Iterable[Attachment], client: Client, *, timeout: Optional[float] = None) -> None:
    """After a restore: re-attach every region at its old address (waits while the service loads it)."""
    for a in attachments:
        a.reattach(client, wait=True, timeout=timeout)
