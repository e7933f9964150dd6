"""PyTorch modules on sparsejit's kernels, and sparse momentum training.

- :class:`SparseLinear` and :class:`SparseConv2d`: ``nn.Module`` s with ``nn.Linear``'s and
  ``nn.Conv2d``'s shapes whose forward and backward passes run sparsejit's kernels, compiled for
  the layer's mask. Only the nonzero weights are parameters (``values``, one per nonzero, in
  the row-major order of the mask's nonzeros), so optimiser state is as small as the layer.
- :class:`Masking`: the reference implementation's ``Masking`` (sparse momentum: prune, then
  regrow where the momentum of absent weights is largest, redistributing across layers), run by
  sparsejit's runtime; :class:`CosineDecay` and :class:`LinearDecay` schedule its prune rate.
- :func:`load_safetensors` / :func:`save_safetensors`: ``sparse-train``'s checkpoint tensors
  (``model.safetensors``) in and out of a model.

Activations cross into the kernels without copies: a ``[batch, features]`` tensor is used
through its transposed (feature-major) view when that view is contiguous, which is what these
modules return, so a chain of sparse layers (with element-wise functions between them) never
transposes. The first layer transposes its input once. CPU float32 tensors only.
"""

from __future__ import annotations

import json
import math
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from . import _native

__all__ = [
    "CosineDecay",
    "LinearDecay",
    "Masking",
    "SparseConv2d",
    "SparseLinear",
    "get_num_threads",
    "load_safetensors",
    "save_safetensors",
    "set_num_threads",
]

if not _native._threads_were_set():
    _native.set_num_threads(max(1, torch.get_num_threads()))


def set_num_threads(n: int) -> None:
    """Sets the threads sparsejit's kernels use (default: ``torch.get_num_threads()``)."""
    _native.set_num_threads(n)


def get_num_threads() -> int:
    """The threads sparsejit's kernels use."""
    return _native.get_num_threads()


def _np(t: torch.Tensor) -> np.ndarray:
    """A numpy view of a CPU tensor (no copy)."""
    return t.detach().numpy()


def _check_input(layer: str, name: str, t: Any, dims: int, expected: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{layer}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cpu":
        raise TypeError(
            f"{layer}: {name} is on {t.device}; sparsejit's kernels run on the CPU "
            f"(move it with .cpu())"
        )
    if t.dtype != torch.float32:
        raise TypeError(
            f"{layer}: {name} has dtype {t.dtype}; sparsejit computes in float32 "
            f"(convert with .float())"
        )
    if t.dim() != dims:
        raise ValueError(f"{layer}: {name} has shape {tuple(t.shape)}; expected {expected}")


def _contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.is_contiguous() else t.contiguous()


class _SparseFunction(torch.autograd.Function):
    """``y = W x + b`` with sparsejit's kernels; ``W`` is the layer's pattern with ``values``."""

    @staticmethod
    def forward(ctx, x, values, bias, layer):  # type: ignore[override]
        xf = layer._feature_major(x)
        yf = torch.empty(layer._output_shape(xf), dtype=torch.float32)
        layer._ops.forward(_np(values), None if bias is None else _np(bias), _np(xf), _np(yf))
        ctx.layer = layer
        ctx.pattern_hash = layer._ops.pattern_hash
        ctx.has_bias = bias is not None
        ctx.save_for_backward(xf, values)
        return layer._batch_major(yf)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        xf, values = ctx.saved_tensors
        layer = ctx.layer
        if layer._ops.pattern_hash != ctx.pattern_hash:
            raise RuntimeError(
                f"{layer._name}: the mask changed between the forward and the backward pass"
            )
        dyf = layer._feature_major(grad.to(torch.float32))
        dx = dvalues = dbias = None
        if ctx.needs_input_grad[0]:
            dxf = torch.empty(xf.shape, dtype=torch.float32)
            layer._ops.backward_data(_np(values), _np(dyf), _np(dxf))
            dx = layer._batch_major(dxf)
        if ctx.needs_input_grad[1]:
            dvalues = layer._values_grad(dyf, xf)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            dbias = dyf.sum(dim=tuple(range(1, dyf.dim())))
        return dx, dvalues, dbias, None


class _SparseModule(nn.Module):
    """What :class:`SparseLinear` and :class:`SparseConv2d` share: the pattern (on the Rust
    side), the ``values`` parameter, the ``mask`` buffer and the dense-gradient hook that
    :class:`Masking` uses."""

    def _setup(
        self,
        shape: Sequence[int],
        mask: torch.Tensor,
        weight: torch.Tensor,
        bias: Union[bool, nn.Parameter, None],
        stride: int,
        padding: int,
        strategy: str,
        name: str,
    ) -> None:
        self._name = name
        self._ops = _native.SparseOps(
            name,
            list(shape),
            _np(mask),
            bias=bias is not None and bias is not False,
            stride=stride,
            padding=padding,
            strategy=strategy,
        )
        self.register_buffer("mask", torch.from_numpy(self._ops.mask().astype(np.bool_)))
        self._index_cache: Optional[Tuple[int, torch.Tensor]] = None
        flat = weight.detach().reshape(-1).to(torch.float32)
        self.values = nn.Parameter(flat[self._index()].clone())
        if isinstance(bias, nn.Parameter):
            self.bias = bias
        elif bias:
            raise TypeError(f"{name}: bias must be True, False, None or an nn.Parameter")
        else:
            self.register_parameter("bias", None)
        # Set by Masking for the steps whose dense weight gradient it needs.
        self._want_dense_grad = False
        self._dense_grad: Optional[torch.Tensor] = None

    # --- the pattern -------------------------------------------------------------------------

    def _index(self) -> torch.Tensor:
        """The flat index of every nonzero in the dense weight (the order of ``values``)."""
        h = self._ops.pattern_hash
        if self._index_cache is None or self._index_cache[0] != h:
            self._index_cache = (h, torch.from_numpy(self._ops.dense_index()))
        return self._index_cache[1]

    @property
    def nnz(self) -> int:
        """The number of nonzero weights."""
        return self._ops.nnz

    @property
    def density(self) -> float:
        """Nonzeros over all weights."""
        return self._ops.nnz / self.mask.numel()

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight (zeros where masked), a new tensor without gradient."""
        dense = torch.zeros(self.mask.numel(), dtype=self.values.dtype)
        dense[self._index()] = self.values.detach()
        return dense.reshape(self.mask.shape)

    def set_mask(self, mask: Any) -> bool:
        """Replaces the mask (a bool or 0/1 tensor of the weight's shape). Weights that stay
        keep their values, new ones start at 0; returns whether the pattern changed. Replaces
        ``values`` in place (the same ``Parameter``), so an optimiser keeps it; its optimiser
        state no longer matches (``Masking`` remaps it)."""
        dense = self.weight.reshape(-1)
        changed = self._ops.set_mask(np.asarray(_as_mask(mask)))
        if changed:
            self._pattern_changed(dense)
        return changed

    def _pattern_changed(self, dense: torch.Tensor) -> None:
        """After the Rust side took a new pattern: the mask buffer, and ``values`` gathered
        from the flat ``dense`` weight (its stale gradient dropped)."""
        self.mask.copy_(torch.from_numpy(self._ops.mask().astype(np.bool_)))
        self.values.data = dense[self._index()].clone()
        self.values.grad = None

    def _values_grad(self, dyf: torch.Tensor, xf: torch.Tensor) -> torch.Tensor:
        if self._want_dense_grad:
            g = torch.empty(self.mask.numel(), dtype=torch.float32)
            self._ops.dense_weight_grad(_np(dyf), _np(xf), _np(g))
            # A module called twice in one step sums its gradients.
            self._dense_grad = g if self._dense_grad is None else self._dense_grad + g
            return g[self._index()]
        dw = torch.empty(self._ops.nnz, dtype=torch.float32)
        self._ops.weight_grad(_np(dyf), _np(xf), _np(dw))
        return dw

    def strategies(self, batch: int, height: int = 1, width: int = 1) -> Dict[str, str]:
        """The kernel strategy of each op at this batch (and input size), compiling them if
        needed: ``{"spmm": "jit", ...}``."""
        return dict(self._ops.strategies(batch, height, width))

    # --- state_dict ----------------------------------------------------------------------------

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        key = prefix + "mask"
        if key in state_dict:
            mask = state_dict[key]
            if tuple(mask.shape) != tuple(self.mask.shape):
                error_msgs.append(
                    f"size mismatch for {key}: the checkpoint's mask has shape "
                    f"{tuple(mask.shape)}, this module's {tuple(self.mask.shape)}"
                )
                return
            self.set_mask(mask)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        return _SparseFunction.apply(x, self.values, self.bias, self)


def _random_mask(shape: Sequence[int], density: float) -> torch.Tensor:
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    return torch.rand(*shape) < density


class SparseLinear(_SparseModule):
    """``y = x Wᵀ + b`` like ``nn.Linear``, with ``W`` sparse: only the nonzeros of its mask
    are stored and computed.

    Args:
        in_features, out_features: as ``nn.Linear``.
        density: the fraction of weights kept, drawn at random (torch's RNG) unless ``mask``
            is given.
        bias: as ``nn.Linear``.
        mask: a bool or 0/1 tensor ``[out_features, in_features]``.
        strategy: ``"auto"`` (sparsejit's planner picks per op by measurement), ``"jit"``,
            ``"generic"`` or ``"dense"``.

    Input ``[batch, in_features]``, output ``[batch, out_features]`` (a transposed view of a
    feature-major buffer, which the next sparse layer takes without a copy).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        density: float = 1.0,
        bias: bool = True,
        *,
        mask: Optional[Any] = None,
        strategy: str = "auto",
        name: str = "linear",
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        # nn.Linear's initialisation: U(-1/sqrt(in), 1/sqrt(in)) for weights and bias.
        bound = 1.0 / math.sqrt(in_features) if in_features > 0 else 0.0
        weight = torch.empty(out_features, in_features).uniform_(-bound, bound)
        if mask is None:
            mask = _random_mask((out_features, in_features), density)
        b: Union[bool, nn.Parameter] = False
        if bias:
            b = nn.Parameter(torch.empty(out_features).uniform_(-bound, bound))
        self._setup(
            (out_features, in_features), _as_mask(mask), weight, b, 1, 0, strategy, name
        )

    @classmethod
    def from_dense(
        cls, linear: nn.Linear, mask: Any, *, strategy: str = "auto", name: str = "linear"
    ) -> "SparseLinear":
        """A sparse copy of ``linear`` keeping the weights where ``mask`` (bool or 0/1,
        ``[out, in]``) is set; the bias ``Parameter`` is shared, not copied."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_dense takes an nn.Linear, got {type(linear).__name__}")
        m = cls.__new__(cls)
        nn.Module.__init__(m)
        m.in_features, m.out_features = linear.in_features, linear.out_features
        m._setup(
            tuple(linear.weight.shape),
            _as_mask(mask),
            linear.weight,
            linear.bias if linear.bias is not None else False,
            1,
            0,
            strategy,
            name,
        )
        return m

    def to_dense(self) -> nn.Linear:
        """An ``nn.Linear`` with this layer's weights (zeros where masked) and bias."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        with torch.no_grad():
            linear.weight.copy_(self.weight)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def _feature_major(self, x: torch.Tensor) -> torch.Tensor:
        return _contiguous(x.t())

    def _batch_major(self, t: torch.Tensor) -> torch.Tensor:
        return t.t()

    def _output_shape(self, xf: torch.Tensor) -> Tuple[int, int]:
        return (self.out_features, xf.shape[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(self._name, "input", x, 2, f"[batch, {self.in_features}]")
        if x.shape[1] != self.in_features:
            raise ValueError(
                f"{self._name}: input has shape {tuple(x.shape)}; expected "
                f"[batch, {self.in_features}]"
            )
        if x.shape[0] == 0:
            return x.new_zeros((0, self.out_features))
        return self._run(x)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, density={self.density:.4f}"
        )


def _pair(v: Any, what: str, layer: str) -> int:
    if isinstance(v, int):
        return v
    if isinstance(v, (tuple, list)) and len(v) == 2 and v[0] == v[1]:
        return int(v[0])
    raise ValueError(f"{layer}: {what} {v!r} must be an int or a pair of equal ints")


class SparseConv2d(_SparseModule):
    """A 2-D convolution like ``nn.Conv2d`` (square window, equal strides and paddings, no
    dilation or groups) whose ``[out, in, k, k]`` weight is sparse: sparsejit's direct sparse
    convolution, never unrolled.

    Input ``[batch, in_channels, H, W]``, output ``[batch, out_channels, OH, OW]`` (a permuted
    view of a channel-major buffer, which the next sparse convolution takes without a copy).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: Union[int, Tuple[int, int]],
        stride: Union[int, Tuple[int, int]] = 1,
        padding: Union[int, Tuple[int, int]] = 0,
        density: float = 1.0,
        bias: bool = True,
        *,
        mask: Optional[Any] = None,
        strategy: str = "auto",
        name: str = "conv",
    ) -> None:
        super().__init__()
        k = _pair(kernel_size, "kernel_size", name)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = (k, k)
        self.stride = (_pair(stride, "stride", name),) * 2
        self.padding = (_pair(padding, "padding", name),) * 2
        fan_in = in_channels * k * k
        bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
        shape = (out_channels, in_channels, k, k)
        weight = torch.empty(shape).uniform_(-bound, bound)
        if mask is None:
            mask = _random_mask(shape, density)
        b: Union[bool, nn.Parameter] = False
        if bias:
            b = nn.Parameter(torch.empty(out_channels).uniform_(-bound, bound))
        self._setup(
            shape, _as_mask(mask), weight, b, self.stride[0], self.padding[0], strategy, name
        )

    @classmethod
    def from_dense(
        cls, conv: nn.Conv2d, mask: Any, *, strategy: str = "auto", name: str = "conv"
    ) -> "SparseConv2d":
        """A sparse copy of ``conv`` keeping the weights where ``mask`` (bool or 0/1,
        ``[out, in, k, k]``) is set; the bias ``Parameter`` is shared, not copied."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"from_dense takes an nn.Conv2d, got {type(conv).__name__}")
        unsupported = []
        if conv.groups != 1:
            unsupported.append(f"groups={conv.groups}")
        if tuple(conv.dilation) != (1, 1):
            unsupported.append(f"dilation={conv.dilation}")
        if conv.padding_mode != "zeros":
            unsupported.append(f"padding_mode={conv.padding_mode!r}")
        if isinstance(conv.padding, str):
            unsupported.append(f"padding={conv.padding!r}")
        if unsupported:
            raise ValueError(f"{name}: SparseConv2d does not support {', '.join(unsupported)}")
        m = cls.__new__(cls)
        nn.Module.__init__(m)
        k = _pair(conv.kernel_size, "kernel_size", name)
        m.in_channels, m.out_channels = conv.in_channels, conv.out_channels
        m.kernel_size = (k, k)
        m.stride = (_pair(conv.stride, "stride", name),) * 2
        m.padding = (_pair(conv.padding, "padding", name),) * 2
        m._setup(
            tuple(conv.weight.shape),
            _as_mask(mask),
            conv.weight,
            conv.bias if conv.bias is not None else False,
            m.stride[0],
            m.padding[0],
            strategy,
            name,
        )
        return m

    def to_dense(self) -> nn.Conv2d:
        """An ``nn.Conv2d`` with this layer's weights (zeros where masked) and bias."""
        conv = nn.Conv2d(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            bias=self.bias is not None,
        )
        with torch.no_grad():
            conv.weight.copy_(self.weight)
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return conv

    def _feature_major(self, x: torch.Tensor) -> torch.Tensor:
        xp = x.permute(1, 2, 3, 0)
        if xp.is_contiguous():
            return xp
        if x.is_contiguous():
            # An NCHW tensor: one 2-D transpose ([batch, C·H·W] to [C·H·W, batch]) copies
            # faster than the 4-D permutation.
            b, c, h, w = x.shape
            return x.reshape(b, c * h * w).t().contiguous().view(c, h, w, b)
        return xp.contiguous()

    def _batch_major(self, t: torch.Tensor) -> torch.Tensor:
        return t.permute(3, 0, 1, 2)

    def _output_shape(self, xf: torch.Tensor) -> Tuple[int, int, int, int]:
        oh, ow = self._ops.output_size(xf.shape[1], xf.shape[2])
        return (self.out_channels, oh, ow, xf.shape[3])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(self._name, "input", x, 4, f"[batch, {self.in_channels}, height, width]")
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f"{self._name}: input has shape {tuple(x.shape)}; expected "
                f"[batch, {self.in_channels}, height, width]"
            )
        if x.shape[0] == 0:
            oh, ow = self._ops.output_size(x.shape[2], x.shape[3])
            return x.new_zeros((0, self.out_channels, oh, ow))
        return self._run(x)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, bias={self.bias is not None}, "
            f"density={self.density:.4f}"
        )


def _as_mask(mask: Any) -> torch.Tensor:
    if isinstance(mask, torch.Tensor):
        return mask.detach().cpu()
    return torch.from_numpy(np.asarray(mask))


# --- schedules -------------------------------------------------------------------------------


class CosineDecay:
    """The prune rate's cosine decay, as the reference's ``CosineDecay(prune_rate, T_max,
    eta_min=0.005)``: from ``prune_rate`` down to ``eta_min`` over ``T_max`` steps (bit for bit
    the reference's rates; computed by sparsejit's runtime)."""

    def __init__(
        self, prune_rate: float, T_max: int, eta_min: float = 0.005, last_epoch: int = -1
    ) -> None:
        self._schedule = _native.PruneRateSchedule("cosine", prune_rate, int(T_max), eta_min)
        for _ in range(last_epoch + 1):
            self._schedule.step()

    def step(self) -> None:
        """Advances one optimiser step."""
        self._schedule.step()

    def get_dr(self, prune_rate: Optional[float] = None) -> float:
        """The current prune rate."""
        return self._schedule.rate

    def state_dict(self) -> Dict[str, Any]:
        return {"schedule": self._schedule.state()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self._schedule = _native.PruneRateSchedule.from_state(state["schedule"])


class LinearDecay:
    """The prune rate's linear decay. ``LinearDecay(prune_rate, T_max)``: a straight line from
    ``prune_rate`` down to ``eta_min`` over ``T_max`` steps (``sparse-train --decay-schedule
    linear``). Without ``T_max``, the reference's ``LinearDecay(prune_rate, factor=0.99,
    frequency=600)``: the rate is multiplied by ``factor`` every ``frequency`` steps."""

    def __init__(
        self,
        prune_rate: float,
        T_max: Optional[int] = None,
        eta_min: float = 0.005,
        *,
        factor: float = 0.99,
        frequency: int = 600,
    ) -> None:
        self._schedule = (
            _native.PruneRateSchedule("linear", prune_rate, int(T_max), eta_min)
            if T_max is not None
            else None
        )
        self.factor, self.frequency = factor, frequency
        self.steps, self._rate = 0, prune_rate

    def step(self) -> None:
        """Advances one optimiser step."""
        self.steps += 1
        if self._schedule is not None:
            self._schedule.step()
        elif self.steps % self.frequency == 0:
            self._rate *= self.factor

    def get_dr(self, prune_rate: Optional[float] = None) -> float:
        """The current prune rate."""
        return self._schedule.rate if self._schedule is not None else self._rate

    def state_dict(self) -> Dict[str, Any]:
        return {
            "schedule": None if self._schedule is None else self._schedule.state(),
            "steps": self.steps,
            "rate": self._rate,
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        s = state["schedule"]
        self._schedule = None if s is None else _native.PruneRateSchedule.from_state(s)
        self.steps, self._rate = state["steps"], state["rate"]


# --- Masking ---------------------------------------------------------------------------------

# The reference's spellings, where they differ from sparse-train's.
_SPELLINGS = {
    "nonzeros": "nonzero",
    "global_magnitude": "global-magnitude",
    "momentum_neuron": "momentum-neuron",
}


def _mode(kind: str, value: str, allowed: Sequence[str]) -> str:
    v = _SPELLINGS.get(value, value.replace("_", "-"))
    if v not in allowed:
        raise ValueError(
            f"{kind} {value!r} is not available in sparsejit; the modes are: "
            f"{', '.join(allowed)}"
        )
    return v


def _dense_momentum(spec: str) -> Optional[int]:
    """``exact`` → None (every step), ``window:K`` → K."""
    if spec == "exact":
        return None
    if spec.startswith("window:"):
        try:
            k = int(spec[len("window:") :])
        except ValueError:
            k = 0
        if k >= 1:
            return k
    raise ValueError(f"dense_momentum {spec!r}: expected 'exact' or 'window:K' with K >= 1")


class _Layer:
    """What Masking keeps per sparse layer: the module, its name and the momentum of its
    absent weights (dense, with a lazily applied decay)."""

    def __init__(self, name: str, module: _SparseModule) -> None:
        self.name = name
        self.module = module
        self.momentum = torch.zeros(module.mask.numel(), dtype=torch.float32)
        self.pending = 0
        # The dense gradient of the last step, if it computed one (growth `gradient`).
        self.last_dense_grad: Optional[torch.Tensor] = None


class Masking:
    """Sparse momentum training, with the reference's API (``sparse_learning.core.Masking``).

    Typical use, as the reference's scripts::

        decay = CosineDecay(0.5, len(train_loader) * epochs)
        mask = Masking(optimizer, decay, prune_rate=0.5)
        mask.add_module(model, density=0.05)   # swaps nn.Linear/nn.Conv2d for sparse ones
        for epoch in range(epochs):
            for x, y in train_loader:
                optimizer.zero_grad(); loss(model(x), y).backward()
                mask.step()                     # instead of optimizer.step()
            if epoch < epochs - 1:
                mask.at_end_of_epoch()          # prune, redistribute, regrow

    The momentum of absent weights, which growth and redistribution read, is Masking's own:
    with ``dense_momentum='window:K'`` (default ``window:64``) the dense weight gradient is
    computed only in the K steps before each mask update (and through the first epoch, until
    Masking knows the steps per epoch, unless ``steps_per_epoch`` is given); ``'exact'``
    computes it every step. Modes are ``sparse-train``'s (``--prune``, ``--growth``,
    ``--redistribution``), with the reference's spellings accepted.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        prune_rate_decay: Any = None,
        prune_rate: float = 0.5,
        prune_mode: str = "magnitude",
        growth_mode: str = "momentum",
        redistribution_mode: str = "momentum",
        verbose: bool = False,
        fp16: bool = False,
        *,
        dense_momentum: str = "window:64",
        steps_per_epoch: Optional[int] = None,
        seed: int = 0,
    ) -> None:
        if fp16:
            raise ValueError("fp16: sparsejit's kernels compute in float32 only")
        self.optimizer = optimizer
        self.prune_rate_decay = prune_rate_decay
        self.prune_rate = float(prune_rate)
        self.prune_mode = _mode("prune_mode", prune_mode, _native.PRUNE_MODES)
        self.growth_mode = _mode("growth_mode", growth_mode, _native.GROWTH_MODES)
        self.redistribution_mode = _mode(
            "redistribution_mode", redistribution_mode, _native.REDISTRIBUTION_MODES
        )
        self.window = _dense_momentum(dense_momentum)
        self.steps_per_epoch = steps_per_epoch
        self.verbose = verbose
        self.seed = seed
        self.steps = 0
        self._epoch_start = 0
        self.layers: List[_Layer] = []
        self._update: Optional[Any] = None
        self.last_report: Optional[Dict[str, Any]] = None

    # --- building --------------------------------------------------------------------------

    def add_module(
        self, module: nn.Module, density: float, sparse_init: str = "constant"
    ) -> None:
        """Makes ``module``'s ``nn.Linear`` and ``nn.Conv2d`` layers sparse at ``density``
        (nested containers included), in place, and moves the optimiser's parameters and
        state to the sparse layers' ``values``. ``sparse_init``: ``constant``/``uniform`` (the
        same density in every layer) or ``erk``/``ER``."""
        init = {"constant": "uniform", "uniform": "uniform", "erk": "erk", "ER": "erk"}.get(
            sparse_init
        )
        if init is None:
            raise ValueError(
                f"sparse_init {sparse_init!r}: expected constant, uniform, erk or ER"
            )
        if self._update is not None:
            raise RuntimeError("add_module: Masking already has its layers")
        # Model order (named_modules' pre-order), as the runtime lists its layers.
        found: List[Tuple[str, nn.Module, nn.Module, str]] = []
        for name, child in module.named_modules():
            if name and isinstance(child, (_SparseModule, nn.Linear, nn.Conv2d)):
                parent_name, _, attr = name.rpartition(".")
                found.append((name, module.get_submodule(parent_name), child, attr))
        if not found:
            raise ValueError("add_module: the module has no nn.Linear or nn.Conv2d layer")
        shapes = [(name, list(child.weight.shape)) for name, _, child, _ in found]
        self._update = _native.MaskUpdate(
            shapes,
            density,
            prune=self.prune_mode,
            growth=self.growth_mode,
            redistribution=self.redistribution_mode,
            init=init,
            seed=self.seed,
        )
        masks = self._update.init_masks()
        for (name, parent, child, attr), mask in zip(found, masks):
            if isinstance(child, _SparseModule):
                sparse = child
                sparse.set_mask(mask.reshape(tuple(child.mask.shape)))
            elif isinstance(child, nn.Linear):
                sparse = SparseLinear.from_dense(
                    child, mask.reshape(tuple(child.weight.shape)), name=name
                )
            else:
                sparse = SparseConv2d.from_dense(
                    child, mask.reshape(tuple(child.weight.shape)), name=name
                )
            sparse.train(child.training)
            if sparse is not child:
                self._move_parameter(child.weight, sparse)
                setattr(parent, attr, sparse)
            self.layers.append(_Layer(name, sparse))
        self._arm_next_step()

    def _move_parameter(self, old: torch.Tensor, sparse: _SparseModule) -> None:
        """Puts ``sparse.values`` where the optimiser had the dense ``old`` weight, with the
        state (momentum…) of the kept entries."""
        new = sparse.values
        for group in self.optimizer.param_groups:
            group["params"] = [new if p is old else p for p in group["params"]]
        state = self.optimizer.state.pop(old, None)
        if state:
            index = sparse._index()
            moved = {}
            for k, v in state.items():
                if isinstance(v, torch.Tensor) and v.shape == old.shape:
                    moved[k] = v.detach().reshape(-1)[index].clone()
                else:
                    moved[k] = v
            self.optimizer.state[new] = moved

    # --- the step --------------------------------------------------------------------------

    def _group_of(self, p: torch.Tensor) -> Dict[str, Any]:
        for group in self.optimizer.param_groups:
            if any(q is p for q in group["params"]):
                return group
        raise RuntimeError(
            "Masking: a sparse layer's values are not in the optimiser (was the optimiser "
            "replaced after add_module?)"
        )

    def _mu(self, layer: _Layer) -> float:
        group = self._group_of(layer.module.values)
        if "momentum" in group:
            return float(group["momentum"])
        if "betas" in group:
            return float(group["betas"][0])
        return 0.0

    def _dense_steps_ahead(self) -> bool:
        """Whether the next step needs the dense weight gradient."""
        if self._update is None or self._update.is_static:
            return False
        if self.window is None or self.steps_per_epoch is None:
            return True
        spe = self.steps_per_epoch
        next_update = (self.steps // spe + 1) * spe
        return next_update - (self.steps + 1) < self.window

    def _arm_next_step(self) -> None:
        want = self._dense_steps_ahead()
        for layer in self.layers:
            layer.module._want_dense_grad = want

    def step(self) -> None:
        """``optimizer.step()``, then Masking's bookkeeping: the momentum of absent weights
        and the prune-rate schedule."""
        self.optimizer.step()
        for layer in self.layers:
            m = layer.module
            g, m._dense_grad = m._dense_grad, None
            mu = self._mu(layer)
            if g is not None:
                # buf = mu^(k+1) buf + g, the k skipped steps' decay taken along.
                layer.momentum.mul_(mu ** (layer.pending + 1)).add_(g)
                layer.pending = 0
                layer.last_dense_grad = g
            else:
                layer.pending += 1
                layer.last_dense_grad = None
        if self.prune_rate_decay is not None:
            self.prune_rate_decay.step()
            self.prune_rate = self.prune_rate_decay.get_dr(self.prune_rate)
        self.steps += 1
        self._arm_next_step()

    # --- the mask update -------------------------------------------------------------------

    def _momentum_key(self, state: Dict[str, Any]) -> Optional[str]:
        for k in ("momentum_buffer", "exp_avg"):
            if isinstance(state.get(k), torch.Tensor):
                return k
        return None

    def at_end_of_epoch(self) -> Dict[str, Any]:
        """Prunes, redistributes and regrows every sparse layer (the runtime's mask update),
        recompiles the changed layers' kernels and remaps the optimiser state; returns the
        update's report."""
        if self._update is None:
            raise RuntimeError("at_end_of_epoch: call add_module first")
        if self.steps_per_epoch is None:
            self.steps_per_epoch = max(1, self.steps - self._epoch_start)
        self._epoch_start = self.steps
        weights, masks, momenta, grads = [], [], [], []
        for layer in self.layers:
            m = layer.module
            mu = self._mu(layer)
            if layer.pending:
                layer.momentum.mul_(mu**layer.pending)
                layer.pending = 0
            index = m._index()
            w = m.weight.reshape(-1).contiguous()
            mom = layer.momentum.clone()
            state = self.optimizer.state.get(m.values, {})
            key = self._momentum_key(state)
            mom[index] = state[key].detach().reshape(-1) if key else 0.0
            weights.append(w.numpy())
            masks.append(m.mask.reshape(-1).to(torch.uint8).numpy().copy())
            momenta.append(mom.numpy())
            grads.append(
                layer.last_dense_grad
                if layer.last_dense_grad is not None
                else torch.zeros(m.mask.numel())
            )
        report = json.loads(
            self._update.update(
                weights,
                masks,
                momenta,
                [g.numpy() for g in grads] if self._update.needs_gradient else None,
                float(self.prune_rate),
            )
        )
        for layer, w, mask, mom, lr in zip(self.layers, weights, masks, momenta, report["layers"]):
            if not lr["changed"]:
                continue
            m = layer.module
            old_index = m._index()
            values = m.values
            state = self.optimizer.state.get(values, {})
            old_state = {
                k: v.detach().clone()
                for k, v in state.items()
                if isinstance(v, torch.Tensor) and v.shape == values.shape
            }
            m._ops.set_mask(mask.reshape(tuple(m.mask.shape)))
            m._pattern_changed(torch.from_numpy(w))
            index = m._index()
            key = self._momentum_key(state)
            for k, v in old_state.items():
                if k == key:
                    state[k] = torch.from_numpy(mom)[index].clone()
                else:
                    dense = torch.zeros(m.mask.numel())
                    dense[old_index] = v
                    state[k] = dense[index].clone()
        self.last_report = report
        if self.verbose:
            for lr in report["layers"]:
                print(
                    f"{lr['name']}: {lr['nonzeros_after']} of {lr['numel']} nonzero "
                    f"({lr['nonzeros_after'] / lr['numel']:.4f}), pruned {lr['num_pruned']}, "
                    f"regrown {lr['num_regrown']}"
                )
        self._arm_next_step()
        return report

    # --- saving ----------------------------------------------------------------------------

    def state_dict(self) -> Dict[str, Any]:
        """Masking's own state (masks and values live in the model's state_dict)."""
        return {
            "masking": None if self._update is None else self._update.state(),
            "steps": self.steps,
            "epoch_start": self._epoch_start,
            "steps_per_epoch": self.steps_per_epoch,
            "prune_rate": self.prune_rate,
            "momentum": {l.name: l.momentum.clone() for l in self.layers},
            "pending": {l.name: l.pending for l in self.layers},
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restores :meth:`state_dict` (after ``add_module`` on the same model)."""
        if self._update is None:
            raise RuntimeError("load_state_dict: call add_module first")
        self._update = _native.MaskUpdate.from_state(state["masking"])
        self.steps = state["steps"]
        self._epoch_start = state["epoch_start"]
        self.steps_per_epoch = state["steps_per_epoch"]
        self.prune_rate = state["prune_rate"]
        for layer in self.layers:
            layer.momentum = state["momentum"][layer.name].clone()
            layer.pending = state["pending"][layer.name]
        self._arm_next_step()


# --- sparse-train's checkpoints ----------------------------------------------------------------


def _sparse_modules(model: nn.Module) -> Iterable[Tuple[str, _SparseModule]]:
    for name, m in model.named_modules():
        if isinstance(m, _SparseModule):
            yield name, m


def load_safetensors(model: nn.Module, path: str) -> List[str]:
    """Loads ``sparse-train``'s ``model.safetensors`` (``NAME.weight`` dense with zeros where
    masked, ``NAME.mask``, ``NAME.bias``) into the model's sparse layers of the same names;
    returns the names loaded. A sparse layer missing from the file is an error."""
    tensors = _native.read_tensors(str(path))
    loaded = []
    for name, m in _sparse_modules(model):
        if f"{name}.weight" not in tensors:
            raise KeyError(f"{path}: no tensor {name}.weight for layer {name}")
        weight = tensors[f"{name}.weight"]
        if tuple(weight.shape) != tuple(m.mask.shape):
            raise ValueError(
                f"{path}: {name}.weight has shape {tuple(weight.shape)}, the layer "
                f"{tuple(m.mask.shape)}"
            )
        mask = tensors.get(f"{name}.mask")
        if mask is None:
            mask = weight != 0
        m.set_mask(mask)
        with torch.no_grad():
            m.values.copy_(torch.from_numpy(weight).reshape(-1)[m._index()])
            bias = tensors.get(f"{name}.bias")
            if m.bias is not None and bias is not None:
                m.bias.copy_(torch.from_numpy(bias))
        loaded.append(name)
    return loaded


def save_safetensors(model: nn.Module, path: str) -> None:
    """Writes the model's sparse layers in ``sparse-train``'s ``model.safetensors`` layout
    (``NAME.weight``, ``NAME.mask``, ``NAME.bias``)."""
    tensors: Dict[str, np.ndarray] = {}
    for name, m in _sparse_modules(model):
        tensors[f"{name}.weight"] = np.ascontiguousarray(m.weight.numpy())
        tensors[f"{name}.mask"] = np.ascontiguousarray(m.mask.numpy().astype(np.uint8))
        if m.bias is not None:
            tensors[f"{name}.bias"] = np.ascontiguousarray(_np(m.bias))
    _native.write_tensors(str(path), tensors)
