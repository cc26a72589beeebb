//! Checkpoints written by Hugging Face transformers (`LlamaForCausalLM.save_pretrained`, see
//! `xtask/python/hf_fixture.py`, which also computed the expected losses in float64 with
//! transformers' own model): they load, and evaluation gives transformers' loss. And what other
//! tools write: a tied model that carries its head too, sharded indexes that disagree with their
//! shards, config keys the model does not implement, `rope_scaling`.

use dsl::{BackendRuntime, Device};
use model::checkpoint::{self, INDEX_FILE, SINGLE_FILE, SaveOptions};
use model::{Llama, LlamaConfig, RopeScaling};
use safetensors::tensor::{Dtype, TensorView};
use serde_json::json;
use std::collections::HashMap;
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

/// A fresh scratch directory (removed first if a run left it).
fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("cubellama-hf-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A copy of the fixture checkpoint `name` in `dir`.
fn copy_fixture(name: &str, dir: &Path) -> PathBuf {
    let to = dir.join(name);
    std::fs::create_dir_all(&to).unwrap();
    for entry in std::fs::read_dir(fixture().join(name)).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
    to
}

fn load_error(dir: &Path) -> String {
    checkpoint::load(dir).err().expect("the checkpoint must be refused").to_string()
}

fn assert_mentions(err: &str, needles: &[&str]) {
    for needle in needles {
        assert!(err.contains(needle), "`{err}` should mention `{needle}`");
    }
}

/// Writes `tensors` (name, f32 values, shape) as one `model.safetensors` in `dir`.
fn write_single(dir: &Path, tensors: &[(&str, &[f32], Vec<usize>)]) {
    let bytes: Vec<Vec<u8>> =
        tensors.iter().map(|(_, v, _)| v.iter().flat_map(|x| x.to_le_bytes()).collect()).collect();
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .zip(&bytes)
        .map(|((name, _, shape), b)| {
            (name.to_string(), TensorView::new(Dtype::F32, shape.clone(), b).unwrap())
        })
        .collect();
    safetensors::serialize_to_file(views, None::<HashMap<String, String>>, &dir.join(SINGLE_FILE)).unwrap();
}

/// `tie_word_embeddings: true` with an `lm_head.weight` as well, as several converters write:
/// loaded when the head is the embedding; refused, naming the tensor, the first differing
/// element and the tying, when it is not (Hugging Face would tie and drop the head silently).
#[test]
fn tied_checkpoints_with_an_lm_head_load_when_equal_and_are_refused_when_not() {
    let source = checkpoint::load(&fixture().join("f32_sharded")).unwrap();
    let untied = source.config.clone();
    let mut tied = untied.clone();
    tied.tie_word_embeddings = true;
    let specs = untied.parameters();
    let (embed, head) = (&source.tensors[0], &source.tensors[specs.len() - 1]);
    assert_eq!(
        (specs[0].name.as_str(), specs[specs.len() - 1].name.as_str()),
        ("model.embed_tokens.weight", "lm_head.weight")
    );
    let root = scratch_dir("tied");
    let (v, c) = (untied.vocab_size, untied.hidden_size);
    let write = |case: &str, lm_head: Option<(&[f32], usize)>| -> PathBuf {
        let dir = root.join(case);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("config.json"), tied.to_json("float32")).unwrap();
        let mut tensors: Vec<(&str, &[f32], Vec<usize>)> = specs[..specs.len() - 1]
            .iter()
            .zip(&source.tensors)
            .map(|(s, t)| (s.name.as_str(), t.as_slice(), s.shape.clone()))
            .collect();
        if let Some((values, rows)) = lm_head {
            tensors.push(("lm_head.weight", &values[..rows * c], vec![rows, c]));
        }
        write_single(&dir, &tensors);
        dir
    };
    let plain = checkpoint::load(&write("without_head", None)).unwrap();
    let both = checkpoint::load(&write("equal_head", Some((embed, v)))).unwrap();
    assert!(both.config.tie_word_embeddings);
    assert_eq!(both.tensors.len(), specs.len() - 1, "a tied model has no separate head");
    assert_eq!(both.tensors, plain.tensors);
    assert_eq!(&both.tensors[0], embed);

    let err = load_error(&write("different_head", Some((head, v))));
    let first = embed.iter().zip(head.iter()).position(|(a, b)| a != b).unwrap();
    let at = format!("[{}, {}]", first / c, first % c);
    assert_mentions(
        &err,
        &[SINGLE_FILE, "`lm_head.weight`", "model.embed_tokens.weight", &at, "tie_word_embeddings: true"],
    );
    // A head of the wrong shape is named as such, not compared.
    let err = load_error(&write("head_shape", Some((embed, v - 1))));
    assert_mentions(&err, &["`lm_head.weight`", "shape [511, 128]", "[512, 128]"]);
    std::fs::remove_dir_all(&root).unwrap();
}

/// transformers' 10-shard fixture with its index edited: a tensor sent to the wrong shard, a
/// tensor no shard holds, a repeated key and a tensor the index leaves out are each refused,
/// naming the tensor and the index file (and the shards involved).
#[test]
fn a_sharded_index_must_agree_with_its_shards() {
    let root = scratch_dir("index");
    let original = std::fs::read_to_string(fixture().join("f32_sharded").join(INDEX_FILE)).unwrap();
    let q = "model.layers.0.self_attn.q_proj.weight";
    let q_entry = format!("\"{q}\": \"model-00002-of-00010.safetensors\"");
    assert!(original.contains(&q_entry), "the fixture's index sends q_proj to shard 2");
    let case = |name: &str, index: String| -> PathBuf {
        let dir = copy_fixture("f32_sharded", &root.join(name));
        std::fs::write(dir.join(INDEX_FILE), index).unwrap();
        dir
    };
    // The unedited copy loads.
    checkpoint::load(&case("as_written", original.clone())).unwrap();

    let wrong = case(
        "wrong_shard",
        original.replace(&q_entry, &format!("\"{q}\": \"model-00003-of-00010.safetensors\"")),
    );
    assert_mentions(
        &load_error(&wrong),
        &[
            INDEX_FILE,
            q,
            "sends it to `model-00003-of-00010.safetensors`",
            "in `model-00002-of-00010.safetensors`",
        ],
    );

    let ghost = "model.layers.9.mlp.up_proj.weight";
    let extra = case(
        "listed_nowhere",
        original
            .replace(&q_entry, &format!("{q_entry},\n    \"{ghost}\": \"model-00004-of-00010.safetensors\"")),
    );
    assert_mentions(
        &load_error(&extra),
        &[INDEX_FILE, ghost, "`model-00004-of-00010.safetensors`", "does not hold it"],
    );

    let repeated = case(
        "repeated_key",
        original.replace(&q_entry, &format!("{q_entry},\n    \"{q}\": \"model-00002-of-00010.safetensors\"")),
    );
    assert_mentions(&load_error(&repeated), &[INDEX_FILE, q, "more than once"]);

    let unlisted = case("unlisted", original.replace(&format!("{q_entry},"), ""));
    assert_mentions(
        &load_error(&unlisted),
        &[INDEX_FILE, q, "model-00002-of-00010.safetensors", "does not list it"],
    );
    std::fs::remove_dir_all(&root).unwrap();
}

/// A `config.json` as a JSON object.
type ConfigMap = serde_json::Map<String, serde_json::Value>;

/// The fixture's `config.json` (transformers 5.17) with `edit` applied to its JSON.
fn fixture_config(edit: impl FnOnce(&mut ConfigMap)) -> String {
    let text = std::fs::read_to_string(fixture().join("f32_sharded").join("config.json")).unwrap();
    let mut value: serde_json::Value = serde_json::from_str(&text).unwrap();
    edit(value.as_object_mut().unwrap());
    value.to_string()
}

/// Keys that would change the computation are refused by name (they were ignored, and the
/// model computed without the biases); `pretraining_tp` > 1 only changes how transformers
/// slices its products, and is accepted.
#[test]
fn config_keys_the_model_does_not_implement_are_refused_by_name() {
    let plain = LlamaConfig::from_json(&fixture_config(|_| {}), "fixture").unwrap();
    for (key, value, needle) in [
        ("attention_bias", json!(true), "`attention_bias` is true"),
        ("mlp_bias", json!(true), "`mlp_bias` is true"),
        ("attention_dropout", json!(0.1), "`attention_dropout` is non-zero"),
        ("quantization_config", json!({"quant_method": "gptq", "bits": 4}), "`quantization_config` is set"),
    ] {
        let text = fixture_config(|m| {
            m.insert(key.into(), value);
        });
        let err = LlamaConfig::from_json(&text, "edited/config.json").unwrap_err().to_string();
        assert_mentions(&err, &["edited/config.json", needle, "does not implement"]);
    }
    let tp = LlamaConfig::from_json(
        &fixture_config(|m| {
            m.insert("pretraining_tp".into(), json!(4));
        }),
        "tp",
    )
    .unwrap();
    assert_eq!(tp, plain, "pretraining_tp changes nothing the model computes");
    // `cargo xtask config DIR` and every loader read config.json through this path.
    let root = scratch_dir("bias");
    let dir = copy_fixture("bf16", &root);
    std::fs::write(
        dir.join("config.json"),
        fixture_config(|m| {
            m.insert("mlp_bias".into(), json!(true));
        }),
    )
    .unwrap();
    assert_mentions(&load_error(&dir), &["config.json", "`mlp_bias` is true"]);
    std::fs::remove_dir_all(&root).unwrap();
}

/// `rope_scaling` `linear` is read from either spelling of the type (`type`, `rope_type`) and
/// from transformers 5's `rope_parameters`, written back so that it reads the same, and kept
/// through a checkpoint; `null` and `default` are plain RoPE; other types are refused naming the
/// type found and the supported ones.
#[test]
fn rope_scaling_linear_is_read_and_written_and_other_types_are_refused() {
    let linear = |factor: f64| Some(RopeScaling::Linear { factor });
    let read = |edit: &dyn Fn(&mut ConfigMap)| {
        LlamaConfig::from_json(&fixture_config(|m| edit(m)), "edited/config.json")
    };
    let linear_parameters =
        |factor: f64| json!({"rope_theta": 10000.0, "rope_type": "linear", "factor": factor});
    // (case, keys set in the fixture's config.json, what is read)
    let cases = [
        ("null", vec![("rope_scaling", json!(null))], None),
        ("type", vec![("rope_scaling", json!({"type": "linear", "factor": 2.0}))], linear(2.0)),
        ("rope_type", vec![("rope_scaling", json!({"rope_type": "linear", "factor": 4}))], linear(4.0)),
        ("rope_parameters", vec![("rope_parameters", linear_parameters(8.0))], linear(8.0)),
        (
            "both",
            vec![
                ("rope_scaling", json!({"type": "linear", "factor": 2.0})),
                ("rope_parameters", linear_parameters(2.0)),
            ],
            linear(2.0),
        ),
        ("default", vec![("rope_scaling", json!({"rope_type": "default"}))], None),
    ];
    for (name, keys, want) in cases {
        let config = read(&|m| {
            for (key, value) in &keys {
                m.insert(key.to_string(), value.clone());
            }
        })
        .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(config.rope_scaling, want, "{name}");
        assert_eq!(
            config.rope_position_divisor(),
            want.map_or(1.0, |RopeScaling::Linear { factor }| factor),
            "{name}"
        );
        let again = LlamaConfig::from_json(&config.to_json("float32"), "ours").unwrap();
        assert_eq!(again, config, "{name}: written and read back");
    }
    // What we write is what transformers reads: `type` and `rope_type` both, and
    // rope_parameters for transformers 5.
    let mut config = read(&|_| {}).unwrap();
    config.rope_scaling = linear(2.0);
    let written: serde_json::Value = serde_json::from_str(&config.to_json("float32")).unwrap();
    assert_eq!(written["rope_scaling"], json!({"type": "linear", "rope_type": "linear", "factor": 2.0}));
    assert_eq!(
        written["rope_parameters"],
        json!({"rope_theta": 10000.0, "rope_type": "linear", "factor": 2.0})
    );
    // Through a checkpoint.
    let root = scratch_dir("rope_scaling");
    let source = checkpoint::load(&fixture().join("f32_sharded")).unwrap();
    checkpoint::save(&root.join("scaled"), &config, &source.tensors, SaveOptions::default()).unwrap();
    assert_eq!(checkpoint::load(&root.join("scaled")).unwrap().config.rope_scaling, linear(2.0));
    std::fs::remove_dir_all(&root).unwrap();

    for kind in ["dynamic", "yarn", "llama3", "longrope"] {
        for key in ["type", "rope_type"] {
            let err = read(&|m| {
                m.insert("rope_scaling".into(), json!({key: kind, "factor": 2.0}));
            })
            .unwrap_err()
            .to_string();
            assert_mentions(
                &err,
                &[
                    "edited/config.json",
                    &format!("RoPE scaling type `{kind}` is not supported"),
                    "supported: linear",
                ],
            );
        }
        let err = read(&|m| {
            m.insert(
                "rope_parameters".into(),
                json!({"rope_theta": 10000.0, "rope_type": kind, "factor": 2.0}),
            );
        })
        .unwrap_err()
        .to_string();
        assert_mentions(&err, &["rope_parameters", &format!("`{kind}`"), "supported: linear"]);
    }
    for (scaling, needle) in [
        (json!({"type": "linear", "factor": 0.5}), "must be ≥ 1, got 0.5"),
        (json!({"type": "linear"}), "needs a `factor`"),
        (json!({"factor": 2.0}), "no `type` or `rope_type`"),
    ] {
        let err = read(&|m| {
            m.insert("rope_scaling".into(), scaling.clone());
        })
        .unwrap_err()
        .to_string();
        assert_mentions(&err, &["edited/config.json", "rope_scaling", needle]);
    }
    let err = read(&|m| {
        m.insert("rope_scaling".into(), json!({"type": "linear", "factor": 2.0}));
        m.insert(
            "rope_parameters".into(),
            json!({"rope_theta": 10000.0, "rope_type": "linear", "factor": 4.0}),
        );
    })
    .unwrap_err()
    .to_string();
    assert_mentions(&err, &["disagree"]);
}
