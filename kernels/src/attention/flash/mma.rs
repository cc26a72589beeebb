//! One warp's `D = A·B + C` on a 16×8×16 tile in the register layout of PTX's
//! `mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}` (PTX ISA, "Matrix Fragments for
//! mma.m16n8k16 with floating point type"), and the fragment loads the flash kernels use.
//!
//! Lane `l` of the warp is `4·g + t` (`g = l / 4` its group, `t = l % 4`). Each fragment is
//! an array of pairs (`Vector<_, 2>`), two consecutive columns (A, C) or rows (B) of one
//! register:
//! - A (16×16, `F`): 4 pairs; pair `v` holds row `g + 8·(v % 2)`, columns `2t + 8·(v / 2) + {0, 1}`.
//! - B (16×8, `F`): 2 pairs; pair `v` holds rows (k) `2t + 8·v + {0, 1}` of column `g`.
//! - C, D (16×8, f32): 2 pairs; pair `r` holds row `g + 8·r`, columns `2t + {0, 1}`.
//!
//! These are the formulas CubeCL's CUDA backend uses for `MmaDefinition::position_of_nth`
//! (`cubecl-cpp` 0.10.0, `cuda/processors.rs`), and the element order `mma.sync` expects of
//! the registers CubeCL passes it (pairs = 32-bit registers). A test on CUDA devices compares
//! [`a_position`], [`b_position`] and [`c_position`] with `position_of_nth` lane by lane.
//!
//! Accumulators of several tiles side by side are one array: tile `n` in pairs `2n` (row `g`)
//! and `2n + 1` (row `g + 8`). Two neighbouring accumulator tiles hold a 16×16 block with
//! exactly the lanes and order of an A fragment ([`acc_to_a`]), which is what lets the flash
//! kernels feed exponentiated scores into the next product without leaving registers.

use cubecl::cmma::MmaDefinition;
use cubecl::prelude::*;

use super::WARP_LANES;

/// Two elements: one 32-bit register of f16/bf16, or two f32 accumulators.
pub type Pair = Const<2>;

/// f32 of shared memory per warp the emulated instruction stages its operands in: A (16×16)
/// then B (16×8, k-major).
pub const EMULATION_SCRATCH: usize = 16 * 16 + 16 * 8;

/// (row, column) of element `i` (0..8; pair `i / 2`) of lane `lane`'s A fragment.
#[cube]
pub fn a_position(lane: usize, i: usize) -> (usize, usize) {
    let g = lane / 4;
    let t = lane % 4;
    (g + 8 * ((i / 2) % 2), 2 * t + i % 2 + 8 * (i / 4))
}

/// (row k, column n) of element `i` (0..4; pair `i / 2`) of lane `lane`'s B fragment.
#[cube]
pub fn b_position(lane: usize, i: usize) -> (usize, usize) {
    let g = lane / 4;
    let t = lane % 4;
    (2 * t + i % 2 + 8 * (i / 2), g)
}

/// (row, column) of element `i` (0..4; pair `i / 2`) of lane `lane`'s C/D fragment.
#[cube]
pub fn c_position(lane: usize, i: usize) -> (usize, usize) {
    let g = lane / 4;
    let t = lane % 4;
    (g + 8 * (i / 2), 2 * t + i % 2)
}

/// `acc += a·b` for this warp (all 32 lanes must call it, with the same control flow).
///
/// With `device_mma`, one `mma.m16n8k16` (f32 accumulate). Without, an emulation with the same
/// layout: each lane writes its A and B elements to the warp's [`EMULATION_SCRATCH`] floats of
/// `scratch` (from `warp · EMULATION_SCRATCH`), then computes its four C elements as f32 dot
/// products. The emulation uses cube-wide barriers (a warp of 32 lanes spans several hardware
/// planes on lavapipe), so every unit of the cube must call it together.
#[cube]
pub fn mma<F: Float>(
    a: &Array<Vector<F, Pair>>,
    b: &Array<Vector<F, Pair>>,
    acc: &mut Array<Vector<f32, Pair>>,
    scratch: &mut SharedMemory<f32>,
    warp: usize,
    #[comptime] device_mma: bool,
) {
    if comptime!(device_mma) {
        let def = MmaDefinition::<F, F, f32>::new(16usize, 8usize, 16usize);
        let d = def.execute(a, b, acc);
        #[unroll]
        for r in 0usize..2usize {
            acc[r] = d[r];
        }
    } else {
        let lane = UNIT_POS as usize % WARP_LANES;
        let base = warp * EMULATION_SCRATCH;
        let b_base = base + 16 * 16;
        #[unroll]
        for i in 0usize..8usize {
            let (row, col) = a_position(lane, i);
            scratch[base + row * 16 + col] = f32::cast_from(a[i / 2][i % 2]);
        }
        #[unroll]
        for i in 0usize..4usize {
            let (k, n) = b_position(lane, i);
            scratch[b_base + k * 8 + n] = f32::cast_from(b[i / 2][i % 2]);
        }
        sync_cube();
        #[unroll]
        for r in 0usize..2usize {
            let mut pair = acc[r];
            #[unroll]
            for x in 0usize..2usize {
                let (row, col) = c_position(lane, 2 * r + x);
                let mut sum = f32::new(0.0);
                // A runtime loop: unrolled, the emulation takes llvmpipe much longer to compile.
                for k in 0usize..16usize {
                    sum += scratch[base + row * 16 + k] * scratch[b_base + k * 8 + col];
                }
                pair[x] += sum;
            }
            acc[r] = pair;
        }
        sync_cube();
    }
}

/// The shared memory [`mma`] needs for `warps` warps: none with the device's instruction (one
/// float, as CubeCL wants a length), [`EMULATION_SCRATCH`] floats per warp without.
#[cube]
pub fn emulation_scratch(#[comptime] warps: u32, #[comptime] device_mma: bool) -> SharedMemory<f32> {
    SharedMemory::<f32>::new(comptime!(if device_mma { 1 } else { EMULATION_SCRATCH * warps as usize }))
}

/// `n` zeroed pairs (accumulators of `n / 2` tiles).
#[cube]
pub fn zeros(#[comptime] n: usize) -> Array<Vector<f32, Pair>> {
    let mut acc = Array::<Vector<f32, Pair>>::new(n);
    #[unroll]
    for i in 0..n {
        acc[i] = Vector::new(f32::new(0.0));
    }
    acc
}

/// The A fragment of rows `row0..row0 + 16`, columns `col0..col0 + 16` (`col0` even) of a
/// row-major tile of pairs, `stride` pairs per row.
#[cube]
pub fn load_a<F: Float>(
    tile: &SharedMemory<Vector<F, Pair>>,
    row0: usize,
    col0: usize,
    #[comptime] stride: usize,
) -> Array<Vector<F, Pair>> {
    let lane = UNIT_POS as usize % WARP_LANES;
    let mut a = Array::<Vector<F, Pair>>::new(4usize);
    #[unroll]
    for v in 0usize..4usize {
        let (row, col) = a_position(lane, 2 * v);
        a[v] = tile[(row0 + row) * stride + (col0 + col) / 2];
    }
    a
}

/// The B fragment `B[k][n] = tile[n0 + n][k0 + k]`: the tile's rows are B's columns (K in
/// `Q·Kᵀ`, Q or dO in the backward's `K·Qᵀ`, `V·dOᵀ`). One 32-bit read per pair.
#[cube]
pub fn load_b_transposed<F: Float>(
    tile: &SharedMemory<Vector<F, Pair>>,
    k0: usize,
    n0: usize,
    #[comptime] stride: usize,
) -> Array<Vector<F, Pair>> {
    let lane = UNIT_POS as usize % WARP_LANES;
    let mut b = Array::<Vector<F, Pair>>::new(2usize);
    #[unroll]
    for v in 0usize..2usize {
        let (k, n) = b_position(lane, 2 * v);
        b[v] = tile[(n0 + n) * stride + (k0 + k) / 2];
    }
    b
}

/// The B fragment `B[k][n] = tile[k0 + k][n0 + n]`: the tile's rows are B's rows (V in `P·V`,
/// K in `dS·K`, dO and Q in `Pᵀ·dO`, `dSᵀ·Q`). A pair of B spans two tile rows, so each
/// element is one half of a 32-bit read (`ldmatrix.trans` would do it in one; issue 18).
#[cube]
pub fn load_b<F: Float>(
    tile: &SharedMemory<Vector<F, Pair>>,
    k0: usize,
    n0: usize,
    #[comptime] stride: usize,
) -> Array<Vector<F, Pair>> {
    let lane = UNIT_POS as usize % WARP_LANES;
    let mut b = Array::<Vector<F, Pair>>::new(2usize);
    #[unroll]
    for v in 0usize..2usize {
        let mut pair = Vector::<F, Pair>::new(F::new(0.0));
        #[unroll]
        for x in 0usize..2usize {
            let (k, n) = b_position(lane, 2 * v + x);
            let col = n0 + n;
            let word = tile[(k0 + k) * stride + col / 2];
            pair[x] = select((col & 1) == 0, word[0], word[1]);
        }
        b[v] = pair;
    }
    b
}

/// The A fragment of k-step `kk` (columns `16·kk..16·kk + 16`) of the 16-row block whose
/// accumulator tiles are `acc` (tile `n` in pairs `2n`, `2n + 1`), rounded to `F`.
#[cube]
pub fn acc_to_a<F: Float>(acc: &Array<Vector<f32, Pair>>, kk: usize) -> Array<Vector<F, Pair>> {
    let mut a = Array::<Vector<F, Pair>>::new(4usize);
    #[unroll]
    for v in 0usize..4usize {
        // Pair v: row g + 8·(v % 2), columns 2t + 8·(v / 2): tile 2kk + v / 2, its pair v % 2.
        a[v] = Vector::<F, Pair>::cast_from(acc[2 * (2 * kk + v / 2) + v % 2]);
    }
    a
}

/// `dst[i] = src[offset + i]` for `i < n`.
#[cube]
pub fn copy_pairs<E: Scalar>(
    src: &Array<Vector<E, Pair>>,
    offset: usize,
    #[comptime] n: usize,
) -> Array<Vector<E, Pair>> {
    let mut dst = Array::<Vector<E, Pair>>::new(n);
    #[unroll]
    for i in 0..n {
        dst[i] = src[offset + i];
    }
    dst
}

/// `dst[offset + i] = src[i]` for `i < n`.
#[cube]
pub fn put_pairs<E: Scalar>(
    dst: &mut Array<Vector<E, Pair>>,
    src: &Array<Vector<E, Pair>>,
    offset: usize,
    #[comptime] n: usize,
) {
    #[unroll]
    for i in 0..n {
        dst[offset + i] = src[i];
    }
}
