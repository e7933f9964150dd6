macros::sparse_kernel! {
    name = k,
    op = spmm,
    batch = 1,
    mask = [[0, 1, 0], [1, 0]],
}
fn main() {}
