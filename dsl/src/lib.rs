//! The thin layer over CubeCL that every other crate builds on.
//!
//! - [`backend`]: which backend runs ([`Backend`]: wgpu or cuda, from `--backend` or
//!   `CUBELLAMA_BACKEND`), opening its device with clear errors, and [`on_device`] to call
//!   runtime-generic code from a run-time choice.
//! - [`GpuTensor`]: a typed, contiguous device tensor with upload, download, zeros and copy.
//! - [`reduce`]: cube-wide `#[cube]` reductions (sum, max) that row kernels share.
//! - [`math`]: pointwise `#[cube]` helpers (sigmoid, SiLU).
//! - [`rounding`]: stochastic rounding onto f16/bf16 and its counter-based random stream.
//! - [`launch`]: launch-geometry helpers shared by the kernel launchers.
//!
//! ## Tensor layout (fixed here, used everywhere)
//!
//! Activations are row-major with tokens outermost: `[B, T, C]` for hidden states and
//! `[B, T, H, hd]` for attention heads (`H = Hq` for queries, `Hkv` for keys and values), so
//! the output of a `[T, H·hd]` projection *is* the head tensor, with no transpose. Within a
//! head, RoPE pairs element `i` with `i + hd/2` (Hugging Face's rotate-half), so Hugging Face
//! checkpoints load without permuting q/k weights. Position of token `t` is
//! `position_offset + t`, the same for every batch row.
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
pub mod math;
mod memory;
pub mod reduce;
pub mod rounding;
pub mod tensor;

pub use backend::{
    Backend, BackendRuntime, Device, DeviceInfo, KernelPolicy, OnDevice, on_device, on_device_at,
};
pub use element::{DType, Element, FloatElement};
pub use error::{Error, Result};
pub use memory::{ELEMENTWISE_UNITS, record_scalar};
pub use reduce::{
    CubeReduce, ReduceOp, cube_max, cube_max_sumexp, cube_reduce, cube_sum, online_softmax_update,
};
pub use tensor::{GpuTensor, VIEW_ALIGN_BYTES};

/// Concrete runtimes, for binaries and tests that instantiate generic code.
pub mod runtimes {
    #[cfg(feature = "cuda")]
    pub use cubecl::cuda::CudaRuntime;
    #[cfg(feature = "wgpu")]
    pub use cubecl::wgpu::WgpuRuntime;
}
