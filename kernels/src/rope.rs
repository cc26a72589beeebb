//! Rotary position embeddings (RoPE) in Hugging Face Llama's rotate-half layout.
//!
//! Shapes: `x`, `out`, `dout`, `dx`: `[B, T, H, hd]` (the dsl layout; H is Hq for queries, Hkv
//! for keys). Element `i < hd/2` of a head pairs with `i + hd/2`; for the token at position
//! `p = position_offset + t` and frequency `θ_i = theta^(−2i/hd)`:
//! Forward: `out_i = x_i·cos(pθ_i) − x_{i+hd/2}·sin(pθ_i)`,
//!          `out_{i+hd/2} = x_{i+hd/2}·cos(pθ_i) + x_i·sin(pθ_i)`.
//! Backward: the rotation by the opposite angle (a rotation's inverse is its transpose):
//! `dx = rope(dout, −angle)`, overwritten (`=`). Saves nothing.
//!
//! With linear scaling (position interpolation, Chen et al. 2023; transformers'
//! `LlamaLinearScalingRotaryEmbedding`) the angle is `(p / factor)·θ_i`: positions are divided by
//! the factor, the frequencies unchanged. Only the table changes; the kernels read it the same.
//!
//! cos and sin come from a [`RopeTable`] computed once on the host in f64 and stored in f32,
//! so each is within half an f32 ulp of the exact value at every position. (Hugging Face
//! multiplies position by frequency in f32, which at position 4000 is off by ~1e-4 rad; this
//! is closer to the exact rotation.)

use cubecl::prelude::*;
use dsl::launch::elementwise_grid;
use dsl::{Device, Error, FloatElement, GpuTensor, Result};

/// cos and sin of `(position / position_divisor) · θ_i` for positions `0..max_positions`,
/// `i < head_dim / 2`.
pub struct RopeTable<R: Runtime> {
    pub cos: GpuTensor<R, f32>,
    pub sin: GpuTensor<R, f32>,
    pub head_dim: usize,
    pub max_positions: usize,
    pub theta: f64,
    /// Linear scaling's factor (1 for plain RoPE).
    pub position_divisor: f64,
}

/// The table's values on the host, `[max_positions, head_dim / 2]` row-major, as f32 of the
/// f64 `cos` and `sin` of `(p / position_divisor) · theta^(−2i/head_dim)`.
///
/// Errors: `head_dim` odd or 0, `theta` or `position_divisor` not positive and finite.
pub fn rope_cos_sin(
    head_dim: usize,
    max_positions: usize,
    theta: f64,
    position_divisor: f64,
) -> Result<(Vec<f32>, Vec<f32>)> {
    let invalid = |message: String| Error::InvalidArgument { op: "rope_table", message };
    if head_dim == 0 || !head_dim.is_multiple_of(2) {
        return Err(invalid(format!("head_dim must be even and positive, got {head_dim}")));
    }
    if !(theta.is_finite() && theta > 0.0) {
        return Err(invalid(format!("theta must be positive and finite, got {theta}")));
    }
    if !(position_divisor.is_finite() && position_divisor > 0.0) {
        return Err(invalid(format!(
            "the position divisor must be positive and finite, got {position_divisor}"
        )));
    }
    let half = head_dim / 2;
    let (mut cos, mut sin) =
        (Vec::with_capacity(max_positions * half), Vec::with_capacity(max_positions * half));
    for p in 0..max_positions {
        // Divided first, as transformers does (`t / scaling_factor`): at a multiple of the
        // factor the quotient is exact and the row equals the unscaled row of p / factor.
        let position = p as f64 / position_divisor;
        for i in 0..half {
            let angle = position * theta.powf(-2.0 * i as f64 / head_dim as f64);
            cos.push(angle.cos() as f32);
            sin.push(angle.sin() as f32);
        }
    }
    Ok((cos, sin))
}

impl<R: Runtime> RopeTable<R> {
    /// Plain RoPE's table (no scaling).
    pub fn new(device: &Device<R>, head_dim: usize, max_positions: usize, theta: f64) -> Result<Self> {
        Self::scaled(device, head_dim, max_positions, theta, 1.0)
    }

    /// The table with positions divided by `position_divisor` (linear scaling's factor); see
    /// [`rope_cos_sin`] for the values and errors.
    pub fn scaled(
        device: &Device<R>,
        head_dim: usize,
        max_positions: usize,
        theta: f64,
        position_divisor: f64,
    ) -> Result<Self> {
        let (cos, sin) = rope_cos_sin(head_dim, max_positions, theta, position_divisor)?;
        let shape = [max_positions, head_dim / 2];
        Ok(Self {
            cos: GpuTensor::from_slice(device, &cos, &shape)?,
            sin: GpuTensor::from_slice(device, &sin, &shape)?,
            head_dim,
            max_positions,
            theta,
            position_divisor,
        })
    }
}

/// One unit per (token, head, vector of the first half); `inverse` rotates by −angle.
#[cube(launch_unchecked)]
fn rope_kernel<F: Float, N: Size>(
    out: &mut Array<Vector<F, N>>,
    x: &Array<Vector<F, N>>,
    cos: &Array<Vector<f32, N>>,
    sin: &Array<Vector<f32, N>>,
    seq_len: u32,
    heads: u32,
    half_vectors: u32,
    position_offset: u32,
    pairs: u32,
    #[comptime] inverse: bool,
) {
    let mut p = ABSOLUTE_POS;
    while p < pairs as usize {
        let row = p / half_vectors as usize; // (b, t, h) flattened
        let j = p % half_vectors as usize;
        let t = (row / heads as usize) % seq_len as usize;
        let table = (position_offset as usize + t) * half_vectors as usize + j;
        let c = cos[table];
        let s = sin[table];
        let first = row * 2 * half_vectors as usize + j;
        let second = first + half_vectors as usize;
        let x1 = Vector::<f32, N>::cast_from(x[first]);
        let x2 = Vector::<f32, N>::cast_from(x[second]);
        // The inverse rotation flips the sign of sin, written out rather than as `-s` (CUDA's
        // generated code has no unary minus for vectors).
        if comptime!(inverse) {
            out[first] = Vector::cast_from(x1 * c + x2 * s);
            out[second] = Vector::cast_from(x2 * c - x1 * s);
        } else {
            out[first] = Vector::cast_from(x1 * c - x2 * s);
            out[second] = Vector::cast_from(x2 * c + x1 * s);
        }
        p += CUBE_COUNT * CUBE_DIM as usize;
    }
}

fn launch_rope<R: Runtime, F: FloatElement>(
    op: &'static str,
    device: &Device<R>,
    out: &mut GpuTensor<R, F>,
    x: &GpuTensor<R, F>,
    table: &RopeTable<R>,
    position_offset: usize,
    inverse: bool,
) -> Result<()> {
    device.check_dtype::<F>(op)?;
    let &[batch, seq_len, heads, head_dim] = x.shape() else {
        return Err(Error::InvalidArgument {
            op,
            message: format!("x must be [B, T, H, head_dim], got shape {:?}", x.shape()),
        });
    };
    Error::check_shape(op, "out", out.shape(), x.shape())?;
    if head_dim != table.head_dim {
        return Err(Error::InvalidArgument {
            op,
            message: format!("x has head_dim {head_dim} but the RoPE table was built for {}", table.head_dim),
        });
    }
    if position_offset + seq_len > table.max_positions {
        return Err(Error::InvalidArgument {
            op,
            message: format!(
                "positions {position_offset}..{} exceed the RoPE table's {} positions",
                position_offset + seq_len,
                table.max_positions
            ),
        });
    }
    let half = head_dim / 2;
    let pairs = batch * seq_len * heads * half;
    if pairs == 0 {
        return Ok(());
    }
    let vec = device.vector_size::<F>(half).min(device.vector_size::<f32>(half));
    let (count, dim) = elementwise_grid(device, pairs / vec);
    // SAFETY: `p < pairs / vec` bounds (row, j) to the B·T·H rows of hd/vec vectors of x and
    // out (shapes checked); table reads are below (offset + T) · half/vec ≤ the table size.
    unsafe {
        rope_kernel::launch_unchecked::<F, R>(
            device.client(),
            count,
            dim,
            vec,
            out.as_array_arg(),
            x.as_array_arg(),
            table.cos.as_array_arg(),
            table.sin.as_array_arg(),
            seq_len as u32,
            heads as u32,
            (half / vec) as u32,
            position_offset as u32,
            (pairs / vec) as u32,
            inverse,
        );
    }
    Ok(())
}

/// Rotates `x` (`[B, T, H, hd]`, tokens at positions `position_offset + t`) into `out`.
pub fn rope_forward<R: Runtime, F: FloatElement>(
    device: &Device<R>,
    out: &mut GpuTensor<R, F>,
    x: &GpuTensor<R, F>,
    table: &RopeTable<R>,
    position_offset: usize,
) -> Result<()> {
    launch_rope("rope_forward", device, out, x, table, position_offset, false)
}

/// `dx = ` the inverse rotation of `dout`.
pub fn rope_backward<R: Runtime, F: FloatElement>(
    device: &Device<R>,
    dx: &mut GpuTensor<R, F>,
    dout: &GpuTensor<R, F>,
    table: &RopeTable<R>,
    position_offset: usize,
) -> Result<()> {
    launch_rope("rope_backward", device, dx, dout, table, position_offset, true)
}
