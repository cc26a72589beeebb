//! The cubek-matmul routines [`super`] can launch ([`MatmulRoutine`]), each with its tiling
//! fitted to the device's shared memory.
//!
//! cubek-matmul 0.2 sizes its shared-memory stages without looking at the device's limit, and a
//! kernel over it fails on the device thread without an error reaching the caller (on wgpu the
//! output is silently left as it was). So every tiling is checked here against the limit first
//! (each routine's lhs and rhs stages times its stage count, the accumulator input's stage when
//! accumulating, and the writer's per-plane tiles): tensor-core tilings shrink to fewer planes
//! per cube, unit tilings fall back to the smallest tiles, and a product nothing fits is an
//! error.
//!
//! Accumulation passes the output buffer as the library's accumulator input too (`out = A·B +
//! acc` with `acc` and `out` the same memory). That is sound for every routine listed here: each
//! reads an output tile's accumulator once, in the cube that later writes that tile, before the
//! k loop, and none splits k across cubes. TMA routines are not listed: the library launches
//! them through tensor maps (`launch_ref_tma`), which take no accumulator input.

use super::Operand;
use cubecl::ir::AddressType;
use cubecl::prelude::*;
use cubecl::std::tensor::{launch::ViewArg, layout::VirtualLayoutLaunch};
use cubek_matmul::components::global::memory::{
    BatchLayout, BatchLayoutLaunch, GlobalLayout, GlobalLayoutLaunch,
};
use cubek_matmul::components::global::read::async_partial_cyclic::AsyncPartialCyclicLoading;
use cubek_matmul::components::stage::{ColMajorTilingOrder, PartitionBuffering};
use cubek_matmul::components::tile::TileMatmulKind;
use cubek_matmul::definition::{
    AvailableVectorSizes, Blueprint as _, MatmulAvailabilityError, MatmulElems, MatmulProblem,
    MatmulSetupError, MultiRowStrategy, TilingBlueprint, cube_mapping_launch,
};
use cubek_matmul::launch::{TensorArgs, TensorInputsLaunch, TensorOutputLaunch};
use cubek_matmul::routines::{
    BlueprintStrategy, DeviceSettings, ExpandInfo, PlaneTilingBlueprintOptions, Routine, TileSizeSelection,
    double_buffering::{
        AsyncCyclicDoubleBufferingAlgorithm, CyclicDoubleBufferingAlgorithm, DoubleBufferingArgs,
    },
    double_unit::{DoubleUnitAlgorithm, DoubleUnitSelectionArgs},
    infer_blueprint_plane,
    ordered_double_buffering::{OrderedDoubleBufferingAlgorithm, OrderedSelectionArgs},
    simple::{SimpleAlgorithm, SimpleArgs},
    simple_unit::{SimpleUnitAlgorithm, SimpleUnitSelectionArgs},
    specialized::{SpecializedAlgorithm, SpecializedStrategy},
};
use dsl::{Backend, DType, Device};

/// The warp-specialised routine on `cp.async` loads (not TMA: see the module docs).
type SpecializedCyclicAlgorithm = SpecializedAlgorithm<AsyncPartialCyclicLoading<ColMajorTilingOrder>>;

/// A GEMM routine of cubek-matmul 0.2 (`cubek_matmul::launch::Strategy` names the same ones).
///
/// `*Unit` routines run on every device (plain FMAs, one unit per output tile). The others run
/// on tensor cores, in two forms: `*Cmma` through CubeCL's cmma (CUDA's wmma: fragment layout
/// opaque) and `*Mma` through manual `mma.sync` (register layout known, so the library can use
/// `ldmatrix` and swizzled stages). Schedules:
/// - `Simple`: one shared-memory stage, synchronous loads;
/// - `Double`: two stages, the next k slice loaded while this one is multiplied;
/// - `AsyncDouble`: the same with `cp.async` loads;
/// - `OrderedDouble`: double buffering with the lhs tiles read in the order the planes use them;
/// - `Specialized`: warp specialisation, load planes feeding compute planes through `cp.async`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MatmulRoutine {
    SimpleUnit,
    DoubleUnit,
    SimpleCmma,
    DoubleCmma,
    AsyncDoubleCmma,
    OrderedDoubleCmma,
    SpecializedCmma,
    SimpleMma,
    DoubleMma,
    AsyncDoubleMma,
    OrderedDoubleMma,
    SpecializedMma,
}

impl MatmulRoutine {
    /// Every routine, unit ones first.
    pub const ALL: [Self; 12] = [
        Self::SimpleUnit,
        Self::DoubleUnit,
        Self::SimpleCmma,
        Self::DoubleCmma,
        Self::AsyncDoubleCmma,
        Self::OrderedDoubleCmma,
        Self::SpecializedCmma,
        Self::SimpleMma,
        Self::DoubleMma,
        Self::AsyncDoubleMma,
        Self::OrderedDoubleMma,
        Self::SpecializedMma,
    ];

    /// The name tables, reports and the command line use (`simple_unit`, `double_mma`, …).
    pub fn name(self) -> &'static str {
        match self {
            Self::SimpleUnit => "simple_unit",
            Self::DoubleUnit => "double_unit",
            Self::SimpleCmma => "simple_cmma",
            Self::DoubleCmma => "double_cmma",
            Self::AsyncDoubleCmma => "async_double_cmma",
            Self::OrderedDoubleCmma => "ordered_double_cmma",
            Self::SpecializedCmma => "specialized_cmma",
            Self::SimpleMma => "simple_mma",
            Self::DoubleMma => "double_mma",
            Self::AsyncDoubleMma => "async_double_mma",
            Self::OrderedDoubleMma => "ordered_double_mma",
            Self::SpecializedMma => "specialized_mma",
        }
    }

    /// The routine called `name` ([`Self::name`]).
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.name() == name)
    }

    /// Whether it runs on tensor cores (then f32 inputs are rounded to TF32).
    pub fn uses_tensor_cores(self) -> bool {
        self.tile_kind().is_some()
    }

    fn tile_kind(self) -> Option<TileMatmulKind> {
        match self {
            Self::SimpleUnit | Self::DoubleUnit => None,
            Self::SimpleCmma
            | Self::DoubleCmma
            | Self::AsyncDoubleCmma
            | Self::OrderedDoubleCmma
            | Self::SpecializedCmma => Some(TileMatmulKind::Cmma),
            _ => Some(TileMatmulKind::Mma),
        }
    }

    /// The routines `device` offers for `dtype` inputs: the unit ones everywhere; the
    /// tensor-core ones on CUDA for f16/bf16, and for f32 only where the device's policy allows
    /// TF32 ([`dsl::KernelPolicy::allow_tf32`]). wgpu has no tensor-core path here (its cmma
    /// needs extensions lavapipe and most Vulkan drivers lack).
    pub fn offered<R: Runtime>(device: &Device<R>, dtype: DType) -> Vec<Self> {
        let tensor_cores =
            device.backend() == Backend::Cuda && (dtype != DType::F32 || device.policy().allow_tf32);
        Self::ALL.into_iter().filter(|r| tensor_cores || !r.uses_tensor_cores()).collect()
    }
}

impl std::fmt::Display for MatmulRoutine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Launches `routine` for `out = lhs·rhs (+ out)`.
pub(super) fn launch<R: Runtime>(
    routine: MatmulRoutine,
    device: &Device<R>,
    (lhs, rhs, out): (&Operand<'_>, &Operand<'_>, &Operand<'_>),
    accumulate: bool,
    dtypes: &MatmulElems,
) -> Result<(), MatmulSetupError> {
    use MatmulRoutine as M;
    let operands = (lhs, rhs, out);
    macro_rules! unit {
        ($algorithm:ty, $args:ident) => {
            launch_routine::<R, $algorithm>(device, operands, accumulate, dtypes, |problem, settings| {
                unit_blueprint::<R, $algorithm>(device, problem, settings, accumulate, |tile_size| $args {
                    tile_size,
                })
            })
        };
    }
    let Some(kind) = routine.tile_kind() else {
        return match routine {
            M::SimpleUnit => unit!(SimpleUnitAlgorithm, SimpleUnitSelectionArgs),
            _ => unit!(DoubleUnitAlgorithm, DoubleUnitSelectionArgs),
        };
    };
    // cubek-matmul 0.2 cannot expand this one for `+=` onto an f16/bf16 output (its f32
    // accumulator stage is filled by a copy that cannot convert): CubeCL panics on the device
    // thread with "Downcast should only be used to satisfy the Rust type system" (found by
    // `cargo xtask cuda-report`; onto f32 outputs it expands).
    if routine == M::AsyncDoubleCmma && accumulate && dtypes.acc_global != dtypes.acc_stage {
        return Err(MatmulSetupError::Unavailable(MatmulAvailabilityError::TypesUnavailable {
            lhs: dtypes.lhs_global,
            rhs: dtypes.rhs_global,
            output: dtypes.acc_global,
        }));
    }
    let swizzled = kind.should_swizzle(device.client());
    // The options each routine's own selection uses, with the row (plane) count left to the
    // caller, so a shrunk tiling differs from the library's only in planes per cube.
    let double = move |row_count| PlaneTilingBlueprintOptions {
        row_count,
        multi_row_strategy: MultiRowStrategy::Adaptive { minimum_stage_count: 8 },
        swizzled,
        ..Default::default()
    };
    macro_rules! plane {
        ($algorithm:ty, $args:expr, $options:expr) => {
            launch_routine::<R, $algorithm>(device, operands, accumulate, dtypes, |problem, settings| {
                plane_blueprint::<R, $algorithm>(device, problem, settings, accumulate, kind, $args, $options)
            })
        };
    }
    match routine {
        M::SimpleCmma | M::SimpleMma => {
            plane!(SimpleAlgorithm, SimpleArgs { tile_matmul: kind, multi_rows: false }, move |row_count| {
                PlaneTilingBlueprintOptions {
                    row_count,
                    partition_buffering: Some(PartitionBuffering::Single),
                    tiny_selection_enabled: true,
                    swizzled,
                    ..Default::default()
                }
            })
        }
        M::DoubleCmma | M::DoubleMma => plane!(
            CyclicDoubleBufferingAlgorithm,
            DoubleBufferingArgs { tile_matmul: kind, specialized: false },
            double
        ),
        M::AsyncDoubleCmma | M::AsyncDoubleMma => plane!(
            AsyncCyclicDoubleBufferingAlgorithm,
            DoubleBufferingArgs { tile_matmul: kind, specialized: false },
            double
        ),
        M::OrderedDoubleCmma | M::OrderedDoubleMma => plane!(
            OrderedDoubleBufferingAlgorithm,
            OrderedSelectionArgs { tile_matmul: kind, ..Default::default() },
            double
        ),
        _ => {
            plane!(SpecializedCyclicAlgorithm, SpecializedStrategy { tile_matmul: kind }, move |row_count| {
                PlaneTilingBlueprintOptions { specialized: true, ..double(row_count) }
            })
        }
    }
}

/// Shared memory of a routine's tiling: its lhs and rhs stages (`stages` of each: two for the
/// double-buffered ones), the accumulator input's stage when accumulating, and the writer's
/// staging tile per plane.
fn shared_bytes<A: Routine<()>>(blueprint: &A::Blueprint, dtypes: &MatmulElems, accumulate: bool) -> usize {
    let tiling = blueprint.tiling_scheme();
    let (m, n, k) = (
        tiling.elements_per_stage_along_m() as usize,
        tiling.elements_per_stage_along_n() as usize,
        tiling.elements_per_stage_along_k() as usize,
    );
    let stages = A::num_stages();
    let inputs = stages.lhs as usize * m * k * dtypes.lhs_stage.size()
        + stages.rhs as usize * k * n * dtypes.rhs_stage.size();
    let acc = if accumulate { m * n * dtypes.acc_stage.size() } else { 0 };
    let tile = tiling.tile_size;
    let partitions = (tiling.partitions_per_stage_along_m() * tiling.partitions_per_stage_along_n()) as usize;
    let writer = partitions * (tile.m() * tile.n()) as usize * dtypes.acc_stage.size();
    inputs + acc + writer
}

/// A tensor-core routine's own tiling, or, where it would not fit in shared memory, the same
/// selection with half the planes per cube until it does. For long-K products the library
/// picks 512×128 stages; with the f32 accumulator input of `+=` that is 296 KiB, over an H100's
/// 227.
fn plane_blueprint<R: Runtime, A: Routine<(), Blueprint = TilingBlueprint>>(
    device: &Device<R>,
    problem: &MatmulProblem,
    settings: &DeviceSettings<R>,
    accumulate: bool,
    kind: TileMatmulKind,
    args: A::Strategy,
    options: impl Fn(Option<u32>) -> PlaneTilingBlueprintOptions,
) -> Result<ExpandInfo<TilingBlueprint>, MatmulSetupError> {
    let limit = device.info().max_shared_memory_bytes;
    let mut expand = A::expand_blueprint(problem, settings, &BlueprintStrategy::Inferred(args))?;
    let mut planes = device.info().max_units_per_cube / settings.plane_dim.max(1);
    while shared_bytes::<A>(&expand.blueprint, &expand.dtypes, accumulate) > limit {
        planes /= 2;
        if planes == 0 {
            return Err(MatmulSetupError::Unavailable(MatmulAvailabilityError::TileSizeNotFound));
        }
        // The element types as the routine's own selection sets them (TF32 for f32 inputs).
        let mut dtypes = MatmulElems::from_globals(&problem.global_dtypes);
        if kind.can_cast_stage_element() {
            dtypes.adjust_stage_dtypes();
        }
        let (blueprint, dtypes) = infer_blueprint_plane(
            kind,
            &settings.client,
            problem,
            settings.plane_dim,
            dtypes,
            &settings.vector_sizes,
            options(Some(planes)),
        )?;
        expand = ExpandInfo { blueprint, dtypes };
    }
    whole_stages::<A>(problem, &expand.blueprint)?;
    Ok(expand)
}

/// Refuses a multi-stage routine for a product whose k is not a whole number of stage pairs.
/// cubek-matmul 0.2's double-buffered unit routine returned wrong forward products (`x·wᵀ`,
/// errors of order 1, on lavapipe) whenever k held an odd number of its 8-deep stages (k 8,
/// 24, 40, 72, 200; 16, 48, 64, 96 and 208 were right) or ended inside one (k 1). The other
/// multi-stage routines share its global loop, so they are held to the same rule. Refused
/// products run the default routine instead.
fn whole_stages<A: Routine<()>>(
    problem: &MatmulProblem,
    blueprint: &A::Blueprint,
) -> Result<(), MatmulSetupError> {
    let stages = A::num_stages();
    let stage_k = blueprint.tiling_scheme().elements_per_stage_along_k() as usize;
    if (stages.lhs > 1 || stages.rhs > 1) && !problem.k.is_multiple_of(2 * stage_k) {
        return Err(MatmulSetupError::Unavailable(MatmulAvailabilityError::TileSizeNotFound));
    }
    Ok(())
}

/// A unit routine's largest-tile tiling, or its smallest-tile one where that would not fit in
/// shared memory (on lavapipe's 32 KiB an accumulating 512×64×64 product's did not, and the
/// kernel silently did nothing).
fn unit_blueprint<R: Runtime, A: Routine<()>>(
    device: &Device<R>,
    problem: &MatmulProblem,
    settings: &DeviceSettings<R>,
    accumulate: bool,
    args: impl Fn(TileSizeSelection) -> A::Strategy,
) -> Result<ExpandInfo<A::Blueprint>, MatmulSetupError> {
    let limit = device.info().max_shared_memory_bytes;
    for tile_size in [TileSizeSelection::MaxTileSize, TileSizeSelection::MinTileSize] {
        let expand = A::expand_blueprint(problem, settings, &BlueprintStrategy::Inferred(args(tile_size)))?;
        if shared_bytes::<A>(&expand.blueprint, &expand.dtypes, accumulate) <= limit {
            whole_stages::<A>(problem, &expand.blueprint)?;
            return Ok(expand);
        }
    }
    Err(MatmulSetupError::Unavailable(MatmulAvailabilityError::TileSizeNotFound))
}

/// The library's launch path with an optional accumulator (`launch_ref` has none); `blueprint`
/// picks the routine's tiling for the problem.
fn launch_routine<R: Runtime, A: Routine<()>>(
    device: &Device<R>,
    (lhs, rhs, out): (&Operand<'_>, &Operand<'_>, &Operand<'_>),
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
