//! A typed, contiguous GPU tensor.

use crate::backend::Device;
use crate::element::{Element, FloatElement};
use crate::error::{Error, Result};
use crate::memory;
use cubecl::prelude::*;
use cubecl::server::Handle;
use std::fmt;
use std::marker::PhantomData;

/// A row-major tensor of `E` in device memory.
///
/// The handle always holds exactly `numel` elements, which is what makes [`Self::as_array_arg`]
/// safe to hand to a kernel. Tensors are moved into launchers by reference; cloning one clones
/// the handle (both refer to the same memory).
pub struct GpuTensor<R: Runtime, E: Element> {
    handle: Handle,
    shape: Vec<usize>,
    strides: Vec<usize>,
    _marker: PhantomData<(R, E)>,
}

impl<R: Runtime, E: Element> Clone for GpuTensor<R, E> {
    fn clone(&self) -> Self {
        Self {
            handle: self.handle.clone(),
            shape: self.shape.clone(),
            strides: self.strides.clone(),
            _marker: PhantomData,
        }
    }
}

impl<R: Runtime, E: Element> fmt::Debug for GpuTensor<R, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "GpuTensor<{}>{:?}", E::DTYPE, self.shape)
    }
}

/// The byte alignment a [`GpuTensor::rows_view`] must start at: wgpu's
/// `min_storage_buffer_offset_alignment` default (256), the largest any backend asks for.
pub const VIEW_ALIGN_BYTES: u64 = 256;

pub fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

fn row_major_strides(shape: &[usize]) -> Vec<usize> {
    let mut strides = vec![1; shape.len()];
    for d in (0..shape.len().saturating_sub(1)).rev() {
        strides[d] = strides[d + 1] * shape[d + 1];
    }
    strides
}

impl<R: Runtime, E: Element> GpuTensor<R, E> {
    fn check_alloc(device: &Device<R>, op: &'static str, shape: &[usize]) -> Result<usize> {
        device.check_dtype::<E>(op)?;
        if numel(shape) > u32::MAX as usize {
            return Err(Error::Unsupported {
                op,
                message: format!("shape {shape:?} has more than 2^32 elements (kernels index with 32 bits)"),
            });
        }
        let bytes = (numel(shape) as u64).saturating_mul(size_of::<E>() as u64);
        let max_bytes = device.info().max_buffer_bytes;
        if bytes > max_bytes {
            return Err(Error::TooLarge { op, shape: shape.to_vec(), bytes, max_bytes });
        }
        Ok(bytes as usize)
    }

    fn from_handle(handle: Handle, shape: &[usize]) -> Self {
        Self { handle, shape: shape.to_vec(), strides: row_major_strides(shape), _marker: PhantomData }
    }

    /// Copies `data` (row-major, `shape.iter().product()` elements) to the device.
    pub fn from_slice(device: &Device<R>, data: &[E], shape: &[usize]) -> Result<Self> {
        Self::check_alloc(device, "upload", shape)?;
        if data.len() != numel(shape) {
            return Err(Error::DataLength {
                op: "upload",
                len: data.len(),
                shape: shape.to_vec(),
                numel: numel(shape),
            });
        }
        // A zero-sized buffer is not a valid binding on every backend; keep one element.
        let bytes = if data.is_empty() { vec![0u8; size_of::<E>()] } else { E::as_bytes(data).to_vec() };
        Ok(Self::from_handle(device.client().create_from_slice(&bytes), shape))
    }

    /// A tensor whose contents are whatever the memory pool last held there. Only for outputs
    /// a kernel overwrites entirely; use [`Self::zeros`] for anything accumulated into.
    pub fn uninit(device: &Device<R>, shape: &[usize]) -> Result<Self> {
        let bytes = Self::check_alloc(device, "allocate", shape)?;
        Ok(Self::from_handle(device.client().empty(bytes.max(size_of::<E>())), shape))
    }

    /// A tensor of `value`, filled on the device.
    pub fn full(device: &Device<R>, shape: &[usize], value: E) -> Result<Self> {
        let tensor = Self::uninit(device, shape)?;
        memory::fill(device, &tensor, value)?;
        Ok(tensor)
    }

    pub fn zeros(device: &Device<R>, shape: &[usize]) -> Result<Self> {
        Self::full(device, shape, E::from_int(0))
    }

    /// Overwrites every element with `value`.
    pub fn fill(&mut self, device: &Device<R>, value: E) -> Result<()> {
        memory::fill(device, self, value)
    }

    /// Copies `src` (same shape) into `self` with a device copy kernel.
    pub fn copy_from(&mut self, device: &Device<R>, src: &Self) -> Result<()> {
        Error::check_shape("copy", "src", src.shape(), self.shape())?;
        memory::copy(device, self, src)
    }

    /// Reads the tensor back (waits for all queued work first).
    pub fn to_vec(&self, device: &Device<R>) -> Result<Vec<E>> {
        let bytes = device
            .client()
            .read_one(self.handle.clone())
            .map_err(|e| Error::Device { op: "download", message: format!("{e:?}") })?;
        device.check("download")?;
        Ok(E::from_bytes(&bytes)[..self.numel()].to_vec())
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn strides(&self) -> &[usize] {
        &self.strides
    }

    pub fn numel(&self) -> usize {
        numel(&self.shape)
    }

    pub fn size_bytes(&self) -> usize {
        self.numel() * size_of::<E>()
    }

    pub fn handle(&self) -> &Handle {
        &self.handle
    }

    /// The last dimension (1 for a scalar).
    pub fn last_dim(&self) -> usize {
        self.shape.last().copied().unwrap_or(1)
    }

    /// Number of rows when the tensor is read as `[rows, last_dim]`.
    pub fn rows(&self) -> usize {
        self.numel().checked_div(self.last_dim()).unwrap_or(0)
    }

    /// Same memory, new shape with the same number of elements.
    pub fn reshape(&self, shape: &[usize]) -> Result<Self> {
        if numel(shape) != self.numel() {
            return Err(Error::ShapeMismatch {
                op: "reshape",
                tensor: "new shape",
                expected: self.shape.clone(),
                actual: shape.to_vec(),
            });
        }
        Ok(Self::from_handle(self.handle.clone(), shape))
    }

    /// Rows `start .. start + count` of the tensor read as `[rows, last_dim]`: a view of the same
    /// memory (no copy) with shape `[count, last_dim]`, so kernels and GEMMs can work on a block
    /// of rows (the chunked lm_head + cross-entropy does).
    ///
    /// Errors: rows out of range, and a start whose byte offset is not a multiple of
    /// [`VIEW_ALIGN_BYTES`] (wgpu binds storage buffers only at such offsets; CUDA has no such
    /// limit, but one rule for every backend keeps what runs on one valid on the other).
    pub fn rows_view(&self, start: usize, count: usize) -> Result<Self> {
        let (rows, cols) = (self.rows(), self.last_dim());
        if start.checked_add(count).is_none_or(|end| end > rows) || count == 0 {
            return Err(Error::InvalidArgument {
                op: "rows_view",
                message: format!(
                    "rows {start}..{} of a tensor of shape {:?}",
                    start.saturating_add(count),
                    self.shape
                ),
            });
        }
        let row_bytes = (cols * size_of::<E>()) as u64;
        let offset = start as u64 * row_bytes;
        if !offset.is_multiple_of(VIEW_ALIGN_BYTES) {
            return Err(Error::InvalidArgument {
                op: "rows_view",
                message: format!(
                    "row {start} starts at byte {offset}, not a multiple of {VIEW_ALIGN_BYTES} (rows of \
                     {row_bytes} bytes)"
                ),
            });
        }
        let end = (rows - start - count) as u64 * row_bytes;
        let mut handle = self.handle.clone();
        if offset > 0 {
            handle = handle.offset_start(offset);
        }
        if end > 0 {
            handle = handle.offset_end(end);
        }
        Ok(Self::from_handle(handle, &[count, cols]))
    }

    /// The whole tensor as a flat kernel argument of scalars (`len` = numel). Kernels that read
    /// `Array<Vector<E, N>>` see `numel / N` vectors.
    pub fn as_array_arg(&self) -> ArrayArg<R> {
        // SAFETY: the handle was allocated for exactly `numel` elements of `E` (at least one).
        unsafe { ArrayArg::from_raw_parts(self.handle.clone(), self.numel().max(1)) }
    }
}

impl<R: Runtime, E: FloatElement> GpuTensor<R, E> {
    /// Uploads f64 values rounded to `E` (tests and references keep the f64 originals).
    pub fn from_f64(device: &Device<R>, data: &[f64], shape: &[usize]) -> Result<Self> {
        let converted: Vec<E> = data.iter().map(|&v| E::from_f64_rounded(v)).collect();
        Self::from_slice(device, &converted, shape)
    }

    pub fn to_f64_vec(&self, device: &Device<R>) -> Result<Vec<f64>> {
        Ok(self.to_vec(device)?.into_iter().map(E::into_f64).collect())
    }
}
