//! The whole model on the device against the f64 reference model (loss, logits and every
//! parameter gradient), the reference against finite differences, and the configuration.

use dsl::{BackendRuntime, Device};
use model::activations::{ActivationPlan, HeadChunk, Recompute, activation_bytes_with};
use model::reference::loss_and_grads;
use model::{Activations, Llama, LlamaConfig, Params};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use tests::models::{self, random_params, random_tokens, to_f32, to_f64};
use tests::*;

/// Whole-model tolerance in f32, normwise per tensor (`|Δ| ≤ 1e-7 + rtol·max|expected|`): a
/// few dozen f32 kernels in sequence, each within its own f32 tolerance, and gradients that
/// pass through all of them. Worst seen over many cases: about a tenth of it.
const MODEL_F32_RTOL: f64 = 5e-5;

#[derive(Clone, Debug)]
struct Case {
    config: LlamaConfig,
    batch: usize,
    seq: usize,
    ignore_every: Option<usize>,
    seed: u64,
}

fn cases() -> impl Strategy<Value = Case> {
    // (heads, kv_heads, head_dim): MHA, GQA 2:1 and 4:1, head_dim 16 and 32.
    let heads = prop::sample::select(vec![(2, 2, 16), (4, 2, 16), (4, 1, 16), (2, 1, 32), (3, 3, 16)]);
    (
        heads,
        prop::sample::select(vec![37usize, 64]),
        prop::sample::select(vec![32usize, 48]),
        prop::sample::select(vec![40usize, 72]),
        1usize..=2,
        1usize..=2,
        prop::sample::select(vec![1usize, 5, 7, 13]),
        prop::option::of(2usize..=5),
        any::<bool>(),
        any::<u64>(),
    )
        .prop_map(|((h, kv, hd), vocab, hidden, inter, layers, batch, seq, ignore_every, tied, seed)| {
            let mut config = models::tiny_config(vocab, hidden, inter, layers, h, kv, hd);
            config.tie_word_embeddings = tied;
            Case { config, batch, seq, ignore_every, seed }
        })
}

fn check_tensor(what: &str, actual: &[f64], expected: &[f64], rtol: f64) -> Result<(), TestCaseError> {
    let magnitude = normwise(expected);
    check_close_scaled(what, actual, expected, &magnitude, &[actual.len()], Tolerance { atol: 1e-7, rtol })
        .map_err(TestCaseError::fail)
}

fn check_case<R: BackendRuntime>(dev: &Device<R>, case: &Case) -> Result<(), TestCaseError> {
    let Case { config, batch, seq, ignore_every, seed } = case;
    let (batch, seq) = (*batch, *seq);
    let host = to_f32(&random_params(config, *seed));
    let (ids, targets) = random_tokens(config.vocab_size, batch * seq, *ignore_every, *seed);
    let want = loss_and_grads(config, &to_f64(&host), &ids, &targets, batch, seq);

    let params =
        Params::<R, f32>::from_host(dev, config, &host).map_err(|e| TestCaseError::fail(e.to_string()))?;
    let model = Llama::new(dev, config.clone(), params).map_err(|e| TestCaseError::fail(e.to_string()))?;
    let run = || -> model::Result<(f32, Vec<f64>, Vec<Vec<f64>>)> {
        let mut acts = Activations::<R, f32>::new(dev, config, batch, seq)?;
        let mut grads = Params::<R, f32>::zeros(dev, config)?;
        let ids = model.token_ids(dev, &ids, batch, seq)?;
        let targets = model.targets(dev, &targets)?;
        model.forward(dev, &mut acts, &ids)?;
        // Read before the loss: the training loss overwrites the logits with their gradient.
        let logits = acts.logits.to_f64_vec(dev)?;
        model.loss(dev, &mut acts, &targets, true)?;
        model.backward(dev, &mut acts, &ids, &mut grads)?;
        let grads = grads.tensors().iter().map(|g| g.to_f64_vec(dev)).collect::<dsl::Result<Vec<_>>>()?;
        Ok((model.read_loss(dev, &acts)?, logits, grads))
    };
    let (loss, logits, grads) = run().map_err(|e| TestCaseError::fail(e.to_string()))?;
    let loss_err = (loss as f64 - want.loss).abs();
    prop_assert!(
        loss_err <= 1e-6 + 1e-5 * want.loss.abs(),
        "loss {loss} vs reference {} ({case:?})",
        want.loss
    );
    check_tensor("logits", &logits, &want.logits, MODEL_F32_RTOL)?;
    for ((spec, got), expected) in config.parameters().iter().zip(&grads).zip(&want.grads) {
        check_tensor(&format!("grad {}", spec.name), got, expected, MODEL_F32_RTOL)?;
    }
    Ok(())
}

fn f32_model_matches_reference<R: BackendRuntime>(dev: &Device<R>) {
    run_property("llama f32 vs f64 reference", 8, cases(), |case| check_case(dev, &case));
}

#[test]
fn model_f32_loss_logits_and_every_gradient_match_the_reference() {
    on_test_backend!(f32_model_matches_reference);
}

/// A second backward adds the same gradient again (micro-batches accumulate).
fn accumulates<R: BackendRuntime>(dev: &Device<R>) {
    let config = models::tiny_config(29, 32, 48, 2, 4, 2, 16);
    let host = to_f32(&random_params(&config, 3));
    let model =
        Llama::new(dev, config.clone(), Params::<R, f32>::from_host(dev, &config, &host).unwrap()).unwrap();
    let (batch, seq) = (2, 6);
    let (ids, targets) = random_tokens(config.vocab_size, batch * seq, None, 3);
    let mut acts = Activations::<R, f32>::new(dev, &config, batch, seq).unwrap();
    let mut grads = Params::<R, f32>::zeros(dev, &config).unwrap();
    let ids = model.token_ids(dev, &ids, batch, seq).unwrap();
    let targets = model.targets(dev, &targets).unwrap();
    let mut step = |grads: &mut Params<R, f32>| {
        model.forward(dev, &mut acts, &ids).unwrap();
        model.loss(dev, &mut acts, &targets, true).unwrap();
        model.backward(dev, &mut acts, &ids, grads).unwrap();
    };
    step(&mut grads);
    let once: Vec<Vec<f64>> = grads.tensors().iter().map(|g| g.to_f64_vec(dev).unwrap()).collect();
    step(&mut grads);
    for ((spec, g), first) in config.parameters().iter().zip(grads.tensors()).zip(&once) {
        let doubled: Vec<f64> = first.iter().map(|v| 2.0 * v).collect();
        let got = g.to_f64_vec(dev).unwrap();
        assert_close(&spec.name, &got, &doubled, &[got.len()], Tolerance { atol: 1e-7, rtol: 1e-6 });
    }
}

#[test]
fn backward_adds_into_the_gradients() {
    on_test_backend!(accumulates);
}

/// The chunked head (logits a block of rows at a time, each block's gradient in place) gives
/// the whole-logits loss and every gradient but lm_head's to the bit; lm_head's gradient sums
/// the blocks' terms in another order, so it agrees to f32 round-off (normwise 1e-6). Two
/// configurations, untied and tied (the tied table also carries the embedding's gradient),
/// with ignored positions and a last block shorter than the others.
fn chunked_head<R: BackendRuntime>(dev: &Device<R>) {
    for (tied, seed) in [(false, 21u64), (true, 22)] {
        let mut config = models::tiny_config(61, 32, 48, 2, 2, 1, 16);
        config.tie_word_embeddings = tied;
        let host = to_f32(&random_params(&config, seed));
        let model =
            Llama::new(dev, config.clone(), Params::<R, f32>::from_host(dev, &config, &host).unwrap())
                .unwrap();
        let (batch, seq) = (5, 60);
        let (ids, targets) = random_tokens(config.vocab_size, batch * seq, Some(3), seed);
        let ids = model.token_ids(dev, &ids, batch, seq).unwrap();
        let targets = model.targets(dev, &targets).unwrap();
        let run = |head: HeadChunk| {
            let mut acts = Activations::<R, f32>::with_head(dev, &config, batch, seq, head).unwrap();
            let mut grads = Params::<R, f32>::zeros(dev, &config).unwrap();
            model.forward(dev, &mut acts, &ids).unwrap();
            model.loss_backward(dev, &mut acts, &targets, &ids, &mut grads).unwrap();
            let loss = model.read_loss(dev, &acts).unwrap();
            let rows = acts.row_loss.to_vec(dev).unwrap();
            // The evaluation loss of the same activations, forward only.
            model.forward(dev, &mut acts, &ids).unwrap();
            model.loss(dev, &mut acts, &targets, false).unwrap();
            let eval = model.read_loss(dev, &acts).unwrap();
            let grads: Vec<Vec<f32>> = grads.tensors().iter().map(|g| g.to_vec(dev).unwrap()).collect();
            (loss.to_bits(), eval.to_bits(), rows.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), grads)
        };
        let whole = run(HeadChunk::Full);
        let blocks = run(HeadChunk::Rows(128));
        assert_eq!(blocks.0, whole.0, "training loss (tied {tied})");
        assert_eq!(blocks.1, whole.1, "evaluation loss (tied {tied})");
        assert_eq!(whole.0, whole.1, "training and evaluation losses (tied {tied})");
        assert!(blocks.2 == whole.2, "per-position losses differ (tied {tied})");
        let lm_head = config.parameters().len() - 1;
        for (i, spec) in config.parameters().iter().enumerate() {
            let (got, want) = (&blocks.3[i], &whole.3[i]);
            let head_grad = (tied && i == 0) || (!tied && i == lm_head);
            if head_grad {
                let (got, want): (Vec<f64>, Vec<f64>) =
                    (got.iter().map(|&v| v as f64).collect(), want.iter().map(|&v| v as f64).collect());
                check_close_scaled(
                    &spec.name,
                    &got,
                    &want,
                    &normwise(&want),
                    &[got.len()],
                    Tolerance { atol: 0.0, rtol: 1e-6 },
                )
                .unwrap();
            } else {
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert!(bits(got) == bits(want), "gradient of {} differs (tied {tied})", spec.name);
            }
        }
    }
}

#[test]
fn chunked_lm_head_gives_the_same_loss_and_gradients() {
    on_test_backend!(chunked_head);
}

/// Recomputing each layer's forward in the backward gives the loss and every gradient of the
/// stored-activation run to the bit (deterministic kernels), with the logits whole or in blocks,
/// in f32 and f16, tied and untied, three layers (the middle one is recomputed between two).
fn recomputed<R: BackendRuntime, F: TestFloat>(dev: &Device<R>) {
    if refuses_unsupported::<R, F>(dev) {
        return;
    }
    for (tied, seed) in [(false, 31u64), (true, 32)] {
        let mut config = models::tiny_config(45, 32, 48, 3, 4, 2, 16);
        config.tie_word_embeddings = tied;
        let host = to_f32(&random_params(&config, seed));
        let params = Params::<R, F>::from_host(dev, &config, &host).unwrap();
        let model = Llama::new(dev, config.clone(), params).unwrap();
        let (batch, seq) = (3, 50);
        let (ids, targets) = random_tokens(config.vocab_size, batch * seq, Some(4), seed);
        let ids = model.token_ids(dev, &ids, batch, seq).unwrap();
        let targets = model.targets(dev, &targets).unwrap();
        let run = |plan: ActivationPlan| {
            let mut acts = Activations::<R, F>::with_plan(dev, &config, batch, seq, plan).unwrap();
            let mut grads = Params::<R, f32>::zeros(dev, &config).unwrap();
            model.forward(dev, &mut acts, &ids).unwrap();
            model.loss_backward(dev, &mut acts, &targets, &ids, &mut grads).unwrap();
            let loss = model.read_loss(dev, &acts).unwrap().to_bits();
            let grads: Vec<Vec<u32>> = grads
                .tensors()
                .iter()
                .map(|g| g.to_vec(dev).unwrap().iter().map(|v| v.to_bits()).collect())
                .collect();
            (loss, grads)
        };
        for head in [HeadChunk::Full, HeadChunk::Rows(128)] {
            let stored = run(ActivationPlan { head, recompute: Recompute::None });
            let again = run(ActivationPlan { head, recompute: Recompute::Layer });
            assert_eq!(again.0, stored.0, "loss ({}, tied {tied}, {head})", F::DTYPE);
            for (spec, (a, b)) in config.parameters().iter().zip(again.1.iter().zip(&stored.1)) {
                assert!(a == b, "gradient of {} differs ({}, tied {tied}, {head})", spec.name, F::DTYPE);
            }
        }
    }
}

#[test]
fn recomputed_layers_give_bit_identical_gradients_f32() {
    on_test_backend!(recomputed, f32);
}

#[test]
fn recomputed_layers_give_bit_identical_gradients_f16() {
    on_test_backend!(recomputed, half::f16);
}

#[test]
fn reference_model_gradients_match_finite_differences() {
    // Every parameter of two small configs (one tied, GQA 2:1, two layers), all positions.
    for (tied, seed) in [(false, 11u64), (true, 12)] {
        let mut config = models::tiny_config(7, 16, 12, 2, 2, 1, 8);
        config.tie_word_embeddings = tied;
        let params = random_params(&config, seed);
        let (batch, seq) = (2, 3);
        let (ids, targets) = random_tokens(config.vocab_size, batch * seq, Some(4), seed);
        let analytic = loss_and_grads(&config, &params, &ids, &targets, batch, seq).grads;
        for (p, spec) in config.parameters().iter().enumerate() {
            let loss_at = |values: &[f64]| {
                let mut perturbed = params.clone();
                perturbed[p] = values.to_vec();
                loss_and_grads(&config, &perturbed, &ids, &targets, batch, seq).loss
            };
            let numeric = finite_differences(loss_at, &params[p], 1e-5);
            assert_close(
                &format!("d loss / d {} (tied {tied})", spec.name),
                &analytic[p],
                &numeric,
                &spec.shape,
                Tolerance { atol: 1e-8, rtol: 1e-5 },
            );
        }
    }
}

fn sizes_match<R: BackendRuntime>(dev: &Device<R>) {
    let config = models::tiny_config(50, 48, 80, 3, 4, 2, 16);
    for (batch, seq) in [(1, 1), (2, 7), (3, 33)] {
        let n = batch * seq;
        let rows = kernels::rmsnorm::rmsnorm_backward_scratch_rows(dev, n);
        for head in [HeadChunk::Full, HeadChunk::Auto, HeadChunk::Rows(128)] {
            for recompute in [Recompute::None, Recompute::Layer] {
                let plan = ActivationPlan { head, recompute };
                let acts = Activations::<R, f32>::with_plan(dev, &config, batch, seq, plan).unwrap();
                let head_rows = head.rows(&config, n).unwrap();
                assert_eq!(acts.head_rows, head_rows);
                let want = activation_bytes_with(&config, batch, seq, 4, head_rows, rows, recompute);
                assert_eq!(acts.size_bytes(), want, "{batch}×{seq}, {head}, {recompute}");
            }
        }
    }
    let err = HeadChunk::Rows(100).rows(&config, 1000).expect_err("not a multiple of 128");
    assert!(err.to_string().contains("positive multiple of 128"), "{err}");
    let err = Activations::<R, f32>::new(dev, &config, 1, 65).err().expect("longer than the context");
    assert!(err.to_string().contains("sequence length 65 exceeds the model's context"), "{err}");
}

#[test]
fn activation_memory_estimate_is_what_is_allocated() {
    on_test_backend!(sizes_match);
}

fn wrong_inputs<R: BackendRuntime>(dev: &Device<R>) {
    let config = models::tiny_config(11, 32, 40, 1, 2, 2, 16);
    let host = to_f32(&random_params(&config, 1));
    let model =
        Llama::new(dev, config.clone(), Params::<R, f32>::from_host(dev, &config, &host).unwrap()).unwrap();
    let err = model.token_ids(dev, &[1, 2, 11], 1, 3).err().expect("id 11 ≥ vocab 11");
    assert!(err.to_string().contains("11") && err.to_string().contains("position 2"), "{err}");
    let mut acts = Activations::<R, f32>::new(dev, &config, 2, 3).unwrap();
    let ids = model.token_ids(dev, &[1, 2, 3], 1, 3).unwrap();
    let err = model.forward(dev, &mut acts, &ids).unwrap_err();
    assert!(err.to_string().contains("token ids have shape [1, 3]"), "{err}");
    let other = models::tiny_config(11, 32, 40, 2, 2, 2, 16);
    let err =
        Llama::new(dev, other, Params::<R, f32>::from_host(dev, &config, &host).unwrap()).err().unwrap();
    assert!(err.to_string().contains("different configuration"), "{err}");
}

#[test]
fn model_rejects_inputs_that_do_not_fit() {
    on_test_backend!(wrong_inputs);
}

#[test]
fn presets_have_the_published_parameter_counts() {
    // Counts as Hugging Face reports them for meta-llama/Llama-2-{7,13,70}b-hf.
    assert_eq!(LlamaConfig::preset("llama2-7b").unwrap().parameter_count(), 6_738_415_616);
    assert_eq!(LlamaConfig::preset("llama2-13b").unwrap().parameter_count(), 13_015_864_320);
    assert_eq!(LlamaConfig::preset("llama2-70b").unwrap().parameter_count(), 68_976_648_192);
    // llama2.c's stories15M with an untied classifier: 15.2M + 32000·288.
    let stories = LlamaConfig::preset("stories15m").unwrap();
    assert_eq!(stories.parameter_count(), 24_407_712);
    for name in model::config::PRESETS {
        let config = LlamaConfig::preset(name).unwrap();
        config.validate().unwrap_or_else(|e| panic!("{name}: {e}"));
        let shown = config.to_string();
        assert!(shown.contains("parameters:") && shown.contains("training step"), "{shown}");
    }
    let err = LlamaConfig::preset("llama3-8b").unwrap_err().to_string();
    assert!(err.contains("unknown preset `llama3-8b`") && err.contains("llama2-7b"), "{err}");
}

#[test]
fn config_json_reads_what_transformers_writes() {
    // transformers 4: rope_theta at the top level; no head_dim; unknown keys.
    let v4 = r#"{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 32000,
        "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 32, "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "rope_scaling": null, "torch_dtype": "float16",
        "tie_word_embeddings": false, "pretraining_tp": 1, "use_cache": true, "hidden_act": "silu"}"#;
    let config = LlamaConfig::from_json(v4, "v4.json").unwrap();
    assert_eq!(config, LlamaConfig::preset("llama2-7b").unwrap());
    // transformers 5: rope_theta inside rope_parameters, head_dim present, kv heads absent.
    let v5 = r#"{"model_type": "llama", "vocab_size": 100, "hidden_size": 64, "intermediate_size": 96,
        "num_hidden_layers": 2, "num_attention_heads": 2, "head_dim": 48, "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_theta": 500000.0, "rope_type": "default"}, "dtype": "bfloat16",
        "tie_word_embeddings": true}"#;
    let config = LlamaConfig::from_json(v5, "v5.json").unwrap();
    assert_eq!((config.head_dim, config.num_key_value_heads, config.rope_theta), (48, 2, 500000.0));
    assert!(config.tie_word_embeddings);
    // What we write reads back as the same config.
    let again = LlamaConfig::from_json(&config.to_json("float32"), "ours.json").unwrap();
    assert_eq!(again, config);
}

#[test]
fn config_json_errors_name_the_file_and_the_problem() {
    let base = r#""vocab_size": 100, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2"#;
    let cases = [
        (
            format!("{{{base}, \"num_attention_heads\": 4, \"num_key_value_heads\": 3}}"),
            "not a multiple of num_key_value_heads 3",
        ),
        (format!("{{{base}, \"num_attention_heads\": 8}}"), "head_dim 8 is not supported"),
        (format!("{{{base}}}"), "missing field `num_attention_heads`"),
        (
            format!("{{{base}, \"num_attention_heads\": 4, \"model_type\": \"mistral\"}}"),
            "model_type is `mistral`",
        ),
        (
            format!(
                "{{{base}, \"num_attention_heads\": 4, \"rope_scaling\": {{\"rope_type\": \"llama3\"}}}}"
            ),
            "RoPE scaling",
        ),
    ];
    for (json, expected) in cases {
        let err = LlamaConfig::from_json(&json, "bad/config.json").unwrap_err().to_string();
        assert!(err.contains("bad/config.json") && err.contains(expected), "{err} (expected `{expected}`)");
    }
}

#[test]
fn training_flops_follow_the_mfu_convention() {
    // V 10, C 32, I 48, 2 layers, 4 heads of 16 sharing 2 kv heads: per layer q 64·32, k and v
    // 32·32, o 32·64, gate/up/down 48·32 each; lm_head 10·32; attention 12·L·(Hq·hd)·T.
    let mut config = models::tiny_config(10, 32, 48, 2, 4, 2, 16);
    let per_layer = 64 * 32 + 2 * 32 * 32 + 32 * 64 + 3 * 48 * 32;
    let want = |seq: usize| 6.0 * (2 * per_layer + 10 * 32) as f64 + (12 * 2 * 64 * seq) as f64;
    assert_eq!(config.training_flops_per_token(7), want(7));
    config.tie_word_embeddings = true;
    assert_eq!(config.training_flops_per_token(7), want(7), "a tied lm_head still multiplies");
    // Llama-2-7B at 4096: 6·(6.476e9 layer matrices + 0.131e9 lm_head) + 12·32·4096·4096
    // ≈ 3.964e10 + 0.644e10 = 4.608e10 FLOPs per token.
    let seven = LlamaConfig::preset("llama2-7b").unwrap().training_flops_per_token(4096);
    assert!((seven / 4.608e10 - 1.0).abs() < 1e-3, "{seven:e}");
}
