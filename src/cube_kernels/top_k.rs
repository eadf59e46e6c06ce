//! Row-wise top-k in one launch, for the draft head's beam search.
//!
//! The rank selection of `crate::drafter::top_k` stays on the device but takes a dozen launches
//! (comparisons, a reduction, a scatter, gathers), and beam search selects twice per draft step.
//! Here one cube per row picks the `k` entries one after another: each pick is the largest entry
//! that comes after the previous pick in the order (value descending, column ascending), found by
//! every unit scanning its share of the row (held in registers for rows up to 8,192 entries) and
//! a reduction across the cube. `k` passes over the
//! row cost far less on a GPU than the launches they replace; ties are broken by the lower column,
//! as rank selection breaks them, so both give the same result.

use burn::tensor::{Int as IntKind, Tensor as BurnTensor, backend::Backend};
use burn_cubecl::CubeRuntime;
use cubecl::prelude::*;

use super::dispatch::{CubeOp, empty_int_like, empty_like, from_cube, from_cube_int, to_cube};
use super::reduce::{
    NO_COLUMN, PICK_UNITS, Strides2, cube_pick, improves, offset2, scalars, strides2,
};

/// Entries per unit a row may have to be held in registers (rows up to `PICK_UNITS · HELD` = 8192
/// entries: a draft vocabulary's logits, or beam search's candidates).
const HELD: usize = 32;

/// `values` `[rows, width]` (read through `strides`) to its `k` largest entries per row, sorted
/// descending, and their columns (`sorted` and `columns` `[rows, k]`, row-major).
#[allow(clippy::too_many_arguments)]
#[cube(launch_unchecked)]
fn top_k_kernel<F: Float, I: Int>(
    values: &Array<F>,
    sorted: &mut Array<F>,
    columns: &mut Array<I>,
    strides: &Strides2,
    rows: u32,
    width: u32,
    k: u32,
    #[comptime] in_registers: bool,
    #[define(F, I)] _dtypes: [StorageType; 2],
) {
    let row = CUBE_POS;
    if row >= rows as usize {
        terminate!();
    }
    let (width, k) = (width as usize, k as usize);
    let unit = UNIT_POS_X as usize;
    let mut shared_values = SharedMemory::<f32>::new(PICK_UNITS);
    let mut shared_columns = SharedMemory::<u32>::new(PICK_UNITS);

    // A row of up to `PICK_UNITS · HELD` entries is read once into registers (static indices keep the
    // array out of local memory); wider rows are read again at every pick.
    let mut held = Array::<f32>::new(HELD);
    if in_registers {
        #[unroll]
        for i in 0..HELD {
            let column = i * PICK_UNITS + unit;
            held[i] = f32::new(-3.4e38);
            if column < width {
                held[i] = f32::cast_from(values[offset2(strides, row, column)]);
            }
        }
    }

    let mut previous_value = f32::new(0.0);
    let mut previous_column = u32::new(NO_COLUMN as i64);
    for pick in 0..k {
        let mut best_value = f32::new(-3.4e38);
        let mut best_column = u32::new(NO_COLUMN as i64);
        if in_registers {
            #[unroll]
            for i in 0..HELD {
                let column = i * PICK_UNITS + unit;
                let value = held[i];
                let c = u32::cast_from(column);
                if column < width
                    && improves(
                        value,
                        c,
                        pick,
                        previous_value,
                        previous_column,
                        best_value,
                        best_column,
                    )
                {
                    best_value = value;
                    best_column = c;
                }
            }
        } else {
            let mut column = unit;
            while column < width {
                let value = f32::cast_from(values[offset2(strides, row, column)]);
                let c = u32::cast_from(column);
                if improves(
                    value,
                    c,
                    pick,
                    previous_value,
                    previous_column,
                    best_value,
                    best_column,
                ) {
                    best_value = value;
                    best_column = c;
                }
                column += PICK_UNITS;
            }
        }
        cube_pick(
            &mut shared_values,
            &mut shared_columns,
            unit,
            best_value,
            best_column,
        );
        previous_value = shared_values[0];
        previous_column = shared_columns[0];
        if unit == 0 {
            sorted[row * k + pick] = F::cast_from(previous_value);
            columns[row * k + pick] = I::cast_from(previous_column);
        }
        // Nobody may overwrite the shared memory before every unit has read the pick.
        sync_cube();
    }
}

/// The operation behind [`super::top_k`].
pub(super) struct TopK<'a, B: Backend> {
    pub values: &'a BurnTensor<B, 2>,
    pub k: usize,
}

impl<B: Backend> CubeOp<B> for TopK<'_, B> {
    type Output = (BurnTensor<B, 2>, BurnTensor<B, 2, IntKind>);

    fn launch<R: CubeRuntime>(self) -> Option<Self::Output> {
        let [rows, width] = self.values.dims();
        let k = self.k;
        if rows == 0 || k == 0 || k > width || width > u32::MAX as usize - 1 {
            return None;
        }
        let values = to_cube::<R, B, 2>(self.values)?;
        let sorted = empty_like(&values, [rows, k]);
        let int_dtype = <B::IntElem as burn::tensor::Element>::dtype();
        let columns = empty_int_like(&values, [rows, k], int_dtype);
        let (client, dtype) = (values.client.clone(), values.dtype);
        let strides = strides2(&values)?;
        let [rows_arg, width_arg, k] = scalars(&[rows, width, k])?;
        unsafe {
            top_k_kernel::launch_unchecked::<R>(
                &client,
                super::dispatch::row_grid(rows),
                CubeDim::new_1d(PICK_UNITS as u32),
                values.into_array_arg(),
                sorted.clone().into_array_arg(),
                columns.clone().into_array_arg(),
                strides,
                rows_arg,
                width_arg,
                k,
                width <= PICK_UNITS * HELD,
                [dtype.into(), int_dtype.into()],
            )
        };
        Some((
            from_cube::<R, B, 2>(sorted)?,
            from_cube_int::<R, B, 2>(columns)?,
        ))
    }
}
