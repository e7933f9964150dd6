//! [`AlignedVec`]: an owned `f32` buffer whose first element sits on a 64-byte boundary.
//!
//! Vector loads of a feature-major matrix stay within one cache line only when its rows start
//! on one: with `ld` a multiple of 16 floats, that holds for every row once the first element
//! is 64-byte aligned. A plain `Vec<f32>` is only as aligned as the allocator makes it (often
//! 16 bytes), and the vectorised kernels run measurably slower when loads of `X` split cache
//! lines (figures in `docs/MEASUREMENTS.md`), so which offset an allocation happened to get
//! would decide a benchmark's result. The runtime's matrices, the CPU backend's buffers and
//! the planner's timing operands all use this type, so they all run the aligned case.
//!
//! It over-allocates 15 floats and starts the slice at the first aligned one, which needs no
//! `unsafe`; a clone is aligned anew.

use std::borrow::{Borrow, BorrowMut};
use std::fmt;
use std::ops::{Deref, DerefMut};

/// The alignment of an [`AlignedVec`]'s first element, in bytes.
pub const ALIGN_BYTES: usize = 64;

const ALIGN_FLOATS: usize = ALIGN_BYTES / std::mem::size_of::<f32>();

/// An owned, fixed-length `f32` buffer whose first element is [`ALIGN_BYTES`]-aligned.
/// It dereferences to `[f32]`.
pub struct AlignedVec {
    buf: Vec<f32>,
    offset: usize,
    len: usize,
}

impl AlignedVec {
    /// `len` zeros.
    pub fn zeros(len: usize) -> Self {
        Self::filled(len, 0.0)
    }

    /// `len` copies of `value`.
    pub fn filled(len: usize, value: f32) -> Self {
        let buf = vec![value; len + ALIGN_FLOATS - 1];
        // A `Vec<f32>` is 4-byte aligned, so the distance to the next 64-byte boundary is a
        // whole number of floats, at most 15.
        let misalign = buf.as_ptr() as usize % ALIGN_BYTES;
        let offset = (ALIGN_BYTES - misalign) % ALIGN_BYTES / std::mem::size_of::<f32>();
        AlignedVec { buf, offset, len }
    }

    /// A copy of `data`.
    pub fn from_slice(data: &[f32]) -> Self {
        let mut v = Self::zeros(data.len());
        v.copy_from_slice(data);
        v
    }

    /// The elements.
    pub fn as_slice(&self) -> &[f32] {
        &self.buf[self.offset..self.offset + self.len]
    }

    /// The elements, mutable.
    pub fn as_mut_slice(&mut self) -> &mut [f32] {
        &mut self.buf[self.offset..self.offset + self.len]
    }

    /// The elements, copied into a `Vec`.
    pub fn to_vec(&self) -> Vec<f32> {
        self.as_slice().to_vec()
    }

    /// The most elements [`set_len`](Self::set_len) accepts (at least the length it was
    /// created with).
    pub fn capacity(&self) -> usize {
        self.buf.len() - self.offset
    }

    /// Shortens or lengthens the buffer within its [`capacity`](Self::capacity), without
    /// allocating; the elements keep whatever they held. Panics beyond the capacity.
    pub fn set_len(&mut self, len: usize) {
        assert!(
            len <= self.capacity(),
            "length {len} beyond the capacity {}",
            self.capacity()
        );
        self.len = len;
    }
}

impl Deref for AlignedVec {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        self.as_slice()
    }
}

impl DerefMut for AlignedVec {
    fn deref_mut(&mut self) -> &mut [f32] {
        self.as_mut_slice()
    }
}

impl Borrow<[f32]> for AlignedVec {
    fn borrow(&self) -> &[f32] {
        self.as_slice()
    }
}

impl BorrowMut<[f32]> for AlignedVec {
    fn borrow_mut(&mut self) -> &mut [f32] {
        self.as_mut_slice()
    }
}

impl Clone for AlignedVec {
    /// A new allocation has its own alignment: the copy is aligned anew.
    fn clone(&self) -> Self {
        Self::from_slice(self.as_slice())
    }
}

impl PartialEq for AlignedVec {
    fn eq(&self, other: &Self) -> bool {
        self.as_slice() == other.as_slice()
    }
}

impl fmt::Debug for AlignedVec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.as_slice()).finish()
    }
}

impl From<&[f32]> for AlignedVec {
    fn from(data: &[f32]) -> Self {
        Self::from_slice(data)
    }
}

impl From<Vec<f32>> for AlignedVec {
    fn from(data: Vec<f32>) -> Self {
        Self::from_slice(&data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn aligned(v: &AlignedVec) -> bool {
        (v.as_ptr() as usize).is_multiple_of(ALIGN_BYTES)
    }

    #[test]
    fn set_len_stays_within_the_allocation() {
        let mut v = AlignedVec::filled(40, 2.0);
        assert!(v.capacity() >= 40);
        v.set_len(10);
        assert_eq!(v.len(), 10);
        v[9] = 7.0;
        v.set_len(40);
        assert_eq!(v.len(), 40);
        assert_eq!((v[9], v[39]), (7.0, 2.0));
        assert!(aligned(&v));
        let cap = v.capacity();
        assert!(std::panic::catch_unwind(move || v.set_len(cap + 1)).is_err());
    }

    #[test]
    fn every_length_starts_aligned_and_has_its_length() {
        // Many allocations of many sizes, so the allocator hands out every 16-byte offset.
        let vs: Vec<AlignedVec> = (0..200).map(|n| AlignedVec::filled(n % 37, 1.5)).collect();
        for (n, v) in vs.iter().enumerate() {
            assert_eq!(v.len(), n % 37);
            assert!(v.is_empty() || aligned(v), "length {}", v.len());
            assert!(v.iter().all(|&x| x == 1.5));
        }
    }

    #[test]
    fn clones_are_aligned_anew_and_equal() {
        let data: Vec<f32> = (0..100).map(|i| i as f32).collect();
        let v = AlignedVec::from_slice(&data);
        let clones: Vec<AlignedVec> = (0..50).map(|_| v.clone()).collect();
        for c in &clones {
            assert!(aligned(c));
            assert_eq!(c, &v);
            assert_eq!(c.to_vec(), data);
        }
    }

    #[test]
    fn writes_land_in_the_slice() {
        let mut v = AlignedVec::zeros(5);
        v[4] = 2.0;
        v.as_mut_slice()[0] = 1.0;
        assert_eq!(v.as_slice(), &[1.0, 0.0, 0.0, 0.0, 2.0]);
        let b: &[f32] = v.borrow();
        assert_eq!(b.len(), 5);
    }
}
