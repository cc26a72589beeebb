//! NVRTC and ptxas from NVIDIA's Python wheels, installed once into `target/cuda-tools/`, and
//! the two steps that use them: CUDA C++ → PTX (NVRTC, through `xtask/python/nvrtc_ptx.py`)
//! and PTX → SASS resource usage (`ptxas -v`).

use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The wheels, pinned (CUDA 12.9; NVRTC 12.9 compiles for sm_50 … sm_120).
pub const WHEELS: &[&str] = &[
    "nvidia-cuda-nvrtc-cu12==12.9.86",
    "nvidia-cuda-nvcc-cu12==12.9.86",
    "nvidia-cuda-runtime-cu12==12.9.79",
    "nvidia-cuda-cccl-cu12==12.9.27",
];

/// Where the tools live once installed.
pub struct Tools {
    pub python: String,
    pub libnvrtc: PathBuf,
    pub ptxas: PathBuf,
    /// CUDA headers (`cuda_fp16.h`, `mma.h`, …) and CCCL (`cuda/barrier`, …).
    pub includes: Vec<PathBuf>,
}

/// The install folder: `CUBELLAMA_CUDA_TOOLS` if set, else `target/cuda-tools/` of the workspace.
pub fn tools_dir() -> PathBuf {
    match std::env::var_os("CUBELLAMA_CUDA_TOOLS") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => crate::cargo::workspace_root().join("target").join("cuda-tools"),
    }
}

/// The tools under `dir`, if every piece is there.
fn locate(python: &str, dir: &Path) -> Option<Tools> {
    let nvidia = dir.join("nvidia");
    let tools = Tools {
        python: python.to_string(),
        libnvrtc: nvidia.join("cuda_nvrtc/lib/libnvrtc.so.12"),
        ptxas: nvidia.join("cuda_nvcc/bin/ptxas"),
        // mma.h in cuda_runtime includes crt/mma.h, which ships with nvcc.
        includes: vec![
            nvidia.join("cuda_runtime/include"),
            nvidia.join("cuda_nvcc/include"),
            nvidia.join("cuda_cccl/include"),
        ],
    };
    let present =
        tools.libnvrtc.is_file() && tools.ptxas.is_file() && tools.includes.iter().all(|d| d.is_dir());
    let marker = dir.join(VERSION_MARKER);
    let pinned = std::fs::read_to_string(marker).is_ok_and(|s| s == WHEELS.join("\n"));
    (present && pinned).then_some(tools)
}

/// Written after a complete install: which pins it holds, so a changed pin reinstalls.
const VERSION_MARKER: &str = "wheels.txt";

/// Finds the tools, installing the pinned wheels with `python3 -m pip install --target` the
/// first time (about 140 MB of downloads).
pub fn ensure() -> Result<Tools> {
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    // Python also runs the NVRTC helper: needed even when the tools are installed.
    let version = Command::new(&python).arg("--version").output();
    match version {
        Ok(out) if out.status.success() => {}
        _ => bail!(
            "cuda-report needs Python 3 (it installs NVRTC and ptxas with pip, and drives NVRTC from Python): \
             `{python}` was not found (install python3 and pip, or set PYTHON=/path/to/python3)"
        ),
    }
    let dir = tools_dir();
    if let Some(tools) = locate(&python, &dir) {
        return Ok(tools);
    }
    if !cfg!(all(target_os = "linux", target_arch = "x86_64")) {
        bail!(
            "cuda-report needs Linux on x86-64: NVIDIA's NVRTC/ptxas wheels exist for it (and Windows), not this platform"
        );
    }
    eprintln!("installing NVRTC and ptxas (pip wheels {}) into {}", WHEELS.join(", "), dir.display());
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let status = Command::new(&python)
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--no-deps",
            "--upgrade",
            "--target",
        ])
        .arg(&dir)
        .args(WHEELS)
        .status()
        .with_context(|| format!("running {python} -m pip"))?;
    if !status.success() {
        bail!(
            "`{python} -m pip install --target {} {}` failed ({status}): no network access to the Python \
             package index, or no pip (`{python} -m ensurepip`)? On an offline machine, install the same \
             wheels into that folder by hand (pip download on a connected one, then pip install --no-index)",
            dir.display(),
            WHEELS.join(" ")
        );
    }
    std::fs::write(dir.join(VERSION_MARKER), WHEELS.join("\n"))
        .with_context(|| format!("writing {}", dir.join(VERSION_MARKER).display()))?;
    locate(&python, &dir).with_context(|| {
        format!(
            "pip installed the wheels, but libnvrtc.so.12, ptxas or the CUDA headers are not under {}",
            dir.display()
        )
    })
}

/// One NVRTC result.
#[derive(Debug)]
pub struct NvrtcResult {
    pub cu: PathBuf,
    pub ok: bool,
    pub log: String,
}

/// Compiles each `.cu` file to a `.ptx` beside it, `jobs` at a time.
pub fn nvrtc(tools: &Tools, arch: &str, jobs: usize, files: &[PathBuf]) -> Result<Vec<NvrtcResult>> {
    let script = crate::cargo::workspace_root().join("xtask/python/nvrtc_ptx.py");
    let mut cmd = Command::new(&tools.python);
    cmd.arg(&script).arg(&tools.libnvrtc).arg(arch).arg(jobs.to_string());
    cmd.args(&tools.includes).arg("--").args(files);
    let out = cmd.output().with_context(|| format!("running {} {}", tools.python, script.display()))?;
    if !out.status.success() {
        bail!(
            "NVRTC helper failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).lines().take(20).collect::<Vec<_>>().join("\n")
        );
    }
    let mut results = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value =
            serde_json::from_str(line).with_context(|| format!("NVRTC helper printed `{line}`"))?;
        results.push(NvrtcResult {
            cu: PathBuf::from(v["file"].as_str().unwrap_or_default()),
            ok: v["ok"].as_bool().unwrap_or(false),
            log: v["log"].as_str().unwrap_or_default().to_string(),
        });
    }
    if results.len() != files.len() {
        bail!("NVRTC helper reported {} of {} files", results.len(), files.len());
    }
    Ok(results)
}

/// `ptxas -v` on one PTX file; returns its report (stderr).
pub fn ptxas(tools: &Tools, arch: &str, ptx: &Path) -> Result<String> {
    let out = Command::new(&tools.ptxas)
        .args(["-v", &format!("-arch={arch}"), "-o"])
        .arg(ptx.with_extension("cubin"))
        .arg(ptx)
        .output()
        .with_context(|| format!("running {}", tools.ptxas.display()))?;
    let report = String::from_utf8_lossy(&out.stderr).into_owned();
    if !out.status.success() {
        bail!(
            "ptxas failed on {} ({}):\n{}",
            ptx.display(),
            out.status,
            report.lines().take(20).collect::<Vec<_>>().join("\n")
        );
    }
    Ok(report)
}
