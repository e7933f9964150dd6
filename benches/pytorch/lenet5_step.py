#!/usr/bin/env python3
"""Times PyTorch's dense LeNet-5 training step on the inputs sparse-train uses.

The model is the one `sparse-train --model lenet5` trains (Caffe's LeNet-5: conv 1->20 5x5,
ReLU, max-pool 2, conv 20->50 5x5, ReLU, max-pool 2, linear 800->500, ReLU, linear 500->10),
with SGD (lr 0.1, momentum 0.9) and cross-entropy, batch 100, on the first images of the
vendored MNIST training set (data/mnist, IDX files, raw or .gz), scaled to [0, 1] and
normalised as the runtime does. One step is forward, loss, backward and the SGD update;
the script prints the median and the quartiles of `--steps` steps after `--warmup` steps.

Environment (either works; say which in any figure you publish):
- Debian's CPU-only build: `apt-get install --no-install-recommends python3-torch`, then run
  with `/usr/bin/python3` (PyTorch 1.13);
- a venv: `python3 -m venv /tmp/torch-venv && /tmp/torch-venv/bin/pip install torch`, then
  run with `/tmp/torch-venv/bin/python` (the PyPI wheel pulls about 4 GB of CUDA libraries).

    python3 benches/pytorch/lenet5_step.py --threads 2 [--steps 200] [--data-dir data/mnist]
"""

import argparse
import gzip
import os
import statistics
import struct
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


def read_idx(path):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype, dims = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08:
        raise SystemExit(f"{path}: not an IDX file of unsigned bytes")
    shape = struct.unpack(">" + "I" * dims, data[4 : 4 + 4 * dims])
    return torch.frombuffer(bytearray(data[4 + 4 * dims :]), dtype=torch.uint8).reshape(shape)


def find(data_dir, stem):
    for name in (stem, stem + ".gz"):
        path = os.path.join(data_dir, name)
        if os.path.exists(path):
            return path
    raise SystemExit(f"no {stem}[.gz] in {data_dir}")


class LeNet5(nn.Module):
    """Caffe's LeNet-5, as sparse-train's `lenet5`."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 20, 5)
        self.conv2 = nn.Conv2d(20, 50, 5)
        self.fc3 = nn.Linear(800, 500)
        self.fc4 = nn.Linear(500, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.fc3(x.flatten(1)))
        return self.fc4(x)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--data-dir", default=os.path.join(os.path.dirname(__file__), "..", "..", "data", "mnist"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(17)
    images = read_idx(find(args.data_dir, "train-images-idx3-ubyte"))
    labels = read_idx(find(args.data_dir, "train-labels-idx1-ubyte")).long()
    n = (args.steps + args.warmup) * args.batch
    n = min(n, images.shape[0])
    x_all = (images[:n].float() / 255.0 - 0.1307) / 0.3081
    x_all = x_all.unsqueeze(1)
    y_all = labels[:n]
    model = LeNet5()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    batches = n // args.batch
    times = []
    for step in range(args.warmup + args.steps):
        i = step % batches
        x = x_all[i * args.batch : (i + 1) * args.batch]
        y = y_all[i * args.batch : (i + 1) * args.batch]
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        elapsed = time.perf_counter() - t
        if step >= args.warmup:
            times.append(elapsed * 1e3)
    q = statistics.quantiles(times, n=4)
    print(
        f"pytorch {torch.__version__} lenet5 batch {args.batch}, {args.threads} thread(s): "
        f"step median {statistics.median(times):.3f} ms (quartiles {q[0]:.3f}-{q[2]:.3f}) over {len(times)} steps"
    )


if __name__ == "__main__":
    sys.exit(main())
