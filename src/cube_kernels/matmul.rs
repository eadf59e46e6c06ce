//! A dense product `x · W` for a few rows whose every output is summed in one fixed order.
//!
//! CubeCL's matmul picks its kernel by shape — on CUDA a tensor-core one that stages f32 operands
//! as TF32 — so a token's projection in a 12-token verification tree and in a one-token decoding
//! step were rounded differently (~1e-3 relative), and greedy speculative decoding drifted from
//! plain greedy decoding at near-ties (6 of 80 MT-Bench prompts in f32 on the H100, 16 in f16).
//! Here output `(row, column)` is the same sequence of f32 multiply-adds whatever the number of
//! rows and wherever the row falls in a tile: each of [`SPLITS`] units sums its own fixed slice of
//! the inputs in order, and the slices' sums are added in split order. The row count only decides
//! how many tiles run.
//!
//! The kernel is written for the shapes of decoding: 1 to a few hundred rows against a weight of a
//! few hundred to tens of thousands of columns. Units along `x` take consecutive columns (the
//! weight reads of a warp coalesce); the rows' inputs are the same for every unit of a split and
//! come from the cache.

use burn::tensor::{Tensor as BurnTensor, backend::Backend};
use burn_cubecl::CubeRuntime;
use cubecl::prelude::*;

use super::dispatch::{CubeOp, empty_like, from_cube, to_cube};
use super::reduce::at;

/// Output columns per cube (units along `x`).
const COLUMNS: usize = 64;
/// Units along `y`, each summing one slice of the inputs.
const SPLITS: usize = 4;
/// Rows per cube; each unit keeps one f32 accumulator per row.
const ROWS: usize = 8;

/// `output [rows, outputs] = x [rows, inputs] · weight [inputs, outputs]`, f32 accumulation.
#[cube(launch_unchecked)]
fn row_matmul_kernel<F: Float>(
    x: &Tensor<F>,
    weight: &Tensor<F>,
    output: &mut Tensor<F>,
    #[define(F)] _dtype: StorageType,
) {
    let rows = x.shape(0);
    let inputs = x.shape(1);
    let outputs = weight.shape(1);
    let lane = UNIT_POS_X as usize;
    let split = UNIT_POS_Y as usize;
    let column = CUBE_POS_X as usize * COLUMNS + lane;
    let first_row = CUBE_POS_Y as usize * ROWS;
    // Units past the last column or row compute on clamped indices (valid memory) and write
    // nothing: every unit must reach the barrier below.
    let read_column = if column < outputs {
        column
    } else {
        outputs - 1
    };
    let slice = inputs.div_ceil(SPLITS);
    let start = split * slice;
    let end = if start + slice < inputs {
        start + slice
    } else {
        inputs
    };

    let mut sums = Array::<f32>::new(ROWS);
    #[unroll]
    for r in 0..ROWS {
        sums[r] = f32::new(0.0);
    }
    for k in start..end {
        let w = f32::cast_from(weight[at(weight, k, read_column)]);
        #[unroll]
        for r in 0..ROWS {
            let row = if first_row + r < rows {
                first_row + r
            } else {
                rows - 1
            };
            sums[r] += f32::cast_from(x[at(x, row, k)]) * w;
        }
    }

    let mut partial = SharedMemory::<f32>::new(SPLITS * ROWS * COLUMNS);
    #[unroll]
    for r in 0..ROWS {
        partial[(split * ROWS + r) * COLUMNS + lane] = sums[r];
    }
    sync_cube();
    if split == 0 && column < outputs {
        #[unroll]
        for r in 0..ROWS {
            if first_row + r < rows {
                let mut total = partial[r * COLUMNS + lane];
                #[unroll]
                for s in 1..SPLITS {
                    total += partial[(s * ROWS + r) * COLUMNS + lane];
                }
                output[at(output, first_row + r, column)] = F::cast_from(total);
            }
        }
    }
}

/// The operation behind [`super::matmul`].
pub(super) struct RowMatmul<'a, B: Backend> {
    pub x: &'a BurnTensor<B, 2>,
    pub weight: &'a BurnTensor<B, 2>,
}

impl<B: Backend> CubeOp<B> for RowMatmul<'_, B> {
    type Output = BurnTensor<B, 2>;

    fn launch<R: CubeRuntime>(self) -> Option<Self::Output> {
        let [rows, inputs] = self.x.dims();
        let [weight_inputs, outputs] = self.weight.dims();
        if rows == 0
            || rows > super::MATMUL_MAX_ROWS
            || inputs == 0
            || outputs == 0
            || weight_inputs != inputs
        {
            return None;
        }
        let x = to_cube::<R, B, 2>(self.x)?;
        let weight = to_cube::<R, B, 2>(self.weight)?;
        if weight.dtype != x.dtype {
            return None;
        }
        let output = empty_like(&x, [rows, outputs]);
        let (client, dtype) = (x.client.clone(), x.dtype);
        let cubes = CubeCount::Static(
            outputs.div_ceil(COLUMNS) as u32,
            rows.div_ceil(ROWS) as u32,
            1,
        );
        unsafe {
            row_matmul_kernel::launch_unchecked::<R>(
                &client,
                cubes,
                CubeDim::new_2d(COLUMNS as u32, SPLITS as u32),
                x.into_tensor_arg(),
                weight.into_tensor_arg(),
                output.clone().into_tensor_arg(),
                dtype.into(),
            )
        };
        from_cube::<R, B, 2>(output)
    }
}
