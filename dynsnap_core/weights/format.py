"""The weight set format: one manifest per weight set (magic "dynsnap-weightset", format 1) naming
content-addressed 4 KiB-aligned shards; dtype tables; the manifest's objects (TensorEntry, ShardEntry, WeightSet).

A shard packs tensors at 4 KiB-aligned offsets (``shard_bytes`` each, a larger tensor gets its own) and is padded
to a 4 KiB multiple, so O_DIRECT can read it whole. Its name is its region digest (``dynsnap_core.memfd.digest``:
XXH3-64 over the XXH3-64 of each 8 MiB chunk, computed by the C engine in parallel): identical shards are stored
once across sets and snapshots. Each tensor entry carries name, dtype (safetensors names: BF16, F16, F32, ...),
shape, shard, offset, nbytes and its own checksum (the same digest over its bytes).

The package around it: ``store`` (writing sets and shards), ``safetensors`` (import), ``verify``, ``device``
(the one GPU access point), ``loader`` (into GPU or host memory); ``dynsnap_core.weights`` re-exports the API.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

from ..errors import ShardCorrupt
from ..formats import WEIGHT_SET as _KIND

if TYPE_CHECKING:
    from .store import Store

__all__ = ["MAGIC", "FORMAT_VERSION", "CHECKSUM", "ALIGN", "DEFAULT_SHARD_BYTES", "DTYPE_SIZES", "TYPESTR",
           "TensorEntry", "ShardEntry", "WeightSet"]

MAGIC = _KIND.magic
FORMAT_VERSION = _KIND.format
CHECKSUM = "xxh3-64-chunked-8MiB"     # the memfd region digest (see module docstring)
ALIGN = 4096
DEFAULT_SHARD_BYTES = 512 << 20

#: Bytes per element of each dtype name (safetensors' names).
DTYPE_SIZES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2,
               "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
# numpy / __cuda_array_interface__ typestr of each dtype (BF16 and F8 have none: raw unsigned ints)
TYPESTR = {"BOOL": "|b1", "U8": "|u1", "I8": "|i1", "F8_E4M3": "|u1", "F8_E5M2": "|u1", "I16": "<i2",
           "U16": "<u2", "F16": "<f2", "BF16": "<u2", "I32": "<i4", "U32": "<u4", "F32": "<f4",
           "I64": "<i8", "U64": "<u8", "F64": "<f8"}
_FROM_TYPESTR = {"|b1": "BOOL", "|u1": "U8", "|i1": "I8", "<i2": "I16", "<u2": "U16", "<f2": "F16",
                 "<i4": "I32", "<u4": "U32", "<f4": "F32", "<i8": "I64", "<u8": "U64", "<f8": "F64"}
_TORCH_NAMES = {"bool": "BOOL", "uint8": "U8", "int8": "I8", "float8_e4m3fn": "F8_E4M3",
                "float8_e5m2": "F8_E5M2", "int16": "I16", "uint16": "U16", "float16": "F16",
                "bfloat16": "BF16", "int32": "I32", "uint32": "U32", "float32": "F32", "int64": "I64",
                "uint64": "U64", "float64": "F64"}
_NAME_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,199}$")


class _RawTensor:
    """Bytes already in safetensors layout (dtype name, shape, memoryview)."""

    __slots__ = ("dtype", "shape", "data")

    def __init__(self, dtype: str, shape: list[int], data: memoryview):
        self.dtype, self.shape, self.data = dtype, shape, data


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


@dataclass
class TensorEntry:
    """One tensor of a weight set: where its bytes live and their checksum."""

    name: str
    dtype: str
    shape: list[int]
    shard: int
    offset: int
    nbytes: int
    checksum: str

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape), "shard": self.shard,
                "offset": self.offset, "nbytes": self.nbytes, "checksum": self.checksum}


@dataclass
class ShardEntry:
    """One shard file: its digest and size (its object name is ``<digest>-<size>``)."""

    digest: str
    size: int

    def to_dict(self) -> dict:
        return {"digest": self.digest, "size": self.size}


@dataclass
class WeightSet:
    """A weight set read from its manifest: tensors in order, shards, and the store holding the shards."""

    name: str
    store: "Store"
    tensors: list[TensorEntry]
    shards: list[ShardEntry]
    manifest_path: str = ""
    meta: dict = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data (without padding)."""
        return sum(t.nbytes for t in self.tensors)

    @property
    def shard_bytes(self) -> int:
        return sum(s.size for s in self.shards)

    def shard_path(self, i: int) -> str:
        s = self.shards[i]
        return str(self.store.dir.path(s.digest, s.size))

    def tensors_in(self, shard: int) -> list[TensorEntry]:
        return [t for t in self.tensors if t.shard == shard]

    def verify(self, *, deep: bool = False, threads: Optional[int] = None) -> int:
        """Check every shard's size and digest (``deep``: also each tensor's checksum); returns bytes read."""
        from .verify import _verify_set
        return _verify_set(self, deep=deep, threads=threads)

    def to_dict(self) -> dict:
        return {"name": self.name, "manifest": self.manifest_path, "store": str(self.store.root),
                "tensors": len(self.tensors), "shards": len(self.shards), "nbytes": self.nbytes,
                "shard_bytes": self.shard_bytes, **{k: self.meta[k] for k in ("created", "source") if k in self.meta}}


def _parse_manifest(m: Any, path: str, store: "Store") -> WeightSet:
    def bad(why: str) -> ShardCorrupt:
        return ShardCorrupt(f"weight manifest {path} is malformed: {why}", path=path)

    if not isinstance(m, dict) or m.get("magic") != MAGIC:
        raise bad(f"not a dynsnap weight set (magic is not {MAGIC!r})")
    if m.get("format") != FORMAT_VERSION:
        raise bad(f"format {m.get('format')!r}, this dynsnap reads format {FORMAT_VERSION}")
    try:
        shards = [ShardEntry(str(s["digest"]), int(s["size"])) for s in m["shards"]]
        tensors = [TensorEntry(str(t["name"]), str(t["dtype"]), [int(x) for x in t["shape"]], int(t["shard"]),
                               int(t["offset"]), int(t["nbytes"]), str(t["checksum"])) for t in m["tensors"]]
    except (KeyError, TypeError, ValueError) as e:
        raise bad(f"missing or bad field ({e})") from None
    for t in tensors:
        if t.dtype not in DTYPE_SIZES:
            raise bad(f"tensor {t.name!r} has unknown dtype {t.dtype!r}")
        n = DTYPE_SIZES[t.dtype]
        for d in t.shape:
            n *= d
        if n != t.nbytes or not 0 <= t.shard < len(shards) or t.offset % ALIGN \
                or t.offset + t.nbytes > shards[t.shard].size:
            raise bad(f"tensor {t.name!r}: dtype/shape/offset/nbytes do not agree with its shard")
    return WeightSet(str(m.get("name", "")), store, tensors, shards, path, m)
