//! The masking options of `sparse-train`, as enums that parse from and print to the names of the
//! command line (`FromStr` + `Display`, so clap can take them directly).

use std::fmt;
use std::num::NonZeroU64;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A command-line value that names no variant of an option.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid value `{value}` for --{option} (expected {expected})")]
pub struct ParseOptionError {
    /// The option, without the leading `--` (e.g. `growth`).
    pub option: &'static str,
    /// The value that was given.
    pub value: String,
    /// The accepted values, `a|b|c`.
    pub expected: &'static str,
}

/// Defines a plain option enum with its command-line names, `FromStr`, `Display` and serde names.
macro_rules! option_enum {
    (
        $(#[$meta:meta])*
        $name:ident, $option:literal, default $default:ident {
            $( $(#[$vmeta:meta])* $variant:ident => $text:literal, )+
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        pub enum $name {
            $( $(#[$vmeta])* #[serde(rename = $text)] $variant, )+
        }

        impl $name {
            /// Every variant, in the order of the command line's help.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The command-line name of this variant.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text,)+
                }
            }
        }

        impl Default for $name {
            fn default() -> Self {
                $name::$default
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = ParseOptionError;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s {
                    $($text => Ok($name::$variant),)+
                    _ => Err(ParseOptionError {
                        option: $option,
                        value: s.to_string(),
                        expected: concat!($($text, "|"),+),
                    }),
                }
            }
        }
    };
}

option_enum! {
    /// How entries are pruned (`--prune`).
    PruneMode, "prune", default Magnitude {
        /// Each layer removes `ceil(r_l · nnz_l)` active entries with the smallest |w| (the
        /// reference's `magnitude`).
        Magnitude => "magnitude",
        /// One global threshold: the `ceil(p · Σ nnz)` active entries with the smallest |w| over
        /// all layers together.
        GlobalMagnitude => "global-magnitude",
    }
}

option_enum! {
    /// Where pruned budget regrows (`--growth`).
    GrowthMode, "growth", default Momentum {
        /// The inactive entries with the largest |momentum| (sparse momentum).
        Momentum => "momentum",
        /// Inactive entries drawn uniformly at random (SET).
        Random => "random",
        /// The inactive entries with the largest |dense gradient| at the update step (RigL).
        Gradient => "gradient",
        /// The budget split over output rows by each row's mean |momentum|, then by |momentum|
        /// within the row.
        MomentumNeuron => "momentum-neuron",
        /// Static sparse training: the mask never changes.
        None => "none",
    }
}

option_enum! {
    /// How the regrowth budget is split over layers (`--redistribution`).
    RedistributionMode, "redistribution", default Momentum {
        /// Proportional to each layer's mean |momentum| over its active entries.
        Momentum => "momentum",
        /// Proportional to each layer's mean |w| over its active entries.
        Magnitude => "magnitude",
        /// Proportional to each layer's number of nonzero weights.
        Nonzero => "nonzero",
        /// Proportional to each layer's size (no redistribution by signal).
        None => "none",
    }
}

option_enum! {
    /// The prune-rate schedule over training (`--decay-schedule`).
    DecaySchedule, "decay-schedule", default Cosine {
        /// Cosine from the initial rate down to the minimum (the reference's `CosineDecay`).
        Cosine => "cosine",
        /// A straight line from the initial rate down to the minimum.
        Linear => "linear",
    }
}

option_enum! {
    /// How the initial masks are drawn (`--init`).
    InitMode, "init", default Uniform {
        /// Every entry active with probability `d`, every layer alike.
        Uniform => "uniform",
        /// Erdős–Rényi-kernel per-layer densities (RigL), scaled to the global budget.
        Erk => "erk",
    }
}

/// When the mask changes (`--update-frequency epoch|K`).
///
/// Steps are counted in absolute optimiser steps since the start of training (not reset per
/// epoch); "after step `s`" means after `s` steps have been taken. There is never an update after
/// the last step of training.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum UpdateFrequency {
    /// At the end of every epoch but the last (the reference's schedule).
    #[default]
    Epoch,
    /// After every `K` steps.
    Steps(NonZeroU64),
}

impl UpdateFrequency {
    /// Whether a mask update runs right after `steps_done` steps.
    ///
    /// `steps_per_epoch` is the number of optimiser steps in one epoch and `total_steps` the
    /// number in the whole run (epochs · steps per epoch).
    pub fn updates_after(self, steps_done: u64, steps_per_epoch: u64, total_steps: u64) -> bool {
        if steps_done == 0 || steps_done >= total_steps {
            return false;
        }
        let period = match self {
            UpdateFrequency::Epoch => steps_per_epoch,
            UpdateFrequency::Steps(k) => k.get(),
        };
        period > 0 && steps_done.is_multiple_of(period)
    }

    /// The value of `steps_done` at which the next update after `steps_done` runs (strictly
    /// greater than `steps_done`), or `None` if no update is left in the run.
    ///
    /// The dense-momentum window needs this: with window `K`, step number `s` (1-based, so
    /// `steps_done = s − 1` before it) needs the dense gradient when
    /// `next_update_after(s − 1, …) = Some(u)` with `u − s < K`.
    pub fn next_update_after(
        self,
        steps_done: u64,
        steps_per_epoch: u64,
        total_steps: u64,
    ) -> Option<u64> {
        let period = match self {
            UpdateFrequency::Epoch => steps_per_epoch,
            UpdateFrequency::Steps(k) => k.get(),
        };
        if period == 0 {
            return None;
        }
        let next = (steps_done / period).checked_add(1)?.checked_mul(period)?;
        (next < total_steps).then_some(next)
    }
}

impl fmt::Display for UpdateFrequency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UpdateFrequency::Epoch => f.write_str("epoch"),
            UpdateFrequency::Steps(k) => write!(f, "{k}"),
        }
    }
}

impl FromStr for UpdateFrequency {
    type Err = ParseOptionError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "epoch" {
            return Ok(UpdateFrequency::Epoch);
        }
        s.parse::<NonZeroU64>()
            .map(UpdateFrequency::Steps)
            .map_err(|_| ParseOptionError {
                option: "update-frequency",
                value: s.to_string(),
                expected: "epoch|K with K a positive number of steps",
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for m in PruneMode::ALL {
            assert_eq!(m.to_string().parse::<PruneMode>().unwrap(), *m);
        }
        for m in GrowthMode::ALL {
            assert_eq!(m.to_string().parse::<GrowthMode>().unwrap(), *m);
        }
        for m in RedistributionMode::ALL {
            assert_eq!(m.to_string().parse::<RedistributionMode>().unwrap(), *m);
        }
        for m in DecaySchedule::ALL {
            assert_eq!(m.to_string().parse::<DecaySchedule>().unwrap(), *m);
        }
        for m in InitMode::ALL {
            assert_eq!(m.to_string().parse::<InitMode>().unwrap(), *m);
        }
        assert_eq!(
            "global-magnitude".parse::<PruneMode>().unwrap(),
            PruneMode::GlobalMagnitude
        );
        assert_eq!(
            "momentum-neuron".parse::<GrowthMode>().unwrap(),
            GrowthMode::MomentumNeuron
        );
        assert_eq!(GrowthMode::None.to_string(), "none");
    }

    #[test]
    fn bad_names_say_what_is_accepted() {
        let e = "magnitud".parse::<PruneMode>().unwrap_err();
        assert_eq!(e.option, "prune");
        let text = e.to_string();
        assert!(
            text.contains("`magnitud`") && text.contains("--prune"),
            "{text}"
        );
        assert!(text.contains("magnitude|global-magnitude"), "{text}");
        assert!("Momentum".parse::<GrowthMode>().is_err());
        assert!("".parse::<InitMode>().is_err());
    }

    #[test]
    fn defaults_are_the_references() {
        assert_eq!(PruneMode::default(), PruneMode::Magnitude);
        assert_eq!(GrowthMode::default(), GrowthMode::Momentum);
        assert_eq!(RedistributionMode::default(), RedistributionMode::Momentum);
        assert_eq!(DecaySchedule::default(), DecaySchedule::Cosine);
        assert_eq!(InitMode::default(), InitMode::Uniform);
        assert_eq!(UpdateFrequency::default(), UpdateFrequency::Epoch);
    }

    #[test]
    fn update_frequency_parses_and_prints() {
        assert_eq!(
            "epoch".parse::<UpdateFrequency>().unwrap(),
            UpdateFrequency::Epoch
        );
        let k = "250".parse::<UpdateFrequency>().unwrap();
        assert_eq!(k, UpdateFrequency::Steps(NonZeroU64::new(250).unwrap()));
        assert_eq!(k.to_string(), "250");
        assert_eq!(UpdateFrequency::Epoch.to_string(), "epoch");
        assert!("0".parse::<UpdateFrequency>().is_err());
        assert!("-3".parse::<UpdateFrequency>().is_err());
        assert!("epochs".parse::<UpdateFrequency>().is_err());
    }

    #[test]
    fn epoch_updates_after_every_epoch_but_the_last() {
        let f = UpdateFrequency::Epoch;
        let updates: Vec<u64> = (0..=2700)
            .filter(|&s| f.updates_after(s, 540, 2700))
            .collect();
        assert_eq!(updates, vec![540, 1080, 1620, 2160]);
        assert_eq!(f.next_update_after(0, 540, 2700), Some(540));
        assert_eq!(f.next_update_after(539, 540, 2700), Some(540));
        assert_eq!(f.next_update_after(540, 540, 2700), Some(1080));
        assert_eq!(f.next_update_after(2160, 540, 2700), None);
    }

    #[test]
    fn every_k_steps() {
        let f: UpdateFrequency = "100".parse().unwrap();
        let updates: Vec<u64> = (0..=350)
            .filter(|&s| f.updates_after(s, 540, 350))
            .collect();
        assert_eq!(updates, vec![100, 200, 300]);
        assert_eq!(f.next_update_after(299, 540, 350), Some(300));
        assert_eq!(f.next_update_after(300, 540, 350), None);
        // A period that divides the run exactly has no update after the final step.
        assert!(!f.updates_after(400, 540, 400));
    }

    #[test]
    fn serde_names_match_the_command_line() {
        let json = serde_json::to_string(&GrowthMode::MomentumNeuron).unwrap();
        assert_eq!(json, "\"momentum-neuron\"");
        let json = serde_json::to_string(&PruneMode::GlobalMagnitude).unwrap();
        assert_eq!(json, "\"global-magnitude\"");
        let f = UpdateFrequency::Steps(NonZeroU64::new(64).unwrap());
        let back: UpdateFrequency =
            serde_json::from_str(&serde_json::to_string(&f).unwrap()).unwrap();
        assert_eq!(back, f);
    }
}
