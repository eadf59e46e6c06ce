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
/// Entries of the shared memory that hands a row's pick to every unit (`pick_row`).
const PICKED: usize = 1;

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
/// - `pick_row` (one beam, one parent, `kept` and `per_beam` 1): `sorted` is each parent's whole
///   row of `row_width` logits and steps 1–3 are one pick over it (`columns` is not read).
/// - `gather_inputs`: `inputs_out` `[B·M, hidden]` gets row `column` of `input_table` for each
///   new beam (its draft index, before the mapping to a token id).
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
    input_table: &Array<F>,
    inputs_out: &mut Array<F>,
    sorted_strides: &Strides2,
    columns_strides: &Strides2,
    draft_ids_stride: u32,
    scores_strides: &Strides2,
    beams_strides: &Strides2,
    history_strides: &Strides2,
    input_strides: &Strides2,
    batches: u32,
    width: u32,
    parent_count: u32,
    length: u32,
    kept: u32,
    per_beam: u32,
    row_width: u32,
    hidden: u32,
    #[comptime] mapped: bool,
    #[comptime] with_scores: bool,
    #[comptime] with_history: bool,
    #[comptime] pick_row: bool,
    #[comptime] gather_inputs: bool,
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

    // With `pick_row`, the picked column and its warped log-probability (one parent, one beam).
    let mut picked = SharedMemory::<u32>::new(PICKED);
    let mut picked_log_prob = SharedMemory::<f32>::new(PICKED);
    // With `gather_inputs`, each new beam's row of `input_table`.
    let mut input_rows = SharedMemory::<u32>::new(PICK_UNITS);

    if pick_row {
        // One beam whose log-probabilities nobody reads (`width`, `parent_count`, `kept` and
        // `per_beam` all 1): `sorted` is the parent's whole row of logits and the pick is its
        // best entry, ties to the lower column — what `top_k` with `k = 1` would have passed in
        // as the row's first sorted entry. The warp over one kept logit, written as steps 1–2
        // compute it, gives the same bits.
        let row = batch;
        let mut best_value = f32::new(-3.4e38);
        let mut best = u32::new(NO_COLUMN as i64);
        let mut column = unit;
        while column < row_width as usize {
            let value = f32::cast_from(sorted[offset2(sorted_strides, row, column)]);
            let c = u32::cast_from(column);
            let none = u32::new(NO_COLUMN as i64);
            if improves(
                value,
                c,
                usize::new(0),
                f32::new(0.0),
                none,
                best_value,
                best,
            ) {
                best_value = value;
                best = c;
            }
            column += PICK_UNITS;
        }
        cube_pick(
            &mut pick_values,
            &mut pick_candidates,
            unit,
            best_value,
            best,
        );
        if unit == 0 {
            let top = pick_values[0];
            // `logit − max` for the max itself: 0, or NaN for an infinite logit, as in step 2.
            #[allow(clippy::eq_op)]
            let shifted = top - top;
            let log_prob = shifted - (f32::new(0.0) + shifted.exp()).ln();
            let mut score = log_prob;
            if with_scores {
                score += f32::cast_from(scores_in[offset2(scores_strides, batch, 0)]);
            }
            chosen[0] = u32::new(0);
            chosen_values[0] = score;
            picked[0] = pick_candidates[0];
            picked_log_prob[0] = log_prob;
        }
        sync_cube();
    } else {
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
    }

    // 4. The new beams.
    if unit < width {
        let candidate = usize::cast_from(chosen[unit]);
        let parent = candidate / per_beam;
        let j = candidate % per_beam;
        let row = batch * parent_count + parent;
        let beam = batch * width + unit;
        let column = if pick_row {
            I::cast_from(picked[0])
        } else {
            columns[offset2(columns_strides, row, j)]
        };
        let log_prob = if pick_row {
            picked_log_prob[0]
        } else {
            warped(sorted, sorted_strides, row, j, kept, log_norms[parent])
        };
        let mut token = column;
        if mapped {
            token = draft_ids[usize::cast_from(column) * (draft_ids_stride as usize)];
        }
        if gather_inputs {
            input_rows[unit] = u32::cast_from(column);
        }
        scores_out[batch * width + unit] = F::cast_from(chosen_values[unit]);
        parents[beam] = I::cast_from(row);
        last[beam] = token;
        beams_out[beam * (length + 1) + length] = token;
        history_out[beam * length + length - 1] = F::cast_from(log_prob);
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
    // Each new beam's row of the input table (the next step's RNN input), by its column.
    if gather_inputs {
        sync_cube();
        let hidden = hidden as usize;
        let mut e = unit;
        while e < width * hidden {
            let beam = e / hidden;
            let column = e % hidden;
            let source = usize::cast_from(input_rows[beam]);
            inputs_out[(batch * width + beam) * hidden + column] =
                input_table[offset2(input_strides, source, column)];
            e += PICK_UNITS;
        }
    }
}

impl<B: Backend> CubeOp<B> for BeamStep<'_, B> {
    type Output = BeamAdvance<B>;

    fn launch<R: CubeRuntime>(self) -> Option<Self::Output> {
        let [rows, k] = self.sorted.dims();
        let [beam_rows, length] = self.beams.dims();
        let (width, kept, per_beam) = (self.width, self.kept, self.per_beam);
        let pick_row = self.columns.is_none();
        if rows == 0
            || beam_rows != rows
            || self
                .columns
                .is_some_and(|columns| columns.dims() != [rows, k])
        {
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
            || (pick_row && (width, parent_count, kept, per_beam) != (1, 1, 1, 1))
            || self
                .scores
                .is_some_and(|s| s.dims() != [batch, parent_count])
            || self.history.is_some_and(|h| h.dims() != [rows, length - 1])
            || (self.history.is_none() && length != 1)
        {
            return None;
        }
        let sorted = to_cube::<R, B, 2>(self.sorted)?;
        let beams_in = to_cube_int::<R, B, 2>(self.beams)?;
        let columns = match self.columns {
            Some(columns) => to_cube_int::<R, B, 2>(columns)?,
            // Not read: the beams stand in.
            None => beams_in.clone(),
        };
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
        let input_table = match self.input_table {
            Some(table) => Some(to_cube::<R, B, 2>(table)?),
            None => None,
        };
        let hidden = input_table
            .as_ref()
            .map_or(0, |table| table.meta.shape()[1]);
        let (dtype, int_dtype) = (sorted.dtype, columns.dtype);
        if beams_in.dtype != int_dtype
            || draft_ids.as_ref().is_some_and(|ids| ids.dtype != int_dtype)
            || [&scores_in, &history_in, &input_table]
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
        let inputs_out = input_table
            .as_ref()
            .map(|_| empty_like(&sorted, [out_rows, hidden]));
        let (mapped, with_scores, with_history, gather_inputs) = (
            draft_ids.is_some(),
            scores_in.is_some(),
            history_in.is_some(),
            input_table.is_some(),
        );
        // Absent inputs are not read: any tensor of the right type stands in for them.
        let or_sorted = |t: Option<CubeTensor<R>>| t.unwrap_or_else(|| sorted.clone());
        let draft_ids = draft_ids.unwrap_or_else(|| columns.clone());
        let (scores_in, history_in) = (or_sorted(scores_in), or_sorted(history_in));
        let input_table = or_sorted(input_table);
        let inputs_target = inputs_out.clone().unwrap_or_else(|| sorted.clone());
        let (sorted_strides, columns_strides) = (strides2(&sorted)?, strides2(&columns)?);
        let [_, draft_ids_stride] = scalars(draft_ids.meta.strides())?;
        let (scores_strides, beams_strides) = (strides2(&scores_in)?, strides2(&beams_in)?);
        let (history_strides, input_strides) = (strides2(&history_in)?, strides2(&input_table)?);
        let [
            batches,
            width,
            parent_count,
            length,
            kept,
            per_beam,
            row_width,
            hidden,
        ] = scalars(&[
            batch,
            width,
            parent_count,
            length,
            kept,
            per_beam,
            k,
            hidden,
        ])?;
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
                input_table.into_array_arg(),
                inputs_target.into_array_arg(),
                sorted_strides,
                columns_strides,
                draft_ids_stride,
                scores_strides,
                beams_strides,
                history_strides,
                input_strides,
                batches,
                width,
                parent_count,
                length,
                kept,
                per_beam,
                row_width,
                hidden,
                mapped,
                with_scores,
                with_history,
                pick_row,
                gather_inputs,
                [dtype.into(), int_dtype.into()],
            )
        };
        Some(BeamAdvance {
            scores: from_cube::<R, B, 2>(scores_out)?,
            beams: from_cube_int::<R, B, 2>(beams_out)?,
            history: from_cube::<R, B, 2>(history_out)?,
            parents: from_cube_int::<R, B, 2>(parents)?.reshape([out_rows]),
            last: from_cube_int::<R, B, 2>(last)?.reshape([out_rows]),
            inputs: match inputs_out {
                Some(inputs) => Some(from_cube::<R, B, 2>(inputs)?),
                None => None,
            },
        })
    }
}
