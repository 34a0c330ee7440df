"""A memory-service client through real CRIU: region detached before the checkpoint, re-attached at the same
address after the restore, same content hash; and the weight-directory path that loads regions during the restore."""
from __future__ import annotations

import os

import pytest

import dynsnap_core
from dynsnap_core import memfd, memsvc
from dynsnap_core.snapshot import regions
from dynsnap_core.weights.store import WeightDir

from test_memsvc_service import client_proc, load_ready, service  # noqa: F401  (fixtures)

pytestmark = [pytest.mark.criu, pytest.mark.root]
MiB = 1 << 20


@pytest.fixture
def region_file(tmp_path):
    data = os.urandom(96 * MiB + 5)
    p = tmp_path / "weights.bin"
    p.write_bytes(data)
    return p, memfd.digest(data)


def _restore_and_reattach(cp, before, restore):
    cp.popen.wait(timeout=30)                # reap the original: the restore takes its pid back
    r = restore()
    try:
        assert r.pid == cp.pid
        back = cp.request("attach")
        assert back.get("ok"), back
        after = cp.request("info")
        assert after["address"] == before["address"] and after["attached"]
        assert after["sha256"] == before["sha256"] and after["digest"] == before["digest"]
        assert after["mapped"] and after["memfd_fds"] == 0
    finally:
        r.kill()


def test_detach_checkpoint_restore_reattach(service, client_proc, region_file, tmp_path, home):  # noqa: F811
    p, dig = region_file
    svc = service()
    with svc.client() as c:
        load_ready(c, "weights", p, dig)
    cp = client_proc(svc.path, "weights")
    before = cp.request("info")
    assert before["attached"] and before["digest"] == dig
    q = cp.request("detach")
    assert q["ok"] and not q["mapped"] and q["memfd_fds"] == 0
    snap = dynsnap_core.checkpoint(cp.pid, tmp_path / "snap")
    assert snap.total_bytes < 96 * MiB          # the region is not in the image
    _restore_and_reattach(cp, before, lambda: dynsnap_core.restore(snap.path))


def test_weight_dir_checkpoint_and_parallel_restore(service, client_proc, region_file, tmp_path, home):  # noqa: F811
    p, dig = region_file
    svc = service()
    store = tmp_path / "store"
    with svc.client() as c:
        load_ready(c, "weights", p, dig)
    cp = client_proc(svc.path, "weights")
    before = cp.request("info")
    snap = regions.checkpoint_with_regions(cp.pid, tmp_path / "snap", service=svc.path, regions=["weights"],
                                          store=store, quiesce_worker=lambda: cp.request("detach"))
    meta = regions.read_regions(snap.path)
    assert meta["regions"] == [{"name": "weights", "digest": dig, "size": 96 * MiB + 5}]
    assert WeightDir(store).has(dig, 96 * MiB + 5)
    # a fresh node: the service no longer holds the region; the restore loads it while CRIU restores
    with svc.client() as c:
        c.drop("weights", force=True)
        assert c.list() == []
    _restore_and_reattach(cp, before, lambda: regions.restore_with_regions(snap.path, service=svc.path))
    with svc.client() as c:
        [info] = c.list()
        assert info["state"] == "ready" and info["digest"] == dig
