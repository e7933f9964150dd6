//! `kernel-dump`: shows what sparsejit generates for a mask. See `kernel-dump --help`.

use clap::Parser;

fn main() {
    // `kernel-dump … | head` ends quietly when `head` exits, instead of panicking on the
    // closed pipe.
    sigpipe::reset();
    let cli = kernel_dump::Cli::parse();
    // One line naming the problem, exit status 1; no backtrace, even with RUST_BACKTRACE set.
    if let Err(e) = kernel_dump::run(&cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
