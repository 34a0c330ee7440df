"""A memory-service client under test: attaches a region at a reserved address, serves control requests.

Control socket (SOCK_STREAM, one request per connection, JSON reply): ``info`` (address, sizes, sha256 read
through a ctypes array made at attach time, whether /proc/self/maps shows the memfd, open memfd fds),
``detach`` (quiesce: unmap to a PROT_NONE reservation, close the service connection), ``attach``
(resume: re-attach at the same address), ``exit``.
"""
from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import os
import socket
import sys

from dynsnap_core import memsvc


def memfd_state(name: str) -> dict:
    with open("/proc/self/maps") as f:
        mapped = any(f"/memfd:{name}" in line for line in f)
    fds = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:"):
                fds += 1
        except OSError:
            pass
    return {"mapped": mapped, "memfd_fds": fds}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--service", required=True)
    ap.add_argument("--region", required=True)
    ap.add_argument("--sock", required=True)
    ap.add_argument("--ready", required=True)
    a = ap.parse_args()
    client = memsvc.Client(a.service)
    att = memsvc.Attachment.attach(client, a.region)
    # a raw pointer into the region, made once: it must stay valid across detach/checkpoint/restore/attach
    arr = (ctypes.c_char * att.size).from_address(att.address)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(a.sock)
    srv.listen(8)
    with open(a.ready, "w") as f:
        f.write(str(os.getpid()))
    while True:
        conn, _ = srv.accept()
        with conn:
            what = conn.recv(64).decode().strip()
            try:
                if what == "info":
                    reply = {"pid": os.getpid(), "address": att.address, "size": att.size, "digest": att.digest,
                             "attached": att.attached, **memfd_state(a.region)}
                    if att.attached:
                        reply["sha256"] = hashlib.sha256(memoryview(arr).cast("B")).hexdigest()
                elif what == "detach":
                    memsvc.quiesce([att], client)
                    reply = {"ok": True, **memfd_state(a.region)}
                elif what == "attach":
                    memsvc.resume([att], client, timeout=60)
                    reply = {"ok": True, "address": att.address}
                elif what == "exit":
                    conn.sendall(b'{"ok": true}')
                    return 0
                else:
                    reply = {"error": f"unknown {what!r}"}
            except Exception as e:  # noqa: BLE001 - reported to the test
                reply = {"error": f"{type(e).__name__}: {e}"}
            conn.sendall(json.dumps(reply).encode())


if __name__ == "__main__":
    sys.exit(main())
