//! OpenCL backend of sparsejit (not written yet: see issue 5).
