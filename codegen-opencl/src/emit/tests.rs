//! Emitter tests: they need no OpenCL. What the code computes is tested on PoCL
//! (`tests/differential.rs`); here, what it says and how it is cut up.

use std::sync::Arc;

use sparse_ir::{BackendError, Dim, KernelSpec, Op, Pattern, Strategy};

use super::*;
use crate::device::DeviceProfile;

const STRATEGIES: [Strategy; 3] = [Strategy::Csr, Strategy::Table, Strategy::Unrolled];

/// 3 x 5: row 0: cols 1, 4; row 1: empty; row 2: cols 0, 1, 3.
fn small() -> Pattern {
    Pattern::from_csr(3, 5, vec![0, 2, 2, 5], vec![1, 4, 0, 1, 3]).unwrap()
}

fn spec(layer: &str, op: Op, p: Pattern, batch: Dim, ld: Dim) -> KernelSpec {
    KernelSpec::new(layer, op, Arc::new(p), batch, ld).unwrap()
}

fn emit_ok(spec: &KernelSpec, strategy: Strategy, profile: &DeviceProfile) -> Emitted {
    emit(spec, strategy, profile, &EmitOptions::default())
        .unwrap_or_else(|e| panic!("{} {strategy}: {e}", spec.op()))
}

/// The integers of a `__constant` table named `name` in `source`, or `None`.
fn table_values(source: &str, name: &str) -> Option<Vec<u32>> {
    let start = source.find(&format!(" {name}["))?;
    let body = &source[start..];
    let open = body.find('{')?;
    let close = body.find('}')?;
    Some(
        body[open + 1..close]
            .split(',')
            .map(|t| t.trim())
            .filter(|t| !t.is_empty())
            .map(|t| t.parse().unwrap())
            .collect(),
    )
}

#[test]
fn headers_name_layer_op_strategy_hash_shape_nnz() {
    let p = small();
    let hash = format!("{:016x}", p.hash());
    for profile in [DeviceProfile::pocl_cpu(), DeviceProfile::nvidia_gpu()] {
        for op in Op::ALL {
            for strategy in STRATEGIES {
                let s = spec("fc1", op, p.clone(), Dim::Fixed(4), Dim::Fixed(16));
                let e = emit_ok(&s, strategy, &profile);
                assert_eq!(e.strategy, strategy);
                let listing = e.listing();
                for needle in [
                    "layer fc1".to_string(),
                    format!("op {op}"),
                    format!("strategy {strategy}"),
                    format!("pattern {hash}"),
                    "shape 3x5".to_string(),
                    "nnz 5".to_string(),
                    "batch 4 | ld 16".to_string(),
                ] {
                    assert!(
                        listing.contains(&needle),
                        "{op} {strategy}: no {needle:?} in\n{listing}"
                    );
                }
                // specialised programs carry the header themselves
                if strategy != Strategy::Csr {
                    for prog in &e.programs {
                        assert!(prog.source.starts_with(&e.header), "{op} {strategy}");
                    }
                }
            }
        }
    }
}

#[test]
fn csr_is_one_program_per_device() {
    let gpu = DeviceProfile::nvidia_gpu();
    let cpu = DeviceProfile::pocl_cpu();
    let mut sources = std::collections::HashSet::new();
    for (layer, p) in [
        ("fc1", small()),
        ("conv2.w", Pattern::random(20, 30, 0.2, 7).unwrap()),
    ] {
        for op in Op::ALL {
            let s = spec(layer, op, p.clone(), Dim::Any, Dim::Any);
            let e = emit_ok(&s, Strategy::Csr, &gpu);
            assert_eq!(e.programs.len(), 1);
            assert_eq!(e.programs[0].kernels.len(), 1);
            assert_eq!(e.programs[0].kernels[0].name, csr_kernel_name(op));
            assert!(e.programs[0]
                .source
                .contains(&format!("void {}(", csr_kernel_name(op))));
            sources.insert(e.programs[0].source.clone());
        }
    }
    assert_eq!(
        sources.len(),
        1,
        "the csr source must not depend on the spec"
    );
    assert_ne!(csr_library(&cpu), csr_library(&gpu));
    assert!(csr_library(&gpu).contains("__local float part[4][32]"));
    assert!(!csr_library(&cpu).contains("__local"));
}

#[test]
fn csr_arrays_are_the_pattern() {
    let p = small();
    let t = p.transpose();
    let gpu = DeviceProfile::nvidia_gpu();
    let e = emit_ok(
        &spec("fc1", Op::SpmmT, p.clone(), Dim::Any, Dim::Any),
        Strategy::Csr,
        &gpu,
    );
    assert_eq!(e.arrays[0].data, t.pattern.row_ptr());
    assert_eq!(e.arrays[1].data, t.pattern.col_idx());
    assert_eq!(e.arrays[2].data, t.value_index);
    let e = emit_ok(
        &spec("fc1", Op::Sddmm, p.clone(), Dim::Any, Dim::Any),
        Strategy::Csr,
        &gpu,
    );
    assert_eq!(e.arrays[0].data, vec![0, 0, 2, 2, 2]); // row of each nonzero
    assert_eq!(e.arrays[1].data, p.col_idx());
    let k = &e.programs[0].kernels[0];
    assert_eq!(
        k.args,
        vec![
            KernelArg::Operand(Operand::Dy),
            KernelArg::Operand(Operand::X),
            KernelArg::Operand(Operand::Dw),
            KernelArg::Array(0),
            KernelArg::Array(1),
            KernelArg::Int(5),
            KernelArg::Batch,
            KernelArg::Ld,
        ]
    );
}

#[test]
fn fixed_dims_are_literals_and_any_dims_are_parameters() {
    let cpu = DeviceProfile::pocl_cpu();
    let fixed = emit_ok(
        &spec("fc1", Op::SPMM, small(), Dim::Fixed(100), Dim::Fixed(112)),
        Strategy::Unrolled,
        &cpu,
    );
    let src = &fixed.programs[0].source;
    assert!(src.contains("#define BATCH 100\n#define LD 112\n"), "{src}");
    assert!(!src.contains("const int ld"), "{src}");
    assert!(!fixed.kernels().any(|k| k.args.contains(&KernelArg::Ld)));
    let any = emit_ok(
        &spec("fc1", Op::SPMM, small(), Dim::Any, Dim::Any),
        Strategy::Unrolled,
        &cpu,
    );
    let src = &any.programs[0].source;
    assert!(
        src.contains("#define BATCH batch\n#define LD ld\n"),
        "{src}"
    );
    assert!(src.contains("const int batch,\n    const int ld)"), "{src}");
    for k in any.kernels() {
        assert_eq!(
            &k.args[k.args.len() - 2..],
            &[KernelArg::Batch, KernelArg::Ld]
        );
    }
}

#[test]
fn table_holds_the_exact_pattern() {
    let p = Pattern::random(40, 300, 0.1, 3).unwrap();
    let gpu = DeviceProfile::nvidia_gpu();
    let e = emit_ok(
        &spec("fc1", Op::SPMM, p.clone(), Dim::Any, Dim::Any),
        Strategy::Table,
        &gpu,
    );
    assert_eq!(e.programs.len(), 1);
    let src = &e.programs[0].source;
    assert_eq!(table_values(src, "ROW_PTR").unwrap(), p.row_ptr());
    assert_eq!(table_values(src, "COL").unwrap(), p.col_idx());
    assert!(src.contains("__constant ushort COL["), "{src}");
    // spmm_t: the transposed pattern and its value index
    let t = p.transpose();
    let e = emit_ok(
        &spec("fc1", Op::SpmmT, p.clone(), Dim::Any, Dim::Any),
        Strategy::Table,
        &gpu,
    );
    let src = &e.programs[0].source;
    assert_eq!(table_values(src, "ROW_PTR").unwrap(), t.pattern.row_ptr());
    assert_eq!(table_values(src, "COL").unwrap(), t.pattern.col_idx());
    assert_eq!(table_values(src, "VIDX").unwrap(), t.value_index);
    assert!(src.contains("values[VIDX[k]]"), "{src}");
    // sddmm: the row and column of every nonzero
    let e = emit_ok(
        &spec("fc1", Op::Sddmm, p.clone(), Dim::Any, Dim::Any),
        Strategy::Table,
        &gpu,
    );
    let src = &e.programs[0].source;
    let rows: Vec<u32> = (0..p.rows())
        .flat_map(|r| std::iter::repeat_n(r as u32, p.row_range(r).len()))
        .collect();
    assert_eq!(table_values(src, "ROW").unwrap(), rows);
    assert_eq!(table_values(src, "COL").unwrap(), p.col_idx());
}

/// The bytes of every `__constant` table in `source`.
fn constant_bytes(source: &str) -> usize {
    source
        .lines()
        .filter_map(|l| l.strip_prefix("__constant "))
        .map(|l| {
            let size = if l.starts_with("ushort") { 2 } else { 4 };
            let n: usize = l[l.find('[').unwrap() + 1..l.find(']').unwrap()]
                .parse()
                .unwrap();
            size * n
        })
        .sum()
}

#[test]
fn table_chunks_fit_the_constant_buffer_and_cover_every_row() {
    // 1024 x 1024 at 5 %: about 52k nonzeros, ~105 KB of ushort columns, more than 64 KiB
    let p = Pattern::random(1024, 1024, 0.05, 11).unwrap();
    let gpu = DeviceProfile::nvidia_gpu();
    for op in [Op::SPMM, Op::SpmmT, Op::Sddmm] {
        let e = emit_ok(
            &spec("fc1", op, p.clone(), Dim::Fixed(128), Dim::Fixed(128)),
            Strategy::Table,
            &gpu,
        );
        assert!(e.programs.len() >= 2, "{op}: {} programs", e.programs.len());
        let mut covered = 0;
        for prog in &e.programs {
            let bytes = constant_bytes(&prog.source);
            assert!(bytes <= gpu.table_budget(), "{op}: {bytes} bytes");
            assert_eq!(prog.kernels.len(), 1);
            let Extent::Items(n) = prog.kernels[0].grid.extent[1] else {
                panic!("{op}: rows or nonzeros along dimension 1");
            };
            covered += n;
        }
        let want = match op {
            Op::Sddmm => p.nnz(),
            Op::SpmmT => p.cols(),
            _ => p.rows(),
        };
        assert_eq!(covered, want, "{op}");
    }
    // on PoCL (2 MiB) the same pattern is one program
    let e = emit_ok(
        &spec("fc1", Op::SPMM, p.clone(), Dim::Any, Dim::Any),
        Strategy::Table,
        &DeviceProfile::pocl_cpu(),
    );
    assert_eq!(e.programs.len(), 1);
}

#[test]
fn table_beyond_its_limits_is_unsupported() {
    let gpu = DeviceProfile::nvidia_gpu();
    let p = Pattern::random(1024, 1024, 0.05, 11).unwrap();
    let opts = EmitOptions {
        table_max_programs: 1,
        ..EmitOptions::default()
    };
    let s = spec("fc3", Op::SPMM, p, Dim::Any, Dim::Any);
    let err = emit(&s, Strategy::Table, &gpu, &opts).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, BackendError::Unsupported { .. }), "{msg}");
    assert!(
        msg.contains("fc3") && msg.contains("table_max_programs = 1"),
        "{msg}"
    );
    // a single dense row of 40 000 columns: 80 KB of columns
    let row = Pattern::dense(1, 40_000).unwrap();
    let s = spec("wide", Op::SPMM, row, Dim::Any, Dim::Any);
    let msg = emit(&s, Strategy::Table, &gpu, &EmitOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("row 0 of the pattern has 40000 nonzeros"),
        "{msg}"
    );
}

#[test]
fn unrolled_code_spells_out_every_nonzero() {
    let p = Pattern::random(50, 70, 0.2, 5).unwrap();
    let opts = EmitOptions {
        unroll_chunk_nnz: 100,
        ..EmitOptions::default()
    };
    for profile in [DeviceProfile::pocl_cpu(), DeviceProfile::nvidia_gpu()] {
        let s = spec("fc1", Op::SPMM, p.clone(), Dim::Fixed(8), Dim::Fixed(8));
        let e = emit(&s, Strategy::Unrolled, &profile, &opts).unwrap();
        let src = &e.programs[0].source;
        assert_eq!(e.programs.len(), 1);
        let chunks = p.chunks(100);
        assert_eq!(e.programs[0].kernels.len(), chunks.len());
        for chunk in &chunks {
            assert!(
                src.contains(&format!("chunk hash {:016x}", chunk.hash)),
                "{src}"
            );
        }
        let vector = false; // unrolled code is scalar per batch column on every device
        for r in 0..p.rows() {
            for k in p.row_range(r) {
                let c = p.col_idx()[k];
                let term = if vector {
                    format!("values[{k}] * sj_load(inb + {c} * LD, n);")
                } else {
                    format!("values[{k}] * inb[{c} * LD];")
                };
                assert_eq!(src.matches(&term).count(), 1, "{term}");
            }
            let store = if vector {
                format!("sj_store(acc, outb + {r} * LD, n);")
            } else {
                format!("outb[{r} * LD] = acc;")
            };
            assert!(src.contains(&store), "row {r}");
        }
        assert_eq!(src.contains("switch"), profile.kind.is_gpu_like());
    }
    // spmm_t reads each weight at its place in W's value array
    let t = p.transpose();
    let s = spec("fc1", Op::SpmmT, p.clone(), Dim::Any, Dim::Any);
    let e = emit(&s, Strategy::Unrolled, &DeviceProfile::pocl_cpu(), &opts).unwrap();
    let src = &e.programs[0].source;
    for c in 0..t.pattern.rows() {
        for k in t.pattern.row_range(c) {
            let term = format!(
                "values[{}] * inb[{} * LD];",
                t.value_index[k],
                t.pattern.col_idx()[k]
            );
            assert!(src.contains(&term), "{term}");
        }
    }
    // sddmm: chunks of at most 100 nonzeros, each nonzero's offsets as literals
    let s = spec("fc1", Op::Sddmm, p.clone(), Dim::Any, Dim::Any);
    let e = emit(&s, Strategy::Unrolled, &DeviceProfile::nvidia_gpu(), &opts).unwrap();
    assert_eq!(e.programs[0].kernels.len(), p.nnz().div_ceil(100));
    for k in e.kernels() {
        let Extent::Items(n) = k.grid.extent[1] else {
            panic!()
        };
        assert!(n <= 100);
    }
    let src = &e.programs[0].source;
    let r = (0..p.rows()).find(|&r| !p.row_range(r).is_empty()).unwrap();
    let k = p.row_range(r).start;
    assert!(src.contains(&format!(
        "ro = {r} * LD; co = {} * LD; break; // nonzero {k}",
        p.col_idx()[k]
    )));
}

#[test]
fn unrolled_beyond_its_limit_is_unsupported() {
    let s = spec(
        "fc1",
        Op::SPMM,
        Pattern::dense(10, 10).unwrap(),
        Dim::Any,
        Dim::Any,
    );
    let opts = EmitOptions {
        unroll_max_nnz: 99,
        ..EmitOptions::default()
    };
    for op in [Op::SPMM, Op::Sddmm] {
        let s = spec("fc1", op, s.pattern().as_ref().clone(), Dim::Any, Dim::Any);
        let msg = emit(&s, Strategy::Unrolled, &DeviceProfile::pocl_cpu(), &opts)
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("100 nonzeros exceed unroll_max_nnz = 99"),
            "{msg}"
        );
    }
}

#[test]
fn other_strategies_are_refused() {
    let s = spec("fc1", Op::SPMM, small(), Dim::Any, Dim::Any);
    for strategy in [
        Strategy::Auto,
        Strategy::Jit,
        Strategy::Generic,
        Strategy::Dense,
    ] {
        let err = emit(
            &s,
            strategy,
            &DeviceProfile::pocl_cpu(),
            &EmitOptions::default(),
        )
        .unwrap_err();
        assert!(
            matches!(err, BackendError::Unsupported { strategy: st, .. } if st == strategy),
            "{err}"
        );
    }
}

#[test]
fn edge_patterns_emit() {
    let cpu = DeviceProfile::pocl_cpu();
    let gpu = DeviceProfile::nvidia_gpu();
    for p in [
        Pattern::empty(4, 6).unwrap(),
        Pattern::empty(0, 6).unwrap(),
        Pattern::empty(4, 0).unwrap(),
        Pattern::from_coo(7, 96, &[(3, 50)]).unwrap(),
    ] {
        for op in Op::ALL {
            for strategy in STRATEGIES {
                for profile in [&cpu, &gpu] {
                    let s = spec("edge", op, p.clone(), Dim::Any, Dim::Any);
                    let e = emit_ok(&s, strategy, profile);
                    // a program without kernels would be built for nothing
                    assert!(e.programs.iter().all(|p| !p.kernels.is_empty()), "{op}");
                }
            }
        }
    }
    // an all-zero spmm still writes its rows: bias (and ReLU) or zero
    let s = spec(
        "edge",
        Op::Spmm {
            bias: true,
            relu: true,
        },
        Pattern::empty(2, 3).unwrap(),
        Dim::Any,
        Dim::Any,
    );
    let src = &emit_ok(&s, Strategy::Unrolled, &cpu).programs[0].source;
    assert!(
        src.contains("acc = 0.0f;\n    outb[1 * LD] = fmax(acc + bias[1], 0.0f);"),
        "{src}"
    );
    // an all-zero sddmm has nothing to write: no table/unrolled program
    let s = spec(
        "edge",
        Op::Sddmm,
        Pattern::empty(2, 3).unwrap(),
        Dim::Any,
        Dim::Any,
    );
    assert!(emit_ok(&s, Strategy::Table, &gpu).programs.is_empty());
}

#[test]
fn grids_round_up_and_skip_empty_dimensions() {
    let g = Grid {
        extent: [Extent::Batch { per_item: 1 }, Extent::Items(300)],
        local: [16, 4],
    };
    assert_eq!(g.global(100), Some([112, 300]));
    assert_eq!(g.global(1), Some([16, 300]));
    let g = Grid {
        extent: [Extent::Batch { per_item: 16 }, Extent::Items(300)],
        local: [1, 16],
    };
    assert_eq!(g.global(100), Some([7, 304]));
    assert_eq!(g.global(128), Some([8, 304]));
    let g = Grid {
        extent: [Extent::Batch { per_item: 1 }, Extent::Items(0)],
        local: [16, 4],
    };
    assert_eq!(g.global(100), None);
}

#[test]
fn indices_that_overflow_int_are_refused() {
    let p = Pattern::empty(70_000, 40_000).unwrap();
    let s = spec("huge", Op::SPMM, p, Dim::Any, Dim::Any);
    let msg = emit(
        &s,
        Strategy::Csr,
        &DeviceProfile::pocl_cpu(),
        &EmitOptions::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        msg.contains("rows·cols = 2800000000 does not fit an int"),
        "{msg}"
    );
}

fn conv_spec(op: Op, p: Pattern, g: sparse_ir::ConvGeometry, batch: Dim, ld: Dim) -> KernelSpec {
    KernelSpec::conv("conv1", op, Arc::new(p), g, batch, ld).unwrap()
}

/// 2 input channels of 5 x 6, a 3 x 3 window, stride 2, padding 1: 3 x 3 outputs.
fn conv_geometry() -> sparse_ir::ConvGeometry {
    sparse_ir::ConvGeometry {
        in_channels: 2,
        height: 5,
        width: 6,
        kernel: 3,
        stride: 2,
        padding: 1,
    }
}

#[test]
fn conv_ops_are_generic_kernels_of_the_csr_library() {
    let g = conv_geometry();
    let p = Pattern::random(4, g.pattern_cols(), 0.3, 5).unwrap();
    let geometry: Vec<KernelArg> = [2, 5, 6, 4, 3, 3, 3, 2, 1]
        .into_iter()
        .map(KernelArg::Int)
        .collect();
    for profile in [DeviceProfile::pocl_cpu(), DeviceProfile::nvidia_gpu()] {
        let wg = profile.work_groups();
        for op in Op::CONV_ALL {
            let s = conv_spec(op, p.clone(), g, Dim::Any, Dim::Any);
            let e = emit_ok(&s, Strategy::Csr, &profile);
            assert_eq!(e.programs.len(), 1);
            assert_eq!(e.programs[0].source, csr_library(&profile));
            let k = &e.programs[0].kernels[0];
            assert_eq!(k.name, csr_kernel_name(op));
            assert!(e.programs[0]
                .source
                .contains(&format!("void {}(", csr_kernel_name(op))));
            let n = k.args.len();
            assert_eq!(&k.args[n - 11..n - 2], &geometry[..], "{op}");
            assert_eq!(&k.args[n - 2..], &[KernelArg::Batch, KernelArg::Ld]);
            let items = match op {
                Op::Conv { .. } => 4 * 9,
                Op::ConvT => 2 * 5 * 6,
                Op::ConvGrad => p.nnz(),
                _ => p.rows() * p.cols(),
            };
            assert_eq!(k.grid.extent[1], Extent::Items(items), "{op}");
            let listing = e.listing();
            assert!(listing.contains(&format!("op {op}")), "{listing}");
            if op == Op::ConvT {
                let t = p.transpose();
                assert_eq!(e.arrays[0].data, t.pattern.row_ptr());
                assert_eq!(e.arrays[2].data, t.value_index);
            }
            if op.role() == sparse_ir::Role::Forward {
                assert_eq!(k.grid.local, wg.rows);
                assert_eq!(
                    k.args.contains(&KernelArg::Operand(Operand::Bias)),
                    op.has_bias()
                );
            }
        }
    }
}

#[test]
fn conv_ops_refuse_specialised_strategies_and_int_overflow() {
    let g = conv_geometry();
    let p = Pattern::random(4, g.pattern_cols(), 0.3, 5).unwrap();
    let gpu = DeviceProfile::nvidia_gpu();
    let opts = EmitOptions::default();
    for op in Op::CONV_ALL {
        let s = conv_spec(op, p.clone(), g, Dim::Fixed(3), Dim::Fixed(16));
        for strategy in [Strategy::Table, Strategy::Unrolled] {
            match emit(&s, strategy, &gpu, &opts) {
                Err(BackendError::Unsupported { reason, .. }) => {
                    assert!(reason.contains("only the generic kernel"), "{reason}")
                }
                other => panic!("{op} {strategy}: {other:?}"),
            }
        }
    }
    // 2 x 40000 x 40000 input features: more than an int holds
    let huge = sparse_ir::ConvGeometry {
        in_channels: 2,
        height: 40_000,
        width: 40_000,
        kernel: 1,
        stride: 1,
        padding: 0,
    };
    let s = conv_spec(
        Op::CONV,
        Pattern::dense(1, 2).unwrap(),
        huge,
        Dim::Any,
        Dim::Any,
    );
    let e = emit(&s, Strategy::Csr, &gpu, &opts)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("C·H·W") && e.contains("does not fit an int"),
        "{e}"
    );
    // 1000 x 1000 features fit, times a fixed ld of 4096 do not
    let wide = sparse_ir::ConvGeometry {
        in_channels: 1,
        height: 1000,
        width: 1000,
        kernel: 1,
        stride: 1,
        padding: 0,
    };
    let p = Pattern::dense(1, 1).unwrap();
    let s = conv_spec(Op::ConvT, p.clone(), wide, Dim::Fixed(1), Dim::Fixed(4096));
    let e = emit(&s, Strategy::Csr, &gpu, &opts)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("·ld") && e.contains("does not fit an int"),
        "{e}"
    );
    let s = conv_spec(Op::ConvT, p, wide, Dim::Fixed(1), Dim::Fixed(2048));
    emit_ok(&s, Strategy::Csr, &gpu);
}

#[test]
fn snapshot_unrolled_spmm_bias_relu_cpu() {
    let s = spec(
        "fc1",
        Op::Spmm {
            bias: true,
            relu: true,
        },
        small(),
        Dim::Fixed(4),
        Dim::Fixed(16),
    );
    insta::assert_snapshot!(emit_ok(&s, Strategy::Unrolled, &DeviceProfile::pocl_cpu()).listing());
}

#[test]
fn snapshot_table_spmm_t_gpu() {
    let s = spec("fc1", Op::SpmmT, small(), Dim::Any, Dim::Any);
    insta::assert_snapshot!(emit_ok(&s, Strategy::Table, &DeviceProfile::nvidia_gpu()).listing());
}

#[test]
fn snapshot_unrolled_sddmm_gpu() {
    let s = spec("fc1", Op::Sddmm, small(), Dim::Fixed(4), Dim::Fixed(16));
    insta::assert_snapshot!(
        emit_ok(&s, Strategy::Unrolled, &DeviceProfile::nvidia_gpu()).listing()
    );
}

#[test]
fn snapshot_csr_library_cpu() {
    insta::assert_snapshot!(csr_library(&DeviceProfile::pocl_cpu()));
}
