//! The device's peak FLOP/s for the model FLOP utilisation: known NVIDIA GPUs by the name
//! `nvidia-smi` reports. Dense figures from NVIDIA's data sheets (no structured sparsity); f32
//! is the CUDA-core rate, since the f32 matmul stays off tensor cores (no tf32 rounding).

use dsl::Backend;

/// (name fragment, bf16/f16 tensor-core TFLOP/s, f32 TFLOP/s); the first match wins, so more
/// specific names come first.
const PEAKS: [(&str, f64, f64); 8] = [
    ("H200", 989.4, 66.9),
    ("H100 PCIe", 756.0, 51.2),
    ("H100 NVL", 835.0, 60.0),
    ("H100", 989.4, 66.9),
    ("A100", 312.0, 19.5),
    ("L40S", 362.05, 91.6),
    ("L4", 121.0, 30.3),
    ("A10", 125.0, 31.2),
];

/// `f32`, `f16` or `bf16` for the compute type `F`.
pub fn dtype_name<F>() -> &'static str {
    let name = std::any::type_name::<F>();
    ["bf16", "f16", "f32"].into_iter().find(|d| name.ends_with(d)).unwrap_or("f32")
}

/// The GPU's name and its peak TFLOP/s for `dtype`, when the backend is CUDA and the GPU is in
/// the table.
pub fn detect(backend: Backend, dtype: &str) -> Option<(String, f64)> {
    if backend != Backend::Cuda {
        return None;
    }
    let output = std::process::Command::new("nvidia-smi")
        .args(["--query-gpu=name", "--format=csv,noheader"])
        .output()
        .ok()?;
    let name = String::from_utf8_lossy(&output.stdout).lines().next()?.trim().to_string();
    let &(_, tensor, f32) = PEAKS.iter().find(|(fragment, _, _)| name.contains(fragment))?;
    Some((name, if dtype == "f32" { f32 } else { tensor }))
}
