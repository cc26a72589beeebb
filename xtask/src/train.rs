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
use std::path::{Path, PathBuf};
use std::time::Instant;
use trainer::corpus;
use trainer::data::{TokenFormat, TokenStream, documents, read_text};
use trainer::tokenizer::{TOKENIZER_FILE, TextTokenizer};
use trainer::train::{TrainOptions, Trainer};

#[derive(clap::Args)]
pub struct TrainArgs {
    #[command(flatten)]
    pub backend: BackendArg,
    /// Start from this Hugging Face-layout checkpoint.
    #[arg(long, conflicts_with_all = ["preset", "resume"])]
    pub model: Option<PathBuf>,
    /// Start from a fresh N(0, 0.02²) initialisation of this preset (default: tiny).
    #[arg(long, conflicts_with = "resume")]
    pub preset: Option<String>,
    /// Continue the run saved in this directory (its options are used; --steps may extend it).
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Token file (llm.c shard or llama2.c .bin) or UTF-8 text (.txt, .md, or --data-format
    /// text). Default: the built-in corpus.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// auto, llmc, llama2c or text.
    #[arg(long, default_value = "auto", value_parser = parse_format)]
    data_format: TokenFormat,
    /// A Hugging Face tokenizer.json for text data (saved with the run). Text without one
    /// trains a byte-level BPE of --vocab-size tokens on it. Default: the one in --model or
    /// --resume, if any.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Tokens of the BPE trained on text data when no tokenizer is given (default: the
    /// model's vocabulary size).
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
    /// Evaluate on the held-out slice every N steps.
    #[arg(long)]
    pub eval_every: Option<u64>,
    /// Save a checkpoint to --out every N steps.
    #[arg(long)]
    pub save_every: Option<u64>,
    /// The device's peak FLOP/s in TFLOP/s for the compute type (e.g. 989 for an H100's dense
    /// bf16), for the model FLOP utilisation; known NVIDIA GPUs are detected.
    #[arg(long)]
    pub peak_tflops: Option<f64>,
    /// Compute type: f32 (default), f16, or bf16 (cuda).
    #[arg(long, default_value = "f32", value_parser = ["f32", "f16", "bf16"])]
    pub dtype: String,
}

fn parse_format(s: &str) -> Result<TokenFormat, String> {
    s.parse()
}

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
            ..base
        }
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

    /// The configuration the run will train: --model's or --resume's config.json, else the preset.
    pub fn config(&self) -> Result<LlamaConfig> {
        Ok(match self.model.as_ref().or(self.resume.as_ref()) {
            Some(dir) => LlamaConfig::load(&dir.join("config.json"))?,
            None => LlamaConfig::preset(self.preset.as_deref().unwrap_or("tiny"))?,
        })
    }

    /// Where checkpoints, log and plot go, and when.
    pub fn run_control(&self, default_out: &str) -> RunControl {
        let out = self.out_dir(default_out);
        let log = self.log.clone().unwrap_or_else(|| sibling(&out, "log.jsonl"));
        RunControl {
            plot: log.with_extension("png"),
            out,
            log,
            append_log: self.resume.is_some(),
            eval_every: self.eval_every.or(if self.is_demo() { Some(50) } else { None }),
            save_every: self.save_every,
            peak_tflops: self.peak_tflops,
        }
    }
}

/// `DIR-suffix` beside `DIR` (`runs/train` → `runs/train-log.jsonl`).
fn sibling(dir: &Path, suffix: &str) -> PathBuf {
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "train".into());
    dir.with_file_name(format!("{name}-{suffix}"))
}

/// The data of a pretraining run and the tokenizer saved with it.
fn pretraining_data(args: &TrainArgs) -> Result<(TokenStream, Option<TextTokenizer>)> {
    let given = args.given_tokenizer()?;
    let Some(path) = &args.data else {
        // ~400 KB of generated text through the byte tokenizer.
        let (stream, tokenizer) = corpus::stream(400_000, 0)?;
        return Ok((stream, Some(tokenizer)));
    };
    if !args.data_format.is_text(path) {
        return Ok((TokenStream::open(path, args.data_format)?, given));
    }
    let tokenizer = match given {
        Some(tokenizer) => tokenizer,
        None => {
            let vocab_size = match args.vocab_size {
                Some(v) => v,
                None => args.config()?.vocab_size,
            };
            eprintln!("training a byte-level BPE tokenizer of {vocab_size} tokens on {}", path.display());
            let text = read_text(path)?;
            TextTokenizer::train_bpe(documents(&text).into_iter(), vocab_size)?
        }
    };
    let stream = TokenStream::open_text(path, &tokenizer)?;
    Ok((stream, Some(tokenizer)))
}

pub fn run(args: TrainArgs) -> Result<()> {
    let Some(backend) = args.backend.resolve_or_reexec()? else { return Ok(()) };
    let (data, tokenizer) = pretraining_data(&args)?;
    eprintln!("data: {} — {} tokens ({})", data.path.display(), data.tokens.len(), data.format);
    dsl::on_device(backend, Train { args: &args, data: &data, tokenizer })?
}

struct Train<'a> {
    args: &'a TrainArgs,
    data: &'a TokenStream,
    tokenizer: Option<TextTokenizer>,
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
        let control = args.run_control("runs/train");
        control.check_out()?;
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
                    let config = args.config()?;
                    let params = model::init::initial_params(&config, options.seed);
                    Llama::new(dev, config.clone(), Params::from_host(dev, &config, &params)?)?
                }
            };
            Trainer::new(dev, model, options, self.data)?
        };
        if let Some(tokenizer) = &self.tokenizer {
            tokenizer.check_fits(trainer.model.config.vocab_size, "the model")?;
            trainer.tokenizer = Some(tokenizer.clone());
        }
        drive(dev, &mut trainer, &control)?;
        if args.is_demo() {
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
    let mut log = OpenOptions::new()
        .create(true)
        .write(true)
        .append(control.append_log)
        .truncate(!control.append_log)
        .open(&control.log)
        .with_context(|| format!("opening the log {}", control.log.display()))?;

    let bar = ProgressBar::new(options.steps).with_style(
        ProgressStyle::with_template("{bar:25} {pos}/{len} steps  loss {msg}  [{elapsed} < {eta}]")
            .expect("valid template"),
    );
    bar.set_position(trainer.state.step);
    // Without a terminal the bar is hidden: say the same in plain lines (about ten per run).
    let say = |line: String| if bar.is_hidden() { eprintln!("{line}") } else { bar.println(line) };
    let plain_every = (options.steps / 10).max(1);
    let started = Instant::now();
    let (mut tokens, mut first_loss, mut last_loss, mut best_val) = (0usize, None, f64::NAN, f64::INFINITY);
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
        if bar.is_hidden() && (done.is_multiple_of(plain_every) || done == options.steps) {
            eprintln!(
                "step {done}/{}: loss {:.4}, lr {:.2e}, |g| {:.3}, {:.0} tokens/s, {:.0} s",
                options.steps,
                report.loss,
                report.lr,
                report.grad_norm,
                report.tokens_per_s,
                started.elapsed().as_secs_f64()
            );
        }
        if control.eval_every.is_some_and(|n| done.is_multiple_of(n) || done == options.steps)
            && let Some(val) = trainer.validate(dev)?
        {
            best_val = best_val.min(val);
            last_val = Some(val);
            writeln!(log, "{}", json!({"step": done, "val_loss": val, "val_perplexity": val.exp()}))?;
            say(format!("step {done}: val loss {val:.4} (perplexity {:.2})", val.exp()));
        }
        if control.save_every.is_some_and(|n| done.is_multiple_of(n)) && done < options.steps {
            trainer.save(dev, out)?;
            say(format!("step {done}: saved {}", out.display()));
        }
    }
    bar.finish_and_clear();
    trainer.save(dev, out)?;
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
