"""A weight set's place in one GPU allocation: the tensor table and its layout hash.

The service loads a weight set into ONE allocation: shard ``i`` of the set at the sum of the sizes of the
shards before it (shards are 4 KiB multiples), each tensor at its shard's base plus its offset in the shard,
so a worker's tensors are views of the mapping. The table is a list of
``{"name", "dtype", "shape", "offset", "nbytes"}``; the *layout hash* is ``sha256:`` + the SHA-256 of the
canonical JSON of the table sorted by name (order-independent; any change of a name, dtype, shape, offset
or size changes it). A worker that mapped a set once asks for the same hash again after a restore, so it can
never map other weights at its old addresses.
"""
from __future__ import annotations

import hashlib
import json
import re
from typing import Any, Iterable

from ..weights import DTYPE_SIZES

__all__ = ["HASH_RE", "TYPESTR", "table_of", "layout_hash", "check_table", "allocation_size"]

HASH_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
#: __cuda_array_interface__ typestr per dtype (BF16 and F8 have none: unsigned ints of the same width).
TYPESTR = {"BOOL": "|b1", "U8": "|u1", "I8": "|i1", "F8_E4M3": "|u1", "F8_E5M2": "|u1", "I16": "<i2",
           "U16": "<u2", "F16": "<f2", "BF16": "<u2", "I32": "<i4", "U32": "<u4", "F32": "<f4",
           "I64": "<i8", "U64": "<u8", "F64": "<f8"}


def table_of(ws: Any) -> list[dict]:
    """The tensor table of a ``dynsnap_core.weights.WeightSet`` laid out in one allocation (see module doc)."""
    bases, acc = [], 0
    for s in ws.shards:
        bases.append(acc)
        acc += int(s.size)
    return [{"name": t.name, "dtype": t.dtype, "shape": [int(x) for x in t.shape],
             "offset": bases[t.shard] + int(t.offset), "nbytes": int(t.nbytes)} for t in ws.tensors]


def allocation_size(ws: Any, gran: int) -> int:
    """Bytes of the allocation holding ``ws``: its shards, rounded up to the granularity (at least one unit)."""
    n = max(1, sum(int(s.size) for s in ws.shards))
    return (n + gran - 1) // gran * gran


def layout_hash(table: Iterable[dict]) -> str:
    """``sha256:<hex>`` over the canonical JSON of the table (sorted by name; keys in a fixed order)."""
    rows = sorted(([str(t["name"]), str(t["dtype"]), [int(x) for x in t["shape"]], int(t["offset"]),
                    int(t["nbytes"])] for t in table), key=lambda r: r[0])
    blob = json.dumps(rows, separators=(",", ":"), ensure_ascii=True).encode()
    return "sha256:" + hashlib.sha256(blob).hexdigest()


def check_table(table: Any, size: int) -> list[dict]:
    """The table if every entry is well formed and lies inside ``size`` bytes, else ValueError saying which
    entry is wrong (what a worker checks before it builds tensors on a mapping)."""
    if not isinstance(table, list):
        raise ValueError("the layout is not a list of tensors")
    seen = set()
    for t in table:
        if not isinstance(t, dict) or not isinstance(t.get("name"), str) or t.get("dtype") not in DTYPE_SIZES:
            raise ValueError(f"layout entry {t!r} has no name or an unknown dtype")
        shape, off, nb = t.get("shape"), t.get("offset"), t.get("nbytes")
        if not isinstance(shape, list) or not all(isinstance(x, int) and x >= 0 for x in shape) \
                or not isinstance(off, int) or not isinstance(nb, int) or off < 0:
            raise ValueError(f"layout entry {t['name']!r} has a bad shape, offset or size")
        n = DTYPE_SIZES[t["dtype"]]
        for x in shape:
            n *= x
        if n != nb or off + nb > size or t["name"] in seen:
            raise ValueError(f"layout entry {t['name']!r} does not fit the {size}-byte allocation "
                             "(or disagrees with its dtype and shape, or repeats a name)")
        seen.add(t["name"])
    return table
