"""Weight loading on a real GPU: every path bit-exact against random bf16/fp16/fp32 sources of odd sizes, into=, OOM."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from dynsnap_core import weights as W  # noqa: E402
from dynsnap_core.weights import loader as WL  # noqa: E402

pytestmark = pytest.mark.gpu


def _source(dev: str = "cuda:0") -> dict:
    g = torch.Generator(device=dev).manual_seed(42)
    out = {}
    shapes = [(151, 1023), (4097,), (3, 5, 7), (1,), (2048, 1031), (0, 8), ((9 << 20) // 2 + 5,)]
    for i, s in enumerate(shapes):
        for dt in (torch.bfloat16, torch.float16, torch.float32):
            out[f"t{i}.{str(dt)[6:]}"] = torch.randn(s, dtype=dt, device=dev, generator=g)
    out["ids"] = torch.randint(-1000, 1000, (12345,), dtype=torch.int64, device=dev, generator=g)
    return out


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    src = _source()
    store = tmp_path_factory.mktemp("wstore")
    ws = W.save(src, "gpu-test", store=store, shard_bytes=16 << 20)   # saved straight from GPU tensors
    return src, store, ws


def _same(out: dict, src: dict) -> None:
    assert set(out) == set(src)
    for k, v in src.items():
        x = out[k]
        assert x.device == v.device and x.dtype == v.dtype and x.shape == v.shape, k
        assert torch.equal(x.view(torch.uint8) if x.numel() else x, v.view(torch.uint8) if v.numel() else v), k


@pytest.mark.parametrize("path", ["pipeline", "memfd", "kvikio", "auto"])
@pytest.mark.parametrize("direct", ["auto", True, False])
def test_every_path_bit_exact(stored, path, direct):
    src, store, _ws = stored
    if path == "kvikio" and WL._kvikio() is None:
        with pytest.raises(W.PathUnavailable, match="kvikio not installed"):
            W.load("gpu-test", store=store, path=path)
        return
    if direct is not True and path != "pipeline":
        pytest.skip("direct only changes the pipeline")
    with WL.defaults(direct=direct):
        out = W.load("gpu-test", store=store, device="cuda:0", path=path)
    assert out.path == (path if path != "auto" else out.path) and out.path in WL.PATHS
    _same(out, src)


def test_pipeline_small_ring_and_many_threads(stored):
    src, store, _ws = stored
    for kw in ({"threads": 1, "nbuf": 2}, {"threads": 16, "nbuf": 4, "chunk": 16 << 20}):
        with WL.defaults(**kw):
            _same(W.load("gpu-test", store=store, path="pipeline"), src)


def test_memfd_from_memory_service(stored, tmp_path):
    from dynsnap_core import memsvc
    src, store, _ws = stored
    sock = str(tmp_path / "memsvc.sock")
    svc = memsvc.MemoryService(sock, allow=[store])   # the service opens files only under roots it is given
    svc.bind()
    svc.start()
    try:
        with memsvc.Client(sock) as c:
            out = W.load("gpu-test", store=store, memsvc=c)
            assert out.path == "memfd" and out.details["source"] == "memsvc"
            _same(out, src)
            assert out.details["host_mode"] in ("register", "staged")
    finally:
        svc.stop()


def test_into_fills_caller_tensors(stored):
    src, store, _ws = stored
    name = "t4.bfloat16"
    buf = torch.zeros_like(src[name])
    out = W.load("gpu-test", store=store, into={name: buf}, path="pipeline")
    assert out[name] is buf and torch.equal(buf, src[name])
    with pytest.raises(W.TensorMismatch, match="dtype"):
        W.load("gpu-test", store=store, into={name: torch.zeros_like(src[name], dtype=torch.float32)})
    with pytest.raises(W.TensorMismatch, match="shape"):
        W.load("gpu-test", store=store, into={name: torch.zeros(3, device="cuda:0", dtype=torch.bfloat16)})


def test_checksum_and_truncation_on_gpu_paths(stored, tmp_path):
    src, _store, _ws = stored
    ws = W.save({k: v for k, v in src.items() if "t6" in k}, "damaged", store=tmp_path)
    t = ws.tensors[0]
    p = ws.shard_path(t.shard)
    with open(p, "r+b") as f:
        f.seek(t.offset + 1000)
        b = f.read(1)
        f.seek(t.offset + 1000)
        f.write(bytes([b[0] ^ 0x80]))
    for path in ("pipeline", "memfd"):
        with pytest.raises(W.ShardCorrupt, match="checksum|digest") as ei:
            W.load("damaged", store=tmp_path, path=path)
        assert t.name in str(ei.value)
    import os
    os.truncate(p, 4096)
    for path in ("pipeline", "memfd"):
        with pytest.raises(W.ShardCorrupt):
            W.load("damaged", store=tmp_path, path=path)


def test_out_of_memory_is_clear(tmp_path):
    free, total = torch.cuda.mem_get_info()
    # a manifest claiming more than the GPU has: no data needed, the check runs before any read
    ws = W.save({"small": torch.zeros(4, device="cuda:0")}, "huge", store=tmp_path)
    ws.tensors[0].shape = [int(total // 2 + 1)]
    ws.tensors[0].nbytes = int(total // 2 + 1) * 4
    with pytest.raises(W.WeightsOutOfMemory, match="needs .* free") as ei:
        W.load(ws, path="pipeline")
    assert ei.value.tensor == "small"
    after, _ = torch.cuda.mem_get_info()
    assert after >= free - (256 << 20)     # nothing big left allocated


def test_no_torch_device_arrays(stored):
    """Without torch the results are DeviceArray objects with __cuda_array_interface__."""
    src, store, ws = stored
    import sys
    saved = sys.modules.get("torch")
    sys.modules["torch"] = None
    try:
        out = W.load("gpu-test", store=store, path="pipeline")
    finally:
        sys.modules["torch"] = saved
    for t in ws.tensors:
        x = out[t.name]
        assert isinstance(x, WL.DeviceArray) and x.__cuda_array_interface__["shape"] == tuple(t.shape)
        v = src[t.name]
        assert x.to_bytes() == v.contiguous().view(torch.uint8).cpu().numpy().tobytes() if v.numel() else True
