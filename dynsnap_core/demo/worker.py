"""The demo's sample worker: warms up by computing a few hundred MB of state, then answers requests on a Unix socket.

Protocol: one line per connection, one line back. ``query K`` -> a digest that depends on the whole state and K;
``stats`` -> JSON with the number of requests served and the state size; ``ping`` -> ``pong``.
Run: ``python -m dynsnap_core.demo.worker --socket PATH --mb 256 [--ready FILE]``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import sys
import time

CHUNK = 4 << 20


def warm_up(mb: int, seed: bytes = b"dynsnap-demo", rounds: int = 1) -> tuple[list[bytes], dict[int, int]]:
    """Build ``mb`` MiB of state by computation (SHAKE-256 streams chained layer by layer) and an index.

    ``rounds`` > 1 refines every layer that many times over its whole content, the way a real worker spends
    its warm-up compiling and autotuning on top of loading: more work, same state size.
    """
    layers: list[bytes] = []
    prev = seed
    for i in range((mb << 20) // CHUNK):
        block = hashlib.shake_256(prev + i.to_bytes(8, "little")).digest(CHUNK)
        for _ in range(rounds - 1):
            block = hashlib.shake_256(block).digest(CHUNK)
        layers.append(block)
        prev = block[-64:]
    # An index over the state, like a tokenizer vocabulary or a prefix table: many small Python objects.
    index = {int.from_bytes(layers[j % len(layers)][k:k + 8], "little"): j * 1000 + k
             for j in range(len(layers)) for k in range(0, 64 * 2048, 64)} if layers else {}
    return layers, index


def answer(layers: list[bytes], index: dict[int, int], k: int) -> str:
    h = hashlib.blake2b(digest_size=16)
    for j in range(len(layers)):
        h.update(layers[(j * 7 + k) % len(layers)][k % 4096:(k % 4096) + 256])
    h.update(str(len(index)).encode())
    return h.hexdigest()


def to_region(service: str, layers: list[bytes]) -> tuple[list, object, object]:
    """Move the state into a memory-service region (mapped at a fixed address); layers become views into it."""
    from .. import memsvc
    client = memsvc.Client(service)
    size = sum(map(len, layers))

    def fill(v: memoryview) -> None:
        off = 0
        for block in layers:
            v[off:off + len(block)] = block
            off += len(block)
    att = memsvc.Attachment.create(client, "demo-state", size, fill)
    whole = att.view()
    views = [whole[i * CHUNK:(i + 1) * CHUNK] for i in range(len(layers))]
    return views, client, att


def serve(path: str, layers: list, index: dict[int, int], ready: str | None, svc: tuple | None = None) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(16)
    if ready:
        with open(ready, "w") as f:
            f.write(str(os.getpid()))
    served = 0
    while True:
        conn, _ = srv.accept()
        with conn:
            line = recv_line(conn)
            words = line.decode(errors="replace").split()
            if not words:
                continue
            served += 1
            if words[0] == "query" and len(words) == 2 and words[1].isdigit():
                reply = answer(layers, index, int(words[1]))
            elif words[0] == "stats":
                reply = json.dumps({"served": served, "state_bytes": sum(map(len, layers)), "pid": os.getpid()})
            elif words[0] == "ping":
                reply = "pong"
            elif words[0] in ("detach", "attach") and svc is not None:
                from .. import memsvc        # quiesce / resume: the region leaves / re-enters the address space
                (memsvc.quiesce if words[0] == "detach" else memsvc.resume)([svc[1]], svc[0])
                reply = "ok"
            else:
                reply = "error: unknown request"
            conn.sendall(reply.encode() + b"\n")


def recv_line(sock: socket.socket, bufsize: int = 4096) -> bytes:
    """Bytes received up to and including a newline, or up to the peer closing (the line protocol, both sides)."""
    buf = b""
    while not buf.endswith(b"\n"):
        part = sock.recv(bufsize)
        if not part:
            break
        buf += part
    return buf


def request(path: str, line: str, timeout: float = 30.0, bufsize: int = 4096) -> str:
    """Send one request line to a worker and return its reply (client side, used by the demo and tests).

    ``path`` is a socket path, or an abstract socket name with a leading NUL."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(line.encode() + b"\n")
        buf = recv_line(s, bufsize)
    return buf.decode().strip()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--socket", required=True)
    ap.add_argument("--mb", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=1, help="refinement passes over the state at warm-up")
    ap.add_argument("--ready")
    ap.add_argument("--memsvc", help="memory service socket: keep the state in a service region")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    layers, index = warm_up(a.mb, rounds=a.rounds)
    print(f"warmed up {a.mb} MiB in {time.perf_counter() - t0:.2f} s", file=sys.stderr, flush=True)
    svc = None
    if a.memsvc:
        layers, client, att = to_region(a.memsvc, layers)
        svc = (client, att)
    serve(a.socket, layers, index, a.ready, svc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
