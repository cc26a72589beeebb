//! Pointwise `#[cube]` math shared by kernels, always in f32 (whatever the storage type).

use cubecl::prelude::*;

/// `1 / (1 + e^{-x})`. For x → −∞, `e^{-x}` overflows to +inf and the result is 0, not NaN.
#[cube]
pub fn sigmoid<N: Size>(x: Vector<f32, N>) -> Vector<f32, N> {
    let one = Vector::<f32, N>::new(f32::new(1.0));
    // `zero - x`, not `-x`: CubeCL's CUDA backend emits unary minus on its vector structs,
    // which NVRTC rejects ("no operator - matches these operands").
    let zero = Vector::<f32, N>::new(f32::new(0.0));
    one / (one + Vector::exp(zero - x))
}

/// `x · sigmoid(x)` (SiLU, a.k.a. swish).
#[cube]
pub fn silu<N: Size>(x: Vector<f32, N>) -> Vector<f32, N> {
    x * sigmoid::<N>(x)
}
