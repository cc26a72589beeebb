//! Tiny model configurations and seeded parameters for the model tests.

use crate::data::DataRng;
use model::LlamaConfig;

/// A config small enough for the f64 reference: `heads` query heads sharing `kv_heads`
/// key/value heads of width `head_dim`.
pub fn tiny_config(
    vocab: usize,
    hidden: usize,
    inter: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
) -> LlamaConfig {
    let mut config = LlamaConfig::new(vocab, hidden, inter, layers, heads, kv_heads, 64);
    config.head_dim = head_dim;
    config
}

/// Parameters as an initialised model would have them, in `config.parameters()` order:
/// embeddings N(0, 1), projections N(0, 1/in), norm weights 1 + N(0, 0.1²).
pub fn random_params(config: &LlamaConfig, seed: u64) -> Vec<Vec<f64>> {
    let mut rng = DataRng::new(seed);
    config
        .parameters()
        .iter()
        .map(|spec| match spec.shape.as_slice() {
            [_] => rng.normals(spec.numel(), 1.0, 0.1),
            [_, _] if spec.name.contains("embed_tokens") => rng.normals(spec.numel(), 0.0, 1.0),
            [_, cols] => rng.normals(spec.numel(), 0.0, 1.0 / (*cols as f64).sqrt()),
            other => panic!("unexpected parameter shape {other:?}"),
        })
        .collect()
}

/// Token ids and next-token targets for `batch × seq` positions; every `ignore_every`-th
/// target (if any) is the ignore index.
pub fn random_tokens(vocab: usize, n: usize, ignore_every: Option<usize>, seed: u64) -> (Vec<u32>, Vec<i32>) {
    let mut rng = DataRng::new(seed ^ 0xA5A5);
    let ids = (0..n).map(|_| (rng.next_u64() % vocab as u64) as u32).collect();
    let targets = (0..n)
        .map(|i| match ignore_every {
            Some(k) if i % k == k - 1 => kernels::cross_entropy::IGNORE_INDEX,
            _ => (rng.next_u64() % vocab as u64) as i32,
        })
        .collect();
    (ids, targets)
}

/// f64 parameters as the f32 a checkpoint or upload holds.
pub fn to_f32(params: &[Vec<f64>]) -> Vec<Vec<f32>> {
    params.iter().map(|p| p.iter().map(|&v| v as f32).collect()).collect()
}

/// f32 values widened back (what the device actually holds, for the reference).
pub fn to_f64(params: &[Vec<f32>]) -> Vec<Vec<f64>> {
    params.iter().map(|p| p.iter().map(|&v| v as f64).collect()).collect()
}
