//! `cargo xtask init`: a freshly initialised checkpoint; `cargo xtask config`: what a
//! configuration costs.

use anyhow::{Context, Result, bail};
use model::LlamaConfig;
use model::activations::{HeadChunk, Recompute};
use model::checkpoint::{self, SaveOptions, StoredDType};
use std::path::{Path, PathBuf};
use trainer::parallel::{Zero, sharded_memory};
use trainer::precision::MasterWeights;

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
    /// Sequences per micro-batch of the step to size (any of the step flags below prints that
    /// one step's memory instead of the summary) [default: 1].
    #[arg(long)]
    batch: Option<usize>,
    /// Tokens per sequence [default: the model's context].
    #[arg(long)]
    seq_len: Option<usize>,
    /// Compute type [default: f32].
    #[arg(long, value_parser = ["f32", "f16", "bf16"])]
    dtype: Option<String>,
    /// With f16/bf16: keep an f32 master copy of the weights (`f32`) or not (`none`)
    /// [default: f32].
    #[arg(long, value_name = "f32|none")]
    master_weights: Option<MasterWeights>,
    /// Rows of logits at a time, as `train --lm-head-chunk` [default: auto].
    #[arg(long, value_name = "auto|full|ROWS")]
    lm_head_chunk: Option<HeadChunk>,
    /// As `train --recompute` [default: none].
    #[arg(long, value_name = "none|layer")]
    recompute: Option<Recompute>,
    /// Data-parallel ranks (GPUs) of the job; with --zero 1 the optimizer state is divided
    /// among them [default: 1].
    #[arg(long, value_name = "N")]
    world: Option<usize>,
    /// As `train --zero`: 1 shards AdamW's moments and the f32 master weights over --world
    /// ranks (whole tensors: the most loaded rank is shown) [default: 0].
    #[arg(long, value_name = "0|1", value_parser = clap::value_parser!(u8).range(0..=1))]
    zero: Option<u8>,
    /// Print the step's memory as one JSON object (bytes; `per_gpu_bytes` is the total).
    #[arg(long)]
    json: bool,
}

impl ConfigArgs {
    fn sizes_a_step(&self) -> bool {
        self.batch.is_some()
            || self.seq_len.is_some()
            || self.dtype.is_some()
            || self.master_weights.is_some()
            || self.lm_head_chunk.is_some()
            || self.recompute.is_some()
            || self.world.is_some()
            || self.zero.is_some()
            || self.json
    }
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
    if !args.sizes_a_step() {
        print!("{config}");
        return Ok(());
    }
    let batch = args.batch.unwrap_or(1);
    let seq = args.seq_len.unwrap_or(config.max_position_embeddings);
    if batch == 0 || seq == 0 {
        bail!("--batch and --seq-len must be positive");
    }
    // The kernels index with 32 bits; this also keeps the byte sums far from overflowing.
    if batch.checked_mul(seq).is_none_or(|n| n > u32::MAX as usize) {
        bail!("--batch {batch} × --seq-len {seq} is more than 2^32 tokens per step");
    }
    if seq > config.max_position_embeddings {
        bail!(
            "--seq-len {seq} exceeds the model's context (max_position_embeddings {})",
            config.max_position_embeddings
        );
    }
    let dtype = args.dtype.as_deref().unwrap_or("f32");
    let bytes = if dtype == "f32" { 4 } else { 2 };
    let master = dtype != "f32" && args.master_weights.unwrap_or(MasterWeights::F32) == MasterWeights::F32;
    let head = args.lm_head_chunk.unwrap_or_default();
    let recompute = args.recompute.unwrap_or_default();
    let head_rows = head.rows(&config, batch * seq)?;
    let world = args.world.unwrap_or(1);
    if world == 0 {
        bail!("--world must be at least 1");
    }
    let zero = Zero::from_stage(args.zero.unwrap_or(0)).expect("clap keeps --zero to 0 or 1");
    let m = config.training_memory(batch, seq, bytes, master, head_rows, recompute);
    let m = sharded_memory(&config, m, world, zero);
    if args.json {
        let doc = serde_json::json!({
            "what": args.what,
            "parameters": config.parameter_count(),
            "batch": batch,
            "seq_len": seq,
            "dtype": dtype,
            "master_weights": master,
            "lm_head_chunk": head.to_string(),
            "head_rows": head_rows,
            "recompute": recompute.to_string(),
            "world": world,
            "zero": zero.stage(),
            "parameters_bytes": m.parameters,
            "master_bytes": m.master,
            "gradients_bytes": m.gradients,
            "optimizer_bytes": m.optimizer,
            "activations_bytes": m.activations,
            "per_gpu_bytes": m.total(),
        });
        println!("{doc}");
        return Ok(());
    }
    print!("{config}");
    let ranks = if world > 1 {
        format!(", on each of {world} ranks (--zero {})", zero.stage())
    } else {
        String::new()
    };
    println!(
        "this step: batch {batch} × {seq} tokens, {dtype}{}, logits {head_rows} rows at a time (--lm-head-chunk \
         {head}), --recompute {recompute}{ranks}: {}",
        if master { " with f32 master weights" } else { "" },
        m.describe(dtype)
    );
    Ok(())
}
