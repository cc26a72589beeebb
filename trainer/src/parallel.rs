//! Data-parallel training over [`collectives::Collectives`], with ZeRO-1 optimizer sharding.
//!
//! What a job of `W` ranks computes (each rank one process and one GPU under NCCL):
//! - **Data.** An optimizer step reads `W·K` micro-batches (`K` = `--grad-accum`), the ones a
//!   single rank with `--grad-accum W·K` would read, in the same order: rank `r` takes those
//!   whose index within the step is `i·W + r` (pretraining: global micro-batch `s·W·K + i·W + r`,
//!   i.e. tokens `[(that)·B·T, (that)·B·T + B·T + 1)` of the stream; SFT: the same positions in
//!   the epoch's packed micro-batches). The loss of every micro-batch is divided by the
//!   positions counted in all `W·K` (each rank knows them: the data is on every rank), so the
//!   gradients summed over ranks are the gradient of the global mean loss.
//! - **Gradients.** `--zero 0`: each gradient is all-reduced (every rank gets the sum).
//!   `--zero 1`: each is reduced to the rank that owns that parameter's optimizer state
//!   ([`collectives::owners`]: whole tensors, largest first to the least-loaded rank).
//! - **Clipping.** Each rank sums the squares of the gradients it owns, the `[1]` sums are
//!   all-reduced, and every rank takes the root: the global norm of the summed gradient. Both
//!   stages compute the norm this way, so they agree bit for bit.
//! - **Update.** `--zero 0`: every rank applies AdamW to every parameter (the same bits
//!   everywhere). `--zero 1`: each rank keeps moments (and f32 master weights) only for its
//!   parameters, updates those, and broadcasts the new weights from their owner.
//! - **Figures.** The step's loss is all-reduced on the device; every rank reads the same
//!   figures, so every rank stops at the same non-finite step.
//! - **Checkpoints.** Every rank calls `save`; under ZeRO-1 each state tensor is broadcast from
//!   its owner, and rank 0 alone writes the usual files (Hugging Face model files plus one
//!   gathered `optimizer.safetensors`, the same as a single rank writes). `--resume` needs the
//!   world size the checkpoint was trained with (it fixes the global batch), with either ZeRO
//!   stage.
//! - **Validation** runs on every rank over the same held-out batches (no traffic; the figures
//!   are identical on all ranks).
//!
//! Against one rank with `--grad-accum W·K`: the same tokens and the same loss, but the
//! gradients are summed in another order (per rank, then across ranks), so weights agree to f32
//! summation round-off, not bit for bit. ZeRO-1 against ZeRO-0: bit for bit.

use crate::error::Result;
use crate::optimizer::{Optimizer, StateTensor};
use collectives::{Collectives, TensorMut};
use cubecl::Runtime;
use dsl::{Device, FloatElement, GpuTensor};
use model::{ParamSpec, Params};
use serde::{Deserialize, Serialize};

/// How optimizer state is spread over ranks (DeepSpeed's ZeRO stages; only 0 and 1 exist here).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Zero {
    /// Every rank keeps all of AdamW's state and updates every parameter.
    #[default]
    Stage0,
    /// Each rank keeps and updates the state of the parameters it owns (moments and f32 master
    /// weights: 12 of the 16 bytes per parameter of bf16 training, divided by the world size).
    Stage1,
}

impl Zero {
    /// From `--zero 0|1`.
    pub fn from_stage(stage: u8) -> Option<Self> {
        match stage {
            0 => Some(Self::Stage0),
            1 => Some(Self::Stage1),
            _ => None,
        }
    }

    pub fn stage(self) -> u8 {
        match self {
            Self::Stage0 => 0,
            Self::Stage1 => 1,
        }
    }
}

/// Parameters whose optimizer state the most loaded rank keeps: all of them under ZeRO-0, the
/// largest share of [`collectives::owners`]'s table under ZeRO-1.
pub fn largest_state_share(specs: &[ParamSpec], world_size: usize, zero: Zero) -> usize {
    let numels: Vec<usize> = specs.iter().map(ParamSpec::numel).collect();
    if zero == Zero::Stage0 || world_size <= 1 {
        return numels.iter().sum();
    }
    let owners = collectives::owners(&numels, world_size);
    let mut load = vec![0usize; world_size];
    for (n, o) in numels.iter().zip(owners) {
        load[o] += n;
    }
    load.into_iter().max().unwrap_or(0)
}

/// `memory` (one rank's step, [`model::LlamaConfig::training_memory`]) with the optimizer
/// state and master weights of the most loaded rank of a `world_size`-rank job under `zero`.
/// Weights and gradients stay whole on every rank (ZeRO-1 shards neither); NCCL's own buffers
/// are not counted.
pub fn sharded_memory(
    config: &model::LlamaConfig,
    mut memory: model::config::MemoryEstimate,
    world_size: usize,
    zero: Zero,
) -> model::config::MemoryEstimate {
    let params = config.parameter_count();
    let share = largest_state_share(&config.parameters(), world_size, zero);
    // Exact shares of the whole-model figures: bytes per parameter × share.
    memory.optimizer = memory.optimizer / params.max(1) * share;
    memory.master = memory.master / params.max(1) * share;
    memory
}

/// A rank's part in a data-parallel job: its communicator and the ZeRO stage.
pub struct DataParallel<R: Runtime> {
    group: Box<dyn Collectives<R>>,
    zero: Zero,
    /// The rank owning each parameter's optimizer state (and its share of the norm).
    owners: Vec<usize>,
}

impl<R: Runtime> DataParallel<R> {
    /// Joins the trainer to `group` with optimizer sharding `zero`.
    pub fn new(group: Box<dyn Collectives<R>>, zero: Zero) -> Self {
        Self { group, zero, owners: Vec::new() }
    }

    pub fn rank(&self) -> usize {
        self.group.rank()
    }

    pub fn world_size(&self) -> usize {
        self.group.world_size()
    }

    pub fn zero(&self) -> Zero {
        self.zero
    }

    /// Fixes the ownership table for parameters of these shapes.
    pub(crate) fn bind(&mut self, specs: &[ParamSpec]) {
        let numels: Vec<usize> = specs.iter().map(ParamSpec::numel).collect();
        self.owners = collectives::owners(&numels, self.world_size());
    }

    /// Which parameters this rank sums into its share of the gradient norm.
    pub(crate) fn norm_share(&self) -> Vec<bool> {
        self.owners.iter().map(|&o| o == self.rank()).collect()
    }

    /// Which parameters' optimizer state this rank keeps.
    pub(crate) fn keeps_state(&self) -> Vec<bool> {
        match self.zero {
            Zero::Stage0 => vec![true; self.owners.len()],
            Zero::Stage1 => self.norm_share(),
        }
    }

    /// The parameter's owner.
    pub fn owner(&self, index: usize) -> usize {
        self.owners[index]
    }

    /// Sums every rank's gradients: all-reduced (ZeRO-0) or reduced to each owner (ZeRO-1).
    pub(crate) fn sum_gradients(&mut self, device: &Device<R>, grads: &mut Params<R, f32>) -> Result<()> {
        for (i, grad) in grads.tensors_mut().iter_mut().enumerate() {
            match self.zero {
                Zero::Stage0 => self.group.all_reduce_sum(device, grad)?,
                Zero::Stage1 => self.group.reduce_sum(device, grad, self.owners[i])?,
            }
        }
        Ok(())
    }

    /// `tensor = Σ_ranks tensor` (the step's loss, a norm share).
    pub(crate) fn all_reduce(&mut self, device: &Device<R>, tensor: &mut GpuTensor<R, f32>) -> Result<()> {
        Ok(self.group.all_reduce_sum(device, tensor)?)
    }

    /// After a ZeRO-1 update, every rank takes each parameter from its owner (nothing to do
    /// under ZeRO-0: every rank updated every parameter alike).
    pub(crate) fn share_weights<F: FloatElement>(
        &mut self,
        device: &Device<R>,
        params: &mut Params<R, F>,
    ) -> Result<()> {
        if self.zero == Zero::Stage0 {
            return Ok(());
        }
        for (i, param) in params.tensors_mut().iter_mut().enumerate() {
            self.group.broadcast(device, TensorMut::of(param), self.owners[i])?;
        }
        Ok(())
    }

    /// State tensor `which` of parameter `index` on rank 0 (`None` elsewhere, and when the
    /// optimizer keeps no such tensor): from its owner under ZeRO-1. Every rank must call it.
    pub(crate) fn gather_state(
        &mut self,
        device: &Device<R>,
        optimizer: &mut Optimizer<R>,
        which: StateTensor,
        index: usize,
        shape: &[usize],
    ) -> Result<Option<Vec<f32>>> {
        let rank = self.rank();
        if which == StateTensor::Master && !optimizer.has_master() {
            return Ok(None);
        }
        if self.zero == Zero::Stage0 {
            return Ok(match (rank, optimizer.state_tensor(which, index)) {
                (0, Some(t)) => Some(t.to_vec(device)?),
                _ => None,
            });
        }
        let owner = self.owners[index];
        let mut staged;
        let tensor = match optimizer.state_tensor(which, index) {
            Some(t) if rank == owner => t,
            _ => {
                staged = GpuTensor::<R, f32>::zeros(device, shape)?;
                &mut staged
            }
        };
        if owner != 0 {
            self.group.broadcast(device, TensorMut::of(tensor), owner)?;
        }
        Ok(if rank == 0 { Some(tensor.to_vec(device)?) } else { None })
    }

    /// Tells the other ranks why this one stops (see [`Collectives::abort`]).
    pub fn abort(&mut self, reason: &str) {
        self.group.abort(reason);
    }
}
