//! The error type of the dsl layer: every variant names the operation and what was wrong.

use crate::{Backend, DType};

/// Errors from device choice, tensor handling and kernel launches.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("unknown backend `{name}`: expected one of wgpu, cuda")]
    UnknownBackend { name: String },

    #[error(
        "backend `{backend}` is not compiled into this binary (compiled in: {compiled}); \
         rebuild with `--features {backend}`"
    )]
    BackendNotCompiled { backend: Backend, compiled: String },

    #[error("backend `{backend}` found no usable device: {reason}")]
    NoDevice { backend: Backend, reason: String },

    #[error("{op}: element type {dtype} is not supported by the {backend} device{hint}")]
    UnsupportedDType { op: &'static str, dtype: DType, backend: Backend, hint: &'static str },

    #[error("{op}: tensor `{tensor}` has shape {actual:?}, expected {expected:?}")]
    ShapeMismatch { op: &'static str, tensor: &'static str, expected: Vec<usize>, actual: Vec<usize> },

    #[error("{op}: {len} values do not fill a tensor of shape {shape:?} ({numel} elements)")]
    DataLength { op: &'static str, len: usize, shape: Vec<usize>, numel: usize },

    #[error(
        "{op}: tensor of shape {shape:?} needs {bytes} bytes, more than the device's largest \
         buffer ({max_bytes} bytes)"
    )]
    TooLarge { op: &'static str, shape: Vec<usize>, bytes: u64, max_bytes: u64 },

    #[error("{op}: {what} {value} at position {position} is outside the vocabulary of {vocab_size}{allowed}")]
    OutOfVocabulary {
        op: &'static str,
        what: &'static str,
        position: usize,
        value: i64,
        vocab_size: usize,
        allowed: &'static str,
    },

    #[error("{op}: {message}")]
    InvalidArgument { op: &'static str, message: String },

    #[error("{op}: {message}")]
    Unsupported { op: &'static str, message: String },

    #[error("device error during {op}: {message}")]
    Device { op: &'static str, message: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Shape-check helper used by every launcher: `Ok` when `actual == expected`.
    pub fn check_shape(
        op: &'static str,
        tensor: &'static str,
        actual: &[usize],
        expected: &[usize],
    ) -> Result<()> {
        if actual == expected {
            Ok(())
        } else {
            Err(Error::ShapeMismatch { op, tensor, expected: expected.to_vec(), actual: actual.to_vec() })
        }
    }
}
