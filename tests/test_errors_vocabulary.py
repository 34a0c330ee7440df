"""dynsnap_core.errors: every stage a module names is a Stage; one errno mapping for the C engines."""
from __future__ import annotations

import ast
import errno
import json
from pathlib import Path

import pytest

import dynsnap_core
from dynsnap_core import errors
from dynsnap_core.errors import DynsnapError, MemfdError, SnapshotCorrupt, Stage, from_engine

PKG = Path(dynsnap_core.__file__).parent


def _stage_literals() -> list[tuple[str, str]]:
    """(where, text) for every stage written as a string literal: stage="...", _check_interrupt(s, "..."),
    _translate(e, "...")."""
    out = []
    for p in sorted(PKG.rglob("*.py")):
        for node in ast.walk(ast.parse(p.read_text())):
            if not isinstance(node, ast.Call):
                continue
            for kw in node.keywords:
                if kw.arg == "stage" and isinstance(kw.value, ast.Constant) and isinstance(kw.value.value, str):
                    out.append((f"{p.relative_to(PKG)}:{node.lineno}", kw.value.value))
            name = getattr(node.func, "id", getattr(node.func, "attr", ""))
            if name in ("_check_interrupt", "_translate", "from_engine") and len(node.args) == 2 \
                    and isinstance(node.args[1], ast.Constant):
                out.append((f"{p.relative_to(PKG)}:{node.lineno}", node.args[1].value))
    return out


def test_every_stage_literal_is_a_stage():
    found = _stage_literals()
    assert len(found) > 100                          # the scan sees the package's raise sites
    values = {s.value for s in Stage}
    assert [(w, t) for w, t in found if t not in values] == []


def test_stage_is_a_string_and_survives_json():
    e = DynsnapError("x", stage="verify")
    assert e.stage is Stage.VERIFY and e.stage == "verify" and f"{e.stage}" == "verify"
    assert json.loads(json.dumps(e.to_dict()))["stage"] == "verify"
    assert DynsnapError("x", stage="cuCheckpointProcessLock").stage == "cuCheckpointProcessLock"   # a call name
    assert DynsnapError("x").stage is None


def _engine_error(err: int, op: str) -> OSError:
    e = errors.oserror(-err, op, "/x/pages-1.img")
    e.op = op
    return e


@pytest.mark.parametrize("err,op,kind", [
    (errno.EIO, "read", SnapshotCorrupt),            # memfd.h: -EIO when a file turns out shorter while reading
    (errno.EBADMSG, "read", SnapshotCorrupt),        # memfd.h: -EBADMSG when a checked digest does not match
    (errno.EINVAL, "segment", SnapshotCorrupt),      # a segment beyond the end of its file
    (errno.EBADMSG, "verify", SnapshotCorrupt),
    (errno.ENOMEM, "mmap", MemfdError),
    (errno.ENOSYS, "memfd_create", MemfdError),
    (errno.EACCES, "open", PermissionError),
    (errno.ENOSPC, "write", OSError),
])
def test_engine_errno_mapping(err, op, kind):
    got = from_engine(_engine_error(err, op), "memfd restore")
    assert type(got) is kind
    assert got.errno == err
    if isinstance(got, DynsnapError):
        assert got.stage is Stage.MEMFD_RESTORE and got.path == "/x/pages-1.img"


def test_old_exception_paths_are_the_same_classes():
    from dynsnap_core import memfd, snapshot, weights
    assert memfd.MemfdError is errors.MemfdError
    assert snapshot.Interrupted is errors.Interrupted
    assert weights.GpuUnavailable is errors.CudaUnavailable
    assert issubclass(weights.ShardCorrupt, SnapshotCorrupt)
