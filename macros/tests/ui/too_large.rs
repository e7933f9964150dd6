macros::sparse_kernel! {
    name = k,
    op = spmm,
    batch = any,
    mask_file = "masks/too_large_300x300.npy",
}
fn main() {}
