"""Weight store on CPU: save, dedup across sets, verification faults, safetensors import, host loading bit-exact."""
from __future__ import annotations

import json
import os

import pytest

np = pytest.importorskip("numpy")

from dynsnap_core import weights as W  # noqa: E402


def _sd(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "embed": rng.standard_normal((257, 33)).astype(np.float32),
        "norm": rng.standard_normal((33,)).astype(np.float16),
        "bf16_raw": rng.integers(0, 1 << 16, (7, 129), dtype=np.uint16),
        "ids": rng.integers(-5, 5, (1001,), dtype=np.int64),
        "mask": rng.integers(0, 2, (3, 3)).astype(bool),
        "empty": np.zeros((0, 4), np.float32),
        "scalar": np.asarray(2.5, np.float64),
        "big": rng.standard_normal((9 << 20) // 4 + 3).astype(np.float32),   # spans two 8 MiB digest chunks
    }


def _assert_equal(loaded: dict, sd: dict) -> None:
    assert set(loaded) == set(sd)
    for k, v in sd.items():
        got = loaded[k]
        assert got.dtype == v.dtype, k
        assert got.shape == v.shape, k
        assert got.tobytes() == v.tobytes(), k


def test_save_load_host_bit_exact(tmp_path):
    sd = _sd()
    ws = W.save(sd, "m", store=tmp_path, shard_bytes=1 << 20)
    assert len(ws.shards) >= 2
    m = json.loads((tmp_path / "sets" / "m.json").read_text())
    assert m["magic"] == W.MAGIC and m["format"] == W.FORMAT_VERSION
    for t in m["tensors"]:
        assert t["offset"] % 4096 == 0
        assert {"name", "dtype", "shape", "shard", "offset", "nbytes", "checksum"} <= set(t)
    for s in ws.shards:
        assert s.size % 4096 == 0
        assert os.path.getsize(ws.store.dir.path(s.digest, s.size)) == s.size
    out = W.load("m", store=tmp_path, device="cpu")
    assert out.path == "host" and out.nbytes == sum(v.nbytes for v in sd.values())
    _assert_equal(out, sd)
    out2 = W.load(str(tmp_path / "sets" / "m.json"), device="cpu", path="host")   # by manifest path
    _assert_equal(out2, sd)
    out3 = W.load(str(tmp_path), device="cpu")                                   # a store with one set
    _assert_equal(out3, sd)


def test_dedup_across_sets(tmp_path):
    sd = _sd()
    a = W.save(sd, "a", store=tmp_path, shard_bytes=1 << 20)
    n_objects = len(list((tmp_path / "objects").iterdir()))
    b = W.save(sd, "b", store=tmp_path, shard_bytes=1 << 20)
    assert b.meta["stats"]["shards_written"] == 0
    assert b.meta["stats"]["shards_deduplicated"] == len(b.shards)
    assert len(list((tmp_path / "objects").iterdir())) == n_objects
    # a set that changes one tensor shares the other shards
    sd2 = dict(sd, norm=sd["norm"] + np.float16(1))
    c = W.save(sd2, "c", store=tmp_path, shard_bytes=1 << 20)
    assert c.meta["stats"]["shards_written"] == 1
    assert [s.digest for s in a.shards] == [s.digest for s in b.shards]
    assert sorted(x["name"] for x in W.list_sets(tmp_path)) == ["a", "b", "c"]
    _assert_equal(W.load("c", store=tmp_path, device="cpu"), sd2)


def _shard_of(ws, tensor: str) -> str:
    t = next(t for t in ws.tensors if t.name == tensor)
    return ws.shard_path(t.shard), t


def test_verify_truncated_shard(tmp_path):
    ws = W.save(_sd(), "m", store=tmp_path, shard_bytes=1 << 20)
    W.verify("m", store=tmp_path)
    path, t = _shard_of(ws, "big")
    os.truncate(path, os.path.getsize(path) - 4096)
    with pytest.raises(W.ShardCorrupt, match="truncated") as ei:
        W.verify("m", store=tmp_path)
    assert ei.value.shard == path and "big" in str(ei.value)
    with pytest.raises(W.ShardCorrupt, match="truncated") as ei:
        W.load("m", store=tmp_path, device="cpu")
    assert "big" in str(ei.value)


@pytest.mark.parametrize("tensor", ["embed", "big"])
def test_verify_flipped_byte(tmp_path, tensor):
    ws = W.save(_sd(), "m", store=tmp_path, shard_bytes=1 << 20)
    path, t = _shard_of(ws, tensor)
    with open(path, "r+b") as f:
        f.seek(t.offset + t.nbytes // 2)
        b = f.read(1)
        f.seek(t.offset + t.nbytes // 2)
        f.write(bytes([b[0] ^ 0x10]))
    with pytest.raises(W.ShardCorrupt, match="checksum") as ei:
        W.verify(store=tmp_path)
    assert ei.value.tensor == tensor and tensor in str(ei.value) and path in str(ei.value)
    with pytest.raises(W.ShardCorrupt, match="checksum|digest"):
        W.load("m", store=tmp_path, device="cpu")
    out = W.load("m", store=tmp_path, device="cpu", verify=False)   # explicitly unverified: loads the damage
    assert out[tensor].tobytes() != _sd()[tensor].tobytes()


def test_missing_shard_and_manifest_faults(tmp_path):
    ws = W.save(_sd(), "m", store=tmp_path)
    os.unlink(ws.shard_path(0))
    with pytest.raises(W.ShardCorrupt, match="missing"):
        W.verify("m", store=tmp_path)
    with pytest.raises(W.WeightSetNotFound, match="no weight set 'nope'"):
        W.load("nope", store=tmp_path, device="cpu")
    (tmp_path / "sets" / "bad.json").write_text('{"magic": "x"}')
    with pytest.raises(W.ShardCorrupt, match="malformed"):
        W.open_set("bad", store=tmp_path)
    m = json.loads((tmp_path / "sets" / "m.json").read_text())
    m["tensors"][0]["shape"] = [1, 2, 3]
    (tmp_path / "sets" / "m2.json").write_text(json.dumps(m))
    with pytest.raises(W.ShardCorrupt, match="do not agree"):
        W.open_set("m2", store=tmp_path)


def test_bad_input(tmp_path):
    with pytest.raises(W.WeightsError, match="bad weight set name"):
        W.save({"a": np.zeros(3)}, "../x", store=tmp_path)
    with pytest.raises(TypeError, match="cannot save"):
        W.save({"a": object()}, "x", store=tmp_path)
    W.save({"a": np.zeros(3)}, "x", store=tmp_path)
    with pytest.raises(W.WeightsError, match="already exists"):
        W.save({"a": np.zeros(3)}, "x", store=tmp_path, overwrite=False)
    with pytest.raises(W.PathUnavailable):
        W.load("x", store=tmp_path, device="cuda:0", path="host")
    with pytest.raises(ValueError, match="unknown path"):
        W.load("x", store=tmp_path, device="cpu", path="warp")


def test_no_leftovers_after_save(tmp_path):
    W.save(_sd(), "m", store=tmp_path, shard_bytes=1 << 20)
    assert not [p for p in (tmp_path / "objects").iterdir() if p.name.startswith(".tmp")]
    assert not [p for p in (tmp_path / "sets").iterdir() if p.name.startswith(".tmp")]


def test_safetensors_import_round_trip(tmp_path):
    st = pytest.importorskip("safetensors.numpy")
    sd = {k: v for k, v in _sd(3).items() if k not in ("scalar",)}
    src = tmp_path / "model.safetensors"
    st.save_file(sd, str(src))
    ws = W.import_safetensors(src, store=tmp_path / "store", shard_bytes=1 << 20)
    assert ws.name == "model" and ws.meta["source"].startswith("safetensors:")
    W.verify("model", store=tmp_path / "store", deep=True)
    out = W.load("model", store=tmp_path / "store", device="cpu")
    _assert_equal(out, sd)
    # the same file imported under another name stores nothing new
    again = W.import_safetensors(src, "model-copy", store=tmp_path / "store", shard_bytes=1 << 20)
    assert again.meta["stats"]["shards_written"] == 0


def test_safetensors_bf16_import(tmp_path):
    """BF16 from a hand-written safetensors file comes back bit-exact (as uint16 without ml_dtypes/torch)."""
    import struct
    rng = np.random.default_rng(5)
    raw = rng.integers(0, 1 << 16, (5, 11), dtype=np.uint16)
    header = json.dumps({"w": {"dtype": "BF16", "shape": [5, 11], "data_offsets": [0, raw.nbytes]},
                         "__metadata__": {"format": "pt"}}).encode()
    src = tmp_path / "bf.safetensors"
    src.write_bytes(struct.pack("<Q", len(header)) + header + raw.tobytes())
    ws = W.import_safetensors(src, store=tmp_path / "s")
    assert ws.tensors[0].dtype == "BF16"
    out = W.load("bf", store=tmp_path / "s", device="cpu")
    assert bytes(memoryview(np.ascontiguousarray(out["w"])).cast("B")) == raw.tobytes()


def test_safetensors_malformed(tmp_path):
    p = tmp_path / "bad.safetensors"
    p.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
    with pytest.raises(W.ShardCorrupt, match="malformed safetensors header"):
        W.import_safetensors(p, store=tmp_path / "s")
    with pytest.raises(W.WeightsError, match="no such safetensors file"):
        W.import_safetensors(tmp_path / "nope.safetensors", store=tmp_path / "s")


def test_gpu_path_without_gpu_is_clear(tmp_path):
    from dynsnap_core.weights import loader as WL
    ok, why = WL.gpu_available()
    if ok:
        pytest.skip("this machine has a GPU")
    W.save({"a": np.zeros(3)}, "x", store=tmp_path)
    with pytest.raises(W.GpuUnavailable, match="no GPU"):
        W.load("x", store=tmp_path, device="cuda:0", path="pipeline")
    with pytest.raises(W.PathUnavailable, match="kvikio not installed"):
        W.load("x", store=tmp_path, device="cuda:0", path="kvikio") if WL._kvikio() is None else \
            pytest.skip("kvikio installed")
    paths = WL.available_paths("cuda:0")
    assert paths["pipeline"] and (paths["kvikio"] == "kvikio not installed" or WL._kvikio() is not None)


def test_cli_import_verify_ls(tmp_path):
    import subprocess
    import sys
    st = pytest.importorskip("safetensors.numpy")
    src = tmp_path / "m.safetensors"
    st.save_file({"w": np.arange(12, dtype=np.float32).reshape(3, 4)}, str(src))
    store = tmp_path / "store"

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "dynsnap_core.cli", *map(str, args)], capture_output=True,
                              text=True, timeout=120)
    r = cli("weights", "import", src, "--store", store, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["name"] == "m"
    r = cli("weights", "verify", "--store", store)
    assert r.returncode == 0 and "m: ok" in r.stdout
    r = cli("weights", "ls", "--store", store)
    assert r.returncode == 0 and "m " in r.stdout
    ws = W.open_set("m", store=store)
    os.truncate(ws.shard_path(0), 100)
    r = cli("weights", "verify", "m", "--store", store)
    assert r.returncode == 1 and "truncated" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_bench_weights_without_gpu_says_one_line():
    import subprocess
    import sys
    from dynsnap_core.weights import loader as WL
    if WL.gpu_available()[0]:
        pytest.skip("this machine has a GPU")
    r = subprocess.run([sys.executable, "-m", "dynsnap_core.cli", "bench", "weights"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 1
    assert r.stderr.strip().count("\n") == 0 and "needs a GPU" in r.stderr


def test_model_shapes_are_realistic():
    from dynsnap_core.bench.weights import model_shapes
    small = model_shapes(1.2)
    big = model_shapes(16)
    gb = lambda shapes: sum(2 * int(np.prod(s)) for _n, s in shapes) / 1e9  # noqa: E731
    assert 250 <= len(small) <= 350 and 1.0 < gb(small) < 1.4
    assert 14 < gb(big) < 18


def test_bench_weights_targets_read_the_largest_set():
    """The targets table of `bench weights` (gpu-check's summary) from a result: ratios, limit, kvikio rows."""
    from dynsnap_core.bench import weights as bw
    row = lambda size, cache, method, gbps, **kw: {"size_gb": size, "bytes": int(gbps * 1e9), "tensors": 1,  # noqa: E731
                                                   "method": method, "cache": cache, "seconds": 1.0,
                                                   "cpu_seconds": 1.0, "gbps": gbps, "bit_exact": True, **kw}
    res = {"date": "d", "machine": {}, "config": {"threads": 16, "chunk": 8 << 20, "nbuf": 3},
           "limits": {"h2d_pinned_gbps": 50.0, "pagecache_gbps": 40.0, "disk_odirect_gbps": 2.0},
           "rows": [row(16, "warm", "dynsnap pipeline", 37.0), row(16, "warm", "safetensors load_file(cuda)", 5.0),
                    row(16, "warm", "pipeline, 4 threads", 1.0, sweep=True),
                    row(16, "cold", "dynsnap kvikio (tuned)", 1.9), row(16, "cold", "kvikio defaults", 2.0),
                    row(1.2, "warm", "dynsnap pipeline", 1.0),
                    {"size_gb": 16, "cache": "warm", "method": "kvikio defaults", "error": "boom"}]}
    bw._ratios(res)
    assert bw.targets(res) == [
        ("16 GB warm pipeline >= 4x safetensors", True, "37.00 GB/s = 7.40x"),
        ("16 GB warm pipeline >= 90% of min(page cache -> pinned, H2D)", True, "92% of 40.00 GB/s"),
        ("16 GB cold kvikio tuned >= kvikio defaults", False, "1.90 vs 2.00 GB/s")]
    md = bw.format_markdown(res)
    assert "| 16 | warm | kvikio defaults | FAILED: boom |" in md and "| 16 GB cold kvikio tuned >= kvikio defaults | **no** |" in md
