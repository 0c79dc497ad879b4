"""pytest conftest that runs ChainerMN's own tests against hpcsgd (used by chainermn_conformance.sh).

ChainerMN's tests reach the library three ways; each is redirected to hpcsgd before
the test modules are imported:

* ``chainermn.create_communicator(name)`` -> ``hpcsgd.create_communicator(...)``;
  ChainerMN's CPU names map to hpcsgd algorithms (``naive`` and ``flat`` to
  ``$HPCSGD_CONFORMANCE_COMM`` when set, else to the hpcsgd algorithm of the same name);
* ChainerMN's communicator classes, instantiated directly by the tests
  (``NaiveCommunicator(mpi_comm)``, ``FlatCommunicator(mpi_comm)``) -> the same factory;
  ``MpiCommunicatorBase`` (subclassed by a test) -> hpcsgd's;
* the training-script API hpcsgd provides (``scatter_dataset``,
  ``create_multi_node_evaluator``, ...) -> hpcsgd's; ``create_multi_node_optimizer``
  only with ``HPCSGD_CONFORMANCE_OPTIMIZER=hpcsgd`` (ChainerMN's own optimizer around an
  hpcsgd communicator is what a drop-in must support).

GPU-only names (``pure_nccl``, ``non_cuda_aware``) are left alone: their tests carry
the ``gpu`` mark and are deselected on CPU machines.
"""

from __future__ import annotations

import os
import sys
import unittest.mock

# ChainerMN's tests import the ``mock`` backport; the standard library's is the same API.
sys.modules.setdefault("mock", unittest.mock)

import chainermn  # noqa: E402
import chainermn.communicators  # noqa: E402
import chainermn.communicators.flat_communicator as _cmn_flat  # noqa: E402
import chainermn.communicators.mpi_communicator_base as _cmn_mpi_base  # noqa: E402
import chainermn.communicators.naive_communicator as _cmn_naive  # noqa: E402
import chainermn.datasets  # noqa: E402
import chainermn.extensions  # noqa: E402
import chainermn.extensions.checkpoint as _cmn_checkpoint  # noqa: E402
import chainermn.iterators  # noqa: E402
import chainermn.links  # noqa: E402
import chainermn.optimizers  # noqa: E402

import hpcsgd  # noqa: E402
import hpcsgd.comm.mpi_base  # noqa: E402

_CPU_NAMES = {"naive": "naive", "flat": "flat", "hierarchical": "hierarchical"}
_original_create = chainermn.create_communicator


def _hpcsgd_name(name: str) -> str:
    return os.environ.get("HPCSGD_CONFORMANCE_COMM") or _CPU_NAMES[name]


def create_communicator(communicator_name="hierarchical", mpi_comm=None, **kwargs):
    """ChainerMN's create_communicator, answered by hpcsgd for the CPU names."""
    if communicator_name not in _CPU_NAMES:
        return _original_create(communicator_name, mpi_comm, **kwargs)
    return hpcsgd.create_communicator(_hpcsgd_name(communicator_name), mpi_comm, **kwargs)


def _factory(name: str):
    def make(mpi_comm=None, **kwargs):
        return hpcsgd.create_communicator(_hpcsgd_name(name), mpi_comm, **kwargs)

    make.__name__ = f"hpcsgd_{name}"
    return make


chainermn.create_communicator = create_communicator
chainermn.communicators.create_communicator = create_communicator
_cmn_naive.NaiveCommunicator = _factory("naive")
_cmn_flat.FlatCommunicator = _factory("flat")
_cmn_mpi_base.MpiCommunicatorBase = hpcsgd.comm.mpi_base.MpiCommunicatorBase

# ChainerMN's own multi-node optimizer runs around the hpcsgd communicator (the conformance
# target); HPCSGD_CONFORMANCE_OPTIMIZER=hpcsgd swaps in hpcsgd's, whose two documented
# differences (it broadcasts in setup(), so the first update() already steps; it skips a step
# whose mean is not finite) the optimizer tests then show (docs/chainermn.md).
if os.environ.get("HPCSGD_CONFORMANCE_OPTIMIZER") == "hpcsgd":
    chainermn.create_multi_node_optimizer = hpcsgd.create_multi_node_optimizer
    chainermn.optimizers.create_multi_node_optimizer = hpcsgd.create_multi_node_optimizer

# The training-script API (hpcsgd.chainermn_api), where hpcsgd provides it.
for _name, _modules in {
    "scatter_dataset": (chainermn, chainermn.datasets),
    "scatter_index": (chainermn, chainermn.datasets),
    "create_empty_dataset": (chainermn.datasets,),
    "create_multi_node_evaluator": (chainermn, chainermn.extensions),
    "create_multi_node_checkpointer": (chainermn, chainermn.extensions, _cmn_checkpoint),
    "create_multi_node_iterator": (chainermn.iterators,),
    "MultiNodeBatchNormalization": (chainermn.links,),
}.items():
    _value = getattr(hpcsgd, _name, None)
    if _value is not None:
        for _module in _modules:
            setattr(_module, _name, _value)


def pytest_collection_modifyitems(config, items):
    """Skip the ChainerX variants when this Chainer was built without ChainerX.

    They test Chainer's ChainerX arrays, not the communicator, and fail with
    "ChainerX is not available" before reaching hpcsgd.
    """
    import chainerx
    import pytest

    if chainerx.is_available():
        return
    skip = pytest.mark.skip(reason="this Chainer has no ChainerX")
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if (params.get("use_chx") is True or "chx" in item.name
                or any(v is chainerx for v in params.values())):
            item.add_marker(skip)


@__import__("pytest").hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Report a test that stopped at a missing ChainerX function (``chx.array`` ...) or
    device ('native:0') as skipped, naming the cause."""
    import chainerx

    outcome = yield
    report = outcome.get_result()
    if not report.failed or call.excinfo is None or chainerx.is_available():
        return
    err = call.excinfo.value
    if ((isinstance(err, AttributeError) and "module 'chainerx' has no attribute" in str(err))
            or (isinstance(err, RuntimeError) and "ChainerX is not available" in str(err))):
        report.outcome = "skipped"
        report.longrepr = (str(item.path), item.location[1] or 0,
                           f"Skipped: this Chainer has no ChainerX ({err})")
