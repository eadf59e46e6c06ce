//! Grouped-query attention with an additive bias in one kernel, its sums in a fixed order.
//!
//! Burn's ops take five launches for this (the score product, our softmax, the value product, and
//! the copies that lay the heads out again), and the two products go through CubeCL's matmul,
//! whose rounding depends on the shape (TF32 tensor cores on CUDA, see [`super::matmul`]). Here one
//! cube of [`UNITS`] units computes one query row of one head:
//!
//! 1. every unit scores a block of consecutive slots (`q · k` summed over the head dimension in
//!    order, plus the bias; the query row is read once into shared memory), keeps the scores of
//!    the first [`CACHED`] slots in shared memory, and the cube takes the maximum;
//! 2. every unit counts the slots of its block whose weight `p = exp(score − max)` is not zero,
//!    and a prefix sum of the counts across the cube gives the number `V` of such slots and the
//!    *rank* of each (how many of them come before it);
//! 3. the units form `G = UNITS / dim` groups of `dim` (units past `G · dim` idle), and group `g`
//!    sums the ranks `[g·⌈V/G⌉, (g+1)·⌈V/G⌉)` in rank order: starting at the block that holds its
//!    first rank, it puts the weights of `dim` slots at a time in shared memory, then its unit
//!    `d` adds them and their weighted values `v[slot, d]`, slot after slot, skipping zero
//!    weights (the loads of [`GROUP`] slots issued together, the sums still in order);
//! 4. the first group adds the groups' sums in group order, `((s₀ + s₁) + s₂) + …`, and its unit
//!    `d` writes `sum(p·v) / sum(p)` straight into the `[rows, heads · dim]` layout the output
//!    projection reads.
//!
//! A masked slot's weight is exactly zero, so it gets no rank and is never added: a token's row
//! in a draft tree has the same `V` and the same weights in the same rank order as the token
//! decoded alone over just its visible slots, hence the same ranges per group and the same
//! sequence of operations — bit for bit the same result (a maximum does not depend on order).
//! Splitting the slots themselves among the groups would not do: the masked slots would move
//! the boundaries. Before the split, `dim` units walked every slot in turn (half of a 128-unit
//! cube idle for a head dimension of 64), ~40 µs per layer over 256 slots on the H200.

use burn::tensor::{Tensor as BurnTensor, backend::Backend};
use burn_cubecl::CubeRuntime;
use cubecl::prelude::*;

use super::dispatch::{CubeOp, empty_like, from_cube, row_grid, to_cube};
use super::reduce::{Strides2, Strides4, cube_max, offset2, offset4, scalars, strides2, strides4};

/// Units per cube: four groups for a head dimension of 64 (SmolLM2's), two for 128. A one-token
/// decoding step has only a cube per head (9 for SmolLM2), so a wide cube is what spreads it.
const UNITS: usize = 256;
/// The largest head dimension: the query row's shared memory, and at least two groups.
const MAX_DIM: usize = 128;
/// Slots whose scores phase 1 keeps in shared memory (8 KiB), so that counting and summing them
/// need no second product with the keys. Later slots are scored again: the same function on the
/// same inputs, so the same score. A buffer of every score would bound the context by shared
/// memory.
const CACHED: usize = 2048;

/// Attention of query row `(batch, head, t)` — one per cube — over `keys`/`values`
/// `[batch, kv_heads, slots, dim]`, written to `output` `[batch * len, heads * dim]`. The bias
/// `[batch, 1, len, slots]` is read only `with_bias`, through its strides (on CUDA its rows are
/// padded, and flattening it to `[batch * len, slots]` first cost a copy per layer). See the
/// module documentation for the phases and why the value sums are split by rank.
///
/// The buffers are `Array`s and their shapes and strides scalar arguments, since a launch binding
/// `Tensor`s costs the host ~10–11.5 µs on the H200 against ~5–6.3 µs for arrays and scalars
/// (CubeCL copies tensors' shapes and strides into a fresh device buffer per launch;
/// docs/benchmarks.md, session 17).
#[allow(clippy::too_many_arguments)]
#[cube(launch_unchecked)]
fn attention_kernel<F: Float>(
    queries: &Array<F>,
    keys: &Array<F>,
    values: &Array<F>,
    bias: &Array<F>,
    output: &mut Array<F>,
    query_strides: &Strides4,
    key_strides: &Strides4,
    value_strides: &Strides4,
    bias_strides: &Strides4,
    output_strides: &Strides2,
    batches: u32,
    heads: u32,
    len: u32,
    dim: u32,
    kv_heads: u32,
    slots: u32,
    #[comptime] with_bias: bool,
    #[define(F)] _dtype: StorageType,
) {
    let (heads, len, dim) = (heads as usize, len as usize, dim as usize);
    let (kv_heads, slots) = (kv_heads as usize, slots as usize);
    let row = CUBE_POS;
    if row >= (batches as usize) * heads * len {
        terminate!();
    }
    let batch = row / (heads * len);
    let head = (row / len) % heads;
    let t = row % len;
    let kv_head = head / (heads / kv_heads);
    let unit = UNIT_POS_X as usize;
    let mut shared = SharedMemory::<f32>::new(UNITS);
    let mut scores = SharedMemory::<f32>::new(CACHED);
    // Per unit, its count of non-zero weights, then the ranks up to the end of its block.
    let mut ranks = SharedMemory::<u32>::new(UNITS);
    // Per group, the slot its walk starts at, the rank of that slot and the slot it stops before.
    let mut starts = SharedMemory::<u32>::new(UNITS);
    let mut start_ranks = SharedMemory::<u32>::new(UNITS);
    let mut stops = SharedMemory::<u32>::new(UNITS);
    // Per group, the weights of the `dim` slots it is walking; at the end, its weighted sums.
    let mut window = SharedMemory::<f32>::new(UNITS);
    // The query row, read once: every score below reads it from here.
    let mut query = SharedMemory::<f32>::new(MAX_DIM);
    if unit < dim {
        query[unit] = f32::cast_from(queries[offset4(query_strides, batch, head, t, unit)]);
    }
    // No walk yet: a group without ranks (fewer non-zero weights than groups) walks nothing.
    starts[unit] = u32::new(0);
    start_ranks[unit] = u32::new(0);
    stops[unit] = u32::new(0);
    sync_cube();

    // Phase 1. Blocks of consecutive slots (not every UNITS-th slot): the prefix sum of their
    // counts below is then a rank.
    let block = slots.div_ceil(UNITS);
    let first = unit * block;
    let mut end = first + block;
    if end > slots {
        end = slots;
    }
    let mut largest = f32::new(-3.0e38);
    let mut slot = first;
    while slot < end {
        let value = score(
            &query,
            keys,
            key_strides,
            bias,
            bias_strides,
            batch,
            t,
            kv_head,
            slot,
            dim,
            with_bias,
        );
        if slot < CACHED {
            scores[slot] = value;
        }
        if value > largest {
            largest = value;
        }
        slot += 1;
    }
    let largest = cube_max(&mut shared, largest, UNITS);

    // Phase 2: the ranks.
    let mut count = 0usize;
    slot = first;
    while slot < end {
        let p = weight(
            &scores,
            &query,
            keys,
            key_strides,
            bias,
            bias_strides,
            batch,
            t,
            kv_head,
            slot,
            dim,
            largest,
            with_bias,
        );
        if p != f32::new(0.0) {
            count += 1;
        }
        slot += 1;
    }
    ranks[unit] = u32::cast_from(count);
    sync_cube();
    scan_step(&mut ranks, unit, 1usize);
    scan_step(&mut ranks, unit, 2usize);
    scan_step(&mut ranks, unit, 4usize);
    scan_step(&mut ranks, unit, 8usize);
    scan_step(&mut ranks, unit, 16usize);
    scan_step(&mut ranks, unit, 32usize);
    scan_step(&mut ranks, unit, 64usize);
    scan_step(&mut ranks, unit, 128usize);
    let after = usize::cast_from(ranks[unit]);
    let before = after - count;
    let visible = usize::cast_from(ranks[UNITS - 1]);
    let groups = UNITS / dim;
    let share = visible.div_ceil(groups);
    // The unit whose block holds a group's first rank says where that group starts; the one whose
    // block holds its last rank, where it stops.
    if count > 0 {
        for g in 0..groups {
            let from = g * share;
            if from < visible {
                let mut to = from + share;
                if to > visible {
                    to = visible;
                }
                if before <= from && from < after {
                    starts[g] = u32::cast_from(first);
                    start_ranks[g] = u32::cast_from(before);
                }
                if before < to && to <= after {
                    stops[g] = u32::cast_from(end);
                }
            }
        }
    }
    sync_cube();

    // Phase 3. Every unit must meet every sync: all walk as many windows as the longest group.
    let mut windows = 0usize;
    for g in 0..groups {
        let span = usize::cast_from(stops[g] - starts[g]);
        let needed = span.div_ceil(dim);
        if needed > windows {
            windows = needed;
        }
    }
    let group = unit / dim;
    let lane = unit % dim;
    let walking = group < groups;
    let mut from = 0usize;
    let mut to = 0usize;
    let mut base = 0usize;
    let mut stop = 0usize;
    let mut rank = 0usize;
    if walking {
        from = group * share;
        if from > visible {
            from = visible;
        }
        to = from + share;
        if to > visible {
            to = visible;
        }
        base = usize::cast_from(starts[group]);
        stop = usize::cast_from(stops[group]);
        rank = usize::cast_from(start_ranks[group]);
    }
    let mut total = f32::new(0.0);
    let mut weighted = f32::new(0.0);
    let mut loaded = Array::<f32>::new(GROUP);
    let mut w = 0usize;
    while w < windows {
        if walking {
            let mut p = f32::new(0.0);
            if base + lane < stop {
                p = weight(
                    &scores,
                    &query,
                    keys,
                    key_strides,
                    bias,
                    bias_strides,
                    batch,
                    t,
                    kv_head,
                    base + lane,
                    dim,
                    largest,
                    with_bias,
                );
            }
            window[unit] = p;
        }
        sync_cube();
        if walking && base < stop {
            let offset = group * dim;
            let mut walked = stop - base;
            if walked > dim {
                walked = dim;
            }
            // GROUP slots at a time: their value loads are issued together (a unit's loads would
            // otherwise wait on each other, slot after slot), then added in rank order.
            let mut j = 0usize;
            while j + GROUP <= walked {
                #[unroll]
                for i in 0..GROUP {
                    loaded[i] = f32::cast_from(
                        values[offset4(value_strides, batch, kv_head, base + j + i, lane)],
                    );
                }
                #[unroll]
                for i in 0..GROUP {
                    let p = window[offset + j + i];
                    if p != f32::new(0.0) {
                        if from <= rank && rank < to {
                            total += p;
                            weighted += p * loaded[i];
                        }
                        rank += 1;
                    }
                }
                j += GROUP;
            }
            while j < walked {
                let p = window[offset + j];
                if p != f32::new(0.0) {
                    if from <= rank && rank < to {
                        total += p;
                        weighted += p * f32::cast_from(
                            values[offset4(value_strides, batch, kv_head, base + j, lane)],
                        );
                    }
                    rank += 1;
                }
                j += 1;
            }
        }
        sync_cube();
        base += dim;
        w += 1;
    }

    // Phase 4: the groups' sums in group order.
    if walking {
        window[unit] = weighted;
        if lane == 0 {
            shared[group] = total;
        }
    }
    sync_cube();
    if unit < dim {
        let mut total = shared[0];
        let mut weighted = window[unit];
        for g in 1..groups {
            total += shared[g];
            weighted += window[g * dim + unit];
        }
        let at = offset2(output_strides, batch * len + t, head * dim + unit);
        output[at] = F::cast_from(weighted / total);
    }
}

/// One step of an inclusive prefix sum over the cube's [`UNITS`] units (strides 1, 2, 4, …):
/// unit `u` adds the entry `stride` places before its own. Every unit reads before any writes.
#[cube]
fn scan_step(counts: &mut SharedMemory<u32>, unit: usize, #[comptime] stride: usize) {
    let mut sum = counts[unit];
    if unit >= stride {
        sum += counts[unit - stride];
    }
    sync_cube();
    counts[unit] = sum;
    sync_cube();
}

/// The weight `exp(score − largest)` of `slot`, its score taken from `scores` for the first
/// [`CACHED`] slots.
#[cube]
#[allow(clippy::too_many_arguments)]
fn weight<F: Float>(
    scores: &SharedMemory<f32>,
    query: &SharedMemory<f32>,
    keys: &Array<F>,
    key_strides: &Strides4,
    bias: &Array<F>,
    bias_strides: &Strides4,
    batch: usize,
    t: usize,
    kv_head: usize,
    slot: usize,
    dim: usize,
    largest: f32,
    #[comptime] with_bias: bool,
) -> f32 {
    let value = if slot < CACHED {
        scores[slot]
    } else {
        score(
            query,
            keys,
            key_strides,
            bias,
            bias_strides,
            batch,
            t,
            kv_head,
            slot,
            dim,
            with_bias,
        )
    };
    (value - largest).exp()
}

/// Loads a unit issues together before it adds them up, in order (key elements of a score,
/// value rows of the weighted sum). With 4 (and the query re-read for every score) a layer's
/// attention over 256 slots took ~55 µs of device time on the H200, about 40 with 16
/// (docs/benchmarks.md, session 16).
const GROUP: usize = 16;

/// `q · k` over the head dimension in order, plus the bias, in f32; `query` holds the query row.
#[cube]
#[allow(clippy::too_many_arguments)]
fn score<F: Float>(
    query: &SharedMemory<f32>,
    keys: &Array<F>,
    key_strides: &Strides4,
    bias: &Array<F>,
    bias_strides: &Strides4,
    batch: usize,
    t: usize,
    kv_head: usize,
    slot: usize,
    dim: usize,
    #[comptime] with_bias: bool,
) -> f32 {
    let mut dot = f32::new(0.0);
    let mut loaded = Array::<f32>::new(GROUP);
    let mut d = 0usize;
    while d + GROUP <= dim {
        #[unroll]
        for i in 0..GROUP {
            loaded[i] = f32::cast_from(keys[offset4(key_strides, batch, kv_head, slot, d + i)]);
        }
        #[unroll]
        for i in 0..GROUP {
            dot += query[d + i] * loaded[i];
        }
        d += GROUP;
    }
    while d < dim {
        dot += query[d] * f32::cast_from(keys[offset4(key_strides, batch, kv_head, slot, d)]);
        d += 1;
    }
    if with_bias {
        dot += f32::cast_from(bias[offset4(bias_strides, batch, 0, t, slot)]);
    }
    dot
}

/// The operation behind [`super::attention`].
pub(super) struct Attention<'a, B: Backend> {
    pub queries: &'a BurnTensor<B, 4>,
    pub keys: &'a BurnTensor<B, 4>,
    pub values: &'a BurnTensor<B, 4>,
    pub bias: Option<&'a BurnTensor<B, 4>>,
}

impl<B: Backend> CubeOp<B> for Attention<'_, B> {
    type Output = BurnTensor<B, 2>;

    fn launch<R: CubeRuntime>(self) -> Option<Self::Output> {
        let [batch, heads, len, dim] = self.queries.dims();
        let [k_batch, kv_heads, slots, k_dim] = self.keys.dims();
        let rows = batch * heads * len;
        if rows == 0
            || slots == 0
            || dim == 0
            || dim > MAX_DIM
            || k_batch != batch
            || k_dim != dim
            || kv_heads == 0
            || heads % kv_heads != 0
            || self.values.dims() != self.keys.dims()
            || self
                .bias
                .is_some_and(|b| b.dims() != [batch, 1, len, slots])
        {
            return None;
        }
        let queries = to_cube::<R, B, 4>(self.queries)?;
        // The cache's visible slots are a strided view of its storage: read it in place.
        let keys = to_cube::<R, B, 4>(self.keys)?;
        let values = to_cube::<R, B, 4>(self.values)?;
        if keys.dtype != queries.dtype || values.dtype != queries.dtype {
            return None;
        }
        let bias = match self.bias {
            Some(bias) => {
                let bias = to_cube::<R, B, 4>(bias)?;
                (bias.dtype == queries.dtype).then_some(bias)?
            }
            // Not read: any tensor of the right type will do.
            None => queries.clone(),
        };
        let output = empty_like(&queries, [batch * len, heads * dim]);
        let (query_strides, key_strides) = (strides4(&queries)?, strides4(&keys)?);
        let (value_strides, bias_strides) = (strides4(&values)?, strides4(&bias)?);
        let output_strides = strides2(&output)?;
        let [batch, heads, len, dim, kv_heads, slots] =
            scalars(&[batch, heads, len, dim, kv_heads, slots])?;
        let (client, dtype) = (queries.client.clone(), queries.dtype);
        // Arrays bound at the views' offsets, read through the strides above.
        unsafe {
            attention_kernel::launch_unchecked::<R>(
                &client,
                row_grid(rows),
                CubeDim::new_1d(UNITS as u32),
                queries.into_array_arg(),
                keys.into_array_arg(),
                values.into_array_arg(),
                bias.into_array_arg(),
                output.clone().into_array_arg(),
                query_strides,
                key_strides,
                value_strides,
                bias_strides,
                output_strides,
                batch,
                heads,
                len,
                dim,
                kv_heads,
                slots,
                self.bias.is_some(),
                dtype.into(),
            )
        };
        from_cube::<R, B, 2>(output)
    }
}
