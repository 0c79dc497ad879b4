"""Ranks for tests/test_fp16_wire.py: the scaled float16 wire on real MPI ranks.

For naive, flat and hierarchical with a float16 wire, under both ``half_scaling``
schemes, on gradients spanning 1e-9 .. 1e1 (every rank different, seeded):

* every rank holds bitwise the same result (sha256 over all gradients);
* three rounds on one communicator (fresh, the same gradients again, other gradients:
  cached buffers and engines must not leak state between calls) all give the model's bits;
* the result equals, bit for bit, :func:`hpcsgd.comm.fp16_model.simulate` of the same
  job (flat: one rank per node; hierarchical: the topology's ranks per node), which
  is what the large-N study relies on;
* 'chunk' is within its bound of the float64 mean: per element
  ``|got - ref| <= 2u m + 2u |ref| + 2^-36 gmax + 4 (n+2) 2^-24 m`` (``u = 2^-11``,
  ``m = mean_i |g_i|``, ``gmax = max m``; the last term is
  float32 accumulation): one rounding of each row and one of the sum, each relative,
  down to ``2^-29`` of the chunk's largest value;
* adversarial gradients (3e5 on one rank, 1e30 on all, 65504 * 4096) do not overflow
  under 'chunk'; an inf gradient still raises GradientOverflowError on every rank.

Usage: check_fp16_wire.py  (HPCSGD_RANKS_PER_NODE decides the node split)
"""

from __future__ import annotations

import hashlib

import chainer
import numpy as np
from mpi4py import MPI

import hpcsgd
from hpcsgd.comm import fp16_model
from hpcsgd.errors import GradientOverflowError, NonFiniteGradientError

world = MPI.COMM_WORLD
rank, size = world.Get_rank(), world.Get_size()
SHAPES = {"a/W": (33, 5), "a/b": (7,), "b/W": (17, 3, 3, 3), "c/b": (3,), "d/W": (1000,), "e/W": (64, 9)}
BUCKET_BYTES = 1536


def make_model():
    link = chainer.Link()
    with link.init_scope():
        for name, shape in SHAPES.items():
            setattr(link, name.replace("/", "_"), chainer.Parameter(np.zeros(shape, np.float32)))
    return link


def fill(model, seed, scale=1.0):
    rng = np.random.default_rng(seed)
    for _, p in sorted(model.namedparams()):
        g = rng.standard_normal(p.shape) * 10.0 ** rng.uniform(-9, 1, p.shape) * scale
        g[rng.random(p.shape) < 0.05] = 0.0
        p.grad = g.astype(np.float32)
    return flat(model)


def flat(model):
    return np.concatenate([p.grad.reshape(-1) for _, p in sorted(model.namedparams())]).astype(np.float32)


def digest(model) -> str:
    return hashlib.sha256(flat(model).tobytes()).hexdigest()


def wire_config(name):
    """float16 on the wire; hierarchical keeps float32 in the node (its default) and float16 between."""
    return {"inter_dtype": "float16"} if name == "hierarchical" else {"allreduce_grad_dtype": "float16"}


def check(name, scheme):
    comm = hpcsgd.create_communicator(name, bucket_bytes=BUCKET_BYTES, half_scaling=scheme,
                                      **wire_config(name))
    label = f"{name}/{scheme} n={size} nodes={comm.inter_size}x{comm.intra_size}"
    model = make_model()
    # rounds on one communicator: fresh, the same gradients again, other gradients
    for seed in (100, 100, 200):
        mine = fill(model, seed + rank, scale=1.0 / size)
        grads = world.allgather(mine)
        comm.multi_node_mean_grad(model)
        check_round(comm, name, scheme, label + f" seed={seed}", model, grads)
    comm.finalize()
    return label


def check_round(comm, name, scheme, label, model, grads):
    k, nodes = comm.intra_size, comm.inter_size
    got = flat(model)
    assert len(set(world.allgather(digest(model)))) == 1, f"{label}: ranks disagree"
    wired = name != "hierarchical" or nodes > 1  # hierarchical on one node: float32 only
    if name == "flat" or (name == "hierarchical" and nodes > 1 and (k == 1 or not comm.topology.uniform)):
        sim = fp16_model.simulate(grads, size, scheme, ranks_per_node=1, bucket_elems=BUCKET_BYTES // 2)
    elif name == "hierarchical" and nodes > 1:
        sim = fp16_model.simulate(grads, size, scheme, ranks_per_node=k, bucket_elems=BUCKET_BYTES // 4)
    else:
        sim = None  # naive: per parameter; hierarchical on one node: float32 only
    if sim is not None:
        diff = int((sim.view(np.uint32) != got.view(np.uint32)).sum())
        assert diff == 0, f"{label}: {diff} elements differ from fp16_model.simulate"
    if scheme == "chunk" and wired:
        ref = np.mean(np.array(grads, np.float64), 0)
        m = np.mean(np.abs(np.array(grads, np.float64)), 0)
        u = 2.0 ** -11
        tol = 2 * u * m + 2 * u * np.abs(ref) + 2.0 ** -36 * m.max() + 4 * (size + 2) * 2.0 ** -24 * m
        err = np.abs(got - ref)
        worst = int(np.argmax(err / np.maximum(tol, 1e-300)))
        assert (err <= tol).all(), f"{label}: element {worst} off by {err[worst]:.3g} > {tol[worst]:.3g}"


def check_adversarial(name):
    # check_finite: the error path of hpcsgd train and the multi-node optimizer (a bare
    # communicator averages inf/nan as ChainerMN does and only counts them)
    comm = hpcsgd.create_communicator(name, bucket_bytes=BUCKET_BYTES, check_finite=True,
                                      **wire_config(name))
    label = f"{name}/chunk n={size} adversarial"
    for big in (3e5, 1e30, 65504.0 * 4096):
        model = make_model()
        fill(model, 7 + rank)
        model.d_W.grad[:] = big if rank == size - 1 else 1.0
        model.a_W.grad[0, 0] = -big  # every rank
        comm.multi_node_mean_grad(model)  # must not raise
        mean_d = (big + (size - 1)) / size
        assert np.allclose(model.d_W.grad, mean_d, rtol=2 ** -10), f"{label}: {big} came back wrong"
        assert np.isclose(model.a_W.grad[0, 0], -big, rtol=2 ** -10), f"{label}: {-big} came back wrong"
        assert len(set(world.allgather(digest(model)))) == 1, f"{label}: ranks disagree"
    model = make_model()
    fill(model, 9 + rank)
    if rank == 0:
        model.b_W.grad[0, 0, 0, 0] = np.inf
    wired = name != "hierarchical" or comm.inter_size > 1
    expected = GradientOverflowError if wired else NonFiniteGradientError
    try:
        comm.multi_node_mean_grad(model)
        raised = False
    except NonFiniteGradientError as e:
        raised = isinstance(e, expected)
    assert all(world.allgather(raised)), f"{label}: inf did not raise {expected.__name__} everywhere"
    comm.set_config("check_finite", False)  # bare: averaged, counted identically on every rank
    comm.multi_node_mean_grad(model)
    assert comm.nonfinite_count > 0 and len(set(world.allgather(comm.nonfinite_count))) == 1, label
    comm.finalize()
    return label


def check_mixed_dtypes(name):
    """float16 and float64 parameters through the scaled float16 wire come back in their dtype."""
    comm = hpcsgd.create_communicator(name, bucket_bytes=BUCKET_BYTES, **wire_config(name))
    link = chainer.Link()
    with link.init_scope():
        link.h = chainer.Parameter(np.zeros((50,), np.float16))
        link.d = chainer.Parameter(np.zeros((3, 7), np.float64))
    rng = np.random.default_rng(rank + 5)
    link.h.grad = (rng.standard_normal(50) * 1e-3).astype(np.float16)
    link.d.grad = rng.standard_normal((3, 7)) * 1e-7
    every = dict(zip(("h", "d"), zip(*world.allgather((link.h.grad.astype(np.float64), link.d.grad.copy())))))
    ref = {n: np.mean(g, 0) for n, g in every.items()}
    tol = {n: 2.0 ** -10 * (np.mean(np.abs(g), 0) + np.abs(ref[n])) for n, g in every.items()}
    comm.multi_node_mean_grad(link)
    label = f"{name}/chunk n={size} mixed dtypes"
    assert link.h.grad.dtype == np.float16 and link.d.grad.dtype == np.float64, f"{label}: dtypes changed"
    # float16 parameters round once more on the way back (half an ulp of float16)
    h_tol = tol["h"] + np.abs(ref["h"]) * 2.0 ** -11 + 2.0 ** -25
    assert (np.abs(link.h.grad - ref["h"]) <= h_tol).all(), f"{label}: float16 param mean"
    assert (np.abs(link.d.grad - ref["d"]) <= tol["d"]).all(), f"{label}: float64 param mean"
    comm.finalize()
    return label


def main():
    done = []
    for name in ("naive", "flat", "hierarchical"):
        for scheme in ("chunk", "predivide"):
            done.append(check(name, scheme))
        done.append(check_adversarial(name))
        done.append(check_mixed_dtypes(name))
    if rank == 0:
        print("\n".join(done))
    print(f"rank {rank}: fp16 wire checks passed", flush=True)


if __name__ == "__main__":
    main()
