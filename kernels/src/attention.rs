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
//! Two sets of kernels ([`AttentionKernel`]): the portable ones (plain f32 arithmetic, one unit
//! per query or key row; every device, and what the lavapipe tests cover) and, for f16/bf16
//! where the device has matrix instructions (CUDA), the tensor-core ones in
//! [`crate::attention_cmma`]. [`attention_forward`] picks the best available;
//! [`attention_forward_with`] picks explicitly.
//! The backward likewise ([`attention_backward`], [`attention_backward_with`]).

use cubecl::prelude::*;
use dsl::{Device, Error, FloatElement, GpuTensor, Result};

/// Head dimensions a kernel is compiled for.
pub const SUPPORTED_HEAD_DIMS: [usize; 8] = [16, 32, 48, 64, 80, 96, 112, 128];
/// Elements per vector in the head dimension (every supported head_dim is a multiple).
const VEC: usize = 4;

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

/// Which kernels run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AttentionKernel {
    /// Plain f32 arithmetic, one unit per query (or key) row: every device and element type.
    Portable,
    /// Matrix instructions (CubeCL's cmma: CUDA wmma) for every product: f16/bf16 on CUDA.
    TensorCores,
}

impl AttentionKernel {
    /// The fastest kernel `device` runs for `F`.
    pub fn best<R: Runtime, F: FloatElement>(device: &Device<R>) -> Self {
        if crate::attention_cmma::available::<R, F>(device) { Self::TensorCores } else { Self::Portable }
    }

    /// Every kernel `device` runs for `F`, portable first.
    pub fn available<R: Runtime, F: FloatElement>(device: &Device<R>) -> Vec<Self> {
        let mut kernels = vec![Self::Portable];
        if Self::best::<R, F>(device) == Self::TensorCores {
            kernels.push(Self::TensorCores);
        }
        kernels
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Portable => "portable",
            Self::TensorCores => "tensor cores",
        }
    }
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

/// Loads keys `j0 .. j0 + block_kv` of one key/value head into the two tiles (f32, zero past
/// `kv_len`), all units of the cube together (`units` of them). Ends with a barrier.
#[cube]
fn load_kv_tile<F: Float, N: Size>(
    k_tile: &mut SharedMemory<Vector<f32, N>>,
    v_tile: &mut SharedMemory<Vector<f32, N>>,
    k: &Array<Vector<F, N>>,
    v: &Array<Vector<F, N>>,
    j0: usize,
    kv_len: u32,
    kv_capacity: u32,
    kv_heads: u32,
    b: usize,
    kvh: usize,
    units: usize,
    #[comptime] block_kv: usize,
    #[comptime] hdv: usize,
) {
    let mut e = UNIT_POS as usize;
    while e < block_kv * hdv {
        let j = j0 + e / hdv;
        let mut kt = Vector::<f32, N>::new(f32::new(0.0));
        let mut vt = Vector::<f32, N>::new(f32::new(0.0));
        if j < kv_len as usize {
            let at = ((b * kv_capacity as usize + j) * kv_heads as usize + kvh) * hdv + e % hdv;
            kt = Vector::<f32, N>::cast_from(k[at]);
            vt = Vector::<f32, N>::cast_from(v[at]);
        }
        k_tile[e] = kt;
        v_tile[e] = vt;
        e += units;
    }
    sync_cube();
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

#[cube(launch_unchecked)]
fn attention_forward_kernel<F: Float, N: Size>(
    out: &mut Array<Vector<F, N>>,
    lse: &mut Array<f32>,
    q: &Array<Vector<F, N>>,
    k: &Array<Vector<F, N>>,
    v: &Array<Vector<F, N>>,
    q_len: u32,
    kv_len: u32,
    kv_capacity: u32,
    q_heads: u32,
    kv_heads: u32,
    position_offset: u32,
    scale: f32,
    #[comptime] cfg: AttentionConfig,
) {
    let hdv = comptime!(cfg.head_dim as usize / VEC);
    let bc = comptime!(cfg.block_kv as usize);
    let br = cfg.block_q as usize;
    let bh = CUBE_POS_Y as usize;
    let b = bh / q_heads as usize;
    let h = bh % q_heads as usize;
    let kvh = h / (q_heads / kv_heads) as usize;
    let tid = UNIT_POS as usize;
    let i = CUBE_POS_X as usize * br + tid;
    let row_valid = i < q_len as usize;
    let q_pos = position_offset as usize + i;

    // This unit's query row, pre-scaled, and its output accumulator.
    let mut q_row = Array::<Vector<f32, N>>::new(hdv);
    let mut acc = Array::<Vector<f32, N>>::new(hdv);
    let q_base = ((b * q_len as usize + i) * q_heads as usize + h) * hdv;
    #[unroll]
    for d in 0..hdv {
        q_row[d] = Vector::new(f32::new(0.0));
        acc[d] = Vector::new(f32::new(0.0));
    }
    if row_valid {
        #[unroll]
        for d in 0..hdv {
            q_row[d] = Vector::<f32, N>::cast_from(q[q_base + d]) * Vector::new(scale);
        }
    }

    // Keys this cube needs: all, or (causal) up to its last query's position.
    let kv_end = keys_needed(q_len, kv_len, position_offset, br, cfg.causal);

    let mut k_tile = SharedMemory::<Vector<f32, N>>::new(bc * hdv);
    let mut v_tile = SharedMemory::<Vector<f32, N>>::new(bc * hdv);
    // Each unit's scores for the tile. Shared memory rather than a local array: llvmpipe
    // takes 70–110 s to compile a dynamically indexed local array here, shared memory 1 s.
    let mut scores = SharedMemory::<f32>::new(comptime!(cfg.block_q as usize * cfg.block_kv as usize));
    let mut m = f32::min_value();
    let mut l = f32::new(0.0);
    let mut j0 = 0usize;
    while j0 < kv_end {
        // All units load the tile together, zero past the filled keys.
        load_kv_tile::<F, N>(
            &mut k_tile,
            &mut v_tile,
            k,
            v,
            j0,
            kv_len,
            kv_capacity,
            kv_heads,
            b,
            kvh,
            br,
            bc,
            hdv,
        );

        let mut tile_max = f32::min_value();
        for jj in 0..bc {
            let j = j0 + jj;
            let mut dot = Vector::<f32, N>::new(f32::new(0.0));
            #[unroll]
            for d in 0..hdv {
                dot += q_row[d] * k_tile[jj * hdv + d];
            }
            let mut s = f32::cast_from(dot.vector_sum());
            let visible = sees(q_pos, j, kv_len, cfg.causal);
            s = select(visible, s, f32::min_value());
            scores[tid * bc + jj] = s;
            tile_max = f32::max(tile_max, s);
        }
        let m_new = f32::max(m, tile_max);
        let correction = f32::exp(m - m_new);
        l *= correction;
        #[unroll]
        for d in 0..hdv {
            acc[d] = acc[d] * Vector::new(correction);
        }
        for jj in 0..bc {
            let j = j0 + jj;
            let visible = sees(q_pos, j, kv_len, cfg.causal);
            // Explicitly 0 when hidden: while every key so far is hidden, m_new is the
            // sentinel and exp(s − m_new) would be 1.
            let p = select(visible, f32::exp(scores[tid * bc + jj] - m_new), f32::new(0.0));
            l += p;
            #[unroll]
            for d in 0..hdv {
                acc[d] += v_tile[jj * hdv + d] * Vector::new(p);
            }
        }
        m = m_new;
        sync_cube();
        j0 += bc;
    }

    if row_valid {
        let inv_l = Vector::<f32, N>::new(f32::new(1.0) / l);
        #[unroll]
        for d in 0..hdv {
            out[q_base + d] = Vector::cast_from(acc[d] * inv_l);
        }
        lse[(b * q_heads as usize + h) * q_len as usize + i] = m + f32::ln(l);
    }
}

/// `delta[b, h, i] = Σ_d dout · out` for every query row.
#[cube(launch_unchecked)]
fn attention_delta_kernel<F: Float, N: Size>(
    delta: &mut Array<f32>,
    dout: &Array<Vector<F, N>>,
    out: &Array<Vector<F, N>>,
    q_len: u32,
    q_heads: u32,
    rows: u32,
    #[comptime] head_dim: u32,
) {
    let hdv = comptime!(head_dim as usize / VEC);
    let row = ABSOLUTE_POS; // (b, i, h) in the [B, Tq, Hq] order of the tensors
    if row < rows as usize {
        let mut dot = Vector::<f32, N>::new(f32::new(0.0));
        #[unroll]
        for d in 0..hdv {
            dot += Vector::<f32, N>::cast_from(dout[row * hdv + d])
                * Vector::<f32, N>::cast_from(out[row * hdv + d]);
        }
        let h = row % q_heads as usize;
        let bi = row / q_heads as usize;
        let (b, i) = (bi / q_len as usize, bi % q_len as usize);
        delta[(b * q_heads as usize + h) * q_len as usize + i] = f32::cast_from(dot.vector_sum());
    }
}

/// dK and dV: one unit per key row, summing over every query (of every query head in the
/// group) that sees it, tile by tile of queries through shared memory.
#[cube(launch_unchecked)]
fn attention_dkdv_kernel<F: Float, N: Size>(
    dk: &mut Array<Vector<F, N>>,
    dv: &mut Array<Vector<F, N>>,
    q: &Array<Vector<F, N>>,
    k: &Array<Vector<F, N>>,
    v: &Array<Vector<F, N>>,
    dout: &Array<Vector<F, N>>,
    lse: &Array<f32>,
    delta: &Array<f32>,
    q_len: u32,
    kv_len: u32,
    q_heads: u32,
    kv_heads: u32,
    position_offset: u32,
    scale: f32,
    #[comptime] cfg: AttentionConfig,
) {
    let hdv = comptime!(cfg.head_dim as usize / VEC);
    let bq = comptime!(cfg.block_kv as usize); // query rows per tile
    let units = cfg.block_q as usize; // key rows per cube
    let bh = CUBE_POS_Y as usize;
    let b = bh / kv_heads as usize;
    let kvh = bh % kv_heads as usize;
    let group = (q_heads / kv_heads) as usize;
    let tid = UNIT_POS as usize;
    let j = CUBE_POS_X as usize * units + tid;
    let key_valid = j < kv_len as usize;

    let mut k_row = Array::<Vector<f32, N>>::new(hdv);
    let mut v_row = Array::<Vector<f32, N>>::new(hdv);
    let mut dk_acc = Array::<Vector<f32, N>>::new(hdv);
    let mut dv_acc = Array::<Vector<f32, N>>::new(hdv);
    let kv_base = ((b * kv_len as usize + j) * kv_heads as usize + kvh) * hdv;
    #[unroll]
    for d in 0..hdv {
        k_row[d] = Vector::new(f32::new(0.0));
        v_row[d] = Vector::new(f32::new(0.0));
        dk_acc[d] = Vector::new(f32::new(0.0));
        dv_acc[d] = Vector::new(f32::new(0.0));
    }
    if key_valid {
        #[unroll]
        for d in 0..hdv {
            k_row[d] = Vector::<f32, N>::cast_from(k[kv_base + d]);
            v_row[d] = Vector::<f32, N>::cast_from(v[kv_base + d]);
        }
    }

    // Causal: queries before the cube's first key (minus the offset) see none of its keys.
    let mut i_start = 0usize;
    if comptime!(cfg.causal) {
        let first_key = CUBE_POS_X as usize * units;
        if first_key > position_offset as usize {
            i_start = (first_key - position_offset as usize) / bq * bq;
        }
    }

    let mut q_tile = SharedMemory::<Vector<f32, N>>::new(bq * hdv);
    let mut do_tile = SharedMemory::<Vector<f32, N>>::new(bq * hdv);
    let mut lse_tile = SharedMemory::<f32>::new(bq);
    let mut delta_tile = SharedMemory::<f32>::new(bq);
    for g in 0..group {
        let h = kvh * group + g;
        let stats_base = (b * q_heads as usize + h) * q_len as usize;
        let mut i0 = i_start;
        while i0 < q_len as usize {
            let mut e = tid;
            while e < bq * hdv {
                let i = i0 + e / hdv;
                let mut qt = Vector::<f32, N>::new(f32::new(0.0));
                let mut dot = Vector::<f32, N>::new(f32::new(0.0));
                if i < q_len as usize {
                    let at = ((b * q_len as usize + i) * q_heads as usize + h) * hdv + e % hdv;
                    qt = Vector::<f32, N>::cast_from(q[at]);
                    dot = Vector::<f32, N>::cast_from(dout[at]);
                }
                q_tile[e] = qt;
                do_tile[e] = dot;
                e += units;
            }
            let mut r = tid;
            while r < bq {
                let i = i0 + r;
                let mut lse_i = f32::new(0.0);
                let mut delta_i = f32::new(0.0);
                if i < q_len as usize {
                    lse_i = lse[stats_base + i];
                    delta_i = delta[stats_base + i];
                }
                lse_tile[r] = lse_i;
                delta_tile[r] = delta_i;
                r += units;
            }
            sync_cube();

            for ii in 0..bq {
                let i = i0 + ii;
                let visible = i < q_len as usize && sees(position_offset as usize + i, j, kv_len, cfg.causal);
                let mut qk = Vector::<f32, N>::new(f32::new(0.0));
                let mut dov = Vector::<f32, N>::new(f32::new(0.0));
                #[unroll]
                for d in 0..hdv {
                    qk += q_tile[ii * hdv + d] * k_row[d];
                    dov += do_tile[ii * hdv + d] * v_row[d];
                }
                let s = f32::cast_from(qk.vector_sum()) * scale;
                let p = select(visible, f32::exp(s - lse_tile[ii]), f32::new(0.0));
                let ds = p * (f32::cast_from(dov.vector_sum()) - delta_tile[ii]);
                #[unroll]
                for d in 0..hdv {
                    dv_acc[d] += do_tile[ii * hdv + d] * Vector::new(p);
                    dk_acc[d] += q_tile[ii * hdv + d] * Vector::new(ds);
                }
            }
            sync_cube();
            i0 += bq;
        }
    }

    if key_valid {
        #[unroll]
        for d in 0..hdv {
            dk[kv_base + d] = Vector::cast_from(dk_acc[d] * Vector::new(scale));
            dv[kv_base + d] = Vector::cast_from(dv_acc[d]);
        }
    }
}

/// dQ: one unit per query row, over tiles of keys through shared memory.
#[cube(launch_unchecked)]
fn attention_dq_kernel<F: Float, N: Size>(
    dq: &mut Array<Vector<F, N>>,
    q: &Array<Vector<F, N>>,
    k: &Array<Vector<F, N>>,
    v: &Array<Vector<F, N>>,
    dout: &Array<Vector<F, N>>,
    lse: &Array<f32>,
    delta: &Array<f32>,
    q_len: u32,
    kv_len: u32,
    q_heads: u32,
    kv_heads: u32,
    position_offset: u32,
    scale: f32,
    #[comptime] cfg: AttentionConfig,
) {
    let hdv = comptime!(cfg.head_dim as usize / VEC);
    let bc = comptime!(cfg.block_kv as usize);
    let br = cfg.block_q as usize;
    let bh = CUBE_POS_Y as usize;
    let b = bh / q_heads as usize;
    let h = bh % q_heads as usize;
    let kvh = h / (q_heads / kv_heads) as usize;
    let tid = UNIT_POS as usize;
    let i = CUBE_POS_X as usize * br + tid;
    let row_valid = i < q_len as usize;
    let q_pos = position_offset as usize + i;

    let mut q_row = Array::<Vector<f32, N>>::new(hdv);
    let mut do_row = Array::<Vector<f32, N>>::new(hdv);
    let mut dq_acc = Array::<Vector<f32, N>>::new(hdv);
    let q_base = ((b * q_len as usize + i) * q_heads as usize + h) * hdv;
    #[unroll]
    for d in 0..hdv {
        q_row[d] = Vector::new(f32::new(0.0));
        do_row[d] = Vector::new(f32::new(0.0));
        dq_acc[d] = Vector::new(f32::new(0.0));
    }
    let mut lse_i = f32::new(0.0);
    let mut delta_i = f32::new(0.0);
    if row_valid {
        #[unroll]
        for d in 0..hdv {
            q_row[d] = Vector::<f32, N>::cast_from(q[q_base + d]);
            do_row[d] = Vector::<f32, N>::cast_from(dout[q_base + d]);
        }
        let stat = (b * q_heads as usize + h) * q_len as usize + i;
        lse_i = lse[stat];
        delta_i = delta[stat];
    }

    let kv_end = keys_needed(q_len, kv_len, position_offset, br, cfg.causal);
    let mut k_tile = SharedMemory::<Vector<f32, N>>::new(bc * hdv);
    let mut v_tile = SharedMemory::<Vector<f32, N>>::new(bc * hdv);
    let mut j0 = 0usize;
    while j0 < kv_end {
        load_kv_tile::<F, N>(
            &mut k_tile,
            &mut v_tile,
            k,
            v,
            j0,
            kv_len,
            kv_len,
            kv_heads,
            b,
            kvh,
            br,
            bc,
            hdv,
        );
        for jj in 0..bc {
            let j = j0 + jj;
            let visible = row_valid && sees(q_pos, j, kv_len, cfg.causal);
            let mut qk = Vector::<f32, N>::new(f32::new(0.0));
            let mut dov = Vector::<f32, N>::new(f32::new(0.0));
            #[unroll]
            for d in 0..hdv {
                qk += q_row[d] * k_tile[jj * hdv + d];
                dov += do_row[d] * v_tile[jj * hdv + d];
            }
            let s = f32::cast_from(qk.vector_sum()) * scale;
            let p = select(visible, f32::exp(s - lse_i), f32::new(0.0));
            let ds = p * (f32::cast_from(dov.vector_sum()) - delta_i);
            #[unroll]
            for d in 0..hdv {
                dq_acc[d] += k_tile[jj * hdv + d] * Vector::new(ds);
            }
        }
        sync_cube();
        j0 += bc;
    }
    if row_valid {
        #[unroll]
        for d in 0..hdv {
            dq[q_base + d] = Vector::cast_from(dq_acc[d] * Vector::new(scale));
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
) -> Result<()> {
    if kernel == AttentionKernel::TensorCores && !crate::attention_cmma::available::<R, F>(device) {
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
            let cfg = crate::attention_cmma::config::<R, F>(device, head_dim, causal);
            (cfg, crate::attention_cmma::cube_units(&cfg))
        }
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
    check_kernel_available::<R, F>(OP, device, kernel)?;
    if shape.batch * shape.q_len == 0 {
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
            AttentionKernel::Portable => attention_forward_kernel::launch_unchecked::<F, R>(
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
            AttentionKernel::TensorCores => {
                crate::attention_cmma::attention_forward_cmma_kernel::launch_unchecked::<F, R>(
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
    check_kernel_available::<R, F>(OP, device, kernel)?;
    if shape.batch * shape.q_len == 0 {
        return Ok(());
    }
    let scale = 1.0 / (shape.head_dim as f32).sqrt();
    let rows = shape.batch * shape.q_len * shape.q_heads;
    let (count, dim) = dsl::launch::elementwise_grid(device, rows);
    // SAFETY: one unit per query row, guarded by `row < rows`; rows hold hd/4 vectors.
    unsafe {
        attention_delta_kernel::launch_unchecked::<F, R>(
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
                attention_dkdv_kernel::launch_unchecked::<F, R>(
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
                attention_dq_kernel::launch_unchecked::<F, R>(
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
            AttentionKernel::TensorCores => {
                crate::attention_cmma::attention_dkdv_cmma_kernel::launch_unchecked::<F, R>(
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
                crate::attention_cmma::attention_dq_cmma_kernel::launch_unchecked::<F, R>(
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
