//! Llama 2's learning-rate schedule: linear warm-up, then cosine decay to a floor.

/// The schedule of one run, in f64 throughout (an f32 schedule drifts by ~1e-7 relative).
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Schedule {
    pub peak: f64,
    pub warmup: u64,
    pub total: u64,
    /// The floor as a fraction of the peak (Llama 2: 0.1).
    pub min_ratio: f64,
}

impl Schedule {
    /// The rate at 0-indexed step `s`: `P·(s+1)/W` while `s < W`, then
    /// `m + ½(1 + cos(π·(s−W)/max(1, S−W)))·(P − m)` with `m = min_ratio·P`.
    pub fn lr(&self, step: u64) -> f64 {
        let (p, w, s) = (self.peak, self.warmup, step);
        if s < w {
            return p * (s + 1) as f64 / w as f64;
        }
        let floor = self.min_ratio * p;
        let progress = (s - w) as f64 / self.total.saturating_sub(w).max(1) as f64;
        floor + 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()) * (p - floor)
    }
}
