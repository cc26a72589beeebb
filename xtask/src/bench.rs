//! `cargo xtask bench`: the device's copy bandwidth, then every kernel's achieved bandwidth as
//! a fraction of it, measured in the same process.
//!
//! Bytes counted for a kernel are the tensors it must read and write once (inputs, outputs,
//! saved statistics); scratch traffic of our own making (RMSNorm's dweight partials) is not
//! counted, so it shows as lost bandwidth. Times are medians of timed runs after warm-up, each
//! run enqueued and then synchronised with the device.

use crate::BackendArg;
use anyhow::{Context, Result};
use dsl::{BackendRuntime, DType, Device, FloatElement, GpuTensor, OnDevice};
use kernels::rmsnorm::{rmsnorm_backward, rmsnorm_backward_scratch_rows, rmsnorm_forward};
use serde::Serialize;
use std::time::Instant;

#[derive(clap::Args)]
pub struct BenchArgs {
    #[command(flatten)]
    backend: BackendArg,
    /// Print one JSON document on standard output instead of the table.
    #[arg(long)]
    json: bool,
    /// Rows (B·T) for the row kernels; default scales with the device (16384 on a fast GPU,
    /// 1024 on a slow device such as lavapipe).
    #[arg(long)]
    rows: Option<usize>,
    /// Hidden size for the row kernels.
    #[arg(long, default_value_t = 4096)]
    hidden: usize,
    /// Timed runs per measurement (the median is reported).
    #[arg(long, default_value_t = 10)]
    iters: usize,
}

#[derive(Serialize)]
struct Report {
    backend: String,
    device: String,
    copy: CopyResult,
    kernels: Vec<KernelResult>,
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

pub fn run(args: BenchArgs) -> Result<()> {
    let backend = args.backend.resolve_or_reexec()?;
    let Some(backend) = backend else { return Ok(()) };
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
        let copy = measure_copy(dev, self.args.iters)?;
        eprintln!("copy bandwidth: {:.1} GB/s", copy.gb_per_s);
        let rows = self.args.rows.unwrap_or(if copy.gb_per_s >= FAST_DEVICE_GBPS { 16384 } else { 1024 });
        let mut kernels = Vec::new();
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let results = match dtype {
                DType::F32 => bench_rmsnorm::<R, f32>(dev, rows, self.args.hidden, self.args.iters, &copy),
                DType::F16 => {
                    bench_rmsnorm::<R, half::f16>(dev, rows, self.args.hidden, self.args.iters, &copy)
                }
                DType::BF16 => {
                    bench_rmsnorm::<R, half::bf16>(dev, rows, self.args.hidden, self.args.iters, &copy)
                }
                DType::U32 | DType::I32 => unreachable!("not a float type"),
            };
            match results {
                Some(r) => kernels.extend(r?),
                None => eprintln!("{dtype}: not supported by this device, skipped"),
            }
        }
        Ok(Report { backend: dev.backend().to_string(), device: dev.info().to_string(), copy, kernels })
    }
}

/// Median wall time of `iters` runs of `launch` followed by a device sync, after 3 warm-ups
/// (the first launch of each kernel compiles it).
fn time_ms<R: BackendRuntime>(
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

fn bench_rmsnorm<R: BackendRuntime, F: FloatElement>(
    dev: &Device<R>,
    rows: usize,
    hidden: usize,
    iters: usize,
    copy: &CopyResult,
) -> Option<Result<Vec<KernelResult>>> {
    if !dev.supports::<F>() {
        return None;
    }
    Some((|| {
        let shape = [rows, hidden];
        let x = GpuTensor::<R, F>::full(dev, &shape, F::from_f64_rounded(0.5))?;
        let weight = GpuTensor::<R, F>::full(dev, &[hidden], F::from_f64_rounded(1.0))?;
        let dout = GpuTensor::<R, F>::full(dev, &shape, F::from_f64_rounded(0.25))?;
        let mut out = GpuTensor::<R, F>::uninit(dev, &shape)?;
        let mut rstd = GpuTensor::<R, f32>::uninit(dev, &[rows])?;
        let mut dx = GpuTensor::<R, F>::uninit(dev, &shape)?;
        let mut dweight = GpuTensor::<R, F>::zeros(dev, &[hidden])?;
        let mut scratch =
            GpuTensor::<R, f32>::uninit(dev, &[rmsnorm_backward_scratch_rows(dev, rows), hidden])?;
        let elem = size_of::<F>() as u64;
        let (act, row_stat) = ((rows * hidden) as u64 * elem, rows as u64 * 4);
        let param = hidden as u64 * elem;
        let result = |pass, bytes: u64, ms: f64| KernelResult {
            kernel: "rmsnorm",
            pass,
            dtype: F::DTYPE.to_string(),
            shape: format!("{rows}x{hidden}"),
            bytes_moved: bytes,
            median_ms: ms,
            gb_per_s: gb_per_s(bytes, ms),
            fraction_of_copy: gb_per_s(bytes, ms) / copy.gb_per_s,
        };
        eprintln!("rmsnorm {} {rows}x{hidden}: forward…", F::DTYPE);
        let fwd = time_ms(dev, iters, || Ok(rmsnorm_forward(dev, &mut out, &mut rstd, &x, &weight, 1e-5)?))?;
        eprintln!("rmsnorm {} {rows}x{hidden}: backward…", F::DTYPE);
        let bwd = time_ms(dev, iters, || {
            Ok(rmsnorm_backward(dev, &mut dx, &mut dweight, &mut scratch, &dout, &x, &weight, &rstd)?)
        })?;
        Ok(vec![
            // read x, weight; write out, rstd
            result("forward", 2 * act + param + row_stat, fwd),
            // read dout, x, weight, rstd, dweight; write dx, dweight
            result("backward", 3 * act + 3 * param + row_stat, bwd),
        ])
    })())
}

fn print_table(report: &Report) {
    println!("device: {}", report.device);
    println!(
        "copy bandwidth: {:.1} GB/s ({} MiB read + written, median {:.3} ms)",
        report.copy.gb_per_s,
        report.copy.bytes_moved >> 20,
        report.copy.median_ms
    );
    println!();
    println!(
        "{:<10} {:<9} {:<6} {:<12} {:>11} {:>9} {:>8}",
        "kernel", "pass", "dtype", "shape", "median", "GB/s", "of copy"
    );
    for k in &report.kernels {
        println!(
            "{:<10} {:<9} {:<6} {:<12} {:>8.3} ms {:>9.1} {:>7.0}%",
            k.kernel,
            k.pass,
            k.dtype,
            k.shape,
            k.median_ms,
            k.gb_per_s,
            100.0 * k.fraction_of_copy
        );
    }
}
