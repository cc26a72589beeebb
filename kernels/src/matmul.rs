//! The linear layer's three products, through cubek-matmul (CubeCL's GEMM library).
//!
//! Weights are stored `[out, in]` as in Hugging Face; activations are `[N, in]` with `N = B·T`
//! (any leading shape, read as rows). Every transpose is a stride view, never a copy:
//! - forward `Y = X·Wᵀ` (`y` overwritten): W viewed as `[in, out]` with strides `[1, in]`;
//! - input gradient `dX = dY·W`, or `dX += dY·W` to sum the gradients of q/k/v or gate/up
//!   that share one input;
//! - weight gradient `dW += dYᵀ·X` (always accumulating, so micro-batches and tied weights
//!   add up in place): dY viewed as `[out, N]` with strides `[1, out]`.
//!
//! Accumulation passes the output buffer as the library's accumulator input too (`out = A·B +
//! acc` with `acc` and `out` the same memory). That is sound because every routine used here
//! reads an output tile's accumulator once, in the cube that later writes that tile, before
//! writing it (no split-k). Tensor cores (the library's `Simple` routine on cmma) are used
//! where the device has them for the element type; otherwise the plain `SimpleUnit` routine,
//! which is also what runs on wgpu.
//!
//! cubek-matmul 0.2 sizes its shared-memory stages without looking at the device's limit, and a
//! kernel over it fails on the device thread without an error reaching the caller (on wgpu the
//! output is silently left as it was). So every tiling is checked here against the limit first
//! (the stages' lhs and rhs tiles, plus the accumulator tile when accumulating): tensor-core
//! tilings shrink to fewer planes per cube, unit tilings fall back to the smallest tiles, and
//! a product nothing fits is an error.

use cubecl::ir::AddressType;
use cubecl::prelude::*;
use cubecl::server::Handle;
use cubecl::std::tensor::{launch::ViewArg, layout::VirtualLayoutLaunch};
use cubek_matmul::components::global::memory::{
    BatchLayout, BatchLayoutLaunch, GlobalLayout, GlobalLayoutLaunch,
};
use cubek_matmul::components::stage::PartitionBuffering;
use cubek_matmul::components::tile::TileMatmulKind;
use cubek_matmul::definition::TilingScheme;
use cubek_matmul::definition::{
    AvailableVectorSizes, Blueprint as _, MatmulAvailabilityError, MatmulElems, MatmulGlobalElems,
    MatmulProblem, MatmulSetupError, cube_mapping_launch,
};
use cubek_matmul::launch::{TensorArgs, TensorInputsLaunch, TensorOutputLaunch};
use cubek_matmul::routines::{
    BlueprintStrategy, DeviceSettings, ExpandInfo, PlaneTilingBlueprintOptions, Routine, TileSizeSelection,
    infer_blueprint_plane,
    simple::SimpleAlgorithm,
    simple_unit::{SimpleUnitAlgorithm, SimpleUnitSelectionArgs},
};
use dsl::{Backend, DType, Device, Error, FloatElement, GpuTensor, Result};

/// Which GEMM routine ran (tests and the bench report it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MatmulRoutine {
    /// Tensor-core tiles (CUDA's wmma through CubeCL's cmma).
    TensorCores,
    /// One unit per output tile, plain FMAs: every device.
    Units,
}

/// One operand: a buffer read as a `[rows, cols]` matrix with explicit strides (in elements).
struct Operand<'a> {
    handle: &'a Handle,
    shape: [usize; 2],
    strides: [usize; 2],
}

impl<'a> Operand<'a> {
    fn rows<R: Runtime, F: FloatElement>(t: &'a GpuTensor<R, F>) -> Self {
        let (rows, cols) = (t.rows(), t.last_dim());
        Self { handle: t.handle(), shape: [rows, cols], strides: [cols, 1] }
    }

    /// The same buffer read transposed: `[cols, rows]` with strides `[1, cols]`.
    fn transposed<R: Runtime, F: FloatElement>(t: &'a GpuTensor<R, F>) -> Self {
        let (rows, cols) = (t.rows(), t.last_dim());
        Self { handle: t.handle(), shape: [cols, rows], strides: [1, cols] }
    }

    fn binding<R: Runtime>(&self) -> TensorBinding<R> {
        // SAFETY: shape and strides describe memory inside the handle: every GpuTensor holds
        // exactly rows·cols elements and the views above only permute its two dimensions.
        unsafe {
            TensorBinding::<R>::from_raw_parts(
                self.handle.clone(),
                self.strides.to_vec().into(),
                self.shape.to_vec().into(),
            )
        }
    }
}

/// `y = x·wᵀ`: `x` `[…, in]`, `w` `[out, in]`, `y` `[…, out]` with the same leading shape.
pub fn linear_forward<R: Runtime, F: FloatElement>(
    device: &Device<R>,
    y: &mut GpuTensor<R, F>,
    x: &GpuTensor<R, F>,
    w: &GpuTensor<R, F>,
) -> Result<MatmulRoutine> {
    const OP: &str = "linear_forward";
    check_linear(OP, x, w, y.shape(), "y")?;
    if y.numel() == 0 {
        return Ok(MatmulRoutine::Units);
    }
    gemm::<R, F, F>(device, OP, Operand::rows(x), Operand::transposed(w), Operand::rows(y), false)
}

/// `dx = dy·w`, or `dx += dy·w` when `accumulate`: `dy` `[…, out]`, `w` `[out, in]`.
pub fn linear_backward_input<R: Runtime, F: FloatElement>(
    device: &Device<R>,
    dx: &mut GpuTensor<R, F>,
    dy: &GpuTensor<R, F>,
    w: &GpuTensor<R, F>,
    accumulate: bool,
) -> Result<MatmulRoutine> {
    const OP: &str = "linear_backward_input";
    let (out_features, in_features) = weight_dims(OP, w)?;
    Error::check_shape(OP, "dy", &[dy.last_dim()], &[out_features])?;
    let mut expected = dy.shape().to_vec();
    *expected.last_mut().expect("dy has rank ≥ 1") = in_features;
    Error::check_shape(OP, "dx", dx.shape(), &expected)?;
    if dx.numel() == 0 {
        return Ok(MatmulRoutine::Units);
    }
    if dy.rows() == 0 || out_features == 0 {
        // An empty sum: the library would see k = 0.
        if !accumulate {
            dx.fill(device, F::from_f64_rounded(0.0))?;
        }
        return Ok(MatmulRoutine::Units);
    }
    gemm::<R, F, F>(device, OP, Operand::rows(dy), Operand::rows(w), Operand::rows(dx), accumulate)
}

/// `dw += dyᵀ·x`: `dy` `[…, out]`, `x` `[…, in]` with the same leading shape, `dw` `[out, in]`.
/// `dw` may be f32 while `dy` and `x` are f16/bf16 (`G` ≠ `F`): the product accumulates in f32
/// and is added to the f32 `dw` without rounding to the narrow type, so gradients summed over
/// micro-batches are rounded once, not once per micro-batch (Megatron's `main_grad`).
pub fn linear_backward_weight<R: Runtime, F: FloatElement, G: FloatElement>(
    device: &Device<R>,
    dw: &mut GpuTensor<R, G>,
    dy: &GpuTensor<R, F>,
    x: &GpuTensor<R, F>,
) -> Result<MatmulRoutine> {
    const OP: &str = "linear_backward_weight";
    check_linear(OP, x, dw, dy.shape(), "dy")?;
    if G::DTYPE != F::DTYPE && G::DTYPE != DType::F32 {
        return Err(Error::Unsupported {
            op: OP,
            message: format!("dw must be {} (as the inputs) or f32, got {}", F::DTYPE, G::DTYPE),
        });
    }
    if dw.numel() == 0 || x.rows() == 0 {
        return Ok(MatmulRoutine::Units);
    }
    gemm::<R, F, G>(device, OP, Operand::transposed(dy), Operand::rows(x), Operand::rows(dw), true)
}

fn weight_dims<R: Runtime, W: FloatElement>(op: &'static str, w: &GpuTensor<R, W>) -> Result<(usize, usize)> {
    match *w.shape() {
        [out_features, in_features] => Ok((out_features, in_features)),
        ref other => Err(Error::InvalidArgument {
            op,
            message: format!("weight must be [out, in], got shape {other:?}"),
        }),
    }
}

/// Checks `x` `[…, in]` against `w` `[out, in]` and that `y` is `[…, out]`.
fn check_linear<R: Runtime, F: FloatElement, W: FloatElement>(
    op: &'static str,
    x: &GpuTensor<R, F>,
    w: &GpuTensor<R, W>,
    y_shape: &[usize],
    y_name: &'static str,
) -> Result<()> {
    let (out_features, in_features) = weight_dims(op, w)?;
    if x.shape().is_empty() {
        return Err(Error::InvalidArgument { op, message: "x must have rank ≥ 1".into() });
    }
    Error::check_shape(op, "x", &[x.last_dim()], &[in_features])?;
    let mut expected = x.shape().to_vec();
    *expected.last_mut().expect("rank checked") = out_features;
    Error::check_shape(op, y_name, y_shape, &expected)
}

/// `out = lhs·rhs (+ out)` with `F` inputs and a `G` output, trying tensor cores first where the
/// device may have them.
fn gemm<R: Runtime, F: FloatElement, G: FloatElement>(
    device: &Device<R>,
    op: &'static str,
    lhs: Operand<'_>,
    rhs: Operand<'_>,
    out: Operand<'_>,
    accumulate: bool,
) -> Result<MatmulRoutine> {
    device.check_dtype::<F>(op)?;
    device.check_dtype::<G>(op)?;
    let dtype = F::as_type_native_unchecked().storage_type();
    let out_dtype = G::as_type_native_unchecked().storage_type();
    // f16/bf16 inputs accumulate in f32 inside the kernel.
    let dtypes = MatmulElems::from_globals(&MatmulGlobalElems { lhs: dtype, rhs: dtype, out: out_dtype });
    // Tensor cores only for half types: for f32 they would round inputs to tf32.
    if device.backend() == Backend::Cuda && F::DTYPE != DType::F32 {
        let fitted = |problem: &MatmulProblem, settings: &DeviceSettings<R>| {
            tensor_core_blueprint(device, problem, settings, accumulate)
        };
        match launch_routine::<R, SimpleAlgorithm>(device, &lhs, &rhs, &out, accumulate, &dtypes, fitted) {
            Ok(()) => return device.check(op).map(|()| MatmulRoutine::TensorCores),
            Err(MatmulSetupError::Unavailable(_)) => {}
            Err(e) => return Err(setup_error(op, e)),
        }
    }
    let inferred = |problem: &MatmulProblem, settings: &DeviceSettings<R>| {
        unit_blueprint(device, problem, settings, accumulate)
    };
    launch_routine::<R, SimpleUnitAlgorithm>(device, &lhs, &rhs, &out, accumulate, &dtypes, inferred)
        .map_err(|e| setup_error(op, e))?;
    device.check(op)?;
    Ok(MatmulRoutine::Units)
}

fn setup_error(op: &'static str, e: MatmulSetupError) -> Error {
    match e {
        MatmulSetupError::Unavailable(MatmulAvailabilityError::TileSizeNotFound) => Error::Device {
            op,
            message: "no tiling of this product fits in the device's shared memory".to_string(),
        },
        MatmulSetupError::Unavailable(MatmulAvailabilityError::TypesUnavailable { .. }) => {
            Error::Unsupported {
                op,
                message: format!("the device's GEMM cannot use these element types: {e:?}"),
            }
        }
        e => Error::Device { op, message: format!("cubek-matmul refused the product: {e:?}") },
    }
}

/// Shared memory of a routine's stages: the lhs and rhs tiles of one k step, plus the
/// accumulator input's tile (f32 for half inputs) when accumulating. cubek-matmul 0.2 does not
/// check this against the device: an oversized stage fails at launch, on the device thread.
fn stage_bytes(tiling: &TilingScheme, dtypes: &MatmulElems, accumulate: bool) -> usize {
    let (m, n, k) = (
        tiling.elements_per_stage_along_m() as usize,
        tiling.elements_per_stage_along_n() as usize,
        tiling.elements_per_stage_along_k() as usize,
    );
    let inputs = m * k * dtypes.lhs_stage.size() + k * n * dtypes.rhs_stage.size();
    inputs + if accumulate { m * n * dtypes.acc_stage.size() } else { 0 }
}

/// The library's tensor-core blueprint, with fewer planes per cube where its stages would not
/// fit in shared memory. For long-K products it picks 512×128 stages; with the f32 accumulator
/// input of `+=` that is 296 KiB, over an H100's 227.
fn tensor_core_blueprint<R: Runtime>(
    device: &Device<R>,
    problem: &MatmulProblem,
    settings: &DeviceSettings<R>,
    accumulate: bool,
) -> Result<ExpandInfo<<SimpleAlgorithm as Routine<()>>::Blueprint>, MatmulSetupError> {
    let limit = device.info().max_shared_memory_bytes;
    let mut expand =
        <SimpleAlgorithm as Routine<()>>::expand_blueprint(problem, settings, &BlueprintStrategy::default())?;
    let mut planes = device.info().max_units_per_cube / settings.plane_dim.max(1);
    while stage_bytes(&expand.blueprint.tiling_scheme(), &expand.dtypes, accumulate) > limit {
        planes /= 2;
        if planes == 0 {
            return Err(MatmulSetupError::Unavailable(MatmulAvailabilityError::TileSizeNotFound));
        }
        let (blueprint, _) = infer_blueprint_plane(
            TileMatmulKind::Cmma,
            &settings.client,
            problem,
            settings.plane_dim,
            MatmulElems::from_globals(&problem.global_dtypes),
            &settings.vector_sizes,
            PlaneTilingBlueprintOptions {
                row_count: Some(planes),
                partition_buffering: Some(PartitionBuffering::Single),
                tiny_selection_enabled: true,
                swizzled: TileMatmulKind::Cmma.should_swizzle(&settings.client),
                ..Default::default()
            },
        )?;
        expand = <SimpleAlgorithm as Routine<()>>::expand_blueprint(
            problem,
            settings,
            &BlueprintStrategy::Forced(blueprint),
        )?;
    }
    Ok(expand)
}

/// The library's unit-routine blueprint, or its smallest-tile one where the default's stages
/// would not fit in shared memory (on lavapipe's 32 KiB an accumulating 512×64×64 product's
/// did not, and the kernel silently did nothing).
fn unit_blueprint<R: Runtime>(
    device: &Device<R>,
    problem: &MatmulProblem,
    settings: &DeviceSettings<R>,
    accumulate: bool,
) -> Result<ExpandInfo<<SimpleUnitAlgorithm as Routine<()>>::Blueprint>, MatmulSetupError> {
    let limit = device.info().max_shared_memory_bytes;
    for tile_size in [TileSizeSelection::MaxTileSize, TileSizeSelection::MinTileSize] {
        let strategy = BlueprintStrategy::Inferred(SimpleUnitSelectionArgs { tile_size });
        let expand = <SimpleUnitAlgorithm as Routine<()>>::expand_blueprint(problem, settings, &strategy)?;
        if stage_bytes(&expand.blueprint.tiling_scheme(), &expand.dtypes, accumulate) <= limit {
            return Ok(expand);
        }
    }
    Err(MatmulSetupError::Unavailable(MatmulAvailabilityError::TileSizeNotFound))
}

/// The library's launch path with an optional accumulator (`launch_ref` has none); `blueprint`
/// picks the routine's tiling for the problem.
fn launch_routine<R: Runtime, A: Routine<()>>(
    device: &Device<R>,
    lhs: &Operand<'_>,
    rhs: &Operand<'_>,
    out: &Operand<'_>,
    accumulate: bool,
    dtypes: &MatmulElems,
    blueprint: impl FnOnce(
        &MatmulProblem,
        &DeviceSettings<R>,
    ) -> Result<ExpandInfo<A::Blueprint>, MatmulSetupError>,
) -> Result<(), MatmulSetupError> {
    let client = device.client();
    let (lhs, rhs, out) = (lhs.binding::<R>(), rhs.binding::<R>(), out.binding::<R>());
    let problem = MatmulProblem::from_shapes_and_strides(
        lhs.shape.clone(),
        rhs.shape.clone(),
        out.shape.clone(),
        lhs.strides.clone(),
        rhs.strides.clone(),
        out.strides.clone(),
        dtypes.as_global_elems(),
        AddressType::U32,
        None,
        None,
    )?;
    let vector_sizes = AvailableVectorSizes::from_type_sizes(
        client,
        dtypes.lhs_global.size(),
        dtypes.rhs_global.size(),
        dtypes.acc_global.size(),
    )
    .filter_lhs_with_tensor(&lhs.strides, &lhs.shape, problem.lhs_layout)
    .filter_rhs_with_tensor(&rhs.strides, &rhs.shape, problem.rhs_layout)
    .filter_out_with_tensor(&out.strides, &out.shape)
    .pick_max()?;
    let settings = A::device_settings(client, vector_sizes);
    let expand = blueprint(&problem, &settings)?;
    let info = A::prepare(&problem, &settings, expand)?;
    let (blueprint, vectors) = (info.blueprint, info.vector_sizes);
    let view = |t: &TensorBinding<R>, vector_size, config| {
        ViewArg::new_tensor::<GlobalLayout>(
            t.clone().into_tensor_arg(),
            GlobalLayoutLaunch::from_handle(t, vector_size, config),
        )
    };
    let batch = |t: &TensorBinding<R>| {
        VirtualLayoutLaunch::new::<BatchLayout>(BatchLayoutLaunch::from_handle(t, &problem))
    };
    let (acc_batch, acc_view) = if accumulate {
        (
            ComptimeOptionArgs::Some(batch(&out)),
            ComptimeOptionArgs::Some(view(&out, vectors.out, blueprint.out_global_layout_config())),
        )
    } else {
        (ComptimeOptionArgs::None, ComptimeOptionArgs::None)
    };
    let inputs = TensorInputsLaunch::new(
        batch(&lhs),
        view(&lhs, vectors.lhs, blueprint.lhs_global_layout_config()),
        batch(&rhs),
        view(&rhs, vectors.rhs, blueprint.rhs_global_layout_config()),
        acc_batch,
        acc_view,
    );
    let output =
        TensorOutputLaunch::new(view(&out, vectors.out, blueprint.out_global_layout_config()), batch(&out));
    A::launch::<TensorArgs, R>(
        client,
        info.cube_dim,
        info.cube_count_plan.resolve(),
        info.address_type,
        inputs,
        output,
        (),
        cube_mapping_launch(&info.cube_count_plan),
        blueprint,
        &info.dtypes,
        &vectors,
    )
}
