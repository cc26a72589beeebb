//! The thin layer over CubeCL that every other crate builds on.
//!
//! - [`backend`]: which backend runs ([`Backend`]: wgpu or cuda, from `--backend` or
//!   `CUBELLAMA_BACKEND`), opening its device with clear errors, and [`on_device`] to call
//!   runtime-generic code from a run-time choice.
//! - [`GpuTensor`]: a typed, contiguous device tensor with upload, download, zeros and copy.
//! - [`reduce`]: cube-wide `#[cube]` reductions (sum, max) that row kernels share.
//! - [`launch`]: launch-geometry helpers shared by the kernel launchers.
//!
//! It is the only crate that names concrete CubeCL runtimes; kernels are generic over
//! [`BackendRuntime`].
//!
//! Conventions every kernel follows: storage in f32, f16 or bf16 (bf16 only on CUDA: WGSL has
//! none), accumulation in f32; what changes the generated code (variant, plane use, vector
//! width, cube size) is comptime, sizes and scalars (eps, lr) are runtime arguments so that a
//! new shape does not compile a new kernel.

pub mod backend;
pub mod element;
pub mod error;
pub mod launch;
mod memory;
pub mod reduce;
pub mod tensor;

pub use backend::{Backend, BackendRuntime, Device, DeviceInfo, OnDevice, on_device};
pub use element::{DType, Element, FloatElement};
pub use error::{Error, Result};
pub use memory::ELEMENTWISE_UNITS;
pub use reduce::{CubeReduce, ReduceOp, cube_max, cube_reduce, cube_sum};
pub use tensor::GpuTensor;

/// Concrete runtimes, for binaries and tests that instantiate generic code.
pub mod runtimes {
    #[cfg(feature = "cuda")]
    pub use cubecl::cuda::CudaRuntime;
    #[cfg(feature = "wgpu")]
    pub use cubecl::wgpu::WgpuRuntime;
}
