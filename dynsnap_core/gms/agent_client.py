"""The checkpoint/restore side of the in-worker agent (:mod:`.agent`): find it, quiesce, resume.

Wiring for ``dynsnap checkpoint`` / ``restore``::

    name = agent_client.find(tree_pids)            # None: a worker without the agent, checkpoint as today
    if name:
        entry = agent_client.manifest_entry(name)  # record in the manifest (agent name, sets + layout hashes)
        t_q = agent_client.quiesce(name, timeout=60)
    ... lock -> GPU checkpoint -> CRIU dump -> persist ...
    # restore: ensure_sets(entry) (in a thread, while CRIU restores), then after CRIU restore -> GPU restore ->
    # unlock
    name = agent_client.renamed(entry["agent"], renames)   # criu_images.rename_taken_abstract_sockets' map
    t_r = agent_client.resume(name, timeout=60)

Every call raises :class:`AgentError` with one sentence when the agent cannot be reached or reports failure.
"""
from __future__ import annotations

import json
import os
import socket
import time
from typing import Iterable, Mapping, Optional

from ..errors import DynsnapError
from . import protocol as P
from .agent import PREFIX, _start_time, agent_file

__all__ = ["AgentError", "find", "find_all", "ping", "quiesce", "resume", "manifest_entry", "renamed", "bound_names",
           "ensure_sets"]


class AgentError(DynsnapError):
    """The worker's agent could not be reached or its quiesce/resume failed."""


def bound_names() -> set[str]:
    """Abstract Unix socket names bound in this network namespace (from /proc/net/unix, without the '@')."""
    out = set()
    try:
        with open("/proc/net/unix") as f:
            next(f, None)
            for line in f:
                parts = line.split()
                if len(parts) >= 8 and parts[7].startswith("@"):
                    out.add(parts[7][1:])
    except OSError:
        pass
    return out


def find_all(pids: Iterable[int]) -> list[str]:
    """The agent socket names of every process in ``pids`` that runs one (a tensor-parallel engine has several)."""
    out = []
    for pid in pids:
        name = find([pid])
        if name is not None and name not in out:
            out.append(name)
    return out


def _held_agent_name(pid: int) -> Optional[str]:
    """The agent name bound by a socket that ``pid`` holds open: its socket inodes (/proc/PID/fd) matched against
    the abstract names of its network namespace (/proc/PID/net/unix). Exact whatever pid namespace the worker
    lives in (under `dynsnap run` it knows itself by another pid) and whatever name a restore gave the socket.
    "" when the process holds no agent socket, None when /proc cannot tell."""
    inodes = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return None
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    try:
        with open(f"/proc/{pid}/net/unix") as f:
            next(f, None)
            for line in f:
                parts = line.split()
                if len(parts) >= 8 and parts[7].startswith("@" + PREFIX) and parts[6] in inodes:
                    return parts[7][1:]
    except OSError:
        return None
    return ""


def find(pids: Iterable[int]) -> Optional[str]:
    """The agent socket name of the first process in ``pids`` that runs one, else None: the abstract agent
    socket the process holds (:func:`_held_agent_name`); where /proc cannot tell, the agent file
    (``$DYNSNAP_RUN_DIR/agents/<pid>.json``), trusted only when its start time matches the live process and its
    name is bound, or a bound name ``dynsnap-agent-<pid>-...``."""
    names = None
    for pid in pids:
        pid = int(pid)
        held = _held_agent_name(pid)
        if held:
            return held
        if held == "":
            continue              # /proc says: no agent socket in this process
        try:
            with open(agent_file(pid)) as f:
                rec = json.load(f)
        except (OSError, ValueError):
            rec = None
        if names is None:
            names = bound_names()
        if isinstance(rec, dict) and rec.get("pid") == pid and rec.get("start_time") == _start_time(pid) \
                and rec.get("name") in names:
            return str(rec["name"])
        head = f"{PREFIX}{pid}-"
        found = sorted(n for n in names if n.startswith(head))
        if found:
            return found[0]
    return None


def _call(name: str, op: str, timeout: float) -> dict:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    t0 = time.perf_counter()
    try:
        try:
            s.connect("\0" + name)
        except OSError as e:
            raise AgentError(f"cannot reach the worker's agent @{name}: {e.strerror or e}", stage=op) from None
        try:
            P.send(s, {"op": op})
            reply, fds = P.recv(s, 1 << 20)
            P._close_all(fds)
            # the agent closes its side right after replying: wait for that EOF, so that no connection is
            # left in the worker when it is frozen
            while s.recv(4096):
                pass
        except socket.timeout:
            raise AgentError(f"the worker's agent @{name} did not finish {op} within {timeout:.0f} s",
                             stage=op) from None
        except (OSError, ConnectionError, P.ProtocolError) as e:
            raise AgentError(f"the worker's agent @{name} broke off during {op}: {e}", stage=op) from None
    finally:
        s.close()
    if not isinstance(reply, dict) or not reply.get("ok"):
        err = reply.get("error") if isinstance(reply, dict) else None
        raise AgentError(str(err or f"the worker's agent @{name} sent a malformed reply to {op}"), stage=op)
    reply["client_s"] = time.perf_counter() - t0
    return reply


def ping(name: str, timeout: float = 10.0) -> dict:
    return _call(name, "ping", timeout)


def quiesce(name: str, timeout: float = 120.0) -> dict:
    """Ask the worker to quiesce (engine callbacks, release regions, synchronize); returns its timings."""
    r = _call(name, "quiesce", timeout)
    return {**r["timings"], "client_s": r["client_s"]}


def resume(name: str, timeout: float = 120.0) -> dict:
    """Ask the worker to resume (reacquire regions, engine callbacks); returns its timings."""
    r = _call(name, "resume", timeout)
    return {**r["timings"], "client_s": r["client_s"]}


def manifest_entry(name: str, timeout: float = 10.0) -> dict:
    """What the snapshot manifest records: {agent, pid, weight_sets: [{set, layout_hash, bytes, va, service}],
    service_sockets, private_bytes}."""
    return _call(name, "manifest", timeout)["entry"]


def renamed(name: str, renames: Mapping[bytes, bytes]) -> str:
    """The agent's name after a restore that renamed taken abstract socket names (the map of
    ``criu_images.rename_taken_abstract_sockets``: b"\\0old" -> b"\\0new")."""
    key = b"\0" + name.encode()
    new = renames.get(key)
    return new[1:].decode() if new else name


def ensure_sets(entry: Mapping, timeout: float = 3600.0) -> dict:
    """Make every weight set of a manifest entry resident in its service (loading it from the store if needed:
    run this while CRIU restores) and check that its layout hash is still the recorded one. Returns
    {set: {"layout_hash", "bytes", "seconds"}}; GmsError (code ``mismatch`` for a changed layout) otherwise, so a
    restore can stop before the worker would map other weights."""
    out: dict = {}
    for ws in entry.get("weight_sets") or []:
        t0 = time.perf_counter()
        with P.Client(ws.get("service") or P.default_socket(), timeout=timeout + 30) as c:
            r = c.ensure(ws["set"], timeout)
        if r.get("layout_hash") != ws.get("layout_hash"):
            raise P.GmsError(f"weight set {ws['set']!r} now has layout hash {r.get('layout_hash')}, the snapshot "
                             f"recorded {ws.get('layout_hash')}: refusing to restore a worker onto other weights",
                             code="mismatch")
        out[ws["set"]] = {"layout_hash": r["layout_hash"], "bytes": r.get("bytes"), "seconds": time.perf_counter() - t0}
    return out
