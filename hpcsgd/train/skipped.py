"""Files skipped with ``on_bad: skip``: counted per loader role on each rank, gathered for summary.json.

Each rank's loaders skip the bad files of their own shard; the job's report
must name all of them, so :func:`gather_skipped` collects every rank's counts
(one small object Allgather at the end of the run). Counts survive a resume:
the training loader's are part of its state, the others travel in the rank's
checkpoint state (:meth:`SkippedFiles.state_dict`).

Roles: ``train`` (the training loader), ``val`` (the validation loader; a bad
validation image is replaced by another validation image, so the evaluated
count stays the set's size), ``bn_recompute`` (the ``bn_mode: recompute``
passes over training images).
"""

from __future__ import annotations

from hpcsgd.runtime.watchdog import collective

ROLES = ("train", "val", "bn_recompute")


def _merged(*counts: dict) -> dict[str, int]:
    out: dict[str, int] = {}
    for c in counts:
        for name, n in c.items():
            out[name] = out.get(name, 0) + int(n)
    return out


class SkippedFiles:
    """This rank's skipped files: ``{role: {name: times skipped}}``, and what the log already named."""

    def __init__(self) -> None:
        self.earlier = {r: {} for r in ROLES}  # from the checkpoint, or from loaders already closed
        self.live = {r: {} for r in ROLES}  # cumulative counts of each role's open loader
        self._logged: dict[str, dict[str, int]] = {r: {} for r in ROLES}

    def update(self, role: str, live_counts: dict) -> None:
        """The open loader of ``role`` has skipped ``live_counts`` so far (its cumulative counts)."""
        self.live[role] = dict(live_counts)

    def add(self, role: str, counts: dict) -> None:
        """Counts of a loader of ``role`` that is being closed."""
        self.earlier[role] = _merged(self.earlier[role], counts)

    def counts(self) -> dict[str, dict[str, int]]:
        return {r: _merged(self.earlier[r], self.live[r]) for r in ROLES}

    def new_since_logged(self) -> dict[str, list[str]]:
        """Names skipped (again) since the last call, by role; roles with none are left out."""
        now, new = self.counts(), {}
        for role, counts in now.items():
            names = sorted(n for n, k in counts.items() if k > self._logged[role].get(n, 0))
            if names:
                new[role] = names
        self._logged = now
        return new

    def mark_logged(self) -> None:
        """Everything counted so far was named in an earlier log (after a resume)."""
        self._logged = self.counts()

    def state_dict(self) -> dict:
        """What a checkpoint keeps; the training loader's counts are in the loader's own state."""
        now = self.counts()
        return {r: now[r] for r in ROLES if r != "train"}

    def load_state_dict(self, state: dict) -> None:
        for role, counts in state.items():
            self.earlier[role] = {str(k): int(v) for k, v in counts.items()}


def gather_skipped(comm, skipped: SkippedFiles) -> dict:
    """Collective. Every rank's skipped files, for summary.json.

    Returns ``{"count": skips over all ranks and roles, "files": sorted distinct names,
    "by_role": {role: {name: count}}, "by_rank": [{role: count}, ...]}``.
    """
    mpi = getattr(comm, "mpi_comm", comm)
    with collective("allgather", what="skipped files"):
        per_rank = mpi.allgather(skipped.counts())
    by_role = {r: _merged(*(p[r] for p in per_rank)) for r in ROLES}
    return {"count": sum(sum(c.values()) for c in by_role.values()),
            "files": sorted({n for c in by_role.values() for n in c}),
            "by_role": {r: c for r, c in by_role.items() if c},
            "by_rank": [{r: sum(p[r].values()) for r in ROLES} for p in per_rank]}
