"""Rank side of tests/test_faults_overflow.py: a float16 overflow in the gradients skips the step.

Usage: check_fault_overflow.py NAME
Three updates of a small model with create_multi_node_optimizer over communicator NAME with
a float16 wire format (the pre-dividing scheme): step 1 normal, step 2 with a gradient of 3e5
on the last rank (beyond float16's 65504 even after dividing by the number of ranks), step 3
normal. Checks that step 2
raised GradientOverflowError inside the communicator, was skipped on every rank and counted,
that no parameter ever held inf/nan, and that step 3 updated again. Prints "FAULT ... t=".
"""

import logging
import sys
import time

import chainer
import chainer.links as L
import numpy as np
from mpi4py import MPI

import hpcsgd
from hpcsgd.errors import GradientOverflowError

logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stdout)
name = sys.argv[1]
world = MPI.COMM_WORLD
# 'predivide': grad / size cast straight to float16 can overflow; the default per-message
# scale carries 3e5 without overflow (tests/mpi/check_fp16_wire.py), so only this scheme
# (or a non-finite local gradient) reaches the overflow handling
comm = hpcsgd.create_communicator(name, allreduce_grad_dtype="float16", half_scaling="predivide")
model = L.Linear(16, 8)
opt = hpcsgd.create_multi_node_optimizer(chainer.optimizers.SGD(lr=0.1), comm)
opt.setup(model)


def params():
    return {n: p.array.copy() for n, p in model.namedparams()}


def step(scale: float):
    model.cleargrads()
    for n, p in model.namedparams():
        p.grad = np.full(p.shape, 0.01 * (world.rank + 1), np.float32)
        if scale and world.rank == world.size - 1 and n == "/W":
            p.grad[0, 0] = scale
    return opt.update()


p0 = params()
assert step(0), "step 1 should update"
p1 = params()
assert any(not np.array_equal(p0[n], p1[n]) for n in p0), "step 1 changed nothing"

# The communicator itself must raise the overflow (the optimizer catches it).
model.cleargrads()
for n, p in model.namedparams():
    p.grad = np.zeros(p.shape, np.float32)
    if world.rank == world.size - 1 and n == "/W":
        p.grad[0, 0] = 3e5
try:
    comm.multi_node_mean_grad(model)
    raised = None
except GradientOverflowError as e:
    raised = e
assert raised is not None, f"{name}: float16 wire with a 3e5 gradient did not raise GradientOverflowError"

if world.rank == world.size - 1:
    print(f"FAULT fp16 overflow rank {world.rank} t={time.time():.3f}", flush=True)
t0 = time.time()
updated = step(3e5)
detect = time.time() - t0
p2 = params()
assert not updated, "the overflowing step was applied"
assert opt.skipped_steps == 1, opt.skipped_steps
for n in p1:
    assert np.array_equal(p1[n], p2[n]), f"{n} changed in the skipped step"
    assert np.isfinite(p2[n]).all(), f"{n} holds inf/nan"
assert step(0), "step 3 should update again"
p3 = params()
assert all(np.isfinite(a).all() for a in p3.values())
assert any(not np.array_equal(p2[n], p3[n]) for n in p2)
skipped = world.allgather(opt.skipped_steps)
assert skipped == [1] * world.size, f"ranks disagree on skipped steps: {skipped}"
print(f"rank {world.rank} overflow ok: {type(raised).__name__}: {raised}; skipped_steps=1 "
      f"detect_s={detect:.4f}", flush=True)
