"""Snapshot names as stored remotely: one path component, checked before any request."""
from __future__ import annotations

import re

from ..errors import DynsnapError

__all__ = ["NAME", "check_name"]

#: A snapshot name: one path component of letters, digits, '.', '_' and '-', not starting with '.'.
NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")


def check_name(name: str) -> str:
    """``name`` if it is a safe snapshot name, else DynsnapError saying what is wrong with it."""
    if not isinstance(name, str) or not NAME.match(name) or ".." in name:
        shown = repr(name) if isinstance(name, str) else type(name).__name__
        raise DynsnapError(f"snapshot name {shown} is not allowed: use 1 to 128 letters, digits, '.', '_' or '-', "
                           "not starting with '.' and without '..'", stage="preflight")
    return name
