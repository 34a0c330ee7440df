"""Loading a weight set into GPU memory (pinned pipeline, memfd, kvikio) or host memory, with checksums.

``load(ref, device="cuda:0", into=None, path="auto")`` returns a ``Loaded`` dict (tensor name ->
tensor) that also says which path ran and how fast. Paths:

- ``"pipeline"``: the C++ pinned ring (``dynsnap_core._lib._h2d``): threads pread shards (O_DIRECT
  unless the shard is in the page cache) into pinned buffers while one CUDA stream per thread copies
  earlier buffers to the device; every shard's digest is checked on the fly.
- ``"memfd"``: shards as memfds, from the host memory service (``memsvc=SOCKET or Client``) or
  restored here in parallel; each mapping is registered as pinned memory chunk by chunk
  (cuMemHostRegister, read-only) and copied at PCIe speed (staged through the pinned ring where
  registration is not supported). The memfd digest is checked when the memfd is filled.
- ``"kvikio"``: kvikio CuFile reads straight into the tensors (GDS where the system has it, kvikio's
  compat mode otherwise) with thread count and task size set, not kvikio's defaults. Needs the
  optional ``gpu`` extra; without it this path reports "kvikio not installed".
- ``"host"``: shards restored into memfds in parallel (digest checked) and returned as numpy arrays
  (torch CPU tensors when torch is importable); for CPU-only machines and CI.

``"auto"`` picks host for ``device="cpu"``, memfd when ``memsvc`` is given, kvikio when real GDS is
active, else the pipeline. Tensors are torch tensors when torch is importable, else ``DeviceArray``
objects exposing ``__cuda_array_interface__`` (BF16/F8 are exposed as unsigned ints of the same
width; ``dtype`` keeps the manifest's name). On any failure nothing is returned: tensors allocated by
this call are freed and the error (``ShardCorrupt``, ``TensorMismatch``, ``WeightsOutOfMemory``,
``GpuUnavailable``, ``PathUnavailable``) names the shard or tensor.
"""
from __future__ import annotations

import contextlib
import os
import time
from typing import Any, Iterator, Mapping, Optional

from .. import memfd
from ..errors import (CudaUnavailable, GpuUnavailable, PathUnavailable, ShardCorrupt, SnapshotCorrupt,
                      TensorMismatch, WeightsError, WeightsOutOfMemory)
from ..units import human_bytes as _human
from .device import (DeviceArray, _DEVICES, _RawDev,  # noqa: F401 (_DEVICES: tests read it)
                     _device, _kvikio, _kvikio_compat, _parse_device, _torch,
                     gpu_available)
from .format import DTYPE_SIZES, TYPESTR, TensorEntry, WeightSet
from .store import open_set
from .verify import _few

__all__ = ["PATHS", "Loaded", "DeviceArray", "load", "available_paths", "gpu_available", "defaults"]

PATHS = ("kvikio", "pipeline", "memfd", "host")
_MiB = 1 << 20


class _Defaults:
    """Tunables of the GPU paths (set attributes, or use as a context manager with keyword overrides)."""

    def __init__(self) -> None:
        cpus = os.cpu_count() or 1
        self.threads = max(2, min(16, cpus))       # pipeline reader/copy threads (one stream each)
        self.nbuf = 3                              # pinned buffers per thread (>= 2)
        self.chunk = 8 * _MiB                      # pipeline chunk (multiple of 8 MiB)
        self.host_chunk = 16 * _MiB                # memfd path: bytes registered per step
        self.direct = "auto"                       # pipeline: "auto" | True | False
        self.kvikio_threads = max(4, min(32, cpus * 2))
        self.kvikio_task_size = 16 * _MiB
        self._stack: list[dict] = []

    def __call__(self, **kw: Any) -> "_Defaults":
        self._stack.append({k: getattr(self, k) for k in kw})
        for k, v in kw.items():
            if not hasattr(self, k):
                raise AttributeError(f"no weights tunable {k!r}")
            setattr(self, k, v)
        return self

    def __enter__(self) -> "_Defaults":
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._stack:
            for k, v in self._stack.pop().items():
                setattr(self, k, v)


defaults = _Defaults()


class Loaded(dict):
    """Tensor name -> tensor, plus ``path`` (which ran), ``device``, ``nbytes``, ``seconds`` and ``details``."""

    path: str = ""
    device: str = ""
    nbytes: int = 0
    seconds: float = 0.0
    details: dict

    @property
    def gbps(self) -> float:
        return self.nbytes / self.seconds / 1e9 if self.seconds > 0 else 0.0

    def summary(self) -> dict:
        return {"path": self.path, "device": self.device, "tensors": len(self), "bytes": self.nbytes,
                "seconds": self.seconds, "gbps": self.gbps, **self.details}


# ---------------------------------------------------------------- driver access


def available_paths(device: str = "cuda:0") -> dict:
    """Each path -> None when it can run for ``device``, else the reason it cannot."""
    ordinal = _parse_device(device)
    out: dict = {"host": None}
    if ordinal is None:
        for p in ("pipeline", "memfd", "kvikio"):
            out[p] = "device is cpu"
        return out
    ok, why = gpu_available()
    out["pipeline"] = None if ok else why
    out["memfd"] = None if ok else why
    kv = _kvikio()
    out["kvikio"] = "kvikio not installed" if kv is None else (None if ok else why)
    out["host"] = "device is a GPU: the host path returns host arrays (use device='cpu')"
    return out


# ---------------------------------------------------------------- device arrays without torch


def _torch_dtype(torch: Any, name: str) -> Any:
    return {"BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "F16": torch.float16,
            "BF16": torch.bfloat16, "I32": torch.int32, "F32": torch.float32, "I64": torch.int64,
            "F64": torch.float64, "U16": getattr(torch, "uint16", None), "U32": getattr(torch, "uint32", None),
            "U64": getattr(torch, "uint64", None), "F8_E4M3": getattr(torch, "float8_e4m3fn", None),
            "F8_E5M2": getattr(torch, "float8_e5m2", None)}[name]


# ---------------------------------------------------------------- destinations

def _is_oom(e: BaseException) -> bool:
    text = str(e)
    return "out of memory" in text.lower() or "CUDA_ERROR_OUT_OF_MEMORY" in text


def _into_ptr(t: TensorEntry, obj: Any, ordinal: int, torch: Any) -> int:
    """Device pointer of a caller buffer, after checking dtype, shape, contiguity and device."""
    if torch is not None and isinstance(obj, torch.Tensor):
        want = _torch_dtype(torch, t.dtype)
        if obj.dtype != want:
            raise TensorMismatch(f"into[{t.name!r}] has dtype {obj.dtype}, the manifest says {t.dtype}", tensor=t.name)
        if list(obj.shape) != list(t.shape):
            raise TensorMismatch(f"into[{t.name!r}] has shape {list(obj.shape)}, the manifest says {t.shape}",
                                 tensor=t.name)
        if obj.device.type != "cuda" or obj.device.index != ordinal:
            raise TensorMismatch(f"into[{t.name!r}] is on {obj.device}, loading to cuda:{ordinal}", tensor=t.name)
        if not obj.is_contiguous():
            raise TensorMismatch(f"into[{t.name!r}] is not contiguous", tensor=t.name)
        return int(obj.data_ptr())
    cai = getattr(obj, "__cuda_array_interface__", None)
    if cai is None:
        raise TensorMismatch(f"into[{t.name!r}] is a {type(obj).__name__}, not a CUDA tensor", tensor=t.name)
    ts = getattr(obj, "dtype", None) if isinstance(obj, DeviceArray) else None
    if (ts or cai["typestr"]) not in (t.dtype, TYPESTR[t.dtype]):
        raise TensorMismatch(f"into[{t.name!r}] has typestr {cai['typestr']}, the manifest says {t.dtype}",
                             tensor=t.name)
    if [int(x) for x in cai["shape"]] != list(t.shape):
        raise TensorMismatch(f"into[{t.name!r}] has shape {list(cai['shape'])}, the manifest says {t.shape}",
                             tensor=t.name)
    if cai.get("strides") is not None:
        exp, acc = [], DTYPE_SIZES[t.dtype]
        for d in reversed(t.shape):
            exp.append(acc)
            acc *= d
        if list(cai["strides"]) != list(reversed(exp)):
            raise TensorMismatch(f"into[{t.name!r}] is not C-contiguous", tensor=t.name)
    return int(cai["data"][0])


def _destinations(ws: WeightSet, ordinal: int, into: Optional[Mapping[str, Any]]) -> tuple[dict, dict]:
    """(name -> tensor, name -> device pointer); allocates what ``into`` does not provide."""
    torch = _torch()
    into = dict(into or {})
    names = {t.name for t in ws.tensors}
    extra = [n for n in into if n not in names]
    if extra:
        raise TensorMismatch(f"into names tensors the weight set {ws.name!r} does not have: {_few(extra)}",
                             tensor=extra[0])
    dev = _device(ordinal)
    need = sum(t.nbytes for t in ws.tensors if t.name not in into)
    free, total = dev.mem_info()
    if need > free:
        acc, first = 0, ws.tensors[0].name
        for t in ws.tensors:
            if t.name in into:
                continue
            acc += t.nbytes
            if acc > free:
                first = t.name
                break
        raise WeightsOutOfMemory(f"weight set {ws.name!r} needs {_human(need)} on cuda:{ordinal}, "
                                 f"{_human(free)} of {_human(total)} is free (tensor {first!r} does not fit)",
                                 tensor=first)
    out: dict = {}
    ptrs: dict = {}
    try:
        for t in ws.tensors:
            if t.name in into:
                out[t.name] = into[t.name]
                ptrs[t.name] = _into_ptr(t, into[t.name], ordinal, torch)
                continue
            try:
                if torch is not None:
                    dt = _torch_dtype(torch, t.dtype)
                    if dt is None:
                        raise WeightsError(f"tensor {t.name!r}: this torch has no dtype for {t.dtype}", tensor=t.name)
                    x = torch.empty(t.shape, dtype=dt, device=f"cuda:{ordinal}")
                    ptrs[t.name] = int(x.data_ptr())
                else:
                    x = DeviceArray(ordinal, t.shape, t.dtype)
                    ptrs[t.name] = x.ptr
            except (WeightsError, CudaUnavailable):
                raise
            except Exception as e:  # noqa: BLE001 - torch.OutOfMemoryError, CudaCallError
                if _is_oom(e):
                    raise WeightsOutOfMemory(f"out of GPU memory on cuda:{ordinal} allocating tensor {t.name!r} "
                                             f"({_human(t.nbytes)}) of weight set {ws.name!r}",
                                             tensor=t.name) from None
                raise
            out[t.name] = x
    except BaseException:
        _free(out, into)
        raise
    return out, ptrs


def _free(out: dict, into: Optional[Mapping[str, Any]]) -> None:
    """Drop what this call allocated (torch's caching allocator reuses it; DeviceArrays are freed now)."""
    for name, x in list(out.items()):
        if into and name in into:
            continue
        if isinstance(x, DeviceArray):
            x.free()
    out.clear()


# ---------------------------------------------------------------- failures from the C++ pipeline

def _raise_result(res: dict, ws: WeightSet, shard_index: dict, what: str) -> None:
    kind, msg, src = res["kind"], res["error"], res["source"]
    shard = tensor = None
    if src is not None and src >= 0 and src in shard_index:
        i = shard_index[src]
        shard = ws.shard_path(i)
        names = [t.name for t in ws.tensors_in(i)]
        tensor = names[0] if names else None
        msg = f"{msg} (tensors {_few(names)})"
    if kind in ("truncated", "checksum"):
        raise ShardCorrupt(f"{what}: {msg}", shard=shard, tensor=tensor, path=shard, errno=res["code"] or None)
    if kind == "oom":
        raise WeightsOutOfMemory(f"{what}: {msg}", shard=shard, tensor=tensor)
    if kind == "cuda":
        name = msg.split(" ", 1)[0] if msg.startswith("CUDA_ERROR") else None
        raise WeightsError(f"{what}: {msg}", shard=shard, tensor=tensor, driver_error=name)
    raise WeightsError(f"{what}: {msg}", shard=shard, tensor=tensor, path=shard, errno=res["code"] or None)


def _jobs(ws: WeightSet, ptrs: dict) -> list:
    return [(t.shard, t.offset, t.nbytes, ptrs[t.name]) for t in ws.tensors if t.nbytes]


# ---------------------------------------------------------------- paths

def read_to_pinned(paths: list, ordinal: int = 0, threads: Optional[int] = None) -> dict:
    """Read whole files into the pipeline's pinned ring and copy nothing to the GPU: the storage side of the
    pipeline alone, with its threads and chunk (what `bench weights` takes as the page-cache limit).
    Returns {"bytes", "seconds", "threads"}."""
    dev = _device(ordinal)
    threads = threads or defaults.threads
    sources = []
    for p in paths:
        try:
            sources.append({"path": os.fspath(p), "size": os.path.getsize(p), "digest": None})
        except OSError as e:
            raise GpuUnavailable(f"cannot read {p} into pinned memory: {e.strerror}", stage="weights") from None
    res = dev.load(sources, [], defaults.chunk, threads, defaults.nbuf, 0, 0, False)
    if not res["ok"]:
        raise GpuUnavailable(f"reading into pinned memory failed: {res['error']}", stage="weights")
    return {"bytes": sum(s["size"] for s in sources), "seconds": res["seconds"], "threads": threads}


def _load_pipeline(ws: WeightSet, ordinal: int, ptrs: dict, verify: bool) -> dict:
    dev = _device(ordinal)
    sources = [{"path": ws.shard_path(i), "size": s.size, "digest": int(s.digest, 16) if verify else None}
               for i, s in enumerate(ws.shards)]
    direct = {"auto": 2, True: 1, False: 0}[defaults.direct]
    res = dev.load(sources, _jobs(ws, ptrs), defaults.chunk, defaults.threads, defaults.nbuf, direct, 0)
    if not res["ok"]:
        _raise_result(res, ws, {i: i for i in range(len(ws.shards))}, f"loading weight set {ws.name!r}")
    d = res["direct"]
    return {"copy_seconds": res["seconds"], "o_direct": "all" if d and all(d) else "none" if not any(d) else "some",
            "threads": defaults.threads, "chunk": defaults.chunk, "nbuf": defaults.nbuf,
            "pinned_bytes": res["pinned_bytes"], "verified": verify}


def _memfds(ws: WeightSet, memsvc: Any, verify: bool) -> tuple[list, Any, list]:
    """(MemFds per shard, service client or None, region names) from the service or a local restore."""
    if memsvc is None:
        segs = [memfd.Segment(ws.shard_path(i), 0, s.size, name=f"dynsnap-w-{s.digest}",
                              digest=s.digest if verify else None) for i, s in enumerate(ws.shards)]
        try:
            return memfd.restore(segs, populate=True), None, []
        except SnapshotCorrupt as e:
            raise _corrupt(ws, e) from None
    from ..memsvc.client import Client
    client = memsvc if isinstance(memsvc, Client) else Client(memsvc)
    names = [f"weights/{s.digest}-{s.size}" for s in ws.shards]
    client.load_many([{"name": n, "path": ws.shard_path(i), "digest": s.digest, "length": s.size}
                      for i, (n, s) in enumerate(zip(names, ws.shards))])
    got = []
    try:
        for n in names:
            got.append(client.get(n, wait=True))
    except BaseException:
        for m in got:
            m.close()
        raise
    return got, client, names


def _corrupt(ws: WeightSet, e: SnapshotCorrupt) -> ShardCorrupt:
    """A memfd fill's SnapshotCorrupt, naming the shard's tensors."""
    idx = next((i for i in range(len(ws.shards)) if ws.shard_path(i) == e.path), None)
    names = [t.name for t in ws.tensors_in(idx)] if idx is not None else []
    return ShardCorrupt(f"weight set {ws.name!r}: {e.message} (tensors {_few(names)})", shard=e.path,
                        tensor=names[0] if names else None, path=e.path)


def _load_memfd(ws: WeightSet, ordinal: int, ptrs: dict, verify: bool, memsvc: Any) -> dict:
    dev = _device(ordinal)
    t0 = time.perf_counter()
    mfds, client, names = _memfds(ws, memsvc, verify)
    t_fill = time.perf_counter() - t0
    maps: list[tuple[int, int]] = []
    try:
        sources = []
        for i, m in enumerate(mfds):
            if m.size != ws.shards[i].size:
                raise ShardCorrupt(f"memfd of shard {ws.shard_path(i)} holds {m.size} bytes, the manifest says "
                                   f"{ws.shards[i].size}", shard=ws.shard_path(i))
            ms = max(m.map_size, (m.size + 4095) // 4096 * 4096) if m.size else 0
            if not ms:
                sources.append({"addr": 0, "map_size": 0, "size": 0, "digest": None})
                continue
            addr = memfd.reserve(ms)
            maps.append((addr, ms))
            memfd.attach(m.fd, addr, ms, writable=False)
            sources.append({"addr": addr, "map_size": ms, "size": m.size, "digest": None})
        chunk = max(8 * _MiB, defaults.host_chunk // (8 * _MiB) * (8 * _MiB))
        res = dev.load(sources, _jobs(ws, ptrs), chunk, defaults.threads, 2, 0, 0)
        if not res["ok"]:
            _raise_result(res, ws, {i: i for i in range(len(ws.shards))}, f"copying weight set {ws.name!r} from memfds")
    finally:
        for addr, ms in maps:
            memfd.release(addr, ms)
        for m in mfds:
            m.close()
        if client is not None:
            for n in names:
                try:
                    client.release(n)
                except Exception:  # noqa: BLE001 - the service may be gone; the fds are closed anyway
                    pass
    return {"fill_seconds": t_fill, "copy_seconds": res["seconds"], "host_mode": res["host_mode"],
            "source": "memsvc" if client is not None else "local memfds", "verified": verify}


def _check_shard(ws: WeightSet, i: int, whose: str = "") -> str:
    """Path of shard ``i``; ShardCorrupt if it is missing or shorter than the manifest says."""
    path, want = ws.shard_path(i), ws.shards[i].size
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        raise ShardCorrupt(f"shard {path}{whose} is missing", shard=path, path=path) from None
    if size < want:
        names = [t.name for t in ws.tensors_in(i)]
        raise ShardCorrupt(f"shard {path} is truncated: {size} bytes, the manifest says {want} "
                           f"(tensors {_few(names)})", shard=path, tensor=names[0] if names else None, path=path)
    return path


def _load_kvikio(ws: WeightSet, ptrs: dict, verify: bool) -> dict:
    kvikio = _kvikio()
    if kvikio is None:
        raise PathUnavailable("path 'kvikio' cannot run: kvikio not installed (pip install dynsnap-core[gpu])")
    compat = _kvikio_compat(kvikio)
    t0 = time.perf_counter()
    with _kvikio_tuned(kvikio, defaults.kvikio_threads, defaults.kvikio_task_size):
        for i in range(len(ws.shards)):
            path = _check_shard(ws, i)
            f = kvikio.CuFile(path, "r")
            try:
                futs = [(t, f.pread(_RawDev(ptrs[t.name], t.nbytes), t.nbytes, t.offset,
                                    defaults.kvikio_task_size)) for t in ws.tensors_in(i) if t.nbytes]
                for t, fut in futs:
                    n = fut.get()
                    if n != t.nbytes:
                        raise ShardCorrupt(f"shard {path} gave {n} of {t.nbytes} bytes of tensor {t.name!r}",
                                           shard=path, tensor=t.name, path=path)
            finally:
                f.close()
    t_read = time.perf_counter() - t0
    if verify:  # kvikio does not hash: check the shards through the page cache afterwards
        ws.verify()
    return {"copy_seconds": t_read, "compat_mode": compat, "kvikio_threads": defaults.kvikio_threads,
            "kvikio_task_size": defaults.kvikio_task_size, "verified": verify}


@contextlib.contextmanager
def _kvikio_tuned(kvikio: Any, threads: int, task_size: int) -> Iterator[None]:
    """kvikio's thread pool and task size set for one load, and put back after it (the process may use
    kvikio itself, and `bench weights` measures kvikio's own defaults in the same process)."""
    d = kvikio.defaults
    try:
        cm = d.set({"num_threads": threads, "task_size": task_size})   # kvikio >= 25.x: sets now, reverts on exit
    except Exception:  # noqa: BLE001 - older kvikio
        cm = None
    if cm is not None and hasattr(cm, "__exit__"):
        with cm:
            yield
        return
    saved = []
    for setter, getter, v in (("num_threads_reset", "get_num_threads", threads),
                              ("task_size_reset", "task_size", task_size)):
        if hasattr(d, setter):
            saved.append((setter, getattr(d, getter)() if hasattr(d, getter) else None))
            getattr(d, setter)(v)
    try:
        yield
    finally:
        for setter, old in saved:
            if old is not None:
                getattr(d, setter)(old)


def _load_host(ws: WeightSet, verify: bool) -> tuple[dict, dict]:
    try:
        import numpy as np
    except ImportError:
        raise PathUnavailable("path 'host' needs numpy") from None
    torch = _torch()
    try:
        ml = __import__("ml_dtypes")
    except ImportError:
        ml = None
    segs = [memfd.Segment(ws.shard_path(i), 0, s.size, name=f"dynsnap-w-{s.digest}",
                          digest=s.digest if verify else None) for i, s in enumerate(ws.shards)]
    for i in range(len(ws.shards)):
        _check_shard(ws, i, f" of weight set {ws.name!r}")
    t0 = time.perf_counter()
    try:
        mfds = memfd.restore(segs, populate=True)
    except SnapshotCorrupt as e:
        raise _corrupt(ws, e) from None
    views = []
    for m in mfds:
        views.append(m.view(writable=True) if m.size else memoryview(bytearray(0)))
        m.close()          # the mapping lives on with the arrays
    out = {}
    for t in ws.tensors:
        raw = np.frombuffer(views[t.shard], dtype=np.uint8, count=t.nbytes, offset=t.offset)
        if t.dtype == "BF16" and ml is not None and torch is None:
            a = raw.view(ml.bfloat16)
        else:
            a = raw.view(np.dtype(TYPESTR[t.dtype]))
        a = a.reshape(t.shape)
        if torch is not None:
            dt = _torch_dtype(torch, t.dtype)
            x = torch.from_numpy(a.view(np.uint8).reshape(-1) if t.nbytes else np.zeros(0, np.uint8))
            x = x.view(dt).reshape(t.shape) if t.nbytes else torch.empty(t.shape, dtype=dt)
            out[t.name] = x
        else:
            out[t.name] = a
    return out, {"fill_seconds": time.perf_counter() - t0, "verified": verify}


# ---------------------------------------------------------------- the entry point

def _pick(ordinal: Optional[int], memsvc: Any) -> str:
    if ordinal is None:
        return "host"
    if memsvc is not None:
        return "memfd"
    kv = _kvikio()
    if kv is not None and not _kvikio_compat(kv):
        return "kvikio"     # real GDS: storage -> GPU without a host bounce
    ok, _why = gpu_available()
    if ok:
        return "pipeline"
    return "kvikio" if kv is not None else "pipeline"


def load(ref: Any, device: str = "cuda:0", into: Optional[Mapping[str, Any]] = None, path: str = "auto", *,
         store: Any = None, verify: bool = True, memsvc: Any = None) -> Loaded:
    """Load weight set ``ref`` (name, manifest path, store dir or WeightSet) onto ``device``.

    ``into`` maps tensor names to caller-provided device tensors to fill (checked for dtype, shape,
    contiguity and device); the others are allocated. ``path`` is auto, pipeline, memfd, kvikio or
    host; ``memsvc`` (socket path or ``memsvc.Client``) makes the memfd path take shards from the
    host memory service. ``verify`` checks every shard's digest (inline on pipeline, memfd and host;
    an extra pass through the page cache on kvikio). Tunables: ``loader.defaults``.
    """
    if path != "auto" and path not in PATHS:
        raise ValueError(f"unknown path {path!r}: choose auto or one of {', '.join(PATHS)}")
    ws = open_set(ref, store)
    ordinal = _parse_device(device)
    chosen = _pick(ordinal, memsvc) if path == "auto" else path
    result = Loaded()
    result.details = {}
    result.device = "cpu" if ordinal is None else f"cuda:{ordinal}"
    result.nbytes = ws.nbytes
    t0 = time.perf_counter()
    if chosen == "host":
        if ordinal is not None:
            raise PathUnavailable("path 'host' loads into host memory: use device='cpu'")
        if into:
            raise PathUnavailable("into= needs a GPU path")
        tensors, details = _load_host(ws, verify)
    else:
        if ordinal is None:
            raise PathUnavailable(f"path {chosen!r} loads into GPU memory: use device='cuda:N'")
        if chosen == "kvikio" and _kvikio() is None:
            raise PathUnavailable("path 'kvikio' cannot run: kvikio not installed (pip install dynsnap-core[gpu])")
        tensors, ptrs = _destinations(ws, ordinal, into)
        try:
            if chosen == "pipeline":
                details = _load_pipeline(ws, ordinal, ptrs, verify)
            elif chosen == "memfd":
                details = _load_memfd(ws, ordinal, ptrs, verify, memsvc)
            else:
                details = _load_kvikio(ws, ptrs, verify)
        except BaseException:
            _free(tensors, into)   # never hand out a partially filled tensor
            raise
    result.update(tensors)
    result.seconds = time.perf_counter() - t0
    result.path = chosen
    result.details = details
    return result
