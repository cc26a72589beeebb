//! RMSNorm in f64: same names and argument order as [`crate::rmsnorm`].

/// `out[r, c] = x[r, c] · rstd[r] · weight[c]`, `rstd[r] = 1 / sqrt(mean_c x[r, c]² + eps)`.
pub fn rmsnorm_forward(
    out: &mut [f64],
    rstd: &mut [f64],
    x: &[f64],
    weight: &[f64],
    rows: usize,
    cols: usize,
    eps: f64,
) {
    assert_eq!(x.len(), rows * cols, "rmsnorm_forward reference: x");
    assert_eq!(weight.len(), cols, "rmsnorm_forward reference: weight");
    for r in 0..rows {
        let row = &x[r * cols..(r + 1) * cols];
        let mean_sq = row.iter().map(|v| v * v).sum::<f64>() / cols as f64;
        let s = 1.0 / (mean_sq + eps).sqrt();
        rstd[r] = s;
        for c in 0..cols {
            out[r * cols + c] = row[c] * s * weight[c];
        }
    }
}

/// `dx` is overwritten; `dweight` is accumulated into (`+=`).
///
/// With `g = dout · weight` and `s = rstd`:
/// `dx = s·g − x · s³ · mean_c(g·x)`, `dweight[c] += Σ_r dout[r, c] · x[r, c] · s[r]`.
#[allow(clippy::too_many_arguments)]
pub fn rmsnorm_backward(
    dx: &mut [f64],
    dweight: &mut [f64],
    dout: &[f64],
    x: &[f64],
    weight: &[f64],
    rstd: &[f64],
    rows: usize,
    cols: usize,
) {
    for r in 0..rows {
        let s = rstd[r];
        let base = r * cols;
        let mean_gx = (0..cols).map(|c| dout[base + c] * weight[c] * x[base + c]).sum::<f64>() / cols as f64;
        for c in 0..cols {
            let g = dout[base + c] * weight[c];
            dx[base + c] = s * g - x[base + c] * s * s * s * mean_gx;
            dweight[c] += dout[base + c] * x[base + c] * s;
        }
    }
}
