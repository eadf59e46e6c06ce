//! # redrafter
//!
//! Recurrent Drafter (ReDrafter, arXiv 2403.09919) speculative decoding on Burn.

pub mod accept;
pub mod drafter;
pub mod error;
pub mod hub;
pub mod io;
pub mod kv_cache;
pub mod models;
pub mod target;
pub mod tree;

pub use error::{Error, Result};
pub use kv_cache::KvCache;
pub use target::{Block, TargetModel};
