//! Evaluation: the mean next-token cross-entropy of a model over a token stream.

use crate::data::TokenStream;
use crate::error::Result;
use cubecl::Runtime;
use dsl::{Device, FloatElement};
use model::activations::HeadChunk;
use model::{Activations, Llama};
use std::time::Instant;

/// What [`evaluate`] measured.
#[derive(Clone, Debug, serde::Serialize)]
pub struct EvalReport {
    /// Mean cross-entropy per target token, in nats.
    pub loss: f64,
    pub perplexity: f64,
    /// Target tokens scored.
    pub tokens: usize,
    pub batches: usize,
    pub batch: usize,
    pub seq_len: usize,
    pub seconds: f64,
    /// Throughput after the first batch (which compiles the kernels), or over the one batch.
    pub tokens_per_s: f64,
}

/// Scores `batches` (default: all whole ones) batches of `batch × seq` tokens; `progress`
/// hears `(batches done, batches in all, mean loss so far)` after each.
pub fn evaluate<R: Runtime, F: FloatElement>(
    device: &Device<R>,
    model: &Llama<R, F>,
    stream: &TokenStream,
    batch: usize,
    seq: usize,
    batches: Option<usize>,
    mut progress: impl FnMut(usize, usize, f64),
) -> Result<EvalReport> {
    let total = stream.plan(batch, seq, batches)?;
    // The logits a block of rows at a time: evaluation at Llama 2 scale holds no [B·T, V].
    let mut acts = Activations::<R, F>::with_head(device, &model.config, batch, seq, HeadChunk::Auto)?;
    let start = Instant::now();
    let mut after_first = None;
    let mut loss_sum = 0.0f64;
    for k in 0..total {
        let (inputs, targets) = stream.batch(k, batch, seq, model.config.vocab_size)?;
        let ids = model.token_ids(device, &inputs, batch, seq)?;
        let targets = model.targets(device, &targets)?;
        model.forward(device, &mut acts, &ids)?;
        model.loss(device, &mut acts, &targets, false)?;
        // Every target counts, so the mean of the batch means is the mean over tokens.
        loss_sum += model.read_loss(device, &acts)? as f64;
        progress(k + 1, total, loss_sum / (k + 1) as f64);
        if k == 0 {
            after_first = Some(Instant::now());
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    let tokens_per_batch = (batch * seq) as f64;
    let tokens_per_s = match after_first {
        Some(t) if total > 1 => tokens_per_batch * (total - 1) as f64 / t.elapsed().as_secs_f64().max(1e-9),
        _ => tokens_per_batch / seconds.max(1e-9),
    };
    let loss = loss_sum / total as f64;
    let tokens = total * batch * seq;
    Ok(EvalReport {
        loss,
        perplexity: loss.exp(),
        tokens,
        batches: total,
        batch,
        seq_len: seq,
        seconds,
        tokens_per_s,
    })
}
