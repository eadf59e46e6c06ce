//! RMSNorm, optionally after a residual add, one cube per row.

use burn::tensor::{Tensor as BurnTensor, backend::Backend};
use burn_cubecl::CubeRuntime;
use cubecl::prelude::*;

use super::dispatch::{CubeOp, empty_like, from_cube, row_grid, to_cube};
use super::reduce::{ROW_UNITS, Strides2, cube_sum, offset2, scalars, strides2};

/// `output = input / sqrt(mean(input²) + eps)` per row of a `[rows, width]` array (`input` read
/// through its strides, `output` row-major).
#[cube(launch_unchecked)]
fn rms_norm_kernel<F: Float>(
    input: &Array<F>,
    output: &mut Array<F>,
    input_strides: &Strides2,
    rows: u32,
    width: u32,
    eps: f32,
    #[define(F)] _dtype: StorageType,
) {
    let row = CUBE_POS;
    if row >= rows as usize {
        terminate!();
    }
    let width = width as usize;
    let mut shared = SharedMemory::<f32>::new(ROW_UNITS);

    let mut squares = f32::new(0.0);
    let mut read = UNIT_POS_X as usize;
    while read < width {
        let value = f32::cast_from(input[offset2(input_strides, row, read)]);
        squares += value * value;
        read += CUBE_DIM_X as usize;
    }
    let rms = (cube_sum(&mut shared, squares) / f32::cast_from(width) + eps).sqrt();

    let mut write = UNIT_POS_X as usize;
    while write < width {
        let value = f32::cast_from(input[offset2(input_strides, row, write)]);
        output[row * width + write] = F::cast_from(value / rms);
        write += CUBE_DIM_X as usize;
    }
}

/// `sum = input + delta` (in the tensors' own type), then `output = rms_norm(sum)` (`sum` and
/// `output` row-major).
#[allow(clippy::too_many_arguments)]
#[cube(launch_unchecked)]
fn add_rms_norm_kernel<F: Float>(
    input: &Array<F>,
    delta: &Array<F>,
    sum: &mut Array<F>,
    output: &mut Array<F>,
    input_strides: &Strides2,
    delta_strides: &Strides2,
    rows: u32,
    width: u32,
    eps: f32,
    #[define(F)] _dtype: StorageType,
) {
    let row = CUBE_POS;
    if row >= rows as usize {
        terminate!();
    }
    let width = width as usize;
    let mut shared = SharedMemory::<f32>::new(ROW_UNITS);

    let mut squares = f32::new(0.0);
    let mut read = UNIT_POS_X as usize;
    while read < width {
        let total =
            input[offset2(input_strides, row, read)] + delta[offset2(delta_strides, row, read)];
        sum[row * width + read] = total;
        let value = f32::cast_from(total);
        squares += value * value;
        read += CUBE_DIM_X as usize;
    }
    let rms = (cube_sum(&mut shared, squares) / f32::cast_from(width) + eps).sqrt();

    // Each unit reads back only what it wrote itself.
    let mut write = UNIT_POS_X as usize;
    while write < width {
        let value = f32::cast_from(sum[row * width + write]);
        output[row * width + write] = F::cast_from(value / rms);
        write += CUBE_DIM_X as usize;
    }
}

/// The operation behind [`super::rms_norm`] and [`super::add_rms_norm`]: returns the (summed)
/// input and its norm.
pub(super) struct RmsNorm<'a, B: Backend, const D: usize> {
    pub input: &'a BurnTensor<B, D>,
    pub delta: Option<&'a BurnTensor<B, D>>,
    pub eps: f64,
}

impl<B: Backend, const D: usize> CubeOp<B> for RmsNorm<'_, B, D> {
    type Output = (BurnTensor<B, D>, BurnTensor<B, D>);

    fn launch<R: CubeRuntime>(self) -> Option<Self::Output> {
        let dims = self.input.dims();
        let width = dims[D - 1];
        let rows = dims[..D - 1].iter().product::<usize>();
        if width == 0 || rows == 0 {
            return None;
        }
        if let Some(delta) = self.delta
            && delta.dims() != dims
        {
            return None;
        }
        let input = to_cube::<R, B, 2>(&self.input.clone().reshape([rows, width]))?;
        let output = empty_like(&input, [rows, width]);
        let (client, dtype) = (input.client.clone(), input.dtype);
        let (grid, units) = (row_grid(rows), CubeDim::new_1d(ROW_UNITS as u32));
        let eps = self.eps as f32;
        let input_strides = strides2(&input)?;
        let [rows_arg, width_arg] = scalars(&[rows, width])?;
        let sum = match self.delta {
            None => {
                unsafe {
                    rms_norm_kernel::launch_unchecked::<R>(
                        &client,
                        grid,
                        units,
                        input.into_array_arg(),
                        output.clone().into_array_arg(),
                        input_strides,
                        rows_arg,
                        width_arg,
                        eps,
                        dtype.into(),
                    )
                };
                self.input.clone()
            }
            Some(delta) => {
                let delta = to_cube::<R, B, 2>(&delta.clone().reshape([rows, width]))?;
                if delta.dtype != dtype {
                    return None;
                }
                let delta_strides = strides2(&delta)?;
                let sum = empty_like(&input, [rows, width]);
                unsafe {
                    add_rms_norm_kernel::launch_unchecked::<R>(
                        &client,
                        grid,
                        units,
                        input.into_array_arg(),
                        delta.into_array_arg(),
                        sum.clone().into_array_arg(),
                        output.clone().into_array_arg(),
                        input_strides,
                        delta_strides,
                        rows_arg,
                        width_arg,
                        eps,
                        dtype.into(),
                    )
                };
                from_cube::<R, B, 2>(sum)?.reshape(dims)
            }
        };
        Some((sum, from_cube::<R, B, 2>(output)?.reshape(dims)))
    }
}
