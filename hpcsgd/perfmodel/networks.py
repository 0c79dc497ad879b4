"""Interconnect levels of the published clusters, every number with its source.

Source tags (Y1, G1, A3, ...) are listed in docs/perf.md ("Source tags");
``ASSUMPTION`` marks an engineering estimate no consulted source gives.
"""

from __future__ import annotations

from .costs import Level

NCCL_STEP_S = 5e-6  # ASSUMPTION: NCCL 2 per-step software latency

NVLINK_P100 = Level(
    "NVLink P100 hybrid cube-mesh (NCCL)", alpha=NCCL_STEP_S, beta=1 / 20e9, gamma=1e-11,
    sources={"alpha": "ASSUMPTION (NCCL per-step latency)",
             "beta": "ASSUMPTION: ~20 GB/s NCCL ring bandwidth on an 8-P100 NVLink server (G1 names NVLink)",
             "gamma": "ASSUMPTION: GPU reduction at ~100 GB/s"})

PCIE3_P100 = Level(
    "PCIe 3.0 x16 (NCCL)", alpha=NCCL_STEP_S, beta=1 / 10e9, gamma=1e-11,
    sources={"alpha": "ASSUMPTION (NCCL per-step latency)",
             "beta": "ASSUMPTION: ~10 GB/s achievable of PCIe 3.0 x16's 15.75 GB/s (P100 PCIe per A3)",
             "gamma": "ASSUMPTION: GPU reduction at ~100 GB/s"})

FDR_X2_THIN_TREE = Level(
    "2x InfiniBand FDR, thin tree", alpha=0.7e-6 + NCCL_STEP_S, beta=0.2e-9, gamma=1e-11, rails=2,
    group_size=16, oversubscription=4.0,
    sources={"alpha": "Y1 Table 11: FDR alpha = 0.7 us, plus NCCL per-step latency (ASSUMPTION)",
             "beta": "Y1 Table 11: FDR beta = 0.2 ns/B per link",
             "rails": "A3: two FDR links (56 Gbps x2) per node",
             "group_size": "A3: groups of 16 nodes under a redundant switch pair, 8 groups",
             "oversubscription": "ASSUMPTION: A3 says only that inter-group links are the bottleneck; 4:1",
             "gamma": "ASSUMPTION: GPU reduction at ~100 GB/s"})

ETH_50G = Level(
    "50 Gbit Ethernet (Gloo over TCP)", alpha=7.2e-6, beta=8 / (0.8 * 50e9), gamma=1e-11,
    sources={"alpha": "Y1 Table 11: 10GbE alpha = 7.2 us (ASSUMPTION that 50GbE is no faster)",
             "beta": "G1: ConnectX-4 50 Gbit Ethernet; ASSUMPTION: 80% of line rate achieved -> 0.2 ns/B",
             "gamma": "ASSUMPTION: GPU reduction at ~100 GB/s"})

OMNIPATH_100G = Level(
    "Intel Omni-Path 100 Gbit/s (MLSL/MPI)", alpha=3e-6, beta=8 / (0.8 * 100e9), gamma=5e-11,
    sources={"alpha": "ASSUMPTION: ~1 us fabric latency + ~2 us MPI/MLSL per step",
             "beta": "ASSUMPTION: Stampede2 Omni-Path 100 Gbit/s (TACC user guide), 80% "
                     "achieved -> 0.1 ns/B",
             "gamma": "ASSUMPTION: host reduction at ~20 GB/s on a KNL"})



UPI_SHM = Level(
    "two sockets, MPI shared memory over UPI", alpha=1e-6, beta=1 / 10e9, gamma=5e-11,
    sources={"alpha": "ASSUMPTION: ~1 us MPI shared-memory message latency",
             "beta": "ASSUMPTION: ~10 GB/s copy bandwidth between sockets (Intel ARK: 3 UPI links at "
                     "10.4 GT/s, ~20.8 GB/s each; copies are memory bound)",
             "gamma": "ASSUMPTION: host reduction at ~20 GB/s"})

NVLINK2_V100 = Level(
    "NVLink2, 4 V100 per node (NCCL)", alpha=NCCL_STEP_S, beta=1 / (0.8 * 50e9), gamma=5e-12,
    sources={"alpha": "ASSUMPTION (NCCL per-step latency, as the other clusters)",
             "beta": "V100 data sheet: NVLink2 25 GB/s per link per direction; 2 links between each GPU "
                     "pair of a 4-GPU SXM2 node (ASSUMPTION) -> 50 GB/s; 80% achieved (ASSUMPTION)",
             "gamma": "ASSUMPTION: GPU reduction at ~200 GB/s"})

EDR_X2_ABCI = Level(
    "2x InfiniBand EDR, ABCI fat tree (1:3 above the rack)", alpha=0.7e-6 + NCCL_STEP_S,
    beta=8 / (0.8 * 100e9), gamma=5e-12, rails=2, group_size=34, oversubscription=3.0,
    sources={"alpha": "Y1 Table 11 FDR alpha = 0.7 us (ASSUMPTION that EDR is no slower) + NCCL per-step "
                      "latency (ASSUMPTION)",
             "beta": "InfiniBand EDR 4x = 100 Gbit/s per port; 80% achieved (ASSUMPTION) -> 0.1 ns/B",
             "rails": "ABCI system description (news.mynavi.jp/article/abci-2): 2 EDR ports per node",
             "group_size": "same: 34 nodes (68 ports) per rack, full bisection inside the rack",
             "oversubscription": "same: rack-to-spine links at 1/3 of full bisection",
             "gamma": "ASSUMPTION: GPU reduction at ~200 GB/s"})
