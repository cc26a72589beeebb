//! Embedding kernels against the f64 reference; determinism with shared tokens; bad ids.

use dsl::{BackendRuntime, DType, Device, Error, GpuTensor};
use kernels::embedding::{TokenIds, embedding_backward, embedding_forward};
use kernels::reference::embedding as reference;
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use tests::*;

#[derive(Clone, Debug)]
struct Case {
    vocab: usize,
    hidden: usize,
    tokens: usize,
    /// Ids are drawn from the first `distinct` tokens: small values make many positions share.
    distinct: usize,
    seed: u64,
}

fn cases() -> impl Strategy<Value = Case> {
    let vocab = prop_oneof![prop::sample::select(vec![1usize, 2, 3, 17, 32000]), 1usize..=2000];
    let hidden = prop_oneof![prop::sample::select(vec![1usize, 3, 17, 127, 128, 4096]), 1usize..=300];
    (vocab, hidden, 1usize..=400, 1usize..=64, any::<u64>()).prop_map(
        |(vocab, hidden, tokens, distinct, seed)| {
            // Keep the 32000-row table small enough for quick tests.
            let hidden = if vocab > 4000 { hidden.min(64) } else { hidden };
            Case { vocab, hidden, tokens, distinct: distinct.min(vocab), seed }
        },
    )
}

fn ids_for(case: &Case, rng: &mut DataRng) -> Vec<u32> {
    // Spread the distinct ids over the whole vocabulary, including its last row.
    let pool: Vec<u32> = (0..case.distinct)
        .map(|k| if k == 0 { case.vocab as u32 - 1 } else { (rng.next_u64() % case.vocab as u64) as u32 })
        .collect();
    (0..case.tokens).map(|_| pool[(rng.next_u64() % pool.len() as u64) as usize]).collect()
}

fn check<R: BackendRuntime, F: TestFloat>(dev: &Device<R>, case: &Case) -> Result<(), TestCaseError> {
    let (v, c, n) = (case.vocab, case.hidden, case.tokens);
    let mut rng = DataRng::new(case.seed);
    let ids = ids_for(case, &mut rng);
    let weight = F::round_all(&rng.normals(v * c, 0.0, 1.0));
    let dout = F::round_all(&rng.normals(n * c, 0.0, 1.0));
    let dweight_before = F::round_all(&rng.normals(v * c, 0.0, 1.0));
    let mut want_out = vec![0.0; n * c];
    reference::embedding_forward(&mut want_out, &ids, &weight, c);
    let mut want_dweight = dweight_before.clone();
    reference::embedding_backward(&mut want_dweight, &dout, &ids, c);
    let mut dweight_magnitude: Vec<f64> = dweight_before.iter().map(|x| x.abs()).collect();
    for (k, &id) in ids.iter().enumerate() {
        for j in 0..c {
            dweight_magnitude[id as usize * c + j] += dout[k * c + j].abs();
        }
    }

    let what = |t: &str| format!("{t} [{} {case:?}]", F::DTYPE);
    let token_ids = TokenIds::upload(dev, &ids, &[n], v).map_err(fail)?;
    let w = upload::<R, F>(dev, &weight, &[v, c])?;
    let mut out = nan_tensor::<R, F>(dev, &[n, c])?;
    embedding_forward(dev, &mut out, &token_ids, &w).map_err(fail)?;
    // A gather moves values: it must be exact.
    check_close(&what("out"), &download(dev, &out)?, &want_out, &[n, c], Tolerance { atol: 0.0, rtol: 0.0 })
        .map_err(TestCaseError::fail)?;
    let dy = upload::<R, F>(dev, &dout, &[n, c])?;
    let mut dweight = upload::<R, F>(dev, &dweight_before, &[v, c])?;
    embedding_backward(dev, &mut dweight, &dy, &token_ids).map_err(fail)?;
    check_close_scaled(
        &what("dweight"),
        &download(dev, &dweight)?,
        &want_dweight,
        &dweight_magnitude,
        &[v, c],
        Tolerance::for_dtype(F::DTYPE),
    )
    .map_err(TestCaseError::fail)?;
    Ok(())
}

fn matches_reference<R: BackendRuntime, F: TestFloat>(dev: &Device<R>) {
    if refuses_unsupported::<R, F>(dev) {
        return;
    }
    let cases_per_dtype = if F::DTYPE == DType::F32 { 32 } else { 16 };
    run_property(&format!("embedding {}", F::DTYPE), cases_per_dtype, cases(), |case| {
        check::<R, F>(dev, &case)
    });
}

test_each_dtype!(matches_reference => embedding_f32_matches_reference, embedding_f16_matches_reference, embedding_bf16_matches_reference_or_is_refused);

/// Thousands of positions on a handful of tokens: the backward must be bit-identical run to run.
fn deterministic<R: BackendRuntime>(dev: &Device<R>) {
    let case = Case { vocab: 50, hidden: 96, tokens: 4096, distinct: 3, seed: 11 };
    let mut rng = DataRng::new(case.seed);
    let ids = ids_for(&case, &mut rng);
    let dout = rng.normals(case.tokens * case.hidden, 0.0, 1.0);
    let token_ids = TokenIds::upload(dev, &ids, &[4, 1024], case.vocab).unwrap();
    let dy = GpuTensor::<R, f32>::from_f64(dev, &dout, &[4, 1024, case.hidden]).unwrap();
    let run = || {
        let mut dweight = GpuTensor::<R, f32>::zeros(dev, &[case.vocab, case.hidden]).unwrap();
        embedding_backward(dev, &mut dweight, &dy, &token_ids).unwrap();
        dweight.to_vec(dev).unwrap().iter().map(|v| v.to_bits()).collect::<Vec<_>>()
    };
    let first = run();
    for _ in 0..3 {
        assert!(run() == first, "embedding backward differs bit-wise between identical runs");
    }
}

#[test]
fn embedding_backward_is_bitwise_deterministic() {
    on_test_backend!(deterministic);
}

/// 70000 positions of one token. Where the device cuts long loops short (lavapipe: 65535
/// iterations per unit), the launcher must refuse rather than return a truncated sum; where it
/// does not, the sum must be right.
fn many_repeats<R: BackendRuntime>(dev: &Device<R>) {
    let n = 70_000;
    let ids = vec![3u32; n];
    let dout: Vec<f64> = (0..n).map(|i| (i % 7) as f64).collect();
    let token_ids = TokenIds::upload(dev, &ids, &[n], 5).unwrap();
    let dy = GpuTensor::<R, f32>::from_f64(dev, &dout, &[n, 1]).unwrap();
    let mut dweight = GpuTensor::<R, f32>::zeros(dev, &[5, 1]).unwrap();
    let outcome = embedding_backward(dev, &mut dweight, &dy, &token_ids);
    match dev.info().max_loop_iterations {
        Some(cap) => {
            let err = outcome.expect_err("a loop longer than the device's cap must be refused");
            assert!(err.to_string().contains(&format!("stops loops after {cap}")), "{err}");
        }
        None => {
            outcome.unwrap();
            let got = dweight.to_vec(dev).unwrap();
            assert_eq!(got[3] as f64, dout.iter().sum::<f64>(), "sum over 70000 positions");
        }
    }
}

#[test]
fn embedding_backward_never_returns_a_truncated_sum() {
    on_test_backend!(many_repeats);
}

fn bad_input<R: BackendRuntime>(dev: &Device<R>) {
    let err =
        TokenIds::<R>::upload(dev, &[1, 5, 32000, 2], &[4], 32000).err().expect("id 32000 is out of range");
    assert_eq!(
        err.to_string(),
        "token ids: token id 32000 at position 2 is outside the vocabulary of 32000",
        "the error must name the id, its position and the vocabulary size"
    );
    let ids = TokenIds::<R>::upload(dev, &[1, 2, 3], &[3], 100).unwrap();
    let small_table = GpuTensor::<R, f32>::zeros(dev, &[10, 8]).unwrap();
    let mut out = GpuTensor::<R, f32>::zeros(dev, &[3, 8]).unwrap();
    let err = embedding_forward(dev, &mut out, &ids, &small_table).unwrap_err();
    assert!(err.to_string().contains("vocabulary of 100, but weight has 10 rows"), "{err}");
    let table = GpuTensor::<R, f32>::zeros(dev, &[100, 8]).unwrap();
    let mut wrong_out = GpuTensor::<R, f32>::zeros(dev, &[3, 9]).unwrap();
    let err = embedding_forward(dev, &mut wrong_out, &ids, &table).unwrap_err();
    assert!(matches!(err, Error::ShapeMismatch { op: "embedding_forward", tensor: "out", .. }), "{err}");
}

#[test]
fn embedding_rejects_out_of_vocabulary_ids_and_bad_shapes() {
    on_test_backend!(bad_input);
}

#[test]
fn reference_backward_matches_finite_differences() {
    let strategy = (1usize..=5, 1usize..=4, 1usize..=6, any::<u64>());
    run_property("embedding reference finite differences", 64, strategy, |(vocab, hidden, tokens, seed)| {
        let mut rng = DataRng::new(seed);
        let ids: Vec<u32> = (0..tokens).map(|_| (rng.next_u64() % vocab as u64) as u32).collect();
        let weight = rng.normals(vocab * hidden, 0.0, 1.0);
        let dout = rng.normals(tokens * hidden, 0.0, 1.0);
        let loss = |w: &[f64]| {
            let mut out = vec![0.0; tokens * hidden];
            reference::embedding_forward(&mut out, &ids, w, hidden);
            out.iter().zip(&dout).map(|(o, d)| o * d).sum::<f64>()
        };
        let mut dweight = vec![0.0; vocab * hidden];
        reference::embedding_backward(&mut dweight, &dout, &ids, hidden);
        let fd = finite_differences(loss, &weight, 1e-6);
        check_close(
            "reference dweight vs finite differences",
            &dweight,
            &fd,
            &[vocab, hidden],
            FINITE_DIFFERENCE_TOL,
        )
        .map_err(TestCaseError::fail)
    });
}
