//! RMSNorm (Llama's pre-normalisation), forward and backward.
//!
//! Shapes: `x`, `out`, `dout`, `dx`: `[rows, C]` (any leading dims flatten into rows, e.g.
//! `rows = B·T`); `weight`, `dweight`: `[C]`; `rstd`: `[rows]`, always f32.
//!
//! Forward: `rstd = 1 / sqrt(mean_c(x²) + eps)`, `out = x · rstd · weight`. Saves `rstd`.
//! Backward, with `g = dout · weight`:
//! `dx = rstd · g − x · rstd³ · mean_c(g · x)`  (overwritten, `=`)
//! `dweight += Σ_rows dout · x · rstd`           (accumulated, `+=`; `dweight` may be f32 while
//!                                              the rest is f16/bf16, for f32 gradients)
//!
//! Fused with the residual add (llm.c's `fused_residual_forward`): [`rmsnorm_forward_residual`]
//! first adds `residual` into `x` (`x += residual`, the stream update) and normalises the sum,
//! so the stream is read once for both; [`rmsnorm_backward_accumulate`] adds `dx` into the
//! residual gradient (`dx +=`) instead of overwriting it, folding the backward's residual add
//! in. The forward rounds the sum to the storage type before normalising it, so it gives the
//! unfused pair's bits. The backward rounds the branch gradient to the storage type before
//! adding it: in f16/bf16 that too gives the unfused bits; in f32 (no rounding between them)
//! the compiler may contract the add into the products' multiply-adds, so the sum agrees with
//! the unfused one to a rounding of the sum (seen: 1 ulp on lavapipe).
//!
//! Numerics: whatever the storage type, each element is widened to f32 on load and every sum
//! is f32; results are rounded to the storage type once, on store. (Hugging Face rounds
//! `x · rstd` to the input dtype before multiplying by the weight; in f32 the two agree.)
//!
//! Layout: one cube per row (grid-stride over rows), each unit holding `slots` vectors of the
//! row in registers, so `x` (and `dout`) are read once. The backward's `dweight` is made
//! deterministic by a two-stage sum: each of `G` cubes accumulates its rows' contributions in
//! registers and writes one partial row to a `[G, C]` f32 scratch; a second kernel sums the
//! `G` partials per column in a fixed order and adds them to `dweight`. Same inputs, same bits.

use cubecl::prelude::*;
use dsl::launch::RowLayout;
use dsl::{CubeReduce, Device, Error, FloatElement, GpuTensor, Result, cube_sum};

/// The comptime part of an RMSNorm launch: each distinct value is one compiled kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RmsNormConfig {
    pub layout: RowLayout,
    /// Elements per vector load/store; must divide C.
    pub vector_size: usize,
    /// Reduce with plane operations (else the shared-memory tree).
    pub use_plane: bool,
}

impl RmsNormConfig {
    /// The configuration the launchers use on `device` for rows of `cols` elements of `F`.
    pub fn select<R: Runtime, F: FloatElement>(device: &Device<R>, cols: usize) -> Result<Self> {
        let vector_size = device.vector_size::<F>(cols);
        let layout = RowLayout::for_row(device, "rmsnorm", cols / vector_size)?;
        Ok(Self { layout, vector_size, use_plane: device.info().plane_reduce(layout.units) })
    }

    fn reduce(&self) -> CubeReduce {
        CubeReduce::new(self.layout.units, self.use_plane)
    }

    fn validate<R: Runtime>(&self, device: &Device<R>, op: &'static str, cols: usize) -> Result<()> {
        if self.vector_size == 0
            || !cols.is_multiple_of(self.vector_size)
            || self.vector_size > device.info().max_vector_size
        {
            return Err(Error::Unsupported {
                op,
                message: format!(
                    "vector size {} must divide C = {cols} and be at most {}",
                    self.vector_size,
                    device.info().max_vector_size
                ),
            });
        }
        self.layout.validate(device, op, cols / self.vector_size)
    }
}

#[cube(launch_unchecked)]
fn rmsnorm_forward_kernel<F: Float, N: Size>(
    out: &mut Array<Vector<F, N>>,
    rstd: &mut Array<f32>,
    x: &mut Array<Vector<F, N>>,
    residual: &Array<Vector<F, N>>,
    weight: &Array<Vector<F, N>>,
    rows: u32,
    cols: u32,
    eps: f32,
    #[comptime] cfg: RmsNormConfig,
    #[comptime] add_residual: bool,
) {
    let units = cfg.layout.units as usize;
    let row_vectors = cols as usize / N::value();
    let tid = UNIT_POS as usize;
    let mut xs = Array::<Vector<f32, N>>::new(cfg.layout.slots as usize);

    let mut row = CUBE_POS;
    while row < rows as usize {
        let base = row * row_vectors;
        let mut sum_sq = f32::new(0.0);
        #[unroll]
        for s in 0..cfg.layout.slots {
            let c = tid + s as usize * units;
            if c < row_vectors {
                let mut v = Vector::<f32, N>::cast_from(x[base + c]);
                if comptime!(add_residual) {
                    // Round the sum to F first: the norm sees what the stream stores.
                    let sum = Vector::<F, N>::cast_from(v + Vector::<f32, N>::cast_from(residual[base + c]));
                    x[base + c] = sum;
                    v = Vector::<f32, N>::cast_from(sum);
                }
                xs[s as usize] = v;
                sum_sq += f32::cast_from((v * v).vector_sum());
            }
        }
        let total = cube_sum(sum_sq, cfg.reduce());
        let r = f32::inverse_sqrt(total / f32::cast_from(cols) + eps);
        if tid == 0 {
            rstd[row] = r;
        }
        let rv = Vector::<f32, N>::new(r);
        #[unroll]
        for s in 0..cfg.layout.slots {
            let c = tid + s as usize * units;
            if c < row_vectors {
                let w = Vector::<f32, N>::cast_from(weight[c]);
                out[base + c] = Vector::cast_from(xs[s as usize] * rv * w);
            }
        }
        row += CUBE_COUNT;
    }
}

/// Writes `dx` for its rows and this cube's partial `dweight` row (`partial[CUBE_POS, :]`).
#[cube(launch_unchecked)]
fn rmsnorm_backward_kernel<F: Float, N: Size>(
    dx: &mut Array<Vector<F, N>>,
    dweight_partial: &mut Array<Vector<f32, N>>,
    dout: &Array<Vector<F, N>>,
    x: &Array<Vector<F, N>>,
    weight: &Array<Vector<F, N>>,
    rstd: &Array<f32>,
    rows: u32,
    cols: u32,
    #[comptime] cfg: RmsNormConfig,
    #[comptime] accumulate: bool,
) {
    let units = cfg.layout.units as usize;
    let row_vectors = cols as usize / N::value();
    let tid = UNIT_POS as usize;
    let mut xs = Array::<Vector<f32, N>>::new(cfg.layout.slots as usize);
    let mut gs = Array::<Vector<f32, N>>::new(cfg.layout.slots as usize);
    let mut dw = Array::<Vector<f32, N>>::new(cfg.layout.slots as usize);
    #[unroll]
    for s in 0..cfg.layout.slots {
        dw[s as usize] = Vector::new(f32::new(0.0));
    }

    let mut row = CUBE_POS;
    while row < rows as usize {
        let base = row * row_vectors;
        let r = rstd[row];
        let rv = Vector::<f32, N>::new(r);
        let mut dot = f32::new(0.0);
        #[unroll]
        for s in 0..cfg.layout.slots {
            let c = tid + s as usize * units;
            if c < row_vectors {
                let xv = Vector::<f32, N>::cast_from(x[base + c]);
                let dy = Vector::<f32, N>::cast_from(dout[base + c]);
                let g = dy * Vector::<f32, N>::cast_from(weight[c]);
                xs[s as usize] = xv;
                gs[s as usize] = g;
                dot += f32::cast_from((g * xv).vector_sum());
                dw[s as usize] += dy * xv * rv;
            }
        }
        let total = cube_sum(dot, cfg.reduce());
        let coef = Vector::<f32, N>::new(total / f32::cast_from(cols) * r * r * r);
        #[unroll]
        for s in 0..cfg.layout.slots {
            let c = tid + s as usize * units;
            if c < row_vectors {
                let d = Vector::<F, N>::cast_from(rv * gs[s as usize] - xs[s as usize] * coef);
                if comptime!(accumulate) {
                    // The branch gradient rounded to F, then added: as the unfused pair.
                    let sum = Vector::<f32, N>::cast_from(dx[base + c]) + Vector::<f32, N>::cast_from(d);
                    dx[base + c] = Vector::cast_from(sum);
                } else {
                    dx[base + c] = d;
                }
            }
        }
        row += CUBE_COUNT;
    }

    let partial_base = CUBE_POS * row_vectors;
    #[unroll]
    for s in 0..cfg.layout.slots {
        let c = tid + s as usize * units;
        if c < row_vectors {
            dweight_partial[partial_base + c] = dw[s as usize];
        }
    }
}

/// `dweight[c] += Σ_{g < partial_rows} partial[g, c]`, summed in order `g = 0, 1, …`.
#[cube(launch_unchecked)]
fn dweight_finalize_kernel<F: Float, N: Size>(
    dweight: &mut Array<Vector<F, N>>,
    partial: &Array<Vector<f32, N>>,
    partial_rows: u32,
    cols: u32,
) {
    let row_vectors = cols as usize / N::value();
    let c = ABSOLUTE_POS;
    if c < row_vectors {
        let mut acc = Vector::<f32, N>::new(f32::new(0.0));
        for g in 0..partial_rows {
            acc += partial[g as usize * row_vectors + c];
        }
        dweight[c] = Vector::cast_from(Vector::<f32, N>::cast_from(dweight[c]) + acc);
    }
}

/// Checks shapes shared by forward and backward; returns `(rows, cols)`.
fn check_row_shapes<R: Runtime, F: FloatElement>(
    op: &'static str,
    x: &GpuTensor<R, F>,
    weight: &GpuTensor<R, F>,
    rstd: &GpuTensor<R, f32>,
) -> Result<(usize, usize)> {
    if x.shape().is_empty() {
        return Err(Error::ShapeMismatch { op, tensor: "x", expected: vec![0, 0], actual: vec![] });
    }
    let (rows, cols) = (x.rows(), x.last_dim());
    Error::check_shape(op, "weight", weight.shape(), &[cols])?;
    Error::check_shape(op, "rstd", rstd.shape(), &[rows])?;
    Ok((rows, cols))
}

/// RMSNorm forward with the configuration [`RmsNormConfig::select`] picks for the device.
pub fn rmsnorm_forward<R: Runtime, F: FloatElement>(
    device: &Device<R>,
    out: &mut GpuTensor<R, F>,
    rstd: &mut GpuTensor<R, f32>,
    x: &GpuTensor<R, F>,
    weight: &GpuTensor<R, F>,
    eps: f32,
) -> Result<()> {
    let cfg = RmsNormConfig::select::<R, F>(device, x.last_dim())?;
    rmsnorm_forward_with(device, out, rstd, x, weight, eps, cfg)
}

/// RMSNorm forward with an explicit configuration (tests use it to cover every variant).
pub fn rmsnorm_forward_with<R: Runtime, F: FloatElement>(
    device: &Device<R>,
    out: &mut GpuTensor<R, F>,
    rstd: &mut GpuTensor<R, f32>,
    x: &GpuTensor<R, F>,
    weight: &GpuTensor<R, F>,
    eps: f32,
    cfg: RmsNormConfig,
) -> Result<()> {
    forward_launch(device, "rmsnorm_forward", out, rstd, x, None, weight, eps, cfg)
}

/// The residual add and the RMSNorm after it, in one pass: `x += residual` (rounded to `F`),
/// then `out = rmsnorm(x) · weight` and `rstd` as [`rmsnorm_forward`]. `residual` has `x`'s
/// shape. Same bits as [`crate::residual::residual_add`] followed by [`rmsnorm_forward`].
pub fn rmsnorm_forward_residual<R: Runtime, F: FloatElement>(
    device: &Device<R>,
    out: &mut GpuTensor<R, F>,
    rstd: &mut GpuTensor<R, f32>,
    x: &mut GpuTensor<R, F>,
    residual: &GpuTensor<R, F>,
    weight: &GpuTensor<R, F>,
    eps: f32,
) -> Result<()> {
    const OP: &str = "rmsnorm_forward_residual";
    Error::check_shape(OP, "residual", residual.shape(), x.shape())?;
    let cfg = RmsNormConfig::select::<R, F>(device, x.last_dim())?;
    forward_launch(device, OP, out, rstd, x, Some(residual), weight, eps, cfg)
}

#[allow(clippy::too_many_arguments)]
fn forward_launch<R: Runtime, F: FloatElement>(
    device: &Device<R>,
    op: &'static str,
    out: &mut GpuTensor<R, F>,
    rstd: &mut GpuTensor<R, f32>,
    x: &GpuTensor<R, F>,
    residual: Option<&GpuTensor<R, F>>,
    weight: &GpuTensor<R, F>,
    eps: f32,
    cfg: RmsNormConfig,
) -> Result<()> {
    device.check_dtype::<F>(op)?;
    let (rows, cols) = check_row_shapes(op, x, weight, rstd)?;
    Error::check_shape(op, "out", out.shape(), x.shape())?;
    if rows == 0 || cols == 0 {
        return Ok(());
    }
    cfg.validate(device, op, cols)?;
    // Without a residual the kernel neither reads that binding nor writes `x`; the weight stands
    // in for it (bound twice read-only, which every backend allows; `x` may not be, as wgpu
    // forbids a buffer bound writable and read-only in one dispatch).
    let add_residual = residual.is_some();
    let residual = residual.unwrap_or(weight);
    // SAFETY: every access is guarded: rows by `row < rows`, columns by `c < cols / N`, and
    // `cfg.validate` ensured N divides cols; buffer lengths match the checked shapes.
    unsafe {
        rmsnorm_forward_kernel::launch_unchecked::<F, R>(
            device.client(),
            CubeCount::Static(device.grid_cubes(rows), 1, 1),
            CubeDim::new_1d(cfg.layout.units),
            cfg.vector_size,
            out.as_array_arg(),
            rstd.as_array_arg(),
            x.as_array_arg(),
            residual.as_array_arg(),
            weight.as_array_arg(),
            rows as u32,
            cols as u32,
            eps,
            cfg,
            add_residual,
        );
    }
    Ok(())
}

/// Rows of the `[G, C]` f32 scratch that [`rmsnorm_backward`] wants on this device: enough
/// cubes to fill it (a few per SM), never more than there are rows.
pub fn rmsnorm_backward_scratch_rows<R: Runtime>(device: &Device<R>, rows: usize) -> usize {
    let info = device.info();
    let target = match (info.streaming_multiprocessors, info.cpu_cores) {
        (Some(sms), _) => 4 * sms as usize,
        (None, Some(cores)) => 4 * cores as usize,
        (None, None) => 256,
    };
    rows.clamp(1, target.max(1))
}

/// RMSNorm backward: `dx =`, `dweight +=`. `scratch` is an f32 `[G, C]` buffer (any `G ≥ 1`,
/// see [`rmsnorm_backward_scratch_rows`]); its contents are overwritten.
pub fn rmsnorm_backward<R: Runtime, F: FloatElement, G: FloatElement>(
    device: &Device<R>,
    dx: &mut GpuTensor<R, F>,
    dweight: &mut GpuTensor<R, G>,
    scratch: &mut GpuTensor<R, f32>,
    dout: &GpuTensor<R, F>,
    x: &GpuTensor<R, F>,
    weight: &GpuTensor<R, F>,
    rstd: &GpuTensor<R, f32>,
) -> Result<()> {
    let cfg = RmsNormConfig::select::<R, F>(device, x.last_dim())?;
    rmsnorm_backward_with(device, dx, dweight, scratch, dout, x, weight, rstd, cfg)
}

/// RMSNorm backward that adds into `dx` (`dx +=`, `dweight +=`): the input gradient of a
/// normalised branch added onto the residual stream's gradient, the backward of
/// [`rmsnorm_forward_residual`]. Same bits as [`rmsnorm_backward`] into a scratch tensor followed
/// by [`crate::residual::residual_add`] in f16/bf16; in f32 within a rounding of the sum (see
/// the module notes).
pub fn rmsnorm_backward_accumulate<R: Runtime, F: FloatElement, G: FloatElement>(
    device: &Device<R>,
    dx: &mut GpuTensor<R, F>,
    dweight: &mut GpuTensor<R, G>,
    scratch: &mut GpuTensor<R, f32>,
    dout: &GpuTensor<R, F>,
    x: &GpuTensor<R, F>,
    weight: &GpuTensor<R, F>,
    rstd: &GpuTensor<R, f32>,
) -> Result<()> {
    let cfg = RmsNormConfig::select::<R, F>(device, x.last_dim())?;
    backward_launch(
        device,
        "rmsnorm_backward_accumulate",
        dx,
        dweight,
        scratch,
        dout,
        x,
        weight,
        rstd,
        cfg,
        true,
    )
}

/// RMSNorm backward with an explicit configuration; `accumulate` as
/// [`rmsnorm_backward_accumulate`].
pub fn rmsnorm_backward_with<R: Runtime, F: FloatElement, G: FloatElement>(
    device: &Device<R>,
    dx: &mut GpuTensor<R, F>,
    dweight: &mut GpuTensor<R, G>,
    scratch: &mut GpuTensor<R, f32>,
    dout: &GpuTensor<R, F>,
    x: &GpuTensor<R, F>,
    weight: &GpuTensor<R, F>,
    rstd: &GpuTensor<R, f32>,
    cfg: RmsNormConfig,
) -> Result<()> {
    backward_launch(device, "rmsnorm_backward", dx, dweight, scratch, dout, x, weight, rstd, cfg, false)
}

#[allow(clippy::too_many_arguments)]
fn backward_launch<R: Runtime, F: FloatElement, G: FloatElement>(
    device: &Device<R>,
    op: &'static str,
    dx: &mut GpuTensor<R, F>,
    dweight: &mut GpuTensor<R, G>,
    scratch: &mut GpuTensor<R, f32>,
    dout: &GpuTensor<R, F>,
    x: &GpuTensor<R, F>,
    weight: &GpuTensor<R, F>,
    rstd: &GpuTensor<R, f32>,
    cfg: RmsNormConfig,
    accumulate: bool,
) -> Result<()> {
    device.check_dtype::<F>(op)?;
    device.check_dtype::<G>(op)?;
    let (rows, cols) = check_row_shapes(op, x, weight, rstd)?;
    Error::check_shape(op, "dout", dout.shape(), x.shape())?;
    Error::check_shape(op, "dx", dx.shape(), x.shape())?;
    Error::check_shape(op, "dweight", dweight.shape(), &[cols])?;
    if scratch.shape().len() != 2 || scratch.shape()[1] != cols || scratch.shape()[0] == 0 {
        return Err(Error::ShapeMismatch {
            op,
            tensor: "scratch",
            expected: vec![rmsnorm_backward_scratch_rows(device, rows), cols],
            actual: scratch.shape().to_vec(),
        });
    }
    if rows == 0 || cols == 0 {
        return Ok(());
    }
    cfg.validate(device, op, cols)?;
    // Each cube owns one partial row, so there are exactly as many cubes as partial rows used.
    let cubes = scratch.shape()[0].min(rows).min(device.info().max_cube_count_x as usize);
    let row_vectors = cols / cfg.vector_size;
    // SAFETY: rows are guarded by `row < rows`, columns by `c < cols / N` (N divides cols, by
    // `validate`); partial rows written are `CUBE_POS < cubes ≤ scratch rows`.
    unsafe {
        rmsnorm_backward_kernel::launch_unchecked::<F, R>(
            device.client(),
            CubeCount::Static(cubes as u32, 1, 1),
            CubeDim::new_1d(cfg.layout.units),
            cfg.vector_size,
            dx.as_array_arg(),
            scratch.as_array_arg(),
            dout.as_array_arg(),
            x.as_array_arg(),
            weight.as_array_arg(),
            rstd.as_array_arg(),
            rows as u32,
            cols as u32,
            cfg,
            accumulate,
        );
    }
    let units = dsl::ELEMENTWISE_UNITS;
    // SAFETY: `c < cols / N` guards dweight; partial reads stay below `cubes · cols / N`.
    unsafe {
        dweight_finalize_kernel::launch_unchecked::<G, R>(
            device.client(),
            CubeCount::Static(row_vectors.div_ceil(units as usize) as u32, 1, 1),
            CubeDim::new_1d(units),
            cfg.vector_size,
            dweight.as_array_arg(),
            scratch.as_array_arg(),
            cubes as u32,
            cols as u32,
        );
    }
    Ok(())
}
