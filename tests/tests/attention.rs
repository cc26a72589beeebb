//! Flash attention against the materialised f64 reference: forward, backward, decoding.

use cubecl::cmma::{MatrixIdent, MmaDefinition};
use cubecl::prelude::*;
use dsl::{BackendRuntime, DType, Device, Error, FloatElement, GpuTensor};
use kernels::attention::flash::{
    self,
    mma::{Pair, a_position, b_position, c_position, emulation_scratch, mma},
};
use kernels::attention::naive::{NaiveScratch, naive_attention_backward, naive_attention_forward};
use kernels::attention::{
    AttentionKernel, AttentionShape, SUPPORTED_HEAD_DIMS, attention_backward_with, attention_decode,
    attention_forward, attention_forward_with,
};
use kernels::reference::attention as reference;
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use tests::*;

#[derive(Clone, Debug)]
struct Case {
    batch: usize,
    seq: usize,
    kv_heads: usize,
    group: usize,
    head_dim: usize,
    causal: bool,
    seed: u64,
}

impl Case {
    fn shape(&self) -> AttentionShape {
        AttentionShape {
            batch: self.batch,
            q_len: self.seq,
            kv_len: self.seq,
            kv_capacity: self.seq,
            q_heads: self.kv_heads * self.group,
            kv_heads: self.kv_heads,
            head_dim: self.head_dim,
            position_offset: 0,
        }
    }
}

/// Work per case (B·Hq·T²·hd) is capped so the f64 reference and lavapipe stay quick: long
/// sequences come with few heads.
const MAX_WORK: usize = 24_000_000;

fn cases() -> impl Strategy<Value = Case> {
    let seq = prop_oneof![
        1 => prop::sample::select(vec![1usize, 2, 17, 63, 64, 65, 127, 300]),
        1 => 1usize..=300,
    ];
    let head_dim = prop::sample::select(vec![32usize, 64, 80, 96, 128, 16, 48, 112]);
    (1usize..=3, seq, 1usize..=4, 1usize..=8, head_dim, any::<bool>(), any::<u64>()).prop_map(
        |(batch, seq, kv_heads, group, head_dim, causal, seed)| {
            let per_token2 = batch * kv_heads * group * head_dim;
            let seq = seq.min(((MAX_WORK / per_token2) as f64).sqrt() as usize).max(1);
            Case { batch, seq, kv_heads, group, head_dim, causal, seed }
        },
    )
}

struct Expected {
    out: Vec<f64>,
    lse: Vec<f64>,
    dq: Vec<f64>,
    dk: Vec<f64>,
    dv: Vec<f64>,
}

fn reference_run(
    q: &[f64],
    k: &[f64],
    v: &[f64],
    dout: &[f64],
    s: &AttentionShape,
    causal: bool,
    round: &dyn Fn(f64) -> f64,
    accumulate: &dyn Fn(f64) -> f64,
) -> Expected {
    let mut e = Expected {
        out: vec![0.0; q.len()],
        lse: vec![0.0; s.batch * s.q_heads * s.q_len],
        dq: vec![0.0; q.len()],
        dk: vec![0.0; k.len()],
        dv: vec![0.0; k.len()],
    };
    reference::attention_forward_rounded(&mut e.out, &mut e.lse, q, k, v, s, causal, round, accumulate);
    reference::attention_backward_rounded(
        &mut e.dq, &mut e.dk, &mut e.dv, dout, q, k, v, s, causal, round, accumulate,
    );
    e
}

fn check<R: BackendRuntime, F: TestFloat>(dev: &Device<R>, case: &Case) -> Result<(), TestCaseError> {
    let s = case.shape();
    let q_shape = [s.batch, s.q_len, s.q_heads, s.head_dim];
    let kv_shape = [s.batch, s.kv_len, s.kv_heads, s.head_dim];
    let stats = [s.batch, s.q_heads, s.q_len];
    let mut rng = DataRng::new(case.seed);
    let q = F::round_all(&rng.normals(q_shape.iter().product(), 0.0, 1.0));
    let k = F::round_all(&rng.normals(kv_shape.iter().product(), 0.0, 1.0));
    let v = F::round_all(&rng.normals(kv_shape.iter().product(), 0.0, 1.0));
    let dout = F::round_all(&rng.normals(q.len(), 0.0, 1.0));
    let want = reference_run(&q, &k, &v, &dout, &s, case.causal, &|x| x, &|x| x);

    let qt = upload::<R, F>(dev, &q, &q_shape)?;
    let kt = upload::<R, F>(dev, &k, &kv_shape)?;
    let vt = upload::<R, F>(dev, &v, &kv_shape)?;
    let dyt = upload::<R, F>(dev, &dout, &q_shape)?;
    let naive = (F::DTYPE != DType::F32).then(|| {
        let round = |x: f64| F::round_trip(x);
        let f32_sum = |x: f64| x as f32 as f64;
        reference_run(&q, &k, &v, &dout, &s, case.causal, &round, &f32_sum)
    });
    let what = |t: &str, kernel: &str| format!("{t} [{} {kernel} {case:?}]", F::DTYPE);
    // dq and dk sum terms scale·P·(dP − delta)·(K or Q) whose dP − delta cancels, exactly where
    // a row sees one key (P = 1, O = V: dP = delta); their rounding is relative to the size of
    // dP and delta, which is the size of dv = Pᵀ·dO, not of the (possibly all-zero) result. The
    // flash kernels sum dP on the tensor-core path and delta in the pre-pass, in different
    // orders (seen: 1.2e-6 where the result is 0, hd 96, T 1).
    let backward_size = want.dv.iter().fold(0.0f64, |m, x| m.max(x.abs()));
    let compare = |what: &str, got: &[f64], want: &[f64], naive: Option<&Vec<f64>>, shape: &[usize]| {
        match naive {
            // Normwise: each element mixes up to T terms of similar size (worst seen ≈ 0.3 of this).
            None => check_close_scaled(
                what,
                got,
                want,
                &normwise(want),
                shape,
                Tolerance { atol: 1e-6, rtol: 5e-6 },
            ),
            Some(naive) => check_against_naive(what, got, naive, want, shape, 2.0),
        }
        .map_err(TestCaseError::fail)
    };

    // Every set of kernels the device has (portable and flash everywhere; tensor cores on CUDA
    // f16/bf16) that takes this head_dim (`flash_refuses_what_does_not_fit` covers the rest).
    let kernels = AttentionKernel::available::<R, F>(dev);
    for kernel in kernels.into_iter().filter(|k| k.takes::<R, F>(dev, s.head_dim)) {
        let mut out = nan_tensor::<R, F>(dev, &q_shape)?;
        let mut lse = nan_tensor::<R, f32>(dev, &stats)?;
        attention_forward_with(dev, kernel, &mut out, &mut lse, &qt, &kt, &vt, case.causal).map_err(fail)?;
        compare(
            &what("out", kernel.name()),
            &download(dev, &out)?,
            &want.out,
            naive.as_ref().map(|n| &n.out),
            &q_shape,
        )?;
        // lse is f32 whatever F is: a log-sum-exp of up to 300 terms, relative to its size.
        check_close_scaled(
            &what("lse", kernel.name()),
            &download(dev, &lse)?,
            &want.lse,
            &normwise(&want.lse),
            &stats,
            Tolerance::for_dtype(DType::F32),
        )
        .map_err(TestCaseError::fail)?;

        let (mut dq, mut dk, mut dv) = (
            nan_tensor::<R, F>(dev, &q_shape)?,
            nan_tensor::<R, F>(dev, &kv_shape)?,
            nan_tensor::<R, F>(dev, &kv_shape)?,
        );
        let mut delta = nan_tensor::<R, f32>(dev, &stats)?;
        attention_backward_with(
            dev,
            kernel,
            &mut dq,
            &mut dk,
            &mut dv,
            &mut delta,
            &dyt,
            &qt,
            &kt,
            &vt,
            &out,
            &lse,
            case.causal,
        )
        .map_err(fail)?;
        for (name, got, want, naive, shape) in [
            ("dq", &dq, &want.dq, naive.as_ref().map(|n| &n.dq), &q_shape[..]),
            ("dk", &dk, &want.dk, naive.as_ref().map(|n| &n.dk), &kv_shape[..]),
            ("dv", &dv, &want.dv, naive.as_ref().map(|n| &n.dv), &kv_shape[..]),
        ] {
            let got = download(dev, got)?;
            match naive {
                None if name != "dv" => check_close_scaled(
                    &what(name, kernel.name()),
                    &got,
                    want,
                    &vec![normwise(want)[0].max(backward_size); want.len()],
                    shape,
                    Tolerance { atol: 1e-6, rtol: 5e-6 },
                )
                .map_err(TestCaseError::fail)?,
                _ => compare(&what(name, kernel.name()), &got, want, naive, shape)?,
            }
        }
    }
    Ok(())
}

fn matches_reference<R: BackendRuntime, F: TestFloat>(dev: &Device<R>) {
    if refuses_unsupported::<R, F>(dev) {
        return;
    }
    let cases_per_dtype = if F::DTYPE == DType::F32 { 24 } else { 12 };
    run_property(&format!("attention {}", F::DTYPE), cases_per_dtype, cases(), |case| {
        check::<R, F>(dev, &case)
    });
}

test_each_dtype!(matches_reference => attention_f32_matches_reference, attention_f16_matches_reference, attention_bf16_matches_reference_or_is_refused);

/// Every compiled head_dim, causal and not, GQA 4:1, a length that is not a multiple of any
/// tile; in f32 and in f16 (on CUDA the tensor-core kernels too, which the random cases may
/// not draw at every head_dim).
fn every_head_dim<R: BackendRuntime>(dev: &Device<R>) {
    for head_dim in SUPPORTED_HEAD_DIMS {
        for causal in [false, true] {
            let case =
                Case { batch: 1, seq: 37, kv_heads: 2, group: 4, head_dim, causal, seed: head_dim as u64 };
            check::<R, f32>(dev, &case).unwrap_or_else(|e| panic!("{e}"));
            if dev.supports::<half::f16>() {
                check::<R, half::f16>(dev, &case).unwrap_or_else(|e| panic!("{e}"));
            }
        }
    }
}

#[test]
fn attention_every_supported_head_dim() {
    on_test_backend!(every_head_dim);
}

/// Decoding the last positions against a KV cache (larger than what is filled) gives the full
/// forward's rows for those positions.
/// In f32 and f16 (the tensor-core kernel on CUDA), decoding the last positions against a
/// cache reproduces the full forward's rows.
fn decode_matches_full<R: BackendRuntime>(dev: &Device<R>) {
    decode_matches_full_in::<R, f32>(dev, Tolerance { atol: 1e-6, rtol: 1e-5 });
    if dev.supports::<half::f16>() {
        // Both round the output to f16 once; the rest is the same f32 arithmetic.
        decode_matches_full_in::<R, half::f16>(dev, Tolerance { atol: 2e-3, rtol: 2e-3 });
    }
}

fn decode_matches_full_in<R: BackendRuntime, F: TestFloat>(dev: &Device<R>, tol: Tolerance) {
    let (batch, seq, kv_heads, group, hd, capacity) = (2, 45, 2, 3, 64, 64);
    let q_heads = kv_heads * group;
    let mut rng = DataRng::new(21);
    let q = rng.normals(batch * seq * q_heads * hd, 0.0, 1.0);
    let k = rng.normals(batch * seq * kv_heads * hd, 0.0, 1.0);
    let v = rng.normals(batch * seq * kv_heads * hd, 0.0, 1.0);
    let up = |x: &[f64], shape: &[usize]| GpuTensor::<R, F>::from_f64(dev, x, shape).unwrap();
    let (qt, kt, vt) = (
        up(&q, &[batch, seq, q_heads, hd]),
        up(&k, &[batch, seq, kv_heads, hd]),
        up(&v, &[batch, seq, kv_heads, hd]),
    );
    let mut full = GpuTensor::<R, F>::uninit(dev, &[batch, seq, q_heads, hd]).unwrap();
    let mut lse = GpuTensor::<R, f32>::uninit(dev, &[batch, q_heads, seq]).unwrap();
    attention_forward(dev, &mut full, &mut lse, &qt, &kt, &vt, true).unwrap();
    let full = full.to_f64_vec(dev).unwrap();

    // The cache holds `capacity` positions per sequence, the first `seq` filled.
    let mut cache_k = vec![0.0; batch * capacity * kv_heads * hd];
    let mut cache_v = cache_k.clone();
    let row = kv_heads * hd;
    for b in 0..batch {
        for t in 0..seq {
            let (src, dst) = ((b * seq + t) * row, (b * capacity + t) * row);
            cache_k[dst..dst + row].copy_from_slice(&k[src..src + row]);
            cache_v[dst..dst + row].copy_from_slice(&v[src..src + row]);
        }
    }
    let kc = up(&cache_k, &[batch, capacity, kv_heads, hd]);
    let vc = up(&cache_v, &[batch, capacity, kv_heads, hd]);
    for new in [1usize, 3] {
        let offset = seq - new;
        let q_row = q_heads * hd;
        let mut q_new = Vec::new();
        for b in 0..batch {
            q_new.extend_from_slice(&q[(b * seq + offset) * q_row..(b * seq + seq) * q_row]);
        }
        let qn = up(&q_new, &[batch, new, q_heads, hd]);
        let mut out = GpuTensor::<R, F>::uninit(dev, &[batch, new, q_heads, hd]).unwrap();
        let mut lse_new = GpuTensor::<R, f32>::uninit(dev, &[batch, q_heads, new]).unwrap();
        attention_decode(dev, &mut out, &mut lse_new, &qn, &kc, &vc, seq, offset).unwrap();
        let got = out.to_f64_vec(dev).unwrap();
        let mut want = Vec::new();
        for b in 0..batch {
            want.extend_from_slice(&full[(b * seq + offset) * q_row..(b * seq + seq) * q_row]);
        }
        assert_close(
            &format!("{} decode of the last {new} positions", F::DTYPE),
            &got,
            &want,
            &[batch, new, q_heads, hd],
            tol,
        );
    }
}

#[test]
fn decode_matches_the_full_forward_on_the_last_positions() {
    on_test_backend!(decode_matches_full);
}

/// Every kernel set, in f32 and f16: two more runs give the same bits.
fn deterministic<R: BackendRuntime>(dev: &Device<R>) {
    deterministic_in::<R, f32>(dev);
    if dev.supports::<half::f16>() {
        deterministic_in::<R, half::f16>(dev);
    }
}

fn deterministic_in<R: BackendRuntime, F: TestFloat>(dev: &Device<R>) {
    let case = Case { batch: 2, seq: 97, kv_heads: 2, group: 4, head_dim: 64, causal: true, seed: 5 };
    let s = case.shape();
    let q_shape = [s.batch, s.q_len, s.q_heads, s.head_dim];
    let kv_shape = [s.batch, s.kv_len, s.kv_heads, s.head_dim];
    let mut rng = DataRng::new(case.seed);
    let mk = |rng: &mut DataRng, shape: &[usize]| {
        GpuTensor::<R, F>::from_f64(dev, &rng.normals(shape.iter().product(), 0.0, 1.0), shape).unwrap()
    };
    let (q, k, v, dy) =
        (mk(&mut rng, &q_shape), mk(&mut rng, &kv_shape), mk(&mut rng, &kv_shape), mk(&mut rng, &q_shape));
    for kernel in AttentionKernel::available::<R, F>(dev) {
        let run = || {
            let stats = [s.batch, s.q_heads, s.q_len];
            let mut out = GpuTensor::<R, F>::uninit(dev, &q_shape).unwrap();
            let mut lse = GpuTensor::<R, f32>::uninit(dev, &stats).unwrap();
            attention_forward_with(dev, kernel, &mut out, &mut lse, &q, &k, &v, true).unwrap();
            let (mut dq, mut dk, mut dv) = (
                GpuTensor::<R, F>::uninit(dev, &q_shape).unwrap(),
                GpuTensor::<R, F>::uninit(dev, &kv_shape).unwrap(),
                GpuTensor::<R, F>::uninit(dev, &kv_shape).unwrap(),
            );
            let mut delta = GpuTensor::<R, f32>::uninit(dev, &stats).unwrap();
            attention_backward_with(
                dev, kernel, &mut dq, &mut dk, &mut dv, &mut delta, &dy, &q, &k, &v, &out, &lse, true,
            )
            .unwrap();
            // f64 holds every F exactly, so equal f64 bits are equal F bits.
            [out, dq, dk, dv]
                .map(|t| t.to_f64_vec(dev).unwrap().into_iter().map(f64::to_bits).collect::<Vec<_>>())
        };
        let first = run();
        for _ in 0..2 {
            assert!(
                run() == first,
                "attention ({} {}) differs bit-wise between identical runs",
                F::DTYPE,
                kernel.name()
            );
        }
    }
}

#[test]
fn attention_is_bitwise_deterministic() {
    on_test_backend!(deterministic);
}

/// The naive (materialised) device path that the benchmark compares against computes the same.
fn naive_path<R: BackendRuntime>(dev: &Device<R>) {
    for causal in [false, true] {
        let case = Case { batch: 2, seq: 33, kv_heads: 2, group: 3, head_dim: 48, causal, seed: 17 };
        let s = case.shape();
        let q_shape = [s.batch, s.q_len, s.q_heads, s.head_dim];
        let kv_shape = [s.batch, s.kv_len, s.kv_heads, s.head_dim];
        let mut rng = DataRng::new(case.seed);
        let q = rng.normals(q_shape.iter().product(), 0.0, 1.0);
        let k = rng.normals(kv_shape.iter().product(), 0.0, 1.0);
        let v = rng.normals(kv_shape.iter().product(), 0.0, 1.0);
        let dout = rng.normals(q.len(), 0.0, 1.0);
        let want = reference_run(&q, &k, &v, &dout, &s, causal, &|x| x, &|x| x);
        let up = |x: &[f64], shape: &[usize]| GpuTensor::<R, f32>::from_f64(dev, x, shape).unwrap();
        let (qt, kt, vt, dy) = (up(&q, &q_shape), up(&k, &kv_shape), up(&v, &kv_shape), up(&dout, &q_shape));
        let mut scratch = NaiveScratch::new(dev, s.batch, s.q_heads, s.q_len).unwrap();
        let mut out = GpuTensor::<R, f32>::uninit(dev, &q_shape).unwrap();
        naive_attention_forward(dev, &mut out, &mut scratch, &qt, &kt, &vt, causal).unwrap();
        let (mut dq, mut dk, mut dv) = (
            GpuTensor::<R, f32>::uninit(dev, &q_shape).unwrap(),
            GpuTensor::<R, f32>::uninit(dev, &kv_shape).unwrap(),
            GpuTensor::<R, f32>::uninit(dev, &kv_shape).unwrap(),
        );
        naive_attention_backward(dev, &mut dq, &mut dk, &mut dv, &mut scratch, &dy, &qt, &kt, &vt, &out)
            .unwrap();
        let tol = Tolerance { atol: 1e-6, rtol: 5e-6 };
        for (name, t, w, shape) in [
            ("out", &out, &want.out, &q_shape),
            ("dq", &dq, &want.dq, &q_shape),
            ("dk", &dk, &want.dk, &kv_shape),
            ("dv", &dv, &want.dv, &kv_shape),
        ] {
            let got: Vec<f64> = t.to_vec(dev).unwrap().into_iter().map(f64::from).collect();
            assert_close(&format!("naive {name} (causal {causal})"), &got, w, shape, tol);
        }
    }
}

#[test]
fn naive_device_path_matches_reference() {
    on_test_backend!(naive_path);
}

fn bad_input<R: BackendRuntime>(dev: &Device<R>) {
    let z = |shape: &[usize]| GpuTensor::<R, f32>::zeros(dev, shape).unwrap();
    let (mut out, mut lse) = (z(&[1, 8, 6, 64]), z(&[1, 6, 8]));
    let err = attention_forward(
        dev,
        &mut out,
        &mut lse,
        &z(&[1, 8, 6, 64]),
        &z(&[1, 8, 4, 64]),
        &z(&[1, 8, 4, 64]),
        true,
    )
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "attention_forward: query heads (6) must be a multiple of key/value heads (4) for grouped-query attention"
    );
    let (mut out, mut lse) = (z(&[1, 8, 4, 72]), z(&[1, 4, 8]));
    let err = attention_forward(
        dev,
        &mut out,
        &mut lse,
        &z(&[1, 8, 4, 72]),
        &z(&[1, 8, 4, 72]),
        &z(&[1, 8, 4, 72]),
        true,
    )
    .unwrap_err();
    assert!(
        err.to_string()
            .contains("head_dim 72 is not compiled; supported: [16, 32, 48, 64, 80, 96, 112, 128]"),
        "{err}"
    );
    let (mut out, mut lse) = (z(&[1, 8, 4, 64]), z(&[1, 4, 8]));
    let err = attention_forward(
        dev,
        &mut out,
        &mut lse,
        &z(&[1, 8, 4, 64]),
        &z(&[1, 8, 4, 64]),
        &z(&[1, 9, 4, 64]),
        true,
    )
    .unwrap_err();
    assert!(matches!(err, Error::ShapeMismatch { tensor: "v", .. }), "{err}");
    let err = attention_forward(
        dev,
        &mut out,
        &mut lse,
        &z(&[1, 8, 4, 64]),
        &z(&[1, 8, 4, 32]),
        &z(&[1, 8, 4, 32]),
        true,
    )
    .unwrap_err();
    assert!(err.to_string().contains("does not match q"), "{err}");
    let (mut o1, mut l1) = (z(&[1, 2, 4, 64]), z(&[1, 4, 2]));
    let err = attention_decode(
        dev,
        &mut o1,
        &mut l1,
        &z(&[1, 2, 4, 64]),
        &z(&[1, 16, 4, 64]),
        &z(&[1, 16, 4, 64]),
        10,
        9,
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("positions 9..11 need keys up to there, but only 10 are filled"),
        "{err}"
    );
    // No device has tensor cores for f32 here (tf32 would round it).
    let (mut out, mut lse) = (z(&[1, 8, 4, 64]), z(&[1, 4, 8]));
    let x = z(&[1, 8, 4, 64]);
    let err = attention_forward_with(dev, AttentionKernel::TensorCores, &mut out, &mut lse, &x, &x, &x, true)
        .unwrap_err();
    assert!(
        err.to_string().contains("the tensor-core kernels need f16 or bf16")
            && err.to_string().contains("has none for f32"),
        "{err}"
    );
}

#[test]
fn attention_rejects_bad_input() {
    on_test_backend!(bad_input);
}

/// Where the flash kernels' smallest tiles do not fit the device's shared memory (f32 at
/// head_dim 112 and 128 on lavapipe's 32 KiB), both launchers say so instead of launching.
fn flash_refuses<R: BackendRuntime>(dev: &Device<R>) {
    for head_dim in SUPPORTED_HEAD_DIMS {
        if AttentionKernel::Flash.takes::<R, f32>(dev, head_dim) {
            continue;
        }
        let z = |shape: &[usize]| GpuTensor::<R, f32>::zeros(dev, shape).unwrap();
        let (mut out, mut lse) = (z(&[1, 8, 4, head_dim]), z(&[1, 4, 8]));
        let x = z(&[1, 8, 4, head_dim]);
        let err = attention_forward_with(dev, AttentionKernel::Flash, &mut out, &mut lse, &x, &x, &x, true)
            .unwrap_err();
        let expected = format!("the flash kernels' smallest tiles at head_dim {head_dim} need more than");
        assert!(err.to_string().contains(&expected), "{err}");
        let (mut dq, mut dk, mut dv, mut delta) =
            (z(x.shape()), z(&[1, 8, 4, head_dim]), z(&[1, 8, 4, head_dim]), z(&[1, 4, 8]));
        let err = attention_backward_with(
            dev,
            AttentionKernel::Flash,
            &mut dq,
            &mut dk,
            &mut dv,
            &mut delta,
            &x,
            &x,
            &x,
            &x,
            &x,
            &lse,
            true,
        )
        .unwrap_err();
        assert!(err.to_string().contains(&expected), "{err}");
    }
}

#[test]
fn flash_refuses_what_does_not_fit() {
    on_test_backend!(flash_refuses);
}

#[test]
fn reference_backward_matches_finite_differences() {
    let strategy = (1usize..=2, 1usize..=4, 1usize..=2, 1usize..=2, any::<bool>(), any::<u64>());
    run_property(
        "attention reference finite differences",
        32,
        strategy,
        |(batch, seq, kv_heads, group, causal, seed)| {
            let s = AttentionShape {
                batch,
                q_len: seq,
                kv_len: seq,
                kv_capacity: seq,
                q_heads: kv_heads * group,
                kv_heads,
                head_dim: 4,
                position_offset: 0,
            };
            let mut rng = DataRng::new(seed);
            let nq = batch * seq * s.q_heads * 4;
            let nk = batch * seq * kv_heads * 4;
            let (q, k, v, dout) = (
                rng.normals(nq, 0.0, 1.0),
                rng.normals(nk, 0.0, 1.0),
                rng.normals(nk, 0.0, 1.0),
                rng.normals(nq, 0.0, 1.0),
            );
            let loss = |q: &[f64], k: &[f64], v: &[f64]| {
                let (mut out, mut lse) = (vec![0.0; nq], vec![0.0; batch * s.q_heads * seq]);
                reference::attention_forward(&mut out, &mut lse, q, k, v, &s, causal);
                out.iter().zip(&dout).map(|(o, g)| o * g).sum::<f64>()
            };
            let (mut dq, mut dk, mut dv) = (vec![0.0; nq], vec![0.0; nk], vec![0.0; nk]);
            reference::attention_backward(&mut dq, &mut dk, &mut dv, &dout, &q, &k, &v, &s, causal);
            let fd_q = finite_differences(|x| loss(x, &k, &v), &q, 1e-6);
            let fd_k = finite_differences(|x| loss(&q, x, &v), &k, 1e-6);
            let fd_v = finite_differences(|x| loss(&q, &k, x), &v, 1e-6);
            for (name, got, fd, n) in [("dq", &dq, &fd_q, nq), ("dk", &dk, &fd_k, nk), ("dv", &dv, &fd_v, nk)]
            {
                check_close(
                    &format!("reference {name} vs finite differences"),
                    got,
                    fd,
                    &[n],
                    FINITE_DIFFERENCE_TOL,
                )
                .map_err(TestCaseError::fail)?;
            }
            Ok(())
        },
    );
}

/// Per lane, 32 numbers: (row, column) of the 8 A, 4 B and 4 C/D fragment elements, as CubeCL's
/// `position_of_nth` says (`theirs`) and as the flash kernels assume (`ours`).
#[cube(launch)]
fn fragment_positions_kernel<F: Float>(theirs: &mut Array<u32>, ours: &mut Array<u32>) {
    let def = MmaDefinition::<F, F, f32>::new(16usize, 8usize, 16usize);
    let lane = UNIT_POS_PLANE;
    let at = lane as usize * 32;
    #[unroll]
    for i in 0..8usize {
        let (r, c) = def.position_of_nth(lane, i as u32, MatrixIdent::A);
        let (r2, c2) = a_position(lane as usize, i);
        theirs[at + 2 * i] = r;
        theirs[at + 2 * i + 1] = c;
        ours[at + 2 * i] = r2 as u32;
        ours[at + 2 * i + 1] = c2 as u32;
    }
    #[unroll]
    for i in 0..4usize {
        let (r, c) = def.position_of_nth(lane, i as u32, MatrixIdent::B);
        let (r2, c2) = b_position(lane as usize, i);
        theirs[at + 16 + 2 * i] = r;
        theirs[at + 16 + 2 * i + 1] = c;
        ours[at + 16 + 2 * i] = r2 as u32;
        ours[at + 16 + 2 * i + 1] = c2 as u32;
        let (r, c) = def.position_of_nth(lane, i as u32, MatrixIdent::Accumulator);
        let (r2, c2) = c_position(lane as usize, i);
        theirs[at + 24 + 2 * i] = r;
        theirs[at + 24 + 2 * i + 1] = c;
        ours[at + 24 + 2 * i] = r2 as u32;
        ours[at + 24 + 2 * i + 1] = c2 as u32;
    }
}

/// Where the device runs `mma.m16n8k16` (CUDA sm_80+), the fragment layout the flash kernels
/// index by is the device's, lane by lane. (Elsewhere the kernels emulate the instruction with
/// that same layout, and the property tests above cover them.)
fn fragment_layout<R: BackendRuntime>(dev: &Device<R>) {
    // bf16 matrix instructions (the wmma the tensor-core kernels use) and bf16 mma.m16n8k16
    // both start at sm_80: a device with one and not the other would leave the flash kernels
    // silently emulated.
    if AttentionKernel::available::<R, half::bf16>(dev).contains(&AttentionKernel::TensorCores) {
        assert!(
            flash::device_mma::<R, half::bf16>(dev),
            "{} has bf16 wmma but the flash kernels do not see mma.m16n8k16",
            dev.info().device
        );
    }
    fragment_layout_in::<R, half::f16>(dev);
    fragment_layout_in::<R, half::bf16>(dev);
}

fn fragment_layout_in<R: BackendRuntime, F: FloatElement>(dev: &Device<R>) {
    if !flash::device_mma::<R, F>(dev) {
        return;
    }
    let z = || GpuTensor::<R, u32>::zeros(dev, &[32 * 32]).unwrap();
    let (theirs, ours) = (z(), z());
    fragment_positions_kernel::launch::<F, R>(
        dev.client(),
        CubeCount::Static(1, 1, 1),
        CubeDim::new_1d(32),
        theirs.as_array_arg(),
        ours.as_array_arg(),
    );
    let (theirs, ours) = (theirs.to_vec(dev).unwrap(), ours.to_vec(dev).unwrap());
    for lane in 0..32 {
        let row = |v: &[u32]| v[lane * 32..(lane + 1) * 32].to_vec();
        assert_eq!(
            row(&ours),
            row(&theirs),
            "{} fragment positions of lane {lane} (A×8, B×4, C×4)",
            F::DTYPE
        );
    }
}

#[test]
fn flash_fragment_layout_is_the_devices() {
    on_test_backend!(fragment_layout);
}

/// One warp's `mma` (A 16×16 row-major, B 16×8 k-major, C and D 16×8 f32), each lane loading
/// and storing its fragment elements where the layout functions say.
#[cube(launch)]
fn single_mma_kernel<F: Float>(
    a: &Array<F>,
    b: &Array<F>,
    c: &Array<f32>,
    d: &mut Array<f32>,
    #[comptime] device_mma: bool,
) {
    let lane = UNIT_POS as usize;
    let mut af = Array::<Vector<F, Pair>>::new(4usize);
    #[unroll]
    for v in 0usize..4usize {
        let mut pair = Vector::<F, Pair>::new(F::new(0.0));
        #[unroll]
        for x in 0usize..2usize {
            let (row, col) = a_position(lane, 2 * v + x);
            pair[x] = a[row * 16 + col];
        }
        af[v] = pair;
    }
    let mut bf = Array::<Vector<F, Pair>>::new(2usize);
    let mut acc = Array::<Vector<f32, Pair>>::new(2usize);
    #[unroll]
    for v in 0usize..2usize {
        let mut b_pair = Vector::<F, Pair>::new(F::new(0.0));
        let mut c_pair = Vector::<f32, Pair>::new(f32::new(0.0));
        #[unroll]
        for x in 0usize..2usize {
            let (k, n) = b_position(lane, 2 * v + x);
            b_pair[x] = b[k * 8 + n];
            let (row, col) = c_position(lane, 2 * v + x);
            c_pair[x] = c[row * 8 + col];
        }
        bf[v] = b_pair;
        acc[v] = c_pair;
    }
    let mut scratch = emulation_scratch(1u32, device_mma);
    mma::<F>(&af, &bf, &mut acc, &mut scratch, 0usize, device_mma);
    #[unroll]
    for v in 0usize..2usize {
        #[unroll]
        for x in 0usize..2usize {
            let (row, col) = c_position(lane, 2 * v + x);
            d[row * 8 + col] = acc[v][x];
        }
    }
}

/// The flash kernels' `mma` (the device's instruction where it has one, and the emulation
/// everywhere) on small integers, exact in every element type and in f32 sums, equals the CPU
/// product `A·B + C` exactly: the instruction with the fragment layout, outside attention.
fn single_mma<R: BackendRuntime>(dev: &Device<R>) {
    single_mma_in::<R, f32>(dev);
    if dev.supports::<half::f16>() {
        single_mma_in::<R, half::f16>(dev);
    }
    if dev.supports::<half::bf16>() {
        single_mma_in::<R, half::bf16>(dev);
    }
}

fn single_mma_in<R: BackendRuntime, F: FloatElement>(dev: &Device<R>) {
    let a: Vec<f64> = (0..16 * 16).map(|i| ((i * 7) % 11) as f64 - 5.0).collect();
    let b: Vec<f64> = (0..16 * 8).map(|i| ((i * 5) % 9) as f64 - 4.0).collect();
    let c: Vec<f64> = (0..16 * 8).map(|i| (i % 5) as f64 - 2.0).collect();
    let mut want = c.clone();
    for r in 0..16 {
        for n in 0..8 {
            want[r * 8 + n] += (0..16).map(|k| a[r * 16 + k] * b[k * 8 + n]).sum::<f64>();
        }
    }
    let at = GpuTensor::<R, F>::from_f64(dev, &a, &[16, 16]).unwrap();
    let bt = GpuTensor::<R, F>::from_f64(dev, &b, &[16, 8]).unwrap();
    let ct = GpuTensor::<R, f32>::from_f64(dev, &c, &[16, 8]).unwrap();
    let mut paths = vec![false];
    if flash::device_mma::<R, F>(dev) {
        paths.push(true);
    }
    for device_mma in paths {
        let d = GpuTensor::<R, f32>::from_f64(dev, &[f64::NAN; 16 * 8], &[16, 8]).unwrap();
        single_mma_kernel::launch::<F, R>(
            dev.client(),
            CubeCount::Static(1, 1, 1),
            CubeDim::new_1d(32),
            at.as_array_arg(),
            bt.as_array_arg(),
            ct.as_array_arg(),
            d.as_array_arg(),
            device_mma,
        );
        let got = d.to_f64_vec(dev).unwrap();
        let what = if device_mma { "mma.m16n8k16" } else { "emulated mma" };
        assert_eq!(got, want, "{what} in {}: D = A·B + C (rows of 8)", F::DTYPE);
    }
}

#[test]
fn flash_mma_matches_the_cpu_product() {
    on_test_backend!(single_mma);
}
