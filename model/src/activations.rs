//! Every buffer a forward and backward at one (batch, sequence) shape needs, allocated once so
//! a training step allocates nothing on the device.
//!
//! Saved for the backward, per layer: the normalised inputs of both sub-blocks and their
//! reciprocal RMS, q and k after RoPE, v, the attention output and its log-sum-exp, the
//! residual stream between the sub-blocks, and the MLP's gate, up and SwiGLU output. The
//! residual stream entering each layer is kept too (`stream[l]`; `stream[L]` feeds the final
//! norm). With [`Recompute::Layer`] only the streams are kept: one set of layer buffers serves
//! every layer, and the backward runs each layer's forward again from `stream[l]` before its
//! backward (activation checkpointing at layer granularity, as Megatron's full recomputation).
//!
//! The logits are the exception to "saved": a training step computes them a block of rows at a
//! time ([`HeadChunk`]) and overwrites each block with its gradient, so `[B·T, V]` (at 16k
//! tokens × 32000 × 4 bytes, 2 GB: a Llama 2 step's largest activation) never exists whole.

use crate::config::LlamaConfig;
use crate::error::{ModelError, Result};
use cubecl::Runtime;
use dsl::{Device, FloatElement, GpuTensor};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// How many rows of logits the lm_head and cross-entropy compute at a time (Liger's fused
/// linear cross-entropy): for each block, logits → loss and their gradient in place → the
/// block's input gradient and its lm_head weight-gradient term. On wgpu (tested on lavapipe)
/// the loss and every gradient but lm_head's are bit-identical to [`HeadChunk::Full`], and
/// lm_head's gradient sums the blocks' terms in another order (f32 round-off; the tests state
/// the tolerance). On CUDA the tensor-core GEMM picks its tiling from the row count, so a
/// block's logits may round differently from the whole's (not yet checked on a GPU).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HeadChunk {
    /// Blocks about as large as a hidden activation `[B·T, C]` (`B·T / ⌈V/C⌉` rows, rounded up
    /// to a multiple of [`HeadChunk::ROW_MULTIPLE`]), as Liger sizes them.
    #[default]
    Auto,
    /// All `B·T` rows at once: the logits are kept whole (what evaluation and the tests that
    /// read logits use).
    Full,
    /// Blocks of this many rows (a positive multiple of [`HeadChunk::ROW_MULTIPLE`]).
    Rows(usize),
}

impl HeadChunk {
    /// Blocks start at multiples of this many rows, so every block's views of the hidden
    /// states, targets and per-row losses start on [`dsl::VIEW_ALIGN_BYTES`].
    pub const ROW_MULTIPLE: usize = 128;

    /// Rows per block for `tokens` rows of `config` (at most `tokens`).
    ///
    /// Errors: `Rows(r)` with `r` zero or not a multiple of [`Self::ROW_MULTIPLE`].
    pub fn rows(self, config: &LlamaConfig, tokens: usize) -> Result<usize> {
        let rows = match self {
            Self::Full => tokens,
            Self::Auto => {
                let blocks = config.vocab_size.div_ceil(config.hidden_size.max(1)).max(1);
                tokens.div_ceil(blocks).next_multiple_of(Self::ROW_MULTIPLE)
            }
            Self::Rows(r) if r > 0 && r.is_multiple_of(Self::ROW_MULTIPLE) => r,
            Self::Rows(r) => {
                return Err(ModelError::Input {
                    op: "HeadChunk",
                    message: format!(
                        "lm_head chunk of {r} rows: must be a positive multiple of {}",
                        Self::ROW_MULTIPLE
                    ),
                });
            }
        };
        Ok(rows.min(tokens).max(1))
    }
}

/// What the forward keeps for the backward (`--recompute`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Recompute {
    /// Every layer's activations are kept: nothing is computed twice.
    #[default]
    None,
    /// Only each layer's input (`stream[l]`) is kept; the backward recomputes the layer's
    /// forward before its backward (one more forward per step, about a third more compute).
    /// The kernels are deterministic, so the gradients are bit-identical to [`Recompute::None`].
    Layer,
}

impl fmt::Display for Recompute {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::None => "none",
            Self::Layer => "layer",
        })
    }
}

impl FromStr for Recompute {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "none" => Ok(Self::None),
            "layer" => Ok(Self::Layer),
            _ => Err(format!("`{s}`: expected none or layer")),
        }
    }
}

/// How a training step's activations are laid out: the head's blocks and what is recomputed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ActivationPlan {
    pub head: HeadChunk,
    pub recompute: Recompute,
}

impl fmt::Display for HeadChunk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Auto => write!(f, "auto"),
            Self::Full => write!(f, "full"),
            Self::Rows(r) => write!(f, "{r}"),
        }
    }
}

impl FromStr for HeadChunk {
    type Err = String;

    /// `auto`, `full`, or a row count.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "full" | "off" => Ok(Self::Full),
            n => n
                .parse()
                .map(Self::Rows)
                .map_err(|_| format!("`{s}`: expected auto, full, or a number of rows")),
        }
    }
}

/// The tensors one layer saves in the forward.
pub struct LayerActivations<R: Runtime, F: FloatElement> {
    pub rstd_attn: GpuTensor<R, f32>,
    pub normed_attn: GpuTensor<R, F>,
    pub q_rot: GpuTensor<R, F>,
    pub k_rot: GpuTensor<R, F>,
    pub v: GpuTensor<R, F>,
    pub attn: GpuTensor<R, F>,
    pub lse: GpuTensor<R, f32>,
    pub mid: GpuTensor<R, F>,
    pub rstd_mlp: GpuTensor<R, f32>,
    pub normed_mlp: GpuTensor<R, F>,
    pub gate: GpuTensor<R, F>,
    pub up: GpuTensor<R, F>,
    pub act: GpuTensor<R, F>,
}

/// Forward and backward buffers for `batch × seq` tokens.
pub struct Activations<R: Runtime, F: FloatElement> {
    pub batch: usize,
    pub seq: usize,
    /// With [`Recompute::Layer`], `layers` holds one set shared by every layer.
    pub recompute: Recompute,
    /// `stream[l]`: the residual stream entering layer `l`; `stream[L]`: leaving the last one.
    pub stream: Vec<GpuTensor<R, F>>,
    /// Layer `l`'s saved tensors are `layers[self.slot(l)]`.
    pub layers: Vec<LayerActivations<R, F>>,
    // Forward scratch: q and k before RoPE.
    pub q_proj: GpuTensor<R, F>,
    pub k_proj: GpuTensor<R, F>,
    pub rstd_final: GpuTensor<R, f32>,
    pub normed_final: GpuTensor<R, F>,
    /// `[head_rows, V]`: the logits of one block of rows (all of them with [`HeadChunk::Full`]);
    /// after a training loss, their gradient (written in place).
    pub logits: GpuTensor<R, F>,
    /// Rows of logits per block (see [`HeadChunk`]); `batch · seq` when kept whole.
    pub head_rows: usize,
    pub row_loss: GpuTensor<R, f32>,
    /// `[1]`: the mean cross-entropy over counted targets.
    pub loss: GpuTensor<R, f32>,
    // Backward scratch.
    pub d_stream: GpuTensor<R, F>,
    pub d_normed: GpuTensor<R, F>,
    pub d_attn: GpuTensor<R, F>,
    pub d_q_rot: GpuTensor<R, F>,
    pub d_q: GpuTensor<R, F>,
    pub d_k_rot: GpuTensor<R, F>,
    pub d_k: GpuTensor<R, F>,
    pub d_v: GpuTensor<R, F>,
    pub delta: GpuTensor<R, f32>,
    pub d_act: GpuTensor<R, F>,
    pub d_gate: GpuTensor<R, F>,
    pub d_up: GpuTensor<R, F>,
    pub norm_scratch: GpuTensor<R, f32>,
}

/// Bytes of [`Activations`] for `batch × seq` with `param_bytes`-wide elements, logits blocks
/// of `head_rows` rows (see [`HeadChunk::rows`]), an RMSNorm backward scratch of
/// `norm_scratch_rows` rows (see [`kernels::rmsnorm::rmsnorm_backward_scratch_rows`]), and
/// `recompute`.
pub fn activation_bytes_with(
    config: &LlamaConfig,
    batch: usize,
    seq: usize,
    param_bytes: usize,
    head_rows: usize,
    norm_scratch_rows: usize,
    recompute: Recompute,
) -> usize {
    let n = batch * seq;
    let (c, i, v, hq) =
        (config.hidden_size, config.intermediate_size, config.vocab_size, config.num_attention_heads);
    let (qd, kvd) = (config.q_dim(), config.kv_dim());
    let layers = layer_slots(config, recompute);
    let per_layer = n * (3 * c + 2 * qd + 2 * kvd + 3 * i) * param_bytes + 4 * n * (2 + hq);
    let stream = (config.num_hidden_layers + 1) * n * c * param_bytes;
    let forward_scratch = (n * (qd + kvd + c) + head_rows * v) * param_bytes + 4 * (2 * n + 1);
    let backward_scratch =
        n * (2 * c + 3 * qd + 3 * kvd + 3 * i) * param_bytes + 4 * (n * hq + norm_scratch_rows * c);
    layers * per_layer + stream + forward_scratch + backward_scratch
}

/// Sets of layer buffers: one per layer, or one shared by all when recomputing.
fn layer_slots(config: &LlamaConfig, recompute: Recompute) -> usize {
    match recompute {
        Recompute::None => config.num_hidden_layers,
        Recompute::Layer => config.num_hidden_layers.min(1),
    }
}

impl<R: Runtime, F: FloatElement> Activations<R, F> {
    /// Allocates every buffer for `batch` sequences of `seq` tokens, with the logits kept whole
    /// ([`HeadChunk::Full`]: what evaluation and inspection want).
    pub fn new(device: &Device<R>, config: &LlamaConfig, batch: usize, seq: usize) -> Result<Self> {
        Self::with_head(device, config, batch, seq, HeadChunk::Full)
    }

    /// As [`Self::new`], with the logits computed `head` rows at a time (training).
    pub fn with_head(
        device: &Device<R>,
        config: &LlamaConfig,
        batch: usize,
        seq: usize,
        head: HeadChunk,
    ) -> Result<Self> {
        Self::with_plan(device, config, batch, seq, ActivationPlan { head, recompute: Recompute::None })
    }

    /// As [`Self::new`], laid out by `plan` (the head's blocks, what is recomputed).
    pub fn with_plan(
        device: &Device<R>,
        config: &LlamaConfig,
        batch: usize,
        seq: usize,
        plan: ActivationPlan,
    ) -> Result<Self> {
        let head = plan.head;
        if batch == 0 || seq == 0 {
            return Err(ModelError::Input {
                op: "Activations::new",
                message: format!("batch ({batch}) and sequence length ({seq}) must be positive"),
            });
        }
        if seq > config.max_position_embeddings {
            return Err(ModelError::Input {
                op: "Activations::new",
                message: format!(
                    "sequence length {seq} exceeds the model's context (max_position_embeddings {})",
                    config.max_position_embeddings
                ),
            });
        }
        let n = batch * seq;
        let head_rows = head.rows(config, n)?;
        let (c, i, v) = (config.hidden_size, config.intermediate_size, config.vocab_size);
        let (hq, hkv, hd) = (config.num_attention_heads, config.num_key_value_heads, config.head_dim);
        let hidden = [batch, seq, c];
        let q_shape = [batch, seq, hq, hd];
        let kv_shape = [batch, seq, hkv, hd];
        let mlp = [batch, seq, i];
        let rows = [n];
        let f = |shape: &[usize]| GpuTensor::<R, F>::uninit(device, shape);
        let f32s = |shape: &[usize]| GpuTensor::<R, f32>::uninit(device, shape);
        let layers = (0..layer_slots(config, plan.recompute))
            .map(|_| {
                Ok(LayerActivations {
                    rstd_attn: f32s(&rows)?,
                    normed_attn: f(&hidden)?,
                    q_rot: f(&q_shape)?,
                    k_rot: f(&kv_shape)?,
                    v: f(&kv_shape)?,
                    attn: f(&q_shape)?,
                    lse: f32s(&[batch, hq, seq])?,
                    mid: f(&hidden)?,
                    rstd_mlp: f32s(&rows)?,
                    normed_mlp: f(&hidden)?,
                    gate: f(&mlp)?,
                    up: f(&mlp)?,
                    act: f(&mlp)?,
                })
            })
            .collect::<dsl::Result<Vec<_>>>()?;
        let scratch_rows = kernels::rmsnorm::rmsnorm_backward_scratch_rows(device, n);
        Ok(Self {
            batch,
            seq,
            recompute: plan.recompute,
            stream: (0..=config.num_hidden_layers).map(|_| f(&hidden)).collect::<dsl::Result<Vec<_>>>()?,
            layers,
            q_proj: f(&q_shape)?,
            k_proj: f(&kv_shape)?,
            rstd_final: f32s(&rows)?,
            normed_final: f(&hidden)?,
            logits: f(&[head_rows, v])?,
            head_rows,
            row_loss: f32s(&rows)?,
            loss: f32s(&[1])?,
            d_stream: f(&hidden)?,
            d_normed: f(&hidden)?,
            d_attn: f(&q_shape)?,
            d_q_rot: f(&q_shape)?,
            d_q: f(&q_shape)?,
            d_k_rot: f(&kv_shape)?,
            d_k: f(&kv_shape)?,
            d_v: f(&kv_shape)?,
            delta: f32s(&[batch, hq, seq])?,
            d_act: f(&mlp)?,
            d_gate: f(&mlp)?,
            d_up: f(&mlp)?,
            norm_scratch: f32s(&[scratch_rows, c])?,
        })
    }

    /// Tokens per forward (`batch · seq`).
    pub fn tokens(&self) -> usize {
        self.batch * self.seq
    }

    /// The index in `layers` of layer `l`'s buffers.
    pub fn slot(&self, l: usize) -> usize {
        match self.recompute {
            Recompute::None => l,
            Recompute::Layer => 0,
        }
    }

    /// Whether the logits are kept whole (one block of every row).
    pub fn keeps_logits(&self) -> bool {
        self.head_rows == self.tokens()
    }

    /// The blocks of rows the head works on: `(start, rows)` pairs covering `0..tokens`.
    pub fn head_blocks(&self) -> impl Iterator<Item = (usize, usize)> + use<R, F> {
        let (n, rows) = (self.tokens(), self.head_rows);
        (0..n).step_by(rows).map(move |start| (start, rows.min(n - start)))
    }

    /// Device bytes held, summed over the buffers actually allocated.
    pub fn size_bytes(&self) -> usize {
        let layer = |l: &LayerActivations<R, F>| {
            [&l.normed_attn, &l.q_rot, &l.k_rot, &l.v, &l.attn, &l.mid, &l.normed_mlp, &l.gate, &l.up, &l.act]
                .iter()
                .map(|t| t.size_bytes())
                .sum::<usize>()
                + [&l.rstd_attn, &l.lse, &l.rstd_mlp].iter().map(|t| t.size_bytes()).sum::<usize>()
        };
        let f_scratch = [
            &self.q_proj,
            &self.k_proj,
            &self.normed_final,
            &self.logits,
            &self.d_stream,
            &self.d_normed,
            &self.d_attn,
            &self.d_q_rot,
            &self.d_q,
            &self.d_k_rot,
            &self.d_k,
            &self.d_v,
            &self.d_act,
            &self.d_gate,
            &self.d_up,
        ];
        let f32_scratch = [&self.rstd_final, &self.row_loss, &self.loss, &self.delta, &self.norm_scratch];
        self.layers.iter().map(layer).sum::<usize>()
            + self.stream.iter().map(|t| t.size_bytes()).sum::<usize>()
            + f_scratch.iter().map(|t| t.size_bytes()).sum::<usize>()
            + f32_scratch.iter().map(|t| t.size_bytes()).sum::<usize>()
    }
}
