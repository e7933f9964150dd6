//! CPU backend of sparsejit (in progress: see issue 3).

pub mod jit;
