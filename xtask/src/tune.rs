//! Which matmul routines a run uses: `--tf32` and `--matmul-table` (train, sft, eval, generate,
//! bench), and `cargo xtask tune-matmul`, which times every routine the device offers on a
//! model's GEMMs and writes the table runs then load.
//!
//! Tables live in `tuning/matmul/`, one file per device signature
//! ([`dsl::DeviceInfo::signature`]); a run loads the file made on a device like its own, so a
//! table measured once on an H100 and committed serves every H100 run.

use crate::BackendArg;
use crate::bench::time_ms;
use anyhow::{Context, Result, bail};
use dsl::{BackendRuntime, DType, Device, FloatElement, GpuTensor, KernelPolicy, OnDevice};
use kernels::matmul::{
    MatmulEntry, MatmulKey, MatmulRoutine, MatmulTable, RoutineTiming, linear_backward_input_with,
    linear_backward_weight_with, linear_forward_with,
};
use model::LlamaConfig;
use model::activations::HeadChunk;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Where tables are kept, relative to the repository (or the device bundle's) root.
pub const TABLE_DIR: &str = "tuning/matmul";

/// The matmul options of commands that run the model.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct KernelArgs {
    /// Let f32 matmuls run on TF32 tensor cores (CUDA): inputs rounded to 10 mantissa bits
    /// (f16's), products summed in f32. A precision trade for speed, off by default: without
    /// it f32 stays f32.
    #[arg(long)]
    pub tf32: bool,
    /// Matmul routine table (from `cargo xtask tune-matmul`). Default: tuning/matmul/'s table
    /// for this device's signature, if there is one; `none`: the built-in choice.
    #[arg(long, value_name = "FILE|none")]
    pub matmul_table: Option<PathBuf>,
}

impl KernelArgs {
    /// `dev` with this run's kernel policy, and a line saying what it is (for the startup
    /// report). An unreadable table is an error. A table named with `--matmul-table` is used
    /// even if measured on another device (its choices are only slower there, never wrong:
    /// the line says so); one found by search must record the device its file name is for.
    pub fn apply<R: BackendRuntime>(&self, dev: &Device<R>) -> Result<(Device<R>, String)> {
        let signature = dev.info().signature();
        let mut policy = KernelPolicy { allow_tf32: self.tf32, ..Default::default() };
        let found = match &self.matmul_table {
            Some(path) if path.as_os_str() == "none" => None,
            Some(path) => {
                let table = MatmulTable::load(path)?;
                let note = if table.device == signature {
                    String::new()
                } else {
                    format!(" (measured on `{}`, not this device)", table.device)
                };
                Some((path.clone(), table, note))
            }
            None => find_table(&signature)?.map(|(path, table)| (path, table, String::new())),
        };
        let mut line = match &found {
            Some((path, table, note)) => {
                format!("matmul routines: {} measured shapes from {}{note}", table.len(), path.display())
            }
            None if self.matmul_table.is_some() => {
                "matmul routines: built-in choice (--matmul-table none)".into()
            }
            None => format!(
                "matmul routines: built-in choice (no {TABLE_DIR}/{}.json; `cargo xtask tune-matmul` measures one)",
                slug(&signature)
            ),
        };
        if self.tf32 {
            line.push_str("; f32 products on TF32 tensor cores where offered");
        }
        if let Some((_, table, _)) = found {
            policy.tables.push(Arc::new(table));
        }
        Ok((dev.with_policy(policy), line))
    }
}

/// The table file name for a device signature: lower case, runs of other characters as `-`.
pub fn slug(signature: &str) -> String {
    let mut out = String::new();
    for c in signature.chars() {
        if c.is_ascii_alphanumeric() {
            out.push(c.to_ascii_lowercase());
        } else if !out.ends_with('-') {
            out.push('-');
        }
    }
    out.trim_matches('-').to_string()
}

/// Folders searched for tables: the working directory's `tuning/matmul`, then the one beside
/// the executable (a device bundle), then the source tree's.
fn table_dirs() -> Vec<PathBuf> {
    let mut dirs = vec![PathBuf::from(TABLE_DIR)];
    if let Some(dir) = std::env::current_exe().ok().and_then(|e| e.parent().map(Path::to_path_buf)) {
        dirs.push(dir.join(TABLE_DIR));
        if let Some(up) = dir.parent() {
            dirs.push(up.join(TABLE_DIR));
        }
    }
    dirs.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(TABLE_DIR));
    dirs
}

fn find_table(signature: &str) -> Result<Option<(PathBuf, MatmulTable)>> {
    let name = format!("{}.json", slug(signature));
    for dir in table_dirs() {
        let path = dir.join(&name);
        if path.is_file() {
            let table = MatmulTable::load(&path)?;
            if table.device != signature {
                bail!(
                    "{}: measured on `{}`, but its name is for `{signature}`",
                    path.display(),
                    table.device
                );
            }
            return Ok(Some((path, table)));
        }
    }
    Ok(None)
}

/// Which of the linear layer's three products a GEMM is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pass {
    /// `y = x·Wᵀ`.
    Forward,
    /// `dx = dy·W` (`+=` when `accumulate`).
    BackwardInput,
    /// `dW += dyᵀ·x`, into the trainer's f32 weight gradient.
    BackwardWeight,
}

impl Pass {
    /// The label `cargo xtask bench` and the device check's PyTorch baselines read (the
    /// transposes are taken from it).
    pub fn label(self, accumulate: bool) -> &'static str {
        match (self, accumulate) {
            (Pass::Forward, _) => "y = x·Wᵀ",
            (Pass::BackwardInput, false) => "dx = dy·W",
            (Pass::BackwardInput, true) => "dx += dy·W",
            (Pass::BackwardWeight, _) => "dW += dyᵀ·x",
        }
    }
}

/// One GEMM of a training step: the linear layer `[rows, in] → [rows, out]` and the pass.
#[derive(Clone, Debug)]
pub struct Gemm {
    /// The weights it serves (`q, k, v`, `mlp.down`, …).
    pub what: String,
    pub pass: Pass,
    pub rows: usize,
    pub in_features: usize,
    pub out_features: usize,
    /// `dx +=` (the input gradient of the second and later weights sharing an input).
    pub accumulate: bool,
}

impl Gemm {
    /// The product's key with `F` inputs (weight gradients are f32, as the trainer keeps them).
    pub fn key(&self, dtype: DType, tf32: bool) -> MatmulKey {
        let (m, n, k, lhs_t, rhs_t, out) = match self.pass {
            Pass::Forward => (self.rows, self.out_features, self.in_features, false, true, dtype),
            Pass::BackwardInput => (self.rows, self.in_features, self.out_features, false, false, dtype),
            Pass::BackwardWeight => (self.out_features, self.in_features, self.rows, true, false, DType::F32),
        };
        MatmulKey {
            m,
            n,
            k,
            lhs_transposed: lhs_t,
            rhs_transposed: rhs_t,
            dtype,
            out_dtype: out,
            accumulate: self.accumulate || self.pass == Pass::BackwardWeight,
            tf32: tf32 && dtype == DType::F32,
        }
    }

    /// `M×K·K×N`, as the bench writes shapes.
    pub fn shape(&self) -> String {
        let k = self.key(DType::F32, false);
        format!("{}x{}·{}x{}", k.m, k.k, k.k, k.n)
    }
}

/// The distinct GEMMs of one training step of `config` at `tokens` rows: each decoder layer's
/// projections (forward, input gradient with and without `+=`, weight gradient) and the
/// lm_head's, in the row blocks the model runs it in.
pub fn step_gemms(config: &LlamaConfig, tokens: usize) -> Result<Vec<Gemm>> {
    let (c, q, kv, inter) = (config.hidden_size, config.q_dim(), config.kv_dim(), config.intermediate_size);
    let head_rows = HeadChunk::Auto.rows(config, tokens)?;
    // (what, in, out, rows, whether its input gradient adds onto another's)
    let linears = [
        ("q", c, q, tokens, false),
        ("k, v", c, kv, tokens, true),
        ("o", q, c, tokens, false),
        ("mlp.gate", c, inter, tokens, false),
        ("mlp.up", c, inter, tokens, true),
        ("mlp.down", inter, c, tokens, false),
        ("lm_head", c, config.vocab_size, head_rows, false),
    ];
    let mut gemms: Vec<Gemm> = Vec::new();
    let mut add = |gemm: Gemm| {
        let key = gemm.key(DType::F32, false);
        match gemms.iter_mut().find(|g| g.key(DType::F32, false) == key) {
            Some(same) => same.what = format!("{}, {}", same.what, gemm.what),
            None => gemms.push(gemm),
        }
    };
    for pass in [Pass::Forward, Pass::BackwardInput, Pass::BackwardWeight] {
        for &(what, in_features, out_features, rows, accumulates) in &linears {
            let accumulate = pass == Pass::BackwardInput && accumulates;
            add(Gemm { what: what.to_string(), pass, rows, in_features, out_features, accumulate });
        }
    }
    Ok(gemms)
}

/// Every routine's time on one GEMM, checked against the first routine's result.
pub struct Measured {
    pub key: MatmulKey,
    pub timings: Vec<RoutineTiming>,
    /// The fastest routine that ran as asked and agreed with the first.
    pub best: Option<(MatmulRoutine, f64)>,
}

/// Times each of `routines` (the first is the reference: the default routine) on `gemm` with
/// `F` inputs, after checking that each computes what the first does: within 1e-2 of the
/// largest output for half-precision outputs and TF32, 1e-4 for f32 (summation order only; a
/// broken routine is off by the outputs' size). Outputs over 4M elements are compared on their
/// first and last 128 rows (downloading 10⁸ outputs per routine would take longer than the
/// timing). `inputs` keeps the pseudo-random tensors between calls (GEMMs share them).
pub fn measure<R: BackendRuntime, F: FloatElement>(
    dev: &Device<R>,
    gemm: &Gemm,
    routines: &[MatmulRoutine],
    iters: usize,
    inputs: &mut Inputs<R>,
) -> Result<Measured> {
    let key = gemm.key(F::DTYPE, dev.policy().allow_tf32);
    let tolerance = if key.tf32 || key.out_dtype != DType::F32 { 1e-2 } else { 1e-4 };
    let mut operands = Operands::<R, F>::new(dev, gemm, inputs)?;
    let mut reference: Option<Vec<f64>> = None;
    let mut timings = Vec::new();
    let mut best: Option<(MatmulRoutine, f64)> = None;
    for &routine in routines {
        let timing =
            |median_ms, note: String| RoutineTiming { routine: routine.name().into(), median_ms, note };
        // One product onto the start values, checked; then the timed ones (`+=` keeps adding,
        // which costs the same).
        operands.reset(dev)?;
        let ran = operands.run(dev, gemm, routine)?;
        if ran != routine {
            timings.push(timing(None, format!("cannot take this product (ran {ran} instead)")));
            continue;
        }
        let values = operands.output_sample(dev)?;
        let diff = match &reference {
            Some(want) => relative_difference(&values, want),
            None => {
                reference = Some(values);
                0.0
            }
        };
        if diff.is_nan() || diff > tolerance {
            let note =
                format!("wrong result: differs from {} by {diff:.1e} of the largest output", routines[0]);
            timings.push(timing(None, note));
            continue;
        }
        let ms = time_ms(dev, iters, || operands.run(dev, gemm, routine).map(|_| ()))?;
        if best.is_none_or(|(_, b)| ms < b) {
            best = Some((routine, ms));
        }
        timings.push(timing(Some(ms), String::new()));
    }
    Ok(Measured { key, timings, best })
}

type InputTensor = (DType, Vec<usize>, u64, Box<dyn std::any::Any>);

/// Pseudo-random tensors by (element type, shape, seed), made once and shared by the GEMMs.
pub struct Inputs<R: BackendRuntime> {
    /// (element type, shape, seed, the `GpuTensor<R, E>`).
    tensors: Vec<InputTensor>,
    _runtime: std::marker::PhantomData<R>,
}

impl<R: BackendRuntime> Default for Inputs<R> {
    fn default() -> Self {
        Self { tensors: Vec::new(), _runtime: std::marker::PhantomData }
    }
}

impl<R: BackendRuntime> Inputs<R> {
    fn get<E: FloatElement>(
        &mut self,
        dev: &Device<R>,
        shape: &[usize],
        seed: u64,
    ) -> Result<GpuTensor<R, E>> {
        let found = self.tensors.iter().find(|(d, s, k, _)| *d == E::DTYPE && s == shape && *k == seed);
        if let Some(t) = found.and_then(|(_, _, _, t)| t.downcast_ref::<GpuTensor<R, E>>()) {
            return Ok(t.clone());
        }
        let tensor = pseudo_random::<R, E>(dev, shape, seed)?;
        self.tensors.push((E::DTYPE, shape.to_vec(), seed, Box::new(tensor.clone())));
        Ok(tensor)
    }
}

/// The output a pass writes: `y`/`dx` in the input type, or the f32 weight gradient.
enum Output<R: BackendRuntime, F: FloatElement> {
    Same { out: GpuTensor<R, F>, start: GpuTensor<R, F> },
    F32 { out: GpuTensor<R, f32>, start: GpuTensor<R, f32> },
}

/// A GEMM's tensors: the inputs, and the output with the start values `+=` adds onto.
struct Operands<R: BackendRuntime, F: FloatElement> {
    x: GpuTensor<R, F>,
    w: GpuTensor<R, F>,
    dy: GpuTensor<R, F>,
    output: Output<R, F>,
}

impl<R: BackendRuntime, F: FloatElement> Operands<R, F> {
    fn new(dev: &Device<R>, g: &Gemm, inputs: &mut Inputs<R>) -> Result<Self> {
        let output = match g.pass {
            Pass::BackwardWeight => {
                let start = inputs.get::<f32>(dev, &[g.out_features, g.in_features], 5)?;
                Output::F32 { out: GpuTensor::uninit(dev, start.shape())?, start }
            }
            pass => {
                let cols = if pass == Pass::Forward { g.out_features } else { g.in_features };
                let start = inputs.get::<F>(dev, &[g.rows, cols], 4)?;
                Output::Same { out: GpuTensor::uninit(dev, start.shape())?, start }
            }
        };
        Ok(Self {
            x: inputs.get(dev, &[g.rows, g.in_features], 1)?,
            w: inputs.get(dev, &[g.out_features, g.in_features], 2)?,
            dy: inputs.get(dev, &[g.rows, g.out_features], 3)?,
            output,
        })
    }

    fn reset(&mut self, dev: &Device<R>) -> Result<()> {
        match &mut self.output {
            Output::Same { out, start } => out.copy_from(dev, start)?,
            Output::F32 { out, start } => out.copy_from(dev, start)?,
        }
        Ok(())
    }

    fn run(&mut self, dev: &Device<R>, g: &Gemm, routine: MatmulRoutine) -> Result<MatmulRoutine> {
        let r = Some(routine);
        Ok(match (&mut self.output, g.pass) {
            (Output::Same { out, .. }, Pass::Forward) => linear_forward_with(dev, r, out, &self.x, &self.w)?,
            (Output::Same { out, .. }, _) => {
                linear_backward_input_with(dev, r, out, &self.dy, &self.w, g.accumulate)?
            }
            (Output::F32 { out, .. }, _) => linear_backward_weight_with(dev, r, out, &self.dy, &self.x)?,
        })
    }

    /// The output, or its first and last 128 rows when it holds over 4M elements.
    fn output_sample(&self, dev: &Device<R>) -> Result<Vec<f64>> {
        fn sample<R: BackendRuntime, E: FloatElement>(
            dev: &Device<R>,
            t: &GpuTensor<R, E>,
        ) -> Result<Vec<f64>> {
            let rows = t.rows();
            if t.numel() <= 1 << 22 || rows <= 256 {
                return Ok(t.to_f64_vec(dev)?);
            }
            let mut values = t.rows_view(0, 128)?.to_f64_vec(dev)?;
            values.extend(t.rows_view(rows - 128, 128)?.to_f64_vec(dev)?);
            Ok(values)
        }
        match &self.output {
            Output::Same { out, .. } => sample(dev, out),
            Output::F32 { out, .. } => sample(dev, out),
        }
    }
}

/// max |a − b| over max |b| (NaN when either holds a NaN).
fn relative_difference(got: &[f64], want: &[f64]) -> f64 {
    let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(f64::MIN_POSITIVE);
    let worst = got
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f64, |m, d| if d.is_nan() { f64::NAN } else { m.max(d) });
    worst / scale
}

/// Values in [-1, 1) from a counter hash, generated on every core (a 7B step's inputs hold
/// 10⁸ elements; what matters is that no two routines can agree by accident).
fn pseudo_random<R: BackendRuntime, E: FloatElement>(
    dev: &Device<R>,
    shape: &[usize],
    seed: u64,
) -> Result<GpuTensor<R, E>> {
    use rayon::prelude::*;
    let n: usize = shape.iter().product();
    let values: Vec<E> = (0..n as u64)
        .into_par_iter()
        .map(|i| {
            let mut z = (i ^ (seed << 40)).wrapping_add(0x9E37_79B9_7F4A_7C15);
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            E::from_f64_rounded(((z >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0)
        })
        .collect();
    Ok(GpuTensor::from_slice(dev, &values, shape)?)
}

#[derive(clap::Args)]
pub struct TuneArgs {
    #[command(flatten)]
    backend: BackendArg,
    /// The model whose training-step GEMMs are measured.
    #[arg(long, default_value = "llama2-7b")]
    preset: String,
    /// Rows (B·T tokens) per step [default: 16384 on CUDA, 512 elsewhere].
    #[arg(long)]
    tokens: Option<usize>,
    /// Input element types to measure, comma-separated [default: bf16,f16 on CUDA, f32
    /// elsewhere].
    #[arg(long, value_delimiter = ',')]
    dtype: Vec<String>,
    /// Also measure f32 on TF32 tensor cores (the choices `--tf32` runs use).
    #[arg(long)]
    tf32: bool,
    /// Timed runs per routine and shape (the median counts).
    #[arg(long, default_value_t = 5)]
    iters: usize,
    /// Table to write (entries for the same products are replaced, others kept) [default:
    /// tuning/matmul/<device signature>.json].
    #[arg(long)]
    out: Option<PathBuf>,
    /// Print the measurements as one JSON document on standard output.
    #[arg(long)]
    json: bool,
}

pub fn run(args: TuneArgs) -> Result<()> {
    let Some(backend) = args.backend.resolve_or_reexec()? else { return Ok(()) };
    dsl::on_device(backend, Tune { args: &args })?
}

struct Tune<'a> {
    args: &'a TuneArgs,
}

impl OnDevice for Tune<'_> {
    type Output = Result<()>;
    fn run<R: BackendRuntime>(self, dev: &Device<R>) -> Result<()> {
        let args = self.args;
        let cuda = dev.backend() == dsl::Backend::Cuda;
        let tokens = args.tokens.unwrap_or(if cuda { 16384 } else { 512 });
        let config = LlamaConfig::preset(&args.preset)?;
        let gemms = step_gemms(&config, tokens)?;
        let signature = dev.info().signature();
        let path = args
            .out
            .clone()
            .unwrap_or_else(|| Path::new(TABLE_DIR).join(format!("{}.json", slug(&signature))));
        let mut table = if path.is_file() {
            let table = MatmulTable::load(&path)?;
            if table.device != signature {
                bail!(
                    "{} was measured on `{}`; this device is `{signature}`: pass another --out",
                    path.display(),
                    table.device
                );
            }
            table
        } else {
            MatmulTable::new(signature.clone(), String::new())
        };
        let dtypes: Vec<String> = if args.dtype.is_empty() {
            if cuda { vec!["bf16".into(), "f16".into()] } else { vec!["f32".into()] }
        } else {
            args.dtype.clone()
        };
        // f32 runs on TF32 tensor cores with --tf32 (only those: strict f32 has no choice to
        // make beyond the unit routines), and is measured so even if not listed.
        let mut runs: Vec<(DType, bool)> = Vec::new();
        for name in &dtypes {
            let dtype: DType = name.parse().map_err(anyhow::Error::msg)?;
            if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16) {
                bail!("--dtype {name}: matmuls take f32, f16 or bf16");
            }
            runs.push((dtype, args.tf32 && dtype == DType::F32));
        }
        if args.tf32 && !runs.contains(&(DType::F32, true)) {
            runs.push((DType::F32, true));
        }
        table.measured_by = format!(
            "cargo xtask tune-matmul --preset {} --tokens {tokens} --iters {}",
            args.preset, args.iters
        );
        eprintln!("device: {}\nsignature: {signature}", dev.info());
        eprintln!(
            "{} GEMMs of a {} step at {tokens} rows; {} timed runs each",
            gemms.len(),
            args.preset,
            args.iters
        );
        let mut report = Vec::new();
        // Written after every GEMM, so a run cut short keeps what it measured.
        let mut record = |gemm: &Gemm, m: Measured| -> Result<()> {
            if let Some((best, _)) = m.best {
                let what = format!("{} {}", gemm.what, gemm.pass.label(gemm.accumulate));
                table.insert(MatmulEntry::new(&m.key, what, best, m.timings.clone()))?;
                save(&table, &path)?;
            }
            report.push((gemm.clone(), m));
            Ok(())
        };
        for (dtype, tf32) in runs {
            let dev = dev.with_policy(KernelPolicy { allow_tf32: tf32, ..Default::default() });
            match dtype {
                DType::F32 => measure_all::<R, f32>(&dev, &gemms, args.iters, &mut record)?,
                DType::F16 => measure_all::<R, half::f16>(&dev, &gemms, args.iters, &mut record)?,
                _ => measure_all::<R, half::bf16>(&dev, &gemms, args.iters, &mut record)?,
            }
        }
        if args.json {
            let rows: Vec<_> = report
                .iter()
                .map(|(g, m)| {
                    serde_json::json!({
                        "what": g.what, "pass": g.pass.label(g.accumulate), "key": m.key.to_string(),
                        "flops": m.key.flops(), "best": m.best.map(|(r, _)| r.name()),
                        "timings": m.timings,
                    })
                })
                .collect();
            println!("{}", serde_json::json!({ "device": signature, "tokens": tokens, "gemms": rows }));
        } else {
            print_report(&report);
        }
        let measured = report.iter().filter(|(_, m)| m.best.is_some()).count();
        eprintln!(
            "wrote {} ({measured} products measured now); runs on this device load it by default",
            path.display()
        );
        Ok(())
    }
}

/// Writes `table` to `path` through a temporary file, so an interrupted write leaves the old one.
fn save(table: &MatmulTable, path: &Path) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, table.to_json() + "\n").with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

/// Measures every routine the device offers for `F` on each GEMM, the default routine first
/// (the reference the others are checked against), handing each result to `record`.
fn measure_all<R: BackendRuntime, F: FloatElement>(
    dev: &Device<R>,
    gemms: &[Gemm],
    iters: usize,
    record: &mut impl FnMut(&Gemm, Measured) -> Result<()>,
) -> Result<()> {
    let mut inputs = Inputs::default();
    for g in gemms {
        let key = g.key(F::DTYPE, dev.policy().allow_tf32);
        let default = kernels::matmul::choose(
            &dev.with_policy(KernelPolicy { tables: Vec::new(), ..dev.policy().clone() }),
            &key,
        );
        let mut routines = vec![default];
        routines.extend(MatmulRoutine::offered(dev, F::DTYPE).into_iter().filter(|&r| r != default));
        eprintln!("{} {} {} {}…", F::DTYPE, g.what, g.pass.label(g.accumulate), g.shape());
        let measured = measure::<R, F>(dev, g, &routines, iters, &mut inputs)
            .with_context(|| format!("measuring {} {}", g.what, g.shape()))?;
        record(g, measured)?;
    }
    Ok(())
}

fn print_report(report: &[(Gemm, Measured)]) {
    for (gemm, m) in report {
        println!("{} {} — {} ({})", gemm.what, gemm.pass.label(gemm.accumulate), m.key, gemm.shape());
        for t in &m.timings {
            let chosen = if m.best.is_some_and(|(r, _)| r.name() == t.routine) { " ← fastest" } else { "" };
            match t.median_ms {
                Some(ms) => println!(
                    "  {:<22} {:>9.3} ms {:>9.1} GFLOP/s{chosen}",
                    t.routine,
                    ms,
                    m.key.flops() / (ms * 1e-3) / 1e9
                ),
                None => println!("  {:<22} {}", t.routine, t.note),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_come_from_the_signature() {
        assert_eq!(
            slug("cuda, 132 SMs, 227 KiB shared memory, 1024 units/cube, plane 32"),
            "cuda-132-sms-227-kib-shared-memory-1024-units-cube-plane-32"
        );
        assert_eq!(slug("wgpu<wgsl>, processors unknown"), "wgpu-wgsl-processors-unknown");
    }

    /// Llama-2-7B (no grouped-query attention: k and v are as wide as q) at 16k tokens: q, k,
    /// v and o share a forward shape, gate and up another; every input gradient after the
    /// first of a shared input adds on; weight gradients accumulate into f32.
    #[test]
    fn the_7b_step_has_these_gemms() {
        let config = LlamaConfig::preset("llama2-7b").unwrap();
        let gemms = step_gemms(&config, 16384).unwrap();
        let find = |what: &str, pass: Pass| {
            gemms
                .iter()
                .find(|g| g.what == what && g.pass == pass)
                .unwrap_or_else(|| panic!("{what} {pass:?}"))
        };
        assert_eq!(find("q, k, v, o", Pass::Forward).shape(), "16384x4096·4096x4096");
        assert_eq!(find("mlp.gate, mlp.up", Pass::Forward).shape(), "16384x4096·4096x11008");
        assert_eq!(find("mlp.down", Pass::Forward).shape(), "16384x11008·11008x4096");
        assert!(find("k, v", Pass::BackwardInput).accumulate);
        assert!(!find("q, o", Pass::BackwardInput).accumulate);
        assert!(find("mlp.up", Pass::BackwardInput).accumulate);
        let dw = find("mlp.gate, mlp.up", Pass::BackwardWeight).key(DType::BF16, false);
        assert_eq!(
            (dw.m, dw.n, dw.k, dw.lhs_transposed, dw.out_dtype),
            (11008, 4096, 16384, true, DType::F32)
        );
        assert!(dw.accumulate);
        let head = find("lm_head", Pass::Forward);
        assert_eq!((head.in_features, head.out_features), (4096, 32000));
        assert!(head.rows <= 16384);
        // Forward 4 shapes, input gradient 6 (with and without +=), weight gradient 4.
        assert_eq!(
            gemms.len(),
            4 + 6 + 4,
            "{:?}",
            gemms.iter().map(|g| (&g.what, g.pass)).collect::<Vec<_>>()
        );
    }

    #[test]
    fn tf32_keys_only_f32() {
        let gemm = Gemm {
            what: "t".into(),
            pass: Pass::Forward,
            rows: 8,
            in_features: 4,
            out_features: 2,
            accumulate: false,
        };
        assert!(gemm.key(DType::F32, true).tf32);
        assert!(!gemm.key(DType::BF16, true).tf32);
    }
}
