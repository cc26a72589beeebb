//! Backend and device choice.
//!
//! Kernels are generic over [`BackendRuntime`]; a binary picks the backend at run time
//! (`--backend`, else the `CUBELLAMA_BACKEND` environment variable, else wgpu when compiled in)
//! and calls generic code through [`on_device`].

use crate::element::Element;
use crate::error::{Error, Result};
use cubecl::prelude::*;
use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Once};

/// A compute backend this project can be built with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Backend {
    /// CubeCL's wgpu runtime (WGSL through Vulkan/Metal/DX12; Mesa's lavapipe on a CPU).
    Wgpu,
    /// CubeCL's CUDA runtime (CUDA C++ through NVRTC).
    Cuda,
}

impl Backend {
    /// Environment variable read when no `--backend` is given.
    pub const ENV: &'static str = "CUBELLAMA_BACKEND";
    pub const ALL: [Backend; 2] = [Backend::Wgpu, Backend::Cuda];

    pub fn name(self) -> &'static str {
        match self {
            Backend::Wgpu => "wgpu",
            Backend::Cuda => "cuda",
        }
    }

    pub fn is_compiled(self) -> bool {
        match self {
            Backend::Wgpu => cfg!(feature = "wgpu"),
            Backend::Cuda => cfg!(feature = "cuda"),
        }
    }

    /// The backends compiled into this binary, in order of preference for the default.
    pub fn compiled() -> Vec<Backend> {
        Self::ALL.into_iter().filter(|b| b.is_compiled()).collect()
    }

    /// The explicit choice if given, else `CUBELLAMA_BACKEND`, else the first compiled backend.
    /// Errors if the chosen backend is not compiled in.
    pub fn resolve(explicit: Option<Backend>) -> Result<Backend> {
        let chosen = match explicit {
            Some(b) => b,
            None => match std::env::var(Self::ENV) {
                Ok(name) if !name.trim().is_empty() => name.parse()?,
                _ => *Self::compiled().first().ok_or_else(|| Error::BackendNotCompiled {
                    backend: Backend::Wgpu,
                    compiled: "none".into(),
                })?,
            },
        };
        chosen.ensure_compiled()?;
        Ok(chosen)
    }

    pub fn ensure_compiled(self) -> Result<()> {
        if self.is_compiled() {
            return Ok(());
        }
        let compiled = Self::compiled();
        Err(Error::BackendNotCompiled {
            backend: self,
            compiled: if compiled.is_empty() {
                "none".into()
            } else {
                compiled.iter().map(|b| b.name()).collect::<Vec<_>>().join(", ")
            },
        })
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Backend {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "wgpu" => Ok(Backend::Wgpu),
            "cuda" => Ok(Backend::Cuda),
            _ => Err(Error::UnknownBackend { name: s.to_string() }),
        }
    }
}

/// A CubeCL runtime that this project knows how to open.
pub trait BackendRuntime: Runtime {
    const BACKEND: Backend;
    fn default_device() -> Self::Device;
    /// The device of ordinal `index` (CUDA: the `index`-th GPU this process sees, after
    /// `CUDA_VISIBLE_DEVICES`); backends without a numbering give their default device for 0
    /// and `None` otherwise.
    fn device_at(index: usize) -> Option<Self::Device>;
}

#[cfg(feature = "wgpu")]
impl BackendRuntime for cubecl::wgpu::WgpuRuntime {
    const BACKEND: Backend = Backend::Wgpu;
    /// The high-performance adapter; `CUBECL_WGPU_DEFAULT_DEVICE=Cpu` forces lavapipe.
    fn default_device() -> Self::Device {
        cubecl::wgpu::WgpuDevice::DefaultDevice
    }
    fn device_at(index: usize) -> Option<Self::Device> {
        (index == 0).then(Self::default_device)
    }
}

#[cfg(feature = "cuda")]
impl BackendRuntime for cubecl::cuda::CudaRuntime {
    const BACKEND: Backend = Backend::Cuda;
    fn default_device() -> Self::Device {
        cubecl::cuda::CudaDevice { index: 0 }
    }
    fn device_at(index: usize) -> Option<Self::Device> {
        Some(cubecl::cuda::CudaDevice { index })
    }
}

/// What a kernel launcher needs to know about the device, read once when it is opened.
#[derive(Debug)]
pub struct DeviceInfo {
    pub backend: Backend,
    /// CubeCL's name for the runtime and compiler, e.g. `wgpu<wgsl>` or `cuda`.
    pub runtime_name: &'static str,
    pub device: String,
    /// Whether the device advertises plane (subgroup/warp) operations. Reductions should ask
    /// [`Self::plane_reduce`] instead.
    pub plane_ops: bool,
    pub plane_size_min: u32,
    pub plane_size_max: u32,
    pub max_units_per_cube: u32,
    pub max_cube_count_x: u32,
    pub max_shared_memory_bytes: usize,
    pub max_buffer_bytes: u64,
    pub streaming_multiprocessors: Option<u32>,
    pub cpu_cores: Option<u32>,
    pub max_vector_size: usize,
    /// Loop iterations one unit may run before the device silently cuts its loops short, where
    /// such a cap exists: Mesa's llvmpipe (lavapipe) stops every loop of an invocation after
    /// 65535 iterations in total. Measured when the device is opened; `None` = no cap found.
    pub max_loop_iterations: Option<u32>,
    /// Device-thread panics already reported by this device (see [`Device::check`]).
    panics_reported: AtomicUsize,
}

impl DeviceInfo {
    /// Whether a cube of `units` may reduce with plane ops: the device has them and the cube is
    /// whole planes. On CUDA a plane op in a partial warp reads undefined lanes (a 1-unit cube
    /// summed garbage).
    pub fn plane_reduce(&self, units: u32) -> bool {
        self.plane_ops && self.plane_size_max > 0 && units.is_multiple_of(self.plane_size_max)
    }

    /// What identifies the device for measured kernel choices (a tuned table applies to the
    /// devices with the same signature): the runtime and the hardware figures kernels are
    /// shaped by, e.g. `cuda, 132 SMs, 227 KiB shared memory, 1024 units/cube, plane 32`.
    pub fn signature(&self) -> String {
        let processors = match (self.streaming_multiprocessors, self.cpu_cores) {
            (Some(sms), _) => format!("{sms} SMs"),
            (None, Some(cores)) => format!("{cores} CPU cores"),
            (None, None) => "processors unknown".to_string(),
        };
        format!(
            "{}, {processors}, {} KiB shared memory, {} units/cube, plane {}",
            self.runtime_name,
            self.max_shared_memory_bytes / 1024,
            self.max_units_per_cube,
            self.plane_size_max
        )
    }
}

impl fmt::Display for DeviceInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} on {} (plane ops {}, plane size {}..{}, {} units/cube, {} KiB shared memory, \
             largest buffer {} MiB",
            self.runtime_name,
            self.device,
            if self.plane_ops { "advertised" } else { "not advertised" },
            self.plane_size_min,
            self.plane_size_max,
            self.max_units_per_cube,
            self.max_shared_memory_bytes / 1024,
            self.max_buffer_bytes >> 20,
        )?;
        if let Some(sms) = self.streaming_multiprocessors {
            write!(f, ", {sms} SMs")?;
        }
        if let Some(cap) = self.max_loop_iterations {
            write!(f, ", loops capped at {cap} iterations per unit")?;
        }
        write!(f, ")")
    }
}

/// An opened device: a CubeCL client plus what launchers need to know about it.
/// Cheap to clone; clones share the client.
pub struct Device<R: Runtime> {
    client: ComputeClient<R>,
    info: Arc<DeviceInfo>,
    policy: Arc<KernelPolicy>,
}

impl<R: Runtime> Clone for Device<R> {
    fn clone(&self) -> Self {
        Self { client: self.client.clone(), info: self.info.clone(), policy: self.policy.clone() }
    }
}

/// A run's choices about which kernels launch on a device: the numerical trade it accepts
/// (TF32) and the kernel choices measured for the device. Set once after opening
/// ([`Device::with_policy`]); every clone of that device carries it.
#[derive(Clone, Default)]
pub struct KernelPolicy {
    /// Let f32 matmuls run on TF32 tensor cores: inputs rounded to a 10-bit mantissa (relative
    /// error up to 2⁻¹¹ per input), products accumulated in f32. PyTorch's
    /// `torch.backends.cuda.matmul.allow_tf32`; off by default, so f32 stays f32.
    pub allow_tf32: bool,
    /// Tables of measured kernel choices, owned by the crates that read them (the kernels
    /// crate's matmul table is one). Stored type-erased because data flows dsl → kernels:
    /// this crate keeps them without knowing their types. Read with [`Self::table`].
    pub tables: Vec<Arc<dyn std::any::Any + Send + Sync>>,
}

impl KernelPolicy {
    /// The first table of type `T`, if one was given.
    pub fn table<T: 'static>(&self) -> Option<&T> {
        self.tables.iter().find_map(|t| t.downcast_ref::<T>())
    }
}

impl std::fmt::Debug for KernelPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelPolicy")
            .field("allow_tf32", &self.allow_tf32)
            .field("tables", &self.tables.len())
            .finish()
    }
}

impl<R: BackendRuntime> Device<R> {
    /// Opens the backend's default device. A missing driver or adapter is an error, not a panic.
    pub fn open() -> Result<Self> {
        Self::open_device(R::default_device())
    }

    /// Opens device `index` of the backend (a data-parallel rank's `LOCAL_RANK`): an error when
    /// the backend has no such device.
    pub fn open_at(index: usize) -> Result<Self> {
        let device = R::device_at(index).ok_or_else(|| Error::NoDevice {
            backend: R::BACKEND,
            reason: format!(
                "device {index} was asked for, but this backend opens only its default device (0)"
            ),
        })?;
        Self::open_device(device)
    }

    fn open_device(device: R::Device) -> Result<Self> {
        install_panic_monitor();
        let device_name = format!("{device:?}");
        let panics_before = DEVICE_PANICS.load(Ordering::SeqCst);
        OPENING.set(true);
        let opened = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| R::client(&device)));
        OPENING.set(false);
        let client = opened.map_err(|payload| {
            // The real cause is usually a panic on the device thread; the caller's own panic
            // is only the channel to that thread closing.
            let device_panic = (DEVICE_PANICS.load(Ordering::SeqCst) != panics_before)
                .then(|| LAST_DEVICE_PANIC.lock().ok().and_then(|m| m.clone()))
                .flatten();
            let reason = device_panic.unwrap_or_else(|| panic_message(payload.as_ref()));
            let hint = match R::BACKEND {
                Backend::Wgpu => {
                    " (no Vulkan/Metal/DX12 adapter? Without a GPU on Debian/Ubuntu: \
                     apt-get install mesa-vulkan-drivers libvulkan1)"
                }
                Backend::Cuda => " (needs an NVIDIA driver, libnvrtc and the CUDA headers: set CUDA_PATH)",
            };
            Error::NoDevice { backend: R::BACKEND, reason: format!("{reason}{hint}") }
        })?;
        Ok(Self::from_client(client, device_name))
    }

    fn from_client(client: ComputeClient<R>, device: String) -> Self {
        let props = client.properties();
        let hw = &props.hardware;
        let info = DeviceInfo {
            backend: R::BACKEND,
            runtime_name: R::name(&client),
            device,
            plane_ops: client.features().plane.contains(cubecl::features::Plane::Ops),
            plane_size_min: hw.plane_size_min,
            plane_size_max: hw.plane_size_max,
            max_units_per_cube: hw.max_units_per_cube,
            max_cube_count_x: hw.max_cube_count.0,
            max_shared_memory_bytes: hw.max_shared_memory_size,
            max_buffer_bytes: props.memory.max_page_size,
            streaming_multiprocessors: hw.num_streaming_multiprocessors,
            cpu_cores: hw.num_cpu_cores,
            max_vector_size: hw.max_vector_size,
            max_loop_iterations: loop_iteration_cap(&client),
            panics_reported: AtomicUsize::new(DEVICE_PANICS.load(Ordering::SeqCst)),
        };
        Self { client, info: Arc::new(info), policy: Arc::default() }
    }
}

impl<R: Runtime> Device<R> {
    pub fn client(&self) -> &ComputeClient<R> {
        &self.client
    }

    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    /// The kernel policy this handle launches with (defaults: no TF32, no tables).
    pub fn policy(&self) -> &KernelPolicy {
        &self.policy
    }

    /// The same device (sharing its client and queue) launching with `policy`.
    pub fn with_policy(&self, policy: KernelPolicy) -> Self {
        Self { client: self.client.clone(), info: self.info.clone(), policy: Arc::new(policy) }
    }

    pub fn backend(&self) -> Backend {
        self.info.backend
    }

    /// Whether kernels may use element type `E` on this device.
    pub fn supports<E: Element>(&self) -> bool {
        self.client.properties().supports_type(E::as_type_native_unchecked())
    }

    /// Errors naming `op` when `E` is unsupported: checked before every launch, because a
    /// kernel the backend cannot compile fails silently on the device thread.
    pub fn check_dtype<E: Element>(&self, op: &'static str) -> Result<()> {
        if self.supports::<E>() {
            return Ok(());
        }
        Err(Error::UnsupportedDType {
            op,
            dtype: E::DTYPE,
            backend: self.backend(),
            hint: match (E::DTYPE, self.backend()) {
                (crate::DType::BF16, Backend::Wgpu) => {
                    " (WGSL has no bf16: use f32 or f16 on wgpu, bf16 on cuda)"
                }
                _ => "",
            },
        })
    }

    /// The widest vector (in elements of `E`) that the device loads in one instruction and
    /// that divides `len`, so rows of `len` elements split into whole vectors.
    /// An empty tensor gets 1: its buffer holds a single placeholder element, not a vector.
    pub fn vector_size<E: Element>(&self, len: usize) -> usize {
        if len == 0 {
            return 1;
        }
        self.client.io_optimized_vector_sizes(size_of::<E>()).find(|&v| len.is_multiple_of(v)).unwrap_or(1)
    }

    /// Cubes for a grid-stride launch over `work_items` independent items: at most the
    /// per-dimension limit (65535 on most devices; more kills a wgpu client).
    pub fn grid_cubes(&self, work_items: usize) -> u32 {
        work_items.clamp(1, self.info.max_cube_count_x as usize) as u32
    }

    /// Waits for every queued launch, then reports a kernel that failed on the device thread.
    pub fn sync(&self, op: &'static str) -> Result<()> {
        let device_error = |e| Error::Device { op, message: format!("{e:?}") };
        // `flush` reports launch errors the server recorded (e.g. too much shared memory).
        self.client.flush().map_err(device_error)?;
        cubecl::future::block_on(self.client.sync()).map_err(device_error)?;
        self.check(op)
    }

    /// Reports a panic on a CubeCL device thread since the last check (a kernel that failed to
    /// compile or launch). CubeCL itself returns `Ok` in that case and leaves outputs untouched.
    pub fn check(&self, op: &'static str) -> Result<()> {
        let now = DEVICE_PANICS.load(Ordering::SeqCst);
        let before = self.info.panics_reported.swap(now, Ordering::SeqCst);
        if now == before {
            return Ok(());
        }
        let last = LAST_DEVICE_PANIC.lock().map(|m| m.clone()).unwrap_or_default();
        Err(Error::Device {
            op,
            message: format!(
                "{} kernel failure(s) on the device thread; last: {}",
                now - before,
                last.unwrap_or_else(|| "(no message)".into())
            ),
        })
    }
}

#[cube(launch)]
fn count_loop_iterations(out: &mut Array<u32>, n: u32) {
    let mut count = 0u32;
    while count < n {
        count += 1;
    }
    out[0] = count;
}

/// Runs one unit through a loop of 2^20 iterations and reports how far it got, if not all the
/// way (once per process and backend: the answer is a property of the driver).
fn loop_iteration_cap<R: BackendRuntime>(client: &ComputeClient<R>) -> Option<u32> {
    static CAPS: Mutex<Vec<(Backend, Option<u32>)>> = Mutex::new(Vec::new());
    let mut caps = CAPS.lock().ok()?;
    if let Some(&(_, cap)) = caps.iter().find(|(b, _)| *b == R::BACKEND) {
        return cap;
    }
    const PROBE: u32 = 1 << 20;
    let out = client.create_from_slice(u32::as_bytes(&[0]));
    count_loop_iterations::launch::<R>(
        client,
        CubeCount::Static(1, 1, 1),
        CubeDim::new_1d(1),
        unsafe { ArrayArg::from_raw_parts(out.clone(), 1) },
        PROBE,
    );
    let reached = client.read_one(out).ok().map(|bytes| u32::from_bytes(&bytes)[0]);
    // 0 means the probe did not run at all (a broken device): no cap is known then.
    let cap = match reached {
        Some(n) if n > 0 && n < PROBE => Some(n),
        _ => None,
    };
    caps.push((R::BACKEND, cap));
    cap
}

/// Generic work to run on whichever backend was chosen at run time.
pub trait OnDevice {
    type Output;
    fn run<R: BackendRuntime>(self, device: &Device<R>) -> Self::Output;
}

/// Opens `backend`'s default device and runs `task` on it.
pub fn on_device<T: OnDevice>(backend: Backend, task: T) -> Result<T::Output> {
    backend.ensure_compiled()?;
    match backend {
        #[cfg(feature = "wgpu")]
        Backend::Wgpu => Ok(task.run(&Device::<cubecl::wgpu::WgpuRuntime>::open()?)),
        #[cfg(feature = "cuda")]
        Backend::Cuda => Ok(task.run(&Device::<cubecl::cuda::CudaRuntime>::open()?)),
        #[allow(unreachable_patterns)]
        other => Err(Error::BackendNotCompiled { backend: other, compiled: "none".into() }),
    }
}

/// [`on_device`] on device `index` of `backend` (see [`Device::open_at`]).
pub fn on_device_at<T: OnDevice>(backend: Backend, index: usize, task: T) -> Result<T::Output> {
    backend.ensure_compiled()?;
    match backend {
        #[cfg(feature = "wgpu")]
        Backend::Wgpu => Ok(task.run(&Device::<cubecl::wgpu::WgpuRuntime>::open_at(index)?)),
        #[cfg(feature = "cuda")]
        Backend::Cuda => Ok(task.run(&Device::<cubecl::cuda::CudaRuntime>::open_at(index)?)),
        #[allow(unreachable_patterns)]
        other => Err(Error::BackendNotCompiled { backend: other, compiled: "none".into() }),
    }
}

static DEVICE_PANICS: AtomicUsize = AtomicUsize::new(0);
static LAST_DEVICE_PANIC: Mutex<Option<String>> = Mutex::new(None);

thread_local! {
    /// Set while this thread opens a device: its panic there is caught and becomes
    /// [`Error::NoDevice`], so it is not printed.
    static OPENING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// CubeCL runs each device's server on a thread named `DSU-..`/`DSD-..`; a kernel that fails to
/// compile panics there and the caller sees nothing. Count those panics so [`Device::check`]
/// can turn them into errors, and print each as one line: a backtrace of CubeCL's internals
/// (with `RUST_BACKTRACE` set) tells the user nothing the error does not. Other panics, ours
/// included, go to the previous hook as before.
fn install_panic_monitor() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let on_device_thread =
                std::thread::current().name().is_some_and(|n| n.starts_with("DSU-") || n.starts_with("DSD-"));
            if on_device_thread {
                let message = panic_message(info.payload());
                if let Ok(mut last) = LAST_DEVICE_PANIC.lock() {
                    *last = Some(message.clone());
                }
                DEVICE_PANICS.fetch_add(1, Ordering::SeqCst);
                eprintln!("device thread: {}", message.lines().next().unwrap_or_default());
            } else if !OPENING.get() {
                previous(info);
            }
        }));
    });
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(a panic without a message)".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_names_parse_and_unknown_ones_are_named() {
        assert_eq!("wgpu".parse::<Backend>().unwrap(), Backend::Wgpu);
        assert_eq!(" CUDA ".parse::<Backend>().unwrap(), Backend::Cuda);
        let err = "metal".parse::<Backend>().unwrap_err();
        assert_eq!(err.to_string(), "unknown backend `metal`: expected one of wgpu, cuda");
    }

    #[test]
    fn a_backend_that_is_not_compiled_in_says_how_to_get_it() {
        for backend in Backend::ALL {
            match backend.ensure_compiled() {
                Ok(()) => assert!(backend.is_compiled()),
                Err(e) => assert!(e.to_string().contains(&format!("--features {backend}")), "{e}"),
            }
        }
    }
}
