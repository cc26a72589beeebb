//! One comparison for all kernels, with one failure format: how many elements mismatch,
//! NaN/inf count, max and mean |Δ|, the worst index (as a multi-index into the shape), the
//! shape, and the first mismatches.

use dsl::DType;
use std::fmt::Write;

/// An element passes when `|actual − expected| ≤ atol + rtol · magnitude`, where the magnitude
/// is `|expected|` for a value computed without cancellation, and the sum of the absolute
/// values of the terms for a sum (the scale rounding errors are proportional to: a sum of
/// large terms that cancels to near zero carries the error of its terms, not of its result).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Tolerance {
    pub atol: f64,
    pub rtol: f64,
}

impl Tolerance {
    /// The per-dtype table. Inputs are rounded to the storage type before the f64 reference
    /// sees them, so these bound the kernel's own error: f32 arithmetic, relative to the
    /// magnitude of the terms (RMSNorm measured ≤ 4e-7 over sums of up to 5000 terms), plus
    /// one rounding of the result to the storage type (half an ulp: f16 2⁻¹¹ ≈ 4.9e-4,
    /// bf16 2⁻⁹ ≈ 2.0e-3). Margins are 2–4× the worst error seen over many random cases.
    pub fn for_dtype(dtype: DType) -> Self {
        match dtype {
            DType::F32 => Tolerance { atol: 1e-6, rtol: 2e-6 },
            DType::F16 => Tolerance { atol: 5e-4, rtol: 1e-3 },
            DType::BF16 => Tolerance { atol: 4e-3, rtol: 8e-3 },
            DType::U32 | DType::I32 => Tolerance { atol: 0.0, rtol: 0.0 },
        }
    }

    pub fn scaled(self, factor: f64) -> Self {
        Tolerance { atol: self.atol * factor, rtol: self.rtol * factor }
    }
}

fn multi_index(mut flat: usize, shape: &[usize]) -> Vec<usize> {
    let mut index = vec![0; shape.len()];
    for d in (0..shape.len()).rev() {
        let extent = shape[d].max(1);
        index[d] = flat % extent;
        flat /= extent;
    }
    index
}

/// Compares `actual` with `expected` (both read with `shape`), relative to `|expected|`;
/// `Err` holds the report.
pub fn check_close(
    what: &str,
    actual: &[f64],
    expected: &[f64],
    shape: &[usize],
    tol: Tolerance,
) -> Result<(), String> {
    let magnitude: Vec<f64> = expected.iter().map(|e| e.abs()).collect();
    check_close_scaled(what, actual, expected, &magnitude, shape, tol)
}

/// [`check_close`] with an explicit per-element magnitude for the relative part.
pub fn check_close_scaled(
    what: &str,
    actual: &[f64],
    expected: &[f64],
    magnitude: &[f64],
    shape: &[usize],
    tol: Tolerance,
) -> Result<(), String> {
    if actual.len() != expected.len() || magnitude.len() != expected.len() {
        return Err(format!(
            "{what}: {} values, expected {} (magnitudes: {}; shape {shape:?})",
            actual.len(),
            expected.len(),
            magnitude.len()
        ));
    }
    let (mut mismatches, mut non_finite) = (Vec::new(), 0usize);
    let (mut max_diff, mut worst, mut sum_diff) = (0.0f64, 0usize, 0.0f64);
    let allowance = |i: usize| tol.atol + tol.rtol * magnitude[i];
    for (i, (&a, &e)) in actual.iter().zip(expected).enumerate() {
        let diff = if a == e { 0.0 } else { (a - e).abs() };
        let ok = diff <= allowance(i);
        if !a.is_finite() {
            non_finite += 1;
        }
        if !ok {
            mismatches.push(i);
        }
        // NaN compares false with everything: make it the worst explicitly.
        if !max_diff.is_nan() && (diff.is_nan() || diff > max_diff) {
            max_diff = diff;
            worst = i;
        }
        if diff.is_finite() {
            sum_diff += diff;
        }
    }
    if mismatches.is_empty() {
        if std::env::var_os("CUBELLAMA_TEST_VERBOSE").is_some() {
            let worst_ratio = (0..actual.len())
                .map(|i| (actual[i] - expected[i]).abs() / allowance(i))
                .fold(0.0f64, f64::max);
            eprintln!("{what}: ok, max |Δ| = {max_diff:e}, worst |Δ| / allowance = {worst_ratio:.3}");
        }
        return Ok(());
    }
    let mut report = format!(
        "{what}: {} of {} elements mismatch (|Δ| > {:e} + {:e}·magnitude), {non_finite} NaN/inf\n  \
         max |Δ| = {max_diff:e} at {:?} (actual {}, expected {}); mean |Δ| = {:e}\n  shape {shape:?}; first mismatches:",
        mismatches.len(),
        actual.len(),
        tol.atol,
        tol.rtol,
        multi_index(worst, shape),
        actual[worst],
        expected[worst],
        sum_diff / actual.len().max(1) as f64,
    );
    for &i in mismatches.iter().take(5) {
        let _ = write!(report, " {:?}: {} vs {};", multi_index(i, shape), actual[i], expected[i]);
    }
    Err(report)
}

/// [`check_close`] that panics with the report.
pub fn assert_close(what: &str, actual: &[f64], expected: &[f64], shape: &[usize], tol: Tolerance) {
    if let Err(report) = check_close(what, actual, expected, shape, tol) {
        panic!("{report}");
    }
}

/// The same magnitude for every element: the largest |expected| (a normwise comparison, for
/// results such as attention outputs whose elements mix many terms of similar size).
pub fn normwise(expected: &[f64]) -> Vec<f64> {
    let max = expected.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    vec![max; expected.len()]
}

/// FlashAttention's accuracy rule for reduced precision: the kernel's largest error against
/// the f64 reference may be at most `factor` times the largest error of a naive implementation
/// in the same precision, plus a floor of 1e-6·max(max|expected|, 1) for cases the naive one
/// gets exactly right. The tests' inputs are of order 1, so where every expected value is 0
/// (dq with a single key: P = 1 makes dS = dP − delta vanish, and the naive path computes dP and
/// delta in the same order) the floor is 1e-6 absolute: f32 rounding of the cancelling terms,
/// far below one f16/bf16 ulp.
pub fn check_against_naive(
    what: &str,
    actual: &[f64],
    naive: &[f64],
    expected: &[f64],
    shape: &[usize],
    factor: f64,
) -> Result<(), String> {
    let max_err = |x: &[f64]| x.iter().zip(expected).fold(0.0f64, |m, (a, e)| m.max((a - e).abs()));
    let (kernel_err, naive_err) = (max_err(actual), max_err(naive));
    let scale = expected.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    let floor = 1e-6 * scale.max(1.0);
    let allowed = factor * naive_err + floor;
    if actual.iter().any(|a| !a.is_finite()) || kernel_err.is_nan() || kernel_err > allowed {
        let tol = Tolerance { atol: allowed, rtol: 0.0 };
        let detail = check_close(what, actual, expected, shape, tol).err().unwrap_or_default();
        return Err(format!(
            "{what}: max error {kernel_err:e} exceeds {factor}× the naive implementation's {naive_err:e} \
             (+ floor {floor:e})\n{detail}"
        ));
    }
    if std::env::var_os("CUBELLAMA_TEST_VERBOSE").is_some() {
        eprintln!(
            "{what}: ok, kernel error {kernel_err:e}, naive error {naive_err:e}, ratio {:.3}",
            kernel_err / naive_err.max(f64::MIN_POSITIVE)
        );
    }
    Ok(())
}
