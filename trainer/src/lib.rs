//! Loops over the model: training, evaluation, and the data they read.
//!
//! - [`data`]: token files (llm.c shards, llama2.c `.bin`, memory-mapped), text with its token
//!   cache, and the batches cut from them.
//! - [`source`]: `--data` globs, and the record of a run's files (size, content hash) that
//!   `--resume` checks.
//! - [`corpus`]: the built-in corpus of the default run (generated text, byte tokens).
//! - [`schedule`]: Llama 2's warm-up + cosine learning rate.
//! - [`optimizer`]: AdamW with weight-decay groups and global-norm clipping.
//! - [`parallel`]: data-parallel training over NCCL (or a test stand-in), with ZeRO-1.
//! - [`precision`]: the mixed-precision policy: f32 master weights, stochastic rounding, f16
//!   loss scaling.
//! - [`sft`]: supervised fine-tuning data: JSON Lines, encoding, packing with answer-only targets.
//! - [`tokenizer`]: `tokenizer.json` files, BPE training, the byte tokenizer.
//! - [`train`]: the training loop, checkpoints and bit-identical resume.
//! - [`eval`]: mean cross-entropy and perplexity of a model over a token file.
//! - [`generate`]: KV-cache generation, greedy or temperature + top-p.

pub mod corpus;
pub mod data;
pub mod error;
pub mod eval;
pub mod generate;
pub mod optimizer;
pub mod parallel;
pub mod precision;
pub mod schedule;
pub mod sft;
pub mod source;
pub mod tokenizer;
pub mod train;

pub use error::{Result, TrainError};
pub use model;
