"""sparse-train's checkpoints (model.safetensors) into sparsejit.torch's modules and back.

Needs the `sparse-train` binary: $SPARSEJIT_SPARSE_TRAIN, or target/{debug,release}/sparse-train
of this repository (scripts/python-tests.sh builds it).
"""

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import sparsejit
from sparsejit import _native
from sparsejit.torch import SparseLinear, load_safetensors, save_safetensors

REPO = Path(__file__).resolve().parents[2]


def sparse_train() -> Path:
    env = os.environ.get("SPARSEJIT_SPARSE_TRAIN")
    candidates = [Path(env)] if env else []
    candidates += [REPO / "target" / p / "sparse-train" for p in ("debug", "release")]
    for c in candidates:
        if c.is_file():
            return c
    raise AssertionError(
        "no sparse-train binary: build it (cargo build -p runtime --bin sparse-train) or set "
        "SPARSEJIT_SPARSE_TRAIN"
    )


class LeNet300(nn.Module):
    """sparse-train's lenet300-100, its layers under the checkpoint's names."""

    def __init__(self):
        super().__init__()
        self.fc1 = SparseLinear(784, 300, density=0.5, name="fc1")
        self.fc2 = SparseLinear(300, 100, density=0.5, name="fc2")
        self.fc3 = SparseLinear(100, 10, density=0.5, name="fc3")

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def test_a_sparse_train_checkpoint_loads_and_saves_back(tmp_path):
    ck = tmp_path / "ck"
    subprocess.run(
        [
            str(sparse_train()),
            "--model", "lenet300-100",
            "--epochs", "1",
            "--train-limit", "600",
            "--threads", "1",
            "--checkpoint-dir", str(ck),
        ],
        check=True,
        cwd=REPO,
        capture_output=True,
    )
    path = ck / (ck / "latest").read_text().strip() / "model.safetensors"
    saved = _native.read_tensors(str(path))
    model = LeNet300()
    assert load_safetensors(model, str(path)) == ["fc1", "fc2", "fc3"]
    for name in ("fc1", "fc2", "fc3"):
        layer = getattr(model, name)
        np.testing.assert_array_equal(layer.mask.numpy(), saved[f"{name}.mask"].astype(bool))
        np.testing.assert_array_equal(layer.weight.numpy(), saved[f"{name}.weight"])
        np.testing.assert_array_equal(layer.bias.detach().numpy(), saved[f"{name}.bias"])
        assert layer.nnz == int(saved[f"{name}.mask"].sum()) < layer.mask.numel() // 10
    # The modules compute what the checkpoint's dense weights compute.
    x = torch.randn(5, 784)
    h = x
    for i, name in enumerate(("fc1", "fc2", "fc3")):
        h = h @ torch.from_numpy(saved[f"{name}.weight"]).t() + torch.from_numpy(saved[f"{name}.bias"])
        h = torch.relu(h) if i < 2 else h
    torch.testing.assert_close(model(x), h, rtol=1e-4, atol=1e-5)

    back = tmp_path / "back.safetensors"
    save_safetensors(model, str(back))
    again = _native.read_tensors(str(back))
    for key in ("weight", "mask", "bias"):
        for name in ("fc1", "fc2", "fc3"):
            np.testing.assert_array_equal(again[f"{name}.{key}"], saved[f"{name}.{key}"])
    # sparsejit's own readers take the file: kernel-dump's mask loader.
    stats = sparsejit.kernel_dump(
        "--mask", str(back), "--tensor", "fc2.mask", "--op", "spmm", "--emit", "stats",
        "--no-measure",
    )
    assert f"rows 100  cols 300  nnz {int(saved['fc2.mask'].sum())}  " in stats


def test_bad_checkpoint_files_are_clear_errors(tmp_path):
    model = LeNet300()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a safetensors file"):
        load_safetensors(model, str(bad))
    with pytest.raises(OSError, match="missing.safetensors"):
        load_safetensors(model, str(tmp_path / "missing.safetensors"))
    partial = tmp_path / "partial.safetensors"
    _native.write_tensors(str(partial), {"fc1.weight": np.zeros((300, 784), np.float32)})
    with pytest.raises(KeyError, match="fc2.weight"):
        load_safetensors(model, str(partial))
    wrong = tmp_path / "wrong.safetensors"
    _native.write_tensors(str(wrong), {"fc1.weight": np.zeros((3, 4), np.float32)})
    with pytest.raises(ValueError, match=r"fc1.weight has shape \(3, 4\)"):
        load_safetensors(model, str(wrong))
