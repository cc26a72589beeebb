//! The flash forward: `out = softmax(scale·QKᵀ)·V` and `lse`, one warp per 16 query rows.

use cubecl::prelude::*;

use super::super::rules::{keys_needed, sees};
use super::mma::{
    Pair, acc_to_a, c_position, copy_pairs, emulation_scratch, load_a, load_b, load_b_transposed, mma,
    put_pairs, zeros,
};
use super::tiles::{accumulators_to_tile, stage, unstage};
use super::{FlashConfig, PAD, WARP_LANES, WARP_ROWS};

/// Per cube: `16·warps` query rows of one (batch, query head); per key tile of `block` keys:
/// all units stage K and V; each warp computes its 16×block scores on the tensor cores into
/// registers, updates its rows' running max and sum (lanes `4g..4g+3` share rows `g`, `g + 8`:
/// two shuffles), rescales O and adds `P·V` with P straight from the score registers.
#[cube(launch_unchecked)]
pub(crate) fn flash_forward_kernel<F: Float, N: Size>(
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
    #[comptime] cfg: FlashConfig,
) {
    let hd = comptime!(cfg.head_dim as usize);
    let rows = comptime!(cfg.rows());
    let block = comptime!(cfg.block as usize);
    let stride = comptime!((cfg.head_dim as usize + PAD) / 2);
    let k_steps = comptime!(cfg.head_dim as usize / 16);
    let warp = UNIT_POS as usize / WARP_LANES;
    let lane = UNIT_POS as usize % WARP_LANES;
    let bh = CUBE_POS_Y as usize;
    let b = bh / q_heads as usize;
    let h = bh % q_heads as usize;
    let kvh = h / (q_heads / kv_heads) as usize;
    let q0 = CUBE_POS_X as usize * rows;
    let warp_row = warp * WARP_ROWS;

    let mut q_tile = SharedMemory::<Vector<F, Pair>>::new(rows * stride);
    let mut k_tile = SharedMemory::<Vector<F, Pair>>::new(block * stride);
    let mut v_tile = SharedMemory::<Vector<F, Pair>>::new(block * stride);
    let mut scratch = emulation_scratch(cfg.warps, cfg.device_mma);

    // This warp's Q rows, as A fragments, for the whole key loop.
    stage::<F, N>(&mut q_tile, q, q0, q_len, q_len, q_heads, b, h, rows, hd);
    sync_cube();
    let mut q_frag = Array::<Vector<F, Pair>>::new(comptime!(4 * k_steps));
    #[unroll]
    for kk in 0..k_steps {
        let a = load_a::<F>(&q_tile, warp_row, kk * 16, stride);
        put_pairs::<F>(&mut q_frag, &a, 4 * kk, 4usize);
    }

    let mut o = zeros(comptime!(2 * hd / 8));
    // Running max and (this lane's partial) sum of rows g and g + 8.
    let mut m = Vector::<f32, Pair>::new(f32::min_value());
    let mut l = Vector::<f32, Pair>::new(f32::new(0.0));
    let kv_end = keys_needed(q_len, kv_len, position_offset, rows, cfg.causal);
    let mut j0 = 0usize;
    while j0 < kv_end {
        // The previous tile's readers are done.
        sync_cube();
        stage::<F, N>(&mut k_tile, k, j0, kv_len, kv_capacity, kv_heads, b, kvh, block, hd);
        stage::<F, N>(&mut v_tile, v, j0, kv_len, kv_capacity, kv_heads, b, kvh, block, hd);
        sync_cube();

        // S = Q·Kᵀ for this warp's 16 rows: block / 8 accumulator tiles.
        let mut s = zeros(comptime!(2 * block / 8));
        #[unroll(cfg.device_mma)]
        for kk in 0..k_steps {
            let a = copy_pairs::<F>(&q_frag, 4 * kk, 4usize);
            #[unroll(cfg.device_mma)]
            for n in 0..block / 8 {
                let bf = load_b_transposed::<F>(&k_tile, kk * 16, n * 8, stride);
                let mut acc = copy_pairs::<f32>(&s, 2 * n, 2usize);
                mma::<F>(&a, &bf, &mut acc, &mut scratch, warp, cfg.device_mma);
                put_pairs::<f32>(&mut s, &acc, 2 * n, 2usize);
            }
        }

        // Scale and mask; the tile's row max over the four lanes of each row.
        let mut tile_max = Vector::<f32, Pair>::new(f32::min_value());
        #[unroll]
        for n in 0..block / 8 {
            #[unroll]
            for r in 0usize..2usize {
                let mut pair = s[2 * n + r];
                #[unroll]
                for x in 0usize..2usize {
                    let (row, col) = c_position(lane, 2 * r + x);
                    let q_pos = position_offset as usize + q0 + warp_row + row;
                    let visible = sees(q_pos, j0 + n * 8 + col, kv_len, cfg.causal);
                    pair[x] = select(visible, pair[x] * scale, f32::min_value());
                    tile_max[r] = f32::max(tile_max[r], pair[x]);
                }
                s[2 * n + r] = pair;
            }
        }
        let mut m_new = m;
        let mut correction = Vector::<f32, Pair>::new(f32::new(0.0));
        #[unroll]
        for r in 0usize..2usize {
            let mut row_max = tile_max[r];
            row_max = f32::max(row_max, plane_shuffle_xor(row_max, 1u32));
            row_max = f32::max(row_max, plane_shuffle_xor(row_max, 2u32));
            m_new[r] = f32::max(m[r], row_max);
            correction[r] = f32::exp(m[r] - m_new[r]);
        }
        l *= correction;
        #[unroll]
        for i in 0..hd / 8 {
            #[unroll]
            for r in 0usize..2usize {
                o[2 * i + r] *= Vector::new(correction[r]);
            }
        }
        // P = exp(S − m_new), explicitly 0 where hidden (while every key so far is hidden,
        // m_new is the sentinel and exp(S − m_new) would be 1).
        #[unroll]
        for n in 0..block / 8 {
            #[unroll]
            for r in 0usize..2usize {
                let mut pair = s[2 * n + r];
                #[unroll]
                for x in 0usize..2usize {
                    let (row, col) = c_position(lane, 2 * r + x);
                    let q_pos = position_offset as usize + q0 + warp_row + row;
                    let visible = sees(q_pos, j0 + n * 8 + col, kv_len, cfg.causal);
                    pair[x] = select(visible, f32::exp(pair[x] - m_new[r]), f32::new(0.0));
                    l[r] += pair[x];
                }
                s[2 * n + r] = pair;
            }
        }
        m = m_new;

        // O += P·V: P rounded to F as the A operand, V rows as B's rows.
        #[unroll(cfg.device_mma)]
        for kk in 0..block / 16 {
            let a = acc_to_a::<F>(&s, kk);
            #[unroll(cfg.device_mma)]
            for n in 0..hd / 8 {
                let bf = load_b::<F>(&v_tile, kk * 16, n * 8, stride);
                let mut acc = copy_pairs::<f32>(&o, 2 * n, 2usize);
                mma::<F>(&a, &bf, &mut acc, &mut scratch, warp, cfg.device_mma);
                put_pairs::<f32>(&mut o, &acc, 2 * n, 2usize);
            }
        }
        j0 += block;
    }

    // Each lane summed its own columns: the row sums over the four lanes of each row.
    #[unroll]
    for r in 0usize..2usize {
        l[r] += plane_shuffle_xor(l[r], 1u32);
        l[r] += plane_shuffle_xor(l[r], 2u32);
    }
    let inv_l = Vector::<f32, Pair>::new(f32::new(1.0)) / l;
    // Q's tile (read into registers before the loop) takes O on its way out.
    sync_cube();
    accumulators_to_tile::<F>(&mut q_tile, &o, warp_row, inv_l, hd);
    if (lane & 3) == 0 {
        #[unroll]
        for r in 0usize..2usize {
            let (row, _col) = c_position(lane, 2 * r);
            let i = q0 + warp_row + row;
            if i < q_len as usize {
                lse[(b * q_heads as usize + h) * q_len as usize + i] = m[r] + f32::ln(l[r]);
            }
        }
    }
    sync_cube();
    unstage::<F, N>(out, &q_tile, q0, q_len, q_heads, b, h, rows, hd);
}
