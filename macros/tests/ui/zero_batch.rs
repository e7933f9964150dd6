macros::sparse_kernel! {
    name = k,
    op = spmm,
    batch = 0,
    mask = [[1]],
}
fn main() {}
