//! Token embedding, forward and backward.
//!
//! Shapes: `weight`, `dweight`: `[V, C]`; token ids: `[N]` (N = B·T, any leading shape);
//! `out`, `dout`: `[N, C]`.
//! Forward: `out[n] = weight[ids[n]]` (a gather). Saves nothing beyond the ids.
//! Backward: `dweight[v] += Σ_{n : ids[n] = v} dout[n]` (accumulated, `+=`).
//!
//! Ids enter through [`TokenIds::upload`], which rejects an id outside the vocabulary (naming
//! it, its position and the vocabulary size) and, while the ids are on the host anyway,
//! groups positions by token. The backward then gives each distinct token one cube that sums
//! its positions' gradients in ascending position order: deterministic (bit-identical run to
//! run however many positions share a token) and free of atomics.

use cubecl::prelude::*;
use dsl::launch::{cube_units, elementwise_grid};
use dsl::{Device, Error, FloatElement, GpuTensor, Result};

/// Token ids checked against a vocabulary, plus their positions grouped by token.
pub struct TokenIds<R: Runtime> {
    /// `[N]` ids, each `< vocab_size`.
    pub ids: GpuTensor<R, u32>,
    /// Distinct tokens in ascending order, `[U]`.
    unique: GpuTensor<R, u32>,
    /// `positions[offsets[u]..offsets[u + 1]]` are the positions of `unique[u]`, `[U + 1]`.
    offsets: GpuTensor<R, u32>,
    /// Positions sorted by (token, position), `[N]`.
    positions: GpuTensor<R, u32>,
    unique_count: usize,
    /// Positions of the most frequent token (the longest loop in the backward).
    max_repeats: usize,
    vocab_size: usize,
    shape: Vec<usize>,
}

impl<R: Runtime> TokenIds<R> {
    /// Uploads `ids` (row-major `shape`), rejecting any id `≥ vocab_size`.
    pub fn upload(device: &Device<R>, ids: &[u32], shape: &[usize], vocab_size: usize) -> Result<Self> {
        if let Some((position, &id)) = ids.iter().enumerate().find(|&(_, &id)| id as usize >= vocab_size) {
            return Err(Error::OutOfVocabulary {
                op: "token ids",
                what: "token id",
                position,
                value: id as i64,
                vocab_size,
                allowed: "",
            });
        }
        let mut order: Vec<u32> = (0..ids.len() as u32).collect();
        order.sort_by_key(|&n| (ids[n as usize], n));
        let (mut unique, mut offsets) = (Vec::new(), Vec::new());
        for (k, &n) in order.iter().enumerate() {
            if unique.last() != Some(&ids[n as usize]) {
                unique.push(ids[n as usize]);
                offsets.push(k as u32);
            }
        }
        offsets.push(ids.len() as u32);
        let unique_count = unique.len();
        let max_repeats = offsets.windows(2).map(|w| (w[1] - w[0]) as usize).max().unwrap_or(0);
        Ok(Self {
            ids: GpuTensor::from_slice(device, ids, shape)?,
            unique: GpuTensor::from_slice(device, &unique, &[unique_count])?,
            offsets: GpuTensor::from_slice(device, &offsets, &[unique_count + 1])?,
            positions: GpuTensor::from_slice(device, &order, &[ids.len()])?,
            unique_count,
            max_repeats,
            vocab_size,
            shape: shape.to_vec(),
        })
    }

    pub fn len(&self) -> usize {
        self.ids.numel()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }
}

#[cube(launch_unchecked)]
fn embedding_forward_kernel<F: Float, N: Size>(
    out: &mut Array<Vector<F, N>>,
    ids: &Array<u32>,
    weight: &Array<Vector<F, N>>,
    row_vectors: u32,
    vocab_size: u32,
    len: u32,
) {
    let mut i = ABSOLUTE_POS;
    while i < len as usize {
        let n = i / row_vectors as usize;
        let c = i % row_vectors as usize;
        let id = ids[n];
        // Ids were validated on upload; the guard keeps even a forged id from reading out of
        // bounds.
        if id < vocab_size {
            out[i] = weight[id as usize * row_vectors as usize + c];
        } else {
            out[i] = Vector::new(F::new(0.0));
        }
        i += CUBE_COUNT * CUBE_DIM as usize;
    }
}

/// One cube per distinct token: `dweight[token] += Σ dout[positions of token]`, in order.
#[cube(launch_unchecked)]
fn embedding_backward_kernel<F: Float, G: Float, N: Size>(
    dweight: &mut Array<Vector<G, N>>,
    dout: &Array<Vector<F, N>>,
    unique: &Array<u32>,
    offsets: &Array<u32>,
    positions: &Array<u32>,
    unique_count: u32,
    row_vectors: u32,
) {
    let mut u = CUBE_POS;
    while u < unique_count as usize {
        let token = unique[u] as usize;
        let (start, end) = (offsets[u], offsets[u + 1]);
        let mut c = UNIT_POS as usize;
        while c < row_vectors as usize {
            let mut acc = Vector::<f32, N>::new(f32::new(0.0));
            for k in start..end {
                let n = positions[k as usize] as usize;
                acc += Vector::<f32, N>::cast_from(dout[n * row_vectors as usize + c]);
            }
            let at = token * row_vectors as usize + c;
            dweight[at] = Vector::cast_from(Vector::<f32, N>::cast_from(dweight[at]) + acc);
            c += CUBE_DIM as usize;
        }
        u += CUBE_COUNT;
    }
}

fn check_weight<R: Runtime, F: FloatElement>(
    op: &'static str,
    name: &'static str,
    weight: &GpuTensor<R, F>,
    ids: &TokenIds<R>,
) -> Result<(usize, usize)> {
    let &[vocab, hidden] = weight.shape() else {
        return Err(Error::InvalidArgument {
            op,
            message: format!("{name} must be [V, C], got shape {:?}", weight.shape()),
        });
    };
    if ids.vocab_size > vocab {
        return Err(Error::InvalidArgument {
            op,
            message: format!(
                "token ids were checked against a vocabulary of {}, but {name} has {vocab} rows",
                ids.vocab_size
            ),
        });
    }
    Ok((vocab, hidden))
}

/// `out[n] = weight[ids[n]]`; `out` is `ids.shape() + [C]`.
pub fn embedding_forward<R: Runtime, F: FloatElement>(
    device: &Device<R>,
    out: &mut GpuTensor<R, F>,
    ids: &TokenIds<R>,
    weight: &GpuTensor<R, F>,
) -> Result<()> {
    const OP: &str = "embedding_forward";
    device.check_dtype::<F>(OP)?;
    let (vocab, hidden) = check_weight(OP, "weight", weight, ids)?;
    let expected: Vec<usize> = ids.shape.iter().copied().chain([hidden]).collect();
    Error::check_shape(OP, "out", out.shape(), &expected)?;
    let n = ids.len() * hidden;
    if n == 0 {
        return Ok(());
    }
    let vec = device.vector_size::<F>(hidden);
    let (count, dim) = elementwise_grid(device, n / vec);
    // SAFETY: `i < N·C/vec` bounds out and ids (n < N); weight reads are guarded by id < V.
    unsafe {
        embedding_forward_kernel::launch_unchecked::<F, R>(
            device.client(),
            count,
            dim,
            vec,
            out.as_array_arg(),
            ids.ids.as_array_arg(),
            weight.as_array_arg(),
            (hidden / vec) as u32,
            vocab as u32,
            (n / vec) as u32,
        );
    }
    Ok(())
}

/// `dweight[v] += Σ_{n: ids[n] = v} dout[n]`. `dweight` may be f32 while `dout` is f16/bf16
/// (f32 gradients); each sum is f32 either way.
pub fn embedding_backward<R: Runtime, F: FloatElement, G: FloatElement>(
    device: &Device<R>,
    dweight: &mut GpuTensor<R, G>,
    dout: &GpuTensor<R, F>,
    ids: &TokenIds<R>,
) -> Result<()> {
    const OP: &str = "embedding_backward";
    device.check_dtype::<F>(OP)?;
    device.check_dtype::<G>(OP)?;
    let (_, hidden) = check_weight(OP, "dweight", dweight, ids)?;
    let expected: Vec<usize> = ids.shape.iter().copied().chain([hidden]).collect();
    Error::check_shape(OP, "dout", dout.shape(), &expected)?;
    if ids.unique_count == 0 || hidden == 0 {
        return Ok(());
    }
    let vec = device.vector_size::<F>(hidden).min(device.vector_size::<G>(hidden));
    let units = cube_units(device, ((hidden / vec).next_power_of_two() as u32).clamp(32, 256));
    let cubes = device.grid_cubes(ids.unique_count);
    if let Some(cap) = device.info().max_loop_iterations {
        // Each unit loops over its tokens × its columns × that token's positions.
        let per_unit = ids.unique_count.div_ceil(cubes as usize)
            * (hidden / vec).div_ceil(units as usize)
            * (ids.max_repeats + 2);
        if per_unit > cap as usize {
            return Err(Error::Unsupported {
                op: OP,
                message: format!(
                    "a token repeated {} times needs ~{per_unit} loop iterations per unit, but this device \
                     (lavapipe) silently stops loops after {cap}; use shorter batches here",
                    ids.max_repeats
                ),
            });
        }
    }
    // SAFETY: u < U bounds unique/offsets; offsets hold positions indices < N; c < C/vec;
    // tokens are < V (validated on upload), so every index is inside its tensor.
    unsafe {
        embedding_backward_kernel::launch_unchecked::<F, G, R>(
            device.client(),
            CubeCount::Static(cubes, 1, 1),
            CubeDim::new_1d(units),
            vec,
            dweight.as_array_arg(),
            dout.as_array_arg(),
            ids.unique.as_array_arg(),
            ids.offsets.as_array_arg(),
            ids.positions.as_array_arg(),
            ids.unique_count as u32,
            (hidden / vec) as u32,
        );
    }
    Ok(())
}
