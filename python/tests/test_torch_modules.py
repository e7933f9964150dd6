"""SparseLinear and SparseConv2d against dense torch on the masked weights."""

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsejit.torch import SparseConv2d, SparseLinear


def dense_reference(layer, x, fn):
    """The layer's output and gradients computed by dense torch on its masked weight."""
    w = layer.weight.clone().requires_grad_(True)
    b = None if layer.bias is None else layer.bias.detach().clone().requires_grad_(True)
    x = x.detach().clone().requires_grad_(True)
    return fn(x, w, b), x, w, b


def check_grads(layer, x, y, ref, tol=1e-4):
    yr, xr, wr, br = ref
    torch.testing.assert_close(y, yr, rtol=tol, atol=tol)
    g = torch.randn_like(yr)
    y.backward(g)
    yr.backward(g)
    torch.testing.assert_close(x.grad, xr.grad, rtol=tol, atol=tol)
    # The values' gradient is the dense gradient at the mask's nonzeros.
    torch.testing.assert_close(
        layer.values.grad, wr.grad.reshape(-1)[layer._index()], rtol=tol, atol=tol
    )
    if layer.bias is not None:
        torch.testing.assert_close(layer.bias.grad, br.grad, rtol=tol, atol=tol)


@pytest.mark.parametrize("batch", [1, 3, 17, 100])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("strategy", ["auto", "jit", "generic", "dense"])
def test_linear_matches_dense_torch(batch, bias, strategy):
    torch.manual_seed(batch)
    layer = SparseLinear(37, 11, density=0.2, bias=bias, strategy=strategy)
    x = torch.randn(batch, 37, requires_grad=True)
    y = layer(x)
    assert y.shape == (batch, 11)
    check_grads(layer, x, y, dense_reference(layer, x, lambda x, w, b: F.linear(x, w, b)))


@pytest.mark.parametrize(
    "k,stride,padding,hw",
    [(1, 1, 0, (6, 6)), (3, 1, 1, (7, 5)), (3, 2, 1, (9, 7)), (3, 2, 0, (8, 8)), (5, 1, 2, (5, 5))],
)
@pytest.mark.parametrize("batch", [1, 3])
def test_conv_matches_dense_torch(k, stride, padding, hw, batch):
    torch.manual_seed(k + batch)
    layer = SparseConv2d(4, 6, k, stride=stride, padding=padding, density=0.4)
    with torch.no_grad():
        layer.mask[0].zero_()  # an empty output channel
        layer.mask[:, 2].zero_()  # an empty input channel
    layer.set_mask(layer.mask.clone())
    x = torch.randn(batch, 4, *hw, requires_grad=True)
    y = layer(x)

    def conv(x, w, b):
        return F.conv2d(x, w, b, stride=stride, padding=padding)

    check_grads(layer, x, y, dense_reference(layer, x, conv))


def test_a_chain_of_sparse_layers_passes_activations_without_copies():
    torch.manual_seed(0)
    a, b = SparseLinear(20, 16, density=0.5), SparseLinear(16, 4, density=0.5)
    x = torch.randn(8, 20)
    h = torch.relu(a(x))
    # The output is a transposed view of a feature-major buffer; ReLU keeps the layout and
    # the next layer uses it as it is.
    assert h.stride() == (1, 8)
    assert b._feature_major(h).data_ptr() == h.data_ptr()
    ca = SparseConv2d(3, 5, 3, padding=1, density=0.5)
    cb = SparseConv2d(5, 2, 3, density=0.5)
    z = torch.relu(ca(torch.randn(2, 3, 6, 6)))
    assert cb._feature_major(z).data_ptr() == z.data_ptr()
    assert cb(z).shape == (2, 2, 4, 4)


def test_optimizer_steps_match_masked_dense_sgd():
    torch.manual_seed(3)
    layer = SparseLinear(12, 7, density=0.3)
    dense = layer.to_dense()
    mask = layer.mask.clone()
    opt_s = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True)
    opt_d = torch.optim.SGD(dense.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True)
    for step in range(5):
        x = torch.randn(9, 12)
        t = torch.randint(0, 7, (9,))
        for model, opt in ((layer, opt_s), (dense, opt_d)):
            opt.zero_grad()
            F.cross_entropy(model(x), t).backward()
            opt.step()
        with torch.no_grad():
            dense.weight.mul_(mask)  # the reference's apply_mask
    torch.testing.assert_close(layer.weight, dense.weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.bias, dense.bias, rtol=1e-5, atol=1e-6)
    # Optimiser state is as small as the layer.
    assert opt_s.state[layer.values]["momentum_buffer"].numel() == layer.nnz


def test_from_dense_to_dense_and_mask():
    linear = nn.Linear(6, 4)
    mask = torch.rand(4, 6) < 0.5
    sparse = SparseLinear.from_dense(linear, mask)
    assert torch.equal(sparse.mask, mask)
    assert sparse.values.numel() == int(mask.sum())
    assert sparse.bias is linear.bias  # shared, so an optimiser's bias state carries over
    back = sparse.to_dense()
    torch.testing.assert_close(back.weight, linear.weight * mask)
    x = torch.randn(3, 6)
    torch.testing.assert_close(sparse(x), back(x), rtol=1e-5, atol=1e-6)

    conv = nn.Conv2d(2, 3, 3, stride=2, padding=1)
    cmask = torch.rand(3, 2, 3, 3) < 0.5
    sconv = SparseConv2d.from_dense(conv, cmask.int())
    xi = torch.randn(2, 2, 7, 7)
    torch.testing.assert_close(sconv(xi), sconv.to_dense()(xi), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="dilation"):
        SparseConv2d.from_dense(nn.Conv2d(2, 3, 3, dilation=2), cmask)


def test_state_dict_round_trips_mask_and_values():
    torch.manual_seed(4)
    a = SparseConv2d(3, 4, 3, padding=1, density=0.3)
    b = SparseConv2d(3, 4, 3, padding=1, density=0.7)  # another mask, another nnz
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)
    buffer.seek(0)
    b.load_state_dict(torch.load(buffer))
    assert torch.equal(a.mask, b.mask) and b.values.numel() == a.nnz
    x = torch.randn(2, 3, 5, 5)
    torch.testing.assert_close(a(x), b(x))
    assert set(a.state_dict()) == {"values", "bias", "mask"}


def test_set_mask_keeps_surviving_weights_and_recompiles():
    torch.manual_seed(5)
    layer = SparseLinear(10, 6, density=0.5)
    old = layer.weight
    new_mask = torch.rand(6, 10) < 0.5
    x = torch.randn(4, 10)
    layer(x)  # kernels compiled for the old pattern
    assert layer.set_mask(new_mask)
    torch.testing.assert_close(layer.weight, old * (new_mask & (old != 0)))
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-6)
    assert not layer.set_mask(new_mask)


def test_bad_input_is_a_clear_error():
    layer = SparseLinear(5, 3, density=0.5)
    with pytest.raises(TypeError, match="float32"):
        layer(torch.randn(2, 5, dtype=torch.float64))
    with pytest.raises(TypeError, match="CPU"):
        layer(torch.empty(2, 5, device="meta"))
    with pytest.raises(ValueError, match=r"expected \[batch, 5\]"):
        layer(torch.randn(2, 6))
    with pytest.raises(ValueError, match="expected"):
        layer(torch.randn(2, 5, 1))
    with pytest.raises(TypeError, match="torch.Tensor"):
        layer(np.ones((2, 5), np.float32))
    with pytest.raises(ValueError, match="density"):
        SparseLinear(5, 3, density=0.0)
    with pytest.raises(ValueError, match="0 and 1"):
        SparseLinear(2, 2, mask=torch.tensor([[0, 2], [1, 1]]))
    conv = SparseConv2d(2, 3, 3, density=0.5)
    with pytest.raises(ValueError, match="in_channels|expected"):
        conv(torch.randn(1, 3, 5, 5))
    with pytest.raises(ValueError, match="window|input"):
        conv(torch.randn(1, 2, 2, 2))  # smaller than the window
    with pytest.raises(ValueError, match="pair of equal"):
        SparseConv2d(2, 3, (3, 5))
    # A non-contiguous input is used through a copy, with the right result.
    x = torch.randn(4, 10)[:, ::2]
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-6)
    # An empty batch gives an empty output, as nn.Linear.
    assert layer(torch.randn(0, 5)).shape == (0, 3)
