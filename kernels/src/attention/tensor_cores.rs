//! The tensor-core path of attention: every product (`S = Q·Kᵀ`, `O += P·V` forward; `S`,
//! `dP = dO·Vᵀ`, `dQ += dS·K`, `dV += Pᵀ·dO`, `dK += dSᵀ·Q` backward) on CubeCL's cooperative
//! matrices (CUDA's wmma, 16×16×16 tiles, f16/bf16 in, f32 accumulate), softmax and the
//! elementwise parts in f32. Same equations, layout, GQA rule, saved log-sum-exp and
//! determinism (no atomics: dK/dV per key block, dQ per query block) as the portable kernels in
//! [`crate::attention`]; chosen at launch where the device offers the 16×16×16 `F×F→f32`
//! matrix instruction and 32-unit planes.
//!
//! A cube holds `block_q / 16` planes; each plane owns 16 query rows. Per tile of `block_kv`
//! keys: all units stage K and V in shared memory; each plane multiplies its Q rows by the
//! tile into f32 scores in shared memory; two lanes per row (each half the columns, combined
//! with one shuffle) run the online softmax and write P in the input precision; then each plane
//! multiplies P by V 16 head columns at a time, bounced through shared memory into the same
//! two lanes' f32 output registers, which are rescaled by the softmax correction. Fragment
//! contents are opaque (their lane layout is the vendor's), hence the bounce. The backward
//! works the same way: dQ per block of 16·planes queries over key tiles (S and dP by the tensor
//! cores, P and dS in f32 by two lanes per row, dS·K bounced into registers), dK and dV per block
//! of keys over the query tiles of every query head in the group (Sᵀ = K·Qᵀ, dPᵀ = V·dOᵀ,
//! Pᵀ·dO and dSᵀ·Q bounced).
//!
//! Speed (H100, README "Benchmark"): ~3% of PyTorch's SDPA. Every barrier is cube-wide (plane
//! barriers would do for the per-plane scratch but are untested on a GPU), K and V are staged
//! element by element without double buffering, and P·V goes through shared memory.
//!
//! Accuracy: scores and sums stay in f32; P is rounded to the input precision before `P·V`,
//! as in FlashAttention (the naive reference the tests compare against rounds S, P and O).

use cubecl::features::MmaConfig;
use cubecl::prelude::*;
use dsl::{DType, Device, FloatElement};

use super::rules::{AttentionConfig, VEC, keys_needed, sees};

/// Side of the square matrix tile (m = n = k).
const TILE: usize = 16;
/// Lanes per plane the lane-to-row mapping assumes.
const PLANE: u32 = 32;
/// Byte alignment of the shared tiles: wmma loads and stores need 256-bit aligned pointers.
const ALIGN: usize = 32;

/// Whether `device` runs this path for `F`: f16/bf16 with the 16×16×16 `F×F→f32` matrix
/// instruction and 32-unit planes (CUDA on Volta and later for f16, Ampere and later for bf16).
pub fn available<R: Runtime, F: FloatElement>(device: &Device<R>) -> bool {
    if F::DTYPE == DType::F32 || !device.supports::<F>() {
        return false;
    }
    let info = device.info();
    if info.plane_size_min != PLANE || info.plane_size_max != PLANE {
        return false;
    }
    let elem = F::as_type_native_unchecked().storage_type();
    let f32_elem = f32::as_type_native_unchecked().storage_type();
    let tile = TILE as u32;
    device.client().features().matmul.cmma.contains(&MmaConfig {
        a_type: elem,
        b_type: elem,
        cd_type: f32_elem,
        m: tile,
        n: tile,
        k: tile,
    })
}

/// Shared memory of one cube, at most (the backward's): two `F` tiles of `block_q × hd`
/// (Q and dO, or K and V), two of `block_kv × hd`, two `F` and two f32 `block_q × block_kv`
/// (P, dS; scores, dP), and two f32 rows of statistics.
pub fn shared_bytes(cfg: &AttentionConfig, element_bytes: usize) -> usize {
    let (hd, bq, bk) = (cfg.head_dim as usize, cfg.block_q as usize, cfg.block_kv as usize);
    element_bytes * 2 * (bq * hd + bk * hd + bq * bk) + 4 * 2 * (bq * bk + bk)
}

/// 64 rows (4 planes) by tiles of 64, smaller where shared memory is short.
pub fn config<R: Runtime, F: FloatElement>(
    device: &Device<R>,
    head_dim: usize,
    causal: bool,
) -> AttentionConfig {
    let element_bytes = F::DTYPE.size_bytes();
    let mut cfg = AttentionConfig { head_dim: head_dim as u32, causal, block_q: 64, block_kv: 64 };
    let budget = device.info().max_shared_memory_bytes;
    while cfg.block_kv > TILE as u32 && shared_bytes(&cfg, element_bytes) > budget {
        cfg.block_kv /= 2;
    }
    while cfg.block_q > TILE as u32 && shared_bytes(&cfg, element_bytes) > budget {
        cfg.block_q /= 2;
    }
    cfg
}

/// Units per cube: one plane per 16 query rows.
pub fn cube_units(cfg: &AttentionConfig) -> u32 {
    cfg.block_q / TILE as u32 * PLANE
}

/// Stages `rows` rows (`row0..`) of one head from a `[B, capacity, H, hd]` tensor into `tile`
/// (row-major, `hd` per row), zero at and past row `len`. All units of the cube take part.
#[cube]
fn stage_rows<F: Float, N: Size>(
    tile: &mut SharedMemory<F>,
    src: &Array<Vector<F, N>>,
    row0: usize,
    len: u32,
    capacity: u32,
    heads: u32,
    b: usize,
    head: usize,
    #[comptime] rows: usize,
    #[comptime] head_dim: usize,
) {
    let hdv = comptime!(head_dim / VEC);
    let units = CUBE_DIM as usize;
    let mut e = UNIT_POS as usize;
    while e < rows * hdv {
        let r = row0 + e / hdv;
        let mut value = Vector::<F, N>::new(F::new(0.0));
        if r < len as usize {
            value = src[((b * capacity as usize + r) * heads as usize + head) * hdv + e % hdv];
        }
        #[unroll]
        for x in 0..VEC {
            tile[e * VEC + x] = value[x];
        }
        e += units;
    }
}

/// `out = A·Bᵀ` for this plane's 16 rows: A is rows `a_row..a_row + 16` of `a`, B all `cols`
/// rows of `b` (both row-major with `depth` per row), `out` rows `out_row..` with `cols` per
/// row. Scores: Q·Kᵀ, dO·Vᵀ, and the backward's K·Qᵀ, V·dOᵀ.
#[cube]
fn plane_product_transposed<F: Float>(
    a: &SharedMemory<F>,
    a_row: usize,
    b: &SharedMemory<F>,
    out: &mut SharedMemory<f32>,
    out_row: usize,
    #[comptime] depth: usize,
    #[comptime] cols: usize,
) {
    let a_frag = unsafe {
        cmma::Matrix::<F>::uninitialized(cmma::MatrixIdent::A, TILE, TILE, TILE, cmma::MatrixLayout::RowMajor)
    };
    // Bᵀ read straight from row-major B: column-major with leading dimension `depth`.
    let b_frag = unsafe {
        cmma::Matrix::<F>::uninitialized(cmma::MatrixIdent::B, TILE, TILE, TILE, cmma::MatrixLayout::ColMajor)
    };
    let acc = cmma::Matrix::<f32>::from_value(
        cmma::MatrixIdent::Accumulator,
        TILE,
        TILE,
        TILE,
        cmma::MatrixLayout::Undefined,
        f32::new(0.0),
    );
    #[unroll]
    for n in 0..cols / TILE {
        cmma::fill(&acc, f32::new(0.0));
        #[unroll]
        for kk in 0..depth / TILE {
            cmma::load(&a_frag, &a.slice(a_row * depth + kk * TILE, a.len()), comptime!(depth as u32));
            cmma::load(&b_frag, &b.slice(n * TILE * depth + kk * TILE, b.len()), comptime!(depth as u32));
            cmma::execute::<F, F, f32, f32>(&a_frag, &b_frag, &acc, &acc);
        }
        cmma::store(
            &mut out.slice_mut(out_row * cols + n * TILE, out.len()),
            &acc,
            comptime!(cols as u32),
            cmma::MatrixLayout::RowMajor,
        );
    }
}

/// `acc += A·B` for this plane's 16 rows, into the two lanes per row that own them: A is rows
/// `a_row..a_row + 16` of `a` (`depth` per row), B all `depth` rows of `b` (`head_dim` per
/// row), both row-major. The product goes 16 columns at a time through `bounce` (256 floats
/// from `bounce_at`, disjoint between planes) into `acc`, which holds, for each chunk c,
/// columns `c·16 + half·8 + 0..8` of the lane's row. O += P·V, dQ += dS·K, dV += Pᵀ·dO,
/// dK += dSᵀ·Q. Starts with a cube barrier, so callers may have just written `a` or read
/// `bounce` (cube rather than plane barriers: the plane-barrier variant is untested on a GPU).
#[cube]
fn plane_product_accumulate<F: Float>(
    acc: &mut Array<f32>,
    a: &SharedMemory<F>,
    a_row: usize,
    b: &SharedMemory<F>,
    bounce: &mut SharedMemory<f32>,
    bounce_at: usize,
    row: usize,
    half: usize,
    #[comptime] depth: usize,
    #[comptime] head_dim: usize,
) {
    let a_frag = unsafe {
        cmma::Matrix::<F>::uninitialized(cmma::MatrixIdent::A, TILE, TILE, TILE, cmma::MatrixLayout::RowMajor)
    };
    let b_frag = unsafe {
        cmma::Matrix::<F>::uninitialized(cmma::MatrixIdent::B, TILE, TILE, TILE, cmma::MatrixLayout::RowMajor)
    };
    let product = cmma::Matrix::<f32>::from_value(
        cmma::MatrixIdent::Accumulator,
        TILE,
        TILE,
        TILE,
        cmma::MatrixLayout::Undefined,
        f32::new(0.0),
    );
    #[unroll]
    for c in 0..head_dim / TILE {
        cmma::fill(&product, f32::new(0.0));
        sync_cube();
        #[unroll]
        for kk in 0..depth / TILE {
            cmma::load(&a_frag, &a.slice(a_row * depth + kk * TILE, a.len()), comptime!(depth as u32));
            cmma::load(
                &b_frag,
                &b.slice(kk * TILE * head_dim + c * TILE, b.len()),
                comptime!(head_dim as u32),
            );
            cmma::execute::<F, F, f32, f32>(&a_frag, &b_frag, &product, &product);
        }
        cmma::store(
            &mut bounce.slice_mut(bounce_at, bounce.len()),
            &product,
            comptime!(TILE as u32),
            cmma::MatrixLayout::RowMajor,
        );
        sync_cube();
        #[unroll]
        for x in 0..TILE / 2 {
            acc[c * (TILE / 2) + x] += bounce[bounce_at + row * TILE + half * (TILE / 2) + x];
        }
    }
}

/// A lane's share of 16-column chunks (see [`plane_product_accumulate`]), zeroed.
#[cube]
fn lane_accumulator(#[comptime] head_dim: usize) -> Array<f32> {
    let mut acc = Array::<f32>::new(head_dim / 2);
    #[unroll]
    for x in 0..head_dim / 2 {
        acc[x] = f32::new(0.0);
    }
    acc
}

/// Writes a lane's share of a row (`row_at` = the row's first element) times `scale`.
#[cube]
fn store_lane_row<F: Float>(
    dst: &mut Array<F>,
    row_at: usize,
    acc: &Array<f32>,
    half: usize,
    scale: f32,
    #[comptime] head_dim: usize,
) {
    #[unroll]
    for c in 0..head_dim / TILE {
        #[unroll]
        for x in 0..TILE / 2 {
            dst[row_at + c * TILE + half * (TILE / 2) + x] = F::cast_from(acc[c * (TILE / 2) + x] * scale);
        }
    }
}

#[cube(launch_unchecked)]
pub fn attention_forward_cmma_kernel<F: Float, N: Size>(
    out: &mut Array<F>,
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
    let hd = comptime!(cfg.head_dim as usize);
    let bq = comptime!(cfg.block_q as usize);
    let bk = comptime!(cfg.block_kv as usize);
    let half_cols = comptime!(cfg.block_kv as usize / 2);
    let bh = CUBE_POS_Y as usize;
    let b = bh / q_heads as usize;
    let h = bh % q_heads as usize;
    let kvh = h / (q_heads / kv_heads) as usize;
    let plane = UNIT_POS as usize / comptime!(PLANE as usize);
    let lane = UNIT_POS as usize % comptime!(PLANE as usize);
    // Two lanes per query row; `half` picks the score columns and the output columns.
    let row = lane / 2;
    let half = lane % 2;
    let plane_row = plane * TILE;
    let q0 = CUBE_POS_X as usize * bq;
    let i = q0 + plane_row + row;
    let q_pos = position_offset as usize + i;

    let mut q_tile = SharedMemory::<F>::new_aligned(bq * hd, ALIGN);
    let mut k_tile = SharedMemory::<F>::new_aligned(bk * hd, ALIGN);
    let mut v_tile = SharedMemory::<F>::new_aligned(bk * hd, ALIGN);
    let mut scores = SharedMemory::<f32>::new_aligned(bq * bk, ALIGN);
    let mut probs = SharedMemory::<F>::new_aligned(bq * bk, ALIGN);
    stage_rows::<F, N>(&mut q_tile, q, q0, q_len, q_len, q_heads, b, h, bq, hd);

    let mut o = lane_accumulator(hd);
    let mut m = f32::min_value();
    let mut l = f32::new(0.0);
    let kv_end = keys_needed(q_len, kv_len, position_offset, bq, cfg.causal);
    let mut j0 = 0usize;
    while j0 < kv_end {
        // The previous tile's readers are done (and, the first time, Q is staged).
        sync_cube();
        stage_rows::<F, N>(&mut k_tile, k, j0, kv_len, kv_capacity, kv_heads, b, kvh, bk, hd);
        stage_rows::<F, N>(&mut v_tile, v, j0, kv_len, kv_capacity, kv_heads, b, kvh, bk, hd);
        sync_cube();
        plane_product_transposed::<F>(&q_tile, plane_row, &k_tile, &mut scores, plane_row, hd, bk);
        sync_cube();

        // Online softmax: this lane's half of its row, the other half from its neighbour.
        let at = (plane_row + row) * bk + half * half_cols;
        let col0 = j0 + half * half_cols;
        let mut tile_max = f32::min_value();
        #[unroll]
        for c in 0..half_cols {
            let visible = sees(q_pos, col0 + c, kv_len, cfg.causal);
            let s = select(visible, scores[at + c] * scale, f32::min_value());
            scores[at + c] = s;
            tile_max = f32::max(tile_max, s);
        }
        tile_max = f32::max(tile_max, plane_shuffle_xor(tile_max, 1u32));
        let m_new = f32::max(m, tile_max);
        let correction = f32::exp(m - m_new);
        let mut row_sum = f32::new(0.0);
        #[unroll]
        for c in 0..half_cols {
            let visible = sees(q_pos, col0 + c, kv_len, cfg.causal);
            // Explicitly 0 when hidden: while every key so far is hidden, m_new is the
            // sentinel and exp(s − m_new) would be 1.
            let p = select(visible, f32::exp(scores[at + c] - m_new), f32::new(0.0));
            row_sum += p;
            probs[at + c] = F::cast_from(p);
        }
        row_sum += plane_shuffle_xor(row_sum, 1u32);
        l = l * correction + row_sum;
        m = m_new;
        #[unroll]
        for x in 0..hd / 2 {
            o[x] *= correction;
        }
        plane_product_accumulate::<F>(
            &mut o,
            &probs,
            plane_row,
            &v_tile,
            &mut scores,
            plane_row * TILE,
            row,
            half,
            bk,
            hd,
        );
        j0 += bk;
    }

    if i < q_len as usize {
        store_lane_row::<F>(
            out,
            ((b * q_len as usize + i) * q_heads as usize + h) * hd,
            &o,
            half,
            f32::new(1.0) / l,
            hd,
        );
        if half == 0 {
            lse[(b * q_heads as usize + h) * q_len as usize + i] = m + f32::ln(l);
        }
    }
}

/// dQ for 16 query rows per plane, over tiles of keys (as the forward, recomputing P).
#[cube(launch_unchecked)]
pub fn attention_dq_cmma_kernel<F: Float, N: Size>(
    dq: &mut Array<F>,
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
    scale: f32,
    #[comptime] cfg: AttentionConfig,
) {
    let hd = comptime!(cfg.head_dim as usize);
    let bq = comptime!(cfg.block_q as usize);
    let bk = comptime!(cfg.block_kv as usize);
    let half_cols = comptime!(cfg.block_kv as usize / 2);
    let bh = CUBE_POS_Y as usize;
    let b = bh / q_heads as usize;
    let h = bh % q_heads as usize;
    let kvh = h / (q_heads / kv_heads) as usize;
    let plane = UNIT_POS as usize / comptime!(PLANE as usize);
    let lane = UNIT_POS as usize % comptime!(PLANE as usize);
    let row = lane / 2;
    let half = lane % 2;
    let plane_row = plane * TILE;
    let q0 = CUBE_POS_X as usize * bq;
    let i = q0 + plane_row + row;
    let row_valid = i < q_len as usize;

    let mut q_tile = SharedMemory::<F>::new_aligned(bq * hd, ALIGN);
    let mut do_tile = SharedMemory::<F>::new_aligned(bq * hd, ALIGN);
    let mut k_tile = SharedMemory::<F>::new_aligned(bk * hd, ALIGN);
    let mut v_tile = SharedMemory::<F>::new_aligned(bk * hd, ALIGN);
    let mut scores = SharedMemory::<f32>::new_aligned(bq * bk, ALIGN);
    let mut dp = SharedMemory::<f32>::new_aligned(bq * bk, ALIGN);
    let mut ds = SharedMemory::<F>::new_aligned(bq * bk, ALIGN);
    stage_rows::<F, N>(&mut q_tile, q, q0, q_len, q_len, q_heads, b, h, bq, hd);
    stage_rows::<F, N>(&mut do_tile, dout, q0, q_len, q_len, q_heads, b, h, bq, hd);
    let mut lse_i = f32::new(0.0);
    let mut delta_i = f32::new(0.0);
    if row_valid {
        let stat = (b * q_heads as usize + h) * q_len as usize + i;
        lse_i = lse[stat];
        delta_i = delta[stat];
    }

    let mut dq_acc = lane_accumulator(hd);
    let kv_end = keys_needed(q_len, kv_len, 0, bq, cfg.causal);
    let mut j0 = 0usize;
    while j0 < kv_end {
        sync_cube();
        stage_rows::<F, N>(&mut k_tile, k, j0, kv_len, kv_len, kv_heads, b, kvh, bk, hd);
        stage_rows::<F, N>(&mut v_tile, v, j0, kv_len, kv_len, kv_heads, b, kvh, bk, hd);
        sync_cube();
        plane_product_transposed::<F>(&q_tile, plane_row, &k_tile, &mut scores, plane_row, hd, bk);
        plane_product_transposed::<F>(&do_tile, plane_row, &v_tile, &mut dp, plane_row, hd, bk);
        sync_cube();
        let at = (plane_row + row) * bk + half * half_cols;
        let col0 = j0 + half * half_cols;
        #[unroll]
        for c in 0..half_cols {
            let visible = row_valid && sees(i, col0 + c, kv_len, cfg.causal);
            let p = select(visible, f32::exp(scores[at + c] * scale - lse_i), f32::new(0.0));
            ds[at + c] = F::cast_from(p * (dp[at + c] - delta_i));
        }
        plane_product_accumulate::<F>(
            &mut dq_acc,
            &ds,
            plane_row,
            &k_tile,
            &mut scores,
            plane_row * TILE,
            row,
            half,
            bk,
            hd,
        );
        j0 += bk;
    }
    if row_valid {
        store_lane_row::<F>(
            dq,
            ((b * q_len as usize + i) * q_heads as usize + h) * hd,
            &dq_acc,
            half,
            scale,
            hd,
        );
    }
}

/// dK and dV for 16 key rows per plane, over the tiles of queries of every query head in the
/// group (`block_q` = keys per cube, `block_kv` = queries per tile here).
#[cube(launch_unchecked)]
pub fn attention_dkdv_cmma_kernel<F: Float, N: Size>(
    dk: &mut Array<F>,
    dv: &mut Array<F>,
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
    scale: f32,
    #[comptime] cfg: AttentionConfig,
) {
    let hd = comptime!(cfg.head_dim as usize);
    let bkeys = comptime!(cfg.block_q as usize);
    let bq = comptime!(cfg.block_kv as usize);
    let half_cols = comptime!(cfg.block_kv as usize / 2);
    let bh = CUBE_POS_Y as usize;
    let b = bh / kv_heads as usize;
    let kvh = bh % kv_heads as usize;
    let group = (q_heads / kv_heads) as usize;
    let plane = UNIT_POS as usize / comptime!(PLANE as usize);
    let lane = UNIT_POS as usize % comptime!(PLANE as usize);
    let row = lane / 2;
    let half = lane % 2;
    let plane_row = plane * TILE;
    let j_first = CUBE_POS_X as usize * bkeys;
    let j = j_first + plane_row + row;

    let mut k_tile = SharedMemory::<F>::new_aligned(bkeys * hd, ALIGN);
    let mut v_tile = SharedMemory::<F>::new_aligned(bkeys * hd, ALIGN);
    let mut q_tile = SharedMemory::<F>::new_aligned(bq * hd, ALIGN);
    let mut do_tile = SharedMemory::<F>::new_aligned(bq * hd, ALIGN);
    let mut scores = SharedMemory::<f32>::new_aligned(bkeys * bq, ALIGN);
    let mut dp = SharedMemory::<f32>::new_aligned(bkeys * bq, ALIGN);
    let mut probs = SharedMemory::<F>::new_aligned(bkeys * bq, ALIGN);
    let mut ds = SharedMemory::<F>::new_aligned(bkeys * bq, ALIGN);
    let mut lse_tile = SharedMemory::<f32>::new(bq);
    let mut delta_tile = SharedMemory::<f32>::new(bq);
    stage_rows::<F, N>(&mut k_tile, k, j_first, kv_len, kv_len, kv_heads, b, kvh, bkeys, hd);
    stage_rows::<F, N>(&mut v_tile, v, j_first, kv_len, kv_len, kv_heads, b, kvh, bkeys, hd);

    // Causal: queries before the cube's first key see none of its keys.
    let mut i_start = 0usize;
    if comptime!(cfg.causal) {
        i_start = j_first / bq * bq;
    }
    let mut dk_acc = lane_accumulator(hd);
    let mut dv_acc = lane_accumulator(hd);
    for g in 0..group {
        let h = kvh * group + g;
        let stats_at = (b * q_heads as usize + h) * q_len as usize;
        let mut i0 = i_start;
        while i0 < q_len as usize {
            sync_cube();
            stage_rows::<F, N>(&mut q_tile, q, i0, q_len, q_len, q_heads, b, h, bq, hd);
            stage_rows::<F, N>(&mut do_tile, dout, i0, q_len, q_len, q_heads, b, h, bq, hd);
            let mut r = UNIT_POS as usize;
            while r < bq {
                let mut lse_i = f32::new(0.0);
                let mut delta_i = f32::new(0.0);
                if i0 + r < q_len as usize {
                    lse_i = lse[stats_at + i0 + r];
                    delta_i = delta[stats_at + i0 + r];
                }
                lse_tile[r] = lse_i;
                delta_tile[r] = delta_i;
                r += CUBE_DIM as usize;
            }
            sync_cube();
            // Sᵀ = K·Qᵀ and dPᵀ = V·dOᵀ for this plane's keys.
            plane_product_transposed::<F>(&k_tile, plane_row, &q_tile, &mut scores, plane_row, hd, bq);
            plane_product_transposed::<F>(&v_tile, plane_row, &do_tile, &mut dp, plane_row, hd, bq);
            sync_cube();
            let at = (plane_row + row) * bq + half * half_cols;
            let col0 = half * half_cols;
            #[unroll]
            for c in 0..half_cols {
                let i = i0 + col0 + c;
                let visible = i < q_len as usize && sees(i, j, kv_len, cfg.causal);
                let p = select(visible, f32::exp(scores[at + c] * scale - lse_tile[col0 + c]), f32::new(0.0));
                probs[at + c] = F::cast_from(p);
                ds[at + c] = F::cast_from(p * (dp[at + c] - delta_tile[col0 + c]));
            }
            plane_product_accumulate::<F>(
                &mut dv_acc,
                &probs,
                plane_row,
                &do_tile,
                &mut scores,
                plane_row * TILE,
                row,
                half,
                bq,
                hd,
            );
            plane_product_accumulate::<F>(
                &mut dk_acc,
                &ds,
                plane_row,
                &q_tile,
                &mut scores,
                plane_row * TILE,
                row,
                half,
                bq,
                hd,
            );
            i0 += bq;
        }
    }
    if j < kv_len as usize {
        let row_at = ((b * kv_len as usize + j) * kv_heads as usize + kvh) * hd;
        store_lane_row::<F>(dk, row_at, &dk_acc, half, scale, hd);
        store_lane_row::<F>(dv, row_at, &dv_acc, half, f32::new(1.0), hd);
    }
}
