//! `cargo xtask eval`: mean cross-entropy and perplexity of a checkpoint over a token file.

use crate::BackendArg;
use anyhow::{Context, Result, bail};
use dsl::{BackendRuntime, Device, FloatElement, OnDevice};
use indicatif::{ProgressBar, ProgressStyle};
use model::Llama;
use std::path::PathBuf;
use trainer::data::{TokenFormat, TokenStream};
use trainer::eval::{EvalReport, evaluate};

#[derive(clap::Args)]
pub struct EvalArgs {
    #[command(flatten)]
    backend: BackendArg,
    #[command(flatten)]
    kernel: crate::tune::KernelArgs,
    /// Checkpoint directory in the Hugging Face layout (config.json + safetensors).
    #[arg(long)]
    model: PathBuf,
    /// Token files: llm.c shards (uint16 or uint32) or llama2.c headerless uint16 .bin, or glob
    /// patterns; several are one stream, their concatenation in sorted path order.
    #[arg(long, num_args = 1.., required = true, value_name = "FILE|GLOB")]
    data: Vec<PathBuf>,
    /// How to read --data: auto (llm.c if the file starts with its magic, else llama2.c),
    /// llmc or llama2c.
    #[arg(long, default_value = "auto", value_parser = parse_format)]
    data_format: TokenFormat,
    /// Sequences per batch.
    #[arg(long, default_value_t = 4)]
    batch: usize,
    /// Tokens per sequence (at most the model's max_position_embeddings).
    #[arg(long, default_value_t = 256)]
    seq_len: usize,
    /// Batches to score from the start of the file (default: every whole batch).
    #[arg(long)]
    batches: Option<usize>,
    /// Compute type: f32 (default) or f16 (bf16 needs the cuda backend).
    #[arg(long, default_value = "f32", value_parser = ["f32", "f16", "bf16"])]
    dtype: String,
    /// Print the result as one JSON object on the last line of standard output.
    #[arg(long)]
    json: bool,
}

fn parse_format(s: &str) -> Result<TokenFormat, String> {
    s.parse()
}

#[derive(serde::Serialize)]
struct JsonReport<'a> {
    #[serde(flatten)]
    report: &'a EvalReport,
    model: String,
    data: String,
    data_format: String,
    backend: String,
    dtype: String,
}

pub fn run(args: EvalArgs) -> Result<()> {
    let Some(backend) = args.backend.resolve_or_reexec()? else { return Ok(()) };
    if args.batch == 0 || args.seq_len == 0 {
        bail!("--batch and --seq-len must be positive");
    }
    let files = trainer::source::expand(&args.data)?;
    let stream = TokenStream::open_many(&files, args.data_format)?;
    eprintln!(
        "data: {} file(s) from {} — {}, {} tokens",
        files.len(),
        stream.path.display(),
        stream.format,
        stream.len()
    );
    let report = dsl::on_device(backend, Eval { args: &args, stream: &stream })??;
    eprintln!(
        "loss {:.4}  perplexity {:.3}  over {} tokens ({} batches of {} × {}) in {:.1} s: {:.0} tokens/s",
        report.loss,
        report.perplexity,
        report.tokens,
        report.batches,
        report.batch,
        report.seq_len,
        report.seconds,
        report.tokens_per_s
    );
    if args.json {
        let json = JsonReport {
            report: &report,
            model: args.model.display().to_string(),
            data: files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>().join(" "),
            data_format: stream.format.to_string(),
            backend: backend.to_string(),
            dtype: args.dtype.clone(),
        };
        println!("{}", serde_json::to_string(&json)?);
    } else {
        println!("loss {:.6}\nperplexity {:.4}\ntokens {}", report.loss, report.perplexity, report.tokens);
    }
    Ok(())
}

struct Eval<'a> {
    args: &'a EvalArgs,
    stream: &'a TokenStream,
}

impl Eval<'_> {
    fn run_as<R: BackendRuntime, F: FloatElement>(&self, dev: &Device<R>) -> Result<EvalReport> {
        let args = self.args;
        let model = Llama::<R, F>::load(dev, &args.model)
            .with_context(|| format!("loading the checkpoint {}", args.model.display()))?;
        eprint!("model: {}\n{}", args.model.display(), model.config);
        let total = self.stream.plan(args.batch, args.seq_len, args.batches)?;
        let bar = ProgressBar::new(total as u64).with_style(
            ProgressStyle::with_template(
                "eval {bar:30} {pos}/{len} batches  loss {msg}  [{elapsed} < {eta}]",
            )
            .expect("valid template"),
        );
        let report =
            evaluate(dev, &model, self.stream, args.batch, args.seq_len, Some(total), |done, _, loss| {
                bar.set_message(format!("{loss:.4}"));
                bar.set_position(done as u64);
            })?;
        bar.finish_and_clear();
        Ok(report)
    }
}

impl OnDevice for Eval<'_> {
    type Output = Result<EvalReport>;
    fn run<R: BackendRuntime>(self, dev: &Device<R>) -> Result<EvalReport> {
        eprintln!("device: {}", dev.info());
        let (dev, line) = self.args.kernel.apply(dev)?;
        eprintln!("{line}");
        match self.args.dtype.as_str() {
            "f16" => self.run_as::<R, half::f16>(&dev),
            "bf16" => self.run_as::<R, half::bf16>(&dev),
            _ => self.run_as::<R, f32>(&dev),
        }
    }
}
