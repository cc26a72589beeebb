//! `cargo xtask config NAME --batch B --seq-len T --dtype D ... [--json]`: the memory of one
//! training step, by purpose, against the model's own accounting (which the model tests check
//! against the buffers actually allocated), and its errors.

use model::LlamaConfig;
use model::activations::{HeadChunk, Recompute};
use serde_json::Value;
use std::process::Command;

fn config_json(args: &[&str]) -> Value {
    let output = Command::new(env!("CARGO_BIN_EXE_xtask")).arg("config").args(args).output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{args:?}: {}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {stdout}"))
}

fn bytes(doc: &Value, key: &str) -> u64 {
    doc[key].as_u64().unwrap_or_else(|| panic!("{key} missing in {doc}"))
}

/// `--world N --zero 1` divides the moments and master weights (whole tensors, so the most
/// loaded rank holds a little more than 1/N); `--zero 0` and the weights and gradients do not
/// change with the world size. 7B at T 4096 fits 8 × 80 GB only sharded.
#[test]
fn zero1_divides_the_optimizer_state_over_the_ranks() {
    let config = LlamaConfig::preset("llama2-7b").unwrap();
    let params = config.parameter_count() as u64;
    let step = |world: &str, zero: &str| {
        config_json(&[
            "llama2-7b",
            "--dtype",
            "bf16",
            "--seq-len",
            "4096",
            "--world",
            world,
            "--zero",
            zero,
            "--json",
        ])
    };
    let (one, plain, sharded) = (step("1", "0"), step("8", "0"), step("8", "1"));
    assert_eq!(
        bytes(&plain, "per_gpu_bytes"),
        bytes(&one, "per_gpu_bytes"),
        "ZeRO-0 keeps everything everywhere"
    );
    assert_eq!((sharded["world"].as_u64(), sharded["zero"].as_u64()), (Some(8), Some(1)));
    for key in ["parameters_bytes", "gradients_bytes", "activations_bytes"] {
        assert_eq!(bytes(&sharded, key), bytes(&one, key), "{key}");
    }
    let share = bytes(&sharded, "optimizer_bytes") / 8;
    assert_eq!(bytes(&sharded, "master_bytes"), 4 * share);
    assert!(share >= params / 8 && share < params / 8 + params / 100, "share {share} of {params}");
    assert!(bytes(&sharded, "per_gpu_bytes") < 80_000_000_000);
    assert!(bytes(&one, "per_gpu_bytes") > 80_000_000_000);
}

#[test]
fn a_step_is_sized_by_purpose_and_recomputation_shrinks_the_activations() {
    let config = LlamaConfig::preset("llama2-7b").unwrap();
    let stored = config_json(&["llama2-7b", "--dtype", "bf16", "--seq-len", "4096", "--json"]);
    let recomputed =
        config_json(&["llama2-7b", "--dtype", "bf16", "--seq-len", "4096", "--recompute", "layer", "--json"]);
    for doc in [&stored, &recomputed] {
        let parts =
            ["parameters_bytes", "master_bytes", "gradients_bytes", "optimizer_bytes", "activations_bytes"];
        let sum: u64 = parts.iter().map(|k| bytes(doc, k)).sum();
        assert_eq!(bytes(doc, "per_gpu_bytes"), sum, "{doc}");
        let params = config.parameter_count() as u64;
        // bf16 weights, f32 master, f32 gradients, two f32 moments.
        assert_eq!(bytes(doc, "parameters_bytes"), 2 * params);
        assert_eq!(bytes(doc, "master_bytes"), 4 * params);
        assert_eq!(bytes(doc, "gradients_bytes"), 4 * params);
        assert_eq!(bytes(doc, "optimizer_bytes"), 8 * params);
        assert_eq!(doc["batch"], 1);
        assert_eq!(doc["head_rows"], 512, "4096 rows / ⌈32000/4096⌉ = 512");
    }
    for (doc, recompute) in [(&stored, Recompute::None), (&recomputed, Recompute::Layer)] {
        let want = config.training_memory(1, 4096, 2, true, 512, recompute);
        assert_eq!(bytes(doc, "activations_bytes"), want.activations as u64, "{recompute}");
    }
    // 32 layers' activations against one layer's (the streams stay).
    assert!(bytes(&recomputed, "activations_bytes") * 5 < bytes(&stored, "activations_bytes"));
    // One 141 GB H200 holds the recomputing step; the stored one does not.
    assert!(bytes(&recomputed, "per_gpu_bytes") < 141_000_000_000);
    assert!(bytes(&stored, "per_gpu_bytes") > 135_000_000_000);

    // Keeping the logits whole costs their [4096, 32000] bf16 block over the chunk.
    let whole = config_json(&["llama2-7b", "--dtype", "bf16", "--lm-head-chunk", "full", "--json"]);
    let head = HeadChunk::Auto.rows(&config, 4096).unwrap() as u64;
    assert_eq!(
        bytes(&whole, "activations_bytes") - bytes(&stored, "activations_bytes"),
        (4096 - head) * 32000 * 2
    );
}

#[test]
fn bad_step_flags_are_clear_errors() {
    for (args, message) in [
        (&["tiny", "--lm-head-chunk", "100"][..], "must be a positive multiple of 128"),
        (&["tiny", "--seq-len", "100000"][..], "exceeds the model's context"),
        (&["tiny", "--recompute", "some"][..], "expected none or layer"),
        (&["tiny", "--batch", "18446744073709551615"][..], "more than 2^32 tokens per step"),
    ] {
        let output = Command::new(env!("CARGO_BIN_EXE_xtask")).arg("config").args(args).output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{args:?}");
        assert!(stderr.contains(message), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}
