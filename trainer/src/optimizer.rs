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

use crate::error::Result;
use crate::precision::WriteRounding;
use cubecl::Runtime;
use dsl::rounding::RoundingKey;
use dsl::{Device, FloatElement, GpuTensor};
use kernels::adamw::{AdamW, Rounding, adamw_step, adamw_step_master};
use kernels::grad_norm::{grad_norm_scratch_len, grad_norm_unscaled};
use model::{ParamSpec, Params};

/// Optimizer state: the two f32 moments of every parameter, the f32 master weights when the
/// compute type is narrower, and the step count.
pub struct Optimizer<R: Runtime> {
    pub hp: AdamW,
    pub grad_clip: f64,
    /// AdamW steps taken (the next is `step + 1`, as AdamW counts from 1). Steps skipped on a
    /// loss-scale overflow are not counted.
    pub step: u64,
    m: Vec<GpuTensor<R, f32>>,
    v: Vec<GpuTensor<R, f32>>,
    /// The f32 weights AdamW updates, when kept (see [`Self::keep_master`]).
    master: Option<Vec<GpuTensor<R, f32>>>,
    rounding: WriteRounding,
    /// Seeds the stochastic-rounding streams, with the step and the tensor's index.
    seed: u64,
    decay: Vec<bool>,
    norm: GpuTensor<R, f32>,
    clip_scale: GpuTensor<R, f32>,
    scratch: GpuTensor<R, f32>,
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
        let zeros =
            || specs.iter().map(|s| GpuTensor::zeros(device, &s.shape)).collect::<dsl::Result<Vec<_>>>();
        let numels: Vec<usize> = specs.iter().map(|s| s.numel()).collect();
        Ok(Self {
            hp,
            grad_clip,
            step: 0,
            m: zeros()?,
            v: zeros()?,
            master: None,
            rounding,
            seed,
            decay: specs.iter().map(decays).collect(),
            norm: GpuTensor::zeros(device, &[1])?,
            clip_scale: GpuTensor::zeros(device, &[1])?,
            scratch: GpuTensor::zeros(device, &[grad_norm_scratch_len(&numels)])?,
        })
    }

    /// Keeps an f32 master copy of the weights, starting from `values` (f32, one vector per
    /// parameter in spec order, shapes as the moments'). AdamW then updates it and writes the
    /// compute copy from it.
    pub fn keep_master(&mut self, device: &Device<R>, values: &[Vec<f32>]) -> Result<()> {
        let master = self
            .m
            .iter()
            .zip(values)
            .map(|(m, values)| GpuTensor::from_slice(device, values, m.shape()))
            .collect::<dsl::Result<Vec<_>>>()?;
        self.master = Some(master);
        Ok(())
    }

    /// The f32 master weights on the host, if kept.
    pub fn master_to_host(&self, device: &Device<R>) -> Result<Option<Vec<Vec<f32>>>> {
        match &self.master {
            Some(master) => Ok(Some(master.iter().map(|t| t.to_vec(device)).collect::<dsl::Result<_>>()?)),
            None => Ok(None),
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

    /// Applies one AdamW step at learning rate `lr` with the clip scale of the last
    /// [`Self::clip`].
    pub fn apply<F: FloatElement>(
        &mut self,
        device: &Device<R>,
        params: &mut Params<R, F>,
        grads: &Params<R, f32>,
        lr: f64,
    ) -> Result<()> {
        self.step += 1;
        for (i, (param, grad)) in params.tensors_mut().iter_mut().zip(grads.tensors()).enumerate() {
            let hp =
                AdamW { lr, weight_decay: if self.decay[i] { self.hp.weight_decay } else { 0.0 }, ..self.hp };
            let (m, v) = (&mut self.m[i], &mut self.v[i]);
            match &mut self.master {
                Some(master) => adamw_step_master(
                    device,
                    &mut master[i],
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

    /// Moments on the host, `(m, v)` per parameter.
    pub fn moments_to_host(&self, device: &Device<R>) -> Result<Vec<(Vec<f32>, Vec<f32>)>> {
        self.m.iter().zip(&self.v).map(|(m, v)| Ok((m.to_vec(device)?, v.to_vec(device)?))).collect()
    }

    /// Restores moments saved by [`Self::moments_to_host`].
    pub fn load_moments(&mut self, device: &Device<R>, moments: &[(Vec<f32>, Vec<f32>)]) -> Result<()> {
        for (i, (m, v)) in moments.iter().enumerate() {
            let shape = self.m[i].shape().to_vec();
            self.m[i] = GpuTensor::from_slice(device, m, &shape)?;
            self.v[i] = GpuTensor::from_slice(device, v, &shape)?;
        }
        Ok(())
    }
}
