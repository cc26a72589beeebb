//! The model's parameter tensors (and, with the same type, their gradients), in the order of
//! [`LlamaConfig::parameters`], so checkpoints, the optimizer and the gradient norm walk one
//! flat list.

use crate::config::{LayerWeight, LlamaConfig, ParamSpec};
use crate::error::{ModelError, Result};
use cubecl::Runtime;
use dsl::{Device, FloatElement, GpuTensor};

/// One tensor per [`ParamSpec`]; a tied `lm_head` is the embedding tensor itself.
pub struct Params<R: Runtime, F: FloatElement> {
    specs: Vec<ParamSpec>,
    tensors: Vec<GpuTensor<R, F>>,
    layers: usize,
    tied: bool,
}

impl<R: Runtime, F: FloatElement> Params<R, F> {
    /// All zeros (gradients start here).
    pub fn zeros(device: &Device<R>, config: &LlamaConfig) -> Result<Self> {
        let specs = config.parameters();
        let tensors =
            specs.iter().map(|s| GpuTensor::zeros(device, &s.shape)).collect::<dsl::Result<Vec<_>>>()?;
        Ok(Self { specs, tensors, layers: config.num_hidden_layers, tied: config.tie_word_embeddings })
    }

    /// Uploads host values (f32, one vector per spec, in order), rounding to `F`.
    pub fn from_host(device: &Device<R>, config: &LlamaConfig, values: &[Vec<f32>]) -> Result<Self> {
        let specs = config.parameters();
        if values.len() != specs.len() {
            return Err(ModelError::Input {
                op: "Params::from_host",
                message: format!("{} tensors given, the config has {}", values.len(), specs.len()),
            });
        }
        let mut tensors = Vec::with_capacity(specs.len());
        for (spec, data) in specs.iter().zip(values) {
            if data.len() != spec.numel() {
                return Err(ModelError::Input {
                    op: "Params::from_host",
                    message: format!(
                        "tensor `{}` has {} values, shape {:?} needs {}",
                        spec.name,
                        data.len(),
                        spec.shape,
                        spec.numel()
                    ),
                });
            }
            let converted: Vec<F> = data.iter().map(|&v| F::from_f64_rounded(v as f64)).collect();
            tensors.push(GpuTensor::from_slice(device, &converted, &spec.shape)?);
        }
        Ok(Self { specs, tensors, layers: config.num_hidden_layers, tied: config.tie_word_embeddings })
    }

    /// Every tensor back on the host as f32, in spec order.
    pub fn to_host(&self, device: &Device<R>) -> Result<Vec<Vec<f32>>> {
        self.tensors
            .iter()
            .map(|t| Ok(t.to_f64_vec(device)?.into_iter().map(|v| v as f32).collect()))
            .collect()
    }

    /// Sets every tensor to zero.
    pub fn zero(&mut self, device: &Device<R>) -> Result<()> {
        for t in &mut self.tensors {
            t.fill(device, F::from_f64_rounded(0.0))?;
        }
        Ok(())
    }

    pub fn specs(&self) -> &[ParamSpec] {
        &self.specs
    }

    pub fn tensors(&self) -> &[GpuTensor<R, F>] {
        &self.tensors
    }

    pub fn tensors_mut(&mut self) -> &mut [GpuTensor<R, F>] {
        &mut self.tensors
    }

    /// Number of scalar parameters.
    pub fn numel(&self) -> usize {
        self.tensors.iter().map(|t| t.numel()).sum()
    }

    fn layer_index(&self, layer: usize, weight: LayerWeight) -> usize {
        assert!(layer < self.layers, "layer {layer} of {}", self.layers);
        let offset = LayerWeight::ALL.iter().position(|&w| w == weight).expect("ALL lists every weight");
        1 + layer * LayerWeight::ALL.len() + offset
    }

    fn norm_index(&self) -> usize {
        1 + self.layers * LayerWeight::ALL.len()
    }

    fn lm_head_index(&self) -> usize {
        if self.tied { 0 } else { self.norm_index() + 1 }
    }

    pub fn embed(&self) -> &GpuTensor<R, F> {
        &self.tensors[0]
    }

    pub fn embed_mut(&mut self) -> &mut GpuTensor<R, F> {
        &mut self.tensors[0]
    }

    pub fn layer(&self, layer: usize, weight: LayerWeight) -> &GpuTensor<R, F> {
        &self.tensors[self.layer_index(layer, weight)]
    }

    pub fn layer_mut(&mut self, layer: usize, weight: LayerWeight) -> &mut GpuTensor<R, F> {
        let i = self.layer_index(layer, weight);
        &mut self.tensors[i]
    }

    pub fn norm(&self) -> &GpuTensor<R, F> {
        &self.tensors[self.norm_index()]
    }

    pub fn norm_mut(&mut self) -> &mut GpuTensor<R, F> {
        let i = self.norm_index();
        &mut self.tensors[i]
    }

    /// The output projection (the embedding matrix when tied).
    pub fn lm_head(&self) -> &GpuTensor<R, F> {
        &self.tensors[self.lm_head_index()]
    }

    pub fn lm_head_mut(&mut self) -> &mut GpuTensor<R, F> {
        let i = self.lm_head_index();
        &mut self.tensors[i]
    }
}
