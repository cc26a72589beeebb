//! Global gradient norm and clip scale against f64, determinism, and clipping end to end.

use dsl::{BackendRuntime, DType, Device, GpuTensor};
use kernels::adamw::{AdamW, Rounding, adamw_step};
use kernels::grad_norm::{
    grad_norm, grad_norm_from_sum_squares, grad_norm_scratch_len, grad_norm_unscaled, grad_sum_squares,
};
use kernels::reference::{adamw as reference_adamw, grad_norm as reference};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use tests::*;

fn sizes() -> impl Strategy<Value = (Vec<usize>, f64, u64)> {
    let size =
        prop_oneof![prop::sample::select(vec![0usize, 1, 3, 17, 4095, 4097, 300_001]), 1usize..=50_000];
    (prop::collection::vec(size, 1..=6), prop::sample::select(vec![1.0, 1e-3, 1e6]), any::<u64>())
}

fn norms<R: BackendRuntime, F: TestFloat>(
    dev: &Device<R>,
    grads: &[GpuTensor<R, F>],
    max_norm: f32,
) -> Result<(f32, f32), TestCaseError> {
    let numels: Vec<usize> = grads.iter().map(|g| g.numel()).collect();
    let mut scratch =
        GpuTensor::<R, f32>::full(dev, &[grad_norm_scratch_len(&numels)], f32::NAN).map_err(fail)?;
    let (mut norm, mut scale) = (nan_tensor::<R, f32>(dev, &[1])?, nan_tensor::<R, f32>(dev, &[1])?);
    let refs: Vec<&GpuTensor<R, F>> = grads.iter().collect();
    grad_norm(dev, &mut norm, &mut scale, &mut scratch, &refs, max_norm).map_err(fail)?;
    Ok((norm.to_vec(dev).map_err(fail)?[0], scale.to_vec(dev).map_err(fail)?[0]))
}

fn check<R: BackendRuntime, F: TestFloat>(
    dev: &Device<R>,
    sizes: &[usize],
    max_norm: f64,
    seed: u64,
) -> Result<(), TestCaseError> {
    let mut rng = DataRng::new(seed);
    let values: Vec<Vec<f64>> = sizes.iter().map(|&n| F::round_all(&rng.normals(n, 0.0, 0.01))).collect();
    let grads: Vec<GpuTensor<R, F>> =
        values.iter().zip(sizes).map(|(v, &n)| upload::<R, F>(dev, v, &[n])).collect::<Result<_, _>>()?;
    let (norm, scale) = norms(dev, &grads, max_norm as f32)?;
    let refs: Vec<&[f64]> = values.iter().map(Vec::as_slice).collect();
    let (want_norm, want_scale) = reference::grad_norm(&refs, max_norm);
    // A sum of squares does not cancel: |expected| is the right scale. Outputs are f32.
    let tol = Tolerance::for_dtype(DType::F32);
    let what = format!("{} {sizes:?} max_norm {max_norm}", F::DTYPE);
    check_close(&format!("norm {what}"), &[norm as f64], &[want_norm], &[1], tol)
        .map_err(TestCaseError::fail)?;
    check_close(&format!("clip scale {what}"), &[scale as f64], &[want_scale], &[1], tol)
        .map_err(TestCaseError::fail)?;
    Ok(())
}

fn matches_reference<R: BackendRuntime, F: TestFloat>(dev: &Device<R>) {
    if refuses_unsupported::<R, F>(dev) {
        return;
    }
    run_property(&format!("grad norm {}", F::DTYPE), 24, sizes(), |(sizes, max_norm, seed)| {
        check::<R, F>(dev, &sizes, max_norm, seed)
    });
}

test_each_dtype!(matches_reference => grad_norm_f32_matches_reference, grad_norm_f16_matches_reference, grad_norm_bf16_matches_reference_or_is_refused);

fn deterministic<R: BackendRuntime>(dev: &Device<R>) {
    let mut rng = DataRng::new(8);
    let grads: Vec<GpuTensor<R, f32>> = [1_000_000usize, 4096, 11008, 1]
        .iter()
        .map(|&n| GpuTensor::from_f64(dev, &rng.normals(n, 0.0, 1.0), &[n]).unwrap())
        .collect();
    let first = norms(dev, &grads, 1.0).unwrap();
    for _ in 0..3 {
        let again = norms(dev, &grads, 1.0).unwrap();
        assert_eq!((again.0.to_bits(), again.1.to_bits()), (first.0.to_bits(), first.1.to_bits()));
    }
}

#[test]
fn grad_norm_is_bitwise_deterministic() {
    on_test_backend!(deterministic);
}

/// Under loss scaling: gradients scaled by S = 2^k (exact in f32) with `unscale = 1/S` give the
/// unscaled norm and `1/S` times the unscaled clip scale, both bit for bit; `unscale = 1` is
/// `grad_norm` itself; an inf or NaN in any gradient makes the norm non-finite.
fn unscaled_norm<R: BackendRuntime>(dev: &Device<R>) {
    let mut rng = DataRng::new(21);
    let sizes = [4097usize, 17, 300_001];
    let values: Vec<Vec<f64>> = sizes.iter().map(|&n| f32::round_all(&rng.normals(n, 0.0, 0.3))).collect();
    let upload_scaled = |scale: f64| -> Vec<GpuTensor<R, f32>> {
        values
            .iter()
            .zip(&sizes)
            .map(|(v, &n)| {
                GpuTensor::from_f64(dev, &v.iter().map(|x| x * scale).collect::<Vec<_>>(), &[n]).unwrap()
            })
            .collect()
    };
    let run = |grads: &[GpuTensor<R, f32>], unscale: f32| -> (f32, f32) {
        let numels: Vec<usize> = grads.iter().map(|g| g.numel()).collect();
        let mut scratch = GpuTensor::<R, f32>::zeros(dev, &[grad_norm_scratch_len(&numels)]).unwrap();
        let (mut norm, mut scale) =
            (GpuTensor::zeros(dev, &[1]).unwrap(), GpuTensor::zeros(dev, &[1]).unwrap());
        let refs: Vec<&GpuTensor<R, f32>> = grads.iter().collect();
        grad_norm_unscaled(dev, &mut norm, &mut scale, &mut scratch, &refs, 1.0, unscale).unwrap();
        (norm.to_vec(dev).unwrap()[0], scale.to_vec(dev).unwrap()[0])
    };
    let plain = upload_scaled(1.0);
    let (norm, clip) = run(&plain, 1.0);
    assert_eq!((norm, clip), norms(dev, &plain, 1.0).unwrap(), "unscale 1 is grad_norm");
    let s = 65536.0;
    let (scaled_norm, scaled_clip) = run(&upload_scaled(s), (1.0 / s) as f32);
    assert_eq!(scaled_norm.to_bits(), norm.to_bits(), "the norm of S·g unscaled is the norm of g");
    assert_eq!(scaled_clip.to_bits(), (clip / s as f32).to_bits(), "the clip scale carries 1/S");
    let mut overflowed = upload_scaled(1.0);
    overflowed[1] = GpuTensor::from_slice(
        dev,
        &[0.5, f32::INFINITY].repeat(8).into_iter().chain([1.0]).collect::<Vec<_>>(),
        &[17],
    )
    .unwrap();
    assert!(!run(&overflowed, 1.0 / 1024.0).0.is_finite(), "an inf gradient makes the norm non-finite");
}

#[test]
fn grad_norm_unscales_loss_scaled_gradients() {
    on_test_backend!(unscaled_norm);
}

/// The sharded norm of data-parallel training: one share of Σg² per rank over the tensors it
/// owns, summed across ranks (here on the host, in rank order, as the in-process group does),
/// then the root. With one share holding every tensor it is `grad_norm_unscaled` bit for bit;
/// split across 2 or 3 ranks it matches the f64 reference to f32 round-off (the sum is grouped
/// differently), including a rank that owns nothing.
fn sharded_norm<R: BackendRuntime>(dev: &Device<R>) {
    let mut rng = DataRng::new(5);
    let sizes = [4097usize, 17, 300_001, 1, 11008];
    let values: Vec<Vec<f64>> = sizes.iter().map(|&n| f32::round_all(&rng.normals(n, 0.0, 0.3))).collect();
    let grads: Vec<GpuTensor<R, f32>> =
        values.iter().zip(&sizes).map(|(v, &n)| GpuTensor::from_f64(dev, v, &[n]).unwrap()).collect();
    let mut scratch = GpuTensor::<R, f32>::zeros(dev, &[grad_norm_scratch_len(&sizes)]).unwrap();
    let share = |scratch: &mut GpuTensor<R, f32>, owned: &[usize]| -> f32 {
        let mut sum = GpuTensor::<R, f32>::full(dev, &[1], f32::NAN).unwrap();
        let refs: Vec<&GpuTensor<R, f32>> = owned.iter().map(|&i| &grads[i]).collect();
        grad_sum_squares(dev, &mut sum, scratch, &refs).unwrap();
        sum.to_vec(dev).unwrap()[0]
    };
    let finish = |sum_squares: f32, unscale: f32| -> (f32, f32) {
        let sum = GpuTensor::<R, f32>::from_slice(dev, &[sum_squares], &[1]).unwrap();
        let (mut norm, mut scale) =
            (GpuTensor::zeros(dev, &[1]).unwrap(), GpuTensor::zeros(dev, &[1]).unwrap());
        grad_norm_from_sum_squares(dev, &mut norm, &mut scale, &sum, 1.0, unscale).unwrap();
        (norm.to_vec(dev).unwrap()[0], scale.to_vec(dev).unwrap()[0])
    };
    let everything: Vec<usize> = (0..sizes.len()).collect();
    for unscale in [1.0f32, 1.0 / 1024.0] {
        let (mut norm, mut scale) =
            (GpuTensor::zeros(dev, &[1]).unwrap(), GpuTensor::zeros(dev, &[1]).unwrap());
        let refs: Vec<&GpuTensor<R, f32>> = grads.iter().collect();
        grad_norm_unscaled(dev, &mut norm, &mut scale, &mut scratch, &refs, 1.0, unscale).unwrap();
        let whole = (norm.to_vec(dev).unwrap()[0], scale.to_vec(dev).unwrap()[0]);
        let one_rank = finish(0.0 + share(&mut scratch, &everything), unscale);
        assert_eq!((one_rank.0.to_bits(), one_rank.1.to_bits()), (whole.0.to_bits(), whole.1.to_bits()));
    }
    let refs: Vec<&[f64]> = values.iter().map(Vec::as_slice).collect();
    let (want_norm, want_scale) = reference::grad_norm(&refs, 1.0);
    let tol = Tolerance::for_dtype(DType::F32);
    for shares in [
        vec![vec![2], vec![0, 1, 3, 4]],
        vec![vec![2], vec![4, 1], vec![0, 3]],
        vec![vec![], everything.clone()],
    ] {
        let sum = shares.iter().fold(0.0f32, |acc, owned| acc + share(&mut scratch, owned));
        let (norm, scale) = finish(sum, 1.0);
        check_close(&format!("sharded norm {shares:?}"), &[norm as f64], &[want_norm], &[1], tol).unwrap();
        check_close(&format!("sharded clip {shares:?}"), &[scale as f64], &[want_scale], &[1], tol).unwrap();
    }
}

#[test]
fn sharded_grad_norm_equals_the_whole() {
    on_test_backend!(sharded_norm);
}

/// Clipping end to end: the clip scale computed on the device feeds AdamW on the device, and
/// the result matches clip-then-step in f64.
fn clip_then_step<R: BackendRuntime>(dev: &Device<R>) {
    let n = 3000;
    let mut rng = DataRng::new(12);
    let g = f32::round_all(&rng.normals(n, 0.0, 1.0)); // norm ≈ 55: clipped to 1
    let p0 = f32::round_all(&rng.normals(n, 0.0, 1.0));
    let grad = GpuTensor::<R, f32>::from_f64(dev, &g, &[n]).unwrap();
    let mut scratch = GpuTensor::<R, f32>::zeros(dev, &[grad_norm_scratch_len(&[n])]).unwrap();
    let (mut norm, mut scale) = (GpuTensor::zeros(dev, &[1]).unwrap(), GpuTensor::zeros(dev, &[1]).unwrap());
    grad_norm(dev, &mut norm, &mut scale, &mut scratch, &[&grad], 1.0).unwrap();
    let mut param = GpuTensor::<R, f32>::from_f64(dev, &p0, &[n]).unwrap();
    let (mut m, mut v) = (GpuTensor::zeros(dev, &[n]).unwrap(), GpuTensor::zeros(dev, &[n]).unwrap());
    let hp = AdamW::default();
    adamw_step(dev, &mut param, &mut m, &mut v, &grad, &scale, &hp, 1, Rounding::Nearest).unwrap();

    let (_, want_scale) = reference::grad_norm(&[&g], 1.0);
    assert!(want_scale < 0.05, "the test gradient should be clipped hard (scale {want_scale})");
    let (mut p, mut mr, mut vr) = (p0.clone(), vec![0.0; n], vec![0.0; n]);
    reference_adamw::adamw_step(&mut p, &mut mr, &mut vr, &g, want_scale, &hp, 1);
    let got_m = m.to_f64_vec(dev).unwrap();
    let want_m: Vec<f64> = mr.clone();
    assert_close("m after a clipped step", &got_m, &want_m, &[n], Tolerance::for_dtype(DType::F32));
    assert_close(
        "param after a clipped step",
        &param.to_f64_vec(dev).unwrap(),
        &p,
        &[n],
        Tolerance::for_dtype(DType::F32),
    );
}

#[test]
fn clip_scale_feeds_adamw_on_the_device() {
    on_test_backend!(clip_then_step);
}

fn bad_input<R: BackendRuntime>(dev: &Device<R>) {
    let g = GpuTensor::<R, f32>::zeros(dev, &[100_000]).unwrap();
    let mut small = GpuTensor::<R, f32>::zeros(dev, &[1]).unwrap();
    let (mut norm, mut scale) = (GpuTensor::zeros(dev, &[1]).unwrap(), GpuTensor::zeros(dev, &[1]).unwrap());
    let err = grad_norm(dev, &mut norm, &mut scale, &mut small, &[&g], 1.0).unwrap_err();
    assert!(err.to_string().contains("grad_norm: tensor `scratch` has shape [1], expected [7]"), "{err}");
    let mut scratch = GpuTensor::<R, f32>::zeros(dev, &[7]).unwrap();
    assert!(
        grad_norm(dev, &mut norm, &mut scale, &mut scratch, &[&g], 0.0).is_err(),
        "max_norm 0 must be refused"
    );
}

#[test]
fn grad_norm_rejects_bad_input() {
    on_test_backend!(bad_input);
}
