//! Weight files: GGUF (llama.cpp) and Hugging Face safetensors directories.

pub mod dequant;
pub mod gguf;
mod gguf_weights;
mod hf;

pub use dequant::GgmlType;
pub use gguf::{GgufFile, GgufTensorInfo, MetadataValue};
pub use gguf_weights::{
    GgufWeights, gguf_to_hf_name, hf_to_gguf_name, permute_rope_rows, unpermute_rope_rows,
};
pub use hf::HfWeights;

/// A source of named f32 weights, addressed by their Hugging Face tensor names
/// (`model.layers.0.self_attn.q_proj.weight`, ...).
///
/// Shapes are the HF (PyTorch) shapes, row-major: a linear layer's weight is `[out, in]`.
/// Quantised formats are dequantised on the fly; GGUF's RoPE permutation of the Q/K
/// projections is undone so both formats yield identical tensors.
pub trait WeightSource {
    /// The tensor called `hf_name`, dequantised to f32, with its shape.
    fn tensor(&self, hf_name: &str) -> crate::Result<(Vec<f32>, Vec<usize>)>;
    /// Whether the source has a tensor of that name.
    fn contains(&self, hf_name: &str) -> bool;
}
