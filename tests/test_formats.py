"""Every kind of file is listed once (dynsnap_core.formats) and `dynsnap inspect` decodes each of them."""
from __future__ import annotations

import json

import numpy as np

from dynsnap_core import formats, weights
from dynsnap_core.snapshot import manifest, regions
from helpers import cli


def test_kinds_match_the_writers():
    assert (formats.SNAPSHOT_MANIFEST.magic, formats.SNAPSHOT_MANIFEST.format) == (manifest.MAGIC,
                                                                                   manifest.FORMAT_VERSION)
    assert (weights.MAGIC, weights.FORMAT_VERSION) == (formats.WEIGHT_SET.magic, formats.WEIGHT_SET.format) == (
        "dynsnap-weightset", 1)
    assert (regions.REGIONS_MAGIC, regions.REGIONS_FORMAT) == ("dynsnap-weights", 1)    # what snapshots on disk say
    assert len({k.name for k in formats.KINDS}) == len(formats.KINDS)


def test_inspect_weight_set_and_object(tmp_path):
    store = tmp_path / "store"
    sd = {"a": np.arange(1000, dtype=np.float32), "b": np.ones((3, 5), dtype=np.float16)}
    weights.save(sd, "tiny", store=str(store))
    set_file = store / "sets" / "tiny.json"
    r = cli("inspect", set_file, "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["kind"] == "weight set manifest" and info["name"] == "tiny" and info["tensors"] == 2
    assert info["bytes"] == 4000 + 30
    obj = next((store / "objects").iterdir())
    r = cli("inspect", obj, "--json")
    info = json.loads(r.stdout)
    assert info["kind"] == "weight object" and info["size_in_name"] == obj.stat().st_size
    bad = tmp_path / "x.json"
    bad.write_text('{"magic": "nope"}')
    r = cli("inspect", bad)
    assert r.returncode == 1 and r.stderr.strip() == f"dynsnap inspect: {bad} is not a dynsnap file (no known magic)"
