//! Training-time augmentation: a random crop of the zero-padded image and a random
//! horizontal flip (the reference's CIFAR-10 transforms), drawn per sample from a key, so a
//! batch's augmentation depends only on the seed, the step and the sample: the same after a
//! resume and on every rank of a data-parallel run.

use serde::{Deserialize, Serialize};

use super::{Dataset, Split};
use crate::error::Result;
use crate::tensor::Matrix;

/// Random crops and flips (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Augmentation {
    /// Zero pixels added on every side before a crop of the original size is taken (4 for
    /// CIFAR-10); 0 crops nothing.
    pub padding: usize,
    /// Whether an image is flipped left to right with probability ½.
    pub flip: bool,
}

impl Augmentation {
    /// The reference's CIFAR-10 augmentation: padding 4, flips.
    pub const CIFAR: Augmentation = Augmentation {
        padding: 4,
        flip: true,
    };

    /// The crop's offset `(rows, columns)` into the padded image, each in `0..=2·padding`,
    /// and whether to flip, for `sample` under `key`.
    pub fn draw(&self, key: u64, sample: u32) -> (usize, usize, bool) {
        let r = splitmix64(key ^ splitmix64(u64::from(sample)));
        let span = 2 * self.padding as u64 + 1;
        let dy = (r % span) as usize;
        let dx = ((r >> 20) % span) as usize;
        (dy, dx, self.flip && (r >> 63) == 1)
    }
}

/// The key of a step's augmentation: one per (seed, step).
pub fn step_key(seed: u64, step: u64) -> u64 {
    splitmix64(seed ^ splitmix64(step.wrapping_add(0x5eed)))
}

/// SplitMix64's output function: a bijective mix of 64 bits (also dropout's per-row mix).
pub(crate) fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Dataset {
    /// [`gather`](Self::gather) with `augmentation` applied to every sample, drawn under
    /// `key` (see [`step_key`]). Pixels the crop takes from the padding are the value of a
    /// zero byte, normalised. Allocates nothing.
    pub fn gather_augmented(
        &self,
        split: Split,
        indices: &[u32],
        input: &mut Matrix,
        labels: &mut [u32],
        augmentation: &Augmentation,
        key: u64,
    ) -> Result<usize> {
        let shape = self.shape;
        let f = shape.features();
        let n = indices.len();
        let images = self.gather_labels(split, indices, input, labels)?;
        let (h, w, pad) = (shape.height, shape.width, augmentation.padding);
        let plane = h * w;
        let ld = input.ld();
        let out = input.as_mut_slice();
        // Blocks of 16 samples: each feature row gets 16 contiguous values.
        const BLOCK: usize = 16;
        for (blk, idx) in indices.chunks(BLOCK).enumerate() {
            let b0 = blk * BLOCK;
            let mut crops = [(0usize, 0usize, false, 0usize); BLOCK];
            for (c, &i) in crops.iter_mut().zip(idx) {
                let (dy, dx, flip) = augmentation.draw(key, i);
                *c = (dy, dx, flip, i as usize * f);
            }
            for (feat, dst) in out.chunks_exact_mut(ld).enumerate() {
                let (ch, y, x) = (feat / plane, feat % plane / w, feat % w);
                let lut = &self.luts[ch];
                for (d, &(dy, dx, flip, base)) in dst[b0..b0 + idx.len()].iter_mut().zip(&crops) {
                    // Output (y, x) reads the padded image at (y + dy, x' + dx), x' being x
                    // or its mirror; the original image starts at (pad, pad).
                    let xs = if flip { w - 1 - x } else { x };
                    let (sy, sx) = ((y + dy).wrapping_sub(pad), (xs + dx).wrapping_sub(pad));
                    let byte = if sy < h && sx < w {
                        images[base + ch * plane + sy * w + sx]
                    } else {
                        0
                    };
                    *d = lut[byte as usize];
                }
            }
        }
        input.zero_columns_from(n);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::Shape;

    /// 3 training samples and 1 test sample of 2×5×4 images with distinct bytes.
    fn small_set() -> Dataset {
        let shape = Shape::image(2, 5, 4);
        let f = shape.features();
        let train: Vec<u8> = (0..3 * f).map(|i| (i % 251 + 1) as u8).collect();
        let test: Vec<u8> = (0..f).map(|i| (i + 7) as u8).collect();
        Dataset::from_parts(shape, 3, train, vec![0, 1, 2], 3, test, vec![1], 0.25, 0.5).unwrap()
    }

    /// The augmented image by definition: pad with zero bytes, crop at (dy, dx), flip.
    fn reference(
        ds: &Dataset,
        sample: usize,
        a: &Augmentation,
        draw: (usize, usize, bool),
    ) -> Vec<f32> {
        let s = ds.shape();
        let (h, w, p) = (s.height, s.width, a.padding);
        let image = &ds.train_images[sample * s.features()..(sample + 1) * s.features()];
        let mut out = Vec::new();
        for c in 0..s.channels {
            let mut padded = vec![vec![0u8; w + 2 * p]; h + 2 * p];
            for y in 0..h {
                for x in 0..w {
                    padded[y + p][x + p] = image[c * h * w + y * w + x];
                }
            }
            let (dy, dx, flip) = draw;
            for y in 0..h {
                let row: Vec<u8> = padded[y + dy][dx..dx + w].to_vec();
                for x in 0..w {
                    let byte = if flip { row[w - 1 - x] } else { row[x] };
                    out.push((f32::from(byte) / 255.0 - 0.25) / 0.5);
                }
            }
        }
        out
    }

    #[test]
    fn crops_and_flips_as_defined() {
        let ds = small_set();
        let a = Augmentation {
            padding: 2,
            flip: true,
        };
        let mut input = Matrix::zeros(ds.shape().features(), 3);
        let mut labels = [9; 3];
        let mut seen = std::collections::HashSet::new();
        for step in 0..40 {
            let key = step_key(17, step);
            ds.gather_augmented(Split::Train, &[2, 0, 1], &mut input, &mut labels, &a, key)
                .unwrap();
            assert_eq!(labels, [2, 0, 1]);
            for (b, sample) in [2usize, 0, 1].into_iter().enumerate() {
                let d = a.draw(key, sample as u32);
                seen.insert(d);
                let want = reference(&ds, sample, &a, d);
                let got: Vec<f32> = (0..ds.shape().features())
                    .map(|f| input.get(f, b))
                    .collect();
                assert_eq!(got, want, "step {step}, sample {sample}, draw {d:?}");
            }
        }
        // 120 draws over 5 × 5 offsets × 2 flips: most of the 50 appear, flips both ways.
        assert!(seen.len() > 30, "{} distinct draws", seen.len());
        assert!(seen.iter().any(|d| d.2) && seen.iter().any(|d| !d.2));
        assert!(seen.iter().all(|&(dy, dx, _)| dy <= 4 && dx <= 4));
    }

    #[test]
    fn no_padding_and_no_flip_is_the_plain_gather() {
        let ds = small_set();
        let none = Augmentation {
            padding: 0,
            flip: false,
        };
        let (mut a, mut b) = (Matrix::zeros(40, 5), Matrix::zeros(40, 5));
        let (mut la, mut lb) = ([0; 5], [0; 5]);
        ds.gather(Split::Train, &[1, 2], &mut a, &mut la).unwrap();
        b.as_mut_slice().fill(3.0);
        ds.gather_augmented(Split::Train, &[1, 2], &mut b, &mut lb, &none, 99)
            .unwrap();
        assert_eq!(a.as_slice(), b.as_slice());
        assert_eq!(la, lb);
    }

    #[test]
    fn draws_depend_on_seed_step_and_sample_only() {
        let a = Augmentation::CIFAR;
        let k = step_key(17, 5);
        assert_eq!(k, step_key(17, 5));
        assert_ne!(k, step_key(17, 6));
        assert_ne!(k, step_key(18, 5));
        let draws: Vec<_> = (0..64).map(|s| a.draw(k, s)).collect();
        assert_eq!(draws, (0..64).map(|s| a.draw(k, s)).collect::<Vec<_>>());
        assert!(draws.iter().any(|d| *d != draws[0]));
    }

    #[test]
    fn bad_indices_and_shapes_are_errors() {
        let ds = small_set();
        let mut input = Matrix::zeros(40, 2);
        let mut labels = [0; 2];
        let a = Augmentation::CIFAR;
        assert!(ds
            .gather_augmented(Split::Train, &[3], &mut input, &mut labels, &a, 0)
            .is_err());
        let mut wrong = Matrix::zeros(39, 2);
        assert!(ds
            .gather_augmented(Split::Train, &[0], &mut wrong, &mut labels, &a, 0)
            .is_err());
    }
}
