//! The Llama2 model, wired from the project's kernels. **Not built yet** (issue: "The Llama2
//! model on the project's kernels"); this crate is an empty placeholder so the workspace has
//! its final shape.
//!
//! It will own: the Hugging Face `LlamaConfig` (config.json) and the size presets; parameter
//! and activation buffers allocated once per (batch, sequence) shape; the forward pass
//! (embedding → [RMSNorm → attention with RoPE and GQA → residual → RMSNorm → SwiGLU MLP →
//! residual] × layers → RMSNorm → lm_head → cross-entropy) and its backward; and checkpoint
//! I/O in the Hugging Face layout (config.json + safetensors, written to a temporary name and
//! renamed). It holds no numerics of its own: every operator comes from `kernels`.

pub use kernels;
