"""``create_multi_node_checkpointer``: generational per-rank snapshots and resume (ChainerMN semantics).

Every rank writes its own file ``<path>/<name>.<rank>.<iteration>`` (Chainer's
``save_npz`` of the target, usually the trainer: model, optimizer state,
iterator position, extensions). ``maybe_load`` finds the newest iteration for
which *every* rank has its file and loads it on every rank, so a job killed at
any moment resumes where all ranks agree. Old generations are removed: after
every ``gc_interval`` saves, only the newest ``cp_interval`` common iterations are
kept. ``finalize()`` removes this run's files (call it after a successful run).

Differences from ChainerMN 7.8:

* files are written to a temporary name, fsynced and renamed (no half-written
  file under the final name);
* ``gc_interval`` is honoured (ChainerMN collects when more than
  ``cp_interval + 5`` files exist, whatever ``gc_interval`` says);
* ``name`` may not contain '.', and the intervals must be positive: a
  ``ValueError`` says so (ChainerMN asserts, or silently never resumes a name
  with a dot);
* ``maybe_load`` returns the iteration it loaded (None when it found nothing);
  its ``optimizer`` argument is accepted and unused: after a load all ranks
  hold the same parameters, which is what ChainerMN's flag asserts.
"""

from __future__ import annotations

import os
import tempfile
import time

import chainer
from chainer.training import extension


class _Stats:
    """Durations (s) of the saves, for ``get_stats()``."""

    def __init__(self) -> None:
        self.durations: list[float] = []

    def report(self) -> str:
        if not self.durations:
            return "No stats available"
        d = self.durations
        return (f"Snapshot duration stats (sec): avg={sum(d) / len(d):f}, "
                f"min={min(d):f}, max={max(d):f}")


class MultiNodeCheckpointer(extension.Extension):
    """See the module docstring; build it with :func:`create_multi_node_checkpointer`."""

    def __init__(self, name: str, comm, cp_interval: int = 5, gc_interval: int = 5, path=None):
        if not isinstance(name, str) or not name or "." in name or os.sep in name:
            raise ValueError(f"checkpointer name must be a non-empty string without '.' or "
                             f"'{os.sep}', got {name!r}")
        for label, value in (("cp_interval", cp_interval), ("gc_interval", gc_interval)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{label} must be a positive int, got {value!r}")
        if comm is None:
            raise ValueError("create_multi_node_checkpointer needs a communicator")
        self.name, self.comm = name, comm
        self.cp_interval, self.gc_interval = cp_interval, gc_interval
        self.path = path
        self.files: list[str] = []
        self.stats = _Stats()
        self._saves_since_gc = 0
        if path is not None:
            os.makedirs(path, exist_ok=True)

    # -- extension -----------------------------------------------------------
    def __call__(self, trainer) -> None:
        if self.path is None:
            self.path = trainer.out
        self.save(trainer, trainer.updater.iteration)

    def save(self, target, iteration: int) -> None:
        """Write this rank's snapshot of ``target`` at ``iteration``. Every rank must call it
        at the same iterations (the collection of old files is collective)."""
        if self.path is None:
            raise ValueError("checkpointer has no path: pass path= or use it as a trainer extension")
        os.makedirs(self.path, exist_ok=True)
        filename = self._filename(int(iteration))
        start = time.perf_counter()
        _atomic_save_npz(os.path.join(self.path, filename), target)
        self.stats.durations.append(time.perf_counter() - start)
        if filename not in self.files:
            self.files.append(filename)
        self._saves_since_gc += 1
        if self._saves_since_gc >= self.gc_interval:
            self._saves_since_gc = 0
            self._sync_file_list(remove_remainder=True)

    def maybe_load(self, trainer, optimizer=None, path=None):
        """Load the newest snapshot every rank has; returns its iteration or None. Collective.

        Call it after all extensions with state were added to ``trainer``.
        """
        del optimizer  # see the module docstring
        if self.path is None:
            self.path = path if path is not None else trainer.out
        try:
            local = os.listdir(self.path)
        except FileNotFoundError:
            local = []
        mine = sorted(it for it in (self._parse(f) for f in local) if it is not None)
        self.files = [self._filename(i) for i in mine]
        common = self._sync_file_list(remove_remainder=False)
        if not common:
            return None
        chainer.serializers.load_npz(os.path.join(self.path, self._filename(common[-1])), trainer)
        return common[-1]

    def finalize(self) -> None:
        """Remove this rank's snapshot files of this run."""
        for f in self.files:
            try:
                os.remove(os.path.join(self.path, f))
            except FileNotFoundError:
                pass
        self.files = []

    def get_stats(self) -> str:
        """Average, minimum and maximum save time in seconds."""
        return self.stats.report()

    # -- file names ------------------------------------------------------------
    def _filename(self, iteration: int) -> str:
        return f"{self.name}.{self.comm.rank}.{iteration}"

    def _filenames(self, iterations) -> list[str]:
        return [self._filename(i) for i in iterations]

    def _parse_filenames(self, filenames) -> list[tuple[str, int, int]]:
        """(name, rank, iteration) of each of this rank's files of this run, as ChainerMN's."""
        return [(self.name, self.comm.rank, i) for i in map(self._parse, filenames) if i is not None]

    def _parse(self, filename: str):
        """Iteration of one of this rank's files of this run, else None."""
        parts = filename.split(".")
        if len(parts) != 3 or parts[0] != self.name or parts[1] != str(self.comm.rank):
            return None
        return int(parts[2]) if parts[2].isdigit() else None

    def _sync_file_list(self, remove_remainder: bool) -> list[int]:
        """Keep the newest ``cp_interval`` iterations every rank has; returns them. Collective."""
        mine = {self._parse(f) for f in self.files} - {None}
        everyone = self.comm.allgather_obj(sorted(mine))
        common = set(everyone[0]).intersection(*map(set, everyone[1:]))
        keep = sorted(common)[-self.cp_interval:]
        kept = [self._filename(i) for i in keep]
        if remove_remainder:
            for f in set(self.files) - set(kept):
                try:
                    os.remove(os.path.join(self.path, f))
                except FileNotFoundError:
                    pass
        self.files = kept
        return keep


def _atomic_save_npz(path: str, target) -> None:
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix="tmp-" + os.path.basename(path), dir=directory)
    os.close(fd)
    try:
        chainer.serializers.save_npz(tmp, target)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except FileNotFoundError:
            pass
        raise


def create_multi_node_checkpointer(name: str, comm, cp_interval: int = 5, gc_interval: int = 5,
                                   path=None) -> MultiNodeCheckpointer:
    """Checkpointer extension: ``trainer.extend(cp, trigger=(k, 'iteration'))``, and
    ``cp.maybe_load(trainer, optimizer)`` before ``trainer.run()`` to resume (module docstring).

    Args:
        name: id of the run (no '.'); files are ``<name>.<rank>.<iteration>``.
        comm: the communicator (its rank names the files).
        cp_interval: number of newest common generations kept.
        gc_interval: saves between collections of older generations.
        path: folder of the files (default: ``trainer.out``).
    """
    return MultiNodeCheckpointer(name, comm, cp_interval, gc_interval, path)
