"""``MpiCommunicatorBase``: every communicator primitive on top of mpi4py.

Algorithm classes (naive, flat, hierarchical, nccl, dummy) derive from it through
:class:`~hpcsgd.comm.reducing.ReducingCommunicator` and implement only
``bucket_algorithm``. What this class adds to ChainerMN's ``MpiCommunicatorBase``:

* the topology comes from :func:`hpcsgd.runtime.topology.create_topology`, so
  ``HPCSGD_RANKS_PER_NODE`` virtual nodes drive the hierarchical paths;
* the wrapped communicator is a private ``Dup`` of the one passed in, so hpcsgd
  traffic never matches a user's messages on the same communicator;
* bad input raises on every rank (errors travel in the message headers);
* arrays of any dtype move as raw bytes (float16 is not widened to float32);
* :meth:`check_params_consistent` names the first parameter the ranks disagree on, and
  :meth:`select_grads` agrees on the gradients a mean averages (unused parameters);
* every blocking operation runs inside ``hpcsgd.runtime.watchdog.collective(name)``.

The ``*_obj`` collectives come from :class:`~hpcsgd.comm.object_collectives.MpiObjectCollectives`.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
from mpi4py import MPI

from hpcsgd.comm import _messages as msg
from hpcsgd.comm._params import ConsistencyChecker, explain_mismatch, param_signature, signature_hash
from hpcsgd.comm.base import CommunicatorBase
from hpcsgd.comm.object_collectives import MpiObjectCollectives
from hpcsgd.comm.packing import select_params
from hpcsgd.errors import ParameterMismatchError
from hpcsgd.runtime.topology import Topology, create_topology
from hpcsgd.runtime.watchdog import collective

_MPI_SUM_TYPE = {"int32": MPI.INT32_T, "int64": MPI.INT64_T, "float32": MPI.FLOAT, "float64": MPI.DOUBLE}


class MpiCommunicatorBase(MpiObjectCollectives, CommunicatorBase):
    """All of :class:`~hpcsgd.comm.base.CommunicatorBase` except ``multi_node_mean_grad``.

    Args:
        mpi_comm: an mpi4py communicator (``MPI.COMM_WORLD`` when None); it is
            duplicated, the original stays the caller's.
        **config: initial values of config options (see ``CONFIG_DEFAULTS``).

    Subclasses keep the ``(mpi_comm=None, **config)`` constructor signature:
    :meth:`split` builds ``type(self)(mpi_comm=..., **self.get_config())``.
    """

    def __init__(self, mpi_comm=None, **config: Any) -> None:
        base = MPI.COMM_WORLD if mpi_comm is None else mpi_comm
        self._mpi_comm = base.Dup()
        self._finalized = False
        self._topology: Topology = create_topology(self._mpi_comm, **self._topology_kwargs())
        self._param_checker = ConsistencyChecker()
        self._warned_unused: set = set()
        super().__init__(**config)

    def _topology_kwargs(self) -> dict:
        """Extra arguments to ``create_topology`` (the NCCL communicator asks for ``use_gpu``)."""
        return {}

    # -- ranks -------------------------------------------------------------
    @property
    def rank(self) -> int:
        return self._topology.rank

    @property
    def size(self) -> int:
        return self._topology.size

    @property
    def intra_rank(self) -> int:
        return self._topology.intra_rank

    @property
    def intra_size(self) -> int:
        return self._topology.intra_size

    @property
    def inter_rank(self) -> int:
        return self._topology.inter_rank

    @property
    def inter_size(self) -> int:
        return self._topology.inter_size

    @property
    def mpi_comm(self):
        """The (duplicated) mpi4py communicator all operations run on."""
        return self._mpi_comm

    @property
    def topology(self) -> Topology:
        """Placement of the ranks: node-local and inter-node sub-communicators, GPU id."""
        return self._topology

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(rank={self.rank}, size={self.size}, "
                f"nodes={self.inter_size}x{self.intra_size})")

    # -- management ------------------------------------------------------------
    def split(self, color: int, key: int):
        with collective("split", color=color):
            new = self._mpi_comm.Split(color, key)
        if new == MPI.COMM_NULL:
            return None
        try:
            return type(self)(mpi_comm=new, **self._configs)
        finally:
            new.Free()

    def finalize(self) -> None:
        if self._finalized:
            return
        self._finalized = True
        self._topology.free()
        self._mpi_comm.Free()

    # -- point-to-point ----------------------------------------------------------
    def send(self, data, dest: int, tag: int) -> None:
        header = msg.describe(data, "send")
        with collective("send", dest=dest, tag=tag):
            self._mpi_comm.send(header, dest=dest, tag=tag)
            header.raise_error()  # after telling the receiver, which raises too
            arrays = data if header.is_tuple else [data]
            for a in arrays:
                self._mpi_comm.Send([msg.to_host(a), MPI.BYTE], dest=dest, tag=tag)

    def recv(self, source: int, tag: int):
        status = MPI.Status()
        with collective("recv", source=source, tag=tag):
            header = self._mpi_comm.recv(source=source, tag=tag, status=status)
            header.raise_error()
            source, tag = status.Get_source(), status.Get_tag()  # pin wildcards for the payload
            out = []
            for shape in header.shapes:
                buf = np.empty(shape, dtype=header.dtype)
                self._mpi_comm.Recv([buf, MPI.BYTE], source=source, tag=tag)
                out.append(msg.from_host(buf, header.on_device))
        return tuple(out) if header.is_tuple else out[0]

    # -- array collectives ----------------------------------------------------------
    def bcast(self, x, root: int = 0):
        with collective("bcast", root=root):
            if self.rank == root:
                header = self._mpi_comm.bcast(msg.describe(x, "bcast", allow_tuple=False), root)
                header.raise_error()
                self._mpi_comm.Bcast([msg.to_host(x), MPI.BYTE], root)
                return x
            header = self._mpi_comm.bcast(None, root)
            header.raise_error()
            buf = np.empty(header.shapes[0], dtype=header.dtype)
            self._mpi_comm.Bcast([buf, MPI.BYTE], root)
            return msg.from_host(buf, header.on_device)

    def gather(self, x, root: int = 0):
        with collective("gather", root=root):
            headers = self._mpi_comm.allgather(msg.describe(x, "gather", allow_tuple=False))
            msg.raise_first_error(headers, "gather")
            send = [msg.to_host(x), MPI.BYTE]
            if self.rank != root:
                self._mpi_comm.Gatherv(send, None, root)
                return None
            counts = [h.nbytes[0] for h in headers]
            flat = np.empty(sum(counts), dtype=np.uint8)
            self._mpi_comm.Gatherv(send, [flat, (counts, msg.displacements(counts)), MPI.BYTE], root)
        return self._unflatten(flat, headers)

    def allgather(self, x):
        with collective("allgather"):
            headers = self._mpi_comm.allgather(msg.describe(x, "allgather", allow_tuple=False))
            msg.raise_first_error(headers, "allgather")
            counts = [h.nbytes[0] for h in headers]
            flat = np.empty(sum(counts), dtype=np.uint8)
            self._mpi_comm.Allgatherv([msg.to_host(x), MPI.BYTE],
                                      [flat, (counts, msg.displacements(counts)), MPI.BYTE])
        return self._unflatten(flat, headers)

    def scatter(self, xs, root: int = 0):
        with collective("scatter", root=root):
            if self.rank != root:
                header = self._mpi_comm.scatter(None, root)
                header.raise_error()
                buf = np.empty(header.shapes[0], dtype=header.dtype)
                self._mpi_comm.Scatterv(None, [buf, MPI.BYTE], root)
                return msg.from_host(buf, header.on_device)
            parts, headers = self._scatter_parts(xs)
            header = self._mpi_comm.scatter(headers, root)
            header.raise_error()
            counts = [h.nbytes[0] for h in headers]
            flat = np.concatenate([msg.to_host(p).reshape(-1).view(np.uint8) for p in parts])
            buf = np.empty(header.shapes[0], dtype=header.dtype)
            self._mpi_comm.Scatterv([flat, (counts, msg.displacements(counts)), MPI.BYTE],
                                    [buf, MPI.BYTE], root)
            return msg.from_host(buf, header.on_device)

    def _scatter_parts(self, xs):
        """Root side of scatter: the per-rank arrays and headers (or error headers)."""
        def fail(text, kind="ValueError"):
            return None, [msg.Header(error=text, error_kind=kind)] * self.size

        if msg.is_array(xs):
            if xs.ndim == 0 or xs.shape[0] != self.size:
                return fail(f"scatter: array with shape {tuple(xs.shape)} cannot be split along axis 0 "
                            f"into {self.size} ranks")
            parts = [xs[i] for i in range(self.size)]
        elif isinstance(xs, (tuple, list)):
            if len(xs) != self.size:
                return fail(f"scatter: got {len(xs)} arrays for {self.size} ranks")
            parts = list(xs)
        else:
            return fail(f"scatter: expected an array or a tuple of arrays, got {type(xs).__name__}",
                        "TypeError")
        whole = msg.describe(parts, "scatter")
        if whole.error:
            return fail(whole.error, whole.error_kind)
        return parts, [msg.Header(shapes=[s], dtype=whole.dtype, on_device=whole.on_device)
                       for s in whole.shapes]

    def alltoall(self, xs):
        with collective("alltoall"):
            if not isinstance(xs, (tuple, list)) or len(xs) != self.size:
                n = len(xs) if isinstance(xs, (tuple, list)) else type(xs).__name__
                out = [msg.Header(error=f"alltoall: needs {self.size} arrays, got {n}",
                                  error_kind="ValueError")] * self.size
            else:
                whole = msg.describe(list(xs), "alltoall")
                out = [whole] * self.size if whole.error else [
                    msg.Header(shapes=[s], dtype=whole.dtype, on_device=whole.on_device)
                    for s in whole.shapes]
            headers = self._mpi_comm.alltoall(out)
            msg.raise_first_error(headers, "alltoall")
            scounts = [h.nbytes[0] for h in out]
            rcounts = [h.nbytes[0] for h in headers]
            sflat = np.concatenate([msg.to_host(x).reshape(-1).view(np.uint8) for x in xs])
            rflat = np.empty(sum(rcounts), dtype=np.uint8)
            self._mpi_comm.Alltoallv([sflat, (scounts, msg.displacements(scounts)), MPI.BYTE],
                                     [rflat, (rcounts, msg.displacements(rcounts)), MPI.BYTE])
        return self._unflatten(rflat, headers)

    @staticmethod
    def _unflatten(flat: np.ndarray, headers) -> tuple:
        arrays = msg.split_flat(flat, [h.shapes[0] for h in headers], headers[0].dtype)
        return tuple(msg.from_host(a, h.on_device) for a, h in zip(arrays, headers))

    def allreduce(self, x):
        error = None
        if not msg.is_array(x):
            error = (TypeError, f"allreduce: expected one numpy/cupy array, got {type(x).__name__}")
        elif np.dtype(x.dtype).name not in (*msg.SUM_DTYPES, "float16"):
            error = (TypeError,
                     f"allreduce: dtype {x.dtype} is not supported ({', '.join(msg.SUM_DTYPES)}, float16)")
        key = None if error else (tuple(x.shape), np.dtype(x.dtype).name)
        with collective("allreduce", nbytes=0 if error else int(x.nbytes)):
            self._agree("allreduce", error, key)
            host = msg.to_host(x)
            wire = host.astype(np.float32) if host.dtype == np.float16 else host
            out = np.empty_like(wire)
            self._mpi_comm.Allreduce([wire, _MPI_SUM_TYPE[wire.dtype.name]],
                                     [out, _MPI_SUM_TYPE[wire.dtype.name]], op=MPI.SUM)
        return msg.from_host(out.astype(x.dtype, copy=False), msg.is_cupy(x))

    def _agree(self, op: str, error: tuple[type, str] | None, key: Any) -> None:
        """Raise on every rank if any rank has ``error`` (exception class, text) or the
        ranks' ``key``s differ.

        One 24-byte Allreduce; details are gathered only when something is wrong.
        """
        h = 0 if error else signature_hash(key)
        flags = np.array([1 if error else 0, h, -h], dtype=np.int64)
        self._mpi_comm.Allreduce(MPI.IN_PLACE, [flags, MPI.INT64_T], op=MPI.MAX)
        if flags[0] == 0 and flags[1] == -flags[2]:
            return
        infos = self._mpi_comm.allgather((error, key))
        for r, (e, _) in enumerate(infos):
            if e:
                raise e[0](f"{e[1]} (on rank {r})")
        per_rank = {r: k for r, (_, k) in enumerate(infos)}
        raise ValueError(f"{op}: ranks disagree on (shape, dtype): {per_rank}")

    # -- model-level -----------------------------------------------------------------
    def _signatures_if_different(self, sig) -> list | None:
        """None when every rank has ``sig``; else every rank's signature. Collective.

        Costs one 16-byte allreduce; the signatures are gathered only on a mismatch.
        """
        h = self._param_checker.local_hash(sig)
        pair = np.array([h, -h], dtype=np.int64)
        with collective("check_params", n=len(sig)):
            self._mpi_comm.Allreduce(MPI.IN_PLACE, [pair, MPI.INT64_T], op=MPI.MAX)
            if pair[0] == -pair[1]:
                return None
            return self._mpi_comm.allgather(sig)

    def check_params_consistent(self, model, include_grad: bool = True) -> None:
        """Raise :class:`ParameterMismatchError` on every rank unless all ranks agree on
        the parameter names, shapes, dtypes (and, with ``include_grad``, which have a grad).

        Collective. Costs one 16-byte allreduce; the message names the first
        differing parameter and the ranks on each side.
        """
        signatures = self._signatures_if_different(param_signature(model, include_grad))
        if signatures is not None:
            raise ParameterMismatchError(explain_mismatch(signatures))

    def select_grads(self, model, zero_fill: bool) -> list:
        """``[(name, param)]`` (sorted) whose gradients a mean averages, agreed by all ranks. Collective.

        ``zero_fill=True``: every parameter with data; a missing gradient becomes zeros
        (ChainerMN). ``False``: the parameters that have a gradient on some rank; on a
        rank where one has none it becomes zeros (the mean then counts that rank as
        zero, as PyTorch DDP does for unused parameters) and a RuntimeWarning names it,
        on every rank. Names, shapes and dtypes must agree, else every rank raises
        :class:`ParameterMismatchError` naming the parameter.
        """
        if zero_fill:
            self.check_params_consistent(model, include_grad=False)
            return select_params(model, True)
        signatures = self._signatures_if_different(param_signature(model, include_grad=True))
        if signatures is None:
            return select_params(model, False)
        shapes = [tuple(e[:3] for e in sig) for sig in signatures]
        if len(set(shapes)) > 1:
            raise ParameterMismatchError(explain_mismatch([tuple((*e[:3], None) for e in sig)
                                                           for sig in signatures]))
        with_grad = [{e[0] for e in sig if e[3]} for sig in signatures]
        partial = sorted(set().union(*with_grad) - set.intersection(*with_grad))
        params = dict(model.namedparams())
        for name in partial:
            p = params[name]
            if p.grad is None:
                p.grad = p.xp.zeros_like(p.array)
        key = tuple(partial)
        if key not in self._warned_unused:
            self._warned_unused.add(key)
            ranks = {n: [r for r, names in enumerate(with_grad) if n not in names] for n in partial}
            warnings.warn(f"multi_node_mean_grad: parameters without a gradient on some ranks only "
                          f"(name: ranks without) {ranks}; those ranks count as zeros in the mean "
                          f"(pass zero_fill=True to make this explicit)", RuntimeWarning, stacklevel=3)
        return select_params(model, False)

    def bcast_data(self, model) -> None:
        self.check_params_consistent(model, include_grad=False)
        with collective("bcast_data"):
            for _, param in sorted(model.namedparams()):
                data = param.array
                if data is None:
                    continue
                if msg.is_cupy(data):
                    host = data.get()
                    self._mpi_comm.Bcast([host, MPI.BYTE], 0)
                    data.set(host)
                elif data.flags.c_contiguous and data.flags.writeable:
                    self._mpi_comm.Bcast([data, MPI.BYTE], 0)
                else:
                    host = np.ascontiguousarray(data)
                    self._mpi_comm.Bcast([host, MPI.BYTE], 0)
                    param.array[...] = host

    def _multi_node_mean(self, sendbuf, recvbuf) -> None:
        """Mean over ranks of ``sendbuf`` into ``recvbuf`` (in place when ``sendbuf`` is None).

        Floating dtypes only; float16 is summed in float32. Under ``chainer.is_debug()``
        shapes are checked across ranks (a second allreduce) and a non-finite mean raises
        ``ValueError('Parameters diverged after allreduce.')`` on every rank, as in ChainerMN.
        """
        import chainer

        if np.dtype(recvbuf.dtype).name not in ("float16", "float32", "float64"):
            raise TypeError(f"_multi_node_mean: needs a floating dtype, got {recvbuf.dtype}")
        if sendbuf is not None and (sendbuf.shape != recvbuf.shape or sendbuf.dtype != recvbuf.dtype):
            raise ValueError(f"_multi_node_mean: sendbuf {sendbuf.shape}/{sendbuf.dtype} does not match "
                             f"recvbuf {recvbuf.shape}/{recvbuf.dtype}")
        with collective("multi_node_mean", nbytes=int(recvbuf.nbytes)):
            if chainer.is_debug():
                self._agree("_multi_node_mean", None, (tuple(recvbuf.shape), np.dtype(recvbuf.dtype).name))
            src = recvbuf if sendbuf is None else sendbuf
            host = msg.to_host(src)
            work = host.astype(np.float32) if host.dtype == np.float16 else host.copy()
            mpi_type = _MPI_SUM_TYPE[work.dtype.name]
            self._mpi_comm.Allreduce(MPI.IN_PLACE, [work, mpi_type], op=MPI.SUM)
            work *= work.dtype.type(1.0 / self.size)
            if msg.is_cupy(recvbuf):
                import cupy

                recvbuf[...] = cupy.asarray(work).astype(recvbuf.dtype)
            else:
                recvbuf[...] = work
        if chainer.is_debug() and not np.isfinite(work).all():  # ChainerMN's debug check
            raise ValueError("Parameters diverged after allreduce.")  # same on every rank
