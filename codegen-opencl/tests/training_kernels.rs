//! The training kernels (`TrainingKernels`) against the host arithmetic they mirror: the
//! runtime's loss, ReLU/bias backward and SGD, written out here in plain Rust. Named edge
//! cases: a partial batch (`n < batch`), padding columns, ReLU at zero and NaN, a label past
//! the classes, an index past the source, and every length error before a launch.
#![cfg(feature = "opencl")]

mod common;

use codegen_opencl::{DeviceBuffer, IndexBuffer, OpenClBackend, SgdStep, TrainingKernels};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sparse_ir::backend::Backend;
use sparse_ir::BackendError;

fn setup() -> Option<(&'static OpenClBackend, TrainingKernels)> {
    let backend = common::backend()?;
    let kernels = TrainingKernels::new(backend).expect("the training program builds");
    Some((backend, kernels))
}

fn random(len: usize, rng: &mut ChaCha8Rng) -> Vec<f32> {
    (0..len).map(|_| rng.random_range(-2.0f32..2.0)).collect()
}

fn up(b: &OpenClBackend, data: &[f32]) -> DeviceBuffer {
    let mut buf = b.alloc(data.len()).unwrap();
    b.upload(data, &mut buf).unwrap();
    buf
}

fn up_indices(b: &OpenClBackend, data: &[u32]) -> IndexBuffer {
    let mut buf = b.alloc_indices(data.len()).unwrap();
    b.upload_indices(data, &mut buf).unwrap();
    buf
}

fn down(b: &OpenClBackend, buf: &DeviceBuffer) -> Vec<f32> {
    let mut out = vec![0.0; buf.len()];
    b.download(buf, &mut out).unwrap();
    out
}

fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let ok = (g.is_nan() && w.is_nan()) || (g - w).abs() <= tol * (1.0 + w.abs());
        assert!(ok, "{what}[{i}]: got {g}, want {w}");
    }
}

#[test]
fn relu_bias_grad_masks_and_sums_only_the_batch_columns() {
    let Some((b, k)) = setup() else { return };
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let (rows, batch, ld) = (37, 21, 32);
    let mut y = random(rows * ld, &mut rng);
    y[3] = 0.0; // exactly zero: masked
    y[ld + 4] = f32::NAN; // NaN: masked, as the host's `out > 0` select
    let dy = random(rows * ld, &mut rng);
    for relu in [false, true] {
        let mut want_dy = dy.clone();
        let mut want_bias = vec![0.0f32; rows];
        for (r, bias) in want_bias.iter_mut().enumerate() {
            for c in 0..batch {
                let i = r * ld + c;
                // NaN and ≤ 0 are inactive, as the host's `if out > 0.0` select.
                if relu && y[i].partial_cmp(&0.0) != Some(std::cmp::Ordering::Greater) {
                    want_dy[i] = 0.0;
                }
                *bias += want_dy[i];
            }
        }
        let y_d = up(b, &y);
        let mut dy_d = up(b, &dy);
        let mut bias_d = b.alloc(rows).unwrap();
        k.relu_bias_grad(rows, batch, ld, relu, &y_d, &mut dy_d, &mut bias_d)
            .unwrap();
        // Padding columns batch..ld are left as they were (`want_dy` keeps them too).
        assert_eq!(down(b, &dy_d), want_dy, "relu {relu}: dy");
        assert_close(
            &format!("relu {relu}: bias"),
            &down(b, &bias_d),
            &want_bias,
            1e-5,
        );
    }
}

#[test]
fn nll_grad_matches_the_host_loss_on_a_partial_batch() {
    let Some((b, k)) = setup() else { return };
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let (classes, batch, ld) = (10, 20, 32);
    for n in [1, 13, 20] {
        let logits = random(classes * ld, &mut rng);
        let labels: Vec<u32> = (0..batch)
            .map(|_| rng.random_range(0..classes as u32))
            .collect();
        let inv_n = 1.0 / n as f32;
        let mut want_grad = vec![7.0f32; classes * ld]; // padding columns stay untouched
        let mut want_loss = vec![0.0f32; n];
        for c in 0..batch {
            for r in 0..classes {
                want_grad[r * ld + c] = 0.0;
            }
            if c >= n {
                continue;
            }
            let col: Vec<f32> = (0..classes).map(|r| logits[r * ld + c]).collect();
            let m = col.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let lse = m + col.iter().map(|&z| (z - m).exp()).sum::<f32>().ln();
            for r in 0..classes {
                want_grad[r * ld + c] = (col[r] - lse).exp() * inv_n;
            }
            want_grad[labels[c] as usize * ld + c] -= inv_n;
            want_loss[c] = lse - col[labels[c] as usize];
        }
        let logits_d = up(b, &logits);
        let labels_d = up_indices(b, &labels);
        let mut grad_d = up(b, &vec![7.0; classes * ld]);
        let mut loss_d = b.alloc(batch).unwrap();
        k.nll_grad(
            classes,
            n,
            batch,
            ld,
            &logits_d,
            &labels_d,
            &mut grad_d,
            &mut loss_d,
        )
        .unwrap();
        assert_close(&format!("n {n}: grad"), &down(b, &grad_d), &want_grad, 1e-5);
        assert_close(
            &format!("n {n}: loss"),
            &down(b, &loss_d)[..n],
            &want_loss,
            1e-5,
        );
    }
}

#[test]
fn nll_grad_gives_nan_for_a_label_past_the_classes() {
    let Some((b, k)) = setup() else { return };
    let (classes, batch, ld) = (3, 2, 2);
    let logits = up(b, &[0.0; 6]);
    let labels = up_indices(b, &[1, 3]);
    let mut grad = b.alloc(6).unwrap();
    let mut loss = b.alloc(2).unwrap();
    k.nll_grad(
        classes, 2, batch, ld, &logits, &labels, &mut grad, &mut loss,
    )
    .unwrap();
    let loss = down(b, &loss);
    assert!((loss[0] - 3f32.ln()).abs() < 1e-6, "{loss:?}");
    assert!(loss[1].is_nan(), "{loss:?}");
}

#[test]
fn sgd_and_momentum_follow_the_host_update() {
    let Some((b, k)) = setup() else { return };
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let n = 1000;
    let (w, g, m) = (
        random(n, &mut rng),
        random(n, &mut rng),
        random(n, &mut rng),
    );
    for nesterov in [true, false] {
        let step = SgdStep {
            lr: 0.1,
            momentum: 0.9,
            weight_decay: 5e-4,
            nesterov,
        };
        let (mut want_w, mut want_m) = (w.clone(), m.clone());
        for i in 0..n {
            let gi = g[i] + step.weight_decay * want_w[i];
            want_m[i] = step.momentum * want_m[i] + gi;
            let delta = if nesterov {
                step.lr * (gi + step.momentum * want_m[i])
            } else {
                step.lr * want_m[i]
            };
            want_w[i] -= delta;
        }
        let (mut w_d, g_d, mut m_d) = (up(b, &w), up(b, &g), up(b, &m));
        k.sgd(step, &mut w_d, &g_d, &mut m_d).unwrap();
        // FP_CONTRACT is off and these are single roundings: the same bits as the host.
        assert_eq!(down(b, &w_d), want_w, "nesterov {nesterov}: w");
        assert_eq!(down(b, &m_d), want_m, "nesterov {nesterov}: momentum");
    }
    let factor = 0.9f32.powi(3);
    let want: Vec<f32> = m.iter().zip(&g).map(|(&m, &g)| factor * m + g).collect();
    let mut m_d = up(b, &m);
    k.momentum_accumulate(factor, &mut m_d, &up(b, &g)).unwrap();
    assert_eq!(down(b, &m_d), want);
}

#[test]
fn gather_reads_the_indexed_entries_and_nan_past_the_source() {
    let Some((b, k)) = setup() else { return };
    let src = up(b, &[10.0, 11.0, 12.0, 13.0]);
    let index = up_indices(b, &[3, 0, 0, 2, 4]);
    let mut dst = b.alloc(5).unwrap();
    k.gather(&src, &index, &mut dst).unwrap();
    let got = down(b, &dst);
    assert_eq!(&got[..4], &[13.0, 10.0, 10.0, 12.0]);
    assert!(got[4].is_nan());
}

#[test]
fn wrong_lengths_are_errors_before_any_launch() {
    let Some(shared) = common::backend() else {
        return;
    };
    // A backend of its own: the other tests launch on the shared one meanwhile.
    let b = &OpenClBackend::new(shared.info()).unwrap();
    let k = TrainingKernels::new(b).unwrap();
    let before = b.stats().launches;
    let f = |n| b.alloc(n).unwrap();
    let expect = |r: Result<(), BackendError>, needle: &str| {
        let e = r.expect_err(needle).to_string();
        assert!(e.contains(needle), "{e:?} lacks {needle:?}");
    };
    expect(
        k.relu_bias_grad(4, 3, 4, true, &f(15), &mut f(16), &mut f(4)),
        "y has 15 elements, needs at least 16",
    );
    expect(
        k.relu_bias_grad(4, 5, 4, true, &f(16), &mut f(16), &mut f(4)),
        "batch 5 > ld 4",
    );
    expect(
        k.relu_bias_grad(4, 3, 4, true, &f(16), &mut f(16), &mut f(3)),
        "bias_grad has 3 elements, expected 4",
    );
    let labels = up_indices(b, &[0, 1]);
    expect(
        k.nll_grad(3, 3, 2, 2, &f(6), &labels, &mut f(6), &mut f(2)),
        "3 valid columns of a batch of 2",
    );
    expect(
        k.nll_grad(3, 2, 2, 2, &f(6), &labels, &mut f(6), &mut f(1)),
        "loss has 1 elements, needs at least 2",
    );
    let step = SgdStep {
        lr: 0.1,
        momentum: 0.9,
        weight_decay: 0.0,
        nesterov: true,
    };
    expect(
        k.sgd(step, &mut f(5), &f(4), &mut f(5)),
        "grad has 4 elements, expected 5",
    );
    expect(
        k.momentum_accumulate(0.5, &mut f(5), &f(6)),
        "gradient has 6 elements, expected 5",
    );
    expect(
        k.gather(&f(5), &up_indices(b, &[0, 1]), &mut f(3)),
        "index has 2 elements, expected 3",
    );
    // A buffer of another backend (fresh ids) is refused too.
    let other = OpenClBackend::new(b.info()).unwrap();
    let foreign = other.alloc(5).unwrap();
    expect(
        k.sgd(step, &mut f(5), &foreign, &mut f(5)),
        "another OpenCL backend",
    );
    assert_eq!(b.stats().launches, before, "nothing was launched");
}
