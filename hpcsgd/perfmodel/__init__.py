"""Performance model: alpha-beta allreduce costs, published clusters, time-to-train.

    from hpcsgd.perfmodel import get_cluster, predict
    p = predict(get_cluster("mn1"), devices=1024, global_batch=32768, epochs=90)
    p.time_to_train_s, p.efficiency, p.allreduce.latency
    heldout_table()   # the model on published runs it was not built from

See docs/perf.md and ``hpcsgd predict --help``.
"""

from .clusters import CLUSTER_NAMES, PUBLISHED, get_cluster
from .costs import COMMUNICATORS, CommCost, Level, allreduce_cost, pack_cost
from .heldout import HELDOUT, heldout_table
from .model import RESNET50, Cluster, Device, Prediction, Workload, predict

__all__ = ["CLUSTER_NAMES", "PUBLISHED", "HELDOUT", "get_cluster", "heldout_table", "COMMUNICATORS",
           "CommCost", "Level", "allreduce_cost", "pack_cost", "RESNET50", "Cluster", "Device", "Prediction",
           "Workload", "predict"]
