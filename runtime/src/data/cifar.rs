//! CIFAR-10's binary version, and CIFAR-shaped synthetic data for benchmarks.
//!
//! A CIFAR-10 directory holds `data_batch_1.bin` … `data_batch_5.bin` (training) and
//! `test_batch.bin`. Each file is a whole number of 3,073-byte records: one label byte
//! (0–9), then the 32×32 image as three planes of 1,024 bytes (red, green, blue), rows top
//! to bottom. That is already the feature-major order the models read (`channel·1024 +
//! row·32 + column`), so a record's image is a sample as it stands. Any whole number of
//! records is accepted (tests write small files); an empty, truncated or over-large file, or
//! a label above 9, is an error naming the file. Each file's size is checked against the
//! machine's memory budget before it is read.
//!
//! Normalisation is per channel, with the training files' own mean and standard deviation
//! (for CIFAR-10's 50,000 training images about (0.491, 0.482, 0.447) and
//! (0.247, 0.243, 0.262)). The split is the reference's: the first 90 % of the training
//! records train (45,000), the rest validate.

use std::io::Read;
use std::path::{Path, PathBuf};

use rand::{Rng, RngCore, SeedableRng};
use sparse_ir::limits::{bytes_of, MemoryBudget};

use super::{data_err, split_point, DataSource, Dataset};
use crate::error::{Result, RuntimeError};
use crate::tensor::Shape;

/// The training files of CIFAR-10's binary version, in order.
pub const CIFAR10_TRAIN_FILES: [&str; 5] = [
    "data_batch_1.bin",
    "data_batch_2.bin",
    "data_batch_3.bin",
    "data_batch_4.bin",
    "data_batch_5.bin",
];
/// The test file of CIFAR-10's binary version.
pub const CIFAR10_TEST_FILE: &str = "test_batch.bin";
/// CIFAR-10's classes.
pub const CIFAR10_CLASSES: usize = 10;
/// The shape of one CIFAR-10 image.
pub const CIFAR10_SHAPE: Shape = Shape {
    channels: 3,
    height: 32,
    width: 32,
};
/// Bytes per record: the label byte and the image.
pub const CIFAR10_RECORD: usize = 1 + 3 * 32 * 32;

/// Appends the records of one CIFAR-10 binary file to `images` and `labels`.
fn read_records(
    path: &Path,
    budget: &MemoryBudget,
    images: &mut Vec<u8>,
    labels: &mut Vec<u8>,
) -> Result<()> {
    let file = std::fs::File::open(path).map_err(|e| RuntimeError::io(path, e))?;
    let len = file
        .metadata()
        .map_err(|e| RuntimeError::io(path, e))?
        .len();
    if len == 0 {
        return Err(data_err(
            path,
            "empty: a CIFAR-10 binary file holds one or more 3073-byte records",
        ));
    }
    if len % CIFAR10_RECORD as u64 != 0 {
        return Err(data_err(
            path,
            format!(
                "{len} bytes is not a whole number of 3073-byte records (truncated or not \
                 CIFAR-10's binary version): {} records and {} bytes over",
                len / CIFAR10_RECORD as u64,
                len % CIFAR10_RECORD as u64
            ),
        ));
    }
    let total = usize::try_from(len)
        .ok()
        .and_then(|l| l.checked_add(images.len() + labels.len()));
    budget
        .check(
            &format!("CIFAR-10 file {} ({len} bytes)", path.display()),
            total.and_then(|t| bytes_of(&[t], 1)),
        )
        .map_err(|e| data_err(path, e.to_string()))?;
    let len = len as usize;
    let mut bytes = Vec::with_capacity(len);
    // At most one byte more than the size it had: a file that grows while it is read is an
    // error, not an allocation without end.
    file.take(len as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| RuntimeError::io(path, e))?;
    if bytes.len() != len {
        return Err(data_err(
            path,
            format!(
                "changed while it was read ({len} bytes, then {})",
                bytes.len()
            ),
        ));
    }
    let first = labels.len();
    images.reserve(len / CIFAR10_RECORD * (CIFAR10_RECORD - 1));
    labels.reserve(len / CIFAR10_RECORD);
    for (i, record) in bytes.chunks_exact(CIFAR10_RECORD).enumerate() {
        if record[0] as usize >= CIFAR10_CLASSES {
            return Err(data_err(
                path,
                format!(
                    "record {i} (byte {}) has label {}: CIFAR-10's labels are 0 to 9",
                    i * CIFAR10_RECORD,
                    record[0]
                ),
            ));
        }
        labels.push(record[0]);
        images.extend_from_slice(&record[1..]);
    }
    debug_assert_eq!(labels.len() - first, len / CIFAR10_RECORD);
    Ok(())
}

/// Each channel's mean and standard deviation over `images` (sample-major), after scaling
/// bytes to `[0, 1]`; an error if a channel has one value only.
fn channel_statistics(path: &Path, images: &[u8], shape: Shape) -> Result<Vec<(f32, f32)>> {
    let plane = shape.height * shape.width;
    let mut sums = vec![(0u64, 0u64); shape.channels];
    for sample in images.chunks_exact(shape.features()) {
        for (c, pixels) in sample.chunks_exact(plane).enumerate() {
            let (s, q) = &mut sums[c];
            for &p in pixels {
                *s += u64::from(p);
                *q += u64::from(p) * u64::from(p);
            }
        }
    }
    let count = (images.len() / shape.features() * plane) as f64;
    sums.iter()
        .enumerate()
        .map(|(c, &(s, q))| {
            let m = s as f64 / count / 255.0;
            let var = q as f64 / count / (255.0 * 255.0) - m * m;
            let sd = var.max(0.0).sqrt();
            if sd == 0.0 {
                return Err(data_err(
                    path,
                    format!("every training pixel of channel {c} has the same value"),
                ));
            }
            Ok((m as f32, sd as f32))
        })
        .collect()
}

impl Dataset {
    /// Loads CIFAR-10's binary version from `dir` (see the module doc).
    pub fn load_cifar10(dir: &Path) -> Result<Self> {
        Self::load_cifar10_with(dir, &MemoryBudget::machine())
    }

    /// [`load_cifar10`](Self::load_cifar10) with the memory budget `budget`.
    pub fn load_cifar10_with(dir: &Path, budget: &MemoryBudget) -> Result<Self> {
        if !dir.is_dir() {
            return Err(data_err(
                dir,
                "CIFAR-10 directory not found (it holds data_batch_1.bin … data_batch_5.bin \
                 and test_batch.bin)",
            ));
        }
        let file = |name: &str| -> Result<PathBuf> {
            let p = dir.join(name);
            if p.is_file() {
                Ok(p)
            } else {
                Err(data_err(
                    &p,
                    format!(
                        "not found: a CIFAR-10 directory holds data_batch_1.bin … \
                         data_batch_5.bin and test_batch.bin (the binary version), {} has no \
                         {name}",
                        dir.display()
                    ),
                ))
            }
        };
        let (mut train_images, mut train_labels) = (Vec::new(), Vec::new());
        for name in CIFAR10_TRAIN_FILES {
            read_records(&file(name)?, budget, &mut train_images, &mut train_labels)?;
        }
        let (mut test_images, mut test_labels) = (Vec::new(), Vec::new());
        read_records(
            &file(CIFAR10_TEST_FILE)?,
            budget,
            &mut test_images,
            &mut test_labels,
        )?;
        let norm = channel_statistics(
            &dir.join(CIFAR10_TRAIN_FILES[0]),
            &train_images,
            CIFAR10_SHAPE,
        )?;
        let split_at = split_point(train_labels.len());
        tracing::info!(
            dir = %dir.display(),
            train = split_at,
            validation = train_labels.len() - split_at,
            test = test_labels.len(),
            ?norm,
            "CIFAR-10 loaded"
        );
        Ok(Dataset::assemble(
            dir.to_path_buf(),
            DataSource::Cifar10,
            CIFAR10_SHAPE,
            CIFAR10_CLASSES,
            (train_images, train_labels, split_at),
            (test_images, test_labels),
            norm,
        ))
    }

    /// CIFAR-shaped random data (3×32×32, 10 classes, uniform bytes and labels) for
    /// benchmarks: `train` training-file samples (90 % train, 10 % validate) and `test` test
    /// samples, from `seed`.
    pub fn synthetic(train: usize, test: usize, seed: u64) -> Result<Self> {
        let f = CIFAR10_SHAPE.features();
        let total = train.checked_add(test).and_then(|n| n.checked_mul(f + 1));
        MemoryBudget::machine()
            .check(
                &format!("synthetic data of {train} + {test} samples"),
                total.and_then(|t| bytes_of(&[t], 1)),
            )
            .map_err(|e| RuntimeError::Config(e.to_string()))?;
        if train < 2 || test == 0 {
            return Err(RuntimeError::Config(format!(
                "synthetic data needs at least 2 training and 1 test sample, not {train} and {test}"
            )));
        }
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut part = |n: usize| {
            let mut images = vec![0u8; n * f];
            rng.fill_bytes(&mut images);
            let labels: Vec<u8> = (0..n)
                .map(|_| rng.random_range(0..CIFAR10_CLASSES as u8))
                .collect();
            (images, labels)
        };
        let (train_images, train_labels) = part(train);
        let (test_images, test_labels) = part(test);
        let norm = channel_statistics(Path::new("synthetic"), &train_images, CIFAR10_SHAPE)?;
        Ok(Dataset::assemble(
            PathBuf::new(),
            DataSource::Synthetic,
            CIFAR10_SHAPE,
            CIFAR10_CLASSES,
            (train_images, train_labels, split_point(train)),
            (test_images, test_labels),
            norm,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::Split;
    use crate::tensor::Matrix;
    use sparse_ir::limits::MemorySource;

    /// A record whose pixel (c, y, x) is `(seed + 3c + 5y + 7x) mod 256`.
    fn record(label: u8, seed: u8) -> Vec<u8> {
        let mut r = vec![label];
        for c in 0..3u32 {
            for y in 0..32u32 {
                for x in 0..32u32 {
                    r.push((u32::from(seed) + 3 * c + 5 * y + 7 * x) as u8);
                }
            }
        }
        r
    }

    /// Writes a CIFAR-10 directory: `per_file` records in each training file and 3 test
    /// records; record k of the training files has label k % 10 and seed k.
    fn write_set(dir: &Path, per_file: usize) {
        let mut k = 0u8;
        for name in CIFAR10_TRAIN_FILES {
            let mut bytes = Vec::new();
            for _ in 0..per_file {
                bytes.extend(record(k % 10, k));
                k += 1;
            }
            std::fs::write(dir.join(name), bytes).unwrap();
        }
        let test: Vec<u8> = (0..3).flat_map(|i| record(9 - i, 200 + i)).collect();
        std::fs::write(dir.join(CIFAR10_TEST_FILE), test).unwrap();
    }

    fn error_of(dir: &Path) -> String {
        Dataset::load_cifar10(dir).unwrap_err().to_string()
    }

    #[test]
    fn reads_records_in_order_and_normalises_each_channel() {
        let dir = tempfile::tempdir().unwrap();
        write_set(dir.path(), 4);
        let ds = Dataset::load_cifar10(dir.path()).unwrap();
        assert_eq!(ds.source(), DataSource::Cifar10);
        assert_eq!(ds.shape(), CIFAR10_SHAPE);
        assert_eq!(ds.classes(), 10);
        // 20 training records: 18 train, 2 validate.
        assert_eq!(
            (
                ds.len(Split::Train),
                ds.len(Split::Validation),
                ds.len(Split::Test)
            ),
            (18, 2, 3)
        );
        assert_eq!(ds.label(Split::Train, 13), 3);
        assert_eq!(ds.label(Split::Validation, 1), 9);
        assert_eq!(ds.label(Split::Test, 0), 9);
        // The statistics are each channel's own, over all 20 training records.
        let norm = ds.channel_normalization().to_vec();
        assert_eq!(norm.len(), 3);
        for (c, &(mean, std)) in norm.iter().enumerate() {
            let px: Vec<f64> = (0..20u32)
                .flat_map(|k| {
                    (0..1024u32).map(move |p| {
                        f64::from((k + 3 * c as u32 + 5 * (p / 32) + 7 * (p % 32)) as u8) / 255.0
                    })
                })
                .collect();
            let m = px.iter().sum::<f64>() / px.len() as f64;
            let sd = (px.iter().map(|v| (v - m) * (v - m)).sum::<f64>() / px.len() as f64).sqrt();
            assert!(
                (f64::from(mean) - m).abs() < 1e-5,
                "channel {c}: {mean} vs {m}"
            );
            assert!(
                (f64::from(std) - sd).abs() < 1e-5,
                "channel {c}: {std} vs {sd}"
            );
        }
        // Gathering puts sample 13's pixel (c, y, x) in row c·1024 + y·32 + x.
        let mut input = Matrix::zeros(3072, 2);
        let mut labels = [0; 2];
        ds.gather(Split::Train, &[13, 0], &mut input, &mut labels)
            .unwrap();
        assert_eq!(labels, [3, 0]);
        for (c, y, x) in [(0, 0, 0), (1, 5, 31), (2, 31, 7)] {
            let byte = (13 + 3 * c + 5 * y + 7 * x) as u8;
            let (mean, std) = norm[c];
            let want = (f32::from(byte) / 255.0 - mean) / std;
            assert_eq!(
                input.get(c * 1024 + y * 32 + x, 0),
                want,
                "pixel ({c}, {y}, {x})"
            );
        }
    }

    #[test]
    fn bad_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        assert!(error_of(&p.join("nowhere")).contains("CIFAR-10 directory not found"));
        write_set(p, 2);
        std::fs::remove_file(p.join(CIFAR10_TEST_FILE)).unwrap();
        let e = error_of(p);
        assert!(
            e.contains("test_batch.bin") && e.contains("not found"),
            "{e}"
        );

        write_set(p, 2);
        let f = p.join("data_batch_3.bin");
        let mut bytes = std::fs::read(&f).unwrap();
        bytes.truncate(bytes.len() - 100);
        std::fs::write(&f, &bytes).unwrap();
        let e = error_of(p);
        assert!(
            e.contains("data_batch_3.bin") && e.contains("not a whole number of 3073-byte records"),
            "{e}"
        );

        std::fs::write(&f, b"").unwrap();
        let e = error_of(p);
        assert!(e.contains("data_batch_3.bin") && e.contains("empty"), "{e}");

        write_set(p, 2);
        let mut bytes = std::fs::read(&f).unwrap();
        bytes[CIFAR10_RECORD] = 10;
        std::fs::write(&f, &bytes).unwrap();
        let e = error_of(p);
        assert!(
            e.contains("data_batch_3.bin") && e.contains("record 1") && e.contains("label 10"),
            "{e}"
        );
    }

    #[test]
    fn sizes_are_checked_against_memory_before_reading() {
        let dir = tempfile::tempdir().unwrap();
        write_set(dir.path(), 2);
        let budget = MemoryBudget::of_memory(10_000, MemorySource::System);
        let e = Dataset::load_cifar10_with(dir.path(), &budget)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("data_batch_1.bin") && e.contains("memory"),
            "{e}"
        );
    }

    #[test]
    fn synthetic_data_is_cifar_shaped_and_seeded() {
        let a = Dataset::synthetic(50, 10, 3).unwrap();
        let b = Dataset::synthetic(50, 10, 3).unwrap();
        let c = Dataset::synthetic(50, 10, 4).unwrap();
        assert_eq!(a.shape(), CIFAR10_SHAPE);
        assert_eq!((a.len(Split::Train), a.len(Split::Validation)), (45, 5));
        assert_eq!(a.train_images, b.train_images);
        assert_ne!(a.train_images, c.train_images);
        assert!(a.train_labels.iter().any(|&l| l != a.train_labels[0]));
        assert!(Dataset::synthetic(1, 1, 0).is_err());
    }
}
