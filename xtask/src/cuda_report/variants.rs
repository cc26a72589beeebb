//! Which kernel variants the project launches: the training step, evaluation and KV-cache
//! decoding of each model shape, run on the offline CUDA device (see [`super::offline`]), plus
//! the variants only `cargo xtask bench` launches.
//!
//! Going through the model and the optimizer instead of listing kernels by hand means a new
//! kernel, or a new comptime choice in a launcher, shows up in the report without touching this
//! file. The model runs with one layer: every layer launches the same kernels.

use super::offline::{self, CapturedKernel, OfflineCuda};
use anyhow::{Context, Result};
use dsl::{Device, FloatElement, GpuTensor};
use kernels::attention::naive::{NaiveScratch, naive_attention_backward, naive_attention_forward};
use kernels::attention::{
    AttentionKernel, SUPPORTED_HEAD_DIMS, attention_backward_with, attention_forward_with,
};
use model::activations::HeadChunk;
use model::{Activations, KvCache, Llama, LlamaConfig, Params};
use trainer::optimizer::Optimizer;
use trainer::precision::WriteRounding;

/// A model shape and the batch it is trained with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Workload {
    pub preset: &'static str,
    pub batch: usize,
    pub seq: usize,
}

/// The shapes whose kernels the report covers: the README's default run (`tiny`), the
/// TinyStories models (head_dim 48 and 64, vocabulary 32000), Llama-2-7B (head_dim 128,
/// 16k tokens per step as in the matmul goal) and 70B (grouped-query attention).
/// Launchers choose configurations from widths (row lengths, head_dim) and, for matmuls, from
/// the token count, so these cover what training and decoding these models launch.
pub const WORKLOADS: &[Workload] = &[
    Workload { preset: "tiny", batch: 8, seq: 256 },
    Workload { preset: "stories15m", batch: 8, seq: 256 },
    Workload { preset: "stories110m", batch: 8, seq: 1024 },
    Workload { preset: "llama2-7b", batch: 4, seq: 4096 },
    Workload { preset: "llama2-70b", batch: 1, seq: 4096 },
];

/// Every distinct kernel the project launches on an `sm_{arch}` GPU, compiled to CUDA C++.
pub fn capture(arch: u32) -> Result<Vec<CapturedKernel>> {
    let device = offline::open(arch).context("opening the offline CUDA device")?;
    for w in WORKLOADS {
        let what = |dtype: &str| format!("{} {dtype} (B {} × T {})", w.preset, w.batch, w.seq);
        run_workload::<f32>(&device, w).with_context(|| what("f32"))?;
        run_workload::<half::f16>(&device, w).with_context(|| what("f16"))?;
        run_workload::<half::bf16>(&device, w).with_context(|| what("bf16"))?;
    }
    bench_only::<f32>(&device)?;
    bench_only::<half::f16>(&device)?;
    bench_only::<half::bf16>(&device)?;
    device.sync("cuda-report")?;
    Ok(offline::take_captured(arch))
}

fn one_layer(preset: &str) -> Result<LlamaConfig> {
    let mut config = LlamaConfig::preset(preset)?;
    config.num_hidden_layers = 1;
    Ok(config)
}

/// One training step (forward, loss with gradient, backward, clipped AdamW), an evaluation
/// loss, and decoding (a prefill of 16 tokens, then one token) of `w` in element type `F`.
fn run_workload<F: FloatElement>(device: &Device<OfflineCuda>, w: &Workload) -> Result<()> {
    let config = one_layer(w.preset)?;
    let label = |phase: &str| offline::set_label(device, &format!("{} {} {phase}", w.preset, F::DTYPE));
    label("train")?;
    let model = Llama::new(device, config.clone(), Params::<OfflineCuda, F>::zeros(device, &config)?)?;
    // The trainer's weight gradients are f32 whatever the compute type.
    let mut grads = Params::<OfflineCuda, f32>::zeros(device, &config)?;
    // As the trainer runs it: the logits in blocks of rows (the matmuls see the block's rows).
    let mut acts =
        Activations::<OfflineCuda, F>::with_head(device, &config, w.batch, w.seq, HeadChunk::Auto)?;
    let tokens = w.batch * w.seq;
    let ids = model.token_ids(device, &vec![1; tokens], w.batch, w.seq)?;
    let targets = model.targets(device, &vec![2; tokens])?;
    model.forward(device, &mut acts, &ids)?;
    model.loss_backward(device, &mut acts, &targets, &ids, &mut grads)?;
    // The trainer keeps each step's loss on the device until it reads a batch of steps.
    let mut figures = GpuTensor::<OfflineCuda, f32>::uninit(device, &[2])?;
    dsl::record_scalar(device, &mut figures, 0, &acts.loss, 0, false)?;
    dsl::record_scalar(device, &mut figures, 0, &acts.loss, 0, true)?;
    let mut params = Params::<OfflineCuda, F>::zeros(device, &config)?;
    // AdamW's three write paths: round to nearest (f32's only one), stochastic rounding, and
    // the f32 master with its compute copy.
    for rounding in [WriteRounding::Nearest, WriteRounding::Stochastic] {
        let mut optimizer = Optimizer::new(device, params.specs(), Default::default(), 1.0, rounding, 0)?;
        optimizer.step(device, &mut params, &grads, 3e-4)?;
    }
    // Data parallelism's clip norm: this rank's share of Σg², then the root of the all-reduced
    // shares.
    let mut optimizer =
        Optimizer::new(device, params.specs(), Default::default(), 1.0, WriteRounding::Nearest, 0)?;
    optimizer.sum_squares(device, &grads, &vec![true; params.specs().len()])?;
    optimizer.clip_from_sum_squares(device, 1.0)?;
    if F::DTYPE != dsl::DType::F32 {
        let mut optimizer =
            Optimizer::new(device, params.specs(), Default::default(), 1.0, WriteRounding::Nearest, 0)?;
        let zeros: Vec<Vec<f32>> = params.specs().iter().map(|s| vec![0.0; s.numel()]).collect();
        optimizer.keep_master(device, &zeros)?;
        optimizer.step(device, &mut params, &grads, 3e-4)?;
    }
    label("eval")?;
    model.loss(device, &mut acts, &targets, false)?;

    label("decode")?;
    let prefill = 16.min(config.max_position_embeddings);
    let mut cache = KvCache::new(device, &model, 1, config.max_position_embeddings)?;
    model.decode(device, &mut cache, &model.token_ids(device, &vec![1; prefill], 1, prefill)?)?;
    model.decode(device, &mut cache, &model.token_ids(device, &[1], 1, 1)?)?;
    Ok(())
}

/// What `cargo xtask bench` launches beyond the model: the copy kernel, every attention kernel
/// the device offers (not only the best) and the naive reference attention, at Llama-2-7B's
/// head shape; and `residual::scale`, a public launcher nothing else calls yet.
fn bench_only<F: FloatElement>(device: &Device<OfflineCuda>) -> Result<()> {
    offline::set_label(device, &format!("bench {}", F::DTYPE))?;
    let (b, t, h, hd) = (1, 512, 32, 128);
    let qkv = || GpuTensor::<OfflineCuda, F>::uninit(device, &[b, t, h, hd]);
    let (q, k, v, dout) = (qkv()?, qkv()?, qkv()?, qkv()?);
    let (mut out, mut dq, mut dk, mut dv) = (qkv()?, qkv()?, qkv()?, qkv()?);
    let mut lse = GpuTensor::<OfflineCuda, f32>::uninit(device, &[b, h, t])?;
    let mut delta = GpuTensor::<OfflineCuda, f32>::uninit(device, &[b, h, t])?;
    let mut copy = qkv()?;
    copy.copy_from(device, &q)?;
    kernels::residual::scale(device, &mut copy, 0.5)?;
    // The standalone stochastic-rounding cast (the AdamW kernel inlines the same rounding).
    let wide = GpuTensor::<OfflineCuda, f32>::uninit(device, &[b, t, h, hd])?;
    kernels::rounding::cast_stochastic(device, &mut copy, &wide, dsl::rounding::RoundingKey::new(0, 1, 0))?;
    for kernel in AttentionKernel::available::<OfflineCuda, F>(device) {
        attention_forward_with(device, kernel, &mut out, &mut lse, &q, &k, &v, true)?;
        attention_backward_with(
            device, kernel, &mut dq, &mut dk, &mut dv, &mut delta, &dout, &q, &k, &v, &out, &lse, true,
        )?;
    }
    let mut scratch = NaiveScratch::new(device, b, h, t)?;
    naive_attention_forward(device, &mut out, &mut scratch, &q, &k, &v, true)?;
    naive_attention_backward(device, &mut dq, &mut dk, &mut dv, &mut scratch, &dout, &q, &k, &v, &out)?;
    every_flash_variant::<F>(device)?;
    every_matmul_routine::<F>(device)
}

/// The flash kernels at every compiled head_dim, causal and not (the model shapes above reach
/// only their own head_dims, and training only the causal variant): issue 18 asks for
/// registers and spills of each before any GPU run.
fn every_flash_variant<F: FloatElement>(device: &Device<OfflineCuda>) -> Result<()> {
    let (b, t, hq, hkv) = (1, 256, 8, 2);
    for head_dim in SUPPORTED_HEAD_DIMS {
        let new = |heads: usize| GpuTensor::<OfflineCuda, F>::uninit(device, &[b, t, heads, head_dim]);
        let (q, k, v, dout) = (new(hq)?, new(hkv)?, new(hkv)?, new(hq)?);
        let (mut out, mut dq, mut dk, mut dv) = (new(hq)?, new(hq)?, new(hkv)?, new(hkv)?);
        let mut lse = GpuTensor::<OfflineCuda, f32>::uninit(device, &[b, hq, t])?;
        let mut delta = GpuTensor::<OfflineCuda, f32>::uninit(device, &[b, hq, t])?;
        for causal in [false, true] {
            let flash = AttentionKernel::Flash;
            attention_forward_with(device, flash, &mut out, &mut lse, &q, &k, &v, causal)?;
            attention_backward_with(
                device, flash, &mut dq, &mut dk, &mut dv, &mut delta, &dout, &q, &k, &v, &out, &lse, causal,
            )?;
        }
    }
    Ok(())
}

/// Every matmul routine the device offers (f32 with TF32 allowed), on the three products of
/// Llama-2-7B's MLP up projection at 16k tokens: what `cargo xtask tune-matmul` and a table
/// may choose, so each candidate's registers, spills and shared memory are in the report.
fn every_matmul_routine<F: FloatElement>(device: &Device<OfflineCuda>) -> Result<()> {
    use kernels::matmul::{
        MatmulRoutine, linear_backward_input_with, linear_backward_weight_with, linear_forward_with,
    };
    let device = &device.with_policy(dsl::KernelPolicy { allow_tf32: true, ..Default::default() });
    let (n, hidden, inter) = (16384, 4096, 11008);
    let x = GpuTensor::<OfflineCuda, F>::uninit(device, &[n, hidden])?;
    let w = GpuTensor::<OfflineCuda, F>::uninit(device, &[inter, hidden])?;
    let dy = GpuTensor::<OfflineCuda, F>::uninit(device, &[n, inter])?;
    let mut y = GpuTensor::<OfflineCuda, F>::uninit(device, &[n, inter])?;
    let mut dx = GpuTensor::<OfflineCuda, F>::uninit(device, &[n, hidden])?;
    let mut dw = GpuTensor::<OfflineCuda, f32>::uninit(device, &[inter, hidden])?;
    for routine in MatmulRoutine::offered(device, F::DTYPE) {
        let r = Some(routine);
        linear_forward_with(device, r, &mut y, &x, &w)?;
        linear_backward_input_with(device, r, &mut dx, &dy, &w, false)?;
        linear_backward_input_with(device, r, &mut dx, &dy, &w, true)?;
        linear_backward_weight_with(device, r, &mut dw, &dy, &x)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    /// Names of the `#[cube(launch)]` / `#[cube(launch_unchecked)]` functions under `dir`.
    fn launchable_kernels(dir: &str) -> BTreeSet<String> {
        let root = crate::cargo::workspace_root().join(dir);
        let mut names = BTreeSet::new();
        let mut stack = vec![root];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()) {
                if entry.is_dir() {
                    stack.push(entry);
                    continue;
                }
                let text = std::fs::read_to_string(&entry).unwrap();
                let mut after_attribute = false;
                for line in text.lines() {
                    let line = line.trim();
                    if line.starts_with("#[cube(launch") {
                        after_attribute = true;
                    } else if after_attribute && let Some(rest) = line.split("fn ").nth(1) {
                        names.insert(rest.split(['<', '(']).next().unwrap().to_string());
                        after_attribute = false;
                    }
                }
            }
        }
        names
    }

    /// Every kernel the workspace defines is generated (a new kernel that no workload reaches
    /// would be missing from the report), each compiles to CUDA C++, and the tensor-core
    /// attention and matmul variants are among them. Needs no GPU and no NVRTC.
    #[test]
    fn every_kernel_of_the_workspace_is_generated_for_sm_80() {
        let kernels = capture(80).unwrap();
        let generated: BTreeSet<String> = kernels.iter().map(crate::cuda_report::kernel_name).collect();
        let mut defined = launchable_kernels("kernels/src");
        defined.extend(launchable_kernels("dsl/src"));
        // The loop-cap probe `Device::open` runs (a lavapipe workaround), not the project's work.
        defined.remove("count_loop_iterations");
        let missing: Vec<_> = defined.difference(&generated).collect();
        assert!(missing.is_empty(), "kernels no workload launches: {missing:?} (extend variants.rs)");
        for k in &kernels {
            assert!(k.source.is_ok(), "{}: {:?}", crate::cuda_report::kernel_name(k), k.source);
        }
        for name in [
            "attention_forward_cmma_kernel",
            "attention_dq_cmma_kernel",
            "attention_dkdv_cmma_kernel",
            "flash_forward_kernel",
            "flash_dq_kernel",
            "flash_dkdv_kernel",
        ] {
            for dtype in ["f16", "bf16"] {
                assert!(
                    kernels
                        .iter()
                        .any(|k| crate::cuda_report::kernel_name(k) == name && k.type_name.contains(dtype)),
                    "no {name} for {dtype}"
                );
            }
        }
        // The flash kernels run on `mma.sync` (not its emulation) for half precision.
        for k in kernels.iter().filter(|k| crate::cuda_report::kernel_name(k).starts_with("flash_")) {
            let half = k.type_name.contains("f16");
            let source = k.source.as_ref().unwrap();
            assert_eq!(source.contains("__mma_m16n8k16"), half, "{}", k.type_name);
        }
        assert!(
            kernels.iter().any(|k| k.type_name.contains("cubek_matmul")
                && k.source.as_ref().is_ok_and(|s| s.contains("wmma"))),
            "no tensor-core (wmma) matmul among {} kernels",
            kernels.len()
        );
    }
}
