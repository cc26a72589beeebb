//! Errors of the audit: each names the file and where in it (line, byte offset).

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{}: line {line}: invalid UTF-8 at byte offset {offset} (pass --skip-bad to skip such documents)", path.display())]
    Utf8 { path: PathBuf, line: u64, offset: u64 },
    #[error("{}: line {line}: {message} (pass --skip-bad to skip such lines)", path.display())]
    Json { path: PathBuf, line: u64, message: String },
    #[error("{}: line {line}: no \"{field}\" field (pass --text-field to name another, or --skip-bad)", path.display())]
    MissingField { path: PathBuf, line: u64, field: String },
    #[error(transparent)]
    Data(#[from] trainer::data::DataError),
    #[error(transparent)]
    Tokenizer(#[from] trainer::tokenizer::TokenizerError),
    #[error("descriptors {}: {message}", path.display())]
    Descriptors { path: PathBuf, message: String },
    #[error("{0}")]
    Options(String),
}

pub type Result<T, E = AuditError> = std::result::Result<T, E>;
