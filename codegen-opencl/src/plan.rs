//! The planner: which strategy `Auto` means for a spec on a device, and why.

use sparse_ir::{KernelSpec, Op, Strategy};

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

/// Chooses the strategy for `spec` on a device.
///
/// - `dense_grad` reads no pattern: `csr`, the generic kernel built once per device.
/// - A CPU device (PoCL): `csr`. Measured on PoCL, the `table` kernel runs at the speed of
///   the generic one (the index loads are not the bottleneck on a CPU) and costs a build per
///   pattern, and `unrolled` code takes seconds to minutes to build.
/// - A GPU: `table` when the pattern fits the constant buffer in at most
///   `table_max_programs` programs (every work-item of a warp reads the same table entry, a
///   broadcast from the constant cache), `csr` otherwise.
pub fn plan(spec: &KernelSpec, profile: &DeviceProfile, opts: &EmitOptions) -> Plan {
    if spec.op() == Op::DenseGrad {
        return Plan {
            strategy: Strategy::Csr,
            reason: "dense_grad reads no pattern: the generic kernel, built once per device".into(),
        };
    }
    if profile.kind == DeviceKind::Cpu {
        return Plan {
            strategy: Strategy::Csr,
            reason: "CPU device: table runs like csr there and unrolled builds for seconds to \
                     minutes, so the generic kernel (no build per pattern)"
                .into(),
        };
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

#[cfg(test)]
mod tests {
    use super::*;
    use sparse_ir::{Dim, Pattern};
    use std::sync::Arc;

    fn spec(op: Op, p: Pattern) -> KernelSpec {
        KernelSpec::new("fc1", op, Arc::new(p), Dim::Fixed(4), Dim::Fixed(4)).unwrap()
    }

    #[test]
    fn plans_carry_reasons() {
        let small = Pattern::dense(4, 4).unwrap();
        let gpu = DeviceProfile::nvidia_gpu();
        let cpu = DeviceProfile::pocl_cpu();
        let opts = EmitOptions::default();
        let p = plan(&spec(Op::DenseGrad, small.clone()), &gpu, &opts);
        assert_eq!(p.strategy, Strategy::Csr);
        assert!(p.reason.contains("reads no pattern"), "{}", p.reason);
        let p = plan(&spec(Op::SPMM, small.clone()), &gpu, &opts);
        assert_eq!(p.strategy, Strategy::Table);
        assert!(p.reason.contains("1 constant table"), "{}", p.reason);
        let p = plan(&spec(Op::SPMM, small.clone()), &cpu, &opts);
        assert_eq!(p.strategy, Strategy::Csr);
        assert!(p.reason.contains("CPU"), "{}", p.reason);
        // a dense 300 x 300 row of 300 nonzeros fits, but with table_max_programs = 1 the
        // whole 90 000-nonzero pattern does not
        let big = Pattern::dense(300, 300).unwrap();
        let tight = EmitOptions {
            table_max_programs: 1,
            ..opts
        };
        let p = plan(&spec(Op::SpmmT, big), &gpu, &tight);
        assert_eq!(p.strategy, Strategy::Csr);
        assert!(p.reason.contains("table_max_programs = 1"), "{}", p.reason);
    }
}
