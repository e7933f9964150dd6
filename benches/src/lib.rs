//! Benchmarks of sparsejit kernels (kernel-bench and criterion benches).
