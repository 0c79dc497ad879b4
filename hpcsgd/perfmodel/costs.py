"""Alpha-beta(-gamma) costs of the allreduce algorithms hpcsgd and its peers use.

Units everywhere: seconds, bytes, bytes per second. A network level is
described by :class:`Level`:

* ``alpha``  seconds per message step (hardware latency + library overhead);
* ``beta``   seconds per byte through one rail (1 / achievable bandwidth);
* ``gamma``  seconds per byte of reduction arithmetic at the endpoints;
* ``rails``  independent links per node (MN-1 has two FDR HCAs per node);
* ``group_size`` / ``oversubscription``: nodes per leaf switch group and the
  factor by which the uplinks of a group are oversubscribed (a thin tree).
  Traffic between groups that all nodes send at once runs ``oversubscription``
  times slower; a ring ordered by group sends one flow per group boundary and
  never pays it.

Every algorithm returns a :class:`CommCost` with the latency, bandwidth and
reduction terms separated, so callers (and tests) can see that float16 halves
exactly the bandwidth and reduction terms and leaves the latency term alone.

Algorithms (``n`` bytes, ``p`` participants):

* ring:             2(p-1) alpha + 2(p-1)/p n beta + (p-1)/p n gamma
* halving/doubling: 2 log2(p) alpha + 2(p-1)/p n beta + (p-1)/p n gamma
  (Rabenseifner; non-power-of-two p pays two extra full-size exchanges)
* reduce / broadcast (pipelined chain, as NCCL and MPICH do for large n):
  (p-1) alpha + n beta
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping


@dataclass(frozen=True)
class Level:
    """One level of the interconnect (intra-node or inter-node)."""

    name: str
    alpha: float
    beta: float
    gamma: float = 0.0
    rails: int = 1
    group_size: int | None = None
    oversubscription: float = 1.0
    sources: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.alpha < 0 or self.beta <= 0 or self.gamma < 0:
            raise ValueError(f"level {self.name!r}: need alpha >= 0, beta > 0, gamma >= 0")
        if self.rails < 1 or self.oversubscription < 1:
            raise ValueError(f"level {self.name!r}: need rails >= 1 and oversubscription >= 1")

    @property
    def bandwidth(self) -> float:
        """Achievable bytes/s through one rail."""
        return 1.0 / self.beta


@dataclass(frozen=True)
class CommCost:
    """Seconds of one collective, split by term."""

    latency: float = 0.0
    bandwidth: float = 0.0
    reduction: float = 0.0

    @property
    def total(self) -> float:
        return self.latency + self.bandwidth + self.reduction

    def __add__(self, other: CommCost) -> CommCost:
        return CommCost(self.latency + other.latency, self.bandwidth + other.bandwidth,
                        self.reduction + other.reduction)

    def as_dict(self) -> dict[str, float]:
        return {"latency_s": self.latency, "bandwidth_s": self.bandwidth,
                "reduction_s": self.reduction, "total_s": self.total}


ZERO = CommCost()


def _check(nbytes: float, p: int) -> None:
    if nbytes < 0:
        raise ValueError(f"negative message size {nbytes}")
    if p < 1:
        raise ValueError(f"need at least one participant, got {p}")


def ring_allreduce(nbytes: float, p: int, level: Level, rails_used: int = 1) -> CommCost:
    """Ring (bucket) allreduce: reduce-scatter then allgather, 2(p-1) steps."""
    _check(nbytes, p)
    if p == 1:
        return ZERO
    frac = (p - 1) / p
    return CommCost(2 * (p - 1) * level.alpha,
                    2 * frac * nbytes * level.beta / max(1, rails_used),
                    frac * nbytes * level.gamma)


def ring_reduce_scatter(nbytes: float, p: int, level: Level, rails_used: int = 1) -> CommCost:
    _check(nbytes, p)
    if p == 1:
        return ZERO
    frac = (p - 1) / p
    return CommCost((p - 1) * level.alpha, frac * nbytes * level.beta / max(1, rails_used),
                    frac * nbytes * level.gamma)


def ring_allgather(nbytes: float, p: int, level: Level, rails_used: int = 1) -> CommCost:
    _check(nbytes, p)
    if p == 1:
        return ZERO
    return CommCost((p - 1) * level.alpha, (p - 1) / p * nbytes * level.beta / max(1, rails_used), 0.0)


def halving_doubling_allreduce(nbytes: float, p: int, level: Level, rails_used: int = 1,
                               group_size: int | None = None) -> CommCost:
    """Recursive halving (reduce-scatter) + doubling (allgather), Rabenseifner.

    Step k of the halving exchanges n/2^k bytes with the partner at distance
    p'/2^k (far partners first). Steps whose partner lies in another switch
    group (distance >= ``group_size`` participants) run at ``beta *
    oversubscription`` because every node sends across the top level at once.
    A non-power-of-two p folds the extra ranks in and out with two full-size
    exchanges (the "binary blocks" refinement Goyal et al. use does better).
    """
    _check(nbytes, p)
    if p == 1:
        return ZERO
    p2 = 1 << int(math.floor(math.log2(p)))
    group = group_size if group_size is not None else level.group_size
    rails = max(1, rails_used)
    latency = 0.0
    bandwidth = 0.0
    steps = int(math.log2(p2))
    for k in range(1, steps + 1):
        distance = p2 >> k
        beta = level.beta * (level.oversubscription if group and distance >= group else 1.0)
        chunk = nbytes / (1 << k)
        latency += 2 * level.alpha  # one step in the halving, one in the doubling
        bandwidth += 2 * chunk * beta / rails
    reduction = (p2 - 1) / p2 * nbytes * level.gamma
    if p2 != p:
        latency += 2 * level.alpha
        bandwidth += 2 * nbytes * level.beta / rails
        reduction += nbytes * level.gamma
    return CommCost(latency, bandwidth, reduction)


def chain_reduce(nbytes: float, p: int, level: Level) -> CommCost:
    """Pipelined chain reduce to one root (NCCL reduce, MPICH large-message reduce)."""
    _check(nbytes, p)
    if p == 1:
        return ZERO
    return CommCost((p - 1) * level.alpha, nbytes * level.beta, nbytes * level.gamma)


def chain_broadcast(nbytes: float, p: int, level: Level) -> CommCost:
    _check(nbytes, p)
    if p == 1:
        return ZERO
    return CommCost((p - 1) * level.alpha, nbytes * level.beta, 0.0)


INTER_ALGORITHMS = ("ring", "halving_doubling")
#: The runtime's communicator names (hpcsgd.comm) plus ``leader``, the leader-based scheme the
#: runtime does not implement (ChainerMN's ``hierarchical``, Goyal et al.'s three phases).
COMMUNICATORS = ("naive", "flat", "nccl", "hierarchical", "leader")


def _inter_allreduce(nbytes: float, nodes: int, inter: Level, algorithm: str, rails_used: int) -> CommCost:
    if algorithm == "ring":
        # A ring ordered by switch group has one flow per group boundary: no oversubscription.
        return ring_allreduce(nbytes, nodes, inter, rails_used)
    if algorithm == "halving_doubling":
        return halving_doubling_allreduce(nbytes, nodes, inter, rails_used)
    raise ValueError(f"unknown inter-node algorithm {algorithm!r}; choose from {INTER_ALGORITHMS}")


def _scaled(cost: CommCost, times: int) -> CommCost:
    return CommCost(cost.latency * times, cost.bandwidth * times, cost.reduction * times)


def allreduce_cost(communicator: str, nbytes: float, nodes: int, per_node: int, intra: Level | None,
                   inter: Level, inter_algorithm: str = "ring", param_arrays: int = 1) -> CommCost:
    """Seconds to allreduce ``nbytes`` over ``nodes`` x ``per_node`` devices.

    The names are those of the runtime's communicators (``hpcsgd.comm``), so a
    measured case is modelled under its own name:

    * ``flat``: one MPI allreduce of the packed buffer. Inside one node, ``inter_algorithm``
      over the intra level; across nodes MPICH's SMP-aware allreduce (node-local reduce,
      allreduce among node leaders, broadcast), i.e. the ``leader`` cost: each host sends n
      bytes per direction, as benchmarks/cluster_allreduce.py's interface counters show.
    * ``naive``: one ``flat`` allreduce per parameter array (ChainerMN ``naive``).
    * ``nccl``: one ring over all devices (NCCL2, ChainerMN ``pure_nccl``, Horovod): 2(P-1)
      steps, each as slow as the slowest hop; inter-node hops use all rails.
    * ``hierarchical``: reduce-scatter inside the node, allreduce of each of the ``per_node``
      shards among the ranks of equal local rank (concurrently, sharing min(per_node, rails)
      rails), allgather inside the node (hpcsgd ``hierarchical``, ChainerMN
      ``two_dimensional``, Mikami et al.'s 2D torus with the node as one dimension).
    * ``leader``: reduce to a node leader, allreduce among leaders (``inter_algorithm``)
      through one rail, broadcast back (ChainerMN ``hierarchical``, Goyal et al.'s 3 phases).
    """
    if nodes < 1 or per_node < 1:
        raise ValueError(f"need nodes >= 1 and per_node >= 1, got {nodes} x {per_node}")
    if per_node > 1 and intra is None:
        raise ValueError("per_node > 1 needs an intra-node level")
    if communicator not in COMMUNICATORS:
        raise ValueError(f"unknown communicator {communicator!r}; choose from {COMMUNICATORS}")
    if inter_algorithm not in INTER_ALGORITHMS:
        raise ValueError(f"unknown inter-node algorithm {inter_algorithm!r}; choose from {INTER_ALGORITHMS}")
    p = nodes * per_node
    if p == 1:
        return ZERO
    if communicator == "naive":
        one = allreduce_cost("flat", nbytes / param_arrays, nodes, per_node, intra, inter, inter_algorithm)
        return _scaled(one, param_arrays)
    if communicator == "flat":
        if nodes == 1:
            return _inter_allreduce(nbytes, per_node, intra, inter_algorithm, 1)
        return allreduce_cost("leader", nbytes, nodes, per_node, intra, inter, inter_algorithm)
    if communicator == "nccl":
        return _nccl_cost(nbytes, nodes, per_node, intra, inter)
    if communicator == "leader":
        return _leader_cost(nbytes, nodes, per_node, intra, inter, inter_algorithm)
    return _hierarchical_cost(nbytes, nodes, per_node, intra, inter, inter_algorithm)


def _nccl_cost(nbytes: float, nodes: int, per_node: int, intra: Level | None, inter: Level) -> CommCost:
    """One ring over all devices; each of its 2(P-1) steps as slow as the slowest hop."""
    p = nodes * per_node
    if nodes == 1:
        return ring_allreduce(nbytes, p, intra)
    if per_node == 1:
        return ring_allreduce(nbytes, p, inter, inter.rails)
    slow_alpha = max(intra.alpha, inter.alpha)
    slow_beta = max(intra.beta, inter.beta / inter.rails)
    frac = (p - 1) / p
    return CommCost(2 * (p - 1) * slow_alpha, 2 * frac * nbytes * slow_beta,
                    frac * nbytes * max(intra.gamma, inter.gamma))


def _leader_cost(nbytes: float, nodes: int, per_node: int, intra: Level | None, inter: Level,
                 inter_algorithm: str) -> CommCost:
    """Reduce to a node leader, allreduce among the leaders, broadcast back."""
    cost = ZERO
    if per_node > 1:
        cost = cost + chain_reduce(nbytes, per_node, intra)
    cost = cost + _inter_allreduce(nbytes, nodes, inter, inter_algorithm, 1)
    if per_node > 1:
        cost = cost + chain_broadcast(nbytes, per_node, intra)
    return cost


def _hierarchical_cost(nbytes: float, nodes: int, per_node: int, intra: Level | None, inter: Level,
                       inter_algorithm: str) -> CommCost:
    """Reduce-scatter in the node, per_node concurrent shard allreduces across nodes, allgather."""
    cost = ZERO
    if per_node > 1:
        cost = cost + ring_reduce_scatter(nbytes, per_node, intra)
    # per_node concurrent shards of n/per_node share the node's rails.
    shard = nbytes / per_node
    lanes = min(per_node, inter.rails)
    one = _inter_allreduce(shard, nodes, inter, inter_algorithm, 1)
    cost = cost + CommCost(one.latency, one.bandwidth * per_node / lanes, one.reduction)
    if per_node > 1:
        cost = cost + ring_allgather(nbytes, per_node, intra)
    return cost


def pack_cost(n_elements: int, grad_bytes: int, wire_bytes: int, mem_bandwidth: float,
              param_arrays: int = 1, per_array_s: float = 0.0, batched: bool = True) -> float:
    """Seconds to pack gradients into the wire buffer and unpack the result.

    Pack reads ``grad_bytes`` and writes ``wire_bytes`` per element (the cast to
    float16 happens during the copy); unpack does the reverse and scales by
    1/size. Batched packing (one kernel / one vectorised loop) pays the
    ``per_array_s`` launch overhead once instead of once per parameter array.
    """
    if n_elements < 0 or mem_bandwidth <= 0:
        raise ValueError("need n_elements >= 0 and mem_bandwidth > 0")
    moved = 2 * n_elements * (grad_bytes + wire_bytes)
    launches = 2 * (1 if batched else param_arrays)
    return moved / mem_bandwidth + launches * per_array_s


DTYPE_BYTES = {"float16": 2, "float32": 4, "bfloat16": 2}


def dtype_bytes(name: str) -> int:
    try:
        return DTYPE_BYTES[name]
    except KeyError:
        raise ValueError(f"unknown wire dtype {name!r}; choose from {sorted(DTYPE_BYTES)}") from None
