#!/usr/bin/env python3
"""Independent implementation of sparse-ir's pattern content hash (see sparse-ir/src/pattern.rs).

XXH3-64, seed 0, of b"sparsejit-pattern-v1" + rows, cols, nnz as u64 LE + row_ptr, col_idx as u32 LE.
Used to produce the fixed values pinned in the tests.  Needs `pip install xxhash`.

    python3 scripts/pattern_hash.py 3 4 0,2,2,5 1,3,0,1,2
"""
import struct
import sys

import xxhash


def pattern_hash(rows, cols, row_ptr, col_idx):
    data = b"sparsejit-pattern-v1" + struct.pack("<QQQ", rows, cols, len(col_idx))
    data += b"".join(struct.pack("<I", v) for v in list(row_ptr) + list(col_idx))
    return xxhash.xxh3_64_intdigest(data)


def parse(arg):
    return [int(v) for v in arg.split(",") if v]


if __name__ == "__main__":
    rows, cols = int(sys.argv[1]), int(sys.argv[2])
    row_ptr = parse(sys.argv[3])
    col_idx = parse(sys.argv[4]) if len(sys.argv) > 4 else []
    print(f"0x{pattern_hash(rows, cols, row_ptr, col_idx):016x}")
