//! # redrafter
//!
//! Recurrent Drafter (ReDrafter, arXiv 2403.09919) speculative decoding on Burn.

pub mod accept;
pub mod backend;
pub mod chat_template;
pub mod cpu_kernels;
#[cfg(feature = "flex")]
mod cpu_simd;
mod cpu_workers;
pub mod cube_kernels;
pub mod decoder;
pub mod drafter;
pub mod error;
#[cfg(feature = "flex")]
mod flex_tensor;
pub mod flex_write;
pub mod generate;
pub mod hub;
pub mod io;
pub mod kv_cache;
pub mod lookup;
pub mod models;
#[cfg(feature = "flex")]
pub mod panel_matmul;
pub mod projection;
pub mod sampling;
#[cfg(feature = "flex")]
pub mod skinny_matmul;
pub mod stats;
pub mod target;
pub mod tokenizer;
#[cfg(feature = "train")]
pub mod train;
pub mod tree;

#[cfg(feature = "flex")]
pub use cpu_simd::SIMD_VARIABLE;
pub use error::{Error, Result};
pub use generate::{GenerationConfig, GenerationOutput, generate};
pub use kv_cache::KvCache;
pub use lookup::PromptLookup;
pub use sampling::Sampling;
pub use stats::Stats;
pub use target::{Block, TargetModel};
