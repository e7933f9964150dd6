//! Times competing kernels the one way sparsejit compares them, everywhere it does: the
//! planner's races, `kernel-bench`, `planner-fit`, `spmm_bench`, `macro-bench` and the
//! criterion-free examples.
//!
//! The rules, for noisy shared machines:
//! - every competitor runs in the same process, **interleaved** round by round, with the
//!   order reversed every other round, so slow drifts of the machine's load hit all alike;
//! - each competitor is **warmed up** before the first round, and again by one untimed run
//!   at the start of each of its samples: what ran before it (a competitor with a larger
//!   working set) must not decide its time. A sample measures the steady state of repeated
//!   calls, as a training loop sees a kernel it calls every step;
//! - a **long** run (at least [`LONG_RUN`]) is its own warm-up and flush: its first run
//!   is the whole warm-up and its samples go without the untimed run, since whatever ran
//!   before it leaves nothing in the caches after a few microseconds. A planner race between
//!   two 200 ms convolutions then costs 8 runs instead of 18;
//! - a sample repeats the run until it lasts [`Config::sample_min`], so the clock's
//!   resolution and the call overhead of the timer stay negligible;
//! - results are **paired medians**: the first competitor's median over rounds, and for
//!   each other one the median over rounds of its time relative to the first one's in the
//!   same round, times that median. Neighbouring samples share the machine's load, so on a
//!   loaded machine the ratios are steadier than the raw times.
//!
//! Two tools that time the same kernel this way agree within the noise; see the README's
//! kernel figures for what that is on the machines measured.

use std::time::{Duration, Instant};

/// How long and how often to measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    /// A sample repeats a competitor's run until it lasts at least this long.
    pub sample_min: Duration,
    /// Wall time the measurement may take, warm-up included; rounds stop once it is spent
    /// and [`Config::min_rounds`] are done.
    pub budget: Duration,
    /// Rounds taken even over the budget, as long as the budget allows at least three:
    /// where even those would overrun it by far, three.
    pub min_rounds: usize,
    /// Most rounds.
    pub max_rounds: usize,
}

impl Config {
    /// Benchmarks: 500 µs samples, at least `min_rounds`, as many more as `budget` allows
    /// (at most 1,000).
    pub fn benchmark(budget: Duration, min_rounds: usize) -> Config {
        Config {
            sample_min: Duration::from_micros(500),
            budget,
            min_rounds: min_rounds.max(1),
            max_rounds: 1000.max(min_rounds),
        }
    }
}

/// What [`interleaved`] measured.
#[derive(Debug, Clone, PartialEq)]
pub struct Timings {
    /// Each competitor's time per run, µs: the paired medians (see the crate docs).
    pub us: Vec<f64>,
    /// Rounds taken (samples per competitor).
    pub rounds: usize,
    /// Runs per sample, per competitor.
    pub reps: Vec<u32>,
    /// Every sample, µs per run, per competitor, in round order.
    pub samples: Vec<Vec<f64>>,
}

/// Warm-up per competitor before the first round: at least two runs and this long, at most
/// [`WARMUP_MAX_RUNS`] runs (fresh JIT code and cold operands settle over the first runs).
pub const WARMUP_MIN: Duration = Duration::from_micros(300);
/// Most warm-up runs per competitor.
pub const WARMUP_MAX_RUNS: usize = 20;
/// A run at least this long warms up by itself and needs no untimed run before its samples
/// (it refills the L2 many times over).
pub const LONG_RUN: Duration = Duration::from_millis(20);
/// Most runs in one sample.
pub const MAX_REPS: u32 = 100_000;

/// A competitor: one run of the thing timed.
pub type Run<'a, E> = &'a mut dyn FnMut() -> Result<(), E>;

/// Times `competitors` as the crate docs say and returns their paired medians. The first
/// error a run returns stops the measurement and is returned.
pub fn interleaved<E>(competitors: &mut [Run<'_, E>], config: &Config) -> Result<Timings, E> {
    let n = competitors.len();
    // `reps` runs of competitor `i`, timed together.
    let mut sample = |i: usize, reps: u32| -> Result<Duration, E> {
        let t = Instant::now();
        for _ in 0..reps {
            (competitors[i])()?;
        }
        Ok(t.elapsed())
    };
    if n == 0 {
        return Ok(Timings {
            us: Vec::new(),
            rounds: 0,
            reps: Vec::new(),
            samples: Vec::new(),
        });
    }
    let start = Instant::now();
    let mut reps = Vec::with_capacity(n);
    // Whether competitor `i` runs long ([`LONG_RUN`]): no untimed run before its samples.
    let mut long = Vec::with_capacity(n);
    let mut round_cost = Duration::ZERO;
    for i in 0..n {
        let first = sample(i, 1)?;
        let is_long = first >= LONG_RUN;
        let once = if is_long {
            first
        } else {
            let warm = Instant::now();
            let mut runs = 1;
            while runs < 2 || (runs < WARMUP_MAX_RUNS && warm.elapsed() < WARMUP_MIN) {
                sample(i, 1)?;
                runs += 1;
            }
            sample(i, 1)?
        }
        .max(Duration::from_nanos(20));
        let r = (config.sample_min.as_nanos().div_ceil(once.as_nanos())).clamp(1, MAX_REPS as u128)
            as u32;
        reps.push(r);
        long.push(is_long);
        // One untimed run per sample besides the timed ones (where there are neighbours).
        round_cost += once * (r + u32::from(n > 1 && !is_long));
    }
    let left = config.budget.saturating_sub(start.elapsed());
    let affordable = (left.as_nanos() / round_cost.as_nanos().max(1)) as usize;
    let min_rounds = config
        .min_rounds
        .min(affordable)
        .max(3)
        .min(config.max_rounds.max(1));
    let mut samples = vec![Vec::with_capacity(min_rounds); n];
    let mut rounds = 0;
    while rounds < config.max_rounds.max(1)
        && (rounds < min_rounds || start.elapsed() < config.budget)
    {
        for k in 0..n {
            let i = if rounds % 2 == 0 { k } else { n - 1 - k };
            if n > 1 && !long[i] {
                sample(i, 1)?;
            }
            let t = sample(i, reps[i])?;
            samples[i].push(t.as_secs_f64() * 1e6 / f64::from(reps[i]));
        }
        rounds += 1;
    }
    let us = paired_medians(&samples);
    Ok(Timings {
        us,
        rounds,
        reps,
        samples,
    })
}

/// Paired medians of per-round samples: the first competitor's median, and for each other
/// one the median of its per-round ratio to the first, times the first's median.
///
/// # Panics
/// If the competitors have different numbers of samples, or none.
pub fn paired_medians(samples: &[Vec<f64>]) -> Vec<f64> {
    let Some(first) = samples.first() else {
        return Vec::new();
    };
    let base = median(first);
    samples
        .iter()
        .map(|s| {
            assert_eq!(s.len(), first.len(), "paired samples of unequal counts");
            let ratios: Vec<f64> = s
                .iter()
                .zip(first)
                .map(|(t, t0)| t / t0.max(1e-12))
                .collect();
            base * median(&ratios)
        })
        .collect()
}

/// The median of a sample (the mean of the middle two for an even count).
///
/// # Panics
/// On an empty sample.
pub fn median(v: &[f64]) -> f64 {
    assert!(!v.is_empty(), "median of no samples");
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The geometric mean (1 for no values).
pub fn geomean(v: &[f64]) -> f64 {
    if v.is_empty() {
        return 1.0;
    }
    (v.iter().map(|x| x.ln()).sum::<f64>() / v.len() as f64).exp()
}

/// Busy-waits `d` (a sleep would give the core away and distort the neighbour's sample).
pub fn spin(d: Duration) {
    let t = Instant::now();
    while t.elapsed() < d {
        std::hint::spin_loop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quick() -> Config {
        Config {
            sample_min: Duration::from_micros(50),
            budget: Duration::from_millis(20),
            min_rounds: 5,
            max_rounds: 9,
        }
    }

    #[test]
    fn a_slower_competitor_measures_slower_by_about_its_delay() {
        let mut fast = || -> Result<(), ()> {
            spin(Duration::from_micros(20));
            Ok(())
        };
        let mut slow = || -> Result<(), ()> {
            spin(Duration::from_micros(60));
            Ok(())
        };
        let t = interleaved(&mut [&mut fast, &mut slow], &quick()).unwrap();
        assert!(t.rounds >= 3 && t.rounds <= 9, "{t:?}");
        assert_eq!(t.samples[0].len(), t.rounds);
        let ratio = t.us[1] / t.us[0];
        assert!(ratio > 2.0 && ratio < 4.5, "{t:?}");
        assert!(t.us[0] >= 20.0, "{t:?}");
    }

    #[test]
    fn every_sample_is_preceded_by_an_untimed_run_of_its_own() {
        // A competitor that is slow on its first run after the other one ran (a cold cache)
        // measures its steady state, because each sample starts with an untimed run.
        use std::cell::Cell;
        let last = Cell::new(0usize);
        let mut a = || -> Result<(), ()> {
            if last.replace(1) != 1 {
                spin(Duration::from_micros(400));
            } else {
                spin(Duration::from_micros(10));
            }
            Ok(())
        };
        let mut b = || -> Result<(), ()> {
            last.set(2);
            spin(Duration::from_micros(10));
            Ok(())
        };
        let t = interleaved(&mut [&mut a, &mut b], &quick()).unwrap();
        assert!(t.us[0] < 30.0, "cold runs leaked into the samples: {t:?}");
    }

    #[test]
    fn long_runs_are_their_own_warm_up_and_flush() {
        // Two runs over `LONG_RUN`: one warm-up run each, then three rounds (the budget is
        // spent) of one timed run each, without untimed runs between.
        use std::cell::Cell;
        let (calls_a, calls_b) = (Cell::new(0), Cell::new(0));
        let mut a = || -> Result<(), ()> {
            calls_a.set(calls_a.get() + 1);
            spin(LONG_RUN + Duration::from_millis(1));
            Ok(())
        };
        let mut b = || -> Result<(), ()> {
            calls_b.set(calls_b.get() + 1);
            spin(LONG_RUN * 2);
            Ok(())
        };
        let t = interleaved(&mut [&mut a, &mut b], &quick()).unwrap();
        assert_eq!(t.rounds, 3, "{t:?}");
        assert_eq!((calls_a.get(), calls_b.get()), (4, 4), "{t:?}");
        assert_eq!(t.reps, vec![1, 1]);
        let ratio = t.us[1] / t.us[0];
        assert!(ratio > 1.6 && ratio < 2.4, "{t:?}");
        // A short run next to a long one keeps its warm-up and its untimed runs.
        let calls_c = Cell::new(0);
        let mut c = || -> Result<(), ()> {
            calls_c.set(calls_c.get() + 1);
            spin(Duration::from_micros(100));
            Ok(())
        };
        calls_a.set(0);
        let t = interleaved(&mut [&mut a, &mut c], &quick()).unwrap();
        assert_eq!(calls_a.get(), 1 + t.rounds, "{t:?}");
        assert!(
            calls_c.get() >= 3 + t.rounds * (t.reps[1] as usize + 1),
            "{t:?}"
        );
    }

    #[test]
    fn errors_stop_the_measurement() {
        let mut calls = 0;
        let mut bad = || -> Result<(), &'static str> {
            calls += 1;
            if calls > 3 {
                Err("broken")
            } else {
                Ok(())
            }
        };
        assert_eq!(interleaved(&mut [&mut bad], &quick()), Err("broken"));
        let none: Timings = interleaved::<()>(&mut [], &quick()).unwrap();
        assert!(none.us.is_empty());
    }

    #[test]
    fn medians_pairs_and_geomeans() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!((geomean(&[1.0, 4.0]) - 2.0).abs() < 1e-12);
        // The second is always twice the first in its round, whatever the load did.
        let p = paired_medians(&[vec![1.0, 10.0, 2.0], vec![2.0, 20.0, 4.0]]);
        assert_eq!(p, vec![2.0, 4.0]);
    }
}
