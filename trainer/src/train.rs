//! The training loop: sequential batches, gradient accumulation, Llama 2's schedule, AdamW with
//! clipping, held-out evaluation, and checkpoints that resume bit-identically.
//!
//! Semantics (other tools are compared against them):
//! - micro-batch `k` uses tokens `[k·B·T, k·B·T + B·T + 1)` of the training stream (inputs the
//!   first B·T, targets the last B·T, as B rows of T), wrapping to the start when too few
//!   tokens remain; an optimizer step uses `grad_accum` consecutive micro-batches and the mean
//!   of their losses (the summed gradients are scaled by 1/K). The training stream is all of
//!   the data unless the run evaluates without separate validation files, when [`split`] holds
//!   out its end;
//! - the rate at 0-indexed step `s` is [`Schedule::lr`]; the logged loss is the step's forward
//!   loss before its update; the gradient norm is the global L2 norm before clipping.
//!
//! The host never waits inside a step: [`Trainer::queue_step`] launches a step's kernels and
//! records its loss and gradient norm into a device buffer, and [`Trainer::read_steps`] reads
//! every queued step's figures in one transfer (checking them, and naming the first step whose
//! loss or norm is not finite). [`Trainer::step`] does both. The exception is f16 with dynamic
//! loss scaling, whose skip-or-apply decision reads the norm every step (as torch's
//! `GradScaler.step` does).
//!
//! A run directory holds the model in the Hugging Face layout plus `optimizer.safetensors`
//! (AdamW's `m` and `v` per parameter) and `trainer_state.json` (step, data position, options,
//! loss scale), all written together through [`model::checkpoint::save_with`]. The model files
//! hold the exact weights (the f32 master when one is kept) unless [`Trainer::save_dtype`] asks
//! for a narrower type; then `optimizer.safetensors` also holds the exact weights as `master.*`,
//! so `--resume` stays bit-exact.

use crate::data::{DetectedFormat, TokenStream};
use crate::error::{Result, TrainError};
use crate::optimizer::{Optimizer, StateTensor};
use crate::parallel::DataParallel;
use crate::precision::{LossScaler, PrecisionOptions};
use crate::schedule::Schedule;
use crate::sft::{Encoded, Packing, SftBatches, SftOptions};
use crate::source::{DataSource, HeldOut};
use crate::tokenizer::{TOKENIZER_FILE, TextTokenizer};
use cubecl::Runtime;
use dsl::{DType, Device, FloatElement};
use kernels::adamw::AdamW;
use kernels::cross_entropy::IGNORE_INDEX;
use model::activations::{ActivationPlan, HeadChunk, Recompute};
use model::checkpoint::{self, SaveOptions, StoredDType};
use model::{Activations, Llama, ModelError, Params};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Instant;

pub const STATE_FILE: &str = "trainer_state.json";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";

/// Everything that determines a run's numbers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainOptions {
    pub steps: u64,
    pub batch: usize,
    pub seq_len: usize,
    pub grad_accum: usize,
    pub lr: f64,
    pub warmup: u64,
    pub min_lr_ratio: f64,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub grad_clip: f64,
    pub seed: u64,
    /// Fraction of the data held out at its end for validation, when the run evaluates and has
    /// no separate validation files (see [`split`]).
    pub val_fraction: f64,
    /// Batches of the held-out slice scored per evaluation.
    pub val_batches: usize,
    /// Master weights, rounding and loss scaling (see [`crate::precision`]). Absent in
    /// checkpoints written before 2026-11-30 (which kept no master).
    #[serde(default)]
    pub precision: PrecisionOptions,
    /// Rows of logits computed at a time (see [`HeadChunk`]). Absent in checkpoints written
    /// before 2026-11-30, which kept the logits whole, so those resume with
    /// [`HeadChunk::Full`].
    #[serde(default = "whole_logits")]
    pub head_chunk: HeadChunk,
    /// What the forward keeps for the backward (see [`Recompute`]); changes no number, so a
    /// resumed run may change it.
    #[serde(default)]
    pub recompute: Recompute,
    /// Data-parallel ranks (see [`crate::parallel`]): an optimizer step reads `world_size ×
    /// grad_accum` micro-batches of `batch` rows. Absent in checkpoints of single-rank runs.
    #[serde(default = "one_rank")]
    pub world_size: usize,
    /// f32 products on TF32 tensor cores (`--tf32`, CUDA only; see
    /// [`dsl::KernelPolicy::allow_tf32`]). It changes the numbers, so a resumed run keeps it.
    /// Absent in checkpoints written before 2026-12-07 (no TF32 then).
    #[serde(default)]
    pub tf32: bool,
}

fn one_rank() -> usize {
    1
}

impl Default for TrainOptions {
    /// Llama 2's recipe where it has one.
    fn default() -> Self {
        Self {
            steps: 1000,
            batch: 4,
            seq_len: 256,
            grad_accum: 1,
            lr: 3e-4,
            warmup: 2000,
            min_lr_ratio: 0.1,
            weight_decay: 0.1,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-5,
            grad_clip: 1.0,
            seed: 0,
            val_fraction: 0.01,
            val_batches: 4,
            precision: PrecisionOptions::default(),
            head_chunk: HeadChunk::Auto,
            recompute: Recompute::None,
            world_size: 1,
            tf32: false,
        }
    }
}

impl TrainOptions {
    /// The schedule with warm-up capped to the run's steps.
    pub fn schedule(&self) -> Schedule {
        Schedule {
            peak: self.lr,
            warmup: self.warmup.min(self.steps),
            total: self.steps,
            min_ratio: self.min_lr_ratio,
        }
    }

    fn validate(&self) -> Result<()> {
        let bad = |message: String| Err(TrainError::Options(message));
        if self.steps == 0 || self.batch == 0 || self.seq_len == 0 || self.grad_accum == 0 {
            return bad("--steps, --batch, --seq-len and --grad-accum must be positive".into());
        }
        if self.world_size == 0 {
            return bad("the world size must be positive".into());
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return bad(format!("--lr must be positive, got {}", self.lr));
        }
        if !(0.0..=1.0).contains(&self.min_lr_ratio) {
            return bad(format!("--min-lr-ratio must be in [0, 1], got {}", self.min_lr_ratio));
        }
        if self.grad_clip.is_nan() || self.grad_clip <= 0.0 {
            return bad(format!("--grad-clip must be positive, got {}", self.grad_clip));
        }
        self.precision.validate().map_err(TrainError::Options)
    }
}

/// What checkpoints without `head_chunk` did: keep the logits whole.
fn whole_logits() -> HeadChunk {
    HeadChunk::Full
}

/// Where a run stands: saved with every checkpoint.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TrainState {
    /// Optimizer steps completed.
    pub step: u64,
    /// Micro-batches consumed (the next one is this, modulo the batches in the stream).
    pub micro_batches: u64,
    pub options: TrainOptions,
    /// The training data's path, for the record.
    pub data: String,
    /// Set for supervised fine-tuning runs.
    #[serde(default)]
    pub sft: Option<SftOptions>,
    /// The training data's files and their fingerprints: `--resume` reads them again and
    /// refuses changed ones. Absent in checkpoints written before 2026-11-29.
    #[serde(default)]
    pub source: Option<DataSource>,
    /// What the run holds out for validation and how often it evaluates.
    #[serde(default)]
    pub validation: Option<Validation>,
    /// The compute type (`f32`, `f16`, `bf16`).
    #[serde(default)]
    pub dtype: Option<String>,
    /// AdamW steps taken, when fewer than `step` (steps skipped on a loss-scale overflow).
    #[serde(default)]
    pub optimizer_step: Option<u64>,
    /// The dynamic loss scale, when the run scales its loss.
    #[serde(default)]
    pub loss_scale: Option<LossScaler>,
    /// What the model files hold (`float32`, `bfloat16`, `float16`): `--save-dtype`, which a
    /// resumed run keeps unless given again.
    #[serde(default)]
    pub save_dtype: Option<String>,
}

/// A run's validation: the data and the evaluation interval.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Validation {
    pub held_out: HeldOut,
    /// Evaluate every this many steps (and at the last); `None` when the run does not evaluate.
    pub eval_every: Option<u64>,
}

/// One optimizer step's figures.
#[derive(Clone, Debug, Serialize)]
pub struct StepReport {
    pub step: u64,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub tokens: usize,
    /// Wall time per step, averaged over the steps read together (the host does not wait for
    /// each step, so single steps have no time of their own).
    pub seconds: f64,
    pub tokens_per_s: f64,
    /// The update was skipped: the scaled gradients overflowed (the loss scale was halved).
    pub skipped: bool,
    /// The loss scale the step's gradients were computed with, when the run scales.
    pub loss_scale: Option<f64>,
}

/// The train/validation split of a token stream for a run that evaluates without separate
/// validation files: validation is the last `fraction` of the tokens (at least one batch of
/// `batch × seq`, plus the one token a batch reads past its end) when the stream is long enough
/// for both, else nothing is held out. Both parts are views of `stream`'s files.
pub fn split(
    stream: &TokenStream,
    fraction: f64,
    batch: usize,
    seq: usize,
) -> Result<(TokenStream, Option<TokenStream>)> {
    let batch_tokens = batch * seq + 1;
    let n = stream.len();
    if n < batch_tokens {
        return Err(crate::data::DataError::TooShort {
            path: stream.path.clone(),
            tokens: n,
            needed: batch_tokens,
            batch,
            seq,
        }
        .into());
    }
    let held = ((n as f64 * fraction) as usize).max(batch_tokens);
    if n < held + batch_tokens {
        return Ok((stream.clone(), None));
    }
    Ok((stream.slice(0, n - held), Some(stream.slice(n - held, held))))
}

/// Encoded SFT examples (see [`crate::sft`]) and the held-out ones.
pub struct SftData {
    pub path: PathBuf,
    pub train: Vec<Encoded>,
    pub val: Vec<Encoded>,
    /// The id the last micro-batch of an epoch is padded with (its targets are ignored).
    pub pad: u32,
    pub options: SftOptions,
}

/// What a run trains on.
pub enum TrainData<'a> {
    /// Pretraining on a token stream, validating on `val` (none: nothing is held out).
    Tokens { train: &'a TokenStream, val: Option<&'a TokenStream> },
    /// Supervised fine-tuning: packed examples, loss on answer tokens only.
    Sft(SftData),
}

impl<'a> From<&'a TokenStream> for TrainData<'a> {
    /// Every token for training, no validation.
    fn from(stream: &'a TokenStream) -> Self {
        Self::Tokens { train: stream, val: None }
    }
}

/// A step launched but not yet read (see [`Trainer::read_steps`]).
#[derive(Clone, Debug)]
struct QueuedStep {
    step: u64,
    lr: f64,
    tokens: usize,
    loss_scale: Option<f64>,
    /// Known on the host already: a loss-scaled step decides on the host.
    skipped: bool,
}

/// Steps whose figures the device buffer holds at most: [`Trainer::queue_step`] reads them
/// when it is full.
pub const MAX_QUEUED_STEPS: usize = 1024;

/// The element of the figures buffer that validation sums into (after every step's pair).
const VALIDATION_SLOT: usize = 2 * MAX_QUEUED_STEPS;

enum Source {
    Stream { train: TokenStream, val: Option<TokenStream>, batches_per_epoch: u64 },
    Sft { train: SftBatches, val: Option<SftBatches> },
}

/// A model being trained, with its gradients, buffers, optimizer and data.
pub struct Trainer<R: Runtime, F: FloatElement> {
    pub model: Llama<R, F>,
    pub options: TrainOptions,
    pub state: TrainState,
    /// Saved as `tokenizer.json` with every checkpoint when set.
    pub tokenizer: Option<TextTokenizer>,
    /// The type the checkpoints' model files hold (default f32: the exact weights).
    pub save_dtype: StoredDType,
    /// Weight gradients, summed over micro-batches in f32 whatever `F` is.
    grads: Params<R, f32>,
    acts: Activations<R, F>,
    optimizer: Optimizer<R>,
    source: Source,
    /// `[MAX_QUEUED_STEPS + 1, 2]`: each queued step's loss and gradient norm, kept on the
    /// device until [`Self::read_steps`], then the validation sum.
    figures: dsl::GpuTensor<R, f32>,
    queued: Vec<QueuedStep>,
    /// When the queued steps began (their time runs from here).
    last_read: Instant,
    /// A non-finite step found by a read inside [`Self::queue_step`], returned by the next call
    /// (after the good steps before it were returned).
    pending_error: Option<TrainError>,
    /// The first non-finite step read, if any: the weights are no longer trustworthy, so no
    /// step is queued and no checkpoint is written after it.
    non_finite_at: Option<u64>,
    /// This rank's part in a data-parallel job, if any.
    parallel: Option<DataParallel<R>>,
    /// `[1]`: a data-parallel step's loss, summed over this rank's micro-batches, then ranks.
    step_loss: dsl::GpuTensor<R, f32>,
}

/// The state saved in checkpoint `dir`.
pub fn read_state(dir: &Path) -> Result<TrainState> {
    let state_path = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&state_path).map_err(|_| {
        TrainError::Resume(format!(
            "{} is not a training checkpoint (no {STATE_FILE}; checkpoints are written by \
             `cargo xtask train --out DIR` and `--save-every`)",
            dir.display()
        ))
    })?;
    serde_json::from_str(&text)
        .map_err(|e| TrainError::Resume(format!("{}: unreadable: {e}", state_path.display())))
}

/// Refuses the first id of `tokens` (read from `path`) that reaches past `vocab_size`.
fn check_ids(path: &Path, tokens: impl Iterator<Item = u32>, vocab_size: usize) -> Result<()> {
    match tokens.enumerate().find(|&(_, id)| id as usize >= vocab_size) {
        Some((position, id)) => Err(crate::data::DataError::OutOfVocabulary {
            path: path.to_path_buf(),
            position,
            id,
            vocab_size,
        }
        .into()),
        None => Ok(()),
    }
}

impl<R: Runtime, F: FloatElement> Trainer<R, F> {
    /// A fresh run of `model` on `data`.
    pub fn new<'a>(
        device: &Device<R>,
        model: Llama<R, F>,
        options: TrainOptions,
        data: impl Into<TrainData<'a>>,
    ) -> Result<Self> {
        Self::new_parallel(device, model, options, data, None)
    }

    /// A fresh run as rank `parallel.rank()` of a data-parallel job (see [`crate::parallel`]);
    /// `None` is [`Self::new`]. Every rank passes the same model, options and data.
    /// `options.world_size` must be the job's.
    pub fn new_parallel<'a>(
        device: &Device<R>,
        model: Llama<R, F>,
        options: TrainOptions,
        data: impl Into<TrainData<'a>>,
        mut parallel: Option<DataParallel<R>>,
    ) -> Result<Self> {
        options.validate()?;
        let world = parallel.as_ref().map_or(1, DataParallel::world_size);
        if options.world_size != world {
            return Err(TrainError::Options(format!(
                "the options say {} ranks but the job has {world}",
                options.world_size
            )));
        }
        let vocab_size = model.config.vocab_size;
        let (source, path, sft) = match data.into() {
            TrainData::Tokens { train, val } => {
                train.plan(options.batch, options.seq_len, None)?;
                for stream in std::iter::once(train).chain(val) {
                    // Streams in memory are checked whole up front, so a bad id is an error before
                    // any step runs; mapped files (corpus-sized) are checked batch by batch as
                    // they are read, naming the file and position all the same.
                    if stream.in_memory() {
                        stream.check_vocabulary(vocab_size)?;
                    }
                }
                if let Some(val) = val {
                    val.plan(options.batch, options.seq_len, None)?;
                }
                let batches_per_epoch = train.batches(options.batch, options.seq_len) as u64;
                let path = train.path.clone();
                (Source::Stream { train: train.clone(), val: val.cloned(), batches_per_epoch }, path, None)
            }
            TrainData::Sft(data) => {
                let all = data.train.iter().chain(&data.val).flat_map(|e| e.tokens.iter().copied());
                check_ids(&data.path, all.chain([data.pad]), vocab_size)?;
                if data.train.is_empty() {
                    return Err(TrainError::Options(format!(
                        "{}: no training examples",
                        data.path.display()
                    )));
                }
                let batches = |examples: Vec<Encoded>, shuffle: bool| {
                    let packing = Packing {
                        batch: options.batch,
                        seq: options.seq_len,
                        seed: options.seed,
                        shuffle,
                        pad: data.pad,
                    };
                    SftBatches::new(data.path.clone(), examples, packing)
                };
                let val = (!data.val.is_empty()).then(|| batches(data.val, false));
                (Source::Sft { train: batches(data.train, true), val }, data.path, Some(data.options))
            }
        };
        let specs = model.config.parameters();
        let hp = AdamW {
            lr: options.lr,
            beta1: options.beta1,
            beta2: options.beta2,
            eps: options.eps,
            weight_decay: options.weight_decay,
        };
        let precision = &options.precision;
        let keeps = match &mut parallel {
            Some(parallel) => {
                parallel.bind(&specs);
                parallel.keeps_state()
            }
            None => vec![true; specs.len()],
        };
        let mut optimizer = Optimizer::sharded(
            device,
            &specs,
            hp,
            options.grad_clip,
            precision.rounding,
            options.seed,
            &keeps,
        )?;
        if precision.keeps_master(F::DTYPE) {
            // The compute copy's own values; [`Self::set_weights`] gives the unrounded ones.
            optimizer.keep_master(device, &model.params.to_host(device)?)?;
        }
        let grads = Params::zeros(device, &model.config)?;
        let plan = ActivationPlan { head: options.head_chunk, recompute: options.recompute };
        let acts = Activations::with_plan(device, &model.config, options.batch, options.seq_len, plan)?;
        let figures = dsl::GpuTensor::zeros(device, &[MAX_QUEUED_STEPS + 1, 2])?;
        let state = TrainState {
            step: 0,
            micro_batches: 0,
            options: options.clone(),
            data: path.display().to_string(),
            sft,
            source: None,
            validation: None,
            dtype: Some(F::DTYPE.to_string()),
            optimizer_step: None,
            loss_scale: options.precision.loss_scale.as_ref().map(LossScaler::new),
            save_dtype: None,
        };
        let save_dtype = StoredDType::F32;
        Ok(Self {
            model,
            options,
            state,
            tokenizer: None,
            save_dtype,
            grads,
            acts,
            optimizer,
            source,
            figures,
            queued: Vec::new(),
            last_read: Instant::now(),
            pending_error: None,
            non_finite_at: None,
            parallel,
            step_loss: dsl::GpuTensor::zeros(device, &[1])?,
        })
    }

    /// This rank (0 without data parallelism): only rank 0 writes files and logs.
    pub fn rank(&self) -> usize {
        self.parallel.as_ref().map_or(0, DataParallel::rank)
    }

    /// The job's data-parallel part, if any.
    pub fn parallel_mut(&mut self) -> Option<&mut DataParallel<R>> {
        self.parallel.as_mut()
    }

    /// Sets the weights to `values` (f32, spec order): the f32 master copy, when one is kept,
    /// holds them exactly, and the model computes with them rounded to `F`. Use it when the
    /// starting weights are finer than `F` (an f32 checkpoint or initialisation trained in
    /// bf16), so the master does not start rounded.
    pub fn set_weights(&mut self, device: &Device<R>, values: &[Vec<f32>]) -> Result<()> {
        self.model.params = Params::from_host(device, &self.model.config, values)?;
        if self.optimizer.has_master() {
            self.optimizer.keep_master(device, values)?;
        }
        Ok(())
    }

    /// The optimizer (moments, master weights, step count), for inspection.
    pub fn optimizer(&self) -> &Optimizer<R> {
        &self.optimizer
    }

    /// Whether AdamW keeps an f32 master copy of the weights.
    pub fn has_master_weights(&self) -> bool {
        self.optimizer.has_master()
    }

    /// Continues the run saved in `dir` on `data` (which must be the same data), optionally
    /// with a different step count. The checkpoint's `tokenizer.json`, if any, comes along.
    pub fn resume<'a>(
        device: &Device<R>,
        dir: &Path,
        data: impl Into<TrainData<'a>>,
        steps: Option<u64>,
    ) -> Result<Self> {
        Self::resume_with(device, dir, data, steps, None)
    }

    /// [`Self::resume`], recomputing as `recompute` says when given (it changes no number).
    pub fn resume_with<'a>(
        device: &Device<R>,
        dir: &Path,
        data: impl Into<TrainData<'a>>,
        steps: Option<u64>,
        recompute: Option<Recompute>,
    ) -> Result<Self> {
        Self::resume_parallel(device, dir, data, steps, recompute, None)
    }

    /// [`Self::resume_with`] as a rank of a data-parallel job: every rank reads the same
    /// checkpoint and keeps its share of the optimizer state. The job must have the world size
    /// the checkpoint was trained with (it fixes the global batch); the ZeRO stage may differ.
    pub fn resume_parallel<'a>(
        device: &Device<R>,
        dir: &Path,
        data: impl Into<TrainData<'a>>,
        steps: Option<u64>,
        recompute: Option<Recompute>,
        parallel: Option<DataParallel<R>>,
    ) -> Result<Self> {
        let mut state = read_state(dir)?;
        let world = parallel.as_ref().map_or(1, DataParallel::world_size);
        if state.options.world_size != world {
            return Err(TrainError::Resume(format!(
                "{} was trained on {} rank(s) and this job has {world}: the global batch (ranks × \
                 --batch × --grad-accum) would change; resume with {} rank(s) (--nproc-per-node)",
                dir.display(),
                state.options.world_size,
                state.options.world_size
            )));
        }
        if let Some(steps) = steps {
            state.options.steps = steps;
        }
        if let Some(recompute) = recompute {
            state.options.recompute = recompute;
        }
        let checkpoint = checkpoint::load(dir)?;
        let saved = read_optimizer_file(&dir.join(OPTIMIZER_FILE), &checkpoint.config.parameters())?;
        // The exact weights: `master.*` when the model files were saved narrower.
        let weights = saved.master.unwrap_or(checkpoint.tensors);
        let params = Params::from_host(device, &checkpoint.config, &weights)?;
        let model = Llama::<R, F>::new(device, checkpoint.config, params)?;
        let mut trainer = Self::new_parallel(device, model, state.options.clone(), data, parallel)?;
        trainer.set_weights(device, &weights)?;
        trainer.optimizer.step = state.optimizer_step.unwrap_or(state.step);
        trainer.optimizer.load_moments(device, &saved.moments)?;
        let tokenizer_path = dir.join(TOKENIZER_FILE);
        if tokenizer_path.exists() {
            trainer.tokenizer = Some(TextTokenizer::load(&tokenizer_path)?);
        }
        if let Some(dtype) = state.save_dtype.as_deref().and_then(|d| d.parse().ok()) {
            trainer.save_dtype = dtype;
        }
        trainer.state = state;
        Ok(trainer)
    }

    /// Rows of logits computed at a time (see [`HeadChunk`]).
    pub fn head_rows(&self) -> usize {
        self.acts.head_rows
    }

    /// Tokens per optimizer step, over all ranks.
    pub fn tokens_per_step(&self) -> usize {
        self.options.batch * self.options.seq_len * self.options.grad_accum * self.options.world_size
    }

    pub fn has_validation(&self) -> bool {
        match &self.source {
            Source::Stream { val, .. } => val.is_some(),
            Source::Sft { val, .. } => val.is_some(),
        }
    }

    /// Inputs and targets of micro-batch `index` of a pretraining run (counted from the run's
    /// start): batch `index mod N` of the training stream, N its whole batches, so the stream is
    /// read in order and wraps only after its last whole batch. `None` for SFT runs.
    pub fn micro_batch(&self, index: u64) -> Result<Option<(Vec<u32>, Vec<i32>)>> {
        let Source::Stream { train, batches_per_epoch, .. } = &self.source else { return Ok(None) };
        let (b, t) = (self.options.batch, self.options.seq_len);
        let k = (index % *batches_per_epoch) as usize;
        Ok(Some(train.batch(k, b, t, self.model.config.vocab_size)?))
    }

    /// This rank's share of the next optimizer step's micro-batches. Rank `r` of `W` takes the
    /// step's micro-batches `r, r + W, …` (see [`crate::parallel`]).
    fn next_micro_batches(&mut self) -> Result<StepBatches> {
        let (world, rank) = (self.options.world_size as u64, self.rank() as u64);
        let k = self.options.grad_accum * world as usize;
        let (batches, counted, global) = match &mut self.source {
            Source::Stream { .. } => {
                let first = self.state.micro_batches;
                let batches = (0..self.options.grad_accum as u64)
                    .map(|i| Ok(self.micro_batch(first + i * world + rank)?.expect("a stream")))
                    .collect::<Result<Vec<_>>>()?;
                // Pretraining targets are all counted.
                (batches, self.options.batch * self.options.seq_len * k, k)
            }
            Source::Sft { train, .. } => {
                let (epoch, first) = train.locate(self.state.step, k);
                let end = (first + k as u64).min(train.micro_batches(epoch));
                let mut mine = Vec::new();
                let mut counted = 0;
                // Every rank packs the whole step to count its positions (host work only).
                for m in first..end {
                    let batch = train.batch(epoch, m);
                    counted += batch.1.iter().filter(|&&x| x != IGNORE_INDEX).count();
                    if (m - first) % world == rank {
                        mine.push(batch);
                    }
                }
                (mine, counted, (end - first) as usize)
            }
        };
        self.state.micro_batches += global as u64;
        Ok(StepBatches { batches, counted, global })
    }

    /// Forward (and backward with `with_grad`) over `batches`, each micro-batch's loss divided
    /// by the positions counted in all of them, so their sum is the mean over every counted
    /// position and the accumulated gradient is its gradient. The sum is written on the device
    /// into `self.figures` at index `slot` (added to what is there with `accumulate`); nothing
    /// is read back.
    fn run_batches(
        &mut self,
        device: &Device<R>,
        batches: &[(Vec<u32>, Vec<i32>)],
        with_grad: bool,
        slot: usize,
        accumulate: bool,
    ) -> Result<()> {
        let counted = counted_positions(batches);
        self.run_counted(device, batches, counted, with_grad, slot, accumulate)
    }

    /// [`Self::run_batches`] with the loss divided by `counted` positions (all ranks' under data
    /// parallelism); a data-parallel training step sums its loss into `step_loss[slot]` instead
    /// of the figures, to be all-reduced.
    fn run_counted(
        &mut self,
        device: &Device<R>,
        batches: &[(Vec<u32>, Vec<i32>)],
        counted: usize,
        with_grad: bool,
        slot: usize,
        accumulate: bool,
    ) -> Result<()> {
        let (b, t) = (self.options.batch, self.options.seq_len);
        let loss_scale = match (with_grad, self.state.loss_scale) {
            (true, Some(scaler)) => scaler.scale as f32,
            _ => 1.0,
        };
        for (k, (inputs, targets)) in batches.iter().enumerate() {
            // Uploads come from the memory pool: after the first step they reuse the pages the
            // previous step's freed, so a step allocates no new device memory.
            let ids = self.model.token_ids(device, inputs, b, t)?;
            let targets =
                self.model.targets(device, targets)?.with_denominator(counted).with_loss_scale(loss_scale);
            self.model.forward(device, &mut self.acts, &ids)?;
            if with_grad {
                self.model.loss_backward(device, &mut self.acts, &targets, &ids, &mut self.grads)?;
            } else {
                self.model.loss(device, &mut self.acts, &targets, false)?;
            }
            let target =
                if self.parallel.is_some() && with_grad { &mut self.step_loss } else { &mut self.figures };
            dsl::record_scalar(device, target, slot, &self.acts.loss, 0, accumulate || k > 0)?;
        }
        Ok(())
    }

    /// Launches one optimizer step (`grad_accum` micro-batches forward and backward, clip,
    /// AdamW) without waiting for it; its loss and gradient norm stay on the device until
    /// [`Self::read_steps`]. Returns the figures it had to read: none, except when the queue is
    /// full or the run scales its loss (then this step's and any queued before it). A
    /// non-finite step found by such a read is the error of the next call to this or to
    /// [`Self::read_steps`], after the good steps before it were returned.
    ///
    /// Under loss scaling a step whose gradients overflowed changes no weight or moment (it is
    /// reported `skipped` and the scale backs off); without it a non-finite gradient norm stops
    /// the run when read.
    pub fn queue_step(&mut self, device: &Device<R>) -> Result<Vec<StepReport>> {
        if let Some(error) = self.pending_error.take() {
            return Err(error);
        }
        self.refuse_after_non_finite("queue a step")?;
        let mut reports = Vec::new();
        if self.queued.len() == MAX_QUEUED_STEPS && self.read_inside_step(device, &mut reports)? {
            return Ok(reports);
        }
        if self.queued.is_empty() {
            // Time between a read and the next step (evaluations, checkpoints) is not step time.
            self.last_read = Instant::now();
        }
        let slot = self.queued.len();
        self.grads.zero(device)?;
        let StepBatches { batches, counted, global } = self.next_micro_batches()?;
        let loss_scale = self.state.loss_scale.map(|s| s.scale);
        let unscale = loss_scale.map_or(1.0, |s| (1.0 / s) as f32);
        match &mut self.parallel {
            None => {
                self.run_counted(device, &batches, counted, true, 2 * slot, false)?;
                self.optimizer.clip(device, &self.grads, unscale)?;
            }
            Some(_) => {
                // A rank may get no micro-batch (the short last step of an SFT epoch).
                self.step_loss.fill(device, 0.0)?;
                self.run_counted(device, &batches, counted, true, 0, false)?;
                let parallel = self.parallel.as_mut().expect("matched");
                parallel.all_reduce(device, &mut self.step_loss)?;
                dsl::record_scalar(device, &mut self.figures, 2 * slot, &self.step_loss, 0, false)?;
                parallel.sum_gradients(device, &mut self.grads)?;
                let share = parallel.norm_share();
                let sum_squares = self.optimizer.sum_squares(device, &self.grads, &share)?;
                parallel.all_reduce(device, sum_squares)?;
                self.optimizer.clip_from_sum_squares(device, unscale)?;
            }
        }
        let step = self.state.step;
        let lr = self.options.schedule().lr(step);
        dsl::record_scalar(device, &mut self.figures, 2 * slot + 1, self.optimizer.grad_norm(), 0, false)?;
        let tokens = self.options.batch * self.options.seq_len * global;
        self.queued.push(QueuedStep { step, lr, tokens, loss_scale, skipped: false });
        let mut apply = true;
        if let (Some(scaler), Some(options)) =
            (&mut self.state.loss_scale, &self.options.precision.loss_scale)
        {
            // The host decides whether to apply, so it must see the norm: read now.
            let figures = self.figures.to_vec(device)?;
            let finite = figures[2 * slot + 1].is_finite();
            apply = scaler.update(options, finite);
            self.queued[slot].skipped = !apply;
        }
        if apply {
            self.optimizer.apply(device, &mut self.model.params, &self.grads, lr)?;
            if let Some(parallel) = &mut self.parallel {
                parallel.share_weights(device, &mut self.model.params)?;
            }
        }
        self.state.step += 1;
        if self.state.loss_scale.is_some() {
            self.read_inside_step(device, &mut reports)?;
        }
        Ok(reports)
    }

    /// A read [`Self::queue_step`] must make: the good steps' figures go into `reports`, and a
    /// non-finite one is kept for the next call (which returns it), so the caller can log the
    /// good steps first. Returns whether such an error is pending.
    fn read_inside_step(&mut self, device: &Device<R>, reports: &mut Vec<StepReport>) -> Result<bool> {
        let (read, error) = self.read_steps_until_error(device)?;
        reports.extend(read);
        self.pending_error = error;
        Ok(self.pending_error.is_some())
    }

    /// An error once a non-finite step has been read: its weights must not train on or be saved.
    fn refuse_after_non_finite(&self, what: &str) -> Result<()> {
        match self.non_finite_at {
            Some(step) => Err(TrainError::Options(format!(
                "{what}: step {step} was not finite, so the weights after it are not trustworthy \
                 (resume from the last checkpoint)"
            ))),
            None => Ok(()),
        }
    }

    /// Steps launched by [`Self::queue_step`] whose figures have not been read.
    pub fn queued_steps(&self) -> usize {
        self.queued.len()
    }

    /// Reads the figures of every queued step in one transfer (waiting for them to finish) and
    /// returns them in order. The first step whose loss (or, without loss scaling, gradient
    /// norm) is not finite is an error naming it: the run must stop, and no checkpoint may be
    /// written from its weights. [`Self::read_steps_until_error`] also returns the good steps
    /// before it.
    pub fn read_steps(&mut self, device: &Device<R>) -> Result<Vec<StepReport>> {
        match self.read_steps_until_error(device)? {
            (reports, None) => Ok(reports),
            (_, Some(error)) => Err(error),
        }
    }

    /// [`Self::read_steps`], returning the figures of the steps before the first non-finite one
    /// along with its error (so they can be logged before the run stops). A failed read is an
    /// error of its own.
    pub fn read_steps_until_error(
        &mut self,
        device: &Device<R>,
    ) -> Result<(Vec<StepReport>, Option<TrainError>)> {
        if let Some(error) = self.pending_error.take() {
            return Ok((Vec::new(), Some(error)));
        }
        if self.queued.is_empty() {
            return Ok((Vec::new(), None));
        }
        let figures = self.figures.to_vec(device)?;
        let seconds = self.last_read.elapsed().as_secs_f64() / self.queued.len() as f64;
        self.last_read = Instant::now();
        let queued = std::mem::take(&mut self.queued);
        let scaled = self.state.loss_scale.is_some();
        let mut reports = Vec::with_capacity(queued.len());
        for (i, q) in queued.into_iter().enumerate() {
            let (loss, grad_norm) = (figures[2 * i] as f64, figures[2 * i + 1] as f64);
            if !loss.is_finite() {
                self.non_finite_at = Some(q.step);
                return Ok((reports, Some(TrainError::NonFinite { step: q.step, loss })));
            }
            if !scaled && !grad_norm.is_finite() {
                self.non_finite_at = Some(q.step);
                return Ok((reports, Some(TrainError::NonFiniteGradient { step: q.step, grad_norm })));
            }
            reports.push(StepReport {
                step: q.step,
                loss,
                lr: q.lr,
                grad_norm,
                tokens: q.tokens,
                seconds,
                tokens_per_s: q.tokens as f64 / seconds.max(1e-9),
                skipped: q.skipped,
                loss_scale: q.loss_scale,
            });
        }
        Ok((reports, None))
    }

    /// One optimizer step, waited for and read: [`Self::queue_step`] then [`Self::read_steps`].
    /// Returns the step's figures (steps queued before it are read too, and dropped).
    pub fn step(&mut self, device: &Device<R>) -> Result<StepReport> {
        let mut reports = self.queue_step(device)?;
        reports.extend(self.read_steps(device)?);
        Ok(reports.pop().expect("the step just queued is read"))
    }

    /// Loss over the first `val_batches` batches of the held-out data: the mean of the batches'
    /// means when pretraining, the mean over all answer tokens of those batches in SFT.
    pub fn validate(&mut self, device: &Device<R>) -> Result<Option<f64>> {
        let (b, t) = (self.options.batch, self.options.seq_len);
        let vocab = self.model.config.vocab_size;
        let wanted = self.options.val_batches.max(1);
        match &mut self.source {
            Source::Stream { val: Some(val), .. } => {
                let count = val.batches(b, t).min(wanted).max(1);
                let batches = (0..count)
                    .map(|k| val.batch(k, b, t, vocab))
                    .collect::<std::result::Result<Vec<_>, _>>()?;
                // Each batch's own mean, summed on the device.
                for (k, batch) in batches.iter().enumerate() {
                    self.run_batches(device, std::slice::from_ref(batch), false, VALIDATION_SLOT, k > 0)?;
                }
                let sum = self.figures.to_vec(device)?[VALIDATION_SLOT] as f64;
                Ok(Some(sum / count as f64))
            }
            Source::Sft { val: Some(val), .. } => {
                let count = val.micro_batches(0).min(wanted as u64);
                if count == 0 {
                    return Ok(None);
                }
                let batches: Vec<_> = (0..count).map(|k| val.batch(0, k)).collect();
                self.run_batches(device, &batches, false, VALIDATION_SLOT, false)?;
                Ok(Some(self.figures.to_vec(device)?[VALIDATION_SLOT] as f64))
            }
            _ => Ok(None),
        }
    }

    /// The exact weights on the host (f32, spec order): the master copy when one is kept, else
    /// the parameters. Under ZeRO-1 with master weights each rank holds only its share: an
    /// error (checkpoints gather them: [`Self::save`]).
    pub fn weights_to_host(&self, device: &Device<R>) -> Result<Vec<Vec<f32>>> {
        let sharded = self.parallel.as_ref().is_some_and(|p| p.zero() == crate::parallel::Zero::Stage1);
        if sharded && self.optimizer.has_master() {
            return Err(TrainError::Options(
                "weights_to_host: under ZeRO-1 the master weights are spread over the ranks (save gathers them)"
                    .into(),
            ));
        }
        match self.optimizer.master_to_host(device)? {
            Some(master) => Ok(master),
            None => Ok(self.model.params.to_host(device)?),
        }
    }

    /// Writes the model, optimizer state and trainer state to `dir` (atomically, as one).
    ///
    /// Errors when steps are queued unread ([`Self::read_steps`] first): their weights have not
    /// been checked for a non-finite loss, and a checkpoint must never hold such weights; and
    /// once a non-finite step has been read.
    ///
    /// In a data-parallel job every rank must call it (the optimizer state is gathered from its
    /// owners); rank 0 writes, the others write nothing.
    pub fn save(&mut self, device: &Device<R>, dir: &Path) -> Result<()> {
        self.refuse_after_non_finite("save")?;
        if !self.queued.is_empty() {
            return Err(TrainError::Options(format!(
                "save: {} queued steps have not been read (read_steps checks them first)",
                self.queued.len()
            )));
        }
        let (params, moments) = match &mut self.parallel {
            None => (self.weights_to_host(device)?, self.optimizer.moments_to_host(device)?),
            Some(parallel) => {
                let mut masters = Vec::new();
                let mut moments = Vec::new();
                for (i, spec) in self.model.params.specs().iter().enumerate() {
                    let mut gather =
                        |which| parallel.gather_state(device, &mut self.optimizer, which, i, &spec.shape);
                    let (m, v, master) =
                        (gather(StateTensor::M)?, gather(StateTensor::V)?, gather(StateTensor::Master)?);
                    if let (Some(m), Some(v)) = (m, v) {
                        moments.push((m, v));
                    }
                    masters.extend(master);
                }
                if parallel.rank() != 0 {
                    return Ok(());
                }
                let params =
                    if self.optimizer.has_master() { masters } else { self.model.params.to_host(device)? };
                (params, moments)
            }
        };
        let specs = self.model.params.specs();
        let mut state = self.state.clone();
        state.optimizer_step = (self.optimizer.step != state.step).then_some(self.optimizer.step);
        state.save_dtype = Some(self.save_dtype.torch_name().to_string());
        let state = serde_json::to_string_pretty(&state).expect("state serialises");
        let tokenizer = self.tokenizer.as_ref().map(TextTokenizer::to_json).transpose()?;
        // Model files narrower than the weights lose bits: keep the exact ones for --resume.
        let exact = match self.save_dtype {
            StoredDType::F32 => true,
            StoredDType::F16 => F::DTYPE == DType::F16 && !self.optimizer.has_master(),
            StoredDType::BF16 => F::DTYPE == DType::BF16 && !self.optimizer.has_master(),
        };
        let master = (!exact).then_some(&params);
        let extras = |staging: &Path| -> model::Result<()> {
            write_optimizer_file(&staging.join(OPTIMIZER_FILE), specs, &moments, master)?;
            if let Some(json) = &tokenizer {
                let path = staging.join(TOKENIZER_FILE);
                std::fs::write(&path, json).map_err(|e| ModelError::io(&path, e))?;
            }
            let path = staging.join(STATE_FILE);
            std::fs::write(&path, &state).map_err(|e| ModelError::io(&path, e))
        };
        let options = SaveOptions { dtype: self.save_dtype, ..SaveOptions::default() };
        checkpoint::save_with(dir, &self.model.config, &params, options, &extras)?;
        Ok(())
    }

    /// Greedy continuation of `prompt` by `new_tokens` tokens (KV-cache decoding).
    pub fn greedy_sample(&self, device: &Device<R>, prompt: &[u32], new_tokens: usize) -> Result<Vec<u32>> {
        crate::generate::generate(
            device,
            &self.model,
            prompt,
            new_tokens,
            crate::generate::Sampling::GREEDY,
            |_| {},
        )
    }
}

/// A rank's micro-batches of one optimizer step.
struct StepBatches {
    /// (inputs, targets) of this rank's micro-batches.
    batches: Vec<(Vec<u32>, Vec<i32>)>,
    /// Target positions counted in the loss over every rank's micro-batches of the step.
    counted: usize,
    /// Micro-batches of the step over all ranks.
    global: usize,
}

/// Target positions of `batches` that count in the loss (not [`IGNORE_INDEX`]).
fn counted_positions(batches: &[(Vec<u32>, Vec<i32>)]) -> usize {
    batches.iter().map(|(_, targets)| targets.iter().filter(|&&x| x != IGNORE_INDEX).count()).sum()
}

/// Writes AdamW's moments as `m.NAME` and `v.NAME`, and the exact weights as `master.NAME` when
/// given.
fn write_optimizer_file(
    path: &Path,
    specs: &[model::ParamSpec],
    moments: &[(Vec<f32>, Vec<f32>)],
    master: Option<&Vec<Vec<f32>>>,
) -> model::Result<()> {
    let encode = |x: &[f32]| x.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>();
    let mut bytes: Vec<(String, Vec<usize>, Vec<u8>)> = specs
        .iter()
        .zip(moments)
        .flat_map(|(spec, (m, v))| {
            [
                (format!("m.{}", spec.name), spec.shape.clone(), encode(m)),
                (format!("v.{}", spec.name), spec.shape.clone(), encode(v)),
            ]
        })
        .collect();
    if let Some(master) = master {
        for (spec, w) in specs.iter().zip(master) {
            bytes.push((format!("master.{}", spec.name), spec.shape.clone(), encode(w)));
        }
    }
    let views = bytes
        .iter()
        .map(|(name, shape, data)| {
            TensorView::new(Dtype::F32, shape.clone(), data)
                .map(|v| (name.clone(), v))
                .map_err(|e| ModelError::tensor(path, name, format!("cannot encode: {e}")))
        })
        .collect::<model::Result<Vec<_>>>()?;
    safetensors::serialize_to_file(views, None, path)
        .map_err(|e| ModelError::checkpoint(path, format!("cannot write: {e}")))
}

/// What `optimizer.safetensors` holds.
struct OptimizerFile {
    moments: Vec<(Vec<f32>, Vec<f32>)>,
    /// The exact weights, when the model files were saved narrower than them.
    master: Option<Vec<Vec<f32>>>,
}

fn read_optimizer_file(path: &Path, specs: &[model::ParamSpec]) -> Result<OptimizerFile> {
    let bytes = std::fs::read(path).map_err(|e| ModelError::io(path, e))?;
    let st = SafeTensors::deserialize(&bytes)
        .map_err(|e| ModelError::checkpoint(path, format!("not a safetensors file: {e}")))?;
    let read = |name: &str, spec: &model::ParamSpec| -> Result<Vec<f32>> {
        let view = st.tensor(name).map_err(|_| ModelError::tensor(path, name, "missing"))?;
        if view.dtype() != Dtype::F32 || view.shape() != spec.shape.as_slice() {
            return Err(ModelError::tensor(path, name, format!("expected f32 {:?}", spec.shape)).into());
        }
        Ok(view.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
    };
    let moments = specs
        .iter()
        .map(|spec| Ok((read(&format!("m.{}", spec.name), spec)?, read(&format!("v.{}", spec.name), spec)?)))
        .collect::<Result<Vec<_>>>()?;
    let has_master = st.names().iter().any(|n| n.starts_with("master."));
    let master = if has_master {
        Some(
            specs
                .iter()
                .map(|spec| read(&format!("master.{}", spec.name), spec))
                .collect::<Result<Vec<_>>>()?,
        )
    } else {
        None
    };
    Ok(OptimizerFile { moments, master })
}

/// A token stream held in memory under a descriptive name (the built-in corpus).
pub fn in_memory_stream(name: &str, tokens: Vec<u32>) -> TokenStream {
    TokenStream::from_tokens(name, DetectedFormat::Llama2c, tokens)
}
