//! Embedding in f64: same names and argument order as [`crate::embedding`].

pub fn embedding_forward(out: &mut [f64], ids: &[u32], weight: &[f64], hidden: usize) {
    for (n, &id) in ids.iter().enumerate() {
        let row = id as usize * hidden;
        out[n * hidden..(n + 1) * hidden].copy_from_slice(&weight[row..row + hidden]);
    }
}

/// `dweight += ` scatter of `dout` rows by id.
pub fn embedding_backward(dweight: &mut [f64], dout: &[f64], ids: &[u32], hidden: usize) {
    for (n, &id) in ids.iter().enumerate() {
        for c in 0..hidden {
            dweight[id as usize * hidden + c] += dout[n * hidden + c];
        }
    }
}
