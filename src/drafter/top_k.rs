//! Row-wise top-k for the draft head's beam search, without host round-trips on GPUs.
//!
//! Burn 0.21's `sort` (and `topk`, which is built on it) has no GPU kernel: on the CubeCL
//! backends (CUDA, WGPU) it reads the tensor back and sorts on the host, a synchronisation in
//! the middle of every draft step (measured on an H100: 9–22 ms per draft round,
//! docs/benchmarks.md). The backend's `argtopk` reduction runs one thread per row over the whole
//! vocabulary and did not finish a speculative benchmark on the H100. Two methods are provided:
//!
//! - [`TopKMethod::Sort`]: grouped sort (below); the fastest on CPUs, where a sort is cheap and
//!   memory traffic is not.
//! - [`TopKMethod::Rank`]: grouped *rank selection* built from element-wise comparisons, one
//!   reduction and one scatter — a few dozen kernels, all on the device, no sync. It spends
//!   `O(G² + (k·S)²)` comparisons per row, which is nothing for a GPU and too much for a CPU.
//!
//! [`TopKMethod::Auto`] picks `Rank` on CubeCL backends and `Sort` elsewhere. Where our CubeCL
//! kernels apply (CUDA and WGPU, not under `Fusion` or `Autodiff`), `Rank` runs as one kernel,
//! `crate::cube_kernels::top_k`, with the same result; the composition below is the fallback.
//!
//! # Grouping (both methods)
//!
//! A row of width `W` is cut into `G` groups of `S` columns. The top `k` entries lie in the `k`
//! groups with the largest maxima: an entry outside them is smaller than each of those `k`
//! maxima. So selecting among `G` group maxima and then among `k·S` candidates replaces
//! selecting among `W` values. `S ≈ sqrt(W / k)` balances the two stages.
//!
//! # Ties
//!
//! `Rank` breaks exact ties by column (lower first), `Sort` by the backend's sort order; both
//! return `k` distinct columns.
//!
//! # Constants
//!
//! Rank selection needs index tensors that depend only on the shape (the tie-break mask, column
//! numbers, row offsets). Building them costs several kernel launches and host-to-device uploads
//! each — on a launch-bound GPU about a fifth of a draft round. A [`TopKCache`] keeps them per
//! shape and device; the draft head owns one, so a decoding run builds them once.

use std::any::Any;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use burn::tensor::backend::Backend;
use burn::tensor::{Bool, IndexingUpdateOp, Int, Tensor};

/// How the draft head selects its top-k candidates. See the module documentation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum TopKMethod {
    /// `Rank` on CubeCL (GPU) backends, `Sort` elsewhere.
    #[default]
    Auto,
    /// Grouped sort: cheapest on CPUs; on CubeCL backends it synchronises with the host.
    Sort,
    /// Grouped rank selection from comparisons: stays on the device, no synchronisation.
    Rank,
}

impl TopKMethod {
    /// The method `Auto` resolves to on backend `B`.
    pub fn resolve<B: Backend>(self, device: &B::Device) -> TopKMethod {
        match self {
            TopKMethod::Auto if B::name(device).contains("cubecl") => TopKMethod::Rank,
            TopKMethod::Auto => TopKMethod::Sort,
            other => other,
        }
    }
}

impl std::str::FromStr for TopKMethod {
    type Err = crate::Error;

    fn from_str(s: &str) -> crate::Result<Self> {
        match s {
            "auto" => Ok(TopKMethod::Auto),
            "sort" => Ok(TopKMethod::Sort),
            "rank" => Ok(TopKMethod::Rank),
            other => Err(crate::Error::InvalidSettings(format!(
                "unknown top-k method `{other}` (expected auto, sort or rank)"
            ))),
        }
    }
}

/// Shape-only constant tensors of [`top_k`], kept between calls (see the module docs).
///
/// Cloning shares the cache. It holds the tensors of one backend and device at a time and
/// starts over when asked for another, or when it has grown past a few dozen shapes (decoding
/// uses a handful). Thread-safe; a poisoned lock is recovered, as the cache holds no invariant
/// beyond "each entry matches its key".
#[derive(Clone, Default)]
pub struct TopKCache {
    tables: Arc<Mutex<Option<Box<dyn Any + Send>>>>,
}

impl std::fmt::Debug for TopKCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TopKCache")
    }
}

/// Most entries a [`TopKCache`] keeps before it starts over.
const MAX_CACHED_SHAPES: usize = 64;

/// The cached tensors of one backend and device.
struct Tables<B: Backend> {
    device: B::Device,
    /// `earlier[W][0, i, j] = j < i`, `[1, W, W]`.
    earlier: HashMap<usize, Tensor<B, 3, Bool>>,
    /// `0..W`, `[1, W]`.
    columns: HashMap<usize, Tensor<B, 2, Int>>,
    /// `(n, step)`: `[0, step, 2·step, …]`, `[n, 1]`.
    row_starts: HashMap<(usize, usize), Tensor<B, 2, Int>>,
}

impl<B: Backend> Tables<B> {
    fn new(device: &B::Device) -> Self {
        Self {
            device: device.clone(),
            earlier: HashMap::new(),
            columns: HashMap::new(),
            row_starts: HashMap::new(),
        }
    }

    fn len(&self) -> usize {
        self.earlier.len() + self.columns.len() + self.row_starts.len()
    }
}

impl TopKCache {
    /// Runs `f` on this cache's tables for backend `B` on `device`, replacing tables of another
    /// backend or device (or an overgrown set).
    fn with<B: Backend, R>(&self, device: &B::Device, f: impl FnOnce(&mut Tables<B>) -> R) -> R {
        let mut slot = self
            .tables
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let reusable = slot
            .as_mut()
            .and_then(|tables| tables.downcast_mut::<Tables<B>>())
            .is_some_and(|tables| tables.device == *device && tables.len() < MAX_CACHED_SHAPES);
        if !reusable {
            *slot = Some(Box::new(Tables::<B>::new(device)));
        }
        let tables = slot
            .as_mut()
            .and_then(|tables| tables.downcast_mut::<Tables<B>>())
            .expect("the slot was just filled with tables of this backend");
        f(tables)
    }

    /// `earlier[0, i, j] = j < i` for rows of width `width`. Burn's `triu_mask` is true strictly
    /// below the diagonal.
    ///
    /// # Shapes
    /// `[1, width, width]`
    fn earlier<B: Backend>(&self, width: usize, device: &B::Device) -> Tensor<B, 3, Bool> {
        self.with::<B, _>(device, |t| {
            t.earlier
                .entry(width)
                .or_insert_with(|| {
                    Tensor::<B, 2, Bool>::triu_mask([width, width], 0, device).unsqueeze_dim(0)
                })
                .clone()
        })
    }

    /// Column numbers `0..width`.
    ///
    /// # Shapes
    /// `[1, width]`
    fn columns<B: Backend>(&self, width: usize, device: &B::Device) -> Tensor<B, 2, Int> {
        self.with::<B, _>(device, |t| {
            t.columns
                .entry(width)
                .or_insert_with(|| {
                    Tensor::<B, 1, Int>::arange(0..width as i64, device).reshape([1, width])
                })
                .clone()
        })
    }

    /// The first flat index of each of `n` rows of `step` entries: `[0, step, 2·step, …]`.
    ///
    /// # Shapes
    /// `[n, 1]`
    pub(crate) fn row_starts<B: Backend>(
        &self,
        n: usize,
        step: usize,
        device: &B::Device,
    ) -> Tensor<B, 2, Int> {
        self.with::<B, _>(device, |t| {
            t.row_starts
                .entry((n, step))
                .or_insert_with(|| {
                    Tensor::<B, 1, Int>::arange_step(0..(n * step) as i64, step.max(1), device)
                        .reshape([n, 1])
                })
                .clone()
        })
    }
}

/// The `k` largest entries of each row and their column indices, sorted descending.
///
/// Builds its constant tensors afresh; repeated calls (a decoding loop) should use
/// [`top_k_cached`].
///
/// # Shapes
/// `[N, W]` to (`[N, k]`, `[N, k]`), `1 ≤ k ≤ W`
pub fn top_k<B: Backend>(
    values: Tensor<B, 2>,
    k: usize,
    method: TopKMethod,
) -> (Tensor<B, 2>, Tensor<B, 2, Int>) {
    top_k_cached(values, k, method, &TopKCache::default())
}

/// [`top_k`] with its constant tensors taken from (and kept in) `cache`.
///
/// # Shapes
/// `[N, W]` to (`[N, k]`, `[N, k]`), `1 ≤ k ≤ W`
pub fn top_k_cached<B: Backend>(
    values: Tensor<B, 2>,
    k: usize,
    method: TopKMethod,
    cache: &TopKCache,
) -> (Tensor<B, 2>, Tensor<B, 2, Int>) {
    let method = method.resolve::<B>(&values.device());
    if method == TopKMethod::Rank
        && let Some(selected) = crate::cube_kernels::top_k(&values, k)
    {
        // One launch on the GPUs, with rank selection's result.
        return selected;
    }
    let [rows, width] = values.dims();
    let select = |v: Tensor<B, 2>, k: usize| match method {
        TopKMethod::Rank => rank_select(v, k, cache),
        _ => sort_select(v, k),
    };
    let Some(size) = group_size(width, k, method) else {
        return select(values, k);
    };
    let groups = width / size;
    let device = values.device();
    // Row-major: group j of row i is row i·G + j.
    let grouped = values.reshape([rows * groups, size]);
    let maxima = grouped.clone().max_dim(1).reshape([rows, groups]);
    let (_, best) = select(maxima, k); // [N, k] group ids
    let offsets = cache
        .row_starts::<B>(rows, groups, &device)
        .cast(best.dtype());
    let candidates = grouped
        .select(0, (best.clone() + offsets).reshape([rows * k]))
        .reshape([rows, k * size]);
    let (sorted, position) = select(candidates, k);
    let group = best.gather(1, position.clone().div_scalar(size as i64));
    let index = group.mul_scalar(size as i64) + position.remainder_scalar(size as i64);
    (sorted, index)
}

/// Group size `S` for [`top_k`]: a divisor of `width` near `sqrt(width / k)`; `None` when
/// selecting over whole rows is cheaper.
fn group_size(width: usize, k: usize, method: TopKMethod) -> Option<usize> {
    let ideal = ((width / k.max(1)) as f64).sqrt().round().max(1.0) as usize;
    let size = (0..=ideal / 2)
        .flat_map(|d| [ideal + d, ideal.saturating_sub(d)])
        .find(|&s| s > 1 && width.is_multiple_of(s))?;
    let groups = width / size;
    if groups < k {
        return None;
    }
    let pays = match method {
        // Sorting is ~linear: grouping pays once both stages are well below the row.
        TopKMethod::Sort => groups + k * size <= width / 4,
        // Comparisons are quadratic in the selected width.
        _ => groups * groups + (k * size) * (k * size) < width * width / 4,
    };
    pays.then_some(size)
}

/// Whole-row sort, keeping the first `k`.
fn sort_select<B: Backend>(values: Tensor<B, 2>, k: usize) -> (Tensor<B, 2>, Tensor<B, 2, Int>) {
    let (sorted, index) = values.sort_descending_with_indices(1);
    (sorted.narrow(1, 0, k), index.narrow(1, 0, k))
}

/// Most comparisons [`rank_select`] materialises in one go (rows × W²). Beyond it rows are
/// processed in chunks: GPU kernels index with 32-bit integers, and the comparison tensors of,
/// say, 80 prompts × 32 beams × 1536² would not fit them (nor, comfortably, the memory).
const MAX_RANK_COMPARISONS: usize = 1 << 27;

/// Top-k by ranks: `rank(i) = #{j : v_j > v_i} + #{j < i : v_j = v_i}` is a permutation of
/// `0..W`, so scattering each column index to its rank orders the row. Element-wise work only.
///
/// # Shapes
/// `[N, W]` to (`[N, k]`, `[N, k]`)
fn rank_select<B: Backend>(
    values: Tensor<B, 2>,
    k: usize,
    cache: &TopKCache,
) -> (Tensor<B, 2>, Tensor<B, 2, Int>) {
    rank_select_chunked(values, k, MAX_RANK_COMPARISONS, cache)
}

/// [`rank_select`] with at most `max_comparisons` comparisons per chunk of rows.
fn rank_select_chunked<B: Backend>(
    values: Tensor<B, 2>,
    k: usize,
    max_comparisons: usize,
    cache: &TopKCache,
) -> (Tensor<B, 2>, Tensor<B, 2, Int>) {
    let [rows, width] = values.dims();
    let chunk = (max_comparisons / (width * width).max(1)).max(1);
    if rows <= chunk {
        return rank_select_rows(values, k, cache);
    }
    let (sorted, index): (Vec<_>, Vec<_>) = (0..rows)
        .step_by(chunk)
        .map(|start| {
            let part = values.clone().narrow(0, start, chunk.min(rows - start));
            rank_select_rows(part, k, cache)
        })
        .unzip();
    (Tensor::cat(sorted, 0), Tensor::cat(index, 0))
}

/// [`rank_select`] on all rows at once.
fn rank_select_rows<B: Backend>(
    values: Tensor<B, 2>,
    k: usize,
    cache: &TopKCache,
) -> (Tensor<B, 2>, Tensor<B, 2, Int>) {
    let [rows, width] = values.dims();
    let device = values.device();
    let own = values.clone().unsqueeze_dim::<3>(2); // [N, W, 1]: v_i
    let other = values.clone().unsqueeze_dim::<3>(1); // [N, 1, W]: v_j
    let beats = other.clone().greater(own.clone()).bool_or(
        other
            .equal(own)
            .bool_and(cache.earlier::<B>(width, &device)),
    );
    // A count over the W - 1 other columns (the diagonal never beats itself): in 0..W even when
    // NaNs (which compare false) make ranks repeat.
    let rank = beats.int().sum_dim(2).reshape([rows, width]);
    let columns = cache
        .columns::<B>(width, &device)
        .cast(rank.dtype())
        .expand([rows, width]);
    let order = Tensor::<B, 2, Int>::zeros([rows, width], (&device, rank.dtype())).scatter(
        1,
        rank,
        columns,
        IndexingUpdateOp::Add,
    );
    // Repeated ranks (NaNs) add several columns into one slot: keep the index in bounds.
    let index = order.narrow(1, 0, k).clamp(0, width as i64 - 1);
    (values.gather(1, index.clone()), index)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::TensorData;

    type B = crate::backend::Cpu;

    fn floats(t: Tensor<B, 2>) -> Vec<f32> {
        t.into_data().convert::<f32>().to_vec().unwrap()
    }

    fn ints(t: Tensor<B, 2, Int>) -> Vec<i64> {
        t.into_data().convert::<i64>().to_vec().unwrap()
    }

    fn reference(row: &[f32], k: usize) -> Vec<(f32, usize)> {
        let mut pairs: Vec<(f32, usize)> = row.iter().copied().zip(0..).collect();
        pairs.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        pairs.truncate(k);
        pairs
    }

    fn check(rows: usize, width: usize, k: usize, method: TopKMethod, seed: u64) {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        // Distinct values (ties are covered separately).
        let data: Vec<f32> = (0..rows * width)
            .map(|i| rng.random::<f32>() * 100.0 + i as f32 * 1e-3)
            .collect();
        let device = Default::default();
        let t = Tensor::<B, 2>::from_data(TensorData::new(data.clone(), [rows, width]), &device);
        let (v, i) = top_k(t, k, method);
        let (v, i) = (floats(v), ints(i));
        for r in 0..rows {
            let want = reference(&data[r * width..(r + 1) * width], k);
            for (c, (wv, wi)) in want.into_iter().enumerate() {
                assert_eq!(i[r * k + c] as usize, wi, "{method:?} row {r} rank {c}");
                assert_eq!(v[r * k + c], wv);
            }
        }
    }

    #[test]
    fn both_methods_equal_a_full_sort() {
        for method in [TopKMethod::Sort, TopKMethod::Rank] {
            // Grouped (vocabulary-sized rows) and ungrouped shapes, k from 1 to 64.
            check(3, 4096, 50, method, 1);
            check(2, 49152, 50, method, 2);
            check(4, 64, 64, method, 3);
            check(5, 7, 1, method, 4);
            check(1, 256, 16, method, 5);
        }
    }

    #[test]
    fn rank_selection_in_row_chunks_equals_whole() {
        // Room for 3 rows of width 64 per chunk: 10 rows go in chunks of 3, 3, 3, 1.
        let device = Default::default();
        let values = Tensor::<B, 2>::random([10, 64], burn::tensor::Distribution::Default, &device);
        let (v, i) = rank_select_chunked(values.clone(), 5, 3 * 64 * 64, &TopKCache::default());
        let (sorted, index) = values.sort_descending_with_indices(1);
        assert_eq!(ints(i), ints(index.narrow(1, 0, 5)));
        assert_eq!(floats(v), floats(sorted.narrow(1, 0, 5)));
    }

    #[test]
    fn a_shared_cache_gives_the_results_of_fresh_constants() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let device = Default::default();
        let cache = TopKCache::default();
        // Shapes revisited in another order, with other row counts: cached masks, columns and
        // row offsets must serve every one of them.
        for &(rows, width, k) in &[(1, 4096, 50), (4, 4096, 50), (4, 16, 4), (1, 4096, 50)] {
            let data: Vec<f32> = (0..rows * width)
                .map(|_| (rng.random::<f32>() * 8.0).round())
                .collect();
            let t = Tensor::<B, 2>::from_data(TensorData::new(data, [rows, width]), &device);
            let (v, i) = top_k_cached(t.clone(), k, TopKMethod::Rank, &cache);
            let (fresh_v, fresh_i) = top_k(t, k, TopKMethod::Rank);
            assert_eq!(ints(i), ints(fresh_i), "rows {rows} width {width}");
            assert_eq!(floats(v), floats(fresh_v));
        }
    }

    #[test]
    fn rank_breaks_ties_by_column() {
        let device = Default::default();
        let t = Tensor::<B, 2>::from_data([[1.0, 3.0, 3.0, 2.0, 3.0]], &device);
        let (v, i) = top_k(t, 4, TopKMethod::Rank);
        assert_eq!(ints(i), vec![1, 2, 4, 3]);
        assert_eq!(floats(v), vec![3.0, 3.0, 3.0, 2.0]);
    }
}
