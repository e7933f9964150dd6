#!/usr/bin/env python3
"""Export the inference model of inference-example from a sparse-train checkpoint.

The committed model/lenet300_5pct.safetensors was made with

    cargo run --release -p runtime --bin sparse-train -- --epochs 3 \
        --checkpoint-dir /tmp/lenet-ckpt            # default density 0.05, seed 17
    python3 inference-example/scripts/export_model.py \
        /tmp/lenet-ckpt/epoch-003/model.safetensors \
        inference-example/model/lenet300_5pct.safetensors

It keeps only fc{1,2,3}.weight (dense f32 [out, in], zero where masked), fc{1,2,3}.mask (u8)
and fc{1,2,3}.bias, dropping the optimizer state, and checks that every weight is zero outside
its mask. Needs numpy and safetensors.
"""
import sys

import numpy as np
from safetensors.numpy import load_file, save_file


def main() -> None:
    if len(sys.argv) != 3:
        sys.exit("usage: export_model.py CHECKPOINT/model.safetensors OUT.safetensors")
    src, out = sys.argv[1], sys.argv[2]
    tensors = load_file(src)
    keep = {}
    for layer in ("fc1", "fc2", "fc3"):
        w = tensors[f"{layer}.weight"]
        m = tensors[f"{layer}.mask"]
        b = tensors[f"{layer}.bias"]
        assert w.dtype == np.float32 and m.dtype == np.uint8 and b.dtype == np.float32, layer
        assert w.shape == m.shape and b.shape == (w.shape[0],), layer
        outside = int(np.count_nonzero(w[m == 0]))
        assert outside == 0, f"{layer}: {outside} weights nonzero outside the mask"
        nnz = int(m.sum())
        print(f"{layer}: {list(w.shape)}, {nnz} nonzeros ({100 * nnz / m.size:.2f} %)")
        keep[f"{layer}.weight"] = w
        keep[f"{layer}.mask"] = m
        keep[f"{layer}.bias"] = b
    save_file(keep, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
