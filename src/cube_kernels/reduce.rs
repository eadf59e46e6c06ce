//! Reductions across the units of one cube, for kernels that give each row a cube.

use burn_cubecl::{CubeRuntime, tensor::CubeTensor};
use cubecl::prelude::*;

/// Units per cube in the row kernels. Rows are a few hundred to a few thousand wide (hidden size,
/// attention slots): 128 units keep every unit busy on a handful of elements.
pub(super) const ROW_UNITS: usize = 128;

/// The position of element `(row, column)` of a 2-D tensor in its buffer. Tensors from CubeCL's
/// allocator may have padded rows (a row stride above the width), so kernels index through the
/// strides, never with `row * width`.
#[cube]
pub(super) fn at<E: CubePrimitive>(tensor: &Tensor<E>, row: usize, column: usize) -> usize {
    row * tensor.stride(0) + column * tensor.stride(1)
}

/// The strides of a 2-D tensor as scalar kernel arguments, for kernels that take their buffers as
/// `Array`s: a launch binding a `Tensor` costs the host ~5 µs more on the H200, as CubeCL copies
/// every tensor's shape and strides into a fresh device buffer while scalars travel in the
/// launch's constant block (docs/benchmarks.md, session 17).
#[derive(CubeLaunch, CubeType)]
pub(super) struct Strides2 {
    s0: u32,
    s1: u32,
}

/// The strides of a 3-D tensor as scalar kernel arguments (see [`Strides2`]).
#[derive(CubeLaunch, CubeType)]
pub(super) struct Strides3 {
    s0: u32,
    s1: u32,
    s2: u32,
}

/// The strides of a 4-D tensor as scalar kernel arguments (see [`Strides2`]).
#[derive(CubeLaunch, CubeType)]
pub(super) struct Strides4 {
    s0: u32,
    s1: u32,
    s2: u32,
    s3: u32,
}

/// The strides of a 5-D tensor as scalar kernel arguments (see [`Strides2`]).
#[derive(CubeLaunch, CubeType)]
pub(super) struct Strides5 {
    s0: u32,
    s1: u32,
    s2: u32,
    s3: u32,
    s4: u32,
}

/// [`at`] for an array whose strides are `strides`.
#[cube]
pub(super) fn offset2(strides: &Strides2, row: usize, column: usize) -> usize {
    row * (strides.s0 as usize) + column * (strides.s1 as usize)
}

/// The position of element `(a, b, c)` of a 3-D array whose strides are `strides`.
#[cube]
pub(super) fn offset3(strides: &Strides3, a: usize, b: usize, c: usize) -> usize {
    a * (strides.s0 as usize) + b * (strides.s1 as usize) + c * (strides.s2 as usize)
}

/// The position of element `(a, b, c, d)` of a 4-D array whose strides are `strides`.
#[cube]
pub(super) fn offset4(strides: &Strides4, a: usize, b: usize, c: usize, d: usize) -> usize {
    a * (strides.s0 as usize)
        + b * (strides.s1 as usize)
        + c * (strides.s2 as usize)
        + d * (strides.s3 as usize)
}

/// The position of element `(a, b, c, d, e)` of a 5-D array whose strides are `strides`.
#[cube]
pub(super) fn offset5(
    strides: &Strides5,
    a: usize,
    b: usize,
    c: usize,
    d: usize,
    e: usize,
) -> usize {
    a * (strides.s0 as usize)
        + b * (strides.s1 as usize)
        + c * (strides.s2 as usize)
        + d * (strides.s3 as usize)
        + e * (strides.s4 as usize)
}

/// `tensor`'s strides as [`Strides2`] arguments; `None` unless it is 2-D with strides that fit
/// in a `u32`.
pub(super) fn strides2<R: CubeRuntime>(tensor: &CubeTensor<R>) -> Option<Strides2Launch<R>> {
    let [s0, s1] = scalars(tensor.meta.strides())?;
    Some(Strides2Launch::new(s0, s1))
}

/// `tensor`'s strides as [`Strides3`] arguments; `None` unless it is 3-D with strides that fit
/// in a `u32`.
pub(super) fn strides3<R: CubeRuntime>(tensor: &CubeTensor<R>) -> Option<Strides3Launch<R>> {
    let [s0, s1, s2] = scalars(tensor.meta.strides())?;
    Some(Strides3Launch::new(s0, s1, s2))
}

/// `tensor`'s strides as [`Strides4`] arguments; `None` unless it is 4-D with strides that fit
/// in a `u32`.
pub(super) fn strides4<R: CubeRuntime>(tensor: &CubeTensor<R>) -> Option<Strides4Launch<R>> {
    strides4_of(tensor.meta.strides())
}

/// Four strides as [`Strides4`] arguments (the last four of a 5-D tensor's: one entry of its
/// first axis, as a 4-D array); `None` unless there are four that fit in a `u32`.
pub(super) fn strides4_of<R: CubeRuntime>(strides: &[usize]) -> Option<Strides4Launch<R>> {
    let [s0, s1, s2, s3] = scalars(strides)?;
    Some(Strides4Launch::new(s0, s1, s2, s3))
}

/// `tensor`'s strides as [`Strides5`] arguments; `None` unless it is 5-D with strides that fit
/// in a `u32`.
pub(super) fn strides5<R: CubeRuntime>(tensor: &CubeTensor<R>) -> Option<Strides5Launch<R>> {
    let [s0, s1, s2, s3, s4] = scalars(tensor.meta.strides())?;
    Some(Strides5Launch::new(s0, s1, s2, s3, s4))
}

/// `values` as `D` scalar kernel arguments; `None` if there are not `D` of them or one does not
/// fit in a `u32`.
pub(super) fn scalars<const D: usize>(values: &[usize]) -> Option<[u32; D]> {
    let values: &[usize; D] = values.try_into().ok()?;
    let mut scalars = [0; D];
    for (scalar, &value) in scalars.iter_mut().zip(values) {
        *scalar = self::scalar(value)?;
    }
    Some(scalars)
}

/// `value` as a scalar kernel argument; `None` if it does not fit in a `u32`.
pub(super) fn scalar(value: usize) -> Option<u32> {
    u32::try_from(value).ok()
}

#[cube]
fn fold_sum(shared: &mut SharedMemory<f32>, unit: usize, #[comptime] stride: usize) {
    if unit < stride {
        shared[unit] = shared[unit] + shared[unit + stride];
    }
    sync_cube();
}

/// One level of a cube's maximum: unit `u < stride` keeps the larger of its value and unit
/// `u + stride`'s (for cubes wider than [`ROW_UNITS`], which fold from a wider stride).
#[cube]
fn fold_max(shared: &mut SharedMemory<f32>, unit: usize, #[comptime] stride: usize) {
    if unit < stride {
        let other = shared[unit + stride];
        if other > shared[unit] {
            shared[unit] = other;
        }
    }
    sync_cube();
}

/// The sum of `value` over the cube's [`ROW_UNITS`] units, returned to every unit. The order of
/// the additions is fixed, so a row's result never depends on other rows.
#[cube]
pub(super) fn cube_sum(shared: &mut SharedMemory<f32>, value: f32) -> f32 {
    let unit = UNIT_POS_X as usize;
    shared[unit] = value;
    sync_cube();
    fold_sum(shared, unit, 64usize);
    fold_sum(shared, unit, 32usize);
    fold_sum(shared, unit, 16usize);
    fold_sum(shared, unit, 8usize);
    fold_sum(shared, unit, 4usize);
    fold_sum(shared, unit, 2usize);
    fold_sum(shared, unit, 1usize);
    let total = shared[0];
    // Nobody may overwrite the shared memory before every unit has read the total.
    sync_cube();
    total
}

/// The maximum of `value` over the cube's `units` units (128 or 256), returned to every unit.
#[cube]
pub(super) fn cube_max(
    shared: &mut SharedMemory<f32>,
    value: f32,
    #[comptime] units: usize,
) -> f32 {
    let unit = UNIT_POS_X as usize;
    shared[unit] = value;
    sync_cube();
    if units > 128 {
        fold_max(shared, unit, 128usize);
    }
    fold_max(shared, unit, 64usize);
    fold_max(shared, unit, 32usize);
    fold_max(shared, unit, 16usize);
    fold_max(shared, unit, 8usize);
    fold_max(shared, unit, 4usize);
    fold_max(shared, unit, 2usize);
    fold_max(shared, unit, 1usize);
    let largest = shared[0];
    // Nobody may overwrite the shared memory before every unit has read the maximum.
    sync_cube();
    largest
}

/// Units per cube in the kernels that pick entries across a cube ([`cube_pick`]): top-k, beam
/// selection, argmax.
pub(super) const PICK_UNITS: usize = 256;
/// "No candidate" in a pick.
pub(super) const NO_COLUMN: u32 = u32::MAX;

/// Whether `(value, column)` comes before `(best_value, best_column)` in the order of the picks:
/// value descending, then column ascending.
#[cube]
pub(super) fn precedes(value: f32, column: u32, best_value: f32, best_column: u32) -> bool {
    value > best_value || (value == best_value && column < best_column)
}

/// Whether `(value, column)` is still left at pick number `pick` of a sequence of picks (it
/// comes after the previous pick in the order of [`precedes`]) and beats the unit's best
/// candidate so far (`best_column` [`NO_COLUMN`] for none).
#[cube]
#[allow(clippy::too_many_arguments)]
pub(super) fn improves(
    value: f32,
    column: u32,
    pick: usize,
    previous_value: f32,
    previous_column: u32,
    best_value: f32,
    best_column: u32,
) -> bool {
    let left = pick == 0
        || value < previous_value
        || (value == previous_value && column > previous_column);
    left && (best_column == NO_COLUMN || precedes(value, column, best_value, best_column))
}

/// Whether the candidate `(value, column)` replaces the best so far `(best_value, best_column)`:
/// it is one ([`NO_COLUMN`] is none) and there is no best yet or it comes first in the order of
/// [`precedes`].
#[cube]
pub(super) fn beats(value: f32, column: u32, best_value: f32, best_column: u32) -> bool {
    column != NO_COLUMN
        && (best_column == NO_COLUMN || precedes(value, column, best_value, best_column))
}

/// One level of [`cube_pick`]: unit `u < stride` keeps the earlier candidate of its own and unit
/// `u + stride`'s.
#[cube]
fn fold_pick(
    values: &mut SharedMemory<f32>,
    columns: &mut SharedMemory<u32>,
    unit: usize,
    #[comptime] stride: usize,
) {
    if unit < stride {
        let other = columns[unit + stride];
        let other_value = values[unit + stride];
        if beats(other_value, other, values[unit], columns[unit]) {
            values[unit] = other_value;
            columns[unit] = other;
        }
    }
    sync_cube();
}

/// Reduces each unit's candidate `(value, column)` (`column` [`NO_COLUMN`] for none) to the
/// cube's first in the order of [`precedes`], left in `values[0]` and `columns[0]` for every unit
/// to read. Cubes of [`PICK_UNITS`] units; the caller syncs before it writes the shared memory
/// again.
#[cube]
pub(super) fn cube_pick(
    values: &mut SharedMemory<f32>,
    columns: &mut SharedMemory<u32>,
    unit: usize,
    value: f32,
    column: u32,
) {
    cube_pick_among(values, columns, unit, value, column, PICK_UNITS);
}

/// [`cube_pick`] for cubes of `units` units, [`PICK_UNITS`] or twice as many (the shared memory
/// holding one candidate per unit).
#[cube]
pub(super) fn cube_pick_among(
    values: &mut SharedMemory<f32>,
    columns: &mut SharedMemory<u32>,
    unit: usize,
    value: f32,
    column: u32,
    #[comptime] units: usize,
) {
    comptime!(assert!(
        units == PICK_UNITS || units == 2 * PICK_UNITS,
        "a pick folds 256 or 512 candidates"
    ));
    values[unit] = value;
    columns[unit] = column;
    sync_cube();
    if comptime!(units > PICK_UNITS) {
        fold_pick(values, columns, unit, 256usize);
    }
    fold_pick(values, columns, unit, 128usize);
    fold_pick(values, columns, unit, 64usize);
    fold_pick(values, columns, unit, 32usize);
    fold_pick(values, columns, unit, 16usize);
    fold_pick(values, columns, unit, 8usize);
    fold_pick(values, columns, unit, 4usize);
    fold_pick(values, columns, unit, 2usize);
    fold_pick(values, columns, unit, 1usize);
}
