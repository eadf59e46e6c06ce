//! Llama shapes for measuring costs with random weights (`Llama::init_random`), as HF configs.
#![allow(dead_code)] // shared by several programs; each uses some of the shapes

use redrafter::models::llama::LlamaConfig;

/// SmolLM2-135M's shape.
pub fn smollm2_135m() -> LlamaConfig {
    LlamaConfig::new(576, 1536, 30, 9, 3, 49152).with_rope_theta(100_000.0)
}

/// Llama-2-7B's shape.
pub fn llama2_7b() -> LlamaConfig {
    LlamaConfig::new(4096, 11008, 32, 32, 32, 32000).with_tied_embeddings(false)
}
