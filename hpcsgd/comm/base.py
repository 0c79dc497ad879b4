"""The communicator interface (ChainerMN's ``CommunicatorBase``, kept method for method).

A ChainerMN program switches to hpcsgd with one import: every method below has
the name, arguments and semantics of ``chainermn.CommunicatorBase``.

Rules that hold for every method:

* Methods are named after the MPI function they resemble (``bcast`` is
  ``MPI_Bcast``, ``gather`` is ``MPI_Gatherv`` ...). Array methods move NumPy or
  CuPy arrays; the ``*_obj`` variants move any picklable Python object.
* Collectives (everything except ``send``/``recv``) must be called by every rank
  of the communicator, in the same order, with matching roots.
* Bad input raises on *every* rank (the check travels with the message header),
  so one rank's mistake never leaves the others blocked in a collective.

Configuration (``set_config``/``get_config``/``config_scope``) is held here: the
class attribute :attr:`CommunicatorBase.CONFIG_DEFAULTS` names every allowed
option with its default; algorithm classes extend it with their own names. As in
ChainerMN, every option is also an attribute (``comm.batched_copy``), assigning
it sets the option, and ``with comm.config_scope(): comm.batched_copy = False``
works; ``get_config(name)`` reports the value in effect (for the wire dtypes: the
format the algorithm actually sends, not ``None``).
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from typing import Any, Iterator

import numpy as np

from hpcsgd.errors import ConfigError

_DTYPE_CONFIGS = ("allreduce_grad_dtype", "intra_dtype", "inter_dtype")
_WIRE_DTYPES = ("float16", "bfloat16", "float32", "float64")


def _normalize_dtype(name: str, value: Any) -> Any:
    """``None`` stays None; anything ``np.dtype`` understands becomes its canonical name."""
    if value is None:
        return None
    text = str(value).strip().lower()
    if text in ("bf16", "bfloat16"):
        return "bfloat16"
    try:
        dt = np.dtype(value).name
    except TypeError as e:
        raise ConfigError(f"config {name!r}: {value!r} is not a dtype (one of {_WIRE_DTYPES})") from e
    if dt not in _WIRE_DTYPES:
        raise ConfigError(f"config {name!r}: dtype {dt} is not a wire dtype (one of {_WIRE_DTYPES})")
    return dt


def _normalize_config(name: str, value: Any) -> Any:
    """Validate and canonicalise the value of a base config option."""
    if name in _DTYPE_CONFIGS:
        return _normalize_dtype(name, value)
    if name in ("batched_copy", "check_finite"):
        if not isinstance(value, (bool, np.bool_)):
            raise ConfigError(f"config {name!r} takes a bool, got {value!r}")
        return bool(value)
    if name == "bucket_bytes":
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
            raise ConfigError(f"config 'bucket_bytes' takes a positive int (bytes), got {value!r}")
        return int(value)
    return value


class CommunicatorBase(ABC):
    """Abstract interface of every hpcsgd communicator (ChainerMN-compatible).

    Concrete classes implement the abstract methods; :class:`MpiCommunicatorBase
    <hpcsgd.comm.mpi_base.MpiCommunicatorBase>` implements all of them except
    :meth:`multi_node_mean_grad` on top of mpi4py.
    """

    #: Allowed config names and their defaults. Subclasses extend it:
    #: ``CONFIG_DEFAULTS = {**Parent.CONFIG_DEFAULTS, "my_option": 1}``.
    CONFIG_DEFAULTS: dict[str, Any] = {
        "batched_copy": True,           # pack/unpack all grads in one fused pass (ChainerMN)
        "allreduce_grad_dtype": None,   # wire dtype of the gradients; None: algorithm's choice
        "intra_dtype": None,            # wire dtype inside a node; None: allreduce_grad_dtype
        "inter_dtype": None,            # wire dtype between nodes; None: allreduce_grad_dtype
        "bucket_bytes": 4 << 20,        # bytes of packed gradients reduced per bucket
        "check_finite": False,          # raise NonFiniteGradientError on inf/nan mean grads
    }

    def __init__(self, **config: Any) -> None:
        object.__setattr__(self, "_configs", {})
        #: non-finite values in the averaged gradients of the last gradient mean (same on every
        #: rank; ChainerMN averages them silently, ``check_finite`` turns them into an error)
        self.nonfinite_count = 0
        for name, value in type(self).CONFIG_DEFAULTS.items():
            self._configs[name] = self._validate_config(name, value)
        for name, value in config.items():
            self.set_config(name, value)

    def __getattr__(self, name: str) -> Any:
        # only reached when normal lookup fails: config options read as attributes (ChainerMN)
        configs = self.__dict__.get("_configs")
        if configs is not None and name in configs:
            return self.get_config(name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        # ChainerMN sets options as attributes (``with comm.config_scope(): comm.batched_copy = x``);
        # inside its no-argument scope every attribute assigned is recorded as a config, as there
        if name in type(self).CONFIG_DEFAULTS:
            self.set_config(name, value)
        else:
            if self.__dict__.get("_within_config_scope"):
                self._configs[name] = value
            object.__setattr__(self, name, value)

    # -- ranks ---------------------------------------------------------------
    @property
    @abstractmethod
    def rank(self) -> int:
        """Rank of this process in the communicator (0 .. size-1)."""

    @property
    @abstractmethod
    def size(self) -> int:
        """Number of processes in the communicator."""

    @property
    @abstractmethod
    def intra_rank(self) -> int:
        """Rank of this process within its node (0 .. intra_size-1)."""

    @property
    @abstractmethod
    def intra_size(self) -> int:
        """Number of processes on this node."""

    @property
    @abstractmethod
    def inter_rank(self) -> int:
        """Index of this process's node (0 .. inter_size-1)."""

    @property
    @abstractmethod
    def inter_size(self) -> int:
        """Number of nodes."""

    # -- configuration ---------------------------------------------------------
    def _validate_config(self, name: str, value: Any) -> Any:
        """Return the canonical ``value`` for config ``name``; raise ConfigError if invalid.

        Subclasses that add options override this and call ``super()`` for the rest.
        """
        return _normalize_config(name, value)

    def _on_config_change(self, name: str, value: Any) -> None:  # noqa: B027 (optional hook)
        """Hook called after ``name`` changed (e.g. to drop cached buffers). No-op here."""

    def set_config(self, name: str, value: Any = True, **kwargs: Any) -> None:
        """Set config option ``name`` to ``value`` on this rank.

        Set the same value on every rank: options such as the wire dtype or the
        bucket size change what goes over the wire. Unknown names raise
        ``ValueError`` (:class:`~hpcsgd.errors.ConfigError`) listing the allowed ones.
        ``kwargs`` exist for ChainerMN compatibility and must be empty.
        """
        if kwargs:
            raise ConfigError(f"set_config({name!r}): unexpected keyword arguments {sorted(kwargs)}")
        allowed = type(self).CONFIG_DEFAULTS
        if name not in allowed:
            raise ConfigError(
                f"unknown config {name!r} for {type(self).__name__}; allowed: {', '.join(sorted(allowed))}")
        value = self._validate_config(name, value)
        if self._configs.get(name, object()) != value or name not in self._configs:
            self._configs[name] = value
            self._on_config_change(name, value)

    def _effective_config(self, name: str, value: Any) -> Any:
        """The value of option ``name`` in effect when its setting is ``value``.

        Algorithm classes resolve ``None`` (their default) here, e.g. the wire dtype.
        """
        return value

    def get_config(self, name: str | None = None) -> Any:
        """Value in effect of config ``name``; with ``name=None`` a dict of all options.

        Wire dtypes come back as ``numpy.dtype`` (as in ChainerMN; it compares equal to
        its name) or ``'bfloat16'``; ``None`` only where no algorithm decides one.
        """
        if name is None:
            return {n: self.get_config(n) for n in self._configs}
        if name not in self._configs:
            raise ConfigError(
                f"unknown config {name!r} for {type(self).__name__}; "
                f"allowed: {', '.join(sorted(self._configs))}")
        value = self._effective_config(name, self._configs[name])
        if name in _DTYPE_CONFIGS and value is not None and value != "bfloat16":
            return np.dtype(value)
        return value

    @contextlib.contextmanager
    def config_scope(self, name: str | None = None, value: Any = True) -> Iterator[None]:
        """Scope for configuration, in either convention.

        * ChainerMN's: ``with comm.config_scope(): comm.batched_copy = False`` (attributes
          assigned inside the block are set and recorded as configs; nothing is restored);
        * hpcsgd's: ``with comm.config_scope(name, value):`` sets the option inside the
          block and restores the previous setting afterwards.
        """
        if name is None:
            outer = self.__dict__.get("_within_config_scope", False)
            object.__setattr__(self, "_within_config_scope", True)
            try:
                yield
            finally:
                object.__setattr__(self, "_within_config_scope", outer)
            return
        self.get_config(name)  # unknown names raise before anything changes
        old = self._configs[name]
        self.set_config(name, value)
        try:
            yield
        finally:
            self.set_config(name, old)

    # -- communicator management -------------------------------------------------
    @abstractmethod
    def split(self, color: int, key: int) -> CommunicatorBase | None:
        """``MPI_Comm_split``: a communicator of the same class over the ranks with equal ``color``.

        Ranks are ordered by ``key`` in the new communicator. Collective. A rank
        passing ``MPI.UNDEFINED`` as color gets ``None``.
        """

    def finalize(self) -> None:  # noqa: B027 (nothing to release in the abstract class)
        """Release communicator resources (sub-communicators, windows, NCCL). Idempotent."""

    # -- array point-to-point --------------------------------------------------------
    @abstractmethod
    def send(self, data, dest: int, tag: int) -> None:
        """Send an array or a tuple/list of arrays (NumPy or CuPy) to rank ``dest``.

        A header (shapes, dtype, host/device) goes first, then each buffer; the
        receiver must call :meth:`recv` with the same ``tag``.
        """

    @abstractmethod
    def recv(self, source: int, tag: int):
        """Receive what :meth:`send` sent: an array, or a tuple if a tuple/list was sent.

        CuPy data arrives on the current device, NumPy data in host memory.
        """

    # -- array collectives -------------------------------------------------------------
    @abstractmethod
    def bcast(self, x, root: int = 0):
        """Broadcast one array from ``root``; other ranks pass None and get a new array.

        Tuples are rejected (``TypeError`` on every rank).
        """

    @abstractmethod
    def gather(self, x, root: int = 0):
        """Gather one array per rank at ``root`` (``MPI_Gatherv``: shapes may differ).

        Returns a tuple of ``size`` arrays at root and None elsewhere. dtypes must agree.
        """

    @abstractmethod
    def allgather(self, x):
        """Like :meth:`gather`, but every rank gets the tuple (``MPI_Allgatherv``)."""

    @abstractmethod
    def scatter(self, xs, root: int = 0):
        """Send ``xs[i]`` from ``root`` to rank ``i``; returns this rank's array.

        ``xs`` is a tuple of ``size`` arrays (shapes may differ) or one array
        split along axis 0 (``xs.shape[0] == size``). Non-root ranks pass anything.
        """

    @abstractmethod
    def alltoall(self, xs):
        """Send ``xs[i]`` to rank ``i`` and receive one array from every rank.

        ``len(xs) == size``; returns a tuple of ``size`` arrays (``MPI_Alltoallv``).
        """

    @abstractmethod
    def allreduce(self, x):
        """Elementwise **sum** of one array over all ranks (like ChainerMN, not the mean).

        Shapes must agree. dtypes int32, int64, float32, float64; float16 is
        summed in float32. Returns a new array of ``x``'s shape and dtype.
        """

    # -- object variants -------------------------------------------------------------
    @abstractmethod
    def send_obj(self, obj: Any, dest: int, tag: int = 0) -> None:
        """Send a picklable object to ``dest``."""

    @abstractmethod
    def recv_obj(self, source: int, status=None, tag: int = -1) -> Any:
        """Receive an object sent by :meth:`send_obj` (``tag=-1`` is ``MPI.ANY_TAG``)."""

    @abstractmethod
    def bcast_obj(self, obj: Any, max_buf_len: int | None = None, root: int = 0) -> Any:
        """Broadcast a picklable object from ``root``, in chunks of ``max_buf_len`` bytes.

        Chunking lets objects larger than 2 GiB (MPI's int count limit) through.
        """

    @abstractmethod
    def gather_obj(self, obj: Any, root: int = 0) -> list | None:
        """List of every rank's object at ``root`` (rank order), None elsewhere."""

    @abstractmethod
    def allreduce_obj(self, obj: Any) -> Any:
        """Sum of every rank's object with ``+`` (numbers, arrays, anything that adds)."""

    def scatter_obj(self, objs: Any, root: int = 0) -> Any:
        """Send ``objs[i]`` from ``root`` to rank ``i`` (hpcsgd extension)."""
        raise NotImplementedError

    def allgather_obj(self, obj: Any) -> list:
        """List of every rank's object on every rank (hpcsgd extension)."""
        raise NotImplementedError

    # -- model-level operations ------------------------------------------------------------
    @abstractmethod
    def bcast_data(self, model) -> None:
        """Overwrite every parameter's ``.data`` with rank 0's, in sorted-name order.

        Parameters whose data is not yet initialised are skipped. Ranks must agree
        on names, shapes and dtypes: otherwise every rank raises
        :class:`~hpcsgd.errors.ParameterMismatchError` naming the parameter.
        """

    def broadcast_data(self, model) -> None:
        """Alias of :meth:`bcast_data` (ChainerMN's old name)."""
        self.bcast_data(model)

    @abstractmethod
    def multi_node_mean_grad(self, model, zero_fill: bool = False) -> None:
        """Replace every parameter's ``.grad`` with its mean over all ranks.

        Unused parameters (data but ``grad is None``): with ``zero_fill=True`` they join
        with zeros and get the mean (ChainerMN). With ``False`` a parameter without a
        gradient on every rank is skipped (its grad stays None); one that has a gradient
        on some ranks only is treated as zeros on the others, with a warning naming it,
        and every rank gets the mean (as PyTorch DDP). Non-finite values are averaged
        like any other (ChainerMN) and counted in :attr:`nonfinite_count`; with the
        ``check_finite`` option on, a non-zero count raises
        :class:`~hpcsgd.errors.NonFiniteGradientError`
        (:class:`~hpcsgd.errors.GradientOverflowError` for 16-bit wire formats) on
        every rank, after the grads were written back.
        """

    def allreduce_grad(self, model, zero_fill: bool = False) -> None:
        """Deprecated ChainerMN alias of :meth:`multi_node_mean_grad`."""
        self.multi_node_mean_grad(model, zero_fill)

    def multi_node_mean_grad_async(self, model, zero_fill: bool = False):
        """Start :meth:`multi_node_mean_grad`; returns a handle whose ``wait()`` finishes it.

        ``wait()`` writes the averaged grads back and raises like the blocking call.
        Until ``wait()`` returns, the grads must not be modified. This default runs
        the blocking call now and defers only its error to ``wait()``.
        """
        try:
            self.multi_node_mean_grad(model, zero_fill)
        except Exception as e:  # re-raised in lock-step by wait()
            return CompletedHandle(e)
        return CompletedHandle(None)

    def bucket_algorithm(self, layout):
        """The per-bucket algorithm for ``layout`` (:mod:`hpcsgd.comm.bucket_algorithm`), or None.

        Collective. The gradient-reduction engine (:class:`~hpcsgd.comm.reducer.GradReducer`)
        drives it for the blocking, double-buffered and overlapped means. None (this
        default) means the communicator has no bucketed path: overlap is then rejected
        and ``multi_node_mean_grad_async`` reduces at once.
        """
        return None

    @abstractmethod
    def _multi_node_mean(self, sendbuf, recvbuf) -> None:
        """Elementwise mean over all ranks of ``sendbuf`` written into ``recvbuf``.

        ``sendbuf=None`` averages ``recvbuf`` in place. Used by BN statistics.
        """


class CompletedHandle:
    """Handle of an operation that already ran; ``wait()`` re-raises its error, if any."""

    def __init__(self, error: BaseException | None = None) -> None:
        self._error = error

    def test(self) -> bool:
        """True: the operation is complete."""
        return True

    def wait(self) -> None:
        """Return, or raise the error the operation ended with (once)."""
        err, self._error = self._error, None
        if err is not None:
            raise err
