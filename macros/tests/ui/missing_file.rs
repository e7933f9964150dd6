macros::sparse_kernel! {
    name = k,
    op = spmm,
    batch = any,
    mask_file = "masks/does_not_exist.npy",
}
fn main() {}
