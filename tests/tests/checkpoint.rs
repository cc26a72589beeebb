//! Hugging Face checkpoints: round trips, shards, dtypes, and errors that name the file and
//! tensor.

use dsl::{BackendRuntime, Device};
use model::checkpoint::{self, INDEX_FILE, SINGLE_FILE, SaveOptions, StoredDType};
use model::{Llama, LlamaConfig, Params};
use safetensors::tensor::{Dtype, TensorView};
use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use tests::models::{self, random_params, to_f32};
use tests::*;

/// A fresh directory under the target dir's temp area, removed first if a run left it.
fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("cubellama-checkpoint-{}-{name}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
}

fn tiny() -> (LlamaConfig, Vec<Vec<f32>>) {
    let config = models::tiny_config(41, 32, 40, 2, 4, 2, 16);
    let params = to_f32(&random_params(&config, 5));
    (config, params)
}

fn bits(tensors: &[Vec<f32>]) -> Vec<Vec<u32>> {
    tensors.iter().map(|t| t.iter().map(|v| v.to_bits()).collect()).collect()
}

#[test]
fn save_then_load_is_bit_exact_single_and_sharded() {
    let (config, params) = tiny();
    let root = scratch_dir("roundtrip");
    let single = root.join("single");
    checkpoint::save(&single, &config, &params, SaveOptions::default()).unwrap();
    assert!(single.join(SINGLE_FILE).is_file() && !single.join(INDEX_FILE).exists());
    let loaded = checkpoint::load(&single).unwrap();
    assert_eq!(loaded.config, config);
    assert_eq!(bits(&loaded.tensors), bits(&params));

    let sharded = root.join("sharded");
    checkpoint::save(
        &sharded,
        &config,
        &params,
        SaveOptions { dtype: StoredDType::F32, max_shard_bytes: 8 * 1024 },
    )
    .unwrap();
    let index: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(sharded.join(INDEX_FILE)).unwrap()).unwrap();
    let shards: std::collections::BTreeSet<&str> =
        index["weight_map"].as_object().unwrap().values().map(|v| v.as_str().unwrap()).collect();
    assert!(shards.len() > 2, "expected several shards, got {shards:?}");
    assert!(!sharded.join(SINGLE_FILE).exists());
    let loaded = checkpoint::load(&sharded).unwrap();
    assert_eq!(bits(&loaded.tensors), bits(&params));
    fs::remove_dir_all(&root).unwrap();
}

#[test]
fn half_precision_checkpoints_store_rounded_values() {
    let (config, params) = tiny();
    let root = scratch_dir("half");
    for (dtype, round) in [
        (StoredDType::F16, (|v: f32| half::f16::from_f32(v).to_f32()) as fn(f32) -> f32),
        (StoredDType::BF16, |v: f32| half::bf16::from_f32(v).to_f32()),
    ] {
        let dir = root.join(dtype.torch_name());
        checkpoint::save(&dir, &config, &params, SaveOptions { dtype, ..SaveOptions::default() }).unwrap();
        let loaded = checkpoint::load(&dir).unwrap();
        assert_eq!(loaded.stored, dtype);
        let rounded: Vec<Vec<f32>> = params.iter().map(|t| t.iter().map(|&v| round(v)).collect()).collect();
        assert_eq!(bits(&loaded.tensors), bits(&rounded), "{dtype:?}");
        let text = fs::read_to_string(dir.join("config.json")).unwrap();
        assert!(text.contains(&format!("\"torch_dtype\": \"{}\"", dtype.torch_name())), "{text}");
    }
    fs::remove_dir_all(&root).unwrap();
}

fn device_round_trip<R: BackendRuntime>(dev: &Device<R>) {
    let (config, params) = tiny();
    let root = scratch_dir("device");
    checkpoint::save(&root.join("a"), &config, &params, SaveOptions::default()).unwrap();
    let model = Llama::<R, f32>::load(dev, &root.join("a")).unwrap();
    model.save(dev, &root.join("b"), SaveOptions::default()).unwrap();
    let again = Llama::<R, f32>::load(dev, &root.join("b")).unwrap();
    assert_eq!(bits(&again.params.to_host(dev).unwrap()), bits(&params));
    // The files themselves are identical too.
    for file in ["config.json", SINGLE_FILE] {
        assert_eq!(
            fs::read(root.join("a").join(file)).unwrap(),
            fs::read(root.join("b").join(file)).unwrap(),
            "{file}"
        );
    }
    fs::remove_dir_all(&root).unwrap();
}

#[test]
fn load_to_device_save_load_round_trips_bit_exactly() {
    on_test_backend!(device_round_trip);
}

#[test]
fn saving_over_a_checkpoint_replaces_it_whole_and_never_touches_a_file() {
    let (config, params) = tiny();
    let root = scratch_dir("replace");
    let dir = root.join("ckpt");
    checkpoint::save(
        &dir,
        &config,
        &params,
        SaveOptions { dtype: StoredDType::F32, max_shard_bytes: 8 * 1024 },
    )
    .unwrap();
    // Re-saving unsharded must not leave the old shards or index behind.
    checkpoint::save(&dir, &config, &params, SaveOptions::default()).unwrap();
    let mut names: Vec<String> =
        fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    names.sort();
    assert_eq!(names, ["config.json", SINGLE_FILE]);
    // No staging directories left next to it.
    let siblings: Vec<_> = fs::read_dir(&root).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(siblings, [std::ffi::OsString::from("ckpt")]);
    // A plain file in the way is an error, and stays as it was.
    let file = root.join("precious.txt");
    fs::write(&file, "keep me").unwrap();
    let err = checkpoint::save(&file, &config, &params, SaveOptions::default()).unwrap_err().to_string();
    assert!(err.contains("precious.txt") && err.contains("not a directory"), "{err}");
    assert_eq!(fs::read_to_string(&file).unwrap(), "keep me");
    fs::remove_dir_all(&root).unwrap();
}

/// A tensor to write: name, dtype, shape, little-endian bytes.
type RawTensor = (String, Dtype, Vec<usize>, Vec<u8>);

/// Writes a safetensors file holding `tensors` (name, dtype, shape, bytes).
fn write_safetensors(path: &Path, tensors: &[(&str, Dtype, Vec<usize>, Vec<u8>)]) {
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(name, dtype, shape, bytes)| {
            (name.to_string(), TensorView::new(*dtype, shape.clone(), bytes).unwrap())
        })
        .collect();
    safetensors::serialize_to_file(views, None::<HashMap<String, String>>, path).unwrap();
}

fn f32_bytes(n: usize) -> Vec<u8> {
    (0..n).flat_map(|i| (i as f32 * 0.01).to_le_bytes()).collect()
}

#[test]
fn bad_checkpoints_get_errors_naming_file_and_tensor() {
    let config = models::tiny_config(11, 16, 24, 1, 1, 1, 16);
    let root = scratch_dir("errors");
    let specs = config.parameters();
    let good: Vec<RawTensor> =
        specs.iter().map(|s| (s.name.clone(), Dtype::F32, s.shape.clone(), f32_bytes(s.numel()))).collect();
    let write_case = |case: &str, mutate: &dyn Fn(&mut Vec<RawTensor>)| -> PathBuf {
        let dir = root.join(case);
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("config.json"), config.to_json("float32")).unwrap();
        let mut tensors = good.clone();
        mutate(&mut tensors);
        let borrowed: Vec<(&str, Dtype, Vec<usize>, Vec<u8>)> =
            tensors.iter().map(|(n, d, s, b)| (n.as_str(), *d, s.clone(), b.clone())).collect();
        write_safetensors(&dir.join(SINGLE_FILE), &borrowed);
        dir
    };
    let expect = |dir: &Path, needles: &[&str]| {
        let err = checkpoint::load(dir).err().expect("must fail").to_string();
        for needle in needles {
            assert!(err.contains(needle), "`{err}` should mention `{needle}`");
        }
    };

    let dir = write_case("ok", &|_| {});
    assert!(checkpoint::load(&dir).is_ok());
    let q = "model.layers.0.self_attn.q_proj.weight";
    let dir = write_case("missing", &|t| t.retain(|(n, ..)| n != q));
    expect(&dir, &["missing", q, SINGLE_FILE]);
    let dir = write_case("shape", &|t| {
        let e = t.iter_mut().find(|(n, ..)| n == q).unwrap();
        e.2 = vec![8, 32];
    });
    expect(&dir, &[q, "shape [8, 32]", "[16, 16]", SINGLE_FILE]);
    let dir = write_case("dtype", &|t| {
        let e = t.iter_mut().find(|(n, ..)| n == q).unwrap();
        e.1 = Dtype::I32;
    });
    expect(&dir, &[q, "I32", "not supported"]);
    let dir = write_case("unexpected", &|t| {
        t.push(("model.layers.7.mlp.up_proj.weight".into(), Dtype::F32, vec![2], f32_bytes(2)))
    });
    expect(&dir, &["model.layers.7.mlp.up_proj.weight", "unexpected"]);
    // Old checkpoints carry RoPE buffers: ignored.
    let dir = write_case("inv_freq", &|t| {
        t.push(("model.layers.0.self_attn.rotary_emb.inv_freq".into(), Dtype::F32, vec![8], f32_bytes(8)))
    });
    assert!(checkpoint::load(&dir).is_ok());

    // Missing files.
    expect(&root.join("nowhere"), &["nowhere", "not a directory"]);
    let dir = write_case("no_config", &|_| {});
    fs::remove_file(dir.join("config.json")).unwrap();
    expect(&dir, &["config.json"]);
    let dir = write_case("no_weights", &|_| {});
    fs::remove_file(dir.join(SINGLE_FILE)).unwrap();
    expect(&dir, &["neither", SINGLE_FILE, INDEX_FILE]);
    let dir = write_case("missing_shard", &|_| {});
    fs::write(
        dir.join(INDEX_FILE),
        r#"{"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}"#,
    )
    .unwrap();
    expect(&dir, &["model-00002-of-00002.safetensors", "missing"]);
    let dir = write_case("garbage", &|_| {});
    fs::write(dir.join(SINGLE_FILE), b"not a safetensors file").unwrap();
    expect(&dir, &[SINGLE_FILE, "not a safetensors file"]);
    fs::remove_dir_all(&root).unwrap();
}

fn params_must_match<R: BackendRuntime>(dev: &Device<R>) {
    let config = models::tiny_config(11, 16, 24, 1, 1, 1, 16);
    let mut values = to_f32(&random_params(&config, 1));
    values[3].pop();
    let err = Params::<R, f32>::from_host(dev, &config, &values).err().unwrap().to_string();
    assert!(err.contains(&config.parameters()[3].name), "{err}");
}

#[test]
fn uploading_parameters_checks_their_sizes() {
    on_test_backend!(params_must_match);
}
