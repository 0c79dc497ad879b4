"""Phase timing and Chrome-trace timelines, with one call site per phase.

Every part of a training step that is worth seeing (data wait, forward,
backward, pack, allreduce, unpack, update, checkpoint) is wrapped in
``with tracer.span("name", **args):``. The tracer always accumulates the
seconds per phase for the current iteration (cheap: two ``perf_counter``
calls); when a timeline is requested it also records Chrome-trace "complete"
events (``ph: "X"``) for the iterations asked for, which open in Perfetto or
chrome://tracing. Each rank is one track (``pid`` = rank).

Spans may nest (a bucket's ``allreduce`` inside ``backward`` when overlapped).
Phase totals count only the outermost span of each name, so nesting never
double-counts a phase. Spans opened on another thread (a communication or
loader thread) go to their own track within the rank (``tid`` = 1, 2, ... in
order of first use; the main thread is 0), so every track nests properly.

Overhead: outside the recorded iterations a span costs two ``perf_counter``
calls and a dict update (~1 us); events are kept in memory only for the
recorded iterations and written once, at the end (``write``).

The process-wide tracer is :data:`TRACER`; libraries call ``get_tracer()``.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Iterator


class Tracer:
    """Accumulates per-phase seconds and, optionally, Chrome-trace events."""

    def __init__(self, rank: int = 0) -> None:
        self.rank = rank
        self.iteration = 0
        self.phase_seconds: dict[str, float] = defaultdict(float)
        self.events: list[dict] = []
        self._record_iters: range | None = None
        self._path: str | None = None
        self._t0 = time.perf_counter()
        self._open: dict[str, int] = defaultdict(int)
        self._lock = threading.Lock()
        self._tids: dict[str, int] = {threading.main_thread().name: 0}
        self._thread_names: dict[int, str] = {0: "main"}

    def _tid(self) -> int:
        """Small per-thread track id: 0 for the main thread, then 1, 2, ... by thread name.

        Keyed by name, so a helper thread restarted every iteration under the same
        name stays on one track.
        """
        name = threading.current_thread().name
        tid = self._tids.get(name)
        if tid is None:
            with self._lock:
                tid = self._tids.setdefault(name, len(self._tids))
                self._thread_names[tid] = name
        return tid

    # -- configuration -------------------------------------------------
    def enable_timeline(self, path: str, iters: range | None = None, rank: int | None = None) -> None:
        """Record events for ``iters`` (all iterations when None) into ``path``."""
        self._path = path
        self._record_iters = iters if iters is not None else range(0, 1 << 62)
        if rank is not None:
            self.rank = rank

    @property
    def recording(self) -> bool:
        return self._record_iters is not None and self.iteration in self._record_iters

    # -- per-iteration bookkeeping ---------------------------------------
    def start_iteration(self, iteration: int) -> None:
        self.iteration = iteration
        self.phase_seconds = defaultdict(float)

    def pop_phases(self) -> dict[str, float]:
        """Return and reset this iteration's seconds per phase."""
        out = dict(self.phase_seconds)
        self.phase_seconds = defaultdict(float)
        return out

    def add(self, name: str, seconds: float) -> None:
        """Add ``seconds`` to phase ``name`` without an event (for externally timed work)."""
        self.phase_seconds[name] += seconds

    def seconds(self, phases) -> float:
        """Seconds of this iteration spent so far in ``phases`` (an iterable of names)."""
        return sum(self.phase_seconds.get(p, 0.0) for p in phases)

    # -- spans ------------------------------------------------------------
    @contextmanager
    def span_excluding(self, name: str, excluded, **args) -> Iterator[None]:
        """A :meth:`span` whose phase total leaves out time counted in ``excluded`` inside it.

        For backward with overlapped communication: the buckets' pack/allreduce/unpack
        spans run inside it and are counted as communication, not again as compute.
        The timeline event still covers the whole block.
        """
        before = self.seconds(excluded)
        with self.span(name, **args):
            yield
        self.phase_seconds[name] -= self.seconds(excluded) - before

    @contextmanager
    def span(self, name: str, **args) -> Iterator[None]:
        """Time the enclosed block as phase ``name``; ``args`` go into the event."""
        outer = self._open[name] == 0
        self._open[name] += 1
        t0 = time.perf_counter()
        try:
            yield
        finally:
            t1 = time.perf_counter()
            self._open[name] -= 1
            if outer:
                self.phase_seconds[name] += t1 - t0
            if self.recording:
                self.record(name, t0, t1, **args)

    def record(self, name: str, t0: float, t1: float, tid: int | str | None = None, **args) -> None:
        """Record a complete event from ``perf_counter`` times ``t0``..``t1`` (seconds).

        ``tid`` defaults to the calling thread's track.
        """
        if tid is None:
            tid = self._tid()
        ev = {
            "name": name,
            "ph": "X",
            "pid": self.rank,
            "tid": tid,
            "ts": (t0 - self._t0) * 1e6,  # microseconds
            "dur": (t1 - t0) * 1e6,
            "args": dict(args, iteration=self.iteration),
        }
        with self._lock:
            self.events.append(ev)

    def instant(self, name: str, **args) -> None:
        if self.recording:
            ts = (time.perf_counter() - self._t0) * 1e6
            with self._lock:
                self.events.append(
                    {"name": name, "ph": "i", "s": "p", "pid": self.rank, "tid": self._tid(), "ts": ts,
                     "args": args}
                )

    # -- output -----------------------------------------------------------
    def write(self, path: str | None = None, comm=None) -> str | None:
        """Write the timeline. With ``comm``, rank 0 gathers all ranks into one file.

        Clock offsets: every rank's timestamps are relative to its own tracer
        creation; with ``comm`` they are shifted by the offset to rank 0
        measured at gather time (good to the barrier skew, ~tens of us).
        Returns the path written on this rank, or None.
        """
        path = path or self._path
        if path is None:
            return None
        rank = comm.Get_rank() if comm is not None else self.rank
        events = [dict(ev, pid=rank) for ev in self.events]
        meta = [{"name": "process_name", "ph": "M", "pid": rank, "args": {"name": f"rank {rank}"}},
                {"name": "process_sort_index", "ph": "M", "pid": rank, "args": {"sort_index": rank}}]
        meta += [{"name": "thread_name", "ph": "M", "pid": rank, "tid": tid, "args": {"name": name}}
                 for tid, name in sorted(self._thread_names.items())]
        if comm is not None:
            comm.Barrier()
            now = time.perf_counter() - self._t0
            t_ref = comm.bcast(now, root=0)
            shift = (t_ref - now) * 1e6
            for ev in events:
                ev["ts"] += shift
            gathered = comm.gather(meta + events, root=0)
            if comm.Get_rank() != 0:
                return None
            events = [e for part in gathered for e in part]
        else:
            events = meta + events
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump({"traceEvents": events, "displayTimeUnit": "ms"}, f)
        os.replace(tmp, path)
        return path


TRACER = Tracer()


def get_tracer() -> Tracer:
    """The process-wide tracer used by communicators, loaders and the trainer."""
    return TRACER


def parse_iter_range(text: str) -> range:
    """Parse ``"10:20"`` (iterations 10..19), ``"5"`` (just 5) or ``":"`` (all)."""
    if ":" not in text:
        i = int(text)
        return range(i, i + 1)
    a, b = text.split(":", 1)
    return range(int(a) if a else 0, int(b) if b else 1 << 62)
