//! The portable kernels: plain f32 arithmetic, one unit per query (or key) row, key tiles
//! through shared memory; every device and element type (what the lavapipe tests cover).
//! Launched by [`super::attention_forward_with`] and [`super::attention_backward_with`] with
//! [`super::AttentionKernel::Portable`].

use super::rules::{AttentionConfig, VEC, keys_needed, sees};
use cubecl::prelude::*;

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

#[cube(launch_unchecked)]
pub(super) fn attention_forward_kernel<F: Float, N: Size>(
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
pub(super) fn attention_delta_kernel<F: Float, N: Size>(
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
pub(super) fn attention_dkdv_kernel<F: Float, N: Size>(
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
pub(super) fn attention_dq_kernel<F: Float, N: Size>(
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
