"""The `dynsnap` command: doctor, checkpoint, restore, check, push, agent, verify, inspect, list, demo, bench, cuda-checkpoint."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

from .. import config
from ..errors import DynsnapError, InvalidArgument
from .ui import Reporter, _human

PROG = "dynsnap"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2
        self.exit(2, f"{self.prog}: {message} (see --help)\n")


def _emit_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    sys.stdout.flush()


def _fmt_timings(t: dict) -> str:
    return ", ".join(f"{k} {v:.2f} s" for k, v in t.items() if isinstance(v, (int, float)))


def cmd_doctor(a) -> int:
    from . import doctor
    rows = doctor.run_checks()
    if a.json:
        _emit_json({"checks": doctor.as_json(rows), "ok": all(r.status != "missing" for r in rows)})
    else:
        print(doctor.format_table(rows))
    return 0


def cmd_run(a) -> int:
    from ..launch import launch
    cmd = a.argv[1:] if a.argv[:1] == ["--"] else a.argv
    pid = launch(cmd, log=a.log, cwd=a.cwd)
    if a.json:
        _emit_json({"pid": pid, "pid_namespace": True, "log": a.log})
    else:
        print(f"started {cmd[0]} in its own pid namespace; checkpoint it with: dynsnap checkpoint --pid {pid}")
    return 0


def cmd_checkpoint(a) -> int:
    from ..snapshot import checkpoint
    with Reporter(quiet=a.json) as rep:
        kw = dict(leave_running=a.leave_running, cuda_lock_timeout_ms=a.timeout_ms, progress=rep.update,
                  log=rep.say)
        if a.memsvc:
            from ..snapshot.regions import checkpoint_with_regions
            if not a.regions:
                raise DynsnapError("--memsvc needs --regions NAME[,NAME...]: the regions to keep outside the "
                                   "image", stage="preflight")
            snap = checkpoint_with_regions(a.pid, a.out, service=a.memsvc, regions=a.regions.split(","),
                                           store=a.weights_store, **kw)
        else:
            snap = checkpoint(a.pid, a.out, **kw)
    m = snap.manifest
    if a.json:
        _emit_json({"path": str(snap.path), "pid": m["root_pid"], "bytes": m["total_bytes"],
                    "files": len(m["files"]), "leave_running": a.leave_running, "timings": m["timings"],
                    "io_engine": m["io_engine"], "cuda": m.get("cuda")})
    else:
        print(f"snapshot {snap.path}: {_human(m['total_bytes'])} in {len(m['files'])} files "
              f"(pid {m['root_pid']} {'left running' if a.leave_running else 'stopped'}); "
              f"{_fmt_timings(m['timings'])}")
    return 0


def _parse_device_map(text: Optional[str]) -> Optional[dict]:
    """--device-map through the one parser (cuda.parse_device_map, shared with `dynsnap cuda`)."""
    if not text:
        return None
    from ..cuda import parse_device_map
    try:
        return parse_device_map(text)
    except ValueError as e:
        raise InvalidArgument(f"bad --device-map: {e}", stage="preflight") from None


def cmd_restore(a) -> int:
    from ..snapshot import restore
    with Reporter(quiet=a.json) as rep:
        kw = dict(verify=not a.no_verify, device_map=_parse_device_map(a.device_map), progress=rep.update)
        if a.thp:
            kw["thp"] = True
        if a.lazy is not None:
            kw["lazy"] = a.lazy
        if a.memsvc:
            from ..snapshot.regions import restore_with_regions
            r = restore_with_regions(a.dir, service=a.memsvc, store=a.weights_store, **kw)
        else:
            src = a.dir
            if str(src).startswith("s3://"):
                from ..storage import fetch
                src = fetch(src, progress=rep.update)
            r = restore(src, **kw)
        if r.fill is not None and a.wait_filled:
            r.wait_filled()
    filling = r.fill is not None and not r.fill.done()
    if a.json:
        _emit_json({"pid": r.pid, "snapshot": str(r.snapshot.path), "timings": r.timings, **r.timings,
                    "filling": filling})
    else:
        print(f"restored pid {r.pid} from {r.snapshot.path}; {_fmt_timings(r.timings)}"
              + ("; its memory is still being filled in the background (supervised: the tree is killed if "
                 "that fails)" if filling else ""))
    return 0


def cmd_check(a) -> int:
    from ..compat import check, format_text
    if a.snapshot.startswith("s3://"):
        from ..storage import remote_snapshot
        rep = check(remote_snapshot(a.snapshot), images=False)
    else:
        rep = check(a.snapshot)
    if a.json:
        _emit_json(rep.to_dict())
    else:
        print(format_text(rep))
    return 0 if rep.ok else 1


def cmd_agent(a) -> int:
    try:
        from ..agent import Agent, AgentConfig, probe, serve
    except ImportError as e:
        raise DynsnapError(f"the agent needs its extra: pip install 'dynsnap-core[agent]' ({e})",
                           stage="agent") from None
    if a.probe:
        return probe(a.socket)
    cfg = AgentConfig(storage=a.storage or config.get("storage"), workers=a.workers,
                      max_body=a.max_body)
    if a.root:
        cfg.root = Path(a.root)
    if a.cgroup_root:
        cfg.cgroup_root = Path(a.cgroup_root)
    if a.cache:
        cfg.cache = Path(a.cache)
    return serve(Agent(cfg), socket_path=a.socket, listen=a.listen, token_file=a.token_file, max_body=a.max_body,
                 log_level=a.log_level, drain=a.drain)


def cmd_push(a) -> int:
    from ..snapshot import open_snapshot
    from ..storage import open_remote
    snap = open_snapshot(a.snapshot)
    store = open_remote(a.url)
    with Reporter(quiet=a.json) as rep:
        res = store.upload(snap.path, a.name or snap.path.name, progress=rep.update)
    if a.json:
        _emit_json(res)
    else:
        print(f"uploaded {snap.path} to {res['url']} ({_human(res['bytes'])})")
    return 0


def cmd_verify(a) -> int:
    from ..snapshot import open_snapshot
    t0 = time.perf_counter()
    with Reporter(quiet=a.json) as rep:
        snap = open_snapshot(a.dir)
        n = snap.verify(progress=rep.update)
    dt = time.perf_counter() - t0
    if a.json:
        _emit_json({"path": str(snap.path), "ok": True, "files": len(snap.manifest["files"]), "bytes": n,
                    "seconds": dt})
    else:
        print(f"{snap.path}: ok, {len(snap.manifest['files'])} files, {_human(n)} verified in {dt:.2f} s")
    return 0


def cmd_inspect(a) -> int:
    from . import inspect as insp
    info = insp.inspect(a.path)
    if a.json:
        _emit_json(info)
    else:
        print(insp.format_text(info))
    return 0


def cmd_rm(a) -> int:
    from ..snapshot import remove
    for target in a.snapshots:
        p = remove(target, force=a.force)
        if not a.quiet:
            print(f"removed {p}")
    return 0


def cmd_list(a) -> int:
    from ..snapshot import list_snapshots, snapshots_root
    rows = list_snapshots(Path(a.root) if a.root else None)
    if a.json:
        _emit_json(rows)
        return 0
    if not rows:
        print(f"no snapshots under {Path(a.root) if a.root else snapshots_root()}")
        return 0
    print(f"{'NAME':<36} {'SIZE':>10} {'AGE':>8}  {'STATUS':<8} COMMAND")
    for r in rows:
        if r["status"] == "ok":
            age = r["age_s"]
            age_s = f"{age:.0f}s" if age < 120 else f"{age / 60:.0f}m" if age < 7200 else f"{age / 3600:.0f}h" \
                if age < 172800 else f"{age / 86400:.0f}d"
            short = " ".join(os.path.basename(x) if x.startswith("/") else x for x in r["command"].split())
            print(f"{r['name']:<36} {_human(r['bytes']):>10} {age_s:>8}  {'ok':<8} {short[:70]}")
        else:
            print(f"{r['name']:<36} {'-':>10} {'-':>8}  {'damaged':<8} {r['error'][:160]}")
    return 0


def cmd_demo(a) -> int:
    from ..demo import run as demo
    return demo.main(mb=a.mb, keep=a.keep, as_json=a.json, memsvc=a.memsvc, rounds=a.rounds)


def cmd_bench(a) -> int:
    """Each benchmark module has run(...) -> dict and format_table(dict) -> str; progress goes to stderr."""
    import importlib
    say = lambda s: print(s, file=sys.stderr, flush=True)   # noqa: E731 - stderr, so stdout stays JSON
    runs = {
        "io": lambda m: m.run(a.dir or os.getcwd(), size_mb=a.size_mb),
        "memfd": lambda m: m.run(a.dir or None, size_mb=a.size_mb, threads=a.threads, cold=not a.no_cold,
                                 progress=say),
        "weights": lambda m: m.run([float(x) for x in (a.sizes or "1.2,16").split(",") if x.strip()],
                                   dir=a.dir or "/var/tmp", cold=not a.no_cold, progress=say),
        "restore": lambda m: m.run(a.dir or None, size_mb=a.size_mb, progress=say),
        "e2e": lambda m: m.run(a.model, device=a.device, kv_gb=a.kv_gb, dir=a.dir or "/var/tmp", cold=not a.no_cold,
                               rows=[x for x in (a.rows or "").split(",") if x] or None, progress=say),
    }
    if a.what not in runs:
        raise DynsnapError(f"unknown benchmark {a.what!r}", stage="bench")
    module = importlib.import_module(f"dynsnap_core.bench.{a.what}")
    if getattr(a, "plot", None) and not hasattr(module, "plot"):
        raise DynsnapError(f"--plot is for bench e2e, not bench {a.what}", stage="bench")
    res = runs[a.what](module)
    if a.json:
        _emit_json(res)
    else:
        print(module.format_table(res))
    if getattr(a, "plot", None):
        say(f"plot: {module.plot(res, a.plot)}")
    return 0


def cmd_weights(a) -> int:
    from .. import weights
    if a.action == "import":
        ws = weights.import_safetensors(a.files, a.name, store=a.store)
        info = {**ws.to_dict(), **ws.meta.get("stats", {})}
        if a.json:
            _emit_json(info)
        else:
            print(f"weight set {ws.name}: {len(ws.tensors)} tensors, {_human(ws.nbytes)} in {len(ws.shards)} shards "
                  f"({info['shards_written']} written, {info['shards_deduplicated']} already stored) "
                  f"in {info['seconds']:.2f} s; store {ws.store.root}")
        return 0
    if a.action == "verify":
        rows = weights.verify(a.name, store=a.store, deep=a.deep)
        if a.json:
            _emit_json(rows)
        else:
            for r in rows:
                print(f"{r['name']}: ok, {r['shards']} shards, {_human(r['bytes'])} verified in {r['seconds']:.2f} s")
            if not rows:
                print("no weight sets")
        return 0
    rows = weights.list_sets(a.store)
    if a.json:
        _emit_json(rows)
    elif not rows:
        print(f"no weight sets in {weights.Store(a.store).root}")
    else:
        print(f"{'NAME':<32} {'TENSORS':>8} {'SHARDS':>7} {'SIZE':>10}  CREATED")
        for r in rows:
            print(f"{r['name']:<32} {r['tensors']:>8} {r['shards']:>7} {_human(r['nbytes']):>10}  {r.get('created', '')}")
    return 0


def cmd_memsvc(a) -> int:
    from ..memsvc.service import main
    return main(a.socket, threads=a.threads, quiet=a.quiet, allow=a.allow or (), group=a.group)


def _housekeeping() -> None:
    """What every command does first: continue trees that dead checkpoints left frozen (the journal), and remove
    staging that killed runs left in tmpfs. Quiet (a command's stderr stays its own one line), and never the reason
    a command fails."""
    from ..criu import has_checkpoint_privilege
    if not has_checkpoint_privilege():
        return
    try:
        from ..journal import recover
        from ..snapshot import clean_stale_staging
        recover()
        clean_stale_staging()
    except (OSError, DynsnapError):
        pass


def build_parser() -> argparse.ArgumentParser:
    from .._version import __version__
    p = _Parser(prog=PROG, description="Checkpoint a warmed-up (GPU) worker and restore it in seconds.")
    p.add_argument("--version", action="version", version=f"dynsnap {__version__}")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    s = sub.add_parser("doctor", help="check kernel, privileges, CRIU, I/O backends, CUDA, kvikio")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_doctor)

    s = sub.add_parser("run", help="start a worker in its own pid namespace and session, so that its snapshots "
                                   "restore on any node, with any pids in use, several times over")
    s.add_argument("--log", help="append the worker's stdout and stderr here (default: /dev/null)")
    s.add_argument("--cwd", help="working directory of the worker")
    s.add_argument("--json", action="store_true")
    s.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- CMD [ARG ...]")
    s.set_defaults(fn=cmd_run)

    s = sub.add_parser("checkpoint", help="snapshot the process tree rooted at PID")
    s.add_argument("--pid", type=int, required=True)
    s.add_argument("--out", help="snapshot directory (must not exist; default: under $DYNSNAP_HOME/snapshots)")
    s.add_argument("--leave-running", action="store_true", help="keep the process running afterwards")
    s.add_argument("--timeout-ms", type=int, default=10000, help="CUDA lock timeout (default 10000)")
    s.add_argument("--memsvc", metavar="SOCKET", help="host memory service holding regions kept outside the image")
    s.add_argument("--regions", help="with --memsvc: comma-separated region names to store by content")
    s.add_argument("--weights-store", help="with --memsvc: content-addressed weight directory")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_checkpoint)

    s = sub.add_parser("restore", help="verify a snapshot and restore its processes (detached); an "
                                       "s3://BUCKET/PREFIX/NAME is checked, downloaded into the node cache, then restored")
    s.add_argument("dir")
    s.add_argument("--no-verify", action="store_true", help="skip checksum verification")
    s.add_argument("--thp", action="store_true",
                   help="set the host's transparent huge pages to 'always' while CRIU restores (host-wide; put back "
                        "after; also DYNSNAP_RESTORE_THP=always)")
    s.add_argument("--lazy", action=argparse.BooleanOptionalAction, default=None,
                   help="let the tree run before its memory is in place; CRIU's lazy-pages daemon fills it over "
                        "userfaultfd, pages it touches first (default: lazy where the kernel supports it, for "
                        "snapshots without GPU state; DYNSNAP_RESTORE_LAZY=on|off); the command returns as soon as "
                        "the tree runs")
    s.add_argument("--wait-filled", action="store_true",
                   help="lazy restore: return only once every page of the restored memory is in")
    s.add_argument("--device-map", help="GPU remap OLD_UUID=NEW_UUID,...")
    s.add_argument("--memsvc", metavar="SOCKET", help="memory service that loads the snapshot's regions meanwhile")
    s.add_argument("--weights-store", help="weight directory (default: the one recorded in the snapshot)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_restore)

    s = sub.add_parser("check", help="can this node restore SNAPSHOT? kernel, CRIU, CPU, memory, GPU, the worker's "
                                     "files and pids, each ok or refused with the reason and what to change")
    s.add_argument("snapshot", metavar="SNAPSHOT")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_check)

    s = sub.add_parser("push", help="upload a snapshot to S3-compatible object storage (per-part checksums, a "
                                    "COMPLETE marker last); `restore s3://BUCKET/PREFIX/NAME` brings it back")
    s.add_argument("snapshot", metavar="SNAPSHOT")
    s.add_argument("url", metavar="s3://BUCKET[/PREFIX]")
    s.add_argument("--name", help="name in the bucket (default: the snapshot directory's name)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_push)

    s = sub.add_parser("agent", help="node agent: HTTP API on a root-only Unix socket (or TCP with a bearer token)")
    s.add_argument("--socket", help="Unix socket (default /run/dynsnap/agent.sock; also served with --listen "
                                    "only when given)")
    s.add_argument("--listen", metavar="HOST:PORT", help="also serve TCP; needs --token-file")
    s.add_argument("--token-file", help="file holding the bearer token (mode 600)")
    s.add_argument("--root", help="snapshot directory (default: $DYNSNAP_HOME/snapshots)")
    s.add_argument("--storage", help="object storage s3://BUCKET[/PREFIX] (default: $DYNSNAP_STORAGE)")
    s.add_argument("--cache", help="node cache for downloaded snapshots (default: $DYNSNAP_HOME/cache/snapshots)")
    s.add_argument("--cgroup-root", help="cgroup file system (default /sys/fs/cgroup)")
    s.add_argument("--workers", type=int, default=int(config.get("agent_workers") or 4),
                   help="jobs running at once (default $DYNSNAP_AGENT_WORKERS or 4)")
    s.add_argument("--drain", type=float, default=300,
                   help="on SIGTERM, seconds running jobs get to finish (default 300)")
    s.add_argument("--max-body", type=int, default=64 << 10, help="largest request body in bytes (default 65536)")
    s.add_argument("--log-level", default=config.get("agent_log_level"),
                   choices=["critical", "error", "warning", "info", "debug"])
    s.add_argument("--probe", action="store_true", help="ask the agent on --socket for /healthz; exit 0 when it "
                                                        "answers ok (for liveness probes)")
    s.set_defaults(fn=cmd_agent)

    s = sub.add_parser("verify", help="check a snapshot's manifest and every file's checksum")
    s.add_argument("dir")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_verify)

    s = sub.add_parser("inspect", help="describe a snapshot or decode one of its files")
    s.add_argument("path")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_inspect)

    s = sub.add_parser("rm", help="delete snapshots (atomically invisible, then removed)")
    s.add_argument("snapshots", nargs="+", metavar="SNAPSHOT")
    s.add_argument("--force", action="store_true", help="also remove a damaged snapshot (manifest unreadable)")
    s.add_argument("-q", "--quiet", action="store_true")
    s.set_defaults(fn=cmd_rm)

    s = sub.add_parser("list", help="list snapshots with size, age and source command")
    s.add_argument("--root", help="directory holding snapshots (default: $DYNSNAP_HOME/snapshots)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_list)

    s = sub.add_parser("demo", help="warm a sample worker, snapshot it, kill it, restore it, compare answers")
    s.add_argument("--mb", type=int, default=512, help="state the worker computes at warm-up (MiB)")
    s.add_argument("--rounds", type=int, default=4, help="warm-up passes over the state (default 4)")
    s.add_argument("--keep", action="store_true", help="keep the snapshot and logs")
    s.add_argument("--memsvc", action="store_true",
                   help="also run with the state in the host memory service and compare image size and restore time")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_demo)

    s = sub.add_parser("bench", help="benchmarks: io, memfd, weights, restore, e2e")
    s.add_argument("what", choices=["io", "memfd", "weights", "restore", "e2e"])
    s.add_argument("--model", default="qwen3-0.6b", help="e2e: qwen3-0.6b, qwen3-8b or tiny (default qwen3-0.6b)")
    s.add_argument("--device", default="cuda:0", help="e2e: where the worker runs (default cuda:0; cpu works)")
    s.add_argument("--kv-gb", type=float, help="e2e: the worker's KV pool in GB (default 16 on a GPU, 0.25 on cpu)")
    s.add_argument("--plot", help="e2e: write a PNG of each row's restore phases to this file")
    s.add_argument("--rows", help="e2e: comma-separated rows (stock-kept, stock-freed, dynsnap-kept, "
                   "dynsnap-released, dynsnap-thp, gms; default all)")
    s.add_argument("--sizes", help="weights: comma-separated GB of bf16 weights (default 1.2,16)")
    s.add_argument("--threads", help="memfd: comma-separated thread counts (default 1,2,4,8,16 up to the cores)")
    s.add_argument("--no-cold", action="store_true", help="memfd: skip the cold-cache (drop_caches) runs")
    s.add_argument("--dir", help="directory on the file system to measure (default: current)")
    s.add_argument("--size-mb", type=int, default=1024)
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_bench)

    s = sub.add_parser("weights", help="weight store: import safetensors, verify, list")
    wsub = s.add_subparsers(dest="action", metavar="ACTION", parser_class=_Parser)
    wsub.required = True
    w = wsub.add_parser("import", help="import .safetensors file(s) as one weight set")
    w.add_argument("files", nargs="+")
    w.add_argument("--name", help="weight set name (default: the first file's stem)")
    w.add_argument("--store", help="store directory (default: $DYNSNAP_WEIGHTS or <dynsnap home>/weights)")
    w.add_argument("--json", action="store_true")
    w = wsub.add_parser("verify", help="check every shard's size and checksum (all sets without NAME)")
    w.add_argument("name", nargs="?")
    w.add_argument("--store")
    w.add_argument("--deep", action="store_true", help="also check each tensor's own checksum")
    w.add_argument("--json", action="store_true")
    w = wsub.add_parser("ls", help="list weight sets")
    w.add_argument("--store")
    w.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_weights)

    s = sub.add_parser("memsvc", help="host memory service: own memfd regions and hand them to workers")
    s.add_argument("--socket", required=True, help="Unix socket path to serve on")
    s.add_argument("--threads", type=int, help="fill threads (default: CPUs, at most 16)")
    s.add_argument("--allow", action="append", metavar="DIR",
                   help="a directory the service may load regions from and save to, besides the weight store and "
                        "the snapshot root (repeatable)")
    s.add_argument("--group", help="let this group's members use the service (socket 0660); default: root and "
                                   "the service's user only (socket 0600)")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(fn=cmd_memsvc)

    from ..gms.cli import add_parser as _gms_parser
    _gms_parser(sub)

    s = sub.add_parser("cuda-checkpoint", add_help=False,
                       help="NVIDIA cuda-checkpoint compatible tool (--pid, --action, --toggle, ...)")
    s.set_defaults(fn=None)
    return p


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "cuda-checkpoint":
        from ..cuda import cli as cuda_cli
        return cuda_cli.main(argv[1:])
    parser = build_parser()
    a = parser.parse_args(argv)
    try:
        _housekeeping()
        return a.fn(a)
    except DynsnapError as e:
        if getattr(a, "json", False):
            _emit_json(e.to_dict())
        sys.stderr.write(f"{PROG} {a.cmd}: {e}\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write(f"{PROG} {a.cmd}: interrupted\n")
        return 130
    except OSError as e:
        sys.stderr.write(f"{PROG} {a.cmd}: {e.strerror or e}" + (f": {e.filename}" if e.filename else "") + "\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
