//! `cargo xtask bench`: the device's copy bandwidth, then every kernel's achieved bandwidth as
//! a fraction of it, measured in the same process.
//!
//! Shapes are Llama-2-7B's (hidden 4096, intermediate 11008, 32 heads of 128, vocabulary
//! 32000) over `--tokens` tokens (B·T): 16384 on a fast device, 1024 on a slow one such as
//! lavapipe, fewer where a tensor would exceed the device's largest buffer.
//!
//! Bytes counted for a kernel are the tensors it must read and write once (inputs, outputs,
//! saved statistics, parameters). Traffic of our own making (RMSNorm's dweight partials, the
//! second read of each logits row in cross-entropy) is not counted, so it shows as lost
//! bandwidth. Times are medians of timed runs after warm-up; each run is enqueued and then
//! synchronised with the device.

use crate::BackendArg;
use anyhow::{Context, Result, bail};
use dsl::rounding::RoundingKey;
use dsl::{BackendRuntime, DType, Device, FloatElement, GpuTensor, OnDevice};
use kernels::adamw::{AdamW, Rounding, adamw_step, adamw_step_master};
use kernels::attention::naive::{NaiveScratch, naive_attention_backward, naive_attention_forward};
use kernels::attention::{AttentionKernel, attention_backward_with, attention_forward_with, flash};
use kernels::cross_entropy::{Targets, cross_entropy_forward, cross_entropy_forward_backward};
use kernels::embedding::{TokenIds, embedding_backward, embedding_forward};
use kernels::grad_norm::{grad_norm, grad_norm_scratch_len};
use kernels::residual::residual_add;
use kernels::rmsnorm::{
    rmsnorm_backward, rmsnorm_backward_accumulate, rmsnorm_backward_scratch_rows, rmsnorm_forward,
    rmsnorm_forward_residual,
};
use kernels::rope::{RopeTable, rope_backward, rope_forward};
use kernels::swiglu::{swiglu_backward, swiglu_forward};
use serde::Serialize;
use std::time::Instant;

const KERNELS: [&str; 9] =
    ["rmsnorm", "swiglu", "rope", "embedding", "cross_entropy", "adamw", "grad_norm", "attention", "matmul"];

#[derive(clap::Args)]
pub struct BenchArgs {
    #[command(flatten)]
    backend: BackendArg,
    #[command(flatten)]
    kernel: crate::tune::KernelArgs,
    /// Print one JSON document on standard output instead of the table.
    #[arg(long)]
    json: bool,
    /// Tokens (B·T) per batch; default scales with the device's copy bandwidth.
    #[arg(long)]
    tokens: Option<usize>,
    /// Only these kernels (comma-separated): rmsnorm, swiglu, rope, embedding, cross_entropy,
    /// adamw, grad_norm, attention, matmul.
    #[arg(long, value_delimiter = ',', value_parser = clap::builder::PossibleValuesParser::new(KERNELS))]
    kernels: Vec<String>,
    /// Timed runs per measurement (the median is reported).
    #[arg(long, default_value_t = 10)]
    iters: usize,
}

#[derive(Serialize)]
struct Report {
    backend: String,
    device: String,
    tokens: usize,
    copy: CopyResult,
    kernels: Vec<KernelResult>,
    attention: Vec<AttentionResult>,
    matmul: Vec<MatmulResult>,
}

/// One of the linear layer's products (2·M·N·K FLOPs).
#[derive(Serialize)]
struct MatmulResult {
    /// The weights it serves (`q, o`, `mlp.down`, …).
    what: String,
    pass: &'static str,
    dtype: String,
    /// `M×K·K×N`.
    shape: String,
    routine: String,
    median_ms: f64,
    tflop_per_s: f64,
}

/// Flash attention against the naive (materialised-scores) path on the same device.
#[derive(Serialize)]
struct AttentionResult {
    pass: &'static str,
    /// The kernels (`tensor cores` or `portable`).
    kernel: &'static str,
    dtype: String,
    batch: usize,
    seq: usize,
    q_heads: usize,
    kv_heads: usize,
    head_dim: usize,
    causal: bool,
    /// 4·B·Hq·T²·hd for a non-causal forward, half of it causal, 2.5× the forward backward.
    flops: f64,
    median_ms: f64,
    tflop_per_s: f64,
    /// Memory the pass allocates beyond its inputs and outputs (lse; delta).
    extra_bytes: u64,
    naive_median_ms: f64,
    naive_extra_bytes: u64,
    /// naive time / flash time.
    speedup_over_naive: f64,
}

#[derive(Serialize)]
struct CopyResult {
    bytes_moved: u64,
    median_ms: f64,
    gb_per_s: f64,
}

#[derive(Serialize)]
struct KernelResult {
    kernel: &'static str,
    pass: &'static str,
    dtype: String,
    shape: String,
    bytes_moved: u64,
    median_ms: f64,
    gb_per_s: f64,
    fraction_of_copy: f64,
}

/// A device this fast (GB/s of copy) gets full-size shapes; slower ones get small ones.
const FAST_DEVICE_GBPS: f64 = 100.0;

/// Llama-2-7B's dimensions.
const HIDDEN: usize = 4096;
const INTERMEDIATE: usize = 11008;
const HEADS: usize = 32;
const HEAD_DIM: usize = 128;
const VOCAB: usize = 32000;

pub fn run(args: BenchArgs) -> Result<()> {
    let Some(backend) = args.backend.resolve_or_reexec()? else { return Ok(()) };
    let report = dsl::on_device(backend, Bench { args: &args })??;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_table(&report);
    }
    Ok(())
}

struct Bench<'a> {
    args: &'a BenchArgs,
}

impl OnDevice for Bench<'_> {
    type Output = Result<Report>;
    fn run<R: BackendRuntime>(self, dev: &Device<R>) -> Result<Report> {
        eprintln!("device: {}", dev.info());
        let (dev, line) = self.args.kernel.apply(dev)?;
        eprintln!("{line}");
        let dev = &dev;
        let copy = measure_copy(dev, self.args.iters)?;
        eprintln!("copy bandwidth: {:.1} GB/s", copy.gb_per_s);
        let fast = copy.gb_per_s >= FAST_DEVICE_GBPS;
        let tokens = self.args.tokens.unwrap_or(if fast { 16384 } else { 1024 });
        let mut ctx = Ctx {
            dev,
            iters: self.args.iters,
            copy_gbps: copy.gb_per_s,
            selected: &self.args.kernels,
            fast,
            results: Vec::new(),
            attention: Vec::new(),
            matmul: Vec::new(),
        };
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let outcome = match dtype {
                DType::F32 => bench_dtype::<R, f32>(&mut ctx, tokens),
                DType::F16 => bench_dtype::<R, half::f16>(&mut ctx, tokens),
                DType::BF16 => bench_dtype::<R, half::bf16>(&mut ctx, tokens),
                DType::U32 | DType::I32 => unreachable!("not a float type"),
            };
            outcome.with_context(|| format!("benchmarking {dtype}"))?;
        }
        Ok(Report {
            backend: dev.backend().to_string(),
            device: dev.info().to_string(),
            tokens,
            copy,
            kernels: ctx.results,
            attention: ctx.attention,
            matmul: ctx.matmul,
        })
    }
}

struct Ctx<'a, R: BackendRuntime> {
    dev: &'a Device<R>,
    iters: usize,
    copy_gbps: f64,
    selected: &'a [String],
    fast: bool,
    results: Vec<KernelResult>,
    attention: Vec<AttentionResult>,
    matmul: Vec<MatmulResult>,
}

impl<R: BackendRuntime> Ctx<'_, R> {
    fn wants(&self, kernel: &str) -> bool {
        self.selected.is_empty() || self.selected.iter().any(|k| k == kernel)
    }

    /// Times `launch` and records a table row.
    fn measure(
        &mut self,
        kernel: &'static str,
        pass: &'static str,
        dtype: DType,
        shape: String,
        bytes: u64,
        launch: impl FnMut() -> Result<()>,
    ) -> Result<()> {
        eprintln!("{kernel} {pass} {dtype} {shape}…");
        let ms = time_ms(self.dev, self.iters, launch).with_context(|| format!("{kernel} {pass} {shape}"))?;
        let gbps = gb_per_s(bytes, ms);
        self.results.push(KernelResult {
            kernel,
            pass,
            dtype: dtype.to_string(),
            shape,
            bytes_moved: bytes,
            median_ms: ms,
            gb_per_s: gbps,
            fraction_of_copy: gbps / self.copy_gbps,
        });
        Ok(())
    }

    /// `wanted`, or the largest power of two whose `per_item`-byte rows fit in a quarter of
    /// the device's largest buffer (lavapipe's is 128 MiB).
    fn fit(&self, wanted: usize, per_item: usize) -> usize {
        let budget = self.dev.info().max_buffer_bytes as usize / 4;
        let fits = wanted.min(budget / per_item.max(1)).max(1);
        // A power of two when it had to shrink: shapes that read well in a table.
        if fits < wanted { 1 << (usize::BITS - 1 - fits.leading_zeros()) } else { fits }
    }
}

/// Median wall time of `iters` runs of `launch` followed by a device sync, after 3 warm-ups
/// (the first launch of each kernel compiles it).
pub(crate) fn time_ms<R: BackendRuntime>(
    dev: &Device<R>,
    iters: usize,
    mut launch: impl FnMut() -> Result<()>,
) -> Result<f64> {
    for _ in 0..3 {
        launch()?;
    }
    dev.sync("bench warm-up")?;
    let mut samples = Vec::with_capacity(iters);
    for _ in 0..iters.max(1) {
        let start = Instant::now();
        launch()?;
        dev.sync("bench")?;
        samples.push(start.elapsed().as_secs_f64() * 1e3);
    }
    samples.sort_by(f64::total_cmp);
    Ok(samples[samples.len() / 2])
}

fn gb_per_s(bytes: u64, ms: f64) -> f64 {
    bytes as f64 / (ms * 1e-3) / 1e9
}

fn measure_copy<R: BackendRuntime>(dev: &Device<R>, iters: usize) -> Result<CopyResult> {
    let measure = |bytes: usize| -> Result<CopyResult> {
        let n = bytes / 4;
        let src = GpuTensor::<R, f32>::full(dev, &[n], 1.0)?;
        let mut dst = GpuTensor::<R, f32>::zeros(dev, &[n])?;
        let ms = time_ms(dev, iters, || Ok(dst.copy_from(dev, &src)?))?;
        let moved = 2 * bytes as u64;
        Ok(CopyResult { bytes_moved: moved, median_ms: ms, gb_per_s: gb_per_s(moved, ms) })
    };
    let max_buffer = dev.info().max_buffer_bytes as usize;
    // 64 MiB first (fits lavapipe's 128 MiB buffer cap); a fast device gets 1 GiB so the
    // copy cannot be served from its L2 cache (50 MiB on an H100).
    let small = measure((64 << 20).min(max_buffer)).context("copy bandwidth")?;
    if small.gb_per_s < FAST_DEVICE_GBPS {
        return Ok(small);
    }
    measure((1 << 30).min(max_buffer)).context("copy bandwidth")
}

fn filled<R: BackendRuntime, F: FloatElement>(
    dev: &Device<R>,
    shape: &[usize],
    value: f64,
) -> Result<GpuTensor<R, F>> {
    Ok(GpuTensor::full(dev, shape, F::from_f64_rounded(value))?)
}

fn bench_dtype<R: BackendRuntime, F: FloatElement>(ctx: &mut Ctx<'_, R>, tokens: usize) -> Result<()> {
    if !ctx.dev.supports::<F>() {
        eprintln!("{}: not supported by this device, skipped", F::DTYPE);
        return Ok(());
    }
    let s = size_of::<F>() as u64;
    let dt = F::DTYPE;
    let dev = ctx.dev;

    if ctx.wants("rmsnorm") {
        let n = ctx.fit(tokens, HIDDEN * size_of::<F>());
        let shape = [n, HIDDEN];
        let x = filled::<R, F>(dev, &shape, 0.5)?;
        let weight = filled::<R, F>(dev, &[HIDDEN], 1.0)?;
        let dout = filled::<R, F>(dev, &shape, 0.25)?;
        let mut out = GpuTensor::<R, F>::uninit(dev, &shape)?;
        let mut rstd = GpuTensor::<R, f32>::uninit(dev, &[n])?;
        let mut dx = GpuTensor::<R, F>::uninit(dev, &shape)?;
        let mut dweight = GpuTensor::<R, F>::zeros(dev, &[HIDDEN])?;
        let mut scratch = GpuTensor::<R, f32>::uninit(dev, &[rmsnorm_backward_scratch_rows(dev, n), HIDDEN])?;
        let (act, param, stat) = ((n * HIDDEN) as u64 * s, HIDDEN as u64 * s, n as u64 * 4);
        let label = format!("{n}x{HIDDEN}");
        // read x, weight; write out, rstd
        ctx.measure("rmsnorm", "forward", dt, label.clone(), 2 * act + param + stat, || {
            Ok(rmsnorm_forward(dev, &mut out, &mut rstd, &x, &weight, 1e-5)?)
        })?;
        // read dout, x, weight, rstd, dweight; write dx, dweight
        ctx.measure("rmsnorm", "backward", dt, label.clone(), 3 * act + 3 * param + stat, || {
            Ok(rmsnorm_backward(dev, &mut dx, &mut dweight, &mut scratch, &dout, &x, &weight, &rstd)?)
        })?;
        // The residual add fused with the norm after it, against the two kernels it replaces
        // (in the same run). Each repetition adds the residual again: the stream grows by 1e-3.
        let residual = filled::<R, F>(dev, &shape, 1e-3)?;
        let mut stream = filled::<R, F>(dev, &shape, 0.5)?;
        // read x, residual, weight; write x, out, rstd
        ctx.measure("rmsnorm", "fwd+resid", dt, label.clone(), 4 * act + param + stat, || {
            Ok(rmsnorm_forward_residual(dev, &mut out, &mut rstd, &mut stream, &residual, &weight, 1e-5)?)
        })?;
        // residual_add: read x, residual, write x; then the norm: read x, write out
        ctx.measure("rmsnorm", "resid;fwd", dt, label.clone(), 5 * act + param + stat, || {
            residual_add(dev, &mut stream, &residual)?;
            Ok(rmsnorm_forward(dev, &mut out, &mut rstd, &stream, &weight, 1e-5)?)
        })?;
        // …and the backward adding into the stream's gradient: reads dx as well
        ctx.measure("rmsnorm", "bwd+=", dt, label.clone(), 4 * act + 3 * param + stat, || {
            Ok(rmsnorm_backward_accumulate(
                dev,
                &mut dx,
                &mut dweight,
                &mut scratch,
                &dout,
                &x,
                &weight,
                &rstd,
            )?)
        })?;
        let mut branch = GpuTensor::<R, F>::uninit(dev, &shape)?;
        ctx.measure("rmsnorm", "bwd;resid", dt, label, 6 * act + 3 * param + stat, || {
            rmsnorm_backward(dev, &mut branch, &mut dweight, &mut scratch, &dout, &x, &weight, &rstd)?;
            Ok(residual_add(dev, &mut dx, &branch)?)
        })?;
    }

    if ctx.wants("swiglu") {
        let n = ctx.fit(tokens, INTERMEDIATE * size_of::<F>());
        let shape = [n, INTERMEDIATE];
        let gate = filled::<R, F>(dev, &shape, 0.5)?;
        let up = filled::<R, F>(dev, &shape, -1.5)?;
        let dout = filled::<R, F>(dev, &shape, 0.25)?;
        let mut out = GpuTensor::<R, F>::uninit(dev, &shape)?;
        let (mut dgate, mut dup) =
            (GpuTensor::<R, F>::uninit(dev, &shape)?, GpuTensor::<R, F>::uninit(dev, &shape)?);
        let act = (n * INTERMEDIATE) as u64 * s;
        let label = format!("{n}x{INTERMEDIATE}");
        ctx.measure("swiglu", "forward", dt, label.clone(), 3 * act, || {
            Ok(swiglu_forward(dev, &mut out, &gate, &up)?)
        })?;
        ctx.measure("swiglu", "backward", dt, label, 5 * act, || {
            Ok(swiglu_backward(dev, &mut dgate, &mut dup, &dout, &gate, &up)?)
        })?;
    }

    if ctx.wants("rope") {
        let n = ctx.fit(tokens, HEADS * HEAD_DIM * size_of::<F>());
        let shape = [1, n, HEADS, HEAD_DIM];
        let table = RopeTable::new(dev, HEAD_DIM, n, 10000.0)?;
        let x = filled::<R, F>(dev, &shape, 0.5)?;
        let mut out = GpuTensor::<R, F>::uninit(dev, &shape)?;
        // read x (and each position's cos/sin row), write out
        let bytes = 2 * (n * HEADS * HEAD_DIM) as u64 * s + (n * HEAD_DIM * 4) as u64;
        let label = format!("1x{n}x{HEADS}x{HEAD_DIM}");
        ctx.measure("rope", "forward", dt, label.clone(), bytes, || {
            Ok(rope_forward(dev, &mut out, &x, &table, 0)?)
        })?;
        ctx.measure("rope", "backward", dt, label, bytes, || {
            Ok(rope_backward(dev, &mut out, &x, &table, 0)?)
        })?;
    }

    if ctx.wants("embedding") {
        // The full [32000, 4096] table where it fits in one buffer; narrower rows where not.
        let mut hidden = HIDDEN;
        while (VOCAB * hidden * size_of::<F>()) as u64 > dev.info().max_buffer_bytes / 2 && hidden > 64 {
            hidden /= 2;
        }
        let n = ctx.fit(tokens, hidden * size_of::<F>());
        // Deterministic pseudo-random ids over the whole vocabulary.
        let ids: Vec<u32> = (0..n as u64).map(|i| ((i * 2_654_435_761) % VOCAB as u64) as u32).collect();
        let unique = {
            let mut u = ids.clone();
            u.sort_unstable();
            u.dedup();
            u.len()
        };
        let token_ids = TokenIds::upload(dev, &ids, &[n], VOCAB)?;
        let weight = filled::<R, F>(dev, &[VOCAB, hidden], 0.02)?;
        let mut dweight = GpuTensor::<R, F>::zeros(dev, &[VOCAB, hidden])?;
        let mut out = GpuTensor::<R, F>::uninit(dev, &[n, hidden])?;
        let dout = filled::<R, F>(dev, &[n, hidden], 0.25)?;
        let (rows, ids_bytes) = ((n * hidden) as u64 * s, n as u64 * 4);
        let label = format!("{n} ids, {VOCAB}x{hidden}");
        // read the gathered weight rows and the ids; write out
        ctx.measure("embedding", "forward", dt, label.clone(), 2 * rows + ids_bytes, || {
            Ok(embedding_forward(dev, &mut out, &token_ids, &weight)?)
        })?;
        // read dout and the grouping; read and write each touched dweight row once
        let touched = 2 * (unique * hidden) as u64 * s;
        ctx.measure("embedding", "backward", dt, label, rows + touched + 2 * ids_bytes, || {
            Ok(embedding_backward(dev, &mut dweight, &dout, &token_ids)?)
        })?;
    }

    if ctx.wants("cross_entropy") {
        let n = ctx.fit(tokens, VOCAB * size_of::<F>());
        let targets: Vec<i32> = (0..n as i64).map(|i| ((i * 7919) % VOCAB as i64) as i32).collect();
        let targets = Targets::upload(dev, &targets, VOCAB)?;
        let mut logits = filled::<R, F>(dev, &[n, VOCAB], 0.1)?;
        let mut loss = GpuTensor::<R, f32>::uninit(dev, &[1])?;
        let mut row_loss = GpuTensor::<R, f32>::uninit(dev, &[n])?;
        let logit_bytes = (n * VOCAB) as u64 * s;
        let label = format!("{n}x{VOCAB}");
        // read logits once (the kernel reads each row twice) and targets; write row losses
        ctx.measure("cross_entropy", "forward", dt, label.clone(), logit_bytes + 8 * n as u64, || {
            Ok(cross_entropy_forward(dev, &mut loss, &mut row_loss, &logits, &targets)?)
        })?;
        // … and write dlogits over the logits (in place: later repetitions read the previous
        // one's gradient, which costs the same)
        ctx.measure("cross_entropy", "fwd+bwd", dt, label, 2 * logit_bytes + 8 * n as u64, || {
            Ok(cross_entropy_forward_backward(dev, &mut loss, &mut row_loss, &mut logits, &targets)?)
        })?;
    }

    if ctx.wants("adamw") {
        // One 7B MLP weight on a fast device; a slice of it (4096x1024) on a slow one.
        let cols = if ctx.fast { INTERMEDIATE } else { 1024 };
        let numel = HIDDEN * cols;
        let mut param = filled::<R, F>(dev, &[numel], 0.02)?;
        // The trainer's gradients are f32 whatever the compute type.
        let grad = filled::<R, f32>(dev, &[numel], 1e-3)?;
        let (mut m, mut v) =
            (GpuTensor::<R, f32>::zeros(dev, &[numel])?, GpuTensor::<R, f32>::zeros(dev, &[numel])?);
        let one = GpuTensor::<R, f32>::full(dev, &[1], 1.0)?;
        let hp = AdamW::default();
        let shape = format!("{HIDDEN}x{cols}");
        let mut step = 0;
        if F::DTYPE == DType::F32 {
            // read param, grad, m, v; write param, m, v
            ctx.measure("adamw", "step", dt, shape, numel as u64 * 28, || {
                step += 1;
                Ok(adamw_step(dev, &mut param, &mut m, &mut v, &grad, &one, &hp, step, Rounding::Nearest)?)
            })?;
        } else {
            // Mixed precision with master weights: read grad, m, v, master (16 bytes); write m,
            // v, master (12) and the compute copy (s).
            let mut master = filled::<R, f32>(dev, &[numel], 0.02)?;
            ctx.measure("adamw", "master", dt, shape.clone(), numel as u64 * (28 + s), || {
                step += 1;
                Ok(adamw_step_master(dev, &mut master, &mut param, &mut m, &mut v, &grad, &one, &hp, step)?)
            })?;
            // No master, stochastic rounding: read param (s), grad, m, v; write param, m, v.
            ctx.measure("adamw", "stochastic", dt, shape, numel as u64 * (2 * s + 20), || {
                step += 1;
                let rounding = Rounding::Stochastic(RoundingKey::new(0, step, 0));
                Ok(adamw_step(dev, &mut param, &mut m, &mut v, &grad, &one, &hp, step, rounding)?)
            })?;
        }
    }

    if ctx.wants("grad_norm") {
        // One 7B layer's weight gradients: q, k, v, o and gate, up, down; a sixteenth of each
        // on a slow device.
        let rows = if ctx.fast { HIDDEN } else { HIDDEN / 16 };
        let shapes = [[rows, HIDDEN]; 4].into_iter().chain([[rows, INTERMEDIATE]; 3]);
        let grads: Vec<GpuTensor<R, F>> =
            shapes.map(|sh| filled::<R, F>(dev, &sh, 1e-3)).collect::<Result<_>>()?;
        let refs: Vec<&GpuTensor<R, F>> = grads.iter().collect();
        let numels: Vec<usize> = grads.iter().map(|g| g.numel()).collect();
        let mut scratch = GpuTensor::<R, f32>::uninit(dev, &[grad_norm_scratch_len(&numels)])?;
        let (mut norm, mut scale) =
            (GpuTensor::<R, f32>::uninit(dev, &[1])?, GpuTensor::<R, f32>::uninit(dev, &[1])?);
        let bytes = numels.iter().sum::<usize>() as u64 * s;
        let label = format!("7 tensors, {}M", numels.iter().sum::<usize>() >> 20);
        ctx.measure("grad_norm", "norm", dt, label, bytes, || {
            Ok(grad_norm(dev, &mut norm, &mut scale, &mut scratch, &refs, 1.0)?)
        })?;
    }
    if ctx.wants("attention") {
        bench_attention::<R, F>(ctx)?;
    }
    if ctx.wants("matmul") {
        bench_matmul::<R, F>(ctx, tokens)?;
    }
    Ok(())
}

/// Causal GQA 4:1 attention: 32 query heads over 1..4k tokens on a fast device; 8 heads over
/// 256 and 512 tokens on a slow one. Naive = scores materialised ([`NaiveScratch`]).
fn bench_attention<R: BackendRuntime, F: FloatElement>(ctx: &mut Ctx<'_, R>) -> Result<()> {
    let dev = ctx.dev;
    let (q_heads, kv_heads) = if ctx.fast { (32, 8) } else { (8, 2) };
    let seqs: &[usize] = if ctx.fast { &[512, 1024, 2048, 4096] } else { &[256, 512] };
    let batch = 1;
    for &head_dim in &[64usize, 128] {
        for &seq in seqs {
            let q_shape = [batch, seq, q_heads, head_dim];
            let kv_shape = [batch, seq, kv_heads, head_dim];
            let stats = [batch, q_heads, seq];
            let q = filled::<R, F>(dev, &q_shape, 0.1)?;
            let k = filled::<R, F>(dev, &kv_shape, 0.2)?;
            let v = filled::<R, F>(dev, &kv_shape, 0.3)?;
            let dout = filled::<R, F>(dev, &q_shape, 0.01)?;
            let mut out = GpuTensor::<R, F>::uninit(dev, &q_shape)?;
            let mut lse = GpuTensor::<R, f32>::uninit(dev, &stats)?;
            let mut delta = GpuTensor::<R, f32>::uninit(dev, &stats)?;
            let (mut dq, mut dk, mut dv) = (
                GpuTensor::<R, F>::uninit(dev, &q_shape)?,
                GpuTensor::<R, F>::uninit(dev, &kv_shape)?,
                GpuTensor::<R, F>::uninit(dev, &kv_shape)?,
            );
            let label = format!("{batch}x{seq}, {q_heads}:{kv_heads} heads, hd {head_dim}");
            eprintln!("attention {} {label}…", F::DTYPE);
            // Every kernel set the device has (portable; tensor cores on CUDA f16/bf16; flash where
            // the device has mma.m16n8k16 for F: its emulation elsewhere is a correctness aid,
            // and timing it would only spend device time).
            let mut timed = Vec::new();
            let timed_kernels = AttentionKernel::available::<R, F>(dev).into_iter().filter(|&k| {
                k != AttentionKernel::Flash
                    || (flash::device_mma::<R, F>(dev) && k.takes::<R, F>(dev, head_dim))
            });
            for kernel in timed_kernels {
                let fwd = time_ms(dev, ctx.iters, || {
                    Ok(attention_forward_with(dev, kernel, &mut out, &mut lse, &q, &k, &v, true)?)
                })?;
                let bwd = time_ms(dev, ctx.iters, || {
                    Ok(attention_backward_with(
                        dev, kernel, &mut dq, &mut dk, &mut dv, &mut delta, &dout, &q, &k, &v, &out, &lse,
                        true,
                    )?)
                })?;
                timed.push((kernel, fwd, bwd));
            }
            // The naive path needs two [B, Hq, T, T] f32 matrices: skip it where they do not fit.
            let score_bytes = (batch * q_heads * seq * seq * 4) as u64;
            let (naive_fwd, naive_bwd, naive_bytes) = if score_bytes <= dev.info().max_buffer_bytes {
                let mut scratch = NaiveScratch::new(dev, batch, q_heads, seq)?;
                let mut naive_out = GpuTensor::<R, F>::uninit(dev, &q_shape)?;
                let nf = time_ms(dev, ctx.iters, || {
                    Ok(naive_attention_forward(dev, &mut naive_out, &mut scratch, &q, &k, &v, true)?)
                })?;
                let nb = time_ms(dev, ctx.iters, || {
                    Ok(naive_attention_backward(
                        dev,
                        &mut dq,
                        &mut dk,
                        &mut dv,
                        &mut scratch,
                        &dout,
                        &q,
                        &k,
                        &v,
                        &naive_out,
                    )?)
                })?;
                (nf, nb, scratch.size_bytes() as u64)
            } else {
                (f64::NAN, f64::NAN, 0)
            };
            let forward_flops = 2.0 * (batch * q_heads * seq * seq * head_dim) as f64;
            let stat_bytes = (batch * q_heads * seq * 4) as u64;
            let passes = timed.iter().flat_map(|&(kernel, fwd, bwd)| {
                [
                    ("forward", kernel, forward_flops, fwd, naive_fwd, score_bytes),
                    ("backward", kernel, 2.5 * forward_flops, bwd, naive_bwd, naive_bytes),
                ]
            });
            for (pass, kernel, flops, ms, naive_ms, naive_extra) in passes {
                ctx.attention.push(AttentionResult {
                    pass,
                    kernel: kernel.name(),
                    dtype: F::DTYPE.to_string(),
                    batch,
                    seq,
                    q_heads,
                    kv_heads,
                    head_dim,
                    causal: true,
                    flops,
                    median_ms: ms,
                    tflop_per_s: flops / (ms * 1e-3) / 1e12,
                    extra_bytes: stat_bytes,
                    naive_median_ms: naive_ms,
                    naive_extra_bytes: if naive_ms.is_nan() { 0 } else { naive_extra },
                    speedup_over_naive: naive_ms / ms,
                });
            }
        }
    }
    Ok(())
}

/// The GEMMs of a Llama-2-7B training step at `tokens` rows (each layer's projections in the
/// three passes, and the lm_head), each on the routine a run would choose (the device's table,
/// or the built-in choice). f32 without TF32 and slow devices (lavapipe) measure only the MLP's
/// up projection and its two backward products, which alone take seconds there.
fn bench_matmul<R: BackendRuntime, F: FloatElement>(ctx: &mut Ctx<'_, R>, tokens: usize) -> Result<()> {
    let dev = ctx.dev;
    let n = ctx.fit(tokens, INTERMEDIATE * size_of::<F>());
    let config = model::LlamaConfig::preset("llama2-7b")?;
    let mut gemms = crate::tune::step_gemms(&config, n)?;
    let full = ctx.fast && (F::DTYPE != DType::F32 || dev.policy().allow_tf32);
    if !full {
        gemms.retain(|g| g.in_features == HIDDEN && g.out_features == INTERMEDIATE && !g.accumulate);
        gemms.truncate(3);
    }
    let mut inputs = crate::tune::Inputs::default();
    for gemm in &gemms {
        let (pass, shape) = (gemm.pass.label(gemm.accumulate), gemm.shape());
        eprintln!("matmul {} {pass} {} {shape}…", gemm.what, F::DTYPE);
        let key = gemm.key(F::DTYPE, dev.policy().allow_tf32);
        let routine = kernels::matmul::choose(dev, &key);
        let measured = crate::tune::measure::<R, F>(dev, gemm, &[routine], ctx.iters, &mut inputs)?;
        let (ran, ms) = match (measured.best, measured.timings.first()) {
            (Some(best), _) => best,
            (None, Some(t)) => bail!("matmul {pass} {shape}: {}", t.note),
            (None, None) => bail!("matmul {pass} {shape}: nothing ran"),
        };
        ctx.matmul.push(MatmulResult {
            what: gemm.what.clone(),
            pass,
            dtype: F::DTYPE.to_string(),
            shape,
            routine: ran.name().to_string(),
            median_ms: ms,
            tflop_per_s: key.flops() / (ms * 1e-3) / 1e12,
        });
    }
    Ok(())
}

fn print_table(report: &Report) {
    println!("device: {}", report.device);
    println!(
        "copy bandwidth: {:.1} GB/s ({} MiB read + written, median {:.3} ms); {} tokens per batch",
        report.copy.gb_per_s,
        report.copy.bytes_moved >> 20,
        report.copy.median_ms,
        report.tokens
    );
    if !report.kernels.is_empty() {
        println!();
        println!(
            "{:<14} {:<10} {:<6} {:<24} {:>11} {:>9} {:>8}",
            "kernel", "pass", "dtype", "shape", "median", "GB/s", "of copy"
        );
    }
    for k in &report.kernels {
        println!(
            "{:<14} {:<10} {:<6} {:<24} {:>8.3} ms {:>9.1} {:>7.0}%",
            k.kernel,
            k.pass,
            k.dtype,
            k.shape,
            k.median_ms,
            k.gb_per_s,
            100.0 * k.fraction_of_copy
        );
    }
    if !report.matmul.is_empty() {
        println!();
        println!(
            "{:<22} {:<13} {:<6} {:<26} {:<20} {:>11} {:>9}",
            "matmul", "pass", "dtype", "shape", "routine", "median", "GFLOP/s"
        );
    }
    for m in &report.matmul {
        println!(
            "{:<22} {:<13} {:<6} {:<26} {:<20} {:>8.3} ms {:>9.1}",
            m.what,
            m.pass,
            m.dtype,
            m.shape,
            m.routine,
            m.median_ms,
            m.tflop_per_s * 1e3
        );
    }
    if report.attention.is_empty() {
        return;
    }
    println!();
    println!(
        "attention, causal (FLOPs: 2·B·Hq·T²·hd forward, 2.5× that backward; extra = memory beyond inputs/outputs)"
    );
    println!(
        "{:<9} {:<13} {:<6} {:<6} {:<8} {:>5} {:>11} {:>9} {:>9} {:>12} {:>11} {:>8}",
        "pass",
        "kernel",
        "dtype",
        "T",
        "heads",
        "hd",
        "median",
        "GFLOP/s",
        "extra",
        "naive",
        "naive extra",
        "speedup"
    );
    for a in &report.attention {
        println!(
            "{:<9} {:<13} {:<6} {:<6} {:<8} {:>5} {:>8.2} ms {:>9.1} {:>6} KiB {:>9.2} ms {:>7} MiB {:>7.2}x",
            a.pass,
            a.kernel,
            a.dtype,
            a.seq,
            format!("{}:{}", a.q_heads, a.kv_heads),
            a.head_dim,
            a.median_ms,
            a.tflop_per_s * 1e3,
            a.extra_bytes >> 10,
            a.naive_median_ms,
            a.naive_extra_bytes >> 20,
            a.speedup_over_naive
        );
    }
}
