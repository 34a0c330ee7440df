"""A workload that proves every page of its memory: N MiB of random bytes and a CRC-32 of each 4 KiB page.

Usage: pagecheck.py --sock PATH --ready FILE --mb N. One request per connection, JSON reply:
- ``check SEED``: every page, in an order shuffled by SEED (so that a lazy restore's faults come in no order the
  background fill follows), against its CRC-32 -> {"pages", "bad", "first_bad"};
- ``write SEED K``: K pages picked by SEED get 8 new bytes each (their CRCs follow) -> {"ok"};
- ``sha``: SHA-256 of the whole memory -> {"sha256"};
- ``ping``: a light answer that touches a few pages -> {"pid", "first"} (the first 8 bytes, hex).
A page served wrong (zeros, stale or another page's bytes) shows as a bad CRC.
"""
import argparse
import hashlib
import json
import os
import random
import socket
import zlib

PAGE = 4096

ap = argparse.ArgumentParser()
ap.add_argument("--sock", required=True)
ap.add_argument("--ready", required=True)
ap.add_argument("--mb", type=int, required=True)
a = ap.parse_args()

mem = bytearray(os.urandom(a.mb << 20))
view = memoryview(mem)
npages = len(mem) // PAGE
crcs = [zlib.crc32(view[i * PAGE:(i + 1) * PAGE]) for i in range(npages)]


def check(seed: int) -> dict:
    order = list(range(npages))
    random.Random(seed).shuffle(order)
    bad = [i for i in order if zlib.crc32(view[i * PAGE:(i + 1) * PAGE]) != crcs[i]]
    return {"pages": npages, "bad": len(bad), "first_bad": bad[:5]}


def write(seed: int, k: int) -> dict:
    rng = random.Random(seed)
    for i in rng.sample(range(npages), min(k, npages)):
        off = i * PAGE + rng.randrange(PAGE - 8)
        mem[off:off + 8] = rng.randbytes(8)
        crcs[i] = zlib.crc32(view[i * PAGE:(i + 1) * PAGE])
    return {"ok": True}


srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
srv.bind(a.sock)
srv.listen(8)
with open(a.ready, "w") as f:
    f.write(str(os.getpid()))
while True:
    conn, _ = srv.accept()
    with conn:
        words = conn.recv(256).decode().split()
        if words[:1] == ["check"]:
            reply = check(int(words[1]))
        elif words[:1] == ["write"]:
            reply = write(int(words[1]), int(words[2]))
        elif words[:1] == ["ping"]:
            reply = {"pid": os.getpid(), "first": mem[:8].hex()}
        elif words[:1] == ["sha"]:
            reply = {"sha256": hashlib.sha256(view).hexdigest()}
        else:
            reply = {"error": f"unknown request {words!r}"}
        conn.sendall(json.dumps(reply).encode())
