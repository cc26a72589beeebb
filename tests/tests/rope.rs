//! RoPE kernels against the f64 reference (exact angles), and the reference against finite
//! differences and its own inverse.

use dsl::{BackendRuntime, DType, Device, Error, GpuTensor};
use kernels::reference::rope as reference;
use kernels::rope::{RopeTable, rope_backward, rope_cos_sin, rope_forward};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use tests::*;

#[derive(Clone, Debug)]
struct Case {
    batch: usize,
    seq_len: usize,
    heads: usize,
    head_dim: usize,
    position_offset: usize,
    theta: f64,
    seed: u64,
}

fn cases() -> impl Strategy<Value = Case> {
    let head_dim = prop_oneof![
        3 => prop::sample::select(vec![32usize, 64, 80, 96, 128]),
        1 => (1usize..=20).prop_map(|h| 2 * h),
    ];
    let offset = prop_oneof![Just(0usize), 0usize..4000];
    let theta = prop::sample::select(vec![10000.0, 500000.0, 100.0]);
    (1usize..=3, 1usize..=48, 1usize..=8, head_dim, offset, theta, any::<u64>()).prop_map(
        |(batch, seq_len, heads, head_dim, position_offset, theta, seed)| Case {
            batch,
            seq_len,
            heads,
            head_dim,
            position_offset,
            theta,
            seed,
        },
    )
}

fn check<R: BackendRuntime, F: TestFloat>(dev: &Device<R>, case: &Case) -> Result<(), TestCaseError> {
    let dims = (case.batch, case.seq_len, case.heads, case.head_dim);
    let shape = [case.batch, case.seq_len, case.heads, case.head_dim];
    let n: usize = shape.iter().product();
    let mut rng = DataRng::new(case.seed);
    let x = F::round_all(&rng.normals(n, 0.0, 1.0));
    let dout = F::round_all(&rng.normals(n, 0.0, 1.0));
    let (mut want_out, mut want_dx) = (vec![0.0; n], vec![0.0; n]);
    reference::rope_forward(&mut want_out, &x, dims, case.theta, case.position_offset);
    reference::rope_backward(&mut want_dx, &dout, dims, case.theta, case.position_offset);
    // Each output is a two-term rotation: the scale of its rounding error is |a·c| + |b·s| ≤
    // |a| + |b| of the pair.
    let pair_magnitude = |v: &[f64]| -> Vec<f64> {
        let half = case.head_dim / 2;
        (0..n)
            .map(|i| {
                let (row, j) = (i / case.head_dim, i % case.head_dim);
                let partner = row * case.head_dim + (j + half) % case.head_dim;
                v[i].abs() + v[partner].abs()
            })
            .collect()
    };

    let table =
        RopeTable::new(dev, case.head_dim, case.position_offset + case.seq_len, case.theta).map_err(fail)?;
    let tol = Tolerance::for_dtype(F::DTYPE);
    let what = |t: &str| format!("{t} [{} {case:?}]", F::DTYPE);
    let xt = upload::<R, F>(dev, &x, &shape)?;
    let mut out = nan_tensor::<R, F>(dev, &shape)?;
    rope_forward(dev, &mut out, &xt, &table, case.position_offset).map_err(fail)?;
    check_close_scaled(&what("out"), &download(dev, &out)?, &want_out, &pair_magnitude(&x), &shape, tol)
        .map_err(TestCaseError::fail)?;
    let dyt = upload::<R, F>(dev, &dout, &shape)?;
    let mut dx = nan_tensor::<R, F>(dev, &shape)?;
    rope_backward(dev, &mut dx, &dyt, &table, case.position_offset).map_err(fail)?;
    check_close_scaled(&what("dx"), &download(dev, &dx)?, &want_dx, &pair_magnitude(&dout), &shape, tol)
        .map_err(TestCaseError::fail)?;
    Ok(())
}

fn matches_reference<R: BackendRuntime, F: TestFloat>(dev: &Device<R>) {
    if refuses_unsupported::<R, F>(dev) {
        return;
    }
    let cases_per_dtype = if F::DTYPE == DType::F32 { 32 } else { 16 };
    run_property(&format!("rope {}", F::DTYPE), cases_per_dtype, cases(), |case| check::<R, F>(dev, &case));
}

test_each_dtype!(matches_reference => rope_f32_matches_reference, rope_f16_matches_reference, rope_bf16_matches_reference_or_is_refused);

/// Decoding one new token at position p must rotate exactly like position p of a full pass.
fn offset_matches_full_sequence<R: BackendRuntime>(dev: &Device<R>) {
    let (seq_len, heads, head_dim) = (37, 4, 64);
    let table = RopeTable::new(dev, head_dim, 64, 10000.0).unwrap();
    let x = DataRng::new(7).normals(seq_len * heads * head_dim, 0.0, 1.0);
    let full_in = GpuTensor::<R, f32>::from_f64(dev, &x, &[1, seq_len, heads, head_dim]).unwrap();
    let mut full = GpuTensor::<R, f32>::uninit(dev, &[1, seq_len, heads, head_dim]).unwrap();
    rope_forward(dev, &mut full, &full_in, &table, 0).unwrap();
    let full = full.to_vec(dev).unwrap();
    let row = heads * head_dim;
    for t in [0, 1, seq_len - 1] {
        let one_in =
            GpuTensor::<R, f32>::from_f64(dev, &x[t * row..(t + 1) * row], &[1, 1, heads, head_dim]).unwrap();
        let mut one = GpuTensor::<R, f32>::uninit(dev, &[1, 1, heads, head_dim]).unwrap();
        rope_forward(dev, &mut one, &one_in, &table, t).unwrap();
        assert_eq!(one.to_vec(dev).unwrap(), full[t * row..(t + 1) * row], "position {t} decoded alone");
    }
}

#[test]
fn rope_with_offset_matches_the_full_sequence() {
    on_test_backend!(offset_matches_full_sequence);
}

fn bad_input<R: BackendRuntime>(dev: &Device<R>) {
    let table = RopeTable::new(dev, 64, 16, 10000.0).unwrap();
    let x = GpuTensor::<R, f32>::zeros(dev, &[1, 8, 2, 64]).unwrap();
    let mut out = GpuTensor::<R, f32>::zeros(dev, &[1, 8, 2, 64]).unwrap();
    let err = rope_forward(dev, &mut out, &x, &table, 9).unwrap_err();
    assert_eq!(err.to_string(), "rope_forward: positions 9..17 exceed the RoPE table's 16 positions");
    let flat = GpuTensor::<R, f32>::zeros(dev, &[8, 128]).unwrap();
    let mut flat_out = flat.clone();
    let err = rope_forward(dev, &mut flat_out, &flat, &table, 0).unwrap_err();
    assert!(err.to_string().contains("must be [B, T, H, head_dim]"), "{err}");
    let wide = GpuTensor::<R, f32>::zeros(dev, &[1, 8, 1, 128]).unwrap();
    let mut wide_out = wide.clone();
    let err = rope_backward(dev, &mut wide_out, &wide, &table, 0).unwrap_err();
    assert!(matches!(err, Error::InvalidArgument { op: "rope_backward", .. }), "{err}");
    assert!(RopeTable::new(dev, 63, 16, 10000.0).is_err(), "odd head_dim must be refused");
}

#[test]
fn rope_rejects_bad_input() {
    on_test_backend!(bad_input);
}

#[test]
fn reference_backward_matches_finite_differences_and_inverts_forward() {
    let strategy =
        (1usize..=2, 1usize..=3, 1usize..=2, (1usize..=4).prop_map(|h| 2 * h), 0usize..100, any::<u64>());
    run_property("rope reference", 64, strategy, |(b, t, h, hd, offset, seed)| {
        let n = b * t * h * hd;
        let dims = (b, t, h, hd);
        let mut rng = DataRng::new(seed);
        let (x, dout) = (rng.normals(n, 0.0, 1.0), rng.normals(n, 0.0, 1.0));
        let loss = |x: &[f64]| {
            let mut out = vec![0.0; n];
            reference::rope_forward(&mut out, x, dims, 10000.0, offset);
            out.iter().zip(&dout).map(|(o, d)| o * d).sum::<f64>()
        };
        let mut dx = vec![0.0; n];
        reference::rope_backward(&mut dx, &dout, dims, 10000.0, offset);
        let fd = finite_differences(loss, &x, 1e-6);
        check_close("reference dx vs finite differences", &dx, &fd, &[n], FINITE_DIFFERENCE_TOL)
            .map_err(TestCaseError::fail)?;
        let (mut rotated, mut back) = (vec![0.0; n], vec![0.0; n]);
        reference::rope_forward(&mut rotated, &x, dims, 10000.0, offset);
        reference::rope_backward(&mut back, &rotated, dims, 10000.0, offset);
        check_close("backward(forward(x)) vs x", &back, &x, &[n], Tolerance { atol: 1e-12, rtol: 1e-12 })
            .map_err(TestCaseError::fail)?;
        Ok(())
    });
}

/// Linear scaling (position interpolation): the table at position `p` with factor `f` is the
/// plain table at `p / f`: bit for bit where `p / f` is a whole position, and within half an
/// f32 ulp of the f64 cos and sin of `(p / f)·θ^(−2i/hd)` everywhere (transformers'
/// `LlamaLinearScalingRotaryEmbedding` divides the positions the same way).
#[test]
fn rope_table_with_linear_scaling_is_the_plain_table_at_position_over_factor() {
    let (head_dim, positions, theta) = (64, 97, 10000.0);
    let half = head_dim / 2;
    let (plain_cos, plain_sin) = rope_cos_sin(head_dim, positions, theta, 1.0).unwrap();
    for factor in [2.0, 4.0, 8.0, 2.5] {
        let (cos, sin) = rope_cos_sin(head_dim, positions, theta, factor).unwrap();
        for p in 0..positions {
            let row = p * half..(p + 1) * half;
            let quotient = p as f64 / factor;
            if quotient.fract() == 0.0 {
                let q = quotient as usize;
                assert_eq!(
                    &cos[row.clone()],
                    &plain_cos[q * half..(q + 1) * half],
                    "cos, factor {factor}, p {p}"
                );
                assert_eq!(
                    &sin[row.clone()],
                    &plain_sin[q * half..(q + 1) * half],
                    "sin, factor {factor}, p {p}"
                );
            }
            for i in 0..half {
                let angle = quotient * theta.powf(-2.0 * i as f64 / head_dim as f64);
                let (c, s) = (cos[p * half + i] as f64, sin[p * half + i] as f64);
                // Half an ulp of an f32 in [-1, 1] is at most 2^-25.
                assert!((c - angle.cos()).abs() <= 2f64.powi(-25), "cos p {p} i {i} factor {factor}");
                assert!((s - angle.sin()).abs() <= 2f64.powi(-25), "sin p {p} i {i} factor {factor}");
            }
        }
    }
    // Position 1 at factor 2 is a half position: not a row of the plain table.
    let (cos, _) = rope_cos_sin(head_dim, 2, theta, 2.0).unwrap();
    assert_eq!(cos[half], 0.5f64.cos() as f32);
    assert!(
        rope_cos_sin(head_dim, 2, theta, 0.0).is_err() && rope_cos_sin(head_dim, 2, theta, f64::NAN).is_err()
    );
}

fn scaled_table_uploads<R: BackendRuntime>(dev: &Device<R>) {
    let table = RopeTable::scaled(dev, 32, 40, 500000.0, 4.0).unwrap();
    let (cos, sin) = rope_cos_sin(32, 40, 500000.0, 4.0).unwrap();
    assert_eq!(table.position_divisor, 4.0);
    assert_eq!((table.cos.to_vec(dev).unwrap(), table.sin.to_vec(dev).unwrap()), (cos, sin));
    let plain = RopeTable::new(dev, 32, 40, 500000.0).unwrap();
    assert_eq!(plain.position_divisor, 1.0);
    assert_eq!(plain.cos.to_vec(dev).unwrap(), rope_cos_sin(32, 40, 500000.0, 1.0).unwrap().0);
}

#[test]
fn a_scaled_rope_table_holds_the_scaled_values() {
    on_test_backend!(scaled_table_uploads);
}
