"""dynsnap demo end to end at a small size: the restored worker gives the same answer, the table is complete."""
from __future__ import annotations

import json

import pytest

from helpers import cli

pytestmark = pytest.mark.criu


def test_demo_json(home):
    r = cli("demo", "--mb", "64", "--rounds", "1", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["ok"] is True and res["answer_before"] == res["answer_after"] and len(res["answer_after"]) == 32
    # the worker runs in its own pid namespace: each restore gets a fresh one (and fresh pids outside it)
    second = res["second_copy"]
    assert len({res["pid"], res["restored_pid"], second["pid"]}) == 3
    assert second["ok"] is True and second["answer"] == res["answer_before"] and second["first_answer_s"] > 0
    assert res["image_bytes"] > 64 << 20
    for key in ("cold_start_s", "checkpoint_s", "restore_s", "first_answer_after_restore_s", "checkpoint_mb_s"):
        assert res[key] > 0
    assert not list((home / "demo").iterdir()), "the demo cleans up after itself without --keep"


def test_demo_table(home):
    r = cli("demo", "--mb", "32", "--rounds", "1")
    assert r.returncode == 0, r.stderr
    rows = dict(line.rsplit("  ", 1) for line in r.stdout.strip().splitlines()[-10:])
    assert [k.strip() for k in rows] == [
        "cold start (spawn -> first answer)", "checkpoint (dump + persist + commit)",
        "restore (verify + CRIU restore)", "time to first answer after restore", "image size",
        "checkpoint throughput", "restore throughput", "first answer vs cold start",
        "second copy side by side (restore -> answer)", "same answer after restore"]
    assert rows["same answer after restore".ljust(len(list(rows)[0]))].strip() == "yes"
