//! Batched beam search over the recurrent draft head (SPEC §2), entirely on the device.
//!
//! # What is computed
//!
//! Every step warps each beam's logits (subtract the row max, keep the top [`WARP_TOP_K`],
//! everything else becomes [`LOG_ZERO`]), takes `log_softmax` of the warped logits, adds the
//! beam's running score and keeps the best `M` of the `M·V` (beam, token) candidates.
//!
//! # How it is computed
//!
//! Instead of materialising `M·V` scores, each beam selects its top `max(50, M)` logits once
//! (a grouped top-k, see [`super::top_k`], instead of sorting the whole vocabulary). A beam's candidates are
//! ordered by its own log-probabilities and the global top-`M` takes at most `M` from one beam,
//! so only each beam's first `min(M, V)` candidates can win: the global top-`M` runs over
//! `M·min(M, V)` scores. The normaliser only needs the kept top-50 (everything else adds
//! `exp(-5e4) = 0`). For `M ≤ 50` the result equals the dense formulation (up to exact ties).
//!
//! Beam widths above `V` are refused when anything is drafted: step 1 has only `V` distinct
//! continuations.
//!
//! The reference starts with `logp_beam = [0, -5e4, …]` so that step 1 grows only beam 0; here
//! step 1 runs the head on beam 0 alone (one row per batch entry instead of `M`), which selects
//! exactly the same beams and costs `1/M` of the head's work on that step.
//!
//! # Beam widths above 50
//!
//! With `M > 50` some beams must take tokens outside a parent's top 50, which the reference gives
//! the placeholder logit `-5e4` — all tied, so its choice among them is arbitrary. Here the
//! token of logit rank `r ≥ 50` gets the warped logit `-5e4 - (r - 50)` instead: placeholders are
//! ordered by the drafter's own logits, the result is deterministic, every beam is a distinct
//! sequence, and scores stay the plain sum of the reported per-token log-probs. Their
//! probability is `exp(-5e4) = 0` either way.
//!
//! # Ties
//!
//! Exactly equal real scores are ordered by the backend's (unstable) sort; the reference's
//! warp keeps every logit tied with the 50th, here exactly 50 are kept. Both differ only on
//! exact float ties.
//!
//! # On the GPUs
//!
//! With the rank top-k on a CubeCL backend, everything after each step's top-k — the warp, the
//! parents' scores, the global top-`M`, the draft-vocabulary mapping and the new beams' tokens
//! and log-probabilities — runs as one kernel ([`crate::cube_kernels::beam_advance`]), in the
//! order described above (ties to the lower candidate). The composition of Burn's ops below is
//! the same computation for every other backend and the reference the kernel is tested against.
//! Two more things ride along in that kernel: with a draft vocabulary it gathers each new beam's
//! next RNN input from [`RecurrentDrafter::draft_inputs`] (the step after needs no embedding
//! gather and no input product), and one beam whose log-probabilities nobody reads takes its
//! token straight from the step's logits (no top-k launch).
//!
//! No value is read back to the host — the decoder reads the beams once — unless the request
//! sets [`DraftRequest::stop_below`](super::DraftRequest::stop_below): then the best score is
//! read after each step, and drafting stops once it is below the floor.

use burn::module::Param;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};

use super::draft_state::DraftState;
use super::recurrent::RecurrentDrafter;
use super::top_k::{TopKMethod, top_k_cached};
use super::{DraftBeams, DraftHead, DraftRequest};
use crate::error::{Error, Result};

/// Logits kept per beam by the warp (the reference's top-k).
pub const WARP_TOP_K: usize = 50;
/// The warp's "log zero" for masked logits and the reference's initial score of dead beams.
pub const LOG_ZERO: f32 = -5.0e4;

/// Everything beam search produces: [`DraftBeams`] plus the beam scores.
#[derive(Debug, Clone)]
pub struct BeamSearchOutput<B: Backend> {
    /// Beams, first column `g0`, beam 0 the best. Shape `[batch, M, C]`.
    pub tokens: Tensor<B, 3, Int>,
    /// Warped log-probability of each drafted token under its beam's prefix. Shape
    /// `[batch, M, C - 1]`.
    pub token_log_probs: Tensor<B, 3>,
    /// Score of each beam: the sum of its `token_log_probs`, sorted descending. Shape
    /// `[batch, M]`.
    pub scores: Tensor<B, 2>,
}

impl<B: Backend> From<BeamSearchOutput<B>> for DraftBeams<B> {
    fn from(out: BeamSearchOutput<B>) -> Self {
        DraftBeams {
            tokens: out.tokens,
            token_log_probs: out.token_log_probs,
        }
    }
}

/// One step's result for `N` beam rows.
struct Expansion<B: Backend> {
    /// Advanced recurrent state. Shape `[N, H]`.
    state: Tensor<B, 2>,
    /// Warped log-probabilities of each row's best candidates, sorted descending. Shape
    /// `[N, K]`.
    log_probs: Tensor<B, 2>,
    /// Their token ids. Shape `[N, K]`.
    ids: Tensor<B, 2, Int>,
}

/// One draft step's advanced states and each row's best logits, before the warp.
struct BestLogits<B: Backend> {
    /// Advanced recurrent state. Shape `[N, H]`.
    state: Tensor<B, 2>,
    /// Each row's best `max(kept, per_beam)` logits, descending. Shape `[N, K]`.
    sorted: Tensor<B, 2>,
    /// Their draft-vocabulary columns (not yet token ids). Shape `[N, K]`.
    columns: Tensor<B, 2, Int>,
}

/// Sizes shared by every step of one search.
#[derive(Clone, Copy)]
struct Dims {
    batch: usize,
    width: usize,
    length: usize,
    /// Logits kept by the warp, `min(50, V)`; 1 for one beam whose log-probs nobody reads.
    kept: usize,
    /// Candidates per beam that can enter the global top-M, `min(M, V)`.
    per_beam: usize,
}

impl<B: Backend> RecurrentDrafter<B> {
    /// Validates a request and returns its sizes.
    fn check_request(&self, request: &DraftRequest<B>) -> Result<Dims> {
        let cfg = self.config();
        let (width, length) = (request.beam_width, request.beam_length);
        if width == 0 {
            return Err(Error::InvalidSettings(
                "beam width must be at least 1".into(),
            ));
        }
        if length == 0 {
            return Err(Error::InvalidSettings(
                "beam length must be at least 1 (it counts the first token)".into(),
            ));
        }
        if let Some(trained) = cfg.trained_steps
            && length - 1 > trained
        {
            return Err(Error::InvalidSettings(format!(
                "beam length {length} needs {} draft steps, but the draft head was trained for \
                 {trained}",
                length - 1
            )));
        }
        let [batch, hidden] = request.context.dims();
        if hidden != cfg.hidden_size {
            return Err(Error::ShapeMismatch {
                tensor: "context".into(),
                expected: vec![batch, cfg.hidden_size],
                found: vec![batch, hidden],
            });
        }
        if batch == 0 {
            return Err(Error::EmptyInput("draft request with batch size 0".into()));
        }
        let [n_first] = request.first_tokens.dims();
        if n_first != batch {
            return Err(Error::ShapeMismatch {
                tensor: "first_tokens".into(),
                expected: vec![batch],
                found: vec![n_first],
            });
        }
        // What one draft step chooses from: the draft vocabulary when one is set.
        let vocab = self.draft_vocab_size();
        if length > 1 && width > vocab {
            return Err(Error::InvalidSettings(format!(
                "beam width {width} exceeds the {vocab} tokens a draft step chooses from: step 1 \
                 has only that many distinct continuations"
            )));
        }
        // One beam without log-probs: its tokens are each step's best logit, which the warp does
        // not change, so the top 50 it normalises over need not be selected.
        let kept = if width == 1 && !request.needs_log_probs {
            1
        } else {
            WARP_TOP_K.min(vocab)
        };
        Ok(Dims {
            batch,
            width,
            length,
            kept,
            per_beam: width.min(vocab),
        })
    }

    /// Runs beam search (SPEC §2) for a batch.
    ///
    /// # Shapes
    /// - `request.context`: `[B, H]`, `request.first_tokens`: `[B]` (ids below `V`; not checked
    ///   on the device)
    /// - returns tokens `[B, M, C]`, token log-probs `[B, M, C-1]`, scores `[B, M]`
    ///
    /// # Errors
    /// [`Error::InvalidSettings`] for a zero beam width or length, a length beyond the trained
    /// steps, or `M > V`; [`Error::ShapeMismatch`] / [`Error::EmptyInput`] for a malformed
    /// request; [`Error::InvalidConfig`] if the embeddings are not attached.
    pub fn beam_search(&self, request: DraftRequest<B>) -> Result<BeamSearchOutput<B>> {
        let dims = self.check_request(&request)?;
        let stop_below = request.stop_below;
        let embedding = self.input_embedding()?.clone();
        let Dims {
            batch,
            width,
            length,
            ..
        } = dims;
        let hidden = self.config().hidden_size;
        let dtype = self.param_dtype();
        let device = request.context.device();
        let context = request.context.cast(dtype);
        let first = request.first_tokens;

        if length == 1 {
            // Nothing to draft: every beam is just g0.
            let tokens = first.reshape([batch, 1, 1]).expand([batch, width, 1]);
            return Ok(BeamSearchOutput {
                tokens,
                token_log_probs: Tensor::zeros([batch, width, 0], (&device, dtype)),
                scores: Tensor::zeros([batch, width], (&device, dtype)),
            });
        }

        // One beam whose log-probabilities nobody reads, on the CPU: the host walks the steps.
        #[cfg(feature = "flex")]
        if (width, dims.kept) == (1, 1)
            && stop_below.is_none()
            && let Some(tokens) =
                super::cpu_chain::draft_one_beam(self, &embedding, &context, &first, length)
        {
            return Ok(BeamSearchOutput {
                tokens,
                token_log_probs: Tensor::zeros([batch, width, length - 1], (&device, dtype)),
                scores: Tensor::zeros([batch, width], (&device, dtype)),
            });
        }

        if self.fuses(&dims, &device)
            && let Some(output) =
                self.fused_search(&dims, &embedding, context.clone(), first.clone())?
        {
            return Ok(output);
        }

        // Warped logits of placeholder ranks kept..per_beam (only when M > 50), see module docs.
        let placeholder = (dims.per_beam > dims.kept).then(|| {
            let n = dims.per_beam - dims.kept;
            let values: Vec<f32> = (0..n).map(|i| LOG_ZERO - i as f32).collect();
            Tensor::<B, 2>::from_data(TensorData::new(values, [1, n]), (&device, dtype))
        });

        // Step 1 on beam 0 only: state s_0 = 0, input g0.
        let state = Tensor::zeros([batch, hidden], (&device, dtype));
        let Expansion {
            state,
            log_probs,
            ids,
        } = self.expand(
            &dims,
            &embedding,
            context.clone(),
            state,
            first.clone(),
            placeholder.as_ref(),
        )?;
        // A beam's candidates come out sorted, so step 1's top-M are its first M columns.
        let mut scores = log_probs.narrow(1, 0, width); // [B, M]
        let tokens = ids.narrow(1, 0, width); // [B, M]
        let rows = batch * width;
        let mut state = state
            .unsqueeze_dim::<3>(1)
            .expand([batch, width, hidden])
            .reshape([rows, hidden]);
        let first = first.cast(tokens.dtype());
        let mut beams = Tensor::cat(
            vec![
                first
                    .reshape([batch, 1])
                    .expand([batch, width])
                    .reshape([rows, 1]),
                tokens.clone().reshape([rows, 1]),
            ],
            1,
        ); // [B·M, t]
        let mut history = scores.clone().reshape([rows, 1]); // [B·M, t-1]
        let mut last = tokens.reshape([rows]);

        if length > 2 {
            // Context per beam row, materialised once for all remaining steps.
            let context_rows = context
                .unsqueeze_dim::<3>(1)
                .expand([batch, width, hidden])
                .reshape([rows, hidden]);
            // Offset of each batch entry's first beam row, to turn parents into row indices.
            let row_offsets = self
                .top_k_cache
                .row_starts::<B>(batch, width, &device)
                .cast(beams.dtype());
            let candidates = width * dims.per_beam;
            for step in 2..length {
                if let Some(floor) = stop_below
                    && best_score(&scores) < floor
                {
                    // Every beam is already unlikely to be accepted this far: stop drafting.
                    break;
                }
                let Expansion {
                    state: new_state,
                    log_probs,
                    ids,
                } = self.expand(
                    &dims,
                    &embedding,
                    context_rows.clone(),
                    state,
                    last,
                    placeholder.as_ref(),
                )?;
                // [B·M, K] → [B, M·K], adding each parent's running score.
                let total = (log_probs.clone().reshape([batch, width, dims.per_beam])
                    + scores.unsqueeze_dim::<3>(2))
                .reshape([batch, candidates]);
                // [B, M], sorted
                let (top, index) = top_k_cached(total, width, self.top_k, &self.top_k_cache);
                scores = top;
                let parent = index.clone().div_scalar(dims.per_beam as i64);
                let token = ids.reshape([batch, candidates]).gather(1, index.clone());
                let token_lp = log_probs.reshape([batch, candidates]).gather(1, index);
                let parent_rows =
                    (parent.cast(beams.dtype()) + row_offsets.clone()).reshape([rows]);

                // The last step's states are never used: skip their gather (one launch).
                state = if step + 1 < length {
                    new_state.select(0, parent_rows.clone())
                } else {
                    new_state
                };
                beams = Tensor::cat(
                    vec![
                        beams.select(0, parent_rows.clone()),
                        token.clone().reshape([rows, 1]),
                    ],
                    1,
                );
                history = Tensor::cat(
                    vec![history.select(0, parent_rows), token_lp.reshape([rows, 1])],
                    1,
                );
                last = token.reshape([rows]);
            }
        }

        // Fewer than `length` columns when drafting stopped early.
        let drafted = beams.dims()[1];
        Ok(BeamSearchOutput {
            tokens: beams.reshape([batch, width, drafted]),
            token_log_probs: history.reshape([batch, width, drafted - 1]),
            scores,
        })
    }

    /// One draft step for `N` beam rows: advance the state with the last token and return each
    /// row's best `max(kept, per_beam)` logits, sorted descending, with their draft-vocabulary
    /// columns (not yet token ids).
    ///
    /// # Shapes
    /// `context`, `state`: `[N, H]`, `last`: `[N]`; see [`BestLogits`]
    fn best_logits(
        &self,
        dims: &Dims,
        embedding: &Tensor<B, 2>,
        context: Tensor<B, 2>,
        state: Tensor<B, 2>,
        last: Tensor<B, 1, Int>,
    ) -> Result<BestLogits<B>> {
        let token_embedding = embedding.clone().select(0, last).cast(context.dtype());
        let state = self.step(state, token_embedding)?;
        // [N, V], or [N, N_draft] over the draft vocabulary.
        let logits = self.draft_logits(context, state.clone())?;
        let (sorted, columns) = top_k_cached(
            logits,
            dims.kept.max(dims.per_beam),
            self.top_k,
            &self.top_k_cache,
        );
        Ok(BestLogits {
            state,
            sorted,
            columns,
        })
    }

    /// One draft step for `N` beam rows: advance the state with the last token, compute the
    /// warped log-probabilities and return each row's best `per_beam` candidates, sorted.
    ///
    /// # Shapes
    /// `context`, `state`: `[N, H]`, `last`: `[N]` to (state `[N, H]`, log-probs `[N, K]`,
    /// token ids `[N, K]`) with `K = per_beam`.
    fn expand(
        &self,
        dims: &Dims,
        embedding: &Tensor<B, 2>,
        context: Tensor<B, 2>,
        state: Tensor<B, 2>,
        last: Tensor<B, 1, Int>,
        placeholder: Option<&Tensor<B, 2>>,
    ) -> Result<Expansion<B>> {
        let BestLogits {
            state,
            sorted,
            columns: ids,
        } = self.best_logits(dims, embedding, context, state, last)?;
        let rows = sorted.dims()[0];
        let ids = ids.narrow(1, 0, dims.per_beam);
        // Draft-vocabulary indices to token ids.
        let ids = match self.draft_ids() {
            Some(map) => map
                .clone()
                .select(0, ids.reshape([rows * dims.per_beam]))
                .reshape([rows, dims.per_beam]),
            None => ids,
        };

        // Warp: subtract the row max (the first sorted value), normalise over the kept top-k.
        let row_max = sorted.clone().narrow(1, 0, 1);
        let shifted = sorted.narrow(1, 0, dims.kept) - row_max;
        let log_norm = shifted.clone().exp().sum_dim(1).log(); // [N, 1]
        let warped = match placeholder {
            Some(tail) => Tensor::cat(
                vec![
                    shifted,
                    tail.clone().expand([rows, dims.per_beam - dims.kept]),
                ],
                1,
            ),
            None => shifted.narrow(1, 0, dims.per_beam),
        };
        Ok(Expansion {
            state,
            log_probs: warped - log_norm,
            ids,
        })
    }

    /// Whether [`Self::fused_search`] runs this search: the rank top-k on a backend with our
    /// CubeCL kernels, and a beam small enough for [`crate::cube_kernels::beam_advance`].
    fn fuses(&self, dims: &Dims, device: &B::Device) -> bool {
        self.top_k.resolve::<B>(device) == TopKMethod::Rank
            && crate::cube_kernels::applies::<B>()
            && dims.width <= crate::cube_kernels::BEAM_MAX_WIDTH
            && dims.width * dims.per_beam <= crate::cube_kernels::BEAM_MAX_CANDIDATES
    }

    /// One beam per row, drafted in one launch on CUDA ([`crate::cube_kernels::draft_chain`]):
    /// the beams [`Self::fused_search`] drafts in `5 (C − 1) + 1` launches, bit for bit. Applies
    /// to its fast setup — an RNN head whose `W` has no bias, no input projection, a draft
    /// vocabulary with its input table and merged exit; `None` elsewhere, before anything ran.
    ///
    /// # Shapes
    /// `context`: `[B, H]` in the head's dtype, `first`: `[B]`; returns beams of width 1.
    fn chained_search(
        &self,
        embedding: &Tensor<B, 2>,
        context: &Tensor<B, 2>,
        first: &Tensor<B, 1, Int>,
        length: usize,
    ) -> Option<BeamSearchOutput<B>> {
        // Checked first: elsewhere nothing below should run (the cast of `first` is a launch).
        if !self.chains_draft || !crate::cube_kernels::draft_chain_applies::<B>() {
            return None;
        }
        let (w, u) = (self.rnn_w.as_ref()?, self.rnn_u.as_ref()?);
        if w.bias.is_some() || self.input_proj.is_some() {
            return None;
        }
        let tables = self.draft_vocabulary.as_ref()?;
        let (exit, input_table) = (tables.exit.as_ref()?, tables.inputs.as_ref()?);
        let rnn_w = w.weight.val();
        let rnn_u = u.weight.val();
        let rnn_bias = u.bias.as_ref().map(Param::val);
        let blocks: Vec<_> = self
            .res_blocks
            .iter()
            .map(|block| {
                (
                    block.linear.weight.val(),
                    block.linear.bias.as_ref().map(Param::val),
                )
            })
            .collect();
        // The selection's integers are the backend's (its draft ids).
        let int_dtype = <B::IntElem as burn::tensor::Element>::dtype();
        let first = if first.dtype() == int_dtype {
            first.clone()
        } else {
            first.clone().cast(int_dtype)
        };
        let batch = first.dims()[0];
        let output = crate::cube_kernels::draft_chain(crate::cube_kernels::DraftChain {
            context,
            first: &first,
            embedding,
            rnn_w: &rnn_w,
            rnn_u: &rnn_u,
            rnn_bias: rnn_bias.as_ref(),
            blocks: blocks
                .iter()
                .map(|(weight, bias)| (weight, bias.as_ref()))
                .collect(),
            exit,
            input_table,
            draft_ids: &tables.ids,
            length,
        })?;
        Some(BeamSearchOutput {
            tokens: output.tokens.reshape([batch, 1, length]),
            token_log_probs: output.token_log_probs.reshape([batch, 1, length - 1]),
            scores: output.scores.reshape([batch, 1]),
        })
    }

    /// [`Self::beam_search`] with each step's warp, selection and beam bookkeeping in one kernel
    /// ([`crate::cube_kernels::beam_advance`]): the same beams as the composition of Burn's ops
    /// (up to the rounding of the normaliser's sum), in ~15 launches per step instead of ~35.
    /// One beam over an RNN head takes 6 launches a step after the first: its state is carried
    /// joined to its context ([`DraftState`]) and is its own parent (no gather), the selection
    /// kernel picks the best logit itself where nobody reads log-probabilities (no top-k
    /// launch), and with a draft vocabulary it also gathers the next step's RNN input from
    /// [`RecurrentDrafter::draft_inputs`] (no embedding gather, no input product).
    /// `None` if the kernel declines the first step (an unexpected dtype), before anything else
    /// has run.
    ///
    /// # Shapes
    /// As [`Self::beam_search`]; `context` is `[B, H]` in the head's dtype.
    fn fused_search(
        &self,
        dims: &Dims,
        embedding: &Tensor<B, 2>,
        context: Tensor<B, 2>,
        first: Tensor<B, 1, Int>,
    ) -> Result<Option<BeamSearchOutput<B>>> {
        let Dims {
            batch,
            width,
            length,
            kept,
            per_beam,
        } = *dims;
        let hidden = self.config().hidden_size;
        let dtype = context.dtype();
        // One beam whose log-probabilities nobody reads: the selection kernel picks each step's
        // best logit from the whole row.
        let picks = (width, kept, per_beam) == (1, 1, 1);
        let input_table = self.draft_inputs();
        // The logits of a step, then the selection: `(sorted, columns)` of the top-k, or the
        // whole rows and no columns where the kernel picks.
        let select = |logits: Tensor<B, 2>| {
            if picks {
                (logits, None)
            } else {
                let (sorted, columns) =
                    top_k_cached(logits, kept.max(per_beam), self.top_k, &self.top_k_cache);
                (sorted, Some(columns))
            }
        };
        let advance = |sorted: &Tensor<B, 2>,
                       columns: Option<&Tensor<B, 2, Int>>,
                       scores: Option<&Tensor<B, 2>>,
                       beams: &Tensor<B, 2, Int>,
                       history: Option<&Tensor<B, 2>>,
                       last_step: bool| {
            crate::cube_kernels::beam_advance(crate::cube_kernels::BeamStep {
                sorted,
                columns,
                draft_ids: self.draft_ids(),
                scores,
                beams,
                history,
                width,
                kept,
                per_beam,
                // The last step's beams are drafted: nothing reads their next input.
                input_table: input_table.filter(|_| !last_step),
            })
        };

        // A step after the first fed by its tokens' embeddings (every step's without an input
        // table; step 1 starts from the zero state, `first_state`).
        let advance_by_tokens =
            |context: &Tensor<B, 2>, state: DraftState<B>, tokens: Tensor<B, 1, Int>| {
                let token_embedding = embedding.clone().select(0, tokens).cast(dtype);
                self.advance(context, state, token_embedding)
            };

        if picks && let Some(output) = self.chained_search(embedding, &context, &first, length) {
            return Ok(Some(output));
        }

        // Step 1 on beam 0 only (one parent per batch entry): state s_0 = 0, input g0.
        let first_embedding = embedding.clone().select(0, first.clone()).cast(dtype);
        let state = self.first_state(&context, first_embedding)?;
        let (sorted, columns) = select(self.draft_logits_of(context.clone(), state.clone())?);
        // The selection's integers are the backend's (its columns and draft ids).
        let int_dtype = <B::IntElem as burn::tensor::Element>::dtype();
        let beams = first.cast(int_dtype).reshape([batch, 1]);
        let Some(mut step) = advance(&sorted, columns.as_ref(), None, &beams, None, length == 2)
        else {
            return Ok(None);
        };
        let rows = batch * width;
        // Every beam's parent is its batch entry's beam 0: the state of row `b` for all of them.
        // With one beam a row is its own parent (row `b` of batch entry `b`), so the gather
        // would copy the states unchanged: skipped, one launch fewer per step.
        let mut state = if length > 2 && width > 1 {
            state.select(step.parents.clone())
        } else {
            state
        };
        if length > 2 {
            // Context per beam row, materialised once for all remaining steps (one beam's rows
            // are the context's own: no copy, one launch fewer).
            let context_rows = if width == 1 {
                context.clone()
            } else {
                context
                    .unsqueeze_dim::<3>(1)
                    .expand([batch, width, hidden])
                    .reshape([rows, hidden])
            };
            for t in 2..length {
                let new_state = match step.inputs.take() {
                    Some(input) => self.advance_projected(&context_rows, state, input)?,
                    None => advance_by_tokens(&context_rows, state, step.last.clone())?,
                };
                let (sorted, columns) =
                    select(self.draft_logits_of(context_rows.clone(), new_state.clone())?);
                step = advance(
                    &sorted,
                    columns.as_ref(),
                    Some(&step.scores),
                    &step.beams,
                    Some(&step.history),
                    t + 1 == length,
                )
                .ok_or_else(|| {
                    Error::Backend(format!(
                        "the beam-search kernel declined step {t} after taking step 1"
                    ))
                })?;
                // The last step's states are never used: skip their gather (one launch), as
                // with one beam (its own parent, see above).
                state = if t + 1 < length && width > 1 {
                    new_state.select(step.parents.clone())
                } else {
                    new_state
                };
            }
        }
        Ok(Some(BeamSearchOutput {
            tokens: step.beams.reshape([batch, width, length]),
            token_log_probs: step.history.reshape([batch, width, length - 1]),
            scores: step.scores,
        }))
    }
}

/// The best score of any beam of any row (a read of the scores: a sync on the GPUs).
///
/// # Shapes
/// `scores`: `[B, M]`
fn best_score<B: Backend>(scores: &Tensor<B, 2>) -> f32 {
    scores
        .clone()
        .max()
        .into_data()
        .iter::<f32>()
        .next()
        .unwrap_or(f32::NEG_INFINITY)
}

impl<B: Backend> DraftHead<B> for RecurrentDrafter<B> {
    fn hidden_size(&self) -> usize {
        self.config().hidden_size
    }

    fn vocab_size(&self) -> usize {
        self.config().vocab_size
    }

    fn trained_steps(&self) -> Option<usize> {
        self.config().trained_steps
    }

    fn propose(&self, request: DraftRequest<B>) -> Result<DraftBeams<B>> {
        self.beam_search(request).map(Into::into)
    }

    fn tapped_layers(&self) -> &[usize] {
        &self.config().tapped_layers
    }

    fn context(&self, features: Tensor<B, 2>) -> Result<Tensor<B, 2>> {
        RecurrentDrafter::context(self, features)
    }
}
