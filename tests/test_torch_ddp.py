"""DistributedDataParallel (2 processes, gloo, CPU) training a DeformConv2dPack model.

Oracle: [single process] the same model, seed and SGD steps on the whole batch in this process;
DDP averages the two half-batch gradients, which is the whole-batch gradient of a mean loss, so
the final parameters and the last step's gradients agree to rounding (1e-10).
"""

import os
import subprocess
import sys
import textwrap

import pytest

torch = pytest.importorskip("torch")

import deformops  # noqa: E402
import deformops_torch  # noqa: E402

WORLD = 2
STEPS = 3
BATCH = 4
LR = 0.5

MODEL_CODE = textwrap.dedent("""
    import torch
    import deformops_torch as dt

    def make_model():
        torch.manual_seed(0)
        model = torch.nn.Sequential(
            dt.DeformConv2dPack(2, 4, 3, padding=1, modulated=True), torch.nn.Tanh(),
            torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 3)).double()
        return model

    def make_data():
        g = torch.Generator().manual_seed(1)
        x = torch.randn(%(BATCH)d, 2, 6, 6, generator=g, dtype=torch.float64)
        y = torch.randn(%(BATCH)d, 3, generator=g, dtype=torch.float64)
        return x, y

    def train(model, x, y, steps):
        opt = torch.optim.SGD(model.parameters(), lr=%(LR)r)
        for _ in range(steps):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
        return model
""" % dict(BATCH=BATCH, LR=LR))

WORKER = MODEL_CODE + textwrap.dedent("""
    import datetime, sys
    import numba
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    rank, world, store, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    torch.set_num_threads(1)
    numba.set_num_threads(1)
    dist.init_process_group("gloo", init_method="file://" + store, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        model = DDP(make_model())
        x, y = make_data()
        per = x.shape[0] // world
        sl = slice(rank * per, (rank + 1) * per)
        train(model, x[sl], y[sl], %(STEPS)d)
        if rank == 0:
            torch.save({"params": {n: p.detach() for n, p in model.module.named_parameters()},
                        "grads": {n: p.grad for n, p in model.module.named_parameters()}}, out)
        dist.barrier()
    finally:
        dist.destroy_process_group()
""" % dict(STEPS=STEPS))


def _import_roots():
    """Directories from which this process imported deformops and deformops_torch (the
    checkout, adapters/, or site-packages), for the workers' PYTHONPATH."""
    roots = [os.path.dirname(os.path.dirname(os.path.abspath(m.__file__)))
             for m in (deformops, deformops_torch)]
    return os.pathsep.join(dict.fromkeys(roots + [os.environ.get("PYTHONPATH", "")]))


def test_ddp_matches_single_process(tmp_path):
    """Two gloo workers, each on half the batch, 3 SGD steps of DeformConv2dPack(modulated=True)
    + Tanh + Linear in float64: final parameters and last gradients equal a single-process run
    on the whole batch within 1e-10 [oracle: single process]."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / "rank0.pt"
    env = dict(os.environ, PYTHONPATH=_import_roots(), NUMBA_NUM_THREADS="1",
               OMP_NUM_THREADS="1")
    store = tmp_path / "store"
    procs = [subprocess.Popen([sys.executable, str(script), str(r), str(WORLD), str(store),
                               str(out)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
             for r in range(WORLD)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=180)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log

    ns = {}
    exec(compile(MODEL_CODE, "<model>", "exec"), ns)
    ref = ns["train"](ns["make_model"](), *ns["make_data"](), STEPS)
    got = torch.load(out, weights_only=True)
    start = dict(ns["make_model"]().named_parameters())
    moved = 0
    for name, p in ref.named_parameters():
        torch.testing.assert_close(got["params"][name], p.detach(), rtol=0, atol=1e-10)
        torch.testing.assert_close(got["grads"][name], p.grad, rtol=0, atol=1e-10)
        moved += not torch.equal(p.detach(), start[name].detach())
    assert moved == len(start)  # every parameter trained, the offset predictor included
