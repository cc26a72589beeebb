//! Text generation with a KV cache: the prompt in one pass, then one token per step through
//! the attention decode path; greedy at temperature 0, else temperature + nucleus (top-p)
//! sampling from a seeded generator. The sequence stops at the model's context
//! (`max_position_embeddings` positions in all); there is no sliding window.

use crate::error::{Result, TrainError};
use cubecl::Runtime;
use dsl::{Device, FloatElement};
use model::init::SplitMix64;
use model::{KvCache, Llama};

/// How to pick each next token.
#[derive(Clone, Copy, Debug)]
pub struct Sampling {
    /// 0 picks the most likely token (greedy).
    pub temperature: f64,
    /// Sample only from the smallest set of tokens whose probability reaches `top_p`.
    pub top_p: f64,
    pub seed: u64,
    /// Generation ends when this token (an end-of-sequence) is chosen; it is not returned.
    pub stop_at: Option<u32>,
}

impl Sampling {
    /// The most likely token each time, no stop token.
    pub const GREEDY: Self = Self { temperature: 0.0, top_p: 1.0, seed: 0, stop_at: None };
}

/// The index of the largest logit (the first one on ties).
pub fn argmax(logits: &[f64]) -> usize {
    logits
        .iter()
        .enumerate()
        .fold((0, f64::NEG_INFINITY), |best, (i, &v)| if v > best.1 { (i, v) } else { best })
        .0
}

fn sample(logits: &[f64], s: &Sampling, rng: &mut SplitMix64) -> usize {
    if s.temperature <= 0.0 {
        return argmax(logits);
    }
    let max = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let mut probs: Vec<(usize, f64)> =
        logits.iter().enumerate().map(|(i, &l)| (i, ((l - max) / s.temperature).exp())).collect();
    let total: f64 = probs.iter().map(|p| p.1).sum();
    probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut kept = 0.0;
    let mut cut = probs.len();
    for (k, p) in probs.iter().enumerate() {
        kept += p.1 / total;
        if kept >= s.top_p {
            cut = k + 1;
            break;
        }
    }
    let nucleus = &probs[..cut];
    let mass: f64 = nucleus.iter().map(|p| p.1).sum();
    let mut target = rng.uniform() * mass;
    for &(i, p) in nucleus {
        target -= p;
        if target <= 0.0 {
            return i;
        }
    }
    nucleus[nucleus.len() - 1].0
}

/// Why generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    /// `max_new` tokens were generated.
    MaxNewTokens,
    /// The stop token was chosen (it is not among the tokens).
    StopToken,
    /// Prompt and tokens fill the model's context (`max_position_embeddings` positions); the
    /// model has no position for another token.
    ContextLimit,
}

/// What [`generate_until`] produced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Generation {
    pub tokens: Vec<u32>,
    pub stop: Stop,
}

/// Continues `prompt` by up to `max_new` tokens (fewer if the stop token comes or the context
/// fills), calling `on_token` with each as soon as it is chosen; returns the new tokens. See
/// [`generate_until`].
pub fn generate<R: Runtime, F: FloatElement>(
    device: &Device<R>,
    model: &Llama<R, F>,
    prompt: &[u32],
    max_new: usize,
    sampling: Sampling,
    on_token: impl FnMut(u32),
) -> Result<Vec<u32>> {
    Ok(generate_until(device, model, prompt, max_new, sampling, on_token)?.tokens)
}

/// [`generate`], also saying why it stopped.
///
/// The sequence (prompt + new tokens) never exceeds the model's context, `C =
/// max_position_embeddings` positions, as with transformers' `max_length`: a prompt of `P`
/// tokens gets at most `C − P` new ones (the last new token is predicted at position `C − 1`
/// and never itself computed), then [`Stop::ContextLimit`]. Errors: an empty prompt, or one of
/// `C` tokens or more (naming both lengths).
pub fn generate_until<R: Runtime, F: FloatElement>(
    device: &Device<R>,
    model: &Llama<R, F>,
    prompt: &[u32],
    max_new: usize,
    sampling: Sampling,
    mut on_token: impl FnMut(u32),
) -> Result<Generation> {
    if prompt.is_empty() {
        return Err(TrainError::Options("the prompt is empty".into()));
    }
    let context = model.config.max_position_embeddings;
    if prompt.len() >= context {
        return Err(TrainError::PromptFillsContext { tokens: prompt.len(), context });
    }
    // Room for the sequence's positions; the last generated token is never run through the
    // model, so the cache holds one position fewer than the longest sequence.
    let longest = (prompt.len() + max_new).min(context);
    let mut cache = KvCache::new(device, model, 1, longest.saturating_sub(1).max(prompt.len()))?;
    let vocab = model.config.vocab_size;
    let mut rng = SplitMix64(sampling.seed);
    let mut tokens = Vec::with_capacity(max_new);
    let ids = model.token_ids(device, prompt, 1, prompt.len())?;
    let mut logits = model.decode(device, &mut cache, &ids)?.to_f64_vec(device)?;
    let mut last_row = prompt.len() - 1;
    let stop = loop {
        if tokens.len() == max_new {
            break Stop::MaxNewTokens;
        }
        if prompt.len() + tokens.len() == context {
            break Stop::ContextLimit;
        }
        let next = sample(&logits[last_row * vocab..(last_row + 1) * vocab], &sampling, &mut rng) as u32;
        if sampling.stop_at == Some(next) {
            break Stop::StopToken;
        }
        tokens.push(next);
        on_token(next);
        if tokens.len() == max_new || prompt.len() + tokens.len() == context {
            continue;
        }
        let ids = model.token_ids(device, &[next], 1, 1)?;
        logits = model.decode(device, &mut cache, &ids)?.to_f64_vec(device)?;
        last_row = 0;
    };
    Ok(Generation { tokens, stop })
}
