//! The index of each row's largest entry, one cube per row.
//!
//! Burn 0.21's `argmax` on CubeCL gives each output row one thread, which walks the whole row:
//! for a 49,152-entry vocabulary that took ~1.3 ms of device time per row on the H200 (2.2 ms for
//! a verification tree's 40 rows) — after every decoding step and every verification, longer than
//! a third of the step's launches. Here 256 units scan a row together and reduce across the cube.

use burn::tensor::backend::Backend;
use burn_cubecl::CubeRuntime;
use cubecl::prelude::*;

use super::dispatch::{CubeOp, empty_int_like, from_cube_int, to_cube};
use super::reduce::{NO_COLUMN, PICK_UNITS, at, at3, cube_pick};

/// Row `CUBE_POS` of `values` (`[rows, width]`, or `[a, b, width]` read as `a · b` rows when
/// `three_d`) to the column of its largest entry (the first on ties; a NaN never wins).
#[cube(launch_unchecked)]
fn argmax_kernel<F: Float, I: Int>(
    values: &Tensor<F>,
    output: &mut Tensor<I>,
    #[comptime] three_d: bool,
    #[define(F, I)] _dtypes: [StorageType; 2],
) {
    let row = CUBE_POS;
    if row >= output.shape(0) {
        terminate!();
    }
    let mut width = values.shape(1);
    let mut middle = 1usize;
    if three_d {
        width = values.shape(2);
        middle = values.shape(1);
    }
    let unit = UNIT_POS_X as usize;
    let mut best = f32::new(-3.4e38);
    let mut best_column = u32::new(NO_COLUMN as i64);
    let mut column = unit;
    while column < width {
        let mut index = at(values, row, column);
        if three_d {
            index = at3(values, row / middle, row % middle, column);
        }
        let value = f32::cast_from(values[index]);
        // Columns rise: only a strictly larger value replaces the unit's best (never a NaN:
        // comparisons with it are false).
        if value > best {
            best = value;
            best_column = u32::cast_from(column);
        }
        column += PICK_UNITS;
    }
    let mut shared_values = SharedMemory::<f32>::new(PICK_UNITS);
    let mut shared_columns = SharedMemory::<u32>::new(PICK_UNITS);
    cube_pick(
        &mut shared_values,
        &mut shared_columns,
        unit,
        best,
        best_column,
    );
    if unit == 0 {
        let mut winner = shared_columns[0];
        if winner == NO_COLUMN {
            // No entry above -3.4e38 (all NaN or -inf): column 0, as a host scan would answer.
            winner = u32::new(0);
        }
        output[at(output, row, 0)] = I::cast_from(winner);
    }
}

/// The operation behind [`super::argmax`].
pub(super) struct Argmax<'a, B: Backend, const D: usize> {
    pub values: &'a burn::tensor::Tensor<B, D>,
}

impl<B: Backend, const D: usize> CubeOp<B> for Argmax<'_, B, D> {
    type Output = burn::tensor::Tensor<B, 1, burn::tensor::Int>;

    fn launch<R: CubeRuntime>(self) -> Option<Self::Output> {
        let dims = self.values.dims();
        if !(D == 2 || D == 3) || dims.contains(&0) || dims[D - 1] > u32::MAX as usize - 1 {
            return None;
        }
        let rows = dims[..D - 1].iter().product::<usize>();
        let values = to_cube::<R, B, D>(self.values)?;
        let int_dtype = <B::IntElem as burn::tensor::Element>::dtype();
        let output = empty_int_like(&values, [rows, 1], int_dtype);
        let (client, dtype) = (values.client.clone(), values.dtype);
        unsafe {
            argmax_kernel::launch_unchecked::<R>(
                &client,
                super::dispatch::row_grid(rows),
                CubeDim::new_1d(PICK_UNITS as u32),
                values.into_tensor_arg(),
                output.clone().into_tensor_arg(),
                D == 3,
                [dtype.into(), int_dtype.into()],
            )
        };
        from_cube_int::<R, B, 2>(output).map(|ids| ids.reshape([rows]))
    }
}
