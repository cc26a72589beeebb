//! Errors of the model crate: each names the file, tensor or shape at fault.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Kernel(#[from] dsl::Error),

    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },

    #[error("config: {0}")]
    Config(String),

    #[error("checkpoint {}: {message}", file.display())]
    Checkpoint { file: PathBuf, message: String },

    #[error("checkpoint {}: tensor `{tensor}`: {message}", file.display())]
    Tensor { file: PathBuf, tensor: String, message: String },

    #[error("{op}: {message}")]
    Input { op: &'static str, message: String },
}

impl ModelError {
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io { path: path.to_path_buf(), source }
    }

    pub fn checkpoint(file: &Path, message: impl Into<String>) -> Self {
        Self::Checkpoint { file: file.to_path_buf(), message: message.into() }
    }

    pub fn tensor(file: &Path, tensor: &str, message: impl Into<String>) -> Self {
        Self::Tensor { file: file.to_path_buf(), tensor: tensor.to_string(), message: message.into() }
    }
}

pub type Result<T, E = ModelError> = std::result::Result<T, E>;
