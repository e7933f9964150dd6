//! Loading IDX directories: the vendored MNIST (gzip) with its constants and the reference's
//! split, and any other IDX directory (raw files) normalised with its own statistics.

use std::fs;
use std::path::Path;

use runtime::{Dataset, Matrix, Shape, Split};

fn idx(dims: &[u32], data: &[u8]) -> Vec<u8> {
    let mut v = vec![0, 0, 8, dims.len() as u8];
    for d in dims {
        v.extend(d.to_be_bytes());
    }
    v.extend(data);
    v
}

#[test]
fn vendored_mnist() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/mnist");
    let ds = Dataset::load_dir(&dir).unwrap();
    assert!(ds.is_mnist());
    assert_eq!(ds.normalization(), (0.1307, 0.3081));
    assert_eq!(ds.shape(), Shape::image(1, 28, 28));
    assert_eq!(ds.classes(), 10);
    assert_eq!(
        (
            ds.len(Split::Train),
            ds.len(Split::Validation),
            ds.len(Split::Test)
        ),
        (54_000, 6_000, 10_000)
    );
    // The validation split is the last 6,000 training images: the first training label of
    // MNIST is 5, and the canonical per-class counts of the test labels hold.
    assert_eq!(ds.label(Split::Train, 0), 5);
    let mut counts = [0usize; 10];
    for i in 0..10_000 {
        counts[ds.label(Split::Test, i) as usize] += 1;
    }
    assert_eq!(
        counts,
        [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    );
    let mut m = Matrix::zeros(784, 3);
    let mut labels = [0u32; 3];
    ds.gather(Split::Train, &[0, 1, 2], &mut m, &mut labels)
        .unwrap();
    let background = (0.0 - 0.1307) / 0.3081;
    assert!(
        (m.get(0, 0) - background).abs() < 1e-6,
        "corner pixel is background"
    );
    let max = (0..784).map(|f| m.get(f, 0)).fold(f32::MIN, f32::max);
    assert!((max - (1.0 - 0.1307) / 0.3081).abs() < 1e-5, "{max}");
}

#[test]
fn other_idx_directories_use_their_own_statistics() {
    let dir = tempfile::tempdir().unwrap();
    let (n, t) = (50u32, 10u32);
    let pixels = |count: u32, salt: u32| -> Vec<u8> {
        (0..count * 16)
            .map(|i| ((i * 37 + salt) % 251) as u8)
            .collect()
    };
    let train = pixels(n, 1);
    fs::write(
        dir.path().join("train-images-idx3-ubyte"),
        idx(&[n, 4, 4], &train),
    )
    .unwrap();
    let labels: Vec<u8> = (0..n).map(|i| (i % 3) as u8).collect();
    fs::write(
        dir.path().join("train-labels-idx1-ubyte"),
        idx(&[n], &labels),
    )
    .unwrap();
    fs::write(
        dir.path().join("t10k-images-idx3-ubyte"),
        idx(&[t, 4, 4], &pixels(t, 2)),
    )
    .unwrap();
    let tl: Vec<u8> = (0..t).map(|i| (i % 3) as u8).collect();
    fs::write(dir.path().join("t10k-labels-idx1-ubyte"), idx(&[t], &tl)).unwrap();
    let ds = Dataset::load_dir(dir.path()).unwrap();
    assert!(!ds.is_mnist());
    assert_eq!(ds.classes(), 3);
    assert_eq!(ds.shape(), Shape::image(1, 4, 4));
    assert_eq!((ds.len(Split::Train), ds.len(Split::Validation)), (45, 5));
    let x: Vec<f64> = train.iter().map(|&p| p as f64 / 255.0).collect();
    let mean = x.iter().sum::<f64>() / x.len() as f64;
    let std = (x.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / x.len() as f64).sqrt();
    let (m, s) = ds.normalization();
    assert!((m as f64 - mean).abs() < 1e-6 && (s as f64 - std).abs() < 1e-6);
}

#[test]
fn a_training_label_beyond_the_test_sets_classes_is_an_error() {
    // Classes are the test set's largest label + 1; one stray training label of 200 used to
    // make a 201-class model.
    let dir = tempfile::tempdir().unwrap();
    let (n, t) = (20u32, 6u32);
    let pixels = |count: u32| -> Vec<u8> { (0..count * 4).map(|i| (i * 37 % 251) as u8).collect() };
    fs::write(
        dir.path().join("train-images-idx3-ubyte"),
        idx(&[n, 2, 2], &pixels(n)),
    )
    .unwrap();
    fs::write(
        dir.path().join("t10k-images-idx3-ubyte"),
        idx(&[t, 2, 2], &pixels(t)),
    )
    .unwrap();
    let tl: Vec<u8> = (0..t).map(|i| (i % 3) as u8).collect();
    fs::write(dir.path().join("t10k-labels-idx1-ubyte"), idx(&[t], &tl)).unwrap();
    let write_train = |labels: &[u8]| {
        fs::write(
            dir.path().join("train-labels-idx1-ubyte"),
            idx(&[n], labels),
        )
        .unwrap();
    };
    let mut labels: Vec<u8> = (0..n).map(|i| (i % 3) as u8).collect();
    write_train(&labels);
    assert_eq!(Dataset::load_dir(dir.path()).unwrap().classes(), 3);
    for (i, part) in [(7, "training"), (19, "validation")] {
        labels[i] = 200;
        write_train(&labels);
        let e = Dataset::load_dir(dir.path()).unwrap_err().to_string();
        assert!(
            e.contains("train-labels-idx1-ubyte")
                && e.contains(&format!("label 200 of sample {i} (a {part} sample)"))
                && e.contains("not below the 3 classes of the test set"),
            "{e}"
        );
        labels[i] = 0;
    }
    // A label equal to the number of classes is beyond them too.
    labels[3] = 3;
    write_train(&labels);
    let e = Dataset::load_dir(dir.path()).unwrap_err().to_string();
    assert!(e.contains("label 3 of sample 3"), "{e}");
}
