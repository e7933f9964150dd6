//! Finite-difference checks of every layer's hand-written backward pass, and of the loss.
//!
//! A layer `y = f(x)` is checked through the scalar `L = Σ_{f,b<B} C[f,b]·y[f,b]` with random
//! `C` (so `∂L/∂y = C`): each input, weight and bias gradient is compared with the central
//! difference `(L(θ+ε) − L(θ−ε)) / 2ε`. Where a perturbation crosses a kink (ReLU, a max-pool
//! tie), the one-sided differences disagree and that coordinate is skipped; the test asserts
//! that only a few are.

#![allow(clippy::needless_range_loop)]

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use runtime::layers::{BatchNorm, Conv2d, Dropout, GlobalAvgPool, Layer, Linear, MaxPool2d, Relu};
use runtime::loss::LogSoftmaxNll;
use runtime::{ExecOptions, Executor, Matrix, ModelBuilder, Shape, WeightGradMode};
use sparse_ir::Pattern;

const EPS: f32 = 1e-2;

fn exec() -> Executor {
    Executor::new(ExecOptions::default()).unwrap()
}

fn random_matrix(rng: &mut ChaCha8Rng, rows: usize, batch: usize) -> Matrix {
    let mut m = Matrix::zeros(rows, batch);
    for f in 0..rows {
        for b in 0..batch {
            m.set(f, b, rng.random_range(-1.0..1.0));
        }
    }
    m
}

/// `Σ C·y` over the valid columns, in f64.
fn objective(layer: &mut dyn Layer, x: &Matrix, c: &Matrix) -> f64 {
    let mut y = Matrix::zeros(c.rows(), c.batch());
    layer.forward(x, &mut y).unwrap();
    let mut total = 0.0;
    for f in 0..c.rows() {
        for b in 0..c.batch() {
            total += c.get(f, b) as f64 * y.get(f, b) as f64;
        }
    }
    total
}

/// Compares an analytic derivative with the central difference of `eval` around a
/// coordinate set by `set(delta)`. Returns false if the coordinate sits on a kink.
struct Checker {
    checked: usize,
    skipped: usize,
    what: &'static str,
    eps: f32,
}

impl Checker {
    fn new(what: &'static str) -> Self {
        Checker {
            checked: 0,
            skipped: 0,
            what,
            eps: EPS,
        }
    }

    fn with_eps(what: &'static str, eps: f32) -> Self {
        Checker {
            eps,
            ..Checker::new(what)
        }
    }

    fn check(&mut self, label: String, analytic: f32, mut eval_at: impl FnMut(f32) -> f64) {
        let eps = self.eps;
        let (lp, l0, lm) = (eval_at(eps), eval_at(0.0), eval_at(-eps));
        let (right, left) = ((lp - l0) / eps as f64, (l0 - lm) / eps as f64);
        let scale = 1.0 + right.abs().max(left.abs());
        if (right - left).abs() > 1e-3 * scale {
            self.skipped += 1;
            return;
        }
        let fd = (lp - lm) / (2.0 * eps as f64);
        let err = (fd - analytic as f64).abs();
        assert!(
            err <= 2e-3 * (1.0 + fd.abs()),
            "{}: {label}: analytic {analytic}, finite difference {fd}",
            self.what
        );
        self.checked += 1;
    }

    fn finish(&self) {
        assert!(self.checked > 0, "{}: nothing checked", self.what);
        assert!(
            self.skipped * 10 <= self.checked,
            "{}: {} of {} coordinates sat on a kink",
            self.what,
            self.skipped,
            self.checked + self.skipped
        );
    }
}

/// Full finite-difference check of a layer: input gradient, and for layers with weights the
/// gradients of active entries (both modes), the dense gradient and the bias gradient.
fn check_layer(layer: Box<dyn Layer>, batch: usize, seed: u64, what: &'static str) {
    check_layer_with(layer, batch, seed, what, EPS)
}

/// [`check_layer`] with step `eps` (smaller for layers that curve strongly, such as batch
/// normalisation of a few values).
fn check_layer_with(
    mut layer: Box<dyn Layer>,
    batch: usize,
    seed: u64,
    what: &'static str,
    eps: f32,
) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let exec = exec();
    let n_in = layer.input_shape().features();
    let n_out = layer.output_shape().features();
    layer.set_needs_input_grad(true);
    layer.set_batch(batch, runtime::padded_ld(batch)).unwrap();
    if let Some(w) = layer.weights_mut() {
        w.compile(&exec).unwrap();
    }
    let x = random_matrix(&mut rng, n_in, batch);
    let c = random_matrix(&mut rng, n_out, batch);

    let mut y = Matrix::zeros(n_out, batch);
    layer.forward(&x, &mut y).unwrap();
    let mut dy = c.clone();
    let mut dx = Matrix::zeros(n_in, batch);
    layer
        .backward(&x, &y, &mut dy, Some(&mut dx), WeightGradMode::Dense)
        .unwrap();
    let has_weights = layer.weights().is_some();
    let (grad_dense_mode, dense_grad, bias_grad) = match layer.weights() {
        Some(w) => (
            w.grad().to_vec(),
            w.dense_grad().to_vec(),
            w.bias_grad().to_vec(),
        ),
        None => (vec![], vec![], vec![]),
    };
    if has_weights {
        // The active-only mode gives the same gradient of active entries (an SDDMM).
        let mut dy = c.clone();
        let mut dx2 = Matrix::zeros(n_in, batch);
        layer
            .backward(&x, &y, &mut dy, Some(&mut dx2), WeightGradMode::Active)
            .unwrap();
        let w = layer.weights().unwrap();
        assert!(!w.dense_grad_fresh());
        for (k, (&a, &d)) in w.grad().iter().zip(&grad_dense_mode).enumerate() {
            assert!(
                (a - d).abs() <= 1e-4 * (1.0 + d.abs()),
                "{what}: sddmm[{k}] {a} vs {d}"
            );
        }
        assert_eq!(
            dx.as_slice(),
            dx2.as_slice(),
            "{what}: dx depends on the mode"
        );
    }

    // Input gradient.
    let mut chk = Checker::with_eps(what, eps);
    for f in 0..n_in {
        for b in 0..batch {
            let base = x.get(f, b);
            chk.check(format!("dx[{f},{b}]"), dx.get(f, b), |d| {
                let mut xp = x.clone();
                xp.set(f, b, base + d);
                objective(layer.as_mut(), &xp, &c)
            });
        }
    }
    // Dense parameters (batch normalisation's scale and shift).
    let params: Vec<Vec<f32>> = layer.params().iter().map(|p| p.grad.clone()).collect();
    for (pi, grads) in params.iter().enumerate() {
        for (k, &g) in grads.iter().enumerate() {
            let base = layer.params()[pi].value[k];
            chk.check(format!("param{pi}[{k}]"), g, |d| {
                layer.params_mut()[pi].value[k] = base + d;
                let v = objective(layer.as_mut(), &x, &c);
                layer.params_mut()[pi].value[k] = base;
                v
            });
        }
    }
    if !has_weights {
        chk.finish();
        return;
    }

    // Active weights.
    let nnz = layer.weights().unwrap().nnz();
    assert!(nnz > 0, "{what}: test layer has no active weights");
    for k in 0..nnz {
        let base = layer.weights().unwrap().values()[k];
        chk.check(format!("dw[{k}]"), grad_dense_mode[k], |d| {
            layer.weights_mut().unwrap().values_mut()[k] = base + d;
            let v = objective(layer.as_mut(), &x, &c);
            layer.weights_mut().unwrap().values_mut()[k] = base;
            v
        });
    }
    // Bias.
    let rows = layer.weights().unwrap().rows();
    for r in 0..rows {
        let base = layer.weights().unwrap().bias()[r];
        chk.check(format!("db[{r}]"), bias_grad[r], |d| {
            layer.weights_mut().unwrap().bias_mut()[r] = base + d;
            let v = objective(layer.as_mut(), &x, &c);
            layer.weights_mut().unwrap().bias_mut()[r] = base;
            v
        });
    }
    // Dense gradient: the derivative with respect to every entry, masked ones included, is
    // that of the same function with the mask full and zeros at the masked entries.
    let w = layer.weights_mut().unwrap();
    w.sync_dense(&Default::default());
    let weight = w.dense_weight().to_vec();
    let mask = w.mask().to_vec();
    let cols = w.cols();
    let full = vec![1u8; mask.len()];
    w.set_dense(&weight, &full, None, None).unwrap();
    w.compile(&exec).unwrap();
    let mut inactive_checked = 0;
    for (i, &g) in dense_grad.iter().enumerate() {
        let k = i; // full mask: CSR order is row-major
        if mask[i] == 0 {
            inactive_checked += 1;
        }
        let base = layer.weights().unwrap().values()[k];
        chk.check(format!("dense_grad[{},{}]", i / cols, i % cols), g, |d| {
            layer.weights_mut().unwrap().values_mut()[k] = base + d;
            let v = objective(layer.as_mut(), &x, &c);
            layer.weights_mut().unwrap().values_mut()[k] = base;
            v
        });
    }
    assert!(
        inactive_checked > 0,
        "{what}: no masked entry in the test layer"
    );
    chk.finish();
}

fn sparse<L: Layer + 'static>(mut layer: L, seed: u64, density: f64) -> Box<dyn Layer> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let w = layer.weights_mut().unwrap();
    let size = w.rows() * w.cols();
    let weight: Vec<f32> = (0..size).map(|_| rng.random_range(-1.0..1.0)).collect();
    let bias: Vec<f32> = (0..w.rows()).map(|_| rng.random_range(-0.5..0.5)).collect();
    let mask = Pattern::random(w.rows(), w.cols(), density, rng.random())
        .unwrap()
        .to_dense_mask();
    w.set_dense(&weight, &mask, Some(&bias), None).unwrap();
    Box::new(layer)
}

#[test]
fn linear_gradients() {
    for batch in [1, 3, 17] {
        let l = Linear::new("fc", Shape::flat(7), 5).unwrap();
        check_layer(sparse(l, 1, 0.5), batch, 11, "linear");
    }
}

#[test]
fn linear_relu_gradients() {
    let mut l = Linear::new("fc", Shape::flat(9), 6).unwrap();
    assert!(l.fuse_relu());
    assert!(!l.fuse_relu(), "a second relu is not fused");
    check_layer(sparse(l, 2, 0.6), 3, 12, "linear+relu");
}

#[test]
fn conv_gradients() {
    let c = Conv2d::new("conv", Shape::image(2, 6, 5), 3, 3, 1, 0).unwrap();
    check_layer(sparse(c, 3, 0.5), 3, 13, "conv");
    let mut c = Conv2d::new("conv", Shape::image(2, 6, 6), 4, 3, 2, 1).unwrap();
    c.fuse_relu();
    check_layer(sparse(c, 4, 0.4), 2, 14, "conv stride 2 padding 1 + relu");
}

#[test]
fn relu_gradients() {
    check_layer(Box::new(Relu::new("relu", Shape::flat(11))), 5, 15, "relu");
}

#[test]
fn max_pool_gradients() {
    let p = MaxPool2d::new("pool", Shape::image(3, 4, 5), 2).unwrap();
    assert_eq!(p.output_shape(), Shape::image(3, 2, 2));
    check_layer(Box::new(p), 3, 16, "max-pool");
}

#[test]
fn batch_norm_gradients() {
    // 2-D, training mode: the batch statistics depend on every input.
    let mut bn = BatchNorm::new("bn", Shape::image(3, 2, 3));
    bn.params_mut()[0].value.copy_from_slice(&[1.5, -0.7, 0.9]);
    bn.params_mut()[1].value.copy_from_slice(&[0.2, -0.1, 0.3]);
    check_layer_with(Box::new(bn), 4, 17, "batch-norm 2-d", 1e-3);
    // 1-D with a fused ReLU, at batch 5.
    let mut bn = BatchNorm::new("bn", Shape::flat(4));
    assert!(bn.fuse_relu() && !bn.fuse_relu());
    bn.params_mut()[1]
        .value
        .copy_from_slice(&[0.3, -0.2, 0.1, 0.0]);
    check_layer_with(Box::new(bn), 5, 18, "batch-norm 1-d + relu", 1e-3);
    // With a fused ReLU and dropout, over 2 threads (channels split between them).
    let mut bn = BatchNorm::new("bn", Shape::image(3, 2, 3));
    assert!(bn.fuse_relu());
    bn.fuse_dropout("drop", 0.4).unwrap();
    assert!(bn.fuse_dropout("drop", 0.4).is_err(), "one dropout");
    bn.set_threads(2);
    bn.set_step_key(5);
    check_layer_with(Box::new(bn), 6, 22, "batch-norm + relu + dropout", 1e-3);
    // Evaluation mode: an affine map by the running statistics.
    let mut bn = BatchNorm::new("bn", Shape::image(2, 2, 2));
    bn.stats_mut()[0].value.copy_from_slice(&[0.5, -1.0]);
    bn.stats_mut()[1].value.copy_from_slice(&[2.0, 0.25]);
    bn.set_training(false);
    check_layer(Box::new(bn), 3, 19, "batch-norm evaluation");
}

#[test]
fn batch_norm_normalises_and_tracks_running_statistics() {
    let mut rng = ChaCha8Rng::seed_from_u64(30);
    let (batch, n) = (6, 4);
    let mut bn = BatchNorm::new("bn", Shape::image(2, 3, 3));
    bn.set_batch(batch, runtime::padded_ld(batch)).unwrap();
    bn.set_valid(n);
    let mut x = random_matrix(&mut rng, 18, batch);
    for f in 0..18 {
        for b in n..batch {
            x.set(f, b, 1e6); // invalid samples: must not count
        }
    }
    let mut y = Matrix::zeros(18, batch);
    bn.forward(&x, &mut y).unwrap();
    for c in 0..2 {
        let v: Vec<f64> = (c * 9..(c + 1) * 9)
            .flat_map(|f| (0..n).map(move |b| (f, b)))
            .map(|(f, b)| y.get(f, b) as f64)
            .collect();
        let mean = v.iter().sum::<f64>() / v.len() as f64;
        let var = v.iter().map(|a| (a - mean).powi(2)).sum::<f64>() / v.len() as f64;
        assert!(
            mean.abs() < 1e-5 && (var - 1.0).abs() < 1e-3,
            "channel {c}: {mean} {var}"
        );
        // PyTorch's update: 0.9·old + 0.1·batch (unbiased variance for the running one).
        let xs: Vec<f64> = (c * 9..(c + 1) * 9)
            .flat_map(|f| (0..n).map(move |b| (f, b)))
            .map(|(f, b)| x.get(f, b) as f64)
            .collect();
        let m = xs.iter().sum::<f64>() / xs.len() as f64;
        let uv = xs.iter().map(|a| (a - m).powi(2)).sum::<f64>() / (xs.len() - 1) as f64;
        let rm = bn.stats()[0].value[c] as f64;
        let rv = bn.stats()[1].value[c] as f64;
        assert!(
            (rm - 0.1 * m).abs() < 1e-5,
            "running mean {rm} vs {}",
            0.1 * m
        );
        assert!((rv - (0.9 + 0.1 * uv)).abs() < 1e-5, "running var {rv}");
    }
    for f in 0..18 {
        for b in n..batch {
            assert_eq!(y.get(f, b), 0.0, "invalid column {b} is written zero");
        }
    }
    assert_eq!(bn.stats()[0].name, "bn.running_mean");
    assert_eq!(bn.params()[1].name, "bn.bias");
}

#[test]
fn dropout_gradients_and_rate() {
    let mut d = Dropout::new("drop", Shape::flat(40), 0.3).unwrap();
    d.set_step_key(99);
    check_layer(Box::new(d), 5, 20, "dropout");
    // About 30 % dropped, the rest scaled by 1/0.7; another key drops others; evaluation is
    // the identity.
    let mut d = Dropout::new("drop", Shape::flat(1000), 0.3).unwrap();
    d.set_batch(8, runtime::padded_ld(8)).unwrap();
    let mut x = Matrix::zeros(1000, 8);
    for f in 0..1000 {
        for b in 0..8 {
            x.set(f, b, 1.0);
        }
    }
    let run = |d: &mut Dropout, key: u64| {
        d.set_step_key(key);
        let mut y = Matrix::zeros(1000, 8);
        d.forward(&x, &mut y).unwrap();
        y
    };
    let y1 = run(&mut d, 1);
    let dropped = (0..1000)
        .flat_map(|f| (0..8).map(move |b| (f, b)))
        .filter(|&(f, b)| y1.get(f, b) == 0.0)
        .count();
    assert!((2200..2600).contains(&dropped), "{dropped} of 8000 dropped");
    assert!((0..1000).all(|f| (0..8).all(|b| [0.0, 1.0 / 0.7].contains(&y1.get(f, b)))));
    assert_eq!(run(&mut d, 1).as_slice(), y1.as_slice());
    assert_ne!(run(&mut d, 2).as_slice(), y1.as_slice());
    d.set_training(false);
    assert_eq!(run(&mut d, 1).as_slice(), x.as_slice());
    assert!(Dropout::new("drop", Shape::flat(3), 1.0).is_err());
}

/// Batch normalisation with a fused ReLU and dropout gives what the three layers give one
/// after the other, the same entries dropped, on 1 and 3 threads.
#[test]
fn fused_dropout_matches_the_separate_layers() {
    let mut rng = ChaCha8Rng::seed_from_u64(40);
    let (shape, batch) = (Shape::image(5, 3, 3), 7);
    let ld = runtime::padded_ld(batch);
    let x = random_matrix(&mut rng, 45, batch);
    let mut plain = BatchNorm::new("bn", shape);
    plain.fuse_relu();
    let mut drop = Dropout::new("drop", shape, 0.3).unwrap();
    for l in [&mut plain as &mut dyn Layer, &mut drop] {
        l.set_batch(batch, ld).unwrap();
        l.set_step_key(11);
    }
    let (mut h, mut want) = (Matrix::zeros(45, batch), Matrix::zeros(45, batch));
    plain.forward(&x, &mut h).unwrap();
    drop.forward(&h, &mut want).unwrap();
    assert!(want.as_slice().iter().filter(|&&v| v == 0.0).count() > want.as_slice().len() / 2);
    for threads in [1, 3] {
        let mut fused = BatchNorm::new("bn", shape);
        fused.fuse_relu();
        fused.fuse_dropout("drop", 0.3).unwrap();
        fused.set_threads(threads);
        fused.set_batch(batch, ld).unwrap();
        fused.set_step_key(11);
        let mut got = Matrix::zeros(45, batch);
        fused.forward(&x, &mut got).unwrap();
        assert_eq!(got.as_slice(), want.as_slice(), "{threads} threads");
    }
}

#[test]
fn global_avg_pool_gradients() {
    let p = GlobalAvgPool::new("gap", Shape::image(3, 2, 3));
    assert_eq!(p.output_shape(), Shape::flat(3));
    check_layer(Box::new(p), 4, 21, "global average pool");
}

/// A small pre-activation residual network (batch norm with fused ReLU, a residual block
/// with a 1×1 shortcut convolution, one with the identity, dropout, global pooling): finite
/// differences through every layer and the loss, on 3 valid samples of a batch of 4 (the
/// fourth column zero, as a last partial batch leaves it) with NaN in the padding columns.
#[test]
fn residual_model_gradients_end_to_end() {
    let mut rng = ChaCha8Rng::seed_from_u64(23);
    let (batch, n) = (4, 3);
    let mut b = ModelBuilder::new("wrn", Shape::image(2, 6, 6)).conv2d_with("conv1", 3, 3, 1, 1);
    // Block 1: 3 -> 4 channels, stride 2, shortcut convolution.
    b = b.batch_norm("b1.bn1").relu();
    let o = b.tap();
    b = b
        .conv2d_with("b1.conv1", 4, 3, 2, 1)
        .batch_norm("b1.bn2")
        .relu()
        .dropout("b1.drop", 0.25)
        .conv2d_with("b1.conv2", 4, 3, 1, 1);
    let main = b.tap();
    b = b
        .from(o)
        .conv2d_with("b1.shortcut", 4, 1, 2, 0)
        .add_residual(main);
    // Block 2: identity shortcut.
    let x = b.tap();
    b = b
        .batch_norm("b2.bn1")
        .relu()
        .conv2d_with("b2.conv1", 4, 3, 1, 1)
        .batch_norm("b2.bn2")
        .relu()
        .conv2d_with("b2.conv2", 4, 3, 1, 1)
        .add_residual(x)
        .batch_norm("bn")
        .relu()
        .global_avg_pool()
        .linear("fc", 3);
    let mut model = b.build(batch, &mut rng).unwrap();
    model.set_step_key(7);
    let mut mrng = ChaCha8Rng::seed_from_u64(24);
    for w in model.sparse_layers_mut() {
        let mask = Pattern::random(w.rows(), w.cols(), 0.7, mrng.random())
            .unwrap()
            .to_dense_mask();
        w.sync_dense(&Default::default());
        let weight = w.dense_weight().to_vec();
        w.set_dense(&weight, &mask, None, None).unwrap();
    }
    for p in model.dense_params_mut() {
        for v in &mut p.value {
            *v += mrng.random_range(-0.3..0.3);
        }
    }
    model.compile(&exec()).unwrap();
    let ld = model.ld();
    for f in 0..72 {
        for b in 0..ld {
            let v = match b {
                _ if b < n => mrng.random_range(-2.0..2.0),
                _ if b < batch => 0.0,
                _ => f32::NAN,
            };
            model.input_mut().set(f, b, v);
        }
    }
    model.labels_mut().copy_from_slice(&[0, 2, 1, 0]);
    let loss = model.forward_backward(n, WeightGradMode::Dense).unwrap();
    assert!(loss.is_finite());
    let weight_grads: Vec<(String, Vec<f32>, Vec<f32>)> = model
        .sparse_layers()
        .map(|w| {
            (
                w.name().to_string(),
                w.grad().to_vec(),
                w.bias_grad().to_vec(),
            )
        })
        .collect();
    assert_eq!(weight_grads.len(), 7);
    let param_grads: Vec<Vec<f32>> = model.dense_params().map(|p| p.grad.clone()).collect();
    assert_eq!(param_grads.len(), 10, "5 batch norms, weight and bias each");
    let mut chk = Checker::with_eps("residual model", 1e-3);
    let loss_at = |model: &mut runtime::Model| model.evaluate_batch(n).unwrap().0 / n as f64;
    for (name, g, bg) in &weight_grads {
        for k in (0..g.len()).step_by(g.len().div_ceil(8).max(1)) {
            let base = model.sparse_layer_mut(name).unwrap().values()[k];
            chk.check(format!("{name}.w[{k}]"), g[k], |d| {
                model.sparse_layer_mut(name).unwrap().values_mut()[k] = base + d;
                let v = loss_at(&mut model);
                model.sparse_layer_mut(name).unwrap().values_mut()[k] = base;
                v
            });
        }
        let base = model.sparse_layer_mut(name).unwrap().bias()[0];
        chk.check(format!("{name}.b[0]"), bg[0], |d| {
            model.sparse_layer_mut(name).unwrap().bias_mut()[0] = base + d;
            let v = loss_at(&mut model);
            model.sparse_layer_mut(name).unwrap().bias_mut()[0] = base;
            v
        });
    }
    for (pi, g) in param_grads.iter().enumerate() {
        for (k, &gk) in g.iter().enumerate() {
            fn param(m: &mut runtime::Model, pi: usize, k: usize) -> &mut f32 {
                &mut m.dense_params_mut().nth(pi).unwrap().value[k]
            }
            let base = *param(&mut model, pi, k);
            chk.check(format!("param{pi}[{k}]"), gk, |d| {
                *param(&mut model, pi, k) = base + d;
                let v = loss_at(&mut model);
                *param(&mut model, pi, k) = base;
                v
            });
        }
    }
    chk.finish();
}

#[test]
fn loss_gradient() {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let (classes, batch, n) = (6, 7, 5);
    let logits = random_matrix(&mut rng, classes, batch);
    let labels: Vec<u32> = (0..batch)
        .map(|_| rng.random_range(0..classes as u32))
        .collect();
    let mut loss = LogSoftmaxNll::new(classes, logits.ld());
    let mut grad = Matrix::zeros(classes, batch);
    let l0 = loss.loss_and_grad(&logits, &labels, n, &mut grad).unwrap();
    // By hand for one column.
    let b = 1;
    let lse = (0..classes)
        .map(|c| (logits.get(c, b) as f64).exp())
        .sum::<f64>()
        .ln();
    let mut want = 0.0;
    for bb in 0..n {
        let lse = (0..classes)
            .map(|c| (logits.get(c, bb) as f64).exp())
            .sum::<f64>()
            .ln();
        want += lse - logits.get(labels[bb] as usize, bb) as f64;
    }
    assert!(
        (l0 - want / n as f64).abs() < 1e-5,
        "{l0} vs {}",
        want / n as f64
    );
    assert!(lse.is_finite());
    let mut chk = Checker::new("log-softmax + nll");
    for c in 0..classes {
        for b in 0..batch {
            let base = logits.get(c, b);
            chk.check(format!("dz[{c},{b}]"), grad.get(c, b), |d| {
                let mut z = logits.clone();
                z.set(c, b, base + d);
                loss.loss(&z, &labels, n).unwrap()
            });
            if b >= n {
                assert_eq!(grad.get(c, b), 0.0, "columns past n carry no gradient");
            }
        }
    }
    chk.finish();
    assert_eq!(loss.correct(&logits, &labels, n), {
        (0..n)
            .filter(|&b| {
                let best = (0..classes)
                    .max_by(|&i, &j| {
                        logits
                            .get(i, b)
                            .total_cmp(&logits.get(j, b))
                            .then(j.cmp(&i))
                    })
                    .unwrap();
                best == labels[b] as usize
            })
            .count()
    });
}

#[test]
fn bad_labels_and_shapes_are_errors() {
    let logits = Matrix::zeros(3, 2);
    let mut loss = LogSoftmaxNll::new(3, logits.ld());
    let e = loss.loss(&logits, &[0, 3], 2).unwrap_err().to_string();
    assert!(e.contains("label 3 of sample 1"), "{e}");
    let mut l = Linear::new("fc9", Shape::flat(4), 2).unwrap();
    l.set_batch(2, 16).unwrap();
    l.weights_mut().unwrap().compile(&exec()).unwrap();
    let e = l
        .forward(&Matrix::zeros(5, 2), &mut Matrix::zeros(2, 2))
        .unwrap_err()
        .to_string();
    assert!(e.contains("layer fc9: input is 5x2"), "{e}");
}

/// The whole model: a small CNN, finite differences through every layer and the loss, with
/// garbage (NaN) in the input's padding columns, which must not reach anything.
#[test]
fn model_gradients_end_to_end() {
    let mut rng = ChaCha8Rng::seed_from_u64(21);
    let batch = 3;
    let mut model = ModelBuilder::new("cnn", Shape::image(1, 8, 8))
        .conv2d("conv1", 3, 3)
        .relu()
        .max_pool(2)
        .conv2d("conv2", 4, 2)
        .relu()
        .linear("fc3", 6)
        .relu()
        .linear("fc4", 3)
        .build(batch, &mut rng)
        .unwrap();
    let mut mrng = ChaCha8Rng::seed_from_u64(22);
    for w in model.sparse_layers_mut() {
        let mask = Pattern::random(w.rows(), w.cols(), 0.7, mrng.random())
            .unwrap()
            .to_dense_mask();
        w.sync_dense(&Default::default());
        let weight = w.dense_weight().to_vec();
        w.set_dense(&weight, &mask, None, None).unwrap();
    }
    let exec = exec();
    let report = model.compile(&exec).unwrap();
    assert_eq!(report.layers.len(), 4);
    assert_eq!(
        model.compile(&exec).unwrap().layers.len(),
        0,
        "nothing changed"
    );
    let ld = model.ld();
    for f in 0..64 {
        for b in 0..ld {
            let v = if b < batch {
                mrng.random_range(-2.0..2.0)
            } else {
                f32::NAN
            };
            model.input_mut().set(f, b, v);
        }
    }
    model.labels_mut().copy_from_slice(&[0, 2, 1]);
    let loss = model
        .forward_backward(batch, WeightGradMode::Dense)
        .unwrap();
    assert!(loss.is_finite());
    let grads: Vec<(Vec<f32>, Vec<f32>)> = model
        .sparse_layers()
        .map(|w| (w.grad().to_vec(), w.bias_grad().to_vec()))
        .collect();
    for (g, bg) in &grads {
        assert!(g.iter().chain(bg).all(|v| v.is_finite()));
    }
    let names: Vec<String> = model
        .sparse_layers()
        .map(|w| w.name().to_string())
        .collect();
    let mut chk = Checker::with_eps("model", 1e-3);
    for (li, name) in names.iter().enumerate() {
        let nnz = grads[li].0.len();
        for k in (0..nnz).step_by(nnz.div_ceil(12).max(1)) {
            let base = model.sparse_layer_mut(name).unwrap().values()[k];
            chk.check(format!("{name}.w[{k}]"), grads[li].0[k], |d| {
                model.sparse_layer_mut(name).unwrap().values_mut()[k] = base + d;
                let (sum, _) = model.evaluate_batch(batch).unwrap();
                model.sparse_layer_mut(name).unwrap().values_mut()[k] = base;
                sum / batch as f64
            });
        }
        let rows = grads[li].1.len();
        for r in 0..rows.min(3) {
            let base = model.sparse_layer_mut(name).unwrap().bias()[r];
            chk.check(format!("{name}.b[{r}]"), grads[li].1[r], |d| {
                model.sparse_layer_mut(name).unwrap().bias_mut()[r] = base + d;
                let (sum, _) = model.evaluate_batch(batch).unwrap();
                model.sparse_layer_mut(name).unwrap().bias_mut()[r] = base;
                sum / batch as f64
            });
        }
    }
    chk.finish();
}

/// After many training passes over one batch, the running statistics are that batch's, and
/// evaluation mode gives (nearly) the training-mode logits: the running statistics are used
/// in evaluation, and only there.
#[test]
fn evaluation_mode_uses_the_running_statistics() {
    let mut rng = ChaCha8Rng::seed_from_u64(31);
    let batch = 64;
    let mut b = ModelBuilder::new("wrn", Shape::image(3, 8, 8)).conv2d_with("conv1", 4, 3, 1, 1);
    let x = b.tap();
    b = b
        .batch_norm("bn1")
        .relu()
        .conv2d_with("conv2", 4, 3, 1, 1)
        .add_residual(x)
        .batch_norm("bn2")
        .relu()
        .global_avg_pool()
        .linear("fc", 5);
    let mut model = b.build(batch, &mut rng).unwrap();
    model.compile(&exec()).unwrap();
    for f in 0..192 {
        for b in 0..batch {
            model.input_mut().set(f, b, rng.random_range(-1.0..3.0));
        }
    }
    for _ in 0..200 {
        model.forward().unwrap();
    }
    let train = model.forward().unwrap().clone();
    model.set_training(false);
    let eval = model.forward().unwrap().clone();
    let mut worst = 0f32;
    for f in 0..5 {
        for b in 0..batch {
            worst = worst.max((train.get(f, b) - eval.get(f, b)).abs());
        }
    }
    // The running variance is the unbiased one (×64·64/(64·64−1) for bn1): a small gap.
    assert!(worst < 1e-2, "largest logit difference {worst}");
    model.set_training(true);
    let fresh = model.forward().unwrap().clone();
    assert_eq!(fresh.as_slice(), train.as_slice());
}
