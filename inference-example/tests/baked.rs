//! The kernels baked from the exported model agree with the interpreter, and the network
//! classifies MNIST.

use std::sync::Arc;

use inference_example::{accuracy, fc1, fc2, fc3, Biases, Lenet, TestSet, MNIST_DIR, MODEL_FILE};
use sparse_ir::mask_io::{read_f32_tensor, read_mask};
use sparse_ir::{Args, Dim, KernelSpec, Op, Pattern};
use test_support::{Operands, Run};

type Infer = fn(&[f32], &[f32], &mut [f32], usize, usize) -> Result<(), String>;

/// The layer's pattern and CSR values as read from the model file by `sparse_ir::mask_io`.
fn layer_from_file(layer: &str) -> (Arc<Pattern>, Vec<f32>) {
    let mask = read_mask(MODEL_FILE, Some(&format!("{layer}.mask"))).unwrap();
    let w = read_f32_tensor(MODEL_FILE, Some(&format!("{layer}.weight"))).unwrap();
    let p = mask.pattern;
    let cols = p.cols();
    let mut vals = Vec::with_capacity(p.nnz());
    for r in 0..p.rows() {
        for k in p.row_ptr()[r]..p.row_ptr()[r + 1] {
            vals.push(w.data[r * cols + p.col_idx()[k as usize] as usize]);
        }
    }
    (Arc::new(p), vals)
}

fn check_layer(
    layer: &str,
    relu: bool,
    baked: &[f32],
    row_ptr: &[u32],
    col_idx: &[u32],
    infer: Infer,
) {
    let (pattern, vals) = layer_from_file(layer);
    assert_eq!(pattern.row_ptr(), row_ptr, "{layer}: baked row_ptr");
    assert_eq!(pattern.col_idx(), col_idx, "{layer}: baked col_idx");
    assert_eq!(vals, baked, "{layer}: baked values");
    let bias = read_f32_tensor(MODEL_FILE, Some(&format!("{layer}.bias")))
        .unwrap()
        .data;
    let op = Op::Spmm { bias: true, relu };
    let spec = KernelSpec::new(layer, op, pattern.clone(), Dim::Any, Dim::Any).unwrap();
    // Guarded operands (test-support) with the layer's own values and bias: the tolerance,
    // guard zones, inputs unchanged and padding untouched.
    for (seed, (batch, ld)) in [(1, 1), (1, 16), (3, 3), (17, 20), (100, 112), (128, 128)]
        .into_iter()
        .enumerate()
    {
        let run = Run::new(batch, ld, seed as u64 + 10).offset(seed * 5);
        let mut operands = Operands::new(&spec, run)
            .with_values(&vals)
            .with_bias(&bias);
        let want = operands.reference(&spec).unwrap();
        let Args::Spmm { x, bias, y, .. } = operands.args() else {
            unreachable!()
        };
        infer(x, bias.unwrap(), y, batch, ld).unwrap();
        if let Err(m) = operands.verify(&want, false) {
            panic!("{}: {m}", test_support::describe(&spec, run));
        }
    }
}

#[test]
fn baked_kernels_agree_with_the_interpreter() {
    check_layer(
        "fc1",
        true,
        &fc1::VALUES,
        &fc1::ROW_PTR,
        &fc1::COL_IDX,
        |x, b, y, n, ld| fc1::infer(x, b, y, n, ld).map_err(|e| e.to_string()),
    );
    check_layer(
        "fc2",
        true,
        &fc2::VALUES,
        &fc2::ROW_PTR,
        &fc2::COL_IDX,
        |x, b, y, n, ld| fc2::infer(x, b, y, n, ld).map_err(|e| e.to_string()),
    );
    check_layer(
        "fc3",
        false,
        &fc3::VALUES,
        &fc3::ROW_PTR,
        &fc3::COL_IDX,
        |x, b, y, n, ld| fc3::infer(x, b, y, n, ld).map_err(|e| e.to_string()),
    );
}

#[test]
fn bad_lengths_are_errors_not_panics() {
    let biases = Biases::load(MODEL_FILE).unwrap();
    let mut net = Lenet::new(biases, 4);
    let mut logits = vec![0.0; 10 * 4];
    let err = net.forward(&[0.0; 10], 1, &mut logits).unwrap_err();
    assert!(err.to_string().contains("fc1"), "{err}");
    let err = net
        .forward(&vec![0.0; 784 * 4], 5, &mut logits)
        .unwrap_err();
    assert!(err.to_string().contains("fc1"), "{err}");
    assert!(Biases::load("no/such/model.safetensors").is_err());
}

#[test]
fn accuracy_on_the_first_1000_test_images() {
    let test = TestSet::load(MNIST_DIR).unwrap();
    assert_eq!(test.len(), 10_000);
    let biases = Biases::load(MODEL_FILE).unwrap();
    for ld in [1, 100] {
        let mut net = Lenet::new(biases.clone(), ld);
        let acc = accuracy(&mut net, &test, 1000).unwrap();
        assert!(acc > 0.9, "accuracy {acc} at batch {ld}");
    }
}
