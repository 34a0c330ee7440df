"""pytest-benchmark: dynsnap copy_file against shutil.copyfile and cp on a 64 MiB file (run with pytest benches/)."""
from __future__ import annotations

import itertools
import os
import shutil
import subprocess

import pytest

from dynsnap_core import io

SIZE = 64 << 20


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench-io")
    path = d / "src"
    path.write_bytes(os.urandom(SIZE))
    return path


def _fsync(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _bench(benchmark, src, copy):
    counter = itertools.count()

    def setup():
        dst = src.parent / f"dst-{next(counter)}"
        return (dst,), {}

    def target(dst):
        copy(src, dst)
        os.unlink(dst)

    benchmark.pedantic(target, setup=setup, rounds=5)
    benchmark.extra_info["bytes"] = SIZE


@pytest.mark.parametrize("engine", io.available_engines())
def test_dynsnap_copy(benchmark, src, engine):
    _bench(benchmark, src, lambda s, d: io.copy_file(s, d, engine=engine))


def test_shutil_copyfile(benchmark, src):
    _bench(benchmark, src, lambda s, d: (shutil.copyfile(s, d), _fsync(d)))


def test_cp(benchmark, src):
    _bench(benchmark, src, lambda s, d: (subprocess.run(["cp", str(s), str(d)], check=True), _fsync(d)))
