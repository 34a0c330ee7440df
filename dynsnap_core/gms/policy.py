"""Which resident weight sets the service frees to make room for another one: a pure function.

Policy (documented in docs/operations.md): a set held by a worker is never freed. To fit ``need`` more bytes,
the service frees unheld resident sets, least recently used first (``last_used``: the last open, close or
load), until both hold: resident bytes + ``need`` <= ``budget`` (``--max-bytes``, when set) and ``need`` <=
free GPU memory + the bytes freed. If even freeing every unheld set is not enough, nothing is freed and the
request is refused with a sentence giving the numbers.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence


__all__ = ["Resident", "Plan", "plan", "human_bytes"]


def human_bytes(n: float) -> str:
    """A byte count for people: ``512 B``, ``1.5 KiB``, ... ``2.0 TiB``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


@dataclass(frozen=True)
class Resident:
    name: str
    nbytes: int
    held: bool
    last_used: float


@dataclass
class Plan:
    ok: bool
    evict: list[str] = field(default_factory=list)
    reason: Optional[str] = None


def plan(resident: Sequence[Resident], need: int, *, budget: Optional[int] = None,
         free: Optional[int] = None, what: str = "the weight set") -> Plan:
    """The sets to free (LRU among unheld) so that ``need`` bytes fit under ``budget`` and in ``free`` GPU
    memory (either None: no such limit); ``ok=False`` with ``reason`` when no choice fits."""
    used = sum(r.nbytes for r in resident)

    def fits(freed: int) -> bool:
        return (budget is None or used - freed + need <= budget) and (free is None or need <= free + freed)

    if budget is not None and need > budget:
        return Plan(False, [], f"{what} needs {human_bytes(need)}, more than this service's budget "
                               f"(--max-bytes {human_bytes(budget)})")
    chosen: list[str] = []
    freed = 0
    for r in sorted((r for r in resident if not r.held), key=lambda r: (r.last_used, r.name)):
        if fits(freed):
            break
        chosen.append(r.name)
        freed += r.nbytes
    if fits(freed):
        return Plan(True, chosen)
    held = sum(r.nbytes for r in resident if r.held)
    parts = []
    if free is not None:
        parts.append(f"{human_bytes(free)} of GPU memory is free")
    if budget is not None:
        parts.append(f"{human_bytes(used)} of the {human_bytes(budget)} budget is in use")
    return Plan(False, [], f"{what} needs {human_bytes(need)}: {' and '.join(parts)}, and freeing every set no "
                           f"worker holds gives back only {human_bytes(freed)} ({human_bytes(held)} is held by "
                           "workers)")
