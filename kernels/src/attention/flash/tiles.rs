//! Moving rows between global memory and the flash kernels' shared-memory tiles, and
//! accumulators into tiles: the `#[cube]` pieces the forward and both backward kernels share.
//!
//! A tile holds `rows` rows of one head, row-major, as pairs of elements, `(hd + 8) / 2` pairs
//! per row (the padding spreads a fragment load's 8 rows over all 32 banks).

use cubecl::prelude::*;

use super::PAD;
use super::WARP_LANES;
use super::mma::{Pair, c_position};

/// Stages rows `row0..row0 + rows` of head `head` of batch `b` from `src` (`[B, capacity,
/// heads, hd]`, vectors of `N` elements) into `tile`, zero at and past row `len`. All units of
/// the cube take part; the caller synchronises before reading.
#[cube]
pub fn stage<F: Float, N: Size>(
    tile: &mut SharedMemory<Vector<F, Pair>>,
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
    let n = N::value().comptime();
    let per_row = head_dim / n;
    let stride = comptime!((head_dim + PAD) / 2);
    let mut e = UNIT_POS as usize;
    while e < rows * per_row {
        let r = e / per_row;
        let c = e % per_row;
        let row = row0 + r;
        let mut value = Vector::<F, N>::new(F::new(0.0));
        if row < len as usize {
            value = src[((b * capacity as usize + row) * heads as usize + head) * per_row + c];
        }
        #[unroll]
        for x in 0..n / 2 {
            let mut pair = Vector::<F, Pair>::new(F::new(0.0));
            pair[0] = value[2 * x];
            pair[1] = value[2 * x + 1];
            tile[r * stride + c * n / 2 + x] = pair;
        }
        e += CUBE_DIM as usize;
    }
}

/// Writes rows `row0..` (those below `len`) of `tile` to head `head` of batch `b` of `dst`
/// (`[B, len, heads, hd]`). All units of the cube take part; the caller synchronises first.
#[cube]
pub fn unstage<F: Float, N: Size>(
    dst: &mut Array<Vector<F, N>>,
    tile: &SharedMemory<Vector<F, Pair>>,
    row0: usize,
    len: u32,
    heads: u32,
    b: usize,
    head: usize,
    #[comptime] rows: usize,
    #[comptime] head_dim: usize,
) {
    let n = N::value().comptime();
    let per_row = head_dim / n;
    let stride = comptime!((head_dim + PAD) / 2);
    let mut e = UNIT_POS as usize;
    while e < rows * per_row {
        let r = e / per_row;
        let c = e % per_row;
        let row = row0 + r;
        if row < len as usize {
            let mut value = Vector::<F, N>::new(F::new(0.0));
            #[unroll]
            for x in 0..n / 2 {
                let pair = tile[r * stride + c * n / 2 + x];
                value[2 * x] = pair[0];
                value[2 * x + 1] = pair[1];
            }
            dst[((b * len as usize + row) * heads as usize + head) * per_row + c] = value;
        }
        e += CUBE_DIM as usize;
    }
}

/// Writes `scale ×` this warp's output accumulators (`head_dim / 8` tiles of 16×8: rows
/// `row0..row0 + 16` of the tile, all its columns) into `tile`, rounded to `F`.
#[cube]
pub fn accumulators_to_tile<F: Float>(
    tile: &mut SharedMemory<Vector<F, Pair>>,
    acc: &Array<Vector<f32, Pair>>,
    row0: usize,
    scale: Vector<f32, Pair>,
    #[comptime] head_dim: usize,
) {
    let lane = UNIT_POS as usize % WARP_LANES;
    let stride = comptime!((head_dim + PAD) / 2);
    #[unroll]
    for n in 0..head_dim / 8 {
        #[unroll]
        for r in 0usize..2usize {
            let (row, col) = c_position(lane, 2 * r);
            let factor = Vector::<f32, Pair>::new(scale[r]);
            tile[(row0 + row) * stride + (n * 8 + col) / 2] =
                Vector::<F, Pair>::cast_from(acc[2 * n + r] * factor);
        }
    }
}
