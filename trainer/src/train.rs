//! The training loop: sequential batches, gradient accumulation, Llama 2's schedule, AdamW with
//! clipping, held-out evaluation, and checkpoints that resume bit-identically.
//!
//! Semantics (other tools are compared against them):
//! - micro-batch `k` uses tokens `[k·B·T, k·B·T + B·T + 1)` of the training stream (inputs the
//!   first B·T, targets the last B·T, as B rows of T), wrapping to the start when too few
//!   tokens remain; an optimizer step uses `grad_accum` consecutive micro-batches and the mean
//!   of their losses (the summed gradients are scaled by 1/K);
//! - the rate at 0-indexed step `s` is [`Schedule::lr`]; the logged loss is the step's forward
//!   loss before its update; the gradient norm is the global L2 norm before clipping.
//!
//! A run directory holds the model in the Hugging Face layout plus `optimizer.safetensors`
//! (AdamW's `m` and `v` per parameter) and `trainer_state.json` (step, data position, options),
//! all written together through [`model::checkpoint::save_with`].

use crate::data::{DetectedFormat, TokenStream};
use crate::error::{Result, TrainError};
use crate::optimizer::Optimizer;
use crate::schedule::Schedule;
use cubecl::Runtime;
use dsl::{Device, FloatElement};
use kernels::adamw::AdamW;
use kernels::residual::scale;
use model::checkpoint::{self, SaveOptions};
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
    /// Fraction of the token stream held out at its end for validation.
    pub val_fraction: f64,
    /// Batches of the held-out slice scored per evaluation.
    pub val_batches: usize,
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
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return bad(format!("--lr must be positive, got {}", self.lr));
        }
        if !(0.0..=1.0).contains(&self.min_lr_ratio) {
            return bad(format!("--min-lr-ratio must be in [0, 1], got {}", self.min_lr_ratio));
        }
        if self.grad_clip.is_nan() || self.grad_clip <= 0.0 {
            return bad(format!("--grad-clip must be positive, got {}", self.grad_clip));
        }
        Ok(())
    }
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
}

/// One optimizer step's figures.
#[derive(Clone, Debug, Serialize)]
pub struct StepReport {
    pub step: u64,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub tokens: usize,
    pub seconds: f64,
    pub tokens_per_s: f64,
}

/// The train/validation split of a token stream: validation is the last `fraction` (at least one
/// batch) when the stream is long enough for both, else nothing is held out.
pub fn split(stream: &TokenStream, options: &TrainOptions) -> Result<(TokenStream, Option<TokenStream>)> {
    let batch_tokens = options.batch * options.seq_len + 1;
    let n = stream.tokens.len();
    if n < batch_tokens {
        return Err(crate::data::DataError::TooShort {
            path: stream.path.clone(),
            tokens: n,
            needed: batch_tokens,
            batch: options.batch,
            seq: options.seq_len,
        }
        .into());
    }
    let held = ((n as f64 * options.val_fraction) as usize).max(batch_tokens);
    if n < held + batch_tokens {
        let train =
            TokenStream { path: stream.path.clone(), format: stream.format, tokens: stream.tokens.clone() };
        return Ok((train, None));
    }
    let part = |tokens: &[u32]| TokenStream {
        path: stream.path.clone(),
        format: stream.format,
        tokens: tokens.to_vec(),
    };
    Ok((part(&stream.tokens[..n - held]), Some(part(&stream.tokens[n - held..]))))
}

/// A model being trained, with its gradients, buffers, optimizer and data.
pub struct Trainer<R: Runtime, F: FloatElement> {
    pub model: Llama<R, F>,
    pub options: TrainOptions,
    pub state: TrainState,
    grads: Params<R, F>,
    acts: Activations<R, F>,
    optimizer: Optimizer<R>,
    train: TokenStream,
    val: Option<TokenStream>,
    batches_per_epoch: u64,
}

impl<R: Runtime, F: FloatElement> Trainer<R, F> {
    /// A fresh run of `model` on `data`.
    pub fn new(
        device: &Device<R>,
        model: Llama<R, F>,
        options: TrainOptions,
        data: &TokenStream,
    ) -> Result<Self> {
        options.validate()?;
        let (train, val) = split(data, &options)?;
        let specs = model.config.parameters();
        let hp = AdamW {
            lr: options.lr,
            beta1: options.beta1,
            beta2: options.beta2,
            eps: options.eps,
            weight_decay: options.weight_decay,
        };
        let optimizer = Optimizer::new(device, &specs, hp, options.grad_clip)?;
        let grads = Params::zeros(device, &model.config)?;
        let acts = Activations::new(device, &model.config, options.batch, options.seq_len)?;
        // Check every id once up front: a bad token is an error before any step runs.
        if let Some(position) = data.tokens.iter().position(|&id| id as usize >= model.config.vocab_size) {
            return Err(crate::data::DataError::OutOfVocabulary {
                path: data.path.clone(),
                position,
                id: data.tokens[position],
                vocab_size: model.config.vocab_size,
            }
            .into());
        }
        let batches_per_epoch = train.batches(options.batch, options.seq_len) as u64;
        let state = TrainState {
            step: 0,
            micro_batches: 0,
            options: options.clone(),
            data: data.path.display().to_string(),
        };
        Ok(Self { model, options, state, grads, acts, optimizer, train, val, batches_per_epoch })
    }

    /// Continues the run saved in `dir` on `data` (which must be the same stream), optionally
    /// with a different step count.
    pub fn resume(device: &Device<R>, dir: &Path, data: &TokenStream, steps: Option<u64>) -> Result<Self> {
        let state_path = dir.join(STATE_FILE);
        let text = std::fs::read_to_string(&state_path).map_err(|_| {
            TrainError::Resume(format!(
                "{} is not a training checkpoint (no {STATE_FILE}; checkpoints are written by \
                 `cargo xtask train --out DIR` and `--save-every`)",
                dir.display()
            ))
        })?;
        let mut state: TrainState = serde_json::from_str(&text)
            .map_err(|e| TrainError::Resume(format!("{}: unreadable: {e}", state_path.display())))?;
        if let Some(steps) = steps {
            state.options.steps = steps;
        }
        let model = Llama::<R, F>::load(device, dir)?;
        let mut trainer = Self::new(device, model, state.options.clone(), data)?;
        trainer.optimizer.step = state.step;
        let moments = read_moments(&dir.join(OPTIMIZER_FILE), trainer.model.params.specs())?;
        trainer.optimizer.load_moments(device, &moments)?;
        trainer.state = state;
        Ok(trainer)
    }

    /// Tokens per optimizer step.
    pub fn tokens_per_step(&self) -> usize {
        self.options.batch * self.options.seq_len * self.options.grad_accum
    }

    pub fn has_validation(&self) -> bool {
        self.val.is_some()
    }

    /// One optimizer step: `grad_accum` micro-batches forward and backward, clip, AdamW.
    pub fn step(&mut self, device: &Device<R>) -> Result<StepReport> {
        let start = Instant::now();
        let (b, t, k) = (self.options.batch, self.options.seq_len, self.options.grad_accum);
        let vocab = self.model.config.vocab_size;
        self.grads.zero(device)?;
        let mut loss_sum = 0.0f64;
        for _ in 0..k {
            let index = (self.state.micro_batches % self.batches_per_epoch) as usize;
            let (inputs, targets) = self.train.batch(index, b, t, vocab)?;
            let ids = self.model.token_ids(device, &inputs, b, t)?;
            let targets = self.model.targets(device, &targets)?;
            self.model.forward(device, &mut self.acts, &ids)?;
            self.model.loss(device, &mut self.acts, &targets, true)?;
            self.model.backward(device, &mut self.acts, &ids, &mut self.grads)?;
            loss_sum += self.model.read_loss(device, &self.acts)? as f64;
            self.state.micro_batches += 1;
        }
        let loss = loss_sum / k as f64;
        let step = self.state.step;
        if !loss.is_finite() {
            return Err(TrainError::NonFinite { step, loss });
        }
        if k > 1 {
            for g in self.grads.tensors_mut() {
                scale(device, g, 1.0 / k as f32)?;
            }
        }
        let lr = self.options.schedule().lr(step);
        self.optimizer.step(device, &mut self.model.params, &self.grads, lr)?;
        let grad_norm = self.optimizer.last_grad_norm(device)? as f64;
        self.state.step += 1;
        let seconds = start.elapsed().as_secs_f64();
        let tokens = b * t * k;
        Ok(StepReport {
            step,
            loss,
            lr,
            grad_norm,
            tokens,
            seconds,
            tokens_per_s: tokens as f64 / seconds.max(1e-9),
        })
    }

    /// Mean loss over the first `val_batches` batches of the held-out slice.
    pub fn validate(&mut self, device: &Device<R>) -> Result<Option<f64>> {
        let Some(val) = &self.val else { return Ok(None) };
        let (b, t) = (self.options.batch, self.options.seq_len);
        let batches = val.batches(b, t).min(self.options.val_batches).max(1);
        let mut sum = 0.0;
        for k in 0..batches {
            let (inputs, targets) = val.batch(k, b, t, self.model.config.vocab_size)?;
            let ids = self.model.token_ids(device, &inputs, b, t)?;
            let targets = self.model.targets(device, &targets)?;
            self.model.forward(device, &mut self.acts, &ids)?;
            self.model.loss(device, &mut self.acts, &targets, false)?;
            sum += self.model.read_loss(device, &self.acts)? as f64;
        }
        Ok(Some(sum / batches as f64))
    }

    /// Writes the model, optimizer state and trainer state to `dir` (atomically, as one).
    pub fn save(&self, device: &Device<R>, dir: &Path) -> Result<()> {
        let params = self.model.params.to_host(device)?;
        let moments = self.optimizer.moments_to_host(device)?;
        let specs = self.model.params.specs();
        let state = serde_json::to_string_pretty(&self.state).expect("state serialises");
        let extras = |staging: &Path| -> model::Result<()> {
            write_moments(&staging.join(OPTIMIZER_FILE), specs, &moments)?;
            let path = staging.join(STATE_FILE);
            std::fs::write(&path, &state).map_err(|e| ModelError::io(&path, e))
        };
        checkpoint::save_with(dir, &self.model.config, &params, SaveOptions::default(), &extras)?;
        Ok(())
    }

    /// Greedy continuation of `prompt` by `new_tokens` tokens (KV-cache decoding).
    pub fn greedy_sample(&self, device: &Device<R>, prompt: &[u32], new_tokens: usize) -> Result<Vec<u32>> {
        let greedy = crate::generate::Sampling { temperature: 0.0, top_p: 1.0, seed: 0 };
        crate::generate::generate(device, &self.model, prompt, new_tokens, greedy, |_| {})
    }
}

fn write_moments(
    path: &Path,
    specs: &[model::ParamSpec],
    moments: &[(Vec<f32>, Vec<f32>)],
) -> model::Result<()> {
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = specs
        .iter()
        .zip(moments)
        .flat_map(|(spec, (m, v))| {
            let encode = |x: &[f32]| x.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>();
            [
                (format!("m.{}", spec.name), spec.shape.clone(), encode(m)),
                (format!("v.{}", spec.name), spec.shape.clone(), encode(v)),
            ]
        })
        .collect();
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

fn read_moments(path: &Path, specs: &[model::ParamSpec]) -> Result<Vec<(Vec<f32>, Vec<f32>)>> {
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
    specs
        .iter()
        .map(|spec| Ok((read(&format!("m.{}", spec.name), spec)?, read(&format!("v.{}", spec.name), spec)?)))
        .collect()
}

/// A token stream held in memory under a descriptive name (the built-in corpus).
pub fn in_memory_stream(name: &str, tokens: Vec<u32>) -> TokenStream {
    TokenStream { path: PathBuf::from(name), format: DetectedFormat::Llama2c, tokens }
}
