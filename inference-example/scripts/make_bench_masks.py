#!/usr/bin/env python3
"""Make the two random 5 % masks that src/bin/macro-bench.rs bakes in.

    python3 inference-example/scripts/make_bench_masks.py inference-example/model/bench

Each entry is present independently with probability 0.05 (seeded), stored as u8 .npy.
"""
import os
import sys

import numpy as np


def main() -> None:
    out = sys.argv[1] if len(sys.argv) > 1 else "model/bench"
    os.makedirs(out, exist_ok=True)
    rng = np.random.default_rng(20261127)
    for name, (rows, cols) in (("fc1_300x784", (300, 784)), ("fc2_100x300", (100, 300))):
        mask = (rng.random((rows, cols)) < 0.05).astype(np.uint8)
        path = os.path.join(out, f"{name}_5pct.npy")
        np.save(path, mask)
        print(f"{path}: {int(mask.sum())} nonzeros ({100 * mask.mean():.2f} %)")


if __name__ == "__main__":
    main()
