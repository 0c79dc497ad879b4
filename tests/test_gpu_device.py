"""The GPU path on a real GPU (skipped without CuPy and a CUDA device): run by benchmarks/gpu_validate.sh.

One process, one rank (mpi4py's singleton), so the NCCL communicators span one
GPU: the reduction is the identity, and every result is checked against a NumPy
reference of the same casts (float32 exact; float16 = round to half and back).
"""

import threading

import numpy as np
import pytest
from gpu_skip import require_cuda

cupy = require_cuda()
N_GPUS = cupy.cuda.runtime.getDeviceCount()
pytestmark = pytest.mark.gpu

import chainer  # noqa: E402

import hpcsgd  # noqa: E402
from hpcsgd.errors import NonFiniteGradientError  # noqa: E402

SHAPES = [(3, 5), (700,), (17, 3, 3, 3), (1,), (4096, 9)]


def grad_link(device: int = 0, seed: int = 0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    link = chainer.Link()
    with link.init_scope():
        for i, shape in enumerate(SHAPES):
            setattr(link, f"p{i}", chainer.Parameter(np.zeros(shape, dtype)))
    link.to_device(device)
    ref = []
    for _, p in sorted(link.namedparams()):
        g = (rng.standard_normal(p.shape) * 3).astype(dtype)
        p.grad = cupy.asarray(g)
        ref.append(g)
    return link, ref


def grads(link):
    return [cupy.asnumpy(p.grad) for _, p in sorted(link.namedparams())]


@pytest.fixture(autouse=True)
def device0():
    with cupy.cuda.Device(0):
        yield


def test_environment_is_the_supported_pair():
    from hpcsgd import gpu_compat

    r = gpu_compat.report()
    assert r["problems"] == [], r


@pytest.mark.parametrize("name", ["nccl", "hierarchical", "dummy"])
@pytest.mark.parametrize("wire", ["float32", "float16", "bfloat16"])
def test_one_rank_mean_is_the_gradient_through_the_wire_format(name, wire):
    link, ref = grad_link()
    # the old cast of grad / size; the scaled float16 default is checked in test_gpu_half_scale.py
    comm = hpcsgd.create_communicator(name, allreduce_grad_dtype=wire, bucket_bytes=16 << 10,
                                      half_scaling="predivide")
    for _ in range(2):  # the second step reuses the cached pointer tables
        for (_, p), g in zip(sorted(link.namedparams()), ref):
            p.grad = cupy.asarray(g)
        comm.multi_node_mean_grad(link)
        for got, g in zip(grads(link), ref):
            if wire == "float32":
                np.testing.assert_array_equal(got, g)
            elif wire == "float16":
                np.testing.assert_array_equal(got, g.astype(np.float16).astype(np.float32))
            else:  # bfloat16: round to nearest even on the upper 16 bits
                u = g.view(np.uint32).astype(np.uint64)
                r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16 << 16).astype(np.uint32).view(np.float32)
                np.testing.assert_array_equal(got, r)
    comm.finalize()


@pytest.mark.parametrize("name", ["nccl", "hierarchical"])
def test_non_finite_gradients_are_counted_and_raise(name):
    link, ref = grad_link()
    p = sorted(link.namedparams())[2][1]
    p.grad[0, 0, 0, 0] = cupy.inf
    p.grad[1, 0, 0, 0] = cupy.nan
    comm = hpcsgd.create_communicator(name, bucket_bytes=16 << 10)
    with pytest.raises(NonFiniteGradientError) as info:
        comm.multi_node_mean_grad(link)
    assert info.value.count == 2
    comm.finalize()


def test_float16_parameters_take_the_per_piece_kernels():
    link, ref = grad_link(dtype=np.float16)
    comm = hpcsgd.create_communicator("nccl")
    comm.multi_node_mean_grad(link)
    for got, g in zip(grads(link), ref):
        np.testing.assert_array_equal(got, g)
    comm.finalize()


def test_bucket_reducer_runs_on_the_right_device_from_a_worker_thread():
    dev = N_GPUS - 1
    with cupy.cuda.Device(dev):
        link, ref = grad_link(device=dev)
        comm = hpcsgd.create_communicator("nccl")
        reducer = comm.bucket_reducer(link, threaded=False)
    errors = []

    def work():  # a new thread starts on device 0
        try:
            reducer.wait_all()
        except Exception as e:
            errors.append(e)

    t = threading.Thread(target=work)
    t.start()
    t.join(60)
    assert not errors, errors
    for got, g in zip(grads(link), ref):
        np.testing.assert_array_equal(got, g)
    comm.finalize()


def test_select_gpu_gives_this_rank_a_device():
    from hpcsgd.runtime.topology import select_gpu

    assert select_gpu() == 0


def test_sync_batchnorm_on_gpu_matches_cpu():
    from hpcsgd.models.batchnorm import BatchNorm

    comm = hpcsgd.create_communicator("hierarchical")
    x = np.random.default_rng(1).standard_normal((8, 6, 5, 5)).astype(np.float32)
    out = {}
    for dev in ("cpu", "gpu"):
        bn = BatchNorm(6, mode="sync", comm=comm)
        xv = chainer.Variable(x.copy() if dev == "cpu" else cupy.asarray(x))
        if dev == "gpu":
            bn.to_device(0)
        with chainer.using_config("train", True):
            y = bn(xv)
        chainer.functions.sum(y * y).backward()
        out[dev] = [chainer.backend.CpuDevice().send(a) for a in (y.array, xv.grad, bn.gamma.grad,
                                                                   bn.avg_mean, bn.avg_var)]
    for a, b in zip(out["cpu"], out["gpu"]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    comm.finalize()
