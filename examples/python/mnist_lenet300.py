"""Sparse momentum training of LeNet-300-100 on MNIST with sparsejit's PyTorch modules.

This is the MNIST training loop of Dettmers' reference implementation (``sparse_learning``,
``mnist_cifar/main.py`` with ``--model lenet300-100 --sparse``) and its defaults: batch 100,
100 epochs, SGD (lr 0.1, Nesterov momentum 0.9, weight decay 5e-4), lr × 0.1 every 25,000
steps, density 0.05, prune rate 0.5 with cosine decay, magnitude pruning, momentum growth and
redistribution, 10 % of the training set held out for validation.

Run it from the repository root, after ``pip install ./python`` with torch installed::

    python examples/python/mnist_lenet300.py --epochs 100

The sparse-training lines are the reference's; only the imports differ. The reference has::

    from sparselearning.core import Masking, CosineDecay

and this script::

    from sparsejit.torch import CosineDecay, Masking

(``Masking`` also gets sparsejit's keyword-only ``steps_per_epoch`` and ``seed``, so that the
first epoch computes dense gradients only where the mask update needs them and the initial
masks follow ``--seed``). The data come from the vendored gzip IDX files in ``data/mnist/``
(no torchvision, no downloads) and are kept in memory as tensors.

``--mode masked-dense`` trains the reference's way instead (dense ``nn.Linear`` layers whose
weights are multiplied by a fixed random mask after every step) and ``--mode dense`` trains
densely; both are there to compare the step time, printed per epoch as the median over the
epoch's steps.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import statistics
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
import torch.optim as optim
from torch import nn

from sparsejit.torch import CosineDecay, Masking, SparseLinear
from sparsejit.torch import set_num_threads as set_sparsejit_threads

DEFAULT_DATA_DIR = Path(__file__).resolve().parents[2] / "data" / "mnist"
IMAGES_MAGIC, LABELS_MAGIC = 2051, 2049
IMAGE_SIDE = 28
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
VALIDATION_SPLIT = 0.1
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4
DECAY_FREQUENCY = 25_000
EVAL_BATCH = 1000

Split = Tuple[torch.Tensor, torch.Tensor]


class LeNet_300_100(nn.Module):
    """The reference's LeNet-300-100."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(28 * 28, 300)
        self.fc2 = nn.Linear(300, 100)
        self.fc3 = nn.Linear(100, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.view(-1, 28 * 28)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return F.log_softmax(self.fc3(x), dim=1)


# --- data ------------------------------------------------------------------------------------


def read_idx(path: Path, magic: int, dims: int) -> np.ndarray:
    """The uint8 array of a gzip IDX file whose header has ``magic`` and ``dims`` sizes."""
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise SystemExit(f"{path}: cannot read the gzip IDX file ({e})") from e
    header = 4 * (1 + dims)
    if len(raw) < header:
        raise SystemExit(f"{path}: truncated IDX header ({len(raw)} bytes)")
    fields = np.frombuffer(raw, dtype=">u4", count=1 + dims)
    if int(fields[0]) != magic:
        raise SystemExit(f"{path}: IDX magic number {int(fields[0])}, expected {magic}")
    shape = tuple(int(n) for n in fields[1:])
    if len(raw) - header != math.prod(shape):
        raise SystemExit(
            f"{path}: {len(raw) - header} data bytes, the header's shape {shape} needs "
            f"{math.prod(shape)}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def load_mnist(data_dir: Path, prefix: str, count: int) -> Split:
    """Normalised images ``[count, 1, 28, 28]`` (float32) and labels (int64) of one file pair."""
    images_path = data_dir / f"{prefix}-images-idx3-ubyte.gz"
    labels_path = data_dir / f"{prefix}-labels-idx1-ubyte.gz"
    images = read_idx(images_path, IMAGES_MAGIC, 3)
    labels = read_idx(labels_path, LABELS_MAGIC, 1)
    if images.shape != (count, IMAGE_SIDE, IMAGE_SIDE):
        raise SystemExit(
            f"{images_path}: images of shape {images.shape}, expected "
            f"{(count, IMAGE_SIDE, IMAGE_SIDE)}"
        )
    if labels.shape != (count,):
        raise SystemExit(f"{labels_path}: {labels.shape[0]} labels, expected {count}")
    if int(labels.max()) > 9:
        raise SystemExit(f"{labels_path}: label {int(labels.max())} is not a digit")
    x = (images.astype(np.float32) / 255.0 - MNIST_MEAN) / MNIST_STD
    return torch.from_numpy(x).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


def mnist_splits(data_dir: Path, train_limit: Optional[int]) -> Tuple[Split, Split, Split]:
    """Train (the first 90 % of the training file, or its first ``train_limit``), validation
    (the rest) and test sets."""
    x, y = load_mnist(data_dir, "train", 60_000)
    split = int(np.floor((1.0 - VALIDATION_SPLIT) * len(x)))
    end = split if train_limit is None else min(train_limit, split)
    return (x[:end], y[:end]), (x[split:], y[split:]), load_mnist(data_dir, "t10k", 10_000)


# --- model -----------------------------------------------------------------------------------


def random_masks(model: nn.Module, density: float, seed: int) -> Dict[str, torch.Tensor]:
    """A random mask at ``density`` for each ``nn.Linear`` weight (masked-dense mode)."""
    gen = torch.Generator().manual_seed(seed)
    return {
        name: (torch.rand(m.weight.shape, generator=gen) < density).float()
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear)
    }


def apply_masks(model: nn.Module, masks: Dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, m in model.named_modules():
            if name in masks:
                m.weight.mul_(masks[name])


def layer_densities(model: nn.Module, masks: Dict[str, torch.Tensor]) -> Dict[str, float]:
    """Each sparse layer's density: the SparseLinear modules', or the masked-dense masks'."""
    if masks:
        return {name: float(mask.mean()) for name, mask in masks.items()}
    return {name: m.density for name, m in model.named_modules() if isinstance(m, SparseLinear)}


# --- training --------------------------------------------------------------------------------


def train_epoch(
    model: nn.Module,
    data: Split,
    batch_size: int,
    optimizer: optim.Optimizer,
    lr_scheduler: optim.lr_scheduler.StepLR,
    gen: torch.Generator,
    mask: Optional[Masking],
    masks: Dict[str, torch.Tensor],
) -> Tuple[float, List[float]]:
    """One epoch over the shuffled training set; returns the mean loss and each step's time
    in milliseconds (forward, backward, optimiser step and masking)."""
    model.train()
    x, y = data
    order = torch.randperm(len(x), generator=gen)
    loss_sum, step_ms = 0.0, []
    for start in range(0, len(x), batch_size):
        idx = order[start : start + batch_size]
        data_batch, target = x[idx], y[idx]
        t0 = time.perf_counter()
        optimizer.zero_grad()
        output = model(data_batch)
        loss = F.nll_loss(output, target)
        loss.backward()
        if mask is not None:
            mask.step()
        else:
            optimizer.step()
            apply_masks(model, masks)
        step_ms.append((time.perf_counter() - t0) * 1e3)
        # After the optimiser step (PyTorch >= 1.1's order); the reference, written for an
        # older PyTorch, steps it first, which decays the lr one step earlier.
        lr_scheduler.step()
        loss_sum += loss.item() * len(target)
    return loss_sum / len(x), step_ms


def evaluate(model: nn.Module, data: Split) -> float:
    """Accuracy in percent."""
    model.eval()
    x, y = data
    correct = 0
    with torch.no_grad():
        for start in range(0, len(x), EVAL_BATCH):
            output = model(x[start : start + EVAL_BATCH])
            correct += int((output.argmax(dim=1) == y[start : start + EVAL_BATCH]).sum())
    return 100.0 * correct / len(x)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--density", type=float, default=0.05)
    p.add_argument("--prune-rate", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=17)
    p.add_argument("--threads", type=int, default=2, help="torch's and sparsejit's threads")
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    p.add_argument(
        "--train-limit", type=int, metavar="N", help="train on the first N samples only"
    )
    p.add_argument(
        "--mode",
        choices=("sparsejit", "masked-dense", "dense"),
        default="sparsejit",
        help="sparsejit: SparseLinear + Masking; masked-dense: nn.Linear with a fixed random "
        "mask applied after every step (the reference's way); dense: plain training",
    )
    p.add_argument("--prune", default="magnitude", help="prune mode (sparsejit mode)")
    p.add_argument("--growth", default="momentum", help="growth mode (sparsejit mode)")
    p.add_argument(
        "--redistribution", default="momentum", help="redistribution mode (sparsejit mode)"
    )
    p.add_argument("--json", type=Path, metavar="FILE", help="write a JSON summary to FILE")
    args = p.parse_args()
    for name in ("epochs", "batch_size", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.train_limit is not None and args.train_limit < 1:
        p.error("--train-limit must be at least 1")
    if not 0.0 < args.density <= 1.0:
        p.error("--density must be in (0, 1]")
    return args


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    set_sparsejit_threads(args.threads)
    train_data, valid_data, test_data = mnist_splits(args.data_dir, args.train_limit)
    steps_per_epoch = math.ceil(len(train_data[0]) / args.batch_size)

    torch.manual_seed(args.seed)
    model = LeNet_300_100()
    optimizer = optim.SGD(
        model.parameters(),
        lr=args.lr,
        momentum=MOMENTUM,
        weight_decay=WEIGHT_DECAY,
        nesterov=True,
    )
    lr_scheduler = optim.lr_scheduler.StepLR(optimizer, DECAY_FREQUENCY, gamma=0.1)

    mask: Optional[Masking] = None
    masks: Dict[str, torch.Tensor] = {}
    if args.mode == "sparsejit":
        decay = CosineDecay(args.prune_rate, steps_per_epoch * args.epochs)
        mask = Masking(
            optimizer,
            decay,
            prune_rate=args.prune_rate,
            prune_mode=args.prune,
            growth_mode=args.growth,
            redistribution_mode=args.redistribution,
            steps_per_epoch=steps_per_epoch,
            seed=args.seed,
        )
        mask.add_module(model, density=args.density)
    elif args.mode == "masked-dense":
        masks = random_masks(model, args.density, args.seed)
        apply_masks(model, masks)

    gen = torch.Generator().manual_seed(args.seed)
    medians: List[float] = []
    for epoch in range(1, args.epochs + 1):
        loss, step_ms = train_epoch(
            model, train_data, args.batch_size, optimizer, lr_scheduler, gen, mask, masks
        )
        val_acc = evaluate(model, valid_data)
        medians.append(statistics.median(step_ms))
        line = (
            f"epoch {epoch:3d}  train loss {loss:.4f}  validation accuracy {val_acc:.2f} %  "
            f"step_ms_median {medians[-1]:.3f}"
        )
        densities = layer_densities(model, masks)
        if densities:
            line += "  density " + " ".join(f"{n}={d:.4f}" for n, d in densities.items())
        print(line, flush=True)
        if mask is not None and epoch < args.epochs:
            mask.at_end_of_epoch()

    test_acc = evaluate(model, test_data)
    print(f"test accuracy: {test_acc:.2f} %")
    if args.json is not None:
        summary = {
            "mode": args.mode,
            "epochs": args.epochs,
            "density": args.density,
            "seed": args.seed,
            "threads": args.threads,
            "test_accuracy": test_acc,
            "step_ms_median_per_epoch": medians,
            "step_ms_mean_of_medians": statistics.fmean(medians),
            "final_densities": layer_densities(model, masks),
        }
        args.json.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
