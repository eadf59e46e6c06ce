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
const COLUMNS: usize = 16;
/// Units along `y`, each summing one slice of the inputs. Many slices give the few rows of a
/// decoding step enough units to keep the memory system busy: with 4, a `[1, 1536] · [1536, 576]`
/// product ran on 9 cubes and took ~60 µs on the H200 (docs/benchmarks.md, session 11).
const SPLITS: usize = 32;
/// Rows per cube when there are several; each unit keeps one f32 accumulator per row.
const ROWS: usize = 8;
/// Inputs whose loads a unit issues together before it adds them up (in order).
const UNROLL: usize = 4;

/// `output [rows, outputs] = x [rows, inputs] · weight [inputs, outputs]`, f32 accumulation.
/// Each cube covers `rows_per_cube` rows ([`ROWS`], or 1 for a single-row product: the sums of a
/// row are the same operations either way).
#[cube(launch_unchecked)]
fn row_matmul_kernel<F: Float>(
    x: &Tensor<F>,
    weight: &Tensor<F>,
    output: &mut Tensor<F>,
    #[comptime] rows_per_cube: usize,
    #[define(F)] _dtype: StorageType,
) {
    let rows = x.shape(0);
    let inputs = x.shape(1);
    let outputs = weight.shape(1);
    let lane = UNIT_POS_X as usize;
    let split = UNIT_POS_Y as usize;
    let column = CUBE_POS_X as usize * COLUMNS + lane;
    let first_row = CUBE_POS_Y as usize * rows_per_cube;
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

    let mut sums = Array::<f32>::new(rows_per_cube);
    let mut source_rows = Array::<usize>::new(rows_per_cube);
    #[unroll]
    for r in 0..rows_per_cube {
        sums[r] = f32::new(0.0);
        source_rows[r] = if first_row + r < rows {
            first_row + r
        } else {
            rows - 1
        };
    }
    // Four inputs at a time: their loads are issued together, then added in input order, so
    // every sum is the same sequence of operations as one input at a time.
    let mut k = start;
    while k + UNROLL <= end {
        let w0 = f32::cast_from(weight[at(weight, k, read_column)]);
        let w1 = f32::cast_from(weight[at(weight, k + 1, read_column)]);
        let w2 = f32::cast_from(weight[at(weight, k + 2, read_column)]);
        let w3 = f32::cast_from(weight[at(weight, k + 3, read_column)]);
        #[unroll]
        for r in 0..rows_per_cube {
            let row = source_rows[r];
            let x0 = f32::cast_from(x[at(x, row, k)]);
            let x1 = f32::cast_from(x[at(x, row, k + 1)]);
            let x2 = f32::cast_from(x[at(x, row, k + 2)]);
            let x3 = f32::cast_from(x[at(x, row, k + 3)]);
            let mut sum = sums[r];
            sum += x0 * w0;
            sum += x1 * w1;
            sum += x2 * w2;
            sum += x3 * w3;
            sums[r] = sum;
        }
        k += UNROLL;
    }
    while k < end {
        let w = f32::cast_from(weight[at(weight, k, read_column)]);
        #[unroll]
        for r in 0..rows_per_cube {
            sums[r] += f32::cast_from(x[at(x, source_rows[r], k)]) * w;
        }
        k += 1;
    }

    let mut partial = SharedMemory::<f32>::new(SPLITS * rows_per_cube * COLUMNS);
    #[unroll]
    for r in 0..rows_per_cube {
        partial[(split * rows_per_cube + r) * COLUMNS + lane] = sums[r];
    }
    sync_cube();
    // Unit row `r` of the cube adds up row `r`'s slices, in slice order.
    let r = split;
    if r < rows_per_cube && column < outputs && first_row + r < rows {
        let mut total = partial[r * COLUMNS + lane];
        for s in 1..SPLITS {
            total += partial[(s * rows_per_cube + r) * COLUMNS + lane];
        }
        output[at(output, first_row + r, column)] = F::cast_from(total);
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
        let rows_per_cube = if rows == 1 { 1 } else { ROWS };
        let cubes = CubeCount::Static(
            outputs.div_ceil(COLUMNS) as u32,
            rows.div_ceil(rows_per_cube) as u32,
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
                rows_per_cube,
                dtype.into(),
            )
        };
        from_cube::<R, B, 2>(output)
    }
}
