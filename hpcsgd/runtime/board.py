"""Reading a watchdog board: who waited in which collective, who did not arrive, and why.

A board is the directory of per-rank state files that
:mod:`hpcsgd.runtime.watchdog` rewrites every heartbeat (``rank<R>.json``: host,
pid, collective name and number, since when, heartbeat time). This module only
reads boards; it is what the watchdog prints before it aborts a hung job
(:func:`explain`), and what ``hpcsgd train`` / ``hpcsgd launch`` print about a job
that died leaving its board behind (:func:`postmortem`). Plain files, no MPI: a
missing rank's state is readable without its cooperation.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def label(name: str | None, seq, info: dict | None = None) -> str:
    extra = "".join(f", {k}={v}" for k, v in (info or {}).items())
    return f"{name!r} (#{seq}{extra})"


@dataclass
class BoardReport:
    """Who waited where, who did not arrive and why; ``lines`` is the printable form."""

    waiting: list[int]
    missing: list[int]
    unknown: list[int]
    lines: list[str]


def explain(board: dict[int, dict], size: int, name: str | None = None, here: str | None = None,
            stale_after: float = 3.0, now: float | None = None) -> BoardReport:
    """Read a board: which ranks wait in collective ``name`` and which did not arrive, and why.

    Args:
        board: rank -> its last published state (see :meth:`Watchdog.state`).
        size: number of ranks in the job.
        name: the collective that timed out; None: the one most ranks wait in.
        here: this host's name (a dead pid can only be checked on the same host).
        stale_after: seconds without a heartbeat that make a rank dead or frozen.
        now: reference time (default: now; post-mortem: the newest heartbeat).
    """
    now = time.time() if now is None else now
    if name is None:
        ops = [st.get("op") for st in board.values() if st.get("op")]
        name = max(set(ops), key=ops.count) if ops else None
    waiting, missing, unknown, why = [], [], [], []
    for r in range(size):
        st = board.get(r)
        if st is None:
            unknown.append(r)
            continue
        where = f"rank {r} (host {st.get('host')}, pid {st.get('pid')})"
        age = now - float(st.get("heartbeat", 0))
        if age > stale_after:
            gone = here is not None and st.get("host") == here and not pid_alive(int(st.get("pid", 0)))
            what = "process gone" if gone else "dead, frozen or unreachable"
            if st.get("op"):
                last = f"in {label(st['op'], st.get('op_seq'))}"
            else:
                last = f"after {label(st.get('last_op'), st.get('last_seq'))}"
            if st.get("op") == name:
                what += ", though it had arrived"
            missing.append(r)
            why.append(f"    {where}: no heartbeat for {age:.1f} s ({what}); last seen {last}")
        elif st.get("op") is None:
            busy = now - float(st.get("since", now))
            missing.append(r)
            why.append(f"    {where}: busy outside collectives for {busy:.1f} s after "
                       f"{label(st.get('last_op'), st.get('last_seq'))}")
        elif st.get("op") != name:
            missing.append(r)
            why.append(f"    {where}: in a different collective {label(st['op'], st.get('op_seq'))} "
                       f"(collective mismatch)")
        else:
            waiting.append(r)
    lines = []
    if missing:
        lines.append(f"  ranks that did not arrive: {', '.join(map(str, missing))}")
        lines += why
    if unknown:
        lines.append(f"  ranks whose state is unknown (no board entry): {', '.join(map(str, unknown))}")
    if waiting:
        lines.append(f"  ranks waiting in {name!r}: {', '.join(map(str, waiting))}")
    if not missing and not unknown:
        lines.append("  every rank arrived: the collective is stuck in the network "
                     "(a link down or a peer unreachable)")
    return BoardReport(waiting, missing, unknown, lines)


def read_board_dir(board: Path) -> dict[int, dict]:
    """rank -> state of every ``rank<R>.json`` in ``board``."""
    states = {}
    for path in board.glob("rank*.json"):
        try:
            st = json.loads(path.read_text())
            states[int(st["rank"])] = st
        except (OSError, ValueError, KeyError):
            pass
    return states


def postmortem(root: str | os.PathLike, remove: bool = False) -> list[str]:
    """Reports on jobs that died without cleaning their board under ``root``.

    A job killed by its launcher (e.g. hydra after a rank was SIGKILLed) leaves
    its board behind: every rank's last state. The rank whose heartbeat stopped
    first is the one that died; the others were waiting for it. ``hpcsgd train``
    prints these reports when it starts on the same output directory.
    """
    reports = []
    for board in sorted(Path(root).glob("hpcsgd-watchdog-*")):
        states = read_board_dir(board)
        if states:
            size = max(int(st.get("size", 0)) for st in states.values()) or max(states) + 1
            newest = max(float(st.get("heartbeat", 0)) for st in states.values())
            rep = explain(states, size, stale_after=2.5, now=newest)
            ended = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(newest))
            reports.append("\n".join([f"hpcsgd: job {board.name.split('-')[-1]} ended abnormally "
                                       f"(last heartbeat {ended}); its ranks' last states:", *rep.lines]))
        if remove:
            for path in board.iterdir():
                path.unlink(missing_ok=True)
            board.rmdir()
    return reports
