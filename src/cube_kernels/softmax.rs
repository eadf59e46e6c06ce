//! Attention softmax with the bias added inside, one cube per row.

use burn::tensor::{Tensor as BurnTensor, backend::Backend};
use burn_cubecl::CubeRuntime;
use cubecl::prelude::*;

use super::dispatch::{CubeOp, empty_like, from_cube, row_grid, to_cube};
use super::reduce::{ROW_UNITS, at, cube_max, cube_sum};

/// Softmax of each row of `scores` `[rows, slots]` plus its bias row. Each batch entry has
/// `heads * len` consecutive rows, its row `r` taking bias row `r % len`; the bias
/// `[batch * len, slots]` has one row per `(batch, position)`. Without a bias, `bias` is not read.
#[cube(launch_unchecked)]
fn softmax_kernel<F: Float>(
    scores: &Tensor<F>,
    bias: &Tensor<F>,
    output: &mut Tensor<F>,
    len: u32,
    heads: u32,
    #[comptime] with_bias: bool,
    #[define(F)] _dtype: StorageType,
) {
    let row = CUBE_POS;
    if row >= scores.shape(0) {
        terminate!();
    }
    let slots = scores.shape(1);
    let len = len as usize;
    let bias_row = (row / (heads as usize * len)) * len + row % len;
    let mut shared = SharedMemory::<f32>::new(ROW_UNITS);

    let mut largest = f32::new(-3.0e38);
    let mut find = UNIT_POS_X as usize;
    while find < slots {
        let value = biased(scores, bias, row, bias_row, find, with_bias);
        if value > largest {
            largest = value;
        }
        find += CUBE_DIM_X as usize;
    }
    let largest = cube_max(&mut shared, largest, ROW_UNITS);

    let mut total = f32::new(0.0);
    let mut add = UNIT_POS_X as usize;
    while add < slots {
        total += (biased(scores, bias, row, bias_row, add, with_bias) - largest).exp();
        add += CUBE_DIM_X as usize;
    }
    let total = cube_sum(&mut shared, total);

    let mut write = UNIT_POS_X as usize;
    while write < slots {
        let weight = (biased(scores, bias, row, bias_row, write, with_bias) - largest).exp();
        output[at(output, row, write)] = F::cast_from(weight / total);
        write += CUBE_DIM_X as usize;
    }
}

/// A score plus its bias, in f32.
#[cube]
fn biased<F: Float>(
    scores: &Tensor<F>,
    bias: &Tensor<F>,
    row: usize,
    bias_row: usize,
    slot: usize,
    #[comptime] with_bias: bool,
) -> f32 {
    let mut value = f32::cast_from(scores[at(scores, row, slot)]);
    if with_bias {
        value += f32::cast_from(bias[at(bias, bias_row, slot)]);
    }
    value
}

/// The operation behind [`super::softmax_with_bias`].
pub(super) struct SoftmaxWithBias<'a, B: Backend> {
    pub scores: &'a BurnTensor<B, 4>,
    pub bias: Option<&'a BurnTensor<B, 4>>,
}

impl<B: Backend> CubeOp<B> for SoftmaxWithBias<'_, B> {
    type Output = BurnTensor<B, 4>;

    fn launch<R: CubeRuntime>(self) -> Option<Self::Output> {
        let dims = self.scores.dims();
        let [batch, outer, inner, slots] = dims;
        let rows = batch * outer * inner;
        // Bias rows repeat every `len` score rows of a batch entry.
        let len = self.bias.map_or(inner, |bias| bias.dims()[2]);
        if rows == 0 || slots == 0 || len == 0 || (outer * inner) % len != 0 {
            return None;
        }
        let heads = outer * inner / len;
        let scores = to_cube::<R, B, 2>(&self.scores.clone().reshape([rows, slots]))?;
        let output = empty_like(&scores, [rows, slots]);
        let bias = match self.bias {
            Some(bias) => {
                if bias.dims() != [batch, 1, len, slots] {
                    return None;
                }
                let bias = to_cube::<R, B, 2>(&bias.clone().reshape([batch * len, slots]))?;
                (bias.dtype == scores.dtype).then_some(bias)?
            }
            // Not read: any tensor of the right type will do.
            None => scores.clone(),
        };
        let (client, dtype) = (scores.client.clone(), scores.dtype);
        unsafe {
            softmax_kernel::launch_unchecked::<R>(
                &client,
                row_grid(rows),
                CubeDim::new_1d(ROW_UNITS as u32),
                scores.into_tensor_arg(),
                bias.into_tensor_arg(),
                output.clone().into_tensor_arg(),
                len as u32,
                heads as u32,
                self.bias.is_some(),
                dtype.into(),
            )
        };
        Some(from_cube::<R, B, 2>(output)?.reshape(dims))
    }
}
