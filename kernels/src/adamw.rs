//! The AdamW step, fused: one pass over a parameter tensor updates it and both moments.
//!
//! Shapes: `param`, `grad`: any shape, equal; `m`, `v`: the same shape, f32 (moments are kept in
//! f32 whatever the parameter type); `grad_scale`: `[1]` f32 on the device (the clip scale from
//! [`crate::grad_norm`], times 1/loss-scale under f16 loss scaling, so clipping needs no trip to
//! the host). The gradient may be f32 whatever the parameter type (the trainer accumulates
//! gradients in f32).
//!
//! Three ways to hold the parameter, the mixed-precision policy (see the README's precision
//! section):
//! - **master weights** ([`adamw_step_master`]): an f32 `master` is updated and the compute copy
//!   `param` (f16/bf16) is written from it, rounded to nearest, in the same pass: no update is
//!   lost however small. Per parameter the pass reads grad, m, v, master (16 bytes with an f32
//!   gradient) and writes m, v, master, param (12 + 2 bytes).
//! - **stochastic rounding** ([`adamw_step`] with [`Rounding::Stochastic`]): no master; the
//!   updated value is rounded up with probability equal to the discarded fraction
//!   ([`dsl::rounding`]), keyed by (seed, step, tensor, element), so updates survive in
//!   expectation and runs reproduce bit for bit.
//! - **round to nearest** ([`Rounding::Nearest`]): exact for f32; for f16/bf16 it drops every
//!   update below half an ulp (bf16 at 1.0: 3.9e-3), kept only to measure that loss.
//!
//! Exactly `torch.optim.AdamW`'s single-tensor arithmetic, in f32, with step `t` counted from 1:
//! ```text
//! g  = grad · s
//! p  = p · (1 − lr·wd)
//! m  = m + (1 − β1)·(g − m)                      (torch's lerp; = β1·m + (1 − β1)·g)
//! v  = v·β2 + (1 − β2)·g·g
//! p  = p − (lr / (1 − β1ᵗ)) · m / (sqrt(v) / sqrt(1 − β2ᵗ) + eps)
//! ```
//! Scalars that torch computes in Python floats (`1 − lr·wd`, `lr / (1 − β1ᵗ)`,
//! `sqrt(1 − β2ᵗ)`, `1 − β1`, `1 − β2`) are computed here in f64 and rounded to f32 once, as
//! torch does. All of `param`, `m`, `v` are updated in place (`=`).

use cubecl::prelude::*;
use dsl::launch::elementwise_grid;
use dsl::rounding::{NarrowFloat, RoundingKey, random_u32, round_stochastic};
use dsl::{Device, Error, FloatElement, GpuTensor, Result};

/// AdamW hyper-parameters. Defaults are Llama 2's: β1 0.9, β2 0.95, eps 1e-5, weight decay
/// 0.1, peak learning rate 3e-4 (7B/13B).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamW {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamW {
    fn default() -> Self {
        Self { lr: 3e-4, beta1: 0.9, beta2: 0.95, eps: 1e-5, weight_decay: 0.1 }
    }
}

impl AdamW {
    fn validate(&self, op: &'static str, step: u64) -> Result<()> {
        let bad = |message: String| Err(Error::InvalidArgument { op, message });
        if step == 0 {
            return bad("step counts from 1".into());
        }
        if !(0.0..1.0).contains(&self.beta1) || !(0.0..1.0).contains(&self.beta2) {
            return bad(format!("betas must be in [0, 1), got ({}, {})", self.beta1, self.beta2));
        }
        if !(self.lr.is_finite() && self.lr >= 0.0 && self.eps > 0.0 && self.weight_decay >= 0.0) {
            return bad(format!(
                "need lr ≥ 0, eps > 0, weight_decay ≥ 0; got lr {}, eps {}, weight_decay {}",
                self.lr, self.eps, self.weight_decay
            ));
        }
        Ok(())
    }
}

/// How [`adamw_step`] writes the updated parameter when its type is narrower than f32.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Rounding {
    /// Round to nearest even (the cast): exact for f32, loses sub-half-ulp updates otherwise.
    Nearest,
    /// Round stochastically with the random stream of this key (see [`RoundingKey::new`]).
    Stochastic(RoundingKey),
}

/// What changes the generated code: where the parameter lives and how it is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct AdamWConfig {
    /// Read and write an f32 master, then write `param` from it.
    master: bool,
    /// Write `param` by stochastic rounding onto `target` (vector width 1).
    stochastic: bool,
    target: NarrowFloat,
}

/// The update itself, in f32 (torch's operation order): writes `m[i]`, `v[i]` and returns the
/// new parameter.
#[cube]
#[allow(clippy::too_many_arguments)]
fn adamw_update<N: Size>(
    p_old: Vector<f32, N>,
    g: Vector<f32, N>,
    m: &mut Array<Vector<f32, N>>,
    v: &mut Array<Vector<f32, N>>,
    i: usize,
    decay: f32,
    one_minus_beta1: f32,
    beta2: f32,
    one_minus_beta2: f32,
    step_size: f32,
    bias_correction2_sqrt: f32,
    eps: f32,
) -> Vector<f32, N> {
    let p = p_old * Vector::new(decay);
    let m_old = m[i];
    let m_new = m_old + Vector::new(one_minus_beta1) * (g - m_old);
    let v_new = v[i] * Vector::new(beta2) + Vector::new(one_minus_beta2) * g * g;
    let denom = Vector::sqrt(v_new) / Vector::new(bias_correction2_sqrt) + Vector::new(eps);
    m[i] = m_new;
    v[i] = v_new;
    p + Vector::new(-step_size) * (m_new / denom)
}

#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn adamw_kernel<F: Float, G: Float, N: Size>(
    master: &mut Array<Vector<f32, N>>,
    param: &mut Array<Vector<F, N>>,
    m: &mut Array<Vector<f32, N>>,
    v: &mut Array<Vector<f32, N>>,
    grad: &Array<Vector<G, N>>,
    grad_scale: &Array<f32>,
    decay: f32,
    one_minus_beta1: f32,
    beta2: f32,
    one_minus_beta2: f32,
    step_size: f32,
    bias_correction2_sqrt: f32,
    eps: f32,
    key_lo: u32,
    key_hi: u32,
    len: u32,
    #[comptime] cfg: AdamWConfig,
) {
    let scale = Vector::<f32, N>::new(grad_scale[0]);
    let mut i = ABSOLUTE_POS;
    while i < len as usize {
        let g = Vector::<f32, N>::cast_from(grad[i]) * scale;
        if comptime!(cfg.master) {
            let p = adamw_update::<N>(
                master[i],
                g,
                m,
                v,
                i,
                decay,
                one_minus_beta1,
                beta2,
                one_minus_beta2,
                step_size,
                bias_correction2_sqrt,
                eps,
            );
            master[i] = p;
            param[i] = Vector::cast_from(p);
        } else {
            let p = adamw_update::<N>(
                Vector::cast_from(param[i]),
                g,
                m,
                v,
                i,
                decay,
                one_minus_beta1,
                beta2,
                one_minus_beta2,
                step_size,
                bias_correction2_sqrt,
                eps,
            );
            if comptime!(cfg.stochastic) {
                // Vector width 1 here: `i` is the element index the random stream is keyed by.
                let random = random_u32(i as u32, key_lo, key_hi);
                let rounded = round_stochastic(p[0], random, cfg.target);
                param[i] = Vector::cast_from(Vector::<f32, N>::new(rounded));
            } else {
                param[i] = Vector::cast_from(p);
            }
        }
        i += CUBE_COUNT * CUBE_DIM as usize;
    }
}

/// One AdamW step `step` (≥ 1) on one parameter tensor held in its own type `F`, written back
/// with `rounding` (irrelevant for f32). `grad` may be f32 or `F`.
///
/// Errors: shapes differ, `step` is 0, hyper-parameters out of range, the device lacks `F`.
#[allow(clippy::too_many_arguments)]
pub fn adamw_step<R: Runtime, F: FloatElement, G: FloatElement>(
    device: &Device<R>,
    param: &mut GpuTensor<R, F>,
    m: &mut GpuTensor<R, f32>,
    v: &mut GpuTensor<R, f32>,
    grad: &GpuTensor<R, G>,
    grad_scale: &GpuTensor<R, f32>,
    hp: &AdamW,
    step: u64,
    rounding: Rounding,
) -> Result<()> {
    const OP: &str = "adamw_step";
    let (target, key) = match (rounding, NarrowFloat::of(F::DTYPE)) {
        (Rounding::Stochastic(key), Some(target)) => (Some(target), key),
        _ => (None, RoundingKey { lo: 0, hi: 0 }),
    };
    let cfg = AdamWConfig {
        master: false,
        stochastic: target.is_some(),
        target: target.unwrap_or(NarrowFloat::F16),
    };
    // The master binding is never read without `cfg.master`; any f32 buffer will do.
    launch(device, OP, None, param, m, v, grad, grad_scale, hp, step, key, cfg)
}

/// One AdamW step on an f32 `master` copy, writing the compute copy `param` (f16/bf16, or f32)
/// from it rounded to nearest in the same pass. Shapes as [`adamw_step`]; `master` too.
#[allow(clippy::too_many_arguments)]
pub fn adamw_step_master<R: Runtime, F: FloatElement, G: FloatElement>(
    device: &Device<R>,
    master: &mut GpuTensor<R, f32>,
    param: &mut GpuTensor<R, F>,
    m: &mut GpuTensor<R, f32>,
    v: &mut GpuTensor<R, f32>,
    grad: &GpuTensor<R, G>,
    grad_scale: &GpuTensor<R, f32>,
    hp: &AdamW,
    step: u64,
) -> Result<()> {
    const OP: &str = "adamw_step_master";
    Error::check_shape(OP, "master", master.shape(), param.shape())?;
    let cfg = AdamWConfig { master: true, stochastic: false, target: NarrowFloat::F16 };
    let key = RoundingKey { lo: 0, hi: 0 };
    launch(device, OP, Some(master), param, m, v, grad, grad_scale, hp, step, key, cfg)
}

#[allow(clippy::too_many_arguments)]
fn launch<R: Runtime, F: FloatElement, G: FloatElement>(
    device: &Device<R>,
    op: &'static str,
    master: Option<&mut GpuTensor<R, f32>>,
    param: &mut GpuTensor<R, F>,
    m: &mut GpuTensor<R, f32>,
    v: &mut GpuTensor<R, f32>,
    grad: &GpuTensor<R, G>,
    grad_scale: &GpuTensor<R, f32>,
    hp: &AdamW,
    step: u64,
    key: RoundingKey,
    cfg: AdamWConfig,
) -> Result<()> {
    device.check_dtype::<F>(op)?;
    device.check_dtype::<G>(op)?;
    hp.validate(op, step)?;
    Error::check_shape(op, "grad", grad.shape(), param.shape())?;
    Error::check_shape(op, "m", m.shape(), param.shape())?;
    Error::check_shape(op, "v", v.shape(), param.shape())?;
    Error::check_shape(op, "grad_scale", grad_scale.shape(), &[1])?;
    let n = param.numel();
    if n == 0 {
        return Ok(());
    }
    if cfg.stochastic && n > u32::MAX as usize {
        return Err(Error::InvalidArgument {
            op,
            message: format!("stochastic rounding keys elements by u32; {n} elements is too many"),
        });
    }
    let t = step as i32;
    let vec = if cfg.stochastic {
        1
    } else {
        device.vector_size::<F>(n).min(device.vector_size::<f32>(n)).min(device.vector_size::<G>(n))
    };
    let (count, dim) = elementwise_grid(device, n / vec);
    // Without a master the kernel never touches this binding (comptime `cfg.master` is false).
    let master_arg = match &master {
        Some(master) => master.as_array_arg(),
        None => m.as_array_arg(),
    };
    // SAFETY: `i < numel / vec` for equally shaped master, param, m, v, grad; grad_scale has 1
    // element. Without a master, `master_arg` aliases `m` but is neither read nor written.
    unsafe {
        adamw_kernel::launch_unchecked::<F, G, R>(
            device.client(),
            count,
            dim,
            vec,
            master_arg,
            param.as_array_arg(),
            m.as_array_arg(),
            v.as_array_arg(),
            grad.as_array_arg(),
            grad_scale.as_array_arg(),
            (1.0 - hp.lr * hp.weight_decay) as f32,
            (1.0 - hp.beta1) as f32,
            hp.beta2 as f32,
            (1.0 - hp.beta2) as f32,
            (hp.lr / (1.0 - hp.beta1.powi(t))) as f32,
            (1.0 - hp.beta2.powi(t)).sqrt() as f32,
            hp.eps as f32,
            key.lo,
            key.hi,
            (n / vec) as u32,
            cfg,
        );
    }
    Ok(())
}
