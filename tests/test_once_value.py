"""dynsnap_core.once: a process-wide value made once, on first use."""
from __future__ import annotations

import threading

import pytest

from dynsnap_core.once import once


def test_made_once_and_kept():
    calls = []

    @once
    def value() -> list:
        """doc"""
        calls.append(1)
        return ["v"]

    assert value() is value() and calls == [1] and value.__doc__ == "doc" and value.__name__ == "value"


def test_a_failed_make_stores_nothing():
    calls = []

    @once
    def value() -> int:
        calls.append(1)
        if len(calls) == 1:
            raise OSError("first")
        return 7

    with pytest.raises(OSError, match="first"):
        value()
    assert value() == 7 and value() == 7 and calls == [1, 1]


def test_concurrent_first_callers_get_the_one_value():
    made = []
    go = threading.Barrier(8)

    @once
    def value() -> object:
        made.append(object())
        return made[-1]

    got = []

    def call():
        go.wait()
        got.append(value())

    ts = [threading.Thread(target=call) for _ in range(8)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert len(made) == 1 and len(got) == 8 and all(g is made[0] for g in got)
