macros::sparse_kernel! {
    name = k,
    op = sddmm,
    batch = 1,
    mask = [[1]],
}
fn main() {}
