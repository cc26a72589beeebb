//! Mixed precision at the kernel level: stochastic rounding against its host twin (derived from
//! the `half` crate's neighbours) and its unbiasedness, the AdamW master and stochastic paths
//! against torch's f32 arithmetic, and what each policy does to an update below half an ulp.

use dsl::rounding::{NarrowFloat, RoundingKey, host_random_u32};
use dsl::{Backend, BackendRuntime, DType, Device, GpuTensor};
use kernels::adamw::{AdamW, Rounding, adamw_step, adamw_step_master};
use kernels::reference::adamw as adamw_ref;
use kernels::reference::rounding as reference;
use kernels::rounding::cast_stochastic;
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use tests::*;

/// Values that exercise every branch: ordinary magnitudes over the type's whole range, the
/// narrow type's subnormals and below its smallest subnormal, f32 subnormals, values already on
/// the grid, the overflow edge, zeros, infinities and NaN.
fn awkward_values(n: usize, dtype: DType, seed: u64) -> Vec<f32> {
    let mut rng = DataRng::new(seed);
    let (lo, hi) = if dtype == DType::BF16 { (-140, 120) } else { (-30, 17) };
    let specials = [
        0.0,
        -0.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        1.0,
        1.0 + 3e-4,
        -1.0 - 3e-4,
        65504.0,
        65519.0,
        65520.0,
        1e-40,
        -3e-45,
        6.0e-8,
        2.9e-8,
        3.0e-5,
    ];
    (0..n)
        .map(|i| {
            if i < specials.len() && rng.uniform() < 0.5 {
                return specials[i];
            }
            let exponent = lo + (rng.uniform() * (hi - lo) as f64) as i32;
            let sign = if rng.uniform() < 0.5 { -1.0 } else { 1.0 };
            (sign * (1.0 + rng.uniform()) * 2f64.powi(exponent)) as f32
        })
        .collect()
}

fn same_bits(a: f64, b: f64) -> bool {
    a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
}

/// The cast's every output equals the host twin's, bit for bit, given the same random bits.
fn sr_matches_reference<R: BackendRuntime, F: TestFloat>(dev: &Device<R>) {
    if refuses_unsupported::<R, F>(dev) {
        return;
    }
    let lens = prop_oneof![prop::sample::select(vec![1usize, 17, 4097]), 1usize..=50_000];
    run_property(&format!("stochastic rounding to {}", F::DTYPE), 8, (lens, any::<u64>()), |(n, seed)| {
        let x = awkward_values(n, F::DTYPE, seed);
        let key = RoundingKey::new(seed, 3, 5);
        let xt = GpuTensor::<R, f32>::from_slice(dev, &x, &[n]).map_err(fail)?;
        let mut out = nan_tensor::<R, F>(dev, &[n])?;
        cast_stochastic(dev, &mut out, &xt, key).map_err(fail)?;
        let got = download(dev, &out)?;
        let want: Vec<f64> = match NarrowFloat::of(F::DTYPE) {
            Some(_) => {
                let mut want = vec![0.0; n];
                reference::cast_stochastic(&mut want, &x, key, F::DTYPE);
                want
            }
            None => x.iter().map(|&v| v as f64).collect(),
        };
        if let Some(i) = (0..n).find(|&i| !same_bits(got[i], want[i])) {
            return Err(TestCaseError::fail(format!(
                "element {i} of {n}: x = {:e} ({:#010x}), random {:#010x}: kernel {:e}, reference {:e}",
                x[i],
                x[i].to_bits(),
                host_random_u32(i as u32, key),
                got[i],
                want[i]
            )));
        }
        Ok(())
    });
}

test_each_dtype!(sr_matches_reference => stochastic_rounding_f32_is_a_copy, stochastic_rounding_f16_matches_reference, stochastic_rounding_bf16_matches_reference_or_is_refused);

/// The neighbours `lo < x < hi` of `x` on `F`'s grid.
fn neighbours<F: TestFloat>(x: f64) -> (f64, f64) {
    let nearest = F::round_trip(x);
    let mut step = 2f64.powi(-30) * x.abs().max(1e-30);
    let other = loop {
        let candidate = F::round_trip(if nearest > x { x - step } else { x + step });
        if candidate != nearest {
            break candidate;
        }
        step *= 2.0;
    };
    (nearest.min(other), nearest.max(other))
}

/// `E[SR(x)] = x`: the mean of 200 000 roundings of one value (each with its own random bits)
/// lies within 3 standard errors of it, the error computed from the neighbours' spacing.
fn sr_is_unbiased<R: BackendRuntime, F: TestFloat>(dev: &Device<R>) {
    if refuses_unsupported::<R, F>(dev) {
        return;
    }
    let n = 200_000;
    // 1 + 3e-4: Llama 2's update at a gain of 1; then values in f16's subnormals, below its
    // smallest subnormal, and a negative one.
    for (k, x) in [1.0003f32, 3.3e-5, 1e-8, -0.1234567].into_iter().enumerate() {
        let x64 = x as f64;
        let (lo, hi) = neighbours::<F>(x64);
        let p = (x64 - lo) / (hi - lo);
        let standard_error = (p * (1.0 - p)).sqrt() * (hi - lo) / (n as f64).sqrt();
        let xt = GpuTensor::<R, f32>::full(dev, &[n], x).unwrap();
        let mut out = GpuTensor::<R, F>::zeros(dev, &[n]).unwrap();
        cast_stochastic(dev, &mut out, &xt, RoundingKey::new(11, k as u64, 0)).unwrap();
        let got = out.to_f64_vec(dev).unwrap();
        assert!(got.iter().all(|&v| v == lo || v == hi), "{x}: every result is a neighbour ({lo}, {hi})");
        let mean = got.iter().sum::<f64>() / n as f64;
        assert!(
            (mean - x64).abs() <= 3.0 * standard_error,
            "{} rounding of {x}: mean {mean:e}, off by {:.2} standard errors ({standard_error:e}); \
             neighbours {lo:e}, {hi:e}",
            F::DTYPE,
            (mean - x64).abs() / standard_error
        );
    }
}

#[test]
fn stochastic_rounding_f16_is_unbiased() {
    on_test_backend!(sr_is_unbiased, half::f16);
}

/// Runs where the device stores bf16 (CUDA); elsewhere checks the clean refusal.
#[test]
fn stochastic_rounding_bf16_is_unbiased_or_is_refused() {
    on_test_backend!(sr_is_unbiased, half::bf16);
}

/// The example: a weight at 1.0 given a constant update of +3e-4 for 100 steps (AdamW
/// with a constant gradient of −1 and no decay moves it by lr/(1 + eps) each step). With f32
/// master weights it moves by 0.03 (±1%); by stochastic rounding, in expectation (the mean over
/// 20 000 weights within 3 standard errors of the master's path); rounded to nearest it does not
/// move at all — the bug this guards against (half an ulp at 1.0 is 4.9e-4 in f16, 3.9e-3 in
/// bf16).
fn sub_ulp_updates<R: BackendRuntime, F: TestFloat>(dev: &Device<R>) {
    if refuses_unsupported::<R, F>(dev) {
        return;
    }
    let n = 20_000;
    let hp = AdamW { lr: 3e-4, weight_decay: 0.0, ..AdamW::default() };
    let grad = GpuTensor::<R, f32>::full(dev, &[n], -1.0).unwrap();
    let one = GpuTensor::<R, f32>::full(dev, &[1], 1.0).unwrap();
    let start = || GpuTensor::<R, F>::full(dev, &[n], F::from_f64_rounded(1.0)).unwrap();
    let moments =
        || (GpuTensor::<R, f32>::zeros(dev, &[n]).unwrap(), GpuTensor::<R, f32>::zeros(dev, &[n]).unwrap());
    let steps = 100;

    let (mut param, mut master) = (start(), GpuTensor::<R, f32>::full(dev, &[n], 1.0).unwrap());
    let (mut m, mut v) = moments();
    for step in 1..=steps {
        adamw_step_master(dev, &mut master, &mut param, &mut m, &mut v, &grad, &one, &hp, step).unwrap();
    }
    let master_final = master.to_f64_vec(dev).unwrap();
    let moved = master_final[0] - 1.0;
    assert!((moved - 0.03).abs() <= 0.03 * 0.01, "{}: the master moved by {moved}, not 0.03 ± 1%", F::DTYPE);
    assert!(master_final.iter().all(|&p| p == master_final[0]));
    let copy = param.to_f64_vec(dev).unwrap();
    assert!(
        copy.iter().all(|&p| p == F::round_trip(master_final[0])),
        "the compute copy is the rounded master"
    );

    let mut param = start();
    let (mut m, mut v) = moments();
    for step in 1..=steps {
        adamw_step(dev, &mut param, &mut m, &mut v, &grad, &one, &hp, step, Rounding::Nearest).unwrap();
    }
    let nearest = param.to_f64_vec(dev).unwrap();
    assert!(
        nearest.iter().all(|&p| p == 1.0),
        "{}: rounded to nearest, a sub-half-ulp update is lost",
        F::DTYPE
    );

    let mut param = start();
    let (mut m, mut v) = moments();
    for step in 1..=steps {
        let rounding = Rounding::Stochastic(RoundingKey::new(7, step, 0));
        adamw_step(dev, &mut param, &mut m, &mut v, &grad, &one, &hp, step, rounding).unwrap();
    }
    let stochastic = param.to_f64_vec(dev).unwrap();
    let mean = stochastic.iter().sum::<f64>() / n as f64;
    let variance = stochastic.iter().map(|p| (p - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
    let standard_error = (variance / n as f64).sqrt();
    assert!(standard_error > 0.0, "stochastic rounding spreads the weights");
    assert!(
        (mean - master_final[0]).abs() <= 3.0 * standard_error,
        "{}: stochastic rounding's mean {mean} vs the master's {} ({:.2} standard errors of {standard_error:e})",
        F::DTYPE,
        master_final[0],
        (mean - master_final[0]).abs() / standard_error
    );
}

#[test]
fn sub_ulp_updates_survive_master_weights_and_stochastic_rounding_f16() {
    on_test_backend!(sub_ulp_updates, half::f16);
}

/// Runs where the device stores bf16 (CUDA); elsewhere checks the clean refusal.
#[test]
fn sub_ulp_updates_survive_master_weights_and_stochastic_rounding_bf16_or_is_refused() {
    on_test_backend!(sub_ulp_updates, half::bf16);
}

#[derive(Clone, Debug)]
struct Case {
    len: usize,
    hp: AdamW,
    seed: u64,
}

fn cases() -> impl Strategy<Value = Case> {
    let len = prop_oneof![prop::sample::select(vec![1usize, 3, 17, 4097]), 1usize..=30_000];
    let lr = prop::sample::select(vec![3e-4, 2e-5, 1e-2]);
    let wd = prop::sample::select(vec![0.0, 0.1]);
    (len, lr, wd, any::<u64>()).prop_map(|(len, lr, weight_decay, seed)| Case {
        len,
        hp: AdamW { lr, weight_decay, ..AdamW::default() },
        seed,
    })
}

/// The master path is the f32 path on the master (torch's f32 arithmetic, to 20 f32 ulps over
/// 20 steps as in `adamw.rs`), and the compute copy is always the master rounded to nearest.
/// The stochastic path, one step from weights on `F`'s grid, gives the host twin's rounding of
/// torch's f32 update (bit for bit on lavapipe; on CUDA, where FMA contraction may move the f32
/// update by an ulp, one of its two grid neighbours).
fn master_and_stochastic_paths<R: BackendRuntime, F: TestFloat>(dev: &Device<R>) {
    if refuses_unsupported::<R, F>(dev) {
        return;
    }
    run_property(&format!("adamw master and stochastic paths, {}", F::DTYPE), 8, cases(), |case| {
        let n = case.len;
        let mut rng = DataRng::new(case.seed);
        let p0: Vec<f32> = rng.normals(n, 0.0, 1.0).iter().map(|&x| x as f32).collect();
        let one = GpuTensor::<R, f32>::full(dev, &[1], 1.0).map_err(fail)?;
        let (mut p_ref, mut m_ref, mut v_ref) = (p0.clone(), vec![0.0f32; n], vec![0.0f32; n]);
        let mut master = GpuTensor::<R, f32>::from_slice(dev, &p0, &[n]).map_err(fail)?;
        let mut param = nan_tensor::<R, F>(dev, &[n])?;
        let mut m = GpuTensor::<R, f32>::zeros(dev, &[n]).map_err(fail)?;
        let mut v = GpuTensor::<R, f32>::zeros(dev, &[n]).map_err(fail)?;
        for step in 1..=20 {
            let g: Vec<f32> = rng.normals(n, 0.0, 1.0).iter().map(|&x| x as f32).collect();
            let grad = GpuTensor::<R, f32>::from_slice(dev, &g, &[n]).map_err(fail)?;
            adamw_step_master(dev, &mut master, &mut param, &mut m, &mut v, &grad, &one, &case.hp, step)
                .map_err(fail)?;
            adamw_ref::adamw_step_f32(&mut p_ref, &mut m_ref, &mut v_ref, &g, 1.0, &case.hp, step);
        }
        let got = download(dev, &master)?;
        let want: Vec<f64> = p_ref.iter().map(|&x| x as f64).collect();
        let tol = Tolerance { atol: 0.0, rtol: 20.0 * f32::EPSILON as f64 };
        check_close(&format!("master after 20 steps [{case:?}]"), &got, &want, &[n], tol)
            .map_err(TestCaseError::fail)?;
        let copy = download(dev, &param)?;
        if let Some(i) = (0..n).find(|&i| copy[i] != F::round_trip(got[i])) {
            return Err(TestCaseError::fail(format!(
                "compute copy [{i}] = {} is not the master {} rounded to {}",
                copy[i],
                got[i],
                F::DTYPE
            )));
        }

        // One stochastic step from weights on the grid.
        let start: Vec<f32> = p0.iter().map(|&x| F::round_trip(x as f64) as f32).collect();
        let g: Vec<f32> = rng.normals(n, 0.0, 1.0).iter().map(|&x| x as f32).collect();
        let mut param = upload::<R, F>(dev, &start.iter().map(|&x| x as f64).collect::<Vec<_>>(), &[n])?;
        let mut m = GpuTensor::<R, f32>::zeros(dev, &[n]).map_err(fail)?;
        let mut v = GpuTensor::<R, f32>::zeros(dev, &[n]).map_err(fail)?;
        let grad = GpuTensor::<R, f32>::from_slice(dev, &g, &[n]).map_err(fail)?;
        let key = RoundingKey::new(case.seed, 1, 2);
        adamw_step(dev, &mut param, &mut m, &mut v, &grad, &one, &case.hp, 1, Rounding::Stochastic(key))
            .map_err(fail)?;
        let got = download(dev, &param)?;
        let mut updated = start.clone();
        let (mut m_ref, mut v_ref) = (vec![0.0f32; n], vec![0.0f32; n]);
        adamw_ref::adamw_step_f32(&mut updated, &mut m_ref, &mut v_ref, &g, 1.0, &case.hp, 1);
        for i in 0..n {
            let want = match NarrowFloat::of(F::DTYPE) {
                Some(_) => reference::round_stochastic(updated[i], host_random_u32(i as u32, key), F::DTYPE),
                None => updated[i] as f64,
            };
            let ok = same_bits(got[i], want)
                || (dev.backend() == Backend::Cuda && {
                    let (lo, hi) = neighbours::<F>(updated[i] as f64);
                    got[i] == lo || got[i] == hi
                });
            if !ok {
                return Err(TestCaseError::fail(format!(
                    "stochastic step [{i}] of {n}: {} → f32 update {:e}: kernel {:e}, reference {want:e}",
                    start[i], updated[i], got[i]
                )));
            }
        }
        Ok(())
    });
}

test_each_dtype!(master_and_stochastic_paths => adamw_master_path_f32, adamw_master_and_stochastic_paths_f16, adamw_master_and_stochastic_paths_bf16_or_is_refused);
