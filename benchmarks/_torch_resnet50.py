"""PyTorch CPU side of benchmarks/compute.py: ResNet-50 v1.5 forward+backward images/s.

Runs under a separate interpreter (``--torch-python``), never imports hpcsgd.
torchvision is not needed: the network is written out here (the same v1.5
architecture as hpcsgd's: stride on the 3x3 conv, projection shortcuts).
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from torch import nn


class Bottleneck(nn.Module):
    def __init__(self, cin, width, stride):
        super().__init__()
        cout = width * 4
        self.body = nn.Sequential(
            nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.short = None
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        s = x if self.short is None else self.short(x)
        return torch.relu(self.body(x) + s)


def resnet50(n_classes=1000):
    layers = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
              nn.MaxPool2d(3, 2, 1)]
    cin = 64
    for i, (n, width) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512))):
        for j in range(n):
            layers.append(Bottleneck(cin, width, 2 if (j == 0 and i > 0) else 1))
            cin = width * 4
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, n_classes)]
    return nn.Sequential(*layers)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--res", type=int, required=True)
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = resnet50().train()
    x = torch.rand(a.batch, 3, a.res, a.res)
    t = torch.randint(0, 1000, (a.batch,))
    loss_fn = nn.CrossEntropyLoss()

    def step():
        model.zero_grad(set_to_none=True)
        loss_fn(model(x), t).backward()

    for _ in range(a.warmup):
        step()
    times, cpu = [], []
    for _ in range(a.iters):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    print(json.dumps({"impl": "pytorch", "batch": a.batch, "res": a.res, "threads": a.threads,
                      "step_seconds": times, "step_cpu_seconds": cpu, "torch": torch.__version__,
                      "mkldnn": bool(torch.backends.mkldnn.is_available()),
                      "torch_threads": torch.get_num_threads(), "loadavg": os.getloadavg()}))


if __name__ == "__main__":
    main()
