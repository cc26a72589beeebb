//! Casting f32 to the compute type by stochastic rounding: `out[i] = SR(x[i])` with the random
//! stream of `key` at element `i` (see [`dsl::rounding`]). The AdamW kernel rounds the same way
//! in its own pass; this standalone cast is what the rounding itself is tested through, and it
//! writes f16/bf16 copies of f32 tensors without bias.
//!
//! Shapes: `x` f32 and `out` `F`, any shape, equal. `out =`. For f32 `out` it is a copy.

use cubecl::prelude::*;
use dsl::launch::elementwise_grid;
use dsl::rounding::{NarrowFloat, RoundingKey, random_u32, round_stochastic};
use dsl::{Device, Error, FloatElement, GpuTensor, Result};

#[cube(launch_unchecked)]
fn cast_stochastic_kernel<F: Float>(
    out: &mut Array<F>,
    x: &Array<f32>,
    key_lo: u32,
    key_hi: u32,
    len: u32,
    #[comptime] target: NarrowFloat,
) {
    let mut i = ABSOLUTE_POS;
    while i < len as usize {
        out[i] = F::cast_from(round_stochastic(x[i], random_u32(i as u32, key_lo, key_hi), target));
        i += CUBE_COUNT * CUBE_DIM as usize;
    }
}

/// `out = SR(x)` onto `F`'s grid with `key`'s random stream (a plain copy when `F` is f32).
///
/// Errors: shapes differ, the device lacks `F`, more than 2^32 elements.
pub fn cast_stochastic<R: Runtime, F: FloatElement>(
    device: &Device<R>,
    out: &mut GpuTensor<R, F>,
    x: &GpuTensor<R, f32>,
    key: RoundingKey,
) -> Result<()> {
    const OP: &str = "cast_stochastic";
    device.check_dtype::<F>(OP)?;
    Error::check_shape(OP, "out", out.shape(), x.shape())?;
    let n = x.numel();
    if n > u32::MAX as usize {
        return Err(Error::InvalidArgument {
            op: OP,
            message: format!("the random stream is keyed by u32 element indices; {n} elements"),
        });
    }
    // f32's own grid: mantissa 23, so nothing is dropped (the bit trick is then the identity).
    let target =
        NarrowFloat::of(F::DTYPE).unwrap_or(NarrowFloat { mantissa_bits: 23, min_biased_exponent: 1 });
    if n == 0 {
        return Ok(());
    }
    let (count, dim) = elementwise_grid(device, n);
    // SAFETY: `i < n`, the element count of both tensors.
    unsafe {
        cast_stochastic_kernel::launch_unchecked::<F, R>(
            device.client(),
            count,
            dim,
            out.as_array_arg(),
            x.as_array_arg(),
            key.lo,
            key.hi,
            n as u32,
            target,
        );
    }
    device.check(OP)
}
