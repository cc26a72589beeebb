//! The linear layer's products in f64: same names and argument order as [`crate::matmul`], with
//! explicit sizes (`n` rows of activations, weight `[out_features, in_features]`).

/// `y = x·wᵀ`.
pub fn linear_forward(
    y: &mut [f64],
    x: &[f64],
    w: &[f64],
    n: usize,
    in_features: usize,
    out_features: usize,
) {
    for r in 0..n {
        for o in 0..out_features {
            y[r * out_features + o] =
                (0..in_features).map(|i| x[r * in_features + i] * w[o * in_features + i]).sum();
        }
    }
}

/// `dx = dy·w`, or `dx += dy·w` when `accumulate`.
pub fn linear_backward_input(
    dx: &mut [f64],
    dy: &[f64],
    w: &[f64],
    accumulate: bool,
    n: usize,
    in_features: usize,
    out_features: usize,
) {
    for r in 0..n {
        for i in 0..in_features {
            let sum: f64 = (0..out_features).map(|o| dy[r * out_features + o] * w[o * in_features + i]).sum();
            let slot = &mut dx[r * in_features + i];
            *slot = if accumulate { *slot + sum } else { sum };
        }
    }
}

/// `dw += dyᵀ·x`.
pub fn linear_backward_weight(
    dw: &mut [f64],
    dy: &[f64],
    x: &[f64],
    n: usize,
    in_features: usize,
    out_features: usize,
) {
    for o in 0..out_features {
        for i in 0..in_features {
            dw[o * in_features + i] +=
                (0..n).map(|r| dy[r * out_features + o] * x[r * in_features + i]).sum::<f64>();
        }
    }
}
