//! Fused softmax cross-entropy: loss and its gradient with respect to the logits in one pass.
//!
//! Shapes: `logits`: `[N, V]`; targets: `[N]` (N = B·T) with `-100` meaning "no
//! loss here" (prompt tokens in SFT, padding); `row_loss`: `[N]` f32; `loss`: `[1]` f32.
//! Forward: `loss = (1/M) Σ_{n: target ≠ −100} (log Σ_v e^{logits[n,v]} − logits[n, target])`,
//! M = number of counted rows (or the denominator the caller set, see
//! [`Targets::with_denominator`]); `row_loss[n]` is row n's term (0 for ignored rows).
//! Backward, written in the same pass over the logits themselves (in place, as llm.c does: the
//! logits are dead once their gradient exists, and `[N, V]` is a training step's largest
//! activation): `dlogits[n] = (softmax(logits[n]) − onehot(target))/M` for counted rows, 0 for
//! ignored ones (it is the gradient of the mean loss, so it already carries the 1/M). With M = 0
//! the loss and the gradient are 0, not NaN.
//!
//! Row blocks: [`cross_entropy_rows_forward_backward`] and [`cross_entropy_rows_forward`] do the
//! per-row part for a block of rows (with [`Targets::rows`]), and [`cross_entropy_mean`] the
//! mean once every block's `row_loss` is written: the chunked lm_head + cross-entropy
//! (`model::Llama::loss_backward`) never holds more than a block's logits.
//!
//! Numerics: max-subtracted (online softmax: one running max and rescaled sum per unit), f32
//! accumulation. One cube per row: it reads the row twice (statistics, then gradient) and
//! writes it once. The mean over rows is a second, single-cube kernel that sums `row_loss` in
//! a fixed order: the loss is bit-identical run to run.

use cubecl::prelude::*;
use dsl::launch::cube_units;
use dsl::{
    CubeReduce, Device, Error, FloatElement, GpuTensor, Result, cube_max_sumexp, cube_sum,
    online_softmax_update,
};

/// The target value that excludes a position from the loss (PyTorch's `ignore_index`).
pub const IGNORE_INDEX: i32 = -100;

/// Targets checked against a vocabulary on upload, with the count of counted positions.
#[derive(Clone)]
pub struct Targets<R: Runtime> {
    /// `[N]`, each in `0..vocab_size` or [`IGNORE_INDEX`].
    pub targets: GpuTensor<R, i32>,
    counted: usize,
    /// What the summed loss is divided by: `counted` unless [`Targets::with_denominator`] set it.
    denominator: usize,
    /// What the gradient (not the loss) is multiplied by: 1 unless [`Targets::with_loss_scale`].
    loss_scale: f32,
    vocab_size: usize,
}

impl<R: Runtime> Targets<R> {
    pub fn upload(device: &Device<R>, targets: &[i32], vocab_size: usize) -> Result<Self> {
        let bad = targets
            .iter()
            .enumerate()
            .find(|&(_, &t)| t != IGNORE_INDEX && (t < 0 || t as usize >= vocab_size));
        if let Some((position, &t)) = bad {
            return Err(Error::OutOfVocabulary {
                op: "targets",
                what: "target",
                position,
                value: t as i64,
                vocab_size,
                allowed: " (allowed: 0..vocab_size, or -100 to ignore the position)",
            });
        }
        let counted = targets.iter().filter(|&&t| t != IGNORE_INDEX).count();
        Ok(Self {
            targets: GpuTensor::from_slice(device, targets, &[targets.len()])?,
            counted,
            denominator: counted,
            loss_scale: 1.0,
            vocab_size,
        })
    }

    /// Divides the summed loss (and its gradient) by `denominator` instead of this batch's own
    /// count: with the count of a whole accumulated step, the micro-batches' losses and gradients
    /// add up to the mean over every counted position of the step, however the counted positions
    /// fall across micro-batches (SFT masks a different number in each).
    pub fn with_denominator(mut self, denominator: usize) -> Self {
        self.denominator = denominator;
        self
    }

    /// Multiplies `dlogits` (so every gradient after it) by `scale`, leaving the loss as it is:
    /// f16 loss scaling (torch's `GradScaler`), which keeps small gradients above f16's
    /// underflow. The optimizer divides it out before clipping.
    pub fn with_loss_scale(mut self, scale: f32) -> Self {
        self.loss_scale = scale;
        self
    }

    /// Rows `start .. start + count` (a view, no copy) with the same denominator and loss
    /// scale, so blocks of rows add up to the whole batch's loss and gradient. `counted` is
    /// left as the whole batch's (the host does not know which rows a block counts).
    /// Errors as [`GpuTensor::rows_view`] (the start must be a multiple of 64 rows: 256 bytes).
    pub fn rows(&self, start: usize, count: usize) -> Result<Self> {
        let column = self.targets.reshape(&[self.len(), 1])?;
        Ok(Self { targets: column.rows_view(start, count)?.reshape(&[count])?, ..self.clone() })
    }

    /// Positions that count towards the loss (target ≠ −100).
    pub fn counted(&self) -> usize {
        self.counted
    }

    pub fn len(&self) -> usize {
        self.targets.numel()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }
}

/// Comptime part of a launch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CrossEntropyConfig {
    pub units: u32,
    pub vector_size: usize,
    pub use_plane: bool,
    /// Whether to write `dlogits` (training) or only the loss (evaluation).
    pub write_grad: bool,
}

impl CrossEntropyConfig {
    pub fn select<R: Runtime, F: FloatElement>(device: &Device<R>, vocab: usize, write_grad: bool) -> Self {
        let vector_size = device.vector_size::<F>(vocab);
        // The row is streamed, not held in registers: about 4 vectors per unit per pass, in a
        // cube of 32 to 1024 units.
        let wanted = (vocab / vector_size).div_ceil(4).next_power_of_two().clamp(32, 1024) as u32;
        let units = cube_units(device, wanted);
        Self { units, vector_size, use_plane: device.info().plane_reduce(units), write_grad }
    }

    fn reduce(&self) -> CubeReduce {
        CubeReduce::new(self.units, self.use_plane)
    }
}

#[cube(launch_unchecked)]
fn cross_entropy_kernel<F: Float, N: Size>(
    row_loss: &mut Array<f32>,
    logits: &mut Array<Vector<F, N>>,
    targets: &Array<i32>,
    rows: u32,
    vocab: u32,
    grad_scale: f32,
    #[comptime] cfg: CrossEntropyConfig,
) {
    let row_vectors = vocab as usize / N::value();
    let units = CUBE_DIM as usize;
    let mut row = CUBE_POS;
    while row < rows as usize {
        let base = row * row_vectors;
        let target = targets[row];
        let counted = target >= 0;
        let mut m = f32::min_value();
        let mut s = f32::new(0.0);
        let mut c = UNIT_POS as usize;
        while c < row_vectors {
            let (nm, ns) = online_softmax_update::<N>(m, s, Vector::<f32, N>::cast_from(logits[base + c]));
            m = nm;
            s = ns;
            c += units;
        }
        // Read before the reduction (a barrier): after it, other units overwrite the row.
        let mut target_logit = f32::new(0.0);
        if UNIT_POS == 0 && counted {
            let t = target as usize;
            target_logit = f32::cast_from(logits[base + t / N::value()][t % N::value()]);
        }
        let (max, sum) = cube_max_sumexp(m, s, cfg.reduce());
        if UNIT_POS == 0 {
            let mut loss = f32::new(0.0);
            if counted {
                loss = f32::ln(sum) + max - target_logit;
            }
            row_loss[row] = loss;
        }
        if comptime!(cfg.write_grad) {
            // In place: every unit has read its share of the row for the statistics above,
            // and the cube reduction is a barrier, so no statistic reads an overwritten value;
            // each element below is read, then written, by the same unit.
            // Ignored rows get scale 0 (and no one-hot): their gradient is exactly 0.
            let scale = select(counted, grad_scale, f32::new(0.0));
            let target_index = select(counted, target as u32, u32::MAX);
            let inv_sum = f32::new(1.0) / sum;
            let mut c = UNIT_POS as usize;
            while c < row_vectors {
                let v = Vector::<f32, N>::cast_from(logits[base + c]);
                let mut p = Vector::exp(v - Vector::new(max)) * Vector::new(inv_sum);
                #[unroll]
                for k in 0..N::value() {
                    p[k] -= f32::cast_from((c * N::value() + k) as u32 == target_index);
                }
                logits[base + c] = Vector::cast_from(p * Vector::new(scale));
                c += units;
            }
        }
        row += CUBE_COUNT;
    }
}

/// `loss[0] = scale · Σ row_loss` summed in a fixed order by one cube.
#[cube(launch_unchecked)]
fn mean_loss_kernel(
    loss: &mut Array<f32>,
    row_loss: &Array<f32>,
    rows: u32,
    scale: f32,
    #[comptime] cfg: CubeReduce,
) {
    let mut acc = f32::new(0.0);
    let mut i = UNIT_POS as usize;
    while i < rows as usize {
        acc += row_loss[i];
        i += CUBE_DIM as usize;
    }
    let total = cube_sum(acc, cfg);
    if UNIT_POS == 0 {
        loss[0] = total * scale;
    }
}

fn check_shapes<R: Runtime, F: FloatElement>(
    op: &'static str,
    logits: &GpuTensor<R, F>,
    targets: &Targets<R>,
    row_loss: &GpuTensor<R, f32>,
) -> Result<(usize, usize)> {
    let &[rows, vocab] = logits.shape() else {
        return Err(Error::InvalidArgument {
            op,
            message: format!("logits must be [N, V], got shape {:?}", logits.shape()),
        });
    };
    Error::check_shape(op, "targets", targets.targets.shape(), &[rows])?;
    if targets.vocab_size != vocab {
        return Err(Error::InvalidArgument {
            op,
            message: format!(
                "targets were checked against a vocabulary of {}, but logits have {vocab} columns",
                targets.vocab_size
            ),
        });
    }
    Error::check_shape(op, "row_loss", row_loss.shape(), &[rows])?;
    Ok((rows, vocab))
}

/// 1/denominator (0 when nothing counts), the factor the loss is multiplied by.
fn loss_factor<R: Runtime>(targets: &Targets<R>) -> f32 {
    if targets.denominator == 0 { 0.0 } else { 1.0 / targets.denominator as f32 }
}

fn rows_launch<R: Runtime, F: FloatElement>(
    device: &Device<R>,
    op: &'static str,
    row_loss: &mut GpuTensor<R, f32>,
    logits: &GpuTensor<R, F>,
    targets: &Targets<R>,
    write_grad: bool,
) -> Result<()> {
    device.check_dtype::<F>(op)?;
    let (rows, vocab) = check_shapes(op, logits, targets, row_loss)?;
    let cfg = CrossEntropyConfig::select::<R, F>(device, vocab.max(1), write_grad);
    // 1/denominator, then the loss scale: with scale 1 exactly the unscaled gradient.
    let grad_scale = loss_factor(targets) * targets.loss_scale;
    if rows > 0 && vocab > 0 {
        // SAFETY: rows are guarded by `row < rows`, columns by `c < V/vec` (vec divides V);
        // the target read is at t < V (validated on upload, ignored rows skip it).
        unsafe {
            cross_entropy_kernel::launch_unchecked::<F, R>(
                device.client(),
                CubeCount::Static(device.grid_cubes(rows), 1, 1),
                CubeDim::new_1d(cfg.units),
                cfg.vector_size,
                row_loss.as_array_arg(),
                logits.as_array_arg(),
                targets.targets.as_array_arg(),
                rows as u32,
                vocab as u32,
                grad_scale,
                cfg,
            );
        }
    }
    Ok(())
}

/// `loss[0] = Σ row_loss / denominator`, summed in a fixed order (bit-identical run to run).
/// `row_loss` `[N]` holds every row's term, `targets` gives the denominator (a view from
/// [`Targets::rows`] gives the whole batch's).
pub fn cross_entropy_mean<R: Runtime>(
    device: &Device<R>,
    loss: &mut GpuTensor<R, f32>,
    row_loss: &GpuTensor<R, f32>,
    targets: &Targets<R>,
) -> Result<()> {
    const OP: &str = "cross_entropy_mean";
    Error::check_shape(OP, "loss", loss.shape(), &[1])?;
    if row_loss.shape().len() != 1 {
        return Err(Error::InvalidArgument {
            op: OP,
            message: format!("row_loss must be [N], got shape {:?}", row_loss.shape()),
        });
    }
    let rows = row_loss.numel();
    let units = cube_units(device, 256);
    // SAFETY: reads are guarded by `i < rows`; loss has one element, written by unit 0.
    unsafe {
        mean_loss_kernel::launch_unchecked::<R>(
            device.client(),
            CubeCount::Static(1, 1, 1),
            CubeDim::new_1d(units),
            loss.as_array_arg(),
            row_loss.as_array_arg(),
            rows as u32,
            loss_factor(targets),
            CubeReduce::new(units, device.info().plane_reduce(units)),
        );
    }
    Ok(())
}

/// Training: `row_loss =` each row's term, `loss =` their mean over counted rows, and the
/// logits overwritten by their gradient (`dlogits`, in place).
pub fn cross_entropy_forward_backward<R: Runtime, F: FloatElement>(
    device: &Device<R>,
    loss: &mut GpuTensor<R, f32>,
    row_loss: &mut GpuTensor<R, f32>,
    logits: &mut GpuTensor<R, F>,
    targets: &Targets<R>,
) -> Result<()> {
    cross_entropy_rows_forward_backward(device, row_loss, logits, targets)?;
    cross_entropy_mean(device, loss, row_loss, targets)
}

/// Evaluation: `loss` and `row_loss` only; the logits are left as they are.
pub fn cross_entropy_forward<R: Runtime, F: FloatElement>(
    device: &Device<R>,
    loss: &mut GpuTensor<R, f32>,
    row_loss: &mut GpuTensor<R, f32>,
    logits: &GpuTensor<R, F>,
    targets: &Targets<R>,
) -> Result<()> {
    cross_entropy_rows_forward(device, row_loss, logits, targets)?;
    cross_entropy_mean(device, loss, row_loss, targets)
}

/// The per-row part of [`cross_entropy_forward_backward`] for a block of rows (`logits`
/// `[rows, V]`, `row_loss` `[rows]`, `targets` from [`Targets::rows`]): `row_loss =` the rows'
/// terms (not yet divided), logits overwritten by their gradient (already divided by the whole
/// batch's denominator and multiplied by the loss scale).
pub fn cross_entropy_rows_forward_backward<R: Runtime, F: FloatElement>(
    device: &Device<R>,
    row_loss: &mut GpuTensor<R, f32>,
    logits: &mut GpuTensor<R, F>,
    targets: &Targets<R>,
) -> Result<()> {
    rows_launch(device, "cross_entropy_forward_backward", row_loss, logits, targets, true)
}

/// The per-row part of [`cross_entropy_forward`] for a block of rows.
pub fn cross_entropy_rows_forward<R: Runtime, F: FloatElement>(
    device: &Device<R>,
    row_loss: &mut GpuTensor<R, f32>,
    logits: &GpuTensor<R, F>,
    targets: &Targets<R>,
) -> Result<()> {
    // The kernel binds the logits writable but writes them only with `write_grad`.
    rows_launch(device, "cross_entropy_forward", row_loss, logits, targets, false)
}
