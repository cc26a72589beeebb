//! What every attention kernel set shares: the head dimensions compiled, the comptime
//! configuration, a call's sizes, and the `#[cube]` rules of which keys a query block visits
//! and which it sees (the causal mask). The portable kernels use them, so the CPU tests
//! exercise the same rules the tensor-core kernels follow.

use cubecl::prelude::*;
use dsl::Device;

/// Head dimensions a kernel is compiled for.
pub const SUPPORTED_HEAD_DIMS: [usize; 8] = [16, 32, 48, 64, 80, 96, 112, 128];
/// Elements per vector in the head dimension (every supported head_dim is a multiple).
pub(crate) const VEC: usize = 4;

/// The comptime part of an attention launch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AttentionConfig {
    pub head_dim: u32,
    pub causal: bool,
    /// Query rows per cube (one unit each).
    pub block_q: u32,
    /// Key rows per shared-memory tile.
    pub block_kv: u32,
}

/// Sizes of one attention call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionShape {
    pub batch: usize,
    pub q_len: usize,
    /// Filled key/value positions.
    pub kv_len: usize,
    /// Allocated key/value positions (≥ kv_len; the cache size when decoding).
    pub kv_capacity: usize,
    pub q_heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub position_offset: usize,
}

impl AttentionConfig {
    /// One unit per query row, 64 rows per cube; key tiles as long as the forward's shared
    /// memory (two f32 tiles of `block_kv × head_dim` plus `block_q × block_kv` scores) fits
    /// in three quarters of the device's (lavapipe has 32 KiB, CUDA 48 KiB without opt-in).
    pub fn select<R: Runtime>(device: &Device<R>, head_dim: usize, causal: bool) -> Self {
        let block_q = dsl::launch::cube_units(device, 64);
        let budget = device.info().max_shared_memory_bytes * 3 / 4;
        let bytes = |block_kv: usize| 4 * (2 * block_kv * head_dim + block_q as usize * block_kv);
        let mut block_kv = 64usize;
        while block_kv > 4 && bytes(block_kv) > budget {
            block_kv /= 2;
        }
        Self { head_dim: head_dim as u32, causal, block_q, block_kv: block_kv as u32 }
    }
}

/// Whether the query at position `q_pos` sees key `j` (of `kv_len` filled).
#[cube]
pub(crate) fn sees(q_pos: usize, j: usize, kv_len: u32, #[comptime] causal: bool) -> bool {
    let mut visible = j < kv_len as usize;
    if comptime!(causal) {
        visible = visible && j <= q_pos;
    }
    visible
}

/// Keys a cube of `block_q` query rows (block `CUBE_POS_X`) must visit: all filled ones, or
/// (causal) those up to its last query's position.
#[cube]
pub(crate) fn keys_needed(
    q_len: u32,
    kv_len: u32,
    position_offset: u32,
    block_q: usize,
    #[comptime] causal: bool,
) -> usize {
    let mut kv_end = kv_len as usize;
    if comptime!(causal) {
        let last_q = min((CUBE_POS_X as usize + 1) * block_q, q_len as usize);
        kv_end = min(kv_end, position_offset as usize + last_q);
    }
    kv_end
}
