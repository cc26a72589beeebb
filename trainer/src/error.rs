//! Errors of the trainer crate.

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Model(#[from] model::ModelError),
    #[error(transparent)]
    Data(#[from] crate::data::DataError),
    #[error(transparent)]
    Source(#[from] crate::source::SourceError),
    #[error(transparent)]
    Tokenizer(#[from] crate::tokenizer::TokenizerError),
    #[error("training options: {0}")]
    Options(String),
    #[error("--resume: {0}")]
    Resume(String),
    #[error(
        "the loss of step {step} is {loss}: stopping (the last checkpoint written, if any, is intact); \
         try a lower --lr or a tighter --grad-clip"
    )]
    NonFinite { step: u64, loss: f64 },
}

impl From<dsl::Error> for TrainError {
    fn from(e: dsl::Error) -> Self {
        Self::Model(e.into())
    }
}

pub type Result<T, E = TrainError> = std::result::Result<T, E>;
