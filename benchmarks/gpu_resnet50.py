"""ResNet-50 training throughput on one GPU (images/s), float32 and float16, per batch size (not a test).

Run::

    python benchmarks/gpu_resnet50.py [--batches 32 64] [--dtypes float32 float16] [--iters 20]

One full training step per iteration (forward, softmax cross-entropy, backward,
MomentumSGD update) of hpcsgd's ResNet-50 (224x224, 1000 classes, random data)
through Chainer on CuPy/cuDNN, timed between device synchronisations; images/s
is the batch over the median step time. float16: parameters, activations and
gradients in float16 (Chainer's cuDNN paths take float16), the update too: the
speed of the arithmetic, not a training recipe. Each configuration runs in this
process after ``--warmup`` steps (cuDNN algorithm choice, kernel compilation).
Batch 32 per GPU is Akiba et al.'s. Writes ``--out`` (JSON) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def measure(batch: int, dtype: str, iters: int, warmup: int, device: int) -> dict:
    import chainer
    import chainer.functions as F
    import cupy

    from hpcsgd.models import build_model

    dt = np.dtype(dtype)
    with chainer.using_config("dtype", dt):
        model = build_model("resnet50", 1000)
    model.to_device(device)
    for p in model.params():
        if p.array is not None and p.array.dtype != dt:
            p.array = p.array.astype(dt)
    opt = chainer.optimizers.MomentumSGD(lr=0.01)
    opt.setup(model)
    rng = np.random.default_rng(0)
    x = cupy.asarray(rng.random((batch, 3, 224, 224), dtype=np.float32).astype(dt))
    t = cupy.asarray(rng.integers(0, 1000, batch).astype(np.int32))

    def step():
        model.cleargrads()
        loss = F.softmax_cross_entropy(model(x), t)
        loss.backward()
        opt.update()

    dev = cupy.cuda.Device(device)
    times = []
    with chainer.using_config("train", True), chainer.using_config("dtype", dt):
        for _ in range(warmup):
            step()
        dev.synchronize()
        for _ in range(iters):
            t0 = time.perf_counter()
            step()
            dev.synchronize()
            times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return {"batch": batch, "dtype": dtype, "step_ms_median": med * 1e3, "step_ms_min": min(times) * 1e3,
            "images_per_s": batch / med, "iters": iters, "warmup": warmup,
            "max_memory_GB": cupy.get_default_memory_pool().total_bytes() / 1e9}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", nargs="+", type=int, default=[32, 64])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "float16"], choices=["float32", "float16"])
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu_resnet50.json"))
    args = ap.parse_args()

    import chainer
    import cupy

    from hpcsgd import gpu_compat

    env = gpu_compat.report()
    rows, errors = [], {}
    for dtype in args.dtypes:
        for batch in args.batches:
            try:
                rows.append(measure(batch, dtype, args.iters, args.warmup, args.device))
            except Exception as e:  # record, go on with the next configuration
                errors[f"{dtype} batch {batch}"] = f"{type(e).__name__}: {e}"
            cupy.get_default_memory_pool().free_all_blocks()
    out = {"environment": env, "cudnn_enabled": bool(chainer.backends.cuda.cudnn_enabled), "results": rows,
           "errors": errors, "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "command": "python benchmarks/gpu_resnet50.py " + " ".join(sys.argv[1:])}
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    print(f"ResNet-50 training on {env.get('gpu')} (CuPy {env.get('cupy')}, cuDNN {env.get('cudnn')}):")
    for r in rows:
        print(f"  {r['dtype']:>7} batch {r['batch']:3d}: {r['images_per_s']:8.1f} images/s "
              f"({r['step_ms_median']:.1f} ms/step)")
    for k, e in errors.items():
        print(f"  {k}: FAILED {e}")
    print(f"wrote {path}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
