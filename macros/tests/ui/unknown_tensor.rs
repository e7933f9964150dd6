macros::sparse_kernel! {
    name = k,
    op = spmm,
    batch = any,
    mask_file = "masks/conv_4x2x3x3.safetensors",
    tensor = "fc1.mask",
}
fn main() {}
