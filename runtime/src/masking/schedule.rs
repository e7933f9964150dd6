//! Schedules stepped once per optimiser step: the prune rate (cosine or linear decay) and the
//! step learning-rate decay.
//!
//! Both are plain serialisable values, so a checkpoint stores them and a resumed run continues
//! with bit-identical rates.

use std::f64::consts::PI;

use serde::{Deserialize, Serialize};

use super::options::DecaySchedule;
use super::MaskingError;

/// The prune rate's floor, as the reference's `CosineDecay` (`eta_min = 0.005`).
pub const DEFAULT_MIN_PRUNE_RATE: f64 = 0.005;

/// The prune-rate schedule: call [`step`](Self::step) after every optimiser step and pass
/// [`rate`](Self::rate) to [`Masking::update`](super::Masking::update).
///
/// The cosine schedule follows `p(s) = p_min + (p0 − p_min)·(1 + cos(π·s/T))/2`, with `s` the steps
/// taken and `T` the total steps of the run. It is computed the way the reference computes it —
/// PyTorch's `CosineAnnealingLR` in its recursive ("chainable") form, one factor per step — so the
/// rate after `s` steps agrees with the reference bit for bit (e.g. `0.49987787369051867` after
/// 540 of 54,000 steps); the closed form differs from it in the last bits. After `T` steps the
/// rate stays at `p_min` (PyTorch would start rising again; a run never gets there).
///
/// The linear schedule is `p(s) = p0 − (p0 − p_min)·min(s, T)/T`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PruneRateSchedule {
    kind: DecaySchedule,
    initial: f64,
    min: f64,
    total_steps: u64,
    steps: u64,
    rate: f64,
}

impl PruneRateSchedule {
    /// A schedule from `initial` down to [`DEFAULT_MIN_PRUNE_RATE`] over `total_steps` steps.
    pub fn new(kind: DecaySchedule, initial: f64, total_steps: u64) -> Result<Self, MaskingError> {
        Self::with_min(kind, initial, DEFAULT_MIN_PRUNE_RATE, total_steps)
    }

    /// A schedule from `initial` down to `min` over `total_steps` steps.
    ///
    /// Errors unless `0 ≤ min ≤ initial ≤ 1` and `total_steps > 0`.
    pub fn with_min(
        kind: DecaySchedule,
        initial: f64,
        min: f64,
        total_steps: u64,
    ) -> Result<Self, MaskingError> {
        if !(0.0..=1.0).contains(&initial) {
            return Err(MaskingError::InvalidOption {
                option: "prune-rate",
                reason: format!("{initial} is not in [0, 1]"),
            });
        }
        if !(0.0..=initial).contains(&min) {
            return Err(MaskingError::InvalidOption {
                option: "prune-rate",
                reason: format!("the minimum rate {min} is not in [0, {initial}]"),
            });
        }
        if total_steps == 0 {
            return Err(MaskingError::InvalidOption {
                option: "decay-schedule",
                reason: "the schedule needs at least one step".to_string(),
            });
        }
        Ok(PruneRateSchedule {
            kind,
            initial,
            min,
            total_steps,
            steps: 0,
            rate: initial,
        })
    }

    /// The rate to use now (after [`steps`](Self::steps) steps).
    pub fn rate(&self) -> f64 {
        self.rate
    }

    /// The number of steps taken.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// The total number of steps the schedule spans (`T`).
    pub fn total_steps(&self) -> u64 {
        self.total_steps
    }

    /// The kind of decay.
    pub fn kind(&self) -> DecaySchedule {
        self.kind
    }

    /// Advances the schedule by one optimiser step.
    pub fn step(&mut self) {
        let e = self.steps + 1;
        let t = self.total_steps;
        self.rate = match self.kind {
            DecaySchedule::Cosine if e > t => self.min,
            DecaySchedule::Cosine => {
                // torch.optim.lr_scheduler.CosineAnnealingLR.get_lr, chainable form.
                if (e as i128 - 1 - t as i128).rem_euclid(2 * t as i128) == 0 {
                    self.rate + (self.initial - self.min) * (1.0 - (PI / t as f64).cos()) / 2.0
                } else {
                    (1.0 + (PI * e as f64 / t as f64).cos())
                        / (1.0 + (PI * (e - 1) as f64 / t as f64).cos())
                        * (self.rate - self.min)
                        + self.min
                }
            }
            DecaySchedule::Linear => {
                let s = e.min(t) as f64;
                self.initial - (self.initial - self.min) * s / t as f64
            }
        };
        self.steps = e;
    }

    /// Advances the schedule by `n` steps.
    pub fn advance(&mut self, n: u64) {
        for _ in 0..n {
            self.step();
        }
    }

    /// The closed form of the schedule after `steps` steps (for reports and checks; the running
    /// schedule is what the update uses).
    pub fn closed_form(kind: DecaySchedule, initial: f64, min: f64, total: u64, steps: u64) -> f64 {
        let x = steps.min(total) as f64 / total as f64;
        match kind {
            DecaySchedule::Cosine => min + (initial - min) * (1.0 + (PI * x).cos()) / 2.0,
            DecaySchedule::Linear => initial - (initial - min) * x,
        }
    }
}

/// Step learning-rate decay: the rate is multiplied by `gamma` every `step_size` absolute steps
/// (MNIST: lr 0.1, ×0.1 every 25,000 steps, about epochs 46 and 93).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct StepLr {
    /// The learning rate of the first step.
    pub base: f64,
    /// The factor applied at every boundary.
    pub gamma: f64,
    /// Steps between boundaries (must be positive).
    pub step_size: u64,
}

impl StepLr {
    /// The reference's MNIST schedule: ×0.1 every 25,000 steps.
    pub fn mnist(base: f64) -> Self {
        StepLr {
            base,
            gamma: 0.1,
            step_size: 25_000,
        }
    }

    /// The learning rate of the step taken after `steps_done` steps (0-based step index): steps
    /// `0 … step_size−1` use `base`, the next `step_size` use `base·gamma`, and so on. The factor
    /// is applied by repeated multiplication, as PyTorch's `StepLR` does (`0.1·0.1·0.1`, not
    /// `0.1³`).
    pub fn lr_at(&self, steps_done: u64) -> f64 {
        let boundaries = steps_done.checked_div(self.step_size).unwrap_or(0);
        let mut lr = self.base;
        for _ in 0..boundaries {
            lr *= self.gamma;
        }
        lr
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cosine_matches_the_references_recursion_bit_for_bit() {
        // The golden cases' prune rates: torch CosineAnnealingLR(0.5, T_max = 54000, eta_min = 0.005)
        // after 540 · epoch steps.
        let cases = [
            (1, 0.49987787369051867),
            (2, 0.49951161528599725),
            (3, 0.49890158623926256),
            (5, 0.4969528642972965),
            (10, 0.4878864877830498),
            (20, 0.4527317061077972),
            (30, 0.39797684994238647),
        ];
        let mut s = PruneRateSchedule::new(DecaySchedule::Cosine, 0.5, 54_000).unwrap();
        let mut epoch = 0;
        for (e, want) in cases {
            s.advance((e - epoch) * 540);
            epoch = e;
            assert_eq!(s.steps(), e * 540);
            assert_eq!(
                s.rate().to_bits(),
                f64::to_bits(want),
                "epoch {e}: {}",
                s.rate()
            );
        }
    }

    #[test]
    fn cosine_follows_the_closed_form_of_the_spec() {
        // E = 5 epochs of 540 steps: 0.45273, 0.32898, 0.17602, 0.05227 after epochs 1..4.
        let mut s = PruneRateSchedule::new(DecaySchedule::Cosine, 0.5, 5 * 540).unwrap();
        for (e, want) in [(1, 0.45273), (2, 0.32898), (3, 0.17602), (4, 0.05227)] {
            s.advance(540);
            assert!((s.rate() - want).abs() < 5e-6, "epoch {e}: {}", s.rate());
            let closed = PruneRateSchedule::closed_form(
                DecaySchedule::Cosine,
                0.5,
                DEFAULT_MIN_PRUNE_RATE,
                2700,
                e * 540,
            );
            assert!(
                (s.rate() - closed).abs() < 1e-12,
                "{} vs {closed}",
                s.rate()
            );
        }
        s.advance(540);
        assert!((s.rate() - 0.005).abs() < 1e-12);
        s.advance(10);
        assert_eq!(s.rate(), 0.005);
    }

    #[test]
    fn linear_goes_straight_down() {
        let mut s = PruneRateSchedule::new(DecaySchedule::Linear, 0.5, 1000).unwrap();
        assert_eq!(s.rate(), 0.5);
        s.advance(500);
        assert!((s.rate() - 0.2525).abs() < 1e-15);
        s.advance(500);
        assert!((s.rate() - 0.005).abs() < 1e-15);
        s.advance(5);
        assert!((s.rate() - 0.005).abs() < 1e-15);
        assert_eq!(s.steps(), 1005);
    }

    #[test]
    fn schedules_serialise_and_resume_exactly() {
        let mut a = PruneRateSchedule::new(DecaySchedule::Cosine, 0.5, 54_000).unwrap();
        a.advance(777);
        let json = serde_json::to_string(&a).unwrap();
        let mut b: PruneRateSchedule = serde_json::from_str(&json).unwrap();
        assert_eq!(a, b);
        a.advance(1000);
        b.advance(1000);
        assert_eq!(a.rate().to_bits(), b.rate().to_bits());
    }

    #[test]
    fn bad_schedules_are_errors() {
        assert!(PruneRateSchedule::new(DecaySchedule::Cosine, 1.5, 10).is_err());
        assert!(PruneRateSchedule::new(DecaySchedule::Cosine, 0.5, 0).is_err());
        assert!(PruneRateSchedule::with_min(DecaySchedule::Linear, 0.5, 0.6, 10).is_err());
        assert!(PruneRateSchedule::with_min(DecaySchedule::Linear, 0.0, 0.0, 10).is_ok());
    }

    #[test]
    fn step_lr() {
        let lr = StepLr::mnist(0.1);
        assert_eq!(lr.lr_at(0), 0.1);
        assert_eq!(lr.lr_at(24_999), 0.1);
        assert_eq!(lr.lr_at(25_000), 0.1 * 0.1);
        assert_eq!(lr.lr_at(49_999), 0.1 * 0.1);
        assert_eq!(lr.lr_at(50_000), 0.1 * 0.1 * 0.1);
        assert_eq!(lr.lr_at(53_999), 0.1 * 0.1 * 0.1);
        let zero = StepLr {
            base: 0.1,
            gamma: 0.1,
            step_size: 0,
        };
        assert_eq!(zero.lr_at(100), 0.1);
    }
}
