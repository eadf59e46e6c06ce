//! RMSNorm, optionally after a residual add, one cube per row.

use burn::tensor::{Tensor as BurnTensor, backend::Backend};
use burn_cubecl::CubeRuntime;
use cubecl::prelude::*;

use super::dispatch::{CubeOp, empty_like, from_cube, row_grid, to_cube};
use super::reduce::{ROW_UNITS, at, cube_sum};

/// `output = input / sqrt(mean(input²) + eps)` per row of a `[rows, width]` tensor.
#[cube(launch_unchecked)]
fn rms_norm_kernel<F: Float>(
    input: &Tensor<F>,
    output: &mut Tensor<F>,
    eps: f32,
    #[define(F)] _dtype: StorageType,
) {
    let row = CUBE_POS;
    if row >= input.shape(0) {
        terminate!();
    }
    let width = input.shape(1);
    let mut shared = SharedMemory::<f32>::new(ROW_UNITS);

    let mut squares = f32::new(0.0);
    let mut read = UNIT_POS_X as usize;
    while read < width {
        let value = f32::cast_from(input[at(input, row, read)]);
        squares += value * value;
        read += CUBE_DIM_X as usize;
    }
    let rms = (cube_sum(&mut shared, squares) / f32::cast_from(width) + eps).sqrt();

    let mut write = UNIT_POS_X as usize;
    while write < width {
        let value = f32::cast_from(input[at(input, row, write)]);
        output[at(output, row, write)] = F::cast_from(value / rms);
        write += CUBE_DIM_X as usize;
    }
}

/// `sum = input + delta` (in the tensors' own type), then `output = rms_norm(sum)`.
#[cube(launch_unchecked)]
fn add_rms_norm_kernel<F: Float>(
    input: &Tensor<F>,
    delta: &Tensor<F>,
    sum: &mut Tensor<F>,
    output: &mut Tensor<F>,
    eps: f32,
    #[define(F)] _dtype: StorageType,
) {
    let row = CUBE_POS;
    if row >= input.shape(0) {
        terminate!();
    }
    let width = input.shape(1);
    let mut shared = SharedMemory::<f32>::new(ROW_UNITS);

    let mut squares = f32::new(0.0);
    let mut read = UNIT_POS_X as usize;
    while read < width {
        let total = input[at(input, row, read)] + delta[at(delta, row, read)];
        sum[at(sum, row, read)] = total;
        let value = f32::cast_from(total);
        squares += value * value;
        read += CUBE_DIM_X as usize;
    }
    let rms = (cube_sum(&mut shared, squares) / f32::cast_from(width) + eps).sqrt();

    // Each unit reads back only what it wrote itself.
    let mut write = UNIT_POS_X as usize;
    while write < width {
        let value = f32::cast_from(sum[at(sum, row, write)]);
        output[at(output, row, write)] = F::cast_from(value / rms);
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
        let sum = match self.delta {
            None => {
                unsafe {
                    rms_norm_kernel::launch_unchecked::<R>(
                        &client,
                        grid,
                        units,
                        input.into_tensor_arg(),
                        output.clone().into_tensor_arg(),
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
                let sum = empty_like(&input, [rows, width]);
                unsafe {
                    add_rms_norm_kernel::launch_unchecked::<R>(
                        &client,
                        grid,
                        units,
                        input.into_tensor_arg(),
                        delta.into_tensor_arg(),
                        sum.clone().into_tensor_arg(),
                        output.clone().into_tensor_arg(),
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
