//! Fresh parameters as Llama 2 starts training: every matrix N(0, 0.02²) (Hugging Face's
//! `initializer_range`), every RMSNorm weight 1. Seeded and computed on the host, so a seed
//! gives the same model on every backend.

use crate::config::LlamaConfig;

/// Hugging Face's default `initializer_range`.
pub const INIT_STD: f64 = 0.02;

/// SplitMix64: the project's one seeded generator (initialisation, the built-in corpus,
/// sampling), defined here so results never depend on another crate's algorithm.
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1).
    pub fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
}

/// Box–Muller normals from [`SplitMix64`].
struct Normals {
    rng: SplitMix64,
    spare: Option<f64>,
}

impl Normals {
    fn next(&mut self) -> f64 {
        if let Some(v) = self.spare.take() {
            return v;
        }
        let (r, angle) =
            ((-2.0 * self.rng.uniform().ln()).sqrt(), std::f64::consts::TAU * self.rng.uniform());
        self.spare = Some(r * angle.sin());
        r * angle.cos()
    }
}

/// Parameters in [`LlamaConfig::parameters`] order.
pub fn initial_params(config: &LlamaConfig, seed: u64) -> Vec<Vec<f32>> {
    let mut rng = Normals { rng: SplitMix64(seed ^ 0x5EED_11A2), spare: None };
    config
        .parameters()
        .iter()
        .map(|spec| {
            if spec.shape.len() == 1 {
                vec![1.0; spec.numel()]
            } else {
                (0..spec.numel()).map(|_| (INIT_STD * rng.next()) as f32).collect()
            }
        })
        .collect()
}

/// The vocabulary grown to `vocab_size` (SFT adds a separator token): every new row of the
/// embedding, and of an untied lm_head, is the mean of the existing rows, so a new token starts
/// as an average token rather than a random direction (the choice of Hugging Face's
/// `resize_token_embeddings`, without its added noise). `params` are in
/// [`LlamaConfig::parameters`] order; the grown configuration is returned.
pub fn grow_vocab(config: &LlamaConfig, params: &mut [Vec<f32>], vocab_size: usize) -> LlamaConfig {
    let mut grown = config.clone();
    if vocab_size <= config.vocab_size {
        return grown;
    }
    grown.vocab_size = vocab_size;
    let (old, c) = (config.vocab_size, config.hidden_size);
    let grow = |rows: &mut Vec<f32>| {
        let mean: Vec<f32> = (0..c)
            .map(|j| ((0..old).map(|r| f64::from(rows[r * c + j])).sum::<f64>() / old as f64) as f32)
            .collect();
        for _ in old..vocab_size {
            rows.extend_from_slice(&mean);
        }
    };
    grow(&mut params[0]);
    if !config.tie_word_embeddings {
        grow(params.last_mut().expect("an untied model ends with lm_head"));
    }
    grown
}
