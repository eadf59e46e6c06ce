//! Llama shapes for measuring costs with random weights (`Llama::init_random`), as HF configs.
#![allow(dead_code)] // shared by several programs; each uses some of the shapes

use redrafter::models::llama::LlamaConfig;

#[allow(clippy::too_many_arguments)]
fn shape(
    hidden: usize,
    inter: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    vocab: usize,
    theta: f64,
    tied: bool,
) -> LlamaConfig {
    LlamaConfig {
        hidden_size: hidden,
        intermediate_size: inter,
        num_hidden_layers: layers,
        num_attention_heads: heads,
        num_key_value_heads: kv_heads,
        vocab_size: vocab,
        rms_norm_eps: 1e-5,
        rope_theta: theta,
        max_position_embeddings: 4096,
        tie_word_embeddings: tied,
        rope_scaling: None,
        bos_token_id: None,
        eos_token_id: None,
    }
}

/// SmolLM2-135M's shape.
pub fn smollm2_135m() -> LlamaConfig {
    shape(576, 1536, 30, 9, 3, 49152, 100_000.0, true)
}

/// Llama-2-7B's shape.
pub fn llama2_7b() -> LlamaConfig {
    shape(4096, 11008, 32, 32, 32, 32000, 10_000.0, false)
}
