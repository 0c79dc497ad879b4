"""Notice, during Chainer's backward, the moment each parameter's gradient is final.

Chainer 7 accumulates parameter (leaf) gradients in a ``GradTable`` local to
``chainer._backprop._backprop_to_all`` and writes them into ``param.grad`` only
after the whole backward pass. A :class:`chainer.FunctionHook` sees every
function node before and after its backward, but not the gradients. So:

1. At the first ``backward_preprocess`` of a pass (the function that produced
   the loss), walk the graph from that node and count, for every parameter,
   how many function nodes take it as an input. A parameter used ``k`` times
   (shared weights, RNN steps) is final after the ``k``-th of those nodes ran
   its backward; in a ResNet ``k == 1``.
2. In ``backward_postprocess``, decrement the counts of the node's parameter
   inputs. At zero, read the accumulated gradient from the ``GradTable`` (found
   in the caller's frame; Chainer 7.8.1 is frozen, and the lookup is checked)
   and report it through ``on_ready(index, grad_array, owned)``. ``owned`` is True
   when no other gradient still in flight can share that memory (it shares none with
   the node's output gradients nor with its other inputs' gradients): only then may a
   caller write into it before backward ends (``F.add`` hands the same ``gy`` to both
   inputs, ``F.reshape`` a view of it).

If the lookup fails (another Chainer version) or a counted node never runs its
backward (its output got no gradient), the parameter is simply not reported:
the caller reads ``param.grad`` after backward instead. Correctness never
depends on the early notice, only the overlap does.
"""

from __future__ import annotations

import sys
from typing import Callable

import chainer
import numpy as np

try:  # the class whose instance holds the in-flight gradients
    from chainer._backprop_utils import GradTable, _reduce
except ImportError:  # pragma: no cover - other Chainer versions: no early notice
    GradTable, _reduce = None, None

_BACKPROP_FRAME = "_backprop_to_all"


class GradReadyHook(chainer.FunctionHook):
    """Calls ``on_ready(index, grad, owned)`` when parameter ``index``'s gradient is final.

    Args:
        param_nodes: ``{param.node: index}`` for the parameters to watch.
        on_ready: called with the parameter index, its final gradient array (the array
            that becomes ``param.grad``) and whether it owns its memory (see above).
    """

    name = "hpcsgd_grad_ready"

    def __init__(self, param_nodes: dict, on_ready: Callable[[int, object, bool], None]) -> None:
        self._param_nodes = param_nodes
        self._on_ready = on_ready
        self._remaining: dict | None = None
        self._table = None
        self.available = GradTable is not None
        self.reported = 0

    def reset(self) -> None:
        """Forget the current pass (call before each backward)."""
        self._remaining = None
        self._table = None
        self.reported = 0

    def _count_uses(self, root) -> dict:
        """{param node: number of function nodes below ``root`` using it as input}."""
        counts: dict = {}
        seen = {id(root)}
        stack = [root]
        params = self._param_nodes
        while stack:
            func = stack.pop()
            for x in set(func.inputs):
                if x in params:
                    counts[x] = counts.get(x, 0) + 1
                creator = x.creator_node
                if creator is not None and id(creator) not in seen:
                    seen.add(id(creator))
                    stack.append(creator)
        return counts

    def _find_table(self):
        """The GradTable of the running backward pass, or None."""
        frame = sys._getframe(2)  # backward_preprocess <- _backprop_to_all
        while frame is not None and frame.f_code.co_name != _BACKPROP_FRAME:
            frame = frame.f_back
        if frame is None:
            return None
        table = frame.f_locals.get("grads")
        return table if GradTable is not None and isinstance(table, GradTable) else None

    def backward_preprocess(self, function, in_data, out_grad):
        if self._remaining is None:
            self._remaining = self._count_uses(function)
            self._table = self._find_table() if self.available else None

    def backward_postprocess(self, function, in_data, out_grad):
        remaining = self._remaining
        if remaining and self._table is not None:
            for x in set(function.inputs):
                left = remaining.get(x)
                if left is None:
                    continue
                if left > 1:
                    remaining[x] = left - 1
                    continue
                del remaining[x]
                grads = self._table.grads.get(x)
                if grads:
                    g = _reduce(grads)
                    if g is not None:
                        self.reported += 1
                        arr = g.raw_array
                        owned = self._owns_memory(arr, function, x, out_grad)
                        self._on_ready(self._param_nodes[x], arr, owned)

    def _owns_memory(self, arr, function, x, out_grad) -> bool:
        """False when ``arr`` may share memory with a gradient backward still uses."""
        if not isinstance(arr, np.ndarray):
            return False  # device arrays: never written early
        for o in out_grad:
            if o is not None and np.may_share_memory(arr, o):
                return False
        table = self._table.grads
        for y in set(function.inputs):
            if y is x:
                continue
            for other in table.get(y) or ():
                if other is not None and np.may_share_memory(arr, other.raw_array):
                    return False
        return True
