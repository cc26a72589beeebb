//! Appending new keys or values to a KV cache for decoding.
//!
//! Shapes: `cache` `[B, capacity, Hkv, hd]`, `new` `[B, Tq, Hkv, hd]`; writes
//! `cache[b, position + t] = new[b, t]` for every `t < Tq` (`=`), leaving other positions as
//! they were. One unit per vector of `new`.

use cubecl::prelude::*;
use dsl::launch::elementwise_grid;
use dsl::{Device, Error, FloatElement, GpuTensor, Result};

#[cube(launch_unchecked)]
fn kv_cache_write_kernel<F: Float, N: Size>(
    cache: &mut Array<Vector<F, N>>,
    new: &Array<Vector<F, N>>,
    row_vectors: u32,
    new_len: u32,
    capacity: u32,
    position: u32,
    total: u32,
) {
    let mut i = ABSOLUTE_POS;
    while i < total as usize {
        let row = i / row_vectors as usize; // (b, t) flattened
        let within = i % row_vectors as usize;
        let b = row / new_len as usize;
        let t = row % new_len as usize;
        let dst = (b * capacity as usize + position as usize + t) * row_vectors as usize + within;
        cache[dst] = new[i];
        i += CUBE_COUNT * CUBE_DIM as usize;
    }
}

/// `cache[:, position .. position + Tq] = new`.
pub fn kv_cache_write<R: Runtime, F: FloatElement>(
    device: &Device<R>,
    cache: &mut GpuTensor<R, F>,
    new: &GpuTensor<R, F>,
    position: usize,
) -> Result<()> {
    const OP: &str = "kv_cache_write";
    device.check_dtype::<F>(OP)?;
    let (&[b, capacity, heads, hd], &[nb, new_len, nheads, nhd]) = (cache.shape(), new.shape()) else {
        return Err(Error::InvalidArgument {
            op: OP,
            message: format!(
                "cache and new must be [B, T, H, hd], got {:?} and {:?}",
                cache.shape(),
                new.shape()
            ),
        });
    };
    Error::check_shape(OP, "new", &[nb, nheads, nhd], &[b, heads, hd])?;
    if position + new_len > capacity {
        return Err(Error::InvalidArgument {
            op: OP,
            message: format!(
                "positions {position}..{} do not fit a cache of {capacity} positions",
                position + new_len
            ),
        });
    }
    let row = heads * hd;
    let total = new.numel();
    if total == 0 {
        return Ok(());
    }
    let vec = device.vector_size::<F>(row);
    let (count, dim) = elementwise_grid(device, total / vec);
    // SAFETY: reads `i < numel(new) / vec`; writes land at rows position + t < capacity of
    // batch b < B (checked above), so inside the cache.
    unsafe {
        kv_cache_write_kernel::launch_unchecked::<F, R>(
            device.client(),
            count,
            dim,
            vec,
            cache.as_array_arg(),
            new.as_array_arg(),
            (row / vec) as u32,
            new_len as u32,
            capacity as u32,
            position as u32,
            (total / vec) as u32,
        );
    }
    Ok(())
}
