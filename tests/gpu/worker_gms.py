"""A torch worker on the GPU memory service, for tests/gpu/test_gpu_gms.py.

Maps weight set ``--set`` from the service at ``--gms`` (read-only views), allocates a KV pool of ``--kv-mb``
in a PrivateRegion, starts the dynsnap agent (quiesce releases both, resume maps them back), then answers one
JSON request per line on the abstract socket ``--sock``:

    {"op": "ping"} -> {"pid"}
    {"op": "hash"} -> {"sha256"}  of every tensor's bytes, in name order
    {"op": "matmul"} -> {"sha256", "sum"}  of w @ x for the first 2-D tensor (x seeded)
    {"op": "ptrs"} -> {"tensors": {name: data_ptr}, "kv": va, "weights_va": va, "read_only": bool}
    {"op": "kv_write"} / {"op": "kv_check"} -> a pattern written / checked over the whole KV pool
"""
from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import os
import socket
import sys
import time


def _host_bytes(t) -> bytes:
    """The bytes of a 1-D uint8 tensor (copied to the host; no numpy needed)."""
    c = t.contiguous().cpu()
    return ctypes.string_at(c.data_ptr(), c.numel()) if c.numel() else b""


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sock", required=True)
    ap.add_argument("--ready", required=True)
    ap.add_argument("--gms", required=True)
    ap.add_argument("--set", required=True)
    ap.add_argument("--kv-mb", type=int, default=256)
    a = ap.parse_args()
    import torch
    from dynsnap_core.gms import agent, regions
    torch.cuda.init()
    t0 = time.perf_counter()
    wr = regions.map_weights(a.gms, a.set, device=0)
    tensors = wr.tensors()
    t_map = time.perf_counter() - t0
    kv = regions.PrivateRegion(a.kv_mb << 20, 0)
    kv_t = kv.tensor()
    agent.register(quiesce=lambda: (torch.cuda.synchronize(), torch.cuda.empty_cache()))
    name = agent.start()
    first2d = next(n for n in sorted(tensors) if tensors[n].dim() == 2 and tensors[n].dtype.is_floating_point)
    g = torch.Generator(device="cuda:0").manual_seed(7)
    w = tensors[first2d]
    x = torch.randn(min(w.shape[1], 4096), 64, device="cuda:0", dtype=w.dtype, generator=g)

    def hash_all() -> str:
        h = hashlib.sha256()
        for n in sorted(tensors):
            t = tensors[n]
            if t.numel():
                flat = t.reshape(-1).view(torch.uint8)
                for i in range(0, flat.numel(), 256 << 20):
                    h.update(_host_bytes(flat[i:i + (256 << 20)]))
        return h.hexdigest()

    def matmul() -> dict:
        y = (w[:4096, :x.shape[0]] @ x).float()
        return {"sha256": hashlib.sha256(_host_bytes(y.reshape(-1).view(torch.uint8))).hexdigest(), "sum": float(y.sum())}

    def pattern() -> torch.Tensor:
        return (torch.arange(kv_t.numel(), device="cuda:0", dtype=torch.int64) * 2654435761 % 251).to(torch.uint8)

    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind("\0" + a.sock)
    srv.listen(8)
    with open(a.ready + ".tmp", "w") as f:
        json.dump({"pid": os.getpid(), "agent": name, "map_s": t_map, "read_only": wr.read_only,
                   "layout_hash": wr.layout_hash}, f)
    os.replace(a.ready + ".tmp", a.ready)
    while True:
        conn, _ = srv.accept()
        with conn, conn.makefile("rwb") as fh:
            for line in fh:
                try:
                    op = json.loads(line)["op"]
                    if op == "ping":
                        rep = {"ok": True, "pid": os.getpid()}
                    elif op == "hash":
                        rep = {"ok": True, "sha256": hash_all()}
                    elif op == "matmul":
                        rep = {"ok": True, **matmul()}
                    elif op == "ptrs":
                        rep = {"ok": True, "tensors": {n: int(t.data_ptr()) for n, t in tensors.items()},
                               "kv": kv.va, "weights_va": wr.va, "read_only": wr.read_only}
                    elif op == "kv_write":
                        kv_t.copy_(pattern())
                        torch.cuda.synchronize()
                        rep = {"ok": True}
                    elif op == "kv_check":
                        rep = {"ok": True, "same": bool(torch.equal(kv_t, pattern()))}
                    else:
                        rep = {"ok": False, "error": f"unknown op {op!r}"}
                except Exception as e:  # noqa: BLE001 - answered, never fatal
                    rep = {"ok": False, "error": f"{type(e).__name__}: {e}"}
                fh.write((json.dumps(rep) + "\n").encode())
                fh.flush()


if __name__ == "__main__":
    sys.exit(main())
