//! The Llama forward and backward: kernel calls in order, nothing numerical of its own.
//!
//! Forward: embedding → per layer [RMSNorm → q, k, v projections → RoPE on q, k → causal GQA
//! attention → o projection → residual add → RMSNorm → gate, up projections → SwiGLU → down
//! projection → residual add] → RMSNorm → lm_head → cross-entropy. Each residual add runs fused
//! with the RMSNorm after it, and the training head in blocks of rows (see
//! [`crate::activations::HeadChunk`]). The backward walks it in
//! reverse and adds every parameter's gradient into a [`Params`] of gradients (`+=`, so
//! micro-batches accumulate; zero it first for a fresh step).

use crate::activations::{Activations, LayerActivations, Recompute};
use crate::config::{LayerWeight, LlamaConfig};
use crate::error::{ModelError, Result};
use crate::params::Params;
use cubecl::Runtime;
use dsl::{Device, FloatElement, GpuTensor};
use kernels::attention::{attention_backward, attention_forward};
use kernels::cross_entropy::{
    Targets, cross_entropy_forward, cross_entropy_forward_backward, cross_entropy_mean,
    cross_entropy_rows_forward, cross_entropy_rows_forward_backward,
};
use kernels::embedding::{TokenIds, embedding_backward, embedding_forward};
use kernels::matmul::{linear_backward_input, linear_backward_weight, linear_forward};
use kernels::rmsnorm::{
    rmsnorm_backward, rmsnorm_backward_accumulate, rmsnorm_forward, rmsnorm_forward_residual,
};
use kernels::rope::{RopeTable, rope_backward, rope_forward};
use kernels::swiglu::{swiglu_backward, swiglu_forward};

/// Elements `start .. start + rows` of a one-dimensional tensor, as a view.
fn rows_of<R: Runtime>(t: &GpuTensor<R, f32>, (start, rows): (usize, usize)) -> Result<GpuTensor<R, f32>> {
    Ok(t.reshape(&[t.numel(), 1])?.rows_view(start, rows)?.reshape(&[rows])?)
}

/// A Llama model on one device: its configuration, parameters and RoPE table.
pub struct Llama<R: Runtime, F: FloatElement> {
    pub config: LlamaConfig,
    pub params: Params<R, F>,
    rope: RopeTable<R>,
}

/// A view of `t` with its last two dimensions merged (`[B, T, H, hd]` → `[B, T, H·hd]`), the
/// shape the projections read and write.
pub(crate) fn heads_merged<R: Runtime, F: FloatElement>(t: &GpuTensor<R, F>) -> Result<GpuTensor<R, F>> {
    let s = t.shape();
    Ok(t.reshape(&[s[0], s[1], s[2] * s[3]])?)
}

impl<R: Runtime, F: FloatElement> Llama<R, F> {
    /// Wraps parameters for `config` (their shapes checked) and builds the RoPE table (with
    /// `config.rope_scaling` applied).
    pub fn new(device: &Device<R>, config: LlamaConfig, params: Params<R, F>) -> Result<Self> {
        config.validate().map_err(ModelError::Config)?;
        let expected = config.parameters();
        if params.specs() != expected.as_slice() {
            return Err(ModelError::Input {
                op: "Llama::new",
                message: "parameters were built for a different configuration".into(),
            });
        }
        // Every path (training, evaluation, decoding) reads this one table, so linear RoPE
        // scaling applies to all of them.
        let rope = RopeTable::scaled(
            device,
            config.head_dim,
            config.max_position_embeddings,
            config.rope_theta,
            config.rope_position_divisor(),
        )?;
        Ok(Self { config, params, rope })
    }

    /// Uploads token ids `[batch, seq]`, checking each against the vocabulary.
    pub fn token_ids(
        &self,
        device: &Device<R>,
        ids: &[u32],
        batch: usize,
        seq: usize,
    ) -> Result<TokenIds<R>> {
        Ok(TokenIds::upload(device, ids, &[batch, seq], self.config.vocab_size)?)
    }

    /// Uploads next-token targets (`-100` to skip a position), checking each against the
    /// vocabulary.
    pub fn targets(&self, device: &Device<R>, targets: &[i32]) -> Result<Targets<R>> {
        Ok(Targets::upload(device, targets, self.config.vocab_size)?)
    }

    fn check_batch(&self, acts: &Activations<R, F>, ids: &TokenIds<R>) -> Result<()> {
        if ids.shape() != [acts.batch, acts.seq] {
            return Err(ModelError::Input {
                op: "Llama::forward",
                message: format!(
                    "token ids have shape {:?}, the activations were allocated for [{}, {}]",
                    ids.shape(),
                    acts.batch,
                    acts.seq
                ),
            });
        }
        let slots = match acts.recompute {
            Recompute::None => self.config.num_hidden_layers,
            Recompute::Layer => self.config.num_hidden_layers.min(1),
        };
        if acts.layers.len() != slots
            || acts.stream.len() != self.config.num_hidden_layers + 1
            || acts.stream[0].last_dim() != self.config.hidden_size
            || acts.logits.last_dim() != self.config.vocab_size
        {
            return Err(ModelError::Input {
                op: "Llama::forward",
                message: "the activations were allocated for a different configuration".into(),
            });
        }
        Ok(())
    }

    /// Runs the network on `ids`, saving what the backward needs, up to the logits
    /// (`acts.logits`, `[B·T, V]`) when the activations keep them whole; with a chunked head
    /// ([`crate::activations::HeadChunk`]) up to the final norm, the logits being computed block
    /// by block in [`Self::loss`] or [`Self::loss_backward`].
    ///
    /// Each residual add is fused with the RMSNorm that reads its sum
    /// ([`rmsnorm_forward_residual`]); the last one with the final norm.
    pub fn forward(&self, device: &Device<R>, acts: &mut Activations<R, F>, ids: &TokenIds<R>) -> Result<()> {
        self.check_batch(acts, ids)?;
        let p = &self.params;
        let eps = self.config.rms_norm_eps as f32;
        let layers = self.config.num_hidden_layers;
        embedding_forward(device, &mut acts.stream[0], ids, p.embed())?;
        match acts.layers.first_mut() {
            Some(a) => {
                let w = p.layer(0, LayerWeight::InputNorm);
                rmsnorm_forward(device, &mut a.normed_attn, &mut a.rstd_attn, &acts.stream[0], w, eps)?;
            }
            None => rmsnorm_forward(
                device,
                &mut acts.normed_final,
                &mut acts.rstd_final,
                &acts.stream[0],
                p.norm(),
                eps,
            )?,
        }
        for l in 0..layers {
            let (slot, next) = (acts.slot(l), acts.slot(l + 1));
            self.layer_forward_to_mlp(
                device,
                &mut acts.layers[slot],
                &acts.stream[l],
                &acts.q_proj,
                &acts.k_proj,
                l,
            )?;
            let out = &mut acts.stream[l + 1];
            linear_forward(device, out, &acts.layers[slot].act, p.layer(l, LayerWeight::Down))?;
            // stream[l+1] = mid + down(…), fused with the norm that reads it: the next layer's
            // input norm, or the final norm. (Recomputing, the next layer's slot is this one:
            // its normed input overwrites this layer's, which the forward no longer needs.)
            let (mid, normed, rstd, weight) = if l + 1 == layers {
                (&acts.layers[slot].mid, &mut acts.normed_final, &mut acts.rstd_final, p.norm())
            } else {
                let weight = p.layer(l + 1, LayerWeight::InputNorm);
                if next == slot {
                    let a = &mut acts.layers[slot];
                    (&a.mid, &mut a.normed_attn, &mut a.rstd_attn, weight)
                } else {
                    let (current, following) = acts.layers.split_at_mut(next);
                    let b = &mut following[0];
                    (&current[slot].mid, &mut b.normed_attn, &mut b.rstd_attn, weight)
                }
            };
            rmsnorm_forward_residual(device, normed, rstd, out, mid, weight, eps)?;
        }
        if acts.keeps_logits() {
            let logits_in = acts.normed_final.reshape(&[acts.tokens(), self.config.hidden_size])?;
            linear_forward(device, &mut acts.logits, &logits_in, p.lm_head())?;
        }
        Ok(())
    }

    /// Layer `l` from its normalised input (`a.normed_attn`, already computed) through the
    /// SwiGLU output (`a.act`): everything but the down projection and the residual add after
    /// it. `x` is the layer's input `stream[l]`; `q_proj` and `k_proj` are scratch.
    fn layer_forward_to_mlp(
        &self,
        device: &Device<R>,
        a: &mut LayerActivations<R, F>,
        x: &GpuTensor<R, F>,
        q_proj: &GpuTensor<R, F>,
        k_proj: &GpuTensor<R, F>,
        l: usize,
    ) -> Result<()> {
        let p = &self.params;
        let eps = self.config.rms_norm_eps as f32;
        linear_forward(device, &mut heads_merged(q_proj)?, &a.normed_attn, p.layer(l, LayerWeight::Q))?;
        linear_forward(device, &mut heads_merged(k_proj)?, &a.normed_attn, p.layer(l, LayerWeight::K))?;
        linear_forward(device, &mut heads_merged(&a.v)?, &a.normed_attn, p.layer(l, LayerWeight::V))?;
        rope_forward(device, &mut a.q_rot, q_proj, &self.rope, 0)?;
        rope_forward(device, &mut a.k_rot, k_proj, &self.rope, 0)?;
        attention_forward(device, &mut a.attn, &mut a.lse, &a.q_rot, &a.k_rot, &a.v, true)?;
        // mid = x + o_proj(attn), computed as o_proj(attn) += x (the same f32 sum), fused with
        // the post-attention norm that reads it.
        linear_forward(device, &mut a.mid, &heads_merged(&a.attn)?, p.layer(l, LayerWeight::O))?;
        rmsnorm_forward_residual(
            device,
            &mut a.normed_mlp,
            &mut a.rstd_mlp,
            &mut a.mid,
            x,
            p.layer(l, LayerWeight::PostAttentionNorm),
            eps,
        )?;
        linear_forward(device, &mut a.gate, &a.normed_mlp, p.layer(l, LayerWeight::Gate))?;
        linear_forward(device, &mut a.up, &a.normed_mlp, p.layer(l, LayerWeight::Up))?;
        swiglu_forward(device, &mut a.act, &a.gate, &a.up)?;
        Ok(())
    }

    fn check_targets(&self, acts: &Activations<R, F>, targets: &Targets<R>) -> Result<()> {
        if targets.len() != acts.tokens() {
            return Err(ModelError::Input {
                op: "Llama::loss",
                message: format!("{} targets for {} positions", targets.len(), acts.tokens()),
            });
        }
        Ok(())
    }

    /// The logits of head block `(start, rows)` into `acts.logits` (its first `rows` rows),
    /// returned as a view.
    fn block_logits(
        &self,
        device: &Device<R>,
        acts: &Activations<R, F>,
        (start, rows): (usize, usize),
    ) -> Result<GpuTensor<R, F>> {
        let c = self.config.hidden_size;
        let normed = acts.normed_final.reshape(&[acts.tokens(), c])?.rows_view(start, rows)?;
        let mut logits = acts.logits.rows_view(0, rows)?;
        linear_forward(device, &mut logits, &normed, self.params.lm_head())?;
        Ok(logits)
    }

    /// Backward through lm_head for block `(start, rows)` whose logits hold their gradient:
    /// its rows of `d_normed` (`=`) and its term of lm_head's gradient (`+=`).
    fn block_head_backward<G: FloatElement>(
        &self,
        device: &Device<R>,
        acts: &Activations<R, F>,
        dlogits: &GpuTensor<R, F>,
        (start, rows): (usize, usize),
        grads: &mut Params<R, G>,
    ) -> Result<()> {
        let (n, c) = (acts.tokens(), self.config.hidden_size);
        let normed = acts.normed_final.reshape(&[n, c])?.rows_view(start, rows)?;
        let mut d_normed = acts.d_normed.reshape(&[n, c])?.rows_view(start, rows)?;
        linear_backward_input(device, &mut d_normed, dlogits, self.params.lm_head(), false)?;
        linear_backward_weight(device, grads.lm_head_mut(), dlogits, &normed)?;
        Ok(())
    }

    /// The mean cross-entropy of the logits against `targets` into `acts.loss` (and each
    /// position's into `acts.row_loss`). With `with_grad` (logits kept whole only), the logits
    /// are overwritten by their gradient for [`Self::backward`]; with a chunked head use
    /// [`Self::loss_backward`], which computes the loss and the gradients together.
    pub fn loss(
        &self,
        device: &Device<R>,
        acts: &mut Activations<R, F>,
        targets: &Targets<R>,
        with_grad: bool,
    ) -> Result<()> {
        self.check_targets(acts, targets)?;
        if acts.keeps_logits() {
            if with_grad {
                cross_entropy_forward_backward(
                    device,
                    &mut acts.loss,
                    &mut acts.row_loss,
                    &mut acts.logits,
                    targets,
                )?;
            } else {
                cross_entropy_forward(device, &mut acts.loss, &mut acts.row_loss, &acts.logits, targets)?;
            }
            return Ok(());
        }
        if with_grad {
            return Err(ModelError::Input {
                op: "Llama::loss",
                message: "the logits are computed in blocks (a chunked head): use loss_backward, which \
                          computes the loss and the gradients together"
                    .into(),
            });
        }
        let blocks: Vec<_> = acts.head_blocks().collect();
        for block in blocks {
            let logits = self.block_logits(device, acts, block)?;
            let mut row_loss = rows_of(&acts.row_loss, block)?;
            cross_entropy_rows_forward(device, &mut row_loss, &logits, &targets.rows(block.0, block.1)?)?;
        }
        cross_entropy_mean(device, &mut acts.loss, &acts.row_loss, targets)?;
        Ok(())
    }

    /// The training loss and its gradient in one call: [`Self::loss`] with the gradient, then
    /// [`Self::backward`], computing the logits (with a chunked head) a block at a time: each
    /// block's logits → its rows' loss and, in place, their gradient → its rows of the final
    /// norm's input gradient and its term of lm_head's gradient. `ids` must be those of the
    /// forward; gradients are added into `grads` as [`Self::backward`] does. Each forward
    /// allows one call: it overwrites the logits with their gradient and, recomputing, the
    /// shared layer buffers.
    pub fn loss_backward<G: FloatElement>(
        &self,
        device: &Device<R>,
        acts: &mut Activations<R, F>,
        targets: &Targets<R>,
        ids: &TokenIds<R>,
        grads: &mut Params<R, G>,
    ) -> Result<()> {
        if acts.keeps_logits() {
            self.loss(device, acts, targets, true)?;
            return self.backward(device, acts, ids, grads);
        }
        self.check_batch(acts, ids)?;
        self.check_targets(acts, targets)?;
        let blocks: Vec<_> = acts.head_blocks().collect();
        for block in blocks {
            let mut logits = self.block_logits(device, acts, block)?;
            let mut row_loss = rows_of(&acts.row_loss, block)?;
            let block_targets = targets.rows(block.0, block.1)?;
            cross_entropy_rows_forward_backward(device, &mut row_loss, &mut logits, &block_targets)?;
            self.block_head_backward(device, acts, &logits, block, grads)?;
        }
        cross_entropy_mean(device, &mut acts.loss, &acts.row_loss, targets)?;
        self.backward_body(device, acts, ids, grads)
    }

    /// Adds the gradient of the loss of the last [`Self::loss`] (with `with_grad`) into
    /// `grads`. `ids` must be those of the forward. `grads` may be f32 under f16/bf16 compute
    /// (`G` ≠ `F`): every weight gradient is then summed and stored in f32 (activation
    /// gradients stay in `F`). Needs the logits kept whole (else [`Self::loss_backward`]), and
    /// one call per forward (recomputing, it overwrites the shared layer buffers).
    pub fn backward<G: FloatElement>(
        &self,
        device: &Device<R>,
        acts: &mut Activations<R, F>,
        ids: &TokenIds<R>,
        grads: &mut Params<R, G>,
    ) -> Result<()> {
        self.check_batch(acts, ids)?;
        if !acts.keeps_logits() {
            return Err(ModelError::Input {
                op: "Llama::backward",
                message: "the logits are computed in blocks (a chunked head): use loss_backward".into(),
            });
        }
        let whole = (0, acts.tokens());
        self.block_head_backward(device, acts, &acts.logits, whole, grads)?;
        self.backward_body(device, acts, ids, grads)
    }

    /// The backward from the final norm's output gradient (`acts.d_normed`) down to the
    /// embedding. Each branch's input-norm backward adds into the residual stream's gradient
    /// ([`rmsnorm_backward_accumulate`]), the backward of the fused residual add.
    fn backward_body<G: FloatElement>(
        &self,
        device: &Device<R>,
        acts: &mut Activations<R, F>,
        ids: &TokenIds<R>,
        grads: &mut Params<R, G>,
    ) -> Result<()> {
        let p = &self.params;
        let layers = self.config.num_hidden_layers;
        rmsnorm_backward(
            device,
            &mut acts.d_stream,
            grads.norm_mut(),
            &mut acts.norm_scratch,
            &acts.d_normed,
            &acts.stream[layers],
            p.norm(),
            &acts.rstd_final,
        )?;

        let eps = self.config.rms_norm_eps as f32;
        for l in (0..layers).rev() {
            let slot = acts.slot(l);
            // The last layer's buffers still hold its forward (the final norm took its output).
            if acts.recompute == Recompute::Layer && l + 1 < layers {
                // The layer's forward again from its saved input: the same kernels on the same
                // inputs, so the same bits as the stored activations would have held.
                let a = &mut acts.layers[slot];
                let (x, w) = (&acts.stream[l], p.layer(l, LayerWeight::InputNorm));
                rmsnorm_forward(device, &mut a.normed_attn, &mut a.rstd_attn, x, w, eps)?;
                self.layer_forward_to_mlp(device, a, x, &acts.q_proj, &acts.k_proj, l)?;
            }
            let a = &acts.layers[slot];
            let x = &acts.stream[l];
            // MLP: stream[l+1] = mid + down(swiglu(gate(n2), up(n2))), n2 = norm(mid).
            linear_backward_input(
                device,
                &mut acts.d_act,
                &acts.d_stream,
                p.layer(l, LayerWeight::Down),
                false,
            )?;
            linear_backward_weight(device, grads.layer_mut(l, LayerWeight::Down), &acts.d_stream, &a.act)?;
            swiglu_backward(device, &mut acts.d_gate, &mut acts.d_up, &acts.d_act, &a.gate, &a.up)?;
            linear_backward_input(
                device,
                &mut acts.d_normed,
                &acts.d_gate,
                p.layer(l, LayerWeight::Gate),
                false,
            )?;
            linear_backward_input(device, &mut acts.d_normed, &acts.d_up, p.layer(l, LayerWeight::Up), true)?;
            linear_backward_weight(
                device,
                grads.layer_mut(l, LayerWeight::Gate),
                &acts.d_gate,
                &a.normed_mlp,
            )?;
            linear_backward_weight(device, grads.layer_mut(l, LayerWeight::Up), &acts.d_up, &a.normed_mlp)?;
            rmsnorm_backward_accumulate(
                device,
                &mut acts.d_stream,
                grads.layer_mut(l, LayerWeight::PostAttentionNorm),
                &mut acts.norm_scratch,
                &acts.d_normed,
                &a.mid,
                p.layer(l, LayerWeight::PostAttentionNorm),
                &a.rstd_mlp,
            )?;

            // Attention: mid = x + o(attn(rope(q(n1)), rope(k(n1)), v(n1))), n1 = norm(x).
            let attn = heads_merged(&a.attn)?;
            linear_backward_input(
                device,
                &mut heads_merged(&acts.d_attn)?,
                &acts.d_stream,
                p.layer(l, LayerWeight::O),
                false,
            )?;
            linear_backward_weight(device, grads.layer_mut(l, LayerWeight::O), &acts.d_stream, &attn)?;
            attention_backward(
                device,
                &mut acts.d_q_rot,
                &mut acts.d_k_rot,
                &mut acts.d_v,
                &mut acts.delta,
                &acts.d_attn,
                &a.q_rot,
                &a.k_rot,
                &a.v,
                &a.attn,
                &a.lse,
                true,
            )?;
            rope_backward(device, &mut acts.d_q, &acts.d_q_rot, &self.rope, 0)?;
            rope_backward(device, &mut acts.d_k, &acts.d_k_rot, &self.rope, 0)?;
            let (d_q, d_k, d_v) =
                (heads_merged(&acts.d_q)?, heads_merged(&acts.d_k)?, heads_merged(&acts.d_v)?);
            linear_backward_input(device, &mut acts.d_normed, &d_q, p.layer(l, LayerWeight::Q), false)?;
            linear_backward_input(device, &mut acts.d_normed, &d_k, p.layer(l, LayerWeight::K), true)?;
            linear_backward_input(device, &mut acts.d_normed, &d_v, p.layer(l, LayerWeight::V), true)?;
            linear_backward_weight(device, grads.layer_mut(l, LayerWeight::Q), &d_q, &a.normed_attn)?;
            linear_backward_weight(device, grads.layer_mut(l, LayerWeight::K), &d_k, &a.normed_attn)?;
            linear_backward_weight(device, grads.layer_mut(l, LayerWeight::V), &d_v, &a.normed_attn)?;
            rmsnorm_backward_accumulate(
                device,
                &mut acts.d_stream,
                grads.layer_mut(l, LayerWeight::InputNorm),
                &mut acts.norm_scratch,
                &acts.d_normed,
                x,
                p.layer(l, LayerWeight::InputNorm),
                &a.rstd_attn,
            )?;
        }
        embedding_backward(device, grads.embed_mut(), &acts.d_stream, ids)?;
        Ok(())
    }

    /// The loss of the last [`Self::loss`], read back (synchronises).
    pub fn read_loss(&self, device: &Device<R>, acts: &Activations<R, F>) -> Result<f32> {
        Ok(acts.loss.to_vec(device)?[0])
    }

    pub fn rope(&self) -> &RopeTable<R> {
        &self.rope
    }
}
