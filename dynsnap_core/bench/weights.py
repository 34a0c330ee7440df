"""Weight loading benchmark on a GPU: dynsnap's paths vs safetensors, torch.load(mmap) and kvikio, with the limits.

For each size (GB of bf16 weights; 1.2 ~ Qwen3-0.6B shapes, 16 ~ Qwen3-8B shapes, other sizes scale
the layer count) one run generates random weights on the GPU, stores them in a weight store under
``--dir`` (default /var/tmp), and measures with the page cache warm and cold (drop_caches, root):
dynsnap ``pipeline`` and ``memfd`` (and ``kvikio`` tuned, when installed), safetensors
``load_file(device="cuda")``, ``torch.load(mmap=True)`` then ``.cuda()``, kvikio with its defaults
(when installed); plus the physical limits measured in the same run: pinned host->device copy, O_DIRECT disk
read, and page cache -> pinned memory with as many threads as the pipeline uses (the pipeline's own reader
with nothing copied to the GPU). The warm limit is min(page cache -> pinned, pinned H2D), the cold one
min(disk, pinned H2D). For the largest size, the pipeline is also run warm with fewer threads and without
verification, which shows where its time goes. Every loaded set is spot-checked bit-exact against the source
tensors.
Everything it writes is removed at the end. ``python3 -m dynsnap_core.cli bench weights --json``.
"""
from __future__ import annotations

import datetime as _dt
import gc
import os
import platform
import shutil
import time
from typing import Any, Callable, Optional, Sequence

from .util import cpu_time, drop_caches, md_row, md_table, text_row, warm
from ..errors import DynsnapError

__all__ = ["run", "format_table", "format_markdown", "targets", "model_shapes"]

_GB = 1e9


def model_shapes(size_gb: float) -> list[tuple[str, tuple[int, ...]]]:
    """Tensor names and shapes of a Qwen3-like model whose bf16 weights take about ``size_gb`` GB."""
    if size_gb <= 4:   # Qwen3-0.6B: hidden 1024, 28 layers, MLP 3072, 16 q / 8 kv heads of 128, tied embeddings
        h, layers, mlp, q, kv, vocab, tied, ref = 1024, 28, 3072, 2048, 1024, 151936, True, 1.19
    else:              # Qwen3-8B: hidden 4096, 36 layers, MLP 12288, 32 q / 8 kv heads of 128
        h, layers, mlp, q, kv, vocab, tied, ref = 4096, 36, 12288, 4096, 1024, 151936, False, 16.4
    layers = max(1, round(layers * size_gb / ref))
    out = [("model.embed_tokens.weight", (vocab, h))]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (h,)), (p + "self_attn.q_proj.weight", (q, h)),
                (p + "self_attn.k_proj.weight", (kv, h)), (p + "self_attn.v_proj.weight", (kv, h)),
                (p + "self_attn.o_proj.weight", (h, q)), (p + "self_attn.q_norm.weight", (128,)),
                (p + "self_attn.k_norm.weight", (128,)), (p + "post_attention_layernorm.weight", (h,)),
                (p + "mlp.gate_proj.weight", (mlp, h)), (p + "mlp.up_proj.weight", (mlp, h)),
                (p + "mlp.down_proj.weight", (h, mlp))]
    out.append(("model.norm.weight", (h,)))
    if not tied:
        out.append(("lm_head.weight", (vocab, h)))
    return out


def _timed(fn: Callable[[], Any], torch: Any) -> tuple[float, float, Any]:
    torch.cuda.synchronize()
    c0, t0 = cpu_time(), time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0, cpu_time() - c0, out


def _h2d_limit(torch: Any, nbytes: int = 1 << 30) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    best = 0.0
    for _ in range(4):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        best = max(best, nbytes / (time.perf_counter() - t0) / _GB)
    del src, dst
    return best


def _disk_limit(paths: Sequence[str], cap: int = 4 << 30) -> Optional[float]:
    """O_DIRECT read bandwidth over (up to ``cap`` bytes of) the shards, page cache dropped first."""
    from .. import io as dio
    if not drop_caches():
        return None
    total, t0 = 0, time.perf_counter()
    for p in sorted(paths, key=os.path.getsize, reverse=True):
        total += dio.hash_file(p, direct=True).size
        if total >= cap:
            break
    return total / (time.perf_counter() - t0) / _GB


def _pagecache_limit(paths: Sequence[str], threads: int) -> float:
    """Page cache -> pinned memory with ``threads`` readers, best of three (warmed first): the storage side of
    the warm limit, measured with the pipeline's own reader and ring, nothing copied to the GPU."""
    from .. import io as dio
    from ..weights import loader as weights_load
    for p in paths:                                    # warm
        dio.hash_file(p, direct=False)
    best = 0.0
    for _ in range(3):
        r = weights_load.read_to_pinned(list(paths), threads=threads)
        best = max(best, r["bytes"] / r["seconds"] / _GB)
    return best


def _check(loaded: Any, src: dict, torch: Any, names: Sequence[str]) -> bool:
    for n in names:
        a, b = loaded[n], src[n]
        if a.dtype != b.dtype or tuple(a.shape) != tuple(b.shape) or not torch.equal(a.to(b.device), b):
            return False
    return True


def run(sizes: Sequence[float] = (1.2, 16), dir: str = "/var/tmp", cold: bool = True,
        progress: Optional[Callable[[str], None]] = None) -> dict:
    """Run the benchmark; returns a JSON-able dict with machine, limits and one row per measurement."""
    from .. import weights
    from ..weights import loader as weights_load
    say = progress or (lambda s: None)
    ok, why = weights_load.gpu_available()
    if not ok:
        raise DynsnapError(f"the weights benchmark needs a GPU: {why}", stage="bench")
    try:
        import torch
    except ImportError:
        raise DynsnapError("the weights benchmark needs torch (for the baselines)", stage="bench") from None
    if not torch.cuda.is_available():
        raise DynsnapError("the weights benchmark needs a GPU: torch sees no CUDA device", stage="bench")
    try:
        import safetensors.torch as st
    except ImportError:
        st = None
    kvikio = weights_load._kvikio()
    work = os.path.join(dir, f"dynsnap-bench-weights-{os.getpid()}")
    os.makedirs(work)
    res: dict = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                 "machine": {"host": platform.node(), "kernel": platform.release(), "cpus": os.cpu_count(),
                             "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
                             "kvikio": getattr(kvikio, "__version__", None) if kvikio else "kvikio not installed",
                             "dir": dir},
                 "config": {"threads": weights_load.defaults.threads, "chunk": weights_load.defaults.chunk,
                            "nbuf": weights_load.defaults.nbuf},
                 "limits": {}, "rows": []}
    dev = torch.device("cuda:0")
    try:
        say("limit: pinned host->device copy")
        res["limits"]["h2d_pinned_gbps"] = _h2d_limit(torch)
        for size in sizes:
            shapes = model_shapes(float(size))
            say(f"{size} GB: generating {len(shapes)} random bf16 tensors on the GPU")
            g = torch.Generator(device=dev).manual_seed(1234)
            gpu_src = {n: torch.randn(s, dtype=torch.bfloat16, device=dev, generator=g) for n, s in shapes}
            host_src = {n: t.cpu() for n, t in gpu_src.items()}
            nbytes = sum(t.numel() * 2 for t in host_src.values())
            probe = [shapes[0][0], shapes[len(shapes) // 2][0], shapes[-1][0]]
            store = os.path.join(work, "store")
            say(f"{size} GB: saving {nbytes / _GB:.2f} GB to the weight store")
            t0 = time.perf_counter()
            ws = weights.save(host_src, f"bench-{size}", store=store)
            save_s = time.perf_counter() - t0
            shard_paths = [ws.shard_path(i) for i in range(len(ws.shards))]
            if size == max(sizes):                     # the largest set: the most bytes to measure over
                say(f"limit: page cache -> pinned memory, {weights_load.defaults.threads} threads")
                res["limits"]["pagecache_gbps"] = _pagecache_limit(shard_paths, weights_load.defaults.threads)
            if "disk_odirect_gbps" not in res["limits"] and cold:
                say("limit: O_DIRECT disk read")
                res["limits"]["disk_odirect_gbps"] = _disk_limit(shard_paths)

            def row(method: str, cache: str, secs: float, cpu: float, good: Optional[bool], **extra: Any) -> None:
                r = {"size_gb": size, "bytes": nbytes, "tensors": len(shapes), "method": method, "cache": cache,
                     "seconds": secs, "cpu_seconds": cpu, "gbps": nbytes / secs / _GB, "bit_exact": good, **extra}
                res["rows"].append(r)
                say(f"{size} GB {cache:<4} {method:<28} {secs:7.2f} s {r['gbps']:6.2f} GB/s"
                    + ("" if good is not False else "  MISMATCH"))

            def measure(method: str, fn: Callable[[], Any], files: Sequence[str], *, warm_only: bool = False,
                        **extra: Any) -> None:
                for cache in (["cold"] if cold and not warm_only else []) + ["warm"]:
                    if cache == "cold" and not drop_caches():
                        continue
                    if cache == "warm":
                        warm(files)
                    try:
                        secs, cpu, out = _timed(fn, torch)
                    except Exception as e:  # noqa: BLE001 - one failing method must not end the run
                        res["rows"].append({"size_gb": size, "method": method, "cache": cache, "error": str(e)})
                        say(f"{size} GB {cache} {method}: FAILED: {e}")
                        continue
                    info = dict(extra)
                    if isinstance(out, weights_load.Loaded):
                        info["details"] = out.details
                    row(method, cache, secs, cpu, _check(out, gpu_src, torch, probe), **info)
                    del out
                    gc.collect()
                    torch.cuda.empty_cache()

            measure("dynsnap pipeline", lambda: weights.load(ws, device="cuda:0", path="pipeline"), shard_paths)
            if size == max(sizes):
                # where the warm pipeline's time goes: without verification, with fewer threads
                measure("pipeline, no verify", lambda: weights.load(ws, device="cuda:0", path="pipeline",
                                                                     verify=False), shard_paths, warm_only=True,
                        sweep=True, verified=False)
                for n in sorted({max(1, weights_load.defaults.threads // 4),
                                 max(1, weights_load.defaults.threads // 2)} - {weights_load.defaults.threads}):
                    def at(n: int = n) -> Any:
                        with weights_load.defaults(threads=n):
                            return weights.load(ws, device="cuda:0", path="pipeline")
                    measure(f"pipeline, {n} threads", at, shard_paths, warm_only=True, sweep=True, threads=n)
            measure("dynsnap memfd (fill + copy)", lambda: weights.load(ws, device="cuda:0", path="memfd"), shard_paths)
            if kvikio is not None:
                measure("dynsnap kvikio (tuned)", lambda: weights.load(ws, device="cuda:0", path="kvikio",
                                                                        verify=False), shard_paths, verified=False)

                def kvikio_defaults() -> dict:
                    out = {}
                    for i in range(len(ws.shards)):
                        f = kvikio.CuFile(ws.shard_path(i), "r")
                        futs = []
                        for t in ws.tensors_in(i):
                            x = torch.empty(t.shape, dtype=torch.bfloat16, device=dev)
                            out[t.name] = x
                            futs.append(f.pread(x.view(torch.uint8) if x.dim() else x, t.nbytes, t.offset))
                        for fu in futs:
                            fu.get()
                        f.close()
                    return out
                measure("kvikio defaults", kvikio_defaults, shard_paths)
            if st is not None:
                sf = os.path.join(work, "model.safetensors")
                say(f"{size} GB: writing the safetensors baseline file")
                st.save_file(host_src, sf)
                measure("safetensors load_file(cuda)", lambda: st.load_file(sf, device="cuda:0"), [sf])
                os.unlink(sf)
            pt = os.path.join(work, "model.pt")
            say(f"{size} GB: writing the torch.save baseline file")
            torch.save(host_src, pt)
            measure("torch.load(mmap) + .cuda()",
                    lambda: {k: v.to(dev) for k, v in torch.load(pt, mmap=True, weights_only=True).items()}, [pt])
            os.unlink(pt)
            res.setdefault("save", []).append({"size_gb": size, "seconds": save_s, "gbps": nbytes / save_s / _GB,
                                               "shards": len(ws.shards)})
            del gpu_src, host_src
            gc.collect()
            torch.cuda.empty_cache()
            shutil.rmtree(store, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _ratios(res)
    return res


def _ratios(res: dict) -> None:
    lim = res["limits"]
    h2d, disk, cache = lim.get("h2d_pinned_gbps"), lim.get("disk_odirect_gbps"), lim.get("pagecache_gbps")
    base = {(r["size_gb"], r["cache"]): r["gbps"] for r in res["rows"]
            if r.get("method") == "safetensors load_file(cuda)" and "gbps" in r}
    for r in res["rows"]:
        if "gbps" not in r:
            continue
        b = base.get((r["size_gb"], r["cache"]))
        r["x_safetensors"] = r["gbps"] / b if b else None
        storage = disk if r["cache"] == "cold" else cache     # warm: the page cache is the storage
        limit = min(x for x in (h2d, storage) if x) if h2d else None
        r["limit_gbps"] = limit
        r["pct_of_limit"] = 100 * r["gbps"] / limit if limit else None


# The plain-text table's columns: heading and format spec of each (the Markdown table has the same columns).
_TEXT_COLUMNS = (("size", ">6"), ("cache", "<5"), ("method", "<30"), ("s", ">7"), ("GB/s", ">7"), ("x sft", ">6"),
                 ("%limit", ">7"), ("cpu s", ">6"), ("ok", ""))
_TEXT_SPECS = [spec for _, spec in _TEXT_COLUMNS]


def _cells(r: dict, no: str, cut: int) -> list[str]:
    """A row's cells as printed: size, cache, method, then seconds, GB/s, ratio to safetensors, share of the limit,
    CPU seconds and bit-exactness (``no`` when it is not); a failed run has its error instead, cut to ``cut``."""
    head = [str(r["size_gb"]), r["cache"], r["method"]]
    if "error" in r:
        return head + [f"FAILED: {r['error'][:cut]}"]
    x = f"{r['x_safetensors']:.2f}" if r.get("x_safetensors") else "-"
    p = f"{r['pct_of_limit']:.0f}%" if r.get("pct_of_limit") else "-"
    return head + [f"{r['seconds']:.2f}", f"{r['gbps']:.2f}", x, p, f"{r['cpu_seconds']:.1f}",
                   {True: "yes", False: no, None: "-"}[r["bit_exact"]]]


def format_table(res: dict) -> str:
    lim = res["limits"]
    lines = [f"machine: {res['machine']}", f"config: {res['config']}",
             "limits: pinned H2D {:.1f} GB/s, disk O_DIRECT read {}, page cache -> pinned ({} threads) {}".format(
                 lim.get("h2d_pinned_gbps", 0), f"{lim['disk_odirect_gbps']:.2f} GB/s"
                 if lim.get("disk_odirect_gbps") else "not measured (needs root for drop_caches)",
                 res["config"]["threads"],
                 f"{lim['pagecache_gbps']:.2f} GB/s" if lim.get("pagecache_gbps") else "not measured"),
             "== table ==",
             text_row([head for head, _ in _TEXT_COLUMNS], _TEXT_SPECS)]
    lines += [text_row(_cells(r, "NO", 80), _TEXT_SPECS) for r in res["rows"]]
    for s in res.get("save", []):
        lines.append(f"save {s['size_gb']} GB into the store: {s['seconds']:.1f} s ({s['gbps']:.2f} GB/s, "
                     f"{s['shards']} shards)")
    return "\n".join(lines)


def targets(res: dict) -> list[tuple[str, bool, str]]:
    """The targets of the warm path for the largest set: (what, met, measured)."""
    out: list[tuple[str, bool, str]] = []
    rows = [r for r in res["rows"] if "gbps" in r and not r.get("sweep")]
    if not rows:
        return out
    big = max(r["size_gb"] for r in rows)
    warm = {r["method"]: r for r in rows if r["size_gb"] == big and r["cache"] == "warm"}
    p = warm.get("dynsnap pipeline")
    if p and p.get("x_safetensors"):
        out.append((f"{big} GB warm pipeline >= 4x safetensors", p["x_safetensors"] >= 4,
                    f"{p['gbps']:.2f} GB/s = {p['x_safetensors']:.2f}x"))
    if p and p.get("pct_of_limit"):
        out.append((f"{big} GB warm pipeline >= 90% of min(page cache -> pinned, H2D)", p["pct_of_limit"] >= 90,
                    f"{p['pct_of_limit']:.0f}% of {p['limit_gbps']:.2f} GB/s"))
    for size in sorted({r["size_gb"] for r in rows}):
        for cache in ("cold", "warm"):
            got = {r["method"]: r for r in rows if r["size_gb"] == size and r["cache"] == cache}
            t, d = got.get("dynsnap kvikio (tuned)"), got.get("kvikio defaults")
            if t and d:
                out.append((f"{size} GB {cache} kvikio tuned >= kvikio defaults", t["gbps"] >= d["gbps"],
                            f"{t['gbps']:.2f} vs {d['gbps']:.2f} GB/s"))
    return out


def format_markdown(res: dict) -> str:
    """The run as Markdown for benches/RESULTS.md: machine, limits, one row per measurement, the targets."""
    lim, m = res["limits"], res["machine"]
    lines = [f"`bench weights` {res['date']}: {m.get('gpu')}, {m.get('cpus')} CPUs, kernel {m.get('kernel')}, "
             f"torch {m.get('torch')}, kvikio {m.get('kvikio')}; pipeline {res['config']['threads']} threads, "
             f"{res['config']['chunk'] >> 20} MiB chunks, {res['config']['nbuf']} buffers each.",
             "",
             "Limits measured in the same run: pinned H2D {:.1f} GB/s; page cache -> pinned ({} threads) {}; disk "
             "O_DIRECT read {}.".format(
                 lim.get("h2d_pinned_gbps", 0), res["config"]["threads"],
                 f"{lim['pagecache_gbps']:.2f} GB/s" if lim.get("pagecache_gbps") else "not measured",
                 f"{lim['disk_odirect_gbps']:.2f} GB/s" if lim.get("disk_odirect_gbps") else "not measured"),
             ""]
    lines += md_table(("size GB", "cache", "method", "s", "GB/s", "x safetensors", "% of limit", "CPU s", "bit-exact"))
    # a failed run's row leaves the measured cells empty
    lines += [md_row(_cells(r, "**NO**", 100)) + (" | | | | |" if "error" in r else "") for r in res["rows"]]
    t = targets(res)
    if t:
        lines += [""] + md_table(("target", "met", "measured"), ((what, "yes" if met else "**no**", got)
                                                                 for what, met, got in t))
    return "\n".join(lines)
