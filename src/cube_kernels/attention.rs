//! Grouped-query attention with an additive bias in one kernel, its sums in a fixed order.
//!
//! Burn's ops take five launches for this (the score product, our softmax, the value product, and
//! the copies that lay the heads out again), and the two products go through CubeCL's matmul,
//! whose rounding depends on the shape (TF32 tensor cores on CUDA, see [`super::matmul`]). Here one
//! cube of [`UNITS`] units computes one query row of one head:
//!
//! 1. the cube scores every slot (`q · k` plus the bias, see [`score`]: the products of each
//!    four consecutive dimensions added in order, those sums added pairwise; the query row is read
//!    once into shared memory, the cache's keys four elements per load where its layout allows,
//!    see [`cache_vector`]), keeps the scores of the first [`CACHED`] slots in shared memory,
//!    and takes the maximum. In the tree kernel on devices with plane operations, teams of
//!    `dim / 4` units score a slot together, one load of four elements each, so that a warp's
//!    loads read whole key rows ([`score_by_teams`]); otherwise each unit scores a block of
//!    consecutive slots on its own — the same sums either way;
//! 2. every unit counts the slots of its block whose weight `p = exp(score − max)` is not zero,
//!    and a prefix sum of the counts across the cube gives the number `V` of such slots and the
//!    *rank* of each (how many of them come before it);
//! 3. each unit takes [`LANE_DIMS`] consecutive head dimensions (one where the head dimension is
//!    not a multiple of it or too small), so the units form `G = UNITS · LANE_DIMS / dim` groups
//!    of `dim / LANE_DIMS` lanes (units past the last whole group idle), and group `g` sums the
//!    ranks `[g·⌈V/G⌉, (g+1)·⌈V/G⌉)` in rank order: starting at the block that holds its first
//!    rank, it puts the weights of as many slots as it has lanes in shared memory, then each lane
//!    adds them and their weighted values `v[slot, d]` for its dimensions `d`, slot after slot,
//!    skipping zero weights (the loads of several slots issued together, the sums still in
//!    order);
//! 4. the first `dim` units add the groups' sums in group order, `((s₀ + s₁) + s₂) + …`, and unit
//!    `d` writes `sum(p·v) / sum(p)` straight into the `[rows, heads · dim]` layout the output
//!    projection reads.
//!
//! Phases 2 and 3 take the weights of slots past [`CACHED`] from [`score`] again, one unit a slot:
//! the scores of a team and of one unit being the same bits, they match phase 1's.
//!
//! A masked slot's weight is exactly zero, so it gets no rank and is never added: a token's row
//! in a draft tree has the same `V` and the same weights in the same rank order as the token
//! decoded alone over just its visible slots, hence the same ranges per group and the same
//! sequence of operations — bit for bit the same result (a maximum does not depend on order).
//! Splitting the slots themselves among the groups would not do: the masked slots would move
//! the boundaries. Before the split, `dim` units walked every slot in turn (half of a 128-unit
//! cube idle for a head dimension of 64), ~40 µs per layer over 256 slots on the H200.

use burn::tensor::{Tensor as BurnTensor, backend::Backend};
use burn_cubecl::{CubeRuntime, tensor::CubeTensor};
use cubecl::features::Plane;
use cubecl::prelude::*;

use super::dispatch::{CubeOp, empty_like, from_cube, row_grid, to_cube};
use super::reduce::{
    Strides2, Strides4, cube_max, offset2, offset4, scalars, strides2, strides4, strides4_of,
};
use super::rope::{rotate_pair, rotated_element};

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
/// Most groups of phase 3: head dimensions down to `UNITS / MAX_GROUPS` = 4 (16 with
/// [`LANE_DIMS`] per unit).
const MAX_GROUPS: usize = 64;
/// Head dimensions a unit of phase 3 sums (where the head dimension is a multiple of it and at
/// least `LANE_DIMS · UNITS / MAX_GROUPS` = 16): `dim / 4` units walk a group's slots, so a
/// cube has `4 · UNITS / dim` groups (16 for a head dimension of 64) and each unit walks a
/// quarter of the slots it walked with one dimension each, its row's position computed once
/// for four elements. A decoding step's attention was bound by the instructions of that walk
/// (~3,200 per warp, each waiting ~16 cycles): 28.6 µs per layer with one dimension per unit,
/// 20.9 with four (Nsight Compute on the H200, docs/benchmarks.md session 19).
const LANE_DIMS: usize = 4;
/// Slots whose value elements a unit loads at once with [`LANE_DIMS`] elements each.
const WALK_BATCH: usize = 8;

/// Block keys a unit of [`rotary_attention_kernel`] loads at once.
const FILL: usize = 2;
/// The most keys a block may have in [`rotary_attention_kernel`] (`len · dim`, 8 tokens of a head
/// dimension of 64): one pass of [`FILL`] loads per unit, and 14.3 KiB of shared memory in all,
/// within the 16 KiB WebGPU guarantees. Every cube rotates all of its block's keys, so the work
/// grows with the square of the block: on the H200 a decoding step's forward took 2.02–2.06 ms
/// with it against 2.24 with the rotation kernel, but trees of 12 and 24 tokens took 0.07–0.11 ms
/// longer (docs/benchmarks.md, session 18). Longer blocks take the rotation and attention kernels.
const BLOCK_KEYS: usize = FILL * UNITS;

/// Whether a block of `len` tokens of head dimension `dim` fits [`rotary_attention_kernel`]'s
/// shared memory ([`BLOCK_KEYS`]).
pub(super) fn rotary_block_fits(len: usize, dim: usize) -> bool {
    len * dim <= BLOCK_KEYS
}

/// Shared memory of [`rotary_attention_kernel`].
const ROTARY_SHARED_BYTES: usize = 4 * (BLOCK_KEYS + MAX_DIM + CACHED + 3 * UNITS + 3 * MAX_GROUPS);

/// Phase 3's shape for head dimension `dim`: dimensions per unit and slots loaded at once
/// ([`LANE_DIMS`] and [`WALK_BATCH`] where they fit, else one dimension per unit and [`GROUP`]
/// slots); `None` for a head dimension with too many groups either way. A function of `dim`
/// alone, so a token sums its values in the same order in either kernel, alone or in a tree.
fn walk_shape(dim: usize) -> Option<(usize, usize)> {
    if dim.is_multiple_of(LANE_DIMS) && UNITS * LANE_DIMS / dim <= MAX_GROUPS {
        Some((LANE_DIMS, WALK_BATCH))
    } else if UNITS / dim <= MAX_GROUPS {
        Some((1, GROUP))
    } else {
        None
    }
}

/// Attention of query row `(batch, head, t)` — one per cube — over `keys`/`values`
/// `[batch, kv_heads, slots, dim]`, written to `output` `[batch * len, heads * dim]`. The bias
/// `[batch, 1, len, slots]` is read only `with_bias`, through its strides (on CUDA its rows are
/// padded, and flattening it to `[batch * len, slots]` first cost a copy per layer). See the
/// module documentation for the phases and why the value sums are split by rank. `keys` and
/// `values` are read `NV` elements per load (`vector` repeats `NV` as a value the kernel can size
/// its arrays with; [`cache_vector`] picks it), their strides and offsets still counted in
/// elements.
///
/// The buffers are `Array`s and their shapes and strides scalar arguments, since a launch binding
/// `Tensor`s costs the host ~10–11.5 µs on the H200 against ~5–6.3 µs for arrays and scalars
/// (CubeCL copies tensors' shapes and strides into a fresh device buffer per launch;
/// docs/benchmarks.md, session 17).
#[allow(clippy::too_many_arguments)]
#[cube(launch_unchecked)]
fn attention_kernel<F: Float, NV: Size>(
    queries: &Array<F>,
    keys: &Array<Vector<F, NV>>,
    values: &Array<Vector<F, NV>>,
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
    #[comptime] lane_dims: usize,
    #[comptime] walk_batch: usize,
    #[comptime] vector: usize,
    #[comptime] partials: usize,
    #[comptime] teams: bool,
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
    // The query row, read once: every score reads it from here.
    let mut query = SharedMemory::<f32>::new(MAX_DIM);
    if unit < dim {
        query[unit] = f32::cast_from(queries[offset4(query_strides, batch, head, t, unit)]);
    }
    // No block of new slots: every slot is read from `keys` and `values` (the block starts at
    // `slots`, so neither this nor `queries` as the block's values below is read).
    let new_keys = SharedMemory::<f32>::new(1usize);
    let base = 0usize;
    attend_row::<F, NV>(
        &query,
        &new_keys,
        keys,
        key_strides,
        base,
        values,
        value_strides,
        base,
        queries,
        output_strides,
        base,
        bias,
        bias_strides,
        output,
        output_strides,
        batch,
        head,
        t,
        len,
        kv_head,
        dim,
        slots,
        slots,
        with_bias,
        lane_dims,
        walk_batch,
        vector,
        partials,
        teams,
    );
}

/// [`attention_kernel`] that takes the block's queries, keys and values straight from the QKV
/// product `qkv` `[batch * len, (heads + 2 * kv_heads) * dim]`, rotates the queries and keys
/// itself (tables `cos`, `sin` `[batch * len, dim]`), and writes the block's keys and values into
/// the cache's storage at slots `start..start + len` — the rotation kernel's work, one launch
/// less per layer.
///
/// `keys`/`values` are one layer of the storage (`key_base`/`value_base` its first element,
/// strides of `[batch, kv_heads, slots, dim]`); slots before `start` are read from there, the
/// block's from `qkv`: its keys rotated once per cube into shared memory (at most
/// [`BLOCK_KEYS`]), its values read in place. No cube reads the block's slots from the cache,
/// so the cubes that write them (the first query head of each KV head, one token each) need not
/// wait for anyone. The key written is the value scored, one `rotated_element` rounded to `F`:
/// a later step reads from the cache exactly what this one computed.
#[allow(clippy::too_many_arguments)]
#[cube(launch_unchecked)]
fn rotary_attention_kernel<F: Float, NV: Size>(
    qkv: &Array<F>,
    cos: &Array<F>,
    sin: &Array<F>,
    keys: &mut Array<Vector<F, NV>>,
    values: &mut Array<Vector<F, NV>>,
    bias: &Array<F>,
    output: &mut Array<F>,
    qkv_strides: &Strides2,
    cos_strides: &Strides2,
    sin_strides: &Strides2,
    key_strides: &Strides4,
    value_strides: &Strides4,
    bias_strides: &Strides4,
    output_strides: &Strides2,
    batches: u32,
    heads: u32,
    len: u32,
    dim: u32,
    kv_heads: u32,
    key_base: u32,
    value_base: u32,
    start: u32,
    #[comptime] with_bias: bool,
    #[comptime] lane_dims: usize,
    #[comptime] walk_batch: usize,
    #[comptime] vector: usize,
    #[comptime] partials: usize,
    #[define(F)] _dtype: StorageType,
) {
    let (heads, len, dim) = (heads as usize, len as usize, dim as usize);
    let (kv_heads, start) = (kv_heads as usize, start as usize);
    let (key_base, value_base) = (key_base as usize, value_base as usize);
    let row = CUBE_POS;
    if row >= (batches as usize) * heads * len {
        terminate!();
    }
    let batch = row / (heads * len);
    let head = (row / len) % heads;
    let t = row % len;
    let kv_head = head / (heads / kv_heads);
    let unit = UNIT_POS_X as usize;
    let half = dim / 2;
    let token = batch * len + t;
    // Rounded to `F` as the rotation kernel's output would be, so that both paths agree.
    let mut query = SharedMemory::<f32>::new(MAX_DIM);
    if unit < dim {
        let rotated = rotated_element(
            qkv,
            qkv_strides,
            cos,
            cos_strides,
            sin,
            sin_strides,
            token,
            head * dim,
            unit,
            half,
        );
        query[unit] = f32::cast_from(F::cast_from(rotated));
    }
    let key_column = (heads + kv_head) * dim;
    let value_column = (heads + kv_heads + kv_head) * dim;
    let mut new_keys = SharedMemory::<f32>::new(BLOCK_KEYS);
    // FILL elements per unit and pass, their loads issued together (rotating its share one
    // element after another, a unit waited on each element's loads in turn).
    let total = len * dim;
    let mut value = Array::<f32>::new(FILL);
    let mut other = Array::<f32>::new(FILL);
    let mut cosine = Array::<f32>::new(FILL);
    let mut sine = Array::<f32>::new(FILL);
    let mut first = 0usize;
    while first < total {
        #[unroll]
        for k in 0..FILL {
            let i = first + k * UNITS + unit;
            if i < total {
                let token = batch * len + i / dim;
                let d = i % dim;
                let partner = if d < half { d + half } else { d - half };
                value[k] = f32::cast_from(qkv[offset2(qkv_strides, token, key_column + d)]);
                other[k] = f32::cast_from(qkv[offset2(qkv_strides, token, key_column + partner)]);
                cosine[k] = f32::cast_from(cos[offset2(cos_strides, token, d)]);
                sine[k] = f32::cast_from(sin[offset2(sin_strides, token, d)]);
            }
        }
        #[unroll]
        for k in 0..FILL {
            let i = first + k * UNITS + unit;
            if i < total {
                let rotated = rotate_pair(value[k], other[k], cosine[k], sine[k]);
                new_keys[i] = f32::cast_from(F::cast_from(rotated));
            }
        }
        first += FILL * UNITS;
    }
    // `attend_row` syncs the cube before it reads the query or the block's keys.
    attend_row::<F, NV>(
        &query,
        &new_keys,
        keys,
        key_strides,
        key_base,
        values,
        value_strides,
        value_base,
        qkv,
        qkv_strides,
        value_column,
        bias,
        bias_strides,
        output,
        output_strides,
        batch,
        head,
        t,
        len,
        kv_head,
        dim,
        start + len,
        start,
        with_bias,
        lane_dims,
        walk_batch,
        vector,
        partials,
        // Scores by teams made the one-token step's attention slower in f16 on the H200 (20.3 →
        // 26.5 µs a layer) and no faster in f32 (docs/benchmarks.md, session 25).
        false,
    );
    // The first query head of each KV head writes that KV head's block, `vector` elements per
    // unit.
    if head == kv_head * (heads / kv_heads) && unit < dim / vector {
        let slot = start + t;
        let first_dim = unit * vector;
        let mut key = Vector::<F, NV>::empty();
        let mut value = Vector::<F, NV>::empty();
        #[unroll]
        for e in 0..vector {
            key[e] = F::cast_from(new_keys[t * dim + first_dim + e]);
            value[e] = qkv[offset2(qkv_strides, token, value_column + first_dim + e)];
        }
        keys[(key_base + offset4(key_strides, batch, kv_head, slot, first_dim)) / vector] = key;
        values[(value_base + offset4(value_strides, batch, kv_head, slot, first_dim)) / vector] =
            value;
    }
}

/// The four phases of the module documentation for one query row, whose query is in `query`.
/// Slots before `start` are read from `keys`/`values` (at `key_base`/`value_base` plus the
/// strides' offset); slot `start + j` is a block token's: its key is `new_keys[j * dim ..]`, its
/// value row `j` of the block in `new_values` from column `value_column` (then `len` is the
/// block's length). `slots` counts both.
#[cube]
#[allow(clippy::too_many_arguments)]
fn attend_row<F: Float, NV: Size>(
    query: &SharedMemory<f32>,
    new_keys: &SharedMemory<f32>,
    keys: &Array<Vector<F, NV>>,
    key_strides: &Strides4,
    key_base: usize,
    values: &Array<Vector<F, NV>>,
    value_strides: &Strides4,
    value_base: usize,
    new_values: &Array<F>,
    new_value_strides: &Strides2,
    value_column: usize,
    bias: &Array<F>,
    bias_strides: &Strides4,
    output: &mut Array<F>,
    output_strides: &Strides2,
    batch: usize,
    head: usize,
    t: usize,
    len: usize,
    kv_head: usize,
    dim: usize,
    slots: usize,
    start: usize,
    #[comptime] with_bias: bool,
    #[comptime] lane_dims: usize,
    #[comptime] walk_batch: usize,
    #[comptime] vector: usize,
    #[comptime] partials: usize,
    #[comptime] teams: bool,
) {
    let unit = UNIT_POS_X as usize;
    let mut shared = SharedMemory::<f32>::new(UNITS);
    let mut scores = SharedMemory::<f32>::new(CACHED);
    // Per unit, its count of non-zero weights, then the ranks up to the end of its block.
    let mut ranks = SharedMemory::<u32>::new(UNITS);
    // Per group, the slot its walk starts at, the rank of that slot and the slot it stops before.
    let mut starts = SharedMemory::<u32>::new(MAX_GROUPS);
    let mut start_ranks = SharedMemory::<u32>::new(MAX_GROUPS);
    let mut stops = SharedMemory::<u32>::new(MAX_GROUPS);
    // Per group, the weights of the `dim` slots it is walking; at the end, its weighted sums.
    let mut window = SharedMemory::<f32>::new(UNITS);
    // No walk yet: a group without ranks (fewer non-zero weights than groups) walks nothing.
    if unit < MAX_GROUPS {
        starts[unit] = u32::new(0);
        start_ranks[unit] = u32::new(0);
        stops[unit] = u32::new(0);
    }
    sync_cube();
    // Each unit's block of consecutive slots (not every UNITS-th slot): phase 1 scores it unless
    // teams do, phase 2 counts it, and the prefix sum of the counts is then a rank.
    let block = slots.div_ceil(UNITS);
    let first = unit * block;
    let mut end = first + block;
    if end > slots {
        end = slots;
    }
    let mut largest = f32::new(-3.0e38);
    if teams {
        largest = score_by_teams::<F, NV>(
            &mut scores,
            query,
            new_keys,
            keys,
            key_strides,
            key_base,
            start,
            bias,
            bias_strides,
            batch,
            t,
            kv_head,
            slots,
            dim,
            with_bias,
            vector,
            partials,
        );
    } else {
        let mut slot = first;
        while slot < end {
            let value = score::<F, NV>(
                query,
                new_keys,
                keys,
                key_strides,
                key_base,
                start,
                bias,
                bias_strides,
                batch,
                t,
                kv_head,
                slot,
                dim,
                with_bias,
                vector,
                partials,
            );
            if slot < CACHED {
                scores[slot] = value;
            }
            if value > largest {
                largest = value;
            }
            slot += 1;
        }
    }
    let largest = cube_max(&mut shared, largest, UNITS);

    // Phase 2: the ranks.
    let mut count = 0usize;
    let mut slot = first;
    while slot < end {
        let p = weight::<F, NV>(
            &scores,
            query,
            new_keys,
            keys,
            key_strides,
            key_base,
            start,
            bias,
            bias_strides,
            batch,
            t,
            kv_head,
            slot,
            dim,
            largest,
            with_bias,
            vector,
            partials,
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
    let lanes = dim / lane_dims;
    let groups = UNITS / lanes;
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
    let mut widest = 0usize;
    for g in 0..groups {
        let span = usize::cast_from(stops[g] - starts[g]);
        if span > widest {
            widest = span;
        }
    }
    let windows = widest.div_ceil(lanes);
    let group = unit / lanes;
    let lane = unit % lanes;
    let first_dim = lane * lane_dims;
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
    let mut weighted = Array::<f32>::new(lane_dims);
    #[unroll]
    for c in 0..lane_dims {
        weighted[c] = f32::new(0.0);
    }
    let mut loaded = Array::<f32>::new(walk_batch * lane_dims);
    let mut w = 0usize;
    while w < windows {
        if walking {
            let mut p = f32::new(0.0);
            if base + lane < stop {
                p = weight::<F, NV>(
                    &scores,
                    query,
                    new_keys,
                    keys,
                    key_strides,
                    key_base,
                    start,
                    bias,
                    bias_strides,
                    batch,
                    t,
                    kv_head,
                    base + lane,
                    dim,
                    largest,
                    with_bias,
                    vector,
                    partials,
                );
            }
            window[unit] = p;
        }
        sync_cube();
        if walking && base < stop {
            let offset = group * lanes;
            let mut walked = stop - base;
            if walked > lanes {
                walked = lanes;
            }
            // `walk_batch` slots at a time: their value loads are issued together (a unit's loads
            // would otherwise wait on each other, slot after slot), then added in rank order.
            let mut j = 0usize;
            while j + walk_batch <= walked {
                #[unroll]
                for i in 0..walk_batch {
                    load_values::<F, NV>(
                        &mut loaded,
                        i * lane_dims,
                        values,
                        value_strides,
                        value_base,
                        new_values,
                        new_value_strides,
                        value_column,
                        start,
                        batch * len,
                        batch,
                        kv_head,
                        base + j + i,
                        first_dim,
                        lane_dims,
                        vector,
                    );
                }
                #[unroll]
                for i in 0..walk_batch {
                    let p = window[offset + j + i];
                    if p != f32::new(0.0) {
                        if from <= rank && rank < to {
                            total += p;
                            #[unroll]
                            for c in 0..lane_dims {
                                weighted[c] += p * loaded[i * lane_dims + c];
                            }
                        }
                        rank += 1;
                    }
                }
                j += walk_batch;
            }
            while j < walked {
                let p = window[offset + j];
                if p != f32::new(0.0) {
                    if from <= rank && rank < to {
                        total += p;
                        load_values::<F, NV>(
                            &mut loaded,
                            0usize,
                            values,
                            value_strides,
                            value_base,
                            new_values,
                            new_value_strides,
                            value_column,
                            start,
                            batch * len,
                            batch,
                            kv_head,
                            base + j,
                            first_dim,
                            lane_dims,
                            vector,
                        );
                        #[unroll]
                        for c in 0..lane_dims {
                            weighted[c] += p * loaded[c];
                        }
                    }
                    rank += 1;
                }
                j += 1;
            }
        }
        sync_cube();
        base += lanes;
        w += 1;
    }

    // Phase 4: the groups' sums in group order. Nobody reads the scores any more (the last
    // window ended with a sync, and phase 2 did too): they hold the groups' weighted sums now,
    // `groups · dim = UNITS · lane_dims` of them.
    if walking {
        #[unroll]
        for c in 0..lane_dims {
            scores[group * dim + first_dim + c] = weighted[c];
        }
        if lane == 0 {
            shared[group] = total;
        }
    }
    sync_cube();
    if unit < dim {
        let mut total = shared[0];
        let mut weighted = scores[unit];
        for g in 1..groups {
            total += shared[g];
            weighted += scores[g * dim + unit];
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
fn weight<F: Float, NV: Size>(
    scores: &SharedMemory<f32>,
    query: &SharedMemory<f32>,
    new_keys: &SharedMemory<f32>,
    keys: &Array<Vector<F, NV>>,
    key_strides: &Strides4,
    key_base: usize,
    start: usize,
    bias: &Array<F>,
    bias_strides: &Strides4,
    batch: usize,
    t: usize,
    kv_head: usize,
    slot: usize,
    dim: usize,
    largest: f32,
    #[comptime] with_bias: bool,
    #[comptime] vector: usize,
    #[comptime] partials: usize,
) -> f32 {
    let value = if slot < CACHED {
        scores[slot]
    } else {
        score::<F, NV>(
            query,
            new_keys,
            keys,
            key_strides,
            key_base,
            start,
            bias,
            bias_strides,
            batch,
            t,
            kv_head,
            slot,
            dim,
            with_bias,
            vector,
            partials,
        )
    };
    (value - largest).exp()
}

/// Loads a unit issues together before it adds them up, in order (key vectors of a score,
/// value rows of the weighted sum). With 4 scalar loads (and the query re-read for every score) a
/// layer's attention over 256 slots took ~55 µs of device time on the H200, about 40 with 16
/// (docs/benchmarks.md, session 16).
const GROUP: usize = 16;

/// Consecutive head dimensions whose products a score adds in order before adding the chunks'
/// sums pairwise (see [`score`]): one four-wide load of the cache.
const SCORE_CHUNK: usize = 4;
/// The most chunks of a score added pairwise (`log₂` of it below): head dimensions up to 128.
const MAX_PARTIALS_LOG2: usize = 5;
/// Chunks whose loads one unit issues together in [`score`] (64 elements).
const CHUNK_BATCH: usize = 16;
/// Slots a team of [`score_by_teams`] loads at once.
const TEAM_BATCH: usize = 8;

/// Chunks of a score for head dimension `dim` (see [`score`]): `dim / SCORE_CHUNK` where that is
/// a power of two up to `2^MAX_PARTIALS_LOG2`, else 0 (products added in order). A function of
/// `dim` alone, so a token scores a key the same in either kernel, alone or in a tree.
fn score_partials(dim: usize) -> usize {
    let partials = dim / SCORE_CHUNK;
    if dim.is_multiple_of(SCORE_CHUNK)
        && partials.is_power_of_two()
        && partials <= 1 << MAX_PARTIALS_LOG2
    {
        partials
    } else {
        0
    }
}

/// Whether phase 1 may score by teams ([`score_by_teams`]) on `client`'s device: plane
/// operations, planes holding whole teams.
fn team_scores<R: CubeRuntime>(client: &ComputeClient<R>, partials: usize) -> bool {
    partials > 0
        && client.features().plane.contains(Plane::Ops)
        && client.properties().hardware.plane_size_min as usize >= partials
}

/// `q · k` plus the bias, in f32; `query` holds the query row. The key of a slot before `start`
/// comes from `keys`, `vector` elements per load, a block token's from `new_keys` (see
/// [`attend_row`]); the products are added in one place whatever the loads' width, so a key
/// scores the same whether it is still in the block or already in the cache, and read one
/// element or four at a time.
///
/// With `partials` > 0 (see [`score_partials`]) the head dimension is cut into `partials` chunks
/// of [`SCORE_CHUNK`] consecutive elements, each chunk's products are added in order, and the
/// chunk sums are added pairwise (`((c₀ + c₁) + (c₂ + c₃)) + …`): the sum [`score_by_teams`]
/// computes with one unit per chunk, bit for bit. Otherwise the products are added in order.
#[cube]
#[allow(clippy::too_many_arguments)]
fn score<F: Float, NV: Size>(
    query: &SharedMemory<f32>,
    new_keys: &SharedMemory<f32>,
    keys: &Array<Vector<F, NV>>,
    key_strides: &Strides4,
    key_base: usize,
    start: usize,
    bias: &Array<F>,
    bias_strides: &Strides4,
    batch: usize,
    t: usize,
    kv_head: usize,
    slot: usize,
    dim: usize,
    #[comptime] with_bias: bool,
    #[comptime] vector: usize,
    #[comptime] partials: usize,
) -> f32 {
    let mut dot = f32::new(0.0);
    if partials > 0 {
        let mut sums = Array::<f32>::new(partials);
        let mut loaded = Array::<f32>::new(CHUNK_BATCH * SCORE_CHUNK);
        let mut chunk = Array::<f32>::new(SCORE_CHUNK);
        // CHUNK_BATCH chunks' loads issued together, then their sums.
        #[unroll]
        for b in 0..partials.div_ceil(CHUNK_BATCH) {
            #[unroll]
            for i in 0..CHUNK_BATCH {
                if b * CHUNK_BATCH + i < partials {
                    load_key_chunk::<F, NV>(
                        &mut loaded,
                        i * SCORE_CHUNK,
                        new_keys,
                        keys,
                        key_strides,
                        key_base,
                        start,
                        batch,
                        kv_head,
                        slot,
                        (b * CHUNK_BATCH + i) * SCORE_CHUNK,
                        dim,
                        vector,
                    );
                }
            }
            #[unroll]
            for i in 0..CHUNK_BATCH {
                if b * CHUNK_BATCH + i < partials {
                    query_chunk(query, (b * CHUNK_BATCH + i) * SCORE_CHUNK, &mut chunk);
                    sums[b * CHUNK_BATCH + i] = chunk_dot(&chunk, &loaded, i * SCORE_CHUNK);
                }
            }
        }
        // Pairwise, as the butterfly of `score_by_teams` adds them in its first unit.
        #[unroll]
        for level in 0..MAX_PARTIALS_LOG2 {
            if (1usize << level) < partials {
                #[unroll]
                for i in 0..partials >> (level + 1) {
                    let low = i << (level + 1);
                    sums[low] = sums[low] + sums[low + (1usize << level)];
                }
            }
        }
        dot = sums[0];
    } else {
        // Elements per batch of loads: GROUP loads of `vector` elements.
        let span = GROUP * vector;
        let mut loaded = Array::<f32>::new(span);
        let cached = slot < start;
        let mut new_row = 0usize;
        if !cached {
            new_row = (slot - start) * dim;
        }
        // Where the slot's key row starts and the distance between its elements (1 with
        // vectors).
        let row = key_base + offset4(key_strides, batch, kv_head, slot, 0);
        let step = offset4(key_strides, 0, 0, 0, 1);
        let mut d = 0usize;
        while d + span <= dim {
            if cached {
                #[unroll]
                for i in 0..GROUP {
                    let loads = keys[(row + (d + i * vector) * step) / vector];
                    #[unroll]
                    for e in 0..vector {
                        loaded[i * vector + e] = f32::cast_from(loads[e]);
                    }
                }
            } else {
                #[unroll]
                for i in 0..span {
                    loaded[i] = new_keys[new_row + d + i];
                }
            }
            #[unroll]
            for i in 0..span {
                dot += query[d + i] * loaded[i];
            }
            d += span;
        }
        // The rest one load at a time (`dim` is a multiple of `vector`).
        while d < dim {
            if cached {
                let loads = keys[(row + d * step) / vector];
                #[unroll]
                for e in 0..vector {
                    dot += query[d + e] * f32::cast_from(loads[e]);
                }
            } else {
                #[unroll]
                for e in 0..vector {
                    dot += query[d + e] * new_keys[new_row + d + e];
                }
            }
            d += vector;
        }
    }
    if with_bias {
        dot += f32::cast_from(bias[offset4(bias_strides, batch, 0, t, slot)]);
    }
    dot
}

/// `q · k` over one chunk of [`SCORE_CHUNK`] dimensions, in order: the query's elements in
/// `query`, the key's in `loaded[at ..]`.
#[cube]
fn chunk_dot(query: &Array<f32>, loaded: &Array<f32>, #[comptime] at: usize) -> f32 {
    let mut sum = query[0] * loaded[at];
    #[unroll]
    for e in 1..SCORE_CHUNK {
        sum += query[e] * loaded[at + e];
    }
    sum
}

/// Elements `first_dim .. first_dim + SCORE_CHUNK` of the query row `query` into `chunk`.
#[cube]
fn query_chunk(query: &SharedMemory<f32>, first_dim: usize, chunk: &mut Array<f32>) {
    #[unroll]
    for e in 0..SCORE_CHUNK {
        chunk[e] = query[first_dim + e];
    }
}

/// Elements `first_dim .. first_dim + SCORE_CHUNK` of the key of `slot` into `loaded[at ..]`:
/// from `keys` before `start` (`vector` elements per load), else from the block's keys in
/// `new_keys`.
#[cube]
#[allow(clippy::too_many_arguments)]
fn load_key_chunk<F: Float, NV: Size>(
    loaded: &mut Array<f32>,
    #[comptime] at: usize,
    new_keys: &SharedMemory<f32>,
    keys: &Array<Vector<F, NV>>,
    key_strides: &Strides4,
    key_base: usize,
    start: usize,
    batch: usize,
    kv_head: usize,
    slot: usize,
    first_dim: usize,
    dim: usize,
    #[comptime] vector: usize,
) {
    if slot < start {
        let row = key_base + offset4(key_strides, batch, kv_head, slot, first_dim);
        let step = offset4(key_strides, 0, 0, 0, 1);
        #[unroll]
        for i in 0..SCORE_CHUNK / vector {
            let loads = keys[(row + i * vector * step) / vector];
            #[unroll]
            for e in 0..vector {
                loaded[at + i * vector + e] = f32::cast_from(loads[e]);
            }
        }
    } else {
        let row = (slot - start) * dim + first_dim;
        #[unroll]
        for e in 0..SCORE_CHUNK {
            loaded[at + e] = new_keys[row + e];
        }
    }
}

/// Phase 1 by teams of `partials` units, one chunk of [`SCORE_CHUNK`] dimensions each (needs
/// plane operations, and planes of at least `partials` units): team `k` of the cube's
/// `UNITS / partials` scores slots `k`, `k + teams`, …, [`TEAM_BATCH`] at a time. A warp's load
/// then reads whole key rows (two of SmolLM2's 256-byte rows) instead of 16 bytes of 32 rows:
/// with one slot per unit every key load touched 32 cache lines, and waiting on them was a third
/// of an 18-token tree's attention (16.4 µs a layer in f32, 13.8 by teams; Nsight Compute on the
/// H200, docs/benchmarks.md, session 25). Each unit adds its chunk's
/// products in order and the team adds the chunk sums by a butterfly of shuffles, so every unit
/// of the team holds [`score`]'s value bit for bit (`a + b` is `b + a` in floating point). The
/// scores of the first [`CACHED`] slots go to `scores`; returns the largest score the unit's team
/// saw.
#[cube]
#[allow(clippy::too_many_arguments)]
fn score_by_teams<F: Float, NV: Size>(
    scores: &mut SharedMemory<f32>,
    query: &SharedMemory<f32>,
    new_keys: &SharedMemory<f32>,
    keys: &Array<Vector<F, NV>>,
    key_strides: &Strides4,
    key_base: usize,
    start: usize,
    bias: &Array<F>,
    bias_strides: &Strides4,
    batch: usize,
    t: usize,
    kv_head: usize,
    slots: usize,
    dim: usize,
    #[comptime] with_bias: bool,
    #[comptime] vector: usize,
    #[comptime] partials: usize,
) -> f32 {
    let unit = UNIT_POS_X as usize;
    let teams = UNITS / partials;
    let team = unit / partials;
    let first_dim = (unit % partials) * SCORE_CHUNK;
    let mut chunk = Array::<f32>::new(SCORE_CHUNK);
    query_chunk(query, first_dim, &mut chunk);
    let bias_row = offset4(bias_strides, batch, 0, t, 0);
    let bias_step = offset4(bias_strides, 0, 0, 0, 1);
    let mut largest = f32::new(-3.0e38);
    let mut loaded = Array::<f32>::new(TEAM_BATCH * SCORE_CHUNK);
    let mut biases = Array::<f32>::new(TEAM_BATCH);
    let mut sums = Array::<f32>::new(TEAM_BATCH);
    // The same number of rounds for every unit: the shuffles need the whole plane.
    let rounds = slots.div_ceil(teams * TEAM_BATCH);
    let mut round = 0usize;
    while round < rounds {
        let first = round * TEAM_BATCH * teams + team;
        // Every load of the round first (keys and biases), then the sums: a bias loaded after its
        // slot's shuffles made each slot wait for its own load.
        #[unroll]
        for b in 0..TEAM_BATCH {
            let slot = first + b * teams;
            biases[b] = f32::new(0.0);
            if slot < slots {
                load_key_chunk::<F, NV>(
                    &mut loaded,
                    b * SCORE_CHUNK,
                    new_keys,
                    keys,
                    key_strides,
                    key_base,
                    start,
                    batch,
                    kv_head,
                    slot,
                    first_dim,
                    dim,
                    vector,
                );
                if with_bias {
                    biases[b] = f32::cast_from(bias[bias_row + slot * bias_step]);
                }
            }
        }
        #[unroll]
        for b in 0..TEAM_BATCH {
            let mut sum = chunk_dot(&chunk, &loaded, b * SCORE_CHUNK);
            #[unroll]
            for level in 0..MAX_PARTIALS_LOG2 {
                if (1usize << level) < partials {
                    sum += plane_shuffle_xor(sum, 1u32 << level);
                }
            }
            if with_bias {
                sum += biases[b];
            }
            sums[b] = sum;
        }
        #[unroll]
        for b in 0..TEAM_BATCH {
            let slot = first + b * teams;
            if slot < slots {
                let sum = sums[b];
                if slot < CACHED && first_dim == 0 {
                    scores[slot] = sum;
                }
                if sum > largest {
                    largest = sum;
                }
            }
        }
        round += 1;
    }
    largest
}

/// Elements `first_dim .. first_dim + lane_dims` of the value of `slot` into
/// `loaded[at ..]`: from `values` before `start` (`vector` elements per load; `lane_dims` is a
/// multiple of it), else from the block's row `block_row + slot - start` of `new_values`, columns
/// from `value_column + first_dim` (see [`attend_row`]). The row's position is computed once for
/// its `lane_dims` elements.
#[cube]
#[allow(clippy::too_many_arguments)]
fn load_values<F: Float, NV: Size>(
    loaded: &mut Array<f32>,
    #[comptime] at: usize,
    values: &Array<Vector<F, NV>>,
    value_strides: &Strides4,
    value_base: usize,
    new_values: &Array<F>,
    new_value_strides: &Strides2,
    value_column: usize,
    start: usize,
    block_row: usize,
    batch: usize,
    kv_head: usize,
    slot: usize,
    first_dim: usize,
    #[comptime] lane_dims: usize,
    #[comptime] vector: usize,
) {
    if slot < start {
        let row = value_base + offset4(value_strides, batch, kv_head, slot, first_dim);
        let step = offset4(value_strides, 0, 0, 0, 1);
        #[unroll]
        for c in 0..lane_dims / vector {
            let loads = values[(row + c * vector * step) / vector];
            #[unroll]
            for e in 0..vector {
                loaded[at + c * vector + e] = f32::cast_from(loads[e]);
            }
        }
    } else {
        let row = offset2(
            new_value_strides,
            block_row + slot - start,
            value_column + first_dim,
        );
        let step = offset2(new_value_strides, 0, 1);
        #[unroll]
        for c in 0..lane_dims {
            loaded[at + c] = f32::cast_from(new_values[row + c * step]);
        }
    }
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
        let (lane_dims, walk_batch) = walk_shape(dim)?;
        let queries = to_cube::<R, B, 4>(self.queries)?;
        // The cache's visible slots are a strided view of its storage: read it in place.
        let keys = to_cube::<R, B, 4>(self.keys)?;
        let values = to_cube::<R, B, 4>(self.values)?;
        if keys.dtype != queries.dtype || values.dtype != queries.dtype {
            return None;
        }
        let vector = cache_vector(lane_dims, &[&keys, &values]);
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
        let (client, dtype) = (queries.client.clone(), queries.dtype);
        let partials = score_partials(dim);
        let teams = team_scores(&client, partials);
        let [batch, heads, len, dim, kv_heads, slots] =
            scalars(&[batch, heads, len, dim, kv_heads, slots])?;
        // Arrays bound at the views' offsets, read through the strides above.
        unsafe {
            attention_kernel::launch_unchecked::<R>(
                &client,
                row_grid(rows),
                CubeDim::new_1d(UNITS as u32),
                vector,
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
                lane_dims,
                walk_batch,
                vector,
                partials,
                teams,
                dtype.into(),
            )
        };
        from_cube::<R, B, 2>(output)
    }
}

/// Elements per load of the cache's keys and values: [`LANE_DIMS`] where phase 3 walks that many
/// dimensions per unit and every tensor's layout allows it (unit stride along the head
/// dimension, the other strides and the binding's start multiples of the width), else 1. A score
/// or a weighted sum is the same sequence of operations either way. Every unit of phase 1 reads
/// its own slot's key row, so a warp's scalar load touched 32 rows and each 32-byte sector was
/// fetched eight times; four-wide loads cut a layer's attention on the H200 from 20.8 to 14.5 µs
/// for one token and from 29.7 to 16.5 µs for an 18-token tree (Nsight Compute,
/// docs/benchmarks.md, session 20).
fn cache_vector<R: CubeRuntime>(lane_dims: usize, tensors: &[&CubeTensor<R>]) -> usize {
    let width = LANE_DIMS;
    let aligned = |tensor: &&CubeTensor<R>| {
        let strides_allow = match tensor.meta.strides().split_last() {
            Some((1, outer)) => outer.iter().all(|stride| stride.is_multiple_of(width)),
            _ => false,
        };
        let start = tensor.handle.offset_start.unwrap_or(0);
        strides_allow && start.is_multiple_of((width * tensor.dtype.size()) as u64)
    };
    if lane_dims.is_multiple_of(width) && tensors.iter().all(aligned) {
        width
    } else {
        1
    }
}

/// The operation behind [`super::rotary_attention_into_cache`].
pub(super) struct RotaryAttention<'a, B: Backend> {
    pub qkv: &'a BurnTensor<B, 3>,
    pub cos: &'a BurnTensor<B, 4>,
    pub sin: &'a BurnTensor<B, 4>,
    pub heads: usize,
    pub kv_heads: usize,
    pub keys: &'a BurnTensor<B, 5>,
    pub values: &'a BurnTensor<B, 5>,
    pub layer: usize,
    pub start: usize,
    pub bias: Option<&'a BurnTensor<B, 4>>,
}

impl<B: Backend> CubeOp<B> for RotaryAttention<'_, B> {
    type Output = BurnTensor<B, 2>;

    fn launch<R: CubeRuntime>(self) -> Option<Self::Output> {
        let [batch, len, width] = self.qkv.dims();
        let [_, _, _, dim] = self.cos.dims();
        let (heads, kv_heads, layer, start) = (self.heads, self.kv_heads, self.layer, self.start);
        let [layers, cache_batch, cache_heads, capacity, cache_dim] = self.keys.dims();
        let (tokens, slots) = (batch * len, start + len);
        if tokens == 0
            || dim == 0
            || dim % 2 != 0
            || dim > MAX_DIM
            || kv_heads == 0
            || heads % kv_heads != 0
            || width != (heads + 2 * kv_heads) * dim
            || self.cos.dims() != [batch, 1, len, dim]
            || self.sin.dims() != [batch, 1, len, dim]
            || self.values.dims() != self.keys.dims()
            || layer >= layers
            || cache_batch != batch
            || cache_heads != kv_heads
            || cache_dim != dim
            || slots > capacity
            || !rotary_block_fits(len, dim)
            || self
                .bias
                .is_some_and(|b| b.dims() != [batch, 1, len, slots])
        {
            return None;
        }
        let (lane_dims, walk_batch) = walk_shape(dim)?;
        let qkv = to_cube::<R, B, 2>(&self.qkv.clone().reshape([tokens, width]))?;
        let cos = to_cube::<R, B, 2>(&self.cos.clone().reshape([tokens, dim]))?;
        let sin = to_cube::<R, B, 2>(&self.sin.clone().reshape([tokens, dim]))?;
        let keys = to_cube::<R, B, 5>(self.keys)?;
        let values = to_cube::<R, B, 5>(self.values)?;
        let dtype = qkv.dtype;
        if [&cos, &sin, &keys, &values]
            .iter()
            .any(|t| t.dtype != dtype)
        {
            return None;
        }
        let client = qkv.client.clone();
        if ROTARY_SHARED_BYTES > client.properties().hardware.max_shared_memory_size {
            return None;
        }
        let bias = match self.bias {
            Some(bias) => {
                let bias = to_cube::<R, B, 4>(bias)?;
                (bias.dtype == dtype).then_some(bias)?
            }
            // Not read: any tensor of the right type will do.
            None => qkv.clone(),
        };
        let bias_strides = match self.bias {
            Some(_) => strides4(&bias)?,
            None => strides4_of(&[0; 4])?,
        };
        let output = empty_like(&qkv, [tokens, heads * dim]);
        // One layer of the storage as a 4-D array: its first element and the other strides.
        let (key_strides, value_strides) = (keys.meta.strides(), values.meta.strides());
        // With every stride a multiple of the vector width, so is the layer's first element.
        let vector = cache_vector(lane_dims, &[&keys, &values]);
        let [key_base, value_base] = scalars(&[layer * key_strides[0], layer * value_strides[0]])?;
        let (key_strides, value_strides) = (
            strides4_of(&key_strides[1..])?,
            strides4_of(&value_strides[1..])?,
        );
        let (qkv_strides, cos_strides, sin_strides) =
            (strides2(&qkv)?, strides2(&cos)?, strides2(&sin)?);
        let output_strides = strides2(&output)?;
        let rows = tokens * heads;
        let partials = score_partials(dim);
        let [batch, heads, len, dim, kv_heads, start] =
            scalars(&[batch, heads, len, dim, kv_heads, start])?;
        // Arrays bound at the tensors' offsets, read through the strides above; the cache's
        // storage is written in place.
        unsafe {
            rotary_attention_kernel::launch_unchecked::<R>(
                &client,
                row_grid(rows),
                CubeDim::new_1d(UNITS as u32),
                vector,
                qkv.into_array_arg(),
                cos.into_array_arg(),
                sin.into_array_arg(),
                keys.into_array_arg(),
                values.into_array_arg(),
                bias.into_array_arg(),
                output.clone().into_array_arg(),
                qkv_strides,
                cos_strides,
                sin_strides,
                key_strides,
                value_strides,
                bias_strides,
                output_strides,
                batch,
                heads,
                len,
                dim,
                kv_heads,
                key_base,
                value_base,
                start,
                self.bias.is_some(),
                lane_dims,
                walk_batch,
                vector,
                partials,
                dtype.into(),
            )
        };
        from_cube::<R, B, 2>(output)
    }
}
