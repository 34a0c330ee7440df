"""The weight store: content-addressed objects (WeightDir) and weight set manifests; save, import, verify.

Layout under the store root (``$DYNSNAP_WEIGHTS``, else ``<dynsnap home>/weights``)::

    objects/<digest>-<size>     shards and memory-service regions (digest = ``memfd.digest``, 16 hex chars)
    sets/<name>.json            one manifest per weight set (see ``format``)

Ten snapshots of one model share one copy of its weights. Objects and manifests appear atomically (written
under a temporary name, fsynced, renamed); an object is never rewritten. Loading checks the digest before a
region is handed out, so a damaged object is refused, not served.

    >>> ws = weights.save({"w": np.ones((3, 5), np.float32)}, "tiny", store="/var/tmp/ws")
    >>> weights.verify("tiny", store="/var/tmp/ws")
    >>> tensors = weights.load("tiny", store="/var/tmp/ws", device="cuda:0")   # or device="cpu"
"""
from __future__ import annotations

import ctypes
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

from .. import config, memfd
from ..durable import publish
from ..errors import ShardCorrupt, WeightSetNotFound, WeightsError
from .format import (ALIGN, CHECKSUM, DEFAULT_SHARD_BYTES, DTYPE_SIZES, FORMAT_VERSION, MAGIC, ShardEntry,
                     TensorEntry, WeightSet, _FROM_TYPESTR, _NAME_OK, _TORCH_NAMES, _align, _parse_manifest,
                     _RawTensor)
from .safetensors import SafetensorsFile

__all__ = ["WeightDir", "StoredRegion", "default_store", "Store", "save", "import_safetensors", "open_set",
           "verify", "list_sets"]

_NAME = re.compile(r"^([0-9a-f]{16})-([0-9]+)$")


def default_store() -> Path:
    """``$DYNSNAP_WEIGHTS`` else ``<dynsnap home>/weights``."""
    return config.weights_store()


@dataclass
class StoredRegion:
    """A region in the store: digest, size, file path, and whether this call wrote it (False: deduplicated)."""

    digest: str
    size: int
    path: str
    written: bool = False

    def to_dict(self) -> dict:
        return {"digest": self.digest, "size": self.size, "path": self.path, "written": self.written}


class WeightDir:
    """A content-addressed directory of region files."""

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root) if root is not None else default_store()
        self.objects = self.root / "objects"

    def path(self, digest: str, size: int) -> Path:
        return self.objects / f"{digest}-{size}"

    def has(self, digest: str, size: int) -> bool:
        p = self.path(digest, size)
        try:
            return p.stat().st_size == size
        except FileNotFoundError:
            return False

    def put(self, region: memfd.MemFd, threads: Optional[int] = None) -> StoredRegion:
        """Store a region's content unless the same content is already there; returns where it lives."""
        dig = region.digest or region.compute_digest(threads)
        dest = self.path(dig, region.size)
        if self.has(dig, region.size):
            return StoredRegion(dig, region.size, str(dest), written=False)
        self.objects.mkdir(parents=True, exist_ok=True)

        def write(tmp: Path) -> None:
            [res] = memfd.dump([region], [tmp], threads, fsync=True)
            if res.digest != dig:
                raise memfd.MemfdError(f"region {region.name!r} changed while it was stored "
                                       f"(digest {res.digest}, expected {dig})", stage="store", path=str(tmp))
        publish(dest, write)
        return StoredRegion(dig, region.size, str(dest), written=True)

    def segment(self, digest: str, size: int, name: Optional[str] = None) -> memfd.Segment:
        """The segment that restores this object, with its digest to check."""
        return memfd.Segment(str(self.path(digest, size)), 0, size, name=name, digest=digest)

    def list(self) -> list[StoredRegion]:
        out = []
        if self.objects.is_dir():
            for p in sorted(self.objects.iterdir()):
                m = _NAME.match(p.name)
                if m:
                    out.append(StoredRegion(m.group(1), int(m.group(2)), str(p)))
        return out


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
            from .device import _device
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
        opened = [SafetensorsFile(p) for p in paths]
        try:
            items = [item for f in opened for item in f.items()]
            return self.save(items, name, shard_bytes=shard_bytes, threads=threads,
                             source="safetensors:" + ",".join(os.path.abspath(p) for p in paths))
        finally:
            for f in opened:
                f.close()


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
