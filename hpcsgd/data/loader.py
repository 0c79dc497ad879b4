"""The loader: sharded, resumable epochs of contiguous batches from worker processes.

``for x, t in loader:`` yields the rest of the current epoch as ``x`` (N, C, H, W)
float32 (normalized) or uint8, and ``t`` (N,) int32; after the last batch the
epoch counter advances. See :mod:`hpcsgd.data.sharding` for which samples each
rank gets and :mod:`hpcsgd.data.pipeline` for how workers are started.
"""

from __future__ import annotations

import logging
import time
from collections import deque

import numpy as np

from hpcsgd.data.batch import BatchLayout, batch_rng, fill_batch
from hpcsgd.data.device import cuda_available
from hpcsgd.data.pipeline import DataWorkerError, SharedSlots, WorkerPool
from hpcsgd.data.sharding import epoch_permutation, eval_shard, iterations_per_epoch, rank_batch_indices
from hpcsgd.data.transforms import Identity, Normalize
from hpcsgd.errors import ConfigError, DataError
from hpcsgd.runtime.trace import get_tracer

log = logging.getLogger("hpcsgd.data")


class Loader:
    """Batches for one rank of a data-parallel job.

    Args:
        dataset: a :class:`hpcsgd.data.datasets.Dataset` (see ``build_dataset``).
        batch_size: samples per rank per iteration.
        rank, size: this rank and the number of ranks (equal slices of one global permutation).
        seed: shared by all ranks; fixes every epoch's order and augmentations.
        shuffle: draw a permutation per epoch (False: dataset order).
        workers: worker processes (0: decode in this process, no prefetch).
        prefetch: batches prepared ahead of the trainer (at least one per worker is kept in flight).
        transform: None (no augmentation), 'train', 'eval' or a transform object.
        on_bad: 'error' (DataError naming the file) or 'skip' (replace it by another sample of
            the same batch stream, count it in ``bad_files``, name it in ``skipped_files``, warn).
        drop_remainder: drop (True) or wrap-pad (False) the last incomplete global batch.
        dtype: 'float32' (normalized in the worker) or 'uint8' (raw; normalize with
            :meth:`normalize`, on the device when ``device`` is set: 4x less copy traffic).
        copy: yield arrays the caller owns (True) or views into the shared slot, valid
            until the next batch is requested (False, no copy).
        device: CUDA device id: yield CuPy arrays, the next batch's copy overlapping the step.
        partition: 'train' (as above) or 'eval' (:func:`eval_shard`: contiguous, every sample
            once across ranks, no shuffle, last batch may be short, lengths may differ by rank).
        timeout: seconds without any worker answer before a DataWorkerError (hung worker).
    """

    def __init__(self, dataset, batch_size: int, rank: int = 0, size: int = 1, seed: int = 0,
                 shuffle: bool = True, workers: int = 2, prefetch: int = 2, transform=None,
                 on_bad: str = "error", drop_remainder: bool = True, *, dtype: str = "float32",
                 copy: bool = True, device: int | None = None, partition: str = "train",
                 timeout: float = 300.0, normalize: Normalize | None = None):
        if on_bad not in ("error", "skip"):
            raise ConfigError(f"on_bad must be 'error' or 'skip', got {on_bad!r}")
        if dtype not in ("float32", "uint8"):
            raise ConfigError(f"dtype must be 'float32' or 'uint8', got {dtype!r}")
        if partition not in ("train", "eval"):
            raise ConfigError(f"partition must be 'train' or 'eval', got {partition!r}")
        if batch_size < 1 or workers < 0 or prefetch < 1 or not 0 <= rank < size:
            raise ConfigError(f"bad loader sizes: batch_size={batch_size} workers={workers} "
                              f"prefetch={prefetch} rank={rank} size={size}")
        if len(dataset) == 0:
            raise DataError("the dataset is empty")
        if drop_remainder and len(dataset) < batch_size * size:  # an epoch of no batch: a silent spin
            raise ConfigError(f"the dataset's {len(dataset)} samples hold no global batch of "
                              f"{batch_size * size} ({size} ranks x {batch_size}); lower the batch or "
                              f"set drop_remainder=False")
        if device is not None and not cuda_available():
            raise ConfigError(f"device={device} needs CuPy and a CUDA GPU; use device=None for NumPy")
        self.dataset, self.batch_size, self.rank, self.size = dataset, int(batch_size), int(rank), int(size)
        self.seed, self.shuffle, self.on_bad, self.drop_remainder = int(seed), shuffle, on_bad, drop_remainder
        self.partition, self.copy, self.timeout = partition, copy, float(timeout)
        if transform is None:
            transform = Identity()
        elif isinstance(transform, str):
            if transform not in ("train", "eval"):
                raise ConfigError(f"transform must be None, 'train', 'eval' or a callable, got {transform!r}")
            transform = dataset.default_transform(transform)
        self.transform = transform
        hw = transform.output_hw(dataset.image_hw)
        self.layout = BatchLayout(self.batch_size, (dataset.channels, *hw), dtype)
        self.normalizer = normalize or Normalize(dataset.mean, dataset.std)
        self.epoch, self.position = 0, 0
        self.bad_files, self.bad_files_total = 0, 0
        self.skipped_files: dict[str, int] = {}  # name -> times skipped on this rank (all epochs)
        self.last_wait_seconds, self.wait_seconds_total = 0.0, 0.0
        self._perms: dict[int, np.ndarray] = {}  # epoch -> permutation (current and next)
        self._pending: deque[tuple[int, int, int]] = deque()  # (epoch, k, task) sent, in batch order
        self.workers = int(workers)
        self.depth = max(int(prefetch), self.workers) if self.workers else 1
        n_slots = self.depth + 1
        self._slots = SharedSlots(n_slots, self.layout.slot_bytes)
        self._free = list(range(n_slots))
        self._results: dict[int, tuple] = {}
        self._task_slots: dict[int, int] = {}  # task sent, not yet answered -> its slot
        self._stale: dict[int, int] = {}  # abandoned task -> its slot, freed when the answer comes
        self._task_counter = 0
        self._pool = None
        if self.workers:
            cfg = {"dataset": dataset, "transform": transform, "normalize": self.normalizer,
                   "on_bad": on_bad, "layout": self.layout, "n_slots": n_slots}
            self._pool = WorkerPool(self.workers, cfg, self._slots)
        self._feeder = None
        if device is not None:
            from hpcsgd.data.device import DeviceFeeder

            self._feeder = DeviceFeeder(int(device), self.normalizer, self._slots.buf)

    # -- order -------------------------------------------------------------
    def __len__(self) -> int:
        """Iterations per epoch on this rank (the same on every rank for partition='train')."""
        if self.partition == "eval":
            return -(-len(eval_shard(len(self.dataset), self.rank, self.size)) // self.batch_size)
        return iterations_per_epoch(len(self.dataset), self.batch_size, self.size, self.drop_remainder)

    def batch_indices(self, k: int, epoch: int | None = None) -> np.ndarray:
        """Sample indices of this rank's batch ``k`` of ``epoch`` (default: the current one)."""
        epoch = self.epoch if epoch is None else epoch
        if self.partition == "eval":
            shard = eval_shard(len(self.dataset), self.rank, self.size)
            return np.arange(shard.start + k * self.batch_size,
                             min(shard.start + (k + 1) * self.batch_size, shard.stop), dtype=np.int64)
        if epoch not in self._perms:
            if len(self._perms) >= 2:
                self._perms.pop(min(self._perms))
            self._perms[epoch] = epoch_permutation(len(self.dataset), self.seed, epoch, self.shuffle)
        return rank_batch_indices(self._perms[epoch], k, self.batch_size, self.rank, self.size)

    @property
    def epoch_detail(self) -> float:
        """Fractional epoch: ``epoch + position / len(self)`` (for LR schedules)."""
        return self.epoch + self.position / max(len(self), 1)

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration run ``epoch``; same epoch as now keeps the position (resume)."""
        if int(epoch) != self.epoch:
            self.epoch, self.position, self.bad_files = int(epoch), 0, 0

    # -- state ---------------------------------------------------------------
    def state_dict(self) -> dict:
        """What a checkpoint must hold to resume with exactly the batches not yet delivered."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "n": len(self.dataset), "global_batch": self.batch_size * self.size,
                "shuffle": bool(self.shuffle), "drop_remainder": bool(self.drop_remainder),
                "bad_files": self.bad_files, "bad_files_total": self.bad_files_total,
                "skipped_files": dict(self.skipped_files)}

    def load_state_dict(self, state: dict) -> None:
        if int(state["n"]) != len(self.dataset):
            raise DataError(f"cannot resume: the dataset had {state['n']} samples, now {len(self.dataset)}")
        if int(state["global_batch"]) != self.batch_size * self.size:
            raise ConfigError(f"cannot resume mid-epoch: global batch was {state['global_batch']}, now "
                              f"{self.batch_size * self.size} (batch_size x ranks)")
        self.seed, self.shuffle = int(state["seed"]), bool(state["shuffle"])
        self.drop_remainder = bool(state["drop_remainder"])
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self.bad_files = int(state.get("bad_files", 0))
        self.bad_files_total = int(state.get("bad_files_total", 0))
        self.skipped_files = {str(k): int(v) for k, v in state.get("skipped_files", {}).items()}
        self._perms = {}
        self._abandon()  # batches in flight were drawn for the old state

    # -- batches ---------------------------------------------------------------
    def normalize(self, x):
        """uint8 batch (NumPy or CuPy) -> normalized float32 on the same device."""
        return self.normalizer.apply(x)

    def __iter__(self):
        if self._slots is None:
            raise DataError("the loader is closed")
        n_iters, epoch, start = len(self), self.epoch, self.position
        if start == 0:
            self.bad_files = 0
        tracer = get_tracer()
        self._keep_pending_from(epoch, start, n_iters)
        staged: dict[int, tuple] = {}  # k -> (device handle, slot): copies already under way
        held, finished = None, False
        try:
            for k in range(start, n_iters):
                with tracer.span("data_wait", batch=k, epoch=epoch):
                    t0 = time.perf_counter()
                    if held is not None:
                        self._free.append(held)
                        held = None
                    handle = None
                    if k in staged:
                        handle, slot = staged.pop(k)
                    elif self._pool is None:
                        slot = self._free.pop()
                        self._fill_inline(slot, epoch, k)
                    else:
                        self._dispatch(n_iters, (epoch, k - 1) if k > start else None)
                        _, _, task = self._pending.popleft()
                        slot = self._collect(k, task)
                    if self._feeder is not None:
                        x, t = self._feeder.finish(handle if handle is not None else self._stage(slot, k))
                        self._release_copied(slot)
                        staged.update(self._stage_next(epoch, k + 1))
                    else:
                        x, t = self._host_batch(slot, k)
                        if self.copy:
                            self._free.append(slot)
                        else:
                            held = slot
                    if self._pool is not None:
                        self._dispatch(n_iters, (epoch, k + 1) if k + 1 in staged else (epoch, k))
                    self.last_wait_seconds = time.perf_counter() - t0
                    self.wait_seconds_total += self.last_wait_seconds
                self.position = k + 1
                yield x, t
            finished = True
            self._end_epoch(epoch)
        finally:
            if held is not None:
                self._free.append(held)
            for _, slot in staged.values():
                self._release_copied(slot)
            if not finished and staged:
                self._abandon()  # staged batches left the queue: the rest no longer continues it

    def _following(self, epoch: int, k: int, n_iters: int) -> tuple[int, int]:
        return (epoch, k + 1) if k + 1 < n_iters else (epoch + 1, 0)

    def _keep_pending_from(self, epoch: int, k: int, n_iters: int) -> None:
        """Keep batches already in flight that continue at (epoch, k) - e.g. prefetched across the
        epoch boundary, or left by an abandoned iteration; anything else is abandoned."""
        want = (epoch, k)
        for i, (e, kk, _) in enumerate(self._pending):
            if (e, kk) != want:
                rest = list(self._pending)[i:]
                self._pending = deque(list(self._pending)[:i])
                self._abandon(rest)
                return
            want = self._following(e, kk, n_iters)

    def _abandon(self, entries=None) -> None:
        """Forget in-flight batches; their slots come back as the answers arrive."""
        if entries is None:
            entries, self._pending = list(self._pending), deque()
        for _, _, task in entries:
            if task in self._results:
                self._free.append(self._results.pop(task)[1])
            else:
                self._stale[task] = self._task_slots[task]

    def _host_batch(self, slot: int, k: int):
        x, t = self.layout.views(self._slots.buf, slot)
        m = len(self.batch_indices(k)) if self.partition == "eval" else self.batch_size
        return (x[:m].copy() if self.copy else x[:m]), t[:m].copy()

    def _stage(self, slot: int, k: int):
        x, t = self.layout.views(self._slots.buf, slot)
        m = len(self.batch_indices(k)) if self.partition == "eval" else self.batch_size
        return self._feeder.stage(x[:m], t[:m])

    def _stage_next(self, epoch: int, k: int) -> dict:
        """Start the device copy of batch ``k`` if the workers already finished it (overlaps the step)."""
        if not self._pending or self._pending[0][:2] != (epoch, k):
            return {}
        self._pump(0.0)
        task = self._pending[0][2]
        if task not in self._results or self._results[task][0][0] != "done":
            return {}
        self._pending.popleft()
        msg, slot = self._results.pop(task)
        self._count_bad(msg[2])
        return {k: (self._stage(slot, k), slot)}

    def _release_copied(self, slot: int) -> None:
        self._feeder.stream.synchronize()  # the copy out of this slot must be complete before reuse
        self._free.append(slot)

    def _fill_inline(self, slot: int, epoch: int, k: int) -> None:
        x, t = self.layout.views(self._slots.buf, slot)
        idx = self.batch_indices(k, epoch)
        try:
            skipped = fill_batch(self.dataset, self.transform, self.normalizer, idx,
                                 batch_rng(self.seed, epoch, k, self.rank), x[:len(idx)], t[:len(idx)],
                                 self.on_bad)
        except BaseException:
            self._free.append(slot)
            raise
        self._count_bad(skipped)

    def _dispatch(self, n_iters: int, taken: tuple[int, int] | None = None) -> None:
        """Send tasks until ``depth`` batches are in flight or no slot is free; continues into the
        next epoch (its first batches are ready when it starts), never further. ``taken`` is the
        last batch already taken off the queue by this iteration."""
        if not self._pending and not self._free:
            while not self._free:  # every slot belongs to an abandoned task: wait for one
                self._pump(1.0)
        if self._pending:
            e, k = self._following(*self._pending[-1][:2], n_iters)
        elif taken is not None:
            e, k = self._following(*taken, n_iters)
        else:
            e, k = self.epoch, self.position
        while len(self._pending) < self.depth and self._free and e <= self.epoch + 1 and n_iters:
            slot = self._free.pop()
            task = self._task_counter
            self._task_counter += 1
            self._task_slots[task] = slot
            self._pool.submit(("batch", task, slot, self.batch_indices(k, e), (self.seed, e, k, self.rank)))
            self._pending.append((e, k, task))
            e, k = self._following(e, k, n_iters)

    def _pump(self, timeout: float) -> bool:
        """Receive worker answers for up to ``timeout`` s; True if any arrived."""
        msgs = self._pool.receive(timeout)
        for _, msg in msgs:
            if msg[0] not in ("done", "error"):
                continue
            task = msg[1]
            slot = self._task_slots.pop(task)
            if task in self._stale:
                self._free.append(self._stale.pop(task))
            else:
                self._results[task] = (msg, slot)
        return bool(msgs)

    def _collect(self, k: int, task: int) -> int:
        """Wait for ``task`` (batch ``k``); returns its slot or raises its error."""
        last = time.monotonic()
        while task not in self._results:
            if self._pump(min(1.0, self.timeout)):
                last = time.monotonic()
            elif time.monotonic() - last > self.timeout:
                busy = [w for w, n in enumerate(self._pool.load) if n]
                raise DataWorkerError(f"no answer from data workers {busy} for {self.timeout:.0f} s while "
                                      f"waiting for batch {k}; a worker is hung (e.g. on a stalled "
                                      "file system)")
        msg, slot = self._results.pop(task)
        if msg[0] == "error":
            self._free.append(slot)
            raise DataError(msg[2])
        self._count_bad(msg[2])
        return slot

    def _count_bad(self, skipped: list[tuple[str, str]]) -> None:
        for name, reason in skipped:
            log.warning("skipped bad sample (on_bad='skip'): %s", reason)
            self.skipped_files[name] = self.skipped_files.get(name, 0) + 1
        self.bad_files += len(skipped)
        self.bad_files_total += len(skipped)

    def _end_epoch(self, epoch: int) -> None:
        if self.bad_files:
            log.warning("epoch %d: skipped %d bad files on rank %d (%d so far)", epoch, self.bad_files,
                        self.rank, self.bad_files_total)
        self.last_epoch_bad_files = self.bad_files
        self.epoch, self.position = epoch + 1, 0

    # -- lifetime --------------------------------------------------------------
    def probe_workers(self) -> list[dict]:
        """Each worker's pid, MPI state and launcher variables (idle loader only)."""
        return self._pool.probe() if self._pool is not None else []

    @property
    def worker_pids(self) -> list[int]:
        return [p.pid for p in self._pool.procs] if self._pool is not None else []

    def close(self) -> None:
        """Stop the workers and release the shared memory (idempotent)."""
        if self._pool is not None:
            self._pool.close()
            self._pool = None
        if self._feeder is not None:
            self._feeder.close()
            self._feeder = None
        if self._slots is not None:
            self._slots.close()
            self._slots = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
