//! KV-cache decoding: the cache write, prefill logits against the full forward, greedy
//! generation against the argmax of a full forward over the same tokens, the stop at the
//! context length, and linear RoPE scaling through forward and decode.

use dsl::{BackendRuntime, Device, GpuTensor};
use kernels::kv_cache::kv_cache_write;
use kernels::rope::rope_cos_sin;
use model::reference::loss_and_grads;
use model::{Activations, KvCache, Llama, LlamaConfig, Params, RopeScaling};
use tests::models::{self, random_params, to_f32, to_f64};
use tests::*;
use trainer::TrainError;
use trainer::generate::{Sampling, Stop, argmax, generate, generate_until};

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

/// Logits of `tokens` decoded through a KV cache: the first `prompt` in one pass, then one
/// token at a time; one row of V per position, and the cache (16 positions) they filled.
fn decode_logits<R: BackendRuntime>(
    dev: &Device<R>,
    model: &Llama<R, f32>,
    tokens: &[u32],
    prompt: usize,
) -> (Vec<f64>, KvCache<R, f32>) {
    let mut cache = KvCache::new(dev, model, 1, 16).unwrap();
    let mut got = model
        .decode(dev, &mut cache, &model.token_ids(dev, &tokens[..prompt], 1, prompt).unwrap())
        .unwrap()
        .to_f64_vec(dev)
        .unwrap();
    for &t in &tokens[prompt..] {
        got.extend(
            model
                .decode(dev, &mut cache, &model.token_ids(dev, &[t], 1, 1).unwrap())
                .unwrap()
                .to_f64_vec(dev)
                .unwrap(),
        );
    }
    (got, cache)
}

fn prefill_matches<R: BackendRuntime>(dev: &Device<R>) {
    let config = config();
    let model = load(dev, &config);
    let tokens: Vec<u32> = (0..11).map(|i| (i * 7 + 3) % 61).collect();
    let want = full_logits(dev, &model, &tokens);
    // Prompt of 7 in one pass, then 4 single tokens: every row equals the full forward's.
    let (got, mut cache) = decode_logits(dev, &model, &tokens, 7);
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

/// The case: a 255-token prompt on a model with context 256 gets exactly one new
/// token (256 positions), and the reason; shorter prompts stop when prompt + output reach the
/// context; a prompt that fills it is refused naming both lengths. The tokens are the argmax of
/// a full forward over the whole sequence (nothing computed past the context).
fn stops_at_context<R: BackendRuntime>(dev: &Device<R>) {
    let mut config = config();
    config.max_position_embeddings = 256;
    let model = load(dev, &config);
    let prompt: Vec<u32> = (0..255).map(|i| (i * 13 + 1) % 61).collect();
    let out = generate_until(dev, &model, &prompt, 10, Sampling::GREEDY, |_| {}).unwrap();
    assert_eq!((out.tokens.len(), out.stop), (1, Stop::ContextLimit));
    let logits = full_logits(dev, &model, &prompt);
    assert_eq!(out.tokens[0], argmax(&logits[254 * 61..255 * 61]) as u32);

    config.max_position_embeddings = 16;
    let model = load(dev, &config);
    let prompt: Vec<u32> = (0..13).map(|i| (i * 7 + 3) % 61).collect();
    let out = generate_until(dev, &model, &prompt, 10, Sampling::GREEDY, |_| {}).unwrap();
    assert_eq!((out.tokens.len(), out.stop), (3, Stop::ContextLimit), "13 + 3 = 16 positions");
    let all: Vec<u32> = prompt.iter().chain(&out.tokens).copied().collect();
    let logits = full_logits(dev, &model, &all[..15]);
    for (k, &token) in out.tokens.iter().enumerate() {
        let row = 12 + k;
        assert_eq!(argmax(&logits[row * 61..(row + 1) * 61]) as u32, token, "token {k}");
    }
    // Asking for exactly the room left, or less, is a normal stop.
    let exact = generate_until(dev, &model, &prompt, 3, Sampling::GREEDY, |_| {}).unwrap();
    assert_eq!((exact.tokens, exact.stop), (out.tokens.clone(), Stop::MaxNewTokens));
    let first = Sampling { stop_at: Some(out.tokens[0]), ..Sampling::GREEDY };
    let stopped = generate_until(dev, &model, &prompt, 3, first, |_| {}).unwrap();
    assert_eq!((stopped.tokens.len(), stopped.stop), (0, Stop::StopToken));
    for len in [16, 17] {
        let err = generate(dev, &model, &vec![1; len], 5, Sampling::GREEDY, |_| {}).unwrap_err();
        assert!(
            matches!(err, TrainError::PromptFillsContext { tokens, context: 16 } if tokens == len),
            "{err}"
        );
        let err = err.to_string();
        assert!(
            err.contains(&format!("the prompt has {len} tokens"))
                && err.contains("context (max_position_embeddings) is 16"),
            "{err}"
        );
    }
}

#[test]
fn generation_stops_at_the_context_length() {
    on_test_backend!(stops_at_context);
}

/// Linear RoPE scaling reaches every path through the one table the model builds: its values
/// are the scaled table's, the forward (training, evaluation) matches the f64 reference model
/// with positions divided by the factor, decoding with the cache matches that forward, and the
/// logits differ from the unscaled model's (the factor is not ignored).
fn linear_scaling_everywhere<R: BackendRuntime>(dev: &Device<R>) {
    let plain = config();
    let mut scaled = plain.clone();
    scaled.rope_scaling = Some(RopeScaling::Linear { factor: 2.0 });
    let model = load(dev, &scaled);
    let rope = model.rope();
    assert_eq!(rope.position_divisor, 2.0);
    let (cos, sin) =
        rope_cos_sin(scaled.head_dim, scaled.max_position_embeddings, scaled.rope_theta, 2.0).unwrap();
    assert_eq!((rope.cos.to_vec(dev).unwrap(), rope.sin.to_vec(dev).unwrap()), (cos, sin));

    let tokens: Vec<u32> = (0..11).map(|i| (i * 7 + 3) % 61).collect();
    let logits = full_logits(dev, &model, &tokens);
    let host = to_f64(&to_f32(&random_params(&scaled, 8)));
    let targets = vec![0i32; tokens.len()];
    let want = loss_and_grads(&scaled, &host, &tokens, &targets, 1, tokens.len()).logits;
    let tol = Tolerance { atol: 1e-6, rtol: 2e-5 };
    check_close_scaled("scaled logits vs reference", &logits, &want, &normwise(&want), &[11, 61], tol)
        .unwrap();
    let unscaled = loss_and_grads(&plain, &host, &tokens, &targets, 1, tokens.len()).logits;
    let apart = want.iter().zip(&unscaled).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
    assert!(apart > 1e-2, "scaling changed the logits by at most {apart:e}");

    let (got, _) = decode_logits(dev, &model, &tokens, 6);
    check_close_scaled("scaled decode vs forward", &got, &logits, &normwise(&logits), &[11, 61], tol)
        .unwrap();
}

#[test]
fn linear_rope_scaling_reaches_the_forward_and_decoding() {
    on_test_backend!(linear_scaling_everywhere);
}
