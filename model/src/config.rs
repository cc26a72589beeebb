//! The Hugging Face `LlamaConfig` (the fields this model uses), its presets, and what a
//! configuration costs: parameters, and memory for a training step.

use crate::error::{ModelError, Result};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use std::fmt;
use std::path::Path;

/// Hyper-parameters of a Llama model, named as in Hugging Face's `config.json`.
#[derive(Clone, Debug, PartialEq)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    /// Width of one attention head; `hidden_size / num_attention_heads` unless a file says.
    pub head_dim: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    /// `lm_head` shares `embed_tokens`' matrix (and gradient).
    pub tie_word_embeddings: bool,
    /// How RoPE stretches positions for a longer context (`rope_scaling`); `None` is plain RoPE.
    pub rope_scaling: Option<RopeScaling>,
}

/// A RoPE scaling method of Hugging Face's `rope_scaling` (or transformers 5's
/// `rope_parameters`) that this model implements.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RopeScaling {
    /// Position interpolation (Chen et al. 2023, "Extending Context Window of Large Language
    /// Models via Positional Interpolation"; transformers' `LlamaLinearScalingRotaryEmbedding`):
    /// position `p` is rotated as position `p / factor`, the frequencies unchanged. `factor ≥ 1`.
    Linear { factor: f64 },
}

impl RopeScaling {
    /// The `type` / `rope_type` values this model implements (besides `default`, no scaling).
    pub const SUPPORTED: [&str; 1] = ["linear"];
}

/// The named shapes: Llama 2's released sizes, a 34B shape, and llama2.c's small models.
pub const PRESETS: [&str; 9] = [
    "llama2-7b",
    "llama2-13b",
    "llama2-34b",
    "llama2-70b",
    "stories260k",
    "stories15m",
    "stories42m",
    "stories110m",
    "tiny",
];

/// `config.json` as files in the wild write it: optional fields, `rope_theta` at the top
/// (transformers ≤ 4) or in `rope_parameters` (transformers 5), unknown keys ignored except
/// those that would change the computation (see [`LlamaConfig::from_json`]).
#[derive(Deserialize)]
struct RawConfig {
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    max_position_embeddings: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_parameters: Option<RopeParameters>,
    rope_scaling: Option<Value>,
    tie_word_embeddings: Option<bool>,
    hidden_act: Option<String>,
    model_type: Option<String>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    attention_dropout: Option<f64>,
    quantization_config: Option<Value>,
}

#[derive(Deserialize)]
struct RopeParameters {
    rope_theta: Option<f64>,
    rope_type: Option<String>,
    factor: Option<Value>,
}

/// Reads a `rope_scaling` / `rope_parameters` object: its type under `type` (transformers < 4.45)
/// or `rope_type` (later), and for `linear` its `factor`. `default` (and an absent type in
/// `rope_parameters`) is plain RoPE.
fn rope_scaling_of(
    kind: Option<&str>,
    factor: Option<&Value>,
    key: &str,
    origin: &str,
) -> Result<Option<RopeScaling>> {
    let error = |message: String| ModelError::Config(format!("{origin}: {key}: {message}"));
    match kind {
        None | Some("default") => Ok(None),
        Some("linear") => {
            let factor = factor
                .ok_or_else(|| error("RoPE scaling type `linear` needs a `factor`".into()))?
                .as_f64()
                .ok_or_else(|| error("the linear RoPE scaling `factor` must be a number".into()))?;
            // transformers' rope_config_validation asks the same (a factor below 1 would
            // compress the context instead of stretching it).
            if !(factor.is_finite() && factor >= 1.0) {
                return Err(error(format!("the linear RoPE scaling factor must be ≥ 1, got {factor}")));
            }
            Ok(Some(RopeScaling::Linear { factor }))
        }
        Some(other) => Err(error(format!(
            "RoPE scaling type `{other}` is not supported; supported: {} (or none: `default`, null)",
            RopeScaling::SUPPORTED.join(", ")
        ))),
    }
}

impl LlamaConfig {
    /// A preset by name (see [`PRESETS`]).
    pub fn preset(name: &str) -> Result<Self> {
        let llama2 = |hidden, inter, layers, heads, kv_heads| {
            Self::new(32_000, hidden, inter, layers, heads, kv_heads, 4096)
        };
        let stories = |vocab, hidden, inter, layers, heads, kv_heads, context| {
            Self::new(vocab, hidden, inter, layers, heads, kv_heads, context)
        };
        Ok(match name {
            "llama2-7b" => llama2(4096, 11008, 32, 32, 32),
            "llama2-13b" => llama2(5120, 13824, 40, 40, 40),
            // The 34B shape of the Llama 2 paper (never released; Code Llama 34B has it).
            "llama2-34b" => llama2(8192, 22016, 48, 64, 8),
            "llama2-70b" => llama2(8192, 28672, 80, 64, 8),
            // llama2.c's TinyStories models. 260K has head_dim 8, below the attention
            // kernels' smallest (16), so it uses 4 heads of 16 instead of 8 of 8.
            "stories260k" => stories(512, 64, 172, 5, 4, 2, 512),
            "stories15m" => stories(32_000, 288, 768, 6, 6, 6, 256),
            "stories42m" => stories(32_000, 512, 1376, 8, 8, 8, 1024),
            "stories110m" => stories(32_000, 768, 2048, 12, 12, 12, 1024),
            // Small enough for a CPU-emulated GPU: the README's default training run.
            "tiny" => stories(512, 128, 344, 4, 4, 2, 256),
            other => {
                return Err(ModelError::Config(format!(
                    "unknown preset `{other}`; expected one of {}",
                    PRESETS.join(", ")
                )));
            }
        })
    }

    /// Llama 2 defaults (eps 1e-5, θ 10000, untied) for the given shape.
    pub fn new(
        vocab_size: usize,
        hidden_size: usize,
        intermediate_size: usize,
        num_hidden_layers: usize,
        num_attention_heads: usize,
        num_key_value_heads: usize,
        max_position_embeddings: usize,
    ) -> Self {
        Self {
            vocab_size,
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim: hidden_size / num_attention_heads.max(1),
            max_position_embeddings,
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            tie_word_embeddings: false,
            rope_scaling: None,
        }
    }

    /// Parses `config.json` text; `origin` names the file in errors.
    ///
    /// Refused, by key: `model_type` other than `llama`, `hidden_act` other than `silu`,
    /// `attention_bias` or `mlp_bias` true, a non-zero `attention_dropout`, a
    /// `quantization_config`, and RoPE scaling other than `linear` (in `rope_scaling`, under
    /// `type` or `rope_type`, or in `rope_parameters`). `pretraining_tp` is accepted and ignored:
    /// it only changes how transformers slices the same products.
    pub fn from_json(text: &str, origin: &str) -> Result<Self> {
        let raw: RawConfig = serde_json::from_str(text)
            .map_err(|e| ModelError::Config(format!("{origin}: not a Llama config.json: {e}")))?;
        if let Some(kind) = raw.model_type.as_deref()
            && kind != "llama"
        {
            return Err(ModelError::Config(format!("{origin}: model_type is `{kind}`, expected `llama`")));
        }
        if let Some(act) = raw.hidden_act.as_deref()
            && act != "silu"
        {
            return Err(ModelError::Config(format!(
                "{origin}: hidden_act is `{act}`; this model implements SwiGLU (`silu`) only"
            )));
        }
        // Keys that change what the model computes and that it does not implement: refused by
        // name rather than ignored (a file asking for biases would load and compute without
        // them). `pretraining_tp` only changes how transformers slices its products (the same
        // sums), so it is accepted and ignored.
        let refused = [
            ("attention_bias", raw.attention_bias == Some(true), "true: biases on q, k, v, o"),
            ("mlp_bias", raw.mlp_bias == Some(true), "true: biases on gate, up, down"),
            (
                "attention_dropout",
                raw.attention_dropout.is_some_and(|p| p != 0.0),
                "non-zero: dropout on the attention probabilities",
            ),
            ("quantization_config", raw.quantization_config.as_ref().is_some_and(|v| !v.is_null()), "set"),
        ];
        if let Some((key, _, what)) = refused.iter().find(|(_, on, _)| *on) {
            return Err(ModelError::Config(format!(
                "{origin}: `{key}` is {what}, which this model does not implement"
            )));
        }
        let from_parameters = match &raw.rope_parameters {
            Some(p) => rope_scaling_of(p.rope_type.as_deref(), p.factor.as_ref(), "rope_parameters", origin)?,
            None => None,
        };
        let from_scaling = match raw.rope_scaling.as_ref().filter(|v| !v.is_null()) {
            Some(Value::Object(map)) => {
                let kind = map.get("rope_type").or_else(|| map.get("type"));
                let kind = match kind {
                    Some(Value::String(kind)) => Some(kind.as_str()),
                    Some(_) => {
                        return Err(ModelError::Config(format!(
                            "{origin}: rope_scaling: the RoPE scaling type must be a string"
                        )));
                    }
                    None => {
                        return Err(ModelError::Config(format!(
                            "{origin}: rope_scaling has no `type` or `rope_type`"
                        )));
                    }
                };
                rope_scaling_of(kind, map.get("factor"), "rope_scaling", origin)?
            }
            Some(_) => {
                return Err(ModelError::Config(format!("{origin}: rope_scaling must be an object or null")));
            }
            None => None,
        };
        let rope_scaling = match (from_parameters, from_scaling) {
            (Some(a), Some(b)) if a != b => {
                return Err(ModelError::Config(format!(
                    "{origin}: rope_parameters ({a:?}) and rope_scaling ({b:?}) disagree"
                )));
            }
            (a, b) => a.or(b),
        };
        let heads = raw.num_attention_heads;
        let config = Self {
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_hidden_layers: raw.num_hidden_layers,
            num_attention_heads: heads,
            num_key_value_heads: raw.num_key_value_heads.unwrap_or(heads),
            head_dim: raw.head_dim.unwrap_or(raw.hidden_size / heads.max(1)),
            max_position_embeddings: raw.max_position_embeddings.unwrap_or(4096),
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-6),
            rope_theta: raw.rope_parameters.and_then(|p| p.rope_theta).or(raw.rope_theta).unwrap_or(10_000.0),
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            rope_scaling,
        };
        config.validate().map_err(|e| ModelError::Config(format!("{origin}: {e}")))?;
        Ok(config)
    }

    /// Reads `config.json` from a file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        Self::from_json(&text, &path.display().to_string())
    }

    /// `config.json` as transformers writes it for `LlamaForCausalLM` (θ both at the top, for
    /// older readers, and in `rope_parameters`, for transformers 5).
    pub fn to_json(&self, dtype: &str) -> String {
        let mut map = Map::new();
        let fields = json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_parameters": { "rope_theta": self.rope_theta, "rope_type": "default" },
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "attention_bias": false,
            "mlp_bias": false,
            "torch_dtype": dtype,
            "bos_token_id": 1,
            "eos_token_id": 2,
        });
        if let Value::Object(fields) = fields {
            map.extend(fields);
        }
        if let Some(RopeScaling::Linear { factor }) = self.rope_scaling {
            // Both spellings of the type: transformers < 4.45 reads `type`, later ones
            // `rope_type`; transformers 5 reads `rope_parameters`.
            map.insert(
                "rope_scaling".into(),
                json!({ "type": "linear", "rope_type": "linear", "factor": factor }),
            );
            map.insert(
                "rope_parameters".into(),
                json!({ "rope_theta": self.rope_theta, "rope_type": "linear", "factor": factor }),
            );
        }
        serde_json::to_string_pretty(&Value::Object(map)).expect("a JSON object serialises")
    }

    /// Checks what the kernels need: positive sizes, whole head groups, a supported head_dim.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let sizes = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        if let Some((name, _)) = sizes.iter().find(|(_, v)| *v == 0) {
            return Err(format!("{name} must be positive"));
        }
        if !self.num_attention_heads.is_multiple_of(self.num_key_value_heads) {
            return Err(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        if !kernels::attention::SUPPORTED_HEAD_DIMS.contains(&self.head_dim) {
            return Err(format!(
                "head_dim {} is not supported by the attention kernels (supported: {:?})",
                self.head_dim,
                kernels::attention::SUPPORTED_HEAD_DIMS
            ));
        }
        if self.vocab_size > i32::MAX as usize {
            return Err(format!("vocab_size {} does not fit token ids", self.vocab_size));
        }
        if !(self.rms_norm_eps > 0.0 && self.rope_theta > 0.0) {
            return Err("rms_norm_eps and rope_theta must be positive".into());
        }
        if let Some(RopeScaling::Linear { factor }) = self.rope_scaling
            && !(factor.is_finite() && factor >= 1.0)
        {
            return Err(format!("the linear RoPE scaling factor must be ≥ 1, got {factor}"));
        }
        Ok(())
    }

    /// What RoPE divides positions by before taking the angles: the linear scaling factor, or
    /// 1 for plain RoPE.
    pub fn rope_position_divisor(&self) -> f64 {
        match self.rope_scaling {
            None => 1.0,
            Some(RopeScaling::Linear { factor }) => factor,
        }
    }

    pub fn q_dim(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }

    pub fn kv_dim(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }

    /// Every parameter tensor with its Hugging Face name and shape, in checkpoint order.
    pub fn parameters(&self) -> Vec<ParamSpec> {
        let (c, i, v) = (self.hidden_size, self.intermediate_size, self.vocab_size);
        let mut specs = vec![ParamSpec::new("model.embed_tokens.weight".into(), vec![v, c])];
        for l in 0..self.num_hidden_layers {
            for w in LayerWeight::ALL {
                let shape = match w {
                    LayerWeight::InputNorm | LayerWeight::PostAttentionNorm => vec![c],
                    LayerWeight::Q => vec![self.q_dim(), c],
                    LayerWeight::K | LayerWeight::V => vec![self.kv_dim(), c],
                    LayerWeight::O => vec![c, self.q_dim()],
                    LayerWeight::Gate | LayerWeight::Up => vec![i, c],
                    LayerWeight::Down => vec![c, i],
                };
                specs.push(ParamSpec::new(format!("model.layers.{l}.{}", w.suffix()), shape));
            }
        }
        specs.push(ParamSpec::new("model.norm.weight".into(), vec![c]));
        if !self.tie_word_embeddings {
            specs.push(ParamSpec::new("lm_head.weight".into(), vec![v, c]));
        }
        specs
    }

    /// Number of parameters (a tied lm_head counted once).
    pub fn parameter_count(&self) -> usize {
        self.parameters().iter().map(|p| p.numel()).sum()
    }

    /// FLOPs of one training token (forward + backward) at sequence length `seq`, as MFU counts
    /// them (PaLM's appendix B): 6 per weight of every matrix product (the embedding lookup is
    /// not one; lm_head is), plus the attention products, 6·2·L·(Hq·hd)·T for full attention
    /// (the causal half is not discounted, as in the usual MFU figures).
    pub fn training_flops_per_token(&self, seq: usize) -> f64 {
        let vc = self.vocab_size * self.hidden_size;
        let matrices =
            self.parameters().iter().filter(|p| p.shape.len() == 2).map(|p| p.numel()).sum::<usize>();
        // Take out the embedding table and, untied, lm_head's own copy; add lm_head's product.
        let layer_matrices = matrices - if self.tie_word_embeddings { vc } else { 2 * vc };
        let attention = 12 * self.num_hidden_layers * self.q_dim() * seq;
        6.0 * (layer_matrices + vc) as f64 + attention as f64
    }

    /// Bytes a training step at `batch × seq` holds on the device when computing in a type of
    /// `compute_bytes` per element: the parameters, the f32 master copy (`master`), the weight
    /// gradients (always f32), AdamW's two f32 moments, and the saved activations and scratch of
    /// [`crate::Activations`] with logits blocks of `head_rows` rows (see
    /// [`crate::activations::HeadChunk::rows`]; `batch · seq` keeps them whole) and `recompute`.
    pub fn training_memory(
        &self,
        batch: usize,
        seq: usize,
        compute_bytes: usize,
        master: bool,
        head_rows: usize,
        recompute: crate::activations::Recompute,
    ) -> MemoryEstimate {
        let params = self.parameter_count();
        MemoryEstimate {
            parameters: params * compute_bytes,
            master: if master { params * 4 } else { 0 },
            gradients: params * 4,
            optimizer: params * 8,
            activations: crate::activations::activation_bytes_with(
                self,
                batch,
                seq,
                compute_bytes,
                head_rows,
                (batch * seq).clamp(1, 4 * 132),
                recompute,
            ),
        }
    }
}

/// The nine tensors of one decoder layer, in checkpoint order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerWeight {
    InputNorm,
    Q,
    K,
    V,
    O,
    PostAttentionNorm,
    Gate,
    Up,
    Down,
}

impl LayerWeight {
    pub const ALL: [LayerWeight; 9] = [
        Self::InputNorm,
        Self::Q,
        Self::K,
        Self::V,
        Self::O,
        Self::PostAttentionNorm,
        Self::Gate,
        Self::Up,
        Self::Down,
    ];

    /// The name after `model.layers.{i}.`.
    pub fn suffix(self) -> &'static str {
        match self {
            Self::InputNorm => "input_layernorm.weight",
            Self::Q => "self_attn.q_proj.weight",
            Self::K => "self_attn.k_proj.weight",
            Self::V => "self_attn.v_proj.weight",
            Self::O => "self_attn.o_proj.weight",
            Self::PostAttentionNorm => "post_attention_layernorm.weight",
            Self::Gate => "mlp.gate_proj.weight",
            Self::Up => "mlp.up_proj.weight",
            Self::Down => "mlp.down_proj.weight",
        }
    }

    pub fn is_norm(self) -> bool {
        matches!(self, Self::InputNorm | Self::PostAttentionNorm)
    }
}

/// One parameter tensor's name and shape.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParamSpec {
    pub name: String,
    pub shape: Vec<usize>,
}

impl ParamSpec {
    fn new(name: String, shape: Vec<usize>) -> Self {
        Self { name, shape }
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Device memory of a training step, by purpose, in bytes.
#[derive(Clone, Copy, Debug)]
pub struct MemoryEstimate {
    /// The parameters the model computes with.
    pub parameters: usize,
    /// The f32 master copy AdamW updates (0 without one).
    pub master: usize,
    /// The f32 weight gradients.
    pub gradients: usize,
    /// AdamW's f32 `m` and `v`.
    pub optimizer: usize,
    pub activations: usize,
}

impl MemoryEstimate {
    pub fn total(&self) -> usize {
        self.parameters + self.master + self.gradients + self.optimizer + self.activations
    }

    /// `1.2 GiB (parameters bf16 …, f32 master …, f32 gradients …, AdamW …, activations …)`.
    pub fn describe(&self, compute: impl fmt::Display) -> String {
        let master = if self.master > 0 {
            format!(", f32 master {}", human_bytes(self.master))
        } else {
            String::new()
        };
        format!(
            "{} (parameters {compute} {}{master}, f32 gradients {}, AdamW {}, activations {})",
            human_bytes(self.total()),
            human_bytes(self.parameters),
            human_bytes(self.gradients),
            human_bytes(self.optimizer),
            human_bytes(self.activations),
        )
    }
}

/// `1.23 GiB`-style sizes.
pub fn human_bytes(bytes: usize) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < units.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 { format!("{bytes} B") } else { format!("{value:.2} {}", units[unit]) }
}

/// `6.74B`-style counts.
pub fn human_count(n: usize) -> String {
    match n {
        n if n >= 1_000_000_000 => format!("{:.2}B", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.2}M", n as f64 / 1e6),
        n if n >= 1_000 => format!("{:.1}K", n as f64 / 1e3),
        n => n.to_string(),
    }
}

impl fmt::Display for LlamaConfig {
    /// The shape, the parameter count, and the memory of a training step at batch 1 × the full
    /// context in f32 and in bf16.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "Llama: {} layers, hidden {}, MLP {}, {} heads ({} key/value, head_dim {}), vocab {}, \
             context {}, eps {:e}, rope θ {}{}{}",
            self.num_hidden_layers,
            self.hidden_size,
            self.intermediate_size,
            self.num_attention_heads,
            self.num_key_value_heads,
            self.head_dim,
            self.vocab_size,
            self.max_position_embeddings,
            self.rms_norm_eps,
            self.rope_theta,
            match self.rope_scaling {
                Some(RopeScaling::Linear { factor }) => format!(" (linear scaling ×{factor})"),
                None => String::new(),
            },
            if self.tie_word_embeddings { ", tied embeddings" } else { "" },
        )?;
        writeln!(f, "parameters: {} ({})", human_count(self.parameter_count()), self.parameter_count())?;
        let context = self.max_position_embeddings;
        let head_rows = crate::activations::HeadChunk::Auto.rows(self, context).unwrap_or(context);
        for (label, dtype, bytes, master) in [
            ("f32", "f32", 4, false),
            ("bf16, f32 master weights (--master-weights f32)", "bf16", 2, true),
            ("bf16, no master (--master-weights none)", "bf16", 2, false),
        ] {
            let m = self.training_memory(1, context, bytes, master, head_rows, Default::default());
            writeln!(f, "training step, batch 1 × {context} tokens, {label}: {}", m.describe(dtype))?;
        }
        let m = self.training_memory(1, context, 2, true, head_rows, crate::activations::Recompute::Layer);
        writeln!(
            f,
            "  the bf16 step recomputing each layer in the backward (--recompute layer): {}",
            m.describe("bf16")
        )?;
        writeln!(
            f,
            "  (logits {head_rows} rows at a time, --lm-head-chunk auto; `cargo xtask config NAME --batch B \
             --seq-len T --dtype D ...` sizes another step)"
        )?;
        Ok(())
    }
}
