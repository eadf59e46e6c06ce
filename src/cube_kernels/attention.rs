//! Grouped-query attention with an additive bias in one kernel, summed in slot order.
//!
//! Burn's ops take five launches for this (the score product, our softmax, the value product, and
//! the copies that lay the heads out again), and the two products go through CubeCL's matmul,
//! whose rounding depends on the shape (TF32 tensor cores on CUDA, see [`super::matmul`]). Here one
//! cube computes one query row of one head:
//!
//! 1. every unit scores a share of the slots (`q · k` summed over the head dimension in order,
//!    plus the bias; the query row is read once into shared memory) and the cube takes the
//!    maximum;
//! 2. the slots are walked in order, a chunk of [`ROW_UNITS`] at a time: the units put the chunk's
//!    `exp(score − max)` in shared memory, then unit `d` adds them and their weighted values
//!    `v[slot, d]` to its running sums, slot after slot (the loads of [`GROUP`] slots issued
//!    together, the sums still in slot order);
//! 3. unit `d` writes `sum(p·v) / sum(p)` straight into the `[rows, heads · dim]` layout the output
//!    projection reads.
//!
//! A masked slot's weight is exactly zero and is skipped, so a token's output in a draft tree is
//! the same sequence of operations as its output when decoded alone over just the visible slots:
//! bit for bit the same result (a maximum does not depend on order; the sums run in slot order).

use burn::tensor::{Tensor as BurnTensor, backend::Backend};
use burn_cubecl::CubeRuntime;
use cubecl::prelude::*;

use super::dispatch::{CubeOp, empty_like, from_cube, row_grid, to_cube};
use super::reduce::{ROW_UNITS, at, at4, cube_max};

/// Attention of query row `(batch, head, t)` — one per cube — over `keys`/`values`
/// `[batch, kv_heads, slots, dim]`, written to `output` `[batch * len, heads * dim]`. The bias
/// `[batch, 1, len, slots]` is read only `with_bias`, through its strides (on CUDA its rows are
/// padded, and flattening it to `[batch * len, slots]` first cost a copy per layer).
#[cube(launch_unchecked)]
fn attention_kernel<F: Float>(
    queries: &Tensor<F>,
    keys: &Tensor<F>,
    values: &Tensor<F>,
    bias: &Tensor<F>,
    output: &mut Tensor<F>,
    #[comptime] with_bias: bool,
    #[define(F)] _dtype: StorageType,
) {
    let heads = queries.shape(1);
    let len = queries.shape(2);
    let dim = queries.shape(3);
    let kv_heads = keys.shape(1);
    let slots = keys.shape(2);
    let row = CUBE_POS;
    if row >= queries.shape(0) * heads * len {
        terminate!();
    }
    let batch = row / (heads * len);
    let head = (row / len) % heads;
    let t = row % len;
    let kv_head = head / (heads / kv_heads);
    let unit = UNIT_POS_X as usize;
    let mut shared = SharedMemory::<f32>::new(ROW_UNITS);
    // The query row, read once: every score below reads it from here.
    let mut query = SharedMemory::<f32>::new(ROW_UNITS);
    if unit < dim {
        query[unit] = f32::cast_from(queries[at4(queries, batch, head, t, unit)]);
    }
    sync_cube();

    let mut largest = f32::new(-3.0e38);
    let mut slot = unit;
    while slot < slots {
        let value = score(&query, keys, bias, batch, t, kv_head, slot, dim, with_bias);
        if value > largest {
            largest = value;
        }
        slot += ROW_UNITS;
    }
    let largest = cube_max(&mut shared, largest);

    let mut total = f32::new(0.0);
    let mut weighted = f32::new(0.0);
    // Units past the head dimension read a valid lane and write nothing.
    let lane = if unit < dim { unit } else { dim - 1 };
    let mut loaded = Array::<f32>::new(GROUP);
    let mut chunk = 0usize;
    while chunk < slots {
        // The same slots this unit scored above (the chunk advances by the cube's width). They
        // are scored again rather than kept: how many a unit holds depends on the slot count,
        // and a shared buffer of every score would bound the context by shared memory.
        let mine = chunk + unit;
        let mut weight = f32::new(0.0);
        if mine < slots {
            let value = score(&query, keys, bias, batch, t, kv_head, mine, dim, with_bias);
            weight = (value - largest).exp();
        }
        shared[unit] = weight;
        sync_cube();
        let mut count = slots - chunk;
        if count > ROW_UNITS {
            count = ROW_UNITS;
        }
        // GROUP slots at a time: their value loads are issued together (a unit's loads would
        // otherwise wait on each other, slot after slot), then added in slot order.
        let mut j = 0usize;
        while j + GROUP <= count {
            #[unroll]
            for i in 0..GROUP {
                loaded[i] =
                    f32::cast_from(values[at4(values, batch, kv_head, chunk + j + i, lane)]);
            }
            #[unroll]
            for i in 0..GROUP {
                let p = shared[j + i];
                if p != f32::new(0.0) {
                    total += p;
                    weighted += p * loaded[i];
                }
            }
            j += GROUP;
        }
        while j < count {
            let p = shared[j];
            if p != f32::new(0.0) {
                total += p;
                weighted +=
                    p * f32::cast_from(values[at4(values, batch, kv_head, chunk + j, lane)]);
            }
            j += 1;
        }
        sync_cube();
        chunk += ROW_UNITS;
    }
    if unit < dim {
        output[at(output, batch * len + t, head * dim + unit)] = F::cast_from(weighted / total);
    }
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
    keys: &Tensor<F>,
    bias: &Tensor<F>,
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
            loaded[i] = f32::cast_from(keys[at4(keys, batch, kv_head, slot, d + i)]);
        }
        #[unroll]
        for i in 0..GROUP {
            dot += query[d + i] * loaded[i];
        }
        d += GROUP;
    }
    while d < dim {
        dot += query[d] * f32::cast_from(keys[at4(keys, batch, kv_head, slot, d)]);
        d += 1;
    }
    if with_bias {
        dot += f32::cast_from(bias[at4(bias, batch, 0, t, slot)]);
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
            || dim > ROW_UNITS
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
        let (client, dtype) = (queries.client.clone(), queries.dtype);
        unsafe {
            attention_kernel::launch_unchecked::<R>(
                &client,
                row_grid(rows),
                CubeDim::new_1d(ROW_UNITS as u32),
                queries.into_tensor_arg(),
                keys.into_tensor_arg(),
                values.into_tensor_arg(),
                bias.into_tensor_arg(),
                output.clone().into_tensor_arg(),
                self.bias.is_some(),
                dtype.into(),
            )
        };
        from_cube::<R, B, 2>(output)
    }
}
