//! `cargo xtask cuda-report [--arch sm_80,sm_90] [--json]`: every CUDA kernel variant the
//! project launches, compiled offline, with its registers, spills and shared memory per
//! architecture, so a kernel that spills or does not fit is seen before anyone rents a GPU.
//!
//! 1. [`variants`] runs the training step, evaluation and decoding of each model shape (and
//!    the bench's extra attention kernels) on [`offline::OfflineCuda`], a CubeCL runtime whose
//!    server compiles each launched kernel with CubeCL's own CUDA C++ compiler (the one
//!    `cubecl-cuda` uses) and runs nothing. No GPU, driver or CUDA toolkit is needed, nor the
//!    `cuda` cargo feature: the compiler lives in `cubecl-cpp`.
//! 2. [`tools`] compiles each source with NVRTC to PTX (options as `cubecl-cuda` passes them;
//!    `sm_90a` for sm_90, as `cubecl-cuda` does on Hopper) and runs `ptxas -v` on it; NVRTC and
//!    ptxas come from NVIDIA's pip wheels, installed once into `target/cuda-tools/`.
//! 3. [`ptxas`] parses the report. Shared memory = CubeCL's dynamic shared memory (it declares
//!    all of it `extern __shared__` and asks for its size at launch) + ptxas' static `smem`.

mod offline;
mod ptxas;
mod tools;
mod variants;

use anyhow::{Context, Result, bail};
use offline::CapturedKernel;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// NVRTC, ptxas and the CUDA headers, installed from the pinned wheels on first use.
pub fn ensure_tools() -> Result<tools::Tools> {
    tools::ensure()
}

#[derive(clap::Args)]
pub struct CudaReportArgs {
    /// Target architectures, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "sm_80,sm_90")]
    arch: Vec<String>,
    /// Print one JSON document (a list of rows) instead of the table.
    #[arg(long)]
    json: bool,
    /// Only kernels whose name contains this text.
    #[arg(long)]
    filter: Option<String>,
    /// Where the generated .cu, .ptx and ptxas reports are kept [default: target/cuda-report].
    #[arg(long)]
    out: Option<PathBuf>,
    /// Fail when a variant does not fit its architecture (CI), not only when one fails to compile.
    #[arg(long)]
    check: bool,
}

/// One row of the report (the `--json` keys, plus `launched_by` and `dynamic_shared_bytes`).
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub kernel: String,
    pub variant: String,
    pub arch: String,
    pub registers: u32,
    pub spill_stores_bytes: u64,
    pub spill_loads_bytes: u64,
    /// Static (ptxas) + dynamic (CubeCL's launch-time) shared memory per cube.
    pub shared_bytes: u64,
    pub fits: bool,
    /// Units per cube.
    pub units: u32,
    pub dynamic_shared_bytes: u64,
    /// The first workload (preset, dtype, phase) whose launch compiled this variant.
    pub launched_by: String,
    /// Why it does not fit, empty if it does.
    pub limits: String,
}

/// `sm_80` → 80; also accepts `80`, `sm_90a`, `compute_90`.
pub fn parse_arch(text: &str) -> Result<u32> {
    let t = text.trim().to_ascii_lowercase();
    let digits = t.trim_start_matches("sm_").trim_start_matches("compute_").trim_end_matches('a');
    match digits.parse::<u32>() {
        Ok(v) if (50..=120).contains(&v) => Ok(v),
        _ => bail!("unknown architecture `{text}`: expected sm_XX, e.g. sm_80 (A100) or sm_90 (H100/H200)"),
    }
}

/// The `-arch` NVRTC and ptxas get: `sm_90a` from Hopper on, as `cubecl-cuda` compiles there
/// (the `a` features: wgmma, setmaxnreg, TMA multicast).
fn compile_arch(arch: u32) -> String {
    if arch >= 90 { format!("sm_{arch}a") } else { format!("sm_{arch}") }
}

/// Per-block limits: 255 registers per unit, 64 Ki 32-bit registers per cube, 48 KiB static
/// shared memory, the opt-in dynamic maximum of the architecture.
fn check_limits(arch: u32, registers: u32, units: u32, static_shared: u64, total_shared: u64) -> Vec<String> {
    let mut why = Vec::new();
    if registers > 255 {
        why.push(format!("{registers} registers > 255"));
    }
    // Registers are allocated per warp in units of 256 (8 per thread); a cube whose warps need
    // more than the 65536 of an SM fails to launch ("too many resources requested").
    let per_warp = (registers.max(1) * 32).div_ceil(256) * 256;
    let warps = units.div_ceil(32);
    if per_warp * warps > 65536 {
        why.push(format!("{units} units × {registers} registers > 64 Ki registers"));
    }
    if static_shared > 48 * 1024 {
        why.push(format!("{static_shared} B static shared > 48 KiB"));
    }
    let max = offline::max_shared_optin_bytes(arch) as u64;
    if total_shared > max {
        why.push(format!("{total_shared} B shared > {} KiB", max / 1024));
    }
    why
}

pub fn run(args: CudaReportArgs) -> Result<()> {
    let started = Instant::now();
    let archs = args.arch.iter().map(|a| parse_arch(a)).collect::<Result<Vec<_>>>()?;
    if archs.is_empty() {
        bail!("--arch lists no architecture");
    }
    let tools = tools::ensure()?;
    let out_dir =
        args.out.clone().unwrap_or_else(|| crate::cargo::workspace_root().join("target/cuda-report"));
    let jobs = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let mut rows = Vec::new();
    let mut failures = Vec::new();
    for &arch in &archs {
        let t = Instant::now();
        let mut kernels =
            variants::capture(arch).with_context(|| format!("generating CUDA for sm_{arch}"))?;
        if let Some(f) = &args.filter {
            kernels.retain(|k| kernel_name(k).contains(f.as_str()));
        }
        eprintln!(
            "sm_{arch}: {} kernel variants generated in {:.1} s",
            kernels.len(),
            t.elapsed().as_secs_f64()
        );
        let t = Instant::now();
        let (arch_rows, arch_failures) =
            compile_and_measure(&tools, arch, &kernels, &out_dir.join(format!("sm_{arch}")), jobs)?;
        eprintln!("sm_{arch}: NVRTC + ptxas in {:.1} s", t.elapsed().as_secs_f64());
        rows.extend(arch_rows);
        failures.extend(arch_failures);
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        print_table(&rows);
        let spilling = rows.iter().filter(|r| r.spill_stores_bytes + r.spill_loads_bytes > 0).count();
        let misfits = rows.iter().filter(|r| !r.fits).count();
        println!(
            "\n{} rows ({} architectures); {spilling} spill, {misfits} do not fit; sources in {} ({:.0} s)",
            rows.len(),
            archs.len(),
            out_dir.display(),
            started.elapsed().as_secs_f64()
        );
    }
    if !failures.is_empty() {
        for f in &failures {
            eprintln!("{f}\n");
        }
        bail!("{} kernel variant(s) failed to compile (above)", failures.len());
    }
    let misfits: Vec<String> = rows
        .iter()
        .filter(|r| !r.fits)
        .map(|r| format!("{} [{}] {}: {}", r.kernel, r.variant, r.arch, r.limits))
        .collect();
    if args.check && !misfits.is_empty() {
        bail!("{} kernel variant(s) do not fit their architecture:\n{}", misfits.len(), misfits.join("\n"));
    }
    Ok(())
}

/// The `#[cube]` function's name, from the kernel type
/// (`kernels::rmsnorm::rmsnorm_forward_kernel::RmsnormForwardKernel<..>` → `rmsnorm_forward_kernel`).
pub fn kernel_name(k: &CapturedKernel) -> String {
    let path = k.type_name.split('<').next().unwrap_or_default();
    let mut segments = path.rsplit("::");
    let _struct = segments.next();
    segments.next().unwrap_or(path).to_string()
}

/// What distinguishes this variant: element types, comptime arguments and vector sizes (from
/// CubeCL's kernel id), and the cube size. cubek-matmul kernels get a summary of their
/// blueprint (routine, tile/partition/stage sizes, layouts, dtypes) instead of the whole id.
pub fn variant_name(k: &CapturedKernel) -> String {
    let (x, y, z) = k.cube_dim;
    let cube = if (y, z) == (1, 1) { format!("cube {x}") } else { format!("cube {x}×{y}×{z}") };
    let body = if k.type_name.contains("cubek_matmul") {
        // The routine families are in the type, the blueprint in the id.
        matmul_summary(&format!("{} {}", k.type_name, k.id))
    } else {
        plain_summary(k)
    };
    format!("{body} {cube}")
}

/// Element types of the kernel's generics (`half::bf16::bf16` → `bf16`) and the comptime
/// fields of its id (array arguments without comptime content and runtime scalars dropped).
fn plain_summary(k: &CapturedKernel) -> String {
    let generics = k.type_name.split_once('<').map(|(_, g)| g.trim_end_matches('>')).unwrap_or_default();
    let mut parts: Vec<String> = split_top_level(generics)
        .into_iter()
        .map(|t| short_type(&t))
        .filter(|t| !t.is_empty() && t != "OfflineCuda")
        .collect();
    let flat = k.id.split_whitespace().collect::<Vec<_>>().join(" ");
    let body = flat.split_once('{').map(|(_, b)| b.trim().trim_end_matches('}').trim()).unwrap_or("");
    parts.extend(
        split_top_level(body)
            .into_iter()
            .filter(|f| !f.contains("PhantomData") && !f.contains("CompilationArg") && !f.ends_with(": ()"))
            .map(|f| compact_struct(&short_type(&f))),
    );
    parts.join(" ")
}

/// `cfg: AttentionConfig { head_dim: 32, causal: true, }` → `cfg{head_dim=32 causal=true}`.
fn compact_struct(s: &str) -> String {
    let s = s.replace(", }", " }").replace(": ", "=").replace(", ", " ");
    let mut out = String::new();
    for word in s.split(' ') {
        // Drop a type name that opens a brace (`AttentionConfig {`): the field name says it.
        if out.ends_with('=')
            && word.chars().next().is_some_and(|c| c.is_ascii_uppercase())
            && s.contains(&format!("{word} {{"))
        {
            continue;
        }
        if !out.is_empty() && !out.ends_with('=') && !out.ends_with('{') && word != "}" {
            out.push(' ');
        }
        out.push_str(word);
    }
    out.replace("= {", "{").replace("={", "{").replace(" }", "}")
}

/// The text after `key: ` up to the next `,` at the same nesting depth.
fn field<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    let start = text.find(&format!("{key}: "))? + key.len() + 2;
    let rest = &text[start..];
    let mut depth = 0i32;
    for (i, c) in rest.char_indices() {
        match c {
            '{' | '(' | '[' | '<' => depth += 1,
            '}' | ')' | ']' | '>' => {
                if depth == 0 {
                    return Some(rest[..i].trim());
                }
                depth -= 1;
            }
            ',' if depth == 0 => return Some(rest[..i].trim()),
            _ => {}
        }
    }
    Some(rest.trim())
}

/// `TileSize { m: 16, n: 16, k: 16, }` → `16×16×16`.
fn mnk(text: &str) -> String {
    ["m", "n", "k"].iter().filter_map(|d| field(text, d)).collect::<Vec<_>>().join("×")
}

/// A cubek-matmul kernel id, summarised: routine family and tile kind, tile × partition ×
/// stage sizes, operand layouts, input/accumulator element types, vector sizes, and whether it
/// accumulates into C.
fn matmul_summary(id: &str) -> String {
    let flat = id.split_whitespace().collect::<Vec<_>>().join(" ");
    let words: Vec<&str> =
        flat.split(|c: char| !(c.is_alphanumeric() || c == '_')).filter(|w| !w.is_empty()).collect();
    // `SimpleMatmulFamily<PlaneMatmulFamily<..` → routine `Simple`, tiles per `Plane`.
    let mut families = words.iter().filter_map(|w| w.strip_suffix("MatmulFamily")).filter(|w| !w.is_empty());
    let (family, inner) = (families.next().unwrap_or("?"), families.next().unwrap_or("?"));
    // `lhs_global: Scalar ( Float ( BF16, ), )` → `bf16`.
    let elem = |key: &str| {
        field(&flat, key)
            .and_then(|v| v.split(|c: char| !c.is_alphanumeric()).rfind(|w| !w.is_empty()))
            .unwrap_or("?")
            .to_ascii_lowercase()
    };
    let get = |key: &str| field(&flat, key).unwrap_or("?").to_string();
    let accumulate = flat.contains("acc: Some");
    // What else tells two otherwise equal blueprints apart: bounds checks and swizzles.
    let checks: String = ["m", "n", "k"]
        .iter()
        .filter(|d| field(&flat, &format!("check_{d}_bounds")) == Some("true"))
        .copied()
        .collect();
    let swizzle = field(&flat, "swizzle_modes")
        .map(|v| ["lhs", "rhs"].iter().filter_map(|o| field(v, o)).collect::<Vec<_>>().join("/"))
        .filter(|v| v != "None/None")
        .map(|v| format!(" swizzle {v}"))
        .unwrap_or_default();
    format!(
        "{family}/{inner} {} {}·{} tile {} part {} stage {} lhs {} rhs {} vec {}{}{}{}",
        get("tile_matmul"),
        elem("lhs_global"),
        elem("acc_register"),
        field(&flat, "tile_size").map(mnk).unwrap_or_default(),
        field(&flat, "partition_size").map(mnk).unwrap_or_default(),
        field(&flat, "stage_size").map(mnk).unwrap_or_default(),
        get("lhs_layout"),
        get("rhs_layout"),
        get("sizes").trim_matches(['[', ']', ' ']).replace(", ", "/").trim_end_matches([',', '/']),
        if checks.is_empty() { String::new() } else { format!(" check {checks}") },
        swizzle,
        if accumulate { " +=" } else { "" }
    )
}

/// Splits `a<b, c>, d` at top-level commas.
fn split_top_level(s: &str) -> Vec<String> {
    let (mut out, mut depth, mut cur) = (Vec::new(), 0i32, String::new());
    for c in s.chars() {
        match c {
            '<' | '(' | '[' | '{' => depth += 1,
            '>' | ')' | ']' | '}' => depth -= 1,
            ',' if depth == 0 => {
                out.push(std::mem::take(&mut cur).trim().to_string());
                continue;
            }
            _ => {}
        }
        cur.push(c);
    }
    if !cur.trim().is_empty() {
        out.push(cur.trim().to_string());
    }
    out
}

/// `half::bf16::bf16` → `bf16`; `a::b::C<d::E>` → `C<E>`.
fn short_type(t: &str) -> String {
    let mut out = String::new();
    let mut word = String::new();
    for c in t.chars().chain(std::iter::once('\0')) {
        if c.is_alphanumeric() || c == '_' || c == ':' {
            word.push(c);
        } else {
            out.push_str(word.rsplit("::").next().unwrap_or(&word));
            word.clear();
            if c != '\0' {
                out.push(c);
            }
        }
    }
    out
}

/// Writes each source, compiles them all with NVRTC, runs ptxas on each PTX; returns the rows
/// and the failures (kernel, variant and the first lines of the log).
fn compile_and_measure(
    tools: &tools::Tools,
    arch: u32,
    kernels: &[CapturedKernel],
    dir: &Path,
    jobs: usize,
) -> Result<(Vec<Row>, Vec<String>)> {
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("clearing {}", dir.display()))?;
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut failures = Vec::new();
    let mut files = Vec::new();
    let mut compiled = Vec::new();
    for (i, k) in kernels.iter().enumerate() {
        let stem = format!("{i:03}_{}", kernel_name(k));
        match &k.source {
            Ok(source) => {
                let cu = dir.join(format!("{stem}.cu"));
                // The variant as a comment on top, so a file found later says what it is.
                let text = format!(
                    "// {} ({}) | {} | launched by {}\n{source}",
                    kernel_name(k),
                    k.entrypoint,
                    variant_name(k),
                    k.label
                );
                std::fs::write(&cu, text).with_context(|| format!("writing {}", cu.display()))?;
                files.push(cu);
                compiled.push(k);
            }
            Err(e) => failures.push(format!(
                "{} [{}] (sm_{arch}, from {}): CubeCL's CUDA compiler failed:\n{}",
                kernel_name(k),
                variant_name(k),
                k.label,
                first_lines(e, 12)
            )),
        }
    }
    let arch_flag = compile_arch(arch);
    let results = tools::nvrtc(tools, &arch_flag, jobs, &files)?;
    let mut measured: Vec<(&CapturedKernel, PathBuf)> = Vec::new();
    for (k, r) in compiled.into_iter().zip(&results) {
        if r.ok {
            measured.push((k, r.cu.with_extension("ptx")));
        } else {
            failures.push(format!(
                "{} [{}] (sm_{arch}, from {}): NVRTC failed on {}:\n{}",
                kernel_name(k),
                variant_name(k),
                k.label,
                r.cu.display(),
                first_lines(&r.log, 12)
            ));
        }
    }
    // ptxas is single-threaded: run `jobs` at once.
    let reports: Vec<Result<String>> = std::thread::scope(|s| {
        let chunks: Vec<_> = measured.chunks(measured.len().div_ceil(jobs.max(1)).max(1)).collect();
        let handles: Vec<_> = chunks
            .into_iter()
            .map(|chunk| {
                let arch_flag = &arch_flag;
                s.spawn(move || {
                    chunk.iter().map(|(_, ptx)| tools::ptxas(tools, arch_flag, ptx)).collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_else(|_| vec![Err(anyhow::anyhow!("ptxas thread panicked"))]))
            .collect()
    });
    let mut rows = Vec::new();
    for ((k, ptx), report) in measured.iter().zip(reports) {
        let report = match report {
            Ok(r) => r,
            Err(e) => {
                failures.push(format!("{} [{}] (sm_{arch}): {e:#}", kernel_name(k), variant_name(k)));
                continue;
            }
        };
        std::fs::write(ptx.with_extension("ptxas.txt"), &report).ok();
        let usage = ptxas::parse(&report).with_context(|| format!("ptxas report of {}", ptx.display()))?;
        for u in usage {
            let units = k.cube_dim.0 * k.cube_dim.1 * k.cube_dim.2;
            let shared = u.static_shared_bytes + k.dynamic_shared_bytes as u64;
            let limits = check_limits(arch, u.registers, units, u.static_shared_bytes, shared);
            rows.push(Row {
                kernel: kernel_name(k),
                variant: variant_name(k),
                arch: format!("sm_{arch}"),
                registers: u.registers,
                spill_stores_bytes: u.spill_stores_bytes,
                spill_loads_bytes: u.spill_loads_bytes,
                shared_bytes: shared,
                fits: limits.is_empty(),
                units,
                dynamic_shared_bytes: k.dynamic_shared_bytes as u64,
                launched_by: k.label.clone(),
                limits: limits.join("; "),
            });
        }
    }
    Ok((rows, failures))
}

fn first_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let mut out = lines.iter().take(n).map(|l| format!("    {l}")).collect::<Vec<_>>().join("\n");
    if lines.len() > n {
        out.push_str(&format!("\n    … ({} more lines)", lines.len() - n));
    }
    out
}

fn print_table(rows: &[Row]) {
    let header = ["kernel", "variant", "arch", "regs", "spill st/ld B", "shared B", "units", "fits"];
    let cells: Vec<[String; 8]> = rows
        .iter()
        .map(|r| {
            [
                r.kernel.clone(),
                r.variant.clone(),
                r.arch.clone(),
                r.registers.to_string(),
                format!("{}/{}", r.spill_stores_bytes, r.spill_loads_bytes),
                r.shared_bytes.to_string(),
                r.units.to_string(),
                if r.fits { "yes".into() } else { format!("NO: {}", r.limits) },
            ]
        })
        .collect();
    let mut widths = header.map(|h| h.chars().count());
    for c in &cells {
        for (w, s) in widths.iter_mut().zip(c) {
            *w = (*w).max(s.chars().count());
        }
    }
    // The variant column can be long (cubek-matmul blueprints); cap it so rows stay readable.
    widths[1] = widths[1].min(90);
    let line = |c: &[String]| {
        c.iter()
            .zip(widths)
            .enumerate()
            .map(|(i, (s, w))| {
                let s = if i == 1 && s.chars().count() > w {
                    format!("{}…", s.chars().take(w - 1).collect::<String>())
                } else {
                    s.clone()
                };
                if (3..7).contains(&i) { format!("{s:>w$}") } else { format!("{s:<w$}") }
            })
            .collect::<Vec<_>>()
            .join("  ")
    };
    println!("{}", line(&header.map(String::from)));
    for c in &cells {
        println!("{}", line(c));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn architectures_parse_in_the_usual_spellings() {
        assert_eq!(parse_arch("sm_80").unwrap(), 80);
        assert_eq!(parse_arch(" SM_90a ").unwrap(), 90);
        assert_eq!(parse_arch("86").unwrap(), 86);
        assert!(parse_arch("ampere").unwrap_err().to_string().contains("sm_80"));
        assert_eq!(compile_arch(80), "sm_80");
        assert_eq!(compile_arch(90), "sm_90a");
    }

    #[test]
    fn limits_name_what_does_not_fit() {
        assert!(check_limits(80, 64, 256, 0, 48 * 1024).is_empty());
        assert!(check_limits(80, 255, 256, 0, 163 * 1024).is_empty());
        let why = check_limits(80, 128, 1024, 0, 200 * 1024);
        assert_eq!(why.len(), 2, "{why:?}");
        assert!(why[0].contains("64 Ki registers") && why[1].contains("163 KiB"), "{why:?}");
        assert!(check_limits(90, 32, 128, 0, 200 * 1024).is_empty());
    }
}
