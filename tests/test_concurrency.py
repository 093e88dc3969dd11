"""Calls from several threads at once, and from processes forked after a deformops call
(``multiprocessing`` fork pools, torch ``DataLoader`` workers).

Threads: each keeps its own workspace and all share Numba's team and the BLAS limit. Oracle:
the same calls made one at a time, bit for bit, and BLAS's thread counts as before.

Forks: Numba's GNU OpenMP layer terminates a forked child at its first parallel launch when the
parent had started it (``deformops.backends.cpu._threads``); the kernels must then run serially
there. Each case runs in a fresh interpreter (the test process has other threads, and forking
it would test more than this). Oracle: the parent's own results, bit for bit (the kernels' sums
do not depend on the thread count).
"""

import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor

import pytest
import threadpoolctl

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

# the calls of every CPU kernel family (forward and backward, both layouts), on fixed inputs
_CALLS = r"""
import numpy as np
import deformops as dops
from deformops import _forks

def calls(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((3, 8, 9, 11))
    coords = rng.uniform(-2, 12, (3, 5, 6, 2))
    off = rng.uniform(-2, 2, (3, 18, 9, 11))
    msk = rng.uniform(0, 1, (3, 9, 9, 11))
    w = rng.standard_normal((6, 8, 3, 3))
    b = rng.standard_normal(6)
    out = {"map_coordinates": dops.map_coordinates(x[0, 0], coords[0].transpose(2, 0, 1),
                                                   order=1, mode="reflect")}
    for layout in ("NCHW", "NHWC"):
        xl = x if layout == "NCHW" else x.transpose(0, 2, 3, 1).copy()
        cl = coords if layout == "NHWC" else coords.transpose(0, 3, 1, 2).copy()
        s = dops.sample(xl, cl, mode="mirror", layout=layout)
        gs = dops.sample_backward(np.ones_like(s), xl, cl, mode="mirror", layout=layout)
        out[f"sample {layout}"] = (s, gs.grad_input, gs.grad_coords)
        ol = off if layout == "NCHW" else off.transpose(0, 2, 3, 1).copy()
        ml = msk if layout == "NCHW" else msk.transpose(0, 2, 3, 1).copy()
        y = dops.deform_conv2d(xl, ol, w, b, padding=1, mask=ml, layout=layout)
        g = dops.deform_conv2d_backward(np.cos(y), xl, ol, w, padding=1, mask=ml,
                                        layout=layout)
        out[f"deform_conv2d {layout}"] = (y, g.grad_input, g.grad_offset, g.grad_weight,
                                          g.grad_mask, g.grad_bias)
    return out

def same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        u, v = (a[k],) if isinstance(a[k], np.ndarray) else a[k], (b[k],) if isinstance(
            b[k], np.ndarray) else b[k]
        assert len(u) == len(v) and all(
            (p is None and q is None) or np.array_equal(p, q) for p, q in zip(u, v)), k
"""


def test_calls_from_several_threads_at_once_match_calls_one_at_a_time():
    namespace = {}
    exec(_CALLS, namespace)
    calls, same = namespace["calls"], namespace["same"]
    seeds = [0, 1, 2] * 4
    expected = {seed: calls(seed) for seed in set(seeds)}
    blas_threads = [p["num_threads"] for p in threadpoolctl.threadpool_info()
                    if p["user_api"] == "blas"]
    with ThreadPoolExecutor(4) as pool:
        for seed, got in zip(seeds, pool.map(calls, seeds)):
            same(expected[seed], got)
    # BLAS runs on one thread during calls; overlapping calls once left it so for good
    assert [p["num_threads"] for p in threadpoolctl.threadpool_info()
            if p["user_api"] == "blas"] == blas_threads


def test_a_call_from_a_second_thread_runs_blas_on_one_thread_like_the_first():
    """Oracle: the same call from the main thread, bit for bit, at a size whose matmuls BLAS
    would split among its threads; and BLAS's thread counts inside a call from that thread.
    (threadpoolctl ignored limits set by any thread but the first that set one.)"""
    import threading

    import numpy as np

    import deformops as dops
    from deformops.backends.cpu import deform_conv as cpu_conv

    if max((p["num_threads"] for p in threadpoolctl.threadpool_info()
            if p["user_api"] == "blas"), default=1) < 2:
        pytest.skip("BLAS runs on one thread here anyway")

    rng = np.random.default_rng(0)
    x = rng.random((8, 64, 28, 28), np.float32)
    off = rng.uniform(-2, 2, (8, 18, 28, 28)).astype(np.float32)
    w = rng.random((64, 64, 3, 3), np.float32)
    go = rng.standard_normal((8, 64, 28, 28)).astype(np.float32)
    main = dops.deform_conv2d_backward(go, x, off, w, padding=1).grad_weight
    got = {}

    def second():
        got["grad_weight"] = dops.deform_conv2d_backward(go, x, off, w, padding=1).grad_weight
        with cpu_conv._one_blas_thread():
            got["threads"] = [p["num_threads"] for p in threadpoolctl.threadpool_info()
                              if p["user_api"] == "blas"]

    t = threading.Thread(target=second)
    t.start()
    t.join()
    assert got["threads"] and set(got["threads"]) == {1}
    assert np.array_equal(got["grad_weight"], main)


def _run(body, timeout=300):
    script = _CALLS + textwrap.dedent(body)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_fork_pool_workers_run_every_kernel_after_the_parent_did():
    out = _run("""
        import multiprocessing as mp, numba
        from deformops.backends.cpu import _threads

        def child(seed):
            return _forks.forked_from_gnu_openmp(), _threads.count(), calls(seed)

        parent = calls()
        gnu = _forks._gnu_openmp_started()
        with mp.get_context("fork").Pool(2) as pool:
            results = pool.map_async(child, [0, 0]).get(timeout=300)
        for serial, count, res in results:
            assert serial == gnu and count == (1 if gnu else numba.get_num_threads())
            same(parent, res)
        same(parent, calls())  # and the parent keeps its team
        print("layer", numba.threading_layer(), "serial children", gnu)
    """)
    assert "layer" in out


def test_a_parent_that_ran_only_its_own_numba_code_forks_serial_children():
    """The parent started GNU OpenMP with its own ``parallel=True`` function and never ran a
    deformops kernel (so the CPU backend was never imported): its children are serial too."""
    _run("""
        import os, sys
        from numba import njit, prange

        @njit(parallel=True)
        def total(a):
            s = 0.0
            for i in prange(a.size):
                s += a[i]
            return s

        total(np.ones(1000))
        assert "deformops.backends.cpu" not in sys.modules
        gnu = _forks._gnu_openmp_started()
        pid = os.fork()
        if pid == 0:
            serial = _forks.forked_from_gnu_openmp()
            res = calls()
            os._exit(0 if serial == gnu and res else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, status
    """)


def test_a_child_forked_before_any_parallel_region_keeps_numbas_team():
    _run("""
        import os
        pid = os.fork()
        if pid == 0:
            ok = not _forks.forked_from_gnu_openmp() and calls() is not None
            os._exit(0 if ok and not _forks.forked_from_gnu_openmp() else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, status
    """)


def test_grandchildren_stay_serial():
    _run("""
        import os
        parent = calls()
        pid = os.fork()
        if pid == 0:
            pid2 = os.fork()
            if pid2 == 0:
                same(parent, calls())
                os._exit(0)
            _, status = os.waitpid(pid2, 0)
            os._exit(os.waitstatus_to_exitcode(status))
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, status
    """)


def test_a_child_forked_while_another_thread_is_inside_a_call_gets_fresh_blas_state():
    """A fork while another thread is inside a deform_conv2d call (holding the BLAS limit's
    lock, BLAS limited to one thread): the child's own calls run (they waited forever on the
    inherited lock), and its BLAS is back on the parent's thread count afterwards (it stayed on
    one). The other thread's state is held open with events, so the fork lands inside."""
    _run("""
        import os, signal, threading
        import threadpoolctl
        from deformops.backends.cpu import deform_conv as cpu_conv

        def blas_threads():
            return [p["num_threads"] for p in threadpoolctl.threadpool_info()
                    if p["user_api"] == "blas"]

        parent = calls()
        before = blas_threads()
        inside, release = threading.Event(), threading.Event()

        def in_a_call():
            with cpu_conv._one_blas_thread():  # what every deform_conv2d call holds
                with cpu_conv._blas_lock:  # and the moment it enters or leaves
                    inside.set()
                    release.wait()

        t = threading.Thread(target=in_a_call)
        t.start()
        inside.wait()
        pid = os.fork()
        if pid == 0:
            signal.alarm(120)  # a hang ends the child, not the test run
            same(parent, calls())
            os._exit(0 if blas_threads() == before else 3)
        release.set()
        t.join()
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, status
        assert blas_threads() == before
    """)


def test_torch_dataloader_workers_call_the_ops_after_the_main_process_did():
    pytest.importorskip("torch")
    _run("""
        import torch, deformops_torch as dt

        class Warped(torch.utils.data.Dataset):
            def __len__(self):
                return 4
            def __getitem__(self, i):
                g = torch.Generator().manual_seed(i)
                x = torch.rand(1, 3, 16, 16, generator=g, dtype=torch.float64)
                off = torch.rand(1, 2, 16, 16, generator=g, dtype=torch.float64) - 0.5
                return dt.deform_sample(x, off)[0]

        data = Warped()
        expected = torch.stack([data[i] for i in range(4)])  # the main process starts Numba
        loader = torch.utils.data.DataLoader(data, batch_size=2, num_workers=2,
                                             multiprocessing_context="fork", timeout=300)
        for epoch in range(2):  # workers are forked again each epoch
            got = torch.cat(list(loader))
            assert torch.equal(got, expected), epoch
    """)


# ------------------------------------------------------------------------------ thread counts


def _two_numba_threads():
    import numba

    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("Numba has one thread here")
    return numba


def test_limit_threads_is_the_calling_threads_own():
    """``limit_threads(n)`` lowers the calling thread's kernel threads to n within the block and
    gives them back after; it never raises them, and other threads keep theirs [oracle:
    ``numba.get_num_threads()`` in each thread]."""
    numba = _two_numba_threads()
    from deformops.backends.cpu import limit_threads

    before = numba.get_num_threads()
    numba.set_num_threads(2)
    try:
        with limit_threads(1):
            assert numba.get_num_threads() == 1
            with ThreadPoolExecutor(1) as pool:
                assert pool.submit(numba.get_num_threads).result() == \
                    numba.config.NUMBA_NUM_THREADS
        assert numba.get_num_threads() == 2
        numba.set_num_threads(1)
        for n in (None, 2, 5):
            with limit_threads(n):
                assert numba.get_num_threads() == 1
    finally:
        numba.set_num_threads(before)


def test_torch_ops_run_on_at_most_torchs_threads(launch_threads):
    """The torch adapter's CPU kernels follow ``torch.set_num_threads`` (1 in DataLoader
    workers, OMP_NUM_THREADS under torchrun), never above Numba's own count, and leave the
    thread's Numba count as it was [oracle: the thread count at every kernel launch]."""
    numba = _two_numba_threads()
    torch = pytest.importorskip("torch")
    import deformops_torch as dt

    x = torch.rand(2, 4, 6, 6, dtype=torch.float64, requires_grad=True)
    off = torch.rand(2, 18, 6, 6, dtype=torch.float64, requires_grad=True)
    w = torch.rand(3, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    before = numba.get_num_threads(), torch.get_num_threads()
    try:
        for numba_n, torch_n in ((2, 1), (1, 2), (2, 2)):
            numba.set_num_threads(numba_n)
            torch.set_num_threads(torch_n)
            launch_threads.clear()
            y = dt.deform_conv2d(x, off, w, padding=1).sum() + dt.sample(x, off[:, :2]).sum()
            y.backward()
            assert launch_threads and set(launch_threads) == {min(numba_n, torch_n)}
            assert numba.get_num_threads() == numba_n
    finally:
        numba.set_num_threads(before[0])
        torch.set_num_threads(before[1])


@pytest.mark.parametrize("graph", [False, True], ids=["eager", "tf.function"])
def test_tf_ops_run_on_at_most_tfs_intra_op_threads(monkeypatch, launch_threads, graph):
    """The TF adapter's CPU kernels follow TF's intra-op thread count where it is set (patched
    here: TF fixes it when its runtime starts), on whichever thread runs them [oracle: the
    thread count at every kernel launch]."""
    _two_numba_threads()
    tf = pytest.importorskip("tensorflow")
    import numpy as np

    import deformops_tf as dtf
    from deformops_tf import ops

    monkeypatch.setattr(ops, "_HANDOVER_ELEMENTS", 0)  # graph nodes use the worker thread too
    rng = np.random.default_rng(0)
    x = tf.constant(rng.random((2, 6, 6, 4)))
    off = tf.constant(rng.random((2, 6, 6, 18)))
    w = tf.constant(rng.random((3, 3, 4, 3)))

    def step():
        with tf.GradientTape() as tape:
            tape.watch(off)
            y = tf.reduce_sum(dtf.deform_conv2d(x, off, w, padding=1))
        return tape.gradient(y, off)

    run = tf.function(step) if graph else step
    for limit, want in ((1, 1), (None, 2)):
        monkeypatch.setattr(ops, "_intra_op_threads", lambda limit=limit: limit)
        launch_threads.clear()
        run()
        assert launch_threads and set(launch_threads) <= {want}
