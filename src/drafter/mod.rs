//! Draft heads: the [`DraftHead`] trait, the shipped [`RecurrentDrafter`] and beam search.

use burn::tensor::{Int, Tensor, backend::Backend};

use crate::error::Result;

mod beam_search;
mod checkpoint;
#[cfg(feature = "flex")]
mod cpu_chain;
mod cpu_panels;
mod draft_state;
mod draft_vocabulary;
mod recurrent;
#[cfg(all(test, feature = "flex"))]
mod tests;
mod top_k;

pub use beam_search::{BeamSearchOutput, LOG_ZERO, WARP_TOP_K};
pub use checkpoint::{CONFIG_METADATA_KEY, CheckpointDType, read_checkpoint_config};
pub use draft_vocabulary::DraftVocabulary;
pub use recurrent::{
    DEFAULT_NUM_DRAFT_LAYERS, DEFAULT_TRAINED_STEPS, DraftHeadKind, MERGED_EXIT_SWITCH_VARIABLE,
    RecurrentDrafter, RecurrentDrafterConfig, ResBlock,
};
pub use top_k::{TopKCache, TopKMethod, top_k, top_k_cached};

/// Beams proposed for one round.
#[derive(Debug, Clone)]
pub struct DraftBeams<B: Backend> {
    /// Draft tokens, the first column being the given first token `g0`; beam 0 is the best.
    /// Shape `[batch, beam_width, C']`: `C' = beam_length`, or fewer (at least 2) when the
    /// head stopped early ([`DraftRequest::stop_below`]).
    pub tokens: Tensor<B, 3, Int>,
    /// Log-probability under the drafter's (warped) distribution of each drafted token
    /// (columns 1..), needed only by the reference-parity acceptance. Placeholders (zeros from
    /// the shipped head) when the request did not ask for them
    /// ([`DraftRequest::needs_log_probs`]). Shape `[batch, beam_width, C' - 1]`.
    pub token_log_probs: Tensor<B, 3>,
}

/// What a draft head is asked for in one round.
#[derive(Debug, Clone)]
pub struct DraftRequest<B: Backend> {
    /// The target's last-layer hidden state (after the final norm) at the last accepted token.
    /// Shape `[batch, hidden]`.
    pub context: Tensor<B, 2>,
    /// The first token of every beam, chosen from the target's own logits. Shape `[batch]`.
    pub first_tokens: Tensor<B, 1, Int>,
    /// Number of beams M (≥ 1).
    pub beam_width: usize,
    /// Tokens per beam C, counting the first token (≥ 1).
    pub beam_length: usize,
    /// Whether the caller reads [`DraftBeams::token_log_probs`]. When `false` a head may skip
    /// computing them and return placeholders, but must propose the same tokens. The decoder
    /// asks for them only for the reference-parity acceptance. Without them a one-beam search
    /// of the shipped head selects each step's best token alone instead of the top 50 its warp
    /// normalises over (that selection was two thirds of a one-beam draft round's device time
    /// on the H200, docs/benchmarks.md session 19).
    pub needs_log_probs: bool,
    /// A floor for the beams' scores, the sums of their drafted tokens' log-probabilities: a
    /// head may stop drafting once every beam of every row scores below it, and return fewer
    /// than `beam_length` columns (at least 2; tokens past the floor are unlikely to be
    /// accepted and cost a draft step each). `None`: draft every step. Deciding costs a read of
    /// the scores after each step — free where the host reads the tensors' memory directly
    /// (the CPU backends), a wait for the device elsewhere; the shipped head's one-launch GPU
    /// paths ignore it. The decoder sets it from
    /// [`SpeculativeConfig::min_draft_probability`](crate::decoder::SpeculativeConfig::min_draft_probability).
    pub stop_below: Option<f32>,
}

/// Anything that proposes draft beams from the target's hidden state.
pub trait DraftHead<B: Backend> {
    /// Width of the target hidden state this head reads.
    fn hidden_size(&self) -> usize;
    /// Vocabulary size of the proposals.
    fn vocab_size(&self) -> usize;
    /// How many draft steps the head was trained for, if known: beam lengths above
    /// `trained_steps + 1` are rejected.
    fn trained_steps(&self) -> Option<usize>;
    /// Proposes `beam_width` beams of `beam_length` tokens per batch row.
    fn propose(&self, request: DraftRequest<B>) -> Result<DraftBeams<B>>;
    /// Target layers (0-based, strictly increasing) whose outputs the head reads besides the
    /// final hidden state; the decoder asks the target for them
    /// ([`TargetModel::forward_tapped`](crate::target::TargetModel::forward_tapped)). Default:
    /// none.
    fn tapped_layers(&self) -> &[usize] {
        &[]
    }
    /// The context `h` the head drafts from (what [`DraftRequest::context`] carries), from the
    /// target's features at the positions it drafts after: the final hidden state followed by
    /// each tapped layer's output. Default: the final hidden state, as it is.
    ///
    /// # Shapes
    /// `features`: `[rows, H · (1 + taps)]` to `[rows, H]`
    fn context(&self, features: Tensor<B, 2>) -> Result<Tensor<B, 2>> {
        Ok(features)
    }
}
