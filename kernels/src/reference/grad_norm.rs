//! Global gradient norm in f64: same names and argument order as [`crate::grad_norm`].

/// Returns `(norm, clip_scale)` with `clip_scale = min(1, max_norm / (norm + 1e-6))`.
pub fn grad_norm(grads: &[&[f64]], max_norm: f64) -> (f64, f64) {
    let norm = grads.iter().flat_map(|g| g.iter()).map(|v| v * v).sum::<f64>().sqrt();
    (norm, (max_norm / (norm + 1e-6)).min(1.0))
}
