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
    #[error(transparent)]
    Collective(#[from] collectives::CollectiveError),
    #[error("training options: {0}")]
    Options(String),
    #[error("--resume: {0}")]
    Resume(String),
    /// A prompt that leaves no position of the model's context for a new token.
    #[error(
        "the prompt has {tokens} tokens and the model's context (max_position_embeddings) is {context}: \
         no position is left to generate a token"
    )]
    PromptFillsContext { tokens: usize, context: usize },
    #[error(
        "the loss of step {step} is {loss}: stopping (the last checkpoint written, if any, is intact); \
         try a lower --lr or a tighter --grad-clip"
    )]
    NonFinite { step: u64, loss: f64 },
    #[error(
        "the gradient norm of step {step} is {grad_norm}: stopping (the last checkpoint written, if any, is \
         intact); try a lower --lr, or f32/bf16 compute (f16 without loss scaling overflows)"
    )]
    NonFiniteGradient { step: u64, grad_norm: f64 },
}

impl From<dsl::Error> for TrainError {
    fn from(e: dsl::Error) -> Self {
        Self::Model(e.into())
    }
}

pub type Result<T, E = TrainError> = std::result::Result<T, E>;
