"""Gradient layout, buckets, fused pack/unpack, zero_fill selection, and why grads can't stay views."""

import chainer
import chainer.functions as F
import chainer.links as L
import numpy as np

from hpcsgd.comm.packing import GradLayout, pack_all, select_params, unpack_all


class Net(chainer.Chain):
    def __init__(self):
        super().__init__()
        with self.init_scope():
            self.fc2 = L.Linear(5, 3)
            self.fc1 = L.Linear(4, 5)
            self.extra = L.Linear(3, 2)  # unused in forward: grad stays None


def forward(net, x):
    return F.sum(net.fc2(F.relu(net.fc1(x))))


def test_layout_is_sorted_by_name_and_contiguous():
    net = Net()
    params = select_params(net, zero_fill=True)
    layout = GradLayout.from_named(params)
    names = [s.name for s in layout.slots]
    assert names == sorted(names) == ["/extra/W", "/extra/b", "/fc1/W", "/fc1/b", "/fc2/W", "/fc2/b"]
    offs = [s.offset for s in layout.slots]
    sizes = [s.size for s in layout.slots]
    assert offs == list(np.cumsum([0] + sizes[:-1])) and layout.total == sum(sizes) == 6 + 2 + 20 + 5 + 15 + 3


def test_buckets_cover_the_buffer_and_pieces_map_back():
    net = Net()
    layout = GradLayout.from_named(select_params(net, zero_fill=True))
    ranges = layout.bucket_ranges(bucket_bytes=28, itemsize=4)  # 7 elements per bucket
    assert ranges[0] == (0, 7) and ranges[-1][1] == layout.total
    assert all(b - a == 7 for a, b in ranges[:-1])
    seen = np.zeros(layout.total, int)
    for lo, hi in ranges:
        for i, a, b in layout.pieces(lo, hi):
            s = layout.slots[i]
            assert s.offset <= a < b <= s.offset + s.size and lo <= a < b <= hi
            seen[a:b] += 1
    assert (seen == 1).all()


def test_pack_unpack_round_trip_with_scale_and_wire():
    net = Net()
    rng = np.random.default_rng(0)
    for _, p in net.namedparams():
        p.grad = rng.standard_normal(p.shape).astype(np.float32)
    params = select_params(net, zero_fill=False)
    layout = GradLayout.from_named(params)
    orig = np.concatenate([p.grad.reshape(-1) for _, p in params])
    buf = np.empty(layout.total, np.float32)
    pack_all(layout, params, buf, scale=0.5)
    np.testing.assert_array_equal(buf, orig * np.float32(0.5))
    buf[3] = np.nan
    assert unpack_all(layout, params, buf, scale=2.0) == 1
    got = np.concatenate([p.grad.reshape(-1) for _, p in params])
    assert np.isnan(got[3]) and np.array_equal(np.delete(got, 3), np.delete(orig, 3))
    b16 = np.empty(layout.total, np.uint16)
    pack_all(layout, params, b16, wire="float16")
    np.testing.assert_array_equal(b16.view(np.float16), got.astype(np.float16))


def test_zero_fill_selection_follows_chainermn():
    net = Net()
    net.cleargrads()
    forward(net, np.ones((2, 4), np.float32)).backward()
    assert net.extra.W.grad is None
    without = [n for n, _ in select_params(net, zero_fill=False)]
    assert "/extra/W" not in without and "/fc1/W" in without
    with_zero = dict(select_params(net, zero_fill=True))
    assert "/extra/W" in with_zero and (net.extra.W.grad == 0).all()


def test_chainer_backward_replaces_grad_arrays():
    """Why gradients cannot stay views of the flat buffer in Chainer 7.8.1 (see packing.py).

    Backward assigns a *new* array to ``param.grad``: after ``cleargrads()`` (grad None)
    and after ``zerograds()`` (existing zero grads are summed out of place).
    """
    net = Net()
    x = np.ones((2, 4), np.float32)
    params = select_params(net, zero_fill=True)
    layout = GradLayout.from_named(params)
    flat = np.zeros(layout.total, np.float32)
    for (_, p), s in zip(params, layout.slots):
        p.grad = flat[s.offset:s.offset + s.size].reshape(s.shape)  # install views
    assert all(np.shares_memory(p.grad, flat) for _, p in params)
    forward(net, x).backward()  # grads exist (zeros): accumulated out of place
    used = [p for n, p in params if not n.startswith("/extra")]
    assert not any(np.shares_memory(p.grad, flat) for p in used)
    assert (flat == 0).all()  # nothing was written into the views
    net.cleargrads()
    forward(net, x).backward()
    assert all(p.grad is not None and not np.shares_memory(p.grad, flat) for p in used)
