//! The mixed-precision policy: what is held in f32 when the model computes in f16 or bf16, how
//! the narrow parameters are written, and f16's dynamic loss scaling.
//!
//! With `--dtype f16|bf16` the activations, the inputs of every product and the activation
//! gradients are in the narrow type. In f32 always: every accumulator inside a kernel, the
//! norms' statistics, softmax and the loss, the weight gradients (summed over micro-batches in
//! f32 buffers), AdamW's moments, the gradient norm, and — by default — an f32 master copy of
//! the weights that AdamW updates ([`MasterWeights::F32`]), from which the narrow compute copy
//! is rounded each step. Without the master ([`MasterWeights::None`], 4 bytes per parameter
//! less) the narrow parameters are written by stochastic rounding ([`WriteRounding`]).
//!
//! f16 (5 exponent bits) underflows on small gradients, so f16 runs scale the loss's gradient
//! by a dynamic factor ([`LossScaler`], torch's `GradScaler` semantics); bf16 has f32's range
//! and needs none.

use dsl::DType;
use serde::{Deserialize, Serialize};
use std::fmt;

/// Where AdamW keeps the weights when the compute type is narrower than f32.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MasterWeights {
    /// An f32 copy owned by the optimizer; the model computes with a rounded copy.
    #[default]
    F32,
    /// The narrow parameters only (written per [`WriteRounding`]).
    None,
}

/// How parameters are written without a master copy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WriteRounding {
    /// Unbiased: rounds up with probability equal to the discarded fraction.
    #[default]
    Stochastic,
    /// Round to nearest: loses every update below half an ulp (kept to measure that loss).
    Nearest,
}

impl std::str::FromStr for MasterWeights {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" => Ok(Self::F32),
            "none" => Ok(Self::None),
            other => Err(format!("unknown --master-weights `{other}`: expected f32 or none")),
        }
    }
}

impl std::str::FromStr for WriteRounding {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "stochastic" => Ok(Self::Stochastic),
            "nearest" => Ok(Self::Nearest),
            other => Err(format!("unknown --rounding `{other}`: expected stochastic or nearest")),
        }
    }
}

/// Dynamic loss scaling, as `torch.amp.GradScaler`: the loss's gradient is multiplied by
/// `scale`; a step whose gradients hold an inf or NaN is skipped and the scale multiplied by
/// `backoff_factor`; after `growth_interval` clean steps in a row it is multiplied by
/// `growth_factor`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct LossScaleOptions {
    pub init_scale: f64,
    pub growth_factor: f64,
    pub backoff_factor: f64,
    pub growth_interval: u64,
}

impl Default for LossScaleOptions {
    /// torch's defaults: 2^16, ×2, ×0.5, 2000 steps.
    fn default() -> Self {
        Self { init_scale: 65536.0, growth_factor: 2.0, backoff_factor: 0.5, growth_interval: 2000 }
    }
}

/// The precision options of a run (used only when the compute type is narrower than f32,
/// except loss scaling, which applies whenever it is set).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PrecisionOptions {
    pub master_weights: MasterWeights,
    pub rounding: WriteRounding,
    /// `None`: gradients unscaled.
    pub loss_scale: Option<LossScaleOptions>,
}

impl PrecisionOptions {
    /// The defaults for compute type `dtype`: f32 master weights, and dynamic loss scaling for
    /// f16 only.
    pub fn for_dtype(dtype: DType) -> Self {
        Self { loss_scale: (dtype == DType::F16).then(LossScaleOptions::default), ..Self::default() }
    }

    /// Whether an f32 master copy is kept for compute type `dtype`.
    pub fn keeps_master(&self, dtype: DType) -> bool {
        dtype != DType::F32 && self.master_weights == MasterWeights::F32
    }

    pub(crate) fn validate(&self) -> Result<(), String> {
        if let Some(s) = &self.loss_scale {
            let power_of_two = |x: f64| x > 0.0 && x.is_finite() && x.log2().fract() == 0.0;
            if !power_of_two(s.init_scale)
                || !power_of_two(s.growth_factor)
                || !power_of_two(s.backoff_factor)
            {
                return Err(format!(
                    "loss scale {}, growth ×{} and backoff ×{} must be powers of two (so scaling is exact)",
                    s.init_scale, s.growth_factor, s.backoff_factor
                ));
            }
            if s.growth_interval == 0 {
                return Err("--loss-scale-growth-interval must be positive".into());
            }
        }
        Ok(())
    }

    /// One line for the startup output, e.g. `f16 compute, f32 master weights, f32 gradients,
    /// dynamic loss scale 65536 (×2 after 2000 clean steps)`.
    pub fn describe(&self, dtype: DType) -> String {
        if dtype == DType::F32 && self.loss_scale.is_none() {
            return "f32 throughout".into();
        }
        let weights = match (dtype, self.master_weights, self.rounding) {
            (DType::F32, ..) => "f32 weights".to_string(),
            (_, MasterWeights::F32, _) => "f32 master weights".to_string(),
            (_, MasterWeights::None, WriteRounding::Stochastic) => {
                format!("{dtype} weights written by stochastic rounding (no master)")
            }
            (_, MasterWeights::None, WriteRounding::Nearest) => {
                format!("{dtype} weights rounded to nearest (no master: updates below half an ulp are lost)")
            }
        };
        let scaling = match &self.loss_scale {
            Some(s) => format!(
                ", dynamic loss scale {} (×{} after {} clean steps, ×{} on overflow)",
                s.init_scale, s.growth_factor, s.growth_interval, s.backoff_factor
            ),
            None => String::new(),
        };
        format!("{dtype} compute, {weights}, f32 gradients and AdamW moments{scaling}")
    }
}

impl fmt::Display for MasterWeights {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::F32 => "f32",
            Self::None => "none",
        })
    }
}

/// The live loss scale and its count of clean steps (saved in `trainer_state.json`).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct LossScaler {
    pub scale: f64,
    /// Clean steps since the scale last changed.
    pub clean_steps: u64,
}

impl LossScaler {
    pub fn new(options: &LossScaleOptions) -> Self {
        Self { scale: options.init_scale, clean_steps: 0 }
    }

    /// Records a step: `finite` gradients count towards growth, an overflow backs off.
    /// Returns whether the step's update is to be applied.
    pub fn update(&mut self, options: &LossScaleOptions, finite: bool) -> bool {
        if finite {
            self.clean_steps += 1;
            if self.clean_steps >= options.growth_interval {
                self.scale *= options.growth_factor;
                self.clean_steps = 0;
            }
        } else {
            self.scale *= options.backoff_factor;
            self.clean_steps = 0;
        }
        finite
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scaler_backs_off_on_overflow_and_grows_after_clean_steps() {
        let options = LossScaleOptions { growth_interval: 3, ..LossScaleOptions::default() };
        let mut s = LossScaler::new(&options);
        assert!(!s.update(&options, false));
        assert_eq!(s.scale, 32768.0);
        assert!(s.update(&options, true) && s.update(&options, true));
        assert_eq!((s.scale, s.clean_steps), (32768.0, 2));
        assert!(s.update(&options, true));
        assert_eq!((s.scale, s.clean_steps), (65536.0, 0));
        // An overflow resets the count of clean steps.
        s.update(&options, true);
        s.update(&options, false);
        assert_eq!((s.scale, s.clean_steps), (32768.0, 0));
    }

    #[test]
    fn defaults_follow_the_compute_type() {
        assert!(PrecisionOptions::for_dtype(DType::F16).loss_scale.is_some());
        assert!(PrecisionOptions::for_dtype(DType::BF16).loss_scale.is_none());
        assert!(PrecisionOptions::for_dtype(DType::BF16).keeps_master(DType::BF16));
        assert!(!PrecisionOptions::for_dtype(DType::F32).keeps_master(DType::F32));
        let bad = PrecisionOptions {
            loss_scale: Some(LossScaleOptions { init_scale: 1000.0, ..LossScaleOptions::default() }),
            ..PrecisionOptions::default()
        };
        assert!(bad.validate().unwrap_err().contains("powers of two"));
    }
}
