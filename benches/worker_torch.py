"""A torch GPU worker for dynsnap's GPU tests and benches: N GB of random data on the GPU, a small matmul loop,
and a line protocol on a Unix socket. Checks itself: every answer is computed from GPU state.

    python3 worker_torch.py --gb 2 --sock @name --ready /tmp/ready [--seed 1234]

``--sock @name`` is an abstract socket (nothing on disk, which keeps CRIU's job simple); a path works too.
Requests, one line each, one line back:
  ping            -> pong
  pid             -> the worker's pid
  hash            -> sha256 of the GPU data, copied to the host
  sum             -> a fast checksum computed on the GPU (int64 sum of the data viewed as int32)
  matmul          -> sha256 of a deterministic fp32 matmul, computed now
  count           -> iterations of the background matmul loop so far
  sleep MS        -> launches a kernel that keeps the GPU busy about MS milliseconds, answers at once
  bytes           -> bytes of GPU data held
  quit            -> exits
The ready file is written (with the pid) once the data is on the GPU and every answer has been computed once.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import socket
import sys
import threading
import time


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gb", type=float, default=1.0)
    ap.add_argument("--sock", required=True)
    ap.add_argument("--ready", required=True)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--loop-ms", type=float, default=20.0, help="pause between background matmuls")
    args = ap.parse_args()

    import torch

    dev = torch.device("cuda:0")
    nbytes = int(args.gb * (1 << 30)) // 4 * 4
    gen = torch.Generator(device=dev)
    gen.manual_seed(args.seed)
    # random int32 over the full range, filled in chunks on the GPU (no host copy, no big temporaries)
    data = torch.empty(nbytes // 4, dtype=torch.int32, device=dev)
    chunk = 1 << 26
    for off in range(0, data.numel(), chunk):
        n = min(chunk, data.numel() - off)
        data[off:off + n] = torch.randint(-(2 ** 31), 2 ** 31 - 1, (n,), generator=gen, device=dev,
                                          dtype=torch.int32)
    g2 = torch.Generator(device=dev)
    g2.manual_seed(args.seed + 1)
    a = torch.randn(1024, 1024, generator=g2, device=dev)
    b = torch.randn(1024, 1024, generator=g2, device=dev)
    torch.cuda.synchronize()

    state = {"count": 0, "stop": False}
    lock = threading.Lock()   # one CUDA user at a time keeps results deterministic

    def loop() -> None:
        x = torch.randn(512, 512, device=dev)
        while not state["stop"]:
            with lock:
                y = x @ x
                y = y / (y.norm() + 1.0)
                torch.cuda.synchronize()
                x = y + 0.5
            state["count"] += 1
            time.sleep(args.loop_ms / 1000.0)

    def answer(line: str) -> str:
        cmd, _, arg = line.strip().partition(" ")
        if cmd == "ping":
            return "pong"
        if cmd == "pid":
            return str(os.getpid())
        if cmd == "count":
            return str(state["count"])
        if cmd == "bytes":
            return str(data.numel() * 4)
        if cmd == "hash":
            h = hashlib.sha256()
            step = 1 << 28  # 1 GiB of int32 per copy
            for off in range(0, data.numel(), step):
                with lock:
                    host = data[off:off + step].cpu()
                h.update(host.numpy().tobytes())
            return h.hexdigest()
        if cmd == "sum":
            total = 0
            step = 1 << 28
            for off in range(0, data.numel(), step):
                with lock:
                    total += int(data[off:off + step].to(torch.int64).sum().item())
            return str(total)
        if cmd == "matmul":
            with lock:
                c = (a @ b).cpu()
            return hashlib.sha256(c.numpy().tobytes()).hexdigest()
        if cmd == "sleep":
            ms = float(arg or "1000")
            if hasattr(torch.cuda, "_sleep"):
                torch.cuda._sleep(int(ms * 2_000_000))   # spin cycles; ~2 GHz SM clock (H200 boost 1.98 GHz)
            else:
                big = torch.randn(8192, 8192, device=dev)
                for _ in range(max(1, int(ms / 2))):      # ~2 ms per 8k fp32 matmul on an H200
                    big = big @ big
                    big = big / big.norm()
            return "ok"
        if cmd == "quit":
            state["stop"] = True
            return "bye"
        return f"error unknown command {cmd!r}"

    # warm every path once so nothing lazy happens across a checkpoint
    for cmd in ("matmul", "sum"):
        answer(cmd)
    t = threading.Thread(target=loop, name="matmul-loop", daemon=True)
    t.start()

    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    addr = "\0" + args.sock[1:] if args.sock.startswith("@") else args.sock
    srv.bind(addr)
    srv.listen(16)

    tmp = args.ready + ".tmp"
    with open(tmp, "w") as f:
        f.write(str(os.getpid()))
    os.rename(tmp, args.ready)
    print(f"worker {os.getpid()}: {nbytes} bytes on {torch.cuda.get_device_name(dev)}, ready", flush=True)

    while not state["stop"]:
        try:
            conn, _ = srv.accept()
        except InterruptedError:
            continue
        with conn:
            buf = b""
            while not buf.endswith(b"\n"):
                part = conn.recv(4096)
                if not part:
                    break
                buf += part
            try:
                reply = answer(buf.decode(errors="replace"))
            except Exception as exc:  # noqa: BLE001 - report, keep serving
                reply = f"error {type(exc).__name__}: {exc}"
            try:
                conn.sendall(reply.encode() + b"\n")
            except OSError:
                pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
