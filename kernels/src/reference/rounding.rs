//! Stochastic rounding on the host, derived differently from [`crate::rounding`]: the two
//! neighbours of `x` on the target grid come from the `half` crate, and the decision compares
//! the random number with the position of `x` between them. The kernel works on bit patterns;
//! the two agree bit for bit when given the same random bits.

use dsl::DType;
use dsl::rounding::{NarrowFloat, RoundingKey, host_random_u32};

/// The grid neighbours `lo ≤ |x| ≤ hi` of a finite magnitude `a` in `dtype` (f16 or bf16), as f64.
fn neighbours(a: f32, dtype: DType) -> (f64, f64) {
    let (nearest, step): (f64, Box<dyn Fn(f64, i32) -> f64>) = match dtype {
        DType::F16 => (
            half::f16::from_f32(a).to_f64(),
            Box::new(|v, d| {
                half::f16::from_bits((half::f16::from_f64(v).to_bits() as i32 + d) as u16).to_f64()
            }),
        ),
        DType::BF16 => (
            half::bf16::from_f32(a).to_f64(),
            Box::new(|v, d| {
                half::bf16::from_bits((half::bf16::from_f64(v).to_bits() as i32 + d) as u16).to_f64()
            }),
        ),
        other => panic!("no narrow grid for {other}"),
    };
    let a = a as f64;
    let (lo, hi) = if nearest == a {
        (a, a)
    } else if nearest > a {
        (step(nearest, -1), nearest)
    } else {
        (nearest, step(nearest, 1))
    };
    // Past the largest finite value the grid goes on with the top binade's spacing (a value
    // that rounds up there becomes inf on the cast).
    if hi.is_infinite() { (lo, lo + (lo - step(lo, -1))) } else { (lo, hi) }
}

/// `v` (a grid value, or the one past the largest finite) as `dtype` stores it.
fn stored(v: f64, dtype: DType) -> f64 {
    match dtype {
        DType::F16 => half::f16::from_f64(v).to_f64(),
        _ => half::bf16::from_f64(v).to_f64(),
    }
}

/// `x` stochastically rounded onto `dtype` with the random bits `random` (see
/// [`dsl::rounding::round_stochastic`] for the contract), as f64.
pub fn round_stochastic(x: f32, random: u32, dtype: DType) -> f64 {
    if !x.is_finite() {
        return x as f64;
    }
    let target = NarrowFloat::of(dtype).expect("a narrow type");
    let a = x.abs();
    let (lo, hi) = neighbours(a, dtype);
    if lo == hi {
        return x as f64;
    }
    let fraction = (a as f64 - lo) / (hi - lo);
    let smallest = target.smallest_subnormal() as f64;
    let up = if hi <= smallest && lo == 0.0 {
        // Below the smallest subnormal: a 24-bit uniform against |x| / s.
        ((random >> 8) as f64) * 2f64.powi(-24) < fraction
    } else {
        // The low `d` random bits, with 2^d the f32 ulps between the neighbours of |x|.
        let field = ((a.to_bits() >> 23) & 0xff) as i32;
        let f32_ulp = 2f64.powi(field.max(1) - 127 - 23);
        let d = ((hi - lo) / f32_ulp).log2().round() as u32;
        let low = (random as u64) & ((1u64 << d) - 1);
        low as f64 >= (1u64 << d) as f64 * (1.0 - fraction)
    };
    let magnitude = stored(if up { hi } else { lo }, dtype);
    if x < 0.0 { -magnitude } else { magnitude }
}

/// Same names and argument order as [`crate::rounding::cast_stochastic`], in f64.
pub fn cast_stochastic(out: &mut [f64], x: &[f32], key: RoundingKey, dtype: DType) {
    for (i, (o, &v)) in out.iter_mut().zip(x).enumerate() {
        *o = round_stochastic(v, host_random_u32(i as u32, key), dtype);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dsl::rounding::host_hash_u32;

    /// The kernel's bit-pattern algorithm ([`dsl::rounding::round_stochastic`]) transcribed to
    /// the host, so the reference's bf16 path (which no wgpu device can run) is checked too.
    fn bit_trick(x: f32, random: u32, target: NarrowFloat) -> f32 {
        let bits = x.to_bits();
        let (sign, magnitude) = (bits & 0x8000_0000, bits & 0x7fff_ffff);
        if magnitude >= 0x7f80_0000 {
            return x;
        }
        let field = (magnitude >> 23).max(1);
        let below = target.min_biased_exponent.saturating_sub(field);
        let drop = 23 - target.mantissa_bits + below;
        if drop < 24 {
            let mask = (1u32 << drop) - 1;
            let sum = magnitude + (random & mask);
            f32::from_bits((sum - (sum & mask)) | sign)
        } else {
            let s = target.smallest_subnormal();
            let up = ((random >> 8) as f32) * 5.960_464_5e-8 < x.abs() / s;
            f32::from_bits((if up { s } else { 0.0f32 }).to_bits() | sign)
        }
    }

    #[test]
    fn the_reference_agrees_with_the_kernels_bit_algorithm() {
        for (dtype, target, exponents) in
            [(DType::F16, NarrowFloat::F16, -30..17), (DType::BF16, NarrowFloat::BF16, -149..127)]
        {
            let span = (exponents.end - exponents.start) as u32;
            for i in 0..200_000u32 {
                let h = host_hash_u32(i.wrapping_mul(7919));
                let exponent = exponents.start + (h % span) as i32;
                let mantissa = 1.0 + (host_hash_u32(h) >> 9) as f64 / (1u64 << 23) as f64;
                let sign = if h & 1 == 0 { 1.0 } else { -1.0 };
                let x = (sign * mantissa * 2f64.powi(exponent)) as f32;
                let random = host_hash_u32(h ^ 0xdead_beef);
                let want = bit_trick(x, random, target);
                let want = match dtype {
                    DType::F16 => half::f16::from_f32(want).to_f64(),
                    _ => half::bf16::from_f32(want).to_f64(),
                };
                let got = round_stochastic(x, random, dtype);
                assert!(
                    got.to_bits() == want.to_bits(),
                    "{dtype}: x = {x:e} ({:#010x}), random {random:#010x}: reference {got:e}, bit algorithm {want:e}",
                    x.to_bits()
                );
            }
        }
    }
}
