//! Data sets in the IDX format (MNIST and its drop-ins), CIFAR-10's binary version and
//! CIFAR-shaped synthetic data (`cifar`), the reference's split and normalisation, cheap
//! batch gathering into the feature-major input buffer, and the reference's CIFAR-10
//! augmentation ([`Augmentation`]).
//!
//! A data directory holds `train-images-idx3-ubyte`, `train-labels-idx1-ubyte`,
//! `t10k-images-idx3-ubyte` and `t10k-labels-idx1-ubyte`, each raw or gzip-compressed (`.gz`;
//! compression is detected from the content). Pixels become `x/255`, then `(x − mean)/std`:
//! MNIST's own constants (0.1307, 0.3081) for MNIST (recognised by its exact pixel sums), the
//! training set's own mean and standard deviation for anything else (Fashion-MNIST, …).
//!
//! The split is the reference's: the first `⌊0.9·n⌋` training images train (54,000 of
//! MNIST's 60,000), the rest validate; the test images are evaluated at the end.
//!
//! The classes are the test set's largest label + 1 (10 for MNIST); a training or validation
//! label at or beyond that is an error naming the file and the sample.
//!
//! Every file is read header first: the data length its dimensions declare is checked
//! against the machine's memory budget ([`sparse_ir::limits`]) before anything is allocated,
//! and at most that length plus one byte is read (inflated, for gzip), so a file longer or
//! shorter than its header declares is an error, and a small gzip bomb is found without
//! inflating it.

use std::io::{BufRead, Read};
use std::path::{Path, PathBuf};

use sparse_ir::limits::{bytes_of, MemoryBudget};

use crate::error::{Result, RuntimeError};
use crate::tensor::{Matrix, Shape};

mod augment;
mod cifar;

pub(crate) use augment::splitmix64;
pub use augment::{step_key, Augmentation};
pub use cifar::{
    CIFAR10_CLASSES, CIFAR10_RECORD, CIFAR10_SHAPE, CIFAR10_TEST_FILE, CIFAR10_TRAIN_FILES,
};

/// Where a [`Dataset`]'s samples came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DataSource {
    /// MNIST's IDX files (recognised by their pixel statistics).
    Mnist,
    /// Other IDX files (Fashion-MNIST, …).
    Idx,
    /// CIFAR-10's binary version.
    Cifar10,
    /// CIFAR-shaped random data ([`Dataset::synthetic`]).
    Synthetic,
    /// Samples given in memory ([`Dataset::from_parts`]).
    Memory,
}

impl DataSource {
    /// A short name: `mnist`, `idx`, `cifar10`, `synthetic` or `memory`.
    pub fn name(self) -> &'static str {
        match self {
            DataSource::Mnist => "mnist",
            DataSource::Idx => "idx",
            DataSource::Cifar10 => "cifar10",
            DataSource::Synthetic => "synthetic",
            DataSource::Memory => "memory",
        }
    }
}

/// MNIST's normalisation constants (mean and standard deviation of its training pixels).
pub const MNIST_MEAN: f32 = 0.1307;
/// See [`MNIST_MEAN`].
pub const MNIST_STD: f32 = 0.3081;
/// The fraction of the training file held out for validation (the reference's 0.1).
pub const VALID_SPLIT: f64 = 0.1;

// Exact statistics of MNIST's 60,000 training images, to recognise them.
const MNIST_PIXELS: u64 = 47_040_000;
const MNIST_PIXEL_SUM: u64 = 1_567_298_545;
const MNIST_PIXEL_SQ_SUM: u64 = 342_590_800_147;

/// An IDX array of unsigned bytes: its dimensions and data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdxArray {
    /// Dimensions, outermost first.
    pub dims: Vec<usize>,
    /// `Π dims` bytes, row-major.
    pub data: Vec<u8>,
}

fn data_err(path: &Path, message: impl Into<String>) -> RuntimeError {
    RuntimeError::Data {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// Reads an IDX file of unsigned bytes (type code 0x08), raw or gzip-compressed. A bad magic
/// number, an unsupported type, a truncated or over-long file, a corrupt gzip stream, or
/// declared dimensions larger than the machine's [`MemoryBudget`] is an error naming the
/// file. See [`read_idx_from`].
pub fn read_idx(path: &Path) -> Result<IdxArray> {
    read_idx_with(path, &MemoryBudget::machine())
}

/// [`read_idx`] with the memory budget `budget`.
pub fn read_idx_with(path: &Path, budget: &MemoryBudget) -> Result<IdxArray> {
    let file = std::fs::File::open(path).map_err(|e| RuntimeError::io(path, e))?;
    let mut file = std::io::BufReader::new(file);
    let gzip = file
        .fill_buf()
        .map_err(|e| RuntimeError::io(path, e))?
        .starts_with(&[0x1f, 0x8b]);
    if gzip {
        let decoder = flate2::bufread::GzDecoder::new(file);
        read_idx_from(decoder, budget).map_err(|e| match e {
            IdxReadError::Io(e) => data_err(path, format!("corrupt or truncated gzip stream: {e}")),
            IdxReadError::Format(m) => data_err(path, m),
        })
    } else {
        read_idx_from(file, budget).map_err(|e| match e {
            IdxReadError::Io(e) => RuntimeError::io(path, e),
            IdxReadError::Format(m) => data_err(path, m),
        })
    }
}

/// Why [`read_idx_from`] failed.
#[derive(Debug)]
pub enum IdxReadError {
    /// Reading the stream failed (for a gzip stream: it is corrupt or truncated).
    Io(std::io::Error),
    /// The content is not a well-formed IDX array of unsigned bytes; the message says why.
    Format(String),
}

/// Reads an IDX array of unsigned bytes from a stream (decompressed already), header first:
/// the data length the header declares is computed with checked arithmetic and checked
/// against `budget` before any of it is allocated, and at most that length plus one byte is
/// read, so a stream longer than its header declares is an error found without reading (or
/// inflating) the rest, and one shorter is an error too.
pub fn read_idx_from(
    mut reader: impl Read,
    budget: &MemoryBudget,
) -> std::result::Result<IdxArray, IdxReadError> {
    let mut head = [0u8; 4];
    let got = read_up_to(&mut reader, &mut head)?;
    if got < 4 {
        return Err(IdxReadError::Format(format!(
            "not an IDX file: {got} bytes, too short for the magic number"
        )));
    }
    let ndims = check_magic(&head).map_err(IdxReadError::Format)?;
    let mut dims_bytes = vec![0u8; 4 * ndims];
    let got = read_up_to(&mut reader, &mut dims_bytes)?;
    if got < dims_bytes.len() {
        return Err(IdxReadError::Format(format!(
            "truncated IDX header: {ndims} dimensions need {} bytes, the file has {}",
            4 + 4 * ndims,
            4 + got
        )));
    }
    let dims: Vec<usize> = dims_bytes
        .chunks_exact(4)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
        .collect();
    let expected = dims
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| IdxReadError::Format(format!("IDX dimensions {dims:?} overflow")))?;
    budget
        .check(
            &format!("IDX dimensions {dims:?} ({expected} data bytes)"),
            bytes_of(&[expected], 1),
        )
        .map_err(|e| IdxReadError::Format(e.to_string()))?;
    let mut data = Vec::with_capacity(expected);
    reader
        .take(expected as u64 + 1)
        .read_to_end(&mut data)
        .map_err(IdxReadError::Io)?;
    if data.len() < expected {
        return Err(IdxReadError::Format(format!(
            "truncated: dimensions {dims:?} need {expected} data bytes, the file has {}",
            data.len()
        )));
    }
    if data.len() > expected {
        return Err(IdxReadError::Format(format!(
            "longer than its header declares: unexpected trailing bytes after the {expected} \
             data bytes of dimensions {dims:?}"
        )));
    }
    Ok(IdxArray { dims, data })
}

/// Fills `buf` from `reader` as far as the stream goes; the number of bytes read.
fn read_up_to(reader: &mut impl Read, buf: &mut [u8]) -> std::result::Result<usize, IdxReadError> {
    let mut n = 0;
    while n < buf.len() {
        match reader.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(IdxReadError::Io(e)),
        }
    }
    Ok(n)
}

/// Checks the magic number of an IDX file of unsigned bytes; the number of dimensions.
fn check_magic(head: &[u8; 4]) -> std::result::Result<usize, String> {
    if head[0] != 0 || head[1] != 0 {
        return Err(format!(
            "not an IDX file: magic number starts with {:02x} {:02x}, expected 00 00",
            head[0], head[1]
        ));
    }
    if head[2] != 0x08 {
        return Err(format!(
            "IDX element type 0x{:02x} is not supported (expected 0x08, unsigned bytes)",
            head[2]
        ));
    }
    match head[3] {
        0 => Err("IDX file declares 0 dimensions".into()),
        n => Ok(n as usize),
    }
}

/// Parses the bytes of an IDX file of unsigned bytes (the checks of [`read_idx_from`], with
/// the machine's memory budget).
pub fn parse_idx(bytes: &[u8]) -> std::result::Result<IdxArray, String> {
    read_idx_from(bytes, &MemoryBudget::machine()).map_err(|e| match e {
        IdxReadError::Io(e) => e.to_string(),
        IdxReadError::Format(m) => m,
    })
}

/// The number of training samples of a training file of `n` samples (the rest validate).
fn split_point(n: usize) -> usize {
    ((1.0 - VALID_SPLIT) * n as f64).floor() as usize
}

/// Which part of the data a batch comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Split {
    /// The training part of the training file.
    Train,
    /// The held-out part of the training file.
    Validation,
    /// The test file.
    Test,
}

/// An image-classification data set held in memory as bytes.
#[derive(Debug, Clone)]
pub struct Dataset {
    dir: PathBuf,
    shape: Shape,
    classes: usize,
    train_images: Vec<u8>,
    train_labels: Vec<u8>,
    test_images: Vec<u8>,
    test_labels: Vec<u8>,
    split_at: usize,
    source: DataSource,
    /// `(mean, std)` of each channel, applied after scaling bytes to `[0, 1]`.
    norm: Vec<(f32, f32)>,
    /// Each channel's byte → normalised value table.
    luts: Vec<[f32; 256]>,
    /// Nonzero pixels of each sample (training file, then test file), when most pixels are
    /// zero: gathering writes the background value and scatters these.
    nonzeros: Option<Nonzeros>,
}

/// The nonzero pixels of every sample, CSR-like: sample `i`'s are `ptr[i]..ptr[i+1]`.
#[derive(Debug, Clone)]
struct Nonzeros {
    train_ptr: Vec<u32>,
    test_ptr: Vec<u32>,
    feature: Vec<u16>,
    value: Vec<u8>,
}

impl Nonzeros {
    /// Built when at most half of the pixels are nonzero and a sample has ≤ 65,536 pixels.
    fn build(train: &[u8], test: &[u8], features: usize) -> Option<Nonzeros> {
        let nonzero = train.iter().chain(test).filter(|&&p| p != 0).count();
        if features > 1 << 16 || nonzero * 2 > train.len() + test.len() {
            return None;
        }
        let mut nz = Nonzeros {
            train_ptr: Vec::with_capacity(train.len() / features + 1),
            test_ptr: Vec::with_capacity(test.len() / features + 1),
            feature: Vec::with_capacity(nonzero),
            value: Vec::with_capacity(nonzero),
        };
        for (images, ptr) in [(train, &mut nz.train_ptr), (test, &mut nz.test_ptr)] {
            ptr.push(nz.feature.len() as u32);
            for sample in images.chunks_exact(features) {
                for (f, &p) in sample.iter().enumerate() {
                    if p != 0 {
                        nz.feature.push(f as u16);
                        nz.value.push(p);
                    }
                }
                ptr.push(nz.feature.len() as u32);
            }
        }
        Some(nz)
    }
}

fn find_file(dir: &Path, stems: &[&str]) -> Result<PathBuf> {
    for stem in stems {
        for ext in ["", ".gz"] {
            let p = dir.join(format!("{stem}{ext}"));
            if p.is_file() {
                return Ok(p);
            }
        }
    }
    Err(data_err(
        &dir.join(stems[0]),
        format!(
            "not found (looked for {} with or without .gz in {})",
            stems.join(", "),
            dir.display()
        ),
    ))
}

fn load_pair(dir: &Path, prefix: &str) -> Result<(PathBuf, IdxArray, PathBuf, IdxArray)> {
    let ip = find_file(
        dir,
        &[
            &format!("{prefix}-images-idx3-ubyte"),
            &format!("{prefix}-images.idx3-ubyte"),
        ],
    )?;
    let lp = find_file(
        dir,
        &[
            &format!("{prefix}-labels-idx1-ubyte"),
            &format!("{prefix}-labels.idx1-ubyte"),
        ],
    )?;
    let images = read_idx(&ip)?;
    let labels = read_idx(&lp)?;
    if images.dims.len() != 3 || images.dims[0] == 0 || images.dims[1] == 0 || images.dims[2] == 0 {
        return Err(data_err(
            &ip,
            format!(
                "expected images of 3 dimensions [count, rows, cols], found {:?}",
                images.dims
            ),
        ));
    }
    if labels.dims.len() != 1 {
        return Err(data_err(
            &lp,
            format!("expected labels of 1 dimension, found {:?}", labels.dims),
        ));
    }
    if labels.dims[0] != images.dims[0] {
        return Err(data_err(
            &lp,
            format!(
                "{} labels for {} images in {}",
                labels.dims[0],
                images.dims[0],
                ip.display()
            ),
        ));
    }
    Ok((ip, images, lp, labels))
}

impl Dataset {
    /// Loads the four IDX files of a directory (see the module doc).
    pub fn load_dir(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(data_err(dir, "data directory not found"));
        }
        let (tip, train_i, tlp, train_l) = load_pair(dir, "train")?;
        let (eip, test_i, elp, test_l) = load_pair(dir, "t10k")?;
        if test_i.dims[1..] != train_i.dims[1..] {
            return Err(data_err(
                &eip,
                format!(
                    "test images are {}x{}, training images {}x{}",
                    test_i.dims[1], test_i.dims[2], train_i.dims[1], train_i.dims[2]
                ),
            ));
        }
        // The classes are the test set's: its largest label + 1 (10 for MNIST). A training or
        // validation label beyond them is an error, not a class of its own: one stray label
        // of 200 would otherwise make a 201-class model.
        let classes = test_l.data.iter().copied().max().unwrap_or(0) as usize + 1;
        if classes < 2 {
            return Err(data_err(&elp, "fewer than 2 classes in the test labels"));
        }
        if let Some((i, &l)) = train_l
            .data
            .iter()
            .enumerate()
            .find(|(_, &l)| l as usize >= classes)
        {
            let part = if i < split_point(train_l.data.len()) {
                "training"
            } else {
                "validation"
            };
            return Err(data_err(
                &tlp,
                format!(
                    "label {l} of sample {i} (a {part} sample) is not below the {classes} \
                     classes of the test set (its largest label + 1, from {})",
                    elp.display()
                ),
            ));
        }
        let shape = Shape::image(1, train_i.dims[1], train_i.dims[2]);
        let n = train_i.dims[0];
        let split_at = split_point(n);
        let (mut sum, mut sq) = (0u64, 0u64);
        for &p in &train_i.data {
            sum += p as u64;
            sq += (p as u64) * (p as u64);
        }
        let count = train_i.data.len() as u64;
        let is_mnist = count == MNIST_PIXELS && sum == MNIST_PIXEL_SUM && sq == MNIST_PIXEL_SQ_SUM;
        let (mean, std) = if is_mnist {
            (MNIST_MEAN, MNIST_STD)
        } else {
            let m = sum as f64 / count as f64 / 255.0;
            let var = sq as f64 / count as f64 / (255.0 * 255.0) - m * m;
            let s = var.max(0.0).sqrt();
            if s == 0.0 {
                return Err(data_err(&tip, "every training pixel has the same value"));
            }
            (m as f32, s as f32)
        };
        tracing::info!(
            dir = %dir.display(),
            train = split_at,
            validation = n - split_at,
            test = test_i.dims[0],
            classes,
            mean,
            std,
            mnist = is_mnist,
            "data loaded"
        );
        Ok(Dataset::assemble(
            dir.to_path_buf(),
            if is_mnist {
                DataSource::Mnist
            } else {
                DataSource::Idx
            },
            shape,
            classes,
            (train_i.data, train_l.data, split_at),
            (test_i.data, test_l.data),
            vec![(mean, std)],
        ))
    }

    /// Builds the set and its lookup tables; the parts are consistent (checked by the
    /// callers).
    pub(crate) fn assemble(
        dir: PathBuf,
        source: DataSource,
        shape: Shape,
        classes: usize,
        (train_images, train_labels, split_at): (Vec<u8>, Vec<u8>, usize),
        (test_images, test_labels): (Vec<u8>, Vec<u8>),
        norm: Vec<(f32, f32)>,
    ) -> Dataset {
        debug_assert_eq!(norm.len(), shape.channels);
        let luts = norm
            .iter()
            .map(|&(mean, std)| {
                let mut lut = [0.0; 256];
                for (i, v) in lut.iter_mut().enumerate() {
                    *v = (i as f32 / 255.0 - mean) / std;
                }
                lut
            })
            .collect();
        // The sparse gather serves single-channel sets of mostly-zero pixels (MNIST).
        let nonzeros = if shape.channels == 1 {
            Nonzeros::build(&train_images, &test_images, shape.features())
        } else {
            None
        };
        Dataset {
            dir,
            shape,
            classes,
            train_images,
            train_labels,
            test_images,
            test_labels,
            split_at,
            source,
            norm,
            luts,
            nonzeros,
        }
    }

    /// A data set from memory (sample-major bytes), for tests and users; the first
    /// `train_count` training samples train, the rest validate.
    #[allow(clippy::too_many_arguments)]
    pub fn from_parts(
        shape: Shape,
        classes: usize,
        train_images: Vec<u8>,
        train_labels: Vec<u8>,
        train_count: usize,
        test_images: Vec<u8>,
        test_labels: Vec<u8>,
        mean: f32,
        std: f32,
    ) -> Result<Self> {
        let f = shape.features();
        let bad = |m: String| RuntimeError::Config(format!("data set: {m}"));
        if train_images.len() != train_labels.len() * f
            || test_images.len() != test_labels.len() * f
        {
            return Err(bad("image and label counts do not match".into()));
        }
        if train_count > train_labels.len() {
            return Err(bad(
                "more training samples than the training set holds".into()
            ));
        }
        if train_labels
            .iter()
            .chain(&test_labels)
            .any(|&l| l as usize >= classes)
        {
            return Err(bad(format!("a label is not below {classes}")));
        }
        Ok(Dataset::assemble(
            PathBuf::new(),
            DataSource::Memory,
            shape,
            classes,
            (train_images, train_labels, train_count),
            (test_images, test_labels),
            vec![(mean, std); shape.channels],
        ))
    }

    /// Keeps only the first `train` training and `eval` validation and test samples (for
    /// quick runs and tests; `None` keeps everything).
    pub fn limit(&mut self, train: Option<usize>, eval: Option<usize>) {
        let f = self.shape.features();
        let (n_train, n_test) = (self.train_labels.len(), self.test_labels.len());
        if let Some(t) = train {
            if t < self.split_at {
                // Drop training samples between t and the split; keep the validation part.
                self.train_images.drain(t * f..self.split_at * f);
                self.train_labels.drain(t..self.split_at);
                self.split_at = t;
            }
        }
        if let Some(e) = eval {
            let val_end = (self.split_at + e).min(self.train_labels.len());
            self.train_images.truncate(val_end * f);
            self.train_labels.truncate(val_end);
            let t = e.min(self.test_labels.len());
            self.test_images.truncate(t * f);
            self.test_labels.truncate(t);
        }
        let changed = (n_train, n_test) != (self.train_labels.len(), self.test_labels.len());
        if changed && self.nonzeros.is_some() {
            self.nonzeros = Nonzeros::build(&self.train_images, &self.test_images, f);
        }
    }

    /// The directory it was loaded from (empty for in-memory sets).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The shape of one sample (`1 × rows × cols`).
    pub fn shape(&self) -> Shape {
        self.shape
    }

    /// Number of classes (largest training label + 1).
    pub fn classes(&self) -> usize {
        self.classes
    }

    /// The normalisation `(mean, std)` of the first channel (the only one of MNIST),
    /// applied after scaling pixels to `[0, 1]`.
    pub fn normalization(&self) -> (f32, f32) {
        self.norm[0]
    }

    /// The normalisation `(mean, std)` of every channel.
    pub fn channel_normalization(&self) -> &[(f32, f32)] {
        &self.norm
    }

    /// Whether this is MNIST (recognised by its pixel statistics).
    pub fn is_mnist(&self) -> bool {
        self.source == DataSource::Mnist
    }

    /// Where the samples came from.
    pub fn source(&self) -> DataSource {
        self.source
    }

    /// Number of samples in a split.
    pub fn len(&self, split: Split) -> usize {
        match split {
            Split::Train => self.split_at,
            Split::Validation => self.train_labels.len() - self.split_at,
            Split::Test => self.test_labels.len(),
        }
    }

    /// Whether a split is empty.
    pub fn is_empty(&self, split: Split) -> bool {
        self.len(split) == 0
    }

    fn parts(&self, split: Split) -> (&[u8], &[u8]) {
        let f = self.shape.features();
        match split {
            Split::Train => (
                &self.train_images[..self.split_at * f],
                &self.train_labels[..self.split_at],
            ),
            Split::Validation => (
                &self.train_images[self.split_at * f..],
                &self.train_labels[self.split_at..],
            ),
            Split::Test => (&self.test_images, &self.test_labels),
        }
    }

    /// The label of sample `i` of a split.
    pub fn label(&self, split: Split, i: usize) -> u32 {
        self.parts(split).1[i] as u32
    }

    /// Checks a gather's arguments (the input's shape, room for the labels, every index
    /// inside the split), writes the labels, and returns the split's images.
    fn gather_labels(
        &self,
        split: Split,
        indices: &[u32],
        input: &Matrix,
        labels: &mut [u32],
    ) -> Result<&[u8]> {
        let f = self.shape.features();
        let n = indices.len();
        let (images, labs) = self.parts(split);
        if input.rows() != f || n > input.batch() || labels.len() < n {
            return Err(RuntimeError::Shape(format!(
                "gather: {n} samples of {f} features into a {}x{} input with {} labels",
                input.rows(),
                input.batch(),
                labels.len()
            )));
        }
        if let Some(&i) = indices.iter().find(|&&i| i as usize >= labs.len()) {
            return Err(RuntimeError::Shape(format!(
                "gather: sample {i} is outside the {} samples of the split",
                labs.len()
            )));
        }
        for (l, &i) in labels.iter_mut().zip(indices) {
            *l = u32::from(labs[i as usize]);
        }
        Ok(images)
    }

    /// Gathers the samples `indices` (positions in `split`) into columns `0..n` of the
    /// feature-major `input` (normalised) and their labels into `labels`; columns `n..ld` are
    /// set to zero. Allocates nothing.
    pub fn gather(
        &self,
        split: Split,
        indices: &[u32],
        input: &mut Matrix,
        labels: &mut [u32],
    ) -> Result<usize> {
        let f = self.shape.features();
        let n = indices.len();
        let images = self.gather_labels(split, indices, input, labels)?;
        let ld = input.ld();
        let out = input.as_mut_slice();
        match &self.nonzeros {
            Some(nz) => {
                let (ptr, base) = match split {
                    Split::Train => (&nz.train_ptr, 0),
                    Split::Validation => (&nz.train_ptr, self.split_at),
                    Split::Test => (&nz.test_ptr, 0),
                };
                // Shuffled samples lie far apart, mostly outside the caches. Reading one
                // byte per cache line of every sample first lets these independent loads
                // overlap, instead of the scatter below waiting for each sample in turn
                // (several times faster per gather; `docs/MEASUREMENTS.md`).
                let mut touch = 0u32;
                for &i in indices {
                    let s = base + i as usize;
                    let r = ptr[s] as usize..ptr[s + 1] as usize;
                    for &f in nz.feature[r.clone()].iter().step_by(32) {
                        touch ^= u32::from(f);
                    }
                    for &v in nz.value[r].iter().step_by(64) {
                        touch ^= u32::from(v);
                    }
                }
                std::hint::black_box(touch);
                // Background everywhere (and zero padding, in the same pass), then the
                // nonzero pixels of each sample.
                // (Built for single-channel sets only.)
                let lut = &self.luts[0];
                let background = lut[0];
                for row in out.chunks_exact_mut(ld) {
                    row[..n].fill(background);
                    row[n..].fill(0.0);
                }
                for (b, &i) in indices.iter().enumerate() {
                    let s = base + i as usize;
                    let r = ptr[s] as usize..ptr[s + 1] as usize;
                    for (&feat, &v) in nz.feature[r.clone()].iter().zip(&nz.value[r]) {
                        out[feat as usize * ld + b] = lut[v as usize];
                    }
                }
            }
            None => {
                // One byte per cache line of every sample first, as above (it pays here
                // too; `docs/MEASUREMENTS.md`).
                let mut touch = 0u8;
                for &i in indices {
                    let i = i as usize;
                    for &p in images[i * f..(i + 1) * f].iter().step_by(64) {
                        touch ^= p;
                    }
                }
                std::hint::black_box(touch);
                // Blocks of 16 samples: each feature row gets 16 contiguous values.
                let plane = self.shape.height * self.shape.width;
                const BLOCK: usize = 16;
                for (blk, idx) in indices.chunks(BLOCK).enumerate() {
                    let b0 = blk * BLOCK;
                    let mut rows: [&[u8]; BLOCK] = [&[]; BLOCK];
                    for (r, &i) in rows.iter_mut().zip(idx) {
                        *r = &images[i as usize * f..(i as usize + 1) * f];
                    }
                    let rows = &rows[..idx.len()];
                    for (feat, dst) in out.chunks_exact_mut(ld).enumerate() {
                        let lut = &self.luts[feat / plane];
                        for (d, r) in dst[b0..b0 + rows.len()].iter_mut().zip(rows) {
                            *d = lut[r[feat] as usize];
                        }
                    }
                }
            }
        }
        if n < ld && self.nonzeros.is_none() {
            input.zero_columns_from(n);
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sparse_ir::limits::MemorySource;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    fn idx_bytes(dims: &[u32], data: &[u8]) -> Vec<u8> {
        let mut v = vec![0, 0, 8, dims.len() as u8];
        for d in dims {
            v.extend(d.to_be_bytes());
        }
        v.extend(data);
        v
    }

    #[test]
    fn parses_and_rejects() {
        let a = parse_idx(&idx_bytes(&[2, 3], &[1, 2, 3, 4, 5, 6])).unwrap();
        assert_eq!(a.dims, vec![2, 3]);
        assert_eq!(a.data, vec![1, 2, 3, 4, 5, 6]);
        let e = parse_idx(&idx_bytes(&[2, 3], &[1, 2, 3])).unwrap_err();
        assert!(e.contains("truncated"), "{e}");
        let e = parse_idx(&idx_bytes(&[1], &[1, 2])).unwrap_err();
        assert!(e.contains("trailing"), "{e}");
        let e = parse_idx(&[1, 2, 8, 1]).unwrap_err();
        assert!(e.contains("magic"), "{e}");
        let e = parse_idx(&[0, 0, 0x0d, 1, 0, 0, 0, 1, 0, 0, 0, 0]).unwrap_err();
        assert!(e.contains("0x0d"), "{e}");
        let e = parse_idx(&[0, 0, 8, 2, 0, 0]).unwrap_err();
        assert!(e.contains("header"), "{e}");
    }

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        use std::io::Write;
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(bytes).unwrap();
        e.finish().unwrap()
    }

    /// Counts the bytes read through it.
    struct Counting<R> {
        inner: R,
        read: Arc<AtomicUsize>,
    }

    impl<R: Read> Read for Counting<R> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = self.inner.read(buf)?;
            self.read.fetch_add(n, Ordering::Relaxed);
            Ok(n)
        }
    }

    #[test]
    fn a_gzip_stream_longer_than_its_header_stops_at_the_declared_length() {
        // A header declaring 10 data bytes, followed by 4 MiB: a bomb in small.
        let bomb = gzip(&idx_bytes(&[10], &vec![7u8; 4 << 20]));
        assert!(bomb.len() < 64 << 10, "{}", bomb.len());
        let read = Arc::new(AtomicUsize::new(0));
        let inflated = Counting {
            inner: flate2::read::GzDecoder::new(&bomb[..]),
            read: Arc::clone(&read),
        };
        let e = read_idx_from(inflated, &MemoryBudget::machine()).unwrap_err();
        let IdxReadError::Format(m) = e else {
            panic!("{e:?}")
        };
        assert!(m.contains("longer than its header declares"), "{m}");
        // The header, the declared 10 bytes and one more: nothing else was inflated.
        assert_eq!(read.load(Ordering::Relaxed), 8 + 10 + 1);

        // Through the file: the error names it.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t10k-labels-idx1-ubyte.gz");
        std::fs::write(&path, &bomb).unwrap();
        let e = read_idx(&path).unwrap_err().to_string();
        assert!(
            e.contains("t10k-labels-idx1-ubyte.gz") && e.contains("longer than its header"),
            "{e}"
        );
        // Shorter than declared, and exactly as declared.
        std::fs::write(&path, gzip(&idx_bytes(&[10], &[1; 9]))).unwrap();
        let e = read_idx(&path).unwrap_err().to_string();
        assert!(e.contains("truncated") && e.contains("has 9"), "{e}");
        std::fs::write(&path, gzip(&idx_bytes(&[2, 5], &[3; 10]))).unwrap();
        let a = read_idx(&path).unwrap();
        assert_eq!((a.dims, a.data), (vec![2, 5], vec![3; 10]));
        // A corrupt stream is still reported as one.
        let mut bad = gzip(&idx_bytes(&[2, 5], &[3; 10]));
        let n = bad.len();
        bad[n - 6] ^= 0xff; // the CRC
        std::fs::write(&path, &bad).unwrap();
        let e = read_idx(&path).unwrap_err().to_string();
        assert!(e.contains("gzip"), "{e}");
    }

    #[test]
    fn declared_sizes_are_checked_against_memory_before_allocating() {
        // 65535³ bytes declared by a 16-byte file, raw or compressed: refused before any
        // allocation, naming the file, the dimensions and the machine's memory.
        let dir = tempfile::tempdir().unwrap();
        let header = idx_bytes(&[65535, 65535, 65535], &[]);
        for (name, bytes) in [("raw", header.clone()), ("gz", gzip(&header))] {
            let path = dir.path().join(name);
            std::fs::write(&path, bytes).unwrap();
            let e = read_idx(&path).unwrap_err().to_string();
            assert!(
                e.contains(&path.display().to_string())
                    && e.contains("IDX dimensions [65535, 65535, 65535]")
                    && e.contains("needs 256.0 TiB, more than the")
                    && e.contains("of memory"),
                "{e}"
            );
        }
        let small = MemoryBudget::of_memory(100, MemorySource::Environment);
        let e = read_idx_from(&idx_bytes(&[51], &[0; 51])[..], &small).unwrap_err();
        assert!(matches!(e, IdxReadError::Format(m) if m.contains("needs 51 B")));
        assert!(read_idx_from(&idx_bytes(&[50], &[0; 50])[..], &small).is_ok());
    }

    #[test]
    fn gather_transposes_and_normalises() {
        let shape = Shape::image(1, 1, 3);
        let train: Vec<u8> = (0..15).map(|v| v as u8 * 10).collect();
        let ds = Dataset::from_parts(
            shape,
            3,
            train,
            vec![0, 1, 2, 0, 1],
            4,
            vec![255, 0, 0],
            vec![2],
            0.0,
            1.0,
        )
        .unwrap();
        assert_eq!(ds.len(Split::Train), 4);
        assert_eq!(ds.len(Split::Validation), 1);
        let mut m = Matrix::zeros(3, 4);
        m.fill_zero();
        m.set(0, 3, 7.0);
        let mut labels = [9u32; 4];
        let n = ds
            .gather(Split::Train, &[2, 0, 3], &mut m, &mut labels)
            .unwrap();
        assert_eq!(n, 3);
        assert_eq!(labels[..3], [2, 0, 0]);
        assert_eq!(m.get(1, 0), 70.0 / 255.0);
        assert_eq!(m.get(2, 2), 110.0 / 255.0);
        assert_eq!(m.get(0, 3), 0.0, "unused columns are cleared");
        let n = ds
            .gather(Split::Validation, &[0], &mut m, &mut labels)
            .unwrap();
        assert_eq!((n, labels[0]), (1, 1));
        assert_eq!(m.get(2, 0), 140.0 / 255.0);
        assert!(ds
            .gather(Split::Validation, &[1], &mut m, &mut labels)
            .is_err());
    }

    #[test]
    fn sparse_and_dense_gathers_agree() {
        let shape = Shape::image(1, 4, 5);
        let f = shape.features();
        let pixels = |n: usize, seed: u32| -> Vec<u8> {
            (0..n * f)
                .map(|i| {
                    let h = (i as u32 ^ seed).wrapping_mul(2_654_435_761) >> 24;
                    if h < 200 {
                        0
                    } else {
                        h as u8
                    }
                })
                .collect()
        };
        let (train, test) = (pixels(40, 1), pixels(7, 2));
        let labels = |n: usize| (0..n).map(|i| (i % 3) as u8).collect::<Vec<_>>();
        let mut sparse =
            Dataset::from_parts(shape, 3, train, labels(40), 30, test, labels(7), 0.2, 0.3)
                .unwrap();
        assert!(sparse.nonzeros.is_some(), "mostly zero pixels");
        sparse.limit(Some(25), Some(6));
        let mut dense = sparse.clone();
        dense.nonzeros = None;
        for (split, idx) in [
            (Split::Train, vec![24u32, 0, 7, 7, 13]),
            (Split::Validation, vec![5, 1, 0]),
            (Split::Test, vec![2, 5]),
        ] {
            let mut a = Matrix::zeros(f, 8);
            let mut b = Matrix::zeros(f, 8);
            a.as_mut_slice().fill(9.0);
            let (mut la, mut lb) = ([0u32; 8], [0u32; 8]);
            sparse.gather(split, &idx, &mut a, &mut la).unwrap();
            dense.gather(split, &idx, &mut b, &mut lb).unwrap();
            assert_eq!(a.as_slice(), b.as_slice(), "{split:?}");
            assert_eq!(la, lb);
        }
    }
}
