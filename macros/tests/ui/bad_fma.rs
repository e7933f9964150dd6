macros::sparse_kernel! {
    name = k,
    op = spmm,
    batch = 1,
    mask = [[1]],
    fma = yes,
}
fn main() {}
