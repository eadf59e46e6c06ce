//! The crate's error type. Every fallible public function returns [`Result`].

use std::path::PathBuf;

/// Convenience alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in `redrafter`, with enough context to act on.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Reading or writing a file failed.
    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A GGUF file is structurally invalid (wrong magic, unsupported version, bad metadata type...).
    #[error("invalid GGUF file: {0}")]
    InvalidGguf(String),

    /// A weight file ended before the data it announces.
    #[error(
        "truncated file: {what} needs {needed} bytes at offset {offset}, but the file has {file_len}"
    )]
    Truncated {
        what: String,
        offset: u64,
        needed: u64,
        file_len: u64,
    },

    /// A tensor is stored in a quantisation format this crate cannot dequantise.
    #[error("tensor `{tensor}` uses unsupported quantisation type {kind}")]
    UnsupportedQuantization { tensor: String, kind: String },

    /// A tensor the model needs is not in the weight file.
    #[error("missing tensor `{0}` in the weight file")]
    MissingTensor(String),

    /// A tensor's shape disagrees with the model configuration.
    #[error("tensor `{tensor}` has shape {found:?}, but the configuration expects {expected:?}")]
    ShapeMismatch {
        tensor: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },

    /// A required metadata / configuration key is missing.
    #[error("missing metadata key `{0}`")]
    MissingMetadata(String),

    /// A configuration value is present but unusable.
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),

    /// A safetensors file could not be read or written.
    #[error("safetensors error in {path}: {message}")]
    Safetensors { path: PathBuf, message: String },

    /// A JSON file could not be parsed.
    #[error("JSON error in {path}: {message}")]
    Json { path: PathBuf, message: String },

    /// Building or running the tokenizer failed.
    #[error("tokenizer error: {0}")]
    Tokenizer(String),

    /// Rendering the chat template failed.
    #[error("chat template error: {0}")]
    ChatTemplate(String),

    /// A token id is not in the model's vocabulary.
    #[error("token id {token} is out of range for a vocabulary of {vocab_size}")]
    TokenOutOfRange { token: u32, vocab_size: usize },

    /// The prompt (plus what must be generated or verified) does not fit the context window.
    #[error(
        "prompt of {prompt_len} tokens needs {required} positions, but the context holds {max_context}"
    )]
    ContextOverflow {
        prompt_len: usize,
        required: usize,
        max_context: usize,
    },

    /// An empty prompt or batch was given.
    #[error("empty input: {0}")]
    EmptyInput(String),

    /// Decoding settings that cannot work (zero beam width, beam too long, ...).
    #[error("invalid generation settings: {0}")]
    InvalidSettings(String),

    /// A draft head that does not fit the target model.
    #[error(
        "drafter does not fit the target: {what} is {drafter} in the drafter but {target} in the target"
    )]
    DrafterMismatch {
        what: String,
        drafter: usize,
        target: usize,
    },

    /// The compute backend failed or is unavailable.
    #[error("backend error: {0}")]
    Backend(String),

    /// Training data is malformed (missing field, empty file...).
    #[error("invalid training data: {0}")]
    Data(String),

    /// Training diverged.
    #[error("non-finite loss {loss} at step {step}; the last good checkpoint is kept")]
    NonFiniteLoss { step: usize, loss: f64 },
}

impl Error {
    /// Wraps an I/O error with the path it happened on.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
