"""Fault campaigns run on every CI run: seeded random corruptions of a real snapshot, and random kills of dynsnap, its
guardian and CRIU during real checkpoints and restores. Each trial checks the guarantees of docs/operations.md;
a violation fails the test with the seed and the trial (rerun it with DYNSNAP_CAMPAIGN_SEED=SEED).

DYNSNAP_CAMPAIGN_TRIALS=N raises the number of trials (default 12 corruptions, 10 checkpoint kills, 6 restore kills).
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from criu_images import pagemap_entries, reseal
from helpers import ROOT, Workload, cli, request_json, wait_until

pytestmark = [pytest.mark.criu, pytest.mark.timeout(600)]


def _trials(default: int) -> int:
    return int(os.environ.get("DYNSNAP_CAMPAIGN_TRIALS") or default)


@pytest.fixture
def seed():
    s = int(os.environ.get("DYNSNAP_CAMPAIGN_SEED") or random.randrange(2 ** 32))
    print(f"campaign seed {s} (rerun with DYNSNAP_CAMPAIGN_SEED={s})")
    return s


@pytest.fixture
def run_dir(tmp_path, monkeypatch):
    d = tmp_path / "run"
    monkeypatch.setenv("DYNSNAP_RUN_DIR", str(d))
    return d


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def _procs_naming(needle: str) -> list[int]:
    b = needle.encode()
    return [int(d) for d in os.listdir("/proc") if d.isdigit() and b in _cmdline(int(d))]


def _alive(pid: int) -> bool:
    from dynsnap_core.proc import exists
    return exists(pid)



def _kill_restored(pid: int) -> None:
    from dynsnap_core.proc import kill_and_reap, tree
    kill_and_reap(list(reversed(tree(pid))) if _alive(pid) else [pid])


def _one_error_line(r: subprocess.CompletedProcess) -> bool:
    lines = [ln for ln in r.stderr.splitlines() if not ln.startswith(("  ", "note: "))]
    return "Traceback" not in r.stderr and len(lines) == 1 and lines[0].startswith("dynsnap ")


# ------------------------------------------------------------------ corruption campaign

def _mutate(rng: random.Random, snap: Path) -> tuple[str, bool]:
    """Damage the snapshot at random; returns (what was done, whether it is re-sealed, i.e. passes verification
    by construction and only restore's own defences apply)."""
    m = json.loads((snap / "manifest.json").read_text())
    files = [snap / f["path"] for f in m["files"]]
    kind = rng.choice(["flip", "flip-manifest", "truncate", "extend", "nr_pages", "nr_pages-resealed", "extra",
                       "delete", "symlink", "fifo", "field", "unlist-resealed"])
    victim = rng.choice(files)
    if kind == "flip" or kind == "flip-manifest":
        victim = snap / "manifest.json" if kind == "flip-manifest" else victim
        data = bytearray(victim.read_bytes())
        if not data:
            data = bytearray(b"\0")
        i = rng.randrange(len(data))
        data[i] ^= 1 << rng.randrange(8)
        victim.write_bytes(bytes(data))
        return f"{kind} byte {i} of {victim.name}", False
    if kind == "truncate":
        size = victim.stat().st_size
        os.truncate(victim, rng.randrange(size) if size else 0)
        if size == 0:
            victim.write_bytes(b"x")
        return f"truncate {victim.name}", False
    if kind == "extend":
        with open(victim, "ab") as f:
            f.write(os.urandom(rng.randrange(1, 5000)))
        return f"extend {victim.name}", False
    if kind.startswith("nr_pages"):
        pm = sorted((snap / "criu").glob("pagemap-*.img"))[0]
        data = bytearray(pm.read_bytes())
        entries = pagemap_entries(bytes(data))
        idx = rng.randrange(min(len(entries), 8))
        off, v, n = entries[idx]
        nv = min(v + rng.choice([1, 1, 2, 16, 1000]), (1 << (7 * n)) - 1)
        if nv == v:                                # already the largest count of that width: lower it instead
            nv = v - 1
        from criu_images import _encode
        data[off:off + n] = _encode(nv, n)
        pm.write_bytes(bytes(data))
        resealed = kind.endswith("resealed")
        if resealed:
            reseal(snap, pm)
        return f"{kind} entry {idx}: {v} -> {nv}", resealed
    if kind == "extra":
        (snap / "criu" / f"extra-{rng.randrange(1000)}.img").write_bytes(os.urandom(64))
        return "extra file", False
    if kind == "delete":
        victim.unlink()
        return f"delete {victim.name}", False
    if kind == "symlink":
        outside = snap.parent / f"outside-{victim.name}"
        shutil.copyfile(victim, outside)
        victim.unlink()
        victim.symlink_to(outside)
        return f"symlink {victim.name}", False
    if kind == "fifo":
        victim = rng.choice(files + [snap / "manifest.json"])
        victim.unlink()
        os.mkfifo(victim)
        return f"fifo {victim.name}", False
    if kind == "field":
        key = rng.choice(sorted(m))
        m[key] = rng.choice([v for v in (None, -1, 2 ** 70, "x", [], {}, [[[]]], True, 1.5)
                             if json.dumps(v) != json.dumps(m[key])])          # a real change, never a no-op
        (snap / "manifest.json").write_text(json.dumps(m))
        return f"field {key} = {m[key]!r}", False
    # unlist-resealed: drop a file's entry (re-sealed): the file becomes an extra file
    f = rng.choice(m["files"])
    m["files"].remove(f)
    m["total_bytes"] -= f["size"]
    from dynsnap_core.snapshot import manifest as mf
    (snap / "manifest.json").write_text(json.dumps(mf.seal(m)))
    return f"unlist {f['path']} (re-sealed)", False


def test_corruption_campaign(tmp_path, seed, run_dir):
    """Every damaged snapshot: verify and restore end (bounded) with exit 1 and one sentence, or (damage re-sealed
    so that it passes verification) restore succeeds; CRIU never runs on unverified bytes; no CRIU and no
    half-restored process is left; nothing outside the trial's directory changes."""
    rng = random.Random(seed)
    home = tmp_path / "home"
    env = {"DYNSNAP_HOME": str(home), "DYNSNAP_CRIU_TIMEOUT": "20", "DYNSNAP_CRIU_LOG_LIMIT_MB": "32"}
    w = Workload(tmp_path, "--mem-mb", "8")
    pristine = tmp_path / "pristine"
    try:
        r = cli("checkpoint", "--pid", w.pid, "--out", pristine, env=env)
        assert r.returncode == 0, r.stderr
        w.reap_original()
    finally:
        w.kill()
    root_pid = json.loads((pristine / "manifest.json").read_text())["root_pid"]
    sock_name = w.sock.name
    pristine_sum = {p.name: p.read_bytes() for p in (pristine / "criu").iterdir()}
    n = _trials(12)
    violations, outcomes = [], {}
    for i in range(n):
        trial = tmp_path / f"t{i}"
        trial.mkdir()
        snap = trial / "snap"
        shutil.copytree(pristine, snap)
        what, resealed = _mutate(rng, snap)
        before = sorted(p.name for p in tmp_path.iterdir() if p.name not in ("home", "run"))

        def bad(why: str) -> None:
            violations.append(f"seed {seed} trial {i} ({what}): {why}")

        v = cli("verify", snap, env=env, timeout=120)
        if v.returncode not in (0, 1) or (v.returncode == 1 and not _one_error_line(v)):
            bad(f"verify ended {v.returncode}: {v.stderr[-500:]}")
        if not resealed and v.returncode == 0 and "unlist" not in what:
            bad("verify accepted a damaged snapshot")
        if "unlist" in what and v.returncode == 0:
            bad("verify accepted a file the manifest does not list")
        r = cli("restore", snap, env=env, timeout=120)
        if r.returncode == 0:
            outcome = "restored"
            if v.returncode != 0:
                bad("restore succeeded on a snapshot that fails verification")
            _kill_restored(root_pid)
        elif r.returncode == 1 and _one_error_line(r):
            outcome = "refused"
            if not wait_until(lambda: not _alive(root_pid), 10):
                bad(f"half-restored pid {root_pid} left after: {r.stderr.strip()}")
                _kill_restored(root_pid)
        else:
            outcome = "broken"
            bad(f"restore ended {r.returncode}: {r.stderr[-500:]}")
        if not wait_until(lambda: not _procs_naming(str(snap / "criu")), 10):
            bad(f"CRIU left running: {_procs_naming(str(snap / 'criu'))}")
        after = sorted(p.name for p in tmp_path.iterdir() if p.name not in ("home", "run"))
        if after != before and set(after) ^ set(before) != {sock_name}:
            # (a restore that gets far rebinds the worker's Unix socket at its own path, as any restore does)
            bad(f"something was created or deleted next to the trial: {set(after) ^ set(before)}")
        if {p.name: p.read_bytes() for p in (pristine / "criu").iterdir()} != pristine_sum:
            bad("the pristine snapshot changed")
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        shutil.rmtree(trial, ignore_errors=True)
    print(f"corruption campaign: {n} trials, outcomes {outcomes}, {len(violations)} violations")
    assert not violations, f"campaign seed {seed}: " + "; ".join(violations)


# ------------------------------------------------------------------ kill campaign

def _dynsnap_parts(pid: int) -> dict[str, list[int]]:
    from dynsnap_core.proc import tree
    parts: dict[str, list[int]] = {"dynsnap": [pid], "guardian": [], "criu": []}
    for p in tree(pid)[1:]:
        cmd = _cmdline(p)
        if b"dynsnap_core.guardian" in cmd:
            parts["guardian"].append(p)
        elif b"criu" in cmd:
            parts["criu"].append(p)
    return parts


def test_checkpoint_kill_campaign(tmp_path, seed, run_dir):
    """Random subsets of {dynsnap, guardian, CRIU} SIGKILLed (or dynsnap sent SIGTERM/SIGINT) at random moments of a
    real checkpoint; then one more dynsnap command. The worker is never left stopped, a visible snapshot always
    verifies, no staging and no journal entry of the dead run remain."""
    rng = random.Random(seed)
    home = tmp_path / "home"
    env = {"DYNSNAP_HOME": str(home), "DYNSNAP_STAGING": rng.choice(["tmpfs", "target"])}
    n = _trials(10)
    violations, outcomes = [], {}
    w = None
    made = []
    try:
        for i in range(n):
            if w is None or not w.alive():
                w = Workload(tmp_path, "--mem-mb", "64")
                made.append(w)
            out = tmp_path / f"s{i}"
            leave = rng.random() < 0.5
            p = subprocess.Popen([sys.executable, "-m", "dynsnap_core.cli", "checkpoint", "--pid", str(w.pid),
                                  "--out", str(out)] + (["--leave-running"] if leave else []), cwd=ROOT,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                                 env={**os.environ, **env})
            if rng.random() < 0.5:
                time.sleep(rng.uniform(0.05, 0.6))          # any moment
            else:                                           # aimed: once CRIU holds the tree
                end = time.monotonic() + 10
                while w.state() not in ("T", "t") and p.poll() is None and time.monotonic() < end:
                    time.sleep(0.001)
                time.sleep(rng.uniform(0.0, 0.015))
            parts = _dynsnap_parts(p.pid)
            frozen = w.state() in ("T", "t")        # the kill lands while CRIU holds or has stopped the tree
            how = rng.choice(["SIGKILL", "SIGKILL", "SIGKILL", "SIGTERM", "SIGINT"])
            if how == "SIGKILL":
                names = [k for k in parts if rng.random() < 0.6] or ["dynsnap"]
                victims = [x for k in names for x in parts[k]]
                for x in victims:
                    try:
                        os.kill(x, signal.SIGSTOP)
                    except ProcessLookupError:
                        pass
                for x in victims:
                    try:
                        os.kill(x, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                what = f"SIGKILL {'+'.join(names)} after {i}"
            else:
                names = ["dynsnap"]
                try:
                    if how == "SIGINT":
                        os.killpg(p.pid, signal.SIGINT)             # Ctrl-C: the whole job
                    else:
                        p.send_signal(getattr(signal, how))
                except ProcessLookupError:
                    pass
                what = how
            try:
                p.wait(timeout=120)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
                violations.append(f"seed {seed} trial {i} ({what}): dynsnap did not end")
            # whatever of the run survived (CRIU finishing on its own) ends; then the next command recovers
            wait_until(lambda: not _procs_naming(f"-t {w.pid} ") and not any(
                b"dynsnap_core.guardian" in _cmdline(int(d)) and f"{w.pid}".encode() in _cmdline(int(d))
                for d in os.listdir("/proc") if d.isdigit()), 60)
            r = cli("list", "--root", tmp_path, env=env)
            trial = f"seed {seed} trial {i} ({what}, leave_running={leave})"
            if r.returncode != 0:
                violations.append(f"{trial}: list failed: {r.stderr[-300:]}")
            committed = out.exists()
            if committed:
                v = cli("verify", out, env=env)
                if v.returncode != 0:
                    violations.append(f"{trial}: visible snapshot does not verify: {v.stderr.strip()}")
            if w.alive():
                if not wait_until(lambda: w.state() not in ("T", "t"), 10):
                    violations.append(f"{trial}: worker left stopped (state {w.state()})")
                    os.kill(w.pid, signal.SIGCONT)
                outcome = "worker running"
            else:
                outcome = "worker ended (snapshot committed)" if committed and not leave else "worker lost"
                if outcome == "worker lost" and "criu" not in names:
                    violations.append(f"{trial}: worker lost although CRIU was not killed")
            if [x for x in tmp_path.iterdir() if "staging" in x.name]:
                violations.append(f"{trial}: staging left: {[x.name for x in tmp_path.iterdir() if 'staging' in x.name]}")
            if (run_dir / "frozen").is_dir() and list((run_dir / "frozen").glob("*.json")):
                violations.append(f"{trial}: journal entry left")
            from dynsnap_core.proc import exists
            shm = [e for e in os.listdir("/dev/shm") if e.startswith(f"dynsnap-dump-{p.pid}.")]
            if shm and not exists(p.pid):
                violations.append(f"{trial}: tmpfs staging left: {shm}")
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
            if frozen:
                outcomes["killed while frozen"] = outcomes.get("killed while frozen", 0) + 1
            if committed:
                shutil.rmtree(out, ignore_errors=True)
    finally:
        for x in made:
            x.kill()
    print(f"checkpoint kill campaign: {n} trials, outcomes {outcomes}, {len(violations)} violations")
    assert not violations, f"campaign seed {seed}: " + "; ".join(violations)


def test_restore_kill_campaign(tmp_path, seed, run_dir):
    """dynsnap restore killed (SIGKILL, alone or with its supervisor and CRIU; SIGTERM; Ctrl-C) at a random moment,
    then one more dynsnap command: either the restore completed (the worker runs, not stopped) or nothing of it is
    left (no CRIU, no half-restored process)."""
    rng = random.Random(seed)
    home = tmp_path / "home"
    env = {"DYNSNAP_HOME": str(home)}
    w = Workload(tmp_path, "--mem-mb", "64")
    snap = tmp_path / "snap"
    try:
        r = cli("checkpoint", "--pid", w.pid, "--out", snap, env=env)
        assert r.returncode == 0, r.stderr
        w.reap_original()
    finally:
        w.kill()
    pid = json.loads((snap / "manifest.json").read_text())["root_pid"]
    sock = w.sock
    n = _trials(6)
    violations, outcomes = [], {}
    for i in range(n):
        p = subprocess.Popen([sys.executable, "-m", "dynsnap_core.cli", "restore", str(snap)], cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                             env={**os.environ, **env})
        delay = rng.uniform(0.0, 0.6)
        time.sleep(delay)
        how = rng.choice(["SIGKILL", "SIGKILL+", "SIGTERM", "SIGINT"])
        try:
            if how == "SIGINT":
                os.killpg(p.pid, signal.SIGINT)
            elif how == "SIGKILL+":
                # with its supervisor (and maybe CRIU), as a kill of the whole group does
                from dynsnap_core.proc import tree
                below = tree(p.pid)[1:]
                sup = [x for x in below if b"supervise.py" in _cmdline(x)]
                crius = [x for x in below if x not in sup and b"criu" in _cmdline(x)]
                victims = [p.pid, *sup, *(crius if rng.random() < 0.5 else [])]
                how = f"SIGKILL of {len(victims)} (dynsnap, supervisor{', CRIU' if len(victims) > 2 else ''})"
                for x in victims:
                    os.kill(x, signal.SIGSTOP)
                for x in victims:
                    os.kill(x, signal.SIGKILL)
            else:
                p.send_signal(getattr(signal, how))
        except ProcessLookupError:
            pass
        p.wait(timeout=120)
        cli("list", "--root", tmp_path / "none", env=env)        # the next command: it recovers
        trial = f"seed {seed} trial {i} ({how} after {delay:.2f} s, exit {p.returncode})"
        wait_until(lambda: not _procs_naming(str(snap / "criu")), 20)
        if _procs_naming(str(snap / "criu")):
            violations.append(f"{trial}: CRIU or its supervisor left running")
        if _alive(pid):
            if p.returncode != 0:
                wait_until(lambda: not _alive(pid), 2)
            from dynsnap_core.proc import state
            if _alive(pid) and not wait_until(lambda: state(pid) not in ("T", "t"), 10):
                violations.append(f"{trial}: restored process left stopped")
            elif _alive(pid):
                # a process that is left must be a complete restore (dynsnap died after finishing): it answers
                try:
                    ok = request_json(sock, "check", timeout=20)["all_ok"]
                except (OSError, ValueError, KeyError):
                    ok = False
                if not ok:
                    violations.append(f"{trial}: a half-restored process was left (it does not answer)")
            outcome = ("restored" if p.returncode == 0 else "restored, then dynsnap died") if _alive(pid) else \
                "nothing left"
            _kill_restored(pid)
        else:
            outcome = "nothing left"
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    print(f"restore kill campaign: {n} trials, outcomes {outcomes}, {len(violations)} violations")
    assert not violations, f"campaign seed {seed}: " + "; ".join(violations)
