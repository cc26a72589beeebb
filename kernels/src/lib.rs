//! Llama2 operators written once in CubeCL, each in its own module with forward and backward
//! side by side, and a plain f64 CPU twin under [`reference`] with the same names and
//! argument order.
//!
//! Launchers take `(device, outputs…, inputs…, saved…, scalars)`; the caller allocates every
//! tensor (nothing allocates inside a training step) and each launcher checks shapes and
//! element types before it launches, returning [`Error`] naming the operator and tensor.

pub mod adamw;
pub mod attention;
pub mod cross_entropy;
pub mod embedding;
pub mod grad_norm;
pub mod kv_cache;
pub mod matmul;
pub mod reference;
pub mod residual;
pub mod rmsnorm;
pub mod rope;
pub mod rounding;
pub mod swiglu;

pub use dsl::{Error, Result};
