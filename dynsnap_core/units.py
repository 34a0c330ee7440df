"""Numbers for people: byte counts as ``512 B``, ``1.5 KiB``, ... ``2.0 TiB`` (CLI output, error messages)."""
from __future__ import annotations

__all__ = ["human_bytes"]


def human_bytes(n: float) -> str:
    """A byte count for people: ``512 B``, ``1.5 KiB``, ... ``2.0 TiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"
