//! RMSNorm kernels against the f64 reference, and the reference against finite differences.

use dsl::{BackendRuntime, DType, Device, Error, GpuTensor};
use kernels::reference::rmsnorm as reference;
use kernels::residual::residual_add;
use kernels::rmsnorm::{
    RmsNormConfig, rmsnorm_backward, rmsnorm_backward_accumulate, rmsnorm_backward_scratch_rows,
    rmsnorm_backward_with, rmsnorm_forward, rmsnorm_forward_residual, rmsnorm_forward_with,
};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use tests::{
    DataRng, TestFloat, Tolerance, check_close, check_close_scaled, on_test_backend, refuses_unsupported,
    run_property, test_each_dtype,
};

#[derive(Clone, Debug)]
struct Case {
    rows: usize,
    cols: usize,
    seed: u64,
    /// Inputs are N(0, x_scale²): RMSNorm must not care about the scale.
    x_scale: f64,
    eps: f64,
}

fn cases(max_rows: usize) -> impl Strategy<Value = Case> {
    let cols = prop_oneof![
        1 => prop::sample::select(vec![1usize, 3, 17, 127, 4095, 4097]),
        1 => 1usize..=5000,
    ];
    (1..=max_rows, cols, any::<u64>(), -2.0f64..2.0, prop::sample::select(vec![1e-5, 1e-6])).prop_map(
        |(rows, cols, seed, log_scale, eps)| Case { rows, cols, seed, x_scale: 10f64.powf(log_scale), eps },
    )
}

struct Inputs {
    x: Vec<f64>,
    weight: Vec<f64>,
    dout: Vec<f64>,
    dweight_before: Vec<f64>,
}

/// Inputs already rounded to `F`, so the reference sees exactly what the kernel sees.
fn inputs<F: TestFloat>(case: &Case) -> Inputs {
    let mut rng = DataRng::new(case.seed);
    let n = case.rows * case.cols;
    Inputs {
        x: F::round_all(&rng.normals(n, 0.0, case.x_scale)),
        weight: F::round_all(&rng.normals(case.cols, 1.0, 0.1)),
        dout: F::round_all(&rng.normals(n, 0.0, 1.0)),
        dweight_before: F::round_all(&rng.normals(case.cols, 0.0, 1.0)),
    }
}

/// The configurations every case runs: the launcher's choice with each reduction variant, and
/// the narrowest cube (32 units, many register slots) where it covers the row.
fn variants<R: BackendRuntime, F: TestFloat>(dev: &Device<R>, cols: usize) -> Vec<RmsNormConfig> {
    let selected = RmsNormConfig::select::<R, F>(dev, cols).expect("config for a supported width");
    // The plane variant runs wherever the cube is whole planes (lavapipe: 8 wide, not advertised).
    let plane_ok = selected.layout.units.is_multiple_of(dev.info().plane_size_max.max(1));
    let mut out = vec![
        RmsNormConfig { use_plane: false, ..selected },
        RmsNormConfig { use_plane: plane_ok, ..selected },
    ];
    let row_vectors = cols / selected.vector_size;
    let slots = row_vectors.div_ceil(32).next_power_of_two() as u32;
    if slots <= dsl::launch::MAX_ROW_SLOTS && selected.layout.units != 32 {
        let layout = dsl::launch::RowLayout { units: 32, slots };
        out.push(RmsNormConfig {
            layout,
            use_plane: slots.is_multiple_of(2) && 32u32.is_multiple_of(dev.info().plane_size_max.max(1)),
            ..selected
        });
    }
    out
}

fn fail(e: Error) -> TestCaseError {
    TestCaseError::fail(format!("launch failed: {e}"))
}

/// The terms `dx = s·g − x·s³·mean(g·x)` is summed from, per element (rounding errors scale
/// with them, see `check_close_scaled`).
fn dx_magnitude(inp: &Inputs, rstd: &[f64], rows: usize, cols: usize) -> Vec<f64> {
    let mut magnitude = vec![0.0; rows * cols];
    for r in 0..rows {
        let (s, base) = (rstd[r], r * cols);
        let mean_abs_gx =
            (0..cols).map(|c| (inp.dout[base + c] * inp.weight[c] * inp.x[base + c]).abs()).sum::<f64>()
                / cols as f64;
        for c in 0..cols {
            let i = base + c;
            magnitude[i] =
                (s * inp.dout[i] * inp.weight[c]).abs() + (inp.x[i] * s * s * s * mean_abs_gx).abs();
        }
    }
    magnitude
}

fn check_case<R: BackendRuntime, F: TestFloat>(dev: &Device<R>, case: &Case) -> Result<(), TestCaseError> {
    let (rows, cols) = (case.rows, case.cols);
    let inp = inputs::<F>(case);
    let mut want_out = vec![0.0; rows * cols];
    let mut want_rstd = vec![0.0; rows];
    reference::rmsnorm_forward(&mut want_out, &mut want_rstd, &inp.x, &inp.weight, rows, cols, case.eps);
    let mut want_dx = vec![0.0; rows * cols];
    let mut want_dweight = inp.dweight_before.clone();
    reference::rmsnorm_backward(
        &mut want_dx,
        &mut want_dweight,
        &inp.dout,
        &inp.x,
        &inp.weight,
        &want_rstd,
        rows,
        cols,
    );

    // Rounding errors scale with the terms a result is summed from (see `check_close_scaled`):
    // dx = s·g − x·s³·mean(g·x), dweight = before + Σ_rows dout·x·s.
    let dx_magnitude = dx_magnitude(&inp, &want_rstd, rows, cols);
    let mut dweight_magnitude: Vec<f64> = inp.dweight_before.iter().map(|v| v.abs()).collect();
    for r in 0..rows {
        for c in 0..cols {
            let i = r * cols + c;
            dweight_magnitude[c] += (inp.dout[i] * inp.x[i] * want_rstd[r]).abs();
        }
    }

    let tol = Tolerance::for_dtype(F::DTYPE);
    let shape = [rows, cols];
    let x = GpuTensor::<R, F>::from_f64(dev, &inp.x, &shape).map_err(fail)?;
    let weight = GpuTensor::<R, F>::from_f64(dev, &inp.weight, &[cols]).map_err(fail)?;
    let dout = GpuTensor::<R, F>::from_f64(dev, &inp.dout, &shape).map_err(fail)?;

    for (i, cfg) in variants::<R, F>(dev, cols).into_iter().enumerate() {
        let what = |t: &str| format!("{t} [{} {rows}×{cols}, {cfg:?}]", F::DTYPE);
        // NaN-filled outputs: a kernel that silently does not run cannot pass.
        let mut out = GpuTensor::<R, F>::from_f64(dev, &vec![f64::NAN; rows * cols], &shape).map_err(fail)?;
        let mut rstd = GpuTensor::<R, f32>::full(dev, &[rows], f32::NAN).map_err(fail)?;
        rmsnorm_forward_with(dev, &mut out, &mut rstd, &x, &weight, case.eps as f32, cfg).map_err(fail)?;
        check_close(&what("out"), &out.to_f64_vec(dev).map_err(fail)?, &want_out, &shape, tol)
            .map_err(TestCaseError::fail)?;
        // rstd is stored in f32 whatever F is.
        check_close(
            &what("rstd"),
            &rstd.to_f64_vec(dev).map_err(fail)?,
            &want_rstd,
            &[rows],
            Tolerance::for_dtype(DType::F32),
        )
        .map_err(TestCaseError::fail)?;

        let mut dx = GpuTensor::<R, F>::from_f64(dev, &vec![f64::NAN; rows * cols], &shape).map_err(fail)?;
        let mut dweight = GpuTensor::<R, F>::from_f64(dev, &inp.dweight_before, &[cols]).map_err(fail)?;
        // Vary the number of partial rows: the launcher's choice, then a small odd count.
        let scratch_rows = if i == 0 { rmsnorm_backward_scratch_rows(dev, rows) } else { 1 + rows % 7 };
        let mut scratch = GpuTensor::<R, f32>::full(dev, &[scratch_rows, cols], f32::NAN).map_err(fail)?;
        rmsnorm_backward_with(dev, &mut dx, &mut dweight, &mut scratch, &dout, &x, &weight, &rstd, cfg)
            .map_err(fail)?;
        let got_dx = dx.to_f64_vec(dev).map_err(fail)?;
        check_close_scaled(&what("dx"), &got_dx, &want_dx, &dx_magnitude, &shape, tol)
            .map_err(TestCaseError::fail)?;
        let got_dweight = dweight.to_f64_vec(dev).map_err(fail)?;
        check_close_scaled(&what("dweight"), &got_dweight, &want_dweight, &dweight_magnitude, &[cols], tol)
            .map_err(TestCaseError::fail)?;
    }
    Ok(())
}

fn matches_reference<R: BackendRuntime, F: TestFloat>(dev: &Device<R>) {
    if refuses_unsupported::<R, F>(dev) {
        return;
    }
    let cases_per_dtype = if F::DTYPE == DType::F32 { 24 } else { 12 };
    run_property(&format!("rmsnorm {}", F::DTYPE), cases_per_dtype, cases(300), |case| {
        check_case::<R, F>(dev, &case)
    });
}

test_each_dtype!(matches_reference => rmsnorm_f32_matches_reference, rmsnorm_f16_matches_reference, rmsnorm_bf16_matches_reference_or_is_refused);

/// The fused residual forms against the unfused pairs: `x += residual` then the norm (same
/// bits), and the backward into a scratch tensor then `d_stream += scratch` (same bits in
/// f16/bf16; in f32 within a rounding of the sum, see `kernels::rmsnorm`).
fn check_fused<R: BackendRuntime, F: TestFloat>(dev: &Device<R>, case: &Case) -> Result<(), TestCaseError> {
    let (rows, cols) = (case.rows, case.cols);
    let shape = [rows, cols];
    let inp = inputs::<F>(case);
    let mut rng = DataRng::new(case.seed ^ 0x5eed);
    let residual = F::round_all(&rng.normals(rows * cols, 0.0, case.x_scale));
    let d_stream = F::round_all(&rng.normals(rows * cols, 0.0, 1.0));
    let up = |v: &[f64], shape: &[usize]| GpuTensor::<R, F>::from_f64(dev, v, shape).map_err(fail);
    let bits = |t: &GpuTensor<R, F>| -> Result<Vec<f64>, TestCaseError> {
        // f64 images of F values are exact, so comparing them compares bits (NaN aside).
        t.to_f64_vec(dev).map_err(fail)
    };
    let (weight, residual_t, dout) =
        (up(&inp.weight, &[cols])?, up(&residual, &shape)?, up(&inp.dout, &shape)?);
    let eps = case.eps as f32;

    let (mut x_fused, mut out_fused) = (up(&inp.x, &shape)?, up(&inp.x, &shape)?);
    let mut rstd_fused = GpuTensor::<R, f32>::full(dev, &[rows], f32::NAN).map_err(fail)?;
    rmsnorm_forward_residual(dev, &mut out_fused, &mut rstd_fused, &mut x_fused, &residual_t, &weight, eps)
        .map_err(fail)?;
    let (mut x_plain, mut out_plain) = (up(&inp.x, &shape)?, up(&inp.x, &shape)?);
    let mut rstd_plain = GpuTensor::<R, f32>::full(dev, &[rows], f32::NAN).map_err(fail)?;
    residual_add(dev, &mut x_plain, &residual_t).map_err(fail)?;
    rmsnorm_forward(dev, &mut out_plain, &mut rstd_plain, &x_plain, &weight, eps).map_err(fail)?;
    prop_assert!(bits(&x_fused)? == bits(&x_plain)?, "fused stream sum differs ({case:?})");
    prop_assert!(bits(&out_fused)? == bits(&out_plain)?, "fused norm output differs ({case:?})");
    let rstd_bits =
        |t: &GpuTensor<R, f32>| t.to_vec(dev).map(|v| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>());
    prop_assert!(
        rstd_bits(&rstd_fused).map_err(fail)? == rstd_bits(&rstd_plain).map_err(fail)?,
        "rstd differs"
    );

    let scratch_rows = rmsnorm_backward_scratch_rows(dev, rows);
    let mut scratch = GpuTensor::<R, f32>::zeros(dev, &[scratch_rows, cols]).map_err(fail)?;
    let (mut ds_fused, mut dw_fused) = (up(&d_stream, &shape)?, up(&inp.dweight_before, &[cols])?);
    rmsnorm_backward_accumulate(
        dev,
        &mut ds_fused,
        &mut dw_fused,
        &mut scratch,
        &dout,
        &x_plain,
        &weight,
        &rstd_plain,
    )
    .map_err(fail)?;
    let (mut ds_plain, mut dw_plain) = (up(&d_stream, &shape)?, up(&inp.dweight_before, &[cols])?);
    let mut branch = up(&vec![f64::NAN; rows * cols], &shape)?;
    rmsnorm_backward(dev, &mut branch, &mut dw_plain, &mut scratch, &dout, &x_plain, &weight, &rstd_plain)
        .map_err(fail)?;
    residual_add(dev, &mut ds_plain, &branch).map_err(fail)?;
    let (got, want) = (bits(&ds_fused)?, bits(&ds_plain)?);
    if F::DTYPE == DType::F32 {
        // No rounding between the branch gradient and the sum in f32, so the compiler may
        // contract the add into the products' multiply-adds: a few roundings of the terms
        // summed (the stream gradient and the branch's two products; 2⁻²¹ of them).
        let x = bits(&x_plain)?;
        let rstd: Vec<f64> = rstd_plain.to_vec(dev).map_err(fail)?.into_iter().map(f64::from).collect();
        let plain_inputs = Inputs { x, ..inp };
        let products = dx_magnitude(&plain_inputs, &rstd, rows, cols);
        let magnitude: Vec<f64> = d_stream.iter().zip(&products).map(|(a, b)| a.abs() + b).collect();
        let tol = Tolerance { atol: 0.0, rtol: 2f64.powi(-21) };
        check_close_scaled("fused backward's stream gradient", &got, &want, &magnitude, &shape, tol)
            .map_err(TestCaseError::fail)?;
    } else {
        prop_assert!(got == want, "fused backward's stream gradient differs ({case:?})");
    }
    prop_assert!(bits(&dw_fused)? == bits(&dw_plain)?, "fused backward's weight gradient differs ({case:?})");
    Ok(())
}

fn fused_matches_unfused<R: BackendRuntime, F: TestFloat>(dev: &Device<R>) {
    if refuses_unsupported::<R, F>(dev) {
        return;
    }
    run_property(&format!("rmsnorm fused residual {}", F::DTYPE), 12, cases(100), |case| {
        check_fused::<R, F>(dev, &case)
    });
}

test_each_dtype!(fused_matches_unfused => rmsnorm_fused_residual_f32_is_bit_identical, rmsnorm_fused_residual_f16_is_bit_identical, rmsnorm_fused_residual_bf16_is_bit_identical_or_is_refused);

/// Llama-sized rows: one row of 4096 and a few of 11008 (multiple register slots per unit).
fn llama_shapes<R: BackendRuntime>(dev: &Device<R>) {
    for (rows, cols) in [(1, 4096), (5, 11008), (3, 8192)] {
        let case = Case { rows, cols, seed: rows as u64 * 7919 + cols as u64, x_scale: 1.0, eps: 1e-5 };
        check_case::<R, f32>(dev, &case).unwrap_or_else(|e| panic!("{e}"));
    }
}

#[test]
fn rmsnorm_llama_widths() {
    on_test_backend!(llama_shapes);
}

fn deterministic<R: BackendRuntime>(dev: &Device<R>) {
    let case = Case { rows: 300, cols: 4097, seed: 42, x_scale: 3.0, eps: 1e-5 };
    let (rows, cols) = (case.rows, case.cols);
    let inp = inputs::<f32>(&case);
    let x = GpuTensor::<R, f32>::from_f64(dev, &inp.x, &[rows, cols]).unwrap();
    let weight = GpuTensor::<R, f32>::from_f64(dev, &inp.weight, &[cols]).unwrap();
    let dout = GpuTensor::<R, f32>::from_f64(dev, &inp.dout, &[rows, cols]).unwrap();
    let run = || {
        let mut out = GpuTensor::<R, f32>::uninit(dev, &[rows, cols]).unwrap();
        let mut rstd = GpuTensor::<R, f32>::uninit(dev, &[rows]).unwrap();
        rmsnorm_forward(dev, &mut out, &mut rstd, &x, &weight, 1e-5).unwrap();
        let mut dx = GpuTensor::<R, f32>::uninit(dev, &[rows, cols]).unwrap();
        let mut dweight = GpuTensor::<R, f32>::from_f64(dev, &inp.dweight_before, &[cols]).unwrap();
        let mut scratch =
            GpuTensor::<R, f32>::uninit(dev, &[rmsnorm_backward_scratch_rows(dev, rows), cols]).unwrap();
        rmsnorm_backward(dev, &mut dx, &mut dweight, &mut scratch, &dout, &x, &weight, &rstd).unwrap();
        let bits =
            |t: &GpuTensor<R, f32>| t.to_vec(dev).unwrap().iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        (bits(&out), bits(&rstd), bits(&dx), bits(&dweight))
    };
    let first = run();
    for _ in 0..3 {
        assert!(run() == first, "rmsnorm forward/backward differ bit-wise between identical runs");
    }
}

#[test]
fn rmsnorm_is_bitwise_deterministic() {
    on_test_backend!(deterministic);
}

fn bad_input<R: BackendRuntime>(dev: &Device<R>) {
    let x = GpuTensor::<R, f32>::zeros(dev, &[4, 8]).unwrap();
    let weight = GpuTensor::<R, f32>::zeros(dev, &[8]).unwrap();
    let short_weight = GpuTensor::<R, f32>::zeros(dev, &[7]).unwrap();
    let mut out = GpuTensor::<R, f32>::zeros(dev, &[4, 8]).unwrap();
    let mut rstd = GpuTensor::<R, f32>::zeros(dev, &[4]).unwrap();

    let err = rmsnorm_forward(dev, &mut out, &mut rstd, &x, &short_weight, 1e-5).unwrap_err();
    assert_eq!(
        err.to_string(),
        "rmsnorm_forward: tensor `weight` has shape [7], expected [8]",
        "error must name the op, the tensor and both shapes"
    );

    let mut wrong_out = GpuTensor::<R, f32>::zeros(dev, &[8, 4]).unwrap();
    let err = rmsnorm_forward(dev, &mut wrong_out, &mut rstd, &x, &weight, 1e-5).unwrap_err();
    assert!(matches!(err, Error::ShapeMismatch { tensor: "out", .. }), "{err}");

    let mut wrong_rstd = GpuTensor::<R, f32>::zeros(dev, &[3]).unwrap();
    let err = rmsnorm_forward(dev, &mut out, &mut wrong_rstd, &x, &weight, 1e-5).unwrap_err();
    assert!(matches!(err, Error::ShapeMismatch { tensor: "rstd", .. }), "{err}");

    let mut dx = GpuTensor::<R, f32>::zeros(dev, &[4, 8]).unwrap();
    let mut dweight = GpuTensor::<R, f32>::zeros(dev, &[8]).unwrap();
    let mut scratch = GpuTensor::<R, f32>::zeros(dev, &[2, 9]).unwrap();
    let err = rmsnorm_backward(dev, &mut dx, &mut dweight, &mut scratch, &x, &x, &weight, &rstd).unwrap_err();
    assert!(matches!(err, Error::ShapeMismatch { op: "rmsnorm_backward", tensor: "scratch", .. }), "{err}");

    let err = GpuTensor::<R, f32>::from_slice(dev, &[1.0, 2.0, 3.0], &[2, 2]).unwrap_err();
    assert!(matches!(err, Error::DataLength { len: 3, numel: 4, .. }), "{err}");
}

#[test]
fn rmsnorm_rejects_bad_input_with_clear_errors() {
    on_test_backend!(bad_input);
}

/// The reference backward against central differences of `L = Σ out · dout`, in f64.
#[test]
fn reference_backward_matches_finite_differences() {
    let shapes = (1usize..=4, 1usize..=12, any::<u64>());
    run_property("rmsnorm reference finite differences", 64, shapes, |(rows, cols, seed)| {
        let mut rng = DataRng::new(seed);
        let x = rng.normals(rows * cols, 0.0, 1.0);
        let weight = rng.normals(cols, 1.0, 0.3);
        let dout = rng.normals(rows * cols, 0.0, 1.0);
        let eps = 1e-5;
        let loss = |x: &[f64], weight: &[f64]| {
            let (mut out, mut rstd) = (vec![0.0; rows * cols], vec![0.0; rows]);
            reference::rmsnorm_forward(&mut out, &mut rstd, x, weight, rows, cols, eps);
            out.iter().zip(&dout).map(|(o, g)| o * g).sum::<f64>()
        };
        let (mut out, mut rstd) = (vec![0.0; rows * cols], vec![0.0; rows]);
        reference::rmsnorm_forward(&mut out, &mut rstd, &x, &weight, rows, cols, eps);
        let (mut dx, mut dweight) = (vec![0.0; rows * cols], vec![0.0; cols]);
        reference::rmsnorm_backward(&mut dx, &mut dweight, &dout, &x, &weight, &rstd, rows, cols);

        let h = 1e-6;
        let numeric = |v: &[f64], at: usize, f: &dyn Fn(&[f64]) -> f64| {
            let (mut plus, mut minus) = (v.to_vec(), v.to_vec());
            plus[at] += h;
            minus[at] -= h;
            (f(&plus) - f(&minus)) / (2.0 * h)
        };
        let fd_dx: Vec<f64> = (0..x.len()).map(|i| numeric(&x, i, &|xp| loss(xp, &weight))).collect();
        let fd_dw: Vec<f64> = (0..cols).map(|i| numeric(&weight, i, &|wp| loss(&x, wp))).collect();
        let tol = Tolerance { atol: 1e-6, rtol: 1e-6 };
        check_close("reference dx vs finite differences", &dx, &fd_dx, &[rows, cols], tol)
            .map_err(TestCaseError::fail)?;
        check_close("reference dweight vs finite differences", &dweight, &fd_dw, &[cols], tol)
            .map_err(TestCaseError::fail)?;
        Ok(())
    });
}
