#!/usr/bin/env python3
"""Times sparsejit.torch's SparseConv2d against torch.nn.Conv2d of the same shape.

Forward + backward (input gradient, weight gradient, bias gradient) of a 3x3 convolution with
padding 1 (default: WRN-16-8's 128 -> 128 layer on 32x32, 5 %, batch 128), alternated in one
process, medians of `--repeats` timings and their ratio. The input and the upstream gradient
are channel-major views (`[C, H, W, batch]` permuted to `[batch, C, H, W]`), as a sparse layer's
output is inside a network; `--batch-major` gives NCHW-contiguous tensors, which the sparse layer
reorders once per call.

Environment: as benches/python/sparse_linear.py (say which torch in any figure you publish).

    python benches/python/sparse_conv.py --threads 2 [--channels 128] [--size 32]
        [--density 0.05] [--batch 128] [--repeats 5] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
from typing import Callable, Dict

import torch
from torch import nn

from sparsejit.torch import SparseConv2d, set_num_threads
from timing import interleaved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--channels", type=int, default=128)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--density", type=float, default=0.05)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-major", action="store_true")
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    set_num_threads(args.threads)
    torch.manual_seed(17)
    c, s, b = args.channels, args.size, args.batch
    sparse = SparseConv2d(c, c, 3, padding=1, density=args.density)
    dense = nn.Conv2d(c, c, 3, padding=1)
    if args.batch_major:
        x = torch.randn(b, c, s, s)
        dy = torch.randn(b, c, s, s)
    else:
        x = torch.randn(c, s, s, b).permute(3, 0, 1, 2)
        dy = torch.randn(c, s, s, b).permute(3, 0, 1, 2)

    def step(layer: nn.Module) -> Callable[[], None]:
        xr = x.detach().requires_grad_(True)

        def run() -> None:
            layer.zero_grad(set_to_none=True)
            xr.grad = None
            layer(xr).backward(dy)

        return run

    medians = interleaved({"sparsejit": step(sparse), "torch": step(dense)}, args.repeats)
    result = {
        "torch": torch.__version__,
        "threads": args.threads,
        "shape": f"{c}->{c} 3x3 {s}x{s}",
        "density": args.density,
        "batch": b,
        "batch_major": args.batch_major,
        "sparse_ms": medians["sparsejit"] * 1e3,
        "dense_ms": medians["torch"] * 1e3,
        "speedup": medians["torch"] / medians["sparsejit"],
        "strategies": sparse.strategies(b, s, s),
    }
    print(
        f"torch {torch.__version__}, {args.threads} threads: conv {c}->{c} 3x3 on {s}x{s} at "
        f"{args.density:g}, batch {b}, forward+backward: sparsejit {result['sparse_ms']:.1f} ms, "
        f"nn.Conv2d {result['dense_ms']:.1f} ms, {result['speedup']:.2f}x "
        f"({result['strategies']})"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
