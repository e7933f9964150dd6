#!/usr/bin/env python3
"""Times sparsejit.torch's SparseLinear against torch.nn.Linear of the same shape, and the
Python/boundary overhead of one call.

1. Forward + backward of a [batch, in] -> [batch, out] layer (default 4096 x 4096 at 5 %,
   batch 128): SparseLinear (sparsejit's kernels, planner's choice) against nn.Linear (dense,
   torch's GEMM) on the same input and upstream gradient, alternated in one process; medians of
   `--repeats` timings, and their ratio. The input and the upstream gradient are feature-major
   (a transposed view), as a sparse layer's output is inside a network; `--batch-major` gives
   the first layer's case, where the input is transposed once.
2. The overhead of one call: a 1 x 1 SparseLinear at batch 1 (one multiply-add), forward and
   forward + backward, against the kernel called directly on numpy arrays
   (sparsejit.compile(...)), so the difference is the module, the autograd Function and the
   crossing into Rust; a 1 x 1 nn.Linear's forward + backward beside it.

Environment: any Python >= 3.9 with torch (CPU) and sparsejit installed (`pip install ./python`).
Say which torch in any figure you publish:
- Debian's CPU-only build: `apt-get install --no-install-recommends python3-torch python3-venv`,
  `/usr/bin/python3 -m venv --system-site-packages /tmp/sj && /tmp/sj/bin/pip install ./python`,
  then run with `/tmp/sj/bin/python` (PyTorch 1.13);
- PyPI's wheel (what users run): `python3 -m venv /tmp/torch-venv && /tmp/torch-venv/bin/pip
  install torch numpy ./python` (about 4 GB of CUDA libraries come with it).

    python benches/python/sparse_linear.py --threads 2 [--size 4096] [--density 0.05]
        [--batch 128] [--repeats 30] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
from typing import Callable, Dict

import numpy as np
import torch
from torch import nn

import sparsejit
from sparsejit.torch import SparseLinear, set_num_threads
from timing import interleaved


def layer_comparison(args: argparse.Namespace) -> Dict[str, float]:
    torch.manual_seed(17)
    n, b = args.size, args.batch
    sparse = SparseLinear(n, n, density=args.density)
    dense = nn.Linear(n, n)
    if args.batch_major:
        x = torch.randn(b, n)
        dy = torch.randn(b, n)
    else:
        x = torch.randn(n, b).t()  # feature-major, as a sparse layer's output
        dy = torch.randn(n, b).t()

    def step(layer: nn.Module) -> Callable[[], None]:
        xr = x.detach().requires_grad_(True)

        def run() -> None:
            layer.zero_grad(set_to_none=True)
            xr.grad = None
            layer(xr).backward(dy)

        return run

    medians = interleaved({"sparsejit": step(sparse), "torch": step(dense)}, args.repeats)
    return {
        "sparse_ms": medians["sparsejit"] * 1e3,
        "dense_ms": medians["torch"] * 1e3,
        "speedup": medians["torch"] / medians["sparsejit"],
        "strategies": sparse.strategies(b),
    }


def overhead(args: argparse.Namespace) -> Dict[str, float]:
    layer = SparseLinear(1, 1, density=1.0)
    dense = nn.Linear(1, 1)
    x = torch.randn(1, 1, requires_grad=True)
    pattern = sparsejit.Pattern(np.ones((1, 1)))
    kernel = sparsejit.compile(pattern, "spmm", 1, bias=True)
    values, xn, bias = np.ones(1, np.float32), np.ones((1, 1), np.float32), np.ones(1, np.float32)
    calls = 2000

    def many(fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            for _ in range(calls):
                fn()

        return run

    def forward() -> None:
        with torch.no_grad():
            layer(x)

    def forward_backward() -> None:
        layer(x).sum().backward()

    def kernel_only() -> None:
        kernel(values, xn, bias=bias)

    def torch_forward_backward() -> None:
        dense(x).sum().backward()

    medians = interleaved(
        {
            "kernel": many(kernel_only),
            "forward": many(forward),
            "fwd_bwd": many(forward_backward),
            "torch_fwd_bwd": many(torch_forward_backward),
        },
        max(5, args.repeats // 3),
    )
    per = {k: v / calls * 1e6 for k, v in medians.items()}
    return {
        "kernel_call_us": per["kernel"],
        "module_forward_us": per["forward"],
        "module_forward_backward_us": per["fwd_bwd"],
        "torch_linear_forward_backward_us": per["torch_fwd_bwd"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--density", type=float, default=0.05)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--batch-major", action="store_true")
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    set_num_threads(args.threads)
    result = {
        "torch": torch.__version__,
        "threads": args.threads,
        "size": args.size,
        "density": args.density,
        "batch": args.batch,
        "layer": layer_comparison(args),
        "overhead": overhead(args),
    }
    layer, over = result["layer"], result["overhead"]
    print(
        f"torch {torch.__version__}, {args.threads} threads: {args.size}x{args.size} at "
        f"{args.density:g}, batch {args.batch}, forward+backward: sparsejit "
        f"{layer['sparse_ms']:.2f} ms, nn.Linear {layer['dense_ms']:.2f} ms, "
        f"{layer['speedup']:.2f}x ({layer['strategies']})"
    )
    print(
        f"per call: kernel on numpy {over['kernel_call_us']:.1f} us, module forward "
        f"{over['module_forward_us']:.1f} us, forward+backward "
        f"{over['module_forward_backward_us']:.1f} us (nn.Linear 1x1: "
        f"{over['torch_linear_forward_backward_us']:.1f} us)"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
