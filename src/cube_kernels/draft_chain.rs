//! A one-beam draft — every step's RNN update, residual blocks, merged exit product and pick of
//! the best token — in one launch, on CUDA.
//!
//! After session 29 a one-beam draft of `C − 1` steps was `5 (C − 1) + 1` launches: each step's
//! RNN product, two residual-block products, the exit product and the selection kernel. A launch
//! costs the H200's host 10–15 µs (docs/benchmarks.md, session 28), so the draft alone took ~300
//! µs of a ~2.3 ms round while the device worked ~100 µs of it. Here one launch runs the whole
//! chain: its cubes (one per multiprocessor, all resident at once) compute each product's column
//! tiles, then meet at a grid-wide barrier before the next product reads what they wrote. On the
//! H200 a five-token f16 draft went from 317 to 130 µs of wall time (docs/benchmarks.md, session
//! 33); the kernel then waits mostly at its barriers and on memory, not on the host.
//!
//! **The same bits as the separate launches.** Every output is summed as
//! [`super::matmul`]'s row product sums it: [`SPLITS`] slices of the inputs, each of
//! `ceil(inputs / (SPLITS · UNROLL)) · UNROLL` inputs added one after another in f32, then the
//! slices' sums added in slice order, then the same epilogue (addend, bias, SiLU, residual) and
//! the same rounding to the float type. The pick is [`super::beam`]'s: the largest logit after
//! rounding, ties to the lower column. So a drafted beam is the one the launch-per-product path
//! drafts (`tests/cube_kernels.rs` compares them on CUDA).
//!
//! **The barrier.** CubeCL has no grid synchronisation and no memory fence, so the kernel builds
//! both from what it has. Each cube's first unit adds one to an arrival counter and spins on an
//! atomic load of it until every cube has arrived. Values another cube will read are written with
//! an atomic exchange whose old value the writer compares before the cube's barrier: the
//! exchange has then been performed at the L2 cache, the GPU's point of coherence, before the
//! cube arrives. Readers load them with plain loads after the barrier; every activation lives in
//! a region of its own (128-byte aligned) that no unit reads before it is written within a
//! launch, so no multiprocessor can hold a stale copy in its L1. The counter is never reset: the
//! host knows how many arrivals each launch adds (cubes × barriers) and passes the count before
//! the launch, compared with wrapping arithmetic. A cube that waits absurdly long
//! ([`SPIN_LIMIT`]) goes on rather than hang the GPU: the draft is then wrong, never the output
//! (verification checks every drafted token), and the next launch's count is still right.
//!
//! **Residency.** A grid barrier deadlocks unless every cube is resident. The kernel launches one
//! cube of [`CHAIN_UNITS`] units per multiprocessor (CubeCL's hardware properties): one such cube
//! always fits, as it needs at most 128 registers a unit (it takes 40–58 on the H200) and under
//! 48 KiB of shared memory. Only CUDA's scheduling is relied on; WGPU keeps the separate
//! launches, where nothing promises that all cubes run at once.

use std::any::Any;
use std::cell::RefCell;

use burn::tensor::{DType, Shape, backend::Backend};
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::{CubeRuntime, tensor::CubeTensor};
use cubecl::prelude::*;

use super::DraftChain;
use super::DraftChainOutput;
use super::dispatch::{
    CubeOp, empty_int_like, empty_like, from_cube, from_cube_int, is_cuda, to_cube, to_cube_int,
};
use super::matmul::{SPLITS, UNROLL, fold_epilogue};
use super::reduce::{NO_COLUMN, beats, cube_pick_among, scalar, scalars};
use crate::generate::int_tensor;

/// Output columns per tile: sixteen consecutive columns, so a warp's weight loads cover whole
/// 32-byte sectors in f16 and two in f32.
const TILE: usize = 16;
/// Units per cube: a tile's columns times the product's input slices ([`SPLITS`]).
const CHAIN_UNITS: usize = TILE * SPLITS;
const _: () = assert!(
    CHAIN_UNITS == 2 * super::reduce::PICK_UNITS,
    "a cube's pick folds one candidate per unit"
);
/// The most weight elements a unit loads together before adding them in order: a slice of a
/// 1152-input product (36) in one wait on memory instead of nine with [`UNROLL`]. Nsight Compute
/// on the H200 showed the chain waiting on memory, not moving bytes: 300 µs for a five-token f32
/// draft at 12 % of the DRAM's bandwidth with 12 inputs at a time and one column a unit.
const MAX_CHUNK: usize = 36;
/// The most batch rows the kernel drafts for (each unit keeps a sum per row in registers).
const CHAIN_MAX_ROWS: usize = 4;
/// The most residual blocks of the head the kernel runs.
const CHAIN_MAX_BLOCKS: usize = 4;
/// Spins on the arrival counter before a cube gives up waiting: each spin is an atomic's round
/// trip to the L2 cache (~0.5–1 µs), so about a second, thousands of times the longest phase a
/// merged-exit head can have; only a cube that is not resident could make another wait that long.
const SPIN_LIMIT: u32 = 1 << 20;
/// Scratch elements are grouped in regions of a multiple of this many f32 (128 bytes, one L1
/// line), so that no line holds values of two regions.
const REGION_ALIGN: usize = 32;

/// The kernel's sizes and row strides, as launch constants (see [`super::reduce::Strides2`]).
#[derive(CubeLaunch, CubeType)]
struct ChainShape {
    hidden: u32,
    vocab: u32,
    steps: u32,
    cubes: u32,
    /// Arrivals counted before this launch (wrapping).
    base: u32,
    /// f32 scratch elements per region.
    region: u32,
    /// The scratch element nothing reads (the target of the writes that never happen).
    sink: u32,
    context_row: u32,
    embedding_row: u32,
    w_row: u32,
    u_row: u32,
    block_row_0: u32,
    block_row_1: u32,
    block_row_2: u32,
    block_row_3: u32,
    exit_row: u32,
    table_row: u32,
}

/// Publishes `value` at `index` of the scratch so that other cubes read it after the next
/// barrier: an atomic exchange, whose old value is compared (with NaN, so never equal) to make
/// the unit wait until the exchange is performed.
#[cube]
fn publish(writes: &mut Array<Atomic<f32>>, index: usize, value: f32, poison: f32, sink: usize) {
    let old = writes[index].swap(value);
    if old == poison {
        writes[sink].swap(old);
    }
}

/// Waits until all `cubes` cubes have arrived here `target / cubes` times since the launch
/// began (`target` counted from `base`): each cube's first unit adds its arrival to the counter
/// and spins on it. (Releasing each cube through a flag word of its own, written by the last
/// arrival, was no faster end to end on the H200: docs/benchmarks.md, session 33.)
#[cube]
fn grid_barrier(arrivals: &mut Array<Atomic<u32>>, base: u32, target: u32) {
    sync_cube();
    if UNIT_POS == 0 {
        arrivals[0].fetch_add(u32::new(1));
        let mut spins = u32::new(0);
        loop {
            let arrived = arrivals[0].load() - base;
            if arrived >= target || spins >= SPIN_LIMIT {
                break;
            }
            spins += 1;
        }
    }
    sync_cube();
}

/// Adds `count` inputs from `k` of each row times the weight columns `read_columns` (element
/// offsets along a weight row) to `sums` (`[row][group]`): the weights and inputs are loaded
/// first, so their loads are in flight together, then added one input after another.
#[cube]
#[allow(clippy::too_many_arguments)]
fn add_inputs<X: Float, F: Float>(
    x: &Array<X>,
    x_rows: &Array<usize>,
    weight: &Array<F>,
    weight_row: usize,
    read_columns: &Array<usize>,
    k: usize,
    sums: &mut Array<f32>,
    w: &mut Array<f32>,
    xs: &mut Array<f32>,
    #[comptime] count: usize,
    #[comptime] rows: usize,
    #[comptime] groups: usize,
) {
    #[unroll]
    for u in 0..count {
        #[unroll]
        for g in 0..groups {
            w[u * groups + g] = f32::cast_from(weight[(k + u) * weight_row + read_columns[g]]);
        }
    }
    #[unroll]
    for r in 0..rows {
        #[unroll]
        for u in 0..count {
            xs[u] = f32::cast_from(x[x_rows[r] + k + u]);
        }
        #[unroll]
        for g in 0..groups {
            let mut sum = sums[r * groups + g];
            #[unroll]
            for u in 0..count {
                sum += xs[u] * w[u * groups + g];
            }
            sums[r * groups + g] = sum;
        }
    }
}

/// Adds inputs `start..end` of each row times each weight column of `read_columns` to `sums`
/// (zeroed first), one input after another in f32: the order [`super::matmul`] sums a slice in.
/// `chunk` inputs at a time (their loads in flight together), then [`UNROLL`], then one.
#[cube]
#[allow(clippy::too_many_arguments)]
fn slice_sums<X: Float, F: Float>(
    x: &Array<X>,
    x_rows: &Array<usize>,
    weight: &Array<F>,
    weight_row: usize,
    read_columns: &Array<usize>,
    start: usize,
    end: usize,
    sums: &mut Array<f32>,
    #[comptime] rows: usize,
    #[comptime] groups: usize,
    #[comptime] chunk: usize,
) {
    #[unroll]
    for i in 0..rows * groups {
        sums[i] = f32::new(0.0);
    }
    let mut w = Array::<f32>::new(chunk * groups);
    let mut xs = Array::<f32>::new(chunk);
    let mut k = start;
    while k + chunk <= end {
        add_inputs::<X, F>(
            x,
            x_rows,
            weight,
            weight_row,
            read_columns,
            k,
            sums,
            &mut w,
            &mut xs,
            chunk,
            rows,
            groups,
        );
        k += chunk;
    }
    while k + UNROLL <= end {
        add_inputs::<X, F>(
            x,
            x_rows,
            weight,
            weight_row,
            read_columns,
            k,
            sums,
            &mut w,
            &mut xs,
            UNROLL,
            rows,
            groups,
        );
        k += UNROLL;
    }
    while k < end {
        add_inputs::<X, F>(
            x,
            x_rows,
            weight,
            weight_row,
            read_columns,
            k,
            sums,
            &mut w,
            &mut xs,
            1usize,
            rows,
            groups,
        );
        k += 1;
    }
}

/// Where a product's outputs go and what its epilogue adds.
#[derive(CubeType)]
struct Epilogue {
    /// Row `r`'s output column 0 in the scratch.
    out_rows: Array<usize>,
    /// Row `r`'s copy of the context (`copy_prefix`) in the scratch.
    prefix_rows: Array<usize>,
    /// Row `r`'s context row in `context`.
    context_rows: Array<usize>,
    /// Row `r`'s addend row in the input table (`add_addend`).
    addend_rows: Array<usize>,
}

/// One product `x · weight` for every row, its column tiles (`groups · TILE` columns: unit
/// `lane` takes columns `lane + g · TILE`) shared among the cubes: each tile's slices summed by
/// its units, added in slice order by the tile's first `rows` splits, which apply the epilogue
/// and publish the result — or, with `pick`, fold it into `best_value` / `best_column` (the
/// unit's best rounded logit, for its row `split`).
#[cube]
#[allow(clippy::too_many_arguments)]
fn product<X: Float, F: Float>(
    x: &Array<X>,
    x_rows: &Array<usize>,
    weight: &Array<F>,
    weight_row: usize,
    inputs: usize,
    columns: usize,
    bias: &Array<F>,
    table: &Array<F>,
    context: &Array<F>,
    epilogue: &Epilogue,
    writes: &mut Array<Atomic<f32>>,
    partial: &mut SharedMemory<f32>,
    best_value: &mut Array<f32>,
    best_column: &mut Array<u32>,
    cubes: usize,
    poison: f32,
    sink: usize,
    #[comptime] rows: usize,
    #[comptime] groups: usize,
    #[comptime] chunk: usize,
    #[comptime] add_addend: bool,
    #[comptime] add_bias: bool,
    #[comptime] silu: bool,
    #[comptime] add_residual: bool,
    #[comptime] copy_prefix: bool,
    #[comptime] pick: bool,
) {
    let unit = UNIT_POS as usize;
    let lane = unit % TILE;
    let split = unit / TILE;
    let slice = inputs.div_ceil(SPLITS * UNROLL) * UNROLL;
    let start = split * slice;
    let end = if start + slice < inputs {
        start + slice
    } else {
        inputs
    };
    let tiles = columns.div_ceil(TILE * groups);
    let mut sums = Array::<f32>::new(rows * groups);
    let mut read_columns = Array::<usize>::new(groups);
    let mut tile = CUBE_POS;
    while tile < tiles {
        let first_column = tile * TILE * groups + lane;
        // Units past the last column sum a valid column and write nothing: all reach the syncs.
        #[unroll]
        for g in 0..groups {
            let column = first_column + g * TILE;
            read_columns[g] = if column < columns {
                column
            } else {
                columns - 1
            };
        }
        slice_sums::<X, F>(
            x,
            x_rows,
            weight,
            weight_row,
            &read_columns,
            start,
            end,
            &mut sums,
            rows,
            groups,
            chunk,
        );
        #[unroll]
        for r in 0..rows {
            #[unroll]
            for g in 0..groups {
                partial[((split * rows + r) * groups + g) * TILE + lane] = sums[r * groups + g];
            }
        }
        sync_cube();
        if split < rows {
            let r = split;
            #[unroll]
            for g in 0..groups {
                let column = first_column + g * TILE;
                if column < columns {
                    let mut value = partial[(r * groups + g) * TILE + lane];
                    #[unroll]
                    for s in 1..SPLITS {
                        value += partial[((s * rows + r) * groups + g) * TILE + lane];
                    }
                    // Only what a flag folds in is read.
                    let addend = if add_addend {
                        f32::cast_from(table[epilogue.addend_rows[r] + column])
                    } else {
                        f32::new(0.0)
                    };
                    let bias_value = if add_bias {
                        f32::cast_from(bias[column])
                    } else {
                        f32::new(0.0)
                    };
                    let residual = if add_residual {
                        f32::cast_from(x[x_rows[r] + column])
                    } else {
                        f32::new(0.0)
                    };
                    value = fold_epilogue(
                        value,
                        addend,
                        bias_value,
                        residual,
                        add_addend,
                        add_bias,
                        silu,
                        add_residual,
                    );
                    let rounded = f32::cast_from(F::cast_from(value));
                    if pick {
                        let c = u32::cast_from(column);
                        if beats(rounded, c, best_value[0], best_column[0]) {
                            best_value[0] = rounded;
                            best_column[0] = c;
                        }
                    } else {
                        if copy_prefix {
                            // Both exchanges in flight before either old value is compared.
                            let prefix = f32::cast_from(context[epilogue.context_rows[r] + column]);
                            let old_value = writes[epilogue.out_rows[r] + column].swap(rounded);
                            let old_prefix = writes[epilogue.prefix_rows[r] + column].swap(prefix);
                            if old_value == poison || old_prefix == poison {
                                writes[sink].swap(old_value);
                            }
                        } else {
                            publish(writes, epilogue.out_rows[r] + column, rounded, poison, sink);
                        }
                    }
                }
            }
        }
        sync_cube();
        tile += cubes;
    }
}

/// Residual block `block` of a step whose regions start at `joined`: `x + silu(x·W + b)` from
/// region `block` to region `block + 1`.
#[cube]
#[allow(clippy::too_many_arguments)]
fn residual_block<F: Float>(
    scratch: &Array<f32>,
    weight: &Array<F>,
    bias: &Array<F>,
    weight_row: usize,
    joined: usize,
    #[comptime] block: usize,
    width: usize,
    region: usize,
    table: &Array<F>,
    context: &Array<F>,
    x_rows: &mut Array<usize>,
    epilogue: &mut Epilogue,
    writes: &mut Array<Atomic<f32>>,
    partial: &mut SharedMemory<f32>,
    best_value: &mut Array<f32>,
    best_column: &mut Array<u32>,
    cubes: usize,
    poison: f32,
    sink: usize,
    #[comptime] rows: usize,
    #[comptime] chunk: usize,
    #[comptime] with_bias: bool,
) {
    let input = joined + block * region;
    let output = joined + (block + 1) * region;
    #[unroll]
    for r in 0..rows {
        x_rows[r] = input + r * width;
        epilogue.out_rows[r] = output + r * width;
    }
    product::<f32, F>(
        scratch,
        x_rows,
        weight,
        weight_row,
        width,
        width,
        bias,
        table,
        context,
        epilogue,
        writes,
        partial,
        best_value,
        best_column,
        cubes,
        poison,
        sink,
        rows,
        1usize,
        chunk,
        false,
        with_bias,
        true,
        true,
        false,
        false,
    );
}

/// The whole draft of `steps` steps for `rows` batch rows; see the module documentation.
///
/// Scratch regions, `region` f32 each, `blocks + 2` a step: the joined state `[h | s]`, each
/// residual block's output, and each cube's best `(logit, column)` per row.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn draft_chain_kernel<F: Float, I: Int>(
    context: &Array<F>,
    first: &Array<I>,
    embedding: &Array<F>,
    rnn_w: &Array<F>,
    rnn_u: &Array<F>,
    rnn_bias: &Array<F>,
    block_0: &Array<F>,
    block_1: &Array<F>,
    block_2: &Array<F>,
    block_3: &Array<F>,
    bias_0: &Array<F>,
    bias_1: &Array<F>,
    bias_2: &Array<F>,
    bias_3: &Array<F>,
    exit: &Array<F>,
    table: &Array<F>,
    draft_ids: &Array<I>,
    tokens: &mut Array<I>,
    history: &mut Array<F>,
    scores: &mut Array<F>,
    scratch: &mut Array<f32>,
    writes: &mut Array<Atomic<f32>>,
    arrivals: &mut Array<Atomic<u32>>,
    shape: ChainShape,
    poison: f32,
    #[comptime] rows: usize,
    #[comptime] blocks: usize,
    #[comptime] narrow_chunk: usize,
    #[comptime] wide_chunk: usize,
    #[comptime] exit_groups: usize,
    #[comptime] exit_chunk: usize,
    #[comptime] with_rnn_bias: bool,
    #[comptime] with_block_bias: bool,
    #[define(F, I)] _dtypes: [StorageType; 2],
) {
    let unit = UNIT_POS as usize;
    let cube = CUBE_POS;
    let hidden = shape.hidden as usize;
    let width = 2 * hidden;
    let vocab = shape.vocab as usize;
    let steps = shape.steps as usize;
    let length = steps + 1;
    let cubes = shape.cubes as usize;
    let region = shape.region as usize;
    let sink = shape.sink as usize;
    let per_step = blocks + 2;

    let mut partial = SharedMemory::<f32>::new(SPLITS * rows * TILE * exit_groups);
    let mut lane_values = SharedMemory::<f32>::new(rows * TILE);
    let mut lane_columns = SharedMemory::<u32>::new(rows * TILE);
    let mut pick_values = SharedMemory::<f32>::new(CHAIN_UNITS);
    let mut pick_columns = SharedMemory::<u32>::new(CHAIN_UNITS);
    let mut chosen = SharedMemory::<u32>::new(rows);
    let mut chosen_values = SharedMemory::<f32>::new(rows);

    let mut x_rows = Array::<usize>::new(rows);
    let mut epilogue = Epilogue {
        out_rows: Array::<usize>::new(rows),
        prefix_rows: Array::<usize>::new(rows),
        context_rows: Array::<usize>::new(rows),
        addend_rows: Array::<usize>::new(rows),
    };
    let mut best_value = Array::<f32>::new(1usize);
    let mut best_column = Array::<u32>::new(1usize);
    #[unroll]
    for r in 0..rows {
        epilogue.context_rows[r] = r * shape.context_row as usize;
        epilogue.addend_rows[r] = usize::new(0);
    }
    // Token 0 of each beam is the first token; the unit that writes a row's picks keeps its
    // running score.
    let mut score = f32::new(0.0);
    if cube == 0 && unit < rows {
        tokens[unit * length] = first[unit];
    }

    let mut phase = u32::new(0);
    let mut step = usize::new(0);
    while step < steps {
        let joined = step * per_step * region;
        // The RNN: s_1 = silu(e·W + b_U) from the first token's embedding (s_0 = 0), later
        // s_t = silu(s_{t−1}·U + input + b_U), `input` the picked column's row of the table;
        // written next to a copy of the context, `[h | s]`.
        #[unroll]
        for r in 0..rows {
            epilogue.out_rows[r] = joined + r * width + hidden;
            epilogue.prefix_rows[r] = joined + r * width;
        }
        if step == 0 {
            #[unroll]
            for r in 0..rows {
                x_rows[r] = usize::cast_from(first[r]) * shape.embedding_row as usize;
            }
            product::<F, F>(
                embedding,
                &x_rows,
                rnn_w,
                shape.w_row as usize,
                hidden,
                hidden,
                rnn_bias,
                table,
                context,
                &epilogue,
                writes,
                &mut partial,
                &mut best_value,
                &mut best_column,
                cubes,
                poison,
                sink,
                rows,
                1usize,
                narrow_chunk,
                false,
                with_rnn_bias,
                true,
                false,
                true,
                false,
            );
        } else {
            let previous = joined - per_step * region;
            #[unroll]
            for r in 0..rows {
                x_rows[r] = previous + r * width + hidden;
            }
            product::<f32, F>(
                scratch,
                &x_rows,
                rnn_u,
                shape.u_row as usize,
                hidden,
                hidden,
                rnn_bias,
                table,
                context,
                &epilogue,
                writes,
                &mut partial,
                &mut best_value,
                &mut best_column,
                cubes,
                poison,
                sink,
                rows,
                1usize,
                narrow_chunk,
                true,
                with_rnn_bias,
                true,
                false,
                true,
                false,
            );
        }
        phase += 1;
        grid_barrier(arrivals, shape.base, phase * shape.cubes);

        // The residual blocks: x + silu(x·W_i + b_i), each from the previous one's output. A
        // kernel cannot index a list of arrays, so each block is an argument and a call of its own.
        if comptime!(blocks > 0) {
            residual_block::<F>(
                scratch,
                block_0,
                bias_0,
                shape.block_row_0 as usize,
                joined,
                0usize,
                width,
                region,
                table,
                context,
                &mut x_rows,
                &mut epilogue,
                writes,
                &mut partial,
                &mut best_value,
                &mut best_column,
                cubes,
                poison,
                sink,
                rows,
                wide_chunk,
                with_block_bias,
            );
            phase += 1;
            grid_barrier(arrivals, shape.base, phase * shape.cubes);
        }
        if comptime!(blocks > 1) {
            residual_block::<F>(
                scratch,
                block_1,
                bias_1,
                shape.block_row_1 as usize,
                joined,
                1usize,
                width,
                region,
                table,
                context,
                &mut x_rows,
                &mut epilogue,
                writes,
                &mut partial,
                &mut best_value,
                &mut best_column,
                cubes,
                poison,
                sink,
                rows,
                wide_chunk,
                with_block_bias,
            );
            phase += 1;
            grid_barrier(arrivals, shape.base, phase * shape.cubes);
        }
        if comptime!(blocks > 2) {
            residual_block::<F>(
                scratch,
                block_2,
                bias_2,
                shape.block_row_2 as usize,
                joined,
                2usize,
                width,
                region,
                table,
                context,
                &mut x_rows,
                &mut epilogue,
                writes,
                &mut partial,
                &mut best_value,
                &mut best_column,
                cubes,
                poison,
                sink,
                rows,
                wide_chunk,
                with_block_bias,
            );
            phase += 1;
            grid_barrier(arrivals, shape.base, phase * shape.cubes);
        }
        if comptime!(blocks > 3) {
            residual_block::<F>(
                scratch,
                block_3,
                bias_3,
                shape.block_row_3 as usize,
                joined,
                3usize,
                width,
                region,
                table,
                context,
                &mut x_rows,
                &mut epilogue,
                writes,
                &mut partial,
                &mut best_value,
                &mut best_column,
                cubes,
                poison,
                sink,
                rows,
                wide_chunk,
                with_block_bias,
            );
            phase += 1;
            grid_barrier(arrivals, shape.base, phase * shape.cubes);
        }

        // The merged exit's logits, each unit keeping its best; then each cube's best per row.
        let head_input = joined + blocks * region;
        let picks = joined + (blocks + 1) * region;
        #[unroll]
        for r in 0..rows {
            x_rows[r] = head_input + r * width;
        }
        best_value[0] = f32::new(-3.4e38);
        best_column[0] = u32::new(NO_COLUMN as i64);
        product::<f32, F>(
            scratch,
            &x_rows,
            exit,
            shape.exit_row as usize,
            width,
            vocab,
            bias_0,
            table,
            context,
            &epilogue,
            writes,
            &mut partial,
            &mut best_value,
            &mut best_column,
            cubes,
            poison,
            sink,
            rows,
            exit_groups,
            exit_chunk,
            false,
            false,
            false,
            false,
            false,
            true,
        );
        let lane = unit % TILE;
        let split = unit / TILE;
        if split < rows {
            lane_values[split * TILE + lane] = best_value[0];
            lane_columns[split * TILE + lane] = best_column[0];
        }
        sync_cube();
        if lane == 0 && split < rows {
            let r = split;
            let mut value = lane_values[r * TILE];
            let mut column = lane_columns[r * TILE];
            #[unroll]
            for l in 1..TILE {
                let other = lane_columns[r * TILE + l];
                let other_value = lane_values[r * TILE + l];
                if beats(other_value, other, value, column) {
                    value = other_value;
                    column = other;
                }
            }
            // Column −1 for a cube that had no tile (an f32 holds every column exactly).
            let mut column_value = f32::new(-1.0);
            if column != NO_COLUMN {
                column_value = f32::cast_from(column);
            }
            publish(writes, picks + (cube * rows + r) * 2, value, poison, sink);
            publish(
                writes,
                picks + (cube * rows + r) * 2 + 1,
                column_value,
                poison,
                sink,
            );
        }
        phase += 1;
        grid_barrier(arrivals, shape.base, phase * shape.cubes);

        // Every cube picks each row's best of the cubes' bests (only cube 0 after the last
        // step, to write the beams), ties to the lower column.
        if step + 1 < steps || cube == 0 {
            #[unroll]
            for r in 0..rows {
                let mut value = f32::new(-3.4e38);
                let mut column = u32::new(NO_COLUMN as i64);
                let mut source = unit;
                while source < cubes {
                    let at = picks + (source * rows + r) * 2;
                    let column_value = scratch[at + 1];
                    if column_value >= f32::new(0.0) {
                        let candidate = u32::cast_from(column_value);
                        let candidate_value = scratch[at];
                        if beats(candidate_value, candidate, value, column) {
                            value = candidate_value;
                            column = candidate;
                        }
                    }
                    source += CHAIN_UNITS;
                }
                cube_pick_among(
                    &mut pick_values,
                    &mut pick_columns,
                    unit,
                    value,
                    column,
                    CHAIN_UNITS,
                );
                if unit == 0 {
                    // A broken barrier (see SPIN_LIMIT) may leave no column: draft column 0.
                    let mut picked = pick_columns[0];
                    if picked >= u32::cast_from(vocab) {
                        picked = u32::new(0);
                    }
                    chosen[r] = picked;
                    chosen_values[r] = pick_values[0];
                }
                sync_cube();
            }
            #[unroll]
            for r in 0..rows {
                epilogue.addend_rows[r] = chosen[r] as usize * shape.table_row as usize;
            }
            if cube == 0 && unit < rows {
                // The warp over one kept logit, as the selection kernel computes it: `logit −
                // max` is 0 (NaN for an infinite logit) and its log-probability 0 − ln(e⁰).
                let top = chosen_values[unit];
                #[allow(clippy::eq_op)]
                let shifted = top - top;
                let log_prob = shifted - (f32::new(0.0) + shifted.exp()).ln();
                // The scores travel between steps in the float type.
                score = f32::cast_from(F::cast_from(log_prob + score));
                tokens[unit * length + step + 1] = draft_ids[chosen[unit] as usize];
                history[unit * steps + step] = F::cast_from(log_prob);
                if step + 1 == steps {
                    scores[unit] = F::cast_from(score);
                }
            }
        }
        step += 1;
    }
}

impl<B: Backend> CubeOp<B> for DraftChain<'_, B> {
    type Output = DraftChainOutput<B>;

    fn launch<R: CubeRuntime>(self) -> Option<Self::Output> {
        if !is_cuda::<B>() {
            return None;
        }
        let [rows, hidden] = self.context.dims();
        let width = 2 * hidden;
        let [_, embedding_hidden] = self.embedding.dims();
        let [vocab, table_hidden] = self.input_table.dims();
        let blocks = self.blocks.len();
        let steps = self.length.checked_sub(1)?;
        if rows == 0
            || rows > CHAIN_MAX_ROWS
            || hidden == 0
            || steps == 0
            || vocab == 0
            || blocks > CHAIN_MAX_BLOCKS
            || self.first.dims() != [rows]
            || embedding_hidden != hidden
            || self.rnn_w.dims() != [hidden, hidden]
            || self.rnn_u.dims() != [hidden, hidden]
            || self.rnn_bias.is_some_and(|bias| bias.dims() != [hidden])
            || self.blocks.iter().any(|(weight, bias)| {
                weight.dims() != [width, width] || bias.is_some_and(|b| b.dims() != [width])
            })
            || self.exit.dims() != [width, vocab]
            || table_hidden != hidden
            || self.draft_ids.dims() != [vocab]
        {
            return None;
        }
        // Every bias or none: the kernel folds them alike.
        let with_block_bias = self.blocks.first().is_some_and(|(_, bias)| bias.is_some());
        if self
            .blocks
            .iter()
            .any(|(_, bias)| bias.is_some() != with_block_bias)
        {
            return None;
        }
        let context = to_cube::<R, B, 2>(self.context)?;
        let dtype = context.dtype;
        let client = context.client.clone();
        let cubes = client.properties().hardware.num_streaming_multiprocessors? as usize;
        if cubes == 0 {
            return None;
        }
        let float = |tensor: &burn::tensor::Tensor<B, 2>| {
            to_cube::<R, B, 2>(tensor).filter(|cube| cube.dtype == dtype)
        };
        let vector = |tensor: &burn::tensor::Tensor<B, 1>| {
            to_cube::<R, B, 1>(tensor)
                .filter(|cube| cube.dtype == dtype && cube.meta.strides()[0] == 1)
        };
        let (embedding, rnn_w, rnn_u) = (
            float(self.embedding)?,
            float(self.rnn_w)?,
            float(self.rnn_u)?,
        );
        let (exit, table) = (float(self.exit)?, float(self.input_table)?);
        let rnn_bias = match self.rnn_bias {
            Some(bias) => Some(vector(bias)?),
            None => None,
        };
        let mut block_weights = Vec::with_capacity(blocks);
        let mut block_biases = Vec::with_capacity(blocks);
        for (weight, bias) in &self.blocks {
            block_weights.push(float(weight)?);
            if let Some(bias) = bias {
                block_biases.push(vector(bias)?);
            }
        }
        let first = to_cube_int::<R, B, 1>(self.first)?;
        let draft_ids = to_cube_int::<R, B, 1>(self.draft_ids)?;
        let int_dtype = first.dtype;
        // The kernel reads 2-D tensors along unit column strides, through their row strides.
        let rows_of = |cube: &CubeTensor<R>| {
            let strides = cube.meta.strides();
            (strides[1] == 1).then(|| strides[0])
        };
        if draft_ids.dtype != int_dtype
            || first.meta.strides()[0] != 1
            || draft_ids.meta.strides()[0] != 1
        {
            return None;
        }
        let mut block_rows = [0usize; CHAIN_MAX_BLOCKS];
        for (slot, weight) in block_rows.iter_mut().zip(&block_weights) {
            *slot = rows_of(weight)?;
        }

        // Scratch: `blocks + 2` regions a step, each holding `rows` joined-width rows or every
        // cube's best per row, then the sink.
        let region = (rows * width)
            .max(cubes * rows * 2)
            .next_multiple_of(REGION_ALIGN);
        let sink = steps * (blocks + 2) * region;
        let scratch_len = sink + REGION_ALIGN;
        let barriers = steps * (blocks + 2);
        let arrivals_per_launch = u32::try_from(barriers * cubes).ok()?;
        let (arrivals, scratch, base) =
            ChainState::<R>::take(&context, scratch_len, arrivals_per_launch, || {
                let zeros = int_tensor::<B, 1>(vec![0, 0], [2], &self.context.device());
                to_cube_int::<R, B, 1>(&zeros)
            })?;

        let [
            hidden_arg,
            vocab_arg,
            steps_arg,
            cubes_arg,
            region_arg,
            sink_arg,
        ] = scalars(&[hidden, vocab, steps, cubes, region, sink])?;
        let shape = ChainShapeLaunch::new(
            hidden_arg,
            vocab_arg,
            steps_arg,
            cubes_arg,
            base,
            region_arg,
            sink_arg,
            scalar(rows_of(&context)?)?,
            scalar(rows_of(&embedding)?)?,
            scalar(rows_of(&rnn_w)?)?,
            scalar(rows_of(&rnn_u)?)?,
            scalar(block_rows[0])?,
            scalar(block_rows[1])?,
            scalar(block_rows[2])?,
            scalar(block_rows[3])?,
            scalar(rows_of(&exit)?)?,
            scalar(rows_of(&table)?)?,
        );
        // Loads in flight per unit: a whole slice of the narrow products' inputs where it fits
        // in registers (36 for a 1152-input product); the merged exit takes four columns a
        // unit where its tiles still cover the cubes (8,192 columns: 128 tiles for 132 cubes,
        // one round instead of four), with fewer inputs at a time.
        let exit_groups = if vocab.div_ceil(TILE * 4) >= cubes / 2 {
            4
        } else {
            1
        };
        let narrow_chunk = chunk_for(hidden, MAX_CHUNK);
        let wide_chunk = chunk_for(width, MAX_CHUNK);
        let exit_chunk = chunk_for(width, MAX_CHUNK / exit_groups);
        let tokens = empty_int_like(&context, [rows, steps + 1], int_dtype);
        let history = empty_like(&context, [rows, steps]);
        let scores = empty_like(&context, [rows]);
        // Absent weights are not read: any float array stands in for them.
        let weight_or = |index: usize| {
            block_weights
                .get(index)
                .cloned()
                .unwrap_or_else(|| exit.clone())
        };
        let bias_or = |index: usize| {
            block_biases
                .get(index)
                .cloned()
                .unwrap_or_else(|| exit.clone())
        };
        let with_rnn_bias = rnn_bias.is_some();
        let rnn_bias = rnn_bias.unwrap_or_else(|| exit.clone());
        unsafe {
            draft_chain_kernel::launch_unchecked::<R>(
                &client,
                CubeCount::Static(cubes as u32, 1, 1),
                CubeDim::new_1d(CHAIN_UNITS as u32),
                context.clone().into_array_arg(),
                first.into_array_arg(),
                embedding.into_array_arg(),
                rnn_w.into_array_arg(),
                rnn_u.into_array_arg(),
                rnn_bias.into_array_arg(),
                weight_or(0).into_array_arg(),
                weight_or(1).into_array_arg(),
                weight_or(2).into_array_arg(),
                weight_or(3).into_array_arg(),
                bias_or(0).into_array_arg(),
                bias_or(1).into_array_arg(),
                bias_or(2).into_array_arg(),
                bias_or(3).into_array_arg(),
                exit.clone().into_array_arg(),
                table.into_array_arg(),
                draft_ids.into_array_arg(),
                tokens.clone().into_array_arg(),
                history.clone().into_array_arg(),
                scores.clone().into_array_arg(),
                scratch.clone().into_array_arg(),
                scratch.into_array_arg(),
                arrivals.into_array_arg(),
                shape,
                f32::NAN,
                rows,
                blocks,
                narrow_chunk,
                wide_chunk,
                exit_groups,
                exit_chunk,
                with_rnn_bias,
                with_block_bias,
                [dtype.into(), int_dtype.into()],
            )
        };
        Some(DraftChainOutput {
            tokens: from_cube_int::<R, B, 2>(tokens)?,
            token_log_probs: from_cube::<R, B, 2>(history)?,
            scores: from_cube::<R, B, 1>(scores)?,
        })
    }
}

/// The arrival counter and scratch a thread's launches use on one device, and the arrivals
/// counted so far. Per thread because a thread's launches are ordered on its stream: two
/// threads sharing a counter could interleave their arrivals.
struct ChainState<R: CubeRuntime> {
    device: R::Device,
    arrivals: CubeTensor<R>,
    scratch: CubeTensor<R>,
    counted: u32,
}

thread_local! {
    /// One [`ChainState`] per runtime and device this thread has drafted on.
    static CHAIN_STATES: RefCell<Vec<Box<dyn Any>>> = const { RefCell::new(Vec::new()) };
}

impl<R: CubeRuntime> ChainState<R> {
    /// The counter, a scratch of at least `scratch_len` f32 and the arrivals before this launch,
    /// counting `arrivals_per_launch` more for it; the counter is made by `zeros` (two zeroed
    /// 32-bit words or wider) on this thread's first launch on `like`'s device.
    fn take(
        like: &CubeTensor<R>,
        scratch_len: usize,
        arrivals_per_launch: u32,
        zeros: impl FnOnce() -> Option<CubeTensor<R>>,
    ) -> Option<(CubeTensor<R>, CubeTensor<R>, u32)> {
        CHAIN_STATES.with(|states| {
            let mut states = states.borrow_mut();
            let position = states.iter().position(|state| {
                state
                    .downcast_ref::<Self>()
                    .is_some_and(|state| state.device == like.device)
            });
            let state = match position {
                Some(position) => states[position].downcast_mut::<Self>()?,
                None => {
                    let state = Self {
                        device: like.device.clone(),
                        arrivals: zeros()?,
                        scratch: f32_scratch(like, scratch_len),
                        counted: 0,
                    };
                    states.push(Box::new(state));
                    states.last_mut()?.downcast_mut::<Self>()?
                }
            };
            if state.scratch.meta.shape()[0] < scratch_len {
                state.scratch = f32_scratch(like, scratch_len);
            }
            let base = state.counted;
            state.counted = base.wrapping_add(arrivals_per_launch);
            Some((state.arrivals.clone(), state.scratch.clone(), base))
        })
    }
}

/// An uninitialised f32 buffer of `len` elements on `like`'s device.
fn f32_scratch<R: CubeRuntime>(like: &CubeTensor<R>, len: usize) -> CubeTensor<R> {
    empty_device_contiguous_dtype(
        like.client.clone(),
        like.device.clone(),
        Shape::new([len]),
        DType::F32,
    )
}

/// The inputs a unit of a product of `inputs` inputs adds per wait on memory: the largest divisor
/// of its slice (`ceil(inputs / (SPLITS · UNROLL)) · UNROLL`) not above `most`, so that every
/// full slice is whole chunks. The slice is a multiple of [`UNROLL`], which bounds it below.
fn chunk_for(inputs: usize, most: usize) -> usize {
    let slice = inputs.div_ceil(SPLITS * UNROLL) * UNROLL;
    (UNROLL..=most.max(UNROLL))
        .rev()
        .find(|chunk| slice.is_multiple_of(*chunk))
        .unwrap_or(UNROLL)
}
