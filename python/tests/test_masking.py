"""Masking (sparse momentum) against the reference's way: dense layers with masks."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsejit import _native
from sparsejit.torch import CosineDecay, LinearDecay, Masking, SparseConv2d, SparseLinear


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())
        self.fc1 = nn.Linear(4 * 6 * 6, 20)
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(20, 5))

    def forward(self, x):
        x = self.features(x)
        return self.head(self.fc1(torch.flatten(x, 1)))


def sgd(params):
    return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True)


def batches(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(8, 1, 6, 6, generator=g), torch.randint(0, 5, (8,), generator=g))
        for _ in range(n)
    ]


def sparse_and_reference(density=0.3, **masking_args):
    """A model made sparse by Masking, and the same model kept dense with the same masks
    (the reference's simulation)."""
    torch.manual_seed(11)
    sparse = Net()
    dense = copy.deepcopy(sparse)
    opt = sgd(sparse.parameters())
    mask = Masking(opt, CosineDecay(0.5, 100), prune_rate=0.5, **masking_args)
    mask.add_module(sparse, density=density)
    masks = {l.name: l.module.mask.clone() for l in mask.layers}
    dense_modules = dict(dense.named_modules())
    with torch.no_grad():
        for name, m in masks.items():
            dense_modules[name].weight.mul_(m)
    return sparse, mask, dense, sgd(dense.parameters()), masks


def reference_step(model, opt, masks, x, t):
    opt.zero_grad()
    F.cross_entropy(model(x), t).backward()
    opt.step()
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, m in masks.items():
            modules[name].weight.mul_(m)


def sparse_step(model, mask, x, t):
    mask.optimizer.zero_grad()
    F.cross_entropy(model(x), t).backward()
    mask.step()


def test_add_module_swaps_layers_and_moves_the_optimizer():
    sparse, mask, _, _, masks = sparse_and_reference()
    assert isinstance(sparse.features[0], SparseConv2d)
    assert isinstance(sparse.fc1, SparseLinear) and isinstance(sparse.head[1], SparseLinear)
    assert [l.name for l in mask.layers] == ["features.0", "fc1", "head.1"]
    params = [p for g in mask.optimizer.param_groups for p in g["params"]]
    assert {id(p) for p in params} == {id(p) for p in sparse.parameters()}
    total = sum(m.numel() for m in masks.values())
    nnz = sum(int(m.sum()) for m in masks.values())
    assert abs(nnz / total - 0.3) < 0.05


def test_steps_and_absent_momentum_match_the_reference_way():
    sparse, mask, dense, opt, masks = sparse_and_reference(dense_momentum="exact")
    for x, t in batches(6):
        sparse_step(sparse, mask, x, t)
        reference_step(dense, opt, masks, x, t)
    modules = dict(dense.named_modules())
    for layer in mask.layers:
        ref = modules[layer.name]
        torch.testing.assert_close(layer.module.weight, ref.weight, rtol=1e-4, atol=1e-6)
        buf = opt.state[ref.weight]["momentum_buffer"].reshape(-1)
        absent = ~masks[layer.name].reshape(-1)
        # Masking keeps the momentum of absent weights as the dense optimiser does.
        torch.testing.assert_close(layer.momentum[absent], buf[absent], rtol=1e-4, atol=1e-6)


def test_mask_update_matches_the_runtime_on_the_reference_state():
    sparse, mask, dense, opt, masks = sparse_and_reference(dense_momentum="exact")
    for x, t in batches(5):
        sparse_step(sparse, mask, x, t)
        reference_step(dense, opt, masks, x, t)
    # What the runtime's update makes of the reference's dense state ...
    modules = dict(dense.named_modules())
    update = _native.MaskUpdate([(l.name, list(l.module.mask.shape)) for l in mask.layers], 0.3)
    weights = [modules[l.name].weight.detach().reshape(-1).clone().numpy() for l in mask.layers]
    want = [masks[l.name].reshape(-1).to(torch.uint8).numpy().copy() for l in mask.layers]
    momenta = [
        opt.state[modules[l.name].weight]["momentum_buffer"].reshape(-1).clone().numpy()
        for l in mask.layers
    ]
    update.update(weights, want, momenta, None, mask.prune_rate)
    # ... is what Masking does to the sparse model.
    before = {l.name: l.module.nnz for l in mask.layers}
    report = mask.at_end_of_epoch()
    assert any(l["changed"] for l in report["layers"])
    for layer, w, m, mom in zip(mask.layers, weights, want, momenta):
        np.testing.assert_array_equal(layer.module.mask.reshape(-1).numpy(), m.astype(bool))
        np.testing.assert_allclose(layer.module.weight.reshape(-1).numpy(), w, rtol=1e-4, atol=1e-6)
        # The optimiser's momentum follows the new pattern: kept weights keep theirs, grown
        # ones start from the momentum that made them grow.
        buf = mask.optimizer.state[layer.module.values]["momentum_buffer"]
        np.testing.assert_allclose(buf.numpy(), mom[layer.module._index().numpy()], rtol=1e-4, atol=1e-6)
    assert sum(before.values()) == pytest.approx(sum(l.module.nnz for l in mask.layers), rel=0.02)
    # The recompiled kernels compute the new masked layers.
    x = torch.randn(3, 1, 6, 6)
    with torch.no_grad():
        for layer in mask.layers:
            modules[layer.name].weight.copy_(layer.module.weight)
    torch.testing.assert_close(sparse(x), dense(x), rtol=1e-4, atol=1e-5)


def test_window_computes_dense_gradients_only_before_updates():
    sparse, mask, _, _, _ = sparse_and_reference(dense_momentum="window:3", steps_per_epoch=10)
    fc1 = next(l for l in mask.layers if l.name == "fc1")
    dense_steps, grads = [], {}
    for i, (x, t) in enumerate(batches(20)):
        step = i + 1
        if sparse.fc1._want_dense_grad:
            dense_steps.append(step)
        mask.optimizer.zero_grad()
        F.cross_entropy(sparse(x), t).backward()
        if sparse.fc1._dense_grad is not None:
            grads[step] = sparse.fc1._dense_grad.clone()
        mask.step()
        if step == 10:
            after_first_window = fc1.momentum.clone()
        if step % 10 == 0:
            mask.at_end_of_epoch()
    assert dense_steps == [8, 9, 10, 18, 19, 20]
    # The absent weights' momentum decays through the steps without the dense gradient
    # (applied lazily, as mu^k at the next window step) and accumulates inside the window.
    mu = 0.9
    want = mu**10 * after_first_window + mu**2 * grads[18] + mu * grads[19] + grads[20]
    torch.testing.assert_close(fc1.momentum, want, rtol=1e-5, atol=1e-7)


def test_first_epoch_learns_the_steps_per_epoch():
    sparse, mask, _, _, _ = sparse_and_reference(dense_momentum="window:2")
    for x, t in batches(7):
        assert sparse.fc1._want_dense_grad  # until the epoch's length is known
        sparse_step(sparse, mask, x, t)
    mask.at_end_of_epoch()
    assert mask.steps_per_epoch == 7
    flags = []
    for x, t in batches(7, seed=1):
        flags.append(sparse.fc1._want_dense_grad)
        sparse_step(sparse, mask, x, t)
    assert flags == [False] * 5 + [True] * 2


def test_cosine_decay_is_the_references():
    # The reference's CosineDecay: CosineAnnealingLR on a dummy optimiser.
    p = torch.zeros(1, requires_grad=True)
    dummy = torch.optim.SGD([p], lr=0.5)
    reference = torch.optim.lr_scheduler.CosineAnnealingLR(dummy, 300, 0.005)
    ours = CosineDecay(0.5, 300)
    for _ in range(300):
        dummy.step()
        reference.step()
        ours.step()
        assert ours.get_dr(0.5) == dummy.param_groups[0]["lr"]
    linear = LinearDecay(0.5, factor=0.5, frequency=2)
    for _ in range(4):
        linear.step()
    assert linear.get_dr() == 0.125


def test_modes_accept_the_references_spellings_and_refuse_missing_ones():
    opt = sgd([torch.zeros(1, requires_grad=True)])
    m = Masking(opt, None, redistribution_mode="nonzeros", growth_mode="momentum_neuron")
    assert (m.redistribution_mode, m.growth_mode) == ("nonzero", "momentum-neuron")
    assert Masking(opt, None, prune_mode="global_magnitude").prune_mode == "global-magnitude"
    with pytest.raises(ValueError, match="SET.*magnitude, global-magnitude"):
        Masking(opt, None, prune_mode="SET")
    with pytest.raises(ValueError, match="float32"):
        Masking(opt, None, fp16=True)
    with pytest.raises(ValueError, match="window:K"):
        Masking(opt, None, dense_momentum="window:0")
    with pytest.raises(ValueError, match="no nn.Linear"):
        Masking(opt, None).add_module(nn.ReLU(), density=0.1)


@pytest.mark.parametrize("growth", ["random", "gradient", "momentum-neuron", "none"])
def test_every_growth_mode_runs(growth):
    sparse, mask, _, _, _ = sparse_and_reference(growth_mode=growth)
    for x, t in batches(4):
        sparse_step(sparse, mask, x, t)
    report = mask.at_end_of_epoch()
    assert report["skipped"] == (growth == "none")
    x = torch.randn(2, 1, 6, 6)
    assert torch.isfinite(sparse(x)).all()


def test_masking_state_round_trips():
    sparse, mask, _, _, _ = sparse_and_reference(dense_momentum="window:2", steps_per_epoch=4)
    for x, t in batches(6):
        sparse_step(sparse, mask, x, t)
    state = mask.state_dict()
    model_state = copy.deepcopy(sparse.state_dict())
    opt_state = copy.deepcopy(mask.optimizer.state_dict())
    report_a = mask.at_end_of_epoch()

    torch.manual_seed(99)
    other = Net()
    opt = sgd(other.parameters())
    restored = Masking(opt, CosineDecay(0.5, 100), prune_rate=0.5, dense_momentum="window:2")
    restored.add_module(other, density=0.3)
    other.load_state_dict(model_state)
    opt.load_state_dict(opt_state)
    restored.load_state_dict(state)
    report_b = restored.at_end_of_epoch()
    assert [l["grown"] for l in report_a["layers"]] == [l["grown"] for l in report_b["layers"]]
    for a, b in zip(mask.layers, restored.layers):
        assert torch.equal(a.module.mask, b.module.mask)
