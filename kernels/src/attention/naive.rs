//! Attention the naive way, with the scores materialised: the comparator `cargo xtask bench`
//! runs beside the flash kernels in [`crate::attention`] (same shapes, same device), and a
//! second opinion in the tests. One unit per output element, f32 throughout; the
//! `[B, Hq, T, T]` score and probability matrices are what flash attention avoids.
//!
//! Causal only when `causal`; training shapes only (q and k of the same length).

use cubecl::prelude::*;
use dsl::launch::elementwise_grid;
use dsl::{CubeReduce, Device, Error, FloatElement, GpuTensor, Result, cube_max, cube_sum};

/// Buffers the naive path needs: `[B, Hq, T, T]` f32 each.
pub struct NaiveScratch<R: Runtime> {
    pub probs: GpuTensor<R, f32>,
    pub grad_scores: GpuTensor<R, f32>,
}

impl<R: Runtime> NaiveScratch<R> {
    pub fn new(device: &Device<R>, batch: usize, q_heads: usize, seq: usize) -> Result<Self> {
        let shape = [batch, q_heads, seq, seq];
        Ok(Self {
            probs: GpuTensor::uninit(device, &shape)?,
            grad_scores: GpuTensor::uninit(device, &shape)?,
        })
    }

    pub fn size_bytes(&self) -> usize {
        self.probs.size_bytes() + self.grad_scores.size_bytes()
    }
}

/// `S[b,h,i,j] = scale · q_i·k_j` (hidden entries: −∞ as f32::MIN).
#[cube(launch_unchecked)]
fn scores_kernel<F: Float>(
    scores: &mut Array<f32>,
    q: &Array<F>,
    k: &Array<F>,
    seq: u32,
    q_heads: u32,
    kv_heads: u32,
    head_dim: u32,
    scale: f32,
    total: u32,
    #[comptime] causal: bool,
) {
    // Grid-stride: the cube count is capped at the device limit.
    let mut e = ABSOLUTE_POS;
    while e < total as usize {
        let j = e % seq as usize;
        let i = (e / seq as usize) % seq as usize;
        let bh = e / (seq as usize * seq as usize);
        let (b, h) = (bh / q_heads as usize, bh % q_heads as usize);
        let kvh = h / (q_heads / kv_heads) as usize;
        let qi = ((b * seq as usize + i) * q_heads as usize + h) * head_dim as usize;
        let kj = ((b * seq as usize + j) * kv_heads as usize + kvh) * head_dim as usize;
        let mut dot = f32::new(0.0);
        for d in 0..head_dim as usize {
            dot += f32::cast_from(q[qi + d]) * f32::cast_from(k[kj + d]);
        }
        let mut s = dot * scale;
        if comptime!(causal) {
            s = select(j <= i, s, f32::min_value());
        }
        scores[e] = s;
        e += CUBE_COUNT * CUBE_DIM as usize;
    }
}

/// Row softmax in place, one cube per row (grid-stride over rows).
#[cube(launch_unchecked)]
fn softmax_rows_kernel(probs: &mut Array<f32>, rows: u32, seq: u32, #[comptime] cfg: CubeReduce) {
    let mut row = CUBE_POS;
    while row < rows as usize {
        let base = row * seq as usize;
        let mut m = f32::min_value();
        let mut c = UNIT_POS as usize;
        while c < seq as usize {
            m = f32::max(m, probs[base + c]);
            c += CUBE_DIM as usize;
        }
        let max = cube_max(m, cfg);
        let mut s = f32::new(0.0);
        c = UNIT_POS as usize;
        while c < seq as usize {
            let x = probs[base + c];
            s += select(x == f32::min_value(), f32::new(0.0), f32::exp(x - max));
            c += CUBE_DIM as usize;
        }
        let sum = cube_sum(s, cfg);
        c = UNIT_POS as usize;
        while c < seq as usize {
            let x = probs[base + c];
            probs[base + c] = select(x == f32::min_value(), f32::new(0.0), f32::exp(x - max) / sum);
            c += CUBE_DIM as usize;
        }
        row += CUBE_COUNT;
    }
}

/// `out[b,i,h,d] = Σ_j P[b,h,i,j] · v[b,j,kvh,d]`.
#[cube(launch_unchecked)]
fn probs_times_v_kernel<F: Float>(
    out: &mut Array<F>,
    probs: &Array<f32>,
    v: &Array<F>,
    seq: u32,
    q_heads: u32,
    kv_heads: u32,
    head_dim: u32,
    total: u32,
) {
    // Grid-stride: the cube count is capped at the device limit.
    let mut e = ABSOLUTE_POS;
    while e < total as usize {
        let d = e % head_dim as usize;
        let h = (e / head_dim as usize) % q_heads as usize;
        let bi = e / (head_dim as usize * q_heads as usize);
        let (b, i) = (bi / seq as usize, bi % seq as usize);
        let kvh = h / (q_heads / kv_heads) as usize;
        let row = ((b * q_heads as usize + h) * seq as usize + i) * seq as usize;
        let mut acc = f32::new(0.0);
        for j in 0..seq as usize {
            acc += probs[row + j]
                * f32::cast_from(
                    v[((b * seq as usize + j) * kv_heads as usize + kvh) * head_dim as usize + d],
                );
        }
        out[e] = F::cast_from(acc);
        e += CUBE_COUNT * CUBE_DIM as usize;
    }
}

/// `dS[b,h,i,j] = P · (dO_i·v_j − Σ_d dO_i·O_i)`.
#[cube(launch_unchecked)]
fn grad_scores_kernel<F: Float>(
    grad_scores: &mut Array<f32>,
    probs: &Array<f32>,
    dout: &Array<F>,
    out: &Array<F>,
    v: &Array<F>,
    seq: u32,
    q_heads: u32,
    kv_heads: u32,
    head_dim: u32,
    total: u32,
) {
    // Grid-stride: the cube count is capped at the device limit.
    let mut e = ABSOLUTE_POS;
    while e < total as usize {
        let j = e % seq as usize;
        let i = (e / seq as usize) % seq as usize;
        let bh = e / (seq as usize * seq as usize);
        let (b, h) = (bh / q_heads as usize, bh % q_heads as usize);
        let kvh = h / (q_heads / kv_heads) as usize;
        let oi = ((b * seq as usize + i) * q_heads as usize + h) * head_dim as usize;
        let vj = ((b * seq as usize + j) * kv_heads as usize + kvh) * head_dim as usize;
        let mut dp = f32::new(0.0);
        let mut delta = f32::new(0.0);
        for d in 0..head_dim as usize {
            let g = f32::cast_from(dout[oi + d]);
            dp += g * f32::cast_from(v[vj + d]);
            delta += g * f32::cast_from(out[oi + d]);
        }
        grad_scores[e] = probs[e] * (dp - delta);
        e += CUBE_COUNT * CUBE_DIM as usize;
    }
}

/// `dq[b,i,h,d] = scale · Σ_j dS[b,h,i,j] · k[b,j,kvh,d]`.
#[cube(launch_unchecked)]
fn grad_q_kernel<F: Float>(
    dq: &mut Array<F>,
    grad_scores: &Array<f32>,
    k: &Array<F>,
    seq: u32,
    q_heads: u32,
    kv_heads: u32,
    head_dim: u32,
    scale: f32,
    total: u32,
) {
    // Grid-stride: the cube count is capped at the device limit.
    let mut e = ABSOLUTE_POS;
    while e < total as usize {
        let d = e % head_dim as usize;
        let h = (e / head_dim as usize) % q_heads as usize;
        let bi = e / (head_dim as usize * q_heads as usize);
        let (b, i) = (bi / seq as usize, bi % seq as usize);
        let kvh = h / (q_heads / kv_heads) as usize;
        let row = ((b * q_heads as usize + h) * seq as usize + i) * seq as usize;
        let mut acc = f32::new(0.0);
        for j in 0..seq as usize {
            acc += grad_scores[row + j]
                * f32::cast_from(
                    k[((b * seq as usize + j) * kv_heads as usize + kvh) * head_dim as usize + d],
                );
        }
        dq[e] = F::cast_from(acc * scale);
        e += CUBE_COUNT * CUBE_DIM as usize;
    }
}

/// `dk[b,j,kvh,d] = scale · Σ_{h in group, i} dS[b,h,i,j] · q[b,i,h,d]` and
/// `dv[b,j,kvh,d] = Σ_{h in group, i} P[b,h,i,j] · dO[b,i,h,d]`.
#[cube(launch_unchecked)]
fn grad_kv_kernel<F: Float>(
    dk: &mut Array<F>,
    dv: &mut Array<F>,
    grad_scores: &Array<f32>,
    probs: &Array<f32>,
    q: &Array<F>,
    dout: &Array<F>,
    seq: u32,
    q_heads: u32,
    kv_heads: u32,
    head_dim: u32,
    scale: f32,
    total: u32,
) {
    // Grid-stride: the cube count is capped at the device limit.
    let mut e = ABSOLUTE_POS;
    while e < total as usize {
        let d = e % head_dim as usize;
        let kvh = (e / head_dim as usize) % kv_heads as usize;
        let bj = e / (head_dim as usize * kv_heads as usize);
        let (b, j) = (bj / seq as usize, bj % seq as usize);
        let group = (q_heads / kv_heads) as usize;
        let mut dk_acc = f32::new(0.0);
        let mut dv_acc = f32::new(0.0);
        for g in 0..group {
            let h = kvh * group + g;
            for i in 0..seq as usize {
                let sij = ((b * q_heads as usize + h) * seq as usize + i) * seq as usize + j;
                let qi = ((b * seq as usize + i) * q_heads as usize + h) * head_dim as usize + d;
                dk_acc += grad_scores[sij] * f32::cast_from(q[qi]);
                dv_acc += probs[sij] * f32::cast_from(dout[qi]);
            }
        }
        dk[e] = F::cast_from(dk_acc * scale);
        dv[e] = F::cast_from(dv_acc);
        e += CUBE_COUNT * CUBE_DIM as usize;
    }
}

struct Dims {
    batch: usize,
    seq: usize,
    q_heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

fn dims<R: Runtime, F: FloatElement>(
    op: &'static str,
    q: &GpuTensor<R, F>,
    k: &GpuTensor<R, F>,
) -> Result<Dims> {
    let (&[batch, seq, q_heads, head_dim], &[_, kv_seq, kv_heads, _]) = (q.shape(), k.shape()) else {
        return Err(Error::InvalidArgument { op, message: "q and k must be [B, T, H, head_dim]".into() });
    };
    if kv_seq != seq || kv_heads == 0 || q_heads % kv_heads != 0 {
        return Err(Error::InvalidArgument {
            op,
            message: format!(
                "need equal lengths and Hq a multiple of Hkv, got q {:?}, k {:?}",
                q.shape(),
                k.shape()
            ),
        });
    }
    Ok(Dims { batch, seq, q_heads, kv_heads, head_dim })
}

/// Forward: `out =`, leaving the probabilities in `scratch.probs` for the backward.
pub fn naive_attention_forward<R: Runtime, F: FloatElement>(
    device: &Device<R>,
    out: &mut GpuTensor<R, F>,
    scratch: &mut NaiveScratch<R>,
    q: &GpuTensor<R, F>,
    k: &GpuTensor<R, F>,
    v: &GpuTensor<R, F>,
    causal: bool,
) -> Result<()> {
    const OP: &str = "naive_attention_forward";
    device.check_dtype::<F>(OP)?;
    let d = dims(OP, q, k)?;
    Error::check_shape(OP, "v", v.shape(), k.shape())?;
    Error::check_shape(OP, "out", out.shape(), q.shape())?;
    Error::check_shape(OP, "scratch", scratch.probs.shape(), &[d.batch, d.q_heads, d.seq, d.seq])?;
    let scale = 1.0 / (d.head_dim as f32).sqrt();
    let (score_count, out_count) = (d.batch * d.q_heads * d.seq * d.seq, q.numel());
    let (cc, cd) = elementwise_grid(device, score_count);
    let units = dsl::launch::cube_units(device, 256);
    // SAFETY: every kernel guards each output element with `e < total`; the indices it
    // derives stay inside the [B, T, H, hd] and [B, Hq, T, T] tensors checked above.
    unsafe {
        scores_kernel::launch_unchecked::<F, R>(
            device.client(),
            cc,
            cd,
            scratch.probs.as_array_arg(),
            q.as_array_arg(),
            k.as_array_arg(),
            d.seq as u32,
            d.q_heads as u32,
            d.kv_heads as u32,
            d.head_dim as u32,
            scale,
            score_count as u32,
            causal,
        );
        softmax_rows_kernel::launch_unchecked::<R>(
            device.client(),
            CubeCount::Static(device.grid_cubes(d.batch * d.q_heads * d.seq), 1, 1),
            CubeDim::new_1d(units),
            scratch.probs.as_array_arg(),
            (d.batch * d.q_heads * d.seq) as u32,
            d.seq as u32,
            CubeReduce::new(units, device.info().plane_reduce(units)),
        );
        let (cc, cd) = elementwise_grid(device, out_count);
        probs_times_v_kernel::launch_unchecked::<F, R>(
            device.client(),
            cc,
            cd,
            out.as_array_arg(),
            scratch.probs.as_array_arg(),
            v.as_array_arg(),
            d.seq as u32,
            d.q_heads as u32,
            d.kv_heads as u32,
            d.head_dim as u32,
            out_count as u32,
        );
    }
    Ok(())
}

/// Backward after [`naive_attention_forward`] (which left P in `scratch`): `dq =`, `dk =`, `dv =`.
pub fn naive_attention_backward<R: Runtime, F: FloatElement>(
    device: &Device<R>,
    dq: &mut GpuTensor<R, F>,
    dk: &mut GpuTensor<R, F>,
    dv: &mut GpuTensor<R, F>,
    scratch: &mut NaiveScratch<R>,
    dout: &GpuTensor<R, F>,
    q: &GpuTensor<R, F>,
    k: &GpuTensor<R, F>,
    v: &GpuTensor<R, F>,
    out: &GpuTensor<R, F>,
) -> Result<()> {
    const OP: &str = "naive_attention_backward";
    device.check_dtype::<F>(OP)?;
    let d = dims(OP, q, k)?;
    for (name, t) in [("dq", dq.shape()), ("dout", dout.shape()), ("out", out.shape())] {
        Error::check_shape(OP, name, t, q.shape())?;
    }
    for (name, t) in [("v", v.shape()), ("dk", dk.shape()), ("dv", dv.shape())] {
        Error::check_shape(OP, name, t, k.shape())?;
    }
    let scores = [d.batch, d.q_heads, d.seq, d.seq];
    Error::check_shape(OP, "scratch", scratch.probs.shape(), &scores)?;
    Error::check_shape(OP, "scratch", scratch.grad_scores.shape(), &scores)?;
    let scale = 1.0 / (d.head_dim as f32).sqrt();
    let score_count = scores.iter().product::<usize>();
    let (cc, cd) = elementwise_grid(device, score_count);
    // SAFETY: as in the forward: one guarded output element per unit, indices inside the
    // checked tensors.
    unsafe {
        grad_scores_kernel::launch_unchecked::<F, R>(
            device.client(),
            cc,
            cd,
            scratch.grad_scores.as_array_arg(),
            scratch.probs.as_array_arg(),
            dout.as_array_arg(),
            out.as_array_arg(),
            v.as_array_arg(),
            d.seq as u32,
            d.q_heads as u32,
            d.kv_heads as u32,
            d.head_dim as u32,
            score_count as u32,
        );
        let (cc, cd) = elementwise_grid(device, q.numel());
        grad_q_kernel::launch_unchecked::<F, R>(
            device.client(),
            cc,
            cd,
            dq.as_array_arg(),
            scratch.grad_scores.as_array_arg(),
            k.as_array_arg(),
            d.seq as u32,
            d.q_heads as u32,
            d.kv_heads as u32,
            d.head_dim as u32,
            scale,
            q.numel() as u32,
        );
        let (cc, cd) = elementwise_grid(device, k.numel());
        grad_kv_kernel::launch_unchecked::<F, R>(
            device.client(),
            cc,
            cd,
            dk.as_array_arg(),
            dv.as_array_arg(),
            scratch.grad_scores.as_array_arg(),
            scratch.probs.as_array_arg(),
            q.as_array_arg(),
            dout.as_array_arg(),
            d.seq as u32,
            d.q_heads as u32,
            d.kv_heads as u32,
            d.head_dim as u32,
            scale,
            k.numel() as u32,
        );
    }
    Ok(())
}
