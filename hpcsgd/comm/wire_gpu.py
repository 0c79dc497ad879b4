"""CuPy wire-format kernels: the GPU twins of :mod:`hpcsgd.comm.wire_kernels` (pack, unpack, batched).

Same semantics as the CPU kernels: ``pack`` is ``dst = wire(src * scale)``,
``unpack`` is ``dst = float32(src) * scale`` with a non-finite count riding
along. Untested on a machine without CUDA; exercised only where CuPy finds a
device (tests/test_kernels_cast.py, tests/test_gpu_*.py).
"""

from __future__ import annotations


def cupy_pack_kernel(wire: str):
    """CuPy ElementwiseKernel ``(float32 src, float32 scale) -> wire dst`` (one fused pass)."""
    import cupy

    if wire == "float32":
        return cupy.ElementwiseKernel("float32 x, float32 s", "float32 y", "y = x * s", "hpcsgd_pack_f32")
    if wire == "float16":
        return cupy.ElementwiseKernel("float32 x, float32 s", "float16 y", "y = (float16)(x * s)",
                                      "hpcsgd_pack_f16")
    return cupy.ElementwiseKernel(
        "float32 x, float32 s", "uint16 y",
        """
        float v = x * s; unsigned int f = __float_as_uint(v);
        if ((f & 0x7fffffffu) > 0x7f800000u) { y = (unsigned short)((f >> 16) | 0x40u); }
        else { y = (unsigned short)((f + 0x7fffu + ((f >> 16) & 1u)) >> 16); }
        """, "hpcsgd_pack_bf16")


def cupy_unpack_kernel(wire: str):
    """CuPy ReductionKernel-free unpack: ``(wire src, float32 scale) -> float32 dst, int32 bad``.

    ``bad`` is 1 where the result is not finite; ``bad.sum()`` gives the count.
    """
    import cupy

    src_t = {"float32": "float32", "float16": "float16", "bfloat16": "uint16"}[wire]
    load = {"float32": "float v = (float)x;", "float16": "float v = (float)x;",
            "bfloat16": "float v = __uint_as_float(((unsigned int)x) << 16);"}[wire]
    return cupy.ElementwiseKernel(
        f"{src_t} x, float32 s", "float32 y, int32 bad",
        f"{load} v = v * s; y = v; bad = isfinite(v) ? 0 : 1;", f"hpcsgd_unpack_{wire}")


_BATCHED_SRC = r"""
#include <cuda_fp16.h>
__device__ __forceinline__ int find_param(const long long* csum, int n_params, long long tid) {
    int lo = 0, hi = n_params - 1;
    while (lo < hi) {
        int mid = (lo + hi + 1) / 2;
        if (csum[mid] <= tid) lo = mid; else hi = mid - 1;
    }
    return lo;
}
__device__ __forceinline__ unsigned short to_bf16(float v) {
    unsigned int f = __float_as_uint(v);
    if ((f & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((f >> 16) | 0x40u);
    return (unsigned short)((f + 0x7fffu + ((f >> 16) & 1u)) >> 16);
}
extern "C" __global__ void hpcsgd_batched_pack(const long long* ptrs, const long long* csum, int n_params,
                                               void* dst, long long n, float scale, int wire) {
    long long tid = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (tid >= n) return;
    int j = find_param(csum, n_params, tid);
    float v = ((const float*)ptrs[j])[tid - csum[j]] * scale;
    if (wire == 0) ((float*)dst)[tid] = v;
    else if (wire == 1) ((__half*)dst)[tid] = __float2half_rn(v);
    else ((unsigned short*)dst)[tid] = to_bf16(v);
}
extern "C" __global__ void hpcsgd_batched_unpack(const long long* ptrs, const long long* csum, int n_params,
                                                 const void* src, long long n, float scale, int wire,
                                                 unsigned long long* bad) {
    long long tid = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (tid >= n) return;
    int j = find_param(csum, n_params, tid);
    float v;
    if (wire == 0) v = ((const float*)src)[tid];
    else if (wire == 1) v = __half2float(((const __half*)src)[tid]);
    else v = __uint_as_float(((unsigned int)((const unsigned short*)src)[tid]) << 16);
    v = v * scale;
    ((float*)ptrs[j])[tid - csum[j]] = v;
    if (!isfinite(v)) atomicAdd(bad, 1ULL);
}
"""
_WIRE_CODE = {"float32": 0, "float16": 1, "bfloat16": 2}


def cupy_batched_kernels():
    """``(pack, unpack)`` CuPy RawKernels: one launch for all float32 parameter pieces of a bucket.

    ChainerMN's ``batched_copy`` idea: a device table of piece pointers and prefix sums;
    each thread binary-searches its piece. ``pack(ptrs, csum, n_params, dst, n, scale, wire)``,
    ``unpack(ptrs, csum, n_params, src, n, scale, wire, bad)`` (``bad``: one uint64 counter).
    """
    import cupy

    mod = cupy.RawModule(code=_BATCHED_SRC, options=("--std=c++11",))
    return mod.get_function("hpcsgd_batched_pack"), mod.get_function("hpcsgd_batched_unpack")


def wire_code(wire: str) -> int:
    """Integer code of ``wire`` for the batched CUDA wire_kernels."""
    return _WIRE_CODE[wire]
