//! Checkpoints in the Hugging Face layout: a directory with `config.json` and either
//! `model.safetensors` or `model.safetensors.index.json` plus the shards it names, tensors
//! in f32, f16 or bf16 under Hugging Face's names.
//!
//! Saving never leaves a broken checkpoint behind: everything is written into a fresh sibling
//! directory, which then replaces the target by renames (the old contents are moved aside
//! first and removed only once the new directory is in place).

use crate::config::{LlamaConfig, ParamSpec};
use crate::error::{ModelError, Result};
use half::{bf16, f16};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde::Deserialize;
use serde::de::{Deserializer, MapAccess, Visitor};
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};

pub const CONFIG_FILE: &str = "config.json";
pub const SINGLE_FILE: &str = "model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// Storage type of the tensors in a checkpoint file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoredDType {
    F32,
    F16,
    BF16,
}

impl StoredDType {
    fn safetensors(self) -> Dtype {
        match self {
            Self::F32 => Dtype::F32,
            Self::F16 => Dtype::F16,
            Self::BF16 => Dtype::BF16,
        }
    }

    /// The name `config.json`'s `torch_dtype` uses.
    pub fn torch_name(self) -> &'static str {
        match self {
            Self::F32 => "float32",
            Self::F16 => "float16",
            Self::BF16 => "bfloat16",
        }
    }

    fn size(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::BF16 => 2,
        }
    }

    fn encode(self, values: &[f32]) -> Vec<u8> {
        match self {
            Self::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            Self::F16 => values.iter().flat_map(|&v| f16::from_f32(v).to_le_bytes()).collect(),
            Self::BF16 => values.iter().flat_map(|&v| bf16::from_f32(v).to_le_bytes()).collect(),
        }
    }
}

impl std::str::FromStr for StoredDType {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "f32" | "float32" => Ok(Self::F32),
            "f16" | "float16" => Ok(Self::F16),
            "bf16" | "bfloat16" => Ok(Self::BF16),
            other => Err(format!("unknown checkpoint dtype `{other}`: expected f32, f16 or bf16")),
        }
    }
}

/// A checkpoint read into host memory: the config and every parameter as f32, in the order of
/// [`LlamaConfig::parameters`].
pub struct Checkpoint {
    pub config: LlamaConfig,
    pub tensors: Vec<Vec<f32>>,
    /// The storage type of the first tensor read (files may mix; this is informational).
    pub stored: StoredDType,
}

/// Tensors Hugging Face files may carry that are not parameters (old RoPE buffers).
fn is_ignorable(name: &str) -> bool {
    name.ends_with("rotary_emb.inv_freq")
}

/// The output projection's name, which a tied checkpoint may carry anyway (see [`load`]).
const LM_HEAD: &str = "lm_head.weight";

/// Reads a checkpoint directory.
///
/// A sharded checkpoint's index must agree with its shards: every tensor a shard holds is
/// listed once, for that shard, and every listed tensor is in the shard named.
///
/// With `tie_word_embeddings: true`, an `lm_head.weight` is accepted when it equals the
/// embedding exactly (several converters write both). A different one is refused, naming the
/// tensor and the first differing element: Hugging Face would silently tie (use the embedding
/// and drop the head), which computes something other than what the file holds, so the choice
/// is left to the user (set `tie_word_embeddings` to false to use the head, or delete it).
pub fn load(dir: &Path) -> Result<Checkpoint> {
    if !dir.is_dir() {
        return Err(ModelError::checkpoint(
            dir,
            "not a directory (expected config.json + model.safetensors)",
        ));
    }
    let config = LlamaConfig::load(&dir.join(CONFIG_FILE))?;
    let WeightFiles { files, index } = weight_files(dir)?;
    let specs = config.parameters();
    let position: HashMap<&str, usize> =
        specs.iter().enumerate().map(|(i, s)| (s.name.as_str(), i)).collect();
    let mut tensors: Vec<Option<Vec<f32>>> = vec![None; specs.len()];
    let mut tied_head: Option<(PathBuf, Vec<f32>)> = None;
    let mut stored = None;
    let mut found: HashSet<String> = HashSet::new();
    for file in &files {
        let bytes = fs::read(file).map_err(|e| ModelError::io(file, e))?;
        let st = SafeTensors::deserialize(&bytes)
            .map_err(|e| ModelError::checkpoint(file, format!("not a safetensors file: {e}")))?;
        for (name, view) in st.iter() {
            if let Some(index) = &index {
                index.check_holds(file, name)?;
                found.insert(name.to_string());
            }
            if config.tie_word_embeddings && name == LM_HEAD {
                let shape = [config.vocab_size, config.hidden_size];
                if view.shape() != shape {
                    return Err(ModelError::tensor(
                        file,
                        name,
                        format!(
                            "shape {:?}, config.json implies {shape:?} (tied to the embedding)",
                            view.shape()
                        ),
                    ));
                }
                if tied_head.is_some() {
                    return Err(ModelError::tensor(file, name, "appears more than once"));
                }
                tied_head = Some((file.clone(), decode(file, name, &view)?.0));
                continue;
            }
            let Some(&i) = position.get(name) else {
                if is_ignorable(name) {
                    continue;
                }
                return Err(ModelError::tensor(
                    file,
                    name,
                    "not a parameter of a Llama model with this config.json (unexpected tensor)",
                ));
            };
            let spec = &specs[i];
            if view.shape() != spec.shape.as_slice() {
                return Err(ModelError::tensor(
                    file,
                    name,
                    format!("shape {:?}, config.json implies {:?}", view.shape(), spec.shape),
                ));
            }
            if tensors[i].is_some() {
                return Err(ModelError::tensor(file, name, "appears more than once"));
            }
            let (values, dtype) = decode(file, name, &view)?;
            stored.get_or_insert(dtype);
            tensors[i] = Some(values);
        }
    }
    if let Some(index) = &index {
        index.check_all_found(dir, &found)?;
    }
    let tensors = tensors
        .into_iter()
        .zip(&specs)
        .map(|(t, spec)| {
            t.ok_or_else(|| {
                ModelError::checkpoint(
                    dir,
                    format!(
                        "tensor `{}` (shape {:?}) is missing from {}",
                        spec.name,
                        spec.shape,
                        describe(&files)
                    ),
                )
            })
        })
        .collect::<Result<Vec<_>>>()?;
    if let Some((file, head)) = tied_head {
        check_tied_head(&file, &specs[0].name, &tensors[0], &head, config.hidden_size)?;
    }
    Ok(Checkpoint { config, tensors, stored: stored.unwrap_or(StoredDType::F32) })
}

/// Refuses a tied checkpoint's `lm_head.weight` that is not exactly the embedding (`[V, C]`).
fn check_tied_head(file: &Path, embed_name: &str, embed: &[f32], head: &[f32], hidden: usize) -> Result<()> {
    let Some(i) = embed.iter().zip(head).position(|(a, b)| a.to_bits() != b.to_bits()) else {
        return Ok(());
    };
    Err(ModelError::tensor(
        file,
        LM_HEAD,
        format!(
            "differs from `{embed_name}` (first at [{}, {}]: {} vs {}) but config.json sets \
             tie_word_embeddings: true, which makes the output projection the embedding; \
             Hugging Face would tie and ignore this head. Set tie_word_embeddings to false to \
             use the head, or remove it to tie",
            i / hidden,
            i % hidden,
            head[i],
            embed[i]
        ),
    ))
}

fn describe(files: &[PathBuf]) -> String {
    files
        .iter()
        .map(|f| f.file_name().unwrap_or_default().to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(", ")
}

/// A sharded checkpoint's `weight_map`: tensor name → shard file name.
struct ShardIndex {
    path: PathBuf,
    shard_of: HashMap<String, String>,
}

impl ShardIndex {
    /// `name` was found in `file`: the index must send it there.
    fn check_holds(&self, file: &Path, name: &str) -> Result<()> {
        let here = file.file_name().unwrap_or_default().to_string_lossy();
        match self.shard_of.get(name) {
            Some(listed) if *listed == here => Ok(()),
            Some(listed) => Err(ModelError::tensor(
                &self.path,
                name,
                format!("weight_map sends it to `{listed}`, but it is in `{here}`"),
            )),
            None => Err(ModelError::tensor(
                &self.path,
                name,
                format!("is in shard `{here}` but weight_map does not list it"),
            )),
        }
    }

    /// Every listed tensor must have been found (in its shard, by [`Self::check_holds`]).
    fn check_all_found(&self, dir: &Path, found: &HashSet<String>) -> Result<()> {
        let mut missing: Vec<(&String, &String)> =
            self.shard_of.iter().filter(|(name, _)| !found.contains(*name)).collect();
        missing.sort();
        match missing.first() {
            None => Ok(()),
            Some((name, shard)) => Err(ModelError::tensor(
                &self.path,
                name,
                format!(
                    "weight_map sends it to `{shard}`, which does not hold it (nor does any shard in {})",
                    dir.display()
                ),
            )),
        }
    }
}

/// `weight_map`'s entries in file order with repeats kept (a JSON object read into a map would
/// keep only the last of a repeated key).
struct WeightMapEntries(Vec<(String, Value)>);

impl<'de> Deserialize<'de> for WeightMapEntries {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        struct Entries;
        impl<'de> Visitor<'de> for Entries {
            type Value = WeightMapEntries;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object of tensor name → shard file name")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<Self::Value, A::Error> {
                let mut entries = Vec::new();
                while let Some(entry) = map.next_entry::<String, Value>()? {
                    entries.push(entry);
                }
                Ok(WeightMapEntries(entries))
            }
        }
        deserializer.deserialize_map(Entries)
    }
}

#[derive(Deserialize)]
struct IndexJson {
    weight_map: Option<WeightMapEntries>,
}

/// The safetensors files of a checkpoint (the shards of the index, or the single file), and
/// the index when there is one.
struct WeightFiles {
    files: Vec<PathBuf>,
    index: Option<ShardIndex>,
}

fn weight_files(dir: &Path) -> Result<WeightFiles> {
    let index = dir.join(INDEX_FILE);
    if index.is_file() {
        let text = fs::read_to_string(&index).map_err(|e| ModelError::io(&index, e))?;
        let parsed: IndexJson = serde_json::from_str(&text)
            .map_err(|e| ModelError::checkpoint(&index, format!("not a valid index: {e}")))?;
        let entries =
            parsed.weight_map.ok_or_else(|| ModelError::checkpoint(&index, "has no `weight_map` object"))?;
        let mut shards: Vec<String> = Vec::new();
        let mut shard_of: HashMap<String, String> = HashMap::new();
        for (tensor, file) in entries.0 {
            let file = file
                .as_str()
                .ok_or_else(|| ModelError::tensor(&index, &tensor, "weight_map entry is not a file name"))?;
            if Path::new(file).components().count() != 1 {
                return Err(ModelError::tensor(
                    &index,
                    &tensor,
                    format!("shard `{file}` is not a plain file name"),
                ));
            }
            if let Some(first) = shard_of.get(&tensor) {
                return Err(ModelError::tensor(
                    &index,
                    &tensor,
                    format!("listed more than once in weight_map (`{first}`, then `{file}`)"),
                ));
            }
            if !shards.iter().any(|s| s == file) {
                shards.push(file.to_string());
            }
            shard_of.insert(tensor, file.to_string());
        }
        shards.sort();
        let paths: Vec<PathBuf> = shards.iter().map(|s| dir.join(s)).collect();
        if let Some(missing) = paths.iter().find(|p| !p.is_file()) {
            return Err(ModelError::checkpoint(missing, format!("shard named in {INDEX_FILE} is missing")));
        }
        return Ok(WeightFiles { files: paths, index: Some(ShardIndex { path: index, shard_of }) });
    }
    let single = dir.join(SINGLE_FILE);
    if single.is_file() {
        return Ok(WeightFiles { files: vec![single], index: None });
    }
    Err(ModelError::checkpoint(dir, format!("has neither {SINGLE_FILE} nor {INDEX_FILE}")))
}

fn decode(file: &Path, name: &str, view: &TensorView<'_>) -> Result<(Vec<f32>, StoredDType)> {
    let data = view.data();
    Ok(match view.dtype() {
        Dtype::F32 => (
            data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
            StoredDType::F32,
        ),
        Dtype::F16 => (
            data.chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            StoredDType::F16,
        ),
        Dtype::BF16 => (
            data.chunks_exact(2).map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            StoredDType::BF16,
        ),
        other => {
            return Err(ModelError::tensor(
                file,
                name,
                format!("dtype {other:?} is not supported (f32, f16 or bf16)"),
            ));
        }
    })
}

/// How to write a checkpoint.
#[derive(Clone, Copy, Debug)]
pub struct SaveOptions {
    pub dtype: StoredDType,
    /// Largest shard in bytes; one `model.safetensors` when everything fits.
    pub max_shard_bytes: usize,
}

impl Default for SaveOptions {
    /// f32, shards of at most 5 GB (what `save_pretrained` uses).
    fn default() -> Self {
        Self { dtype: StoredDType::F32, max_shard_bytes: 5_000_000_000 }
    }
}

/// Writes `config.json` and the tensors (f32 values in [`LlamaConfig::parameters`] order) to
/// `dir`, replacing what was there only once the new checkpoint is complete.
pub fn save(dir: &Path, config: &LlamaConfig, tensors: &[Vec<f32>], options: SaveOptions) -> Result<()> {
    save_with(dir, config, tensors, options, &|_| Ok(()))
}

/// [`save`], with `extras` writing more files (optimizer state, a tokenizer) into the staging
/// directory, so they appear together with the model or not at all.
pub fn save_with(
    dir: &Path,
    config: &LlamaConfig,
    tensors: &[Vec<f32>],
    options: SaveOptions,
    extras: &dyn Fn(&Path) -> Result<()>,
) -> Result<()> {
    let specs = config.parameters();
    if tensors.len() != specs.len() || tensors.iter().zip(&specs).any(|(t, s)| t.len() != s.numel()) {
        return Err(ModelError::Input {
            op: "checkpoint::save",
            message: "tensors do not match the configuration's parameters".into(),
        });
    }
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    fs::create_dir_all(&parent).map_err(|e| ModelError::io(&parent, e))?;
    let name = dir.file_name().ok_or_else(|| ModelError::checkpoint(dir, "has no directory name"))?;
    let staging = parent.join(format!(".{}.tmp-{}", name.to_string_lossy(), std::process::id()));
    if staging.exists() {
        fs::remove_dir_all(&staging).map_err(|e| ModelError::io(&staging, e))?;
    }
    fs::create_dir(&staging).map_err(|e| ModelError::io(&staging, e))?;
    let written = write_files(&staging, config, &specs, tensors, options).and_then(|()| extras(&staging));
    if let Err(e) = written {
        let _ = fs::remove_dir_all(&staging);
        return Err(e);
    }
    replace_dir(&staging, dir)
}

fn write_files(
    dir: &Path,
    config: &LlamaConfig,
    specs: &[ParamSpec],
    tensors: &[Vec<f32>],
    options: SaveOptions,
) -> Result<()> {
    let config_path = dir.join(CONFIG_FILE);
    fs::write(&config_path, config.to_json(options.dtype.torch_name()))
        .map_err(|e| ModelError::io(&config_path, e))?;

    // Greedy shards in parameter order, each at most max_shard_bytes (a bigger tensor alone).
    let mut shards: Vec<Vec<usize>> = vec![Vec::new()];
    let mut shard_bytes = 0;
    for (i, spec) in specs.iter().enumerate() {
        let bytes = spec.numel() * options.dtype.size();
        if shard_bytes > 0 && shard_bytes + bytes > options.max_shard_bytes {
            shards.push(Vec::new());
            shard_bytes = 0;
        }
        shards.last_mut().expect("one shard at least").push(i);
        shard_bytes += bytes;
    }
    let count = shards.len();
    let file_name = |k: usize| {
        if count == 1 {
            SINGLE_FILE.to_string()
        } else {
            format!("model-{:05}-of-{count:05}.safetensors", k + 1)
        }
    };
    let metadata = Some(HashMap::from([("format".to_string(), "pt".to_string())]));
    let mut weight_map = BTreeMap::new();
    let mut total = 0usize;
    for (k, members) in shards.iter().enumerate() {
        let path = dir.join(file_name(k));
        let encoded: Vec<(usize, Vec<u8>)> =
            members.iter().map(|&i| (i, options.dtype.encode(&tensors[i]))).collect();
        let views = encoded
            .iter()
            .map(|(i, bytes)| {
                let view = TensorView::new(options.dtype.safetensors(), specs[*i].shape.clone(), bytes)
                    .map_err(|e| ModelError::tensor(&path, &specs[*i].name, format!("cannot encode: {e}")))?;
                Ok((specs[*i].name.clone(), view))
            })
            .collect::<Result<Vec<_>>>()?;
        safetensors::serialize_to_file(views, metadata.clone(), &path)
            .map_err(|e| ModelError::checkpoint(&path, format!("cannot write: {e}")))?;
        for (i, bytes) in &encoded {
            weight_map.insert(specs[*i].name.clone(), file_name(k));
            total += bytes.len();
        }
    }
    if count > 1 {
        let index = json!({ "metadata": { "total_size": total }, "weight_map": weight_map });
        let path = dir.join(INDEX_FILE);
        fs::write(&path, serde_json::to_string_pretty(&index).expect("JSON serialises"))
            .map_err(|e| ModelError::io(&path, e))?;
    }
    Ok(())
}

/// Puts the finished `staging` directory at `target`, moving an existing `target` aside first
/// and deleting it only afterwards.
fn replace_dir(staging: &Path, target: &Path) -> Result<()> {
    if target.exists() {
        if !target.is_dir() {
            let _ = fs::remove_dir_all(staging);
            return Err(ModelError::checkpoint(target, "exists and is not a directory; not overwriting it"));
        }
        let old = staging.with_extension("old");
        if old.exists() {
            fs::remove_dir_all(&old).map_err(|e| ModelError::io(&old, e))?;
        }
        fs::rename(target, &old).map_err(|e| ModelError::io(target, e))?;
        fs::rename(staging, target).map_err(|e| ModelError::io(target, e))?;
        fs::remove_dir_all(&old).map_err(|e| ModelError::io(&old, e))?;
    } else {
        fs::rename(staging, target).map_err(|e| ModelError::io(target, e))?;
    }
    Ok(())
}
