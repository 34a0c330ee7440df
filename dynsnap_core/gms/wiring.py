"""The four calls ``dynsnap checkpoint`` / ``restore`` make for workers that run the agent (GMS regions).

    # checkpoint
    q = wiring.before_checkpoint(tree_pids)          # None: no agent in the tree, checkpoint as today
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

``q.manifest`` is ``{"agents": [entry, ...]}``, one entry per process of the tree that runs an agent (a
tensor-parallel engine has one per GPU worker): ``{agent, pid, weight_sets: [{set, layout_hash, bytes, va,
service}], service_sockets, private_bytes}``. Timings go to ``Quiesced.timings`` / the dict ``after_restore``
returns, for the JSON output.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Optional

from . import agent_client as AC
from .protocol import GmsError

__all__ = ["Quiesced", "Prepared", "before_checkpoint", "after_checkpoint", "before_restore", "after_restore",
           "flat_timings"]


def flat_timings(timings: Mapping) -> dict:
    """The plain numbers of a timings dict, for a snapshot's flat timings (per-worker details stay out)."""
    return {k: v for k, v in timings.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


@dataclass
class Quiesced:
    """Workers quiesced for a checkpoint: ``manifest`` is what the snapshot's manifest records under "gms"."""
    names: list
    manifest: dict
    timings: dict = field(default_factory=dict)


def _resume_all(names: Iterable[str], timeout: float) -> dict:
    out, first = {}, None
    for n in names:
        try:
            out[n] = AC.resume(n, timeout)
        except AC.AgentError as e:
            first = first or e
    if first is not None:
        raise first
    return out


def before_checkpoint(pids: Iterable[int], timeout: float = 120.0) -> Optional[Quiesced]:
    """Find the agents in the tree, record their manifest entries, quiesce them (in tree order). None when no
    process runs an agent. If any quiesce fails, every agent asked so far is resumed again and the AgentError is
    raised (nothing was frozen)."""
    names = AC.find_all(list(pids))
    if not names:
        return None
    t0 = time.perf_counter()
    entries, per, asked = [], {}, []
    try:
        for n in names:
            entries.append(AC.manifest_entry(n, timeout=min(timeout, 30.0)))
            asked.append(n)
            per[n] = AC.quiesce(n, timeout)
    except AC.AgentError:
        try:
            _resume_all(asked, timeout)
        except AC.AgentError:
            pass
        raise
    return Quiesced(names, {"agents": entries}, {"gms_quiesce": time.perf_counter() - t0, "gms_quiesce_workers": per})


def after_checkpoint(q: Optional[Quiesced], kept_running: bool, timeout: float = 120.0) -> None:
    """After the dump: a source that keeps running (leave-running, or a failed checkpoint) maps its regions back.
    A stopped source needs nothing."""
    if q is not None and kept_running:
        t0 = time.perf_counter()
        per = _resume_all(q.names, timeout)
        q.timings.update({"gms_resume": time.perf_counter() - t0, "gms_resume_workers": per})


class Prepared:
    """The weight sets of a snapshot being made resident in a thread (started by :func:`before_restore`)."""

    def __init__(self, gms: Optional[Mapping], timeout: float):
        sets = [ws for e in (gms or {}).get("agents") or [] for ws in e.get("weight_sets") or []]
        self.result: Optional[dict] = None
        self.error: Optional[BaseException] = None
        self.seconds = 0.0
        self._thread: Optional[threading.Thread] = None
        if sets:
            self._thread = threading.Thread(target=self._run, args=({"weight_sets": sets}, timeout), daemon=True,
                                            name="gms-prepare")
            self._thread.start()

    def _run(self, entry: dict, timeout: float) -> None:
        t0 = time.perf_counter()
        try:
            self.result = AC.ensure_sets(entry, timeout)
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


def before_restore(gms: Optional[Mapping], timeout: float = 3600.0) -> Prepared:
    """Start making the snapshot's weight sets resident (and checking their layout hashes) while CRIU restores."""
    return Prepared(gms, timeout)


def after_restore(gms: Optional[Mapping], prepared: Optional[Prepared] = None,
                  renames: Optional[Mapping[bytes, bytes]] = None, timeout: float = 120.0) -> dict:
    """After CRIU restore, GPU restore and unlock: wait for the weight sets, then resume every worker under its
    (possibly renamed) agent name. Returns the timings."""
    entries = [e for e in (gms or {}).get("agents") or [] if e.get("agent")]
    if not entries:
        return {}
    t0 = time.perf_counter()
    sets = prepared.wait() if prepared is not None else {}
    t1 = time.perf_counter()
    names = [AC.renamed(str(e["agent"]), renames or {}) for e in entries]
    per = _resume_all(names, timeout)
    return {"gms_sets_wait": t1 - t0, "gms_sets": sets, "gms_resume": time.perf_counter() - t1,
            "gms_resume_workers": per, "gms_agents": names}
