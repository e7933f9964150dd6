//! The planner: which strategy `Auto` means for a spec on a device, and why.
//!
//! A specialised kernel (`table`, `unrolled`) costs a program build per pattern, and on PoCL
//! that build takes 0.2–2.4 s (`kernel-bench --backend opencl`, compile column), so whether
//! it pays depends on how often the kernel runs before its pattern changes:
//! [`KernelLifetime`]. Training with sparse momentum changes every pattern after each epoch;
//! inference and benchmarks keep them.

use sparse_ir::{Dim, KernelSpec, Op, Strategy};

use crate::device::{DeviceKind, DeviceProfile};
use crate::emit::{emit, EmitOptions};

/// The planner's choice for one spec and its reason, in words (for dumps and metrics).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The chosen strategy (never `Auto`).
    pub strategy: Strategy,
    /// Why.
    pub reason: String,
}

/// How many times a compiled kernel runs before its pattern changes: what a build for one
/// pattern has to pay for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum KernelLifetime {
    /// Until the program ends (inference, benchmarks): the planner picks the fastest kernel.
    #[default]
    Lasting,
    /// About this many launches (training: the steps between two mask updates).
    Launches(u64),
}

/// The largest pattern for which the planner picks `unrolled` on a CPU device: PoCL builds
/// straight-line code slowly, seconds for a few thousand nonzeros (`docs/MEASUREMENTS.md`).
pub const CPU_UNROLLED_MAX_NNZ: usize = 4_000;

/// The batch up to which specialised kernels beat `csr` on a CPU device: on PoCL
/// (`kernel-bench --backend opencl --suite quick`, device time) `unrolled` `spmm`/`spmm_t`
/// and `table` `sddmm` win at batches 1 and 8 and not at 100; `table` `spmm`/`spmm_t` never
/// beats `csr` (figures in `docs/MEASUREMENTS.md`).
pub const CPU_SPECIALISED_MAX_BATCH: usize = 8;

/// The fewest launches per pattern for which a CPU device builds specialised kernels: on
/// PoCL a build takes a fraction of a second to seconds and saves microseconds a launch, so
/// even the largest saving repays its build only after about 14,000 launches
/// (`docs/MEASUREMENTS.md`).
pub const CPU_MIN_LAUNCHES_TO_BUILD: u64 = 20_000;

/// Chooses the strategy for `spec` on a device, for kernels that run `lifetime` long.
///
/// - Convolution ops (`conv`, `conv_t`, `conv_grad`, `conv_dense_grad`): `csr`, their only
///   OpenCL kernels (generic, built once per device).
/// - `dense_grad` reads no pattern: `csr`, the generic kernel built once per device.
/// - A CPU device (PoCL): `csr` when the kernel runs fewer than
///   [`CPU_MIN_LAUNCHES_TO_BUILD`] times per pattern (no build per pattern). Otherwise, at a
///   batch of at most [`CPU_SPECIALISED_MAX_BATCH`]: `unrolled` for `spmm`/`spmm_t` up to
///   [`CPU_UNROLLED_MAX_NNZ`] nonzeros, `table` for `sddmm`; `csr` elsewhere (at larger
///   batches the specialised kernels run like `csr` or slower, and an unknown batch is
///   treated as large).
/// - A GPU: `table` when the pattern fits the constant buffer in at most
///   `table_max_programs` programs (every work-item of a warp reads the same table entry, a
///   broadcast from the constant cache), `csr` otherwise. Not yet measured on a GPU; the
///   lifetime does not change it.
pub fn plan(
    spec: &KernelSpec,
    profile: &DeviceProfile,
    opts: &EmitOptions,
    lifetime: KernelLifetime,
) -> Plan {
    if spec.op().is_conv() {
        return Plan {
            strategy: Strategy::Csr,
            reason: format!(
                "{}: convolutions have only the generic kernel on OpenCL, built once per device",
                spec.op().name()
            ),
        };
    }
    if spec.op() == Op::DenseGrad {
        return Plan {
            strategy: Strategy::Csr,
            reason: "dense_grad reads no pattern: the generic kernel, built once per device".into(),
        };
    }
    if profile.kind == DeviceKind::Cpu {
        return plan_cpu(spec, profile, opts, lifetime);
    }
    match emit(spec, Strategy::Table, profile, opts) {
        Ok(e) => Plan {
            strategy: Strategy::Table,
            reason: format!(
                "GPU: the pattern fits {} constant table(s) of at most {} bytes",
                e.programs.len(),
                profile.table_budget()
            ),
        },
        Err(err) => Plan {
            strategy: Strategy::Csr,
            reason: format!("GPU: table does not fit ({err}), so the generic kernel"),
        },
    }
}

fn plan_cpu(
    spec: &KernelSpec,
    profile: &DeviceProfile,
    opts: &EmitOptions,
    lifetime: KernelLifetime,
) -> Plan {
    let csr = |reason: String| Plan {
        strategy: Strategy::Csr,
        reason,
    };
    if let KernelLifetime::Launches(n) = lifetime {
        if n < CPU_MIN_LAUNCHES_TO_BUILD {
            return csr(format!(
                "CPU device, about {n} launches per pattern: a build per pattern (0.2–2.4 s on \
                 PoCL) needs at least {CPU_MIN_LAUNCHES_TO_BUILD} to pay off, so the generic \
                 kernel"
            ));
        }
    }
    let batch = match spec.batch() {
        Dim::Fixed(b) if b <= CPU_SPECIALISED_MAX_BATCH => b,
        Dim::Fixed(b) => {
            return csr(format!(
                "CPU device, batch {b} > {CPU_SPECIALISED_MAX_BATCH}: specialised kernels run \
                 like the generic one or slower there"
            ))
        }
        Dim::Any => {
            return csr("CPU device, batch chosen at run time: the generic kernel".into());
        }
    };
    let nnz = spec.pattern().nnz();
    let candidate = match spec.op() {
        Op::Spmm { .. } | Op::SpmmT if nnz <= CPU_UNROLLED_MAX_NNZ => Strategy::Unrolled,
        Op::Spmm { .. } | Op::SpmmT => {
            return csr(format!(
                "CPU device, {nnz} nonzeros > {CPU_UNROLLED_MAX_NNZ}: unrolled would build for \
                 many seconds, and table runs like the generic kernel"
            ))
        }
        Op::Sddmm => Strategy::Table,
        Op::DenseGrad => return csr("dense_grad reads no pattern: the generic kernel".into()),
        Op::Conv { .. } | Op::ConvT | Op::ConvGrad | Op::ConvDenseGrad => {
            return csr("convolutions: the generic kernel".into()); // planned in `plan`
        }
    };
    match emit(spec, candidate, profile, opts) {
        Ok(_) => Plan {
            strategy: candidate,
            reason: format!(
                "CPU device, batch {batch}, {nnz} nonzeros, the kernel outlives its build: \
                 {candidate} beats the generic kernel there"
            ),
        },
        Err(err) => csr(format!(
            "CPU device: {candidate} cannot be emitted ({err}), so the generic kernel"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sparse_ir::Pattern;
    use std::sync::Arc;

    fn spec(op: Op, p: Pattern) -> KernelSpec {
        KernelSpec::new("fc1", op, Arc::new(p), Dim::Fixed(4), Dim::Fixed(4)).unwrap()
    }

    fn spec_b(op: Op, p: Pattern, batch: Dim) -> KernelSpec {
        KernelSpec::new("fc1", op, Arc::new(p), batch, Dim::Any).unwrap()
    }

    #[test]
    fn plans_carry_reasons() {
        let small = Pattern::dense(4, 4).unwrap();
        let gpu = DeviceProfile::nvidia_gpu();
        let cpu = DeviceProfile::pocl_cpu();
        let opts = EmitOptions::default();
        let lasting = KernelLifetime::Lasting;
        let p = plan(&spec(Op::DenseGrad, small.clone()), &gpu, &opts, lasting);
        assert_eq!(p.strategy, Strategy::Csr);
        assert!(p.reason.contains("reads no pattern"), "{}", p.reason);
        let p = plan(&spec(Op::SPMM, small.clone()), &gpu, &opts, lasting);
        assert_eq!(p.strategy, Strategy::Table);
        assert!(p.reason.contains("1 constant table"), "{}", p.reason);
        let p = plan(&spec(Op::SPMM, small.clone()), &cpu, &opts, lasting);
        assert_eq!(p.strategy, Strategy::Unrolled);
        assert!(p.reason.contains("CPU"), "{}", p.reason);
        // a dense 300 x 300 row of 300 nonzeros fits, but with table_max_programs = 1 the
        // whole 90 000-nonzero pattern does not
        let big = Pattern::dense(300, 300).unwrap();
        let tight = EmitOptions {
            table_max_programs: 1,
            ..opts
        };
        let p = plan(&spec(Op::SpmmT, big), &gpu, &tight, lasting);
        assert_eq!(p.strategy, Strategy::Csr);
        assert!(p.reason.contains("table_max_programs = 1"), "{}", p.reason);
    }

    #[test]
    fn convolutions_take_the_generic_kernel() {
        let g = sparse_ir::ConvGeometry {
            in_channels: 2,
            height: 6,
            width: 6,
            kernel: 3,
            stride: 1,
            padding: 1,
        };
        let p = Arc::new(Pattern::random(4, g.pattern_cols(), 0.2, 3).unwrap());
        let opts = EmitOptions::default();
        for profile in [DeviceProfile::pocl_cpu(), DeviceProfile::nvidia_gpu()] {
            for op in Op::CONV_ALL {
                for batch in [Dim::Fixed(1), Dim::Any] {
                    let s = KernelSpec::conv("conv1", op, p.clone(), g, batch, Dim::Any).unwrap();
                    let plan = plan(&s, &profile, &opts, KernelLifetime::Lasting);
                    assert_eq!(plan.strategy, Strategy::Csr, "{op}");
                    assert!(plan.reason.contains("convolutions"), "{}", plan.reason);
                }
            }
        }
    }

    #[test]
    fn cpu_devices_build_per_pattern_only_where_the_kernel_outlives_the_build() {
        let cpu = DeviceProfile::pocl_cpu();
        let opts = EmitOptions::default();
        let lasting = KernelLifetime::Lasting;
        let small = Pattern::random(100, 300, 0.05, 1).unwrap();
        let large = Pattern::random(300, 784, 0.05, 2).unwrap();
        assert!(small.nnz() <= CPU_UNROLLED_MAX_NNZ && large.nnz() > CPU_UNROLLED_MAX_NNZ);
        let pick = |op: Op, p: &Pattern, batch: Dim, lifetime: KernelLifetime| {
            plan(&spec_b(op, p.clone(), batch), &cpu, &opts, lifetime).strategy
        };
        // small batches of long-lived kernels: the specialised kernels that measured faster
        for b in [1, 8] {
            let b = Dim::Fixed(b);
            assert_eq!(pick(Op::SPMM, &small, b, lasting), Strategy::Unrolled);
            assert_eq!(pick(Op::SpmmT, &small, b, lasting), Strategy::Unrolled);
            assert_eq!(pick(Op::Sddmm, &small, b, lasting), Strategy::Table);
            assert_eq!(pick(Op::Sddmm, &large, b, lasting), Strategy::Table);
            assert_eq!(pick(Op::SPMM, &large, b, lasting), Strategy::Csr);
            assert_eq!(pick(Op::DenseGrad, &small, b, lasting), Strategy::Csr);
        }
        // large or unknown batches: the generic kernel
        for b in [Dim::Fixed(9), Dim::Fixed(100), Dim::Any] {
            for op in [Op::SPMM, Op::SpmmT, Op::Sddmm] {
                assert_eq!(pick(op, &small, b, lasting), Strategy::Csr, "{op} {b:?}");
            }
        }
        // training: an epoch of launches does not repay a build on PoCL
        let epoch = KernelLifetime::Launches(600);
        for op in [Op::SPMM, Op::SpmmT, Op::Sddmm] {
            assert_eq!(pick(op, &small, Dim::Fixed(1), epoch), Strategy::Csr);
        }
        let p = plan(
            &spec_b(Op::Sddmm, small.clone(), Dim::Fixed(1)),
            &cpu,
            &opts,
            epoch,
        );
        assert!(p.reason.contains("about 600 launches"), "{}", p.reason);
        let many = KernelLifetime::Launches(CPU_MIN_LAUNCHES_TO_BUILD);
        assert_eq!(
            pick(Op::Sddmm, &small, Dim::Fixed(1), many),
            Strategy::Table
        );
        // a GPU's plan does not depend on the lifetime
        let gpu = DeviceProfile::nvidia_gpu();
        let s = spec_b(Op::SPMM, small, Dim::Fixed(100));
        assert_eq!(
            plan(&s, &gpu, &opts, epoch).strategy,
            plan(&s, &gpu, &opts, lasting).strategy
        );
    }
}
