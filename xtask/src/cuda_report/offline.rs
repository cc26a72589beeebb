//! An offline CUDA "runtime": CubeCL's CUDA C++ compiler (cubecl-cpp's CUDA dialect, the one
//! `cubecl-cuda` uses) behind a compute server that records kernels instead of running them.
//!
//! The project's launchers are generic over the runtime, so calling them with [`OfflineCuda`]
//! makes them pick their comptime configurations exactly as on a GPU of the chosen
//! architecture (the device properties below mirror `cubecl-cuda`'s server start-up for that
//! `sm_XX`), and every launch lands in [`OfflineServer::launch`], which expands and compiles the
//! kernel to CUDA C++ once per kernel id. No driver, NVRTC or GPU is touched: buffers are ids
//! without storage and reads fail, so nothing launched here may depend on device results.

use cubecl::prelude::*;
use cubecl::{
    device::DeviceId,
    future::DynFut,
    ir::{
        BarrierLevel, ContiguousElements, DeviceProperties, ElemType, FloatKind, HardwareProperties,
        MatrixLayout, MemoryDeviceProperties, MmaProperties, OpaqueType, SemanticType, StorageType,
        TargetProperties, Type, VectorSize,
        features::{AtomicUsage, Plane, Tma, TypeUsage},
    },
    server::{
        Binding, CopyDescriptor, KernelArguments, ProfileError, ProfilingToken, ServerCommunication,
        ServerError, ServerUtilities,
    },
    zspace::{Shape, Strides, striding::has_pitched_row_major_strides},
};
use cubecl_common::{backtrace::BackTrace, bytes::Bytes, profile::ProfileDuration, stream_id::StreamId};
use cubecl_cpp::{
    DialectWmmaCompiler,
    cuda::{CudaDialect, arch::CudaArchitecture, mma::CudaWmmaCompiler, mma::contiguous_elements_cuda},
    register_supported_types,
    shared::{
        CompilationOptions, CppCompiler, CppSupportedFeatures, register_mma_features,
        register_scaled_mma_features, register_wmma_features,
    },
};
use cubecl_runtime::{
    allocator::PitchedMemoryLayoutPolicy,
    compiler::CubeTask,
    logging::ServerLogger,
    memory_management::{ManagedMemoryHandle, MemoryAllocationMode, MemoryUsage},
    server::ComputeServer,
    storage::{BytesStorage, ComputeStorage, ManagedResource},
};
use std::collections::HashSet;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

/// The compiler `cubecl-cuda` uses (without its `ptx-wmma` feature, which this workspace does
/// not enable): CUDA C++ with `nvcuda::wmma` for cmma.
pub type OfflineCompiler = CppCompiler<CudaDialect<CudaWmmaCompiler>>;

/// A CubeCL runtime that compiles to CUDA C++ and runs nothing.
#[derive(Clone, Debug)]
pub struct OfflineCuda;

/// One virtual GPU per compute capability (`arch` = 80 for sm_80, 90 for sm_90).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct OfflineDevice {
    pub arch: u32,
}

impl Default for OfflineDevice {
    fn default() -> Self {
        Self { arch: TARGET_ARCH.load(Ordering::SeqCst) }
    }
}

/// A device type id no real runtime uses, so these servers never share a slot with one.
const DEVICE_TYPE: u16 = 0xC0DA;

impl cubecl::device::Device for OfflineDevice {
    fn from_id(id: DeviceId) -> Self {
        Self { arch: id.index_id as u32 }
    }
    fn to_id(&self) -> DeviceId {
        DeviceId { type_id: DEVICE_TYPE, index_id: self.arch as u16 }
    }
}

/// The architecture [`dsl::Device::open`] opens next (it takes no arguments).
static TARGET_ARCH: AtomicU32 = AtomicU32::new(80);

impl dsl::BackendRuntime for OfflineCuda {
    // Launchers treat it as CUDA: bf16, tensor cores and plane ops are chosen as on a GPU.
    const BACKEND: dsl::Backend = dsl::Backend::Cuda;
    fn default_device() -> Self::Device {
        OfflineDevice::default()
    }
    fn device_at(index: usize) -> Option<Self::Device> {
        (index == 0).then(Self::default_device)
    }
}

/// Opens the offline device for `sm_{arch}`.
pub fn open(arch: u32) -> dsl::Result<dsl::Device<OfflineCuda>> {
    TARGET_ARCH.store(arch, Ordering::SeqCst);
    let device = dsl::Device::<OfflineCuda>::open()?;
    // Opening launches a probe kernel; it is the harness's, not the project's.
    device.sync("cuda-report")?;
    take_captured(arch);
    Ok(device)
}

impl Runtime for OfflineCuda {
    type Compiler = OfflineCompiler;
    type Server = OfflineServer;
    type Device = OfflineDevice;

    fn client(device: &Self::Device) -> ComputeClient<Self> {
        ComputeClient::load(device)
    }
    fn name(_client: &ComputeClient<Self>) -> &'static str {
        "cuda"
    }
    fn require_array_lengths() -> bool {
        true
    }
    fn max_cube_count() -> (u32, u32, u32) {
        (i32::MAX as u32, u16::MAX as u32, u16::MAX as u32)
    }
    fn can_read_tensor(shape: &Shape, strides: &Strides) -> bool {
        has_pitched_row_major_strides(shape, strides)
    }
    /// Copied from `cubecl-cuda`'s `CudaRuntime::target_properties` (mma fragment layouts).
    fn target_properties() -> TargetProperties {
        TargetProperties {
            mma: MmaProperties {
                register_size_bits: 32,
                const_plane_size: 32,
                register_layout_a: MatrixLayout::RowMajor,
                register_layout_b: MatrixLayout::ColMajor,
                register_layout_acc: MatrixLayout::RowMajor,
                register_duplication_a: 1,
                register_duplication_b: 1,
                register_duplication_acc: 1,
                contiguous_elements: ContiguousElements::new(contiguous_elements_cuda),
            },
        }
    }
    fn enumerate_devices(_type_id: u16, _info: &()) -> Vec<DeviceId> {
        Vec::new()
    }
}

/// A kernel as CubeCL's CUDA compiler produced it for one architecture.
#[derive(Clone, Debug)]
pub struct CapturedKernel {
    /// Compute capability, e.g. 80.
    pub arch: u32,
    /// The project operation whose launcher launched it (see [`set_label`]).
    pub label: String,
    /// The `#[cube]` function's entry point, e.g. `rmsnorm_forward_kernel_f32`.
    pub entrypoint: String,
    /// Rust type of the kernel (generics included), for the variant description.
    pub type_name: String,
    /// CubeCL's kernel id as text: comptime arguments, vector sizes, cube size.
    pub id: String,
    /// Units per cube (x, y, z).
    pub cube_dim: (u32, u32, u32),
    /// CUDA C++ source, or the compiler's error.
    pub source: Result<String, String>,
    /// Shared memory CubeCL requests at launch (it declares all of it dynamically).
    pub dynamic_shared_bytes: usize,
}

#[derive(Default)]
struct Captures {
    label: String,
    seen: HashSet<(u32, cubecl_runtime::id::KernelId)>,
    kernels: Vec<CapturedKernel>,
}

static CAPTURES: Mutex<Option<Captures>> = Mutex::new(None);

fn with_captures<T>(f: impl FnOnce(&mut Captures) -> T) -> T {
    // A poisoned lock only means a panic elsewhere mid-update; the records stay usable.
    let mut guard = CAPTURES.lock().unwrap_or_else(|e| e.into_inner());
    f(guard.get_or_insert_with(Captures::default))
}

/// Names the workload whose launches follow (the report's `launched_by`). Waits for the
/// launches already queued first: the server compiles them on its own thread, later.
pub fn set_label(device: &dsl::Device<OfflineCuda>, label: &str) -> dsl::Result<()> {
    device.sync("cuda-report")?;
    with_captures(|c| c.label = label.to_string());
    Ok(())
}

/// The kernels compiled for `arch` since the last call, in launch order.
pub fn take_captured(arch: u32) -> Vec<CapturedKernel> {
    with_captures(|c| {
        let (mine, rest) = std::mem::take(&mut c.kernels).into_iter().partition(|k| k.arch == arch);
        c.kernels = rest;
        mine
    })
}

/// Records kernels instead of running them; see the module docs.
#[derive(Debug)]
pub struct OfflineServer {
    arch: u32,
    options: CompilationOptions,
    utilities: Arc<ServerUtilities<Self>>,
}

/// `CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN` of the flagship part of each
/// architecture (A100: 163 KiB, H100/H200: 227 KiB; CUDA C Programming Guide, table
/// "Technical Specifications per Compute Capability"); what `cubecl-cuda` reads at start-up.
pub fn max_shared_optin_bytes(arch: u32) -> usize {
    match arch {
        90.. => 227 * 1024,
        80 | 87 => 163 * 1024,
        86 | 89 => 99 * 1024,
        75 => 64 * 1024,
        _ => 48 * 1024,
    }
}

/// Streaming multiprocessors of the flagship part (A100: 108, H100 SXM: 132).
fn sm_count(arch: u32) -> u32 {
    match arch {
        90.. => 132,
        80 => 108,
        _ => 80,
    }
}

impl OfflineServer {
    /// Device properties and compiler options as `cubecl-cuda` 0.10's `CudaServer::init` sets
    /// them for a device of compute capability `arch` (read from its source; keep in step
    /// when CubeCL is upgraded).
    fn new(arch: u32) -> Self {
        let cuda_arch = CudaArchitecture { version: arch };
        let wmma = CudaWmmaCompiler::supported_wmma_combinations(&cuda_arch);
        let mma = CudaWmmaCompiler::supported_mma_combinations(&cuda_arch);
        let scaled_mma = CudaWmmaCompiler::supported_scaled_mma_combinations(&cuda_arch);
        let mut options = CompilationOptions {
            warp_size: 32,
            supports_features: CppSupportedFeatures { fast_math: true, ..Default::default() },
        };
        let hardware = HardwareProperties {
            load_width: 128,
            plane_size_min: 32,
            plane_size_max: 32,
            max_bindings: 1024,
            max_shared_memory_size: max_shared_optin_bytes(arch),
            max_cube_count: (i32::MAX as u32, u16::MAX as u32, u16::MAX as u32),
            max_units_per_cube: 1024,
            max_cube_dim: (1024, 1024, 64),
            num_streaming_multiprocessors: Some(sm_count(arch)),
            num_tensor_cores: Some(4),
            min_tensor_cores_dim: if wmma.is_empty() { None } else { Some(8) },
            num_cpu_cores: None,
            max_vector_size: VectorSize::MAX,
        };
        // 80 GiB: pages of a quarter of it, as cubecl-cuda derives from the device's memory.
        let memory = MemoryDeviceProperties { max_page_size: 20 << 30, alignment: 512 };
        let mut props = DeviceProperties::new(
            Default::default(),
            memory,
            hardware,
            cubecl_common::profile::TimingMethod::System,
        );
        register_supported_types(&mut props);
        props.register_type_usage(ElemType::Float(FloatKind::TF32), TypeUsage::Conversion);
        let atomic = |elem: FloatKind| Type::new(StorageType::Atomic(ElemType::Float(elem)));
        if arch >= 60 {
            props.register_atomic_type_usage(
                atomic(FloatKind::F64),
                AtomicUsage::Add | AtomicUsage::LoadStore,
            );
        }
        if arch >= 70 {
            props.register_atomic_type_usage(
                atomic(FloatKind::F16),
                AtomicUsage::Add | AtomicUsage::LoadStore,
            );
            props.register_atomic_type_usage(
                atomic(FloatKind::F16).with_vector_size(2),
                AtomicUsage::Add | AtomicUsage::LoadStore,
            );
            props.register_semantic_type(SemanticType::Pipeline);
            props.register_type_usage(OpaqueType::Barrier(BarrierLevel::Unit), TypeUsage::Buffer);
            props.register_type_usage(OpaqueType::Barrier(BarrierLevel::Cube), TypeUsage::Buffer);
            props.features.plane.insert(Plane::Sync);
            options.supports_features.grid_constants = true;
        }
        if arch >= 75 {
            props.features.matmul.ldmatrix.insert(ElemType::Float(FloatKind::F16).into());
            props.features.matmul.ldmatrix.insert(ElemType::Float(FloatKind::BF16).into());
            // cubecl-cuda: `CUDA_VERSION >= 12080`; the pinned NVRTC wheel is 12.9.
            options.supports_features.fast_tanh = true;
        }
        if arch >= 80 {
            props.features.copy_async = true;
        }
        if arch >= 89 {
            props.register_type_usage(
                ElemType::Float(FloatKind::E4M3),
                TypeUsage::Conversion | TypeUsage::Buffer,
            );
            props.register_type_usage(
                ElemType::Float(FloatKind::E5M2),
                TypeUsage::Conversion | TypeUsage::Buffer,
            );
        }
        if arch >= 90 {
            props.features.tma.insert(Tma::Base);
            props.register_semantic_type(SemanticType::TensorMap);
            props.features.cube_cluster = true;
            options.supports_features.clusters = true;
            options.supports_features.elect_sync = true;
            props.features.matmul.stmatrix.insert(ElemType::Float(FloatKind::F16).into());
            props.features.matmul.stmatrix.insert(ElemType::Float(FloatKind::BF16).into());
            for width in [2, 4] {
                props.register_atomic_type_usage(
                    atomic(FloatKind::F32).with_vector_size(width),
                    AtomicUsage::LoadStore | AtomicUsage::Add,
                );
            }
        }
        props.features.memory_reinterpret = true;
        props.features.alignment = true;
        props.features.plane.insert(Plane::Ops);
        props.features.plane.insert(Plane::NonUniformControlFlow);
        register_wmma_features(wmma, &mut props);
        register_mma_features(mma, &mut props);
        register_scaled_mma_features(scaled_mma, &mut props);

        let logger = Arc::new(ServerLogger::default());
        let policy = PitchedMemoryLayoutPolicy::new(512);
        let utilities = Arc::new(ServerUtilities::new(props, logger, (), policy));
        Self { arch, options, utilities }
    }
}

fn offline_error(what: &str) -> ServerError {
    ServerError::Generic {
        reason: format!("{what}: the offline CUDA compiler runs no kernels and holds no data"),
        backtrace: BackTrace::capture(),
    }
}

impl cubecl::device::DeviceService for OfflineServer {
    fn init(device_id: DeviceId) -> Self {
        Self::new(device_id.index_id as u32)
    }
    fn utilities(&self) -> cubecl::device::ServerUtilitiesHandle {
        self.utilities.clone() as cubecl::device::ServerUtilitiesHandle
    }
}

impl ServerCommunication for OfflineServer {
    const SERVER_COMM_ENABLED: bool = false;
}

impl ComputeServer for OfflineServer {
    type Kernel = Box<dyn CubeTask<OfflineCompiler>>;
    type Info = ();
    type MemoryLayoutPolicy = PitchedMemoryLayoutPolicy;
    type Storage = BytesStorage;

    fn initialize_memory(&mut self, _memory: ManagedMemoryHandle, _size: u64, _stream_id: StreamId) {}

    fn logger(&self) -> Arc<ServerLogger> {
        self.utilities.logger.clone()
    }

    fn utilities(&self) -> Arc<ServerUtilities<Self>> {
        self.utilities.clone()
    }

    fn read(
        &mut self,
        _descriptors: Vec<CopyDescriptor>,
        _stream_id: StreamId,
    ) -> DynFut<Result<Vec<Bytes>, ServerError>> {
        Box::pin(async { Err(offline_error("read")) })
    }

    fn write(&mut self, _descriptors: Vec<(CopyDescriptor, Bytes)>, _stream_id: StreamId) {}

    fn sync(&mut self, _stream_id: StreamId) -> DynFut<Result<(), ServerError>> {
        Box::pin(async { Ok(()) })
    }

    fn get_resource(
        &mut self,
        _binding: Binding,
        _stream_id: StreamId,
    ) -> Result<ManagedResource<<Self::Storage as ComputeStorage>::Resource>, ServerError> {
        Err(offline_error("get_resource"))
    }

    unsafe fn launch(
        &mut self,
        kernel: Self::Kernel,
        _count: CubeCount,
        _bindings: KernelArguments,
        mode: ExecutionMode,
        _stream_id: StreamId,
    ) {
        let id = kernel.id();
        let fresh = with_captures(|c| c.seen.insert((self.arch, id.clone())));
        if !fresh {
            return;
        }
        // Expansion of a `#[cube]` function panics on misuse (that is how CubeCL reports it);
        // keep it as this kernel's error instead of killing the device thread.
        let compiled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            kernel.compile(&mut Default::default(), &self.options, mode, kernel.address_type())
        }));
        let (source, dynamic_shared_bytes, cube_dim, entrypoint) = match compiled {
            Ok(Ok(compiled)) => {
                let shared = compiled.repr.as_ref().map(|r| r.shared_memory_size()).unwrap_or(0);
                let dim = compiled.cube_dim;
                (Ok(compiled.source), shared, (dim.x, dim.y, dim.z), compiled.entrypoint_name)
            }
            Ok(Err(e)) => {
                (Err(format!("{e}")), 0, (id.cube_dim.x, id.cube_dim.y, id.cube_dim.z), String::new())
            }
            Err(payload) => {
                let message = payload
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "(a panic without a message)".into());
                (Err(message), 0, (id.cube_dim.x, id.cube_dim.y, id.cube_dim.z), String::new())
            }
        };
        let record = CapturedKernel {
            arch: self.arch,
            label: String::new(),
            entrypoint,
            type_name: kernel.name().to_string(),
            id: format!("{id}"),
            cube_dim,
            source,
            dynamic_shared_bytes,
        };
        with_captures(|c| {
            c.kernels.push(CapturedKernel { label: c.label.clone(), ..record });
        });
    }

    fn flush(&mut self, _stream_id: StreamId) -> Result<(), ServerError> {
        Ok(())
    }

    fn memory_usage(&mut self, _stream_id: StreamId) -> Result<MemoryUsage, ServerError> {
        Err(offline_error("memory_usage"))
    }

    fn memory_cleanup(&mut self, _stream_id: StreamId) {}

    fn start_profile(&mut self, _stream_id: StreamId) -> Result<ProfilingToken, ServerError> {
        Err(offline_error("profile"))
    }

    fn end_profile(
        &mut self,
        _stream_id: StreamId,
        _token: ProfilingToken,
    ) -> Result<ProfileDuration, ProfileError> {
        Err(ProfileError::Unknown { reason: "offline CUDA compiler".into(), backtrace: BackTrace::capture() })
    }

    fn allocation_mode(&mut self, _mode: MemoryAllocationMode, _stream_id: StreamId) {}
}
