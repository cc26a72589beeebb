//! SwiGLU kernels against the f64 reference, and the reference against finite differences.

use dsl::{BackendRuntime, DType, Device, Error, GpuTensor};
use kernels::reference::swiglu as reference;
use kernels::swiglu::{swiglu_backward, swiglu_forward};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use tests::*;

fn sizes() -> impl Strategy<Value = (Vec<usize>, u64)> {
    let shape = prop_oneof![
        prop::sample::select(vec![vec![1], vec![3], vec![17, 3], vec![127, 11], vec![4095], vec![4097]]),
        (1usize..=64, 1usize..=3000).prop_map(|(r, c)| vec![r, c]),
    ];
    (shape, any::<u64>())
}

fn check<R: BackendRuntime, F: TestFloat>(
    dev: &Device<R>,
    shape: &[usize],
    seed: u64,
) -> Result<(), TestCaseError> {
    let n: usize = shape.iter().product();
    let mut rng = DataRng::new(seed);
    // Gates up to ±12 cover both saturated ends of the sigmoid.
    let gate = F::round_all(&rng.normals(n, 0.0, 4.0));
    let up = F::round_all(&rng.normals(n, 0.0, 1.0));
    let dout = F::round_all(&rng.normals(n, 0.0, 1.0));
    let (mut want_out, mut want_dgate, mut want_dup) = (vec![0.0; n], vec![0.0; n], vec![0.0; n]);
    reference::swiglu_forward(&mut want_out, &gate, &up);
    reference::swiglu_backward(&mut want_dgate, &mut want_dup, &dout, &gate, &up);
    // dgate's factor 1 + g·(1 − σ) cancels near g ≈ −1.28: scale by its terms.
    let dgate_magnitude: Vec<f64> = (0..n)
        .map(|i| {
            let s = 1.0 / (1.0 + (-gate[i]).exp());
            (dout[i] * up[i] * s).abs() * (1.0 + (gate[i] * (1.0 - s)).abs())
        })
        .collect();

    let tol = Tolerance::for_dtype(F::DTYPE);
    let what = |t: &str| format!("{t} [{} {shape:?}]", F::DTYPE);
    let g = upload::<R, F>(dev, &gate, shape)?;
    let u = upload::<R, F>(dev, &up, shape)?;
    let dy = upload::<R, F>(dev, &dout, shape)?;
    let mut out = nan_tensor::<R, F>(dev, shape)?;
    swiglu_forward(dev, &mut out, &g, &u).map_err(fail)?;
    check_close(&what("out"), &download(dev, &out)?, &want_out, shape, tol).map_err(TestCaseError::fail)?;
    let (mut dgate, mut dup) = (nan_tensor::<R, F>(dev, shape)?, nan_tensor::<R, F>(dev, shape)?);
    swiglu_backward(dev, &mut dgate, &mut dup, &dy, &g, &u).map_err(fail)?;
    check_close_scaled(&what("dgate"), &download(dev, &dgate)?, &want_dgate, &dgate_magnitude, shape, tol)
        .map_err(TestCaseError::fail)?;
    check_close(&what("dup"), &download(dev, &dup)?, &want_dup, shape, tol).map_err(TestCaseError::fail)?;
    Ok(())
}

fn matches_reference<R: BackendRuntime, F: TestFloat>(dev: &Device<R>) {
    if refuses_unsupported::<R, F>(dev) {
        return;
    }
    let cases = if F::DTYPE == DType::F32 { 24 } else { 12 };
    run_property(&format!("swiglu {}", F::DTYPE), cases, sizes(), |(shape, seed)| {
        check::<R, F>(dev, &shape, seed)
    });
}

test_each_dtype!(matches_reference => swiglu_f32_matches_reference, swiglu_f16_matches_reference, swiglu_bf16_matches_reference_or_is_refused);

fn bad_input<R: BackendRuntime>(dev: &Device<R>) {
    let a = GpuTensor::<R, f32>::zeros(dev, &[4, 8]).unwrap();
    let b = GpuTensor::<R, f32>::zeros(dev, &[4, 9]).unwrap();
    let mut out = GpuTensor::<R, f32>::zeros(dev, &[4, 8]).unwrap();
    let err = swiglu_forward(dev, &mut out, &a, &b).unwrap_err();
    assert_eq!(err.to_string(), "swiglu_forward: tensor `up` has shape [4, 9], expected [4, 8]");
    let (mut dg, mut du) = (a.clone(), GpuTensor::<R, f32>::zeros(dev, &[32]).unwrap());
    let err = swiglu_backward(dev, &mut dg, &mut du, &a, &a, &a).unwrap_err();
    assert!(matches!(err, Error::ShapeMismatch { op: "swiglu_backward", tensor: "dup", .. }), "{err}");
}

#[test]
fn swiglu_rejects_mismatched_shapes() {
    on_test_backend!(bad_input);
}

#[test]
fn reference_backward_matches_finite_differences() {
    run_property("swiglu reference finite differences", 64, (1usize..=16, any::<u64>()), |(n, seed)| {
        let mut rng = DataRng::new(seed);
        let (gate, up, dout) = (rng.normals(n, 0.0, 3.0), rng.normals(n, 0.0, 1.0), rng.normals(n, 0.0, 1.0));
        let loss = |gate: &[f64], up: &[f64]| {
            let mut out = vec![0.0; n];
            reference::swiglu_forward(&mut out, gate, up);
            out.iter().zip(&dout).map(|(o, d)| o * d).sum::<f64>()
        };
        let (mut dgate, mut dup) = (vec![0.0; n], vec![0.0; n]);
        reference::swiglu_backward(&mut dgate, &mut dup, &dout, &gate, &up);
        let fd_gate = finite_differences(|g| loss(g, &up), &gate, 1e-6);
        let fd_up = finite_differences(|u| loss(&gate, u), &up, 1e-6);
        check_close("reference dgate vs finite differences", &dgate, &fd_gate, &[n], FINITE_DIFFERENCE_TOL)
            .map_err(TestCaseError::fail)?;
        check_close("reference dup vs finite differences", &dup, &fd_up, &[n], FINITE_DIFFERENCE_TOL)
            .map_err(TestCaseError::fail)?;
        Ok(())
    });
}
