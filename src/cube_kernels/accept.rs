//! Greedy acceptance of a verified draft tree in one launch.
//!
//! Composed from Burn's ops, finding the beam with the longest run of drafted tokens that match
//! the target's choices took ~20 launches (gather the choices along each beam, compare, a
//! cumulative product, sums, a max with its index, gathers for the end node, the bonus token and
//! the hidden state there). Here one cube per batch row does it: unit `i` walks beam `i` until
//! its first mismatch, the cube keeps the longest run (the lower beam on ties), and the units
//! copy the hidden state at the run's last node for the next draft.

use burn::tensor::backend::Backend;
use burn_cubecl::CubeRuntime;
use cubecl::prelude::*;

use super::GreedyAcceptance;
use super::dispatch::{
    CubeOp, empty_int_like, empty_like, from_cube, from_cube_int, to_cube, to_cube_int,
};
use super::reduce::{Strides2, Strides3, offset2, offset3, scalars, strides2, strides3};

/// Units per cube: beams are walked one per unit (more beams than units take turns).
const UNITS: usize = 128;
/// "No beam yet" (units past the last beam).
const NONE: u32 = u32::MAX;

/// One level of the cube's reduction: unit `u < stride` keeps the longer run of its own and unit
/// `u + stride`'s, the lower beam on ties.
#[cube]
fn fold_longest(
    runs: &mut SharedMemory<u32>,
    beams: &mut SharedMemory<u32>,
    unit: usize,
    #[comptime] stride: usize,
) {
    if unit < stride {
        let other_run = runs[unit + stride];
        let other_beam = beams[unit + stride];
        if other_run > runs[unit] || (other_run == runs[unit] && other_beam < beams[unit]) {
            runs[unit] = other_run;
            beams[unit] = other_beam;
        }
    }
    sync_cube();
}

/// Row `CUBE_POS`: `choices` `[live, L]` (the target's token at each tree node), `unpacker`
/// `[live, M·C]` (the tree node of each beam position), `beams` `[live, M, C]` (token 0 is the
/// verified one, tokens 1.. the drafts), `hidden` `[live, L, H]`; writes `summary` `[live, 2]`
/// (best beam, accepted drafts), `bonus` `[live, 1]` (the target's token after them) and
/// `context` `[live, H]` (the hidden state at the last accepted node). Inputs are read through
/// their strides, outputs are row-major; `beam_count` is `M`, `length` `C` and `width` `H`.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn greedy_accept_kernel<F: Float, I: Int>(
    choices: &Array<I>,
    unpacker: &Array<I>,
    beams: &Array<I>,
    hidden: &Array<F>,
    summary: &mut Array<I>,
    bonus: &mut Array<I>,
    context: &mut Array<F>,
    choices_strides: &Strides2,
    unpacker_strides: &Strides2,
    beams_strides: &Strides3,
    hidden_strides: &Strides3,
    live: u32,
    beam_count: u32,
    length: u32,
    width: u32,
    #[define(F, I)] _dtypes: [StorageType; 2],
) {
    let row = CUBE_POS;
    if row >= live as usize {
        terminate!();
    }
    let (beam_count, length) = (beam_count as usize, length as usize);
    let unit = UNIT_POS_X as usize;
    let mut runs = SharedMemory::<u32>::new(UNITS);
    let mut best_beams = SharedMemory::<u32>::new(UNITS);

    let mut best_run = u32::new(0);
    let mut best_beam = u32::new(NONE as i64);
    let mut beam = unit;
    while beam < beam_count {
        let mut run = u32::new(0);
        let mut matching = true;
        for k in 0..length - 1 {
            if matching {
                let node =
                    usize::cast_from(unpacker[offset2(unpacker_strides, row, beam * length + k)]);
                let drafted = beams[offset3(beams_strides, row, beam, k + 1)];
                if choices[offset2(choices_strides, row, node)] == drafted {
                    run += 1;
                } else {
                    matching = false;
                }
            }
        }
        // Beams come in increasing order: only a longer run replaces the unit's best.
        if best_beam == NONE || run > best_run {
            best_run = run;
            best_beam = u32::cast_from(beam);
        }
        beam += UNITS;
    }
    runs[unit] = best_run;
    best_beams[unit] = best_beam;
    sync_cube();
    fold_longest(&mut runs, &mut best_beams, unit, 64usize);
    fold_longest(&mut runs, &mut best_beams, unit, 32usize);
    fold_longest(&mut runs, &mut best_beams, unit, 16usize);
    fold_longest(&mut runs, &mut best_beams, unit, 8usize);
    fold_longest(&mut runs, &mut best_beams, unit, 4usize);
    fold_longest(&mut runs, &mut best_beams, unit, 2usize);
    fold_longest(&mut runs, &mut best_beams, unit, 1usize);
    let accepted = usize::cast_from(runs[0]);
    let winner = usize::cast_from(best_beams[0]);
    let end =
        usize::cast_from(unpacker[offset2(unpacker_strides, row, winner * length + accepted)]);
    if unit == 0 {
        summary[row * 2] = I::cast_from(winner);
        summary[row * 2 + 1] = I::cast_from(accepted);
        bonus[row] = choices[offset2(choices_strides, row, end)];
    }
    let width = width as usize;
    let mut column = unit;
    while column < width {
        context[row * width + column] = hidden[offset3(hidden_strides, row, end, column)];
        column += UNITS;
    }
}

impl<B: Backend> CubeOp<B> for GreedyAcceptance<'_, B> {
    type Output = (
        burn::tensor::Tensor<B, 2, burn::tensor::Int>,
        burn::tensor::Tensor<B, 1, burn::tensor::Int>,
        burn::tensor::Tensor<B, 2>,
    );

    fn launch<R: CubeRuntime>(self) -> Option<Self::Output> {
        let [live, nodes] = self.choices.dims();
        let [beam_live, beam_count, length] = self.beams.dims();
        let [hidden_live, hidden_nodes, width] = self.hidden.dims();
        if live == 0
            || beam_count == 0
            || length == 0
            || width == 0
            || beam_live != live
            || hidden_live != live
            || hidden_nodes != nodes
            || self.unpacker.dims() != [live, beam_count * length]
        {
            return None;
        }
        let choices = to_cube_int::<R, B, 2>(self.choices)?;
        let unpacker = to_cube_int::<R, B, 2>(self.unpacker)?;
        let beams = to_cube_int::<R, B, 3>(self.beams)?;
        let hidden = to_cube::<R, B, 3>(self.hidden)?;
        let int_dtype = choices.dtype;
        if unpacker.dtype != int_dtype || beams.dtype != int_dtype {
            return None;
        }
        let int_empty = |dims: [usize; 2]| empty_int_like(&choices, dims, int_dtype);
        let summary = int_empty([live, 2]);
        let bonus = int_empty([live, 1]);
        let context = empty_like(&hidden, [live, width]);
        let (client, dtype) = (hidden.client.clone(), hidden.dtype);
        let (choices_strides, unpacker_strides) = (strides2(&choices)?, strides2(&unpacker)?);
        let (beams_strides, hidden_strides) = (strides3(&beams)?, strides3(&hidden)?);
        let [live_arg, beam_count, length, width] = scalars(&[live, beam_count, length, width])?;
        // Arrays bound at the tensors' offsets, the inputs read through the strides above.
        unsafe {
            greedy_accept_kernel::launch_unchecked::<R>(
                &client,
                super::dispatch::row_grid(live),
                CubeDim::new_1d(UNITS as u32),
                choices.into_array_arg(),
                unpacker.into_array_arg(),
                beams.into_array_arg(),
                hidden.into_array_arg(),
                summary.clone().into_array_arg(),
                bonus.clone().into_array_arg(),
                context.clone().into_array_arg(),
                choices_strides,
                unpacker_strides,
                beams_strides,
                hidden_strides,
                live_arg,
                beam_count,
                length,
                width,
                [dtype.into(), int_dtype.into()],
            )
        };
        Some((
            from_cube_int::<R, B, 2>(summary)?,
            from_cube_int::<R, B, 2>(bonus)?.reshape([live]),
            from_cube::<R, B, 2>(context)?,
        ))
    }
}
