"""``dynsnap gms``: serve, status, evict (added to the main parser by ``add_parser``)."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

__all__ = ["add_parser", "run"]


def _size(text: str) -> int:
    """A byte count: 123, 64K, 512M, 80G, 1T (binary units)."""
    t = text.strip().upper().rstrip("B").rstrip("I")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(t[-1:], 1)
    try:
        n = int(float(t[:-1] if mult > 1 else t) * mult)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a byte count (e.g. 80G)") from None
    if n <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive byte count")
    return n


def add_parser(sub: Any) -> None:
    s = sub.add_parser("gms", help="GPU memory service: own weight sets in GPU memory and hand them to workers")
    g = s.add_subparsers(dest="gms_cmd", metavar="ACTION")
    g.required = True
    p = g.add_parser("serve", help="serve one GPU on a Unix socket (runs until SIGTERM)")
    p.add_argument("--socket", help="socket path (default $DYNSNAP_GMS_SOCKET or /run/dynsnap/gms.sock)")
    p.add_argument("--device", type=int, default=0, help="CUDA device ordinal (default 0)")
    p.add_argument("--store", help="weight store the set names refer to (default: the dynsnap weight store)")
    p.add_argument("--allow", action="append", metavar="DIR",
                   help="a directory holding weight sets the service may load by path (repeatable)")
    p.add_argument("--max-bytes", type=_size, help="budget of resident weight bytes (e.g. 80G); least recently "
                                                   "used unheld sets are freed to stay under it")
    p.add_argument("--memsvc", metavar="SOCKET", help="take the shards from this host memory service (memfd path) "
                                                      "instead of reading the store")
    p = g.add_parser("status", help="resident sets, holders, bytes, layout hashes, free GPU memory")
    p.add_argument("--socket")
    p.add_argument("--json", action="store_true")
    p = g.add_parser("evict", help="free a weight set no worker holds")
    p.add_argument("set", help="set name or path as workers named it")
    p.add_argument("--socket")
    p.add_argument("--json", action="store_true")
    s.set_defaults(fn=run)


def run(a: Any) -> int:
    from . import service
    from .policy import human_bytes as hb
    if a.gms_cmd == "serve":
        return service.serve_main(a)
    if a.gms_cmd == "status":
        st = service.status_main(a)
        if a.json:
            print(json.dumps(st, indent=2, sort_keys=True))
            return 0
        gpu = st["gpu"]
        free = f"{hb(gpu['free'])} free of {hb(gpu['total'])}" if gpu.get("free") is not None else gpu.get("error")
        print(f"service pid {st['service']['pid']} on cuda:{gpu['device']} ({free}); "
              f"{hb(st['resident_bytes'])} resident")
        for x in st["sets"]:
            print(f"  {x['name']:<32} {x['state']:<9} {hb(x['bytes']):>10}  holders {x['holders'] or '-'}  "
                  f"{x['layout_hash'] or ''}" + (f"  {x['error']}" if x.get("error") else ""))
        return 0
    r = service.evict_main(a)
    if a.json:
        print(json.dumps(r, indent=2, sort_keys=True))
    else:
        print(f"freed {hb(r['freed_bytes'])}", file=sys.stderr)
    return 0
