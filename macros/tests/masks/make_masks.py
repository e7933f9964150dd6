#!/usr/bin/env python3
"""Makes the mask fixtures of the macros tests (seeded; run from this folder).

    pip install numpy safetensors && python3 make_masks.py
"""
import numpy as np
from safetensors.numpy import save_file

rng = np.random.default_rng(17)

def mask(rows, cols, density):
    return (rng.random((rows, cols)) < density).astype(np.uint8)

# A 100x300 layer at 5 % (like LeNet-300-100's fc2), as u8 .npy.
np.save("fc2_100x300_5pct.npy", mask(100, 300, 0.05))
# A 7x96 mask with an empty row, an empty column and a fully dense row, as bool .npy.
m = mask(7, 96, 0.2).astype(bool)
m[2, :] = False
m[:, 5] = False
m[4, :] = True
np.save("edge_7x96.npy", m)
# A conv mask [out, in, kh, kw] = [4, 2, 3, 3] as f32, in a safetensors file with values.
conv = mask(4 * 2 * 3 * 3, 1, 0.3).reshape(4, 2, 3, 3).astype(np.float32)
weights = rng.standard_normal((4, 18)).astype(np.float32)
save_file({"conv.mask": conv, "conv.weight": weights, "other": np.zeros(3, dtype=np.float32)},
          "conv_4x2x3x3.safetensors")
# Too large to unroll: 300x300 all ones (90,000 nonzeros).
np.save("too_large_300x300.npy", np.ones((300, 300), dtype=np.uint8))
# Not a mask: a value 2.
bad = mask(3, 3, 0.5)
bad[1, 2] = 2
np.save("value_two_3x3.npy", bad)
# A file that is not .npy at all.
with open("garbage.npy", "wb") as f:
    f.write(b"this is not a numpy file")
# Wider than rust_emit::GATHER_MAX (4096) columns, so batch 1 with ld > 1 takes the batch
# loop: 3x5000 with an empty row and a row of one nonzero, as bool .npy.
wide = mask(3, 5000, 0.01).astype(bool)
wide[1, :] = False
wide[2, :] = False
wide[2, 4999] = True
np.save("wide_3x5000.npy", wide)
