"""Loader modes: uint8 output, views vs copies, eval partition, tracing, decoders, GPU feeding."""

import numpy as np
import pytest
from data_fixtures import index_images, smooth_rgb
from gpu_skip import require_cuda
from PIL import Image

from hpcsgd.data import Loader, RandomResizedCrop, build_dataset
from hpcsgd.data.device import cuda_available
from hpcsgd.data.jpeg import simplejpeg
from hpcsgd.errors import ConfigError, DataError
from hpcsgd.runtime.trace import get_tracer


def small():
    return build_dataset("synthetic", shape=(3, 6, 5), n_classes=4, n=50, seed=3)


def test_uint8_batches_normalize_to_the_float32_batches():
    ds = small()
    f32 = list(Loader(ds, 8, workers=0, seed=1))
    u8 = list(Loader(ds, 8, workers=0, seed=1, dtype="uint8"))
    loader = Loader(ds, 8, workers=0, dtype="uint8")
    for (xf, tf), (xu, tu) in zip(f32, u8):
        assert xu.dtype == np.uint8 and np.array_equal(tf, tu)
        ref = (xu.astype(np.float64) - 127.5) / 73.9
        assert np.abs(loader.normalize(xu) - ref).max() < 1e-5
        assert np.abs(xf - ref).max() < 1e-5


def test_views_without_copy_and_owned_arrays_with_copy():
    ds = small()
    with Loader(ds, 8, workers=1, copy=False) as loader:
        it = iter(loader)
        x0, _ = next(it)
        assert x0.base is not None and not x0.flags.owndata
        snapshot = x0.copy()
        next(it)
        assert np.array_equal(x0, snapshot)  # the slot is reused only after the next request
    for x, _ in Loader(ds, 8, workers=0):
        assert x.flags.owndata and x.flags.c_contiguous


def test_eval_partition_short_last_batch_and_tracing():
    ds = build_dataset("arrays", images=index_images(23), labels=np.arange(23), n_classes=23)
    loader = Loader(ds, 4, rank=1, size=2, workers=0, partition="eval")
    tracer = get_tracer()
    tracer.start_iteration(0)
    got = [t for _, t in loader]
    assert len(loader) == 3 and [len(t) for t in got] == [4, 4, 4]  # rank 1 of 2: samples 11..22
    assert np.array_equal(np.concatenate(got), np.arange(11, 23))
    assert tracer.pop_phases().get("data_wait", 0) > 0
    assert loader.last_wait_seconds > 0 and loader.epoch == 1
    short = Loader(ds, 5, workers=0, partition="eval")
    assert [len(t) for _, t in short] == [5, 5, 5, 5, 3]


def test_config_errors():
    ds = small()
    for bad in [dict(on_bad="ignore"), dict(dtype="float16"), dict(partition="x"), dict(transform="aug"),
                dict(rank=2, size=2), dict(prefetch=0)] + ([] if cuda_available() else [dict(device=0)]):
        with pytest.raises(ConfigError):
            Loader(ds, 4, workers=0, **bad)
    with pytest.raises(ConfigError):
        RandomResizedCrop(decoder="libjpeg9")
    loader = Loader(ds, 4, workers=0)
    loader.close()
    with pytest.raises(DataError, match="closed"):
        list(loader)


@pytest.mark.skipif(simplejpeg is None, reason="optional simplejpeg not installed")
def test_simplejpeg_and_pillow_decoders_agree(tmp_path):
    p = str(tmp_path / "a.JPEG")
    Image.fromarray(smooth_rgb(120, 90, 7)).save(p, quality=92)
    for seed in range(4):
        a = RandomResizedCrop(48, decoder="pillow")(p, np.random.default_rng(seed)).astype(float)
        b = RandomResizedCrop(48, decoder="simplejpeg")(p, np.random.default_rng(seed)).astype(float)
        assert np.abs(a - b).mean() < 1.5


@pytest.mark.gpu
def test_device_batches_match_host_batches():  # pragma: no cover - no GPU on the CI machine
    cupy = require_cuda()
    ds = small()
    host = list(Loader(ds, 8, workers=0, seed=2))
    with Loader(ds, 8, workers=1, seed=2, dtype="uint8", device=0) as loader:
        dev = [(cupy.asnumpy(x), cupy.asnumpy(t)) for x, t in loader]
    for (xh, th), (xd, td) in zip(host, dev):
        assert np.array_equal(th, td) and np.abs(xh - xd).max() < 1e-5


def test_a_dataset_smaller_than_the_global_batch_is_refused_not_spun_on():
    """50 samples hold no global batch of 2 x 32 = 64: an epoch would yield nothing, and a loop
    over epochs would spin forever. Without drop_remainder the one padded batch is fine."""
    with pytest.raises(ConfigError, match="50 samples hold no global batch of 64 .2 ranks x 32."):
        Loader(small(), 32, workers=0, rank=0, size=2)
    loader = Loader(small(), 32, workers=0, rank=0, size=2, drop_remainder=False)
    assert len(list(loader)) == 1
    loader.close()
