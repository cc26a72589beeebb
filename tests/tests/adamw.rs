//! The fused AdamW step against the textbook formula in f64.

use dsl::{BackendRuntime, Device, Error, GpuTensor};
use kernels::adamw::{AdamW, Rounding, adamw_step};
use kernels::reference::adamw as reference;
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use tests::*;

#[derive(Clone, Debug)]
struct Case {
    len: usize,
    hp: AdamW,
    grad_scale: f64,
    seed: u64,
}

fn cases() -> impl Strategy<Value = Case> {
    let len = prop_oneof![prop::sample::select(vec![1usize, 3, 17, 127, 4095, 4097]), 1usize..=100_000];
    let lr = prop::sample::select(vec![3e-4, 1e-3, 2e-5, 1e-2]);
    let wd = prop::sample::select(vec![0.0, 0.1]);
    let beta2 = prop::sample::select(vec![0.95, 0.999]);
    let scale = prop::sample::select(vec![1.0, 0.37]);
    (len, lr, wd, beta2, scale, any::<u64>()).prop_map(|(len, lr, weight_decay, beta2, grad_scale, seed)| {
        Case { len, hp: AdamW { lr, beta2, weight_decay, ..AdamW::default() }, grad_scale, seed }
    })
}

const STEPS: u64 = 20;

struct Run {
    p64: Vec<f64>,
    m64: Vec<f64>,
    v64: Vec<f64>,
    /// What each f64 quantity is made of, for the relative part of the tolerance.
    p_magnitude: Vec<f64>,
    m_magnitude: Vec<f64>,
    p32: Vec<f32>,
    m32: Vec<f32>,
    v32: Vec<f32>,
    kernel: (Vec<f64>, Vec<f64>, Vec<f64>),
}

/// 20 consecutive steps of the kernel, of torch's f32 arithmetic on the host, and of the f64
/// formula (its state rounded to f32 after each step, as the kernel stores it).
fn run<R: BackendRuntime>(dev: &Device<R>, case: &Case) -> Result<Run, TestCaseError> {
    let n = case.len;
    let mut rng = DataRng::new(case.seed);
    // Parameters away from 0 (sign random) so "relative" means relative to the parameter.
    let p0: Vec<f64> = f32::round_all(
        &(0..n)
            .map(|_| (0.5 + 1.5 * rng.uniform()) * if rng.uniform() < 0.5 { -1.0 } else { 1.0 })
            .collect::<Vec<_>>(),
    );
    let hp = &case.hp;
    let scale_used = f32::round_all(&[case.grad_scale])[0];
    let mut r = Run {
        p64: p0.clone(),
        m64: vec![0.0; n],
        v64: vec![0.0; n],
        p_magnitude: p0.iter().map(|x| x.abs()).collect(),
        m_magnitude: vec![0.0; n],
        p32: p0.iter().map(|&x| x as f32).collect(),
        m32: vec![0.0; n],
        v32: vec![0.0; n],
        kernel: (vec![], vec![], vec![]),
    };
    let mut param = upload::<R, f32>(dev, &p0, &[n])?;
    let mut m = GpuTensor::<R, f32>::zeros(dev, &[n]).map_err(fail)?;
    let mut v = GpuTensor::<R, f32>::zeros(dev, &[n]).map_err(fail)?;
    let scale = upload::<R, f32>(dev, &[case.grad_scale], &[1])?;
    for step in 1..=STEPS {
        let g = f32::round_all(&rng.normals(n, 0.0, 1.0));
        let grad = upload::<R, f32>(dev, &g, &[n])?;
        adamw_step(dev, &mut param, &mut m, &mut v, &grad, &scale, hp, step, Rounding::Nearest)
            .map_err(fail)?;
        reference::adamw_step(&mut r.p64, &mut r.m64, &mut r.v64, &g, scale_used, hp, step);
        for state in [&mut r.p64, &mut r.m64, &mut r.v64] {
            *state = f32::round_all(state);
        }
        let g32: Vec<f32> = g.iter().map(|&x| x as f32).collect();
        reference::adamw_step_f32(&mut r.p32, &mut r.m32, &mut r.v32, &g32, scale_used as f32, hp, step);
        for i in 0..n {
            r.m_magnitude[i] = hp.beta1 * r.m_magnitude[i] + (1.0 - hp.beta1) * (g[i] * scale_used).abs();
            // A step moves p by about lr·m̂/sqrt(v̂) ≤ a few lr.
            r.p_magnitude[i] += 3.0 * hp.lr;
        }
    }
    r.kernel = (download(dev, &param)?, download(dev, &m)?, download(dev, &v)?);
    Ok(r)
}

fn widen(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// Against torch's own f32 arithmetic: bit-exact on lavapipe; on CUDA, NVRTC contracts
/// multiply-adds into FMAs (one rounding instead of two), up to an ulp per step: 20 f32 ulps
/// (2.4e-6 relative) over 20 steps (worst seen on an H100: 9 ulps).
fn matches_torch_f32<R: BackendRuntime>(dev: &Device<R>) {
    run_property("adamw vs torch's f32 arithmetic, 20 steps", 16, cases(), |case| {
        let r = run::<R>(dev, &case)?;
        let tol = Tolerance { atol: 0.0, rtol: STEPS as f64 * f32::EPSILON as f64 };
        let what = |t: &str| format!("{t} after {STEPS} steps [{case:?}]");
        let n = [case.len];
        check_close(&what("param"), &r.kernel.0, &widen(&r.p32), &n, tol).map_err(TestCaseError::fail)?;
        check_close_scaled(&what("m"), &r.kernel.1, &widen(&r.m32), &r.m_magnitude, &n, tol)
            .map_err(TestCaseError::fail)?;
        check_close(&what("v"), &r.kernel.2, &widen(&r.v32), &n, tol).map_err(TestCaseError::fail)
    });
}

#[test]
fn adamw_f32_twenty_steps_match_torch_arithmetic() {
    on_test_backend!(matches_torch_f32);
}

/// Against the f64 formula: moments to 1e-6 relative; the parameter to 20 f32 ulps
/// (2.4e-6 relative), the bound for two roundings per step that may repeat in the same
/// direction every step (see `reference::adamw::adamw_step_f32`).
fn matches_f64<R: BackendRuntime>(dev: &Device<R>) {
    run_property("adamw vs f64, 20 steps", 16, cases(), |case| {
        let r = run::<R>(dev, &case)?;
        let what = |t: &str| format!("{t} after {STEPS} steps [{case:?}]");
        let n = [case.len];
        let param_tol = Tolerance { atol: 0.0, rtol: STEPS as f64 * f32::EPSILON as f64 };
        check_close_scaled(&what("param"), &r.kernel.0, &r.p64, &r.p_magnitude, &n, param_tol)
            .map_err(TestCaseError::fail)?;
        let tol = Tolerance { atol: 0.0, rtol: 1e-6 };
        check_close_scaled(&what("m"), &r.kernel.1, &r.m64, &r.m_magnitude, &n, tol)
            .map_err(TestCaseError::fail)?;
        check_close(&what("v"), &r.kernel.2, &r.v64, &n, tol).map_err(TestCaseError::fail)
    });
}

#[test]
fn adamw_f32_twenty_steps_match_f64_reference() {
    on_test_backend!(matches_f64);
}

/// f16 parameters (moments stay f32): one step, within one f16 rounding of the parameter.
fn f16_one_step<R: BackendRuntime>(dev: &Device<R>) {
    if refuses_unsupported::<R, half::f16>(dev) {
        return;
    }
    let n = 4097;
    let mut rng = DataRng::new(2);
    let mut p = half::f16::round_all(&rng.normals(n, 0.0, 1.0));
    let g = half::f16::round_all(&rng.normals(n, 0.0, 1.0));
    let hp = AdamW { lr: 1e-2, ..AdamW::default() };
    let mut param = GpuTensor::<R, half::f16>::from_f64(dev, &p, &[n]).unwrap();
    let (mut m_t, mut v_t) = (GpuTensor::zeros(dev, &[n]).unwrap(), GpuTensor::zeros(dev, &[n]).unwrap());
    let grad = GpuTensor::<R, half::f16>::from_f64(dev, &g, &[n]).unwrap();
    let one = GpuTensor::<R, f32>::full(dev, &[1], 1.0).unwrap();
    adamw_step(dev, &mut param, &mut m_t, &mut v_t, &grad, &one, &hp, 1, Rounding::Nearest).unwrap();
    let (mut m, mut v) = (vec![0.0; n], vec![0.0; n]);
    reference::adamw_step(&mut p, &mut m, &mut v, &g, 1.0, &hp, 1);
    let got = param.to_f64_vec(dev).unwrap();
    assert_close("f16 param after one step", &got, &p, &[n], Tolerance::for_dtype(dsl::DType::F16));
}

#[test]
fn adamw_f16_params_one_step_matches_reference() {
    on_test_backend!(f16_one_step);
}

/// With weight decay 0, a tensor whose gradient is zero does not move at all.
fn zero_grad_no_decay<R: BackendRuntime>(dev: &Device<R>) {
    let n = 1001;
    let p = DataRng::new(4).normals(n, 0.0, 1.0);
    let mut param = GpuTensor::<R, f32>::from_f64(dev, &p, &[n]).unwrap();
    let before: Vec<u32> = param.to_vec(dev).unwrap().iter().map(|x| x.to_bits()).collect();
    let (mut m, mut v) = (GpuTensor::zeros(dev, &[n]).unwrap(), GpuTensor::zeros(dev, &[n]).unwrap());
    let grad = GpuTensor::<R, f32>::zeros(dev, &[n]).unwrap();
    let one = GpuTensor::<R, f32>::full(dev, &[1], 1.0).unwrap();
    let hp = AdamW { weight_decay: 0.0, lr: 1e-3, ..AdamW::default() };
    for step in 1..=5 {
        adamw_step(dev, &mut param, &mut m, &mut v, &grad, &one, &hp, step, Rounding::Nearest).unwrap();
    }
    let after: Vec<u32> = param.to_vec(dev).unwrap().iter().map(|x| x.to_bits()).collect();
    assert!(before == after, "a zero-gradient tensor without weight decay changed");
}

#[test]
fn zero_gradient_without_weight_decay_leaves_the_tensor_unchanged() {
    on_test_backend!(zero_grad_no_decay);
}

fn bad_input<R: BackendRuntime>(dev: &Device<R>) {
    let mut p = GpuTensor::<R, f32>::zeros(dev, &[8]).unwrap();
    let (mut m, mut v) = (GpuTensor::zeros(dev, &[8]).unwrap(), GpuTensor::zeros(dev, &[7]).unwrap());
    let g = GpuTensor::<R, f32>::zeros(dev, &[8]).unwrap();
    let one = GpuTensor::<R, f32>::full(dev, &[1], 1.0).unwrap();
    let err = adamw_step(dev, &mut p, &mut m, &mut v, &g, &one, &AdamW::default(), 1, Rounding::Nearest)
        .unwrap_err();
    assert_eq!(err.to_string(), "adamw_step: tensor `v` has shape [7], expected [8]");
    let mut v = GpuTensor::zeros(dev, &[8]).unwrap();
    let err = adamw_step(dev, &mut p, &mut m, &mut v, &g, &one, &AdamW::default(), 0, Rounding::Nearest)
        .unwrap_err();
    assert!(matches!(err, Error::InvalidArgument { op: "adamw_step", .. }), "step 0 must be refused: {err}");
    let hp = AdamW { beta2: 1.0, ..AdamW::default() };
    assert!(
        adamw_step(dev, &mut p, &mut m, &mut v, &g, &one, &hp, 1, Rounding::Nearest).is_err(),
        "beta2 = 1 must be refused"
    );
}

#[test]
fn adamw_rejects_bad_input() {
    on_test_backend!(bad_input);
}
