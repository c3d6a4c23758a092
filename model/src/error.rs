//! The one error type of pai-model. Every variant names the file, key, tensor or value at fault, so a
//! user who reads the message knows what to fix without a debugger.

use std::path::PathBuf;

/// Everything that can go wrong loading or running a model, its tokenizer, template or adapters.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a readable GGUF file: {source}")]
    Gguf {
        path: PathBuf,
        #[source]
        source: Box<candle_core::Error>,
    },
    #[error("{path}: cannot parse {what}: {source}")]
    Json {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path}: missing metadata `{key}`")]
    MissingMetadata { path: PathBuf, key: String },
    #[error("{path}: metadata `{key}` is invalid: {reason}")]
    BadMetadata {
        path: PathBuf,
        key: String,
        reason: String,
    },
    #[error(
        "{path}: architecture `{architecture}` is not supported; pai runs the llama family \
         (llama, smollm, mistral, qwen2)"
    )]
    UnsupportedArchitecture { path: PathBuf, architecture: String },
    #[error("{path}: {what} is not supported: {reason}")]
    Unsupported {
        path: PathBuf,
        what: String,
        reason: String,
    },
    #[error("{path}: missing tensor `{name}`")]
    MissingTensor { path: PathBuf, name: String },
    #[error("{path}: tensor `{name}` has shape {actual:?}, expected {expected:?}")]
    TensorShape {
        path: PathBuf,
        name: String,
        expected: Vec<usize>,
        actual: Vec<usize>,
    },
    #[error("{path}: cannot load tensor `{name}`: {source}")]
    Tensor {
        path: PathBuf,
        name: String,
        #[source]
        source: Box<candle_core::Error>,
    },
    #[error("{path}: no file of the model was found ({what})")]
    MissingFile { path: PathBuf, what: &'static str },
    #[error("tokenizer ({origin}): {reason}")]
    Tokenizer { origin: String, reason: String },
    #[error("tokenizer ({origin}): {source}")]
    TokenizerLib {
        origin: String,
        #[source]
        source: tokenizers::Error,
    },
    #[error("the model has no chat template (no `tokenizer.chat_template` in its metadata)")]
    NoChatTemplate,
    #[error("chat template: {source}")]
    ChatTemplate {
        #[source]
        source: minijinja::Error,
    },
    #[error(
        "this model's maximum context length is {max} tokens, but {requested} were requested \
         ({prompt} in the prompt, {completion} for the completion)"
    )]
    ContextOverflow {
        max: usize,
        requested: usize,
        prompt: usize,
        completion: usize,
    },
    #[error("invalid request: {field} {reason}")]
    InvalidRequest { field: &'static str, reason: String },
    #[error("adapter {path}: {reason}")]
    Adapter { path: PathBuf, reason: String },
    #[error("adapter {path}: tensor `{key}` has shape {actual:?}, expected {expected:?}")]
    AdapterShape {
        path: PathBuf,
        key: String,
        expected: Vec<usize>,
        actual: Vec<usize>,
    },
    #[error("adapter {path}: missing tensor `{key}`")]
    AdapterMissingKey { path: PathBuf, key: String },
    #[error(
        "adapter {path} was trained on base {expected}, but the loaded base model is {actual}"
    )]
    AdapterBaseMismatch {
        path: PathBuf,
        expected: String,
        actual: String,
    },
    #[error("token id {row} is outside the vocabulary ({rows} tokens)")]
    RowOutOfRange { row: usize, rows: usize },
    #[error(transparent)]
    Candle(Box<candle_core::Error>),
}

impl From<candle_core::Error> for ModelError {
    fn from(e: candle_core::Error) -> Self {
        Self::Candle(Box::new(e))
    }
}

pub type Result<T, E = ModelError> = std::result::Result<T, E>;

impl ModelError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}
