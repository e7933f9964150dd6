#!/usr/bin/env python3
"""The scaling model of data-parallel training in docs/DISTRIBUTED.md: per-step compute against
all-reduce time for N nodes at several link speeds, from measured per-step compute and bytes.

Weak scaling: every node keeps its batch (the model's usual batch), so a step's compute stays
what one node measured, and a step's all-reduce grows with N. Bytes per step are the epoch's
mean: (E - K) ordinary steps send the nonzero weights' and the biases' gradients, the K window
steps before a mask update the dense gradients and the biases (sparsejit's scheme), against
every parameter at every step (dense training's all-reduce).

The all-reduce time is modelled two ways:
- `tree`: what sparsejit does now, a reduce to rank 0 and a broadcast, each a binomial tree
  of ceil(log2 N) rounds of (latency + bytes / bandwidth);
- `ring`: the bandwidth-optimal ring all-reduce, 2 (N - 1) / N * bytes / bandwidth +
  2 (N - 1) * latency.

    python3 scripts/scaling_model.py --latency-us 5 --json measured.json
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Dict, List

LINKS_GBPS = [10, 25, 100]
NODES = [2, 4, 8, 16, 32, 64, 128, 256]


def tree_seconds(n: int, size: float, gbps: float, latency: float) -> float:
    rounds = math.ceil(math.log2(n))
    return 2 * rounds * (latency + size / (gbps * 1e9 / 8))


def ring_seconds(n: int, size: float, gbps: float, latency: float) -> float:
    return 2 * (n - 1) / n * size / (gbps * 1e9 / 8) + 2 * (n - 1) * latency


def step_bytes(case: Dict[str, float]) -> Dict[str, float]:
    e, k = case["steps_per_epoch"], case["window"]
    four = 4.0
    sparse_step = (case["nonzeros"] + case["dense_params"]) * four
    window_step = (case["weights"] + case["dense_params"]) * four
    dense_step = (case["weights"] + case["dense_params"]) * four
    mean = ((e - k) * sparse_step + k * window_step) / e
    return {"sparse": sparse_step, "mean": mean, "dense": dense_step}


def table(cases: List[Dict[str, float]], latency: float) -> str:
    lines = [
        "| model | training | compute/step | bytes/step (mean) | link | "
        + " | ".join(f"N={n}" for n in NODES)
        + " |",
        "| --- | --- | --- | --- | --- | " + " | ".join("---" for _ in NODES) + " |",
    ]
    for c in cases:
        b = step_bytes(c)
        for kind, size in (("sparse", b["mean"]), ("dense", b["dense"])):
            compute = c[f"{kind}_compute_s"]
            for gbps in LINKS_GBPS:
                cells = []
                for n in NODES:
                    t = tree_seconds(n, size, gbps, latency)
                    r = ring_seconds(n, size, gbps, latency)
                    cells.append(
                        f"{t / compute:.2f} / {r / compute:.2f}" if compute else f"{t*1e3:.1f} / {r*1e3:.1f} ms"
                    )
                label = f"{c['density']:.0%}" if kind == "sparse" else "dense"
                lines.append(
                    f"| {c['model']} | {label} | "
                    + (f"{compute * 1e3:.2f} ms" if compute else "not measured")
                    + f" | {size / 1e6:.3f} MB | {gbps} Gb/s | "
                    + " | ".join(cells)
                    + " |"
                )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", required=True, help="the measured inputs (see docs/DISTRIBUTED.md)")
    p.add_argument("--latency-us", type=float, default=5.0)
    args = p.parse_args()
    with open(args.json) as f:
        cases = json.load(f)
    print(table(cases, args.latency_us * 1e-6))


if __name__ == "__main__":
    main()
