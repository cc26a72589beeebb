//! FlashAttention-2's design on warp-level matrix instructions: forward and backward.
//!
//! Same equations, layout, GQA rule, saved log-sum-exp and determinism (no atomics) as the
//! other kernel sets of [`crate::attention`]; what differs is where the work happens
//! (Dao, "FlashAttention-2", 2023, §3):
//! - **Each warp owns 16 query rows** (forward, dQ) or 16 key rows (dK/dV) for the whole loop
//!   over the other side's tiles. Its products run on PTX's `mma.m16n8k16` (f16/bf16 in, f32
//!   accumulate) through CubeCL's manual MMA ([`cubecl::cmma::MmaDefinition`]), whose register
//!   layout is public ([`mma`]), so the softmax works on the accumulator registers themselves:
//!   row max and sum by two shuffles among the four lanes that share a row, no barrier.
//! - **The exponentiated scores stay in registers** and become the A operand of the next product
//!   (`P·V`, `dS·K`, `Pᵀ·dO`, `dSᵀ·Q`) without a trip through shared memory: an m16n8 accumulator
//!   pair has exactly the lane layout of an m16k16 A fragment ([`mma::acc_to_a`]).
//! - **Output accumulators live in registers** (O; dQ; dK and dV) and leave once, at the end,
//!   through a shared-memory tile, in 128-bit global stores.
//! - **Tiles come in 128-bit loads** and sit in shared memory padded by 8 elements per row, so
//!   the 8 rows × 4 lanes of a fragment load hit 32 different banks.
//! - **GQA by index arithmetic**, the causal tiles past the diagonal skipped wholesale.
//!
//! Where the device has no `mma.m16n8k16` for the element type (every wgpu device, and f32 on
//! CUDA), the same kernels run with the instruction emulated ([`mma::mma`]: the warp's fragments
//! through shared memory, the same layout, f32 sums). That is slow and only there so that every
//! piece of these kernels except the instruction itself (fragment indexing, the register
//! softmax, masking, tiling, staging, the epilogue) is exercised by the lavapipe tests.
//!
//! Not yet FlashAttention-2: tiles are staged with plain 128-bit loads into one buffer (no
//! `cp.async` double buffering), fragments are loaded with 32-bit shared-memory reads (no
//! `ldmatrix`; a B operand whose pairs run down the tile's rows, as V in `P·V`, takes two reads
//! per pair where `ldmatrix.trans` takes one), the causal mask is applied to every tile, not
//! only the diagonal one, and the tile sizes are untimed guesses (issue 18).
//!
//! **These kernels have not run on a GPU**: `cargo xtask cuda-report` compiles them offline
//! (registers, spills, shared memory for sm_80/sm_90), and [`super::AttentionKernel::best`]
//! does not choose them until a GPU has tested and timed them.

pub(crate) mod backward;
pub(crate) mod forward;
pub mod mma;
pub(crate) mod tiles;

use cubecl::features::MmaConfig;
use cubecl::prelude::*;
use dsl::{DType, Device, FloatElement, GpuTensor};

use super::rules::AttentionShape;

/// Query (or key) rows per warp: the m of `mma.m16n8k16`.
pub const WARP_ROWS: usize = 16;
/// Units per warp the fragment layout assumes.
pub const WARP_LANES: usize = 32;
/// Elements of padding after each staged row: 16 bytes for f16/bf16, so rows stay 16-byte
/// aligned and consecutive rows start 4 banks apart.
pub(crate) const PAD: usize = 8;

/// The comptime configuration of a flash launch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlashConfig {
    pub head_dim: u32,
    pub causal: bool,
    /// Warps per cube; each owns [`WARP_ROWS`] rows, so a cube owns `16·warps` rows.
    pub warps: u32,
    /// Rows of the other side per shared-memory tile (keys forward and for dQ, queries for
    /// dK/dV); a multiple of 16.
    pub block: u32,
    /// Whether the products run on the device's `mma.m16n8k16` (else emulated, see the module
    /// docs).
    pub device_mma: bool,
    /// Elements per global-memory vector: 128 bits of the element type, at most the head_dim.
    pub vector: u32,
}

impl FlashConfig {
    /// Rows a cube owns.
    pub fn rows(&self) -> usize {
        self.warps as usize * WARP_ROWS
    }

    /// Units per cube.
    pub fn units(&self) -> u32 {
        self.warps * WARP_LANES as u32
    }
}

/// Whether `device` has `mma.m16n8k16` with `F` inputs and f32 accumulators (CUDA sm_80 and
/// later, f16 and bf16) and 32-unit planes.
pub fn device_mma<R: Runtime, F: FloatElement>(device: &Device<R>) -> bool {
    if F::DTYPE == DType::F32 || !device.supports::<F>() {
        return false;
    }
    let info = device.info();
    if info.plane_size_min != WARP_LANES as u32 || info.plane_size_max != WARP_LANES as u32 {
        return false;
    }
    let elem = F::as_type_native_unchecked().storage_type();
    let f32_elem = f32::as_type_native_unchecked().storage_type();
    device.client().features().matmul.mma.contains(&MmaConfig {
        a_type: elem,
        b_type: elem,
        cd_type: f32_elem,
        m: 16,
        n: 8,
        k: 16,
    })
}

/// Which kernel a shared-memory size is asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlashPass {
    Forward,
    /// dQ over key tiles.
    BackwardDq,
    /// dK and dV over query tiles.
    BackwardDkDv,
}

/// Shared memory of one cube of `cfg` for `pass`, in bytes, with `element_bytes` per element.
/// Every tile is row-major with `hd + 8` elements per row:
/// - forward: Q (then O) of `rows`, K and V of `block`;
/// - dQ: Q (then dQ) and dO of `rows`, K and V of `block`;
/// - dK/dV: K (then dK) and V (then dV) of `rows`, Q and dO of `block`, and two f32 rows of
///   `block` (lse, delta);
///
/// plus, where the instruction is emulated, [`mma::EMULATION_SCRATCH`] f32 per warp.
pub fn shared_bytes(cfg: &FlashConfig, pass: FlashPass, element_bytes: usize) -> usize {
    let (hd, rows, block) = (cfg.head_dim as usize, cfg.rows(), cfg.block as usize);
    let tile = |r: usize| r * (hd + PAD);
    let elements = match pass {
        FlashPass::Forward => tile(rows) + 2 * tile(block),
        FlashPass::BackwardDq | FlashPass::BackwardDkDv => 2 * tile(rows) + 2 * tile(block),
    };
    let stats = if pass == FlashPass::BackwardDkDv { 4 * 2 * block } else { 0 };
    let scratch = if cfg.device_mma { 0 } else { 4 * mma::EMULATION_SCRATCH * cfg.warps as usize };
    element_bytes * elements + stats + scratch
}

/// The configuration `pass` launches with: 4 warps (64 rows) by tiles of 64 (32 for the
/// backward), fewer where the device's shared memory is short (tiles first, down to 16, then
/// warps, down to 1).
/// FlashAttention-2 uses 4 warps × 128 rows; the sizes here are a start until a GPU has timed
/// them (issue 18).
pub fn config<R: Runtime, F: FloatElement>(
    device: &Device<R>,
    pass: FlashPass,
    head_dim: usize,
    causal: bool,
) -> FlashConfig {
    let element_bytes = F::DTYPE.size_bytes();
    let vector = (16 / element_bytes).min(device.info().max_vector_size.max(1)).min(head_dim) as u32;
    // The backward keeps two 16×block accumulators per warp (S and dP) beside its outputs: with
    // tiles of 64, dQ reached 255 registers and spilled at several head_dims (cargo xtask
    // cuda-report, sm_80/sm_90); tiles of 32 keep both passes within the register file.
    let block = if pass == FlashPass::Forward { 64 } else { 32 };
    let mut cfg = FlashConfig {
        head_dim: head_dim as u32,
        causal,
        warps: 4,
        block,
        device_mma: device_mma::<R, F>(device),
        vector,
    };
    let budget = device.info().max_shared_memory_bytes;
    while cfg.block > WARP_ROWS as u32 && shared_bytes(&cfg, pass, element_bytes) > budget {
        cfg.block /= 2;
    }
    while cfg.warps > 1 && shared_bytes(&cfg, pass, element_bytes) > budget {
        cfg.warps /= 2;
    }
    // Units per cube are capped too (lavapipe allows 1024, CUDA 1024).
    while cfg.warps > 1 && cfg.units() > device.info().max_units_per_cube {
        cfg.warps /= 2;
    }
    cfg
}

/// Whether all three flash kernels fit `device` at `head_dim` once [`config`] has shrunk them
/// (down to one warp and tiles of 16): the launchers refuse the flash kernels otherwise.
pub fn fits<R: Runtime, F: FloatElement>(device: &Device<R>, head_dim: usize) -> bool {
    let element_bytes = F::DTYPE.size_bytes();
    [FlashPass::Forward, FlashPass::BackwardDq, FlashPass::BackwardDkDv].into_iter().all(|pass| {
        let cfg = config::<R, F>(device, pass, head_dim, true);
        shared_bytes(&cfg, pass, element_bytes) <= device.info().max_shared_memory_bytes
            && cfg.units() <= device.info().max_units_per_cube
    })
}

/// Launches the flash forward (`out =`, `lse =`) on checked inputs (see
/// [`super::attention_forward_with`]).
#[allow(clippy::too_many_arguments)]
pub(crate) fn forward<R: Runtime, F: FloatElement>(
    device: &Device<R>,
    out: &mut GpuTensor<R, F>,
    lse: &mut GpuTensor<R, f32>,
    q: &GpuTensor<R, F>,
    k: &GpuTensor<R, F>,
    v: &GpuTensor<R, F>,
    shape: AttentionShape,
    causal: bool,
) {
    let cfg = config::<R, F>(device, FlashPass::Forward, shape.head_dim, causal);
    let count =
        CubeCount::Static(shape.q_len.div_ceil(cfg.rows()) as u32, (shape.batch * shape.q_heads) as u32, 1);
    let scale = 1.0 / (shape.head_dim as f32).sqrt();
    // SAFETY: query rows are guarded by `< q_len`, key rows by `< kv_len ≤ kv_capacity` (staging
    // zero-fills past them); head indices are < Hq, Hkv by construction; head_dim is the
    // compiled one (checked) and a multiple of the vector width, so row accesses stay in their
    // rows; shared tiles are indexed below their comptime sizes (rows × (hd + 8) / 2 pairs).
    unsafe {
        forward::flash_forward_kernel::launch_unchecked::<F, R>(
            device.client(),
            count,
            CubeDim::new_1d(cfg.units()),
            cfg.vector as usize,
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
        );
    }
}

/// Launches the flash dQ and dK/dV kernels (`dq =`, `dk =`, `dv =`) on checked inputs, after
/// the `delta` pre-pass (see [`super::attention_backward_with`]).
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward<R: Runtime, F: FloatElement>(
    device: &Device<R>,
    dq: &mut GpuTensor<R, F>,
    dk: &mut GpuTensor<R, F>,
    dv: &mut GpuTensor<R, F>,
    dout: &GpuTensor<R, F>,
    q: &GpuTensor<R, F>,
    k: &GpuTensor<R, F>,
    v: &GpuTensor<R, F>,
    lse: &GpuTensor<R, f32>,
    delta: &GpuTensor<R, f32>,
    shape: AttentionShape,
    causal: bool,
) {
    let scale = 1.0 / (shape.head_dim as f32).sqrt();
    let (t, hq, hkv) = (shape.q_len as u32, shape.q_heads as u32, shape.kv_heads as u32);
    let dq_cfg = config::<R, F>(device, FlashPass::BackwardDq, shape.head_dim, causal);
    let dkdv_cfg = config::<R, F>(device, FlashPass::BackwardDkDv, shape.head_dim, causal);
    let query_blocks = CubeCount::Static(
        shape.q_len.div_ceil(dq_cfg.rows()) as u32,
        (shape.batch * shape.q_heads) as u32,
        1,
    );
    let key_blocks = CubeCount::Static(
        shape.kv_len.div_ceil(dkdv_cfg.rows()) as u32,
        (shape.batch * shape.kv_heads) as u32,
        1,
    );
    // SAFETY: as in `forward`; lse and delta rows are read below `q_len` only.
    unsafe {
        backward::flash_dq_kernel::launch_unchecked::<F, R>(
            device.client(),
            query_blocks,
            CubeDim::new_1d(dq_cfg.units()),
            dq_cfg.vector as usize,
            dq.as_array_arg(),
            q.as_array_arg(),
            k.as_array_arg(),
            v.as_array_arg(),
            dout.as_array_arg(),
            lse.as_array_arg(),
            delta.as_array_arg(),
            t,
            t,
            hq,
            hkv,
            scale,
            dq_cfg,
        );
        backward::flash_dkdv_kernel::launch_unchecked::<F, R>(
            device.client(),
            key_blocks,
            CubeDim::new_1d(dkdv_cfg.units()),
            dkdv_cfg.vector as usize,
            dk.as_array_arg(),
            dv.as_array_arg(),
            q.as_array_arg(),
            k.as_array_arg(),
            v.as_array_arg(),
            dout.as_array_arg(),
            lse.as_array_arg(),
            delta.as_array_arg(),
            t,
            t,
            hq,
            hkv,
            scale,
            dkdv_cfg,
        );
    }
}
