"""``BucketedCommunicator``: the ``multi_node_mean_grad`` shared by ``flat`` and ``hierarchical``.

A call selects the parameters (sorted names, ChainerMN ``zero_fill`` rules),
checks with one 16-byte allreduce that every rank has the same parameter set
(:meth:`check_params_consistent`, a clear :class:`ParameterMismatchError`
otherwise), then runs the buckets of a cached :class:`BucketReducer` for that
layout. Buffers and shared-memory windows are allocated once per layout and
reused; a config change frees them at the next (collective) call.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any

from mpi4py import MPI

from hpcsgd.comm.buckets import BucketAlgorithm, BucketReducer, raise_if_nonfinite
from hpcsgd.comm.fp16_reduce import check_half_scaling, check_wire_ranks
from hpcsgd.comm.kernels import WIRE_FORMATS
from hpcsgd.comm.mpi_base import MpiCommunicatorBase
from hpcsgd.comm.packing import GradLayout, select_params
from hpcsgd.errors import ConfigError


class BucketedCommunicator(MpiCommunicatorBase):
    """Gradient mean through a per-layout :class:`BucketReducer` (subclasses give the algorithm)."""

    #: (intra, inter) wire formats when neither ``allreduce_grad_dtype`` nor the level option is set
    DEFAULT_WIRE = ("float32", "float32")
    #: float16 wire: ``half_scaling`` 'chunk' (power-of-two scale per message) or 'predivide'
    #: (grad / size cast directly); ``wire_ranks`` (study only): divide by this many ranks
    #: instead of the real size before the 16-bit cast and rescale after (see fp16_reduce.py)
    CONFIG_DEFAULTS = {**MpiCommunicatorBase.CONFIG_DEFAULTS, "half_scaling": "chunk", "wire_ranks": None}

    def __init__(self, mpi_comm=None, **config: Any) -> None:
        self._reducers: dict[Any, BucketReducer] = {}
        self._gpu_grads = False  # set per call: CuPy gradients take the NCCL algorithms
        self._stale: list[BucketReducer] = []
        super().__init__(mpi_comm=mpi_comm, **config)

    # -- configuration -------------------------------------------------------------
    def _validate_config(self, name: str, value: Any) -> Any:
        if name == "half_scaling":
            return check_half_scaling(value)
        if name == "wire_ranks":
            return check_wire_ranks(value)
        return super()._validate_config(name, value)

    def half_wire_options(self) -> dict:
        """Keyword arguments of the 16-bit wire for the algorithms (``half_scaling``, ``wire_ranks``)."""
        return {"half_scaling": self.get_config("half_scaling"), "wire_ranks": self.get_config("wire_ranks")}

    def _on_config_change(self, name: str, value: Any) -> None:
        if getattr(self, "_reducers", None):
            self._stale.extend(self._reducers.values())
            self._reducers = {}

    def wire_formats(self) -> tuple[str, str]:
        """(intra-node, inter-node) wire format from the config (level option > allreduce_grad_dtype)."""
        common = self.get_config("allreduce_grad_dtype")
        out = []
        for level, default in zip(("intra_dtype", "inter_dtype"), self.DEFAULT_WIRE):
            w = self.get_config(level) or common or default
            if w not in WIRE_FORMATS:
                raise ConfigError(f"config {level!r}: {type(self).__name__} supports wire formats "
                                  f"{WIRE_FORMATS}, got {w!r}")
            out.append(w)
        return out[0], out[1]

    # -- buckets ------------------------------------------------------------------------
    @abstractmethod
    def _new_algorithm(self, layout: GradLayout) -> BucketAlgorithm:
        """Build the per-layout algorithm (collective: may allocate shared windows)."""

    def _wire_label(self) -> str:
        intra, inter = self.wire_formats()
        return intra if intra == inter or self.inter_size == 1 else f"{intra}/{inter}"

    def _free_stale(self) -> None:
        while self._stale:
            r = self._stale.pop(0)
            r.close()
            r.algorithm.free()

    def bucket_reducer(self, model, zero_fill: bool = False, threaded: bool = False) -> BucketReducer:
        """The cached reducer for ``model``'s current parameter set (collective; see buckets.py).

        Checks that all ranks agree on the parameters (names, shapes, dtypes and,
        without ``zero_fill``, which have a gradient) and raises
        :class:`~hpcsgd.errors.ParameterMismatchError` naming the first difference.
        """
        self._free_stale()
        params = select_params(model, zero_fill)
        self.check_params_consistent(model, include_grad=not zero_fill)
        layout = GradLayout.from_named(params)
        self._gpu_grads = bool(params) and type(params[0][1].array).__module__.startswith("cupy")
        threaded = bool(threaded) and MPI.Query_thread() == MPI.THREAD_MULTIPLE
        key = (layout.key, threaded, self._gpu_grads)
        reducer = self._reducers.get(key)
        if reducer is None:
            if len(self._reducers) >= 4:  # e.g. alternating zero_fill sets: keep a few
                self._stale.extend(self._reducers.values())
                self._reducers = {}
                self._free_stale()
            reducer = BucketReducer(self._new_algorithm(layout), self._wire_label(), threaded)
            self._reducers[key] = reducer
        reducer.zero_fill = zero_fill
        reducer.bind(params)
        return reducer

    # -- gradient mean ------------------------------------------------------------------
    def multi_node_mean_grad(self, model, zero_fill: bool = False) -> None:
        reducer = self.bucket_reducer(model, zero_fill, threaded=False)
        bad = reducer.wait_all()
        if self.get_config("check_finite"):
            raise_if_nonfinite(bad, reducer.algorithm.low_precision, reducer.wire_label)

    def finalize(self) -> None:
        self._stale.extend(self._reducers.values())
        self._reducers = {}
        self._free_stale()
        super().finalize()
