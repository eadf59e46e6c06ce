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
use super::reduce::{
    NO_COLUMN, PICK_UNITS, Strides3, Strides3Launch, cube_pick, offset3, scalars, strides3,
};

/// Entries a unit loads at once.
const LOADS: usize = 32;

/// Row `CUBE_POS` of `values` (`[rows / middle, middle, width]` with strides `strides`; a 2-D
/// tensor is read as `[rows, 1, width]`) to the column of its largest entry (the first on ties; a
/// NaN never wins), written to `output` `[rows]`.
#[cube(launch_unchecked)]
fn argmax_kernel<F: Float, I: Int>(
    values: &Array<F>,
    output: &mut Array<I>,
    strides: &Strides3,
    rows: u32,
    middle: u32,
    width: u32,
    #[define(F, I)] _dtypes: [StorageType; 2],
) {
    let row = CUBE_POS;
    if row >= rows as usize {
        terminate!();
    }
    let (middle, width) = (middle as usize, width as usize);
    let (outer, inner) = (row / middle, row % middle);
    let unit = UNIT_POS_X as usize;
    let mut best = f32::new(-3.4e38);
    let mut best_column = u32::new(NO_COLUMN as i64);
    let mut column = unit;
    // LOADS columns at a time: their loads are issued together, then compared in column order
    // (one load after another, a 49,152-entry row took 38.6 µs on the H200: 192 waits per unit;
    // 12.1 µs now, docs/benchmarks.md session 19).
    let mut loaded = Array::<f32>::new(LOADS);
    while column + (LOADS - 1) * PICK_UNITS < width {
        #[unroll]
        for i in 0..LOADS {
            loaded[i] =
                f32::cast_from(values[offset3(strides, outer, inner, column + i * PICK_UNITS)]);
        }
        #[unroll]
        for i in 0..LOADS {
            if loaded[i] > best {
                best = loaded[i];
                best_column = u32::cast_from(column + i * PICK_UNITS);
            }
        }
        column += LOADS * PICK_UNITS;
    }
    while column < width {
        let value = f32::cast_from(values[offset3(strides, outer, inner, column)]);
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
        output[row] = I::cast_from(winner);
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
        let (middle, strides) = if D == 3 {
            (dims[1], strides3(&values)?)
        } else {
            let [s0, s1] = scalars(values.meta.strides())?;
            (1, Strides3Launch::new(s0, 0, s1))
        };
        let [rows_arg, middle, width] = scalars(&[rows, middle, dims[D - 1]])?;
        let int_dtype = <B::IntElem as burn::tensor::Element>::dtype();
        let output = empty_int_like(&values, [rows, 1], int_dtype);
        let (client, dtype) = (values.client.clone(), values.dtype);
        // Arrays bound at the tensors' offsets, the input read through its strides.
        unsafe {
            argmax_kernel::launch_unchecked::<R>(
                &client,
                super::dispatch::row_grid(rows),
                CubeDim::new_1d(PICK_UNITS as u32),
                values.into_array_arg(),
                output.clone().into_array_arg(),
                strides,
                rows_arg,
                middle,
                width,
                [dtype.into(), int_dtype.into()],
            )
        };
        from_cube_int::<R, B, 2>(output).map(|ids| ids.reshape([rows]))
    }
}
