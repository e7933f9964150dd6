//! The `sparse_kernel!` proc macro (not written yet: see issue 6).
