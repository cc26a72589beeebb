//! The AdamW step, fused: one pass over a parameter tensor updates it and both moments.
//!
//! Shapes: `param`, `grad`: any shape, equal; `m`, `v`: the same shape, f32 (moments are kept in
//! f32 whatever the parameter type); `grad_scale`: `[1]` f32 on the device (the clip scale from
//! [`crate::grad_norm`], so clipping needs no trip to the host).
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

#[cube(launch_unchecked)]
fn adamw_kernel<F: Float, N: Size>(
    param: &mut Array<Vector<F, N>>,
    m: &mut Array<Vector<f32, N>>,
    v: &mut Array<Vector<f32, N>>,
    grad: &Array<Vector<F, N>>,
    grad_scale: &Array<f32>,
    decay: f32,
    one_minus_beta1: f32,
    beta2: f32,
    one_minus_beta2: f32,
    step_size: f32,
    bias_correction2_sqrt: f32,
    eps: f32,
    len: u32,
) {
    let scale = Vector::<f32, N>::new(grad_scale[0]);
    let mut i = ABSOLUTE_POS;
    while i < len as usize {
        let g = Vector::<f32, N>::cast_from(grad[i]) * scale;
        let p = Vector::<f32, N>::cast_from(param[i]) * Vector::new(decay);
        let m_old = m[i];
        let m_new = m_old + Vector::new(one_minus_beta1) * (g - m_old);
        let v_new = v[i] * Vector::new(beta2) + Vector::new(one_minus_beta2) * g * g;
        let denom = Vector::sqrt(v_new) / Vector::new(bias_correction2_sqrt) + Vector::new(eps);
        m[i] = m_new;
        v[i] = v_new;
        param[i] = Vector::cast_from(p + Vector::new(-step_size) * (m_new / denom));
        i += CUBE_COUNT * CUBE_DIM as usize;
    }
}

/// One AdamW step `step` (≥ 1) on one parameter tensor.
pub fn adamw_step<R: Runtime, F: FloatElement>(
    device: &Device<R>,
    param: &mut GpuTensor<R, F>,
    m: &mut GpuTensor<R, f32>,
    v: &mut GpuTensor<R, f32>,
    grad: &GpuTensor<R, F>,
    grad_scale: &GpuTensor<R, f32>,
    hp: &AdamW,
    step: u64,
) -> Result<()> {
    const OP: &str = "adamw_step";
    device.check_dtype::<F>(OP)?;
    hp.validate(OP, step)?;
    Error::check_shape(OP, "grad", grad.shape(), param.shape())?;
    Error::check_shape(OP, "m", m.shape(), param.shape())?;
    Error::check_shape(OP, "v", v.shape(), param.shape())?;
    Error::check_shape(OP, "grad_scale", grad_scale.shape(), &[1])?;
    let n = param.numel();
    if n == 0 {
        return Ok(());
    }
    let t = step as i32;
    let vec = device.vector_size::<F>(n).min(device.vector_size::<f32>(n));
    let (count, dim) = elementwise_grid(device, n / vec);
    // SAFETY: `i < numel / vec` for equally shaped param, m, v, grad; grad_scale has 1 element.
    unsafe {
        adamw_kernel::launch_unchecked::<F, R>(
            device.client(),
            count,
            dim,
            vec,
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
            (n / vec) as u32,
        );
    }
    Ok(())
}
