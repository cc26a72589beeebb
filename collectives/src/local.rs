//! An in-process stand-in for NCCL: ranks are threads of one process, tensors travel through
//! host memory. For tests only (every call copies the tensor to the host and back); it gives
//! the results NCCL defines, with sums taken in rank order so they are deterministic.
//!
//! Failure behaves as a job's should: a rank that drops its [`LocalGroup`] (its thread ended,
//! by error or panic) or calls [`Collectives::abort`] makes every other rank's pending and
//! later calls fail with [`CollectiveError::PeerFailed`] naming it; a rank that waits longer
//! than the group's timeout fails with [`CollectiveError::Timeout`] naming the missing ranks.

use crate::{CollectiveError, Collectives, Result, TensorMut};
use cubecl::Runtime;
use dsl::{Device, Element, GpuTensor};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// What one rank brings to a round.
#[derive(Clone)]
struct Contribution {
    op: &'static str,
    root: usize,
    bytes: Arc<Vec<u8>>,
}

#[derive(Default)]
struct Round {
    /// Rounds completed.
    generation: u64,
    arrived: Vec<Option<Contribution>>,
    /// Every rank's contribution to the last completed round.
    last: Arc<Vec<Contribution>>,
    /// The first rank that left, and why.
    failed: Option<(usize, String)>,
}

struct Shared {
    round: Mutex<Round>,
    changed: Condvar,
    timeout: Duration,
}

/// One rank's end of an in-process group (see the module docs).
pub struct LocalGroup {
    rank: usize,
    world_size: usize,
    shared: Arc<Shared>,
    /// Set once this rank has reported its own failure (so dropping does not overwrite it).
    left: bool,
}

impl LocalGroup {
    /// `world_size` connected ranks (index = rank), each to be moved to its own thread. A call
    /// that waits longer than `timeout` for the other ranks fails.
    pub fn new(world_size: usize, timeout: Duration) -> Vec<Self> {
        assert!(world_size > 0, "LocalGroup: world_size must be positive");
        let round = Round { arrived: vec![None; world_size], ..Round::default() };
        let shared = Arc::new(Shared { round: Mutex::new(round), changed: Condvar::new(), timeout });
        (0..world_size).map(|rank| Self { rank, world_size, shared: shared.clone(), left: false }).collect()
    }

    fn lock(&self) -> MutexGuard<'_, Round> {
        // A panicking rank poisons nothing we rely on: the round's data stays consistent.
        self.shared.round.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn peer_failed(&self, op: &'static str, failed: &(usize, String)) -> CollectiveError {
        CollectiveError::PeerFailed { rank: self.rank, op, peer: failed.0, reason: failed.1.clone() }
    }

    /// Contributes `bytes` and returns every rank's contribution, once all have arrived.
    fn exchange(&self, op: &'static str, root: usize, bytes: Vec<u8>) -> Result<Arc<Vec<Contribution>>> {
        let mut round = self.lock();
        if let Some(failed) = &round.failed {
            return Err(self.peer_failed(op, failed));
        }
        let generation = round.generation;
        round.arrived[self.rank] = Some(Contribution { op, root, bytes: Arc::new(bytes) });
        if round.arrived.iter().all(Option::is_some) {
            let all: Vec<Contribution> =
                round.arrived.iter_mut().map(|c| c.take().expect("all arrived")).collect();
            round.last = Arc::new(all);
            round.generation += 1;
            self.shared.changed.notify_all();
        }
        let start = Instant::now();
        while round.generation == generation {
            if let Some(failed) = &round.failed {
                return Err(self.peer_failed(op, failed));
            }
            let waited = start.elapsed();
            if waited >= self.shared.timeout {
                let missing: Vec<usize> =
                    (0..self.world_size).filter(|&r| round.arrived[r].is_none()).collect();
                let reason = format!("timed out in {op} waiting for rank(s) {missing:?}");
                round.failed.get_or_insert((self.rank, reason));
                self.shared.changed.notify_all();
                return Err(CollectiveError::Timeout { rank: self.rank, op, waited, missing });
            }
            round = self
                .shared
                .changed
                .wait_timeout(round, self.shared.timeout - waited)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        let all = round.last.clone();
        drop(round);
        if let Some(other) = all.iter().position(|c| c.op != op || c.root != root) {
            return Err(CollectiveError::Mismatch {
                rank: self.rank,
                op,
                message: format!(
                    "rank {} called {} (root {}) while rank {} called {op} (root {root})",
                    other, all[other].op, all[other].root, self.rank
                ),
            });
        }
        if let Some(other) = all.iter().position(|c| c.bytes.len() != all[self.rank].bytes.len()) {
            return Err(CollectiveError::Mismatch {
                rank: self.rank,
                op,
                message: format!(
                    "rank {other} sent {} bytes, rank {} sent {}",
                    all[other].bytes.len(),
                    self.rank,
                    all[self.rank].bytes.len()
                ),
            });
        }
        Ok(all)
    }

    fn check_root(&self, op: &'static str, root: usize) -> Result<()> {
        if root >= self.world_size {
            return Err(CollectiveError::Mismatch {
                rank: self.rank,
                op,
                message: format!("root {root} is not a rank of a world of {}", self.world_size),
            });
        }
        Ok(())
    }

    /// Sums f32 contributions in rank order.
    fn sum(all: &[Contribution]) -> Vec<f32> {
        let mut sum = vec![0f32; all[0].bytes.len() / 4];
        for c in all {
            for (s, v) in sum.iter_mut().zip(c.bytes.chunks_exact(4)) {
                *s += f32::from_le_bytes([v[0], v[1], v[2], v[3]]);
            }
        }
        sum
    }
}

/// Overwrites `tensor` with `values` (same length) through a device copy.
fn write<R: Runtime, E: Element>(
    device: &Device<R>,
    tensor: &mut GpuTensor<R, E>,
    values: &[E],
) -> Result<()> {
    let staged = GpuTensor::from_slice(device, values, tensor.shape())?;
    tensor.copy_from(device, &staged)?;
    Ok(())
}

fn broadcast_typed<R: Runtime, E: Element>(
    group: &LocalGroup,
    device: &Device<R>,
    tensor: &mut GpuTensor<R, E>,
    root: usize,
) -> Result<()> {
    const OP: &str = "broadcast";
    group.check_root(OP, root)?;
    let mine = tensor.to_vec(device)?;
    let bytes = E::as_bytes(&mine).to_vec();
    let all = group.exchange(OP, root, bytes)?;
    if group.rank != root {
        write(device, tensor, E::from_bytes(&all[root].bytes))?;
    }
    Ok(())
}

impl<R: Runtime> Collectives<R> for LocalGroup {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn all_reduce_sum(&mut self, device: &Device<R>, tensor: &mut GpuTensor<R, f32>) -> Result<()> {
        let mine = tensor.to_vec(device)?;
        let all = self.exchange("all_reduce", 0, <f32 as cubecl::CubeElement>::as_bytes(&mine).to_vec())?;
        write(device, tensor, &Self::sum(&all))
    }

    fn reduce_sum(&mut self, device: &Device<R>, tensor: &mut GpuTensor<R, f32>, root: usize) -> Result<()> {
        self.check_root("reduce", root)?;
        let mine = tensor.to_vec(device)?;
        let all = self.exchange("reduce", root, <f32 as cubecl::CubeElement>::as_bytes(&mine).to_vec())?;
        if self.rank == root {
            write(device, tensor, &Self::sum(&all))?;
        }
        Ok(())
    }

    fn broadcast(&mut self, device: &Device<R>, tensor: TensorMut<'_, R>, root: usize) -> Result<()> {
        match tensor {
            TensorMut::F32(t) => broadcast_typed(self, device, t, root),
            TensorMut::F16(t) => broadcast_typed(self, device, t, root),
            TensorMut::BF16(t) => broadcast_typed(self, device, t, root),
        }
    }

    fn abort(&mut self, reason: &str) {
        self.left = true;
        let mut round = self.shared.round.lock().unwrap_or_else(|e| e.into_inner());
        round.failed.get_or_insert((self.rank, reason.to_string()));
        self.shared.changed.notify_all();
    }
}

impl Drop for LocalGroup {
    /// A rank that goes away (returned, failed, panicked) releases the others: their calls
    /// fail naming it instead of waiting for the timeout. A rank that leaves after the job's
    /// last collective hurts nobody (nobody calls again).
    fn drop(&mut self) {
        if !self.left {
            let reason = if std::thread::panicking() { "it panicked" } else { "it stopped" };
            let mut round = self.lock();
            round.failed.get_or_insert((self.rank, reason.to_string()));
            self.shared.changed.notify_all();
        }
    }
}
