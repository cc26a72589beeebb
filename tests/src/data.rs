//! Seeded test data. Proptest draws shapes and a seed; the values come from this generator so a
//! failing case is reproducible from its printed seed without storing megabytes of inputs.

use dsl::FloatElement;
use model::init::SplitMix64;

/// The project's SplitMix64, seeded apart from the model's uses of it.
pub struct DataRng(SplitMix64);

impl DataRng {
    pub fn new(seed: u64) -> Self {
        DataRng(SplitMix64(seed ^ 0x9E37_79B9_7F4A_7C15))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = self.uniform().max(1e-300);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    pub fn normals(&mut self, n: usize, mean: f64, std: f64) -> Vec<f64> {
        (0..n).map(|_| mean + std * self.normal()).collect()
    }
}

/// A storage type under test, with its tolerance-table entry.
pub trait TestFloat: FloatElement {
    /// `v` rounded to this type and widened back: what the kernel actually receives.
    fn round_trip(v: f64) -> f64 {
        Self::from_f64_rounded(v).into_f64()
    }

    fn round_all(values: &[f64]) -> Vec<f64> {
        values.iter().map(|&v| Self::round_trip(v)).collect()
    }
}

impl TestFloat for f32 {}
impl TestFloat for half::f16 {}
impl TestFloat for half::bf16 {}
