//! The models the trainer ships, built through the runtime's public API: LeNet-300-100 and
//! LeNet-5 (Caffe variant) have the reference's layers, shapes and parameter counts, PyTorch's
//! default initialisation, and train on the CPU backend.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use runtime::models::{lenet300_100, lenet5};
use runtime::{ExecOptions, Executor, Model, Sgd, SgdConfig, Shape, WeightGradMode};

fn mnist() -> Shape {
    Shape::image(1, 28, 28)
}

/// Each sparse layer's name and weight shape.
fn layer_shapes(model: &Model) -> Vec<(String, Vec<usize>)> {
    model
        .sparse_layers()
        .map(|w| (w.name().to_string(), w.shape().to_vec()))
        .collect()
}

/// Weights and biases, as PyTorch counts them (the model is built dense).
fn parameters(model: &Model) -> usize {
    model
        .sparse_layers()
        .map(|w| w.nnz() + w.bias().len())
        .sum()
}

#[test]
fn lenet300_100_layers_and_parameters() {
    let model = lenet300_100(mnist(), 10)
        .build(100, &mut ChaCha8Rng::seed_from_u64(1))
        .unwrap();
    assert_eq!(
        layer_shapes(&model),
        [
            ("fc1".to_string(), vec![300, 784]),
            ("fc2".to_string(), vec![100, 300]),
            ("fc3".to_string(), vec![10, 100]),
        ]
    );
    assert_eq!(parameters(&model), 266_610, "PyTorch's parameter count");
    assert_eq!(model.maskable(), 266_200);
    let relu: Vec<bool> = model.sparse_layers().map(|w| w.relu()).collect();
    assert_eq!(relu, [true, true, false], "ReLU fused into fc1 and fc2");
    assert_eq!(model.layers().len(), 3);
    assert_eq!(model.ld(), 112, "batch 100 padded to 16 floats");
}

#[test]
fn lenet5_layers_and_parameters() {
    let model = lenet5(mnist(), 10)
        .build(4, &mut ChaCha8Rng::seed_from_u64(2))
        .unwrap();
    assert_eq!(
        layer_shapes(&model),
        [
            ("conv1".to_string(), vec![20, 1, 5, 5]),
            ("conv2".to_string(), vec![50, 20, 5, 5]),
            ("fc3".to_string(), vec![500, 800]),
            ("fc4".to_string(), vec![10, 500]),
        ]
    );
    assert_eq!(parameters(&model), 431_080, "PyTorch's parameter count");
    let shapes: Vec<Shape> = model.layers().iter().map(|l| l.output_shape()).collect();
    assert_eq!(
        shapes,
        [
            Shape::image(20, 24, 24),
            Shape::image(20, 12, 12),
            Shape::image(50, 8, 8),
            Shape::image(50, 4, 4),
            Shape::flat(500),
            Shape::flat(10),
        ]
    );
}

#[test]
fn kaiming_uniform_initialisation() {
    let model = lenet300_100(mnist(), 10)
        .build(10, &mut ChaCha8Rng::seed_from_u64(3))
        .unwrap();
    for w in model.sparse_layers() {
        let bound = 1.0 / (w.cols() as f32).sqrt();
        let values = w.values();
        assert!(values.iter().chain(w.bias()).all(|v| v.abs() <= bound));
        let n = values.len() as f64;
        let mean = values.iter().map(|&v| v as f64).sum::<f64>() / n;
        let var = values
            .iter()
            .map(|&v| (v as f64 - mean).powi(2))
            .sum::<f64>()
            / n;
        let want = bound as f64 / 3f64.sqrt();
        assert!(
            mean.abs() < 0.05 * bound as f64,
            "{}: mean {mean}",
            w.name()
        );
        assert!(
            (var.sqrt() - want).abs() < 0.05 * want,
            "{}: std {} vs {want}",
            w.name(),
            var.sqrt()
        );
    }
}

/// A few SGD steps on one fixed batch lower LeNet-5's loss on it (conv path, CPU backend).
#[test]
fn lenet5_trains_on_the_cpu_backend() {
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let batch = 8;
    let mut model = lenet5(mnist(), 10).build(batch, &mut rng).unwrap();
    let exec = Executor::new(ExecOptions {
        threads: 2,
        ..ExecOptions::default()
    })
    .unwrap();
    model.compile(&exec).unwrap();
    for f in 0..784 {
        for b in 0..batch {
            model.input_mut().set(f, b, rng.random_range(-0.5..2.0));
        }
    }
    let labels: Vec<u32> = (0..batch as u32).map(|b| b % 10).collect();
    model.labels_mut().copy_from_slice(&labels);
    let sgd = Sgd::new(SgdConfig::default());
    let first = model
        .forward_backward(batch, WeightGradMode::Dense)
        .unwrap();
    sgd.step(&mut model, 0.01);
    let mut last = first;
    for _ in 0..20 {
        last = model
            .forward_backward(batch, WeightGradMode::Active)
            .unwrap();
        sgd.step(&mut model, 0.01);
    }
    assert!(last < 0.85 * first, "loss {first} → {last}");
}
