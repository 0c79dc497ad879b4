"""The scaled float16 GPU wire on a real GPU (skipped without CuPy and a CUDA device).

One process, one rank, so NCCL spans one GPU and the sum is the identity: what is
checked is the CUDA side of hpcsgd/comm/half_scale.py (device maxima, the uint32 MAX
allreduce, the host read, pack with ``2^e``, unpack with ``2^-e / size``) against a
NumPy model of the same casts, and against the float64 gradients. The many-rank
arithmetic is tested on CPU with a stand-in NCCL (tests/test_nccl_half_scale.py).
Run by ``benchmarks/gpu_validate.sh`` (its ``tests`` step runs every ``gpu`` test).
"""

import numpy as np
import pytest
from gpu_skip import require_cuda

cupy = require_cuda()
pytestmark = pytest.mark.gpu

import chainer  # noqa: E402

import hpcsgd  # noqa: E402
from hpcsgd.comm import half_scale  # noqa: E402
from hpcsgd.comm.packing import GradLayout  # noqa: E402

SHAPES = [(3, 5), (700,), (17, 3, 3, 3), (1,), (4096, 9)]
BUCKET_BYTES = 16 << 10


@pytest.fixture(autouse=True)
def device0():
    with cupy.cuda.Device(0):
        yield


def grad_link(factor: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    link = chainer.Link()
    with link.init_scope():
        for i, shape in enumerate(SHAPES):
            setattr(link, f"p{i}", chainer.Parameter(np.zeros(shape, np.float32)))
    link.to_device(0)
    ref = []
    for _, p in sorted(link.namedparams()):
        g = (rng.standard_normal(p.shape) * 3 * factor).astype(np.float32)
        p.grad = cupy.asarray(g)
        ref.append(g)
    return link, ref


def scaled_model(flat: np.ndarray, world: int = 1) -> np.ndarray:
    """NumPy model of one rank's scaled float16 wire: per bucket ``f16(g 2^e) * (2^-e / world)``."""
    out = np.empty_like(flat)
    layout = GradLayout.from_named([("x", chainer.Parameter(flat))])
    for lo, hi in layout.bucket_ranges(BUCKET_BYTES, 2):
        e = half_scale.scale_exponent(int(half_scale.absmax_bits(flat[lo:hi])), world)
        h = (flat[lo:hi] * half_scale.pack_scale(e)).astype(np.float16)
        out[lo:hi] = h.astype(np.float32) * half_scale.unpack_scale(e, world)
    return out


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64])
def test_device_maxima_match_numpy_including_inf_and_nan(dtype):
    rng = np.random.default_rng(1)
    x = (rng.standard_normal(100_003) * 1e-3).astype(dtype)
    for special in (None, np.inf, np.nan):
        if special is not None:
            x[77_777] = special
        got = int(half_scale.absmax_bits(cupy.asarray(x)))
        assert got == int(half_scale.absmax_bits(x))


@pytest.mark.parametrize("name", ["nccl", "hierarchical"])
@pytest.mark.parametrize("factor", [1.0, 1e-6])
def test_one_rank_scaled_float16_mean_is_the_numpy_model_and_keeps_small_gradients(name, factor):
    link, ref = grad_link(factor)
    flat = np.concatenate([g.ravel() for g in ref])
    results = {}
    for scaling in ("chunk", "predivide"):
        for (_, p), g in zip(sorted(link.namedparams()), ref):
            p.grad = cupy.asarray(g)
        comm = hpcsgd.create_communicator(name, allreduce_grad_dtype="float16", bucket_bytes=BUCKET_BYTES,
                                          half_scaling=scaling)
        comm.multi_node_mean_grad(link)
        results[scaling] = np.concatenate([cupy.asnumpy(p.grad).ravel()
                                           for _, p in sorted(link.namedparams())])
        comm.finalize()
    np.testing.assert_array_equal(results["chunk"], scaled_model(flat))
    np.testing.assert_allclose(results["chunk"], flat, rtol=2.0 ** -11, atol=0)  # all normal float16
    np.testing.assert_array_equal(results["predivide"], flat.astype(np.float16).astype(np.float32))
    flushed = {k: int(np.sum((v == 0) & (flat != 0))) for k, v in results.items()}
    assert flushed["chunk"] == 0
    if factor < 1e-4:  # 3e-6 gradients cast as they are: subnormals, |g| < 2^-25 flushed (~0.8%)
        assert flushed["predivide"] > 100
