//! LeNet-300-100 inference with every layer's mask and weights baked into the binary at
//! compile time by `sparse_kernel!`.
//!
//! The model is `model/lenet300_5pct.safetensors`, exported from a `sparse-train` checkpoint
//! by `scripts/export_model.py` (which documents the run). The three kernels below are
//! generated from its `fc{1,2,3}.mask` and `fc{1,2,3}.weight`; the biases are read from the
//! same file at run time ([`Biases::load`]). Layout is the project's feature-major one:
//! activations are `[features × ld]`, sample `b` in column `b`.
//!
//! The three kernels hold 13,297 nonzeros; rustc compiles them in seconds (see `RESULTS.md`).
//! They are generated with `fma = true`: this workspace builds with the `fma` target feature
//! (`.cargo/config.toml`), so their fused multiply-add version runs.

use std::path::{Path, PathBuf};

use macros::sparse_kernel;
use thiserror::Error;

sparse_kernel! {
    name = fc1,
    op = spmm(bias, relu),
    batch = any,
    mask_file = "model/lenet300_5pct.safetensors",
    tensor = "fc1.mask",
    values_file = "model/lenet300_5pct.safetensors",
    values_tensor = "fc1.weight",
    fma = true,
}

sparse_kernel! {
    name = fc2,
    op = spmm(bias, relu),
    batch = any,
    mask_file = "model/lenet300_5pct.safetensors",
    tensor = "fc2.mask",
    values_file = "model/lenet300_5pct.safetensors",
    values_tensor = "fc2.weight",
    fma = true,
}

sparse_kernel! {
    name = fc3,
    op = spmm(bias),
    batch = any,
    mask_file = "model/lenet300_5pct.safetensors",
    tensor = "fc3.mask",
    values_file = "model/lenet300_5pct.safetensors",
    values_tensor = "fc3.weight",
    fma = true,
}

/// The model file the kernels were baked from (absolute path, fixed at compile time).
pub const MODEL_FILE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/model/lenet300_5pct.safetensors"
);

/// The MNIST directory of the repository (`data/mnist`).
pub const MNIST_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../data/mnist");

/// Input features (28×28 pixels).
pub const INPUTS: usize = fc1::COLS;
/// Classes.
pub const CLASSES: usize = fc3::ROWS;

/// MNIST's normalisation: pixels become `(x/255 − MEAN)/STD`.
pub const MEAN: f32 = 0.1307;
/// See [`MEAN`].
pub const STD: f32 = 0.3081;

/// Errors of loading the model's biases or the test set, or of running the network.
#[derive(Debug, Error)]
pub enum Error {
    /// The model file could not be read.
    #[error("model {path}: {message}")]
    Model {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// A bias has the wrong length for its layer.
    #[error(
        "model {path}: {layer}.bias has {got} elements, the baked layer has {expected} outputs"
    )]
    BiasShape {
        /// The file.
        path: PathBuf,
        /// The layer.
        layer: &'static str,
        /// Outputs of the baked layer.
        expected: usize,
        /// Elements of the bias.
        got: usize,
    },
    /// The MNIST test files could not be read or are inconsistent.
    #[error("MNIST test set in {dir}: {message}")]
    Data {
        /// The directory.
        dir: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// A baked kernel refused its arguments.
    #[error("layer {layer}: {message}")]
    Kernel {
        /// The layer.
        layer: &'static str,
        /// The kernel's error.
        message: String,
    },
}

/// The biases of the three layers.
#[derive(Debug, Clone, PartialEq)]
pub struct Biases {
    /// `fc1.bias` (300).
    pub fc1: Vec<f32>,
    /// `fc2.bias` (100).
    pub fc2: Vec<f32>,
    /// `fc3.bias` (10).
    pub fc3: Vec<f32>,
}

impl Biases {
    /// Reads `fc{1,2,3}.bias` from a model file and checks them against the baked layers.
    pub fn load(path: impl AsRef<Path>) -> Result<Self, Error> {
        let path = path.as_ref();
        let read = |layer: &'static str, expected: usize| -> Result<Vec<f32>, Error> {
            let t = sparse_ir::mask_io::read_f32_tensor(path, Some(&format!("{layer}.bias")))
                .map_err(|e| Error::Model {
                    path: path.to_path_buf(),
                    message: e.to_string(),
                })?;
            if t.data.len() != expected {
                return Err(Error::BiasShape {
                    path: path.to_path_buf(),
                    layer,
                    expected,
                    got: t.data.len(),
                });
            }
            Ok(t.data)
        };
        Ok(Biases {
            fc1: read("fc1", fc1::ROWS)?,
            fc2: read("fc2", fc2::ROWS)?,
            fc3: read("fc3", fc3::ROWS)?,
        })
    }
}

/// The network with its activation buffers, for batches of up to `ld` samples.
#[derive(Debug, Clone)]
pub struct Lenet {
    biases: Biases,
    ld: usize,
    h1: Vec<f32>,
    h2: Vec<f32>,
}

impl Lenet {
    /// A network for batches of at most `ld` samples (row stride `ld`).
    pub fn new(biases: Biases, ld: usize) -> Self {
        Lenet {
            biases,
            ld,
            h1: vec![0.0; fc1::ROWS * ld],
            h2: vec![0.0; fc2::ROWS * ld],
        }
    }

    /// The row stride of the inputs and logits.
    pub fn ld(&self) -> usize {
        self.ld
    }

    /// Logits (`10 × ld`) of the `batch` samples in columns `0..batch` of `x` (`784 × ld`,
    /// normalised).
    pub fn forward(&mut self, x: &[f32], batch: usize, logits: &mut [f32]) -> Result<(), Error> {
        let ld = self.ld;
        fc1::infer(x, &self.biases.fc1, &mut self.h1, batch, ld).map_err(|e| Error::Kernel {
            layer: "fc1",
            message: e.to_string(),
        })?;
        fc2::infer(&self.h1, &self.biases.fc2, &mut self.h2, batch, ld).map_err(|e| {
            Error::Kernel {
                layer: "fc2",
                message: e.to_string(),
            }
        })?;
        fc3::infer(&self.h2, &self.biases.fc3, logits, batch, ld).map_err(|e| Error::Kernel {
            layer: "fc3",
            message: e.to_string(),
        })?;
        Ok(())
    }
}

/// The index of the largest logit of column `b` (the first on ties).
pub fn argmax(logits: &[f32], b: usize, ld: usize) -> usize {
    let mut best = 0;
    for c in 1..CLASSES {
        if logits[c * ld + b] > logits[best * ld + b] {
            best = c;
        }
    }
    best
}

/// The MNIST test set, normalised, sample-major (`images[i*784..(i+1)*784]`).
#[derive(Debug, Clone)]
pub struct TestSet {
    /// Normalised pixels, 784 per sample.
    pub images: Vec<f32>,
    /// Labels, 0..=9.
    pub labels: Vec<u8>,
}

impl TestSet {
    /// Reads `t10k-images-idx3-ubyte[.gz]` and `t10k-labels-idx1-ubyte[.gz]` from `dir`.
    pub fn load(dir: impl AsRef<Path>) -> Result<Self, Error> {
        let dir = dir.as_ref();
        let data_err = |message: String| Error::Data {
            dir: dir.to_path_buf(),
            message,
        };
        let find = |stem: &str| -> Result<PathBuf, Error> {
            [format!("{stem}.gz"), stem.to_string()]
                .into_iter()
                .map(|n| dir.join(n))
                .find(|p| p.is_file())
                .ok_or_else(|| data_err(format!("no {stem}[.gz]")))
        };
        let images = runtime::data::read_idx(&find("t10k-images-idx3-ubyte")?)
            .map_err(|e| data_err(e.to_string()))?;
        let labels = runtime::data::read_idx(&find("t10k-labels-idx1-ubyte")?)
            .map_err(|e| data_err(e.to_string()))?;
        if images.dims.len() != 3 || images.dims[1] * images.dims[2] != INPUTS {
            return Err(data_err(format!(
                "images have dimensions {:?}, expected [n, 28, 28]",
                images.dims
            )));
        }
        if labels.dims != [images.dims[0]] {
            return Err(data_err(format!(
                "{} images but labels of dimensions {:?}",
                images.dims[0], labels.dims
            )));
        }
        if let Some(&l) = labels.data.iter().find(|&&l| l as usize >= CLASSES) {
            return Err(data_err(format!("label {l} is not a digit")));
        }
        let images = images
            .data
            .iter()
            .map(|&p| (p as f32 / 255.0 - MEAN) / STD)
            .collect();
        Ok(TestSet {
            images,
            labels: labels.data,
        })
    }

    /// Number of samples.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Writes samples `start..start+n` into columns `0..n` of the feature-major `x`
    /// (`784 × ld`).
    pub fn gather(&self, start: usize, n: usize, x: &mut [f32], ld: usize) {
        for b in 0..n {
            let img = &self.images[(start + b) * INPUTS..(start + b + 1) * INPUTS];
            for (f, &v) in img.iter().enumerate() {
                x[f * ld + b] = v;
            }
        }
    }
}

/// Accuracy of `net` on the first `n` test samples, in batches of `net.ld()`.
pub fn accuracy(net: &mut Lenet, test: &TestSet, n: usize) -> Result<f64, Error> {
    let ld = net.ld();
    let n = n.min(test.len());
    let mut x = vec![0.0; INPUTS * ld];
    let mut logits = vec![0.0; CLASSES * ld];
    let mut correct = 0usize;
    let mut start = 0;
    while start < n {
        let batch = ld.min(n - start);
        test.gather(start, batch, &mut x, ld);
        net.forward(&x, batch, &mut logits)?;
        correct += (0..batch)
            .filter(|&b| argmax(&logits, b, ld) == test.labels[start + b] as usize)
            .count();
        start += batch;
    }
    Ok(correct as f64 / n.max(1) as f64)
}
