//! Data-parallel training: what a [`Trainer`](crate::Trainer) needs from the processes it
//! trains with, and (with the cargo feature `mpi`) MPI's implementation of it.
//!
//! Every rank holds the whole model and the same data order. Each step, a rank computes the
//! loss and gradients of its share of the global batch ([`shard`]); the gradients are scaled
//! by the share's fraction of the batch and summed over the ranks in one all-reduce of a flat
//! buffer ([`GradientBuffer`]): the gradients of the nonzero weights and the biases, plus the
//! dense weight gradients only in the steps that compute them (the dense-momentum window). So
//! every rank takes the same SGD step, keeps identical weights and momentum, and runs the same
//! mask update from identical inputs; the patterns' hashes are compared after every update.
//!
//! The sums must be identical on every rank, so with more than two ranks
//! [`Communicator::all_reduce_sum`] reduces to one rank and broadcasts the result (an
//! all-reduce's algorithm may add in a different order on different ranks); two ranks add two
//! numbers, the same bits in either order, and use one all-reduce.

use crate::error::{Result, RuntimeError};
use crate::model::Model;

/// The collective operations data-parallel training uses.
pub trait Communicator {
    /// This process's rank, `0..size`.
    fn rank(&self) -> usize;
    /// The number of ranks.
    fn size(&self) -> usize;
    /// Replaces `buf` on every rank by the element-wise sum of every rank's `buf`, the same
    /// bits on every rank.
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()>;
    /// [`all_reduce_sum`](Self::all_reduce_sum) for `f64`.
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()>;
    /// Every rank's `value`, in rank order.
    fn all_gather_u64(&self, value: u64) -> Result<Vec<u64>>;
}

/// Rank `rank`'s share of `len` items split over `size` ranks: a contiguous range, the first
/// `len % size` ranks one item longer.
pub fn shard(len: usize, rank: usize, size: usize) -> std::ops::Range<usize> {
    let base = len / size;
    let extra = len % size;
    let start = rank * base + rank.min(extra);
    start..start + base + usize::from(rank < extra)
}

/// The largest share of a global batch of `batch` over `size` ranks (each rank's batch).
pub fn rank_batch(batch: usize, size: usize) -> usize {
    batch.div_ceil(size)
}

/// The flat buffer one step's gradients travel in, reused from step to step.
#[derive(Debug, Default)]
pub struct GradientBuffer {
    buf: Vec<f32>,
}

impl GradientBuffer {
    /// Scales every gradient of `model` by `scale` into the buffer: per layer, the nonzero
    /// weights' gradient (or, if `dense`, the dense weight gradient, which holds it) and the
    /// bias gradient; then every dense parameter's gradient (batch normalisation's).
    /// Returns the payload in bytes.
    pub fn pack(&mut self, model: &Model, scale: f32, dense: bool) -> usize {
        self.buf.clear();
        for w in model.sparse_layers() {
            let weights = if dense { w.dense_grad() } else { w.grad() };
            self.buf.extend(weights.iter().map(|g| g * scale));
            self.buf.extend(w.bias_grad().iter().map(|g| g * scale));
        }
        for p in model.dense_params() {
            self.buf.extend(p.grad.iter().map(|g| g * scale));
        }
        self.buf.len() * std::mem::size_of::<f32>()
    }

    /// The packed values, for the all-reduce.
    pub fn as_mut_slice(&mut self) -> &mut [f32] {
        &mut self.buf
    }

    /// Writes the (summed) buffer back into `model`'s gradients, in [`pack`](Self::pack)'s
    /// order.
    pub fn unpack(&self, model: &mut Model, dense: bool) -> Result<()> {
        let mut rest = &self.buf[..];
        let mut take = |dst: &mut [f32]| -> Result<()> {
            if rest.len() < dst.len() {
                return Err(RuntimeError::Config(
                    "distributed: the gradient buffer is shorter than the model's gradients".into(),
                ));
            }
            let (head, tail) = rest.split_at(dst.len());
            dst.copy_from_slice(head);
            rest = tail;
            Ok(())
        };
        for w in model.sparse_layers_mut() {
            let (grad, bias, dense_grad) = w.grads_mut();
            take(if dense { dense_grad } else { grad })?;
            take(bias)?;
            if dense {
                w.active_grad_from_dense();
            }
        }
        for p in model.dense_params_mut() {
            take(&mut p.grad)?;
        }
        Ok(())
    }
}

/// The payload in bytes an all-reduce of every parameter's gradient (weights dense, biases)
/// would pass in one step: the dense-training equivalent of one step's communication.
pub fn dense_equivalent_bytes(model: &Model) -> usize {
    model
        .sparse_layers()
        .map(|w| w.rows() * w.cols() + w.rows())
        .sum::<usize>()
        * std::mem::size_of::<f32>()
}

/// Checks that every rank holds the same patterns after a mask update: compares each layer's
/// pattern hash over the ranks; a mismatch is an error naming the layer.
pub fn check_patterns(comm: &dyn Communicator, model: &Model) -> Result<()> {
    for w in model.sparse_layers() {
        let hashes = comm.all_gather_u64(w.pattern().hash())?;
        if let Some((rank, h)) = hashes.iter().enumerate().find(|(_, &h)| h != hashes[0]) {
            return Err(RuntimeError::Config(format!(
                "distributed: layer {}: rank {rank}'s mask (hash {h:016x}) differs from rank \
                 0's ({:016x}) after the mask update; the ranks no longer train the same model",
                w.name(),
                hashes[0]
            )));
        }
    }
    Ok(())
}

#[cfg(feature = "mpi")]
pub use self::mpi_comm::MpiCommunicator;

#[cfg(feature = "mpi")]
mod mpi_comm {
    use std::cell::RefCell;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use mpi::collective::{CommunicatorCollectives, Root, SystemOperation};
    use mpi::datatype::Equivalence;
    use mpi::topology::{Communicator as _, SimpleCommunicator};
    use mpi::Rank;

    use super::Communicator;
    use crate::error::{Result, RuntimeError};

    /// MPI's world communicator, with a watchdog: a collective that has not completed after
    /// the timeout (a rank that hangs, or died without MPI noticing) ends this process with an
    /// error, and `mpirun` then ends the job.
    pub struct MpiCommunicator {
        _universe: mpi::environment::Universe,
        world: SimpleCommunicator,
        /// Milliseconds since `epoch` when the running collective started; 0 when none runs.
        busy_since: Arc<AtomicU64>,
        epoch: Instant,
        /// The receive buffer of `all_reduce_sum`, kept from step to step.
        scratch: RefCell<Vec<f32>>,
    }

    impl std::fmt::Debug for MpiCommunicator {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("MpiCommunicator")
                .field("rank", &self.world.rank())
                .field("size", &self.world.size())
                .finish()
        }
    }

    impl MpiCommunicator {
        /// Initialises MPI (once per process) with a collective timeout.
        pub fn init(timeout: Duration) -> Result<Self> {
            let universe = mpi::initialize().ok_or_else(|| {
                RuntimeError::Config(
                    "distributed: MPI could not be initialised (is this run under mpirun?)".into(),
                )
            })?;
            let world = universe.world();
            let busy_since = Arc::new(AtomicU64::new(0));
            let epoch = Instant::now();
            let watched = busy_since.clone();
            let rank = world.rank();
            std::thread::Builder::new()
                .name("mpi-watchdog".into())
                .spawn(move || loop {
                    std::thread::sleep(Duration::from_millis(500));
                    let since = watched.load(Ordering::Relaxed);
                    if since == 0 {
                        continue;
                    }
                    let now = epoch.elapsed().as_millis() as u64;
                    if now.saturating_sub(since) > timeout.as_millis() as u64 {
                        eprintln!(
                            "error: distributed: rank {rank} waited more than {} s in a \
                             collective operation: another rank has stopped or hangs; ending \
                             the job",
                            timeout.as_secs()
                        );
                        std::process::exit(1);
                    }
                })
                .map_err(|e| RuntimeError::Config(format!("distributed: watchdog: {e}")))?;
            Ok(MpiCommunicator {
                _universe: universe,
                world,
                busy_since,
                epoch,
                scratch: RefCell::new(Vec::new()),
            })
        }

        /// Replaces `buf` on every rank by the sum over the ranks, the same bits everywhere:
        /// one all-reduce for two ranks (two addends give the same sum in either order), else
        /// a reduce to rank 0 and a broadcast. `sum` is the receive buffer.
        fn sum_everywhere<T>(&self, buf: &mut [T], sum: &mut Vec<T>)
        where
            T: Equivalence + Copy + Default,
        {
            sum.clear();
            sum.resize(buf.len(), T::default());
            self.watched(|| {
                if self.world.size() == 2 {
                    self.world
                        .all_reduce_into(&buf[..], &mut sum[..], SystemOperation::sum());
                    buf.copy_from_slice(sum);
                    return;
                }
                let root = self.world.process_at_rank(0 as Rank);
                if self.world.rank() == 0 {
                    root.reduce_into_root(&buf[..], &mut sum[..], SystemOperation::sum());
                    buf.copy_from_slice(sum);
                } else {
                    root.reduce_into(&buf[..], SystemOperation::sum());
                }
                root.broadcast_into(buf);
            });
        }

        fn watched<T>(&self, f: impl FnOnce() -> T) -> T {
            let now = (self.epoch.elapsed().as_millis() as u64).max(1);
            self.busy_since.store(now, Ordering::Relaxed);
            let out = f();
            self.busy_since.store(0, Ordering::Relaxed);
            out
        }
    }

    impl Communicator for MpiCommunicator {
        fn rank(&self) -> usize {
            self.world.rank() as usize
        }

        fn size(&self) -> usize {
            self.world.size() as usize
        }

        fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()> {
            self.sum_everywhere(buf, &mut self.scratch.borrow_mut());
            Ok(())
        }

        fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()> {
            self.sum_everywhere(buf, &mut Vec::new());
            Ok(())
        }

        fn all_gather_u64(&self, value: u64) -> Result<Vec<u64>> {
            let mut all = vec![0u64; self.size()];
            self.watched(|| self.world.all_gather_into(&value, &mut all[..]));
            Ok(all)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_cover_the_batch_once() {
        for len in 0..40 {
            for size in 1..6 {
                let mut next = 0;
                for rank in 0..size {
                    let r = shard(len, rank, size);
                    assert_eq!(r.start, next);
                    assert!(r.len() <= rank_batch(len.max(1), size));
                    next = r.end;
                }
                assert_eq!(next, len);
            }
        }
        assert_eq!(shard(101, 0, 2), 0..51);
        assert_eq!(shard(101, 1, 2), 51..101);
    }
}
