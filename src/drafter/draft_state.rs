//! A draft step's recurrent state as beam search carries it on the GPUs: alone, or already joined
//! to the context as the head's input `[h | s]`.
//!
//! The head reads `[h | s_t]` at every step. Built with Burn's `cat`, that is two copy launches a
//! step (one per half) besides the RNN's two products; here the RNN's second product writes its
//! output next to a copy of the context (the `prefix` fold of
//! [`crate::cube_kernels::ProductFolds`]) and the next step's RNN product reads `s_t` from that
//! buffer's second half (`input_offset`), so the concatenation costs no launch. Every value is
//! the one the unjoined path computes: the same products, only written to a wider buffer.

use burn::module::Param;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};

use super::recurrent::{RecurrentDrafter, gpu_rnn_update, rnn_input_product};
use crate::error::{Error, Result};

/// The recurrent state `s_t` of `N` beam rows.
#[derive(Debug, Clone)]
pub(crate) enum DraftState<B: Backend> {
    /// `s_t` alone. Shape `[N, H]`.
    Alone(Tensor<B, 2>),
    /// `[h | s_t]`, the context rows and the state side by side: the head's input. Shape
    /// `[N, 2H]`.
    Joined(Tensor<B, 2>),
}

impl<B: Backend> DraftState<B> {
    /// The rows `indices` of the state (and of the context joined to it).
    pub(crate) fn select(self, indices: Tensor<B, 1, Int>) -> Self {
        match self {
            Self::Alone(state) => Self::Alone(state.select(0, indices)),
            Self::Joined(joined) => Self::Joined(joined.select(0, indices)),
        }
    }

    /// `s_t` alone, `[N, H]` (a copy of the second half where it is joined).
    pub(crate) fn into_alone(self, hidden: usize) -> Tensor<B, 2> {
        match self {
            Self::Alone(state) => state,
            Self::Joined(joined) => joined.narrow(1, hidden, hidden),
        }
    }
}

impl<B: Backend> RecurrentDrafter<B> {
    /// The next state from `state` and the last token's embedding `[N, H]`, joined to `context`
    /// `[N, H]` where our kernels fold the join (a GPU backend and an RNN head: `e·W (+ b)`,
    /// then [`Self::advance_projected`]); otherwise [`Self::step`] on the state alone.
    ///
    /// # Errors
    /// As [`Self::step`].
    pub(crate) fn advance(
        &self,
        context: &Tensor<B, 2>,
        state: DraftState<B>,
        token_embedding: Tensor<B, 2>,
    ) -> Result<DraftState<B>> {
        if let (Some(w), Some(_)) = (&self.rnn_w, &self.rnn_u)
            && self.joins(context, &token_embedding)
            // The same first product as `step`'s.
            && let Some(input) = rnn_input_product(w, &token_embedding)
        {
            return self.advance_projected(context, state, input);
        }
        let state = state.into_alone(self.config().hidden_size);
        Ok(DraftState::Alone(self.step(state, token_embedding)?))
    }

    /// Whether our kernels can write `rows` next to `context` (the joined state `[h | s]`): a
    /// CubeCL backend, both `[N, H]` with this drafter's `H`.
    fn joins(&self, context: &Tensor<B, 2>, rows: &Tensor<B, 2>) -> bool {
        crate::cube_kernels::applies::<B>()
            && rows.dims() == context.dims()
            && context.dims()[1] == self.config().hidden_size
    }

    /// The first draft step's state from the first token's embedding `[N, H]`: `s_0 = 0`, so
    /// `s_1 = silu(e·W + b_U)`, joined to `context` `[N, H]` in one product where our kernels
    /// take it (an RNN whose `W` has no bias, as this crate's drafters have it); else
    /// [`Self::advance`] from a zero state, which costs a fill and two products. The same bits:
    /// that path's second product sums `0·U` to zero and adds `e·W`, exact in f32; in half
    /// precision this one skips rounding `e·W` to the half type before `b_U` is added.
    ///
    /// # Errors
    /// As [`Self::step`].
    pub(crate) fn first_state(
        &self,
        context: &Tensor<B, 2>,
        token_embedding: Tensor<B, 2>,
    ) -> Result<DraftState<B>> {
        if let Some(joined) = self.joined_first_state(context, &token_embedding) {
            return Ok(joined);
        }
        let [rows, hidden] = token_embedding.dims();
        let zeros = Tensor::zeros([rows, hidden], (&context.device(), token_embedding.dtype()));
        self.advance(context, DraftState::Alone(zeros), token_embedding)
    }

    /// `[h | silu(e·W + b_U)]` in one launch; `None` where that product does not apply.
    fn joined_first_state(
        &self,
        context: &Tensor<B, 2>,
        token_embedding: &Tensor<B, 2>,
    ) -> Option<DraftState<B>> {
        let (w, u) = (self.rnn_w.as_ref()?, self.rnn_u.as_ref()?);
        if w.bias.is_some() || !self.joins(context, token_embedding) {
            return None;
        }
        let u_bias = u.bias.as_ref().map(Param::val);
        crate::cube_kernels::fused_matmul(
            token_embedding,
            &w.weight.val(),
            crate::cube_kernels::ProductFolds {
                bias: u_bias.as_ref(),
                silu: true,
                prefix: Some(context),
                ..Default::default()
            },
        )
        .map(DraftState::Joined)
    }

    /// The next state from `state` and the last token's RNN input `e·W + b_W` `[N, H]` (a row
    /// of [`Self::draft_inputs`]): `[h | silu(s·U + input + b_U)]` in one launch, or the same
    /// update unjoined where that product declines.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for a head without an RNN (it has no input projection).
    pub(crate) fn advance_projected(
        &self,
        context: &Tensor<B, 2>,
        state: DraftState<B>,
        input: Tensor<B, 2>,
    ) -> Result<DraftState<B>> {
        if let Some(joined) = self.joined_update(context, &state, &input) {
            return Ok(joined);
        }
        let u = self.rnn_u.as_ref().ok_or_else(|| {
            Error::InvalidConfig("a projected draft input needs an RNN head".into())
        })?;
        let state = state.into_alone(self.config().hidden_size);
        Ok(DraftState::Alone(gpu_rnn_update(u, state, input)))
    }

    /// `[h | silu(s·U + input + b_U)]`, the RNN's second product writing next to a copy of the
    /// context, `s` read from `state` (alone, or the second half of a joined state); `None`
    /// where the product does not apply (no RNN, not our kernels, other shapes).
    fn joined_update(
        &self,
        context: &Tensor<B, 2>,
        state: &DraftState<B>,
        input: &Tensor<B, 2>,
    ) -> Option<DraftState<B>> {
        let hidden = self.config().hidden_size;
        let u = self.rnn_u.as_ref()?;
        if !self.joins(context, input) {
            return None;
        }
        let u_bias = u.bias.as_ref().map(Param::val);
        let (source, input_offset) = match state {
            DraftState::Alone(state) => (state, 0),
            DraftState::Joined(joined) => (joined, hidden),
        };
        crate::cube_kernels::fused_matmul(
            source,
            &u.weight.val(),
            crate::cube_kernels::ProductFolds {
                addend: Some(input),
                bias: u_bias.as_ref(),
                silu: true,
                prefix: Some(context),
                input_offset,
                ..Default::default()
            },
        )
        .map(DraftState::Joined)
    }

    /// [`Self::draft_logits`] for a state that may already be joined to its context.
    ///
    /// # Errors
    /// As [`Self::draft_logits`].
    pub(crate) fn draft_logits_of(
        &self,
        context: Tensor<B, 2>,
        state: DraftState<B>,
    ) -> Result<Tensor<B, 2>> {
        match state {
            DraftState::Alone(state) => self.draft_logits(context, state),
            DraftState::Joined(joined) => self.head_input_logits(joined, true),
        }
    }
}
