//! Plain f64 CPU twins of the kernels: naive loops over slices with explicit sizes, written to
//! be obviously right. Tests diff every kernel against these; each backward here is itself
//! checked against finite differences.

pub mod adamw;
pub mod attention;
pub mod cross_entropy;
pub mod embedding;
pub mod grad_norm;
pub mod matmul;
pub mod residual;
pub mod rmsnorm;
pub mod rope;
pub mod rounding;
pub mod swiglu;
