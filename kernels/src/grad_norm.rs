//! Global gradient L2 norm over many tensors, and the clip scale, as
//! `torch.nn.utils.clip_grad_norm_` computes them.
//!
//! Inputs: any number of gradient tensors of any shapes. Outputs: `norm` `[1]` f32 =
//! `sqrt(Σ_tensors Σ g²)` and `clip_scale` `[1]` f32 = `min(1, max_norm / (norm + 1e-6))`, which
//! [`crate::adamw::adamw_step`] reads on the device. Both overwritten (`=`).
//!
//! Under loss scaling the gradients hold `S·g`: [`grad_norm_unscaled`] takes `unscale = 1/S`
//! and reports the true norm `unscale · ‖S·g‖` and `clip_scale = unscale · min(1, max_norm /
//! (norm + 1e-6))`, so AdamW unscales and clips in one multiply (torch's `GradScaler.unscale_`
//! then `clip_grad_norm_`, without a pass over the gradients). A non-finite gradient makes the
//! norm inf or NaN, which is how the trainer detects overflow.
//!
//! Sharded (data parallel, ZeRO-1): each rank computes [`grad_sum_squares`] over the tensors it
//! owns, the ranks all-reduce those `[1]` sums, and [`grad_norm_from_sum_squares`] takes the
//! square root and the clip scale: `norm = sqrt(Σ_ranks Σ_owned g²)`, as
//! `torch.distributed.fsdp`'s `clip_grad_norm_` does. With one rank owning everything the two
//! steps give [`grad_norm_unscaled`]'s bits (the same slots summed the same way).
//!
//! Deterministic: each tensor is split over a fixed number of cubes (a function of its size
//! only), each cube writes one partial sum of squares to its own slot of `scratch`, and one
//! cube sums the slots in a fixed order. f32 accumulation, tree-combined.

use cubecl::prelude::*;
use dsl::launch::cube_units;
use dsl::{CubeReduce, Device, Error, FloatElement, GpuTensor, Result, cube_sum};

/// Elements per cube aimed for when splitting a tensor.
const ELEMENTS_PER_CUBE: usize = 16 * 1024;
const MAX_CUBES_PER_TENSOR: usize = 512;
const UNITS: u32 = 256;

fn cubes_for(numel: usize) -> usize {
    numel.div_ceil(ELEMENTS_PER_CUBE).clamp(1, MAX_CUBES_PER_TENSOR)
}

/// Length of the f32 scratch [`grad_norm`] needs for tensors of these sizes.
pub fn grad_norm_scratch_len(numels: &[usize]) -> usize {
    numels.iter().map(|&n| cubes_for(n)).sum::<usize>().max(1)
}

#[cube(launch_unchecked)]
fn sum_squares_kernel<F: Float, N: Size>(
    partials: &mut Array<f32>,
    x: &Array<Vector<F, N>>,
    len: u32,
    slot: u32,
    #[comptime] cfg: CubeReduce,
) {
    let mut acc = f32::new(0.0);
    let mut i = CUBE_POS * CUBE_DIM as usize + UNIT_POS as usize;
    while i < len as usize {
        let v = Vector::<f32, N>::cast_from(x[i]);
        acc += f32::cast_from((v * v).vector_sum());
        i += CUBE_COUNT * CUBE_DIM as usize;
    }
    let total = cube_sum(acc, cfg);
    if UNIT_POS == 0 {
        partials[slot as usize + CUBE_POS] = total;
    }
}

/// Σ of the first `slots` partial sums, in a fixed order (each unit a strided share, then the
/// cube tree): the whole cube returns it.
#[cube]
fn sum_slots(partials: &Array<f32>, slots: u32, #[comptime] cfg: CubeReduce) -> f32 {
    let mut acc = f32::new(0.0);
    let mut i = UNIT_POS as usize;
    while i < slots as usize {
        acc += partials[i];
        i += CUBE_DIM as usize;
    }
    cube_sum(acc, cfg)
}

/// `norm = unscale·sqrt(sum_squares)` and the clip scale, written by unit 0.
#[cube]
fn write_norm_and_scale(
    norm: &mut Array<f32>,
    clip_scale: &mut Array<f32>,
    sum_squares: f32,
    max_norm: f32,
    unscale: f32,
) {
    if UNIT_POS == 0 {
        let total = f32::sqrt(sum_squares) * unscale;
        norm[0] = total;
        clip_scale[0] = unscale * f32::min(f32::new(1.0), max_norm / (total + f32::new(1e-6)));
    }
}

#[cube(launch_unchecked)]
fn norm_and_scale_kernel(
    norm: &mut Array<f32>,
    clip_scale: &mut Array<f32>,
    partials: &Array<f32>,
    slots: u32,
    max_norm: f32,
    unscale: f32,
    #[comptime] cfg: CubeReduce,
) {
    let total = sum_slots(partials, slots, cfg);
    write_norm_and_scale(norm, clip_scale, total, max_norm, unscale);
}

#[cube(launch_unchecked)]
fn sum_slots_kernel(out: &mut Array<f32>, partials: &Array<f32>, slots: u32, #[comptime] cfg: CubeReduce) {
    let total = sum_slots(partials, slots, cfg);
    if UNIT_POS == 0 {
        out[0] = total;
    }
}

#[cube(launch_unchecked)]
fn norm_from_sum_squares_kernel(
    norm: &mut Array<f32>,
    clip_scale: &mut Array<f32>,
    sum_squares: &Array<f32>,
    max_norm: f32,
    unscale: f32,
) {
    write_norm_and_scale(norm, clip_scale, sum_squares[0], max_norm, unscale);
}

/// `norm = ‖grads‖₂`, `clip_scale = min(1, max_norm / (norm + 1e-6))`. `scratch` is an f32
/// tensor of at least [`grad_norm_scratch_len`] elements.
pub fn grad_norm<R: Runtime, F: FloatElement>(
    device: &Device<R>,
    norm: &mut GpuTensor<R, f32>,
    clip_scale: &mut GpuTensor<R, f32>,
    scratch: &mut GpuTensor<R, f32>,
    grads: &[&GpuTensor<R, F>],
    max_norm: f32,
) -> Result<()> {
    grad_norm_unscaled(device, norm, clip_scale, scratch, grads, max_norm, 1.0)
}

/// [`grad_norm`] of gradients scaled by `1/unscale` (the loss scale): `norm = unscale ·
/// ‖grads‖₂`, `clip_scale = unscale · min(1, max_norm / (norm + 1e-6))`. `unscale = 1` is
/// [`grad_norm`] bit for bit.
#[allow(clippy::too_many_arguments)]
pub fn grad_norm_unscaled<R: Runtime, F: FloatElement>(
    device: &Device<R>,
    norm: &mut GpuTensor<R, f32>,
    clip_scale: &mut GpuTensor<R, f32>,
    scratch: &mut GpuTensor<R, f32>,
    grads: &[&GpuTensor<R, F>],
    max_norm: f32,
    unscale: f32,
) -> Result<()> {
    check_scales(norm, clip_scale, max_norm, unscale)?;
    let (slots, cfg) = launch_partials(device, scratch, grads)?;
    // SAFETY: reads are guarded by `i < slots ≤ scratch length`; outputs have one element.
    unsafe {
        norm_and_scale_kernel::launch_unchecked::<R>(
            device.client(),
            CubeCount::Static(1, 1, 1),
            CubeDim::new_1d(cfg.units),
            norm.as_array_arg(),
            clip_scale.as_array_arg(),
            scratch.as_array_arg(),
            slots as u32,
            max_norm,
            unscale,
            cfg,
        );
    }
    Ok(())
}

/// `sum_squares[0] = Σ_grads Σ g²` (f32, `=`): one rank's share of a sharded norm (see the module
/// docs). `scratch` as for [`grad_norm`]; `grads` may be empty (the sum is 0).
pub fn grad_sum_squares<R: Runtime, F: FloatElement>(
    device: &Device<R>,
    sum_squares: &mut GpuTensor<R, f32>,
    scratch: &mut GpuTensor<R, f32>,
    grads: &[&GpuTensor<R, F>],
) -> Result<()> {
    Error::check_shape("grad_sum_squares", "sum_squares", sum_squares.shape(), &[1])?;
    let (slots, cfg) = launch_partials(device, scratch, grads)?;
    // SAFETY: reads are guarded by `i < slots ≤ scratch length`; the output has one element.
    unsafe {
        sum_slots_kernel::launch_unchecked::<R>(
            device.client(),
            CubeCount::Static(1, 1, 1),
            CubeDim::new_1d(cfg.units),
            sum_squares.as_array_arg(),
            scratch.as_array_arg(),
            slots as u32,
            cfg,
        );
    }
    Ok(())
}

/// `norm = unscale · sqrt(sum_squares)`, `clip_scale = unscale · min(1, max_norm / (norm +
/// 1e-6))` (both `[1]`, `=`), from the all-reduced [`grad_sum_squares`] of every rank.
pub fn grad_norm_from_sum_squares<R: Runtime>(
    device: &Device<R>,
    norm: &mut GpuTensor<R, f32>,
    clip_scale: &mut GpuTensor<R, f32>,
    sum_squares: &GpuTensor<R, f32>,
    max_norm: f32,
    unscale: f32,
) -> Result<()> {
    check_scales(norm, clip_scale, max_norm, unscale)?;
    Error::check_shape("grad_norm", "sum_squares", sum_squares.shape(), &[1])?;
    // SAFETY: every tensor has one element and one unit reads or writes index 0.
    unsafe {
        norm_from_sum_squares_kernel::launch_unchecked::<R>(
            device.client(),
            CubeCount::Static(1, 1, 1),
            CubeDim::new_1d(1),
            norm.as_array_arg(),
            clip_scale.as_array_arg(),
            sum_squares.as_array_arg(),
            max_norm,
            unscale,
        );
    }
    Ok(())
}

fn check_scales<R: Runtime>(
    norm: &GpuTensor<R, f32>,
    clip_scale: &GpuTensor<R, f32>,
    max_norm: f32,
    unscale: f32,
) -> Result<()> {
    const OP: &str = "grad_norm";
    if !(unscale.is_finite() && unscale > 0.0) {
        return Err(Error::InvalidArgument {
            op: OP,
            message: format!("unscale must be positive, got {unscale}"),
        });
    }
    Error::check_shape(OP, "norm", norm.shape(), &[1])?;
    Error::check_shape(OP, "clip_scale", clip_scale.shape(), &[1])?;
    if !(max_norm.is_finite() && max_norm > 0.0) {
        return Err(Error::InvalidArgument {
            op: OP,
            message: format!("max_norm must be positive, got {max_norm}"),
        });
    }
    Ok(())
}

/// Launches every tensor's partial sums of squares into `scratch`; returns the slots written and
/// the reduction config the final sum must use.
fn launch_partials<R: Runtime, F: FloatElement>(
    device: &Device<R>,
    scratch: &mut GpuTensor<R, f32>,
    grads: &[&GpuTensor<R, F>],
) -> Result<(usize, CubeReduce)> {
    const OP: &str = "grad_norm";
    device.check_dtype::<F>(OP)?;
    let numels: Vec<usize> = grads.iter().map(|g| g.numel()).collect();
    let needed = grad_norm_scratch_len(&numels);
    if scratch.numel() < needed {
        return Err(Error::ShapeMismatch {
            op: OP,
            tensor: "scratch",
            expected: vec![needed],
            actual: scratch.shape().to_vec(),
        });
    }
    let units = cube_units(device, UNITS);
    let cfg = CubeReduce::new(units, device.info().plane_reduce(units));
    let mut slot = 0usize;
    for grad in grads {
        let n = grad.numel();
        // An empty tensor still runs its cube, which writes 0 to its slot.
        let cubes = cubes_for(n);
        let vec = device.vector_size::<F>(n);
        // SAFETY: reads are guarded by `i < numel / vec`; each cube writes slot + CUBE_POS
        // < slot + cubes ≤ scratch length (checked above).
        unsafe {
            sum_squares_kernel::launch_unchecked::<F, R>(
                device.client(),
                CubeCount::Static(cubes as u32, 1, 1),
                CubeDim::new_1d(units),
                vec,
                scratch.as_array_arg(),
                grad.as_array_arg(),
                (n / vec) as u32,
                slot as u32,
                cfg,
            );
        }
        slot += cubes;
    }
    Ok((slot, cfg))
}
