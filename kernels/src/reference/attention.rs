//! Attention in f64 with the softmax materialised: same names and argument order as
//! [`crate::attention`] (sizes explicit; the backward recomputes P instead of taking `out` and
//! `lse`). GQA by index mapping: query head `h` uses key/value head `h / (Hq / Hkv)`.
//!
//! Every intermediate passes through `round`, the identity for the f64 reference. Tests pass
//! rounding to f16/bf16 to get the naive implementation in that precision, which
//! FlashAttention's accuracy rule compares against: S, P, O (and dP, dS, dQ, dK, dV) rounded
//! to the storage type after each product, sums accumulated in f32 as a GPU matmul would.

use crate::attention::AttentionShape;

fn index(shape: &AttentionShape, heads: usize, len: usize, b: usize, t: usize, h: usize) -> usize {
    ((b * len + t) * heads + h) * shape.head_dim
}

fn visible(shape: &AttentionShape, causal: bool, i: usize, j: usize) -> bool {
    j < shape.kv_len && (!causal || j <= shape.position_offset + i)
}

/// `P[b][h][i][j]` (0 where hidden) and `lse[b][h][i]`, both rounded as described above.
fn probabilities(
    q: &[f64],
    k: &[f64],
    s: &AttentionShape,
    causal: bool,
    round: &dyn Fn(f64) -> f64,
    accumulate: &dyn Fn(f64) -> f64,
) -> (Vec<f64>, Vec<f64>) {
    let scale = 1.0 / (s.head_dim as f64).sqrt();
    let group = s.q_heads / s.kv_heads;
    let mut p = vec![0.0; s.batch * s.q_heads * s.q_len * s.kv_len];
    let mut lse = vec![0.0; s.batch * s.q_heads * s.q_len];
    for b in 0..s.batch {
        for h in 0..s.q_heads {
            for i in 0..s.q_len {
                let qi = index(s, s.q_heads, s.q_len, b, i, h);
                let row = ((b * s.q_heads + h) * s.q_len + i) * s.kv_len;
                let mut scores = vec![f64::NEG_INFINITY; s.kv_len];
                for j in 0..s.kv_len {
                    if visible(s, causal, i, j) {
                        let kj = index(s, s.kv_heads, s.kv_capacity, b, j, h / group);
                        let mut dot = 0.0;
                        for d in 0..s.head_dim {
                            dot = accumulate(dot + q[qi + d] * k[kj + d]);
                        }
                        scores[j] = round(accumulate(dot * scale));
                    }
                }
                let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let sum: f64 =
                    scores.iter().map(|&x| if x.is_finite() { (x - max).exp() } else { 0.0 }).sum();
                lse[(b * s.q_heads + h) * s.q_len + i] = max + sum.ln();
                for j in 0..s.kv_len {
                    if scores[j].is_finite() {
                        p[row + j] = round(accumulate((scores[j] - max).exp() / sum));
                    }
                }
            }
        }
    }
    (p, lse)
}

/// `out = softmax(scale·QKᵀ)·V`, `lse` per row. `out` is `[B, Tq, Hq, hd]`, `lse` `[B, Hq, Tq]`.
pub fn attention_forward_rounded(
    out: &mut [f64],
    lse: &mut [f64],
    q: &[f64],
    k: &[f64],
    v: &[f64],
    s: &AttentionShape,
    causal: bool,
    round: &dyn Fn(f64) -> f64,
    accumulate: &dyn Fn(f64) -> f64,
) {
    let group = s.q_heads / s.kv_heads;
    let (p, row_lse) = probabilities(q, k, s, causal, round, accumulate);
    lse.copy_from_slice(&row_lse);
    for b in 0..s.batch {
        for h in 0..s.q_heads {
            for i in 0..s.q_len {
                let oi = index(s, s.q_heads, s.q_len, b, i, h);
                let row = ((b * s.q_heads + h) * s.q_len + i) * s.kv_len;
                for d in 0..s.head_dim {
                    let mut acc = 0.0;
                    for j in 0..s.kv_len {
                        acc = accumulate(
                            acc + p[row + j] * v[index(s, s.kv_heads, s.kv_capacity, b, j, h / group) + d],
                        );
                    }
                    out[oi + d] = round(acc);
                }
            }
        }
    }
}

pub fn attention_forward(
    out: &mut [f64],
    lse: &mut [f64],
    q: &[f64],
    k: &[f64],
    v: &[f64],
    s: &AttentionShape,
    causal: bool,
) {
    attention_forward_rounded(out, lse, q, k, v, s, causal, &|x| x, &|x| x);
}

/// `dq =`, `dk =`, `dv =` for `L = Σ out·dout`, with `kv_len == kv_capacity`.
pub fn attention_backward_rounded(
    dq: &mut [f64],
    dk: &mut [f64],
    dv: &mut [f64],
    dout: &[f64],
    q: &[f64],
    k: &[f64],
    v: &[f64],
    s: &AttentionShape,
    causal: bool,
    round: &dyn Fn(f64) -> f64,
    accumulate: &dyn Fn(f64) -> f64,
) {
    let scale = 1.0 / (s.head_dim as f64).sqrt();
    let group = s.q_heads / s.kv_heads;
    let (p, _) = probabilities(q, k, s, causal, round, accumulate);
    let mut out = vec![0.0; dout.len()];
    let mut lse = vec![0.0; s.batch * s.q_heads * s.q_len];
    attention_forward_rounded(&mut out, &mut lse, q, k, v, s, causal, round, accumulate);
    dq.fill(0.0);
    dk.fill(0.0);
    dv.fill(0.0);
    let hd = s.head_dim;
    for b in 0..s.batch {
        for h in 0..s.q_heads {
            let kvh = h / group;
            // dS for this head, row by row.
            let mut ds = vec![0.0; s.q_len * s.kv_len];
            for i in 0..s.q_len {
                let oi = index(s, s.q_heads, s.q_len, b, i, h);
                let row = ((b * s.q_heads + h) * s.q_len + i) * s.kv_len;
                let mut delta = 0.0;
                for d in 0..hd {
                    delta = accumulate(delta + dout[oi + d] * out[oi + d]);
                }
                let delta = round(delta);
                for j in 0..s.kv_len {
                    let vj = index(s, s.kv_heads, s.kv_capacity, b, j, kvh);
                    let mut dp = 0.0;
                    for d in 0..hd {
                        dp = accumulate(dp + dout[oi + d] * v[vj + d]);
                    }
                    ds[i * s.kv_len + j] = round(accumulate(p[row + j] * (round(dp) - delta)));
                }
            }
            for i in 0..s.q_len {
                let qi = index(s, s.q_heads, s.q_len, b, i, h);
                for d in 0..hd {
                    let mut acc = 0.0;
                    for j in 0..s.kv_len {
                        acc = accumulate(
                            acc + ds[i * s.kv_len + j]
                                * k[index(s, s.kv_heads, s.kv_capacity, b, j, kvh) + d],
                        );
                    }
                    dq[qi + d] = round(accumulate(acc * scale));
                }
            }
            // dK and dV sum over the query heads of the group: accumulate across h.
            for j in 0..s.kv_len {
                let kj = index(s, s.kv_heads, s.kv_capacity, b, j, kvh);
                for d in 0..hd {
                    let (mut dk_acc, mut dv_acc) = (0.0, 0.0);
                    for i in 0..s.q_len {
                        let qi = index(s, s.q_heads, s.q_len, b, i, h);
                        let row = ((b * s.q_heads + h) * s.q_len + i) * s.kv_len;
                        dk_acc = accumulate(dk_acc + ds[i * s.kv_len + j] * q[qi + d]);
                        dv_acc = accumulate(dv_acc + p[row + j] * dout[qi + d]);
                    }
                    dk[kj + d] = accumulate(dk[kj + d] + accumulate(dk_acc * scale));
                    dv[kj + d] = accumulate(dv[kj + d] + dv_acc);
                }
            }
        }
    }
    for x in dk.iter_mut().chain(dv.iter_mut()) {
        *x = round(*x);
    }
}

pub fn attention_backward(
    dq: &mut [f64],
    dk: &mut [f64],
    dv: &mut [f64],
    dout: &[f64],
    q: &[f64],
    k: &[f64],
    v: &[f64],
    s: &AttentionShape,
    causal: bool,
) {
    attention_backward_rounded(dq, dk, dv, dout, q, k, v, s, causal, &|x| x, &|x| x);
}
