//! Training runtime of sparsejit (not written yet: see issue 4).
