"""`dynsnap check` and the check at the start of every restore: facts recorded at checkpoint, each ok or refused."""
from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from dynsnap_core.compat import facts as facts_mod
from helpers import cli, kill_proc

pytestmark = pytest.mark.criu

FACT_NAMES = ["privilege", "snapshot files", "architecture", "kernel", "kernel features", "CRIU", "CPU",
              "host memory", "GPU", "executable and libraries", "open files and directories", "pids"]


def _facts(r: subprocess.CompletedProcess) -> dict:
    return {f["name"]: f for f in json.loads(r.stdout)["facts"]}


def _edit(snap: Path, fn) -> None:
    """Change the manifest's facts and seal it again (its root digest covers every field)."""
    from dynsnap_core.snapshot import manifest as mf
    m = json.loads((snap / "manifest.json").read_text())
    fn(m)
    (snap / "manifest.json").write_text(json.dumps(mf.seal(m)))


def _one_line(r: subprocess.CompletedProcess, cmd: str) -> str:
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(f"dynsnap {cmd}: ")
    return lines[0][len(f"dynsnap {cmd}: "):]


@pytest.fixture
def sleeper(tmp_path):
    """A copy of sleep(1) in tmp_path running detached: its executable is a file the test can change."""
    exe = tmp_path / "bin" / "sleeper"
    exe.parent.mkdir()
    shutil.copy2(shutil.which("sleep"), exe)
    p = subprocess.Popen([str(exe), "600"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True)
    yield p, exe
    kill_proc(p)


def _reap(pid: int) -> None:
    from dynsnap_core.proc import exists, reap_children
    end = time.monotonic() + 10
    while (exists(pid) or os.path.exists(f"/proc/{pid}")) and time.monotonic() < end:
        reap_children()
        time.sleep(0.01)


def test_check_records_and_compares(workload, tmp_path, home):
    """The manifest records the node's facts; on the same node every fact is ok once the pids are free."""
    w = workload("--mem-mb", "16")
    out = tmp_path / "snap"
    r = cli("checkpoint", "--pid", w.pid, "--out", out, "--leave-running")
    assert r.returncode == 0, r.stderr
    m = json.loads((out / "manifest.json").read_text())
    c = m["compat"]
    assert c["version"] == 1
    assert c["kernel"]["release"] == platform.release()
    assert c["kernel"]["features"]["ns_last_pid"] is True
    assert c["cpu"]["arch"] == platform.machine() and c["cpu"]["flags"]
    assert c["memory"]["host_needed"] == m["host_rss_bytes"] > 16 << 20
    exe = os.path.realpath(f"/proc/{w.pid}/exe")
    rec = {f["path"]: f for f in c["files"]}
    assert rec[exe]["kind"] == "executable" and rec[exe]["size"] == os.path.getsize(exe)
    readelf = subprocess.run(["readelf", "-n", exe], capture_output=True, text=True)
    if readelf.returncode == 0 and "Build ID:" in readelf.stdout:
        assert rec[exe]["build_id"] == readelf.stdout.split("Build ID:")[1].split()[0]
    assert all(("build_id" in f) != ("xxh3" in f) or f["size"] > facts_mod.BIG_DATA_FILE for f in c["files"])
    assert any(".so" in p for p in rec), "the libraries the worker mapped are recorded"

    # the source still runs: its pid is taken, and that is the one refusal
    r = cli("check", out, "--json")
    assert r.returncode == 1, r.stderr
    facts = _facts(r)
    assert list(facts) == FACT_NAMES
    assert {n for n, f in facts.items() if f["status"] != "ok"} == {"pids"}
    assert facts["pids"]["status"] == "refuse"
    assert facts["pids"]["detail"].startswith(f"pid {w.pid} is in use by a running process")
    assert json.loads(r.stdout)["ok"] is False

    w.kill()
    _reap(w.pid)
    r = cli("check", out, "--json")
    assert r.returncode == 0, r.stdout
    assert all(f["status"] == "ok" for f in _facts(r).values()), r.stdout
    r = cli("check", out)
    assert r.returncode == 0 and r.stdout.splitlines()[0] == f"{out}: can restore here"
    assert len(r.stdout.splitlines()) == 1 + len(FACT_NAMES)


def test_old_snapshot_without_facts_restores(workload, tmp_path, home):
    """A snapshot taken before the facts were recorded says 'not recorded' and still restores."""
    w = workload("--mem-mb", "8")
    before = w.request()
    out = tmp_path / "snap"
    assert cli("checkpoint", "--pid", w.pid, "--out", out).returncode == 0
    w.reap_original()
    _edit(out, lambda m: m.pop("compat"))
    r = cli("check", out, "--json")
    assert r.returncode == 0, r.stdout
    facts = _facts(r)
    for name in ("kernel features", "CPU", "executable and libraries", "open files and directories"):
        assert facts[name]["status"] == "unknown"
        assert "not recorded (snapshot taken before dynsnap recorded it)" in facts[name]["detail"]
    assert facts["kernel"]["status"] == "ok" and facts["CRIU"]["status"] == "ok"
    r = cli("restore", out, "--json")
    assert r.returncode == 0, r.stderr
    assert w.request()["counter"] == before["counter"] + 1


REFUSALS = {
    "arch": (lambda m: m.update(arch="riscv64"),
             "architecture", f"snapshot was taken on riscv64 but this node is {platform.machine()}"),
    "kernel": (lambda m: m["compat"]["kernel"].update(release="99.1.0"),
               "kernel", f"snapshot was taken on Linux 99.1.0, this node runs the older Linux {platform.release()}"),
    "kernel-feature": (lambda m: m["compat"]["kernel"]["features"].update(time_travel=True),
                       "kernel features", "this kernel lacks time_travel, which the snapshot's node had"),
    "criu": (lambda m: m.update(criu_version="99.0"),
             "CRIU", "snapshot was dumped by CRIU 99.0, this node has the older CRIU"),
    "cpu": (lambda m: m["compat"]["cpu"].update(flags=m["compat"]["cpu"]["flags"] + ["avx1024"]),
            "CPU", "lacks instruction set flag(s) avx1024 that the checkpointing CPU"),
    "memory": (lambda m: m.update(host_rss_bytes=1 << 50),
               "host memory", "the snapshot needs 1024.0 TiB of memory but only"),
}


@pytest.mark.parametrize("what", sorted(REFUSALS))
def test_refusal_names_reason_and_fix(what, workload, tmp_path, home):
    """Each fact refuses with its reason and a fix; restore says the same and touches nothing."""
    w = workload()
    out = tmp_path / "snap"
    assert cli("checkpoint", "--pid", w.pid, "--out", out).returncode == 0
    w.reap_original()
    edit, name, text = REFUSALS[what]
    _edit(out, edit)
    r = cli("check", out, "--json")
    assert r.returncode == 1
    facts = _facts(r)
    assert [n for n, f in facts.items() if f["status"] == "refuse"] == [name]
    assert text in facts[name]["detail"] and facts[name]["fix"]
    listing = sorted((p.relative_to(out), p.stat().st_size, p.stat().st_mtime_ns) for p in out.rglob("*"))
    r = cli("restore", out)
    assert text in _one_line(r, "restore")
    assert not w.alive() and not os.path.exists(f"/proc/{w.pid}")
    assert sorted((p.relative_to(out), p.stat().st_size, p.stat().st_mtime_ns) for p in out.rglob("*")) == listing
    assert not (home / "logs").exists() or not list((home / "logs").glob("restore-*")), "restore touched nothing"


def test_changed_executable_is_refused(sleeper, tmp_path, home):
    """The worker's executable is another build on disk (same size, its ELF build-id differs): refused with the
    file named; truncated or missing: refused; put back, ok."""
    p, exe = sleeper
    out = tmp_path / "snap"
    r = cli("checkpoint", "--pid", p.pid, "--out", out)
    assert r.returncode == 0, r.stderr
    p.wait(timeout=30)
    original = exe.read_bytes()
    bid = facts_mod.elf_build_id(str(exe))
    assert bid and original.count(bytes.fromhex(bid)) == 1
    at = original.index(bytes.fromhex(bid))
    data = bytearray(original)
    data[at] ^= 0xFF                      # what another build of the same size looks like to the loader
    exe.write_bytes(bytes(data))
    r = cli("check", out, "--json")
    f = _facts(r)["executable and libraries"]
    assert r.returncode == 1 and f["status"] == "refuse"
    assert f["detail"].startswith(f"{exe} is another build than at checkpoint (ELF build-id ")
    assert f["fix"].startswith("install the same versions of the worker's executable and libraries")
    assert _one_line(cli("restore", out), "restore").startswith(f"{exe} is another build than at checkpoint")
    assert not os.path.exists(f"/proc/{p.pid}")

    exe.write_bytes(original[:-1])
    assert _facts(cli("check", out, "--json"))["executable and libraries"]["detail"] == \
        f"{exe} has {len(original) - 1} bytes, at checkpoint it had {len(original)}; the restored process would " \
        "map different code"
    exe.unlink()
    assert _facts(cli("check", out, "--json"))["executable and libraries"]["detail"].startswith(
        f"{exe} is missing (No such file or directory)")

    exe.write_bytes(original)
    exe.chmod(0o755)
    r = cli("restore", out, "--json")
    assert r.returncode == 0, r.stderr
    rpid = json.loads(r.stdout)["pid"]
    assert rpid == p.pid and os.readlink(f"/proc/{rpid}/exe") == str(exe)
    os.kill(rpid, signal.SIGKILL)
    _reap(rpid)


def test_several_refusals_in_one_restore_message(workload, tmp_path, home):
    w = workload()
    out = tmp_path / "snap"
    assert cli("checkpoint", "--pid", w.pid, "--out", out).returncode == 0
    w.reap_original()
    _edit(out, lambda m: m.update(arch="riscv64", criu_version="99.0"))
    msg = _one_line(cli("restore", out), "restore")
    assert msg == f"snapshot was taken on riscv64 but this node is {platform.machine()} (1 more: dynsnap check {out})"


def test_gpu_facts_without_driver(workload, tmp_path, home):
    """GPU state on a node without the driver is refused by `check` with the driver's reason."""
    from dynsnap_core import cuda
    if cuda.is_available():
        pytest.skip("this machine has a CUDA driver with the checkpoint API")
    w = workload()
    out = tmp_path / "snap"
    assert cli("checkpoint", "--pid", w.pid, "--out", out).returncode == 0
    w.reap_original()
    _edit(out, lambda m: m.update(cuda={"pids": [w.pid], "driver_version": 13000, "devices": [
        {"index": 0, "name": "NVIDIA H200", "uuid": "GPU-1", "total_memory": 150 << 30}]}))
    facts = _facts(cli("check", out, "--json"))
    assert facts["GPU driver"]["status"] == "refuse"
    assert facts["GPU driver"]["detail"] == ("this snapshot holds GPU state but this machine cannot restore it: "
                                             + cuda.driver_info()["reason"])


def test_compat_gpu_section():
    """The GPU part of the facts: bytes needed per GPU summed over the tree's CUDA processes, MIG from the name."""
    from dynsnap_core.snapshot import _compat_gpu
    gpu = {"driver_version": 13000,
           "devices": [{"index": 0, "uuid": "GPU-a", "name": "NVIDIA H200"},
                       {"index": 1, "uuid": "MIG-b", "name": "NVIDIA H200 MIG 1g.18gb"}],
           "processes": {"10": {"GPU-a": 5, "MIG-b": 7}, "11": {"GPU-a": 1}, "12": None}}
    c = _compat_gpu(gpu)
    assert c["memory_needed"] == {"GPU-a": 6, "MIG-b": 7}
    assert [d["mig"] for d in c["devices"]] == [False, True]
    assert c["driver_version"] == 13000


def test_open_file_and_cwd_must_exist(workload, tmp_path, home):
    """A file the worker holds open, and its working directory, are paths CRIU opens again: missing is refused."""
    path = tmp_path / "data" / "out.txt"
    path.parent.mkdir()
    w = workload("--file", str(path))
    out = tmp_path / "snap"
    assert cli("checkpoint", "--pid", w.pid, "--out", out).returncode == 0
    w.reap_original()
    paths = {p["path"]: p["kind"] for p in json.loads((out / "manifest.json").read_text())["compat"]["paths"]}
    assert paths[str(path)] == "open file"
    from helpers import ROOT
    assert paths[str(ROOT)] == "working directory"
    saved = path.read_bytes()
    path.unlink()
    f = _facts(cli("check", out, "--json"))["open files and directories"]
    assert f["status"] == "refuse"
    assert f["detail"] == f"{path} is missing; the worker had it open (open file)"
    assert _one_line(cli("restore", out), "restore") == f["detail"]
    path.write_bytes(saved)
    assert _facts(cli("check", out, "--json"))["open files and directories"]["status"] == "ok"
    r = cli("restore", out)
    assert r.returncode == 0, r.stderr
    assert w.request()["file"]["ok"]


def test_paths_in_another_mount_namespace_are_not_compared(tmp_path):
    """A worker over another root file system (a container; here /usr as root): its files are read through
    /proc/PID/root and reported as not comparable from the node. A worker in a mount namespace of its own over the
    node's root (dynsnap run's layout) has node files, compared as usual."""
    import shutil
    import subprocess
    if shutil.which("unshare") is None:
        pytest.skip("unshare(1) is not installed")
    from dynsnap_core.compat import compare as chk
    from dynsnap_core.compat import facts
    from dynsnap_core.proc import children
    for argv, inside in ((["unshare", "--mount", "--fork", "--root=/usr", "/bin/sleep", "60"], True),
                         (["unshare", "--mount", "--fork", "--propagation", "private", "sleep", "60"], False)):
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            end = time.monotonic() + 10
            while not children(p.pid) or os.readlink(f"/proc/{children(p.pid)[0]}/exe").endswith("unshare"):
                assert time.monotonic() < end
                time.sleep(0.01)
            [pid] = children(p.pid)
            assert facts.same_mount_namespace(pid) is not inside
            rows = facts.tree_files([pid])
            exe = os.readlink(f"/proc/{pid}/exe")
            assert {r["path"]: r.get("namespace") for r in rows}[exe] == ("worker" if inside else None)
            fact = chk._files({"files": rows})
            if inside:
                assert fact.status == "unknown" and fact.detail.startswith(f"{len(rows)} files are inside the worker")
                assert {r.get("namespace") for r in facts.tree_paths([pid])} == {"worker"}
            else:
                assert fact.status == "ok", fact
                assert {r.get("namespace") for r in facts.tree_paths([pid])} == {None}
        finally:
            for q in children(p.pid):
                os.kill(q, signal.SIGKILL)
            p.kill()
            p.wait()
