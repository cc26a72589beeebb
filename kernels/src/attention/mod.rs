//! Grouped-query scaled dot-product attention, flash-style: forward, backward and decode.
//!
//! Shapes (the dsl layout): `q`, `out`, `dout`, `dq`: `[B, Tq, Hq, hd]`; `k`, `v`, `dk`, `dv`:
//! `[B, Tkv, Hkv, hd]` (for decoding, `[B, capacity, Hkv, hd]` of which the first `kv_len`
//! positions are filled); `lse`, `delta`: `[B, Hq, Tq]` f32. `Hq` is a multiple of `Hkv`; query
//! head `h` reads key/value head `h / (Hq/Hkv)`, with no copy of k or v per query head.
//! Query `i` sits at position `position_offset + i`, key `j` at position `j`; with `causal`,
//! query `i` sees keys `j ≤ position_offset + i`.
//!
//! Forward: `S = scale·QKᵀ` (scale = 1/sqrt(hd)), `P = softmax(S)` per row, `out = P·V`; saves
//! `lse = log Σ_j e^{S_ij}` per row. Tiles of keys stream through shared memory with an online
//! softmax: the `Tq × Tkv` matrix is never stored.
//! Backward (FlashAttention-2's equations, recomputing P from lse): `delta = rowsum(dO ⊙ O)`,
//! `dS = P ⊙ (dO·Vᵀ − delta)`, `dQ = scale·dS·K`, `dK = scale·dSᵀ·Q`, `dV = Pᵀ·dO`; all three
//! overwritten (`=`); dK and dV sum over the query heads that share a key/value head.
//! Determinism: dK/dV are computed by one unit per key row and dQ by one unit per query row,
//! each summing in a fixed order (no atomics), so the backward is bit-identical run to run. The
//! price is computing P twice (once per pass) instead of FlashAttention-2's once with atomic dQ.
//!
//! Specialisation: `head_dim` and `causal` are comptime (each pair is its own kernel, with the
//! head-dimension loops unrolled); tile sizes come from the device's shared memory. Sequence
//! lengths, head counts and the position offset are runtime values.
//!
//! Three sets of kernels ([`AttentionKernel`]): the portable ones ([`portable`]: plain f32
//! arithmetic, one unit per query or key row; every device), for f16/bf16 where the device has
//! matrix instructions (CUDA) the tensor-core ones ([`tensor_cores`]: wmma), and the flash ones
//! ([`flash`]: FlashAttention-2's design on `mma.m16n8k16`, emulated where the device lacks it,
//! not yet chosen by default). [`attention_forward`] picks the best available;
//! [`attention_forward_with`] picks explicitly.
//! The backward likewise ([`attention_backward`], [`attention_backward_with`]).
//!
//! Files: this one holds the choice of kernel set, the checks and the launchers; [`rules`]
//! what every set shares (configuration, sizes, the masking and key-range rules as `#[cube]`
//! functions); [`portable`], [`tensor_cores`] and [`flash`] the kernels, each importing only
//! [`rules`];
//! [`naive`] the `T×T` comparator the benchmark times them against.

pub mod flash;
pub mod naive;
pub mod portable;
pub mod rules;
pub mod tensor_cores;

pub use rules::{AttentionConfig, AttentionShape, SUPPORTED_HEAD_DIMS};

use cubecl::prelude::*;
use dsl::{Device, Error, FloatElement, GpuTensor, Result};
use rules::VEC;

/// Which kernels run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AttentionKernel {
    /// Plain f32 arithmetic, one unit per query (or key) row: every device and element type.
    Portable,
    /// Matrix instructions (CubeCL's cmma: CUDA wmma) for every product: f16/bf16 on CUDA.
    TensorCores,
    /// FlashAttention-2's design ([`flash`]): each warp keeps its rows' scores, softmax and
    /// output in registers around `mma.m16n8k16`. Runs everywhere: on devices without that
    /// instruction for the element type the instruction is emulated (slow; there so the
    /// lavapipe tests cover the kernels). Not yet chosen by [`AttentionKernel::best`]: it has
    /// not run on a GPU (issue 18).
    Flash,
}

impl AttentionKernel {
    /// The fastest kernel `device` runs for `F`.
    pub fn best<R: Runtime, F: FloatElement>(device: &Device<R>) -> Self {
        if tensor_cores::available::<R, F>(device) { Self::TensorCores } else { Self::Portable }
    }

    /// Every kernel `device` runs for `F`, portable first.
    pub fn available<R: Runtime, F: FloatElement>(device: &Device<R>) -> Vec<Self> {
        let mut kernels = vec![Self::Portable];
        if tensor_cores::available::<R, F>(device) {
            kernels.push(Self::TensorCores);
        }
        kernels.push(Self::Flash);
        kernels
    }

    /// Whether this kernel set takes `head_dim` on `device` for `F` (the flash kernels need
    /// their smallest tiles to fit in shared memory: on lavapipe's 32 KiB, f32 at head_dim
    /// 112 and 128 does not).
    pub fn takes<R: Runtime, F: FloatElement>(self, device: &Device<R>, head_dim: usize) -> bool {
        match self {
            Self::Portable | Self::TensorCores => true,
            Self::Flash => flash::fits::<R, F>(device, head_dim),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Portable => "portable",
            Self::TensorCores => "tensor cores",
            Self::Flash => "flash",
        }
    }
}

fn head_shape(op: &'static str, name: &'static str, t: &[usize]) -> Result<[usize; 4]> {
    <[usize; 4]>::try_from(t).map_err(|_| Error::InvalidArgument {
        op,
        message: format!("{name} must be [B, T, H, head_dim], got shape {t:?}"),
    })
}

/// Validates q/k/v (and the decode extras) and returns the call's shape.
fn check_inputs<R: Runtime, F: FloatElement>(
    op: &'static str,
    device: &Device<R>,
    q: &GpuTensor<R, F>,
    k: &GpuTensor<R, F>,
    v: &GpuTensor<R, F>,
    kv_len: usize,
    position_offset: usize,
    causal: bool,
) -> Result<AttentionShape> {
    device.check_dtype::<F>(op)?;
    let [batch, q_len, q_heads, head_dim] = head_shape(op, "q", q.shape())?;
    let [kb, kv_capacity, kv_heads, khd] = head_shape(op, "k", k.shape())?;
    Error::check_shape(op, "v", v.shape(), k.shape())?;
    if kb != batch || khd != head_dim {
        return Err(Error::InvalidArgument {
            op,
            message: format!("k {:?} does not match q {:?} in batch or head_dim", k.shape(), q.shape()),
        });
    }
    if !SUPPORTED_HEAD_DIMS.contains(&head_dim) {
        return Err(Error::Unsupported {
            op,
            message: format!("head_dim {head_dim} is not compiled; supported: {SUPPORTED_HEAD_DIMS:?}"),
        });
    }
    if kv_heads == 0 || q_heads % kv_heads != 0 {
        return Err(Error::InvalidArgument {
            op,
            message: format!(
                "query heads ({q_heads}) must be a multiple of key/value heads ({kv_heads}) for grouped-query attention"
            ),
        });
    }
    if kv_len == 0 || kv_len > kv_capacity {
        return Err(Error::InvalidArgument {
            op,
            message: format!("kv_len {kv_len} must be in 1..={kv_capacity} (the k/v tensors' positions)"),
        });
    }
    if causal && position_offset + q_len > kv_len {
        return Err(Error::InvalidArgument {
            op,
            message: format!(
                "causal queries at positions {position_offset}..{} need keys up to there, but only {kv_len} are filled",
                position_offset + q_len
            ),
        });
    }
    Ok(AttentionShape { batch, q_len, kv_len, kv_capacity, q_heads, kv_heads, head_dim, position_offset })
}

fn check_kernel_available<R: Runtime, F: FloatElement>(
    op: &'static str,
    device: &Device<R>,
    kernel: AttentionKernel,
    head_dim: usize,
) -> Result<()> {
    if kernel == AttentionKernel::Flash && !flash::fits::<R, F>(device, head_dim) {
        return Err(Error::Unsupported {
            op,
            message: format!(
                "the flash kernels' smallest tiles at head_dim {head_dim} need more than the {} bytes of shared \
                 memory {} offers for {}",
                device.info().max_shared_memory_bytes,
                device.info().device,
                F::DTYPE
            ),
        });
    }
    if kernel == AttentionKernel::TensorCores && !tensor_cores::available::<R, F>(device) {
        return Err(Error::Unsupported {
            op,
            message: format!(
                "the tensor-core kernels need f16 or bf16 on a device with 16×16×16 matrix instructions and \
                 32-unit planes; {} on {} has none for {}",
                device.info().runtime_name,
                device.info().device,
                F::DTYPE
            ),
        });
    }
    Ok(())
}

/// The kernel set's comptime configuration and units per cube.
fn kernel_config<R: Runtime, F: FloatElement>(
    device: &Device<R>,
    kernel: AttentionKernel,
    head_dim: usize,
    causal: bool,
) -> (AttentionConfig, u32) {
    match kernel {
        AttentionKernel::Portable => {
            let cfg = AttentionConfig::select(device, head_dim, causal);
            (cfg, cfg.block_q)
        }
        AttentionKernel::TensorCores => {
            let cfg = tensor_cores::config::<R, F>(device, head_dim, causal);
            (cfg, tensor_cores::cube_units(&cfg))
        }
        AttentionKernel::Flash => unreachable!("the flash kernels launch with their own configuration"),
    }
}

fn launch_forward<R: Runtime, F: FloatElement>(
    device: &Device<R>,
    kernel: AttentionKernel,
    out: &mut GpuTensor<R, F>,
    lse: &mut GpuTensor<R, f32>,
    q: &GpuTensor<R, F>,
    k: &GpuTensor<R, F>,
    v: &GpuTensor<R, F>,
    shape: AttentionShape,
    causal: bool,
) -> Result<()> {
    const OP: &str = "attention_forward";
    Error::check_shape(OP, "out", out.shape(), q.shape())?;
    Error::check_shape(OP, "lse", lse.shape(), &[shape.batch, shape.q_heads, shape.q_len])?;
    check_kernel_available::<R, F>(OP, device, kernel, shape.head_dim)?;
    if shape.batch * shape.q_len == 0 {
        return Ok(());
    }
    if kernel == AttentionKernel::Flash {
        flash::forward(device, out, lse, q, k, v, shape, causal);
        return Ok(());
    }
    let (cfg, units) = kernel_config::<R, F>(device, kernel, shape.head_dim, causal);
    let count = CubeCount::Static(
        shape.q_len.div_ceil(cfg.block_q as usize) as u32,
        (shape.batch * shape.q_heads) as u32,
        1,
    );
    let scale = 1.0 / (shape.head_dim as f32).sqrt();
    // SAFETY (both kernels): query rows are guarded by `i < q_len`, key rows by
    // `j < kv_len ≤ kv_capacity`; head indices are < Hq, Hkv by construction (h < Hq from the
    // grid, kvh = h / group); head_dim equals the compiled one (checked), so every row access
    // stays inside its row. Shared-memory tiles are indexed below their comptime sizes.
    unsafe {
        match kernel {
            AttentionKernel::Portable => portable::attention_forward_kernel::launch_unchecked::<F, R>(
                device.client(),
                count,
                CubeDim::new_1d(units),
                VEC,
                out.as_array_arg(),
                lse.as_array_arg(),
                q.as_array_arg(),
                k.as_array_arg(),
                v.as_array_arg(),
                shape.q_len as u32,
                shape.kv_len as u32,
                shape.kv_capacity as u32,
                shape.q_heads as u32,
                shape.kv_heads as u32,
                shape.position_offset as u32,
                scale,
                cfg,
            ),
            AttentionKernel::Flash => unreachable!("launched above"),
            AttentionKernel::TensorCores => {
                tensor_cores::attention_forward_cmma_kernel::launch_unchecked::<F, R>(
                    device.client(),
                    count,
                    CubeDim::new_1d(units),
                    VEC,
                    out.as_array_arg(),
                    lse.as_array_arg(),
                    q.as_array_arg(),
                    k.as_array_arg(),
                    v.as_array_arg(),
                    shape.q_len as u32,
                    shape.kv_len as u32,
                    shape.kv_capacity as u32,
                    shape.q_heads as u32,
                    shape.kv_heads as u32,
                    shape.position_offset as u32,
                    scale,
                    cfg,
                )
            }
        }
    }
    Ok(())
}

/// Training forward: q, k, v of the same length T (`position_offset` 0), `out =`, `lse =`, with
/// the best kernel for the device ([`AttentionKernel::best`]).
pub fn attention_forward<R: Runtime, F: FloatElement>(
    device: &Device<R>,
    out: &mut GpuTensor<R, F>,
    lse: &mut GpuTensor<R, f32>,
    q: &GpuTensor<R, F>,
    k: &GpuTensor<R, F>,
    v: &GpuTensor<R, F>,
    causal: bool,
) -> Result<()> {
    attention_forward_with(device, AttentionKernel::best::<R, F>(device), out, lse, q, k, v, causal)
}

/// [`attention_forward`] with the given kernel; one the device lacks is an error.
pub fn attention_forward_with<R: Runtime, F: FloatElement>(
    device: &Device<R>,
    kernel: AttentionKernel,
    out: &mut GpuTensor<R, F>,
    lse: &mut GpuTensor<R, f32>,
    q: &GpuTensor<R, F>,
    k: &GpuTensor<R, F>,
    v: &GpuTensor<R, F>,
    causal: bool,
) -> Result<()> {
    const OP: &str = "attention_forward";
    let kv_len = k.shape().get(1).copied().unwrap_or(0);
    let shape = check_inputs(OP, device, q, k, v, kv_len, 0, causal)?;
    if shape.q_len != shape.kv_len {
        return Err(Error::InvalidArgument {
            op: OP,
            message: format!(
                "training attention needs q and k of the same length, got {} and {} (use attention_decode for a KV cache)",
                shape.q_len, shape.kv_len
            ),
        });
    }
    launch_forward(device, kernel, out, lse, q, k, v, shape, causal)
}

/// Decoding: `q` holds the `Tq` newest positions `position_offset..position_offset + Tq`
/// (causal), attending to the first `kv_len` positions of the cache `k_cache`, `v_cache`
/// (`[B, capacity, Hkv, hd]`).
pub fn attention_decode<R: Runtime, F: FloatElement>(
    device: &Device<R>,
    out: &mut GpuTensor<R, F>,
    lse: &mut GpuTensor<R, f32>,
    q: &GpuTensor<R, F>,
    k_cache: &GpuTensor<R, F>,
    v_cache: &GpuTensor<R, F>,
    kv_len: usize,
    position_offset: usize,
) -> Result<()> {
    let shape = check_inputs("attention_decode", device, q, k_cache, v_cache, kv_len, position_offset, true)?;
    let kernel = AttentionKernel::best::<R, F>(device);
    launch_forward(device, kernel, out, lse, q, k_cache, v_cache, shape, true)
}

/// Backward of [`attention_forward`]: `dq =`, `dk =`, `dv =`, with the best kernels for the
/// device. `delta` is a `[B, Hq, T]` f32 scratch (overwritten).
pub fn attention_backward<R: Runtime, F: FloatElement>(
    device: &Device<R>,
    dq: &mut GpuTensor<R, F>,
    dk: &mut GpuTensor<R, F>,
    dv: &mut GpuTensor<R, F>,
    delta: &mut GpuTensor<R, f32>,
    dout: &GpuTensor<R, F>,
    q: &GpuTensor<R, F>,
    k: &GpuTensor<R, F>,
    v: &GpuTensor<R, F>,
    out: &GpuTensor<R, F>,
    lse: &GpuTensor<R, f32>,
    causal: bool,
) -> Result<()> {
    let kernel = AttentionKernel::best::<R, F>(device);
    attention_backward_with(device, kernel, dq, dk, dv, delta, dout, q, k, v, out, lse, causal)
}

/// [`attention_backward`] with the given kernels; ones the device lacks are an error.
pub fn attention_backward_with<R: Runtime, F: FloatElement>(
    device: &Device<R>,
    kernel: AttentionKernel,
    dq: &mut GpuTensor<R, F>,
    dk: &mut GpuTensor<R, F>,
    dv: &mut GpuTensor<R, F>,
    delta: &mut GpuTensor<R, f32>,
    dout: &GpuTensor<R, F>,
    q: &GpuTensor<R, F>,
    k: &GpuTensor<R, F>,
    v: &GpuTensor<R, F>,
    out: &GpuTensor<R, F>,
    lse: &GpuTensor<R, f32>,
    causal: bool,
) -> Result<()> {
    const OP: &str = "attention_backward";
    let kv_len = k.shape().get(1).copied().unwrap_or(0);
    let shape = check_inputs(OP, device, q, k, v, kv_len, 0, causal)?;
    if shape.q_len != shape.kv_len {
        return Err(Error::InvalidArgument {
            op: OP,
            message: format!("q and k must have the same length, got {} and {}", shape.q_len, shape.kv_len),
        });
    }
    for (name, t) in [("dq", dq.shape()), ("dout", dout.shape()), ("out", out.shape())] {
        Error::check_shape(OP, name, t, q.shape())?;
    }
    Error::check_shape(OP, "dk", dk.shape(), k.shape())?;
    Error::check_shape(OP, "dv", dv.shape(), k.shape())?;
    let stats = [shape.batch, shape.q_heads, shape.q_len];
    Error::check_shape(OP, "lse", lse.shape(), &stats)?;
    Error::check_shape(OP, "delta", delta.shape(), &stats)?;
    check_kernel_available::<R, F>(OP, device, kernel, shape.head_dim)?;
    if shape.batch * shape.q_len == 0 {
        return Ok(());
    }
    let scale = 1.0 / (shape.head_dim as f32).sqrt();
    let rows = shape.batch * shape.q_len * shape.q_heads;
    let (count, dim) = dsl::launch::elementwise_grid(device, rows);
    // SAFETY: one unit per query row, guarded by `row < rows`; rows hold hd/4 vectors.
    unsafe {
        portable::attention_delta_kernel::launch_unchecked::<F, R>(
            device.client(),
            count,
            dim,
            VEC,
            delta.as_array_arg(),
            dout.as_array_arg(),
            out.as_array_arg(),
            shape.q_len as u32,
            shape.q_heads as u32,
            rows as u32,
            shape.head_dim as u32,
        );
    }
    if kernel == AttentionKernel::Flash {
        flash::backward(device, dq, dk, dv, dout, q, k, v, lse, delta, shape, causal);
        return Ok(());
    }
    let (cfg, units) = kernel_config::<R, F>(device, kernel, shape.head_dim, causal);
    // Both kernels: `block_q` rows (keys for dK/dV, queries for dQ) per cube.
    let key_blocks = CubeCount::Static(
        shape.kv_len.div_ceil(cfg.block_q as usize) as u32,
        (shape.batch * shape.kv_heads) as u32,
        1,
    );
    let query_blocks = CubeCount::Static(
        shape.q_len.div_ceil(cfg.block_q as usize) as u32,
        (shape.batch * shape.q_heads) as u32,
        1,
    );
    let t = shape.q_len;
    let heads = (shape.q_heads as u32, shape.kv_heads as u32);
    // SAFETY: key rows guarded by `j < kv_len`, query rows by `i < q_len`; heads in range as in
    // the forward; shared tiles indexed below their comptime sizes.
    unsafe {
        match kernel {
            AttentionKernel::Portable => {
                portable::attention_dkdv_kernel::launch_unchecked::<F, R>(
                    device.client(),
                    key_blocks,
                    CubeDim::new_1d(units),
                    VEC,
                    dk.as_array_arg(),
                    dv.as_array_arg(),
                    q.as_array_arg(),
                    k.as_array_arg(),
                    v.as_array_arg(),
                    dout.as_array_arg(),
                    lse.as_array_arg(),
                    delta.as_array_arg(),
                    t as u32,
                    t as u32,
                    heads.0,
                    heads.1,
                    0,
                    scale,
                    cfg,
                );
                portable::attention_dq_kernel::launch_unchecked::<F, R>(
                    device.client(),
                    query_blocks,
                    CubeDim::new_1d(units),
                    VEC,
                    dq.as_array_arg(),
                    q.as_array_arg(),
                    k.as_array_arg(),
                    v.as_array_arg(),
                    dout.as_array_arg(),
                    lse.as_array_arg(),
                    delta.as_array_arg(),
                    t as u32,
                    t as u32,
                    heads.0,
                    heads.1,
                    0,
                    scale,
                    cfg,
                );
            }
            AttentionKernel::Flash => unreachable!("launched above"),
            AttentionKernel::TensorCores => {
                tensor_cores::attention_dkdv_cmma_kernel::launch_unchecked::<F, R>(
                    device.client(),
                    key_blocks,
                    CubeDim::new_1d(units),
                    VEC,
                    dk.as_array_arg(),
                    dv.as_array_arg(),
                    q.as_array_arg(),
                    k.as_array_arg(),
                    v.as_array_arg(),
                    dout.as_array_arg(),
                    lse.as_array_arg(),
                    delta.as_array_arg(),
                    t as u32,
                    t as u32,
                    heads.0,
                    heads.1,
                    scale,
                    cfg,
                );
                tensor_cores::attention_dq_cmma_kernel::launch_unchecked::<F, R>(
                    device.client(),
                    query_blocks,
                    CubeDim::new_1d(units),
                    VEC,
                    dq.as_array_arg(),
                    q.as_array_arg(),
                    k.as_array_arg(),
                    v.as_array_arg(),
                    dout.as_array_arg(),
                    lse.as_array_arg(),
                    delta.as_array_arg(),
                    t as u32,
                    t as u32,
                    heads.0,
                    heads.1,
                    scale,
                    cfg,
                );
            }
        }
    }
    Ok(())
}
