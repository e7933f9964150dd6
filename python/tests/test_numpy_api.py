"""The numpy-level API against the interpreter (the oracle every backend is tested against)."""

import numpy as np
import pytest

import sparsejit

MATRIX_OPS = ["spmm", "spmm_t", "sddmm", "dense_grad"]
CONV_OPS = ["conv", "conv_t", "conv_grad", "conv_dense_grad"]


def operands(kernel_op, pattern, batch, rng, fin, fout):
    values = rng.standard_normal(pattern.nnz).astype(np.float32)
    x = rng.standard_normal((fin, batch)).astype(np.float32)
    dy = rng.standard_normal((fout, batch)).astype(np.float32)
    if kernel_op in ("spmm", "conv"):
        return (values, x)
    if kernel_op in ("spmm_t", "conv_t"):
        return (values, dy)
    return (dy, x)


@pytest.mark.parametrize("op", MATRIX_OPS)
@pytest.mark.parametrize("strategy", ["auto", "jit", "generic", "dense"])
@pytest.mark.parametrize("batch", [1, 3, 17])
def test_matrix_ops_match_the_interpreter(op, strategy, batch):
    rng = np.random.default_rng(batch)
    mask = rng.random((13, 29)) < 0.3
    mask[4] = False  # an empty row
    mask[:, 7] = False  # an empty column
    pattern = sparsejit.Pattern(mask)
    args = operands(op, pattern, batch, rng, 29, 13)
    if (op, strategy) == ("dense_grad", "jit"):
        with pytest.raises(ValueError, match="no pattern to bake in"):
            sparsejit.compile(pattern, op, batch, strategy=strategy)
        return
    got = sparsejit.compile(pattern, op, batch, strategy=strategy)(*args)
    want = sparsejit.compile(pattern, op, batch, backend="reference")(*args)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("op", CONV_OPS)
@pytest.mark.parametrize("stride,padding,k", [(1, 0, 1), (1, 1, 3), (2, 1, 3), (2, 0, 3)])
def test_conv_ops_match_the_interpreter(op, stride, padding, k):
    rng = np.random.default_rng(k * 10 + stride)
    out_c, in_c, h, w, batch = 6, 4, 9, 7, 3
    mask = rng.random((out_c, in_c, k, k)) < 0.4
    mask[2] = False  # an empty output channel
    mask[:, 1] = False  # an empty input channel
    pattern = sparsejit.Pattern(mask)
    assert (pattern.rows, pattern.cols) == (out_c, in_c * k * k)
    oh, ow = (h + 2 * padding - k) // stride + 1, (w + 2 * padding - k) // stride + 1
    geometry = dict(input_size=(h, w), kernel_size=k, stride=stride, padding=padding)
    args = operands(op, pattern, batch, rng, in_c * h * w, out_c * oh * ow)
    got = sparsejit.compile(pattern, op, batch, **geometry)(*args)
    want = sparsejit.compile(pattern, op, batch, backend="reference", **geometry)(*args)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_spmm_with_bias_and_relu_against_numpy():
    rng = np.random.default_rng(1)
    mask = rng.random((8, 5)) < 0.5
    pattern = sparsejit.Pattern(mask.astype(np.float32))
    values = rng.standard_normal(pattern.nnz).astype(np.float32)
    bias = rng.standard_normal(8).astype(np.float32)
    x = rng.standard_normal((5, 4)).astype(np.float32)
    kernel = sparsejit.compile(pattern, "spmm", 4, bias=True, relu=True)
    dense = np.zeros(8 * 5, np.float32)
    dense[np.flatnonzero(mask)] = values  # values follow the mask's row-major nonzeros
    want = np.maximum(dense.reshape(8, 5) @ x + bias[:, None], 0)
    np.testing.assert_allclose(kernel(values, x, bias=bias), want, rtol=1e-5, atol=1e-6)
    assert kernel.op == "spmm" and kernel.batch == 4


def test_pattern_round_trips_its_mask():
    mask = np.eye(4, 6, dtype=bool)
    p = sparsejit.Pattern(mask)
    assert p.nnz == 4 and p.density == pytest.approx(4 / 24)
    np.testing.assert_array_equal(p.to_mask(), mask.astype(np.uint8))
    np.testing.assert_array_equal(p.row_ptr, [0, 1, 2, 3, 4])
    assert p == sparsejit.Pattern(mask.astype(np.int32))
    r = sparsejit.Pattern.random(30, 40, 0.1, seed=3)
    assert r == sparsejit.Pattern.random(30, 40, 0.1, seed=3)


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="only 0 and 1"):
        sparsejit.Pattern(np.array([[0, 2], [1, 0]]))
    with pytest.raises(ValueError, match="two dimensions"):
        sparsejit.Pattern(np.ones(3))
    p = sparsejit.Pattern(np.ones((3, 4)))
    with pytest.raises(ValueError, match="unknown op"):
        sparsejit.compile(p, "spmv", 2)
    k = sparsejit.compile(p, "spmm", 2)
    values = np.ones(12, np.float32)
    with pytest.raises(TypeError, match="float32"):
        k(values, np.ones((4, 2)))  # float64
    with pytest.raises(ValueError, match="expected 4 features"):
        k(values, np.ones((5, 2), np.float32))
    with pytest.raises(ValueError, match="C-contiguous"):
        k(values, np.ones((2, 4), np.float32).T)
    with pytest.raises(ValueError, match="values has 3 elements"):
        k(np.ones(3, np.float32), np.ones((4, 2), np.float32))
    with pytest.raises(ValueError, match="density"):
        sparsejit.Pattern.random(3, 3, 1.5)
    with pytest.raises(ValueError, match="at least 1"):
        sparsejit.set_num_threads(0)


def test_threads_do_not_change_results():
    rng = np.random.default_rng(5)
    p = sparsejit.Pattern(rng.random((64, 48)) < 0.2)
    values = rng.standard_normal(p.nnz).astype(np.float32)
    x = rng.standard_normal((48, 33)).astype(np.float32)
    before = sparsejit.get_num_threads()
    try:
        sparsejit.set_num_threads(1)
        one = sparsejit.compile(p, "spmm", 33, strategy="generic")(values, x)
        sparsejit.set_num_threads(2)
        assert sparsejit.get_num_threads() == 2
        two = sparsejit.compile(p, "spmm", 33, strategy="generic")(values, x)
    finally:
        sparsejit.set_num_threads(before)
    np.testing.assert_allclose(one, two, rtol=1e-6)


def test_kernel_dump_returns_what_the_command_prints():
    text = sparsejit.kernel_dump(
        "--random", "8x6", "--density", "0.5", "--op", "spmm", "--emit", "ir", "--emit", "stats"
    )
    assert ";; ===== random.sir =====" in text
    assert "pattern random 8x6" in text
    mask = np.zeros((3, 2, 3, 3), bool)
    mask[0, 1, 1, 1] = mask[2, 0, 0, 2] = True
    conv = sparsejit.kernel_dump(
        "--input", "5x5", "--padding", "1", "--op", "conv", "--emit", "ir", mask=mask
    )
    assert "input=2x5x5 kernel=3" in conv and "nnz=2" in conv
    with pytest.raises(ValueError, match="--emit"):
        sparsejit.kernel_dump("--random", "4x4", "--density", "0.5", "--emit", "nonsense")
