//! Log-softmax + negative log-likelihood on feature-major logits `[classes × ld]`.

use crate::error::{Result, RuntimeError};
use crate::tensor::Matrix;

/// Log-softmax followed by the mean negative log-likelihood over the valid columns, with its
/// gradient; scratch buffers are preallocated for one batch size.
#[derive(Debug, Clone)]
pub struct LogSoftmaxNll {
    classes: usize,
    col_max: Vec<f32>,
    col_lse: Vec<f32>,
}

impl LogSoftmaxNll {
    /// The loss for `classes` classes and row stride `ld`.
    pub fn new(classes: usize, ld: usize) -> Self {
        LogSoftmaxNll {
            classes,
            col_max: vec![0.0; ld],
            col_lse: vec![0.0; ld],
        }
    }

    pub(crate) fn check(&self, logits: &Matrix, labels: &[u32], n: usize) -> Result<()> {
        if logits.rows() != self.classes || logits.ld() > self.col_max.len() {
            return Err(RuntimeError::Shape(format!(
                "loss: logits are {}x{} (ld {}), expected {} classes and ld ≤ {}",
                logits.rows(),
                logits.batch(),
                logits.ld(),
                self.classes,
                self.col_max.len()
            )));
        }
        if n == 0 || n > logits.batch() || labels.len() < n {
            return Err(RuntimeError::Shape(format!(
                "loss: {n} valid columns with {} labels for a batch of {}",
                labels.len(),
                logits.batch()
            )));
        }
        if let Some((b, &l)) = labels[..n]
            .iter()
            .enumerate()
            .find(|(_, &l)| l as usize >= self.classes)
        {
            return Err(RuntimeError::Shape(format!(
                "loss: label {l} of sample {b} is not below the {} classes",
                self.classes
            )));
        }
        Ok(())
    }

    /// Computes, per column `b < n`, the log-sum-exp of the logits (into scratch).
    fn log_sum_exp(&mut self, logits: &Matrix, n: usize) {
        let (max, lse) = (&mut self.col_max[..n], &mut self.col_lse[..n]);
        max.copy_from_slice(&logits.row(0)[..n]);
        for c in 1..self.classes {
            for (m, &z) in max.iter_mut().zip(&logits.row(c)[..n]) {
                *m = m.max(z);
            }
        }
        lse.fill(0.0);
        for c in 0..self.classes {
            for ((s, &m), &z) in lse.iter_mut().zip(max.iter()).zip(&logits.row(c)[..n]) {
                *s += (z - m).exp();
            }
        }
        for (s, &m) in lse.iter_mut().zip(max.iter()) {
            *s = m + s.ln();
        }
    }

    /// The mean loss over the first `n` columns.
    pub fn loss(&mut self, logits: &Matrix, labels: &[u32], n: usize) -> Result<f64> {
        self.check(logits, labels, n)?;
        self.log_sum_exp(logits, n);
        let mut total = 0.0f64;
        for (b, &l) in labels[..n].iter().enumerate() {
            total += (self.col_lse[b] - logits.get(l as usize, b)) as f64;
        }
        Ok(total / n as f64)
    }

    /// The mean loss over the first `n` columns and its gradient with respect to the logits,
    /// `(softmax − onehot)/n`, written into `grad` (zero in columns `n..ld`).
    pub fn loss_and_grad(
        &mut self,
        logits: &Matrix,
        labels: &[u32],
        n: usize,
        grad: &mut Matrix,
    ) -> Result<f64> {
        let loss = self.loss(logits, labels, n)?;
        if grad.rows() != logits.rows() || grad.ld() != logits.ld() {
            return Err(RuntimeError::Shape(
                "loss: gradient buffer does not match the logits".into(),
            ));
        }
        let inv_n = 1.0 / n as f32;
        let ld = logits.ld();
        let lse = &self.col_lse[..n];
        for c in 0..self.classes {
            let z = &logits.row(c)[..n];
            let g = &mut grad.as_mut_slice()[c * ld..(c + 1) * ld];
            for ((g, &z), &s) in g[..n].iter_mut().zip(z).zip(lse) {
                *g = (z - s).exp() * inv_n;
            }
            g[n..].fill(0.0);
        }
        for (b, &l) in labels[..n].iter().enumerate() {
            let v = grad.get(l as usize, b) - inv_n;
            grad.set(l as usize, b, v);
        }
        Ok(loss)
    }

    /// How many of the first `n` columns have their largest logit at the label (ties go to
    /// the lowest class, as `argmax` in PyTorch).
    pub fn correct(&self, logits: &Matrix, labels: &[u32], n: usize) -> usize {
        (0..n.min(logits.batch()).min(labels.len()))
            .filter(|&b| {
                let mut best = 0;
                for c in 1..logits.rows() {
                    if logits.get(c, b) > logits.get(best, b) {
                        best = c;
                    }
                }
                best == labels[b] as usize
            })
            .count()
    }
}
