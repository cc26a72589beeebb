//! AdamW in f64: same names and argument order as [`crate::adamw`].
//!
//! This is `torch.optim.AdamW` (single-tensor path) in exact arithmetic. Torch forms its
//! scalars (`1 − lr·wd`, `lr/(1 − β1ᵗ)`, `sqrt(1 − β2ᵗ)`, `1 − β1`, `β2`, `1 − β2`, eps) as
//! Python floats and multiplies f32 tensors by them, which rounds each scalar to f32; those
//! rounded scalars are part of what torch computes, so the reference uses them too. (Using the
//! unrounded ones differs systematically by up to ~3e-8 relative per step, e.g. `1 − 2e-6`.)

use crate::adamw::AdamW;

fn as_f32(x: f64) -> f64 {
    x as f32 as f64
}

pub fn adamw_step(
    param: &mut [f64],
    m: &mut [f64],
    v: &mut [f64],
    grad: &[f64],
    grad_scale: f64,
    hp: &AdamW,
    step: u64,
) {
    let t = step as i32;
    let decay = as_f32(1.0 - hp.lr * hp.weight_decay);
    let one_minus_beta1 = as_f32(1.0 - hp.beta1);
    let (beta2, one_minus_beta2) = (as_f32(hp.beta2), as_f32(1.0 - hp.beta2));
    let step_size = as_f32(hp.lr / (1.0 - hp.beta1.powi(t)));
    let bias_correction2_sqrt = as_f32((1.0 - hp.beta2.powi(t)).sqrt());
    let eps = as_f32(hp.eps);
    for i in 0..param.len() {
        let g = grad[i] * grad_scale;
        param[i] *= decay;
        // m̂ = m/(1 − β1ᵗ) and v̂ = v/(1 − β2ᵗ) folded into step_size and the denominator.
        m[i] += one_minus_beta1 * (g - m[i]);
        v[i] = v[i] * beta2 + one_minus_beta2 * g * g;
        param[i] -= step_size * m[i] / (v[i].sqrt() / bias_correction2_sqrt + eps);
    }
}

/// The same step with torch's f32 arithmetic, operation by operation (each tensor op rounds
/// to f32): the bit-level model of what `torch.optim.AdamW` does to f32 tensors. The f64
/// version above drifts from it by up to one f32 ulp of the parameter per step, systematically
/// (the rounding of `p · (1 − lr·wd)` repeats step after step while `p` barely moves).
pub fn adamw_step_f32(
    param: &mut [f32],
    m: &mut [f32],
    v: &mut [f32],
    grad: &[f32],
    grad_scale: f32,
    hp: &AdamW,
    step: u64,
) {
    let t = step as i32;
    let decay = (1.0 - hp.lr * hp.weight_decay) as f32;
    let one_minus_beta1 = (1.0 - hp.beta1) as f32;
    let (beta2, one_minus_beta2) = (hp.beta2 as f32, (1.0 - hp.beta2) as f32);
    let step_size = (hp.lr / (1.0 - hp.beta1.powi(t))) as f32;
    let bias_correction2_sqrt = (1.0 - hp.beta2.powi(t)).sqrt() as f32;
    let eps = hp.eps as f32;
    for i in 0..param.len() {
        let g = grad[i] * grad_scale;
        param[i] *= decay;
        m[i] += one_minus_beta1 * (g - m[i]);
        v[i] = v[i] * beta2 + one_minus_beta2 * g * g;
        let denom = v[i].sqrt() / bias_correction2_sqrt + eps;
        param[i] += -step_size * (m[i] / denom);
    }
}
