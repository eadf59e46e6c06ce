//! Llama-architecture target model (Llama 2/3, SmolLM2 and other GQA Llamas).

mod attention;
mod config;
mod fold;
mod load;
mod mlp;
mod model;
mod norm;
mod rope;

pub use attention::Attention;
pub use config::{Llama3RopeScaling, LlamaConfig};
pub use load::load_llama;
pub use mlp::Mlp;
pub use model::{Llama, LlamaLayer, LlamaLoadOptions};
pub use norm::RmsNorm;
pub use rope::{RopeAngles, RotaryEmbedding, inverse_frequencies};
