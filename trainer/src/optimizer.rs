//! AdamW over all parameters, with Llama 2's weight-decay groups, global-norm clipping, and the
//! mixed-precision policy of [`crate::precision`].
//!
//! Weight decay applies to every parameter with two or more dimensions (embeddings, every
//! projection, lm_head) and not to the RMSNorm gains. The gradients are f32 (the trainer sums
//! them in f32 whatever the compute type). Before each step [`Optimizer::clip`] computes their
//! global L2 norm on the device, and the clip scale `min(1, clip / (norm + 1e-6))` (times
//! 1/loss-scale) is fed to the AdamW kernel without a trip to the host; [`Optimizer::apply`]
//! then updates either the f32 master copy (writing the compute copy from it in the same pass)
//! or the parameters themselves.
//!
//! Under ZeRO-1 ([`Optimizer::sharded`]) a rank keeps moments and master weights only for the
//! parameters it owns (see `collectives::owners`), updates only those, and the trainer
//! broadcasts the updated weights from their owners. The gradient norm is then computed in two
//! steps, [`Optimizer::sum_squares`] over the owned gradients and, after the ranks all-reduce
//! those sums, [`Optimizer::clip_from_sum_squares`].

use crate::error::Result;
use crate::precision::WriteRounding;
use cubecl::Runtime;
use dsl::rounding::RoundingKey;
use dsl::{Device, FloatElement, GpuTensor};
use kernels::adamw::{AdamW, Rounding, adamw_step, adamw_step_master};
use kernels::grad_norm::{
    grad_norm_from_sum_squares, grad_norm_scratch_len, grad_norm_unscaled, grad_sum_squares,
};
use model::{ParamSpec, Params};

/// Optimizer state: the two f32 moments of every owned parameter (all of them unless sharded),
/// the f32 master weights when the compute type is narrower, and the step count.
pub struct Optimizer<R: Runtime> {
    pub hp: AdamW,
    pub grad_clip: f64,
    /// AdamW steps taken (the next is `step + 1`, as AdamW counts from 1). Steps skipped on a
    /// loss-scale overflow are not counted.
    pub step: u64,
    /// Per parameter, `None` where another rank owns it.
    m: Vec<Option<GpuTensor<R, f32>>>,
    v: Vec<Option<GpuTensor<R, f32>>>,
    /// The f32 weights AdamW updates, when kept (see [`Self::keep_master`]); `None` entries as
    /// for the moments.
    master: Option<Vec<Option<GpuTensor<R, f32>>>>,
    shapes: Vec<Vec<usize>>,
    rounding: WriteRounding,
    /// Seeds the stochastic-rounding streams, with the step and the tensor's index.
    seed: u64,
    decay: Vec<bool>,
    norm: GpuTensor<R, f32>,
    clip_scale: GpuTensor<R, f32>,
    scratch: GpuTensor<R, f32>,
    /// This rank's share of Σg² under sharding (see [`Self::sum_squares`]).
    sum_squares: GpuTensor<R, f32>,
}

/// Whether Llama 2's recipe decays this parameter (matrices yes, RMSNorm gains no).
pub fn decays(spec: &ParamSpec) -> bool {
    spec.shape.len() >= 2
}

impl<R: Runtime> Optimizer<R> {
    /// Zero moments for parameters of these shapes, no master copy, parameters written with
    /// `rounding` (stochastic rounding seeded by `seed`).
    pub fn new(
        device: &Device<R>,
        specs: &[ParamSpec],
        hp: AdamW,
        grad_clip: f64,
        rounding: WriteRounding,
        seed: u64,
    ) -> Result<Self> {
        Self::sharded(device, specs, hp, grad_clip, rounding, seed, &vec![true; specs.len()])
    }

    /// [`Self::new`] keeping state only for the parameters whose `owned` entry is true (ZeRO-1).
    pub fn sharded(
        device: &Device<R>,
        specs: &[ParamSpec],
        hp: AdamW,
        grad_clip: f64,
        rounding: WriteRounding,
        seed: u64,
        owned: &[bool],
    ) -> Result<Self> {
        assert_eq!(owned.len(), specs.len(), "Optimizer: one owned flag per parameter");
        let zeros = || {
            specs
                .iter()
                .zip(owned)
                .map(|(s, &own)| own.then(|| GpuTensor::zeros(device, &s.shape)).transpose())
                .collect::<dsl::Result<Vec<_>>>()
        };
        let numels: Vec<usize> = specs.iter().map(|s| s.numel()).collect();
        Ok(Self {
            hp,
            grad_clip,
            step: 0,
            m: zeros()?,
            v: zeros()?,
            master: None,
            shapes: specs.iter().map(|s| s.shape.clone()).collect(),
            rounding,
            seed,
            decay: specs.iter().map(decays).collect(),
            norm: GpuTensor::zeros(device, &[1])?,
            clip_scale: GpuTensor::zeros(device, &[1])?,
            scratch: GpuTensor::zeros(device, &[grad_norm_scratch_len(&numels)])?,
            sum_squares: GpuTensor::zeros(device, &[1])?,
        })
    }

    /// Whether this rank keeps the state of parameter `index` (always, unless sharded).
    pub fn owns(&self, index: usize) -> bool {
        self.m[index].is_some()
    }

    /// Keeps an f32 master copy of the weights, starting from `values` (f32, one vector per
    /// parameter in spec order, shapes as the moments'; only owned ones are kept). AdamW then
    /// updates it and writes the compute copy from it.
    pub fn keep_master(&mut self, device: &Device<R>, values: &[Vec<f32>]) -> Result<()> {
        let master = (0..self.m.len())
            .map(|i| {
                self.owns(i).then(|| GpuTensor::from_slice(device, &values[i], &self.shapes[i])).transpose()
            })
            .collect::<dsl::Result<Vec<_>>>()?;
        self.master = Some(master);
        Ok(())
    }

    /// The f32 master weights on the host, if kept. Unsharded only (a sharded rank holds a
    /// part: see [`Self::state_tensor`]).
    pub fn master_to_host(&self, device: &Device<R>) -> Result<Option<Vec<Vec<f32>>>> {
        match &self.master {
            Some(master) => {
                Ok(Some(master.iter().map(|t| owned(t).to_vec(device)).collect::<dsl::Result<_>>()?))
            }
            None => Ok(None),
        }
    }

    /// Parameter `index`'s state tensor `which` (`m`, `v` or `master`) when this rank owns it.
    pub fn state_tensor(&mut self, which: StateTensor, index: usize) -> Option<&mut GpuTensor<R, f32>> {
        match which {
            StateTensor::M => self.m[index].as_mut(),
            StateTensor::V => self.v[index].as_mut(),
            StateTensor::Master => self.master.as_mut().and_then(|m| m[index].as_mut()),
        }
    }

    pub fn has_master(&self) -> bool {
        self.master.is_some()
    }

    /// Computes the global norm of `grads` (which hold `1/unscale` times the gradient) and the
    /// clip scale AdamW will apply, on the device; [`Self::last_grad_norm`] reads the norm.
    pub fn clip(&mut self, device: &Device<R>, grads: &Params<R, f32>, unscale: f32) -> Result<()> {
        let refs: Vec<&GpuTensor<R, f32>> = grads.tensors().iter().collect();
        grad_norm_unscaled(
            device,
            &mut self.norm,
            &mut self.clip_scale,
            &mut self.scratch,
            &refs,
            self.grad_clip as f32,
            unscale,
        )?;
        Ok(())
    }

    /// This rank's share of a sharded norm: Σg² over the gradients whose `include` entry is
    /// true, on the device (`[1]`). Every gradient must be included by exactly one rank;
    /// all-reduce the shares across ranks, then [`Self::clip_from_sum_squares`].
    pub fn sum_squares(
        &mut self,
        device: &Device<R>,
        grads: &Params<R, f32>,
        include: &[bool],
    ) -> Result<&mut GpuTensor<R, f32>> {
        let refs: Vec<&GpuTensor<R, f32>> =
            grads.tensors().iter().zip(include).filter(|(_, inc)| **inc).map(|(g, _)| g).collect();
        grad_sum_squares(device, &mut self.sum_squares, &mut self.scratch, &refs)?;
        Ok(&mut self.sum_squares)
    }

    /// The norm and clip scale from the all-reduced [`Self::sum_squares`] (which hold `1/unscale`
    /// times the gradient's), as [`Self::clip`] computes them from the whole gradient.
    pub fn clip_from_sum_squares(&mut self, device: &Device<R>, unscale: f32) -> Result<()> {
        grad_norm_from_sum_squares(
            device,
            &mut self.norm,
            &mut self.clip_scale,
            &self.sum_squares,
            self.grad_clip as f32,
            unscale,
        )?;
        Ok(())
    }

    /// Applies one AdamW step at learning rate `lr` with the clip scale of the last
    /// [`Self::clip`], to the parameters this rank owns (all, unless sharded).
    pub fn apply<F: FloatElement>(
        &mut self,
        device: &Device<R>,
        params: &mut Params<R, F>,
        grads: &Params<R, f32>,
        lr: f64,
    ) -> Result<()> {
        self.step += 1;
        for (i, (param, grad)) in params.tensors_mut().iter_mut().zip(grads.tensors()).enumerate() {
            if !self.owns(i) {
                continue;
            }
            let hp =
                AdamW { lr, weight_decay: if self.decay[i] { self.hp.weight_decay } else { 0.0 }, ..self.hp };
            let (m, v) = (owned_mut(&mut self.m[i]), owned_mut(&mut self.v[i]));
            match &mut self.master {
                Some(master) => adamw_step_master(
                    device,
                    owned_mut(&mut master[i]),
                    param,
                    m,
                    v,
                    grad,
                    &self.clip_scale,
                    &hp,
                    self.step,
                )?,
                None => {
                    let rounding = match self.rounding {
                        WriteRounding::Nearest => Rounding::Nearest,
                        WriteRounding::Stochastic => {
                            Rounding::Stochastic(RoundingKey::new(self.seed, self.step, i as u64))
                        }
                    };
                    adamw_step(device, param, m, v, grad, &self.clip_scale, &hp, self.step, rounding)?
                }
            }
        }
        Ok(())
    }

    /// Clips and applies one step (no loss scaling); returns nothing until
    /// [`Self::last_grad_norm`] reads the norm (so the host need not wait).
    pub fn step<F: FloatElement>(
        &mut self,
        device: &Device<R>,
        params: &mut Params<R, F>,
        grads: &Params<R, f32>,
        lr: f64,
    ) -> Result<()> {
        self.clip(device, grads, 1.0)?;
        self.apply(device, params, grads, lr)
    }

    /// The device tensor `[1]` holding the global gradient norm of the last [`Self::clip`].
    pub fn grad_norm(&self) -> &GpuTensor<R, f32> {
        &self.norm
    }

    /// The global gradient norm (unscaled, before clipping) of the last [`Self::clip`].
    pub fn last_grad_norm(&self, device: &Device<R>) -> Result<f32> {
        Ok(self.norm.to_vec(device)?[0])
    }

    /// Moments on the host, `(m, v)` per parameter. Unsharded only (see
    /// [`Self::state_tensor`]).
    pub fn moments_to_host(&self, device: &Device<R>) -> Result<Vec<(Vec<f32>, Vec<f32>)>> {
        self.m
            .iter()
            .zip(&self.v)
            .map(|(m, v)| Ok((owned(m).to_vec(device)?, owned(v).to_vec(device)?)))
            .collect()
    }

    /// Restores moments saved by [`Self::moments_to_host`] (those of owned parameters).
    pub fn load_moments(&mut self, device: &Device<R>, moments: &[(Vec<f32>, Vec<f32>)]) -> Result<()> {
        for (i, (m, v)) in moments.iter().enumerate() {
            if self.owns(i) {
                self.m[i] = Some(GpuTensor::from_slice(device, m, &self.shapes[i])?);
                self.v[i] = Some(GpuTensor::from_slice(device, v, &self.shapes[i])?);
            }
        }
        Ok(())
    }
}

/// The state tensors of one parameter (see [`Optimizer::state_tensor`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StateTensor {
    M,
    V,
    Master,
}

/// A state tensor the caller knows this rank owns (an unsharded optimizer owns all).
fn owned<T>(tensor: &Option<T>) -> &T {
    tensor
        .as_ref()
        .expect("optimizer state of a parameter another rank owns (a sharded optimizer is read per owner)")
}

fn owned_mut<T>(tensor: &mut Option<T>) -> &mut T {
    tensor.as_mut().expect("optimizer state of a parameter this rank owns")
}
