//! `cargo xtask generate`: continue a prompt with a checkpoint, streaming tokens as they come.

use crate::BackendArg;
use anyhow::{Context, Result, bail};
use dsl::{BackendRuntime, Device, FloatElement, OnDevice};
use model::Llama;
use std::io::Write;
use std::path::PathBuf;
use trainer::generate::{Sampling, Stop, generate_until};
use trainer::sft::{DEFAULT_SEPARATOR, SpecialIds};
use trainer::tokenizer::{TOKENIZER_FILE, TextTokenizer};

#[derive(clap::Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    backend: BackendArg,
    #[command(flatten)]
    kernel: crate::tune::KernelArgs,
    /// Checkpoint directory (Hugging Face layout).
    #[arg(long)]
    model: PathBuf,
    /// Prompt text, encoded by the tokenizer (with its `<s>`); special-token text in it is
    /// plain text unless --parse-special-tokens.
    #[arg(long, conflicts_with = "prompt_ids")]
    prompt: Option<String>,
    /// The prompt as comma-separated token ids instead (output is printed as ids too).
    #[arg(long, value_delimiter = ',')]
    prompt_ids: Vec<u32>,
    /// A Hugging Face tokenizer.json (default: the model directory's).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Answer the prompt as an SFT model: `<s> prompt SEPARATOR`, stopping at `</s>`.
    #[arg(long)]
    answer: bool,
    /// The separator of --answer.
    #[arg(long, default_value = DEFAULT_SEPARATOR)]
    separator: String,
    /// Read special-token text typed in the prompt (`</s>`, the separator) as those tokens. By
    /// default it is ordinary text, as in Llama 2: only `<s>` (and with --answer the
    /// separator) are added, by the format.
    #[arg(long)]
    parse_special_tokens: bool,
    /// At most this many tokens; generation also stops, with a message, when prompt and
    /// output fill the model's context (max_position_embeddings).
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
        // Quietly: generated text goes to standard output, and the choice changes no token
        // beyond TF32's rounding.
        let (dev, _) = self.args.kernel.apply(dev)?;
        match self.args.dtype.as_str() {
            "f16" => self.run_as::<R, half::f16>(&dev),
            "bf16" => self.run_as::<R, half::bf16>(&dev),
            _ => self.run_as::<R, f32>(&dev),
        }
    }
}

impl Generate<'_> {
    fn run_as<R: BackendRuntime, F: FloatElement>(&self, dev: &Device<R>) -> Result<()> {
        let args = self.args;
        let model = Llama::<R, F>::load(dev, &args.model)
            .with_context(|| format!("loading {}", args.model.display()))?;
        let tokenizer_path = args.tokenizer.clone().unwrap_or_else(|| args.model.join(TOKENIZER_FILE));
        let tokenizer = if tokenizer_path.exists() || args.tokenizer.is_some() {
            let tokenizer = TextTokenizer::load(&tokenizer_path)?;
            tokenizer
                .check_fits(model.config.vocab_size, &format!("the model in {}", args.model.display()))?;
            Some(tokenizer)
        } else {
            None
        };
        let mut sampling =
            Sampling { temperature: args.temperature, top_p: args.top_p, seed: args.seed, stop_at: None };
        let prompt = match (&args.prompt, &tokenizer) {
            (Some(text), Some(tokenizer)) if args.answer => {
                let ids =
                    SpecialIds::of(tokenizer, &args.separator)?.parsing_special(args.parse_special_tokens);
                sampling.stop_at = Some(ids.eos);
                ids.prompt_tokens(tokenizer, text)?
            }
            (Some(text), Some(tokenizer)) => tokenizer.encode_text(text, true, args.parse_special_tokens)?,
            (Some(_), None) => bail!(
                "no tokenizer for --prompt: {} has no {TOKENIZER_FILE}; pass --tokenizer FILE or --prompt-ids 1,2,3",
                args.model.display()
            ),
            (None, _) if !args.prompt_ids.is_empty() => args.prompt_ids.clone(),
            (None, _) => bail!("give --prompt TEXT or --prompt-ids 1,2,3"),
        };
        let mut stdout = std::io::stdout();
        let mut decoder = tokenizer.as_ref().filter(|_| args.prompt.is_some()).map(|t| t.stream_decoder());
        if decoder.is_some() && !args.answer {
            print!("{}", args.prompt.as_deref().unwrap_or_default());
        }
        let mut failure = None;
        let generation = generate_until(dev, &model, &prompt, args.max_new_tokens, sampling, |token| {
            match decoder.as_mut() {
                Some(decoder) => match decoder.push(token) {
                    Ok(text) => print!("{text}"),
                    Err(e) => failure = Some(e),
                },
                None => print!("{token} "),
            }
            let _ = stdout.flush();
        })?;
        println!();
        if let Some(e) = failure {
            return Err(e.into());
        }
        if generation.stop == Stop::ContextLimit {
            eprintln!(
                "generation stopped at the context limit: {} prompt + {} new tokens = {} positions, the model's \
                 max_position_embeddings",
                prompt.len(),
                generation.tokens.len(),
                model.config.max_position_embeddings
            );
        }
        Ok(())
    }
}
