//! `cargo xtask train`: Llama 2's recipe on a token file, or, with no arguments, a short run of
//! the `tiny` preset on the built-in corpus that ends by printing a sample.

use crate::BackendArg;
use crate::launch::{DistArgs, Role};
use crate::run_data::{RunData, pretraining_data};
use anyhow::{Context, Result, bail};
use collectives::launch::DistEnv;
use dsl::{BackendRuntime, DType, Device, FloatElement, OnDevice};
use indicatif::{ProgressBar, ProgressStyle};
use model::activations::{HeadChunk, Recompute};
use model::checkpoint::StoredDType;
use model::{Llama, LlamaConfig, Params};
use serde_json::json;
use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;
use trainer::data::TokenFormat;
use trainer::precision::{LossScaleOptions, MasterWeights, PrecisionOptions, WriteRounding};
use trainer::source::{DataSource, HeldOut};
use trainer::tokenizer::{TOKENIZER_FILE, TextTokenizer};
use trainer::train::{TrainData, TrainOptions, TrainState, Trainer, read_state};

#[derive(clap::Args)]
pub struct TrainArgs {
    #[command(flatten)]
    pub backend: BackendArg,
    /// Start from this Hugging Face-layout checkpoint.
    #[arg(long, conflicts_with_all = ["preset", "resume"])]
    pub model: Option<PathBuf>,
    /// Start from a fresh N(0, 0.02²) initialisation of this preset (default: tiny); its
    /// vocabulary is sized to the tokenizer (or to --vocab-size).
    #[arg(long, conflicts_with = "resume")]
    pub preset: Option<String>,
    /// Continue the run saved in this directory: its options, data files (checked against their
    /// recorded size and hash) and tokenizer are used; --steps may extend it. Options that would
    /// change its numbers are refused.
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Token files (llm.c shards, llama2.c .bin; memory-mapped) or UTF-8 text (.txt, .md, or
    /// --data-format text): files or glob patterns ('shards/train_*.bin'), several allowed; the
    /// stream is the concatenation of every file named, in sorted path order. Token files must
    /// not be modified while a run reads them. Default: the built-in corpus.
    #[arg(long, num_args = 1.., value_name = "FILE|GLOB")]
    pub data: Vec<PathBuf>,
    /// auto, llmc, llama2c or text [default: auto].
    #[arg(long, value_parser = parse_format)]
    pub data_format: Option<TokenFormat>,
    /// Validation files (same forms as --data), evaluated every --eval-every steps; nothing is
    /// held out of --data then.
    #[arg(long, num_args = 1.., value_name = "FILE|GLOB")]
    pub val_data: Vec<PathBuf>,
    /// With --eval-every and no --val-data: the fraction of --data held out at its end (at least
    /// one batch) [default: 0.01]. Without --eval-every nothing is held out.
    #[arg(long)]
    pub val_fraction: Option<f64>,
    /// Text data: documents end at lines equal to this marker (e.g. '%' for fortune files)
    /// instead of at blank lines.
    #[arg(long, value_name = "LINE")]
    pub doc_separator: Option<String>,
    /// With --resume: train on --data even though it differs from the run's recorded data.
    #[arg(long)]
    pub allow_data_change: bool,
    /// A Hugging Face tokenizer.json for text data (saved with the run). Text without one
    /// trains a byte-level BPE of --vocab-size tokens on it. Default: the one in --model or
    /// --resume, if any.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Vocabulary of a fresh preset (default: the tokenizer's size, else the preset's), and the
    /// size of the BPE trained on text data when no tokenizer is given.
    #[arg(long)]
    pub vocab_size: Option<usize>,
    /// Optimizer steps.
    #[arg(long)]
    pub steps: Option<u64>,
    #[arg(long)]
    pub batch: Option<usize>,
    #[arg(long)]
    pub seq_len: Option<usize>,
    /// Micro-batches per optimizer step.
    #[arg(long)]
    pub grad_accum: Option<usize>,
    /// Peak learning rate (Llama 2: 3e-4).
    #[arg(long)]
    pub lr: Option<f64>,
    /// Warm-up steps (Llama 2: 2000), capped to the run's steps.
    #[arg(long)]
    pub warmup: Option<u64>,
    #[arg(long)]
    pub min_lr_ratio: Option<f64>,
    #[arg(long)]
    pub weight_decay: Option<f64>,
    #[arg(long)]
    beta1: Option<f64>,
    #[arg(long)]
    beta2: Option<f64>,
    #[arg(long)]
    pub eps: Option<f64>,
    #[arg(long)]
    pub grad_clip: Option<f64>,
    /// Seed of the initialisation.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Where the final checkpoint (and the periodic ones) go.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// JSON lines, one per step (default: OUT-log.jsonl beside OUT, which each checkpoint
    /// replaces whole).
    #[arg(long)]
    pub log: Option<PathBuf>,
    /// Evaluate every N steps (and at the last) on --val-data, or on the last --val-fraction of
    /// --data, held out from training only then.
    #[arg(long)]
    pub eval_every: Option<u64>,
    /// Save a checkpoint to --out every N steps.
    #[arg(long)]
    pub save_every: Option<u64>,
    /// The device's peak FLOP/s in TFLOP/s for the compute type (e.g. 989 for an H100's dense
    /// bf16), for the model FLOP utilisation; known NVIDIA GPUs are detected.
    #[arg(long)]
    pub peak_tflops: Option<f64>,
    /// Compute type: f32, f16, or bf16 (cuda) [default: f32, or the resumed run's]. With f16/bf16
    /// the weight gradients, AdamW's moments and (by default) a master copy of the weights stay
    /// in f32; see --master-weights and the README's precision section.
    #[arg(long, value_parser = ["f32", "f16", "bf16"])]
    pub dtype: Option<String>,
    /// With f16/bf16 compute: `f32` keeps an f32 master copy of the weights that AdamW updates
    /// (no update is lost); `none` updates the narrow weights themselves (4 bytes per parameter
    /// less), written by --rounding [default: f32].
    #[arg(long, value_name = "f32|none")]
    pub master_weights: Option<MasterWeights>,
    /// With --master-weights none: `stochastic` rounds each updated weight up with probability
    /// equal to the discarded fraction (unbiased, reproducible); `nearest` drops every update
    /// below half an ulp (bf16 at 1.0: 3.9e-3), kept only to measure that loss
    /// [default: stochastic].
    #[arg(long, value_name = "stochastic|nearest")]
    pub rounding: Option<WriteRounding>,
    /// `dynamic`: scale the loss's gradient by a factor that halves on overflow (the step is
    /// skipped) and doubles after --loss-scale-growth-interval clean steps, as torch's
    /// GradScaler; `off`: no scaling [default: dynamic for f16, off for f32 and bf16].
    #[arg(long, value_parser = ["dynamic", "off"])]
    pub loss_scale: Option<String>,
    /// The first loss scale (a power of two) [default: 65536].
    #[arg(long)]
    pub loss_scale_init: Option<f64>,
    /// Clean steps after which the loss scale doubles [default: 2000].
    #[arg(long)]
    pub loss_scale_growth_interval: Option<u64>,
    /// What the saved model files hold: f32 (the exact weights), bf16 or f16 (then the
    /// optimizer file keeps the exact weights for --resume) [default: f32, or the resumed run's].
    #[arg(long, value_name = "f32|bf16|f16")]
    pub save_dtype: Option<StoredDType>,
    /// Read the loss and gradient norm back every N steps (one transfer for all N; the GPU
    /// never waits for the host in between), or `auto`: about once a second. Every step still
    /// gets its log line; a non-finite value stops the run naming its step, before any
    /// checkpoint is written from it [default: auto].
    #[arg(long, value_name = "N|auto")]
    pub log_every: Option<LogEvery>,
    /// Rows of logits the lm_head and cross-entropy compute at a time: `auto` (blocks the size
    /// of a hidden activation, as Liger's fused linear cross-entropy), `full` (all B·T rows:
    /// [B·T, vocab] held at once), or a multiple of 128 [default: auto, or the resumed run's].
    #[arg(long, value_name = "auto|full|ROWS")]
    pub lm_head_chunk: Option<HeadChunk>,
    /// `layer`: keep only each layer's input and recompute the layer's forward in the backward
    /// (activations of one layer instead of all; one more forward per step; bit-identical
    /// gradients), `none`: keep everything. A resumed run may change it [default: none, or the
    /// resumed run's].
    #[arg(long, value_name = "none|layer")]
    pub recompute: Option<Recompute>,
    #[command(flatten)]
    pub kernel: crate::tune::KernelArgs,
    #[command(flatten)]
    pub dist: DistArgs,
}

/// How often the training loop reads its figures back (`--log-every`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogEvery {
    /// When about a second has passed since the last read.
    Auto,
    Steps(u64),
}

impl std::str::FromStr for LogEvery {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            n => match n.parse::<u64>() {
                Ok(n) if n > 0 => Ok(Self::Steps(n)),
                _ => Err(format!("`{s}`: expected a positive number of steps or `auto`")),
            },
        }
    }
}

fn parse_format(s: &str) -> Result<TokenFormat, String> {
    s.parse()
}

/// The built-in demo: 300 steps of 8 × 64 bytes, about 3 minutes on lavapipe with 2 cores; the
/// loss falls from ln(258) ≈ 5.6 to about 0.5 and the greedy sample reads as the corpus's
/// sentences. A higher rate and a short warm-up suit a tiny model on a few hundred thousand
/// tokens; everything else is Llama 2's recipe.
fn demo_options() -> TrainOptions {
    TrainOptions { steps: 300, batch: 8, seq_len: 64, lr: 3e-3, warmup: 20, ..TrainOptions::default() }
}

impl TrainArgs {
    pub fn is_demo(&self) -> bool {
        self.data.is_empty() && self.resume.is_none()
    }

    /// The options: each flag given, else `base`'s value.
    pub fn options_over(&self, base: TrainOptions) -> TrainOptions {
        TrainOptions {
            steps: self.steps.unwrap_or(base.steps),
            batch: self.batch.unwrap_or(base.batch),
            seq_len: self.seq_len.unwrap_or(base.seq_len),
            grad_accum: self.grad_accum.unwrap_or(base.grad_accum),
            lr: self.lr.unwrap_or(base.lr),
            warmup: self.warmup.unwrap_or(base.warmup),
            min_lr_ratio: self.min_lr_ratio.unwrap_or(base.min_lr_ratio),
            weight_decay: self.weight_decay.unwrap_or(base.weight_decay),
            beta1: self.beta1.unwrap_or(base.beta1),
            beta2: self.beta2.unwrap_or(base.beta2),
            eps: self.eps.unwrap_or(base.eps),
            grad_clip: self.grad_clip.unwrap_or(base.grad_clip),
            seed: self.seed.unwrap_or(base.seed),
            val_fraction: self.val_fraction.unwrap_or(base.val_fraction),
            precision: self.precision(),
            head_chunk: self.lm_head_chunk.unwrap_or(base.head_chunk),
            recompute: self.recompute.unwrap_or(base.recompute),
            tf32: self.kernel.tf32 || base.tf32,
            ..base
        }
    }

    /// The compute type asked for (f32 when not given).
    pub fn compute_dtype(&self) -> DType {
        match self.dtype.as_deref() {
            Some("f16") => DType::F16,
            Some("bf16") => DType::BF16,
            _ => DType::F32,
        }
    }

    /// The precision policy: the compute type's defaults, overridden by each flag given.
    pub fn precision(&self) -> PrecisionOptions {
        let mut p = PrecisionOptions::for_dtype(self.compute_dtype());
        if let Some(master) = self.master_weights {
            p.master_weights = master;
        }
        if let Some(rounding) = self.rounding {
            p.rounding = rounding;
        }
        match self.loss_scale.as_deref() {
            Some("off") => p.loss_scale = None,
            Some(_) => p.loss_scale = p.loss_scale.or(Some(LossScaleOptions::default())),
            None => {}
        }
        if let Some(scale) = &mut p.loss_scale {
            scale.init_scale = self.loss_scale_init.unwrap_or(scale.init_scale);
            scale.growth_interval = self.loss_scale_growth_interval.unwrap_or(scale.growth_interval);
        }
        p
    }

    /// Refuses precision flags that would do nothing: loss-scale settings without scaling.
    pub fn check_precision_flags(&self) -> Result<()> {
        if self.resume.is_none()
            && self.compute_dtype() == DType::F32
            && (self.master_weights.is_some() || self.rounding.is_some())
        {
            eprintln!(
                "note: --master-weights and --rounding apply to f16/bf16 compute only; with f32 they change nothing"
            );
        }
        let scaled = self.precision().loss_scale.is_some();
        if !scaled && (self.loss_scale_init.is_some() || self.loss_scale_growth_interval.is_some()) {
            bail!(
                "--loss-scale-init and --loss-scale-growth-interval need loss scaling (the default for \
                 --dtype f16, or --loss-scale dynamic)"
            );
        }
        Ok(())
    }

    fn options(&self) -> TrainOptions {
        self.options_over(if self.is_demo() { demo_options() } else { TrainOptions::default() })
    }

    pub fn out_dir(&self, default: &str) -> PathBuf {
        self.out.clone().or_else(|| self.resume.clone()).unwrap_or_else(|| PathBuf::from(default))
    }

    /// The tokenizer to use: --tokenizer, else the one saved in --resume or --model.
    pub fn given_tokenizer(&self) -> Result<Option<TextTokenizer>> {
        let saved = self.resume.as_ref().or(self.model.as_ref()).map(|dir| dir.join(TOKENIZER_FILE));
        match (&self.tokenizer, saved) {
            (Some(path), _) => Ok(Some(TextTokenizer::load(path)?)),
            (None, Some(path)) if path.exists() => Ok(Some(TextTokenizer::load(&path)?)),
            _ => Ok(None),
        }
    }

    /// The configuration the run will train: --model's or --resume's config.json, else the
    /// preset's (before its vocabulary is sized, see [`sized_preset`]).
    pub fn config(&self) -> Result<LlamaConfig> {
        Ok(match self.model.as_ref().or(self.resume.as_ref()) {
            Some(dir) => LlamaConfig::load(&dir.join("config.json"))?,
            None => LlamaConfig::preset(self.preset.as_deref().unwrap_or("tiny"))?,
        })
    }

    /// Where checkpoints, log and plot go, and when; `eval_every` as the run's validation says.
    pub fn run_control(&self, default_out: &str, eval_every: Option<u64>) -> RunControl {
        let out = self.out_dir(default_out);
        let log = self.log.clone().unwrap_or_else(|| sibling(&out, "log.jsonl"));
        RunControl {
            plot: log.with_extension("png"),
            out,
            log,
            append_log: self.resume.is_some(),
            eval_every,
            save_every: self.save_every,
            peak_tflops: self.peak_tflops,
            log_every: self.log_every.unwrap_or(LogEvery::Auto),
        }
    }

    /// Refuses, naming each, the options given with --resume that would change the numbers of
    /// the run saved as `state` in `dir` (a value equal to the saved one is accepted).
    pub fn refuse_changes_on_resume(&self, dir: &Path, state: &TrainState) -> Result<()> {
        let saved = &state.options;
        let mut changed = Vec::new();
        let mut check = |flag: &str, given: Option<String>, saved: String| {
            if let Some(given) = given
                && given != saved
            {
                changed.push(format!("--{flag} {given} (the run's: {saved})"));
            }
        };
        check("batch", self.batch.map(|v| v.to_string()), saved.batch.to_string());
        check("seq-len", self.seq_len.map(|v| v.to_string()), saved.seq_len.to_string());
        check("grad-accum", self.grad_accum.map(|v| v.to_string()), saved.grad_accum.to_string());
        check("lr", self.lr.map(|v| v.to_string()), saved.lr.to_string());
        check("warmup", self.warmup.map(|v| v.to_string()), saved.warmup.to_string());
        check("min-lr-ratio", self.min_lr_ratio.map(|v| v.to_string()), saved.min_lr_ratio.to_string());
        check("weight-decay", self.weight_decay.map(|v| v.to_string()), saved.weight_decay.to_string());
        check("beta1", self.beta1.map(|v| v.to_string()), saved.beta1.to_string());
        check("beta2", self.beta2.map(|v| v.to_string()), saved.beta2.to_string());
        check("eps", self.eps.map(|v| v.to_string()), saved.eps.to_string());
        check("grad-clip", self.grad_clip.map(|v| v.to_string()), saved.grad_clip.to_string());
        check("seed", self.seed.map(|v| v.to_string()), saved.seed.to_string());
        check(
            "tf32",
            self.kernel.tf32.then(|| "on".to_string()),
            if saved.tf32 { "on" } else { "off" }.into(),
        );
        check("lm-head-chunk", self.lm_head_chunk.map(|v| v.to_string()), saved.head_chunk.to_string());
        let precision = &saved.precision;
        check(
            "master-weights",
            self.master_weights.map(|v| v.to_string()),
            precision.master_weights.to_string(),
        );
        check(
            "rounding",
            self.rounding.map(|v| format!("{v:?}").to_lowercase()),
            format!("{:?}", precision.rounding).to_lowercase(),
        );
        let scale = precision.loss_scale;
        check("loss-scale", self.loss_scale.clone(), if scale.is_some() { "dynamic" } else { "off" }.into());
        if let Some(scale) = scale {
            check(
                "loss-scale-init",
                self.loss_scale_init.map(|v| v.to_string()),
                scale.init_scale.to_string(),
            );
            check(
                "loss-scale-growth-interval",
                self.loss_scale_growth_interval.map(|v| v.to_string()),
                scale.growth_interval.to_string(),
            );
        }
        if let Some(held) = state.validation.as_ref().map(|v| &v.held_out) {
            let fraction = match held {
                HeldOut::Fraction { fraction } => fraction.to_string(),
                _ => "none".into(),
            };
            check("val-fraction", self.val_fraction.map(|v| v.to_string()), fraction);
        }
        if let Some(dtype) = &state.dtype {
            check("dtype", self.dtype.clone(), dtype.clone());
        }
        if let Some(DataSource::Files { doc_separator, .. }) = &state.source {
            let saved = doc_separator.clone().unwrap_or_else(|| "(blank lines)".into());
            check("doc-separator", self.doc_separator.clone(), saved);
        }
        let model_vocab = LlamaConfig::load(&dir.join("config.json"))?.vocab_size;
        check("vocab-size", self.vocab_size.map(|v| v.to_string()), model_vocab.to_string());
        if let Some(path) = &self.tokenizer {
            let saved = std::fs::read_to_string(dir.join(TOKENIZER_FILE)).ok();
            let given =
                std::fs::read_to_string(path).with_context(|| format!("--tokenizer {}", path.display()))?;
            let same = saved.is_some_and(|saved| {
                let parse = |s: &str| serde_json::from_str::<serde_json::Value>(s).ok();
                parse(&saved).is_some() && parse(&saved) == parse(&given)
            });
            if !same {
                changed.push(format!(
                    "--tokenizer {} (differs from the run's {TOKENIZER_FILE})",
                    path.display()
                ));
            }
        }
        if !changed.is_empty() {
            bail!(
                "--resume {}: {} would change the run's numbers: {}. Resume without them (only --steps \
                 may extend the run), or start a new run",
                dir.display(),
                if changed.len() == 1 { "this option" } else { "these options" },
                changed.join(", ")
            );
        }
        Ok(())
    }
}

/// `DIR-suffix` beside `DIR` (`runs/train` → `runs/train-log.jsonl`).
fn sibling(dir: &Path, suffix: &str) -> PathBuf {
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "train".into());
    dir.with_file_name(format!("{name}-{suffix}"))
}

/// A fresh preset's configuration with its vocabulary sized to the run: `--vocab-size` if given
/// (at least the tokenizer's size), else the tokenizer's size, else the preset's.
pub fn sized_preset(
    args: &TrainArgs,
    mut config: LlamaConfig,
    tokenizer: Option<&TextTokenizer>,
) -> Result<LlamaConfig> {
    let preset = args.preset.as_deref().unwrap_or("tiny");
    let size = match (args.vocab_size, tokenizer) {
        (Some(v), Some(t)) if v < t.vocab_size() => {
            bail!("--vocab-size {v} is smaller than the tokenizer's {} tokens ({})", t.vocab_size(), t.origin)
        }
        (Some(v), _) => v,
        (None, Some(t)) => t.vocab_size(),
        (None, None) => config.vocab_size,
    };
    if size != config.vocab_size {
        let why = match (args.vocab_size, tokenizer) {
            (Some(_), _) => "--vocab-size".to_string(),
            (None, Some(t)) => format!("the tokenizer ({})", t.origin),
            (None, None) => unreachable!("the preset's own size"),
        };
        eprintln!("vocabulary: {size} tokens, sized to {why}; the {preset} preset has {}", config.vocab_size);
        config.vocab_size = size;
    }
    Ok(config)
}

/// Everything decided on the host before the device opens.
struct Plan {
    data: RunData,
    options: TrainOptions,
    /// A fresh run's configuration (`None` when loading --model or resuming).
    config: Option<LlamaConfig>,
    dtype: String,
}

fn plan(args: &TrainArgs) -> Result<Plan> {
    args.check_precision_flags()?;
    if let Some(dir) = &args.resume {
        let state = read_state(dir)?;
        if state.sft.is_some() {
            bail!("--resume {}: an SFT checkpoint; resume it with `cargo xtask sft`", dir.display());
        }
        args.refuse_changes_on_resume(dir, &state)?;
        let config = LlamaConfig::load(&dir.join("config.json"))?;
        let tokenizer = args.given_tokenizer()?;
        let mut options = state.options.clone();
        if let Some(steps) = args.steps {
            options.steps = steps;
        }
        let data = pretraining_data(args, Some(&state), &options, tokenizer.as_ref(), config.vocab_size)?;
        let dtype = state.dtype.clone().or(args.dtype.clone()).unwrap_or_else(|| "f32".into());
        return Ok(Plan { data, options, config: None, dtype });
    }
    let options = args.options();
    let given = args.given_tokenizer()?;
    let base = args.config()?;
    let bpe_size = args.vocab_size.unwrap_or(base.vocab_size);
    let data = pretraining_data(args, None, &options, given.as_ref(), bpe_size)?;
    let config = match &args.model {
        Some(dir) => {
            if let Some(tokenizer) = &data.tokenizer {
                let config_file = dir.join("config.json");
                tokenizer.check_fits(base.vocab_size, &format!("the model in {}", config_file.display()))?;
            }
            None
        }
        None => Some(sized_preset(args, base, data.tokenizer.as_ref())?),
    };
    let dtype = args.dtype.clone().unwrap_or_else(|| "f32".into());
    Ok(Plan { data, options, config, dtype })
}

pub fn run(args: TrainArgs) -> Result<()> {
    let Some(backend) = args.backend.resolve_or_reexec()? else { return Ok(()) };
    let env = match args.dist.role(backend)? {
        Role::Launched => return Ok(()),
        Role::Single => None,
        Role::Worker(env) => Some(env),
    };
    let mut plan = plan(&args)?;
    plan.options.world_size = env.as_ref().map_or(1, |e| e.world_size);
    let device = env.as_ref().map(crate::launch::worker_device).transpose()?.unwrap_or(0);
    dsl::on_device_at(backend, device, Train { args: &args, plan, env })?
}

struct Train<'a> {
    args: &'a TrainArgs,
    plan: Plan,
    /// This process's place in a data-parallel job, if any.
    env: Option<DistEnv>,
}

impl OnDevice for Train<'_> {
    type Output = Result<()>;
    fn run<R: BackendRuntime>(self, dev: &Device<R>) -> Result<()> {
        match &self.env {
            Some(env) => eprintln!("rank {} of {}: device {}", env.rank, env.world_size, dev.info()),
            None => eprintln!("device: {}", dev.info()),
        }
        // A resumed run keeps its TF32 setting (the plan's options are the saved ones).
        let kernel = crate::tune::KernelArgs { tf32: self.plan.options.tf32, ..self.args.kernel.clone() };
        let (dev, line) = kernel.apply(dev)?;
        if self.env.as_ref().is_none_or(|e| e.rank == 0) {
            eprintln!("{line}");
        }
        match self.plan.dtype.as_str() {
            "f16" => self.run_as::<R, half::f16>(&dev),
            "bf16" => self.run_as::<R, half::bf16>(&dev),
            _ => self.run_as::<R, f32>(&dev),
        }
    }
}

impl Train<'_> {
    fn run_as<R: BackendRuntime, F: FloatElement>(&self, dev: &Device<R>) -> Result<()> {
        let (args, plan) = (self.args, &self.plan);
        let control = args.run_control("runs/train", plan.data.validation.eval_every);
        control.check_out()?;
        let data = TrainData::Tokens { train: &plan.data.train, val: plan.data.val.as_ref() };
        let parallel = self.env.as_ref().map(|env| crate::launch::join(dev, env, &args.dist)).transpose()?;
        let mut trainer = if let Some(dir) = &args.resume {
            let t = Trainer::<R, F>::resume_parallel(dev, dir, data, args.steps, args.recompute, parallel)?;
            if t.rank() == 0 {
                eprintln!("resuming {} at step {}", dir.display(), t.state.step);
            }
            t
        } else {
            let options = plan.options.clone();
            let (config, weights) = match (&args.model, &plan.config) {
                (Some(dir), _) => {
                    let checkpoint =
                        model::checkpoint::load(dir).with_context(|| format!("loading {}", dir.display()))?;
                    (checkpoint.config, checkpoint.tensors)
                }
                (None, Some(config)) => (config.clone(), model::init::initial_params(config, options.seed)),
                (None, None) => unreachable!("a fresh run without --model has a configuration"),
            };
            let model = Llama::<R, F>::new(dev, config.clone(), Params::from_host(dev, &config, &weights)?)?;
            let mut trainer = Trainer::new_parallel(dev, model, options, data, parallel)?;
            // The master copy starts from the unrounded f32 weights.
            if trainer.has_master_weights() {
                trainer.set_weights(dev, &weights)?;
            }
            trainer
        };
        if let Some(dtype) = args.save_dtype {
            trainer.save_dtype = dtype;
        }
        trainer.state.source = Some(plan.data.source.clone());
        trainer.state.validation = Some(plan.data.validation.clone());
        if let Some(tokenizer) = &plan.data.tokenizer {
            tokenizer.check_fits(trainer.model.config.vocab_size, "the model")?;
            trainer.tokenizer = Some(tokenizer.clone());
        }
        drive(dev, &mut trainer, &control)?;
        if args.is_demo() && trainer.rank() == 0 {
            let tokenizer = trainer.tokenizer.as_ref().expect("the demo uses the byte tokenizer");
            let prompt = tokenizer.encode("The ", true)?;
            let sample = trainer.greedy_sample(dev, &prompt, 120)?;
            println!("sample (greedy): The {}", tokenizer.decode(&sample, true)?);
        }
        Ok(())
    }
}

/// Where a run writes, and how often.
pub struct RunControl {
    pub out: PathBuf,
    pub log: PathBuf,
    pub plot: PathBuf,
    /// A resumed run appends to its log; a fresh one starts it anew.
    pub append_log: bool,
    pub eval_every: Option<u64>,
    pub save_every: Option<u64>,
    pub peak_tflops: Option<f64>,
    pub log_every: LogEvery,
}

impl RunControl {
    /// Fails now, not after the run, when the checkpoint could not be written: `out` is a file,
    /// or its parent cannot be created or written to.
    pub fn check_out(&self) -> Result<()> {
        let out = &self.out;
        if out.exists() && !out.is_dir() {
            bail!("--out {} exists and is not a directory", out.display());
        }
        let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        std::fs::create_dir_all(parent)
            .with_context(|| format!("--out {}: cannot create {}", out.display(), parent.display()))?;
        let probe = parent.join(format!(".write-test-{}", std::process::id()));
        std::fs::write(&probe, b"")
            .with_context(|| format!("--out {}: cannot write in {}", out.display(), parent.display()))?;
        let _ = std::fs::remove_file(&probe);
        Ok(())
    }
}

/// Steps `trainer` to its last step with progress, log lines, evaluations and checkpoints, then
/// saves, prints the summary and plots the log.
pub fn drive<R: BackendRuntime, F: FloatElement>(
    dev: &Device<R>,
    trainer: &mut Trainer<R, F>,
    control: &RunControl,
) -> Result<()> {
    let options = trainer.options.clone();
    let out = &control.out;
    // Rank 0 alone talks and writes the log (every rank computes the same figures).
    let main = trainer.rank() == 0;
    let zero = trainer.parallel_mut().map(|p| p.zero());
    let master = trainer.has_master_weights();
    let head_rows = trainer.head_rows();
    if main {
        eprint!("{}", trainer.model.config);
        eprintln!("precision: {}", options.precision.describe(F::DTYPE));
        let memory = trainer.model.config.training_memory(
            options.batch,
            options.seq_len,
            F::DTYPE.size_bytes(),
            master,
            head_rows,
            options.recompute,
        );
        let memory = trainer::parallel::sharded_memory(
            &trainer.model.config,
            memory,
            options.world_size,
            zero.unwrap_or_default(),
        );
        eprintln!(
            "memory of a step at batch {} × seq {}: {}; logits {head_rows} rows at a time (--lm-head-chunk {}), \
             --recompute {}",
            options.batch,
            options.seq_len,
            memory.describe(F::DTYPE),
            options.head_chunk,
            options.recompute,
        );
        let ranks = match zero {
            Some(zero) => format!(" × {} ranks (--zero {})", options.world_size, zero.stage()),
            None => String::new(),
        };
        eprintln!(
            "steps {}, batch {} × seq {} × accum {}{ranks} = {} tokens/step, lr {:e} (warm-up {}, floor {}×), wd {}, \
             clip {}",
            options.steps,
            options.batch,
            options.seq_len,
            options.grad_accum,
            trainer.tokens_per_step(),
            options.lr,
            options.schedule().warmup,
            options.min_lr_ratio,
            options.weight_decay,
            options.grad_clip
        );
    }
    if trainer.state.step >= options.steps {
        bail!(
            "the checkpoint is already at step {} of {}; pass --steps to go further",
            trainer.state.step,
            options.steps
        );
    }
    let mut log = if main {
        Some(
            OpenOptions::new()
                .create(true)
                .write(true)
                .append(control.append_log)
                .truncate(!control.append_log)
                .open(&control.log)
                .with_context(|| format!("opening the log {}", control.log.display()))?,
        )
    } else {
        None
    };
    let mut write_log = |line: serde_json::Value| -> Result<()> {
        if let Some(log) = &mut log {
            writeln!(log, "{line}")?;
        }
        Ok(())
    };

    let bar = if main { ProgressBar::new(options.steps) } else { ProgressBar::hidden() }.with_style(
        ProgressStyle::with_template("{bar:25} {pos}/{len} steps  loss {msg}  [{elapsed} < {eta}]")
            .expect("valid template"),
    );
    bar.set_position(trainer.state.step);
    // Without a terminal the bar is hidden: say the same in plain lines (about ten per run).
    let say = |line: String| match (main, bar.is_hidden()) {
        (false, _) => {}
        (true, true) => eprintln!("{line}"),
        (true, false) => bar.println(line),
    };
    let plain_every = (options.steps / 10).max(1);
    let started = Instant::now();
    let (mut tokens, mut first_loss, mut last_loss, mut best_val) = (0usize, None, f64::NAN, f64::INFINITY);
    let mut last_val = None;
    let mut skipped = 0u64;
    let mut last_read = Instant::now();
    while trainer.state.step < options.steps {
        let mut reports = trainer.queue_step(dev)?;
        let done = trainer.state.step;
        let eval_now = control.eval_every.is_some_and(|n| done.is_multiple_of(n) || done == options.steps);
        let save_now = control.save_every.is_some_and(|n| done.is_multiple_of(n)) && done < options.steps;
        // Checkpoints and evaluations come after a read, which checks every step before them.
        let read_now = eval_now
            || save_now
            || done == options.steps
            || match control.log_every {
                LogEvery::Steps(n) => done.is_multiple_of(n),
                LogEvery::Auto => last_read.elapsed().as_secs_f64() >= 1.0,
            };
        let mut stop = None;
        if read_now {
            let (read, error) = trainer.read_steps_until_error(dev)?;
            reports.extend(read);
            stop = error;
            last_read = Instant::now();
        }
        for report in &reports {
            tokens += report.tokens;
            first_loss.get_or_insert(report.loss);
            last_loss = report.loss;
            let mut line = json!({"step": report.step, "loss": report.loss, "lr": report.lr,
                                  "grad_norm": report.grad_norm, "tokens": report.tokens,
                                  "tokens_per_s": report.tokens_per_s});
            if let Some(scale) = report.loss_scale {
                line["loss_scale"] = json!(scale);
                line["skipped"] = json!(report.skipped);
            }
            write_log(line)?;
            if report.skipped {
                skipped += 1;
                say(format!(
                    "step {}: gradients overflowed at loss scale {}: update skipped, scale halved",
                    report.step,
                    report.loss_scale.unwrap_or(f64::NAN)
                ));
            }
            let step_done = report.step + 1;
            if main
                && bar.is_hidden()
                && (step_done.is_multiple_of(plain_every) || step_done == options.steps)
            {
                eprintln!(
                    "step {step_done}/{}: loss {:.4}, lr {:.2e}, |g| {:.3}, {:.0} tokens/s, {:.0} s",
                    options.steps,
                    report.loss,
                    report.lr,
                    report.grad_norm,
                    report.tokens_per_s,
                    started.elapsed().as_secs_f64()
                );
            }
        }
        if let Some(report) = reports.last() {
            bar.set_message(format!(
                "{:.4}  lr {:.2e}  |g| {:.3}  {:.0} tok/s{}",
                report.loss,
                report.lr,
                report.grad_norm,
                report.tokens_per_s,
                report.loss_scale.map(|s| format!("  scale {s}")).unwrap_or_default()
            ));
        }
        bar.set_position(done);
        if let Some(error) = stop {
            // The good steps before it are logged; the last checkpoint written stays as it was.
            bar.abandon();
            return Err(error.into());
        }
        if eval_now && let Some(val) = trainer.validate(dev)? {
            best_val = best_val.min(val);
            last_val = Some(val);
            write_log(json!({"step": done, "val_loss": val, "val_perplexity": val.exp()}))?;
            say(format!("step {done}: val loss {val:.4} (perplexity {:.2})", val.exp()));
        }
        if save_now {
            trainer.save(dev, out)?;
            say(format!("step {done}: saved {}", out.display()));
        }
    }
    bar.finish_and_clear();
    trainer.save(dev, out)?;
    if !main {
        return Ok(());
    }
    let seconds = started.elapsed().as_secs_f64();
    eprintln!(
        "done: {} steps in {:.1} s, {:.0} tokens/s; loss {:.4} → {:.4}{}{}",
        options.steps,
        seconds,
        tokens as f64 / seconds,
        first_loss.unwrap_or(f64::NAN),
        last_loss,
        match last_val {
            Some(v) => format!("; val loss {v:.4} (best {best_val:.4})"),
            None => String::new(),
        },
        match (skipped, trainer.state.loss_scale) {
            (0, None) => String::new(),
            (n, Some(s)) => format!("; loss scale {} ({n} steps skipped on overflow)", s.scale),
            (n, None) => format!("; {n} steps skipped"),
        }
    );
    let model_tflops =
        tokens as f64 * trainer.model.config.training_flops_per_token(options.seq_len) / seconds / 1e12;
    let peak = control.peak_tflops.map(|p| (p, "--peak-tflops".to_string())).or_else(|| {
        let dtype = crate::peak::dtype_name::<F>();
        crate::peak::detect(dev.info().backend, dtype)
            .map(|(name, p)| (p, format!("{name}'s dense {dtype} peak")))
    });
    match peak {
        Some((peak, source)) => eprintln!(
            "model FLOPs: {model_tflops:.3} TFLOP/s = {:.1}% of {peak} TFLOP/s ({source}): the MFU",
            100.0 * model_tflops / peak
        ),
        None => {
            eprintln!("model FLOPs: {model_tflops:.3} TFLOP/s (peak unknown: pass --peak-tflops for the MFU)")
        }
    }
    match crate::plot::loss_curves(&control.log, &control.plot) {
        Ok(()) => eprintln!(
            "checkpoint: {} (log: {}, plot: {})",
            out.display(),
            control.log.display(),
            control.plot.display()
        ),
        Err(e) => eprintln!("checkpoint: {} (log: {}; no plot: {e:#})", out.display(), control.log.display()),
    }
    Ok(())
}
