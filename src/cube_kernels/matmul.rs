//! A dense product `x · W` for a few rows whose every output is summed in one fixed order, with
//! what surrounds a Llama layer's products folded in: the RMSNorm before a projection, the SwiGLU
//! after the gate/up projection and the residual add after the output projections.
//!
//! CubeCL's matmul picks its kernel by shape — on CUDA a tensor-core one that stages f32 operands
//! as TF32 — so a token's projection in a 12-token verification tree and in a one-token decoding
//! step were rounded differently (~1e-3 relative), and greedy speculative decoding drifted from
//! plain greedy decoding at near-ties (6 of 80 MT-Bench prompts in f32 on the H100, 16 in f16).
//! Here output `(row, column)` is the same sequence of f32 multiply-adds whatever the number of
//! rows and wherever the row falls in a tile: each of [`SPLITS`] units sums its own fixed slice of
//! the inputs in order, and the slices' sums are added in split order. The row count only decides
//! how many tiles run. The folded norm keeps that property: a row's sum of squares is summed in
//! the same slices, in the same order, and scales the row's products after their sum.
//!
//! The kernel is written for the shapes of decoding: 1 to a few hundred rows against a weight of a
//! few hundred to tens of thousands of columns. Units along `x` take consecutive columns (the
//! weight reads of a warp coalesce); the rows' inputs are the same for every unit of a split and
//! come from the cache.

use burn::tensor::{Tensor as BurnTensor, backend::Backend};
use burn_cubecl::CubeRuntime;
use cubecl::prelude::*;

use super::ProductFolds;
use super::dispatch::{CubeOp, empty_like, from_cube, to_cube};
use super::reduce::at;

/// Output columns per cube (units along `x`).
const COLUMNS: usize = 16;
/// Units along `y`, each summing one slice of the inputs. Many slices give the few rows of a
/// decoding step enough units to keep the memory system busy: with 4, a `[1, 1536] · [1536, 576]`
/// product ran on 9 cubes and took ~60 µs on the H200 (docs/benchmarks.md, session 11).
const SPLITS: usize = 32;
/// Rows per cube for a few rows, and for more than that (a verification tree); each unit keeps
/// one f32 accumulator per row. The weight is read once per cube: with 16 rows a 40-token tree
/// reads it 3 times instead of 5 (the LM head's is 113 MB in f32).
const ROWS: usize = 8;
/// See [`ROWS`]; the partial sums in shared memory take `SPLITS · 16 · COLUMNS` f32 = 32 KiB, the
/// most every device has (lavapipe's limit).
const MANY_ROWS: usize = 16;
/// Inputs whose loads a unit issues together before it adds them up (in order).
const UNROLL: usize = 4;
/// Column groups per unit for products of several rows with enough columns (see
/// [`MIN_WIDE_CUBES`]); 2 where 4 would leave too few cubes. A 40-token tree's forward on the
/// H200: 7.73 ms with one column per unit, 6.91–6.97 with up to four (docs/benchmarks.md, session
/// 12). A SwiGLU product takes at most 2 groups: each group is a gate and an up column.
const WIDE_COLUMNS: usize = 4;
/// The fewest cubes a product takes several columns per unit with. Wider tiles won even where
/// they leave most multiprocessors idle: on the H200 a 24-token tree's forward took 6.41 ms with
/// at least 132 cubes (one per multiprocessor), 6.09 with 16 (the narrow projections then take
/// 2–4 columns per unit too; docs/benchmarks.md, session 12).
const MIN_WIDE_CUBES: usize = 16;

/// `output [rows, columns] = epilogue(scale(row) · x [rows, inputs] · weight [inputs, _])`, f32
/// accumulation.
///
/// Each cube covers `rows_per_cube` rows (1 for a single-row product, [`ROWS`] or [`MANY_ROWS`])
/// and `groups · COLUMNS` output columns: unit `lane` takes output columns `lane + g · COLUMNS`,
/// and for each of them the weight column of every half (`halves` = 2 for SwiGLU: gate column `c`
/// and up column `columns + c`), so an input it loads feeds `groups · halves` sums (a tree-sized
/// product is bound by those loads). Neither choice changes the operations of any one sum.
///
/// - `normalize`: `scale(row) = 1 / sqrt(mean(x[row]²) + eps)` (an RMSNorm whose weight is folded
///   into `weight`'s rows); otherwise 1 and `eps` is unused.
/// - `swiglu` (with `halves` = 2): `output = silu(gate) · up`; otherwise the product itself.
/// - `add_addend`, `add_bias`: `+ addend[row, column]`, `+ bias[0, column]`; then `silu`: SiLU.
/// - `add_residual`: `output += residual`, last.
///
/// Tensors whose flag is off are not read (any tensor will do).
#[allow(clippy::too_many_arguments)]
#[cube(launch_unchecked)]
fn row_matmul_kernel<F: Float>(
    x: &Tensor<F>,
    weight: &Tensor<F>,
    addend: &Tensor<F>,
    bias: &Tensor<F>,
    residual: &Tensor<F>,
    output: &mut Tensor<F>,
    eps: f32,
    #[comptime] rows_per_cube: usize,
    #[comptime] groups: usize,
    #[comptime] halves: usize,
    #[comptime] swiglu: bool,
    #[comptime] normalize: bool,
    #[comptime] add_addend: bool,
    #[comptime] add_bias: bool,
    #[comptime] silu: bool,
    #[comptime] add_residual: bool,
    #[define(F)] _dtype: StorageType,
) {
    let rows = x.shape(0);
    let inputs = x.shape(1);
    let columns = output.shape(1);
    let lane = UNIT_POS_X as usize;
    let split = UNIT_POS_Y as usize;
    let columns_per_unit = groups * halves;
    // The row tiles of one column tile are neighbours in the grid (x): they run together and
    // share the weight tile's reads through the L2 cache.
    let first_column = CUBE_POS_Y as usize * COLUMNS * groups + lane;
    let first_row = CUBE_POS_X as usize * rows_per_cube;
    // Units past the last column or row compute on clamped indices (valid memory) and write
    // nothing: every unit must reach the barriers below. Slot `h · groups + g` is output column
    // `first_column + g · COLUMNS` of half `h`.
    let mut read_columns = Array::<usize>::new(columns_per_unit);
    #[unroll]
    for h in 0..halves {
        #[unroll]
        for g in 0..groups {
            let column = first_column + g * COLUMNS;
            let clamped = if column < columns {
                column
            } else {
                columns - 1
            };
            read_columns[h * groups + g] = clamped + h * columns;
        }
    }
    let slice = inputs.div_ceil(SPLITS);
    let start = split * slice;
    let end = if start + slice < inputs {
        start + slice
    } else {
        inputs
    };

    // Sum of row `r`, slot `j` at `r * columns_per_unit + j`; the row's sum of squares at `r`.
    let mut sums = Array::<f32>::new(rows_per_cube * columns_per_unit);
    let mut squares = Array::<f32>::new(rows_per_cube);
    let mut source_rows = Array::<usize>::new(rows_per_cube);
    #[unroll]
    for r in 0..rows_per_cube {
        source_rows[r] = if first_row + r < rows {
            first_row + r
        } else {
            rows - 1
        };
        squares[r] = f32::new(0.0);
        #[unroll]
        for j in 0..columns_per_unit {
            sums[r * columns_per_unit + j] = f32::new(0.0);
        }
    }
    // Four inputs at a time: their loads are issued together, then added in input order, so
    // every sum is the same sequence of operations as one input at a time.
    let mut w0 = Array::<f32>::new(columns_per_unit);
    let mut w1 = Array::<f32>::new(columns_per_unit);
    let mut w2 = Array::<f32>::new(columns_per_unit);
    let mut w3 = Array::<f32>::new(columns_per_unit);
    let mut k = start;
    while k + UNROLL <= end {
        #[unroll]
        for j in 0..columns_per_unit {
            w0[j] = f32::cast_from(weight[at(weight, k, read_columns[j])]);
            w1[j] = f32::cast_from(weight[at(weight, k + 1, read_columns[j])]);
            w2[j] = f32::cast_from(weight[at(weight, k + 2, read_columns[j])]);
            w3[j] = f32::cast_from(weight[at(weight, k + 3, read_columns[j])]);
        }
        #[unroll]
        for r in 0..rows_per_cube {
            let row = source_rows[r];
            let x0 = f32::cast_from(x[at(x, row, k)]);
            let x1 = f32::cast_from(x[at(x, row, k + 1)]);
            let x2 = f32::cast_from(x[at(x, row, k + 2)]);
            let x3 = f32::cast_from(x[at(x, row, k + 3)]);
            if normalize {
                let mut square = squares[r];
                square += x0 * x0;
                square += x1 * x1;
                square += x2 * x2;
                square += x3 * x3;
                squares[r] = square;
            }
            #[unroll]
            for j in 0..columns_per_unit {
                let mut sum = sums[r * columns_per_unit + j];
                sum += x0 * w0[j];
                sum += x1 * w1[j];
                sum += x2 * w2[j];
                sum += x3 * w3[j];
                sums[r * columns_per_unit + j] = sum;
            }
        }
        k += UNROLL;
    }
    while k < end {
        #[unroll]
        for j in 0..columns_per_unit {
            w0[j] = f32::cast_from(weight[at(weight, k, read_columns[j])]);
        }
        #[unroll]
        for r in 0..rows_per_cube {
            let x0 = f32::cast_from(x[at(x, source_rows[r], k)]);
            if normalize {
                squares[r] += x0 * x0;
            }
            #[unroll]
            for j in 0..columns_per_unit {
                sums[r * columns_per_unit + j] += x0 * w0[j];
            }
        }
        k += 1;
    }

    // Unit row `r` of the cube finishes row `r`: its scale from the slices' sums of squares (in
    // slice order), then one slot at a time through shared memory, its slot sums in slice order.
    // The squares pass through the same shared memory first (32 KiB is all some devices have).
    let r = split;
    let mut partial = SharedMemory::<f32>::new(SPLITS * rows_per_cube * COLUMNS);
    let mut scale = f32::new(1.0);
    if normalize {
        if lane == 0 {
            #[unroll]
            for row in 0..rows_per_cube {
                partial[split * rows_per_cube + row] = squares[row];
            }
        }
        sync_cube();
        if r < rows_per_cube {
            let mut total = partial[r];
            for s in 1..SPLITS {
                total += partial[s * rows_per_cube + r];
            }
            scale = f32::new(1.0) / (total / f32::cast_from(inputs) + eps).sqrt();
        }
        sync_cube();
    }
    let mut totals = Array::<f32>::new(columns_per_unit);
    #[unroll]
    for j in 0..columns_per_unit {
        #[unroll]
        for row in 0..rows_per_cube {
            partial[(split * rows_per_cube + row) * COLUMNS + lane] =
                sums[row * columns_per_unit + j];
        }
        sync_cube();
        if r < rows_per_cube {
            let mut total = partial[r * COLUMNS + lane];
            for s in 1..SPLITS {
                total += partial[(s * rows_per_cube + r) * COLUMNS + lane];
            }
            totals[j] = total;
        }
        sync_cube();
    }
    let row = first_row + r;
    if r < rows_per_cube && row < rows {
        #[unroll]
        for g in 0..groups {
            let column = first_column + g * COLUMNS;
            if column < columns {
                let mut value = totals[g];
                if normalize {
                    value *= scale;
                }
                if swiglu {
                    let mut up = totals[groups + g];
                    if normalize {
                        up *= scale;
                    }
                    value = value / (f32::new(1.0) + (-value).exp()) * up;
                }
                if add_addend {
                    value += f32::cast_from(addend[at(addend, row, column)]);
                }
                if add_bias {
                    value += f32::cast_from(bias[at(bias, 0, column)]);
                }
                if silu {
                    value = value / (f32::new(1.0) + (-value).exp());
                }
                if add_residual {
                    value += f32::cast_from(residual[at(residual, row, column)]);
                }
                output[at(output, row, column)] = F::cast_from(value);
            }
        }
    }
}

/// The operation behind [`super::matmul`] and [`super::fused_matmul`].
pub(super) struct RowMatmul<'a, B: Backend> {
    pub x: &'a BurnTensor<B, 2>,
    pub weight: &'a BurnTensor<B, 2>,
    pub folds: ProductFolds<'a, B>,
}

impl<B: Backend> CubeOp<B> for RowMatmul<'_, B> {
    type Output = BurnTensor<B, 2>;

    fn launch<R: CubeRuntime>(self) -> Option<Self::Output> {
        let [rows, inputs] = self.x.dims();
        let [weight_inputs, weight_columns] = self.weight.dims();
        let folds = self.folds;
        let halves = if folds.swiglu { 2 } else { 1 };
        let columns = weight_columns / halves;
        if rows == 0
            || rows > super::MATMUL_MAX_ROWS
            || inputs == 0
            || columns == 0
            || weight_inputs != inputs
            || weight_columns % halves != 0
            || (folds.swiglu && folds.silu)
            || [folds.residual, folds.addend]
                .into_iter()
                .flatten()
                .any(|tensor| tensor.dims() != [rows, columns])
            || folds.bias.is_some_and(|bias| bias.dims() != [columns])
        {
            return None;
        }
        let x = to_cube::<R, B, 2>(self.x)?;
        let weight = to_cube::<R, B, 2>(self.weight)?;
        let optional = |tensor: Option<&BurnTensor<B, 2>>| match tensor {
            Some(tensor) => to_cube::<R, B, 2>(tensor).map(Some),
            None => Some(None),
        };
        let residual = optional(folds.residual)?;
        let addend = optional(folds.addend)?;
        let bias_row = folds.bias.map(|bias| bias.clone().reshape([1, columns]));
        let bias = optional(bias_row.as_ref())?;
        if weight.dtype != x.dtype
            || [&residual, &addend, &bias]
                .into_iter()
                .flatten()
                .any(|tensor| tensor.dtype != x.dtype)
        {
            return None;
        }
        let output = empty_like(&x, [rows, columns]);
        let (client, dtype) = (x.client.clone(), x.dtype);
        // Smaller row tiles (1, 2, 4 or 8 rows for the layer's products) were no faster for
        // 12–40-row trees on the H200 (docs/benchmarks.md, session 16).
        let rows_per_cube = match rows {
            1 => 1,
            2..=ROWS => ROWS,
            _ => MANY_ROWS,
        };
        let row_tiles = rows.div_ceil(rows_per_cube);
        // Several column groups per unit for a tree (each loaded input then feeds several sums);
        // one for a decoding step, and where even 2 would leave fewer than MIN_WIDE_CUBES cubes.
        let widest = if folds.swiglu { 2 } else { WIDE_COLUMNS };
        let cubes_with = |per_unit: usize| columns.div_ceil(COLUMNS * per_unit) * row_tiles;
        let groups = if rows == 1 {
            1
        } else if cubes_with(widest) >= MIN_WIDE_CUBES {
            widest
        } else if cubes_with(2) >= MIN_WIDE_CUBES {
            2
        } else {
            1
        };
        let cubes = CubeCount::Static(
            row_tiles as u32,
            columns.div_ceil(COLUMNS * groups) as u32,
            1,
        );
        let (add_residual, add_addend, add_bias) =
            (residual.is_some(), addend.is_some(), bias.is_some());
        // Unused bindings: any tensor will do.
        let residual = residual.unwrap_or_else(|| x.clone());
        let addend = addend.unwrap_or_else(|| x.clone());
        let bias = bias.unwrap_or_else(|| x.clone());
        unsafe {
            row_matmul_kernel::launch_unchecked::<R>(
                &client,
                cubes,
                CubeDim::new_2d(COLUMNS as u32, SPLITS as u32),
                x.into_tensor_arg(),
                weight.into_tensor_arg(),
                addend.into_tensor_arg(),
                bias.into_tensor_arg(),
                residual.into_tensor_arg(),
                output.clone().into_tensor_arg(),
                folds.rms_norm_eps.unwrap_or(0.0) as f32,
                rows_per_cube,
                groups,
                halves,
                folds.swiglu,
                folds.rms_norm_eps.is_some(),
                add_addend,
                add_bias,
                folds.silu,
                add_residual,
                dtype.into(),
            )
        };
        from_cube::<R, B, 2>(output)
    }
}
