macros::sparse_kernel! {
    name = k,
    op = spmm,
    batch = any,
    mask_file = "masks/value_two_3x3.npy",
}
fn main() {}
