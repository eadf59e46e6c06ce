//! Target model implementations.

pub mod llama;
