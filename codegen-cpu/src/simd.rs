//! A small vector abstraction the generic kernels are written against once and instantiated
//! per ISA level: 512-bit AVX-512 (masked tails), 256-bit AVX2 + FMA, and portable arrays.
//!
//! Every method is `unsafe`: the caller guarantees that the CPU supports the level (the
//! kernels are entered only through [`crate::isa::IsaLevel`] dispatch after detection) and,
//! for loads and stores, that the pointed-to lanes are valid. The methods are
//! `#[inline(always)]` so that they are inlined into the `#[target_feature]` entry points of
//! the kernels, where the intrinsics compile to single instructions.

/// One ISA level's vector type and operations on `f32` lanes.
pub(crate) trait Simd: Copy {
    /// `f32` lanes per vector.
    const LANES: usize;
    /// A vector of `LANES` floats.
    type V: Copy;
    /// A set of live lanes (a contiguous range).
    type M: Copy;

    /// All lanes zero.
    unsafe fn zero() -> Self::V;
    /// All lanes `x`.
    unsafe fn splat(x: f32) -> Self::V;
    /// Loads `LANES` floats from `p`.
    unsafe fn load(p: *const f32) -> Self::V;
    /// Loads the live lanes of `m` from `p`, zero elsewhere; accesses no other lane, so the
    /// others may lie outside any allocation.
    unsafe fn load_masked(p: *const f32, m: Self::M) -> Self::V;
    /// Stores `LANES` floats to `p`.
    unsafe fn store(p: *mut f32, v: Self::V);
    /// Stores the live lanes of `m` to `p`; accesses no other lane.
    unsafe fn store_masked(p: *mut f32, v: Self::V, m: Self::M);
    /// `a·b + c` (fused where the level has FMA).
    unsafe fn fma(a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    /// `a + b`.
    unsafe fn add(a: Self::V, b: Self::V) -> Self::V;
    /// `a · b`.
    unsafe fn mul(a: Self::V, b: Self::V) -> Self::V;
    /// Lane-wise maximum.
    unsafe fn max(a: Self::V, b: Self::V) -> Self::V;
    /// The mask of lanes `lo..hi`, `lo < hi ≤ LANES`.
    unsafe fn mask(lo: usize, hi: usize) -> Self::M;
    /// The sum of all lanes.
    unsafe fn reduce_add(v: Self::V) -> f32;
}

/// Portable arrays of 8 lanes; the compiler vectorises them for the target's baseline.
#[derive(Clone, Copy)]
pub(crate) struct Portable;

const PL: usize = 8;

impl Simd for Portable {
    const LANES: usize = PL;
    type V = [f32; PL];
    type M = (usize, usize);

    #[inline(always)]
    unsafe fn zero() -> Self::V {
        [0.0; PL]
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> Self::V {
        [x; PL]
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self::V {
        // SAFETY: the caller guarantees `PL` readable floats at `p`.
        unsafe { (p as *const [f32; PL]).read_unaligned() }
    }
    #[inline(always)]
    unsafe fn load_masked(p: *const f32, (lo, hi): (usize, usize)) -> Self::V {
        let mut v = [0.0; PL];
        for (i, lane) in v.iter_mut().enumerate().take(hi).skip(lo) {
            // SAFETY: the caller guarantees lanes `lo..hi` at `p` are readable.
            *lane = unsafe { *p.wrapping_add(i) };
        }
        v
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: Self::V) {
        // SAFETY: the caller guarantees `PL` writable floats at `p`.
        unsafe { (p as *mut [f32; PL]).write_unaligned(v) }
    }
    #[inline(always)]
    unsafe fn store_masked(p: *mut f32, v: Self::V, (lo, hi): (usize, usize)) {
        for (i, lane) in v.iter().enumerate().take(hi).skip(lo) {
            // SAFETY: the caller guarantees lanes `lo..hi` at `p` are writable.
            unsafe { *p.wrapping_add(i) = *lane };
        }
    }
    #[inline(always)]
    unsafe fn fma(a: Self::V, b: Self::V, c: Self::V) -> Self::V {
        std::array::from_fn(|i| a[i] * b[i] + c[i])
    }
    #[inline(always)]
    unsafe fn add(a: Self::V, b: Self::V) -> Self::V {
        std::array::from_fn(|i| a[i] + b[i])
    }
    #[inline(always)]
    unsafe fn mul(a: Self::V, b: Self::V) -> Self::V {
        std::array::from_fn(|i| a[i] * b[i])
    }
    #[inline(always)]
    unsafe fn max(a: Self::V, b: Self::V) -> Self::V {
        std::array::from_fn(|i| if a[i] > b[i] { a[i] } else { b[i] })
    }
    #[inline(always)]
    unsafe fn mask(lo: usize, hi: usize) -> (usize, usize) {
        (lo, hi)
    }
    #[inline(always)]
    unsafe fn reduce_add(v: Self::V) -> f32 {
        ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]))
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) use x86::{Avx2, Avx512};

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::Simd;
    use std::arch::x86_64::*;

    /// AVX-512F: 16 lanes, tails through mask registers.
    #[derive(Clone, Copy)]
    pub(crate) struct Avx512;

    // Every intrinsic here needs `avx512f`, which the caller of these `unsafe` methods
    // guarantees; pointer validity is the caller's contract as documented on the trait.
    impl Simd for Avx512 {
        const LANES: usize = 16;
        type V = __m512;
        type M = __mmask16;

        #[inline(always)]
        unsafe fn zero() -> __m512 {
            // SAFETY: registers only, no memory access; the caller guarantees the CPU has
            // `avx512f` (Simd's contract).
            unsafe { _mm512_setzero_ps() }
        }
        #[inline(always)]
        unsafe fn splat(x: f32) -> __m512 {
            // SAFETY: registers only, no memory access; the caller guarantees the CPU has
            // `avx512f` (Simd's contract).
            unsafe { _mm512_set1_ps(x) }
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> __m512 {
            // SAFETY: the caller guarantees `avx512f` (Simd's contract) and `LANES` readable floats
            // at `p`; the load is unaligned, so any `f32` alignment will do.
            unsafe { _mm512_loadu_ps(p) }
        }
        #[inline(always)]
        unsafe fn load_masked(p: *const f32, m: __mmask16) -> __m512 {
            // SAFETY: the caller guarantees `avx512f` and that the live lanes of `m` at `p` are
            // readable; masked-off lanes are not accessed (no fault) and read as zero.
            unsafe { _mm512_maskz_loadu_ps(m, p) }
        }
        #[inline(always)]
        unsafe fn store(p: *mut f32, v: __m512) {
            // SAFETY: the caller guarantees `avx512f` and `LANES` writable floats at `p`; the store
            // is unaligned.
            unsafe { _mm512_storeu_ps(p, v) }
        }
        #[inline(always)]
        unsafe fn store_masked(p: *mut f32, v: __m512, m: __mmask16) {
            // SAFETY: the caller guarantees `avx512f` and that the live lanes of `m` at `p` are
            // writable; the masked-off lanes are not accessed.
            unsafe { _mm512_mask_storeu_ps(p, m, v) }
        }
        #[inline(always)]
        unsafe fn fma(a: __m512, b: __m512, c: __m512) -> __m512 {
            // SAFETY: registers only, no memory access; the caller guarantees the CPU has
            // `avx512f` (Simd's contract).
            unsafe { _mm512_fmadd_ps(a, b, c) }
        }
        #[inline(always)]
        unsafe fn add(a: __m512, b: __m512) -> __m512 {
            // SAFETY: registers only, no memory access; the caller guarantees the CPU has
            // `avx512f` (Simd's contract).
            unsafe { _mm512_add_ps(a, b) }
        }
        #[inline(always)]
        unsafe fn mul(a: __m512, b: __m512) -> __m512 {
            // SAFETY: registers only, no memory access; the caller guarantees the CPU has
            // `avx512f` (Simd's contract).
            unsafe { _mm512_mul_ps(a, b) }
        }
        #[inline(always)]
        unsafe fn max(a: __m512, b: __m512) -> __m512 {
            // SAFETY: registers only, no memory access; the caller guarantees the CPU has
            // `avx512f` (Simd's contract).
            unsafe { _mm512_max_ps(a, b) }
        }
        #[inline(always)]
        unsafe fn mask(lo: usize, hi: usize) -> __mmask16 {
            (((1u32 << hi) - 1) & !((1u32 << lo) - 1)) as __mmask16
        }
        #[inline(always)]
        unsafe fn reduce_add(v: __m512) -> f32 {
            // SAFETY: registers only, no memory access; the caller guarantees the CPU has
            // `avx512f` (Simd's contract).
            unsafe { _mm512_reduce_add_ps(v) }
        }
    }

    /// AVX2 + FMA: 8 lanes, tails through `vmaskmov`.
    #[derive(Clone, Copy)]
    pub(crate) struct Avx2;

    // Every intrinsic here needs `avx2` and `fma`, which the caller of these `unsafe` methods
    // guarantees; pointer validity is the caller's contract.
    impl Simd for Avx2 {
        const LANES: usize = 8;
        type V = __m256;
        type M = __m256i;

        #[inline(always)]
        unsafe fn zero() -> __m256 {
            // SAFETY: registers only, no memory access; the caller guarantees the CPU has
            // `avx2` and `fma` (Simd's contract).
            unsafe { _mm256_setzero_ps() }
        }
        #[inline(always)]
        unsafe fn splat(x: f32) -> __m256 {
            // SAFETY: registers only, no memory access; the caller guarantees the CPU has
            // `avx2` and `fma` (Simd's contract).
            unsafe { _mm256_set1_ps(x) }
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> __m256 {
            // SAFETY: the caller guarantees `avx2` and `fma` (Simd's contract) and `LANES` readable
            // floats at `p`; the load is unaligned, so any `f32` alignment will do.
            unsafe { _mm256_loadu_ps(p) }
        }
        #[inline(always)]
        unsafe fn load_masked(p: *const f32, m: __m256i) -> __m256 {
            // Masked-off lanes are not accessed (no fault) and read as zero.
            // SAFETY: the caller guarantees `avx2` and `fma` and that the live lanes of `m` at `p`
            // are readable; the masked-off lanes are not accessed.
            unsafe { _mm256_maskload_ps(p, m) }
        }
        #[inline(always)]
        unsafe fn store(p: *mut f32, v: __m256) {
            // SAFETY: the caller guarantees `avx2` and `fma` and `LANES` writable floats at `p`;
            // the store is unaligned.
            unsafe { _mm256_storeu_ps(p, v) }
        }
        #[inline(always)]
        unsafe fn store_masked(p: *mut f32, v: __m256, m: __m256i) {
            // SAFETY: the caller guarantees `avx2` and `fma` and that the live lanes of `m` at `p`
            // are writable; the masked-off lanes are not accessed.
            unsafe { _mm256_maskstore_ps(p, m, v) }
        }
        #[inline(always)]
        unsafe fn fma(a: __m256, b: __m256, c: __m256) -> __m256 {
            // SAFETY: registers only, no memory access; the caller guarantees the CPU has
            // `avx2` and `fma` (Simd's contract).
            unsafe { _mm256_fmadd_ps(a, b, c) }
        }
        #[inline(always)]
        unsafe fn add(a: __m256, b: __m256) -> __m256 {
            // SAFETY: registers only, no memory access; the caller guarantees the CPU has
            // `avx2` and `fma` (Simd's contract).
            unsafe { _mm256_add_ps(a, b) }
        }
        #[inline(always)]
        unsafe fn mul(a: __m256, b: __m256) -> __m256 {
            // SAFETY: registers only, no memory access; the caller guarantees the CPU has
            // `avx2` and `fma` (Simd's contract).
            unsafe { _mm256_mul_ps(a, b) }
        }
        #[inline(always)]
        unsafe fn max(a: __m256, b: __m256) -> __m256 {
            // SAFETY: registers only, no memory access; the caller guarantees the CPU has
            // `avx2` and `fma` (Simd's contract).
            unsafe { _mm256_max_ps(a, b) }
        }
        #[inline(always)]
        unsafe fn mask(lo: usize, hi: usize) -> __m256i {
            // SAFETY: registers only, no memory access; the caller guarantees the CPU has
            // `avx2` and `fma` (Simd's contract).
            unsafe {
                let iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
                _mm256_and_si256(
                    _mm256_cmpgt_epi32(_mm256_set1_epi32(hi as i32), iota),
                    _mm256_cmpgt_epi32(iota, _mm256_set1_epi32(lo as i32 - 1)),
                )
            }
        }
        #[inline(always)]
        unsafe fn reduce_add(v: __m256) -> f32 {
            // SAFETY: registers only, no memory access; the caller guarantees the CPU has
            // `avx2` and `fma` (Simd's contract).
            unsafe {
                let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
                let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
                let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
                _mm_cvtss_f32(s)
            }
        }
    }
}
