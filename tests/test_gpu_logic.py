"""The GPU path's logic, proved with stand-in objects (no GPU, no CuPy needed).

What is tested here is hpcsgd's own logic around the CUDA calls: which algorithm
the hierarchical communicator picks (the uniform fallback), on which device the
NCCL communicators are created and the buckets run (also from another thread),
that the one blocking host sync per step is inside the watchdog's view, that
pointer tables are uploaded once and only when a gradient moved, that a missing
libnccl gives a clear error on every rank, and that CuPy-like gradients never
reach NumPy-only calls. A fake ``cupy`` module records what the code asks of
CUDA; it proves nothing about CUDA itself (``benchmarks/gpu_validate.sh`` does
that on a GPU machine).
"""

from __future__ import annotations

import sys
import threading
import types
import warnings

import numpy as np
import pytest

from hpcsgd.comm import nccl as gpu
from hpcsgd.comm import nccl_setup
from hpcsgd.comm.dummy import DummyCommunicator
from hpcsgd.comm.hierarchical import HierarchicalCommunicator
from hpcsgd.comm.packing import GradLayout, Slot, flat_view
from hpcsgd.runtime import watchdog

# -- a fake CuPy: records the current device per thread and what was created where -----------------


class FakeStream:
    def __init__(self, name: str):
        self.name, self.ptr = name, 0

    def __enter__(self):
        self._prev, _state_of_streams.stream = _state_of_streams.stream, self
        return self

    def __exit__(self, *exc):
        _state_of_streams.stream = self._prev


class _State(threading.local):
    device = 0
    stream = FakeStream("null")


_state_of_streams = _State()


class FakeCupy:
    """Just enough of ``cupy`` / ``cupy.cuda`` / ``cupy.cuda.nccl`` for the code under test."""

    def __init__(self, nccl_available: bool = True):
        state = self.state = _state_of_streams
        state.device, state.stream = 0, FakeStream("null")
        self.created: list[tuple[int, int, object]] = []  # (device, size, uid) per NcclCommunicator
        self.destroyed: list[int] = []
        fake = self

        class Device:
            def __init__(self, device=None):
                self.id = state.device if device is None else int(device)

            def __enter__(self):
                self._prev, state.device = state.device, self.id
                return self

            def __exit__(self, *exc):
                state.device = self._prev

            def use(self):
                state.device = self.id

        class NcclCommunicator:
            def __init__(self, size, uid, rank):
                self.device = state.device
                fake.created.append((state.device, size, uid))

            def destroy(self):
                fake.destroyed.append(self.device)

        self.nccl = types.ModuleType("cupy.cuda.nccl")
        self.nccl.available = nccl_available
        if nccl_available:
            self.nccl.NcclCommunicator = NcclCommunicator
            self.nccl.get_unique_id = lambda: "uid-0"
            self.nccl.NCCL_SUM, self.nccl.NCCL_FLOAT32 = 0, 7
        self.cuda = types.ModuleType("cupy.cuda")
        self.cuda.Device = Device
        self.cuda.nccl = self.nccl
        self.cuda.get_current_stream = lambda: state.stream
        self.module = types.ModuleType("cupy")
        self.module.cuda = self.cuda
        self.module.zeros = lambda shape, dtype: Counter(state.device)
        self.module.empty = lambda n, dtype: np.empty(n, dtype)
        self.module.asarray = np.asarray

    def install(self, monkeypatch):
        monkeypatch.setitem(sys.modules, "cupy", self.module)
        monkeypatch.setitem(sys.modules, "cupy.cuda", self.cuda)
        monkeypatch.setitem(sys.modules, "cupy.cuda.nccl", self.nccl)
        return self


class Counter:
    """A device scalar: ``int()`` is the blocking read; records whether a collective was open then."""

    def __init__(self, device: int):
        self.device, self.value, self.reads = device, 0, []

    def fill(self, v):
        self.value = v

    def __int__(self):
        self.reads.append(watchdog.current())
        return self.value


class OneRank:
    """A one-rank mpi4py communicator stand-in (``others`` adds what other ranks would report)."""

    def __init__(self, others=()):
        self.others = list(others)

    def Get_rank(self):
        return 0

    def Get_size(self):
        return 1 + len(self.others)

    def bcast(self, obj, root=0):
        return obj

    def allgather(self, obj):
        return [obj, *self.others]


@pytest.fixture
def fake_cupy(monkeypatch):
    return FakeCupy().install(monkeypatch)


# -- NCCL set-up -------------------------------------------------------------------------------------


def test_nccl_communicator_is_created_on_the_given_device_inside_a_collective(fake_cupy, monkeypatch):
    seen = []
    orig = fake_cupy.nccl.NcclCommunicator.__init__

    def init(self, size, uid, rank):
        seen.append(watchdog.current())
        orig(self, size, uid, rank)

    monkeypatch.setattr(fake_cupy.nccl.NcclCommunicator, "__init__", init)
    fake_cupy.state.device = 0
    comm = gpu.nccl_comm_over(OneRank(), device=3)
    assert fake_cupy.created == [(3, 1, "uid-0")]
    assert comm.device == 3 and fake_cupy.state.device == 0  # the caller's device is restored
    assert seen[0] is not None and seen[0][0] == "nccl_init"


def test_missing_libnccl_is_a_clear_error(monkeypatch):
    FakeCupy(nccl_available=False).install(monkeypatch)
    problem = gpu.nccl_problem()
    assert "libnccl" in problem and "nvidia-nccl-cu12" in problem
    with pytest.raises(RuntimeError, match="NCCL is unavailable on 1 rank"):
        gpu.nccl_comm_over(OneRank(), device=0)


def test_missing_cupy_is_a_clear_error(monkeypatch):
    def no_cupy():
        raise ImportError("No module named 'cupy'")

    monkeypatch.setattr(nccl_setup, "_cupy_nccl", no_cupy)
    assert "hpcsgd[gpu]" in nccl_setup.nccl_problem()


def test_a_rank_without_nccl_stops_every_rank(fake_cupy):
    # this rank has NCCL, the other does not: both must raise (here: this one), none may hang
    with pytest.raises(RuntimeError, match="rank 1: no libnccl"):
        gpu.require_nccl(OneRank(others=["no libnccl"]))
    assert fake_cupy.created == []


# -- buckets: device, counter, watched sync ----------------------------------------------------------


class _Recorder(gpu._GpuAlgorithm):
    """A GPU algorithm whose buckets only record the device they ran on and add to the counter."""

    def __init__(self, n_buckets: int, device: int, bad_per_bucket: int):
        layout = GradLayout([Slot("w", (n_buckets,), "float32", 0, n_buckets)])
        super().__init__(layout, [(i, i + 1) for i in range(n_buckets)])
        self._init_device(device)
        self.bad_per_bucket = bad_per_bucket
        self.ran_on: list[int] = []
        self.streams: list[str] = []

    def _enqueue(self, i):
        cuda = sys.modules["cupy"].cuda
        self.ran_on.append(cuda.Device().id)
        self.streams.append(cuda.get_current_stream().name)
        self._bad.value += self.bad_per_bucket


def test_only_the_last_bucket_syncs_and_it_does_so_inside_a_collective(fake_cupy):
    alg = _Recorder(3, device=2, bad_per_bucket=5)
    assert [alg.run(i) for i in range(3)] == [0, 0, 15]
    assert len(alg._bad.reads) == 1  # one host read per step
    name, _ = alg._bad.reads[0]
    assert name == alg.sync_name  # the watchdog sees the blocking read
    assert alg._bad.value == 0  # reset for the next step


def test_buckets_run_on_the_algorithms_device_from_a_worker_thread(fake_cupy):
    alg = _Recorder(2, device=5, bad_per_bucket=0)
    out = []
    t = threading.Thread(target=lambda: out.extend(alg.run(i) for i in range(2)))
    t.start()
    t.join(10)
    assert out == [0, 0] and alg.ran_on == [5, 5]  # a fresh thread starts on device 0


def test_a_worker_thread_runs_buckets_on_the_binding_threads_stream(fake_cupy):
    from hpcsgd.comm.packing import BoundGrads

    alg = _Recorder(2, device=0, bad_per_bucket=0)
    grads = BoundGrads.__new__(BoundGrads)
    grads.layout, grads.vectors = alg.layout, []
    with FakeStream("training"):
        alg.bind(grads)
    t = threading.Thread(target=lambda: [alg.run(i) for i in range(2)])
    t.start()
    t.join(10)
    assert alg.streams == ["training", "training"]  # the worker's own current stream is "null"


def test_bind_refuses_gradients_on_another_device(fake_cupy):
    from hpcsgd.comm.packing import BoundGrads

    alg = _Recorder(1, device=1, bad_per_bucket=0)
    grads = BoundGrads.__new__(BoundGrads)
    grads.layout = alg.layout
    grads.vectors = [types.SimpleNamespace(device=types.SimpleNamespace(id=0))]
    with pytest.raises(ValueError, match=r"gradients are on GPU \[0\].*on GPU 1"):
        alg.bind(grads)
    grads.vectors = [types.SimpleNamespace(device=types.SimpleNamespace(id=1))]
    alg._bad.value = 9  # left over from a failed step
    alg.bind(grads)
    assert alg._bad.value == 0 and isinstance(alg.grads, gpu.GpuBoundGrads)


def test_free_destroys_every_nccl_communicator_on_its_device(fake_cupy):
    alg = _Recorder(1, device=4, bad_per_bucket=0)
    alg._comms = [gpu.nccl_comm_over(OneRank(), 4), gpu.nccl_comm_over(OneRank(), 4)]
    alg.free()
    alg.free()  # idempotent
    assert fake_cupy.destroyed == [4, 4]


def test_read_count_is_inside_the_named_collective():
    c = Counter(0)
    c.value = 7
    assert gpu.read_count(c, "allreduce_nccl_sync", buckets=3) == 7
    assert c.reads[0][0] == "allreduce_nccl_sync"
    assert watchdog.current() is None


def test_pointer_tables_upload_only_when_a_gradient_moved():
    uploads = []

    def upload(a):
        uploads.append(a.tolist())
        return tuple(a.tolist())

    t = gpu.PieceTables()
    first = t.get((0, 10), (1000, 2000), [0, 4], upload)
    assert t.get((0, 10), (1000, 2000), [0, 4], upload) is first  # pack then unpack: one table
    assert uploads == [[0, 4], [1000, 2000]]
    moved = t.get((0, 10), (1000, 3000), [0, 4], upload)
    assert uploads[-1] == [1000, 3000] and len(uploads) == 3  # only the pointers again
    assert moved[1] == first[1] and moved[2] == 2
    t.get((10, 20), (5000,), [0], upload)
    assert len(uploads) == 5  # another bucket has its own table


# -- which algorithm: the uniform fallback -----------------------------------------------------------


def _comm_standin(uniform: bool, intra_size: int, inter_size: int):
    topo = types.SimpleNamespace(uniform=uniform, intra_size=intra_size, inter_size=inter_size)
    s = types.SimpleNamespace(topology=topo, _mpi_comm="world",
                              get_config=lambda k: {"bucket_bytes": 1 << 20, "half_scaling": "predivide"}[k],
                              wire_formats=lambda: ("float32", "float16"))
    return s


@pytest.fixture
def algorithms(monkeypatch):
    made = []
    for name, kind in (("NcclAllreduceAlgorithm", "flat"), ("GpuHierarchicalAlgorithm", "hier")):
        monkeypatch.setattr(gpu, name, lambda *a, kind=kind, **k: made.append((kind, a, k)) or kind)
    monkeypatch.setattr(gpu, "current_device", lambda: 6)
    return made


def test_gpu_hierarchical_falls_back_to_one_nccl_allreduce_on_unequal_nodes(algorithms):
    layout = GradLayout([], gpu=True)
    with pytest.warns(RuntimeWarning, match="different numbers of ranks"):
        assert HierarchicalCommunicator.bucket_algorithm(_comm_standin(False, 2, 2), layout) == "flat"
    # all ranks in one NCCL communicator, inter-node wire (the job spans nodes), this rank's device
    assert algorithms[-1] == ("flat", (layout, "world", "float16", 1 << 20, 6), {"half_scaling": "predivide"})


def test_gpu_hierarchical_one_rank_per_node_is_flat_equal_nodes_are_hierarchical(algorithms):
    layout = GradLayout([], gpu=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert HierarchicalCommunicator.bucket_algorithm(_comm_standin(True, 1, 4), layout) == "flat"
        assert HierarchicalCommunicator.bucket_algorithm(_comm_standin(True, 2, 2), layout) == "hier"
        assert HierarchicalCommunicator.bucket_algorithm(_comm_standin(True, 4, 1), layout) == "hier"
    assert algorithms[1][1][-1] == 6 and algorithms[1][1][2:4] == ("float32", "float16")
    assert all(k == {"half_scaling": "predivide"} for _, _, k in algorithms)  # the config is passed on


def test_gpu_hierarchical_algorithm_itself_refuses_unequal_nodes(fake_cupy):
    topo = types.SimpleNamespace(uniform=False)
    with pytest.raises(ValueError, match="same number of ranks on every node"):
        gpu.GpuHierarchicalAlgorithm(GradLayout([]), topo, "float32", "float16", 1 << 20, 0)
    assert fake_cupy.created == []


def test_dummy_takes_the_cuda_kernels_for_cupy_gradients(monkeypatch):
    monkeypatch.setattr(gpu, "GpuPackOnlyAlgorithm", lambda *a: ("gpu", a))
    monkeypatch.setattr(gpu, "current_device", lambda: 1)
    layout = GradLayout([], gpu=True)
    s = _comm_standin(True, 1, 1)
    assert DummyCommunicator.bucket_algorithm(s, layout) == ("gpu", (layout, "float32", 1 << 20, 1))
    assert type(DummyCommunicator.bucket_algorithm(s, GradLayout([]))).__name__ == "DummyAlgorithm"


# -- NumPy-only calls never see a CuPy array ---------------------------------------------------------


class DeviceArray:
    """Refuses implicit conversion to NumPy, as ``cupy.ndarray`` does."""

    def __init__(self, data: np.ndarray):
        self.data = data
        self.flags = data.flags

    def __array__(self, *a, **k):
        raise TypeError("Implicit conversion to a NumPy array is not allowed")

    def copy(self, order="K"):
        return DeviceArray(self.data.copy(order=order))

    def reshape(self, *shape):
        return DeviceArray(self.data.reshape(*shape))


def test_flat_view_makes_a_non_contiguous_device_gradient_contiguous_on_the_device():
    base = np.arange(12, dtype=np.float32).reshape(3, 4)
    p = types.SimpleNamespace(grad=DeviceArray(base.T))
    v = flat_view(p)
    assert isinstance(v, DeviceArray) and isinstance(p.grad, DeviceArray)
    assert p.grad.flags.c_contiguous
    np.testing.assert_array_equal(v.data, base.T.reshape(-1))


def test_sync_bn_sends_device_buffers_to_nccl_and_host_buffers_to_mpi(monkeypatch):
    from hpcsgd.models.batchnorm import SyncBatchNormFunction

    calls = []
    monkeypatch.setattr(nccl_setup, "device_allreduce", lambda comm, buf, name: calls.append(name) or "nccl")
    comm = types.SimpleNamespace(allreduce=lambda b: calls.append("mpi") or b * 2)
    fn = SyncBatchNormFunction(comm, 1e-5)
    assert fn._allreduce(DeviceArray(np.zeros(2)), "forward") == "nccl"
    np.testing.assert_array_equal(fn._allreduce(np.ones(2), "backward"), [2.0, 2.0])
    assert calls == ["sync_bn_forward", "mpi"]


def test_device_allreduce_declines_without_nccl_on_some_rank(fake_cupy):
    comm = types.SimpleNamespace(_mpi_comm=OneRank(others=["no libnccl"]))
    buf = types.SimpleNamespace(dtype=np.float64, device=types.SimpleNamespace(id=0))
    assert nccl_setup.device_allreduce(comm, buf, "sync_bn_forward") is None  # caller falls back to MPI
    assert comm._nccl_world == (0, None) and fake_cupy.created == []
    assert nccl_setup.device_allreduce(types.SimpleNamespace(), buf, "x") is None  # not an hpcsgd comm
