macros::sparse_kernel! {
    name = k,
    op = spmm,
    batch = any,
    mask_file = "../../../../macros/tests/masks/garbage.npy",
}
fn main() {}
