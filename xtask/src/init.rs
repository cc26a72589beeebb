//! `cargo xtask init`: a freshly initialised checkpoint; `cargo xtask config`: what a
//! configuration costs.

use anyhow::{Context, Result};
use model::LlamaConfig;
use model::checkpoint::{self, SaveOptions, StoredDType};
use std::path::{Path, PathBuf};

#[derive(clap::Args)]
pub struct InitArgs {
    /// Size preset: llama2-7b, llama2-13b, llama2-34b, llama2-70b, stories260k, stories15m,
    /// stories42m, stories110m, tiny.
    #[arg(long, default_value = "tiny", conflicts_with = "config")]
    preset: String,
    /// A config.json to take the shape from instead of a preset.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Output directory (Hugging Face layout; replaced whole if it exists).
    #[arg(long)]
    out: PathBuf,
    /// Seed of the N(0, 0.02²) initialisation.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Storage type of the tensors: f32, f16 or bf16.
    #[arg(long, default_value = "f32")]
    dtype: StoredDType,
}

#[derive(clap::Args)]
pub struct ConfigArgs {
    /// A preset name, a checkpoint directory or a config.json.
    what: String,
}

fn config_from(preset: &str, file: Option<&Path>) -> Result<LlamaConfig> {
    Ok(match file {
        Some(path) if path.is_dir() => LlamaConfig::load(&path.join(checkpoint::CONFIG_FILE))?,
        Some(path) => LlamaConfig::load(path)?,
        None => LlamaConfig::preset(preset)?,
    })
}

pub fn init(args: InitArgs) -> Result<()> {
    let config = config_from(&args.preset, args.config.as_deref())?;
    eprint!("{config}");
    let params = model::init::initial_params(&config, args.seed);
    checkpoint::save(
        &args.out,
        &config,
        &params,
        SaveOptions { dtype: args.dtype, ..SaveOptions::default() },
    )
    .with_context(|| format!("writing {}", args.out.display()))?;
    eprintln!("wrote {} (seed {}, {})", args.out.display(), args.seed, args.dtype.torch_name());
    Ok(())
}

pub fn show(args: ConfigArgs) -> Result<()> {
    let path = Path::new(&args.what);
    let config = if path.exists() { config_from("", Some(path))? } else { config_from(&args.what, None)? };
    print!("{config}");
    Ok(())
}
