"""sparsejit: sparse neural-network kernels compiled for each weight pattern.

The numpy-level API:

- :class:`Pattern`: which entries of a ``[rows, cols]`` weight matrix are nonzero, from a 0/1
  (or bool) array, or :meth:`Pattern.random`;
- :func:`compile` a kernel for one op on a pattern at one batch size; a :class:`Kernel` is
  called on feature-major float32 numpy arrays (``[features, batch]``, C-contiguous);
- :func:`kernel_dump` returns what the ``kernel-dump`` command prints;
- :func:`set_num_threads` / :func:`get_num_threads`: the threads kernels use.

PyTorch modules (``SparseLinear``, ``SparseConv2d``) and sparse momentum (``Masking``) are in
:mod:`sparsejit.torch`, which needs torch (>= 1.13, CPU) installed.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any, Optional

import numpy as np

from ._native import Kernel, Pattern, compile, get_num_threads, set_num_threads
from ._native import kernel_dump_args as _kernel_dump_args

__all__ = [
    "Kernel",
    "Pattern",
    "compile",
    "get_num_threads",
    "kernel_dump",
    "set_num_threads",
]


def kernel_dump(*args: str, mask: Optional[Any] = None) -> str:
    """What ``kernel-dump ARGS...`` prints, as one string.

    ``args`` are the command line's arguments, e.g.
    ``kernel_dump("--random", "300x784", "--density", "0.05", "--emit", "ir")``. A ``mask``
    (a 0/1 array, ``[out, in]`` or ``[out, in, k, k]``, or a :class:`Pattern`) stands for
    ``--mask FILE``. Bad arguments raise ``ValueError`` with the command's message.
    """
    if mask is None:
        return _kernel_dump_args([str(a) for a in args])
    if isinstance(mask, Pattern):
        mask = mask.to_mask()
    array = np.asarray(mask)
    if array.dtype != np.bool_:
        array = array.astype(np.float32)
    with tempfile.TemporaryDirectory(prefix="sparsejit-") as tmp:
        path = os.path.join(tmp, "mask.npy")
        np.save(path, array)
        return _kernel_dump_args(["--mask", path, *[str(a) for a in args]])
