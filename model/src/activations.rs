//! Every buffer a forward and backward at one (batch, sequence) shape needs, allocated once so
//! a training step allocates nothing on the device.
//!
//! Saved for the backward, per layer: the normalised inputs of both sub-blocks and their
//! reciprocal RMS, q and k after RoPE, v, the attention output and its log-sum-exp, the
//! residual stream between the sub-blocks, and the MLP's gate, up and SwiGLU output. The
//! residual stream entering each layer is kept too (`stream[l]`; `stream[L]` feeds the final
//! norm). Nothing is recomputed.

use crate::config::LlamaConfig;
use crate::error::{ModelError, Result};
use cubecl::Runtime;
use dsl::{Device, FloatElement, GpuTensor};

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
    /// `stream[l]`: the residual stream entering layer `l`; `stream[L]`: leaving the last one.
    pub stream: Vec<GpuTensor<R, F>>,
    pub layers: Vec<LayerActivations<R, F>>,
    // Forward scratch: q and k before RoPE.
    pub q_proj: GpuTensor<R, F>,
    pub k_proj: GpuTensor<R, F>,
    pub rstd_final: GpuTensor<R, f32>,
    pub normed_final: GpuTensor<R, F>,
    pub logits: GpuTensor<R, F>,
    pub dlogits: GpuTensor<R, F>,
    pub row_loss: GpuTensor<R, f32>,
    /// `[1]`: the mean cross-entropy over counted targets.
    pub loss: GpuTensor<R, f32>,
    // Backward scratch.
    pub d_stream: GpuTensor<R, F>,
    pub d_branch: GpuTensor<R, F>,
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

/// Bytes of [`Activations`] for `batch × seq` with `param_bytes`-wide elements and an RMSNorm
/// backward scratch of `norm_scratch_rows` rows (see
/// [`kernels::rmsnorm::rmsnorm_backward_scratch_rows`]).
pub fn activation_bytes_with(
    config: &LlamaConfig,
    batch: usize,
    seq: usize,
    param_bytes: usize,
    norm_scratch_rows: usize,
) -> usize {
    let n = batch * seq;
    let (c, i, v, hq) =
        (config.hidden_size, config.intermediate_size, config.vocab_size, config.num_attention_heads);
    let (qd, kvd) = (config.q_dim(), config.kv_dim());
    let layers = config.num_hidden_layers;
    let per_layer = n * (3 * c + 2 * qd + 2 * kvd + 3 * i) * param_bytes + 4 * n * (2 + hq);
    let stream = (layers + 1) * n * c * param_bytes;
    let forward_scratch = n * (qd + kvd + c + 2 * v) * param_bytes + 4 * (2 * n + 1);
    let backward_scratch =
        n * (3 * c + 3 * qd + 3 * kvd + 3 * i) * param_bytes + 4 * (n * hq + norm_scratch_rows * c);
    layers * per_layer + stream + forward_scratch + backward_scratch
}

/// [`activation_bytes_with`] with the RMSNorm scratch an H100 gets (4 rows per SM, 132 SMs).
pub fn activation_bytes(config: &LlamaConfig, batch: usize, seq: usize, param_bytes: usize) -> usize {
    activation_bytes_with(config, batch, seq, param_bytes, (batch * seq).clamp(1, 4 * 132))
}

impl<R: Runtime, F: FloatElement> Activations<R, F> {
    /// Allocates every buffer for `batch` sequences of `seq` tokens.
    pub fn new(device: &Device<R>, config: &LlamaConfig, batch: usize, seq: usize) -> Result<Self> {
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
        let (c, i, v) = (config.hidden_size, config.intermediate_size, config.vocab_size);
        let (hq, hkv, hd) = (config.num_attention_heads, config.num_key_value_heads, config.head_dim);
        let hidden = [batch, seq, c];
        let q_shape = [batch, seq, hq, hd];
        let kv_shape = [batch, seq, hkv, hd];
        let mlp = [batch, seq, i];
        let rows = [n];
        let f = |shape: &[usize]| GpuTensor::<R, F>::uninit(device, shape);
        let f32s = |shape: &[usize]| GpuTensor::<R, f32>::uninit(device, shape);
        let layers = (0..config.num_hidden_layers)
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
            stream: (0..=config.num_hidden_layers).map(|_| f(&hidden)).collect::<dsl::Result<Vec<_>>>()?,
            layers,
            q_proj: f(&q_shape)?,
            k_proj: f(&kv_shape)?,
            rstd_final: f32s(&rows)?,
            normed_final: f(&hidden)?,
            logits: f(&[n, v])?,
            dlogits: f(&[n, v])?,
            row_loss: f32s(&rows)?,
            loss: f32s(&[1])?,
            d_stream: f(&hidden)?,
            d_branch: f(&hidden)?,
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
            &self.dlogits,
            &self.d_stream,
            &self.d_branch,
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
