"""The CRIU version found by ``criu --version`` (10-15 ms a run), remembered per binary in the run directory.

Key: the binary's path, inode, size and modification time, so a replaced or upgraded CRIU is probed again (the
bundle's wrapper, /opt/dynsnap/criu/bin/criu, is written anew by every scripts/criu-bundle.sh into a directory
renamed into place: a new inode); the run directory is per boot (/run). Anything that cannot be read or written
just means probing again.
"""
from __future__ import annotations

import json
import os
from typing import Callable, Optional

__all__ = ["cached_version"]


def cached_version(path: str, probe: Callable[[str], Optional[tuple]]) -> Optional[tuple]:
    try:
        st = os.stat(path)
    except OSError:
        return probe(path)
    key = f"{os.path.realpath(path)} {st.st_ino} {st.st_size} {st.st_mtime_ns}"
    try:
        from .journal import run_dir
        cache = run_dir() / "criu-version.json"
    except Exception:  # noqa: BLE001 - no run dir: no cache
        return probe(path)
    try:
        with open(cache) as f:
            known = json.load(f)
        if isinstance(known, dict) and isinstance(known.get(key), list):
            return tuple(int(x) for x in known[key])
    except (OSError, ValueError, TypeError):
        known = {}
    ver = probe(path)
    if ver is not None:
        try:
            cache.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            known = {k: v for k, v in (known if isinstance(known, dict) else {}).items()
                     if k.split(" ", 1)[0] != key.split(" ", 1)[0]}
            known[key] = list(ver)
            tmp = cache.with_name(f"{cache.name}.{os.getpid()}")
            tmp.write_text(json.dumps(known))
            os.replace(tmp, cache)
        except OSError:
            pass
    return ver
