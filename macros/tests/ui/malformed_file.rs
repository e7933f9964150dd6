macros::sparse_kernel! {
    name = k,
    op = spmm,
    batch = any,
    mask_file = "masks/garbage.npy",
}
fn main() {}
