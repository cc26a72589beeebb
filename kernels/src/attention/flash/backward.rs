//! The flash backward (FlashAttention-2's equations, P recomputed from lse, `delta` from the
//! portable pre-pass): dQ with one warp per 16 query rows over key tiles, dK and dV with one
//! warp per 16 key rows over the query tiles of every query head in the group. Each output row
//! is summed by one warp in a fixed order (no atomics), so results are bit-identical run to
//! run; the price is computing P and dP in both kernels (FlashAttention-2 computes them once
//! and adds dQ atomically).

use cubecl::prelude::*;

use super::super::rules::{keys_needed, sees};
use super::mma::{
    Pair, acc_to_a, c_position, copy_pairs, emulation_scratch, load_a, load_b, load_b_transposed, mma,
    put_pairs, zeros,
};
use super::tiles::{accumulators_to_tile, stage, unstage};
use super::{FlashConfig, PAD, WARP_LANES, WARP_ROWS};

/// `acc[n] += A(rows of a_tile from a_row)·B(rows of b_tile, transposed)` over the head
/// dimension, for the `block / 8` column tiles of a 16×block product: `S = Q·Kᵀ`, `dP = dO·Vᵀ`
/// and their transposes.
#[cube]
fn product_over_head_dim<F: Float>(
    acc: &mut Array<Vector<f32, Pair>>,
    a_tile: &SharedMemory<Vector<F, Pair>>,
    a_row: usize,
    b_tile: &SharedMemory<Vector<F, Pair>>,
    scratch: &mut SharedMemory<f32>,
    warp: usize,
    #[comptime] cfg: FlashConfig,
) {
    let stride = comptime!((cfg.head_dim as usize + PAD) / 2);
    #[unroll(cfg.device_mma)]
    for kk in 0..cfg.head_dim as usize / 16 {
        let a = load_a::<F>(a_tile, a_row, kk * 16, stride);
        #[unroll(cfg.device_mma)]
        for n in 0..cfg.block as usize / 8 {
            let bf = load_b_transposed::<F>(b_tile, kk * 16, n * 8, stride);
            let mut c = copy_pairs::<f32>(acc, 2 * n, 2usize);
            mma::<F>(&a, &bf, &mut c, scratch, warp, cfg.device_mma);
            put_pairs::<f32>(acc, &c, 2 * n, 2usize);
        }
    }
}

/// `out += A·B` where A is the 16×block product `p` (accumulator tiles, rounded to `F`) and B
/// the block rows of `b_tile`: `dQ += dS·K`, `dV += Pᵀ·dO`, `dK += dSᵀ·Q`.
#[cube]
fn product_over_block<F: Float>(
    out: &mut Array<Vector<f32, Pair>>,
    p: &Array<Vector<f32, Pair>>,
    b_tile: &SharedMemory<Vector<F, Pair>>,
    scratch: &mut SharedMemory<f32>,
    warp: usize,
    #[comptime] cfg: FlashConfig,
) {
    let stride = comptime!((cfg.head_dim as usize + PAD) / 2);
    #[unroll(cfg.device_mma)]
    for kk in 0..cfg.block as usize / 16 {
        let a = acc_to_a::<F>(p, kk);
        #[unroll(cfg.device_mma)]
        for n in 0..cfg.head_dim as usize / 8 {
            let bf = load_b::<F>(b_tile, kk * 16, n * 8, stride);
            let mut c = copy_pairs::<f32>(out, 2 * n, 2usize);
            mma::<F>(&a, &bf, &mut c, scratch, warp, cfg.device_mma);
            put_pairs::<f32>(out, &c, 2 * n, 2usize);
        }
    }
}

/// dQ = scale·dS·K with dS = P ⊙ (dO·Vᵀ − delta), P = exp(scale·QKᵀ − lse); `16·warps` query
/// rows of one (batch, query head) per cube.
#[cube(launch_unchecked)]
pub(crate) fn flash_dq_kernel<F: Float, N: Size>(
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
    scale: f32,
    #[comptime] cfg: FlashConfig,
) {
    let hd = comptime!(cfg.head_dim as usize);
    let rows = comptime!(cfg.rows());
    let block = comptime!(cfg.block as usize);
    let stride = comptime!((cfg.head_dim as usize + PAD) / 2);
    let warp = UNIT_POS as usize / WARP_LANES;
    let lane = UNIT_POS as usize % WARP_LANES;
    let bh = CUBE_POS_Y as usize;
    let b = bh / q_heads as usize;
    let h = bh % q_heads as usize;
    let kvh = h / (q_heads / kv_heads) as usize;
    let q0 = CUBE_POS_X as usize * rows;
    let warp_row = warp * WARP_ROWS;

    let mut q_tile = SharedMemory::<Vector<F, Pair>>::new(rows * stride);
    let mut do_tile = SharedMemory::<Vector<F, Pair>>::new(rows * stride);
    let mut k_tile = SharedMemory::<Vector<F, Pair>>::new(block * stride);
    let mut v_tile = SharedMemory::<Vector<F, Pair>>::new(block * stride);
    let mut scratch = emulation_scratch(cfg.warps, cfg.device_mma);
    stage::<F, N>(&mut q_tile, q, q0, q_len, q_len, q_heads, b, h, rows, hd);
    stage::<F, N>(&mut do_tile, dout, q0, q_len, q_len, q_heads, b, h, rows, hd);

    // lse and delta of this lane's rows g and g + 8 (0 past the end: P·(dP − delta) stays finite).
    let stats = (b * q_heads as usize + h) * q_len as usize;
    let mut row_lse = Vector::<f32, Pair>::new(f32::new(0.0));
    let mut row_delta = Vector::<f32, Pair>::new(f32::new(0.0));
    #[unroll]
    for r in 0usize..2usize {
        let (row, _col) = c_position(lane, 2 * r);
        let i = q0 + warp_row + row;
        if i < q_len as usize {
            row_lse[r] = lse[stats + i];
            row_delta[r] = delta[stats + i];
        }
    }

    let mut dq_acc = zeros(comptime!(2 * hd / 8));
    let kv_end = keys_needed(q_len, kv_len, 0, rows, cfg.causal);
    let mut j0 = 0usize;
    while j0 < kv_end {
        // Q and dO are staged (first time), the previous tile's readers done (after).
        sync_cube();
        stage::<F, N>(&mut k_tile, k, j0, kv_len, kv_len, kv_heads, b, kvh, block, hd);
        stage::<F, N>(&mut v_tile, v, j0, kv_len, kv_len, kv_heads, b, kvh, block, hd);
        sync_cube();
        let mut s = zeros(comptime!(2 * block / 8));
        product_over_head_dim::<F>(&mut s, &q_tile, warp_row, &k_tile, &mut scratch, warp, cfg);
        let mut dp = zeros(comptime!(2 * block / 8));
        product_over_head_dim::<F>(&mut dp, &do_tile, warp_row, &v_tile, &mut scratch, warp, cfg);
        // dS = P ⊙ (dP − delta), into `s`.
        #[unroll]
        for n in 0..block / 8 {
            #[unroll]
            for r in 0usize..2usize {
                let mut ds = s[2 * n + r];
                let dp_pair = dp[2 * n + r];
                #[unroll]
                for x in 0usize..2usize {
                    let (row, col) = c_position(lane, 2 * r + x);
                    let visible = sees(q0 + warp_row + row, j0 + n * 8 + col, kv_len, cfg.causal);
                    let p = select(visible, f32::exp(ds[x] * scale - row_lse[r]), f32::new(0.0));
                    ds[x] = p * (dp_pair[x] - row_delta[r]);
                }
                s[2 * n + r] = ds;
            }
        }
        product_over_block::<F>(&mut dq_acc, &s, &k_tile, &mut scratch, warp, cfg);
        j0 += block;
    }
    // Q's tile takes dQ on its way out (every warp has read it: the loop ran at least once).
    sync_cube();
    accumulators_to_tile::<F>(&mut q_tile, &dq_acc, warp_row, Vector::new(scale), hd);
    sync_cube();
    unstage::<F, N>(dq, &q_tile, q0, q_len, q_heads, b, h, rows, hd);
}

/// dV = Pᵀ·dO and dK = scale·dSᵀ·Q, summed over the query heads of the group; `16·warps` key
/// rows of one (batch, key/value head) per cube. Each warp computes Sᵀ = K·Qᵀ and dPᵀ = V·dOᵀ
/// for its 16 keys against a tile of queries, so P and dS arrive as accumulators with keys as
/// rows: the A operands of `Pᵀ·dO` and `dSᵀ·Q` as they are.
#[cube(launch_unchecked)]
pub(crate) fn flash_dkdv_kernel<F: Float, N: Size>(
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
    scale: f32,
    #[comptime] cfg: FlashConfig,
) {
    let hd = comptime!(cfg.head_dim as usize);
    let rows = comptime!(cfg.rows());
    let block = comptime!(cfg.block as usize);
    let stride = comptime!((cfg.head_dim as usize + PAD) / 2);
    let warp = UNIT_POS as usize / WARP_LANES;
    let lane = UNIT_POS as usize % WARP_LANES;
    let bh = CUBE_POS_Y as usize;
    let b = bh / kv_heads as usize;
    let kvh = bh % kv_heads as usize;
    let group = (q_heads / kv_heads) as usize;
    let key0 = CUBE_POS_X as usize * rows;
    let warp_row = warp * WARP_ROWS;

    let mut k_tile = SharedMemory::<Vector<F, Pair>>::new(rows * stride);
    let mut v_tile = SharedMemory::<Vector<F, Pair>>::new(rows * stride);
    let mut q_tile = SharedMemory::<Vector<F, Pair>>::new(block * stride);
    let mut do_tile = SharedMemory::<Vector<F, Pair>>::new(block * stride);
    let mut lse_tile = SharedMemory::<f32>::new(block);
    let mut delta_tile = SharedMemory::<f32>::new(block);
    let mut scratch = emulation_scratch(cfg.warps, cfg.device_mma);
    stage::<F, N>(&mut k_tile, k, key0, kv_len, kv_len, kv_heads, b, kvh, rows, hd);
    stage::<F, N>(&mut v_tile, v, key0, kv_len, kv_len, kv_heads, b, kvh, rows, hd);

    let mut dk_acc = zeros(comptime!(2 * hd / 8));
    let mut dv_acc = zeros(comptime!(2 * hd / 8));
    // Causal: queries before the cube's first key see none of its keys.
    let mut i_start = 0usize;
    if comptime!(cfg.causal) {
        i_start = key0 / block * block;
    }
    for g in 0..group {
        let h = kvh * group + g;
        let stats = (b * q_heads as usize + h) * q_len as usize;
        let mut i0 = i_start;
        while i0 < q_len as usize {
            // K and V are staged (first time), the previous tile's readers done (after).
            sync_cube();
            stage::<F, N>(&mut q_tile, q, i0, q_len, q_len, q_heads, b, h, block, hd);
            stage::<F, N>(&mut do_tile, dout, i0, q_len, q_len, q_heads, b, h, block, hd);
            let mut e = UNIT_POS as usize;
            while e < block {
                let i = i0 + e;
                let mut lse_i = f32::new(0.0);
                let mut delta_i = f32::new(0.0);
                if i < q_len as usize {
                    lse_i = lse[stats + i];
                    delta_i = delta[stats + i];
                }
                lse_tile[e] = lse_i;
                delta_tile[e] = delta_i;
                e += CUBE_DIM as usize;
            }
            sync_cube();
            let mut p = zeros(comptime!(2 * block / 8));
            product_over_head_dim::<F>(&mut p, &k_tile, warp_row, &q_tile, &mut scratch, warp, cfg);
            let mut ds = zeros(comptime!(2 * block / 8));
            product_over_head_dim::<F>(&mut ds, &v_tile, warp_row, &do_tile, &mut scratch, warp, cfg);
            // Pᵀ = exp(scale·Sᵀ − lse) and dSᵀ = Pᵀ ⊙ (dPᵀ − delta), keys as rows.
            #[unroll]
            for n in 0..block / 8 {
                #[unroll]
                for r in 0usize..2usize {
                    let mut p_pair = p[2 * n + r];
                    let mut ds_pair = ds[2 * n + r];
                    #[unroll]
                    for x in 0usize..2usize {
                        let (row, col) = c_position(lane, 2 * r + x);
                        let query = n * 8 + col;
                        let i = i0 + query;
                        let visible =
                            i < q_len as usize && sees(i, key0 + warp_row + row, kv_len, cfg.causal);
                        let prob =
                            select(visible, f32::exp(p_pair[x] * scale - lse_tile[query]), f32::new(0.0));
                        p_pair[x] = prob;
                        ds_pair[x] = prob * (ds_pair[x] - delta_tile[query]);
                    }
                    p[2 * n + r] = p_pair;
                    ds[2 * n + r] = ds_pair;
                }
            }
            product_over_block::<F>(&mut dv_acc, &p, &do_tile, &mut scratch, warp, cfg);
            product_over_block::<F>(&mut dk_acc, &ds, &q_tile, &mut scratch, warp, cfg);
            i0 += block;
        }
    }
    // K's and V's tiles take dK and dV on their way out.
    sync_cube();
    accumulators_to_tile::<F>(&mut k_tile, &dk_acc, warp_row, Vector::new(scale), hd);
    accumulators_to_tile::<F>(&mut v_tile, &dv_acc, warp_row, Vector::new(f32::new(1.0)), hd);
    sync_cube();
    unstage::<F, N>(dk, &k_tile, key0, kv_len, kv_heads, b, kvh, rows, hd);
    unstage::<F, N>(dv, &v_tile, key0, kv_len, kv_heads, b, kvh, rows, hd);
}
