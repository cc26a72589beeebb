//! AdamW over all parameters, with Llama 2's weight-decay groups and global-norm clipping.
//!
//! Weight decay applies to every parameter with two or more dimensions (embeddings, every
//! projection, lm_head) and not to the RMSNorm gains. Before each step the gradients' global L2
//! norm is computed on the device and the clip scale `min(1, clip / (norm + 1e-6))` is fed to
//! the AdamW kernel without a trip to the host.

use crate::error::Result;
use cubecl::Runtime;
use dsl::{Device, FloatElement, GpuTensor};
use kernels::adamw::{AdamW, adamw_step};
use kernels::grad_norm::{grad_norm, grad_norm_scratch_len};
use model::{ParamSpec, Params};

/// Optimizer state: the two f32 moments of every parameter and the step count.
pub struct Optimizer<R: Runtime> {
    pub hp: AdamW,
    pub grad_clip: f64,
    /// Steps taken (the next step is `step + 1`, as AdamW counts from 1).
    pub step: u64,
    m: Vec<GpuTensor<R, f32>>,
    v: Vec<GpuTensor<R, f32>>,
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
    /// Zero moments for parameters of these shapes.
    pub fn new(device: &Device<R>, specs: &[ParamSpec], hp: AdamW, grad_clip: f64) -> Result<Self> {
        let zeros =
            || specs.iter().map(|s| GpuTensor::zeros(device, &s.shape)).collect::<dsl::Result<Vec<_>>>();
        let numels: Vec<usize> = specs.iter().map(|s| s.numel()).collect();
        Ok(Self {
            hp,
            grad_clip,
            step: 0,
            m: zeros()?,
            v: zeros()?,
            decay: specs.iter().map(decays).collect(),
            norm: GpuTensor::zeros(device, &[1])?,
            clip_scale: GpuTensor::zeros(device, &[1])?,
            scratch: GpuTensor::zeros(device, &[grad_norm_scratch_len(&numels)])?,
        })
    }

    /// Clips and applies one step at learning rate `lr`; returns nothing until
    /// [`Self::last_grad_norm`] reads the norm (so the host need not wait).
    pub fn step<F: FloatElement>(
        &mut self,
        device: &Device<R>,
        params: &mut Params<R, F>,
        grads: &Params<R, F>,
        lr: f64,
    ) -> Result<()> {
        let refs: Vec<&GpuTensor<R, F>> = grads.tensors().iter().collect();
        grad_norm(
            device,
            &mut self.norm,
            &mut self.clip_scale,
            &mut self.scratch,
            &refs,
            self.grad_clip as f32,
        )?;
        self.step += 1;
        for (i, (param, grad)) in params.tensors_mut().iter_mut().zip(grads.tensors()).enumerate() {
            let hp =
                AdamW { lr, weight_decay: if self.decay[i] { self.hp.weight_decay } else { 0.0 }, ..self.hp };
            adamw_step(
                device,
                param,
                &mut self.m[i],
                &mut self.v[i],
                grad,
                &self.clip_scale,
                &hp,
                self.step,
            )?;
        }
        Ok(())
    }

    /// The global gradient norm (before clipping) of the last step.
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
