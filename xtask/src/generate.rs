//! `cargo xtask generate`: continue a prompt with a checkpoint, streaming tokens as they come.

use crate::BackendArg;
use anyhow::{Context, Result, bail};
use dsl::{BackendRuntime, Device, FloatElement, OnDevice};
use model::Llama;
use std::io::Write;
use std::path::PathBuf;
use trainer::corpus;
use trainer::generate::{Sampling, generate};

#[derive(clap::Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    backend: BackendArg,
    /// Checkpoint directory (Hugging Face layout).
    #[arg(long)]
    model: PathBuf,
    /// Prompt text. Without --tokenizer it is read as UTF-8 bytes (token ids 0–255: the
    /// byte-level models `cargo xtask train` makes on the built-in corpus).
    #[arg(long, conflicts_with = "prompt_ids")]
    prompt: Option<String>,
    /// The prompt as comma-separated token ids instead (output is printed as ids too).
    #[arg(long, value_delimiter = ',')]
    prompt_ids: Vec<u32>,
    /// A Hugging Face tokenizer.json (not supported yet).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    #[arg(long, default_value_t = 200)]
    max_new_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.8)]
    temperature: f64,
    #[arg(long, default_value_t = 0.95)]
    top_p: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value = "f32", value_parser = ["f32", "f16", "bf16"])]
    dtype: String,
}

pub fn run(args: GenerateArgs) -> Result<()> {
    let Some(backend) = args.backend.resolve_or_reexec()? else { return Ok(()) };
    if let Some(path) = &args.tokenizer {
        bail!(
            "--tokenizer {}: tokenizer.json support is not written yet; pass --prompt-ids, or --prompt for a byte-level model",
            path.display()
        );
    }
    if !(0.0..=1.0).contains(&args.top_p) || args.top_p == 0.0 || args.temperature < 0.0 {
        bail!("need 0 < --top-p ≤ 1 and --temperature ≥ 0");
    }
    dsl::on_device(backend, Generate { args: &args })?
}

struct Generate<'a> {
    args: &'a GenerateArgs,
}

impl OnDevice for Generate<'_> {
    type Output = Result<()>;
    fn run<R: BackendRuntime>(self, dev: &Device<R>) -> Result<()> {
        match self.args.dtype.as_str() {
            "f16" => self.run_as::<R, half::f16>(dev),
            "bf16" => self.run_as::<R, half::bf16>(dev),
            _ => self.run_as::<R, f32>(dev),
        }
    }
}

impl Generate<'_> {
    fn run_as<R: BackendRuntime, F: FloatElement>(&self, dev: &Device<R>) -> Result<()> {
        let args = self.args;
        let model = Llama::<R, F>::load(dev, &args.model)
            .with_context(|| format!("loading {}", args.model.display()))?;
        let as_bytes = args.prompt_ids.is_empty();
        let prompt = match &args.prompt {
            Some(text) => corpus::byte_tokens(text),
            None if !as_bytes => args.prompt_ids.clone(),
            None => bail!("give --prompt TEXT or --prompt-ids 1,2,3"),
        };
        if as_bytes && model.config.vocab_size < 256 {
            bail!(
                "a byte-level prompt needs a vocabulary of at least 256 (this model has {})",
                model.config.vocab_size
            );
        }
        let sampling = Sampling { temperature: args.temperature, top_p: args.top_p, seed: args.seed };
        let mut stdout = std::io::stdout();
        if as_bytes {
            print!("{}", args.prompt.as_deref().unwrap_or_default());
        }
        // Bytes of a multi-byte character arrive one by one: print whole characters only.
        let mut pending: Vec<u8> = Vec::new();
        generate(dev, &model, &prompt, args.max_new_tokens, sampling, |token| {
            if as_bytes {
                pending.push(u8::try_from(token).unwrap_or(b'?'));
                if let Ok(text) = std::str::from_utf8(&pending) {
                    print!("{text}");
                    pending.clear();
                } else if pending.len() >= 4 {
                    print!("{}", String::from_utf8_lossy(&pending));
                    pending.clear();
                }
            } else {
                print!("{token} ");
            }
            let _ = stdout.flush();
        })?;
        println!();
        Ok(())
    }
}
