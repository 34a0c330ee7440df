"""`dynsnap cuda-checkpoint`: a drop-in for NVIDIA's cuda-checkpoint utility, on the driver API (no binary needed).

Same flags and output as NVIDIA's tool, so scripts and CRIU's CUDA plugin can call it instead:
``--get-state`` prints running/locked/checkpointed/failed, ``--get-restore-tid`` prints a thread id, actions and
``--toggle`` print nothing on success. Errors are one line on stderr and exit 1; usage errors exit 2.
"""
from __future__ import annotations

import sys
from typing import List, Optional

__all__ = ["main"]

PROG = "dynsnap cuda-checkpoint"

HELP = """CUDA checkpoint and restore utility (dynsnap, on the CUDA driver's checkpoint API).

Operations:
--get-state --pid <pid>
        Prints the current checkpoint state of the process specified by <pid>

--action lock | checkpoint | restore | unlock --pid <pid> [--timeout <ms>] [--device-map <map>]
        Performs the specified action on <pid>.
        For the lock action a timeout can be provided, the lock operation will wait up to <ms> milliseconds
        for the operation to succeed.
        For the restore action a device map old=new,... of GPU UUIDs moves the process onto other GPUs.

--toggle --pid <pid> [--timeout <ms>] [--device-map <map>]
        Toggles the CUDA state in the specified process between the running and checkpointed states

--get-restore-tid --pid <pid>
        Retrieves the CUDA restore thread ID of the process specified by <pid>

Options:
--pid|-p <pid>
        The pid upon which to perform the operation

--timeout|-t <timeout>
        Optional timeout that can be specified for the lock action in milliseconds (default 0: no timeout)

--device-map <old>=<new>[,<old>=<new>...]
        GPU UUID remapping (GPU-xxxxxxxx-...) used by restore

--help|-h
        Print this help message
"""

ACTIONS = ("lock", "checkpoint", "restore", "unlock")


class UsageError(Exception):
    """Bad command line: exit 2."""


def _number(v: str, want: str, least: int) -> int:
    """``int(v)`` when it is at least ``least``, else UsageError "WANT, not 'V'" (">= 0" added for a negative)."""
    try:
        n = int(v)
    except ValueError:
        raise UsageError(f"{want}, not {v!r}") from None
    if n < least:
        raise UsageError(f"{want}{' >= 0' if least == 0 else ''}, not {v!r}")
    return n


def _parse(argv: List[str]) -> dict:
    opts: dict = {"pid": None, "op": None, "action": None, "timeout": 0, "device_map": None, "help": False}

    def set_op(op: str) -> None:
        if opts["op"] is not None and opts["op"] != op:
            raise UsageError(f"--{opts['op']} and --{op} cannot be used together")
        opts["op"] = op

    def value(i: int, flag: str, inline: Optional[str]) -> tuple:
        if inline is not None:
            return inline, i
        if i + 1 >= len(argv):
            raise UsageError(f"{flag} needs a value")
        return argv[i + 1], i + 1

    i = 0
    while i < len(argv):
        arg = argv[i]
        flag, inline = (arg.split("=", 1) + [None])[:2] if arg.startswith("--") and "=" in arg else (arg, None)
        if flag in ("-h", "--help"):
            opts["help"] = True
        elif flag in ("-p", "--pid"):
            v, i = value(i, "--pid", inline)
            opts["pid"] = _number(v, "--pid wants a process id", 1)
        elif flag == "--get-state":
            set_op("get-state")
        elif flag == "--get-restore-tid":
            set_op("get-restore-tid")
        elif flag == "--toggle":
            set_op("toggle")
        elif flag in ("-a", "--action"):
            v, i = value(i, "--action", inline)
            if v not in ACTIONS:
                raise UsageError(f"--action wants one of {', '.join(ACTIONS)}, not {v!r}")
            set_op("action")
            opts["action"] = v
        elif flag in ("-t", "--timeout"):
            v, i = value(i, "--timeout", inline)
            opts["timeout"] = _number(v, "--timeout wants milliseconds", 0)
        elif flag == "--device-map":
            v, i = value(i, "--device-map", inline)
            from .driver import parse_device_map
            try:
                opts["device_map"] = parse_device_map(v)
            except ValueError as exc:
                raise UsageError(f"--device-map: {exc}") from None
        else:
            raise UsageError(f"unknown argument {arg!r}")
        i += 1
    if opts["help"]:
        return opts
    if opts["op"] is None:
        raise UsageError("no operation: give --get-state, --get-restore-tid, --action or --toggle")
    if opts["pid"] is None:
        raise UsageError("--pid is required")
    return opts


def _run(opts: dict) -> int:
    from .. import cuda
    pid = opts["pid"]
    op = opts["op"]
    if op == "get-state":
        print(cuda.state(pid).value)
    elif op == "get-restore-tid":
        print(cuda.restore_thread_id(pid))
    elif op == "action":
        action = opts["action"]
        if action == "lock":
            cuda.lock(pid, opts["timeout"])
        elif action == "checkpoint":
            cuda.checkpoint(pid)
        elif action == "restore":
            cuda.restore(pid, opts["device_map"])
        else:
            cuda.unlock(pid)
    else:  # toggle: running -> checkpointed, checkpointed -> running
        st = cuda.state(pid)
        if st is cuda.CudaState.RUNNING:
            cuda.lock(pid, opts["timeout"])
            try:
                cuda.checkpoint(pid)
            except Exception:
                cuda.CudaTree([pid]).rollback()
                raise
        elif st is cuda.CudaState.CHECKPOINTED:
            cuda.restore(pid, opts["device_map"])
            cuda.unlock(pid)
        elif st is cuda.CudaState.LOCKED:
            # half-way (e.g. a lock left by someone else): finish towards checkpointed, like a suspend
            cuda.checkpoint(pid)
        else:
            from ..errors import CudaStateError
            raise CudaStateError(f"process {pid} is in the CUDA 'failed' state: it cannot be toggled",
                                 stage="toggle", pid=pid)
    sys.stdout.flush()
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """Run ``dynsnap cuda-checkpoint`` with ``argv`` (without the program name); returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        opts = _parse(argv)
    except UsageError as exc:
        print(f"{PROG}: {exc} (see --help)", file=sys.stderr)
        return 2
    if opts["help"]:
        sys.stdout.write(HELP)
        return 0
    try:
        return _run(opts)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - one line, never a traceback
        from ..errors import DynsnapError
        text = str(exc) if isinstance(exc, DynsnapError) else f"{type(exc).__name__}: {exc}"
        print(f"{PROG}: {' '.join(text.split())}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
