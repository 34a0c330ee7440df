"""dynsnap_core.cuda against the real driver on a torch worker: round trip, lock timeout, states, devices."""
from __future__ import annotations

import os
import subprocess
import time

import pytest

from gpu_harness import nvidia_fds

pytestmark = pytest.mark.gpu


def test_lock_checkpoint_restore_unlock_keeps_data(worker):
    import dynsnap_core.cuda as cuda
    pid = worker.pid
    h0, m0, s0 = worker.request("hash"), worker.request("matmul"), worker.request("sum")
    assert cuda.state(pid) is cuda.CudaState.RUNNING
    assert nvidia_fds(pid), "a running torch worker should hold /dev/nvidia* fds"
    tid = cuda.restore_thread_id(pid)
    assert tid > 0 and os.path.exists(f"/proc/{pid}/task/{tid}")

    t = time.monotonic()
    cuda.lock(pid, 10000)
    t_lock = time.monotonic() - t
    assert cuda.state(pid) is cuda.CudaState.LOCKED
    t = time.monotonic()
    cuda.checkpoint(pid)
    t_ckpt = time.monotonic() - t
    assert cuda.state(pid) is cuda.CudaState.CHECKPOINTED
    assert nvidia_fds(pid) == [], "a checkpointed process must hold no /dev/nvidia* fds"
    mem = cuda.process_gpu_memory(pid)
    assert mem is None or mem < 64 << 20, f"a checkpointed process still holds {mem} bytes of GPU memory"
    t = time.monotonic()
    cuda.restore(pid)
    t_rest = time.monotonic() - t
    assert cuda.state(pid) is cuda.CudaState.LOCKED
    cuda.unlock(pid)
    assert cuda.state(pid) is cuda.CudaState.RUNNING
    print(f"lock {t_lock * 1000:.1f} ms, checkpoint {t_ckpt:.2f} s, restore {t_rest:.2f} s")

    assert worker.request("hash") == h0
    assert worker.request("matmul") == m0
    assert worker.request("sum") == s0
    c1 = int(worker.request("count"))
    time.sleep(0.5)
    assert int(worker.request("count")) > c1, "the background matmul loop must run again"


def test_restore_with_identity_device_map(worker):
    import dynsnap_core.cuda as cuda
    devs = cuda.devices()
    assert devs and all(d["uuid"].startswith("GPU-") and d["total_memory"] > 0 for d in devs)
    h0 = worker.request("hash")
    cuda.lock(worker.pid)
    cuda.checkpoint(worker.pid)
    cuda.restore(worker.pid, {d["uuid"]: d["uuid"] for d in devs})
    cuda.unlock(worker.pid)
    assert worker.request("hash") == h0


def test_lock_timeout_while_long_kernel_runs(worker):
    import dynsnap_core.cuda as cuda
    from dynsnap_core.errors import CudaTimeout
    h0 = worker.request("hash")
    assert worker.request("sleep 8000") == "ok"       # the GPU is busy for ~8 s from now
    t = time.monotonic()
    with pytest.raises(CudaTimeout) as info:
        cuda.lock(worker.pid, timeout_ms=500)
    took = time.monotonic() - t
    assert info.value.driver_error and info.value.pid == worker.pid
    assert "did not lock within 500 ms" in str(info.value)
    assert took < 5.0, f"lock with a 500 ms timeout took {took:.1f} s"
    assert cuda.state(worker.pid) is cuda.CudaState.RUNNING
    assert worker.request("ping") == "pong"
    assert worker.request("hash", timeout=120) == h0    # answers once the long kernel is done


def test_wrong_state_errors(worker):
    import dynsnap_core.cuda as cuda
    from dynsnap_core.errors import CudaStateError
    pid = worker.pid
    with pytest.raises(CudaStateError, match=f"process {pid} is running, not locked: lock it first"):
        cuda.checkpoint(pid)
    with pytest.raises(CudaStateError, match="nothing to unlock"):
        cuda.unlock(pid)
    with pytest.raises(CudaStateError, match="nothing to restore"):
        cuda.restore(pid)
    cuda.lock(pid)
    try:
        with pytest.raises(CudaStateError, match="already locked"):
            cuda.lock(pid, 1000)
    finally:
        cuda.unlock(pid)
    assert worker.request("ping") == "pong"


def test_not_a_cuda_process(worker):
    import dynsnap_core.cuda as cuda
    from dynsnap_core.errors import CudaNotCudaProcess
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        with pytest.raises(CudaNotCudaProcess):
            cuda.state(sleeper.pid)
        with pytest.raises(CudaNotCudaProcess):
            cuda.lock(sleeper.pid, 1000)
        assert cuda.cuda_pids([sleeper.pid, worker.pid]) == [worker.pid]
    finally:
        sleeper.kill()
        sleeper.wait()


@pytest.mark.parametrize("stop_at", ["locked", "checkpointed"])
def test_tree_rollback(worker, stop_at):
    import dynsnap_core.cuda as cuda
    h0 = worker.request("hash")
    tree = cuda.CudaTree([worker.pid], timeout_ms=10000)
    tree.lock_all()
    if stop_at == "checkpointed":
        tree.checkpoint_all()
        assert cuda.state(worker.pid) is cuda.CudaState.CHECKPOINTED
    else:
        assert cuda.state(worker.pid) is cuda.CudaState.LOCKED
    assert tree.rollback() == []
    assert cuda.state(worker.pid) is cuda.CudaState.RUNNING
    assert tree.rollback() == []           # idempotent
    assert worker.request("hash") == h0


def test_tree_round_trip_and_timings(worker_factory):
    import dynsnap_core.cuda as cuda
    ws = [worker_factory(0.5, seed=s) for s in (1, 2)]
    hashes = [w.request("hash") for w in ws]
    tree = cuda.CudaTree([w.pid for w in ws])
    tree.lock_all()
    tree.checkpoint_all()
    assert all(cuda.state(w.pid) is cuda.CudaState.CHECKPOINTED for w in ws)
    tree.restore_all()
    assert all(cuda.state(w.pid) is cuda.CudaState.LOCKED for w in ws)
    tree.unlock_all()
    assert set(tree.timings) == {"lock", "gpu_checkpoint", "gpu_restore", "unlock"}
    assert all(v >= 0 for v in tree.timings.values())
    assert [w.request("hash") for w in ws] == hashes


def test_tree_context_manager_rolls_back(worker):
    import dynsnap_core.cuda as cuda
    with pytest.raises(RuntimeError):
        with cuda.CudaTree([worker.pid]) as tree:
            tree.lock_all()
            tree.checkpoint_all()
            raise RuntimeError("CRIU failed (simulated)")
    assert cuda.state(worker.pid) is cuda.CudaState.RUNNING
    assert worker.request("ping") == "pong"
