//! Softmax cross-entropy in f64: same names and argument order as [`crate::cross_entropy`].

use crate::cross_entropy::IGNORE_INDEX;

/// Returns the mean loss over counted rows (0 when none count); writes `dlogits` and `row_loss`.
pub fn cross_entropy_forward_backward(
    dlogits: &mut [f64],
    row_loss: &mut [f64],
    logits: &[f64],
    targets: &[i32],
    vocab: usize,
) -> f64 {
    let counted = targets.iter().filter(|&&t| t != IGNORE_INDEX).count();
    let scale = if counted == 0 { 0.0 } else { 1.0 / counted as f64 };
    let mut total = 0.0;
    for (n, &t) in targets.iter().enumerate() {
        let row = &logits[n * vocab..(n + 1) * vocab];
        let grad = &mut dlogits[n * vocab..(n + 1) * vocab];
        if t == IGNORE_INDEX {
            row_loss[n] = 0.0;
            grad.fill(0.0);
            continue;
        }
        let max = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let sum: f64 = row.iter().map(|v| (v - max).exp()).sum();
        row_loss[n] = sum.ln() + max - row[t as usize];
        total += row_loss[n];
        for v in 0..vocab {
            let onehot = if v == t as usize { 1.0 } else { 0.0 };
            grad[v] = ((row[v] - max).exp() / sum - onehot) * scale;
        }
    }
    total * scale
}
