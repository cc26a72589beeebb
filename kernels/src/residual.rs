//! The residual connection `x += delta`: Llama's two skip additions per layer in the forward,
//! and in the backward the gradient that reaches the stream through a branch added onto the
//! gradient that skips it. Also `x *= factor` (averaging gradients accumulated over
//! micro-batches). Arithmetic in f32 whatever the storage type.

use cubecl::prelude::*;
use dsl::launch::elementwise_grid;
use dsl::{Device, Error, FloatElement, GpuTensor, Result};

#[cube(launch_unchecked)]
fn residual_add_kernel<F: Float, N: Size>(
    x: &mut Array<Vector<F, N>>,
    delta: &Array<Vector<F, N>>,
    len: u32,
) {
    let mut i = ABSOLUTE_POS;
    while i < len as usize {
        let sum = Vector::<f32, N>::cast_from(x[i]) + Vector::<f32, N>::cast_from(delta[i]);
        x[i] = Vector::cast_from(sum);
        i += CUBE_COUNT * CUBE_DIM as usize;
    }
}

#[cube(launch_unchecked)]
fn scale_kernel<F: Float, N: Size>(x: &mut Array<Vector<F, N>>, factor: f32, len: u32) {
    let mut i = ABSOLUTE_POS;
    while i < len as usize {
        x[i] = Vector::cast_from(Vector::<f32, N>::cast_from(x[i]) * Vector::new(factor));
        i += CUBE_COUNT * CUBE_DIM as usize;
    }
}

/// `x *= factor` elementwise.
pub fn scale<R: Runtime, F: FloatElement>(
    device: &Device<R>,
    x: &mut GpuTensor<R, F>,
    factor: f32,
) -> Result<()> {
    const OP: &str = "scale";
    device.check_dtype::<F>(OP)?;
    let n = x.numel();
    if n == 0 {
        return Ok(());
    }
    let vec = device.vector_size::<F>(n);
    let (count, dim) = elementwise_grid(device, n / vec);
    // SAFETY: `i < numel / vec`.
    unsafe {
        scale_kernel::launch_unchecked::<F, R>(
            device.client(),
            count,
            dim,
            vec,
            x.as_array_arg(),
            factor,
            (n / vec) as u32,
        );
    }
    Ok(())
}

/// `x += delta` elementwise (equal shapes).
pub fn residual_add<R: Runtime, F: FloatElement>(
    device: &Device<R>,
    x: &mut GpuTensor<R, F>,
    delta: &GpuTensor<R, F>,
) -> Result<()> {
    const OP: &str = "residual_add";
    device.check_dtype::<F>(OP)?;
    Error::check_shape(OP, "delta", delta.shape(), x.shape())?;
    let n = x.numel();
    if n == 0 {
        return Ok(());
    }
    let vec = device.vector_size::<F>(n);
    let (count, dim) = elementwise_grid(device, n / vec);
    // SAFETY: `i < numel / vec`, the vector length of both (shapes checked equal).
    unsafe {
        residual_add_kernel::launch_unchecked::<F, R>(
            device.client(),
            count,
            dim,
            vec,
            x.as_array_arg(),
            delta.as_array_arg(),
            (n / vec) as u32,
        );
    }
    Ok(())
}
