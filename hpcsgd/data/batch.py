"""Filling one batch into a preallocated buffer: decode, augment, normalize, label.

Shared by the worker processes and the in-process path (``workers=0``), so
both produce bit-identical batches from the same random stream.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import numpy as np

from hpcsgd.errors import DataError

log = logging.getLogger("hpcsgd.data")
MAX_REPLACEMENT_TRIES = 16
_ALIGN = 64


def _align(nbytes: int) -> int:
    return -(-nbytes // _ALIGN) * _ALIGN


@dataclass(frozen=True)
class BatchLayout:
    """Byte layout of one batch slot: ``x`` (N, C, H, W) then ``t`` int32 (N,)."""

    batch_size: int
    sample_shape: tuple[int, int, int]
    dtype: str = "float32"

    @property
    def x_shape(self) -> tuple[int, ...]:
        return (self.batch_size, *self.sample_shape)

    @property
    def x_bytes(self) -> int:
        return int(np.prod(self.x_shape)) * np.dtype(self.dtype).itemsize

    @property
    def slot_bytes(self) -> int:
        """Bytes per slot, each part 64-byte aligned."""
        return _align(self.x_bytes) + _align(4 * self.batch_size)

    def views(self, buf, slot: int) -> tuple[np.ndarray, np.ndarray]:
        """``(x, t)`` arrays over slot ``slot`` of the buffer ``buf`` (no copy)."""
        base = slot * self.slot_bytes
        x = np.frombuffer(buf, dtype=self.dtype, count=int(np.prod(self.x_shape)), offset=base)
        t = np.frombuffer(buf, dtype=np.int32, count=self.batch_size, offset=base + _align(self.x_bytes))
        return x.reshape(self.x_shape), t


def batch_rng(seed: int, epoch: int, k: int, rank: int) -> np.random.Generator:
    """The augmentation stream of rank ``rank``'s part of global batch ``k`` in ``epoch``."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), int(epoch), int(k),
                                                                        int(rank), 0xA06])))


@contextlib.contextmanager
def _naming_sample(dataset, i: int):
    """Any failure inside becomes a DataError naming sample ``i`` (DataError and MemoryError pass)."""
    try:
        yield
    except (DataError, MemoryError):
        raise
    except Exception as e:
        raise DataError(f"{dataset.name(i)}: {type(e).__name__}: {e}") from e


def load_sample(dataset, transform, i: int, rng: np.random.Generator) -> np.ndarray:
    """Sample ``i`` after ``transform`` as uint8 (H, W, C); any failure becomes a DataError naming it."""
    with _naming_sample(dataset, i):
        out = transform(dataset.source(i), rng)
    if out.ndim == 2:
        out = out[:, :, None]
    return out


def load_sample_into(dataset, transform, i: int, rng: np.random.Generator, normalize,
                     out: np.ndarray) -> None:
    """Sample ``i`` through ``transform.write_into`` straight into the slot ``out`` (C, H, W).

    The fused path of the crop transforms (decode, then one resample + flip +
    normalize pass into the slot); failures become a DataError naming the sample.
    """
    with _naming_sample(dataset, i):
        transform.write_into(dataset.source(i), rng, normalize, out)


def fill_batch(dataset, transform, normalize, indices: np.ndarray, rng: np.random.Generator,
               x: np.ndarray, t: np.ndarray, on_bad: str = "error") -> list[tuple[str, str]]:
    """Write samples ``indices`` into ``x`` / ``t``; returns ``(name, reason)`` of each skipped sample.

    ``on_bad='error'``: the first bad sample raises DataError naming it.
    ``on_bad='skip'``: a bad sample is replaced by a sample drawn at random
    (from ``rng``, so reproducible) until a good one is found, keeping the
    batch full; the bad samples are returned for counting and naming.
    """
    skipped: list[tuple[str, str]] = []
    fused = hasattr(transform, "write_into")
    for j, i in enumerate(indices):
        i = int(i)
        for _ in range(MAX_REPLACEMENT_TRIES):
            try:
                if fused:
                    load_sample_into(dataset, transform, i, rng, normalize, x[j])
                    t[j] = dataset.labels[i]
                    break
                img = load_sample(dataset, transform, i, rng)
                if img.shape[:2] != x.shape[2:] or img.shape[2] != x.shape[1]:
                    raise DataError(f"{dataset.name(i)}: sample has shape {img.shape} (H, W, C), "
                                    f"the batch wants {x.shape[2:]} with {x.shape[1]} channels")
                normalize.write(img, x[j])
                t[j] = dataset.labels[i]
                break
            except DataError as e:
                if on_bad != "skip":
                    raise
                skipped.append((dataset.name(i), str(e)))
                i = int(rng.integers(0, len(dataset)))
        else:
            raise DataError(f"{MAX_REPLACEMENT_TRIES} bad samples in a row while replacing a bad sample; "
                            f"last: {skipped[-1][1]}")
    return skipped
