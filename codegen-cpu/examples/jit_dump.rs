//! Prints the CLIF and the machine code listing of the JIT functions of a small random layer.
//!
//! ```sh
//! cargo run --release -p codegen-cpu --example jit_dump -- [OP] [ROWS] [COLS] [DENSITY] [BATCH] [LD]
//! # e.g.  jit_dump "spmm(bias,relu)" 4 16 0.3 8 16
//! ```

use std::sync::Arc;

use codegen_cpu::jit::{JitKernel, JitOptions};
use sparse_ir::{Dim, KernelSpec, Op, Pattern};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize, default: &str| args.get(i).cloned().unwrap_or_else(|| default.into());
    let op: Op = arg(0, "spmm").parse()?;
    let rows: usize = arg(1, "3").parse()?;
    let cols: usize = arg(2, "16").parse()?;
    let density: f64 = arg(3, "0.3").parse()?;
    let batch: usize = arg(4, "1").parse()?;
    let ld: usize = arg(5, &batch.to_string()).parse()?;
    let pattern = Arc::new(Pattern::random(rows, cols, density, 1)?);
    let spec = KernelSpec::new("dump", op, pattern, Dim::Fixed(batch), Dim::Fixed(ld))?;
    let options = JitOptions {
        capture_clif: true,
        capture_disasm: true,
        ..JitOptions::default()
    };
    let kernel = JitKernel::compile_with(&spec, &options)?;
    println!("; {:?}", kernel.stats());
    for f in kernel.functions() {
        println!(
            "; function {} rows {:?} nnz {:?}, {} bytes",
            f.index, f.rows, f.nnz, f.code_bytes
        );
        println!("{}", f.clif.unwrap_or(""));
        println!("{}", f.disasm.unwrap_or(""));
    }
    Ok(())
}
