//! SwiGLU in f64: same names and argument order as [`crate::swiglu`].

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

pub fn swiglu_forward(out: &mut [f64], gate: &[f64], up: &[f64]) {
    for i in 0..out.len() {
        out[i] = gate[i] * sigmoid(gate[i]) * up[i];
    }
}

pub fn swiglu_backward(dgate: &mut [f64], dup: &mut [f64], dout: &[f64], gate: &[f64], up: &[f64]) {
    for i in 0..dout.len() {
        let s = sigmoid(gate[i]);
        dgate[i] = dout[i] * up[i] * s * (1.0 + gate[i] * (1.0 - s));
        dup[i] = dout[i] * gate[i] * s;
    }
}
