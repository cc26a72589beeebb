//! Checkpoints written by Hugging Face transformers (`LlamaForCausalLM.save_pretrained`, see
//! `xtask/python/hf_fixture.py`, which also computed the expected losses in float64 with
//! transformers' own model): they load, and evaluation gives transformers' loss.

use dsl::{BackendRuntime, Device};
use model::Llama;
use std::path::{Path, PathBuf};
use tests::*;
use trainer::data::{TokenFormat, TokenStream};
use trainer::eval::evaluate;

/// `tests/fixtures/hf_tiny`, or under `CUBELLAMA_FIXTURES` (for test binaries run elsewhere).
fn fixture() -> PathBuf {
    let root = std::env::var_os("CUBELLAMA_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures"));
    root.join("hf_tiny")
}

fn expected() -> serde_json::Value {
    let text = std::fs::read_to_string(fixture().join("expected.json")).expect("fixture expected.json");
    serde_json::from_str(&text).expect("expected.json is JSON")
}

/// f32 kernels against transformers in float64: the loss agrees to f32 accuracy.
const LOSS_RTOL: f64 = 2e-6;

fn matches_transformers<R: BackendRuntime>(dev: &Device<R>) {
    let want = expected();
    let (batch, seq, batches) = (
        want["batch"].as_u64().unwrap() as usize,
        want["seq_len"].as_u64().unwrap() as usize,
        want["batches"].as_u64().unwrap() as usize,
    );
    let tokens = TokenStream::open(&fixture().join("tokens.bin"), TokenFormat::Auto).unwrap();
    for (dir, key) in [("f32_sharded", "f32_sharded_loss"), ("bf16", "bf16_loss")] {
        let model = Llama::<R, f32>::load(dev, &fixture().join(dir)).unwrap_or_else(|e| panic!("{dir}: {e}"));
        assert_eq!((model.config.num_attention_heads, model.config.num_key_value_heads), (4, 2), "{dir}");
        let report = evaluate(dev, &model, &tokens, batch, seq, Some(batches), |_, _, _| {}).unwrap();
        let reference = want[key].as_f64().unwrap();
        let err = (report.loss - reference).abs();
        assert!(
            err <= LOSS_RTOL * reference,
            "{dir}: loss {} vs transformers {reference} (|Δ| {err:e})",
            report.loss
        );
    }
}

#[test]
fn transformers_checkpoints_load_and_evaluate_to_transformers_loss() {
    on_test_backend!(matches_transformers);
}
