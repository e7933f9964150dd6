//! Reductions in the exact order of the reference implementation, so that layer scores and the
//! correction term agree with it bit for bit.
//!
//! * [`torch_mean_f32`]: `tensor.mean()` of a contiguous 1-D `float32` tensor on the CPU as
//!   PyTorch computes it (single thread, AVX2 kernels): the sum in `float32` through ATen's
//!   `cascade_sum` (8-lane vectors, four interleaved accumulators, a four-level cascade), then
//!   divided by the count in `float32`. Reproduces every `raw_score` of the golden cases exactly
//!   (up to 80 elements, where the cascade's upper levels are not reached; for longer inputs the
//!   levels follow ATen's `SumKernel.cpp` but have not been compared with PyTorch itself). A
//!   different order would move a score by about 1e-7 and, in practice, no integer decision.
//! * [`numpy_mean`]: `np.mean` of a list of Python floats: `0.0 +` NumPy's pairwise sum (8-way
//!   unrolled blocks of up to 128), divided by the count.

/// Vector width of ATen's AVX2 `float` kernels.
const LANES: usize = 8;
/// Interleaved accumulators of ATen's `row_sum`.
const ILP: usize = 4;
/// Levels of ATen's `multi_row_sum` cascade.
const LEVELS: usize = 4;

/// `ceil(log2(x))` as ATen's `CeilLog2` defines it (1 for `x <= 2`).
fn ceil_log2(x: usize) -> u32 {
    if x <= 2 {
        1
    } else {
        usize::BITS - (x - 1).leading_zeros()
    }
}

fn add_into<const W: usize>(acc: &mut [f32; W], item: &[f32]) {
    for (a, &b) in acc.iter_mut().zip(item) {
        *a += b;
    }
}

/// Adds row `i` (items `i·ILP … i·ILP + ILP − 1`) into the accumulators `acc`.
fn add_row<const W: usize>(acc: &mut [[f32; W]; ILP], x: &[f32], i: usize) {
    for (k, a) in acc.iter_mut().enumerate() {
        let item = (i * ILP + k) * W;
        add_into(a, &x[item..item + W]);
    }
}

/// ATen's `multi_row_sum` over `size` rows of `ILP` items of `W` floats each.
fn multi_row_sum<const W: usize>(x: &[f32], size: usize) -> [[f32; W]; ILP] {
    let level_power = (ceil_log2(size) / LEVELS as u32).max(4);
    let level_step = 1usize << level_power;
    let level_mask = level_step - 1;
    let mut acc = [[[0.0f32; W]; ILP]; LEVELS];
    let mut i = 0usize;
    while i + level_step <= size {
        for _ in 0..level_step {
            add_row(&mut acc[0], x, i);
            i += 1;
        }
        for j in 1..LEVELS {
            let (lower, upper) = acc.split_at_mut(j);
            for (u, l) in upper[0].iter_mut().zip(lower[j - 1].iter_mut()) {
                add_into(u, l);
                *l = [0.0; W];
            }
            let mask = level_mask << (j as u32 * level_power);
            if i & mask != 0 {
                break;
            }
        }
    }
    while i < size {
        add_row(&mut acc[0], x, i);
        i += 1;
    }
    let (first, rest) = acc.split_at_mut(1);
    for level in rest.iter() {
        for (a, u) in first[0].iter_mut().zip(level) {
            add_into(a, u);
        }
    }
    first[0]
}

/// ATen's `row_sum` over the `x.len() / W` items of `W` floats in `x`.
fn row_sum<const W: usize>(x: &[f32]) -> [f32; W] {
    let size = x.len() / W;
    let size_ilp = size / ILP;
    let mut partial = multi_row_sum::<W>(x, size_ilp);
    for i in size_ilp * ILP..size {
        add_into(&mut partial[0], &x[i * W..(i + 1) * W]);
    }
    for k in 1..ILP {
        let p = partial[k];
        add_into(&mut partial[0], &p);
    }
    partial[0]
}

/// The `float32` sum of `x` in the order of PyTorch's CPU `sum` (see the module doc).
pub fn torch_sum_f32(x: &[f32]) -> f32 {
    if x.len() >= LANES {
        let vectors = x.len() / LANES;
        let acc = row_sum::<LANES>(&x[..vectors * LANES]);
        let mut total = 0.0f32;
        for &v in &x[vectors * LANES..] {
            total += v;
        }
        for v in acc {
            total += v;
        }
        total
    } else {
        row_sum::<1>(x)[0]
    }
}

/// The `float32` mean of `x` as PyTorch's CPU `mean` computes it (sum, then divide by the count).
/// NaN for an empty slice, as in PyTorch.
pub fn torch_mean_f32(x: &[f32]) -> f32 {
    torch_sum_f32(x) / x.len() as f32
}

/// NumPy's pairwise sum of a contiguous `float64` array.
fn numpy_pairwise_sum(a: &[f64]) -> f64 {
    let n = a.len();
    if n < 8 {
        let mut res = 0.0;
        for &v in a {
            res += v;
        }
        res
    } else if n <= 128 {
        let mut r = [0.0f64; 8];
        r.copy_from_slice(&a[..8]);
        let mut i = 8;
        while i < n - n % 8 {
            for (j, rj) in r.iter_mut().enumerate() {
                *rj += a[i + j];
            }
            i += 8;
        }
        let mut res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        while i < n {
            res += a[i];
            i += 1;
        }
        res
    } else {
        let mut n2 = n / 2;
        n2 -= n2 % 8;
        numpy_pairwise_sum(&a[..n2]) + numpy_pairwise_sum(&a[n2..])
    }
}

/// `np.mean` of a list of Python floats (NaN for an empty list, as NumPy gives).
pub fn numpy_mean(a: &[f64]) -> f64 {
    (0.0 + numpy_pairwise_sum(a)) / a.len() as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Test values with a wide spread of magnitudes, made by correctly rounded operations only.
    fn spread(n: usize) -> Vec<f64> {
        const SCALE: [f64; 9] = [1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0, 100.0, 1e3, 1e4];
        (0..n)
            .map(|i| ((i * 7919) % 1000) as f64 / 7.0 * SCALE[(i * 7) % 9] - 50.0)
            .collect()
    }

    /// `np.mean(spread(n))` computed by NumPy 2.4.6 (the reference's version), as f64 bits.
    const NUMPY_MEANS: [(usize, u64); 9] = [
        (1, 0xc049000000000000),
        (5, 0x40d9d4303afb7e93),
        (8, 0x40fe3274f6ee2735),
        (9, 0x40fad72c6b0420e6),
        (17, 0x4100433ef82bcf5b),
        (99, 0x40f52b9e72d22c35),
        (128, 0x40f5374f6797426a),
        (129, 0x40f50d9ec57a053c),
        (300, 0x40f5a5adb4fba152),
    ];

    #[test]
    fn numpy_mean_matches_numpy_bit_for_bit() {
        for (n, bits) in NUMPY_MEANS {
            let got = numpy_mean(&spread(n));
            assert_eq!(
                got.to_bits(),
                bits,
                "n = {n}: {got:e} vs {:e}",
                f64::from_bits(bits)
            );
        }
    }

    #[test]
    fn numpy_mean_is_not_a_naive_sum() {
        // The pairwise order differs from left-to-right summation on this data: the test above
        // would catch a naive implementation.
        let a = spread(300);
        let naive = a.iter().sum::<f64>() / 300.0;
        assert_ne!(naive.to_bits(), numpy_mean(&a).to_bits());
    }

    #[test]
    fn torch_sum_small_cases() {
        assert_eq!(torch_sum_f32(&[]), 0.0);
        assert_eq!(torch_sum_f32(&[1.5]), 1.5);
        assert_eq!(torch_sum_f32(&[1.0, 2.0, 3.0]), 6.0);
        assert!(torch_mean_f32(&[]).is_nan());
        let x: Vec<f32> = (1..=100).map(|i| i as f32).collect();
        assert_eq!(torch_sum_f32(&x), 5050.0);
        assert_eq!(torch_mean_f32(&x), 50.5);
    }

    #[test]
    fn torch_sum_is_accurate_on_large_inputs() {
        // The cascade keeps a long f32 sum close to the exact one, as ATen's does, and every
        // element is counted exactly once (checked with integers, which sum exactly).
        for n in [7, 8, 31, 32, 33, 511, 512, 513, 4096, 65_537, 235_200] {
            let ints: Vec<f32> = (0..n).map(|i| (i % 3) as f32).collect();
            let exact: usize = (0..n).map(|i| i % 3).sum();
            assert_eq!(torch_sum_f32(&ints) as usize, exact, "n = {n}");
        }
        let x: Vec<f32> = (0..235_200).map(|i| 0.1 + (i % 17) as f32 * 1e-3).collect();
        let exact: f64 = x.iter().map(|&v| v as f64).sum();
        let got = torch_sum_f32(&x) as f64;
        assert!((got - exact).abs() / exact < 1e-6, "{got} vs {exact}");
    }

    #[test]
    fn ceil_log2_as_aten() {
        assert_eq!(ceil_log2(0), 1);
        assert_eq!(ceil_log2(2), 1);
        assert_eq!(ceil_log2(3), 2);
        assert_eq!(ceil_log2(4), 2);
        assert_eq!(ceil_log2(5), 3);
        assert_eq!(ceil_log2(7350), 13);
    }
}
