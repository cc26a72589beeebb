//! KV-cache decoding: the cache write, prefill logits against the full forward, and greedy
//! generation against the argmax of a full forward over the same tokens.

use dsl::{BackendRuntime, Device, GpuTensor};
use kernels::kv_cache::kv_cache_write;
use model::{Activations, KvCache, Llama, LlamaConfig, Params};
use tests::models::{self, random_params, to_f32};
use tests::*;
use trainer::generate::{Sampling, argmax, generate};

fn cache_write<R: BackendRuntime>(dev: &Device<R>) {
    let (b, cap, h, hd, new, pos) = (2, 9, 3, 16, 4, 5);
    let mut rng = DataRng::new(1);
    let before = rng.normals(b * cap * h * hd, 0.0, 1.0);
    let fresh = rng.normals(b * new * h * hd, 0.0, 1.0);
    let mut cache = GpuTensor::<R, f32>::from_f64(dev, &before, &[b, cap, h, hd]).unwrap();
    let newt = GpuTensor::<R, f32>::from_f64(dev, &fresh, &[b, new, h, hd]).unwrap();
    let err = kv_cache_write(dev, &mut cache, &newt, 6).unwrap_err().to_string();
    assert!(err.contains("positions 6..10 do not fit a cache of 9"), "{err}");
    kv_cache_write(dev, &mut cache, &newt, pos).unwrap();
    let mut want: Vec<f64> = before.iter().map(|&v| v as f32 as f64).collect();
    let row = h * hd;
    for bi in 0..b {
        for t in 0..new {
            for i in 0..row {
                want[(bi * cap + pos + t) * row + i] = fresh[(bi * new + t) * row + i] as f32 as f64;
            }
        }
    }
    assert_close(
        "cache",
        &cache.to_f64_vec(dev).unwrap(),
        &want,
        &[b, cap, h, hd],
        Tolerance { atol: 0.0, rtol: 0.0 },
    );
}

#[test]
fn kv_cache_write_places_rows_and_keeps_the_rest() {
    on_test_backend!(cache_write);
}

fn config() -> LlamaConfig {
    models::tiny_config(61, 48, 64, 2, 4, 2, 16)
}

fn load<R: BackendRuntime>(dev: &Device<R>, config: &LlamaConfig) -> Llama<R, f32> {
    let host = to_f32(&random_params(config, 8));
    Llama::new(dev, config.clone(), Params::from_host(dev, config, &host).unwrap()).unwrap()
}

/// Full-forward logits of `tokens` (one sequence).
fn full_logits<R: BackendRuntime>(dev: &Device<R>, model: &Llama<R, f32>, tokens: &[u32]) -> Vec<f64> {
    let mut acts = Activations::<R, f32>::new(dev, &model.config, 1, tokens.len()).unwrap();
    let ids = model.token_ids(dev, tokens, 1, tokens.len()).unwrap();
    model.forward(dev, &mut acts, &ids).unwrap();
    acts.logits.to_f64_vec(dev).unwrap()
}

fn prefill_matches<R: BackendRuntime>(dev: &Device<R>) {
    let config = config();
    let model = load(dev, &config);
    let tokens: Vec<u32> = (0..11).map(|i| (i * 7 + 3) % 61).collect();
    let want = full_logits(dev, &model, &tokens);
    // Prompt of 7 in one pass, then 4 single tokens: every row equals the full forward's.
    let mut cache = KvCache::new(dev, &model, 1, 16).unwrap();
    let mut got = model
        .decode(dev, &mut cache, &model.token_ids(dev, &tokens[..7], 1, 7).unwrap())
        .unwrap()
        .to_f64_vec(dev)
        .unwrap();
    for &t in &tokens[7..] {
        got.extend(
            model
                .decode(dev, &mut cache, &model.token_ids(dev, &[t], 1, 1).unwrap())
                .unwrap()
                .to_f64_vec(dev)
                .unwrap(),
        );
    }
    let magnitude = normwise(&want);
    check_close_scaled(
        "decode logits",
        &got,
        &want,
        &magnitude,
        &[11, 61],
        Tolerance { atol: 1e-6, rtol: 2e-5 },
    )
    .unwrap();
    assert_eq!(cache.len, 11);
    let err = model
        .decode(dev, &mut cache, &model.token_ids(dev, &[1; 6], 1, 6).unwrap())
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("do not fit the cache"), "{err}");
}

#[test]
fn decoding_with_the_cache_gives_the_full_forward_logits() {
    on_test_backend!(prefill_matches);
}

fn greedy_is_argmax<R: BackendRuntime>(dev: &Device<R>) {
    let config = config();
    let model = load(dev, &config);
    let prompt = [5u32, 17, 2];
    let greedy = Sampling::GREEDY;
    let mut streamed = Vec::new();
    let out = generate(dev, &model, &prompt, 12, greedy, |t| streamed.push(t)).unwrap();
    assert_eq!(out.len(), 12);
    assert_eq!(streamed, out);
    let all: Vec<u32> = prompt.iter().chain(&out).copied().collect();
    let logits = full_logits(dev, &model, &all[..all.len() - 1]);
    for (k, &token) in out.iter().enumerate() {
        let row = prompt.len() - 1 + k;
        assert_eq!(argmax(&logits[row * 61..(row + 1) * 61]) as u32, token, "token {k}");
    }
    // A tiny nucleus is greedy whatever the temperature; a seed makes sampling repeatable.
    let narrow = Sampling { temperature: 1.0, top_p: 1e-9, seed: 3, stop_at: None };
    assert_eq!(generate(dev, &model, &prompt, 12, narrow, |_| {}).unwrap(), out);
    let warm = Sampling { temperature: 1.5, top_p: 0.9, seed: 11, stop_at: None };
    let a = generate(dev, &model, &prompt, 12, warm, |_| {}).unwrap();
    assert_eq!(a, generate(dev, &model, &prompt, 12, warm, |_| {}).unwrap());
    assert!(a.iter().all(|&t| (t as usize) < config.vocab_size));
}

#[test]
fn greedy_generation_is_the_argmax_of_a_full_forward() {
    on_test_backend!(greedy_is_argmax);
}
