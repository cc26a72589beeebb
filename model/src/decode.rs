//! Incremental inference with a KV cache: the prompt once, then one token at a time, each
//! step attending to the cached keys and values through the attention decode path.

use crate::config::LayerWeight;
use crate::error::{ModelError, Result};
use crate::llama::{Llama, heads_merged};
use cubecl::Runtime;
use dsl::{Device, FloatElement, GpuTensor};
use kernels::attention::attention_decode;
use kernels::embedding::{TokenIds, embedding_forward};
use kernels::kv_cache::kv_cache_write;
use kernels::matmul::linear_forward;
use kernels::residual::residual_add;
use kernels::rmsnorm::rmsnorm_forward;
use kernels::rope::rope_forward;
use kernels::swiglu::swiglu_forward;

/// Keys and values of every layer for the positions decoded so far.
pub struct KvCache<R: Runtime, F: FloatElement> {
    /// Per layer, `[B, capacity, Hkv, hd]` (after RoPE).
    k: Vec<GpuTensor<R, F>>,
    v: Vec<GpuTensor<R, F>>,
    pub batch: usize,
    pub capacity: usize,
    /// Positions filled.
    pub len: usize,
}

impl<R: Runtime, F: FloatElement> KvCache<R, F> {
    /// An empty cache for `batch` sequences of up to `capacity` positions.
    pub fn new(device: &Device<R>, model: &Llama<R, F>, batch: usize, capacity: usize) -> Result<Self> {
        let c = &model.config;
        if capacity == 0 || capacity > c.max_position_embeddings {
            return Err(ModelError::Input {
                op: "KvCache::new",
                message: format!(
                    "capacity {capacity} must be in 1..={} (the model's context)",
                    c.max_position_embeddings
                ),
            });
        }
        let shape = [batch, capacity, c.num_key_value_heads, c.head_dim];
        let layer = || GpuTensor::zeros(device, &shape);
        Ok(Self {
            k: (0..c.num_hidden_layers).map(|_| layer()).collect::<dsl::Result<_>>()?,
            v: (0..c.num_hidden_layers).map(|_| layer()).collect::<dsl::Result<_>>()?,
            batch,
            capacity,
            len: 0,
        })
    }
}

impl<R: Runtime, F: FloatElement> Llama<R, F> {
    /// Runs `ids` (`[B, Tq]`, the tokens at positions `cache.len ..`) through the network,
    /// appending their keys and values to `cache`; returns the logits `[B·Tq, V]`.
    pub fn decode(
        &self,
        device: &Device<R>,
        cache: &mut KvCache<R, F>,
        ids: &TokenIds<R>,
    ) -> Result<GpuTensor<R, F>> {
        let &[batch, new] = ids.shape() else {
            return Err(ModelError::Input {
                op: "Llama::decode",
                message: format!("ids must be [B, Tq], got {:?}", ids.shape()),
            });
        };
        let start = cache.len;
        if batch != cache.batch || start + new > cache.capacity {
            return Err(ModelError::Input {
                op: "Llama::decode",
                message: format!(
                    "{batch} × {new} new tokens at position {start} do not fit the cache ({} × {})",
                    cache.batch, cache.capacity
                ),
            });
        }
        let c = &self.config;
        let p = &self.params;
        let eps = c.rms_norm_eps as f32;
        let (hq, hkv, hd) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let f = |shape: &[usize]| GpuTensor::<R, F>::uninit(device, shape);
        let hidden = [batch, new, c.hidden_size];
        let (mut x, mut normed, mut mid) = (f(&hidden)?, f(&hidden)?, f(&hidden)?);
        let (q, mut q_rot, mut attn) =
            (f(&[batch, new, hq, hd])?, f(&[batch, new, hq, hd])?, f(&[batch, new, hq, hd])?);
        let (k, mut k_rot, v) =
            (f(&[batch, new, hkv, hd])?, f(&[batch, new, hkv, hd])?, f(&[batch, new, hkv, hd])?);
        let mlp = [batch, new, c.intermediate_size];
        let (mut gate, mut up, mut act) = (f(&mlp)?, f(&mlp)?, f(&mlp)?);
        let mut rstd = GpuTensor::<R, f32>::uninit(device, &[batch * new])?;
        let mut lse = GpuTensor::<R, f32>::uninit(device, &[batch, hq, new])?;
        embedding_forward(device, &mut x, ids, p.embed())?;
        for l in 0..c.num_hidden_layers {
            rmsnorm_forward(device, &mut normed, &mut rstd, &x, p.layer(l, LayerWeight::InputNorm), eps)?;
            linear_forward(device, &mut heads_merged(&q)?, &normed, p.layer(l, LayerWeight::Q))?;
            linear_forward(device, &mut heads_merged(&k)?, &normed, p.layer(l, LayerWeight::K))?;
            linear_forward(device, &mut heads_merged(&v)?, &normed, p.layer(l, LayerWeight::V))?;
            rope_forward(device, &mut q_rot, &q, self.rope(), start)?;
            rope_forward(device, &mut k_rot, &k, self.rope(), start)?;
            kv_cache_write(device, &mut cache.k[l], &k_rot, start)?;
            kv_cache_write(device, &mut cache.v[l], &v, start)?;
            attention_decode(
                device,
                &mut attn,
                &mut lse,
                &q_rot,
                &cache.k[l],
                &cache.v[l],
                start + new,
                start,
            )?;
            linear_forward(device, &mut mid, &heads_merged(&attn)?, p.layer(l, LayerWeight::O))?;
            residual_add(device, &mut mid, &x)?;
            rmsnorm_forward(
                device,
                &mut normed,
                &mut rstd,
                &mid,
                p.layer(l, LayerWeight::PostAttentionNorm),
                eps,
            )?;
            linear_forward(device, &mut gate, &normed, p.layer(l, LayerWeight::Gate))?;
            linear_forward(device, &mut up, &normed, p.layer(l, LayerWeight::Up))?;
            swiglu_forward(device, &mut act, &gate, &up)?;
            linear_forward(device, &mut x, &act, p.layer(l, LayerWeight::Down))?;
            residual_add(device, &mut x, &mid)?;
        }
        rmsnorm_forward(device, &mut normed, &mut rstd, &x, p.norm(), eps)?;
        let mut logits = f(&[batch * new, c.vocab_size])?;
        linear_forward(device, &mut logits, &normed.reshape(&[batch * new, c.hidden_size])?, p.lm_head())?;
        cache.len += new;
        Ok(logits)
    }
}
