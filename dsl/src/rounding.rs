//! Stochastic rounding of f32 values onto a narrower float grid (f16 or bf16), and the
//! counter-based random numbers that drive it.
//!
//! Round-to-nearest loses every update smaller than half a unit in the last place: a bf16
//! weight at 1.0 (half-ulp 2^-8 ≈ 3.9e-3) never moves under Llama 2's lr of 3e-4. Stochastic
//! rounding rounds `x` up to the next grid value with probability equal to the discarded
//! fraction and down otherwise, so `E[round(x)] = x` and small updates survive on average
//! (llm.c writes its bf16 parameters this way; Gupta et al. 2015, "Deep Learning with Limited
//! Numerical Precision").
//!
//! The random bits come from a counter-based generator (a hash of the element index and a
//! per-launch key, no state), so the same (seed, step, tensor, element) always rounds the same
//! way: runs and resumed runs are bit-reproducible. Every function here has a host twin with
//! the same name prefixed `host_`, used by the references and tests.

use crate::element::DType;
use cubecl::prelude::*;

/// A narrower IEEE-style binary float that f32 rounds onto: its explicit mantissa bits and the
/// f32 biased exponent of its smallest normal number (below that it has subnormals).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct NarrowFloat {
    pub mantissa_bits: u32,
    /// `min_exponent + 127`: 113 for f16 (2^-14), 1 for bf16 (2^-126, as f32).
    pub min_biased_exponent: u32,
}

impl NarrowFloat {
    pub const F16: Self = Self { mantissa_bits: 10, min_biased_exponent: 113 };
    pub const BF16: Self = Self { mantissa_bits: 7, min_biased_exponent: 1 };

    /// The grid of `dtype`; `None` for f32 (no rounding) and the integer types.
    pub fn of(dtype: DType) -> Option<Self> {
        match dtype {
            DType::F16 => Some(Self::F16),
            DType::BF16 => Some(Self::BF16),
            DType::F32 | DType::U32 | DType::I32 => None,
        }
    }

    /// The smallest positive value of the type (its smallest subnormal), as f32.
    pub fn smallest_subnormal(self) -> f32 {
        2f32.powi(self.min_biased_exponent as i32 - 127 - self.mantissa_bits as i32)
    }
}

/// Chris Wellons' `lowbias32` integer hash (a bijection on u32 with near-ideal avalanche).
#[cube]
pub fn hash_u32(x: u32) -> u32 {
    let mut h = x;
    h ^= h >> 16;
    h *= 0x7feb_352du32;
    h ^= h >> 15;
    h *= 0x846c_a68bu32;
    h ^= h >> 16;
    h
}

/// 32 random bits for element `index` of a launch keyed by `(key_lo, key_hi)` (see
/// [`RoundingKey`]): a bijection of `index` for a fixed key, so no two elements of a tensor
/// share their bits.
#[cube]
pub fn random_u32(index: u32, key_lo: u32, key_hi: u32) -> u32 {
    hash_u32(hash_u32(index ^ key_lo) ^ key_hi)
}

/// `x` rounded stochastically onto `target`'s grid (returned as the f32 of that grid value, so
/// the caller's cast to the narrow type is exact). `random` supplies the uniform bits.
///
/// Works on the bit pattern: with `d` the f32 mantissa bits below the target's last place
/// (`23 − p`, plus the shift into the target's subnormal range), adding `random mod 2^d` to the
/// magnitude and clearing the low `d` bits rounds up exactly when the random number is below
/// the discarded bits, i.e. with probability (discarded fraction) — a carry into the exponent
/// lands on the next binade's first value, which is the upper neighbour. Magnitudes below the
/// target's smallest subnormal `s` (more than 24 bits to drop) round to `s` with probability
/// `|x|/s` (to 2^-24), else to 0. NaN and ±inf pass through; values past the target's largest
/// finite one round to ±inf on the cast, as round-to-nearest would.
#[cube]
pub fn round_stochastic(x: f32, random: u32, #[comptime] target: NarrowFloat) -> f32 {
    let bits = u32::reinterpret(x);
    let sign = bits & 0x8000_0000u32;
    let magnitude = bits & 0x7fff_ffffu32;
    // f32 subnormals (field 0) share the minimum normal exponent's scale.
    let field = u32::max(magnitude >> 23, 1u32);
    let min_field = comptime!(target.min_biased_exponent);
    let below = select(field < min_field, min_field - field, 0u32);
    let drop = comptime!(23 - target.mantissa_bits) + below;
    let mut out = x;
    if magnitude < 0x7f80_0000u32 {
        if drop < 24u32 {
            let mask = (1u32 << drop) - 1u32;
            let sum = magnitude + (random & mask);
            out = f32::reinterpret((sum - (sum & mask)) | sign);
        } else {
            let smallest = comptime!(target.smallest_subnormal());
            let fraction = f32::abs(x) / smallest;
            let uniform = f32::cast_from(random >> 8) * 5.960_464_5e-8f32; // · 2^-24
            let rounded = select(uniform < fraction, smallest, f32::new(0.0));
            out = f32::reinterpret(u32::reinterpret(rounded) | sign);
        }
    }
    out
}

/// The per-launch key of the random stream for (seed, step, tensor): SplitMix64 of the three,
/// split into the two u32 halves the kernels take.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RoundingKey {
    pub lo: u32,
    pub hi: u32,
}

impl RoundingKey {
    pub fn new(seed: u64, step: u64, tensor: u64) -> Self {
        let mixed = splitmix64(splitmix64(splitmix64(seed) ^ step) ^ tensor);
        Self { lo: mixed as u32, hi: (mixed >> 32) as u32 }
    }
}

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Host twin of [`hash_u32`].
pub fn host_hash_u32(x: u32) -> u32 {
    let mut h = x;
    h ^= h >> 16;
    h = h.wrapping_mul(0x7feb_352d);
    h ^= h >> 15;
    h = h.wrapping_mul(0x846c_a68b);
    h ^ (h >> 16)
}

/// Host twin of [`random_u32`].
pub fn host_random_u32(index: u32, key: RoundingKey) -> u32 {
    host_hash_u32(host_hash_u32(index ^ key.lo) ^ key.hi)
}
