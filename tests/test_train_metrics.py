"""Phase aggregation across ranks (hand-computed), top-k counting, curves, planned topology."""

import numpy as np

from hpcsgd.train.evaluate import topk_correct
from hpcsgd.train.metrics import PHASES, PhaseMeter, plot_curves


class FakeAllgather:
    """Stands for a 2-rank communicator: 'the other rank' contributes a fixed vector."""

    def __init__(self, other):
        self.other = np.asarray(other, dtype=np.float64)

    def Get_size(self):
        return 2

    def Allgather(self, send, recv):
        recv[0] = send
        recv[1] = self.other


def test_phase_meter_mean_and_max_over_ranks():
    m = PhaseMeter()
    m.add({"forward": 1.0, "backward": 2.0}, loss=0.5, images=8)
    m.add({"forward": 3.0, "backward": 2.0, "allreduce": 1.0}, loss=1.5, images=8)
    n = len(PHASES)
    other = np.zeros(n + 4)
    other[PHASES.index("forward")] = 10.0  # the other rank: 10 s of forward over 2 iterations
    other[n:] = [3.0, 16, 2, 1.0]          # loss sum, images, iterations, elapsed seconds
    rec = m.aggregate(FakeAllgather(other))
    assert rec["iterations"] == 2
    assert rec["phase_mean_s"]["forward"] == (2.0 + 5.0) / 2  # per-iteration 2.0 here, 5.0 there
    assert rec["phase_max_s"]["forward"] == 5.0
    assert rec["phase_mean_s"]["backward"] == (2.0 + 0.0) / 2 and rec["phase_max_s"]["backward"] == 2.0
    assert rec["loss"] == (0.5 + 1.5 + 3.0) / 4
    assert rec["images_per_s"] > 0
    assert m.run_means()["forward"] == 2.0 and m.iters == 0  # interval reset, run totals kept


def test_topk_correct_against_hand_counts():
    logits = np.array([[0.1, 0.9, 0.0], [0.8, 0.1, 0.3], [0.2, 0.3, 0.5]], dtype=np.float32)
    labels = np.array([1, 2, 0], dtype=np.int32)
    assert topk_correct(logits, labels, 1) == 1       # row 0 only
    assert topk_correct(logits, labels, 2) == 2       # row 1: label 2 is second
    assert topk_correct(logits, labels, 5) == 3       # k clipped to 3 classes


def test_curves_png(tmp_path):
    hist = [{"kind": "train", "epoch": e / 4, "loss": 2.0 / (1 + e), "lr": 0.1} for e in range(8)]
    hist += [{"kind": "eval", "epoch": 1.0, "top1": 0.8, "top5": 0.99},
             {"kind": "eval", "epoch": 2.0, "top1": 0.85, "top5": 0.995}]
    path = plot_curves(hist, str(tmp_path / "c.png"))
    assert path and open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert plot_curves([], str(tmp_path / "none.png")) is None


def test_planned_topology():
    from hpcsgd.train.plan import planned_topology

    t = planned_topology({"gpu": True}, 1024, 8)
    assert (t["nodes"], t["ranks_per_node"], t["gpus_per_node"], t["uniform"]) == (128, 8, 8, True)
    t = planned_topology({"gpu": False}, 10, 4)
    assert (t["nodes"], t["gpus_per_node"], t["uniform"]) == (3, 0, False)
