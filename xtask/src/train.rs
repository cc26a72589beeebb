//! `cargo xtask train`: Llama 2's recipe on a token file, or, with no arguments, a short run of
//! the `tiny` preset on the built-in corpus that ends by printing a sample.

use crate::BackendArg;
use anyhow::{Context, Result, bail};
use dsl::{BackendRuntime, Device, FloatElement, OnDevice};
use indicatif::{ProgressBar, ProgressStyle};
use model::{Llama, LlamaConfig, Params};
use serde_json::json;
use std::fs::OpenOptions;
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;
use trainer::corpus;
use trainer::data::{TokenFormat, TokenStream};
use trainer::train::{TrainOptions, Trainer, in_memory_stream};

#[derive(clap::Args)]
pub struct TrainArgs {
    #[command(flatten)]
    backend: BackendArg,
    /// Start from this Hugging Face-layout checkpoint.
    #[arg(long, conflicts_with_all = ["preset", "resume"])]
    model: Option<PathBuf>,
    /// Start from a fresh N(0, 0.02²) initialisation of this preset (default: tiny).
    #[arg(long, conflicts_with = "resume")]
    preset: Option<String>,
    /// Continue the run saved in this directory (its options are used; --steps may extend it).
    #[arg(long)]
    resume: Option<PathBuf>,
    /// Token file (llm.c shard or llama2.c .bin). Default: the built-in corpus.
    #[arg(long)]
    data: Option<PathBuf>,
    #[arg(long, default_value = "auto", value_parser = parse_format)]
    data_format: TokenFormat,
    /// Optimizer steps.
    #[arg(long)]
    steps: Option<u64>,
    #[arg(long)]
    batch: Option<usize>,
    #[arg(long)]
    seq_len: Option<usize>,
    /// Micro-batches per optimizer step.
    #[arg(long)]
    grad_accum: Option<usize>,
    /// Peak learning rate (Llama 2: 3e-4).
    #[arg(long)]
    lr: Option<f64>,
    /// Warm-up steps (Llama 2: 2000), capped to the run's steps.
    #[arg(long)]
    warmup: Option<u64>,
    #[arg(long)]
    min_lr_ratio: Option<f64>,
    #[arg(long)]
    weight_decay: Option<f64>,
    #[arg(long)]
    beta1: Option<f64>,
    #[arg(long)]
    beta2: Option<f64>,
    #[arg(long)]
    eps: Option<f64>,
    #[arg(long)]
    grad_clip: Option<f64>,
    /// Seed of the initialisation.
    #[arg(long)]
    seed: Option<u64>,
    /// Where the final checkpoint (and the periodic ones) go.
    #[arg(long)]
    out: Option<PathBuf>,
    /// JSON lines, one per step (default: OUT-log.jsonl beside OUT, which each checkpoint
    /// replaces whole).
    #[arg(long)]
    log: Option<PathBuf>,
    /// Evaluate on the held-out slice every N steps.
    #[arg(long)]
    eval_every: Option<u64>,
    /// Save a checkpoint to --out every N steps.
    #[arg(long)]
    save_every: Option<u64>,
    /// The device's peak FLOP/s in TFLOP/s for the compute type (e.g. 989 for an H100's dense
    /// bf16): the summary then gives the model FLOP utilisation.
    #[arg(long)]
    peak_tflops: Option<f64>,
    /// Compute type: f32 (default), f16, or bf16 (cuda).
    #[arg(long, default_value = "f32", value_parser = ["f32", "f16", "bf16"])]
    dtype: String,
}

fn parse_format(s: &str) -> Result<TokenFormat, String> {
    s.parse()
}

/// The built-in demo: small enough for a CPU-emulated GPU in minutes.
/// The built-in demo: 300 steps of 8 × 64 bytes, about 3 minutes on lavapipe with 2 cores; the
/// loss falls from ln(512) ≈ 6.3 to about 3.4 and the greedy sample reads as the corpus's
/// sentences. A higher rate and a short warm-up suit a tiny model on a few hundred thousand
/// tokens; everything else is Llama 2's recipe.
fn demo_options() -> TrainOptions {
    TrainOptions { steps: 300, batch: 8, seq_len: 64, lr: 3e-3, warmup: 20, ..TrainOptions::default() }
}

impl TrainArgs {
    fn is_demo(&self) -> bool {
        self.data.is_none() && self.resume.is_none()
    }

    fn options(&self) -> TrainOptions {
        let base = if self.is_demo() { demo_options() } else { TrainOptions::default() };
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
            ..base
        }
    }

    fn out_dir(&self) -> PathBuf {
        self.out.clone().or_else(|| self.resume.clone()).unwrap_or_else(|| PathBuf::from("runs/train"))
    }

    fn eval_every(&self) -> Option<u64> {
        self.eval_every.or(if self.is_demo() { Some(50) } else { None })
    }
}

pub fn run(args: TrainArgs) -> Result<()> {
    let Some(backend) = args.backend.resolve_or_reexec()? else { return Ok(()) };
    let data = match &args.data {
        Some(path) => TokenStream::open(path, args.data_format)?,
        None => {
            // ~400 KB of generated text, byte tokens.
            let text = corpus::text(400_000, 0);
            in_memory_stream("built-in corpus (generated sentences, byte tokens)", corpus::byte_tokens(&text))
        }
    };
    eprintln!("data: {} — {} tokens", data.path.display(), data.tokens.len());
    dsl::on_device(backend, Train { args: &args, data: &data })?
}

struct Train<'a> {
    args: &'a TrainArgs,
    data: &'a TokenStream,
}

impl OnDevice for Train<'_> {
    type Output = Result<()>;
    fn run<R: BackendRuntime>(self, dev: &Device<R>) -> Result<()> {
        eprintln!("device: {}", dev.info());
        match self.args.dtype.as_str() {
            "f16" => self.run_as::<R, half::f16>(dev),
            "bf16" => self.run_as::<R, half::bf16>(dev),
            _ => self.run_as::<R, f32>(dev),
        }
    }
}

impl Train<'_> {
    fn run_as<R: BackendRuntime, F: FloatElement>(&self, dev: &Device<R>) -> Result<()> {
        let args = self.args;
        let out = args.out_dir();
        let mut trainer = if let Some(dir) = &args.resume {
            let t = Trainer::<R, F>::resume(dev, dir, self.data, args.steps)?;
            eprintln!("resuming {} at step {}", dir.display(), t.state.step);
            t
        } else {
            let options = args.options();
            let model = match &args.model {
                Some(dir) => {
                    Llama::<R, F>::load(dev, dir).with_context(|| format!("loading {}", dir.display()))?
                }
                None => {
                    let preset = args.preset.as_deref().unwrap_or("tiny");
                    let config = LlamaConfig::preset(preset)?;
                    let params = model::init::initial_params(&config, options.seed);
                    Llama::new(dev, config.clone(), Params::from_host(dev, &config, &params)?)?
                }
            };
            Trainer::new(dev, model, options, self.data)?
        };
        let options = trainer.options.clone();
        eprint!("{}", trainer.model.config);
        eprintln!(
            "steps {}, batch {} × seq {} × accum {} = {} tokens/step, lr {:e} (warm-up {}, floor {}×), wd {}, clip {}",
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
        if trainer.state.step >= options.steps {
            bail!(
                "the checkpoint is already at step {} of {}; pass --steps to go further",
                trainer.state.step,
                options.steps
            );
        }
        // Fail now, not after the run: the checkpoint goes to `out` at the end.
        if out.exists() && !out.is_dir() {
            bail!("--out {} exists and is not a directory", out.display());
        }
        if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        }
        let log_path = args.log.clone().unwrap_or_else(|| {
            let name =
                out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "train".into());
            out.with_file_name(format!("{name}-log.jsonl"))
        });
        // A fresh run starts a fresh log; a resumed one appends to it.
        let mut log = OpenOptions::new()
            .create(true)
            .write(true)
            .append(args.resume.is_some())
            .truncate(args.resume.is_none())
            .open(&log_path)
            .with_context(|| format!("opening the log {}", log_path.display()))?;

        let bar = ProgressBar::new(options.steps).with_style(
            ProgressStyle::with_template("{bar:25} {pos}/{len} steps  loss {msg}  [{elapsed} < {eta}]")
                .expect("valid template"),
        );
        bar.set_position(trainer.state.step);
        let started = Instant::now();
        let (mut tokens, mut first_loss, mut last_loss, mut best_val) =
            (0usize, None, f64::NAN, f64::INFINITY);
        let mut last_val = None;
        while trainer.state.step < options.steps {
            let report = trainer.step(dev)?;
            tokens += report.tokens;
            first_loss.get_or_insert(report.loss);
            last_loss = report.loss;
            writeln!(
                log,
                "{}",
                json!({"step": report.step, "loss": report.loss, "lr": report.lr, "grad_norm": report.grad_norm,
                       "tokens": report.tokens, "tokens_per_s": report.tokens_per_s})
            )?;
            bar.set_message(format!(
                "{:.4}  lr {:.2e}  |g| {:.3}  {:.0} tok/s",
                report.loss, report.lr, report.grad_norm, report.tokens_per_s
            ));
            bar.set_position(trainer.state.step);
            let done = trainer.state.step;
            if args.eval_every().is_some_and(|n| done % n == 0 || done == options.steps)
                && let Some(val) = trainer.validate(dev)?
            {
                best_val = best_val.min(val);
                last_val = Some(val);
                writeln!(log, "{}", json!({"step": done, "val_loss": val, "val_perplexity": val.exp()}))?;
                bar.println(format!("step {done}: val loss {val:.4} (perplexity {:.2})", val.exp()));
            }
            if args.save_every.is_some_and(|n| done % n == 0) && done < options.steps {
                trainer.save(dev, &out)?;
                bar.println(format!("step {done}: saved {}", out.display()));
            }
        }
        bar.finish_and_clear();
        trainer.save(dev, &out)?;
        let seconds = started.elapsed().as_secs_f64();
        eprintln!(
            "done: {} steps in {:.1} s, {:.0} tokens/s; loss {:.4} → {:.4}{}",
            options.steps,
            seconds,
            tokens as f64 / seconds,
            first_loss.unwrap_or(f64::NAN),
            last_loss,
            match last_val {
                Some(v) => format!("; val loss {v:.4} (best {best_val:.4})"),
                None => String::new(),
            }
        );
        let model_tflops =
            tokens as f64 * trainer.model.config.training_flops_per_token(options.seq_len) / seconds / 1e12;
        match args.peak_tflops {
            Some(peak) => eprintln!(
                "model FLOPs: {model_tflops:.3} TFLOP/s = {:.1}% of the {peak} TFLOP/s peak (MFU)",
                100.0 * model_tflops / peak
            ),
            None => eprintln!("model FLOPs: {model_tflops:.3} TFLOP/s (pass --peak-tflops for MFU)"),
        }
        eprintln!("checkpoint: {} (log: {})", out.display(), log_path.display());
        if args.is_demo() {
            let prompt = corpus::byte_tokens("The ");
            let sample = trainer.greedy_sample(dev, &prompt, 120)?;
            println!("sample (greedy): The {}", corpus::bytes_to_text(&sample));
        }
        Ok(())
    }
}
