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
//! come from the cache. A tree's product, bound by its load instructions rather than by bytes,
//! reads two or four columns and four inputs per load where the layout allows ([`Layout`]): a
//! 24-token tree's forward on the H200 went from 5.11 to 4.11 ms with four (docs/benchmarks.md,
//! session 17).

use burn::tensor::{Tensor as BurnTensor, backend::Backend};
use burn_cubecl::{CubeRuntime, tensor::CubeTensor};
use cubecl::prelude::*;

use super::ProductFolds;
use super::dispatch::{CubeOp, empty_like, from_cube, to_cube};
use super::reduce::{
    Strides2, Strides2Launch, Strides4, Strides4Launch, Strides5, Strides5Launch, offset2, offset4,
    offset5, scalar, scalars, strides2, strides4, strides5,
};
use super::rope::{CacheBlock, rotate_pair};

/// Output columns per cube (units along `x`).
const COLUMNS: usize = 16;
/// Units along `y`, each summing one slice of the inputs. Many slices give the few rows of a
/// decoding step enough units to keep the memory system busy: with 4, a `[1, 1536] · [1536, 576]`
/// product ran on 9 cubes and took ~60 µs on the H200 (docs/benchmarks.md, session 11).
pub(super) const SPLITS: usize = 32;
/// Rows per cube for a few rows, and for more than that (a verification tree); each unit keeps
/// one f32 accumulator per row. The weight is read once per cube: with 16 rows a 40-token tree
/// reads it 3 times instead of 5 (the LM head's is 113 MB in f32).
const ROWS: usize = 8;
/// See [`ROWS`]; the partial sums in shared memory take `SPLITS · 16 · COLUMNS` f32 = 32 KiB, the
/// most every device has (lavapipe's limit).
const MANY_ROWS: usize = 16;
/// Inputs whose loads a unit issues together before it adds them up (in order).
pub(super) const UNROLL: usize = 4;
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
/// Each cube covers `rows_per_cube` rows and `groups · COLUMNS · NW` output columns: unit `lane`
/// takes the `NW` consecutive columns of weight vector `lane + g · COLUMNS` for each group `g`,
/// and for each of them the weight vector of every half (`halves` = 2 for SwiGLU: gate columns
/// `c` and up columns `columns + c`), so an input it loads feeds `groups · halves · NW` sums per
/// row. `x` is read `NX` inputs at a time. Neither vector width changes the operations of any one
/// sum: unit `split` sums inputs `split · slice ..` in order, `slice` a multiple of [`UNROLL`]
/// whatever the widths, and the splits' sums are added in split order. (`x_width` and `width`
/// repeat `NX` and `NW` as values the kernel can size its arrays with.)
///
/// - `normalize`: `scale(row) = 1 / sqrt(mean(x[row]²) + eps)` (an RMSNorm whose weight is folded
///   into `weight`'s rows); otherwise 1 and `eps` is unused.
/// - `swiglu` (with `halves` = 2): `output = silu(gate) · up`; otherwise the product itself.
/// - `add_addend`, `add_bias`: `+ addend[row, column]`, `+ bias[0, column]`; then `silu`: SiLU.
/// - `add_residual`: `output += residual`, last.
/// - `copy_prefix`: the output is `[prefix | product]`, `[rows, 2 · columns]` (the unit that
///   writes product column `c` copies `prefix[row, c]` too): a concatenation folded in.
/// - `offset_inputs`: the product's input 0 is column `strides.x_offset` of `x` (a product over
///   the second half of a `[prefix | product]` output, without a copy of it).
/// - `batch`: sums of how many output columns go through shared memory together (divides `NW`).
/// - `rotate` (with `halves` = 2, no other fold but the norm): the QKV product of a Llama layer,
///   rotated and split into heads ([`write_rotated_pair`]). Logical column `c` is the rotation
///   pair of physical columns `(c / half) · dim + c % half` and `half` further (`dim = 2 · half`
///   the head dimension): a unit sums both elements of a pair, so it can rotate them; `output`
///   is then Q `[batch, heads, len, dim]`, and K and V go to the cache's storage.
///
/// Tensors whose flag is off are not read (any tensor will do).
#[allow(clippy::too_many_arguments)]
#[cube(launch_unchecked)]
fn row_matmul_kernel<F: Float, NX: Size, NW: Size>(
    x: &Array<Vector<F, NX>>,
    weight: &Array<Vector<F, NW>>,
    addend: &Array<F>,
    bias: &Array<F>,
    residual: &Array<F>,
    prefix: &Array<F>,
    cos: &Array<F>,
    sin: &Array<F>,
    output: &mut Array<F>,
    keys: &mut Array<F>,
    values: &mut Array<F>,
    strides: ProductStrides,
    heads: RotationHeads,
    eps: f32,
    #[comptime] x_width: usize,
    #[comptime] width: usize,
    #[comptime] rows_per_cube: usize,
    #[comptime] groups: usize,
    #[comptime] halves: usize,
    #[comptime] batch: usize,
    #[comptime] swiglu: bool,
    #[comptime] normalize: bool,
    #[comptime] add_addend: bool,
    #[comptime] add_bias: bool,
    #[comptime] silu: bool,
    #[comptime] add_residual: bool,
    #[comptime] copy_prefix: bool,
    #[comptime] offset_inputs: bool,
    #[comptime] rotate: bool,
    #[define(F)] _dtype: StorageType,
) {
    let rows = strides.rows as usize;
    let inputs = strides.inputs as usize;
    let columns = strides.columns as usize;
    let (x_row, x_step) = (strides.x_row as usize, strides.x_step as usize);
    let (weight_row, weight_step) = (strides.weight_row as usize, strides.weight_step as usize);
    let lane = UNIT_POS_X as usize;
    let split = UNIT_POS_Y as usize;
    let slots = groups * halves;
    let components = slots * width;
    // The row tiles of one column tile are neighbours in the grid (x): they run together and
    // share the weight tile's reads through the L2 cache.
    let first_column = (CUBE_POS_Y as usize * COLUMNS * groups + lane) * width;
    let first_row = CUBE_POS_X as usize * rows_per_cube;
    // Units past the last column or row compute on clamped indices (valid memory) and write
    // nothing: every unit must reach the barriers below. Slot `h · groups + g` is the weight
    // vector of output columns `first_column + g · COLUMNS · width ..` of half `h`, kept as its
    // element offset along the weight's rows: one multiply fewer per load took a tree's
    // 576-column products from 11.5 to 9.3 µs on the H200 (docs/benchmarks.md, session 21).
    let mut read_columns = Array::<usize>::new(slots);
    #[unroll]
    for h in 0..halves {
        #[unroll]
        for g in 0..groups {
            let column = first_column + g * COLUMNS * width;
            let clamped = if column < columns {
                column
            } else {
                columns - width
            };
            let mut physical = clamped + h * columns;
            if rotate {
                let half = heads.half as usize;
                physical = (clamped / half) * 2 * half + clamped % half + h * half;
            }
            read_columns[h * groups + g] = physical * weight_step;
        }
    }
    // A multiple of UNROLL, so that a slice starts on an `x` vector whatever its width.
    let slice = inputs.div_ceil(SPLITS * UNROLL) * UNROLL;
    let start = split * slice;
    let end = if start + slice < inputs {
        start + slice
    } else {
        inputs
    };

    // Sum of row `r`, component `c` (slot `c / width`, column `c % width` of its vector) at
    // `r * components + c`; the row's sum of squares at `r`.
    let mut sums = Array::<f32>::new(rows_per_cube * components);
    let mut squares = Array::<f32>::new(rows_per_cube);
    let mut source_rows = Array::<usize>::new(rows_per_cube);
    // Where a row's input 0 is in `x`: `row · x_row`, plus `x_offset` inputs with
    // `offset_inputs`. The flag keeps the offset out of every other product's code: with the
    // offset always added, the H200's 18-row output and down projections took 8 % longer.
    let x_offset = if offset_inputs {
        strides.x_offset as usize * x_step
    } else {
        usize::new(0)
    };
    #[unroll]
    for r in 0..rows_per_cube {
        source_rows[r] = if first_row + r < rows {
            first_row + r
        } else {
            rows - 1
        };
        squares[r] = f32::new(0.0);
        #[unroll]
        for c in 0..components {
            sums[r * components + c] = f32::new(0.0);
        }
    }
    // UNROLL inputs at a time: their loads are issued together, then added in input order, so
    // every sum is the same sequence of operations as one input at a time.
    let mut w = Array::<f32>::new(UNROLL * components);
    let mut xs = Array::<f32>::new(UNROLL);
    let mut k = start;
    while k + UNROLL <= end {
        accumulate::<F, NX, NW>(
            x,
            weight,
            k,
            x_row,
            x_offset,
            x_step,
            weight_row,
            &read_columns,
            &source_rows,
            &mut sums,
            &mut squares,
            &mut w,
            &mut xs,
            UNROLL,
            x_width,
            width,
            rows_per_cube,
            slots,
            normalize,
        );
        k += UNROLL;
    }
    // The last slice's tail, only where `inputs` is not a multiple of UNROLL: `x` is then read
    // one input at a time (`NX` = 1), so an input is element 0 of its vector.
    while k < end {
        #[unroll]
        for j in 0..slots {
            let vector = weight[(k * weight_row + read_columns[j]) / width];
            #[unroll]
            for v in 0..width {
                w[j * width + v] = f32::cast_from(vector[v]);
            }
        }
        #[unroll]
        for r in 0..rows_per_cube {
            let x0 =
                f32::cast_from(x[(source_rows[r] * x_row + x_offset + k * x_step) / x_width][0]);
            if normalize {
                squares[r] += x0 * x0;
            }
            #[unroll]
            for c in 0..components {
                sums[r * components + c] += x0 * w[c];
            }
        }
        k += 1;
    }

    // Unit `split` finishes row `split % rows_per_cube`, the `batch`-th share of the components
    // that `split / rows_per_cube` picks: first its scale from the slices' sums of squares (in
    // slice order), then `batch` components at a time through shared memory, each sum over the
    // slices in slice order. The squares pass through the same shared memory first (32 KiB is
    // all some devices have).
    let finisher = split < rows_per_cube * batch;
    let r = split % rows_per_cube;
    let share = split / rows_per_cube;
    let mut partial = SharedMemory::<f32>::new(SPLITS * rows_per_cube * batch * COLUMNS);
    let mut scale = f32::new(1.0);
    if normalize {
        if lane == 0 {
            #[unroll]
            for row in 0..rows_per_cube {
                partial[split * rows_per_cube + row] = squares[row];
            }
        }
        sync_cube();
        if finisher {
            let mut total = partial[r];
            #[unroll]
            for s in 1..SPLITS {
                total += partial[s * rows_per_cube + r];
            }
            scale = f32::new(1.0) / (total / f32::cast_from(inputs) + eps).sqrt();
        }
        sync_cube();
    }
    let rounds = components / batch;
    let mut totals = Array::<f32>::new(rounds);
    #[unroll]
    for b in 0..rounds {
        #[unroll]
        for row in 0..rows_per_cube {
            #[unroll]
            for e in 0..batch {
                partial[((split * rows_per_cube + row) * batch + e) * COLUMNS + lane] =
                    sums[row * components + b * batch + e];
            }
        }
        sync_cube();
        if finisher {
            let mut total = partial[(r * batch + share) * COLUMNS + lane];
            #[unroll]
            for s in 1..SPLITS {
                total += partial[((s * rows_per_cube + r) * batch + share) * COLUMNS + lane];
            }
            totals[b] = total;
        }
        sync_cube();
    }
    let row = first_row + r;
    if finisher && row < rows {
        // Round `b` gave this unit component `b · batch + share`; the first half's rounds hold
        // the outputs (the gates with SwiGLU, each rotation pair's first element), the second
        // half's the up projections (each pair's second element).
        #[unroll]
        for b in 0..groups * width / batch {
            let component = b * batch + share;
            let column = first_column + (component / width) * COLUMNS * width + component % width;
            if column < columns {
                let mut value = totals[b];
                if normalize {
                    value *= scale;
                }
                if rotate {
                    let mut second = totals[b + groups * width / batch];
                    if normalize {
                        second *= scale;
                    }
                    write_rotated_pair::<F>(
                        F::cast_from(value),
                        F::cast_from(second),
                        row,
                        column,
                        cos,
                        sin,
                        output,
                        keys,
                        values,
                        &heads,
                    );
                } else {
                    if swiglu {
                        let mut up = totals[b + groups * width / batch];
                        if normalize {
                            up *= scale;
                        }
                        value = value / (f32::new(1.0) + (-value).exp()) * up;
                    }
                    // Only what a flag folds in is read.
                    let addend_value = if add_addend {
                        f32::cast_from(
                            addend[row * strides.addend_row as usize
                                + column * strides.addend_step as usize],
                        )
                    } else {
                        f32::new(0.0)
                    };
                    let bias_value = if add_bias {
                        f32::cast_from(bias[column * strides.bias_step as usize])
                    } else {
                        f32::new(0.0)
                    };
                    let residual_value = if add_residual {
                        f32::cast_from(
                            residual[row * strides.residual_row as usize
                                + column * strides.residual_step as usize],
                        )
                    } else {
                        f32::new(0.0)
                    };
                    value = fold_epilogue(
                        value,
                        addend_value,
                        bias_value,
                        residual_value,
                        add_addend,
                        add_bias,
                        silu,
                        add_residual,
                    );
                    if copy_prefix {
                        // `[prefix | product]`, `2 · columns` a row.
                        let out_row = row * 2 * columns;
                        output[out_row + columns + column] = F::cast_from(value);
                        output[out_row + column] = prefix[row * strides.prefix_row as usize
                            + column * strides.prefix_step as usize];
                    } else {
                        output[row * columns + column] = F::cast_from(value);
                    }
                }
            }
        }
    }
}

/// What a product folds in after its sum, in this order: `+ addend`, `+ bias`, SiLU,
/// `+ residual` (each only with its flag). The one-launch draft (`super::draft_chain`) applies it
/// too, so that its outputs are this kernel's bits.
#[cube]
#[allow(clippy::too_many_arguments)]
pub(super) fn fold_epilogue(
    sum: f32,
    addend: f32,
    bias: f32,
    residual: f32,
    #[comptime] add_addend: bool,
    #[comptime] add_bias: bool,
    #[comptime] silu: bool,
    #[comptime] add_residual: bool,
) -> f32 {
    let mut value = sum;
    if add_addend {
        value += addend;
    }
    if add_bias {
        value += bias;
    }
    if silu {
        value = value / (f32::new(1.0) + (-value).exp());
    }
    if add_residual {
        value += residual;
    }
    value
}

/// Adds inputs `k .. k + count` of the cube's rows to their sums (and sums of squares), one input
/// after another: `count` inputs' weight vectors and `x` vectors are loaded first, so that their
/// loads are in flight together.
#[cube]
#[allow(clippy::too_many_arguments)]
fn accumulate<F: Float, NX: Size, NW: Size>(
    x: &Array<Vector<F, NX>>,
    weight: &Array<Vector<F, NW>>,
    k: usize,
    x_row: usize,
    x_offset: usize,
    x_step: usize,
    weight_row: usize,
    read_columns: &Array<usize>,
    source_rows: &Array<usize>,
    sums: &mut Array<f32>,
    squares: &mut Array<f32>,
    w: &mut Array<f32>,
    xs: &mut Array<f32>,
    #[comptime] count: usize,
    #[comptime] x_width: usize,
    #[comptime] width: usize,
    #[comptime] rows_per_cube: usize,
    #[comptime] slots: usize,
    #[comptime] normalize: bool,
) {
    let components = slots * width;
    #[unroll]
    for u in 0..count {
        #[unroll]
        for j in 0..slots {
            let vector = weight[((k + u) * weight_row + read_columns[j]) / width];
            #[unroll]
            for v in 0..width {
                w[u * components + j * width + v] = f32::cast_from(vector[v]);
            }
        }
    }
    #[unroll]
    for r in 0..rows_per_cube {
        let start = source_rows[r] * x_row + x_offset;
        #[unroll]
        for q in 0..count / x_width {
            let vector = x[(start + (k + q * x_width) * x_step) / x_width];
            #[unroll]
            for i in 0..x_width {
                xs[q * x_width + i] = f32::cast_from(vector[i]);
            }
        }
        if normalize {
            let mut square = squares[r];
            #[unroll]
            for u in 0..count {
                square += xs[u] * xs[u];
            }
            squares[r] = square;
        }
        #[unroll]
        for c in 0..components {
            let mut sum = sums[r * components + c];
            #[unroll]
            for u in 0..count {
                sum += xs[u] * w[u * components + c];
            }
            sums[r * components + c] = sum;
        }
    }
}

/// Rotates the pair `(first, second)` — elements `d` and `d + half` of a head in token row `row`,
/// the product already rounded to the element type as a separate rotation kernel would read it —
/// with [`rotate_pair`], and writes it where [`super::rope`]'s kernel would: Q heads to `q`, K
/// heads to slots `start + t` of the cache's `keys`, V heads unrotated to its `values`. `column`
/// is the pair's logical column (`head · half + d`).
#[cube]
#[allow(clippy::too_many_arguments)]
fn write_rotated_pair<F: Float>(
    first: F,
    second: F,
    row: usize,
    column: usize,
    cos: &Array<F>,
    sin: &Array<F>,
    q: &mut Array<F>,
    keys: &mut Array<F>,
    values: &mut Array<F>,
    heads: &RotationHeads,
) {
    let half = heads.half as usize;
    let (query_heads, kv_heads) = (heads.heads as usize, heads.kv_heads as usize);
    let len = heads.len as usize;
    let head = column / half;
    let d = column % half;
    let batch = row / len;
    let t = row % len;
    let slot = heads.start as usize + t;
    if head < query_heads + kv_heads {
        let x0 = f32::cast_from(first);
        let x1 = f32::cast_from(second);
        let rotated0 = rotate_pair(
            x0,
            x1,
            f32::cast_from(cos[offset2(&heads.cos, row, d)]),
            f32::cast_from(sin[offset2(&heads.sin, row, d)]),
        );
        let rotated1 = rotate_pair(
            x1,
            x0,
            f32::cast_from(cos[offset2(&heads.cos, row, d + half)]),
            f32::cast_from(sin[offset2(&heads.sin, row, d + half)]),
        );
        if head < query_heads {
            q[offset4(&heads.q, batch, head, t, d)] = F::cast_from(rotated0);
            q[offset4(&heads.q, batch, head, t, d + half)] = F::cast_from(rotated1);
        } else {
            let layer = heads.layer as usize;
            let kv_head = head - query_heads;
            keys[offset5(&heads.k, layer, batch, kv_head, slot, d)] = F::cast_from(rotated0);
            keys[offset5(&heads.k, layer, batch, kv_head, slot, d + half)] = F::cast_from(rotated1);
        }
    } else {
        let layer = heads.layer as usize;
        let kv_head = head - query_heads - kv_heads;
        values[offset5(&heads.v, layer, batch, kv_head, slot, d)] = first;
        values[offset5(&heads.v, layer, batch, kv_head, slot, d + half)] = second;
    }
}

/// Where [`write_rotated_pair`] reads its tables and writes its heads, as launch constants (see
/// [`ProductStrides`]): half the head dimension, the head counts, the block's length (the
/// product's rows are `batch · len` tokens), the cache layer and first slot it fills, and the
/// strides of the tables `[batch · len, dim]`, of Q and of the cache's keys and values.
#[derive(CubeLaunch, CubeType)]
struct RotationHeads {
    half: u32,
    heads: u32,
    kv_heads: u32,
    len: u32,
    layer: u32,
    start: u32,
    cos: Strides2,
    sin: Strides2,
    q: Strides4,
    k: Strides5,
    v: Strides5,
}

/// What [`row_matmul_kernel`] indexes its arrays with, passed as launch constants: tensor
/// arguments would carry the same shapes and strides, but CubeCL copies those into a new device
/// buffer at every launch, which cost the host ~5 µs of a launch's ~11 on the H200
/// (`examples/launch_cost.rs`, docs/benchmarks.md, session 17). Strides count elements.
#[derive(CubeLaunch, CubeType)]
struct ProductStrides {
    rows: u32,
    inputs: u32,
    /// Output columns (the output is row-major without padding).
    columns: u32,
    x_row: u32,
    x_step: u32,
    weight_row: u32,
    weight_step: u32,
    addend_row: u32,
    addend_step: u32,
    bias_step: u32,
    residual_row: u32,
    residual_step: u32,
    /// Inputs of `x` before the product's first, in every row (a multiple of `NX`; read only
    /// with `offset_inputs`).
    x_offset: u32,
    prefix_row: u32,
    prefix_step: u32,
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
        let output = launch_product::<R, B>(self.x, self.weight, self.folds, None)?;
        from_cube::<R, B, 2>(output)
    }
}

/// The operation behind [`super::rotary_product_into_cache`]: a Llama layer's QKV product, its
/// norm folded in, rotated and split into heads, K and V written into a cache block.
pub(super) struct RotaryProduct<'a, B: Backend> {
    pub x: &'a BurnTensor<B, 2>,
    pub weight: &'a BurnTensor<B, 2>,
    pub rms_norm_eps: Option<f64>,
    pub rotation: Rotation<'a, B>,
}

/// What [`RotaryProduct`] rotates with and where it writes K and V.
pub(super) struct Rotation<'a, B: Backend> {
    /// `[batch, 1, len, head_dim]` (see [`super::rotate_qkv`]).
    pub cos: &'a BurnTensor<B, 4>,
    pub sin: &'a BurnTensor<B, 4>,
    pub heads: usize,
    pub kv_heads: usize,
    pub cache: CacheBlock<'a, B>,
}

impl<B: Backend> CubeOp<B> for RotaryProduct<'_, B> {
    type Output = BurnTensor<B, 4>;

    fn launch<R: CubeRuntime>(self) -> Option<Self::Output> {
        let folds = ProductFolds {
            rms_norm_eps: self.rms_norm_eps,
            ..ProductFolds::default()
        };
        let q = launch_product::<R, B>(self.x, self.weight, folds, Some(self.rotation))?;
        from_cube::<R, B, 4>(q)
    }
}

/// Launches [`row_matmul_kernel`]: the product `[rows, columns]`, or with `rotation` the
/// rotated queries `[batch, heads, len, head_dim]` (K and V written into the cache). `None`, with
/// nothing launched, where the shapes, dtypes or strides do not fit.
fn launch_product<R: CubeRuntime, B: Backend>(
    x: &BurnTensor<B, 2>,
    weight: &BurnTensor<B, 2>,
    folds: ProductFolds<'_, B>,
    rotation: Option<Rotation<'_, B>>,
) -> Option<CubeTensor<R>> {
    let [rows, x_columns] = x.dims();
    let [inputs, weight_columns] = weight.dims();
    let input_offset = folds.input_offset;
    let rotate = rotation.is_some();
    let halves = if folds.swiglu || rotate { 2 } else { 1 };
    let columns = weight_columns / halves;
    if rows == 0
        || rows > super::MATMUL_MAX_ROWS
        || inputs == 0
        || columns == 0
        || input_offset + inputs != x_columns
        || weight_columns % halves != 0
        || (folds.swiglu && folds.silu)
        || [folds.residual, folds.addend]
            .into_iter()
            .flatten()
            .any(|tensor| tensor.dims() != [rows, columns])
        || folds.bias.is_some_and(|bias| bias.dims() != [columns])
        || folds
            .prefix
            .is_some_and(|prefix| prefix.dims() != [rows, columns])
    {
        return None;
    }
    // The rotation takes no fold but the norm: a Llama layer's QKV product has no other.
    if rotate
        && (folds.swiglu
            || folds.silu
            || folds.addend.is_some()
            || folds.bias.is_some()
            || folds.residual.is_some()
            || folds.prefix.is_some())
    {
        return None;
    }
    let x = to_cube::<R, B, 2>(x)?;
    let weight = to_cube::<R, B, 2>(weight)?;
    let optional = |tensor: Option<&BurnTensor<B, 2>>| match tensor {
        Some(tensor) => to_cube::<R, B, 2>(tensor).map(Some),
        None => Some(None),
    };
    let residual = optional(folds.residual)?;
    let addend = optional(folds.addend)?;
    let prefix = optional(folds.prefix)?;
    let bias_row = folds.bias.map(|bias| bias.clone().reshape([1, columns]));
    let bias = optional(bias_row.as_ref())?;
    if weight.dtype != x.dtype
        || [&residual, &addend, &bias, &prefix]
            .into_iter()
            .flatten()
            .any(|tensor| tensor.dtype != x.dtype)
    {
        return None;
    }
    let rotation_half = rotation.as_ref().map(|rotation| rotation.cos.dims()[3] / 2);
    let layout = Layout::choose(
        rows,
        columns,
        halves,
        rotation_half,
        input_offset,
        &x,
        &weight,
    );
    let targets = match rotation {
        Some(rotation) => Some(RotationTargets::new(&rotation, &x, rows, columns, &layout)?),
        None => None,
    };
    let (client, dtype) = (x.client.clone(), x.dtype);
    let cubes = CubeCount::Static(
        rows.div_ceil(layout.rows_per_cube) as u32,
        columns.div_ceil(COLUMNS * layout.groups * layout.width) as u32,
        1,
    );
    let (add_residual, add_addend, add_bias, copy_prefix) = (
        residual.is_some(),
        addend.is_some(),
        bias.is_some(),
        prefix.is_some(),
    );
    let output_columns = if copy_prefix { 2 * columns } else { columns };
    let stride = |tensor: &Option<CubeTensor<R>>, dim: usize| {
        tensor
            .as_ref()
            .map_or(Some(0), |tensor| scalar(tensor.meta.strides()[dim]))
    };
    // Declined, like every other kernel's launch, where a size or stride does not fit a u32.
    let strides = ProductStridesLaunch::new(
        scalar(rows)?,
        scalar(inputs)?,
        scalar(columns)?,
        scalar(x.meta.strides()[0])?,
        scalar(x.meta.strides()[1])?,
        scalar(weight.meta.strides()[0])?,
        scalar(weight.meta.strides()[1])?,
        stride(&addend, 0)?,
        stride(&addend, 1)?,
        stride(&bias, 1)?,
        stride(&residual, 0)?,
        stride(&residual, 1)?,
        scalar(input_offset)?,
        stride(&prefix, 0)?,
        stride(&prefix, 1)?,
    );
    // Unused bindings: any tensor will do (the output for the unused writable ones).
    let residual = residual.unwrap_or_else(|| x.clone());
    let addend = addend.unwrap_or_else(|| x.clone());
    let bias = bias.unwrap_or_else(|| x.clone());
    let prefix = prefix.unwrap_or_else(|| x.clone());
    let (output, cos, sin, keys, values, heads) = match targets {
        Some(targets) => (
            targets.q,
            targets.cos,
            targets.sin,
            targets.keys,
            targets.values,
            targets.heads,
        ),
        None => {
            let output = empty_like(&x, [rows, output_columns]);
            let heads = RotationTargets::<R>::unused();
            (
                output.clone(),
                x.clone(),
                x.clone(),
                output.clone(),
                output,
                heads,
            )
        }
    };
    unsafe {
        row_matmul_kernel::launch_unchecked::<R>(
            &client,
            cubes,
            CubeDim::new_2d(COLUMNS as u32, SPLITS as u32),
            layout.x_width,
            layout.width,
            x.clone().into_array_arg(),
            weight.into_array_arg(),
            addend.into_array_arg(),
            bias.into_array_arg(),
            residual.into_array_arg(),
            prefix.into_array_arg(),
            cos.into_array_arg(),
            sin.into_array_arg(),
            output.clone().into_array_arg(),
            keys.into_array_arg(),
            values.into_array_arg(),
            strides,
            heads,
            folds.rms_norm_eps.unwrap_or(0.0) as f32,
            layout.x_width,
            layout.width,
            layout.rows_per_cube,
            layout.groups,
            halves,
            layout.batch,
            folds.swiglu,
            folds.rms_norm_eps.is_some(),
            add_addend,
            add_bias,
            folds.silu,
            add_residual,
            copy_prefix,
            input_offset > 0,
            rotate,
            dtype.into(),
        )
    };
    Some(output)
}

/// The tensors and constants of a rotating product's launch.
struct RotationTargets<R: CubeRuntime> {
    q: CubeTensor<R>,
    cos: CubeTensor<R>,
    sin: CubeTensor<R>,
    keys: CubeTensor<R>,
    values: CubeTensor<R>,
    heads: RotationHeadsLaunch<R>,
}

impl<R: CubeRuntime> RotationTargets<R> {
    /// Checks `rotation` against a product of `rows` rows and `columns` rotation pairs, and
    /// allocates Q; `None` where anything disagrees or the layout would put a vector across the
    /// two halves of a head.
    fn new<B: Backend>(
        rotation: &Rotation<'_, B>,
        x: &CubeTensor<R>,
        rows: usize,
        columns: usize,
        layout: &Layout,
    ) -> Option<Self> {
        let [batch, _, len, dim] = rotation.cos.dims();
        let (heads, kv_heads) = (rotation.heads, rotation.kv_heads);
        let half = dim / 2;
        let cache = &rotation.cache;
        if dim == 0
            || dim % 2 != 0
            || !half.is_multiple_of(layout.width)
            || rows != batch * len
            || columns != (heads + 2 * kv_heads) * half
            || rotation.sin.dims() != rotation.cos.dims()
            || !cache.fits(batch, kv_heads, dim, len)
        {
            return None;
        }
        let cos = to_cube::<R, B, 2>(&rotation.cos.clone().reshape([rows, dim]))?;
        let sin = to_cube::<R, B, 2>(&rotation.sin.clone().reshape([rows, dim]))?;
        let keys = to_cube::<R, B, 5>(cache.keys)?;
        let values = to_cube::<R, B, 5>(cache.values)?;
        if [&cos, &sin, &keys, &values]
            .iter()
            .any(|tensor| tensor.dtype != x.dtype)
        {
            return None;
        }
        let q = empty_like(x, [batch, heads, len, dim]);
        let [half, heads, kv_heads, len, layer, start] =
            scalars(&[half, heads, kv_heads, len, cache.layer, cache.start])?;
        let heads = RotationHeadsLaunch::new(
            half,
            heads,
            kv_heads,
            len,
            layer,
            start,
            strides2(&cos)?,
            strides2(&sin)?,
            strides4(&q)?,
            strides5(&keys)?,
            strides5(&values)?,
        );
        Some(Self {
            q,
            cos,
            sin,
            keys,
            values,
            heads,
        })
    }

    /// The constants of a launch that rotates nothing (never read).
    fn unused() -> RotationHeadsLaunch<R> {
        RotationHeadsLaunch::new(
            1,
            0,
            0,
            1,
            0,
            0,
            Strides2Launch::new(0, 0),
            Strides2Launch::new(0, 0),
            Strides4Launch::new(0, 0, 0, 0),
            Strides5Launch::new(0, 0, 0, 0, 0),
            Strides5Launch::new(0, 0, 0, 0, 0),
        )
    }
}

/// Inputs or columns a unit loads at once where the tensor's layout allows: four f32 are one
/// 16-byte load.
const VECTOR: usize = 4;
/// The most f32 sums a unit keeps for a tree with vector loads (`rows_per_cube · halves · width`).
const TREE_SUMS: usize = 64;
/// Row tiles of a product too wide for one wave ([`Layout::choose`]) are multiples of this.
const BALANCED_TILE_STEP: usize = 4;
/// The fewest cubes a tree product too wide for one wave ([`Layout::choose`]) takes the largest
/// row tile for. On the H200 a 24-token tree's forward took 4.11 ms with 64, 4.27 with 132, 4.51
/// with 16 (5.11 ms before vector loads; docs/benchmarks.md, session 17).
const MIN_TREE_CUBES: usize = 64;
/// Cubes that run at once where the device does not say how many multiprocessors it has (the
/// H200's and the H100's 132). A tree product's cube has 512 units, and one with 32 sums a unit
/// or more fills a multiprocessor's registers: a cube past the first wave waits for a whole
/// cube's time (a 24-token tree's gate/up product took 21.0 µs on 144 cubes, 13.3 on 96).
const DEFAULT_MULTIPROCESSORS: usize = 132;
/// Sums a unit of a rotating QKV product ([`row_matmul_kernel`]'s `rotate`) keeps: it loads one
/// 32-bit word of weight columns at a time (one f32 column, two f16), and each column in both
/// halves of a head, with as many rows per cube as make this many sums (8 rows of f32, 4 of f16).
/// On the H200 an f32 12/18/24-token tree's QKV product took 8.6/8.6/9.2 µs with one column and
/// 8 rows, against 9.4/9.3/9.6 with two columns and 4 rows; in f16 one column took 10.0/9.8/11.2
/// µs, two 9.0/9.0/9.1 (Nsight Compute, docs/benchmarks.md, session 24).
const ROTATION_SUMS: usize = 16;

/// How a product's work is laid out over cubes and units. No choice here changes the operations
/// of any one output's sum (see [`row_matmul_kernel`]): only how many run, and where.
#[derive(Debug, Clone, Copy)]
struct Layout {
    rows_per_cube: usize,
    groups: usize,
    /// `NX`: inputs per load of `x`.
    x_width: usize,
    /// `NW`: columns per load of the weight.
    width: usize,
    /// Components per round through shared memory.
    batch: usize,
}

impl Layout {
    /// `rotation_half`: half the head dimension of a rotating product ([`row_matmul_kernel`]'s
    /// `rotate`), whose column vectors must not cross from one half of a head to the next.
    /// `input_offset`: the column of `x` the product's inputs start at.
    fn choose<R: CubeRuntime>(
        rows: usize,
        columns: usize,
        halves: usize,
        rotation_half: Option<usize>,
        input_offset: usize,
        x: &CubeTensor<R>,
        weight: &CubeTensor<R>,
    ) -> Self {
        // A vector of `x` must not straddle the input offset.
        let inputs = weight.meta.shape()[0];
        let x_width = if loads_vectors(x, inputs) && input_offset.is_multiple_of(VECTOR) {
            VECTOR
        } else {
            1
        };
        if rows == 1 {
            // A decoding step's product reads the weight once, one column per unit: 2 or 4
            // columns per unit were no faster (fewer cubes; docs/benchmarks.md, session 17).
            return Self {
                rows_per_cube: 1,
                groups: 1,
                x_width,
                width: 1,
                batch: 1,
            };
        }
        if let Some(half) = rotation_half {
            // Columns in one 32-bit word ([`ROTATION_SUMS`]).
            let word = (4 / x.dtype.size()).max(1);
            let width = if half.is_multiple_of(word) && loads_vectors(weight, columns) {
                word
            } else {
                1
            };
            return Self {
                rows_per_cube: ROTATION_SUMS / (halves * width),
                groups: 1,
                x_width,
                width,
                batch: 1,
            };
        }
        if loads_vectors(weight, columns) {
            // Vector loads cut a tree product's load instructions; what is left is spreading
            // its sums over the multiprocessors. The layout with the most cubes that still run
            // in one wave won for the layer's products of 12–24-token trees on the H200: 12.4
            // against 15.3 µs for the SwiGLU product at 18 rows (120 cubes of four columns and
            // 4 rows, against 72 of 8 rows), 8.2 against 9.3 for the 576-column ones (90
            // cubes of two columns against 45 of four; docs/benchmarks.md, session 24). Among
            // equal counts, wider loads: a 40-token tree's 576-column products took 9.4 µs
            // with four columns and 4 rows, 9.8 with two columns and 8 rows (90 cubes each).
            let wave = x
                .client
                .properties()
                .hardware
                .num_streaming_multiprocessors
                .map_or(DEFAULT_MULTIPROCESSORS, |count| count as usize);
            let tiles = |width: usize| {
                [16, 8, 4]
                    .into_iter()
                    .filter(move |&tile| tile * halves * width <= TREE_SUMS)
                    .map(move |tile| (width, tile))
            };
            let cubes = |(width, tile): (usize, usize)| {
                rows.div_ceil(tile) * columns.div_ceil(COLUMNS * width)
            };
            let one_wave = tiles(VECTOR)
                .chain(tiles(VECTOR / 2))
                .filter(|&layout| cubes(layout) <= wave)
                .max_by_key(|&(width, tile)| (cubes((width, tile)), width, tile));
            // A product too wide for one wave (the LM head) takes four columns and the largest
            // row tile that still gives MIN_TREE_CUBES cubes: the fewest reads of its weight.
            // Its rows are then shared evenly by as many tiles, rounded up to a multiple of
            // four: a tile's every row costs its sums whether the row exists or not. On the H200
            // the LM head of an 18-row tree took 106.8 µs in two 16-row tiles, 85.0 in two of
            // 10 (f32); but f16's 10-row tiles took 118.3 against 111.3, where 12-row tiles (a
            // 24-row tree) took 90.9 (f32 87.0; docs/benchmarks.md, session 26).
            let (width, rows_per_cube) = one_wave.unwrap_or_else(|| {
                let (width, tile) = tiles(VECTOR)
                    .find(|&layout| cubes(layout) >= MIN_TREE_CUBES)
                    .unwrap_or((VECTOR, 4));
                let balanced = rows
                    .div_ceil(rows.div_ceil(tile))
                    .next_multiple_of(BALANCED_TILE_STEP);
                (width, balanced.min(tile))
            });
            return Self {
                rows_per_cube,
                groups: 1,
                x_width,
                width,
                batch: width.min(16 / rows_per_cube),
            };
        }
        // Smaller row tiles (1, 2, 4 or 8 rows for the layer's products) were no faster for
        // 12–40-row trees on the H200 (docs/benchmarks.md, session 16).
        let rows_per_cube = if rows <= ROWS { ROWS } else { MANY_ROWS };
        let row_tiles = rows.div_ceil(rows_per_cube);
        // Several column groups per unit for a tree (each loaded input then feeds several sums),
        // except where even 2 would leave fewer than MIN_WIDE_CUBES cubes.
        let widest = if halves == 2 { 2 } else { WIDE_COLUMNS };
        let cubes_with = |per_unit: usize| columns.div_ceil(COLUMNS * per_unit) * row_tiles;
        let groups = if cubes_with(widest) >= MIN_WIDE_CUBES {
            widest
        } else if cubes_with(2) >= MIN_WIDE_CUBES {
            2
        } else {
            1
        };
        Self {
            rows_per_cube,
            groups,
            x_width,
            width: 1,
            batch: 1,
        }
    }
}

/// Whether `tensor` `[_, n]` can be read [`VECTOR`] elements at a time along its rows: unit
/// stride along them, row strides and `n` (and so every slice start) multiples of the width.
fn loads_vectors<R: CubeRuntime>(tensor: &CubeTensor<R>, n: usize) -> bool {
    let strides = tensor.meta.strides();
    n.is_multiple_of(VECTOR) && strides[1] == 1 && strides[0].is_multiple_of(VECTOR)
}
