//! The whole model in f64 on the CPU, written once from the kernels' f64 twins
//! ([`kernels::reference`]): the yardstick for [`crate::Llama`]'s forward and every gradient,
//! and itself checked against finite differences.

use crate::config::{LayerWeight, LlamaConfig};
use kernels::attention::AttentionShape;
use kernels::reference::{attention, cross_entropy, embedding, matmul, residual, rmsnorm, rope, swiglu};

/// Loss, logits and the gradient of every parameter (in [`LlamaConfig::parameters`] order).
pub struct ReferenceResult {
    pub loss: f64,
    pub logits: Vec<f64>,
    pub grads: Vec<Vec<f64>>,
}

struct Index {
    layers: usize,
    tied: bool,
}

impl Index {
    fn layer(&self, l: usize, w: LayerWeight) -> usize {
        1 + l * LayerWeight::ALL.len() + LayerWeight::ALL.iter().position(|&x| x == w).expect("listed")
    }
    fn norm(&self) -> usize {
        1 + self.layers * LayerWeight::ALL.len()
    }
    fn lm_head(&self) -> usize {
        if self.tied { 0 } else { self.norm() + 1 }
    }
}

struct LayerSaved {
    x: Vec<f64>,
    rstd_attn: Vec<f64>,
    normed_attn: Vec<f64>,
    q_rot: Vec<f64>,
    k_rot: Vec<f64>,
    v: Vec<f64>,
    attn: Vec<f64>,
    mid: Vec<f64>,
    rstd_mlp: Vec<f64>,
    normed_mlp: Vec<f64>,
    gate: Vec<f64>,
    up: Vec<f64>,
    act: Vec<f64>,
}

/// Forward, mean cross-entropy against `targets` (`-100` ignored) and backward for `batch`
/// rows of `seq` tokens.
pub fn loss_and_grads(
    config: &LlamaConfig,
    params: &[Vec<f64>],
    ids: &[u32],
    targets: &[i32],
    batch: usize,
    seq: usize,
) -> ReferenceResult {
    let ix = Index { layers: config.num_hidden_layers, tied: config.tie_word_embeddings };
    let n = batch * seq;
    let (c, inter, vocab) = (config.hidden_size, config.intermediate_size, config.vocab_size);
    let (qd, kvd) = (config.q_dim(), config.kv_dim());
    let eps = config.rms_norm_eps;
    let theta = config.rope_theta;
    let divisor = config.rope_position_divisor();
    let q_shape = (batch, seq, config.num_attention_heads, config.head_dim);
    let kv_shape = (batch, seq, config.num_key_value_heads, config.head_dim);
    let shape = AttentionShape {
        batch,
        q_len: seq,
        kv_len: seq,
        kv_capacity: seq,
        q_heads: config.num_attention_heads,
        kv_heads: config.num_key_value_heads,
        head_dim: config.head_dim,
        position_offset: 0,
    };
    let w = |l: usize, weight: LayerWeight| params[ix.layer(l, weight)].as_slice();

    // Forward.
    let mut x = vec![0.0; n * c];
    embedding::embedding_forward(&mut x, ids, &params[0], c);
    let mut saved = Vec::with_capacity(ix.layers);
    for l in 0..ix.layers {
        let mut s = LayerSaved {
            x: x.clone(),
            rstd_attn: vec![0.0; n],
            normed_attn: vec![0.0; n * c],
            q_rot: vec![0.0; n * qd],
            k_rot: vec![0.0; n * kvd],
            v: vec![0.0; n * kvd],
            attn: vec![0.0; n * qd],
            mid: vec![0.0; n * c],
            rstd_mlp: vec![0.0; n],
            normed_mlp: vec![0.0; n * c],
            gate: vec![0.0; n * inter],
            up: vec![0.0; n * inter],
            act: vec![0.0; n * inter],
        };
        rmsnorm::rmsnorm_forward(
            &mut s.normed_attn,
            &mut s.rstd_attn,
            &x,
            w(l, LayerWeight::InputNorm),
            n,
            c,
            eps,
        );
        let mut q = vec![0.0; n * qd];
        let mut k = vec![0.0; n * kvd];
        matmul::linear_forward(&mut q, &s.normed_attn, w(l, LayerWeight::Q), n, c, qd);
        matmul::linear_forward(&mut k, &s.normed_attn, w(l, LayerWeight::K), n, c, kvd);
        matmul::linear_forward(&mut s.v, &s.normed_attn, w(l, LayerWeight::V), n, c, kvd);
        rope::rope_forward_scaled(&mut s.q_rot, &q, q_shape, theta, 0, divisor);
        rope::rope_forward_scaled(&mut s.k_rot, &k, kv_shape, theta, 0, divisor);
        let mut lse = vec![0.0; n * config.num_attention_heads];
        attention::attention_forward(&mut s.attn, &mut lse, &s.q_rot, &s.k_rot, &s.v, &shape, true);
        matmul::linear_forward(&mut s.mid, &s.attn, w(l, LayerWeight::O), n, qd, c);
        residual::residual_add(&mut s.mid, &x);
        rmsnorm::rmsnorm_forward(
            &mut s.normed_mlp,
            &mut s.rstd_mlp,
            &s.mid,
            w(l, LayerWeight::PostAttentionNorm),
            n,
            c,
            eps,
        );
        matmul::linear_forward(&mut s.gate, &s.normed_mlp, w(l, LayerWeight::Gate), n, c, inter);
        matmul::linear_forward(&mut s.up, &s.normed_mlp, w(l, LayerWeight::Up), n, c, inter);
        swiglu::swiglu_forward(&mut s.act, &s.gate, &s.up);
        matmul::linear_forward(&mut x, &s.act, w(l, LayerWeight::Down), n, inter, c);
        residual::residual_add(&mut x, &s.mid);
        saved.push(s);
    }
    let mut normed_final = vec![0.0; n * c];
    let mut rstd_final = vec![0.0; n];
    rmsnorm::rmsnorm_forward(&mut normed_final, &mut rstd_final, &x, &params[ix.norm()], n, c, eps);
    let mut logits = vec![0.0; n * vocab];
    matmul::linear_forward(&mut logits, &normed_final, &params[ix.lm_head()], n, c, vocab);
    let mut dlogits = vec![0.0; n * vocab];
    let mut row_loss = vec![0.0; n];
    let loss =
        cross_entropy::cross_entropy_forward_backward(&mut dlogits, &mut row_loss, &logits, targets, vocab);

    // Backward.
    let mut grads: Vec<Vec<f64>> = params.iter().map(|p| vec![0.0; p.len()]).collect();
    let mut d_normed = vec![0.0; n * c];
    matmul::linear_backward_input(&mut d_normed, &dlogits, &params[ix.lm_head()], false, n, c, vocab);
    matmul::linear_backward_weight(&mut grads[ix.lm_head()], &dlogits, &normed_final, n, c, vocab);
    let mut d_stream = vec![0.0; n * c];
    rmsnorm::rmsnorm_backward(
        &mut d_stream,
        &mut grads[ix.norm()],
        &d_normed,
        &x,
        &params[ix.norm()],
        &rstd_final,
        n,
        c,
    );
    let mut d_branch = vec![0.0; n * c];
    for l in (0..ix.layers).rev() {
        let s = &saved[l];
        let mut d_act = vec![0.0; n * inter];
        matmul::linear_backward_input(&mut d_act, &d_stream, w(l, LayerWeight::Down), false, n, inter, c);
        matmul::linear_backward_weight(
            &mut grads[ix.layer(l, LayerWeight::Down)],
            &d_stream,
            &s.act,
            n,
            inter,
            c,
        );
        let mut d_gate = vec![0.0; n * inter];
        let mut d_up = vec![0.0; n * inter];
        swiglu::swiglu_backward(&mut d_gate, &mut d_up, &d_act, &s.gate, &s.up);
        matmul::linear_backward_input(&mut d_normed, &d_gate, w(l, LayerWeight::Gate), false, n, c, inter);
        matmul::linear_backward_input(&mut d_normed, &d_up, w(l, LayerWeight::Up), true, n, c, inter);
        matmul::linear_backward_weight(
            &mut grads[ix.layer(l, LayerWeight::Gate)],
            &d_gate,
            &s.normed_mlp,
            n,
            c,
            inter,
        );
        matmul::linear_backward_weight(
            &mut grads[ix.layer(l, LayerWeight::Up)],
            &d_up,
            &s.normed_mlp,
            n,
            c,
            inter,
        );
        let post = ix.layer(l, LayerWeight::PostAttentionNorm);
        rmsnorm::rmsnorm_backward(
            &mut d_branch,
            &mut grads[post],
            &d_normed,
            &s.mid,
            &params[post],
            &s.rstd_mlp,
            n,
            c,
        );
        residual::residual_add(&mut d_stream, &d_branch);

        let mut d_attn = vec![0.0; n * qd];
        matmul::linear_backward_input(&mut d_attn, &d_stream, w(l, LayerWeight::O), false, n, qd, c);
        matmul::linear_backward_weight(&mut grads[ix.layer(l, LayerWeight::O)], &d_stream, &s.attn, n, qd, c);
        let mut d_q_rot = vec![0.0; n * qd];
        let mut d_k_rot = vec![0.0; n * kvd];
        let mut d_v = vec![0.0; n * kvd];
        attention::attention_backward(
            &mut d_q_rot,
            &mut d_k_rot,
            &mut d_v,
            &d_attn,
            &s.q_rot,
            &s.k_rot,
            &s.v,
            &shape,
            true,
        );
        let mut d_q = vec![0.0; n * qd];
        let mut d_k = vec![0.0; n * kvd];
        rope::rope_backward_scaled(&mut d_q, &d_q_rot, q_shape, theta, 0, divisor);
        rope::rope_backward_scaled(&mut d_k, &d_k_rot, kv_shape, theta, 0, divisor);
        matmul::linear_backward_input(&mut d_normed, &d_q, w(l, LayerWeight::Q), false, n, c, qd);
        matmul::linear_backward_input(&mut d_normed, &d_k, w(l, LayerWeight::K), true, n, c, kvd);
        matmul::linear_backward_input(&mut d_normed, &d_v, w(l, LayerWeight::V), true, n, c, kvd);
        matmul::linear_backward_weight(
            &mut grads[ix.layer(l, LayerWeight::Q)],
            &d_q,
            &s.normed_attn,
            n,
            c,
            qd,
        );
        matmul::linear_backward_weight(
            &mut grads[ix.layer(l, LayerWeight::K)],
            &d_k,
            &s.normed_attn,
            n,
            c,
            kvd,
        );
        matmul::linear_backward_weight(
            &mut grads[ix.layer(l, LayerWeight::V)],
            &d_v,
            &s.normed_attn,
            n,
            c,
            kvd,
        );
        let input = ix.layer(l, LayerWeight::InputNorm);
        rmsnorm::rmsnorm_backward(
            &mut d_branch,
            &mut grads[input],
            &d_normed,
            &s.x,
            &params[input],
            &s.rstd_attn,
            n,
            c,
        );
        residual::residual_add(&mut d_stream, &d_branch);
    }
    embedding::embedding_backward(&mut grads[0], &d_stream, ids, c);
    ReferenceResult { loss, logits, grads }
}
