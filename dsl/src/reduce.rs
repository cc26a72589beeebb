//! Cube-wide reductions: every unit of a cube contributes one f32 and every unit gets the
//! sum (or max) back. RMSNorm, softmax and cross-entropy all reduce a row this way.
//!
//! Two variants, chosen at comptime by the launcher:
//! - `use_plane`: reduce within each plane (warp/subgroup) with `plane_sum`/`plane_max`, then
//!   combine the per-plane results from shared memory. Taken where the device advertises
//!   plane ops (CUDA).
//! - shared-memory tree: the fallback for devices that do not (lavapipe does not advertise
//!   them, although they work there, so the tests run both variants).
//!
//! Both combine in a fixed order, so a reduction is bit-identical run to run.

use cubecl::prelude::*;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ReduceOp {
    Sum,
    Max,
}

/// The comptime shape of a cube reduction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CubeReduce {
    /// Units in the cube (`CubeDim.x`, the cube is 1-D). A power of two.
    pub units: u32,
    /// Only where the cube is whole planes: see [`crate::DeviceInfo::plane_reduce`].
    pub use_plane: bool,
}

impl CubeReduce {
    pub fn new(units: u32, use_plane: bool) -> Self {
        debug_assert!(units.is_power_of_two(), "cube reduction needs a power-of-two cube, got {units}");
        Self { units, use_plane }
    }
}

#[cube]
fn combine(a: f32, b: f32, #[comptime] op: ReduceOp) -> f32 {
    let mut r = a + b;
    if comptime!(op == ReduceOp::Max) {
        r = f32::max(a, b);
    }
    r
}

/// Reduces `value` over the cube and returns the result to every unit.
///
/// Every unit of the cube must call it from uniform control flow (it contains barriers), and
/// units with nothing to contribute pass the identity (0 for sum, `f32::MIN` for max). It ends
/// with a barrier so that the caller may call it again, e.g. once per row.
#[cube]
pub fn cube_reduce(value: f32, #[comptime] op: ReduceOp, #[comptime] cfg: CubeReduce) -> f32 {
    let result = if comptime!(cfg.use_plane) {
        plane_then_shared(value, op, cfg)
    } else {
        shared_tree(value, op, cfg)
    };
    // Nobody may overwrite the shared slots of this call until everyone has read them.
    sync_cube();
    result
}

#[cube]
fn plane_then_shared(value: f32, #[comptime] op: ReduceOp, #[comptime] cfg: CubeReduce) -> f32 {
    // One slot per plane; `units` slots cover the smallest possible plane size (1).
    let mut partials = SharedMemory::<f32>::new(cfg.units as usize);
    let mut plane_result = plane_sum(value);
    if comptime!(op == ReduceOp::Max) {
        plane_result = plane_max(value);
    }
    if UNIT_POS_PLANE == 0 {
        partials[PLANE_POS as usize] = plane_result;
    }
    sync_cube();
    let planes = CUBE_DIM.div_ceil(PLANE_DIM);
    let mut result = partials[0];
    for p in 1..planes {
        result = combine(result, partials[p as usize], op);
    }
    result
}

#[cube]
fn shared_tree(value: f32, #[comptime] op: ReduceOp, #[comptime] cfg: CubeReduce) -> f32 {
    let tid = UNIT_POS as usize;
    let mut tree = SharedMemory::<f32>::new(cfg.units as usize);
    tree[tid] = value;
    sync_cube();
    // A runtime stride: a comptime one cannot be halved in a runtime loop.
    let mut stride = (CUBE_DIM / 2) as usize;
    while stride > 0 {
        if tid < stride {
            tree[tid] = combine(tree[tid], tree[tid + stride], op);
        }
        sync_cube();
        stride /= 2;
    }
    tree[0]
}

#[cube]
pub fn cube_sum(value: f32, #[comptime] cfg: CubeReduce) -> f32 {
    cube_reduce(value, ReduceOp::Sum, cfg)
}

#[cube]
pub fn cube_max(value: f32, #[comptime] cfg: CubeReduce) -> f32 {
    cube_reduce(value, ReduceOp::Max, cfg)
}

/// Softmax statistics of a row spread over a cube: each unit passes the running max `m` and
/// `s = Σ e^{x − m}` of its own elements (the online-softmax pair, starting from
/// `(f32::min_value(), 0)`); every unit gets the row's `(max, Σ e^{x − max})` back.
#[cube]
pub fn cube_max_sumexp(m: f32, s: f32, #[comptime] cfg: CubeReduce) -> (f32, f32) {
    let max = cube_max(m, cfg);
    let sum = cube_sum(s * f32::exp(m - max), cfg);
    (max, sum)
}

/// Folds vector `v` into a unit's online-softmax pair `(m, s)`.
#[cube]
pub fn online_softmax_update<N: Size>(m: f32, s: f32, v: Vector<f32, N>) -> (f32, f32) {
    let mut vmax = v[0];
    #[unroll]
    for k in 1..N::value() {
        vmax = f32::max(vmax, v[k]);
    }
    let new_m = f32::max(m, vmax);
    let new_s = s * f32::exp(m - new_m) + f32::cast_from((Vector::exp(v - Vector::new(new_m))).vector_sum());
    (new_m, new_s)
}
