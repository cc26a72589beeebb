//! The linear layer's three products (cubek-matmul behind `kernels::matmul`) against f64 loops
//! at awkward shapes, including accumulation onto existing values, on every routine the device
//! offers (`MatmulRoutine::offered`: the unit routines on wgpu, all twelve on CUDA).

use dsl::{Backend, BackendRuntime, DType, Device, Error, GpuTensor, KernelPolicy};
use kernels::matmul::{
    MatmulRoutine, linear_backward_input, linear_backward_input_with, linear_backward_weight,
    linear_backward_weight_with, linear_forward, linear_forward_with,
};
use kernels::reference::matmul as reference;
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use std::collections::BTreeSet;
use std::sync::Mutex;
use tests::*;

/// `(rows, in, out, seed)`: the 37×53×29 and other odd or degenerate shapes, then random.
fn shapes() -> impl Strategy<Value = (usize, usize, usize, u64)> {
    let fixed = prop::sample::select(vec![
        (37, 53, 29),
        (1, 64, 33),
        (200, 17, 130),
        (64, 64, 64),
        (3, 1, 5),
        (1, 1, 1),
        (129, 96, 7),
    ]);
    let dims = prop_oneof![fixed, (1usize..=150, 1usize..=150, 1usize..=150)];
    (dims, any::<u64>()).prop_map(|((n, i, o), seed)| (n, i, o, seed))
}

/// Σ|terms| of each output of `y = a·b` (a `[m, k]`, b `[k, n]` given by an accessor), the
/// magnitude the relative tolerance scales with.
fn term_magnitudes(
    m: usize,
    k: usize,
    n: usize,
    a: impl Fn(usize, usize) -> f64,
    b: impl Fn(usize, usize) -> f64,
) -> Vec<f64> {
    let mut out = vec![0.0; m * n];
    for r in 0..m {
        for c in 0..n {
            out[r * n + c] = (0..k).map(|j| (a(r, j) * b(j, c)).abs()).sum();
        }
    }
    out
}

/// The three products on `routine` (returning the routines that ran), against the f64 loops
/// with `tol` (TF32 routines round f32 inputs as f16 does).
fn check_routine<R: BackendRuntime, F: TestFloat>(
    dev: &Device<R>,
    routine: MatmulRoutine,
    (n, din, dout, seed): (usize, usize, usize, u64),
    tol: Tolerance,
) -> Result<Vec<MatmulRoutine>, TestCaseError> {
    let r = Some(routine);
    let mut rng = DataRng::new(seed);
    let x = F::round_all(&rng.normals(n * din, 0.0, 1.0));
    let w = F::round_all(&rng.normals(dout * din, 0.0, 1.0));
    let dy = F::round_all(&rng.normals(n * dout, 0.0, 1.0));
    let dx0 = F::round_all(&rng.normals(n * din, 0.0, 1.0));
    let dw0 = F::round_all(&rng.normals(dout * din, 0.0, 1.0));
    let what = |t: &str| format!("{t} [{} {routine} n={n} in={din} out={dout}]", F::DTYPE);
    let mut ran = Vec::new();

    let (xt, wt, dyt) = (
        upload::<R, F>(dev, &x, &[n, din])?,
        upload::<R, F>(dev, &w, &[dout, din])?,
        upload::<R, F>(dev, &dy, &[n, dout])?,
    );

    // y = x·wᵀ
    let mut want = vec![0.0; n * dout];
    reference::linear_forward(&mut want, &x, &w, n, din, dout);
    let magnitude = term_magnitudes(n, din, dout, |r, j| x[r * din + j], |j, c| w[c * din + j]);
    let mut y = nan_tensor::<R, F>(dev, &[n, dout])?;
    ran.push(linear_forward_with(dev, r, &mut y, &xt, &wt).map_err(fail)?);
    check_close_scaled(&what("y"), &download(dev, &y)?, &want, &magnitude, &[n, dout], tol)
        .map_err(TestCaseError::fail)?;

    // dx = dy·w, then dx += dy·w onto other values.
    let mut want = vec![0.0; n * din];
    reference::linear_backward_input(&mut want, &dy, &w, false, n, din, dout);
    let magnitude = term_magnitudes(n, dout, din, |r, j| dy[r * dout + j], |j, c| w[j * din + c]);
    let mut dx = nan_tensor::<R, F>(dev, &[n, din])?;
    ran.push(linear_backward_input_with(dev, r, &mut dx, &dyt, &wt, false).map_err(fail)?);
    check_close_scaled(&what("dx ="), &download(dev, &dx)?, &want, &magnitude, &[n, din], tol)
        .map_err(TestCaseError::fail)?;
    let mut want = dx0.clone();
    reference::linear_backward_input(&mut want, &dy, &w, true, n, din, dout);
    let with_start: Vec<f64> = magnitude.iter().zip(&dx0).map(|(m, s)| m + s.abs()).collect();
    let mut dx = upload::<R, F>(dev, &dx0, &[n, din])?;
    ran.push(linear_backward_input_with(dev, r, &mut dx, &dyt, &wt, true).map_err(fail)?);
    check_close_scaled(&what("dx +="), &download(dev, &dx)?, &want, &with_start, &[n, din], tol)
        .map_err(TestCaseError::fail)?;

    // dw += dyᵀ·x
    let mut want = dw0.clone();
    reference::linear_backward_weight(&mut want, &dy, &x, n, din, dout);
    let magnitude = term_magnitudes(dout, n, din, |o, r| dy[r * dout + o], |r, c| x[r * din + c]);
    let with_start: Vec<f64> = magnitude.iter().zip(&dw0).map(|(m, s)| m + s.abs()).collect();
    let mut dw = upload::<R, F>(dev, &dw0, &[dout, din])?;
    ran.push(linear_backward_weight_with(dev, r, &mut dw, &dyt, &xt).map_err(fail)?);
    check_close_scaled(&what("dw +="), &download(dev, &dw)?, &want, &with_start, &[dout, din], tol)
        .map_err(TestCaseError::fail)?;
    // A routine falls back only to the defaults (where it cannot take the product).
    let defaults = [MatmulRoutine::SimpleCmma, MatmulRoutine::SimpleUnit];
    for &got in &ran {
        prop_assert!(got == routine || defaults.contains(&got), "{routine} ran as {got}");
    }
    Ok(ran)
}

/// Every routine the device offers for `F`, on one case.
fn check<R: BackendRuntime, F: TestFloat>(
    dev: &Device<R>,
    case: (usize, usize, usize, u64),
    ran: &Mutex<BTreeSet<MatmulRoutine>>,
) -> Result<(), TestCaseError> {
    for routine in MatmulRoutine::offered(dev, F::DTYPE) {
        let got = check_routine::<R, F>(dev, routine, case, Tolerance::for_dtype(F::DTYPE))?;
        ran.lock().unwrap().extend(got);
    }
    Ok(())
}

/// Fails unless every offered routine ran in at least one product (a routine that always fell
/// back would otherwise pass untested).
fn assert_all_ran<R: BackendRuntime>(dev: &Device<R>, dtype: DType, ran: &Mutex<BTreeSet<MatmulRoutine>>) {
    let ran = ran.lock().unwrap();
    let missing: Vec<_> =
        MatmulRoutine::offered(dev, dtype).into_iter().filter(|r| !ran.contains(r)).collect();
    assert!(missing.is_empty(), "{dtype}: routines that never ran (always fell back): {missing:?}");
}

fn matches_reference<R: BackendRuntime, F: TestFloat>(dev: &Device<R>) {
    if refuses_unsupported::<R, F>(dev) {
        return;
    }
    // Each new shape compiles new kernels (the library specialises on vector widths): on
    // lavapipe that dominates, so the case count stays small.
    let cases = if F::DTYPE == DType::F32 { 10 } else { 6 };
    let ran = Mutex::new(BTreeSet::new());
    // Shapes whose every k is a multiple of 64, which the multi-stage routines need (random
    // shapes rarely are), then the random and awkward ones.
    for case in [(64, 64, 64, 11), (128, 192, 64, 12)] {
        check::<R, F>(dev, case, &ran).unwrap_or_else(|e| panic!("{e}"));
    }
    run_property(&format!("linear {}", F::DTYPE), cases, shapes(), |case| check::<R, F>(dev, case, &ran));
    assert_all_ran(dev, F::DTYPE, &ran);
}

test_each_dtype!(matches_reference => linear_f32_matches_reference, linear_f16_matches_reference, linear_bf16_matches_reference_or_is_refused);

/// Shapes whose accumulating products get tiles larger than shared memory unless the launcher
/// shrinks them: on lavapipe (32 KiB) the unit routine's default tiles need 35–39 KiB and the
/// product silently did nothing (this test failed there before the fix); on an H100 the
/// tensor-core selection shrinks to fewer planes per cube (as the 110M training run needed).
fn large_accumulating_products<R: BackendRuntime, F: TestFloat>(dev: &Device<R>) {
    if refuses_unsupported::<R, F>(dev) {
        return;
    }
    let ran = Mutex::new(BTreeSet::new());
    for (n, din, dout) in [(512, 64, 64), (1024, 64, 256)] {
        check::<R, F>(dev, (n, din, dout, 7), &ran).unwrap_or_else(|e| panic!("{e}"));
    }
    assert_all_ran(dev, F::DTYPE, &ran);
}

test_each_dtype!(large_accumulating_products => linear_f32_large_accumulation, linear_f16_large_accumulation, linear_bf16_large_accumulation_or_is_refused);

/// `dw += dyᵀ·x` into an f32 `dw` from f16/bf16 inputs (the trainer's f32 weight gradients):
/// against the f64 product with the f32 tolerance, onto starting values whose low bits an
/// f16/bf16 store would lose, so a result rounded to the narrow type anywhere fails.
fn check_f32_weight_gradient<R: BackendRuntime, F: TestFloat>(
    dev: &Device<R>,
    (n, din, dout, seed): (usize, usize, usize, u64),
) -> Result<(), TestCaseError> {
    let mut rng = DataRng::new(seed);
    let x = F::round_all(&rng.normals(n * din, 0.0, 1.0));
    let dy = F::round_all(&rng.normals(n * dout, 0.0, 1.0));
    let dw0 = f32::round_all(&rng.normals(dout * din, 0.0, 1.0));
    let mut want = dw0.clone();
    reference::linear_backward_weight(&mut want, &dy, &x, n, din, dout);
    let magnitude = term_magnitudes(dout, n, din, |o, r| dy[r * dout + o], |r, c| x[r * din + c]);
    let with_start: Vec<f64> = magnitude.iter().zip(&dw0).map(|(m, s)| m + s.abs()).collect();
    let (xt, dyt) = (upload::<R, F>(dev, &x, &[n, din])?, upload::<R, F>(dev, &dy, &[n, dout])?);
    for routine in MatmulRoutine::offered(dev, F::DTYPE) {
        let mut dw = upload::<R, f32>(dev, &dw0, &[dout, din])?;
        linear_backward_weight_with(dev, Some(routine), &mut dw, &dyt, &xt).map_err(fail)?;
        let what = format!("f32 dw += dyᵀ·x from {} on {routine} [n={n} in={din} out={dout}]", F::DTYPE);
        check_close_scaled(
            &what,
            &download(dev, &dw)?,
            &want,
            &with_start,
            &[dout, din],
            Tolerance::for_dtype(DType::F32),
        )
        .map_err(TestCaseError::fail)?;
    }
    Ok(())
}

fn f32_weight_gradients<R: BackendRuntime, F: TestFloat>(dev: &Device<R>) {
    if refuses_unsupported::<R, F>(dev) {
        return;
    }
    // The shapes whose accumulating stages need shrinking, then the awkward ones.
    for (n, din, dout) in [(512, 64, 64), (1024, 64, 256)] {
        check_f32_weight_gradient::<R, F>(dev, (n, din, dout, 3)).unwrap_or_else(|e| panic!("{e}"));
    }
    run_property(&format!("f32 weight gradient from {}", F::DTYPE), 6, shapes(), |case| {
        check_f32_weight_gradient::<R, F>(dev, case)
    });
}

#[test]
fn linear_weight_gradient_from_f16_accumulates_in_f32() {
    on_test_backend!(f32_weight_gradients, half::f16);
}

/// Runs where the device stores bf16 (CUDA); elsewhere checks the clean refusal.
#[test]
fn linear_weight_gradient_from_bf16_accumulates_in_f32_or_is_refused() {
    on_test_backend!(f32_weight_gradients, half::bf16);
}

/// Leading dimensions are rows: `[B, T, in]` behaves as `[B·T, in]`.
fn batched_rows<R: BackendRuntime>(dev: &Device<R>) {
    let (b, t, din, dout) = (2, 5, 7, 3);
    let mut rng = DataRng::new(7);
    let x = rng.normals(b * t * din, 0.0, 1.0);
    let w = rng.normals(dout * din, 0.0, 1.0);
    let mut want = vec![0.0; b * t * dout];
    reference::linear_forward(&mut want, &x, &w, b * t, din, dout);
    let xt = GpuTensor::<R, f32>::from_f64(dev, &x, &[b, t, din]).unwrap();
    let wt = GpuTensor::<R, f32>::from_f64(dev, &w, &[dout, din]).unwrap();
    let mut y = GpuTensor::<R, f32>::full(dev, &[b, t, dout], f32::NAN).unwrap();
    linear_forward(dev, &mut y, &xt, &wt).unwrap();
    assert_close(
        "y [B,T,out]",
        &y.to_f64_vec(dev).unwrap(),
        &want,
        &[b, t, dout],
        Tolerance { atol: 1e-5, rtol: 1e-5 },
    );
}

#[test]
fn linear_reads_leading_dimensions_as_rows() {
    on_test_backend!(batched_rows);
}

fn bad_input<R: BackendRuntime>(dev: &Device<R>) {
    let x = GpuTensor::<R, f32>::zeros(dev, &[4, 8]).unwrap();
    let w = GpuTensor::<R, f32>::zeros(dev, &[3, 9]).unwrap();
    let mut y = GpuTensor::<R, f32>::zeros(dev, &[4, 3]).unwrap();
    let err = linear_forward(dev, &mut y, &x, &w).unwrap_err();
    assert_eq!(err.to_string(), "linear_forward: tensor `x` has shape [8], expected [9]");
    let w = GpuTensor::<R, f32>::zeros(dev, &[3, 8]).unwrap();
    let mut y = GpuTensor::<R, f32>::zeros(dev, &[4, 4]).unwrap();
    let err = linear_forward(dev, &mut y, &x, &w).unwrap_err();
    assert_eq!(err.to_string(), "linear_forward: tensor `y` has shape [4, 4], expected [4, 3]");
    let flat = GpuTensor::<R, f32>::zeros(dev, &[24]).unwrap();
    let err = linear_backward_weight(dev, &mut flat.clone(), &y, &x).unwrap_err();
    assert!(matches!(err, Error::InvalidArgument { op: "linear_backward_weight", .. }), "{err}");
    assert!(err.to_string().contains("weight must be [out, in]"), "{err}");
}

#[test]
fn linear_rejects_mismatched_shapes() {
    on_test_backend!(bad_input);
}

/// With TF32 allowed, f32 products run on every tensor-core routine (CUDA) within the f16
/// tolerance: TF32 rounds inputs to f16's 10-bit mantissa and accumulates in f32. Where the
/// device has no tensor-core path (wgpu), allowing TF32 offers nothing new and forcing a
/// tensor-core routine is a clear error.
fn tf32_products<R: BackendRuntime>(dev: &Device<R>) {
    let strict = MatmulRoutine::offered(dev, DType::F32);
    assert!(strict.iter().all(|r| !r.uses_tensor_cores()), "f32 on tensor cores without TF32: {strict:?}");
    let tf32 = dev.with_policy(KernelPolicy { allow_tf32: true, ..Default::default() });
    let offered = MatmulRoutine::offered(&tf32, DType::F32);
    if dev.backend() == Backend::Cuda {
        assert_eq!(offered, MatmulRoutine::ALL.to_vec());
    } else {
        assert_eq!(offered, strict);
        let x = GpuTensor::<R, f32>::zeros(dev, &[4, 8]).unwrap();
        let w = GpuTensor::<R, f32>::zeros(dev, &[3, 8]).unwrap();
        let mut y = GpuTensor::<R, f32>::zeros(dev, &[4, 3]).unwrap();
        let err = linear_forward_with(&tf32, Some(MatmulRoutine::DoubleMma), &mut y, &x, &w).unwrap_err();
        assert_eq!(
            err.to_string(),
            "linear_forward: matmul routine double_mma is not offered for f32 inputs here: \
             tensor-core routines run on CUDA only"
        );
    }
    let ran = Mutex::new(BTreeSet::new());
    let tol = Tolerance::for_dtype(DType::F16);
    for case in [(37, 53, 29, 1), (512, 64, 64, 2), (129, 96, 7, 3)] {
        for &routine in offered.iter().filter(|r| r.uses_tensor_cores()) {
            let got = check_routine::<R, f32>(&tf32, routine, case, tol).unwrap_or_else(|e| panic!("{e}"));
            ran.lock().unwrap().extend(got);
        }
    }
    if dev.backend() == Backend::Cuda {
        assert_all_ran(&tf32, DType::F32, &ran);
    }
}

#[test]
fn linear_f32_on_tf32_tensor_cores_where_allowed() {
    on_test_backend!(tf32_products);
}

/// Without a routine named, a product runs its table entry's routine (or the nearest entry's
/// of the same kind), and the default where the table has none of its kind.
fn table_choices<R: BackendRuntime>(dev: &Device<R>) {
    use kernels::matmul::{MatmulEntry, MatmulTable};
    let offered = MatmulRoutine::offered(dev, DType::F32);
    let default = kernels::matmul::choose(dev, &forward_key(64, 48, 32));
    let other = *offered.iter().find(|&&r| r != default).expect("every device offers two routines");
    let mut table = MatmulTable::new(dev.info().signature(), "test".into());
    table.insert(MatmulEntry::new(&forward_key(64, 48, 32), "test".into(), other, Vec::new())).unwrap();
    let tuned =
        dev.with_policy(KernelPolicy { tables: vec![std::sync::Arc::new(table)], ..Default::default() });

    let (x, w) = (filled::<R>(dev, &[70, 32]), filled::<R>(dev, &[48, 32]));
    let mut y = GpuTensor::<R, f32>::zeros(dev, &[70, 48]).unwrap();
    assert_eq!(linear_forward(&tuned, &mut y, &x, &w).unwrap(), other, "nearest forward entry");
    let tuned_y = y.to_f64_vec(dev).unwrap();
    assert_eq!(linear_forward(dev, &mut y, &x, &w).unwrap(), default, "no table");
    // Same product, another routine: equal up to f32 summation order.
    assert_close("y", &y.to_f64_vec(dev).unwrap(), &tuned_y, &[70, 48], Tolerance::for_dtype(DType::F32));
    // The input gradient is another kind (no transposed rhs): the default.
    let dy = filled::<R>(dev, &[70, 48]);
    let mut dx = GpuTensor::<R, f32>::zeros(dev, &[70, 32]).unwrap();
    assert_eq!(linear_backward_input(&tuned, &mut dx, &dy, &w, false).unwrap(), default);
}

fn forward_key(m: usize, n: usize, k: usize) -> kernels::matmul::MatmulKey {
    kernels::matmul::MatmulKey {
        m,
        n,
        k,
        lhs_transposed: false,
        rhs_transposed: true,
        dtype: DType::F32,
        out_dtype: DType::F32,
        accumulate: false,
        tf32: false,
    }
}

fn filled<R: BackendRuntime>(dev: &Device<R>, shape: &[usize]) -> GpuTensor<R, f32> {
    let values =
        DataRng::new(shape.iter().product::<usize>() as u64).normals(shape.iter().product(), 0.0, 1.0);
    GpuTensor::<R, f32>::from_f64(dev, &values, shape).unwrap()
}

#[test]
fn linear_runs_the_tables_routine() {
    on_test_backend!(table_choices);
}
