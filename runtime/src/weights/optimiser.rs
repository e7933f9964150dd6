//! [`SgdState`]: what an SGD step reads and writes beside the parameters (the gradients of
//! the last backward pass, the momentum buffers and the lazily applied decay of the momentum
//! of inactive entries), generic over where its buffers live, so that the host step and the
//! OpenCL device step share one implementation of the step's order and bookkeeping.

use std::convert::Infallible;

use super::WeightGradMode;

/// Hyper-parameters of SGD with (Nesterov) momentum and weight decay.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SgdConfig {
    /// Momentum μ (0.9).
    pub momentum: f32,
    /// Weight decay λ (5e-4), applied to weights and biases.
    pub weight_decay: f32,
    /// Nesterov momentum (true).
    pub nesterov: bool,
}

impl Default for SgdConfig {
    fn default() -> Self {
        SgdConfig {
            momentum: 0.9,
            weight_decay: 5e-4,
            nesterov: true,
        }
    }
}

/// The bookkeeping of the dense momentum's lazy decay (see the [module](super) documentation):
/// a step without the dense gradient leaves the momentum of inactive entries to decay,
/// `buf = μ·buf`, which is deferred and applied as one factor `μ^k` at the next step with the
/// dense gradient ([`on_step`](Self::on_step)) or when the host needs the dense momentum
/// complete ([`take_pending`](Self::take_pending)). The only implementation of this rule; the
/// host step and the device step both go through it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct LazyDecay {
    /// Steps whose decay of the dense momentum is pending.
    pending_steps: u32,
    /// Whether the last backward pass computed the dense gradient.
    dense_grad_fresh: bool,
}

impl LazyDecay {
    /// Records which weight gradient a backward pass computed.
    pub(crate) fn record_backward(&mut self, mode: WeightGradMode) {
        self.dense_grad_fresh = mode == WeightGradMode::Dense;
    }

    /// Whether the last backward pass computed the dense gradient.
    pub(crate) fn dense_grad_fresh(&self) -> bool {
        self.dense_grad_fresh
    }

    /// The bookkeeping of one SGD step. After a dense backward pass, `accumulate(factor)` must
    /// apply `buf = factor·buf + g` to the dense momentum, with `factor = μ^(k+1)` taking the
    /// `k` pending decays along, and nothing stays pending; otherwise the step's decay is
    /// deferred. A failed `accumulate` leaves the bookkeeping as it was.
    pub(crate) fn on_step<E>(
        &mut self,
        mu: f32,
        accumulate: impl FnOnce(f32) -> Result<(), E>,
    ) -> Result<(), E> {
        if self.dense_grad_fresh {
            accumulate(mu.powi(self.pending_steps as i32 + 1))?;
            self.pending_steps = 0;
        } else {
            self.pending_steps += 1;
        }
        Ok(())
    }

    /// The factor `μ^k` of the `k` pending decays, which the caller applies to the dense
    /// momentum now; nothing is pending afterwards. `None` when nothing was pending.
    pub(crate) fn take_pending(&mut self, mu: f32) -> Option<f32> {
        (self.pending_steps > 0).then(|| {
            let factor = mu.powi(self.pending_steps as i32);
            self.pending_steps = 0;
            factor
        })
    }

    /// Nothing pending and no fresh dense gradient (after the buffers were replaced).
    pub(crate) fn reset(&mut self) {
        *self = LazyDecay::default();
    }
}

/// The arithmetic of an SGD step on buffers of type `B`: host slices or device buffers.
pub(crate) trait SgdArithmetic<B> {
    /// What a failed operation reports.
    type Error;

    /// `g' = g + λ·w`, `buf = μ·buf + g'`, then `w = w − lr·(g' + μ·buf)` (Nesterov) or
    /// `w = w − lr·buf`, elementwise.
    fn sgd(&self, w: &mut B, grad: &B, buf: &mut B) -> Result<(), Self::Error>;

    /// `buf = factor·buf + g`, elementwise.
    fn accumulate(&self, factor: f32, buf: &mut B, grad: &B) -> Result<(), Self::Error>;
}

/// The optimiser state of one layer: the gradients of the last backward pass and the
/// momentum buffers (`B = Vec<f32>` on the host, device buffers during an OpenCL epoch).
#[derive(Debug, Clone, Default)]
pub(crate) struct SgdState<B> {
    /// Gradient of the active entries, in CSR order.
    pub grad: B,
    /// Gradient of the bias.
    pub bias_grad: B,
    /// The dense row-major weight gradient of the last backward pass that computed it.
    pub dense_grad: B,
    /// Momentum of the active entries, in CSR order.
    pub momentum: B,
    /// Momentum of the bias.
    pub bias_momentum: B,
    /// Momentum of every entry, row-major; its entries at active positions are stale (the
    /// active momentum is `momentum`) and its decay may be pending (`decay`).
    pub dense_momentum: B,
    /// The lazy decay of `dense_momentum`.
    pub decay: LazyDecay,
}

impl<B> SgdState<B> {
    /// One SGD step on the active `values` and the `bias`, then (after a dense backward pass)
    /// the momentum of inactive entries; `mu` is the momentum μ of `arith`'s step. Host and
    /// device run exactly this.
    pub(crate) fn step<A: SgdArithmetic<B>>(
        &mut self,
        arith: &A,
        mu: f32,
        values: &mut B,
        bias: &mut B,
    ) -> Result<(), A::Error> {
        arith.sgd(values, &self.grad, &mut self.momentum)?;
        arith.sgd(bias, &self.bias_grad, &mut self.bias_momentum)?;
        let (buf, grad) = (&mut self.dense_momentum, &self.dense_grad);
        self.decay
            .on_step(mu, |factor| arith.accumulate(factor, buf, grad))
    }
}

impl SgdState<Vec<f32>> {
    /// Applies the pending decay of the dense momentum (host buffers).
    pub(crate) fn flush_decay(&mut self, mu: f32) {
        if let Some(factor) = self.decay.take_pending(mu) {
            for m in &mut self.dense_momentum {
                *m *= factor;
            }
        }
    }
}

/// [`SgdArithmetic`] on host slices, with one learning rate.
pub(crate) struct HostSgd<'a> {
    /// The hyper-parameters.
    pub config: &'a SgdConfig,
    /// The learning rate.
    pub lr: f32,
}

impl SgdArithmetic<Vec<f32>> for HostSgd<'_> {
    type Error = Infallible;

    fn sgd(&self, w: &mut Vec<f32>, grad: &Vec<f32>, buf: &mut Vec<f32>) -> Result<(), Infallible> {
        let (mu, wd, lr) = (self.config.momentum, self.config.weight_decay, self.lr);
        if self.config.nesterov {
            for ((w, &g), m) in w.iter_mut().zip(grad).zip(buf.iter_mut()) {
                let g = g + wd * *w;
                *m = mu * *m + g;
                *w -= lr * (g + mu * *m);
            }
        } else {
            for ((w, &g), m) in w.iter_mut().zip(grad).zip(buf.iter_mut()) {
                let g = g + wd * *w;
                *m = mu * *m + g;
                *w -= lr * *m;
            }
        }
        Ok(())
    }

    fn accumulate(
        &self,
        factor: f32,
        buf: &mut Vec<f32>,
        grad: &Vec<f32>,
    ) -> Result<(), Infallible> {
        // Inactive entries have w = 0, so g' = g. Entries at active positions are stale and
        // are overwritten by `sync_dense`, so the update runs branch-free over all.
        for (m, &g) in buf.iter_mut().zip(grad) {
            *m = factor * *m + g;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The lazy decay gives the dense momentum what decaying it every step gives.
    #[test]
    fn lazy_decay_matches_eager_decay() {
        let mu = 0.9f32;
        let modes = [false, false, true, false, true, true, false, false, false];
        let mut decay = LazyDecay::default();
        let (mut lazy, mut eager) = (1.0f32, 1.0f32);
        for (i, &dense) in modes.iter().enumerate() {
            let g = i as f32;
            decay.record_backward(if dense {
                WeightGradMode::Dense
            } else {
                WeightGradMode::Active
            });
            assert_eq!(decay.dense_grad_fresh(), dense);
            eager = mu * eager + if dense { g } else { 0.0 };
            decay
                .on_step(mu, |factor| {
                    lazy = factor * lazy + g;
                    Ok::<(), Infallible>(())
                })
                .unwrap();
        }
        lazy *= decay.take_pending(mu).expect("three steps pending");
        assert_eq!(decay.take_pending(mu), None);
        assert!(
            (lazy - eager).abs() <= 1e-6 * eager.abs(),
            "{lazy} vs {eager}"
        );
    }

    /// A failed accumulation leaves the pending steps for the next try.
    #[test]
    fn failed_accumulation_keeps_the_pending_decay() {
        let mut decay = LazyDecay::default();
        decay.on_step(0.5, |_| Ok::<(), ()>(())).unwrap();
        decay.record_backward(WeightGradMode::Dense);
        assert_eq!(decay.on_step(0.5, |_| Err(())), Err(()));
        let mut seen = None;
        decay
            .on_step(0.5, |f| {
                seen = Some(f);
                Ok::<(), ()>(())
            })
            .unwrap();
        assert_eq!(seen, Some(0.25));
        assert_eq!(decay.take_pending(0.5), None);
    }
}
