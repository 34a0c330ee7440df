"""The _h2d pipeline and the GPU load paths on CPU, against a fake libcuda.so.1 (tests/fake_libcuda.c).

The fake defers every async copy until an event recorded after it is synchronised, so a pinned
buffer reused before its copy finished would corrupt the result. Runs in a child process because
libcuda is dlopen()ed once per process.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

np = pytest.importorskip("numpy")
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def fakecuda(tmp_path_factory):
    cc = shutil.which("gcc") or shutil.which("cc")
    if not cc:
        pytest.skip("no C compiler for the fake libcuda")
    d = tmp_path_factory.mktemp("fakecuda")
    subprocess.run([cc, "-shared", "-fPIC", "-O1", "-o", str(d / "libcuda.so.1"), str(ROOT / "tests" / "fake_libcuda.c"),
                    "-lpthread"], check=True)
    return d


CHILD = textwrap.dedent('''
    import ctypes, os, sys
    import numpy as np
    sys.modules["torch"] = None          # the no-torch code path: DeviceArray results
    from dynsnap_core import weights as W
    from dynsnap_core.weights import loader as WL
    store = sys.argv[1]
    rng = np.random.default_rng(7)
    sd = {"a": rng.standard_normal((1000, 37)).astype(np.float32),
          "b": rng.integers(0, 1 << 16, (3, 1 << 20), dtype=np.uint16),      # 6 MiB
          "c": rng.standard_normal((5 << 20) // 2 + 1).astype(np.float16),   # odd, crosses chunks
          "d": np.zeros((0,), np.float32), "e": np.arange(3, dtype=np.int64)}
    ws = W.save(sd, "m", store=store, shard_bytes=4 << 20)
    lib = ctypes.CDLL("libcuda.so.1")
    lib.fake_live.restype = ctypes.c_long
    def live():
        return [lib.fake_live(i) for i in range(5)]
    def check(out):
        for k, v in sd.items():
            x = out[k]
            assert x.shape == v.shape and x.__cuda_array_interface__["shape"] == v.shape, k
            assert x.to_bytes() == v.tobytes(), k
    for path in ("pipeline", "memfd"):
        for kw in ({}, {"threads": 1, "nbuf": 2}, {"threads": 3, "chunk": 16 << 20}, {"direct": False}, {"direct": True}):
            with WL.defaults(**kw):
                out = W.load("m", store=store, path=path)
            assert out.path == path, out.path
            check(out)
            del out
    out = W.load("m", store=store)
    assert out.path == "pipeline"
    print("auto", out.summary())
    del out
    # into=: caller buffers are filled, shape/dtype checked
    into = {"a": WL.DeviceArray(0, [1000, 37], "F32")}
    out = W.load("m", store=store, into=into)
    assert out["a"] is into["a"] and into["a"].to_bytes() == sd["a"].tobytes()
    del out
    try:
        W.load("m", store=store, into={"a": WL.DeviceArray(0, [37, 1000], "F32")})
        raise SystemExit("shape mismatch not caught")
    except W.TensorMismatch as e:
        assert "'a'" in str(e) and "shape" in str(e), e
    try:
        W.load("m", store=store, into={"a": WL.DeviceArray(0, [1000, 37], "F16")})
        raise SystemExit("dtype mismatch not caught")
    except W.TensorMismatch as e:
        assert "dtype" in str(e) or "typestr" in str(e), e
    del into
    # the storage side alone (bench weights' page-cache limit): every byte of every shard read, nothing copied
    paths = [ws.shard_path(i) for i in range(len(ws.shards))]
    r = WL.read_to_pinned(paths, threads=3)
    assert r["bytes"] == sum(os.path.getsize(p) for p in paths) and r["threads"] == 3 and r["seconds"] > 0, r
    try:
        WL.read_to_pinned(paths + [store + "/missing"])
        raise SystemExit("missing file not caught")
    except W.GpuUnavailable as e:
        assert "missing" in str(e), e
    # out of memory: a clear error before anything is allocated
    os.environ["FAKE_CUDA_FREE_BYTES"] = "1000000"
    try:
        W.load("m", store=store)
        raise SystemExit("OOM not caught")
    except W.WeightsOutOfMemory as e:
        assert "needs" in str(e) and e.tensor, e
    del os.environ["FAKE_CUDA_FREE_BYTES"]
    # host registration not supported: staged through the pinned ring
    os.environ["FAKE_CUDA_NO_REGISTER"] = "1"
    out = W.load("m", store=store, path="memfd")
    assert out.details["host_mode"] == "staged", out.details
    check(out)
    del out
    del os.environ["FAKE_CUDA_NO_REGISTER"]
    # damage: a flipped byte and a truncated shard are refused, naming shard and tensor
    t = next(t for t in ws.tensors if t.name == "c")
    p = ws.shard_path(t.shard)
    with open(p, "r+b") as f:
        f.seek(t.offset + 12345); b = f.read(1); f.seek(t.offset + 12345); f.write(bytes([b[0] ^ 1]))
    for path in ("pipeline", "memfd"):
        try:
            W.load("m", store=store, path=path)
            raise SystemExit("checksum mismatch not caught on " + path)
        except W.ShardCorrupt as e:
            assert p in str(e) and "'c'" in str(e), (path, e)
    os.truncate(p, os.path.getsize(p) - 8192)
    for path in ("pipeline", "memfd"):
        try:
            W.load("m", store=store, path=path)
            raise SystemExit("truncation not caught on " + path)
        except W.ShardCorrupt as e:
            assert "truncated" in str(e) or "beyond" in str(e) or "end" in str(e), (path, e)
    import gc; gc.collect()
    host, dev, streams, events, reg = live()
    assert dev == 0 and streams == 0 and events == 0 and reg == 0, live()
    WL._DEVICES[0].close()
    assert live()[0] == 0, live()
    print("OK")
''')


def test_pipeline_and_memfd_paths_on_fake_driver(fakecuda, tmp_path):
    env = dict(os.environ, LD_LIBRARY_PATH=f"{fakecuda}:{os.environ.get('LD_LIBRARY_PATH', '')}",
               PYTHONPATH=f"{ROOT}:{os.environ.get('PYTHONPATH', '')}")
    env.pop("FAKE_CUDA_FREE_BYTES", None)
    r = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "store")], env=env, capture_output=True,
                       text=True, timeout=240)
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout[-3000:] + r.stderr[-5000:]
