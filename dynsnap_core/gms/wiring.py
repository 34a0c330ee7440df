"""The four calls ``dynsnap checkpoint`` / ``restore`` make for a worker that runs the agent (GMS regions).

    # checkpoint
    q = wiring.before_checkpoint(tree_pids)          # None: no agent, checkpoint as today
    try:
        ... lock -> GPU checkpoint -> CRIU dump -> persist (manifest["gms"] = q.manifest) ...
    except BaseException:
        wiring.after_checkpoint(q, kept_running=True)  # the source keeps running: map its regions back
        raise
    wiring.after_checkpoint(q, kept_running=leave_running)

    # restore
    pre = wiring.before_restore(manifest.get("gms"))   # weight sets made resident beside CRIU's restore
    ... CRIU restore (renames = criu_images.rename_taken_abstract_sockets(...)) -> GPU restore -> unlock ...
    timings = wiring.after_restore(manifest.get("gms"), pre, renames)   # wait for the sets, then resume

Every step's timings end up in ``Quiesced.timings`` / the dict ``after_restore`` returns, for the JSON output.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Optional

from . import agent_client as AC
from .protocol import GmsError

__all__ = ["Quiesced", "Prepared", "before_checkpoint", "after_checkpoint", "before_restore", "after_restore"]


@dataclass
class Quiesced:
    """A worker quiesced for a checkpoint: ``manifest`` is what the snapshot's manifest records under "gms"."""
    name: str
    manifest: dict
    timings: dict = field(default_factory=dict)


def before_checkpoint(pids: Iterable[int], timeout: float = 120.0) -> Optional[Quiesced]:
    """Find the agent in the tree, record its manifest entry, quiesce it. None when no process runs an agent.
    On a failed quiesce the worker is resumed again and the AgentError is raised (nothing was frozen)."""
    name = AC.find(list(pids))
    if name is None:
        return None
    t0 = time.perf_counter()
    entry = AC.manifest_entry(name, timeout=min(timeout, 30.0))
    try:
        t = AC.quiesce(name, timeout)
    except AC.AgentError:
        try:
            AC.resume(name, timeout)
        except AC.AgentError:
            pass
        raise
    return Quiesced(name, entry, {"gms_quiesce": time.perf_counter() - t0, "gms_quiesce_worker": t})


def after_checkpoint(q: Optional[Quiesced], kept_running: bool, timeout: float = 120.0) -> None:
    """After the dump: a source that keeps running (leave-running, or a failed checkpoint) maps its regions back.
    A stopped source needs nothing."""
    if q is not None and kept_running:
        t0 = time.perf_counter()
        t = AC.resume(q.name, timeout)
        q.timings.update({"gms_resume": time.perf_counter() - t0, "gms_resume_worker": t})


class Prepared:
    """The weight sets of a snapshot being made resident in a thread (started by :func:`before_restore`)."""

    def __init__(self, entry: Optional[Mapping], timeout: float):
        self.entry = entry
        self.result: Optional[dict] = None
        self.error: Optional[BaseException] = None
        self.seconds = 0.0
        self._thread: Optional[threading.Thread] = None
        if entry and entry.get("weight_sets"):
            self._thread = threading.Thread(target=self._run, args=(timeout,), daemon=True, name="gms-prepare")
            self._thread.start()

    def _run(self, timeout: float) -> None:
        t0 = time.perf_counter()
        try:
            self.result = AC.ensure_sets(self.entry or {}, timeout)
        except BaseException as e:  # noqa: BLE001 - re-raised by wait()
            self.error = e
        self.seconds = time.perf_counter() - t0

    def wait(self, timeout: Optional[float] = None) -> dict:
        """The sets' timings once resident; the service's GmsError (mismatch, not_found, no memory...) otherwise."""
        if self._thread is None:
            return {}
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise GmsError("the GPU memory service did not make the snapshot's weight sets resident in time",
                           code="timeout")
        if self.error is not None:
            raise self.error
        return dict(self.result or {})


def before_restore(entry: Optional[Mapping], timeout: float = 3600.0) -> Prepared:
    """Start making the snapshot's weight sets resident (and checking their layout hashes) while CRIU restores."""
    return Prepared(entry, timeout)


def after_restore(entry: Optional[Mapping], prepared: Optional[Prepared] = None,
                  renames: Optional[Mapping[bytes, bytes]] = None, timeout: float = 120.0) -> dict:
    """After CRIU restore, GPU restore and unlock: wait for the weight sets, then resume the worker under its
    (possibly renamed) agent name. Returns the timings."""
    if not entry or not entry.get("agent"):
        return {}
    t0 = time.perf_counter()
    sets = prepared.wait() if prepared is not None else {}
    t1 = time.perf_counter()
    name = AC.renamed(str(entry["agent"]), renames or {})
    t = AC.resume(name, timeout)
    return {"gms_sets_wait": t1 - t0, "gms_sets": sets, "gms_resume": time.perf_counter() - t1,
            "gms_resume_worker": t, "gms_agent": name}
