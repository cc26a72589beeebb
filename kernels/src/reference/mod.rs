//! Plain f64 CPU twins of the kernels: naive loops over slices with explicit sizes, written to
//! be obviously right. Tests diff every kernel against these; each backward here is itself
//! checked against finite differences.

pub mod rmsnorm;
