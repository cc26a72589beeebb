//! Training and fine-tuning loops. **Not built yet** (issues: "The trainer" and "Supervised
//! fine-tuning"); this crate is an empty placeholder so the workspace has its final shape.
//!
//! It will own: token data (llm.c and llama2.c shards, text with a tokenizer), sequential
//! batching, the cosine learning-rate schedule with warm-up, gradient accumulation and
//! clipping, the AdamW loop, evaluation, JSON-lines logging, resumable checkpoints, and the
//! SFT data path (prompt/answer packing with loss on answers only).

pub use model;
