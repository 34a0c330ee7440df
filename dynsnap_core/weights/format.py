"""Weight store: content-addressed 4 KiB-aligned shards plus one manifest per weight set; save, import, verify.

Layout under the store root (``$DYNSNAP_WEIGHTS``, else ``<dynsnap home>/weights``)::

    objects/<digest>-<size>     shards, shared with the host memory service's WeightDir
    sets/<name>.json            one manifest per weight set (magic "dynsnap-weightset", format 1)

A shard packs tensors at 4 KiB-aligned offsets (``shard_bytes`` each, a larger tensor gets its own)
and is padded to a 4 KiB multiple, so O_DIRECT can read it whole. Its name is its region digest
(``dynsnap_core.memfd.digest``: XXH3-64 over the XXH3-64 of each 8 MiB chunk, computed by the C
engine in parallel): identical shards are stored once across sets and snapshots. Each tensor entry
carries name, dtype (safetensors names: BF16, F16, F32, ...), shape, shard, offset, nbytes and its
own checksum (the same digest over its bytes). Shards and manifests appear atomically (temporary
name, fsync, rename). Loading into GPU or host memory lives in ``dynsnap_core.weights_load``; ``load``
is re-exported here.

    >>> ws = weights.save({"w": np.ones((3, 5), np.float32)}, "tiny", store="/var/tmp/ws")
    >>> weights.verify("tiny", store="/var/tmp/ws")
    >>> tensors = weights.load("tiny", store="/var/tmp/ws", device="cuda:0")   # or device="cpu"
"""
from __future__ import annotations

import ctypes
import json
import os
import re
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence

from .. import memfd
from ..errors import DynsnapError, SnapshotCorrupt
from .store import WeightDir, default_store, publish

__all__ = [
    "MAGIC", "FORMAT_VERSION", "ALIGN", "DEFAULT_SHARD_BYTES", "DTYPE_SIZES", "WeightsError",
    "WeightSetNotFound", "ShardCorrupt", "TensorMismatch", "WeightsOutOfMemory", "GpuUnavailable",
    "PathUnavailable", "TensorEntry", "ShardEntry", "WeightSet", "Store", "save", "import_safetensors",
    "open_set", "verify", "list_sets", "load", "Loaded",
]

MAGIC = "dynsnap-weightset"
FORMAT_VERSION = 1
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


# ---------------------------------------------------------------- errors

class WeightsError(DynsnapError):
    """A weight store or weight loading operation failed; ``tensor`` and ``shard`` name what, when known."""

    def __init__(self, message: str, *, tensor: Optional[str] = None, shard: Optional[str] = None,
                 **kw: Any):
        kw.setdefault("stage", "weights")
        super().__init__(message, **kw)
        self.tensor = tensor
        self.shard = shard

    def to_dict(self) -> dict:
        return {**super().to_dict(), "tensor": self.tensor, "shard": self.shard}


class WeightSetNotFound(WeightsError):
    """No weight set (manifest) of that name or path."""


class ShardCorrupt(WeightsError, SnapshotCorrupt):
    """A shard is missing, truncated or fails its checksum, or a manifest is malformed."""


class TensorMismatch(WeightsError):
    """A caller-provided buffer (``into=``) does not match the manifest's dtype, shape or device."""


class WeightsOutOfMemory(WeightsError):
    """The device has not enough free memory for the weight set (nothing is returned)."""


class GpuUnavailable(WeightsError):
    """No CUDA driver or no such GPU."""


class PathUnavailable(WeightsError):
    """The requested load path cannot run here (e.g. kvikio not installed)."""


# ---------------------------------------------------------------- manifest objects

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


# ---------------------------------------------------------------- getting bytes out of tensors

def _dtype_of_numpy(a: Any) -> str:
    name = getattr(a.dtype, "name", "")
    if name == "bfloat16":               # ml_dtypes
        return "BF16"
    if name in ("float8_e4m3fn", "float8_e5m2"):
        return _TORCH_NAMES[name]
    ts = a.dtype.str if a.dtype.itemsize > 1 else "|" + a.dtype.str[1:]
    if ts not in _FROM_TYPESTR:
        raise TypeError(f"unsupported dtype {a.dtype}")
    return _FROM_TYPESTR[ts]


def _buffer_at(addr: int, nbytes: int) -> memoryview:
    if nbytes == 0:
        return memoryview(b"")
    return memoryview((ctypes.c_char * nbytes).from_address(addr)).cast("B")


class _RawTensor:
    """Bytes already in safetensors layout (dtype name, shape, memoryview)."""

    __slots__ = ("dtype", "shape", "data")

    def __init__(self, dtype: str, shape: list[int], data: memoryview):
        self.dtype, self.shape, self.data = dtype, shape, data


def _host_bytes(name: str, value: Any) -> tuple[str, list[int], memoryview, Any]:
    """(dtype, shape, bytes view, keep-alive) of a torch tensor, numpy array, CUDA array or DLPack object."""
    if isinstance(value, _RawTensor):
        return value.dtype, value.shape, value.data, value
    mod = type(value).__module__ or ""
    if mod.startswith("torch"):
        t = value.detach()
        if t.device.type != "cpu":
            t = t.to("cpu")
        t = t.contiguous()
        dt = _TORCH_NAMES.get(str(t.dtype).replace("torch.", ""))
        if dt is None:
            raise TypeError(f"tensor {name!r}: unsupported dtype {t.dtype}")
        return dt, list(t.shape), _buffer_at(t.data_ptr(), t.numel() * t.element_size()), t
    cai = getattr(value, "__cuda_array_interface__", None)
    if cai is not None:
        ts, shape, strides = cai["typestr"], [int(x) for x in cai["shape"]], cai.get("strides")
        dt = _FROM_TYPESTR.get(ts if ts[0] != "=" else "<" + ts[1:])
        if dt is None:
            raise TypeError(f"tensor {name!r}: unsupported __cuda_array_interface__ typestr {ts!r}")
        n = DTYPE_SIZES[dt]
        for d in shape:
            n *= d
        if strides is not None:
            exp, acc = [], DTYPE_SIZES[dt]
            for d in reversed(shape):
                exp.append(acc)
                acc *= d
            if list(strides) != list(reversed(exp)):
                raise TypeError(f"tensor {name!r}: only C-contiguous CUDA arrays can be saved")
        buf = bytearray(n)
        if n:
            from .loader import _device
            _device(0).dtoh(buf, int(cai["data"][0]))
        return dt, shape, memoryview(buf), buf
    try:
        import numpy as np
    except ImportError:  # pragma: no cover
        np = None
    if np is not None and isinstance(value, np.generic):
        value = np.asarray(value)
    if np is not None and not isinstance(value, np.ndarray) and hasattr(value, "__dlpack__"):
        value = np.from_dlpack(value)
    if np is not None and isinstance(value, np.ndarray):
        a = value if value.flags.c_contiguous else np.ascontiguousarray(value)   # (keeps 0-d shapes)
        dt = _dtype_of_numpy(a)
        return dt, list(a.shape), memoryview(a.reshape(-1).view(np.uint8)), a
    raise TypeError(f"tensor {name!r}: cannot save a {type(value).__name__} (need torch, numpy, "
                    "__cuda_array_interface__ or DLPack)")


# ---------------------------------------------------------------- the store

class Store:
    """A weight store: shards in a WeightDir (``objects/``) and manifests in ``sets/``."""

    def __init__(self, root: str | os.PathLike | None = None):
        self.dir = WeightDir(root if root is not None else default_store())
        self.root = self.dir.root
        self.sets = self.root / "sets"

    def __repr__(self) -> str:
        return f"Store({str(self.root)!r})"

    def manifest_path(self, name: str) -> Path:
        return self.sets / f"{name}.json"

    def names(self) -> list[str]:
        if not self.sets.is_dir():
            return []
        return sorted(p.name[:-5] for p in self.sets.iterdir() if p.name.endswith(".json") and not p.name.startswith("."))

    def open(self, name: str) -> WeightSet:
        p = self.manifest_path(name)
        try:
            text = p.read_text()
        except FileNotFoundError:
            have = ", ".join(self.names()) or "none"
            raise WeightSetNotFound(f"no weight set {name!r} in {self.root} (sets: {have})", path=str(p)) from None
        try:
            m = json.loads(text)
        except ValueError as e:
            raise ShardCorrupt(f"weight manifest {p} is malformed: {e}", path=str(p)) from None
        return _parse_manifest(m, str(p), self)

    def _put_shard(self, parts: list[tuple[int, memoryview]], size: int, threads: Optional[int]) -> tuple[ShardEntry, bool]:
        """Assemble one shard in a memfd (parallel copies), store it unless present; (entry, written)."""
        with memfd.create(size, "dynsnap-shard") as m:
            if size:
                view = m.view(writable=True)
                for off, data in parts:
                    if len(data):
                        memfd.copy(view[off:off + len(data)], data, threads)
                view.release()
            stored = self.dir.put(m, threads)
            return ShardEntry(stored.digest, size), stored.written

    def save(self, tensors: Mapping[str, Any] | Iterable[tuple[str, Any]], name: str, *,
             shard_bytes: int = DEFAULT_SHARD_BYTES, threads: Optional[int] = None, source: str = "state_dict",
             overwrite: bool = True) -> WeightSet:
        """Store tensors (name -> torch / numpy / CUDA-array / DLPack value) as weight set ``name``.

        Shards already in the store (same content) are not written again. The manifest appears last
        and atomically; it replaces an older set of that name unless ``overwrite`` is False.
        """
        if not _NAME_OK.match(name):
            raise WeightsError(f"bad weight set name {name!r}: letters, digits, '.', '_', '+', '-' only")
        if not overwrite and self.manifest_path(name).exists():
            raise WeightsError(f"weight set {name!r} already exists in {self.root}", path=str(self.manifest_path(name)))
        items = list(tensors.items()) if isinstance(tensors, Mapping) else list(tensors)
        seen: set[str] = set()
        entries: list[TensorEntry] = []
        shards: list[ShardEntry] = []
        written = 0
        parts: list[tuple[int, memoryview]] = []
        keep: list[Any] = []
        cursor = 0

        def flush() -> None:
            nonlocal parts, keep, cursor, written
            if not parts and cursor == 0:
                return
            entry, w = self._put_shard(parts, _align(cursor), threads)
            shards.append(entry)
            written += w
            parts, keep, cursor = [], [], 0

        t0 = time.perf_counter()
        for tname, value in items:
            if not isinstance(tname, str) or not tname:
                raise WeightsError(f"tensor names must be non-empty strings, got {tname!r}")
            if tname in seen:
                raise WeightsError(f"tensor {tname!r} appears twice", tensor=tname)
            seen.add(tname)
            dt, shape, data, alive = _host_bytes(tname, value)
            nbytes = len(data)
            if parts and _align(cursor) + nbytes > shard_bytes:
                flush()
            off = _align(cursor)
            entries.append(TensorEntry(tname, dt, shape, len(shards), off, nbytes,
                                       memfd.digest(data, threads) if nbytes else memfd.digest(b"", 1)))
            parts.append((off, data))
            keep.append(alive)
            cursor = off + nbytes
            if cursor == 0:           # an empty tensor still needs a (tiny) place
                cursor = 1
        flush()
        manifest = {"magic": MAGIC, "format": FORMAT_VERSION, "name": name, "checksum": CHECKSUM,
                    "align": ALIGN, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "source": source, "total_bytes": sum(e.nbytes for e in entries),
                    "shards": [s.to_dict() for s in shards], "tensors": [e.to_dict() for e in entries]}
        path = self._write_manifest(name, manifest)
        ws = WeightSet(name, self, entries, shards, str(path), manifest)
        ws.meta["stats"] = {"seconds": time.perf_counter() - t0, "shards_written": written,
                            "shards_deduplicated": len(shards) - written}
        return ws

    def _write_manifest(self, name: str, manifest: dict) -> Path:
        self.sets.mkdir(parents=True, exist_ok=True)
        dest = self.manifest_path(name)

        def write(tmp: Path) -> None:
            with open(tmp, "w") as f:
                json.dump(manifest, f, indent=1)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
        publish(dest, write)
        return dest

    def import_safetensors(self, paths: str | os.PathLike | Sequence[str | os.PathLike], name: Optional[str] = None,
                           *, shard_bytes: int = DEFAULT_SHARD_BYTES, threads: Optional[int] = None) -> WeightSet:
        """Import one or more .safetensors files (one model's shards) as weight set ``name`` (default: file stem)."""
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        paths = [os.fspath(p) for p in paths]
        if not paths:
            raise WeightsError("no safetensors file given")
        if name is None:
            stem = os.path.basename(paths[0])
            name = stem[:-len(".safetensors")] if stem.endswith(".safetensors") else stem
            name = re.sub(r"[^A-Za-z0-9._+-]", "_", name).lstrip("._+-") or "weights"
        opened = [_SafetensorsFile(p) for p in paths]
        try:
            items = [item for f in opened for item in f.items()]
            return self.save(items, name, shard_bytes=shard_bytes, threads=threads,
                             source="safetensors:" + ",".join(os.path.abspath(p) for p in paths))
        finally:
            for f in opened:
                f.close()


class _SafetensorsFile:
    """A safetensors file parsed by hand (8-byte header length, JSON header, data) over an mmap."""

    def __init__(self, path: str):
        import mmap
        self.path = path
        try:
            self._f = open(path, "rb")
        except FileNotFoundError:
            raise WeightsError(f"no such safetensors file: {path}", path=path) from None
        try:
            size = os.fstat(self._f.fileno()).st_size
            head = self._f.read(8)
            if len(head) < 8:
                raise ShardCorrupt(f"{path} is not a safetensors file (shorter than 8 bytes)", path=path)
            (hlen,) = struct.unpack("<Q", head)
            if hlen > size - 8 or hlen > 100 << 20:
                raise ShardCorrupt(f"{path} is not a safetensors file (header length {hlen})", path=path)
            try:
                header = json.loads(self._f.read(hlen))
            except ValueError as e:
                raise ShardCorrupt(f"{path} has a malformed safetensors header: {e}", path=path) from None
            self.base = 8 + hlen
            self._map = mmap.mmap(self._f.fileno(), 0, access=mmap.ACCESS_READ) if size else None
            self._mv = memoryview(self._map) if self._map is not None else memoryview(b"")
            self.header = header
            self.size = size
        except BaseException:
            self._f.close()
            raise

    def items(self) -> Iterator[tuple[str, _RawTensor]]:
        entries = [(k, v) for k, v in self.header.items() if k != "__metadata__"]
        entries.sort(key=lambda kv: kv[1].get("data_offsets", [0])[0])
        for k, v in entries:
            try:
                dt, shape, (a, b) = v["dtype"], [int(x) for x in v["shape"]], v["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise ShardCorrupt(f"{self.path}: bad header entry for tensor {k!r}", path=self.path, tensor=k) from None
            if dt not in DTYPE_SIZES:
                raise WeightsError(f"{self.path}: tensor {k!r} has unsupported dtype {dt}", tensor=k, path=self.path)
            n = DTYPE_SIZES[dt]
            for d in shape:
                n *= d
            if b - a != n or a < 0 or self.base + b > self.size:
                raise ShardCorrupt(f"{self.path}: tensor {k!r} data [{a}, {b}) does not match its shape or the file",
                                   path=self.path, tensor=k)
            yield k, _RawTensor(dt, shape, self._mv[self.base + a:self.base + b])

    def close(self) -> None:
        try:
            self._mv.release()
        except Exception:  # noqa: BLE001 - slices may still be referenced until save returns
            pass
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:
                pass
        self._f.close()


# ---------------------------------------------------------------- verify

def _verify_set(ws: WeightSet, *, deep: bool = False, threads: Optional[int] = None) -> int:
    total = 0
    for i, s in enumerate(ws.shards):
        path = ws.shard_path(i)
        names = [t.name for t in ws.tensors_in(i)]
        first = names[0] if names else None
        try:
            size = os.stat(path).st_size
        except FileNotFoundError:
            raise ShardCorrupt(f"shard {path} of weight set {ws.name!r} is missing (tensors {_few(names)})",
                               shard=path, tensor=first, path=path) from None
        if size != s.size:
            raise ShardCorrupt(f"shard {path} is truncated or resized: {size} bytes, the manifest says {s.size} "
                               f"(tensors {_few(names)})", shard=path, tensor=first, path=path)
        try:
            [m] = memfd.restore([memfd.Segment(path, 0, s.size, name="dynsnap-verify", digest=s.digest)], threads)
        except SnapshotCorrupt as e:
            bad = _bad_tensors(ws, i, path)
            raise ShardCorrupt(f"shard {path} fails its checksum ({e.message}); damaged tensor(s): {_few(bad or names)}",
                               shard=path, tensor=(bad or names or [None])[0], path=path) from None
        with m:
            if deep:
                view = m.view(writable=False)
                for t in ws.tensors_in(i):
                    if memfd.digest(view[t.offset:t.offset + t.nbytes], threads) != t.checksum:
                        raise ShardCorrupt(f"tensor {t.name!r} in shard {path} fails its checksum",
                                           shard=path, tensor=t.name, path=path)
                view.release()
        total += s.size
    return total


def _bad_tensors(ws: WeightSet, i: int, path: str) -> list[str]:
    """Tensors of shard i whose own checksum fails (read through the page cache)."""
    import mmap
    bad = []
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                return [t.name for t in ws.tensors_in(i)]
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                mv = memoryview(mm)
                for t in ws.tensors_in(i):
                    if t.offset + t.nbytes > size or memfd.digest(mv[t.offset:t.offset + t.nbytes]) != t.checksum:
                        bad.append(t.name)
                mv.release()
    except OSError:
        return []
    return bad


def _few(names: Sequence[str], n: int = 3) -> str:
    if not names:
        return "none"
    s = ", ".join(repr(x) for x in names[:n])
    return s + (f" and {len(names) - n} more" if len(names) > n else "")


# ---------------------------------------------------------------- module-level API

def _store(store: Any) -> Store:
    return store if isinstance(store, Store) else Store(store)


def open_set(ref: Any, store: Any = None) -> WeightSet:
    """A WeightSet from a WeightSet, a manifest path (``.../sets/NAME.json``), a store directory holding
    exactly one set, or a set name in ``store`` (default store)."""
    if isinstance(ref, WeightSet):
        return ref
    ref = os.fspath(ref)
    if ref.endswith(".json") and os.path.isfile(ref):
        sets_dir = os.path.dirname(os.path.abspath(ref))
        st = _store(store) if store is not None else Store(os.path.dirname(sets_dir))
        try:
            m = json.loads(Path(ref).read_text())
        except ValueError as e:
            raise ShardCorrupt(f"weight manifest {ref} is malformed: {e}", path=ref) from None
        return _parse_manifest(m, ref, st)
    if os.path.isdir(ref) and store is None:
        st = Store(ref)
        names = st.names()
        if len(names) != 1:
            raise WeightSetNotFound(f"store {ref} holds {len(names)} weight sets ({', '.join(names) or 'none'}): "
                                    "name one", path=ref)
        return st.open(names[0])
    return _store(store).open(ref)


def save(tensors: Mapping[str, Any], name: str, store: Any = None, **kw: Any) -> WeightSet:
    """Store a state dict as weight set ``name`` (see ``Store.save``)."""
    return _store(store).save(tensors, name, **kw)


def import_safetensors(paths: Any, name: Optional[str] = None, store: Any = None, **kw: Any) -> WeightSet:
    """Import .safetensors file(s) as a weight set (see ``Store.import_safetensors``)."""
    return _store(store).import_safetensors(paths, name, **kw)


def verify(ref: Any = None, store: Any = None, *, deep: bool = False, threads: Optional[int] = None) -> list[dict]:
    """Verify one weight set, or every set in the store when ``ref`` is None; raises ShardCorrupt on damage."""
    if ref is None:
        st = _store(store)
        sets = [st.open(n) for n in st.names()]
    else:
        sets = [open_set(ref, store)]
    out = []
    for ws in sets:
        t0 = time.perf_counter()
        n = ws.verify(deep=deep, threads=threads)
        out.append({"name": ws.name, "ok": True, "shards": len(ws.shards), "bytes": n,
                    "seconds": time.perf_counter() - t0})
    return out


def list_sets(store: Any = None) -> list[dict]:
    """Every weight set in the store with tensor, shard and byte counts."""
    st = _store(store)
    return [st.open(n).to_dict() for n in st.names()]


def load(ref: Any, device: str = "cuda:0", into: Optional[Mapping[str, Any]] = None, path: str = "auto",
         **kw: Any) -> "Loaded":
    """Load a weight set into GPU (or host) memory; see ``dynsnap_core.weights_load.load``."""
    from .loader import load as _load
    return _load(ref, device=device, into=into, path=path, **kw)


def __getattr__(name: str) -> Any:
    if name == "Loaded":
        from .loader import Loaded
        return Loaded
    raise AttributeError(name)

