//! The linear layer's three products, through cubek-matmul (CubeCL's GEMM library).
//!
//! Weights are stored `[out, in]` as in Hugging Face; activations are `[N, in]` with `N = B·T`
//! (any leading shape, read as rows). Every transpose is a stride view, never a copy:
//! - forward `Y = X·Wᵀ` (`y` overwritten): W viewed as `[in, out]` with strides `[1, in]`;
//! - input gradient `dX = dY·W`, or `dX += dY·W` to sum the gradients of q/k/v or gate/up
//!   that share one input;
//! - weight gradient `dW += dYᵀ·X` (always accumulating, so micro-batches and tied weights
//!   add up in place): dY viewed as `[out, N]` with strides `[1, out]`.
//!
//! Which cubek-matmul routine runs ([`MatmulRoutine`], in [`routines`]) is chosen per product
//! by [`choose`]: a routine given by the caller, else the device's measured table ([`table`],
//! written by `cargo xtask tune-matmul`) for the product's shape, else the default (tensor
//! cores' `simple_cmma` on CUDA for f16/bf16, and for f32 where TF32 is allowed; `simple_unit`
//! elsewhere). The choice is a pure function of the shape, the device's policy and the table,
//! so a run's results stay bit-identical from run to run.

pub mod routines;
pub mod table;

pub use routines::MatmulRoutine;
pub use table::{MatmulEntry, MatmulKey, MatmulTable, RoutineTiming, TableError};

use cubecl::prelude::*;
use cubecl::server::Handle;
use cubek_matmul::definition::{MatmulAvailabilityError, MatmulElems, MatmulGlobalElems, MatmulSetupError};
use dsl::{DType, Device, Error, FloatElement, GpuTensor, Result};

/// One operand: a buffer read as a `[rows, cols]` matrix with explicit strides (in elements).
pub(crate) struct Operand<'a> {
    handle: &'a Handle,
    shape: [usize; 2],
    strides: [usize; 2],
    /// Whether this is a row-major buffer read transposed (column-major).
    transposed: bool,
}

impl<'a> Operand<'a> {
    fn rows<R: Runtime, F: FloatElement>(t: &'a GpuTensor<R, F>) -> Self {
        let (rows, cols) = (t.rows(), t.last_dim());
        Self { handle: t.handle(), shape: [rows, cols], strides: [cols, 1], transposed: false }
    }

    /// The same buffer read transposed: `[cols, rows]` with strides `[1, cols]`.
    fn transposed<R: Runtime, F: FloatElement>(t: &'a GpuTensor<R, F>) -> Self {
        let (rows, cols) = (t.rows(), t.last_dim());
        Self { handle: t.handle(), shape: [cols, rows], strides: [1, cols], transposed: true }
    }

    fn binding<R: Runtime>(&self) -> TensorBinding<R> {
        // SAFETY: shape and strides describe memory inside the handle: every GpuTensor holds
        // exactly rows·cols elements and the views above only permute its two dimensions.
        unsafe {
            TensorBinding::<R>::from_raw_parts(
                self.handle.clone(),
                self.strides.to_vec().into(),
                self.shape.to_vec().into(),
            )
        }
    }
}

/// `y = x·wᵀ`: `x` `[…, in]`, `w` `[out, in]`, `y` `[…, out]` with the same leading shape.
/// Returns the routine that ran ([`choose`] picks it; `simple_unit` when nothing needed
/// launching).
pub fn linear_forward<R: Runtime, F: FloatElement>(
    device: &Device<R>,
    y: &mut GpuTensor<R, F>,
    x: &GpuTensor<R, F>,
    w: &GpuTensor<R, F>,
) -> Result<MatmulRoutine> {
    linear_forward_with(device, None, y, x, w)
}

/// [`linear_forward`] with `routine` instead of the chosen one (tests and the tuner run every
/// routine). Returns the routine that ran: `routine`, or, where `routine` cannot take this
/// product (the library reports it unavailable, or [`routines`] refuses it), the default
/// routine, else `simple_unit`. A routine the device does not offer
/// ([`MatmulRoutine::offered`]) is an error.
pub fn linear_forward_with<R: Runtime, F: FloatElement>(
    device: &Device<R>,
    routine: Option<MatmulRoutine>,
    y: &mut GpuTensor<R, F>,
    x: &GpuTensor<R, F>,
    w: &GpuTensor<R, F>,
) -> Result<MatmulRoutine> {
    const OP: &str = "linear_forward";
    check_linear(OP, x, w, y.shape(), "y")?;
    if y.numel() == 0 {
        return Ok(MatmulRoutine::SimpleUnit);
    }
    gemm::<R, F, F>(device, OP, routine, [Operand::rows(x), Operand::transposed(w), Operand::rows(y)], false)
}

/// `dx = dy·w`, or `dx += dy·w` when `accumulate`: `dy` `[…, out]`, `w` `[out, in]`.
/// Returns the routine that ran, as [`linear_forward`].
pub fn linear_backward_input<R: Runtime, F: FloatElement>(
    device: &Device<R>,
    dx: &mut GpuTensor<R, F>,
    dy: &GpuTensor<R, F>,
    w: &GpuTensor<R, F>,
    accumulate: bool,
) -> Result<MatmulRoutine> {
    linear_backward_input_with(device, None, dx, dy, w, accumulate)
}

/// [`linear_backward_input`] with `routine` instead of the chosen one, as
/// [`linear_forward_with`].
pub fn linear_backward_input_with<R: Runtime, F: FloatElement>(
    device: &Device<R>,
    routine: Option<MatmulRoutine>,
    dx: &mut GpuTensor<R, F>,
    dy: &GpuTensor<R, F>,
    w: &GpuTensor<R, F>,
    accumulate: bool,
) -> Result<MatmulRoutine> {
    const OP: &str = "linear_backward_input";
    let (out_features, in_features) = weight_dims(OP, w)?;
    Error::check_shape(OP, "dy", &[dy.last_dim()], &[out_features])?;
    let mut expected = dy.shape().to_vec();
    *expected.last_mut().expect("dy has rank ≥ 1") = in_features;
    Error::check_shape(OP, "dx", dx.shape(), &expected)?;
    if dx.numel() == 0 {
        return Ok(MatmulRoutine::SimpleUnit);
    }
    if dy.rows() == 0 || out_features == 0 {
        // An empty sum: the library would see k = 0.
        if !accumulate {
            dx.fill(device, F::from_f64_rounded(0.0))?;
        }
        return Ok(MatmulRoutine::SimpleUnit);
    }
    gemm::<R, F, F>(device, OP, routine, [Operand::rows(dy), Operand::rows(w), Operand::rows(dx)], accumulate)
}

/// `dw += dyᵀ·x`: `dy` `[…, out]`, `x` `[…, in]` with the same leading shape, `dw` `[out, in]`.
/// `dw` may be f32 while `dy` and `x` are f16/bf16 (`G` ≠ `F`): the product accumulates in f32
/// and is added to the f32 `dw` without rounding to the narrow type, so gradients summed over
/// micro-batches are rounded once, not once per micro-batch (Megatron's `main_grad`).
/// Returns the routine that ran, as [`linear_forward`].
pub fn linear_backward_weight<R: Runtime, F: FloatElement, G: FloatElement>(
    device: &Device<R>,
    dw: &mut GpuTensor<R, G>,
    dy: &GpuTensor<R, F>,
    x: &GpuTensor<R, F>,
) -> Result<MatmulRoutine> {
    linear_backward_weight_with(device, None, dw, dy, x)
}

/// [`linear_backward_weight`] with `routine` instead of the chosen one, as
/// [`linear_forward_with`].
pub fn linear_backward_weight_with<R: Runtime, F: FloatElement, G: FloatElement>(
    device: &Device<R>,
    routine: Option<MatmulRoutine>,
    dw: &mut GpuTensor<R, G>,
    dy: &GpuTensor<R, F>,
    x: &GpuTensor<R, F>,
) -> Result<MatmulRoutine> {
    const OP: &str = "linear_backward_weight";
    check_linear(OP, x, dw, dy.shape(), "dy")?;
    if G::DTYPE != F::DTYPE && G::DTYPE != DType::F32 {
        return Err(Error::Unsupported {
            op: OP,
            message: format!("dw must be {} (as the inputs) or f32, got {}", F::DTYPE, G::DTYPE),
        });
    }
    if dw.numel() == 0 || x.rows() == 0 {
        return Ok(MatmulRoutine::SimpleUnit);
    }
    gemm::<R, F, G>(device, OP, routine, [Operand::transposed(dy), Operand::rows(x), Operand::rows(dw)], true)
}

fn weight_dims<R: Runtime, W: FloatElement>(op: &'static str, w: &GpuTensor<R, W>) -> Result<(usize, usize)> {
    match *w.shape() {
        [out_features, in_features] => Ok((out_features, in_features)),
        ref other => Err(Error::InvalidArgument {
            op,
            message: format!("weight must be [out, in], got shape {other:?}"),
        }),
    }
}

/// Checks `x` `[…, in]` against `w` `[out, in]` and that `y` is `[…, out]`.
fn check_linear<R: Runtime, F: FloatElement, W: FloatElement>(
    op: &'static str,
    x: &GpuTensor<R, F>,
    w: &GpuTensor<R, W>,
    y_shape: &[usize],
    y_name: &'static str,
) -> Result<()> {
    let (out_features, in_features) = weight_dims(op, w)?;
    if x.shape().is_empty() {
        return Err(Error::InvalidArgument { op, message: "x must have rank ≥ 1".into() });
    }
    Error::check_shape(op, "x", &[x.last_dim()], &[in_features])?;
    let mut expected = x.shape().to_vec();
    *expected.last_mut().expect("rank checked") = out_features;
    Error::check_shape(op, y_name, y_shape, &expected)
}

/// The routine a product runs when the caller names none: the device's table entry for the
/// product ([`MatmulTable::choose`]) when it names a routine the device offers, else the
/// default: `simple_cmma` where tensor cores are offered for the inputs, `simple_unit`
/// elsewhere.
pub fn choose<R: Runtime>(device: &Device<R>, key: &MatmulKey) -> MatmulRoutine {
    let offered = MatmulRoutine::offered(device, key.dtype);
    let tuned = device.policy().table::<MatmulTable>().and_then(|t| t.choose(key));
    match tuned {
        Some(routine) if offered.contains(&routine) => routine,
        _ => default_routine(&offered),
    }
}

/// `simple_cmma` where the device offers tensor cores for the inputs, else `simple_unit`: the
/// routines this module ran before tables existed, measured on an H100 and on lavapipe.
fn default_routine(offered: &[MatmulRoutine]) -> MatmulRoutine {
    if offered.contains(&MatmulRoutine::SimpleCmma) {
        MatmulRoutine::SimpleCmma
    } else {
        MatmulRoutine::SimpleUnit
    }
}

/// `out = lhs·rhs (+ out)` with `F` inputs and a `G` output, on `routine` or the chosen one.
fn gemm<R: Runtime, F: FloatElement, G: FloatElement>(
    device: &Device<R>,
    op: &'static str,
    routine: Option<MatmulRoutine>,
    [lhs, rhs, out]: [Operand<'_>; 3],
    accumulate: bool,
) -> Result<MatmulRoutine> {
    device.check_dtype::<F>(op)?;
    device.check_dtype::<G>(op)?;
    let key = MatmulKey {
        m: lhs.shape[0],
        n: rhs.shape[1],
        k: lhs.shape[1],
        lhs_transposed: lhs.transposed,
        rhs_transposed: rhs.transposed,
        dtype: F::DTYPE,
        out_dtype: G::DTYPE,
        accumulate,
        tf32: F::DTYPE == DType::F32 && device.policy().allow_tf32,
    };
    let routine = routine.unwrap_or_else(|| choose(device, &key));
    let offered = MatmulRoutine::offered(device, F::DTYPE);
    if !offered.contains(&routine) {
        let why = if device.backend() != dsl::Backend::Cuda {
            "tensor-core routines run on CUDA only"
        } else {
            "f32 products run on tensor cores only with TF32 allowed (--tf32)"
        };
        return Err(Error::Unsupported {
            op,
            message: format!("matmul routine {routine} is not offered for {} inputs here: {why}", F::DTYPE),
        });
    }
    let dtype = F::as_type_native_unchecked().storage_type();
    let out_dtype = G::as_type_native_unchecked().storage_type();
    // f16/bf16 inputs accumulate in f32 inside the kernel.
    let dtypes = MatmulElems::from_globals(&MatmulGlobalElems { lhs: dtype, rhs: dtype, out: out_dtype });
    // A routine the library (or `routines`) cannot fit to this product (tensor-core tiles at
    // k = 1, a multi-stage routine at a k that ends inside a stage, …) falls back to the
    // default, then to `simple_unit`, which takes every product.
    let default = default_routine(&offered);
    let mut ran = routine;
    loop {
        match routines::launch(ran, device, (&lhs, &rhs, &out), accumulate, &dtypes) {
            Ok(()) => break,
            Err(MatmulSetupError::Unavailable(_)) if ran != MatmulRoutine::SimpleUnit => {
                ran = if ran == default { MatmulRoutine::SimpleUnit } else { default };
            }
            Err(e) => return Err(setup_error(op, e)),
        }
    }
    device.check(op)?;
    Ok(ran)
}

fn setup_error(op: &'static str, e: MatmulSetupError) -> Error {
    match e {
        MatmulSetupError::Unavailable(MatmulAvailabilityError::TileSizeNotFound) => Error::Device {
            op,
            message: "no tiling of this product fits in the device's shared memory".to_string(),
        },
        MatmulSetupError::Unavailable(MatmulAvailabilityError::TypesUnavailable { .. }) => {
            Error::Unsupported {
                op,
                message: format!("the device's GEMM cannot use these element types: {e:?}"),
            }
        }
        e => Error::Device { op, message: format!("cubek-matmul refused the product: {e:?}") },
    }
}
