"""Parameter-set signatures and the cross-rank consistency check.

Before gradients or weights travel, every rank must agree on the parameters:
the same names, shapes and dtypes (and, for gradient reductions, the same set of
parameters that have a gradient). Disagreement would otherwise make the packed
buffers differ in length (a hang or an MPI truncation error) or silently mix
different parameters (garbage).

The check is one 16-byte ``MPI_Allreduce(MAX)`` of ``(h, -h)``, where ``h`` is a
stable 63-bit hash of this rank's signature: the ranks agree iff the max and the
min coincide. Only on a mismatch are the full signatures gathered, to name the
first differing parameter and the ranks on each side. The allreduce runs on every
call because skipping it only on ranks whose own set did not change would leave
ranks in different collectives exactly when the check matters. The local
signature's hash is cached, so a call costs building the signature tuple plus the
16-byte allreduce (a few microseconds within a node).
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

Entry = tuple  # (name, shape or None, dtype name or None, has_grad)


def param_signature(model, include_grad: bool = True) -> tuple[Entry, ...]:
    """Sorted (name, shape, dtype, has-grad) for every parameter of ``model``.

    Uninitialised parameters (``data is None``) have shape and dtype None.
    ``include_grad=False`` leaves the has-grad field as None.
    """
    out = []
    for name, p in sorted(model.namedparams()):
        data = p.array
        has_grad = _has_grad(p) if include_grad else None
        if data is None:
            out.append((name, None, None, has_grad))
        else:
            out.append((name, tuple(int(d) for d in data.shape), np.dtype(data.dtype).name, has_grad))
    return tuple(out)


def _has_grad(p) -> bool:
    """``p.grad is not None``; False for a lazy parameter that has never had a gradient.

    Chainer raises "Cannot retrieve Variable.grad" for an uninitialised parameter until
    ``cleargrads()`` ran; such a parameter has no data and takes no part in a mean.
    """
    try:
        return p.grad is not None
    except RuntimeError:
        return False


def signature_hash(signature: tuple[Entry, ...]) -> int:
    """A process-independent 63-bit hash of a signature (Python's ``hash`` is salted per process)."""
    digest = hashlib.blake2b(repr(signature).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _describe(entry: Entry | None) -> str:
    if entry is None:
        return "absent"
    _, shape, dtype, has_grad = entry
    if shape is None:
        text = "uninitialised"
    else:
        text = f"shape {shape} dtype {dtype}"
    if has_grad is not None:
        text += ", with grad" if has_grad else ", grad None"
    return text


def explain_mismatch(signatures: list[tuple[Entry, ...]]) -> str:
    """Message naming the first parameter (in sorted-name order) the ranks disagree on."""
    tables: list[dict[str, Entry]] = [{e[0]: e for e in sig} for sig in signatures]
    names = sorted(set().union(*tables))
    for name in names:
        per_rank = [t.get(name) for t in tables]
        variants: dict[str, list[int]] = {}
        for r, e in enumerate(per_rank):
            variants.setdefault(_describe(e), []).append(r)
        if len(variants) > 1:
            parts = "; ".join(f"{text} on ranks {ranks}" for text, ranks in variants.items())
            return f"ranks disagree on parameter {name!r}: {parts}"
    return "ranks disagree on the parameter set (no single differing parameter found)"


class ConsistencyChecker:
    """Per-communicator state of :meth:`MpiCommunicatorBase.check_params_consistent`."""

    def __init__(self) -> None:
        self._hashes: dict[Any, int] = {}

    def local_hash(self, signature: tuple[Entry, ...]) -> int:
        h = self._hashes.get(signature)
        if h is None:
            if len(self._hashes) > 64:
                self._hashes.clear()
            h = self._hashes[signature] = signature_hash(signature)
        return h
