macros::sparse_kernel! {
    name = k,
    op = spmm,
    batch = any,
    mask_file = "masks/fc2_100x300_5pct.npy",
    values_file = "masks/conv_4x2x3x3.safetensors",
    values_tensor = "conv.weight",
}
fn main() {}
