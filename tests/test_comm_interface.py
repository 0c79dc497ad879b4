"""CommunicatorBase interface: the factory, config rules, mismatch messages, and every
collective on 1-4 ranks and on 2 virtual nodes x 2 ranks (tests/mpi/check_comm_interface.py).

The rank-side script runs its checks on MpiCommunicatorBase (through a minimal
subclass) and, with 'all', on every registered communicator whose module exists
(their inherited primitives are the same code, so two sizes suffice for them).
"""

from __future__ import annotations

import chainer
import chainer.links as L
import numpy as np
import pytest

from hpcsgd.comm import COMMUNICATORS, communicator_class, create_communicator
from hpcsgd.comm._params import explain_mismatch, param_signature, signature_hash
from hpcsgd.comm.base import CommunicatorBase, CompletedHandle
from hpcsgd.errors import ConfigError

CHECK = "tests/mpi/check_comm_interface.py"


@pytest.mark.mpi
@pytest.mark.parametrize("n,env,which", [(1, {}, "base"), (2, {}, "base"), (3, {}, "all"), (4, {}, "base"),
                                         (4, {"HPCSGD_RANKS_PER_NODE": "2"}, "all")],
                         ids=["n1", "n2", "n3-all", "n4", "n4-2x2-all"])
def test_interface_on_ranks(mpirun, n, env, which):
    """MpiCommunicatorBase at every size; every registered communicator at 3 ranks and on 2x2."""
    res = mpirun(CHECK, n, [which], env=env, timeout=150)
    assert res.stdout.count("interface checks ok") == n, res.stdout


def test_unknown_communicator_lists_names():
    with pytest.raises(ValueError) as ei:
        create_communicator("ring")
    for name in COMMUNICATORS:
        assert name in str(ei.value)
    with pytest.raises(ValueError, match="both"):
        create_communicator("flat", name="naive")
    assert set(COMMUNICATORS) == {"naive", "flat", "hierarchical", "nccl", "dummy"}


def test_registered_classes_derive_from_base():
    for name in COMMUNICATORS:
        try:
            cls = communicator_class(name)
        except ValueError as e:  # module not written yet
            assert "not installed" in str(e)
            continue
        assert issubclass(cls, CommunicatorBase), name


class _Stub(CommunicatorBase):
    """CommunicatorBase with trivial ranks: exercises the config machinery without MPI."""

    CONFIG_DEFAULTS = {**CommunicatorBase.CONFIG_DEFAULTS, "extra": 3}
    rank = size = intra_rank = intra_size = inter_rank = inter_size = 0

    def __init__(self, **config):
        self.changes = []
        super().__init__(**config)

    def _on_config_change(self, name, value):
        self.changes.append((name, value))

    split = send = recv = bcast = gather = allgather = scatter = alltoall = allreduce = None
    send_obj = recv_obj = bcast_obj = gather_obj = allreduce_obj = bcast_data = None
    _multi_node_mean = None

    def multi_node_mean_grad(self, model, zero_fill=False):
        raise FloatingPointError("diverged")


def test_config_defaults_validation_and_scope():
    c = _Stub(allreduce_grad_dtype="float16", bucket_bytes=1 << 20)
    cfg = c.get_config()
    assert cfg["allreduce_grad_dtype"] == "float16" and cfg["bucket_bytes"] == 1 << 20
    assert cfg["batched_copy"] is True and cfg["check_finite"] is False and cfg["extra"] == 3
    with pytest.raises(ValueError) as ei:
        c.set_config("bucket_size", 5)
    for name in ("bucket_bytes", "batched_copy", "extra", "inter_dtype"):
        assert name in str(ei.value)
    for name, bad in [("bucket_bytes", 0), ("bucket_bytes", 1.5), ("bucket_bytes", True),
                      ("batched_copy", "yes"), ("intra_dtype", "int32"), ("inter_dtype", "nonsense")]:
        with pytest.raises(ConfigError, match=name):
            c.set_config(name, bad)
    c.set_config("inter_dtype", np.float16)
    assert c.get_config("inter_dtype") == "float16"
    c.set_config("inter_dtype", "bf16")
    assert c.get_config("inter_dtype") == "bfloat16"
    c.changes.clear()
    with c.config_scope("check_finite", True):
        assert c.get_config("check_finite") is True
    assert c.get_config("check_finite") is False
    assert c.changes == [("check_finite", True), ("check_finite", False)]
    with pytest.raises(ValueError):
        with c.config_scope("nope", 1):
            pass


def test_chainermn_config_conventions():
    """Options are attributes; ``config_scope()`` without arguments (ChainerMN) sets them for good."""
    c = _Stub()
    assert c.batched_copy is True and c.check_finite is False and c.bucket_bytes == 4 << 20
    with c.config_scope():
        c.batched_copy = False
        c.allreduce_grad_dtype = np.float16
    assert c.batched_copy is False and c.get_config("batched_copy") is False
    assert c.get_config("allreduce_grad_dtype") == np.float16  # numpy dtype, as ChainerMN returns
    assert isinstance(c.get_config("allreduce_grad_dtype"), np.dtype)
    c.batched_copy = True  # outside a scope too (ChainerMN's get_config reads the attribute)
    assert c.get_config("batched_copy") is True
    with pytest.raises(ConfigError, match="batched_copy"):
        c.batched_copy = "no"
    with pytest.raises(AttributeError):
        _ = c.no_such_option
    c.set_config("allreduce_grad_dtype", None)  # base class: no algorithm decides a wire dtype
    assert c.get_config("allreduce_grad_dtype") is None
    with c.config_scope():  # ChainerMN records any attribute set inside its scope as a config
        c.foobar = "0xdeadbeef"
    assert c._configs["foobar"] == "0xdeadbeef" and c.get_config("foobar") == "0xdeadbeef"
    c.other = 1  # outside the scope: a plain attribute
    assert "other" not in c._configs and c.other == 1


def test_check_combination_names_both_keys():
    from hpcsgd.comm import check_combination

    for name in COMMUNICATORS:
        reg = COMMUNICATORS[name]
        for gpu in (False, True):
            device = "gpu" if gpu else "cpu"
            if device not in reg.devices:
                with pytest.raises(ConfigError, match=f"communicator: {name}.*gpu: {str(gpu).lower()}"):
                    check_combination(name, gpu=gpu)
                continue
            check_combination(name, gpu=gpu)
            for key in ("overlap", "double_buffering"):
                if device in reg.overlap_devices:
                    check_combination(name, gpu=gpu, **{key: True})
                else:
                    text = f"{key}: true is not supported by communicator: {name}"
                    with pytest.raises(ConfigError, match=text):
                        check_combination(name, gpu=gpu, **{key: True})
    # GPU overlap and double buffering wait for a validation run on a GPU
    with pytest.raises(ConfigError, match="overlap: true .*hierarchical with gpu: true"):
        check_combination("hierarchical", overlap=True, gpu=True)
    with pytest.raises(ConfigError, match="alternatives"):
        check_combination("flat", overlap=True, double_buffering=True)
    with pytest.raises(ConfigError, match="unknown"):
        check_combination("ring")
    with pytest.raises(ConfigError, match="overlap: true is not supported by communicator: object"):
        check_combination(object(), overlap=True)
    with pytest.raises(ConfigError, match="double_buffering: true is not supported by communicator: nccl"):
        check_combination("nccl", double_buffering=True, gpu=None)


def test_capability_table_in_docs_is_generated():
    """README.md and docs/comm_algorithms.md carry the registry's table (``python -m hpcsgd.comm``)."""
    from pathlib import Path

    from hpcsgd.comm import capability_table
    from hpcsgd.comm.__main__ import replace_block

    root = Path(__file__).resolve().parent.parent
    for doc in (root / "docs" / "comm_algorithms.md", root / "README.md"):
        text = doc.read_text()
        assert "<!-- comm-table:begin -->" in text, doc
        assert replace_block(text, capability_table()) == text, \
            "run: python -m hpcsgd.comm --write README.md docs/comm_algorithms.md"
    table = capability_table()
    assert "| `naive` |" in table and "| `nccl` |" in table
    naive_row = next(r for r in table.splitlines() if r.startswith("| `naive`"))
    assert naive_row.split("|")[4].strip() == "no", "naive has no GPU path"


def test_default_async_defers_the_error_to_wait():
    handle = _Stub().multi_node_mean_grad_async(model=None)
    assert handle.test()
    with pytest.raises(FloatingPointError, match="diverged"):
        handle.wait()
    CompletedHandle().wait()


def _chain(out2, with_extra=False):
    c = chainer.Chain()
    with c.init_scope():
        c.a = L.Linear(4, 3)
        c.b = L.Linear(3, out2)
        if with_extra:
            c.c = L.Linear(2, 2)
    c.cleargrads()
    return c


def test_signature_and_mismatch_message():
    s0 = param_signature(_chain(2))
    assert [e[0] for e in s0] == ["/a/W", "/a/b", "/b/W", "/b/b"]
    assert s0[2] == ("/b/W", (2, 3), "float32", False)  # cleared grads
    assert param_signature(_chain(2), include_grad=False)[2] == ("/b/W", (2, 3), "float32", None)
    assert signature_hash(s0) == signature_hash(param_signature(_chain(2)))
    s1 = param_signature(_chain(5))
    assert signature_hash(s0) != signature_hash(s1)
    text = explain_mismatch([s0, s0, s1])
    assert "'/b/W'" in text and "(2, 3)" in text and "(5, 3)" in text and "[0, 1]" in text and "[2]" in text
    text = explain_mismatch([s0, param_signature(_chain(2, with_extra=True))])
    assert "'/c/W'" in text and "absent on ranks [0]" in text
    lazy = chainer.Chain()
    with lazy.init_scope():
        lazy.a = L.Linear(None, 3)
    lazy.cleargrads()
    sig = param_signature(lazy)
    assert sig[0] == ("/a/W", None, None, False)
    fresh = chainer.Chain()  # never cleared: Chainer raises on .grad of the lazy parameter
    with fresh.init_scope():
        fresh.a = L.Linear(None, 3)
    assert param_signature(fresh)[0] == ("/a/W", None, None, False)


def test_train_config_check_rejects_unsupported_combinations():
    """hpcsgd train's config check calls check_combination: the message names the keys."""
    from hpcsgd.train import config as C

    def resolve(**cfg):
        return C.resolve(C.merge(cfg, []), 2, check_paths=False)

    resolve(communicator="naive", overlap=True)  # CPU: every registered communicator overlaps
    resolve(communicator="flat", double_buffering=True)
    cases = [({"communicator": "naive", "gpu": True}, "communicator: naive does not run with gpu: true"),
             ({"communicator": "flat", "gpu": True}, "communicator: flat does not run with gpu: true"),
             ({"gpu": True, "overlap": True}, "overlap: true is not supported by communicator: hierarchical"),
             ({"communicator": "nccl", "gpu": True, "double_buffering": True},
              "double_buffering: true is not supported by communicator: nccl")]
    for cfg, words in cases:
        with pytest.raises(ConfigError, match=words):
            resolve(**cfg)


def test_debug_mode_raises_chainermn_divergence_error():
    """A bare communicator averages NaN (count exposed); in Chainer's debug mode it raises as ChainerMN."""
    import hpcsgd

    comm = hpcsgd.create_communicator("flat")
    model = _chain(3)
    model.a.W.grad = np.full_like(model.a.W.array, np.nan)
    model.a.b.grad = np.ones_like(model.a.b.array)
    comm.multi_node_mean_grad(model)
    assert comm.nonfinite_count == model.a.W.array.size
    chainer.set_debug(True)
    try:
        with pytest.raises(ValueError, match=r".* diverged .*"):
            comm.multi_node_mean_grad(model)
        model.a.W.grad = np.ones_like(model.a.W.array)
        comm.multi_node_mean_grad(model)  # finite: no error in debug mode either
    finally:
        chainer.set_debug(False)
    comm.finalize()


def test_hierarchical_grad_dtype_sets_the_wire_between_nodes_only():
    """``allreduce_grad_dtype`` (``wire_dtype`` in training) leaves the node stage float32.

    A float16 node stage casts ``grad / size`` unscaled, so it would flush small gradients
    at 1024+ ranks; ``intra_dtype`` still selects it explicitly. ``flat`` has one level:
    there the option sets the wire itself.
    """
    import hpcsgd

    comm = hpcsgd.create_communicator("hierarchical", allreduce_grad_dtype="float16")
    try:
        assert comm.wire_formats() == ("float32", "float16")
        comm.set_config("intra_dtype", "float16")
        assert comm.wire_formats() == ("float16", "float16")
    finally:
        comm.finalize()
    flat = hpcsgd.create_communicator("flat", allreduce_grad_dtype="float16")
    try:
        assert flat.wire_formats() == ("float16", "float16")
    finally:
        flat.finalize()
