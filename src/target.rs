//! The [`TargetModel`] trait: what the speculative decoder needs from the model it accelerates.

use burn::tensor::{Int, Tensor, backend::Backend};

use crate::error::Result;
use crate::kv_cache::KvCache;

/// One block of tokens to run through the target against its KV cache.
///
/// A block is a prompt (prefill), a single token (plain decoding) or a packed draft tree
/// (verification). Positions are explicit because tree tokens at the same depth share a position.
#[derive(Debug, Clone)]
pub struct Block<B: Backend> {
    /// Token ids. Shape `[batch, T]`.
    pub tokens: Tensor<B, 2, Int>,
    /// Absolute position of each token (for RoPE). Shape `[batch, T]`.
    pub positions: Tensor<B, 2, Int>,
    /// Additive attention bias over the cache's `used()` slots followed by the block's `T`
    /// slots, `0` where visible and [`crate::kv_cache::MASKED`] where not. Shape
    /// `[batch, 1, T, used + T]`. `None` means "every cached slot and a causal block", which is
    /// only correct when every row's committed length equals `used()`.
    pub bias: Option<Tensor<B, 4>>,
}

/// A model that can be verified against: any decoder-only transformer (or anything with the same
/// interface) implemented in Burn.
///
/// The decoder calls [`TargetModel::forward`] with a block, which the model appends to the cache
/// as a *pending* block (see [`KvCache`]); the decoder then commits the accepted slots.
///
/// # Wrapping your own model
///
/// Implement the trait on a small struct that owns your Burn module. Inside `forward`, embed the
/// tokens, and in each attention layer apply your positional encoding at `block.positions`, call
/// [`KvCache::append`] with the layer's new keys and values, attend over what it returns using
/// `block.bias`, and return the final-norm hidden states. `examples/custom_model.rs` wraps a
/// two-layer toy transformer this way in about a hundred lines:
///
/// ```ignore
/// impl<B: Backend> TargetModel<B> for MyModel<B> {
///     fn hidden_size(&self) -> usize { self.hidden }
///     fn vocab_size(&self) -> usize { self.vocab }
///     fn max_context(&self) -> usize { self.max_len }
///     fn new_cache(&self, batch: usize, capacity: usize) -> KvCache<B> {
///         KvCache::new(self.layers.len(), batch, self.heads, self.head_dim, capacity, &self.device())
///     }
///     fn forward(&self, block: &Block<B>, cache: &mut KvCache<B>) -> Result<Tensor<B, 3>> {
///         let mut x = self.embed_tokens(block.tokens.clone());
///         for (i, layer) in self.layers.iter().enumerate() {
///             x = layer.forward(x, &block.positions, block.bias.as_ref(), i, cache)?;
///         }
///         Ok(self.norm.forward(x))
///     }
///     fn logits(&self, hidden: Tensor<B, 3>) -> Tensor<B, 3> { self.head.forward(hidden) }
///     fn input_embedding(&self) -> Tensor<B, 2> { self.embed.weight.val() }
///     fn output_embedding(&self) -> Tensor<B, 2> { self.head.weight.val().transpose() }
/// }
/// ```
///
/// Greedy speculative output equals plain greedy decoding exactly only if a token's logits in a
/// draft tree equal its logits in a one-token step. Burn's GPU matmul rounds differently per
/// shape, so on CUDA and WGPU use [`crate::cube_kernels::matmul`] for the projections and
/// [`crate::cube_kernels::attention`] for attention (each returns `None` where it does not apply;
/// fall back to your Burn ops then), as the shipped Llama does. Otherwise outputs can differ at
/// near-ties.
pub trait TargetModel<B: Backend> {
    /// Width of the hidden state `h` the draft head reads.
    fn hidden_size(&self) -> usize;
    /// Vocabulary size (rows of the embedding, columns of the logits).
    fn vocab_size(&self) -> usize;
    /// Longest sequence (prompt + generated) the model supports.
    fn max_context(&self) -> usize;
    /// The device the model's weights live on.
    fn device(&self) -> B::Device;
    /// Allocates an empty cache for `batch` sequences of up to `capacity` slots.
    fn new_cache(&self, batch: usize, capacity: usize) -> KvCache<B>;
    /// Runs a block against the cache, appending it as the pending block, and returns the
    /// last-layer hidden states after the final norm.
    ///
    /// # Shapes
    /// returns `[batch, T, hidden_size]`
    fn forward(&self, block: &Block<B>, cache: &mut KvCache<B>) -> Result<Tensor<B, 3>>;
    /// Runs a block like [`forward`](Self::forward) and also returns the residual stream after
    /// each layer of `taps` (0-based layer indices, strictly increasing), in that order: the
    /// extra inputs of a draft head that reads several layers
    /// ([`DraftHead::tapped_layers`](crate::drafter::DraftHead::tapped_layers)).
    ///
    /// The default serves heads that read no layer (`taps` empty) and refuses the others;
    /// implement it to let such heads draft for your model.
    ///
    /// # Shapes
    /// returns `[batch, T, hidden_size]` and one `[batch, T, hidden_size]` per tap
    ///
    /// # Errors
    /// [`crate::Error::InvalidSettings`] for a tap the model does not have or does not expose.
    fn forward_tapped(
        &self,
        block: &Block<B>,
        cache: &mut KvCache<B>,
        taps: &[usize],
    ) -> Result<(Tensor<B, 3>, Vec<Tensor<B, 3>>)> {
        if !taps.is_empty() {
            return Err(crate::Error::InvalidSettings(format!(
                "this target does not expose its layers' outputs (asked for layers {taps:?}); \
                 implement TargetModel::forward_tapped to use a draft head that reads them"
            )));
        }
        Ok((self.forward(block, cache)?, Vec::new()))
    }
    /// The LM head: hidden states to logits.
    ///
    /// # Shapes
    /// `[batch, T, hidden_size]` to `[batch, T, vocab_size]`
    fn logits(&self, hidden: Tensor<B, 3>) -> Tensor<B, 3>;
    /// The input embedding table, shared (frozen) with the draft head.
    ///
    /// # Shapes
    /// `[vocab_size, hidden_size]`
    fn input_embedding(&self) -> Tensor<B, 2>;
    /// The output embedding (LM head weight as rows per token), used by tied draft heads.
    ///
    /// # Shapes
    /// `[vocab_size, hidden_size]`
    fn output_embedding(&self) -> Tensor<B, 2>;
}
