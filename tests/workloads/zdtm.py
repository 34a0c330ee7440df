"""Self-checking workload (in the spirit of CRIU's zdtm): builds state, signals ready, answers 'check' with proof.

Usage: zdtm.py --sock PATH --ready FILE [--mem-mb N] [--threads K] [--pipe] [--memfd] [--file PATH]
'check' replies JSON: per feature whether its state is intact, plus a counter that keeps advancing, so a test can
show that the restored process continues from where it stopped.
"""
import argparse
import hashlib
import json
import os
import socket
import threading
import time

ap = argparse.ArgumentParser()
ap.add_argument("--sock", required=True)
ap.add_argument("--ready", required=True)
ap.add_argument("--mem-mb", type=int, default=0)
ap.add_argument("--threads", type=int, default=0)
ap.add_argument("--pipe", action="store_true")
ap.add_argument("--memfd", action="store_true")
ap.add_argument("--file")
ap.add_argument("--io-uring", action="store_true", help="hold an io_uring instance (CRIU cannot dump it)")
ap.add_argument("--child", action="store_true", help="fork a child that echoes over a pair of pipes")
ap.add_argument("--abstract", help="listen on this abstract UNIX socket name too (as the CUDA driver does)")
ap.add_argument("--see", help="report what the process sees: its /proc, and this file's content (a node path)")
a = ap.parse_args()

state = {}
mem = os.urandom(a.mem_mb << 20) if a.mem_mb else b""
mem_hash = hashlib.sha256(mem).hexdigest()
state["mem"] = lambda: {"ok": hashlib.sha256(mem).hexdigest() == mem_hash, "sha256": mem_hash}

ticks = [0] * a.threads
stop = False


def spin(i):
    while not stop:
        ticks[i] += 1
        time.sleep(0.001)


threads = [threading.Thread(target=spin, args=(i,), daemon=True) for i in range(a.threads)]
for t in threads:
    t.start()


def threads_check():
    before = list(ticks)
    time.sleep(0.05)
    return {"ok": all(t.is_alive() for t in threads) and all(x > y for x, y in zip(ticks, before)),
            "alive": sum(t.is_alive() for t in threads), "ticks": sum(ticks)}


state["threads"] = threads_check

if a.pipe:
    r, w = os.pipe()
    payload = hashlib.shake_256(b"pipe").digest(40000)   # stays in the pipe buffer across the snapshot
    os.write(w, payload)

    def pipe_check():
        data = b""
        while len(data) < len(payload):
            data += os.read(r, len(payload) - len(data))
        os.write(w, payload)
        return {"ok": data == payload}
    state["pipe"] = pipe_check

if a.memfd:
    mfd = os.memfd_create("zdtm-memfd")
    content = hashlib.shake_256(b"memfd").digest(3 << 20)
    os.write(mfd, content)

    def memfd_check():
        return {"ok": os.pread(mfd, len(content) + 1, 0) == content,
                "size": os.fstat(mfd).st_size}
    state["memfd"] = memfd_check

if a.file:
    f = open(a.file, "w")
    f.write("line 0\n")
    f.flush()
    lines = [1]

    def file_check():
        f.write(f"line {lines[0]}\n")
        f.flush()
        lines[0] += 1
        with open(a.file) as g:
            got = g.read()
        want = "".join(f"line {i}\n" for i in range(lines[0]))
        return {"ok": got == want, "lines": lines[0], "pos": f.tell()}
    state["file"] = file_check

if a.child:
    to_child_r, to_child_w = os.pipe()
    from_child_r, from_child_w = os.pipe()
    child = os.fork()
    if child == 0:                       # the child: echo each 8-byte token back, doubled, forever
        os.close(to_child_w)
        os.close(from_child_r)
        while True:
            tok = os.read(to_child_r, 8)
            if not tok:
                os._exit(0)
            os.write(from_child_w, tok + tok)
    os.close(to_child_r)
    os.close(from_child_w)

    def child_check():
        tok = os.urandom(8)
        os.write(to_child_w, tok)
        got = b""
        while len(got) < 16:
            got += os.read(from_child_r, 16 - len(got))
        return {"ok": got == tok + tok, "pid": child}
    state["child"] = child_check

if a.io_uring:
    import ctypes
    params = (ctypes.c_uint8 * 120)()
    ring_fd = ctypes.CDLL(None, use_errno=True).syscall(425, 8, params)   # io_uring_setup
    assert ring_fd >= 0, "io_uring_setup failed"

if a.see:
    def see_check():
        me = os.getpid()
        with open("/proc/1/cmdline", "rb") as fh:
            init = fh.read().split(b"\0")
        try:
            with open(a.see) as fh:
                seen = fh.read()
        except OSError as e:
            seen = f"error: {e.strerror}"
        with open("/proc/self/mountinfo") as fh:
            mounts = [ln.split()[4] for ln in fh]
        own = os.readlink("/proc/self") == str(me) and os.path.exists(f"/proc/{me}/status")
        return {"ok": own, "proc_self": os.readlink("/proc/self"), "init": init[3].decode() if len(init) > 3 else "",
                "file": seen, "proc_mounts": mounts.count("/proc"), "mounts": mounts}
    state["see"] = see_check

if a.abstract:
    asrv = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    asrv.bind("\0" + a.abstract)
    asrv.listen(4)

    def abstract_check():
        name = asrv.getsockname()
        name = name.decode("latin-1") if isinstance(name, bytes) else name
        return {"ok": name.startswith("\0") and len(name) == len(a.abstract) + 1, "name": name[1:]}
    state["abstract"] = abstract_check

counter = [0]
srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
srv.bind(a.sock)
srv.listen(8)
with open(a.ready, "w") as fh:
    fh.write(str(os.getpid()))
while True:
    c, _ = srv.accept()
    with c:
        req = c.recv(64).decode().strip()
        counter[0] += 1
        if req == "check":
            out = {k: fn() for k, fn in state.items()}
            out["counter"] = counter[0]
            out["pid"] = os.getpid()
            out["all_ok"] = all(v["ok"] for k, v in out.items() if isinstance(v, dict))
            c.sendall(json.dumps(out).encode())
        else:
            c.sendall(b"{}")
