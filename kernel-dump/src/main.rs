//! `kernel-dump`: shows what sparsejit generates for a mask. See `kernel-dump --help`.

use clap::Parser;

fn main() -> anyhow::Result<()> {
    let cli = kernel_dump::Cli::parse();
    kernel_dump::run(&cli)
}
