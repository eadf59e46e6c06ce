//! Llama-architecture target model (Llama 2/3, SmolLM2, Mistral-style GQA models).

mod config;

pub use config::{Llama3RopeScaling, LlamaConfig};
