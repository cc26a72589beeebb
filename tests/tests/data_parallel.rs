//! Data-parallel training over the in-process collectives stand-in, ranks as threads sharing
//! the test device (each with its own model, gradients, optimizer and data position):
//! - W ranks with `--grad-accum K` read the tokens one rank with `--grad-accum W·K` reads, and
//!   reach the same losses and weights up to f32 summation order (tolerances below);
//! - ZeRO-1 equals ZeRO-0 bit for bit (losses, norms, weights, checkpoints), in f32 and in f16
//!   with f32 master weights and loss scaling;
//! - a 2-rank run saved, stopped and resumed continues bit-identically; another world size is
//!   refused;
//! - a rank that fails ends the other ranks' steps with an error naming it;
//! - SFT splits each step's packed micro-batches over the ranks, a short last step included.

use collectives::local::LocalGroup;
use dsl::{BackendRuntime, Device, FloatElement};
use model::{Llama, LlamaConfig, Params};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tests::*;
use trainer::corpus;
use trainer::data::TokenStream;
use trainer::parallel::{DataParallel, Zero};
use trainer::sft::{Encoded, Overlong, Packing, SftBatches, SftOptions};
use trainer::train::{SftData, StepReport, TrainData, TrainOptions, Trainer};

fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("cubellama-dp-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn setup(steps: u64, grad_accum: usize, world_size: usize) -> (LlamaConfig, TrainOptions, TokenStream) {
    let config = models::tiny_config(258, 64, 128, 2, 4, 2, 16);
    let options = TrainOptions {
        steps,
        batch: 2,
        seq_len: 32,
        grad_accum,
        world_size,
        lr: 3e-3,
        warmup: 2,
        ..TrainOptions::default()
    };
    (config, options, corpus::stream(60_000, 1).unwrap().0)
}

/// A fresh trainer of rank `group`'s (or a single rank) from the f32 initialisation.
fn trainer<R: BackendRuntime, F: FloatElement>(
    dev: &Device<R>,
    config: &LlamaConfig,
    options: &TrainOptions,
    stream: &TokenStream,
    parallel: Option<DataParallel<R>>,
) -> Trainer<R, F> {
    let init = model::init::initial_params(config, options.seed);
    let model = Llama::new(dev, config.clone(), Params::from_host(dev, config, &init).unwrap()).unwrap();
    let mut t =
        Trainer::new_parallel(dev, model, options.clone(), TrainData::from(stream), parallel).unwrap();
    t.set_weights(dev, &init).unwrap();
    t
}

/// What a rank saw: its step reports and its final weights (the compute copy, f32).
struct RankRun {
    reports: Vec<StepReport>,
    weights: Vec<Vec<f32>>,
}

fn group(world: usize) -> Vec<LocalGroup> {
    LocalGroup::new(world, Duration::from_secs(120))
}

/// `options.steps` steps on `options.world_size` ranks, each saving to `save` at the end when
/// given.
fn run_ranks<R: BackendRuntime, F: FloatElement>(
    dev: &Device<R>,
    config: &LlamaConfig,
    options: &TrainOptions,
    stream: &TokenStream,
    zero: Zero,
    save: Option<&Path>,
) -> Vec<RankRun> {
    std::thread::scope(|scope| {
        let handles: Vec<_> = group(options.world_size)
            .into_iter()
            .map(|member| {
                scope.spawn(move || {
                    let parallel = DataParallel::new(Box::new(member), zero);
                    let mut t = trainer::<R, F>(dev, config, options, stream, Some(parallel));
                    let reports = (0..options.steps).map(|_| t.step(dev).unwrap()).collect();
                    if let Some(dir) = save {
                        t.save(dev, dir).unwrap();
                    }
                    RankRun { reports, weights: t.model.params.to_host(dev).unwrap() }
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("rank thread")).collect()
    })
}

fn single<R: BackendRuntime, F: FloatElement>(
    dev: &Device<R>,
    config: &LlamaConfig,
    options: &TrainOptions,
    stream: &TokenStream,
) -> RankRun {
    let mut t = trainer::<R, F>(dev, config, options, stream, None);
    let reports = (0..options.steps).map(|_| t.step(dev).unwrap()).collect();
    RankRun { reports, weights: t.model.params.to_host(dev).unwrap() }
}

/// The same tokens' loss summed in another order: f32 round-off (seen: about 1e-7 relative).
fn assert_loss_close(what: &str, dp: &StepReport, want: &StepReport) {
    assert_close(
        &format!("{what} loss"),
        &[dp.loss],
        &[want.loss],
        &[1],
        Tolerance { atol: 0.0, rtol: 1e-5 },
    );
}

fn bits(run: &RankRun) -> (Vec<(u64, u64)>, Vec<Vec<u32>>) {
    (
        run.reports.iter().map(|r| (r.loss.to_bits(), r.grad_norm.to_bits())).collect(),
        run.weights.iter().map(|w| w.iter().map(|x| x.to_bits()).collect()).collect(),
    )
}

/// W ranks × K micro-batches against one rank × W·K: the same tokens per step (so the same
/// tokens count), the loss and gradient norm to f32 round-off, and weights within 0.01% of the
/// most AdamW can move them (lr per element per step). Why: the gradients differ only in the
/// order their f32 terms are summed (per rank, then across ranks), a relative 1e-7 or so, and
/// AdamW's update m/(√v + eps) is smooth in the gradient (near g = 0 it is g/eps). Seen on
/// lavapipe: losses equal to 1e-7, weights within 1.3e-7 (the bound is 1.2e-6). The ranks
/// themselves agree bit for bit.
fn equals_one_rank<R: BackendRuntime>(dev: &Device<R>) {
    for (world, k) in [(2usize, 2usize), (3, 1)] {
        let steps = 4;
        let (config, options, stream) = setup(steps, k, world);
        let ranks = run_ranks::<R, f32>(dev, &config, &options, &stream, Zero::Stage0, None);
        let one = single::<R, f32>(
            dev,
            &config,
            &TrainOptions { grad_accum: world * k, world_size: 1, ..options.clone() },
            &stream,
        );
        for rank in &ranks[1..] {
            assert!(
                bits(rank) == bits(&ranks[0]),
                "{world} ranks: every rank holds the same figures and weights"
            );
        }
        for (dp, want) in ranks[0].reports.iter().zip(&one.reports) {
            assert_eq!(dp.tokens, want.tokens, "step {}: tokens", dp.step);
            let what = format!("{world} ranks × {k} vs 1 × {}: step {}", world * k, dp.step);
            assert_loss_close(&what, dp, want);
            assert_close(
                &format!("{what} grad norm"),
                &[dp.grad_norm],
                &[want.grad_norm],
                &[1],
                Tolerance { atol: 0.0, rtol: 1e-4 },
            );
        }
        let bound = 1e-4 * options.lr * steps as f64;
        let mut worst_of_all = 0.0f64;
        for (i, (dp, want)) in ranks[0].weights.iter().zip(&one.weights).enumerate() {
            let worst = dp.iter().zip(want).map(|(a, b)| (a - b).abs() as f64).fold(0.0, f64::max);
            assert!(worst <= bound, "{world} ranks: parameter {i} differs by {worst:e} > {bound:e}");
            worst_of_all = worst_of_all.max(worst);
        }
        let losses = |run: &RankRun| run.reports.iter().map(|r| r.loss).collect::<Vec<_>>();
        eprintln!(
            "{world} ranks × {k}: losses {:?} vs one rank {:?}; largest weight difference {worst_of_all:e} (bound {bound:e})",
            losses(&ranks[0]),
            losses(&one)
        );
    }
}

#[test]
fn data_parallel_equals_one_rank_with_the_combined_batch() {
    on_test_backend!(equals_one_rank);
}

/// ZeRO-1 against ZeRO-0 on the same ranks: everything bit for bit, including the checkpoint
/// files (ZeRO-1 gathers the sharded state into the same single-file layout).
fn zero1_is_zero0<R: BackendRuntime, F: FloatElement>(dev: &Device<R>, world: usize) {
    let (config, mut options, stream) = setup(3, 2, world);
    options.precision = trainer::precision::PrecisionOptions::for_dtype(F::DTYPE);
    let dirs = [
        scratch_dir(&format!("zero0-{}-{world}", F::DTYPE)),
        scratch_dir(&format!("zero1-{}-{world}", F::DTYPE)),
    ];
    let zero0 = run_ranks::<R, F>(dev, &config, &options, &stream, Zero::Stage0, Some(&dirs[0]));
    let zero1 = run_ranks::<R, F>(dev, &config, &options, &stream, Zero::Stage1, Some(&dirs[1]));
    for rank in 0..world {
        assert!(bits(&zero1[rank]) == bits(&zero0[rank]), "{} {world} ranks: rank {rank} differs", F::DTYPE);
    }
    for file in ["model.safetensors", "optimizer.safetensors"] {
        let read = |dir: &Path| std::fs::read(dir.join(file)).unwrap();
        assert!(read(&dirs[0]) == read(&dirs[1]), "{} {world} ranks: {file} differs", F::DTYPE);
    }
    for dir in dirs {
        std::fs::remove_dir_all(dir).unwrap();
    }
}

fn zero1_equals_zero0<R: BackendRuntime>(dev: &Device<R>) {
    zero1_is_zero0::<R, f32>(dev, 3);
    if dev.supports::<half::f16>() {
        zero1_is_zero0::<R, half::f16>(dev, 2);
    }
}

#[test]
fn zero1_equals_plain_data_parallel_bit_for_bit() {
    on_test_backend!(zero1_equals_zero0);
}

/// Two ranks under ZeRO-1: 2 steps, save, stop, resume (under ZeRO-0: the stage may change),
/// 2 more steps, against 4 straight steps: bit for bit. Resuming on one rank is refused.
fn resume_two_ranks<R: BackendRuntime>(dev: &Device<R>) {
    let (config, options, stream) = setup(4, 1, 2);
    let straight = run_ranks::<R, f32>(dev, &config, &options, &stream, Zero::Stage1, None);
    let dir = scratch_dir("resume");
    let first = TrainOptions { steps: 2, ..options.clone() };
    run_ranks::<R, f32>(dev, &config, &first, &stream, Zero::Stage1, Some(&dir));
    let resumed: Vec<RankRun> = std::thread::scope(|scope| {
        let handles: Vec<_> = group(2)
            .into_iter()
            .map(|member| {
                let (dir, stream) = (&dir, &stream);
                scope.spawn(move || {
                    let parallel = DataParallel::new(Box::new(member), Zero::Stage0);
                    let mut t = Trainer::<R, f32>::resume_parallel(
                        dev,
                        dir,
                        TrainData::from(stream),
                        Some(4),
                        None,
                        Some(parallel),
                    )
                    .unwrap();
                    assert_eq!(t.state.step, 2);
                    let reports = (2..4).map(|_| t.step(dev).unwrap()).collect();
                    RankRun { reports, weights: t.model.params.to_host(dev).unwrap() }
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("rank thread")).collect()
    });
    for rank in 0..2 {
        let want = bits(&straight[rank]);
        let got = bits(&resumed[rank]);
        assert_eq!(got.0, want.0[2..], "rank {rank}: losses and norms after resuming");
        assert!(got.1 == want.1, "rank {rank}: weights after resuming");
    }
    let error =
        Trainer::<R, f32>::resume(dev, &dir, TrainData::from(&stream), None).err().unwrap().to_string();
    assert!(error.contains("trained on 2 rank(s) and this job has 1"), "{error}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn two_ranks_resume_bit_identically() {
    on_test_backend!(resume_two_ranks);
}

/// Rank 1 stops after one step (its trainer and its end of the group dropped, as when its
/// process dies): rank 0's next step fails naming rank 1, instead of waiting forever.
fn failing_rank<R: BackendRuntime>(dev: &Device<R>) {
    let (config, options, stream) = setup(3, 1, 2);
    let errors: Vec<Option<String>> = std::thread::scope(|scope| {
        let handles: Vec<_> = group(2)
            .into_iter()
            .enumerate()
            .map(|(rank, member)| {
                let (config, options, stream) = (&config, &options, &stream);
                scope.spawn(move || {
                    let parallel = DataParallel::new(Box::new(member), Zero::Stage1);
                    let mut t = trainer::<R, f32>(dev, config, options, stream, Some(parallel));
                    t.step(dev).unwrap();
                    if rank == 1 {
                        if let Some(p) = t.parallel_mut() {
                            p.abort("its data file vanished");
                        }
                        return None;
                    }
                    Some(t.step(dev).expect_err("rank 1 is gone").to_string())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("rank thread")).collect()
    });
    let message = errors[0].as_deref().unwrap();
    assert!(message.contains("rank 1 left the job: its data file vanished"), "{message}");
}

#[test]
fn a_failing_rank_ends_the_job_with_its_name() {
    on_test_backend!(failing_rank);
}

/// Supervised fine-tuning on 2 ranks against one rank with twice the accumulation: the same
/// packed micro-batches, the loss over all answer tokens of the step (each rank divides by the
/// step's count over both), through an epoch whose last step has a single micro-batch (rank 1
/// then has none and adds zeros) and into the next epoch.
fn sft_equals_one_rank<R: BackendRuntime>(dev: &Device<R>) {
    let config = models::tiny_config(258, 64, 128, 2, 4, 2, 16);
    let packing = Packing { batch: 2, seq: 32, seed: 0, shuffle: true, pad: 257 };
    let make = |count: usize| -> Vec<Encoded> {
        let mut rng = DataRng::new(3);
        (0..count)
            .map(|i| {
                let len = 6 + (i * 7) % 25;
                let tokens =
                    rng.normals(len, 0.0, 1.0).iter().map(|x| (x.abs() * 80.0) as u32 % 256).collect();
                Encoded { tokens, answer_from: len / 2 }
            })
            .collect()
    };
    // The fewest examples from 40 whose epoch packs into an odd number of micro-batches, so
    // its last step has one.
    let (examples, mut counter) = (40..80)
        .map(|n| (make(n), SftBatches::new("synthetic".into(), make(n), packing)))
        .find_map(|(e, mut c)| (c.micro_batches(0) % 2 == 1).then_some((e, c)))
        .expect("some count packs oddly");
    let data = || SftData {
        path: "synthetic".into(),
        train: examples.clone(),
        val: Vec::new(),
        pad: 257,
        options: SftOptions {
            epochs: 2,
            separator: trainer::sft::DEFAULT_SEPARATOR.into(),
            overlong: Overlong::Truncate,
            parse_special_tokens: false,
        },
    };
    let steps = counter.steps_in_epoch(0, 2) + 1;
    let options = TrainOptions {
        steps,
        batch: 2,
        seq_len: 32,
        lr: 3e-3,
        warmup: 2,
        world_size: 2,
        ..TrainOptions::default()
    };
    let init = model::init::initial_params(&config, 0);
    let fresh = |parallel: Option<DataParallel<R>>| {
        let model =
            Llama::<R, f32>::new(dev, config.clone(), Params::from_host(dev, &config, &init).unwrap())
                .unwrap();
        let world_size = if parallel.is_some() { 2 } else { 1 };
        let grad_accum = if parallel.is_some() { 1 } else { 2 };
        let options = TrainOptions { world_size, grad_accum, ..options.clone() };
        Trainer::new_parallel(dev, model, options, TrainData::Sft(data()), parallel).unwrap()
    };
    let ranks: Vec<RankRun> = std::thread::scope(|scope| {
        let handles: Vec<_> = group(2)
            .into_iter()
            .map(|member| {
                let fresh = &fresh;
                scope.spawn(move || {
                    let mut t = fresh(Some(DataParallel::new(Box::new(member), Zero::Stage1)));
                    let reports = (0..steps).map(|_| t.step(dev).unwrap()).collect();
                    RankRun { reports, weights: t.model.params.to_host(dev).unwrap() }
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("rank thread")).collect()
    });
    let mut one = fresh(None);
    let want: Vec<StepReport> = (0..steps).map(|_| one.step(dev).unwrap()).collect();
    assert!(bits(&ranks[1]) == bits(&ranks[0]), "both ranks hold the same figures and weights");
    for (dp, want) in ranks[0].reports.iter().zip(&want) {
        assert_eq!(dp.tokens, want.tokens, "step {}: tokens", dp.step);
        assert_loss_close(&format!("SFT 2 ranks vs 1 × 2: step {}", dp.step), dp, want);
    }
    assert_eq!(ranks[0].reports[steps as usize - 2].tokens, 2 * 32, "the epoch's short last step");
    let bound = 1e-4 * options.lr * steps as f64;
    for (i, (dp, w)) in ranks[0].weights.iter().zip(&one.model.params.to_host(dev).unwrap()).enumerate() {
        let worst = dp.iter().zip(w).map(|(a, b)| (a - b).abs() as f64).fold(0.0, f64::max);
        assert!(worst <= bound, "SFT: parameter {i} differs by {worst:e} > {bound:e}");
    }
}

#[test]
fn data_parallel_sft_equals_one_rank_with_the_combined_batch() {
    on_test_backend!(sft_equals_one_rank);
}

/// A job whose options disagree with its group is refused before any step.
fn world_mismatch<R: BackendRuntime>(dev: &Device<R>) {
    let (config, options, stream) = setup(1, 1, 3);
    let member = group(1).pop().unwrap();
    let init = model::init::initial_params(&config, 0);
    let model =
        Llama::<R, f32>::new(dev, config.clone(), Params::from_host(dev, &config, &init).unwrap()).unwrap();
    let parallel = DataParallel::new(Box::new(member), Zero::Stage0);
    let error =
        Trainer::new_parallel(dev, model, options, TrainData::from(&stream), Some(parallel)).err().unwrap();
    assert!(error.to_string().contains("the options say 3 ranks but the job has 1"), "{error}");
}

#[test]
fn a_world_size_mismatch_is_refused() {
    on_test_backend!(world_mismatch);
}
