"""Hostile and damaged manifests, and snapshots that are not a closed set: one sentence from every command.

The snapshot is a closed set: its directory holds exactly manifest.json and the files the manifest lists, all
regular (no symlink anywhere, criu/ included), and the manifest's own metadata is covered by its root digest.
The manifest is parsed with limits; a FIFO never hangs a command; `dynsnap list` shows a bad snapshot as damaged
and still lists the others.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from helpers import Workload, cli, fail_line, write_manifest

pytestmark = [pytest.mark.criu, pytest.mark.timeout(120)]

COMMANDS = ("verify", "inspect", "restore")


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """One real snapshot of a small workload (whose tree is gone again); each test damages its own copy."""
    tmp = tmp_path_factory.mktemp("pristine")
    w = Workload(tmp, "--mem-mb", "4")
    out = tmp / "snap"
    try:
        r = cli("checkpoint", "--pid", w.pid, "--out", out, env={"DYNSNAP_HOME": str(tmp / "home")})
        assert r.returncode == 0, r.stderr
        w.reap_original()
    finally:
        w.kill()
    return out


@pytest.fixture
def snap(pristine, tmp_path, monkeypatch):
    monkeypatch.setenv("DYNSNAP_HOME", str(tmp_path / "home"))
    out = tmp_path / "snap"
    shutil.copytree(pristine, out, symlinks=True)
    return out


def manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def refused_everywhere(out: Path, want: str, commands=COMMANDS) -> None:
    for cmd in commands:
        r = cli(cmd, out, timeout=60)
        msg = fail_line(r, cmd)
        assert msg.startswith(want), f"{cmd}: {msg}"


def test_pristine_copy_verifies(snap):
    r = cli("verify", snap)
    assert r.returncode == 0, r.stderr
    assert manifest(snap)["format"] == 2 and manifest(snap)["root_digest"].startswith("sha256:")


# ---- the closed set

def test_extra_file_is_refused(snap):
    (snap / "criu" / "extra.img").write_bytes(b"x" * 10)
    refused_everywhere(snap, f"{snap / 'criu' / 'extra.img'} is not listed in the manifest: an extra file is not "
                             "part of the snapshot", ("verify", "restore"))


def test_extra_directory_is_refused(snap):
    (snap / "more").mkdir()
    refused_everywhere(snap, f"{snap / 'more'} is a directory the manifest does not list", ("verify", "restore"))


def test_unlisted_pages_file_is_refused(snap):
    """The issue's attack: drop a pages file's entry from the manifest (re-sealed), zero 4 KiB of it."""
    m = manifest(snap)
    pages = max((f for f in m["files"] if "pages-" in f["path"]), key=lambda f: f["size"])
    m["files"].remove(pages)
    m["total_bytes"] -= pages["size"]
    write_manifest(snap, m)
    with open(snap / pages["path"], "r+b") as f:
        f.write(b"\0" * 4096)
    refused_everywhere(snap, f"{snap / pages['path']} is not listed in the manifest", ("verify", "restore"))


def test_missing_file_is_refused(snap):
    (snap / "criu" / "inventory.img").unlink()
    refused_everywhere(snap, f"{snap / 'criu' / 'inventory.img'} is missing from the snapshot", ("verify", "restore"))


def test_symlink_to_identical_file_is_refused(snap, tmp_path):
    victim = snap / "criu" / "inventory.img"
    outside = tmp_path / "outside.img"
    shutil.copyfile(victim, outside)
    victim.unlink()
    victim.symlink_to(outside)
    refused_everywhere(snap, f"{victim} is a symbolic link: a snapshot holds only regular files", ("verify", "restore"))


def test_criu_directory_as_symlink_is_refused(snap, tmp_path):
    shutil.move(snap / "criu", tmp_path / "elsewhere")
    (snap / "criu").symlink_to(tmp_path / "elsewhere")
    refused_everywhere(snap, f"{snap / 'criu'} is a symbolic link: a snapshot holds only regular files",
                       ("verify", "restore"))


def test_fifo_as_listed_file_never_hangs(snap):
    victim = snap / "criu" / "inventory.img"
    victim.unlink()
    os.mkfifo(victim)
    refused_everywhere(snap, f"{victim} is a FIFO: a snapshot holds only regular files", ("verify", "restore"))
    r = cli("inspect", victim, timeout=30)
    assert fail_line(r, "inspect") == f"{victim} is not a regular file: dynsnap inspect decodes snapshots and their files"


# ---- the manifest itself

def test_metadata_damage_is_caught_by_the_root_digest(snap):
    m = manifest(snap)
    m["io_engine"] = "psync" if m["io_engine"] != "psync" else "aio"
    (snap / "manifest.json").write_text(json.dumps(m))
    refused_everywhere(snap, f"{snap / 'manifest.json'} is damaged: its metadata does not match its root digest")


def test_format_1_snapshot_still_verifies(snap):
    """Decision: snapshots written before the root digest (format 1) keep verifying and restoring; their files are
    checked as ever, only their metadata is not covered."""
    m = manifest(snap)
    del m["root_digest"]
    m["format"] = 1
    (snap / "manifest.json").write_text(json.dumps(m))
    r = cli("verify", snap)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "directory"])
def test_manifest_that_is_not_a_file(snap, kind):
    path = snap / "manifest.json"
    path.unlink()
    if kind == "fifo":
        os.mkfifo(path)
        want = f"{path} is not a regular file (a FIFO): a snapshot holds only regular files"
    elif kind == "dev-zero":
        path.symlink_to("/dev/zero")
        want = f"{path} is a symbolic link: a snapshot holds only regular files"
    else:
        path.mkdir()
        want = f"{path} is not a regular file (a directory): a snapshot holds only regular files"
    refused_everywhere(snap, want)


def test_huge_manifest_is_refused_quickly(snap):
    with open(snap / "manifest.json", "wb") as f:
        f.truncate(17 << 20)
    refused_everywhere(snap, f"{snap / 'manifest.json'} is malformed: {17 << 20} bytes, more than the 16 MiB a "
                             "manifest may have")


def test_deep_nesting(snap):
    (snap / "manifest.json").write_text("[" * 200000 + "]" * 200000)
    refused_everywhere(snap, f"{snap / 'manifest.json'} is malformed: nested")


def _edit(m: dict, how: str) -> str:
    """Apply one hostile edit (re-sealed afterwards); return the start of the sentence every command must say."""
    f0 = m["files"][0]
    if how == "empty-files":
        m["files"], m["total_bytes"] = [], 0
        return "is malformed: it lists no files"
    if how == "files-not-list":
        m["files"] = "criu/inventory.img"
        return "is malformed: 'files' is not a list"
    if how == "size-string":
        f0["size"] = str(f0["size"])
        return f"is malformed: the size of {f0['path']!r} is not a byte count"
    if how == "size-huge":
        f0["size"] = 2 ** 70
        return f"is malformed: the size of {f0['path']!r} is not a byte count"
    if how == "size-negative":
        f0["size"] = -1
        return f"is malformed: the size of {f0['path']!r} is not a byte count"
    if how == "xxh3-int":
        f0["xxh3"] = 123
        return f"is malformed: the checksum of {f0['path']!r} is not 16 hex digits"
    if how == "nul-in-path":
        f0["path"] = "criu/a\0b"
        return "is malformed: file path 'criu/a\\x00b' is too long or holds a NUL byte"
    if how == "absolute-path":
        f0["path"] = "/etc/passwd"
        return "is malformed: file path '/etc/passwd' escapes the snapshot"
    if how == "dotdot-path":
        f0["path"] = "criu/../../x"
        return "is malformed: file path 'criu/../../x' escapes the snapshot"
    if how == "duplicate":
        m["files"].append(dict(f0))
        m["total_bytes"] += f0["size"]
        return f"is malformed: file {f0['path']!r} is listed twice"
    if how == "root-pid-string":
        m["root_pid"] = "1"
        return "is malformed: 'root_pid' is not a pid"
    if how == "root-pid-overflow":
        m["root_pid"] = 2 ** 64
        return "is malformed: 'root_pid' is not a pid"
    if how == "pids-bool":
        m["pids"] = [True]
        return "is malformed: 'pids' is not a list of pids"
    if how == "cmdline-ints":
        m["cmdline"] = [1, 2]
        return "is malformed: 'cmdline' is not a list of strings"
    if how == "timings-strings":
        m["timings"] = {"x": "slow"}
        return "is malformed: 'timings' is not an object of numbers"
    if how == "cuda-list":
        m["cuda"] = [1]
        return "is malformed: 'cuda' is not null or an object"
    if how == "weights-junk":
        m["weights"] = {"regions": 5}
        return "is malformed: 'weights' is not an object with 'store'"
    if how == "total-mismatch":
        m["total_bytes"] += 1
        return "is malformed: 'total_bytes' is"
    if how == "format-string":
        m["format"] = "2"
        return "has format version '2'; this dynsnap reads versions 1, 2"
    if how == "not-object":
        return "is malformed: it is not a dynsnap manifest (bad magic)"
    raise AssertionError(how)


EDITS = ["empty-files", "files-not-list", "size-string", "size-huge", "size-negative", "xxh3-int", "nul-in-path",
         "absolute-path", "dotdot-path", "duplicate", "root-pid-string", "root-pid-overflow", "pids-bool",
         "cmdline-ints", "timings-strings", "cuda-list", "weights-junk", "total-mismatch", "format-string",
         "not-object"]


@pytest.mark.parametrize("how", EDITS)
def test_hostile_manifest(snap, how):
    m = manifest(snap)
    want = _edit(m, how)
    if how == "not-object":
        (snap / "manifest.json").write_text("[1, 2, 3]")
    elif how == "format-string":
        (snap / "manifest.json").write_text(json.dumps(m))
    else:
        write_manifest(snap, m)          # re-sealed: only the content is hostile
        if how != "format-string":
            data = json.loads((snap / "manifest.json").read_text())
            assert data["format"] == 2
    refused_everywhere(snap, f"{snap / 'manifest.json'} {want}")
    r = cli("rm", snap)
    assert fail_line(r, "rm").startswith(f"refusing to remove {snap}: {snap / 'manifest.json'} {want}")
    assert snap.is_dir()


def test_list_survives_one_bad_snapshot(snap, tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    shutil.copytree(snap, root / "good")
    shutil.copytree(snap, root / "bad")
    (root / "bad" / "manifest.json").write_text("[" * 100000)
    os.mkfifo(root / "fifo-snapshot-manifest")
    (root / "fifo").mkdir()
    os.mkfifo(root / "fifo" / "manifest.json")
    r = cli("list", "--root", root, "--json", timeout=60)
    assert r.returncode == 0, r.stderr
    rows = {row["name"]: row for row in json.loads(r.stdout)}
    assert rows["good"]["status"] == "ok"
    assert rows["bad"]["status"] == "damaged" and "nested" in rows["bad"]["error"]
    assert rows["fifo"]["status"] == "damaged" and "FIFO" in rows["fifo"]["error"]
    r = cli("list", "--root", root, timeout=60)
    assert r.returncode == 0 and "damaged" in r.stdout and "Traceback" not in r.stderr
