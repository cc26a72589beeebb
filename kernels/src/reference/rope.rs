//! RoPE in f64 (angles computed exactly): same names and argument order as [`crate::rope`],
//! with `[B, T, H, hd]` given as explicit sizes. The `_scaled` forms divide positions by
//! linear scaling's factor before taking the angles.

fn rotate(
    out: &mut [f64],
    x: &[f64],
    (batch, seq_len, heads, head_dim): (usize, usize, usize, usize),
    theta: f64,
    position_offset: usize,
    position_divisor: f64,
    sign: f64,
) {
    let half = head_dim / 2;
    for b in 0..batch {
        for t in 0..seq_len {
            let pos = (position_offset + t) as f64 / position_divisor;
            for h in 0..heads {
                let base = ((b * seq_len + t) * heads + h) * head_dim;
                for i in 0..half {
                    let angle = pos * theta.powf(-2.0 * i as f64 / head_dim as f64);
                    let (c, s) = (angle.cos(), sign * angle.sin());
                    let (x1, x2) = (x[base + i], x[base + half + i]);
                    out[base + i] = x1 * c - x2 * s;
                    out[base + half + i] = x2 * c + x1 * s;
                }
            }
        }
    }
}

pub fn rope_forward(
    out: &mut [f64],
    x: &[f64],
    shape: (usize, usize, usize, usize),
    theta: f64,
    position_offset: usize,
) {
    rotate(out, x, shape, theta, position_offset, 1.0, 1.0);
}

pub fn rope_backward(
    dx: &mut [f64],
    dout: &[f64],
    shape: (usize, usize, usize, usize),
    theta: f64,
    position_offset: usize,
) {
    rotate(dx, dout, shape, theta, position_offset, 1.0, -1.0);
}

/// [`rope_forward`] with positions divided by `position_divisor`.
pub fn rope_forward_scaled(
    out: &mut [f64],
    x: &[f64],
    shape: (usize, usize, usize, usize),
    theta: f64,
    position_offset: usize,
    position_divisor: f64,
) {
    rotate(out, x, shape, theta, position_offset, position_divisor, 1.0);
}

/// [`rope_backward`] with positions divided by `position_divisor`.
pub fn rope_backward_scaled(
    dx: &mut [f64],
    dout: &[f64],
    shape: (usize, usize, usize, usize),
    theta: f64,
    position_offset: usize,
    position_divisor: f64,
) {
    rotate(dx, dout, shape, theta, position_offset, position_divisor, -1.0);
}
