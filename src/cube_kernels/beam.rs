//! One selection step of the draft head's beam search in one launch.
//!
//! After the head's top-k kernel, a step of beam search on Burn's ops warped each parent's
//! candidates (subtract the row maximum, normalise over the kept top 50), added the parents'
//! running scores, picked the best `M` of all candidates, mapped draft-vocabulary indices to token
//! ids and gathered each new beam's tokens and log-probabilities from its parent: ~20 launches of
//! a few hundred elements each, per step, on a GPU that charges ~18 µs a launch. Here one cube per
//! batch entry does all of it:
//!
//! 1. one unit per parent sums `exp(logit − max)` over the kept logits in order and takes the log;
//! 2. every unit holds a share of the `P · per_beam` candidates' scores in registers;
//! 3. `M` picks, each the best candidate after the previous one in the order (score descending,
//!    candidate ascending) — ties go to the lower candidate, as the rank top-k breaks them;
//! 4. the units write the new beams: scores, parent rows, last tokens, and each beam's tokens and
//!    log-probabilities copied from its parent with the new ones appended.
//!
//! Candidate `c` is parent `c / per_beam`'s `c % per_beam`-th best logit, the order in which the
//! Burn composition lays them out, so both select the same beams (up to the rounding of the
//! normaliser's sum).

use burn::tensor::backend::Backend;
use burn_cubecl::{CubeRuntime, tensor::CubeTensor};
use cubecl::prelude::*;

use super::dispatch::{
    CubeOp, empty_int_like, empty_like, from_cube, from_cube_int, to_cube, to_cube_int,
};
use super::reduce::{
    NO_COLUMN, PICK_UNITS, Strides2, cube_pick, improves, offset2, scalars, strides2,
};
use super::{BeamAdvance, BeamStep};
use crate::drafter::LOG_ZERO;

/// Candidates per unit held in registers: a step chooses among at most `PICK_UNITS · HELD` = 4,096
/// candidates (beam width 64 with 64 candidates per beam).
const HELD: usize = 16;
const _: () = assert!(super::BEAM_MAX_CANDIDATES == PICK_UNITS * HELD);
// The picks and the parents' normalisers are kept in shared memory, one per unit.
const _: () = assert!(super::BEAM_MAX_WIDTH == PICK_UNITS);

/// Parent `row`'s warped log-probability of its `j`-th best logit: `logit − max − log_norm` for
/// the kept logits, the placeholder `LOG_ZERO − (j − kept) − log_norm` past them.
#[cube]
fn warped<F: Float>(
    sorted: &Array<F>,
    strides: &Strides2,
    row: usize,
    j: usize,
    kept: usize,
    log_norm: f32,
) -> f32 {
    let top = f32::cast_from(sorted[offset2(strides, row, 0)]);
    let mut shifted = f32::new(LOG_ZERO) - f32::cast_from(j) + f32::cast_from(kept);
    if j < kept {
        shifted = f32::cast_from(sorted[offset2(strides, row, j)]) - top;
    }
    shifted - log_norm
}

/// One beam-search selection for batch entry `CUBE_POS`. See the module documentation.
///
/// `sorted`/`columns` `[B·P, K]` (each parent's best logits, descending, and their draft
/// indices), `draft_ids` `[1, Vd]` (read if `mapped`), `scores_in` `[B, P]` (read if
/// `with_scores`, else zeros), `beams_in` `[B·P, t]`, `history_in` `[B·P, t − 1]` (read if
/// `with_history`); outputs `scores_out` `[B, M]`, `beams_out` `[B·M, t + 1]`, `history_out`
/// `[B·M, t]`, `parents` and `last` `[B·M, 1]`. Inputs are read through their strides (only
/// `draft_ids`' column stride matters), outputs are row-major; `batches` is `B`, `width` `M`,
/// `parent_count` `P` and `length` `t`.
///
/// Like the other per-round kernels, it takes `Array`s and scalar shapes and strides, not
/// `Tensor`s, whose metadata CubeCL copies to the device at every launch (docs/benchmarks.md,
/// session 17).
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn beam_advance_kernel<F: Float, I: Int>(
    sorted: &Array<F>,
    columns: &Array<I>,
    draft_ids: &Array<I>,
    scores_in: &Array<F>,
    beams_in: &Array<I>,
    history_in: &Array<F>,
    scores_out: &mut Array<F>,
    beams_out: &mut Array<I>,
    history_out: &mut Array<F>,
    parents: &mut Array<I>,
    last: &mut Array<I>,
    sorted_strides: &Strides2,
    columns_strides: &Strides2,
    draft_ids_stride: u32,
    scores_strides: &Strides2,
    beams_strides: &Strides2,
    history_strides: &Strides2,
    batches: u32,
    width: u32,
    parent_count: u32,
    length: u32,
    kept: u32,
    per_beam: u32,
    #[comptime] mapped: bool,
    #[comptime] with_scores: bool,
    #[comptime] with_history: bool,
    #[define(F, I)] _dtypes: [StorageType; 2],
) {
    let batch = CUBE_POS;
    if batch >= batches as usize {
        terminate!();
    }
    let (width, parent_count, length) = (width as usize, parent_count as usize, length as usize);
    let (kept, per_beam) = (kept as usize, per_beam as usize);
    let unit = UNIT_POS_X as usize;
    let mut log_norms = SharedMemory::<f32>::new(PICK_UNITS);
    let mut pick_values = SharedMemory::<f32>::new(PICK_UNITS);
    let mut pick_candidates = SharedMemory::<u32>::new(PICK_UNITS);
    let mut chosen = SharedMemory::<u32>::new(PICK_UNITS);
    let mut chosen_values = SharedMemory::<f32>::new(PICK_UNITS);

    // 1. Each parent's normaliser over its kept logits, summed in order.
    if unit < parent_count {
        let row = batch * parent_count + unit;
        let top = f32::cast_from(sorted[offset2(sorted_strides, row, 0)]);
        let mut total = f32::new(0.0);
        for j in 0..kept {
            total += (f32::cast_from(sorted[offset2(sorted_strides, row, j)]) - top).exp();
        }
        log_norms[unit] = total.ln();
    }
    sync_cube();

    // 2. The candidates' scores, a share per unit, in registers.
    let candidate_count = parent_count * per_beam;
    let mut held = Array::<f32>::new(HELD);
    #[unroll]
    for i in 0..HELD {
        let candidate = i * PICK_UNITS + unit;
        held[i] = f32::new(-3.4e38);
        if candidate < candidate_count {
            let parent = candidate / per_beam;
            let row = batch * parent_count + parent;
            let mut score = warped(
                sorted,
                sorted_strides,
                row,
                candidate % per_beam,
                kept,
                log_norms[parent],
            );
            if with_scores {
                score += f32::cast_from(scores_in[offset2(scores_strides, batch, parent)]);
            }
            held[i] = score;
        }
    }

    // 3. The best `width` candidates, one pick at a time.
    let mut previous_value = f32::new(0.0);
    let mut previous = u32::new(NO_COLUMN as i64);
    for pick in 0..width {
        let mut best_value = f32::new(-3.4e38);
        let mut best = u32::new(NO_COLUMN as i64);
        #[unroll]
        for i in 0..HELD {
            let candidate = i * PICK_UNITS + unit;
            let value = held[i];
            let c = u32::cast_from(candidate);
            if candidate < candidate_count
                && improves(value, c, pick, previous_value, previous, best_value, best)
            {
                best_value = value;
                best = c;
            }
        }
        cube_pick(
            &mut pick_values,
            &mut pick_candidates,
            unit,
            best_value,
            best,
        );
        previous_value = pick_values[0];
        previous = pick_candidates[0];
        if unit == 0 {
            chosen[pick] = previous;
            chosen_values[pick] = previous_value;
        }
        // Nobody may overwrite the shared memory before every unit has read the pick.
        sync_cube();
    }

    // 4. The new beams.
    if unit < width {
        let candidate = usize::cast_from(chosen[unit]);
        let parent = candidate / per_beam;
        let j = candidate % per_beam;
        let row = batch * parent_count + parent;
        let beam = batch * width + unit;
        let mut token = columns[offset2(columns_strides, row, j)];
        if mapped {
            token = draft_ids[usize::cast_from(token) * (draft_ids_stride as usize)];
        }
        scores_out[batch * width + unit] = F::cast_from(chosen_values[unit]);
        parents[beam] = I::cast_from(row);
        last[beam] = token;
        beams_out[beam * (length + 1) + length] = token;
        history_out[beam * length + length - 1] = F::cast_from(warped(
            sorted,
            sorted_strides,
            row,
            j,
            kept,
            log_norms[parent],
        ));
    }
    // Each beam's earlier tokens and log-probabilities, copied from its parent.
    let mut e = unit;
    while e < width * length {
        let beam = e / length;
        let column = e % length;
        let parent_row = batch * parent_count + usize::cast_from(chosen[beam]) / per_beam;
        let out_row = batch * width + beam;
        beams_out[out_row * (length + 1) + column] =
            beams_in[offset2(beams_strides, parent_row, column)];
        if with_history && column + 1 < length {
            history_out[out_row * length + column] =
                history_in[offset2(history_strides, parent_row, column)];
        }
        e += PICK_UNITS;
    }
}

impl<B: Backend> CubeOp<B> for BeamStep<'_, B> {
    type Output = BeamAdvance<B>;

    fn launch<R: CubeRuntime>(self) -> Option<Self::Output> {
        let [rows, k] = self.sorted.dims();
        let [beam_rows, length] = self.beams.dims();
        let (width, kept, per_beam) = (self.width, self.kept, self.per_beam);
        if rows == 0 || beam_rows != rows || self.columns.dims() != [rows, k] {
            return None;
        }
        let batch = match self.scores {
            Some(scores) => scores.dims()[0],
            None => rows,
        };
        let parent_count = rows / batch.max(1);
        if batch == 0
            || parent_count * batch != rows
            || parent_count > super::BEAM_MAX_WIDTH
            || width == 0
            || width > super::BEAM_MAX_WIDTH
            || kept == 0
            || kept > k
            || per_beam > k
            || width > parent_count * per_beam
            || parent_count * per_beam > super::BEAM_MAX_CANDIDATES
            || length == 0
            || self
                .scores
                .is_some_and(|s| s.dims() != [batch, parent_count])
            || self.history.is_some_and(|h| h.dims() != [rows, length - 1])
            || (self.history.is_none() && length != 1)
        {
            return None;
        }
        let sorted = to_cube::<R, B, 2>(self.sorted)?;
        let columns = to_cube_int::<R, B, 2>(self.columns)?;
        let beams_in = to_cube_int::<R, B, 2>(self.beams)?;
        let draft_ids = match self.draft_ids {
            Some(ids) => Some(to_cube_int::<R, B, 2>(&ids.clone().unsqueeze_dim::<2>(0))?),
            None => None,
        };
        let scores_in = match self.scores {
            Some(scores) => Some(to_cube::<R, B, 2>(scores)?),
            None => None,
        };
        let history_in = match self.history {
            Some(history) => Some(to_cube::<R, B, 2>(history)?),
            None => None,
        };
        let (dtype, int_dtype) = (sorted.dtype, columns.dtype);
        if beams_in.dtype != int_dtype
            || draft_ids.as_ref().is_some_and(|ids| ids.dtype != int_dtype)
            || [&scores_in, &history_in]
                .into_iter()
                .flatten()
                .any(|t| t.dtype != dtype)
        {
            return None;
        }
        let int_empty = |dims: [usize; 2]| empty_int_like(&sorted, dims, int_dtype);
        let out_rows = batch * width;
        let scores_out = empty_like(&sorted, [batch, width]);
        let history_out = empty_like(&sorted, [out_rows, length]);
        let beams_out = int_empty([out_rows, length + 1]);
        let parents = int_empty([out_rows, 1]);
        let last = int_empty([out_rows, 1]);
        let (mapped, with_scores, with_history) = (
            draft_ids.is_some(),
            scores_in.is_some(),
            history_in.is_some(),
        );
        // Absent inputs are not read: any tensor of the right type stands in for them.
        let or_sorted = |t: Option<CubeTensor<R>>| t.unwrap_or_else(|| sorted.clone());
        let draft_ids = draft_ids.unwrap_or_else(|| columns.clone());
        let (scores_in, history_in) = (or_sorted(scores_in), or_sorted(history_in));
        let (sorted_strides, columns_strides) = (strides2(&sorted)?, strides2(&columns)?);
        let [_, draft_ids_stride] = scalars(draft_ids.meta.strides())?;
        let (scores_strides, beams_strides) = (strides2(&scores_in)?, strides2(&beams_in)?);
        let history_strides = strides2(&history_in)?;
        let [batches, width, parent_count, length, kept, per_beam] =
            scalars(&[batch, width, parent_count, length, kept, per_beam])?;
        let client = sorted.client.clone();
        // Arrays bound at the tensors' offsets, the inputs read through the strides above.
        unsafe {
            beam_advance_kernel::launch_unchecked::<R>(
                &client,
                super::dispatch::row_grid(batch),
                CubeDim::new_1d(PICK_UNITS as u32),
                sorted.clone().into_array_arg(),
                columns.into_array_arg(),
                draft_ids.into_array_arg(),
                scores_in.into_array_arg(),
                beams_in.into_array_arg(),
                history_in.into_array_arg(),
                scores_out.clone().into_array_arg(),
                beams_out.clone().into_array_arg(),
                history_out.clone().into_array_arg(),
                parents.clone().into_array_arg(),
                last.clone().into_array_arg(),
                sorted_strides,
                columns_strides,
                draft_ids_stride,
                scores_strides,
                beams_strides,
                history_strides,
                batches,
                width,
                parent_count,
                length,
                kept,
                per_beam,
                mapped,
                with_scores,
                with_history,
                [dtype.into(), int_dtype.into()],
            )
        };
        Some(BeamAdvance {
            scores: from_cube::<R, B, 2>(scores_out)?,
            beams: from_cube_int::<R, B, 2>(beams_out)?,
            history: from_cube::<R, B, 2>(history_out)?,
            parents: from_cube_int::<R, B, 2>(parents)?.reshape([out_rows]),
            last: from_cube_int::<R, B, 2>(last)?.reshape([out_rows]),
        })
    }
}
