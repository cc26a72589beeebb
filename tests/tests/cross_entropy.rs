//! Fused cross-entropy against the f64 reference; ignored positions really are ignored.

use dsl::{BackendRuntime, DType, Device, Error, GpuTensor};
use kernels::cross_entropy::{
    IGNORE_INDEX, Targets, cross_entropy_forward, cross_entropy_forward_backward, cross_entropy_mean,
    cross_entropy_rows_forward, cross_entropy_rows_forward_backward,
};
use kernels::reference::cross_entropy as reference;
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use tests::*;

#[derive(Clone, Debug)]
struct Case {
    rows: usize,
    vocab: usize,
    /// Logits are N(0, scale²): from nearly uniform to sharply peaked softmaxes.
    scale: f64,
    /// Chance that a row's target is -100.
    ignore_rate: f64,
    seed: u64,
}

fn cases() -> impl Strategy<Value = Case> {
    let vocab = prop_oneof![
        2 => prop::sample::select(vec![2usize, 3, 17, 127, 4095, 4097, 32000, 50000]),
        2 => 2usize..=50000,
    ];
    let ignore = prop::sample::select(vec![0.0, 0.3, 1.0]);
    (1usize..=24, vocab, -1.0f64..2.0, ignore, any::<u64>()).prop_map(
        |(rows, vocab, log_scale, ignore_rate, seed)| {
            // Bound the case to ~400k logits so the suite stays quick on lavapipe.
            let rows = rows.min((400_000 / vocab).max(1));
            Case { rows, vocab, scale: 10f64.powf(log_scale), ignore_rate, seed }
        },
    )
}

struct Data {
    logits: Vec<f64>,
    targets: Vec<i32>,
}

fn data<F: TestFloat>(case: &Case) -> Data {
    let mut rng = DataRng::new(case.seed);
    let logits = F::round_all(&rng.normals(case.rows * case.vocab, 0.0, case.scale));
    let targets = (0..case.rows)
        .map(|_| {
            if rng.uniform() < case.ignore_rate {
                IGNORE_INDEX
            } else {
                (rng.next_u64() % case.vocab as u64) as i32
            }
        })
        .collect();
    Data { logits, targets }
}

fn check<R: BackendRuntime, F: TestFloat>(dev: &Device<R>, case: &Case) -> Result<(), TestCaseError> {
    let (rows, vocab) = (case.rows, case.vocab);
    let d = data::<F>(case);
    let (mut want_grad, mut want_rows) = (vec![0.0; rows * vocab], vec![0.0; rows]);
    let want_loss = reference::cross_entropy_forward_backward(
        &mut want_grad,
        &mut want_rows,
        &d.logits,
        &d.targets,
        vocab,
    );
    // Rounding errors scale with |max| + |logit[target]| + |log Σ| per row, and with the
    // probability itself (plus the one-hot) per gradient element.
    let counted = d.targets.iter().filter(|&&t| t != IGNORE_INDEX).count();
    let scale = if counted == 0 { 0.0 } else { 1.0 / counted as f64 };
    let mut row_magnitude = vec![0.0; rows];
    let mut grad_magnitude = vec![0.0; rows * vocab];
    for r in 0..rows {
        let row = &d.logits[r * vocab..(r + 1) * vocab];
        let max = row.iter().copied().fold(f64::MIN, f64::max);
        let sum: f64 = row.iter().map(|v| (v - max).exp()).sum();
        if d.targets[r] != IGNORE_INDEX {
            row_magnitude[r] = max.abs() + row[d.targets[r] as usize].abs() + sum.ln().abs();
            for v in 0..vocab {
                // exp's relative error grows with |x − max| (f32 exp of an argument near −80).
                let p = (row[v] - max).exp() / sum;
                grad_magnitude[r * vocab + v] = (p * (1.0 + (row[v] - max).abs())
                    + 1.0 * ((v as i32 == d.targets[r]) as u8 as f64))
                    * scale;
            }
        }
    }
    let loss_magnitude: f64 = row_magnitude.iter().sum::<f64>() * scale;

    let tol = Tolerance::for_dtype(F::DTYPE);
    let f32_tol = Tolerance::for_dtype(DType::F32);
    let what = |t: &str| format!("{t} [{} {case:?}]", F::DTYPE);
    let targets = Targets::upload(dev, &d.targets, vocab).map_err(fail)?;
    let logits = upload::<R, F>(dev, &d.logits, &[rows, vocab])?;
    // The evaluation path first (it leaves the logits as they are), then the training path,
    // which overwrites them with their gradient.
    let mut eval_loss = nan_tensor::<R, f32>(dev, &[1])?;
    let mut eval_rows = nan_tensor::<R, f32>(dev, &[rows])?;
    cross_entropy_forward(dev, &mut eval_loss, &mut eval_rows, &logits, &targets).map_err(fail)?;
    prop_assert_eq!(
        download(dev, &logits)?,
        download(dev, &upload::<R, F>(dev, &d.logits, &[rows, vocab])?)?
    );
    let mut loss = nan_tensor::<R, f32>(dev, &[1])?;
    let mut row_loss = nan_tensor::<R, f32>(dev, &[rows])?;
    let mut dlogits = logits.clone();
    cross_entropy_forward_backward(dev, &mut loss, &mut row_loss, &mut dlogits, &targets).map_err(fail)?;
    let got_loss = download(dev, &loss)?;
    // Loss and per-row losses are f32 whatever F is (computed from F-rounded logits).
    check_close_scaled(&what("loss"), &got_loss, &[want_loss], &[loss_magnitude], &[1], f32_tol)
        .map_err(TestCaseError::fail)?;
    check_close_scaled(
        &what("row_loss"),
        &download(dev, &row_loss)?,
        &want_rows,
        &row_magnitude,
        &[rows],
        f32_tol,
    )
    .map_err(TestCaseError::fail)?;
    check_close_scaled(
        &what("dlogits"),
        &download(dev, &dlogits)?,
        &want_grad,
        &grad_magnitude,
        &[rows, vocab],
        tol,
    )
    .map_err(TestCaseError::fail)?;

    // The evaluation path computes the same loss, bit for bit.
    let eval = download(dev, &eval_loss)?;
    prop_assert_eq!(eval[0].to_bits(), got_loss[0].to_bits(), "forward-only loss differs from the fused one");
    Ok(())
}

fn matches_reference<R: BackendRuntime, F: TestFloat>(dev: &Device<R>) {
    if refuses_unsupported::<R, F>(dev) {
        return;
    }
    let cases_per_dtype = if F::DTYPE == DType::F32 { 32 } else { 16 };
    run_property(&format!("cross-entropy {}", F::DTYPE), cases_per_dtype, cases(), |case| {
        check::<R, F>(dev, &case)
    });
}

test_each_dtype!(matches_reference => cross_entropy_f32_matches_reference, cross_entropy_f16_matches_reference, cross_entropy_bf16_matches_reference_or_is_refused);

/// Llama 3's vocabulary size: one row of 128k logits.
fn wide_vocabulary<R: BackendRuntime>(dev: &Device<R>) {
    let case = Case { rows: 2, vocab: 128_256, scale: 3.0, ignore_rate: 0.0, seed: 5 };
    check::<R, f32>(dev, &case).unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn cross_entropy_handles_a_128k_vocabulary() {
    on_test_backend!(wide_vocabulary);
}

fn run_ce<R: BackendRuntime>(
    dev: &Device<R>,
    logits: &[f64],
    targets: &[i32],
    vocab: usize,
) -> (u32, Vec<u32>) {
    let rows = targets.len();
    let t = Targets::upload(dev, targets, vocab).unwrap();
    let x = GpuTensor::<R, f32>::from_f64(dev, logits, &[rows, vocab]).unwrap();
    let mut loss = GpuTensor::<R, f32>::zeros(dev, &[1]).unwrap();
    let mut row_loss = GpuTensor::<R, f32>::zeros(dev, &[rows]).unwrap();
    let mut grad = x;
    cross_entropy_forward_backward(dev, &mut loss, &mut row_loss, &mut grad, &t).unwrap();
    let bits = |v: Vec<f32>| v.into_iter().map(f32::to_bits).collect::<Vec<_>>();
    (loss.to_vec(dev).unwrap()[0].to_bits(), bits(grad.to_vec(dev).unwrap()))
}

/// Changing the logits of ignored positions changes neither the loss nor any gradient.
fn ignored_rows_are_ignored<R: BackendRuntime>(dev: &Device<R>) {
    let (rows, vocab) = (6, 301);
    let mut rng = DataRng::new(3);
    let logits = rng.normals(rows * vocab, 0.0, 2.0);
    let targets = [5, IGNORE_INDEX, 300, IGNORE_INDEX, 0, 17];
    let mut changed = logits.clone();
    for r in [1, 3] {
        for v in 0..vocab {
            changed[r * vocab + v] = rng.normal() * 50.0;
        }
    }
    let (loss_a, grad_a) = run_ce(dev, &logits, &targets, vocab);
    let (loss_b, grad_b) = run_ce(dev, &changed, &targets, vocab);
    assert_eq!(loss_a, loss_b, "loss depends on an ignored row");
    assert!(grad_a == grad_b, "a gradient depends on an ignored row");
    assert!(grad_a[vocab..2 * vocab].iter().all(|&b| b == 0), "an ignored row's gradient must be exactly 0");
}

#[test]
fn ignored_positions_change_neither_loss_nor_gradients() {
    on_test_backend!(ignored_rows_are_ignored);
}

fn all_ignored<R: BackendRuntime>(dev: &Device<R>) {
    let logits = DataRng::new(9).normals(3 * 10, 0.0, 1.0);
    let (loss, grad) = run_ce(dev, &logits, &[IGNORE_INDEX; 3], 10);
    assert_eq!(f32::from_bits(loss), 0.0, "all ignored: loss must be 0, not NaN");
    assert!(grad.iter().all(|&b| b == 0), "all ignored: every gradient must be 0");
}

#[test]
fn all_ignored_gives_zero_loss_and_zero_gradient() {
    on_test_backend!(all_ignored);
}

fn deterministic<R: BackendRuntime>(dev: &Device<R>) {
    let (rows, vocab) = (40, 5001);
    let logits = DataRng::new(1).normals(rows * vocab, 0.0, 4.0);
    let targets: Vec<i32> = (0..rows as i32).map(|r| (r * 97) % vocab as i32).collect();
    let first = run_ce(dev, &logits, &targets, vocab);
    for _ in 0..3 {
        assert!(
            run_ce(dev, &logits, &targets, vocab) == first,
            "cross-entropy differs bit-wise between runs"
        );
    }
}

#[test]
fn cross_entropy_is_bitwise_deterministic() {
    on_test_backend!(deterministic);
}

fn bad_input<R: BackendRuntime>(dev: &Device<R>) {
    let err = Targets::<R>::upload(dev, &[3, -1, 2], 10).err().expect("-1 is neither a token nor -100");
    assert_eq!(
        err.to_string(),
        "targets: target -1 at position 1 is outside the vocabulary of 10 (allowed: 0..vocab_size, or -100 to ignore the position)"
    );
    assert!(Targets::<R>::upload(dev, &[10], 10).is_err(), "target == vocab is out of range");
    let t = Targets::<R>::upload(dev, &[1, 2], 10).unwrap();
    let (mut loss, mut row_loss) =
        (GpuTensor::zeros(dev, &[1]).unwrap(), GpuTensor::zeros(dev, &[2]).unwrap());
    let mut grad = GpuTensor::<R, f32>::zeros(dev, &[2, 12]).unwrap();
    let err = cross_entropy_forward_backward(dev, &mut loss, &mut row_loss, &mut grad, &t).unwrap_err();
    assert!(err.to_string().contains("vocabulary of 10, but logits have 12 columns"), "{err}");
    let mut grad = GpuTensor::<R, f32>::zeros(dev, &[3, 10]).unwrap();
    let mut row_loss3 = GpuTensor::zeros(dev, &[3]).unwrap();
    let err = cross_entropy_forward_backward(dev, &mut loss, &mut row_loss3, &mut grad, &t).unwrap_err();
    assert!(matches!(err, Error::ShapeMismatch { tensor: "targets", .. }), "{err}");
}

/// Blocks of rows (as the chunked lm_head computes them) give the whole batch's loss and
/// gradient to the bit, forward-only and in place, with the last block shorter than the others.
fn row_blocks<R: BackendRuntime>(dev: &Device<R>) {
    let (rows, vocab, block) = (300, 257, 128);
    let mut rng = DataRng::new(11);
    let logits = rng.normals(rows * vocab, 0.0, 3.0);
    let targets: Vec<i32> =
        (0..rows as i32).map(|r| if r % 7 == 3 { IGNORE_INDEX } else { (r * 31) % vocab as i32 }).collect();
    // A denominator and loss scale not the block's own: the blocks must carry the batch's.
    let t = Targets::upload(dev, &targets, vocab).unwrap().with_denominator(500).with_loss_scale(8.0);
    let bits = |v: Vec<f32>| v.into_iter().map(f32::to_bits).collect::<Vec<_>>();
    let upload = || GpuTensor::<R, f32>::from_f64(dev, &logits, &[rows, vocab]).unwrap();
    let (mut whole_loss, mut whole_rows) =
        (GpuTensor::zeros(dev, &[1]).unwrap(), GpuTensor::zeros(dev, &[rows]).unwrap());
    let mut whole = upload();
    cross_entropy_forward_backward(dev, &mut whole_loss, &mut whole_rows, &mut whole, &t).unwrap();

    for with_grad in [false, true] {
        let (mut loss, row_loss) =
            (GpuTensor::zeros(dev, &[1]).unwrap(), GpuTensor::<R, f32>::zeros(dev, &[rows]).unwrap());
        let blocks = upload();
        for start in (0..rows).step_by(block) {
            let n = block.min(rows - start);
            let mut x = blocks.rows_view(start, n).unwrap();
            let mut r =
                row_loss.reshape(&[rows, 1]).unwrap().rows_view(start, n).unwrap().reshape(&[n]).unwrap();
            let bt = t.rows(start, n).unwrap();
            if with_grad {
                cross_entropy_rows_forward_backward(dev, &mut r, &mut x, &bt).unwrap();
            } else {
                cross_entropy_rows_forward(dev, &mut r, &x, &bt).unwrap();
            }
        }
        cross_entropy_mean(dev, &mut loss, &row_loss, &t).unwrap();
        assert_eq!(bits(loss.to_vec(dev).unwrap()), bits(whole_loss.to_vec(dev).unwrap()), "loss");
        assert_eq!(bits(row_loss.to_vec(dev).unwrap()), bits(whole_rows.to_vec(dev).unwrap()), "row_loss");
        if with_grad {
            assert!(bits(blocks.to_vec(dev).unwrap()) == bits(whole.to_vec(dev).unwrap()), "dlogits differ");
        }
    }
    // Blocks must start on an aligned row: 100 rows of 4 bytes is 400 bytes, not a multiple of 256.
    let err = t.rows(100, 50).err().expect("unaligned start");
    assert!(err.to_string().contains("not a multiple of 256"), "{err}");
}

#[test]
fn cross_entropy_in_row_blocks_equals_the_whole_batch() {
    on_test_backend!(row_blocks);
}

#[test]
fn cross_entropy_rejects_bad_targets_and_shapes() {
    on_test_backend!(bad_input);
}

#[test]
fn reference_backward_matches_finite_differences() {
    let strategy = (1usize..=4, 2usize..=7, any::<u64>());
    run_property("cross-entropy reference finite differences", 64, strategy, |(rows, vocab, seed)| {
        let mut rng = DataRng::new(seed);
        let logits = rng.normals(rows * vocab, 0.0, 2.0);
        let targets: Vec<i32> = (0..rows)
            .map(|r| if r == 1 { IGNORE_INDEX } else { (rng.next_u64() % vocab as u64) as i32 })
            .collect();
        let loss = |x: &[f64]| {
            let (mut g, mut rl) = (vec![0.0; rows * vocab], vec![0.0; rows]);
            reference::cross_entropy_forward_backward(&mut g, &mut rl, x, &targets, vocab)
        };
        let (mut grad, mut rl) = (vec![0.0; rows * vocab], vec![0.0; rows]);
        reference::cross_entropy_forward_backward(&mut grad, &mut rl, &logits, &targets, vocab);
        let fd = finite_differences(loss, &logits, 1e-6);
        check_close(
            "reference dlogits vs finite differences",
            &grad,
            &fd,
            &[rows, vocab],
            FINITE_DIFFERENCE_TOL,
        )
        .map_err(TestCaseError::fail)
    });
}
