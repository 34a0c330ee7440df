"""The layout hash of a weight set in one allocation, and the service's eviction policy (pure functions)."""
from __future__ import annotations

import copy

import pytest

from dynsnap_core.errors import CudaUnavailable
from dynsnap_core.gms import layout as L, policy, vmm
from dynsnap_core.gms.policy import Resident, plan

pytestmark = pytest.mark.timeout(60)

TABLE = [{"name": "emb", "dtype": "BF16", "shape": [1024, 64], "offset": 0, "nbytes": 131072},
         {"name": "norm", "dtype": "F32", "shape": [64], "offset": 131072, "nbytes": 256},
         {"name": "ids", "dtype": "I64", "shape": [0, 3], "offset": 135168, "nbytes": 0}]


def test_layout_hash_is_canonical_and_order_independent():
    h = L.layout_hash(TABLE)
    assert L.HASH_RE.match(h)
    assert L.layout_hash(list(reversed(TABLE))) == h
    assert L.layout_hash([{k: t[k] for k in reversed(list(t))} for t in TABLE]) == h     # key order
    assert L.layout_hash([{**t, "shape": tuple(t["shape"])} for t in TABLE]) == h


@pytest.mark.parametrize("field,value", [("name", "emb2"), ("dtype", "F16"), ("shape", [2048, 32]),
                                         ("offset", 4096), ("nbytes", 131070)])
def test_layout_hash_changes_with_every_field(field, value):
    t = copy.deepcopy(TABLE)
    t[0][field] = value
    assert L.layout_hash(t) != L.layout_hash(TABLE)


def test_layout_hash_changes_when_a_tensor_is_added_or_removed():
    assert L.layout_hash(TABLE[:2]) != L.layout_hash(TABLE)
    assert L.layout_hash(TABLE + [{**TABLE[1], "name": "norm2", "offset": 139264}]) != L.layout_hash(TABLE)


def test_table_of_a_stored_set_places_shards_back_to_back(tmp_path):
    np = pytest.importorskip("numpy")
    from dynsnap_core import weights
    rng = np.random.default_rng(1)
    src = {f"t{i}": rng.standard_normal(n).astype(np.float32) for i, n in enumerate([5000, 70000, 3, 300000])}
    ws = weights.save(src, "lay", store=tmp_path, shard_bytes=1 << 20)
    assert len(ws.shards) >= 2
    table = L.table_of(ws)
    base = {}
    acc = 0
    for i, s in enumerate(ws.shards):
        base[i] = acc
        acc += s.size
    by = {t.name: t for t in ws.tensors}
    for row in table:
        t = by[row["name"]]
        assert row == {"name": t.name, "dtype": "F32", "shape": list(t.shape), "offset": base[t.shard] + t.offset,
                       "nbytes": t.nbytes}
    assert L.allocation_size(ws, 2 << 20) == (acc + (2 << 20) - 1) // (2 << 20) * (2 << 20)
    assert L.check_table(table, L.allocation_size(ws, 2 << 20)) is table
    # shards pack tensors at 4 KiB-aligned offsets back to back, so the same tensors give the same layout
    # whatever the shard size; one changed shape changes it
    again = weights.save(src, "lay2", store=tmp_path, shard_bytes=64 << 10)
    assert L.layout_hash(L.table_of(again)) == L.layout_hash(table)
    other = weights.save({**src, "t2": np.zeros(4, np.float32)}, "lay3", store=tmp_path, shard_bytes=1 << 20)
    assert L.layout_hash(L.table_of(other)) != L.layout_hash(table)


@pytest.mark.parametrize("bad,why", [
    ("x", "not a list"),
    ([{"name": "a", "dtype": "Q8", "shape": [1], "offset": 0, "nbytes": 1}], "unknown dtype"),
    ([{"name": "a", "dtype": "F32", "shape": [-1], "offset": 0, "nbytes": 4}], "bad shape"),
    ([{"name": "a", "dtype": "F32", "shape": [2], "offset": 0, "nbytes": 4}], "does not fit"),
    ([{"name": "a", "dtype": "F32", "shape": [2], "offset": 4096, "nbytes": 8}], "does not fit"),
    ([{"name": "a", "dtype": "U8", "shape": [1], "offset": 0, "nbytes": 1}] * 2, "repeats a name"),
])
def test_check_table_refuses_what_does_not_fit(bad, why):
    with pytest.raises(ValueError, match=why):
        L.check_table(bad, 4096)


# ---------------------------------------------------------------- policy

G = 1 << 30


def test_nothing_evicted_when_it_fits():
    res = [Resident("a", 2 * G, False, 1.0)]
    assert plan(res, G, budget=4 * G, free=10 * G) == policy.Plan(True, [])
    assert plan([], G) == policy.Plan(True, [])


def test_lru_among_unheld_sets_until_the_budget_holds():
    res = [Resident("new", G, False, 30.0), Resident("old", G, False, 10.0), Resident("held", G, True, 1.0),
           Resident("mid", G, False, 20.0)]
    p = plan(res, 2 * G, budget=5 * G)
    assert p.ok and p.evict == ["old"]
    p = plan(res, 3 * G, budget=5 * G)
    assert p.ok and p.evict == ["old", "mid"]


def test_gpu_free_memory_is_a_limit_too():
    res = [Resident("a", 3 * G, False, 2.0), Resident("b", 2 * G, False, 1.0)]
    p = plan(res, 4 * G, free=1 * G)
    assert p.ok and p.evict == ["b", "a"]
    p = plan(res, 2 * G, free=1 * G)
    assert p.ok and p.evict == ["b"]


def test_held_sets_are_never_freed_and_the_refusal_gives_the_numbers():
    res = [Resident("h", 6 * G, True, 0.0), Resident("u", G, False, 5.0)]
    p = plan(res, 4 * G, budget=8 * G, free=2 * G, what="weight set 'big'")
    assert not p.ok and p.evict == []
    assert p.reason == ("weight set 'big' needs 4.0 GiB: 2.0 GiB of GPU memory is free and 7.0 GiB of the 8.0 GiB "
                        "budget is in use, and freeing every set no worker holds gives back only 1.0 GiB (6.0 GiB is "
                        "held by workers)")


def test_a_set_larger_than_the_budget_is_refused_at_once():
    p = plan([Resident("u", G, False, 0.0)], 9 * G, budget=8 * G, what="weight set 'x'")
    assert not p.ok and p.evict == []
    assert p.reason == "weight set 'x' needs 9.0 GiB, more than this service's budget (--max-bytes 8.0 GiB)"


def test_ties_in_last_use_break_by_name():
    res = [Resident("b", G, False, 1.0), Resident("a", G, False, 1.0)]
    assert plan(res, G, budget=2 * G).evict == ["a"]


# ---------------------------------------------------------------- vmm without a driver

def test_vmm_without_a_driver_raises_the_driver_sentence():
    why = vmm.unavailable_reason()
    if why is None:
        pytest.skip("this machine has a usable CUDA driver")
    for fn in (lambda: vmm.granularity(0), lambda: vmm.reserve(1 << 21), lambda: vmm.create(1 << 21, 0),
               lambda: vmm.mem_info(0)):
        with pytest.raises(CudaUnavailable) as e:
            fn()
        assert str(e.value) == why
    from dynsnap_core.gms.regions import PrivateRegion, Region
    with pytest.raises(CudaUnavailable):
        Region(1 << 21)
    with pytest.raises(CudaUnavailable):
        PrivateRegion(1 << 21)
