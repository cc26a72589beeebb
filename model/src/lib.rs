//! The Llama 2 model, wired from the project's kernels. It allocates, calls kernels in order
//! and reads and writes checkpoints; every number it computes comes from `kernels`.
//!
//! - [`LlamaConfig`]: Hugging Face's `config.json` fields, the presets (Llama 2 7B/13B/34B/70B,
//!   llama2.c's TinyStories sizes, `tiny`), parameter count and training memory.
//! - [`Params`]: the parameter tensors (and gradients) in checkpoint order, Hugging Face names.
//! - [`Activations`]: every buffer of a forward + backward at one (batch, seq) shape,
//!   allocated once.
//! - [`Llama`]: forward to logits, cross-entropy, backward into gradients; [`Llama::decode`]
//!   with a [`KvCache`] for generation.
//! - [`init`]: seeded fresh parameters (N(0, 0.02²) matrices, unit norms).
//! - [`checkpoint`]: Hugging Face layout, single file or sharded, f32/f16/bf16, atomic save.
//! - [`reference`]: the same model in f64 on the CPU, for tests.

pub mod activations;
pub mod checkpoint;
pub mod config;
pub mod decode;
pub mod error;
pub mod init;
pub mod llama;
pub mod params;
pub mod reference;

pub use activations::Activations;
pub use config::{LayerWeight, LlamaConfig, ParamSpec, RopeScaling};
pub use decode::KvCache;
pub use error::{ModelError, Result};
pub use kernels;
pub use llama::Llama;
pub use params::Params;

use checkpoint::{Checkpoint, SaveOptions};
use cubecl::Runtime;
use dsl::{Device, FloatElement};
use std::path::Path;

impl<R: Runtime, F: FloatElement> Llama<R, F> {
    /// Loads a Hugging Face checkpoint directory onto `device`, converting to `F`.
    pub fn load(device: &Device<R>, dir: &Path) -> Result<Self> {
        let Checkpoint { config, tensors, .. } = checkpoint::load(dir)?;
        let params = Params::from_host(device, &config, &tensors)?;
        Self::new(device, config, params)
    }

    /// Saves parameters and config to `dir` in the Hugging Face layout.
    pub fn save(&self, device: &Device<R>, dir: &Path, options: SaveOptions) -> Result<()> {
        checkpoint::save(dir, &self.config, &self.params.to_host(device)?, options)
    }
}
