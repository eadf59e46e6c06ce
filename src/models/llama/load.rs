//! One-call loading of a Llama model and its tokenizer from a GGUF file or an HF directory.

use std::path::Path;

use burn::tensor::backend::Backend;

use super::config::LlamaConfig;
use super::model::{Llama, LlamaLoadOptions};
use crate::error::{Error, Result};
use crate::io::{GgufFile, GgufWeights, HfWeights};
use crate::tokenizer::Tokenizer;

/// Loads a model from `path`: a `.gguf` file, or a Hugging Face directory holding
/// `config.json`, safetensors weights and `tokenizer.json`.
pub fn load_llama<B: Backend>(
    path: impl AsRef<Path>,
    options: &LlamaLoadOptions,
    device: &B::Device,
) -> Result<(Llama<B>, Tokenizer)> {
    let path = path.as_ref();
    let started = std::time::Instant::now();
    let loaded = if path.is_dir() {
        let config = LlamaConfig::from_hf_config(path)?;
        let weights = HfWeights::open(path)?;
        let tokenizer = Tokenizer::from_hf_dir(path)?;
        (
            Llama::from_weights(config, &weights, options, device)?,
            tokenizer,
        )
    } else if path.is_file() {
        let file = GgufFile::open(path)?;
        let tokenizer = Tokenizer::from_gguf(&file)?;
        let config = LlamaConfig::from_gguf(&file)?;
        let weights = GgufWeights::new(file, config.clone());
        (
            Llama::from_weights(config, &weights, options, device)?,
            tokenizer,
        )
    } else {
        return Err(Error::io(
            path,
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no such model file or directory",
            ),
        ));
    };
    if loaded.1.vocab_size() > loaded.0.config().vocab_size {
        return Err(Error::InvalidConfig(format!(
            "tokenizer has {} tokens but the model's vocabulary is {}",
            loaded.1.vocab_size(),
            loaded.0.config().vocab_size
        )));
    }
    tracing::info!(path = %path.display(), elapsed = ?started.elapsed(), "model loaded");
    Ok(loaded)
}
