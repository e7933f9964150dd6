#!/usr/bin/env python3
"""Times PyTorch's dense training step of the conv nets step-bench measures.

The models are the sparse-momentum reference's definitions, which sparse-train's models
follow: VGG16-D with batch normalisation and a 512-512 classifier (`vgg-d`), and the wide
residual networks with BN-ReLU-conv pre-activation blocks and dropout 0.3 (`wrn-16-2`,
`wrn-16-8`, `wrn-16-10`, `wrn-28-2`). One step is forward, cross-entropy, backward and SGD
(lr 0.1, momentum 0.9, Nesterov, weight decay 5e-4) on one synthetic CIFAR-shaped batch
(3x32x32, uniform random values and labels, seeded). The script prints the mean and median of
`--steps` steps after `--warmup` steps, and the process's peak RSS; with --json, one row of
step-bench's JSON (framework "pytorch", density 1) instead.

Environment (either works; say which in any figure you publish):
- a venv with PyTorch's own wheel: `python3 -m venv /tmp/torch-venv &&
  /tmp/torch-venv/bin/pip install torch`, then run with `/tmp/torch-venv/bin/python` (the
  PyPI wheel pulls about 4 GB of CUDA libraries; CPU only is used);
- Debian's CPU-only build: `apt-get install --no-install-recommends python3-torch`, then
  `/usr/bin/python3` (PyTorch 1.13, with a generic BLAS: much slower convolutions).

    python benches/pytorch/conv_step.py --model wrn-16-8 --batch 128 --threads 2 [--steps 5]
    target/release/step-bench --model wrn-16-8 --pytorch /tmp/torch-venv/bin/python ...
"""

import argparse
import json
import resource
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class BasicBlock(nn.Module):
    def __init__(self, in_planes, out_planes, stride, drop_rate):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
        self.drop_rate = drop_rate
        self.equal = in_planes == out_planes and stride == 1
        self.convShortcut = None if self.equal else nn.Conv2d(in_planes, out_planes, 1, stride, 0, bias=False)

    def forward(self, x):
        o = F.relu(self.bn1(x))
        out = F.relu(self.bn2(self.conv1(o)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        out = self.conv2(out)
        return out + (x if self.equal else self.convShortcut(o))


class NetworkBlock(nn.Module):
    def __init__(self, n, in_planes, out_planes, stride, drop_rate):
        super().__init__()
        self.layer = nn.Sequential(
            *[BasicBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1, drop_rate) for i in range(n)]
        )

    def forward(self, x):
        return self.layer(x)


class WideResNet(nn.Module):
    def __init__(self, depth, widen, classes=10, drop_rate=0.3):
        super().__init__()
        w = [16, 16 * widen, 32 * widen, 64 * widen]
        n = (depth - 4) // 6
        self.conv1 = nn.Conv2d(3, w[0], 3, 1, 1, bias=False)
        self.block1 = NetworkBlock(n, w[0], w[1], 1, drop_rate)
        self.block2 = NetworkBlock(n, w[1], w[2], 2, drop_rate)
        self.block3 = NetworkBlock(n, w[2], w[3], 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(w[3])
        self.fc = nn.Linear(w[3], classes)

    def forward(self, x):
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = F.relu(self.bn1(out))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(out)


class VGG16D(nn.Module):
    CONFIG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]

    def __init__(self, classes=10):
        super().__init__()
        layers, c = [], 3
        for v in self.CONFIG:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                c = v
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Linear(512, 512), nn.ReLU(True), nn.BatchNorm1d(512),
            nn.Linear(512, 512), nn.ReLU(True), nn.BatchNorm1d(512),
            nn.Linear(512, classes),
        )

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


def build(name):
    if name == "vgg-d":
        return VGG16D()
    parts = name.split("-")
    if len(parts) == 3 and parts[0] == "wrn":
        return WideResNet(int(parts[1]), int(parts[2]))
    raise SystemExit(f"unknown model {name} (vgg-d or wrn-D-K)")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--json", action="store_true", help="print one step-bench JSON row")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(17)
    model = build(a.model)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    x = torch.rand(a.batch, 3, 32, 32) * 2 - 1
    y = torch.randint(0, 10, (a.batch,))
    times = []
    for i in range(a.warmup + a.steps):
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        if i >= a.warmup:
            times.append((time.perf_counter() - t) * 1e3)
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    mean, med = statistics.mean(times), statistics.median(times)
    if a.json:
        print(json.dumps({
            "model": a.model, "framework": "pytorch", "density": 1.0, "batch": a.batch,
            "threads": a.threads, "steps": a.steps, "step_ms_mean": mean, "step_ms_median": med,
            "peak_rss_mb": rss_mb, "flops_fraction": 1.0, "torch": torch.__version__,
        }))
    else:
        print(f"{a.model} batch {a.batch} threads {a.threads} torch {torch.__version__}: "
              f"mean {mean:.1f} ms, median {med:.1f} ms over {a.steps} steps, peak RSS {rss_mb:.0f} MB")


if __name__ == "__main__":
    sys.exit(main())
