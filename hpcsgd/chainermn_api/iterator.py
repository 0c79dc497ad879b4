"""``create_multi_node_iterator``: every rank gets ``rank_master``'s batches (ChainerMN semantics).

Used where ranks hold different parts of one model (model parallelism) and must
see the same examples. ``rank_master`` draws each batch from its
``actual_iterator`` and broadcasts it with the iterator's position (epoch,
``is_new_epoch``, ``epoch_detail``, ``current_position``); the other ranks' iterators
only mirror that state. Every rank must call ``next()`` the same number of times.

Differences from ChainerMN 7.8, which broadcasts batches as float32 arrays:

* batches arrive exactly as the master's iterator returned them (one
  ``bcast_obj`` of the pickled batch): integer labels stay integers, any
  example structure works (ChainerMN accepts arrays or pairs of arrays, and
  casts both to float32);
* ``serialize`` is local (the master saves/loads its iterator, the others the
  mirrored state under the same keys, so any rank's snapshot loads into a plain
  Chainer iterator; as in ChainerMN a non-master rank never takes the order from a
  snapshot, the master's order rules); it need not be called at the same moment on every rank. The
  master's order travels in the (collective) constructor, with each new epoch's first
  batch and with the first batch after ``reset``/``serialize``;
* ``reset()`` resets the master's iterator (the others follow it).
"""

from __future__ import annotations

import chainer


class MultiNodeIterator(chainer.dataset.Iterator):
    """See the module docstring; build it with :func:`create_multi_node_iterator`."""

    def __init__(self, actual_iterator, communicator, rank_master: int = 0):
        if not (isinstance(rank_master, int) and 0 <= rank_master < communicator.size):
            raise ValueError(f"rank_master must be a rank in [0, {communicator.size}), got {rank_master!r}")
        self.communicator = communicator
        self.rank_master = rank_master
        self.is_master = communicator.rank == rank_master
        if self.is_master and actual_iterator is None:
            raise ValueError("create_multi_node_iterator: rank_master needs an actual iterator")
        self.actual_iterator = actual_iterator if self.is_master else None
        self._mirror = {"epoch": 0, "is_new_epoch": False, "epoch_detail": 0.0,
                       "previous_epoch_detail": None, "current_position": 0,
                       "epoch_size": None, "order": None}
        self._send_order = False  # the master resends its order when it may have changed
        # Collective, like ChainerMN's constructor: every rank starts with the master's state.
        self._mirror = communicator.bcast_obj(self._read_state() if self.is_master else None,
                                             root=rank_master)

    def _read_state(self) -> dict:
        it = self.actual_iterator
        dataset = getattr(it, "dataset", None)
        order = getattr(getattr(it, "_state", None), "order", None)
        return {"epoch": it.epoch, "is_new_epoch": it.is_new_epoch, "epoch_detail": it.epoch_detail,
                "previous_epoch_detail": getattr(it, "previous_epoch_detail", None),
                "current_position": getattr(it, "current_position", 0),
                "epoch_size": len(dataset) if dataset is not None else None,
                "order": None if order is None else order.copy()}

    def __next__(self):
        payload = None
        if self.is_master:
            try:
                payload = (False, self.actual_iterator.__next__())
            except StopIteration:
                payload = (True, None)
            state = self._read_state()
            self._mirror = state
            if not (self._send_order or state["is_new_epoch"]):
                state = {k: v for k, v in state.items() if k != "order"}  # unchanged: not resent
            self._send_order = False
            payload = (*payload, state)
        stop, batch, state = self.communicator.bcast_obj(payload, root=self.rank_master)
        if not self.is_master:
            self._mirror = {**self._mirror, **state}
        if stop:
            raise StopIteration
        return batch

    next = __next__

    @property
    def epoch(self):
        return self._mirror["epoch"]

    @property
    def is_new_epoch(self):
        return self._mirror["is_new_epoch"]

    @property
    def epoch_detail(self):
        return self._mirror["epoch_detail"]

    @property
    def previous_epoch_detail(self):
        return self._mirror["previous_epoch_detail"]

    @property
    def current_position(self):
        return self._mirror["current_position"]

    @property
    def _state(self):
        """The master's iterator state (ChainerMN exposes it, its tests read ``_state.order``)."""
        return getattr(self.actual_iterator, "_state", None)

    @property
    def _order(self):
        """The master's order as this rank last received it."""
        return self._mirror["order"]

    @property
    def batch_size(self):
        return getattr(self.actual_iterator, "batch_size", None)

    def reset(self):
        if self.is_master:
            self.actual_iterator.reset()
            self._mirror = self._read_state()
            self._send_order = True
        else:
            self._mirror = {**self._mirror, "epoch": 0, "is_new_epoch": False, "epoch_detail": 0.0,
                           "current_position": 0}

    def serialize(self, serializer):
        """The master (de)serializes its iterator; the others the mirrored state under the same
        keys (a snapshot of any rank loads into a plain Chainer iterator)."""
        if self.is_master:
            self.actual_iterator.serialize(serializer)
            self._mirror = self._read_state()
            self._send_order = True
            return
        st = self._mirror
        for key in ("current_position", "epoch", "is_new_epoch"):
            st[key] = serializer(key, st[key])
        if st["order"] is not None:  # written, never taken: the order is the master's
            try:
                serializer("order", st["order"])
            except KeyError:
                serializer("_order", st["order"])
        try:
            st["previous_epoch_detail"] = serializer("previous_epoch_detail", st["previous_epoch_detail"])
        except (KeyError, TypeError):
            pass
        if st["epoch_size"]:
            st["epoch_detail"] = st["epoch"] + st["current_position"] / st["epoch_size"]

    def finalize(self):
        if self.is_master:
            self.actual_iterator.finalize()


def create_multi_node_iterator(actual_iterator, communicator, rank_master: int = 0):
    """Iterator that yields ``rank_master``'s batches on every rank (module docstring).

    Args:
        actual_iterator: a Chainer iterator on ``rank_master`` (others may pass None).
        communicator: the communicator.
        rank_master: the rank whose iterator draws the batches.
    """
    return MultiNodeIterator(actual_iterator, communicator, rank_master)
