//! Committing a verified block: every row's accepted KV-cache slots moved in one launch.
//!
//! With Burn's ops, each row whose accepted slots were not already in place cost an index upload,
//! and for keys and for values a gather (an allocation and a launch) and a region write (a
//! launch): four launches per moved row, each costing the host ~10–15 µs, for a few kilobytes of
//! data. Here one launch moves the keys and values of every layer and row, from one small upload
//! that lists each row's destination and source slots.

use burn::tensor::backend::Backend;
use burn_cubecl::CubeRuntime;
use cubecl::{calculate_cube_count_elemwise, prelude::*};

use super::SlotMoves;
use super::dispatch::{CubeOp, to_cube, to_cube_int};
use super::reduce::{Strides5, offset5, scalars, strides5};
use crate::generate::int_tensor;

/// Entries of a move's record before its source slots: row, destination slot, slot count.
const HEADER: usize = 3;

/// One unit per element `(layer, move, head, d)` of the slots moved: copies element `d` of
/// `keys` and `values` `[layers, batch, kv_heads, slots, dim]` from each source slot of move `m`
/// to its destination slot, in the move's order. `moves` holds `move_count` records of `width`
/// entries, `[row, dest, count, source_0, …, source_{count − 1}, padding…]`; source `i` goes to
/// slot `dest + i`.
///
/// The unit walks its slots in ascending order, and that order is what makes the move safe in
/// place: sources are increasing and never before their destinations (`dest + i ≤ source_i`),
/// so a write never clobbers a source still to be read. Units therefore split the work across
/// layers, rows, heads and head elements, never across the slots of a move.
#[allow(clippy::too_many_arguments)]
#[cube(launch_unchecked)]
fn move_slots_kernel<F: Float, I: Int>(
    keys: &mut Array<F>,
    values: &mut Array<F>,
    moves: &Array<I>,
    keys_strides: &Strides5,
    values_strides: &Strides5,
    units: u32,
    move_count: u32,
    kv_heads: u32,
    dim: u32,
    width: u32,
    #[define(F, I)] _dtypes: [StorageType; 2],
) {
    if ABSOLUTE_POS >= units as usize {
        terminate!();
    }
    let (move_count, kv_heads, dim) = (move_count as usize, kv_heads as usize, dim as usize);
    let d = ABSOLUTE_POS % dim;
    let rest = ABSOLUTE_POS / dim;
    let head = rest % kv_heads;
    let rest = rest / kv_heads;
    let m = rest % move_count;
    let layer = rest / move_count;
    let record = m * (width as usize);
    let row = usize::cast_from(moves[record]);
    let dest = usize::cast_from(moves[record + 1]);
    let count = usize::cast_from(moves[record + 2]);
    for i in 0..count {
        let source = usize::cast_from(moves[record + HEADER + i]);
        keys[offset5(keys_strides, layer, row, head, dest + i, d)] =
            keys[offset5(keys_strides, layer, row, head, source, d)];
        values[offset5(values_strides, layer, row, head, dest + i, d)] =
            values[offset5(values_strides, layer, row, head, source, d)];
    }
}

impl<B: Backend> CubeOp<B> for SlotMoves<'_, B> {
    type Output = ();

    fn launch<R: CubeRuntime>(self) -> Option<()> {
        let [layers, batch, kv_heads, slots, dim] = self.keys.dims();
        let moves = self.moves;
        let longest = moves.iter().map(|m| m.sources.len()).max()?;
        if self.values.dims() != self.keys.dims()
            || layers == 0
            || kv_heads == 0
            || dim == 0
            || moves.windows(2).any(|pair| pair[0].row >= pair[1].row)
            || moves.iter().any(|m| {
                m.row >= batch
                    || m.dest + m.sources.len() > slots
                    || m.sources.first().is_none_or(|&first| m.dest > first)
                    || m.sources.windows(2).any(|pair| pair[0] >= pair[1])
                    || m.sources.last().is_some_and(|&last| last >= slots)
            })
        {
            return None;
        }
        let keys = to_cube::<R, B, 5>(self.keys)?;
        let values = to_cube::<R, B, 5>(self.values)?;
        if values.dtype != keys.dtype {
            return None;
        }
        let width = HEADER + longest;
        let units = layers * moves.len() * kv_heads * dim;
        let (keys_strides, values_strides) = (strides5(&keys)?, strides5(&values)?);
        let [units_arg, move_count, kv_heads, dim, width_arg] =
            scalars(&[units, moves.len(), kv_heads, dim, width])?;
        let mut records = vec![0i64; moves.len() * width];
        for (record, m) in records.chunks_exact_mut(width).zip(moves) {
            record[0] = m.row as i64;
            record[1] = m.dest as i64;
            record[2] = m.sources.len() as i64;
            for (entry, &source) in record[HEADER..].iter_mut().zip(&m.sources) {
                *entry = source as i64;
            }
        }
        let records_len = records.len();
        let records = int_tensor::<B, 1>(records, [records_len], &self.keys.device());
        let records = to_cube_int::<R, B, 1>(&records)?;
        let (client, dtype, int_dtype) = (keys.client.clone(), keys.dtype, records.dtype);
        let cube_dim = CubeDim::new(&client, units);
        let cube_count = calculate_cube_count_elemwise(&client, units, cube_dim);
        // Arrays bound at the tensors' offsets, the storage addressed through its strides; the
        // records are a fresh contiguous 1-D tensor. The storage's buffers are written in place,
        // as the cache's appends write them.
        unsafe {
            move_slots_kernel::launch_unchecked::<R>(
                &client,
                cube_count,
                cube_dim,
                keys.into_array_arg(),
                values.into_array_arg(),
                records.into_array_arg(),
                keys_strides,
                values_strides,
                units_arg,
                move_count,
                kv_heads,
                dim,
                width_arg,
                [dtype.into(), int_dtype.into()],
            )
        };
        Some(())
    }
}
