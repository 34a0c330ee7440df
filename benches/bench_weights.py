"""pytest-benchmark: weight store save and host load of a small random set (pytest benches/); GPU: `dynsnap bench weights`."""
from __future__ import annotations

import pytest

np = pytest.importorskip("numpy")

from dynsnap_core import weights  # noqa: E402
from dynsnap_core.bench import weights as bench_weights  # noqa: E402

SIZE_GB = 0.02   # a Qwen3-0.6B-shaped set with the layer count cut down


@pytest.fixture(scope="module")
def state_dict():
    rng = np.random.default_rng(0)
    return {n: rng.integers(0, 1 << 16, s, dtype=np.uint16) for n, s in bench_weights.model_shapes(SIZE_GB)
            if not n.startswith("model.embed")}


def test_save(benchmark, state_dict, tmp_path):
    benchmark.pedantic(lambda: weights.save(state_dict, "b", store=tmp_path), rounds=3)
    benchmark.extra_info["bytes"] = sum(v.nbytes for v in state_dict.values())


def test_load_host(benchmark, state_dict, tmp_path):
    weights.save(state_dict, "b", store=tmp_path)
    benchmark.pedantic(lambda: weights.load("b", store=tmp_path, device="cpu"), rounds=5)
    benchmark.extra_info["bytes"] = sum(v.nbytes for v in state_dict.values())
