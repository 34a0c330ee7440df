"""dynsnap_core.cuda and `dynsnap cuda-checkpoint` on a machine without a CUDA driver: clean errors, no traceback."""
from __future__ import annotations

import ctypes
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _driver_present() -> bool:
    try:
        ctypes.CDLL("libcuda.so.1")
        return True
    except OSError:
        return False


pytestmark = pytest.mark.skipif(_driver_present(),
                                reason="a CUDA driver (libcuda.so.1) is present: these tests check the no-driver "
                                       "behaviour; tests/gpu covers this machine")

NO_DRIVER = "no CUDA driver on this machine (libcuda.so.1 not found)"
NO_BINDINGS = "cuda-python is not installed: pip install 'dynsnap-core[gpu]'"


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.fixture
def sleeper():
    proc = subprocess.Popen(["sleep", "60"])
    try:
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


def test_import_and_probe():
    import dynsnap_core.cuda as cuda
    assert cuda.is_available() is False
    info = cuda.driver_info()
    assert info["available"] is False
    assert info["checkpoint_api"] is False
    assert info["driver_version"] is None
    assert "driver" in info["reason"]
    try:
        import cuda.bindings.driver  # noqa: F401
    except ImportError:
        assert info["reason"] == NO_BINDINGS
    else:
        assert info["reason"] == NO_DRIVER


@pytest.mark.parametrize("action", ["state", "restore_thread_id", "lock", "checkpoint", "restore", "unlock"])
def test_actions_raise_unavailable(sleeper, action):
    import dynsnap_core.cuda as cuda
    from dynsnap_core.errors import CudaUnavailable
    with pytest.raises(CudaUnavailable) as info:
        getattr(cuda, action)(sleeper)
    assert str(info.value) in (NO_DRIVER, NO_BINDINGS)
    assert info.value.pid == sleeper


@pytest.mark.parametrize("action", ["state", "lock", "checkpoint", "restore", "unlock"])
def test_actions_check_pid_first(action):
    import dynsnap_core.cuda as cuda
    from dynsnap_core.errors import ProcessNotFound
    proc = subprocess.Popen(["true"])
    proc.wait()
    with pytest.raises(ProcessNotFound):
        getattr(cuda, action)(proc.pid)


def test_cuda_pids_without_driver_is_empty(sleeper):
    import dynsnap_core.cuda as cuda
    assert cuda.cuda_pids([sleeper, os.getpid()]) == []


def test_tree_rollback_never_raises(sleeper):
    import dynsnap_core.cuda as cuda
    problems = cuda.CudaTree([sleeper]).rollback()
    assert isinstance(problems, list)


def test_device_map_parsing():
    from dynsnap_core.cuda import parse_device_map, _complete_map
    a = "GPU-00112233-4455-6677-8899-aabbccddeeff"
    b = "gpu-00112233-4455-6677-8899-AABBCCDDEE00"
    assert parse_device_map(f"{a}={b}") == {a: "GPU-00112233-4455-6677-8899-aabbccddee00"}
    for bad in ("nonsense", f"{a}=GPU-12", f"{a}={b},{a}={b}"):
        with pytest.raises(ValueError):
            parse_device_map(bad)
    u = ["GPU-%08d-0000-0000-0000-000000000000" % i for i in range(3)]
    full = _complete_map({u[0]: u[1]}, u)
    assert full[u[0]] == u[1] and sorted(full) == sorted(u) and sorted(full.values()) == sorted(u)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dynsnap_core.cuda.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, env=_env(), timeout=60)


def test_cli_get_state_one_line_exit_1(sleeper):
    r = _cli("--pid", str(sleeper), "--get-state")
    assert r.returncode == 1
    assert r.stdout == ""
    assert "Traceback" not in r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1
    assert lines[0] in (f"dynsnap cuda-checkpoint: {NO_DRIVER}", f"dynsnap cuda-checkpoint: {NO_BINDINGS}")


@pytest.mark.parametrize("args", [
    ["--action", "lock", "--pid", "{pid}", "--timeout", "100"],
    ["--toggle", "-p", "{pid}"],
    ["--get-restore-tid", "--pid", "{pid}"],
])
def test_cli_actions_exit_1(sleeper, args):
    r = _cli(*[a.format(pid=sleeper) for a in args])
    assert r.returncode == 1 and r.stdout == "" and len(r.stderr.splitlines()) == 1
    assert "Traceback" not in r.stderr


def test_cli_missing_process_exit_1():
    proc = subprocess.Popen(["true"])
    proc.wait()
    r = _cli("--get-state", "--pid", str(proc.pid))
    assert r.returncode == 1 and r.stderr == f"dynsnap cuda-checkpoint: no process with pid {proc.pid}\n"


@pytest.mark.parametrize("args", [
    [], ["--get-state"], ["--pid", "12"], ["--pid", "abc", "--get-state"], ["--action", "freeze", "--pid", "1"],
    ["--get-state", "--toggle", "--pid", "1"], ["--bogus"], ["--pid"], ["--toggle", "-p", "1", "-t", "x"],
    ["--action", "restore", "-p", "1", "--device-map", "a=b"],
])
def test_cli_usage_exit_2(args):
    r = _cli(*args)
    assert r.returncode == 2, r
    assert r.stdout == ""
    assert len(r.stderr.splitlines()) == 1 and r.stderr.startswith("dynsnap cuda-checkpoint: ")
    assert "Traceback" not in r.stderr


def test_cli_help():
    r = _cli("--help")
    assert r.returncode == 0 and "--get-state" in r.stdout and "--toggle" in r.stdout and r.stderr == ""


def test_main_callable_in_process(sleeper, capsys):
    from dynsnap_core.cuda.cli import main
    assert main(["--pid", str(sleeper), "--get-state"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1


def test_bindings_hidden():
    code = ("import sys; sys.modules['cuda'] = None\n"
            "import dynsnap_core.cuda as c, subprocess\n"
            "from dynsnap_core.errors import CudaUnavailable\n"
            "assert c.is_available() is False\n"
            "print(c.driver_info()['reason'])\n"
            "p = subprocess.Popen(['sleep', '30'])\n"
            "try:\n"
            "    c.lock(p.pid)\n"
            "except CudaUnavailable as e:\n"
            "    print(e)\n"
            "finally:\n"
            "    p.kill(); p.wait()\n"
            "from dynsnap_core.cuda.cli import main\n"
            "sys.exit(main(['--get-state', '--pid', str(__import__('os').getpid())]))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=_env(),
                       timeout=60)
    assert r.returncode == 1, r
    assert r.stdout.splitlines() == [NO_BINDINGS, NO_BINDINGS]
    assert r.stderr == f"dynsnap cuda-checkpoint: {NO_BINDINGS}\n"
