//! Scaled dot-product attention with an additive bias, for the Flex CPU backend, in one pass.
//!
//! Burn's ops spend most of a verification forward's non-matmul time here: the GQA reshape of
//! the strided Q copies it, the bias is broadcast through an element-by-element strided
//! iterator, softmax and the two batched `gemm` products each allocate, and the output is
//! permuted back to `[len, heads · dim]` with another strided copy. On the 2-core development
//! machine that made a 5-token verification cost 1.8 one-token steps where its matmuls alone
//! cost 1.4. This kernel reads Q, K and V where they lie (strided views of the fused QKV product
//! and of the KV cache), and writes the output already laid out for the output projection.
//!
//! Scores and outputs are small products computed like [`crate::panel_matmul`]'s: the keys of
//! each KV head are copied once per call into panels of 16 slots (`[slots / 16][dim][16]`), so a
//! step multiplies one vector of 16 slots' key elements by a broadcast query element of up to 4
//! query rows; `probs · V` walks the slots in order with a whole 64-wide value row (4 vectors)
//! per step. The rows of a tile are any 4 of the `(query head, token)` pairs that read the same
//! KV head — a one-token step's 3 heads per KV head share one tile and every key they load. The
//! softmax's exponentials are vectorised ([`super::exp`]). Every score is one chain of fused
//! multiply-adds over the head dimension, every output element one chain over the slots, and
//! softmax sums in slot order — whatever the block length, the tile a row falls in or the
//! instruction set. A masked slot contributes an exact zero, so a token's
//! attention output in a draft tree equals, bit for bit, its output when decoded alone — which
//! keeps greedy speculative decoding equal to plain greedy decoding on this backend.
//!
//! [`attention`] declines (returns `None`) for anything but f32 tensors of
//! `burn::backend::Flex` (not under `Autodiff`, which must record the ops).

use burn::tensor::{Tensor, TensorData, backend::Backend};
use rayon::prelude::*;

use super::exp::exp;
use super::view::View;
use crate::cpu_simd::Simd;
use crate::flex_tensor::{into_flex, is_flex};
use crate::projection::{PANEL, pack_rows_into};

/// Slots per key panel (the projections' panel width), and output columns per vector of
/// `probs · V`.
const LANES: usize = PANEL;

/// Value columns per pass of `probs · V` where the head is that wide: SmolLM2's and Llama's
/// 64 (4 AVX-512 vectors per row).
const WIDE: usize = 64;

/// Query rows per register tile: 4 accumulators of 16 lanes (8 with AVX2) reuse each key or
/// value vector they load.
const TILE_ROWS: usize = 4;

/// Below this many score elements (`heads · len · slots`) the tiles run on one thread. At
/// SmolLM2's shape over 256 cached tokens (criterion `attention`, 2-core development machine,
/// session 31): 5 query tokens (11,745 scores) took 111–128 µs on one thread and 123–138 µs on
/// two, 18 tokens (42,462) 390–440 µs on one and 240–310 µs on two.
const PARALLEL_MIN_SCORES: usize = 16 * 1024;

/// Attention of `queries` over `keys`/`values` with an optional additive `bias`, query head `h`
/// reading KV head `h / (heads / kv_heads)`; the 1/√dim scale is expected to be folded into the
/// queries already. Returns the output as `[batch, len, heads · dim]`, or `None` when the
/// tensors are not f32 on Flex (the caller then uses Burn's ops).
///
/// # Shapes
/// - `queries`: `[batch, heads, len, dim]`
/// - `keys`, `values`: `[batch, kv_heads, slots, dim]`
/// - `bias`: `[batch, 1, len, slots]`
/// - returns `[batch, len, heads · dim]`
pub(crate) fn attention<B: Backend>(
    queries: &Tensor<B, 4>,
    keys: &Tensor<B, 4>,
    values: &Tensor<B, 4>,
    bias: Option<&Tensor<B, 4>>,
) -> Option<Tensor<B, 3>> {
    attention_with(Simd::detect(), queries, keys, values, bias)
}

/// [`attention`] with the loops of instruction set `simd` (one this CPU runs).
fn attention_with<B: Backend>(
    simd: Simd,
    queries: &Tensor<B, 4>,
    keys: &Tensor<B, 4>,
    values: &Tensor<B, 4>,
    bias: Option<&Tensor<B, 4>>,
) -> Option<Tensor<B, 3>> {
    if !is_flex::<B>() {
        return None;
    }
    let [batch, heads, len, dim] = queries.dims();
    let [k_batch, kv_heads, slots, k_dim] = keys.dims();
    if k_batch != batch
        || k_dim != dim
        || values.dims() != keys.dims()
        || kv_heads == 0
        || len == 0
        || dim == 0
        || slots == 0
        || !heads.is_multiple_of(kv_heads)
        || bias.is_some_and(|b| b.dims() != [batch, 1, len, slots])
    {
        return None;
    }
    let device = queries.device();
    let q = into_flex(queries.clone())?;
    let k = into_flex(keys.clone())?;
    let v = into_flex(values.clone())?;
    let bias = match bias {
        Some(b) => Some(into_flex(b.clone())?),
        None => None,
    };
    let shape = Shape {
        batch,
        heads,
        groups: heads / kv_heads,
        len,
        slots,
        dim,
    };
    let out = attend(
        simd,
        &shape,
        &View::new(&q)?,
        &View::new(&k)?,
        &View::new(&v)?,
        match &bias {
            Some(b) => Some(View::new(b)?),
            None => None,
        }
        .as_ref(),
    );
    Some(Tensor::from_data(
        TensorData::new(out, [batch, len, heads * dim]),
        &device,
    ))
}

struct Shape {
    batch: usize,
    heads: usize,
    groups: usize,
    len: usize,
    slots: usize,
    dim: usize,
}

/// The whole attention, `[batch, len, heads · dim]` out.
///
/// The query rows of one KV head's group — `groups · len` of them, `(head, token)` pairs — are
/// cut into tiles of up to 4 rows that share each key and value vector they load: a one-token
/// step's 3 query heads per KV head (SmolLM2) fill one tile, a 5-token tree's 15 rows four.
/// Tiles are independent tasks for the thread pool.
fn attend(
    simd: Simd,
    shape: &Shape,
    q: &View<'_>,
    k: &View<'_>,
    v: &View<'_>,
    bias: Option<&View<'_>>,
) -> Vec<f32> {
    let Shape {
        batch,
        heads,
        groups,
        len,
        slots,
        dim,
    } = *shape;
    let kv_heads = heads / groups;
    let parallel = heads * len * slots >= PARALLEL_MIN_SCORES;
    // Each (batch row, KV head) pair's keys in panels, read by every tile of its group.
    let panel_floats = slots.div_ceil(LANES) * dim * LANES;
    // Taken out of the thread-local for the call, not borrowed across it: while this thread
    // waits in a parallel loop below, rayon may run another decoding loop's attention on it
    // (loops on several threads share the pool), which then finds no buffer and makes its own.
    let mut key_panels = KEY_PANELS.take();
    key_panels.resize(batch * kv_heads * panel_floats, 0.0);
    for_each_block(&mut key_panels, panel_floats, parallel, |pair, panels| {
        pack_keys(k, pair / kv_heads, pair % kv_heads, slots, dim, panels)
    });
    let out = {
        let key_panels = &key_panels[..];
        // Tile `i` of (batch row, KV head) pair `pair` writes rows `[4 · i, 4 · i + 4)` of the
        // pair's `[groups · len, dim]` block; they are interleaved into `[batch, len, heads ·
        // dim]` afterwards.
        let group_rows = groups * len;
        let tiles = group_rows.div_ceil(TILE_ROWS);
        let mut by_tile = vec![0.0f32; batch * kv_heads * tiles * TILE_ROWS * dim];
        for_each_block(&mut by_tile, TILE_ROWS * dim, parallel, |task, out| {
            let (pair, tile) = (task / tiles, task % tiles);
            let (b, kv) = (pair / kv_heads, pair % kv_heads);
            let first = tile * TILE_ROWS;
            let tile = Tile {
                shape,
                b,
                kv,
                first,
                rows: TILE_ROWS.min(group_rows - first),
                q,
                keys: &key_panels[pair * panel_floats..][..panel_floats],
                v,
                bias,
            };
            match simd {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: `Simd` names AVX-512 only where the CPU has AVX-512F.
                Simd::Avx512 => unsafe { tile_attention_avx512(&tile, out) },
                #[cfg(target_arch = "x86_64")]
                // SAFETY: `Simd` names AVX2 only where the CPU has AVX2 and FMA.
                Simd::Avx2 => unsafe { tile_attention_avx2(&tile, out) },
                Simd::Portable => tile_attention(&tile, out),
            }
        });
        let mut out = vec![0.0f32; batch * len * heads * dim];
        for (pair, block) in by_tile.chunks_exact(tiles * TILE_ROWS * dim).enumerate() {
            let (b, kv) = (pair / kv_heads, pair % kv_heads);
            for (r, row) in block.chunks_exact(dim).take(group_rows).enumerate() {
                let (h, t) = (kv * groups + r / len, r % len);
                let at = ((b * len + t) * heads + h) * dim;
                out[at..at + dim].copy_from_slice(row);
            }
        }
        out
    };
    KEY_PANELS.set(key_panels);
    out
}

thread_local! {
    /// The keys in panels, reused across calls: a fresh zeroed buffer of SmolLM2's 200 KB a
    /// layer came from the kernel as new pages at every call. [`pack_keys`] writes every lane a
    /// call reads. A call takes the buffer and puts it back when done (see [`attend`]).
    static KEY_PANELS: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `work(i, block)` for each `block`-float block `i` of `buffer`, on the thread pool when
/// `parallel`.
fn for_each_block(
    buffer: &mut [f32],
    block: usize,
    parallel: bool,
    work: impl Fn(usize, &mut [f32]) + Send + Sync,
) {
    if parallel {
        buffer
            .par_chunks_mut(block)
            .enumerate()
            .for_each(|(i, b)| work(i, b));
    } else {
        buffer
            .chunks_mut(block)
            .enumerate()
            .for_each(|(i, b)| work(i, b));
    }
}

/// `K` of batch row `b`, KV head `kv` as panels of 16 slots, `[⌈slots / 16⌉][dim][16]`, the
/// last panel's lanes past `slots` set to zero (the buffer is reused across calls).
fn pack_keys(k: &View<'_>, b: usize, kv: usize, slots: usize, dim: usize, panels: &mut [f32]) {
    pack_rows_into((0..slots).map(|s| k.row(b, kv, s, dim)), dim, panels);
    let used = slots % LANES;
    if used > 0 {
        let last = &mut panels[(slots / LANES) * dim * LANES..];
        for lanes in last.chunks_exact_mut(LANES) {
            lanes[used..].fill(0.0);
        }
    }
}

/// What one tile of up to 4 query rows of one KV head's group reads. Row `r` of the group is
/// query head `kv · groups + r / len`, token `r % len`.
struct Tile<'a> {
    shape: &'a Shape,
    b: usize,
    kv: usize,
    /// The tile's first row in the group.
    first: usize,
    /// Rows in the tile, 1 to 4.
    rows: usize,
    q: &'a View<'a>,
    /// The KV head's keys in panels ([`pack_keys`]).
    keys: &'a [f32],
    v: &'a View<'a>,
    bias: Option<&'a View<'a>>,
}

/// [`tile_attention`] compiled with more instruction-set features enabled.
macro_rules! tile_attention_for {
    ($name:ident, $features:literal) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $features)]
        fn $name(tile: &Tile<'_>, out: &mut [f32]) {
            tile_attention(tile, out)
        }
    };
}

tile_attention_for!(tile_attention_avx512, "avx512f,avx2,fma");
tile_attention_for!(tile_attention_avx2, "avx2,fma");

/// `out[i] = softmax(q[i] · Kᵀ + bias[i]) · V` for the tile's rows, `[rows, dim]` at the start of
/// `out`. Inlined into each instruction-set variant above, with the loops compiled for each row
/// count (a short tile computes no repeated rows).
#[inline(always)]
fn tile_attention(tile: &Tile<'_>, out: &mut [f32]) {
    match tile.rows {
        1 => rows_attention::<1>(tile, out),
        2 => rows_attention::<2>(tile, out),
        3 => rows_attention::<3>(tile, out),
        _ => rows_attention::<TILE_ROWS>(tile, out),
    }
}

#[inline(always)]
fn rows_attention<const R: usize>(tile: &Tile<'_>, out: &mut [f32]) {
    let Tile {
        shape,
        b,
        kv,
        first,
        q,
        keys,
        v,
        bias,
        ..
    } = *tile;
    let Shape {
        groups,
        len,
        slots,
        dim,
        ..
    } = *shape;
    let head_token = |i: usize| ((first + i) / len, (first + i) % len);
    let queries: [&[f32]; R] = std::array::from_fn(|i| {
        let (g, t) = head_token(i);
        q.row(b, kv * groups + g, t, dim)
    });
    let padded = slots.div_ceil(LANES) * LANES;
    let mut probs = vec![0.0f32; R * padded];
    // Two panels at a time: 2·R chains of multiply-adds in flight instead of R.
    let mut panels = keys.chunks_exact(dim * LANES).enumerate();
    while let Some((panel, first)) = panels.next() {
        let at = panel * LANES;
        match panels.next() {
            Some((_, second)) => {
                score_panels::<R, 2>(&queries, [first, second], dim, &mut probs, padded, at)
            }
            None => score_panels::<R, 1>(&queries, [first], dim, &mut probs, padded, at),
        }
    }
    if let Some(bias) = bias {
        for (i, row) in probs.chunks_exact_mut(padded).enumerate() {
            let (_, t) = head_token(i);
            for (p, &add) in row.iter_mut().zip(bias.row(b, 0, t, slots)) {
                *p += add;
            }
        }
    }
    softmax_rows::<R>(&mut probs, padded, slots);
    let tile_probs: [&[f32]; R] = std::array::from_fn(|i| &probs[i * padded..][..slots]);
    // Whole value rows of a 64-wide head in one pass (each row's 4 vectors loaded once for the
    // tile), else 16 columns at a time; every output element is the same chain over the slots.
    let mut column = 0;
    while column < dim {
        if dim - column >= WIDE {
            let sums = weighted_values::<R, WIDE>(&tile_probs, v, b, kv, column, WIDE, dim);
            store(out, dim, column, WIDE, &sums);
            column += WIDE;
        } else {
            let width = LANES.min(dim - column);
            let sums = weighted_values::<R, LANES>(&tile_probs, v, b, kv, column, width, dim);
            store(out, dim, column, width, &sums);
            column += width;
        }
    }
}

/// Columns `column..column + width` of each of the `R` output rows (`dim` wide) from `sums`.
#[inline(always)]
fn store<const R: usize, const C: usize>(
    out: &mut [f32],
    dim: usize,
    column: usize,
    width: usize,
    sums: &[[f32; C]; R],
) {
    for (i, sums) in sums.iter().enumerate() {
        out[i * dim + column..][..width].copy_from_slice(&sums[..width]);
    }
}

/// Scores of `R` query rows against `P` panels of 16 slots, written to each row of `probs`
/// (`padded` floats a row) from slot `at` on: per slot one chain of fused multiply-adds over
/// the head dimension.
#[inline(always)]
fn score_panels<const R: usize, const P: usize>(
    queries: &[&[f32]; R],
    panels: [&[f32]; P],
    dim: usize,
    probs: &mut [f32],
    padded: usize,
    at: usize,
) {
    let mut acc = [[[0.0f32; LANES]; P]; R];
    let keys: [&[[f32; LANES]]; P] = panels.map(|panel| &panel.as_chunks::<LANES>().0[..dim]);
    for d in 0..dim {
        for (acc, query) in acc.iter_mut().zip(queries) {
            let x = query[d];
            for (acc, keys) in acc.iter_mut().zip(&keys) {
                let keys = &keys[d];
                *acc = std::array::from_fn(|l| x.mul_add(keys[l], acc[l]));
            }
        }
    }
    for (row, scores) in probs.chunks_exact_mut(padded).zip(&acc) {
        row[at..][..P * LANES].copy_from_slice(scores.as_flattened());
    }
}

/// `Σ_s probs[i][s] · V[s][column..column + width]` (`width ≤ C`) for `R` rows of
/// probabilities, summed in slot order with fused multiply-adds; lanes past `width` are zero.
#[inline(always)]
fn weighted_values<const R: usize, const C: usize>(
    probs: &[&[f32]; R],
    v: &View<'_>,
    b: usize,
    kv: usize,
    column: usize,
    width: usize,
    dim: usize,
) -> [[f32; C]; R] {
    let mut acc = [[0.0f32; C]; R];
    let slots = probs[0].len();
    for s in 0..slots {
        let row = &v.row(b, kv, s, dim)[column..column + width];
        let padded: [f32; C];
        let values = match row.first_chunk::<C>() {
            Some(whole) => whole,
            None => {
                padded = std::array::from_fn(|l| row.get(l).copied().unwrap_or(0.0));
                &padded
            }
        };
        for (acc, probs) in acc.iter_mut().zip(probs) {
            let p = probs[s];
            *acc = std::array::from_fn(|l| p.mul_add(values[l], acc[l]));
        }
    }
    acc
}

/// `x ← exp(x − max) / Σ exp(x − max)` for each of the `R` rows of `probs` (`slots` values at
/// the start of every `padded`-float row), each row's sum one chain in slot order — as the row
/// alone would sum it. The `R` chains run side by side: one row's 256 dependent additions cost
/// ~1,000 cycles of latency, four interleaved cost the same. The maximum is taken in 16 lanes,
/// which gives the same value in any order.
#[inline(always)]
fn softmax_rows<const R: usize>(probs: &mut [f32], padded: usize, slots: usize) {
    let mut rows: [&mut [f32]; R] = {
        let mut chunks = probs.chunks_exact_mut(padded).map(|row| &mut row[..slots]);
        std::array::from_fn(|_| chunks.next().unwrap_or_default())
    };
    for row in rows.iter_mut() {
        let max = maximum(row);
        // The exponentials vectorise (`super::exp`).
        for v in row.iter_mut() {
            *v = exp(*v - max);
        }
    }
    let mut sums = [0.0f32; R];
    for s in 0..slots {
        for (sum, row) in sums.iter_mut().zip(&rows) {
            *sum += row[s];
        }
    }
    for (row, sum) in rows.iter_mut().zip(sums) {
        let inv = 1.0 / sum;
        for v in row.iter_mut() {
            *v *= inv;
        }
    }
}

/// The largest of `x` (`-∞` when empty; NaNs ignored, as `f32::max` does).
#[inline(always)]
fn maximum(x: &[f32]) -> f32 {
    let (chunks, rest) = x.as_chunks::<LANES>();
    let mut lanes = [f32::NEG_INFINITY; LANES];
    for chunk in chunks {
        lanes = std::array::from_fn(|l| lanes[l].max(chunk[l]));
    }
    lanes
        .iter()
        .chain(rest)
        .copied()
        .fold(f32::NEG_INFINITY, f32::max)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{DType, Distribution, Tolerance, activation::softmax};

    type B = burn::backend::Flex;

    /// Burn's ops: the reference.
    fn reference(
        q: Tensor<B, 4>,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
        bias: Option<Tensor<B, 4>>,
    ) -> Tensor<B, 3> {
        let [batch, heads, len, dim] = q.dims();
        let kv_heads = k.dims()[1];
        let groups = heads / kv_heads;
        let slots = k.dims()[2];
        // Repeat each KV head for its group of query heads.
        let repeat = |x: Tensor<B, 4>| {
            x.unsqueeze_dim::<5>(2)
                .repeat_dim(2, groups)
                .reshape([batch, heads, slots, dim])
        };
        let (k, v) = (repeat(k), repeat(v));
        let mut scores = q.matmul(k.swap_dims(2, 3));
        if let Some(bias) = bias {
            scores = scores.add(bias);
        }
        softmax(scores, 3)
            .matmul(v)
            .swap_dims(1, 2)
            .reshape([batch, len, heads * dim])
    }

    fn causal_bias(batch: usize, len: usize, context: usize) -> Tensor<B, 4> {
        let slots = context + len;
        let mut bias = vec![crate::kv_cache::MASKED; batch * len * slots];
        for b in 0..batch {
            for t in 0..len {
                let row = &mut bias[(b * len + t) * slots..][..slots];
                row[..context + t + 1].iter_mut().for_each(|x| *x = 0.0);
            }
        }
        Tensor::from_data(
            TensorData::new(bias, [batch, 1, len, slots]),
            &Default::default(),
        )
    }

    #[test]
    fn matches_burns_ops_with_and_without_bias_on_strided_inputs() {
        let device = Default::default();
        for (batch, heads, kv_heads, len, context, dim) in [
            (1, 9, 3, 5, 40, 64),
            (2, 4, 4, 3, 7, 19),
            (1, 6, 2, 1, 300, 32),
        ] {
            let slots = context + len;
            // Strided Q, as it comes out of the fused QKV product: `[batch, len, heads, dim]`
            // viewed as `[batch, heads, len, dim]`.
            let q =
                Tensor::<B, 4>::random([batch, len, heads, dim], Distribution::Default, &device)
                    .swap_dims(1, 2);
            // K and V as slices of a longer cache.
            let cache = Tensor::<B, 4>::random(
                [batch, kv_heads, slots + 9, dim],
                Distribution::Default,
                &device,
            );
            let k = cache
                .clone()
                .slice([0..batch, 0..kv_heads, 0..slots, 0..dim]);
            let v = cache.slice([0..batch, 0..kv_heads, 3..slots + 3, 0..dim]);
            let bias = causal_bias(batch, len, context);
            for bias in [None, Some(bias)] {
                let got = attention(&q, &k, &v, bias.as_ref()).expect("f32 on Flex");
                let want = reference(q.clone(), k.clone(), v.clone(), bias);
                got.into_data()
                    .assert_approx_eq::<f32>(&want.into_data(), Tolerance::default());
            }
        }
    }

    /// A token's output in a tree, with masked slots around the ones it sees, equals its output
    /// when it attends alone to exactly those slots in order.
    #[test]
    fn a_masked_tree_row_equals_the_row_alone_bit_for_bit() {
        let device = Default::default();
        let (heads, kv_heads, dim, context, len) = (6, 2, 64, 20, 6);
        let slots = context + len;
        let k = Tensor::<B, 4>::random([1, kv_heads, slots, dim], Distribution::Default, &device);
        let v = Tensor::<B, 4>::random([1, kv_heads, slots, dim], Distribution::Default, &device);
        let q = Tensor::<B, 4>::random([1, heads, len, dim], Distribution::Default, &device);
        // Tree: token 4 sees tree tokens 0, 2 and itself.
        let seen = [0usize, 2, 4];
        let mut bias = vec![crate::kv_cache::MASKED; len * slots];
        for t in 0..len {
            bias[t * slots..t * slots + context].fill(0.0);
            bias[t * slots + context + t] = 0.0;
        }
        for s in seen {
            bias[4 * slots + context + s] = 0.0;
        }
        let bias = Tensor::from_data(TensorData::new(bias, [1, 1, len, slots]), &device);
        let tree = attention(&q, &k, &v, Some(&bias)).expect("f32 on Flex");
        let row = tree.slice([0..1, 4..5, 0..heads * dim]).into_data();

        // Alone: the context and the three seen tokens, consecutive, no bias.
        let keep = |x: Tensor<B, 4>| {
            let mut parts = vec![x.clone().slice([0..1, 0..kv_heads, 0..context, 0..dim])];
            for s in seen {
                let at = context + s;
                parts.push(x.clone().slice([0..1, 0..kv_heads, at..at + 1, 0..dim]));
            }
            Tensor::cat(parts, 2)
        };
        let alone = attention(
            &q.slice([0..1, 0..heads, 4..5, 0..dim]),
            &keep(k),
            &keep(v),
            None,
        )
        .expect("f32 on Flex");
        assert_eq!(
            row.to_vec::<f32>().unwrap(),
            alone.into_data().to_vec::<f32>().unwrap()
        );
    }

    /// Every instruction set's loops give the same bits (fused multiply-adds in one order).
    #[test]
    fn every_instruction_set_gives_the_same_bits() {
        let device = Default::default();
        let (heads, kv_heads, dim, slots, len) = (6, 2, 40, 37, 5);
        let q = Tensor::<B, 4>::random([1, heads, len, dim], Distribution::Default, &device);
        let k = Tensor::<B, 4>::random([1, kv_heads, slots, dim], Distribution::Default, &device);
        let v = Tensor::<B, 4>::random([1, kv_heads, slots, dim], Distribution::Default, &device);
        let bias = causal_bias(1, len, slots - len);
        let run = |simd| {
            attention_with(simd, &q, &k, &v, Some(&bias))
                .expect("f32 on Flex")
                .into_data()
                .to_vec::<f32>()
                .unwrap()
        };
        let portable = run(Simd::Portable);
        for simd in Simd::available() {
            assert_eq!(run(simd), portable, "{simd:?}");
        }
    }

    /// Decoding loops on several threads share rayon's pool: a worker that waits inside one
    /// loop's attention may run another loop's whole attention meanwhile (session 44's CI saw
    /// the reused key buffer then borrowed twice). Each call must still see its own buffer.
    #[test]
    fn attention_nested_on_one_worker_by_other_threads_stays_right() {
        let device = Default::default();
        // Above the parallel threshold: 9 heads × 5 rows × 400 slots.
        let (heads, kv_heads, dim, slots, len) = (9, 3, 64, 400, 5);
        let inputs: Vec<_> = (0..4)
            .map(|_| {
                let q =
                    Tensor::<B, 4>::random([1, heads, len, dim], Distribution::Default, &device);
                let k = Tensor::<B, 4>::random(
                    [1, kv_heads, slots, dim],
                    Distribution::Default,
                    &device,
                );
                let v = Tensor::<B, 4>::random(
                    [1, kv_heads, slots, dim],
                    Distribution::Default,
                    &device,
                );
                let want = attention(&q, &k, &v, None)
                    .expect("f32 on Flex")
                    .into_data();
                (q, k, v, want)
            })
            .collect();
        std::thread::scope(|threads| {
            for (q, k, v, want) in &inputs {
                threads.spawn(move || {
                    for _ in 0..200 {
                        // From outside the pool, as `on_cpu_workers` runs a decoding loop.
                        let got = rayon::scope(|_| attention(q, k, v, None).expect("f32 on Flex"));
                        assert_eq!(got.into_data(), *want);
                    }
                });
            }
        });
    }

    #[test]
    fn declines_what_it_does_not_handle() {
        let device = Default::default();
        let q = Tensor::<B, 4>::random([1, 4, 2, 8], Distribution::Default, &device);
        let k = Tensor::<B, 4>::random([1, 2, 5, 8], Distribution::Default, &device);
        let half = |x: &Tensor<B, 4>| x.clone().cast(DType::F16);
        assert!(attention(&half(&q), &half(&k), &half(&k), None).is_none());
        // Heads not a multiple of KV heads, and a bias of the wrong shape.
        let k3 = Tensor::<B, 4>::random([1, 3, 5, 8], Distribution::Default, &device);
        assert!(attention(&q, &k3, &k3, None).is_none());
        let bias = Tensor::<B, 4>::zeros([1, 1, 2, 4], &device);
        assert!(attention(&q, &k, &k, Some(&bias)).is_none());
        assert!(attention(&q, &k, &k, None).is_some());
        // An empty block is left to Burn's ops.
        let empty = Tensor::<B, 4>::zeros([1, 4, 0, 8], &device);
        assert!(attention(&empty, &k, &k, None).is_none());
    }
}
