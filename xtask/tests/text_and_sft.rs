//! The commands end to end with the real binary: training on plain text (a BPE tokenizer trained
//! and saved with the run, the loss plot beside the log), generating from that checkpoint, the
//! built-in SFT task through `sft-data`, `sft`, `sft --resume` and `generate --answer`, and an
//! `--out` that cannot be written refused before any training.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn scratch() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("cubellama-cli-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn xtask(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_xtask")).args(args).output().unwrap()
}

/// Runs `args`, panicking with its output unless it succeeds; its stdout.
fn ok(args: &[&str]) -> String {
    let out = xtask(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "xtask {args:?} failed:\n{stderr}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// One more than the largest id of a tokenizer.json.
fn vocab_of(tokenizer_json: &Path) -> u64 {
    let json: Value = serde_json::from_str(&std::fs::read_to_string(tokenizer_json).unwrap()).unwrap();
    let model = json["model"]["vocab"].as_object().unwrap().values().map(|v| v.as_u64().unwrap());
    let added = json["added_tokens"].as_array().unwrap().iter().map(|t| t["id"].as_u64().unwrap());
    model.chain(added).max().unwrap() + 1
}

#[test]
fn text_training_then_sft_then_answers() {
    let dir = scratch();
    // Text: paragraphs of a made-up language, so the BPE has something to merge.
    let text: String = (0..400)
        .map(|i| format!("the lamp {} glows over the {} river.\n\n", ["red", "blue", "green"][i % 3], i % 7))
        .collect();
    let text_file = dir.join("story.txt");
    std::fs::write(&text_file, text).unwrap();
    let base = dir.join("base");
    let recipe = ["--preset", "tiny", "--batch", "2", "--seq-len", "32", "--lr", "3e-3", "--warmup", "1"];
    let mut train = vec!["train", "--data", path(&text_file), "--vocab-size", "300", "--steps", "3"];
    train.extend(recipe);
    train.extend(["--eval-every", "3", "--out", path(&base)]);
    ok(&train);
    // At most 300: the BPE stops early when no pair is left to merge.
    let trained = vocab_of(&base.join("tokenizer.json"));
    assert!((259..=300).contains(&trained), "the trained BPE is saved with the model ({trained} tokens)");
    let log = std::fs::read_to_string(dir.join("base-log.jsonl")).unwrap();
    assert_eq!(log.lines().filter(|l| l.contains("\"loss\"")).count(), 3);
    assert!(log.contains("val_loss"), "{log}");
    let font_available = Path::new("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf").exists();
    if font_available {
        let png = std::fs::read(dir.join("base-log.png")).unwrap();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "a PNG");
    }
    let generated =
        ok(&["generate", "--model", path(&base), "--prompt", "the lamp", "--max-new-tokens", "5"]);
    assert!(generated.starts_with("the lamp"), "{generated}");

    // SFT from that checkpoint: the separator joins the tokenizer as the next id, inside the
    // tiny preset's vocabulary of 512.
    let data = dir.join("reverse.jsonl");
    ok(&["sft-data", "--out", path(&data), "--examples", "60"]);
    assert_eq!(std::fs::read_to_string(&data).unwrap().lines().count(), 60);
    let tuned = dir.join("tuned");
    let sft = |extra: &[&str]| {
        let mut args = vec!["sft", "--data", path(&data), "--out", path(&tuned)];
        args.extend(extra);
        ok(&args)
    };
    sft(&["--model", path(&base), "--batch", "2", "--seq-len", "32", "--grad-accum", "2", "--steps", "2"]);
    assert_eq!(vocab_of(&tuned.join("tokenizer.json")), trained + 1);
    let state: Value =
        serde_json::from_str(&std::fs::read_to_string(tuned.join("trainer_state.json")).unwrap()).unwrap();
    assert_eq!(state["sft"]["separator"], "<|response|>");
    assert_eq!(state["options"]["lr"], 2e-5, "SFT's default rate");
    sft(&["--resume", path(&tuned), "--steps", "3"]);
    let log = std::fs::read_to_string(dir.join("tuned-log.jsonl")).unwrap();
    assert_eq!(log.lines().filter(|l| l.contains("\"loss\"")).count(), 3, "{log}");
    ok(&["generate", "--model", path(&tuned), "--answer", "--prompt", "abc", "--max-new-tokens", "4"]);

    // Pretraining checkpoints are not SFT checkpoints.
    let out = xtask(&["sft", "--resume", path(&base), "--data", path(&data)]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("a pretraining checkpoint"), "{stderr}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn bad_sft_and_train_input_is_refused_before_training() {
    let dir = std::env::temp_dir().join(format!("cubellama-cli-bad-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let fails = |args: &[&str], wanted: &[&str]| {
        let out = xtask(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "xtask {args:?} succeeded");
        assert!(!stderr.contains("steps,"), "{args:?} started training:\n{stderr}");
        for w in wanted {
            assert!(stderr.contains(w), "xtask {args:?}: no {w:?} in\n{stderr}");
        }
    };
    // An --out under a regular file cannot be created: refused up front.
    let file = dir.join("a-file");
    std::fs::write(&file, "x").unwrap();
    let under_file = file.join("run");
    fails(&["train", "--steps", "1", "--out", path(&under_file)], &["--out", "cannot create"]);
    fails(&["train", "--steps", "1", "--out", path(&file)], &["exists and is not a directory"]);

    let empty = dir.join("empty.jsonl");
    std::fs::write(&empty, "").unwrap();
    let model = dir.join("model");
    ok(&["init", "--preset", "tiny", "--out", path(&model)]);
    // No tokenizer.json in the checkpoint and none given.
    let data = dir.join("d.jsonl");
    std::fs::write(&data, "{\"prompt\": \"a\", \"response\": \"b\"}\n").unwrap();
    fails(&["sft", "--model", path(&model), "--data", path(&data)], &["sft needs a tokenizer"]);
    fails(&["sft", "--model", path(&model), "--data", path(&empty)], &["empty.jsonl", "holds no examples"]);
    // A tokenizer larger than the model's vocabulary (the tiny preset has 512).
    let tokenizer = dir.join("tokenizer.json");
    std::fs::write(&tokenizer, big_tokenizer_json()).unwrap();
    fails(
        &["sft", "--model", path(&model), "--data", path(&data), "--tokenizer", path(&tokenizer)],
        &["600 tokens", "vocabulary of 512"],
    );
    // Pretraining a checkpoint: the error names both sizes and both files.
    let text = dir.join("words.txt");
    let words: String = (0..400).map(|i| format!("w{} w{}\n\n", i % 600, (i * 7) % 600)).collect();
    std::fs::write(&text, words).unwrap();
    let config_file = model.join("config.json");
    fails(
        &["train", "--model", path(&model), "--data", path(&text), "--tokenizer", path(&tokenizer)],
        &["600 tokens", "vocabulary of 512", path(&tokenizer), path(&config_file)],
    );
    // A fresh preset is sized to the tokenizer instead, and says so.
    let sized = dir.join("sized");
    let fresh = ["train", "--preset", "tiny", "--data", path(&text), "--tokenizer", path(&tokenizer)];
    let mut args = fresh.to_vec();
    args.extend(["--steps", "1", "--batch", "1", "--seq-len", "16", "--out", path(&sized)]);
    let out = xtask(&args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("vocabulary: 600 tokens, sized to the tokenizer"), "{stderr}");
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(sized.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["vocab_size"], 600);
    // --vocab-size pads a preset's vocabulary past the tokenizer's, never below it.
    fails(
        &[fresh.as_slice(), &["--vocab-size", "599"]].concat(),
        &["--vocab-size 599 is smaller than the tokenizer's 600 tokens"],
    );
    std::fs::remove_dir_all(dir).unwrap();
}

/// A word-level tokenizer.json of 600 tokens.
fn big_tokenizer_json() -> String {
    let vocab: serde_json::Map<String, Value> = (0..600).map(|i| (format!("w{i}"), Value::from(i))).collect();
    serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "w0"}
    })
    .to_string()
}
