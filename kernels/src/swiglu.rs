//! SwiGLU, the elementwise part of Llama's MLP (the gate, up and down projections are matmuls).
//!
//! Shapes: `gate`, `up`, `out`, `dout`, `dgate`, `dup`: any shape, all equal (`[B·T, I]`).
//! Forward: `out = silu(gate) · up`, `silu(g) = g · σ(g)`. Saves nothing: the backward
//! recomputes σ from `gate` (one exp per element is cheaper than a tensor of σ in memory).
//! Backward: `dgate = dout · up · σ(g)·(1 + g·(1 − σ(g)))`, `dup = dout · silu(g)`; both
//! overwritten (`=`). Arithmetic in f32 whatever the storage type.

use cubecl::prelude::*;
use dsl::launch::elementwise_grid;
use dsl::math::{sigmoid, silu};
use dsl::{Device, Error, FloatElement, GpuTensor, Result};

#[cube(launch_unchecked)]
fn swiglu_forward_kernel<F: Float, N: Size>(
    out: &mut Array<Vector<F, N>>,
    gate: &Array<Vector<F, N>>,
    up: &Array<Vector<F, N>>,
    len: u32,
) {
    let mut i = ABSOLUTE_POS;
    while i < len as usize {
        let g = Vector::<f32, N>::cast_from(gate[i]);
        let u = Vector::<f32, N>::cast_from(up[i]);
        out[i] = Vector::cast_from(silu::<N>(g) * u);
        i += CUBE_COUNT * CUBE_DIM as usize;
    }
}

#[cube(launch_unchecked)]
fn swiglu_backward_kernel<F: Float, N: Size>(
    dgate: &mut Array<Vector<F, N>>,
    dup: &mut Array<Vector<F, N>>,
    dout: &Array<Vector<F, N>>,
    gate: &Array<Vector<F, N>>,
    up: &Array<Vector<F, N>>,
    len: u32,
) {
    let one = Vector::<f32, N>::new(f32::new(1.0));
    let mut i = ABSOLUTE_POS;
    while i < len as usize {
        let g = Vector::<f32, N>::cast_from(gate[i]);
        let u = Vector::<f32, N>::cast_from(up[i]);
        let dy = Vector::<f32, N>::cast_from(dout[i]);
        let s = sigmoid::<N>(g);
        dgate[i] = Vector::cast_from(dy * u * s * (one + g * (one - s)));
        dup[i] = Vector::cast_from(dy * g * s);
        i += CUBE_COUNT * CUBE_DIM as usize;
    }
}

fn check_same_shapes<R: Runtime, F: FloatElement>(
    op: &'static str,
    reference: &GpuTensor<R, F>,
    others: &[(&'static str, &[usize])],
) -> Result<()> {
    for &(name, shape) in others {
        Error::check_shape(op, name, shape, reference.shape())?;
    }
    Ok(())
}

/// `out = silu(gate) · up`.
pub fn swiglu_forward<R: Runtime, F: FloatElement>(
    device: &Device<R>,
    out: &mut GpuTensor<R, F>,
    gate: &GpuTensor<R, F>,
    up: &GpuTensor<R, F>,
) -> Result<()> {
    const OP: &str = "swiglu_forward";
    device.check_dtype::<F>(OP)?;
    check_same_shapes(OP, gate, &[("up", up.shape()), ("out", out.shape())])?;
    let n = gate.numel();
    if n == 0 {
        return Ok(());
    }
    let vec = device.vector_size::<F>(n);
    let (count, dim) = elementwise_grid(device, n / vec);
    // SAFETY: indices are guarded by `i < len = numel / vec`, the vector length of every
    // operand (shapes checked equal above).
    unsafe {
        swiglu_forward_kernel::launch_unchecked::<F, R>(
            device.client(),
            count,
            dim,
            vec,
            out.as_array_arg(),
            gate.as_array_arg(),
            up.as_array_arg(),
            (n / vec) as u32,
        );
    }
    Ok(())
}

/// `dgate =`, `dup =` from `dout` and the forward's inputs.
pub fn swiglu_backward<R: Runtime, F: FloatElement>(
    device: &Device<R>,
    dgate: &mut GpuTensor<R, F>,
    dup: &mut GpuTensor<R, F>,
    dout: &GpuTensor<R, F>,
    gate: &GpuTensor<R, F>,
    up: &GpuTensor<R, F>,
) -> Result<()> {
    const OP: &str = "swiglu_backward";
    device.check_dtype::<F>(OP)?;
    check_same_shapes(
        OP,
        gate,
        &[("up", up.shape()), ("dout", dout.shape()), ("dgate", dgate.shape()), ("dup", dup.shape())],
    )?;
    let n = gate.numel();
    if n == 0 {
        return Ok(());
    }
    let vec = device.vector_size::<F>(n);
    let (count, dim) = elementwise_grid(device, n / vec);
    // SAFETY: as in the forward: `i < numel / vec` for equally shaped operands.
    unsafe {
        swiglu_backward_kernel::launch_unchecked::<F, R>(
            device.client(),
            count,
            dim,
            vec,
            dgate.as_array_arg(),
            dup.as_array_arg(),
            dout.as_array_arg(),
            gate.as_array_arg(),
            up.as_array_arg(),
            (n / vec) as u32,
        );
    }
    Ok(())
}
