//! `cargo xtask sft`: supervised fine-tuning with Llama 2's recipe (loss on answer tokens only,
//! examples packed into full sequences), and `cargo xtask sft-data`, the built-in instruction
//! task for trying it.

use crate::train::{TrainArgs, drive};
use anyhow::{Context, Result, bail};
use dsl::{BackendRuntime, Device, FloatElement, OnDevice};
use model::activations::HeadChunk;
use model::{Llama, LlamaConfig, Params};
use std::io::Write;
use std::path::PathBuf;
use trainer::generate::{Sampling, generate};
use trainer::sft::{
    self, DEFAULT_SEPARATOR, Encoded, Example, Overlong, Packing, SftBatches, SftOptions, SpecialIds,
};
use trainer::source::{self, DataSource, HeldOut};
use trainer::tokenizer::TextTokenizer;
use trainer::train::{SftData, TrainData, TrainOptions, TrainState, Trainer, Validation, read_state};

/// Sequences per optimizer step in Llama 2's SFT.
const SFT_SEQUENCES_PER_STEP: usize = 64;

#[derive(clap::Args)]
pub struct SftArgs {
    /// The training flags; for SFT --model (or --resume), --data (JSON Lines of
    /// {"prompt", "response"}) and a tokenizer are required. Defaults: lr 2e-5, 64 sequences
    /// per step (micro-batch × accumulation), seq-len 4096 capped by the model's context.
    #[command(flatten)]
    train: TrainArgs,
    /// Passes over the examples (sets --steps unless that is given).
    #[arg(long, default_value_t = 2)]
    epochs: u64,
    /// The special token between prompt and response (added to the tokenizer and the model's
    /// vocabulary if missing).
    #[arg(long, default_value = DEFAULT_SEPARATOR)]
    separator: String,
    /// What to do with an example longer than the sequence length: truncate or drop.
    #[arg(long, default_value = "truncate", value_parser = parse_overlong)]
    overlong: Overlong,
    /// Read special-token text inside prompts and responses (`</s>`, the separator) as those
    /// tokens. By default it is ordinary text, as in Llama 2: the special ids come only from
    /// the format `<s> prompt SEP response </s>`.
    #[arg(long)]
    parse_special_tokens: bool,
}

fn parse_overlong(s: &str) -> Result<Overlong, String> {
    s.parse()
}

/// Llama 2's SFT recipe for a model with context `context`: lr 2e-5, cosine to 10%, wd 0.1,
/// 64 sequences of min(4096, context) per step.
fn sft_defaults(context: usize) -> TrainOptions {
    TrainOptions {
        lr: 2e-5,
        seq_len: 4096.min(context),
        batch: SFT_SEQUENCES_PER_STEP,
        warmup: 0,
        ..TrainOptions::default()
    }
}

/// The micro-batch and accumulation that make `total` sequences per step: the largest power of
/// two whose largest activation buffer fits the device's buffer limit (`largest(micro)`, in
/// bytes: see [`largest_buffer_bytes`]).
fn split_batch(total: usize, largest: impl Fn(usize) -> u64, max_buffer_bytes: u64) -> (usize, usize) {
    let mut micro = total.next_power_of_two().min(total);
    while micro > 1 && largest(micro) > max_buffer_bytes {
        micro /= 2;
    }
    (micro, total.div_ceil(micro))
}

/// The largest single buffer of a step at `micro × seq` (f32 bytes, the widest type): a
/// hidden-width activation (`[B·T, max(C, Hq·hd, MLP)]`) or a block of logits (`[rows, V]`,
/// all `B·T` rows when the head is not chunked).
fn largest_buffer_bytes(
    config: &LlamaConfig,
    vocab: usize,
    head: HeadChunk,
    micro: usize,
    seq: usize,
) -> u64 {
    let n = micro * seq;
    let widest = config.hidden_size.max(config.q_dim()).max(config.intermediate_size);
    let config = LlamaConfig { vocab_size: vocab, ..config.clone() };
    let head_rows = head.rows(&config, n).unwrap_or(n);
    (n * widest).max(head_rows * vocab) as u64 * 4
}

/// Everything decided on the host before the device opens.
struct Prepared {
    tokenizer: TextTokenizer,
    /// The vocabulary the model must have (grown for the separator if needed).
    vocab_size: usize,
    /// The model's shape (before the vocabulary grows for the separator).
    config: Option<LlamaConfig>,
    options: TrainOptions,
    sft: SftOptions,
    examples: Vec<Example>,
    resume: Option<PathBuf>,
    model: Option<PathBuf>,
    source: DataSource,
    validation: Validation,
    dtype: String,
}

/// The SFT data file and its record: `--data` (one file), or on `--resume` the recorded file,
/// which must not have changed (unless `--allow-data-change`).
fn sft_source(args: &SftArgs, saved: Option<&TrainState>) -> Result<(PathBuf, DataSource)> {
    let record = |path: &PathBuf| -> Result<DataSource> {
        let files = source::fingerprint(std::slice::from_ref(path))?;
        Ok(DataSource::Files { format: "jsonl".into(), doc_separator: None, files })
    };
    let given = match args.train.data.as_slice() {
        [] => None,
        [one] => Some(one.clone()),
        many => bail!("sft reads one JSON Lines file; --data named {}", many.len()),
    };
    let Some(state) = saved else {
        let Some(path) = given else {
            bail!("sft needs --data FILE.jsonl (one {{\"prompt\": …, \"response\": …}} per line)")
        };
        let source = record(&path)?;
        return Ok((path, source));
    };
    let dir = args.train.resume.as_ref().expect("resuming").display();
    let recorded = state.source.as_ref();
    let path = match (given, recorded) {
        (Some(path), _) => path,
        (None, Some(recorded)) => recorded.paths().into_iter().next().context("the record names no file")?,
        (None, None) => bail!(
            "--resume {dir}: the checkpoint does not record its data's file (written before 2026-11-29); \
             pass --data with the file it trained on ({})",
            state.data
        ),
    };
    let now = record(&path)?;
    match recorded.and_then(|r| r.difference(&now)) {
        Some(why) if args.train.allow_data_change => {
            eprintln!("warning: --allow-data-change: {why}; training on {}", now.describe())
        }
        Some(why) => bail!(
            "--resume {dir}: {why}. A resumed run trains on the data it started with; pass \
             --allow-data-change to continue on other data anyway"
        ),
        None => {}
    }
    Ok((path, now))
}

pub fn run(args: SftArgs) -> Result<()> {
    let Some(backend) = args.train.backend.resolve_or_reexec()? else { return Ok(()) };
    let env = match args.train.dist.role(backend)? {
        crate::launch::Role::Launched => return Ok(()),
        crate::launch::Role::Single => None,
        crate::launch::Role::Worker(env) => Some(env),
    };
    if args.train.model.is_none() && args.train.resume.is_none() {
        bail!("sft needs --model DIR (the checkpoint to fine-tune) or --resume DIR");
    }
    args.train.check_precision_flags()?;
    let saved = args.train.resume.as_ref().map(|dir| read_state(dir)).transpose()?;
    if let (Some(dir), Some(state)) = (&args.train.resume, &saved)
        && state.sft.is_none()
    {
        bail!("--resume {}: a pretraining checkpoint; resume it with `cargo xtask train`", dir.display())
    }
    let (data, source) = sft_source(&args, saved.as_ref())?;
    let examples = sft::read_jsonl(&data)?;
    eprintln!("data: {} — {} examples", data.display(), examples.len());
    let prepared = if let (Some(dir), Some(mut state)) = (&args.train.resume, saved) {
        let sft = state.sft.clone().expect("checked above");
        args.train.refuse_changes_on_resume(dir, &state)?;
        if sft.separator != args.separator || sft.overlong != args.overlong {
            bail!(
                "--resume {}: --separator {:?} and --overlong {:?} would change the run (its: {:?}, {:?})",
                dir.display(),
                args.separator,
                args.overlong,
                sft.separator,
                sft.overlong
            );
        }
        if args.parse_special_tokens && !sft.parse_special_tokens {
            bail!(
                "--parse-special-tokens: the run in {} encoded its examples without it; a resumed run keeps \
                 the saved encoding",
                dir.display()
            );
        }
        if let Some(steps) = args.train.steps {
            state.options.steps = steps;
        }
        let tokenizer = args.train.given_tokenizer()?.context("the checkpoint has no tokenizer.json")?;
        let vocab_size = args.train.config()?.vocab_size;
        let validation = state.validation.clone().unwrap_or(Validation {
            held_out: HeldOut::Fraction { fraction: state.options.val_fraction },
            eval_every: None,
        });
        let eval_every = args.train.eval_every.or(validation.eval_every);
        if validation.held_out == HeldOut::None && args.train.eval_every.is_some() {
            bail!(
                "--eval-every: this run holds no examples out (it started without --eval-every), and \
                 holding some out now would change what it trains on"
            );
        }
        Prepared {
            tokenizer,
            vocab_size,
            config: None,
            options: state.options,
            sft,
            examples,
            resume: Some(dir.clone()),
            model: None,
            source,
            validation: Validation { eval_every, ..validation },
            dtype: state.dtype.or(args.train.dtype.clone()).unwrap_or_else(|| "f32".into()),
        }
    } else {
        let Some(mut tokenizer) = args.train.given_tokenizer()? else {
            bail!(
                "sft needs a tokenizer: pass --tokenizer tokenizer.json, or fine-tune a checkpoint that has one \
                 (`cargo xtask train` saves it with the model)"
            )
        };
        let config = args.train.config()?;
        tokenizer.check_fits(config.vocab_size, "the model")?;
        let separator = tokenizer.add_special(&args.separator);
        let vocab_size = config.vocab_size.max(tokenizer.vocab_size());
        if vocab_size > config.vocab_size {
            eprintln!(
                "added {} (id {separator}) to the tokenizer; the vocabulary grows from {} to {vocab_size}",
                args.separator, config.vocab_size
            );
        }
        let options = sft_options(&args, &config)?;
        let sft = SftOptions {
            epochs: args.epochs,
            separator: args.separator.clone(),
            overlong: args.overlong,
            parse_special_tokens: args.parse_special_tokens,
        };
        if !args.train.val_data.is_empty() {
            bail!(
                "sft holds out part of --data for validation (--eval-every, --val-fraction); --val-data is for train"
            );
        }
        let validation = match args.train.eval_every {
            Some(0) => bail!("--eval-every must be at least 1"),
            Some(every) => Validation {
                held_out: HeldOut::Fraction { fraction: options.val_fraction },
                eval_every: Some(every),
            },
            None if args.train.val_fraction.is_some() => {
                bail!("--val-fraction needs --eval-every N (how often to evaluate)")
            }
            None => Validation { held_out: HeldOut::None, eval_every: None },
        };
        Prepared {
            tokenizer,
            vocab_size,
            config: Some(config),
            options,
            sft,
            examples,
            resume: None,
            model: args.train.model.clone(),
            source,
            validation,
            dtype: args.train.dtype.clone().unwrap_or_else(|| "f32".into()),
        }
    };
    let mut prepared = prepared;
    prepared.options.world_size = env.as_ref().map_or(1, |e| e.world_size);
    let device = env.as_ref().map(crate::launch::worker_device).transpose()?.unwrap_or(0);
    dsl::on_device_at(backend, device, Sft { args: &args, prepared, data, env })?
}

/// The options: Llama 2's SFT recipe under the flags given. The micro-batch split is settled
/// on the device (it depends on the buffer limit).
fn sft_options(args: &SftArgs, config: &LlamaConfig) -> Result<TrainOptions> {
    let options = args.train.options_over(sft_defaults(config.max_position_embeddings));
    if options.seq_len > config.max_position_embeddings {
        bail!(
            "--seq-len {} exceeds the model's context of {}",
            options.seq_len,
            config.max_position_embeddings
        );
    }
    if args.epochs == 0 {
        bail!("--epochs must be at least 1");
    }
    Ok(options)
}

struct Sft<'a> {
    args: &'a SftArgs,
    prepared: Prepared,
    data: PathBuf,
    /// This process's place in a data-parallel job, if any.
    env: Option<collectives::launch::DistEnv>,
}

impl OnDevice for Sft<'_> {
    type Output = Result<()>;
    fn run<R: BackendRuntime>(self, dev: &Device<R>) -> Result<()> {
        match &self.env {
            Some(env) => eprintln!("rank {} of {}: device {}", env.rank, env.world_size, dev.info()),
            None => eprintln!("device: {}", dev.info()),
        }
        // A resumed run keeps its TF32 setting (the prepared options are the saved ones).
        let kernel =
            crate::tune::KernelArgs { tf32: self.prepared.options.tf32, ..self.args.train.kernel.clone() };
        let (dev, line) = kernel.apply(dev)?;
        if self.env.as_ref().is_none_or(|e| e.rank == 0) {
            eprintln!("{line}");
        }
        match self.prepared.dtype.as_str() {
            "f16" => self.run_as::<R, half::f16>(&dev),
            "bf16" => self.run_as::<R, half::bf16>(&dev),
            _ => self.run_as::<R, f32>(&dev),
        }
    }
}

impl Sft<'_> {
    fn run_as<R: BackendRuntime, F: FloatElement>(self, dev: &Device<R>) -> Result<()> {
        let Prepared {
            tokenizer,
            vocab_size,
            config: prepared_config,
            mut options,
            sft,
            examples,
            resume,
            model,
            source,
            validation,
            dtype: _,
        } = self.prepared;
        let train_args = &self.args.train;
        let world = options.world_size;
        let main = self.env.as_ref().is_none_or(|e| e.rank == 0);
        if resume.is_none() {
            // 64 sequences per step over all ranks, through accumulation when a micro-batch
            // would not fit.
            let total = SFT_SEQUENCES_PER_STEP.div_ceil(world);
            (options.batch, options.grad_accum) = match (train_args.batch, train_args.grad_accum) {
                (Some(b), Some(k)) => (b, k),
                (Some(b), None) => (b, total.div_ceil(b)),
                (None, Some(k)) => (total.div_ceil(k), k),
                (None, None) => {
                    let config = prepared_config.as_ref().expect("a fresh run knows its model");
                    let largest = |micro| {
                        largest_buffer_bytes(config, vocab_size, options.head_chunk, micro, options.seq_len)
                    };
                    split_batch(total, largest, dev.info().max_buffer_bytes)
                }
            };
        }
        let ids = SpecialIds::of(&tokenizer, &sft.separator)?.parsing_special(sft.parse_special_tokens);
        // A row holds seq + 1 tokens (inputs and the shifted targets).
        let (encoded, report) = sft::encode(&tokenizer, ids, &examples, options.seq_len + 1, sft.overlong)?;
        let say = |line: String| {
            if main {
                eprintln!("{line}");
            }
        };
        say(format!(
            "encoded: {} examples kept ({} truncated, {} dropped as longer than {} tokens); {} tokens, {} of them answer tokens",
            report.kept,
            report.truncated,
            report.dropped,
            options.seq_len,
            report.tokens,
            report.answer_tokens
        ));
        // Examples are held out only when the run evaluates.
        let held = match validation.held_out {
            HeldOut::Fraction { fraction } => (encoded.len() as f64 * fraction) as usize,
            _ => 0,
        };
        let (train, val): (Vec<Encoded>, Vec<Encoded>) = {
            let mut train = encoded;
            let val = train.split_off(train.len() - held);
            (train, val)
        };
        let packing = Packing {
            batch: options.batch,
            seq: options.seq_len,
            seed: options.seed,
            shuffle: true,
            pad: ids.eos,
        };
        let mut counter = SftBatches::new(self.data.clone(), train.clone(), packing);
        // A step reads `grad_accum` micro-batches on each rank.
        let epoch_steps = counter.steps_for_epochs(sft.epochs, options.grad_accum * world);
        if resume.is_none() && train_args.steps.is_none() {
            options.steps = epoch_steps;
        }
        say(format!(
            "{} training examples, {} held out; {} epochs = {epoch_steps} steps",
            train.len(),
            val.len(),
            sft.epochs
        ));
        let data = SftData { path: self.data.clone(), train, val, pad: ids.eos, options: sft };
        let control = train_args.run_control("runs/sft", validation.eval_every);
        control.check_out()?;
        let parallel =
            self.env.as_ref().map(|env| crate::launch::join(dev, env, &train_args.dist)).transpose()?;
        let mut trainer = match (&resume, &model) {
            (Some(dir), _) => {
                let t = Trainer::<R, F>::resume_parallel(
                    dev,
                    dir,
                    TrainData::Sft(data),
                    train_args.steps,
                    train_args.recompute,
                    parallel,
                )?;
                say(format!("resuming {} at step {}", dir.display(), t.state.step));
                t
            }
            (None, Some(dir)) => {
                let checkpoint =
                    model::checkpoint::load(dir).with_context(|| format!("loading {}", dir.display()))?;
                let mut tensors = checkpoint.tensors;
                let config = model::init::grow_vocab(&checkpoint.config, &mut tensors, vocab_size);
                let params = Params::from_host(dev, &config, &tensors)?;
                let model = Llama::new(dev, config, params)?;
                let mut trainer = Trainer::new_parallel(dev, model, options, TrainData::Sft(data), parallel)?;
                // The master copy starts from the checkpoint's unrounded weights.
                if trainer.has_master_weights() {
                    trainer.set_weights(dev, &tensors)?;
                }
                trainer
            }
            (None, None) => unreachable!("checked before the device opened"),
        };
        trainer.tokenizer = Some(tokenizer.clone());
        if let Some(dtype) = train_args.save_dtype {
            trainer.save_dtype = dtype;
        }
        trainer.state.source = Some(source);
        trainer.state.validation = Some(validation);
        drive(dev, &mut trainer, &control)?;
        if !main {
            return Ok(());
        }
        // Show the fine-tuned model on a few held-out prompts.
        if held == 0 {
            eprintln!("(no examples were held out: pass --eval-every N to hold out --val-fraction of them)");
        }
        for example in examples[examples.len() - held.min(3)..].iter() {
            let prompt = ids.prompt_tokens(&tokenizer, &example.prompt)?;
            let sampling = Sampling { stop_at: Some(ids.eos), ..Sampling::GREEDY };
            let answer = generate(dev, &trainer.model, &prompt, 64, sampling, |_| {})?;
            println!(
                "held out: {:?} → {:?} (expected {:?})",
                example.prompt,
                tokenizer.decode(&answer, true)?,
                example.response
            );
        }
        Ok(())
    }
}

#[derive(clap::Args)]
pub struct SftDataArgs {
    /// Where the JSON Lines go.
    #[arg(long, default_value = "runs/reverse.jsonl")]
    out: PathBuf,
    /// Examples to write.
    #[arg(long, default_value_t = 4000)]
    examples: usize,
    /// Longest word.
    #[arg(long, default_value_t = 5)]
    max_len: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

/// Writes the built-in instruction task: reverse a random lowercase word.
pub fn data(args: SftDataArgs) -> Result<()> {
    if let Some(parent) = args.out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    let mut file = std::io::BufWriter::new(
        std::fs::File::create(&args.out).with_context(|| format!("creating {}", args.out.display()))?,
    );
    for example in sft::reversal_task(args.examples, args.max_len, args.seed) {
        writeln!(file, "{}", serde_json::to_string(&example)?)?;
    }
    file.flush()?;
    eprintln!(
        "wrote {} examples to {} (prompt: a word of 2–{} letters, response: the word reversed)",
        args.examples,
        args.out.display(),
        args.max_len
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Llama-2-7B at 4096 tokens under a 2 GiB buffer limit: with the chunked head the MLP's
    /// `[B·T, 11008]` f32 is the largest buffer (8 sequences: 1.34 GiB; 16 would be 2.7 GiB);
    /// with the logits whole, `[B·T, 32000]` is (4 sequences: 1.95 GiB).
    #[test]
    fn the_micro_batch_is_sized_by_the_largest_buffer() {
        let config = LlamaConfig::preset("llama2-7b").unwrap();
        let limit = 2u64 << 30;
        for (head, micro) in [(HeadChunk::Auto, 8), (HeadChunk::Full, 4)] {
            let largest = |m| largest_buffer_bytes(&config, 32000, head, m, 4096);
            assert_eq!(split_batch(SFT_SEQUENCES_PER_STEP, largest, limit), (micro, 64 / micro), "{head}");
        }
        // A tiny model fits all 64 sequences at once.
        let tiny = LlamaConfig::preset("tiny").unwrap();
        let largest = |m| largest_buffer_bytes(&tiny, 512, HeadChunk::Auto, m, 256);
        assert_eq!(split_batch(SFT_SEQUENCES_PER_STEP, largest, limit), (64, 1));
    }
}
