//! Communication between the ranks of a data-parallel job.
//!
//! - [`Collectives`]: the few operations the trainer needs (all-reduce, reduce to one rank,
//!   broadcast), on device tensors, in NCCL's terms. Every rank calls the same operations in
//!   the same order with tensors of the same shapes, as NCCL requires.
//! - [`nccl`] (feature `cuda`): the product, NCCL over the GPUs' own memory.
//! - [`local`]: an in-process stand-in over host memory for tests (threads as ranks). It gives
//!   the same results as a deterministic NCCL would (sums in rank order); it is not offered to
//!   users, since it copies every tensor through the host.
//! - [`launch`]: a job's ranks from the environment torchrun and SLURM set (`RANK`,
//!   `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`), and the TCP bootstrap through
//!   which rank 0 hands every rank NCCL's unique id.
//! - [`owners`]: which rank owns which parameter tensor under ZeRO-1.
//!
//! Data flows dsl → collectives → trainer: this crate knows device tensors, not models.

pub mod launch;
pub mod local;
#[cfg(feature = "cuda")]
pub mod nccl;

use cubecl::Runtime;
use dsl::{Device, Element, GpuTensor};
use std::any::Any;
use std::time::Duration;

/// What went wrong between ranks. Every variant names the rank that reports it.
#[derive(Debug, thiserror::Error)]
pub enum CollectiveError {
    #[error("rank {rank}: {op} timed out after {waited:?} waiting for rank(s) {missing:?}")]
    Timeout { rank: usize, op: &'static str, waited: Duration, missing: Vec<usize> },

    #[error("rank {rank}: {op}: rank {peer} left the job: {reason}")]
    PeerFailed { rank: usize, op: &'static str, peer: usize, reason: String },

    #[error("rank {rank}: {op}: ranks disagree: {message}")]
    Mismatch { rank: usize, op: &'static str, message: String },

    #[error("rank {rank}: bootstrap through {address}: {message}")]
    Bootstrap { rank: usize, address: String, message: String },

    #[error("{message}")]
    Environment { message: String },

    #[error("rank {rank}: NCCL {op}: {message}")]
    Nccl { rank: usize, op: &'static str, message: String },

    #[error(transparent)]
    Device(#[from] dsl::Error),
}

pub type Result<T, E = CollectiveError> = std::result::Result<T, E>;

/// A device tensor of any element type the trainer communicates (weights in the compute type,
/// f32 gradients and optimizer state), so [`Collectives`] stays usable as a trait object.
pub enum TensorMut<'a, R: Runtime> {
    F32(&'a mut GpuTensor<R, f32>),
    F16(&'a mut GpuTensor<R, half::f16>),
    BF16(&'a mut GpuTensor<R, half::bf16>),
}

impl<'a, R: Runtime> TensorMut<'a, R> {
    /// `tensor` as the variant of its element type. Panics for element types other than f32,
    /// f16 and bf16 (an internal misuse: only those are stored).
    pub fn of<E: Element>(tensor: &'a mut GpuTensor<R, E>) -> Self {
        let any: &mut dyn Any = tensor;
        if any.is::<GpuTensor<R, f32>>() {
            return Self::F32(any.downcast_mut().expect("checked"));
        }
        if any.is::<GpuTensor<R, half::f16>>() {
            return Self::F16(any.downcast_mut().expect("checked"));
        }
        match any.downcast_mut::<GpuTensor<R, half::bf16>>() {
            Some(t) => Self::BF16(t),
            None => panic!("collectives: element type {} is not communicated", E::DTYPE),
        }
    }

    /// Bytes of the tensor's elements.
    pub fn size_bytes(&self) -> usize {
        match self {
            Self::F32(t) => t.size_bytes(),
            Self::F16(t) => t.size_bytes(),
            Self::BF16(t) => t.size_bytes(),
        }
    }
}

/// The operations a data-parallel step needs, in place on device tensors, with NCCL's meaning.
/// All ranks call them in the same order with the same shapes; a rank that fails, leaves or
/// waits too long makes the others' calls return an error (no rank waits forever).
///
/// Summation order: the trait promises the sum, not its order; [`local::LocalGroup`] adds in
/// rank order, so its results are deterministic. NCCL's order depends on its algorithm and
/// topology but is fixed for a given job, so a rerun gives the same bits.
pub trait Collectives<R: Runtime>: Send {
    /// This process's rank, `0..world_size`.
    fn rank(&self) -> usize;

    /// Ranks in the job.
    fn world_size(&self) -> usize;

    /// `tensor = Σ_ranks tensor` on every rank (NCCL `ncclAllReduce`, `ncclSum`).
    fn all_reduce_sum(&mut self, device: &Device<R>, tensor: &mut GpuTensor<R, f32>) -> Result<()>;

    /// `tensor = Σ_ranks tensor` on `root`; other ranks' tensors are left as they were (NCCL
    /// `ncclReduce` in place). Half the traffic of an all-reduce: ZeRO-1 reduces each gradient to
    /// the rank that owns its optimizer state.
    fn reduce_sum(&mut self, device: &Device<R>, tensor: &mut GpuTensor<R, f32>, root: usize) -> Result<()>;

    /// Every rank's `tensor` becomes `root`'s (NCCL `ncclBroadcast` in place).
    fn broadcast(&mut self, device: &Device<R>, tensor: TensorMut<'_, R>, root: usize) -> Result<()>;

    /// Names the error that stops this rank, so the others' next call reports it (rather than
    /// a timeout) when the implementation can pass it on.
    fn abort(&mut self, reason: &str);
}

/// The rank that owns each of `numels.len()` tensors (their element counts) under ZeRO-1: the
/// largest first, each to the rank with the fewest owned elements so far (ties to the lowest
/// rank), so the optimizer state is spread as evenly as whole tensors allow. Deterministic:
/// every rank computes the same table.
pub fn owners(numels: &[usize], world_size: usize) -> Vec<usize> {
    assert!(world_size > 0, "owners: world_size must be positive");
    let mut order: Vec<usize> = (0..numels.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(numels[i]));
    let mut load = vec![0usize; world_size];
    let mut owner = vec![0usize; numels.len()];
    for i in order {
        let rank = (0..world_size).min_by_key(|&r| (load[r], r)).expect("world_size > 0");
        owner[i] = rank;
        load[rank] += numels[i];
    }
    owner
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owners_balance_whole_tensors() {
        let numels = [10, 1, 7, 7, 3, 2];
        let owner = owners(&numels, 2);
        let load =
            |r: usize| numels.iter().zip(&owner).filter(|&(_, &o)| o == r).map(|(n, _)| n).sum::<usize>();
        assert_eq!(load(0) + load(1), 30);
        assert!(load(0).abs_diff(load(1)) <= 2, "{owner:?}");
        assert_eq!(owners(&numels, 1), vec![0; 6]);
        // More ranks than tensors: some ranks own nothing, none owns two.
        let owner = owners(&[5, 4], 3);
        assert_eq!(owner, vec![0, 1]);
    }
}
