//! Element types that tensors may hold, and their host-side conversions.

use cubecl::prelude::*;
use std::fmt;

/// The element type of a tensor, for messages and dispatch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    BF16,
    U32,
    I32,
}

impl DType {
    pub fn size_bytes(self) -> usize {
        match self {
            DType::F32 | DType::U32 | DType::I32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::U32 => "u32",
            DType::I32 => "i32",
        })
    }
}

impl std::str::FromStr for DType {
    type Err = String;

    /// Parses the names [`fmt::Display`] writes (`f32`, `f16`, `bf16`, `u32`, `i32`).
    fn from_str(s: &str) -> Result<Self, String> {
        [DType::F32, DType::F16, DType::BF16, DType::U32, DType::I32]
            .into_iter()
            .find(|d| d.to_string() == s)
            .ok_or_else(|| format!("unknown element type `{s}` (expected f32, f16, bf16, u32 or i32)"))
    }
}

/// A type a [`crate::GpuTensor`] can store.
pub trait Element: CubeElement + Numeric + Copy {
    const DTYPE: DType;
}

/// A floating-point storage type. Kernels accumulate in f32 whatever this is;
/// the host converts through f64 so references see exactly the stored values.
pub trait FloatElement: Element + Float {
    fn from_f64_rounded(value: f64) -> Self;
    fn into_f64(self) -> f64;
}

impl Element for f32 {
    const DTYPE: DType = DType::F32;
}
impl Element for half::f16 {
    const DTYPE: DType = DType::F16;
}
impl Element for half::bf16 {
    const DTYPE: DType = DType::BF16;
}
impl Element for u32 {
    const DTYPE: DType = DType::U32;
}
impl Element for i32 {
    const DTYPE: DType = DType::I32;
}

impl FloatElement for f32 {
    fn from_f64_rounded(value: f64) -> Self {
        value as f32
    }
    fn into_f64(self) -> f64 {
        self as f64
    }
}
impl FloatElement for half::f16 {
    fn from_f64_rounded(value: f64) -> Self {
        half::f16::from_f64(value)
    }
    fn into_f64(self) -> f64 {
        half::f16::to_f64(self)
    }
}
impl FloatElement for half::bf16 {
    fn from_f64_rounded(value: f64) -> Self {
        half::bf16::from_f64(value)
    }
    fn into_f64(self) -> f64 {
        half::bf16::to_f64(self)
    }
}
