//! A pre-allocated key/value cache with per-row lengths, speculative append and commit.
//!
//! The cache stores keys and values of all layers in one tensor each,
//! `[layers, batch, kv_heads, slots ≥ capacity, head_dim]`, so that committing a round moves the
//! accepted slots of every layer at once: in one kernel launch for the whole batch on the CubeCL
//! backends (`cube_kernels::move_kv_slots`), elsewhere with a gather and a region write of keys
//! and of values per row that moves.
//! Slot order is not position order: positions are applied (RoPE) before keys are cached, so a
//! row's committed slots `0..len` can hold tokens at any positions. A forward pass appends a
//! *pending block* of `T` slots at `used()..used()+T` (the same slots for every row); afterwards
//! [`KvCache::commit`] keeps a chosen subset of that block per row, moving the kept slots to sit
//! right after the row's committed prefix, and discards the rest by resetting the length. Nothing
//! else is copied, so a speculative round costs `O(accepted)` cache traffic, not `O(cache)`.

use burn::tensor::{Tensor, TensorData, backend::Backend};

use crate::cube_kernels::{SlotMove, SlotMoves};
use crate::error::{Error, Result};
use crate::flex_write;
use crate::generate::int_tensor;

/// Additive attention bias value for masked-out entries. Large and finite, so that a fully masked
/// (padding) row softmaxes to a uniform distribution instead of NaN.
pub const MASKED: f32 = -1.0e9;

/// The storage's slots per row are a multiple of this, so that every layer's block starts on a
/// 512-byte boundary (for head dimensions of 8 or more elements of 2 bytes or more): the visible
/// slots of a layer are then a view of the storage, not a copy, on CUDA (see
/// `cube_kernels::view`).
const STORAGE_SLOT_MULTIPLE: usize = 64;

/// What [`KvCache::append_written`] returns: its writer's result, and the keys and values of the
/// visible slots.
pub type Appended<B, T> = (T, Tensor<B, 4>, Tensor<B, 4>);

/// Per-layer key/value storage for a batch of sequences.
#[derive(Debug)]
pub struct KvCache<B: Backend> {
    keys: Option<Tensor<B, 5>>,
    values: Option<Tensor<B, 5>>,
    num_layers: usize,
    lengths: Vec<usize>,
    pending: usize,
    capacity: usize,
    /// Slots allocated per row: `capacity` rounded up to [`STORAGE_SLOT_MULTIPLE`].
    storage_slots: usize,
    kv_heads: usize,
    head_dim: usize,
}

impl<B: Backend> KvCache<B> {
    /// Allocates an empty cache.
    ///
    /// # Shapes
    /// Keys and values of `[num_layers, batch, kv_heads, slots, head_dim]`, `slots` being
    /// `capacity` rounded up to a multiple of 64 (so that every layer's block starts aligned for
    /// the GPU views of `append`); only the first `capacity` are ever used.
    pub fn new(
        num_layers: usize,
        batch: usize,
        kv_heads: usize,
        head_dim: usize,
        capacity: usize,
        device: &B::Device,
    ) -> Self {
        let storage_slots = capacity.next_multiple_of(STORAGE_SLOT_MULTIPLE);
        let make = || {
            Some(Tensor::<B, 5>::zeros(
                [num_layers, batch, kv_heads, storage_slots, head_dim],
                device,
            ))
        };
        Self {
            keys: make(),
            values: make(),
            num_layers,
            lengths: vec![0; batch],
            pending: 0,
            capacity,
            storage_slots,
            kv_heads,
            head_dim,
        }
    }

    /// Converts the storage to another float type (e.g. `F16` for a half-precision model).
    pub fn cast(mut self, dtype: burn::tensor::DType) -> Self {
        for slot in [&mut self.keys, &mut self.values] {
            *slot = slot.take().map(|t| t.cast(dtype));
        }
        self
    }

    /// The storage's float type (F32 for a cache that holds no storage).
    pub fn dtype(&self) -> burn::tensor::DType {
        self.keys
            .as_ref()
            .map_or(burn::tensor::DType::F32, |keys| keys.dtype())
    }

    /// Number of sequences.
    pub fn batch_size(&self) -> usize {
        self.lengths.len()
    }

    /// Total slots per row.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Committed length of each row.
    pub fn lengths(&self) -> &[usize] {
        &self.lengths
    }

    /// The first slot of the next pending block: the longest committed row.
    pub fn used(&self) -> usize {
        self.lengths.iter().copied().max().unwrap_or(0)
    }

    /// Slots of the block appended since the last commit/rollback.
    pub fn pending(&self) -> usize {
        self.pending
    }

    /// Number of layers.
    pub fn num_layers(&self) -> usize {
        self.num_layers
    }

    /// Slots still free after the committed prefix of the longest row.
    pub fn remaining(&self) -> usize {
        self.capacity - self.used()
    }

    /// Fails unless a block of `block_len` slots fits after the committed prefix.
    pub fn ensure_room(&self, block_len: usize) -> Result<()> {
        let required = self.used() + block_len;
        if required > self.capacity {
            return Err(Error::ContextOverflow {
                prompt_len: self.used(),
                required,
                max_context: self.capacity,
            });
        }
        Ok(())
    }

    /// Writes one layer's keys and values for the pending block and returns the keys and values
    /// of all slots up to the end of the block. Called by models once per layer and forward; every
    /// layer of one forward must append the same number of slots.
    ///
    /// # Shapes
    /// - `keys`, `values`: `[batch, kv_heads, T, head_dim]`
    /// - returns two tensors of `[batch, kv_heads, used() + T, head_dim]`
    pub fn append(
        &mut self,
        layer: usize,
        keys: Tensor<B, 4>,
        values: Tensor<B, 4>,
    ) -> Result<(Tensor<B, 4>, Tensor<B, 4>)> {
        let [batch, heads, block, dim] = keys.dims();
        if batch != self.batch_size() || heads != self.kv_heads || dim != self.head_dim {
            return Err(Error::InvalidConfig(format!(
                "cache holds [{}, {}, _, {}] but layer {layer} appends [{batch}, {heads}, {block}, {dim}]",
                self.batch_size(),
                self.kv_heads,
                self.head_dim
            )));
        }
        self.check_block(layer, block)?;
        let start = self.used();
        let end = start + block;
        // Take the tensors out so that the write happens on a uniquely owned buffer (in place)
        // rather than on a shared one (which would copy the whole cache).
        let region = [layer..layer + 1, 0..batch, 0..heads, start..end, 0..dim];
        let cached_k = self.keys.take().expect("cache storage present");
        let cached_v = self.values.take().expect("cache storage present");
        let cached_k = flex_write::slice_assign(cached_k, region.clone(), keys.unsqueeze_dim(0))?;
        let cached_v = flex_write::slice_assign(cached_v, region, values.unsqueeze_dim(0))?;
        self.keys = Some(cached_k);
        self.values = Some(cached_v);
        let (visible_k, visible_v) = self.visible(layer, end);
        if layer == 0 {
            self.pending = block;
        }
        Ok((visible_k, visible_v))
    }

    /// [`KvCache::append`] for a kernel that writes the block's keys and values into the storage
    /// itself (saving the cache's two writes per layer): `write(keys, values, start)` gets the
    /// storage `[num_layers, batch, kv_heads, slots, head_dim]` and the block's first slot, writes
    /// layer `layer`'s slots `start..start + block` in place and returns what it computed besides,
    /// or `None` if it wrote nothing. Returns that, and the keys and values of all slots up to the
    /// end of the block as `append` does; `Ok(None)` when `write` declined (append the usual way).
    ///
    /// # Shapes
    /// returns two tensors of `[batch, kv_heads, used() + block, head_dim]` besides `write`'s
    pub fn append_written<T>(
        &mut self,
        layer: usize,
        block: usize,
        write: impl FnOnce(&Tensor<B, 5>, &Tensor<B, 5>, usize) -> Option<T>,
    ) -> Result<Option<Appended<B, T>>> {
        self.check_block(layer, block)?;
        let start = self.used();
        let keys = self.keys.as_ref().expect("cache storage present");
        let values = self.values.as_ref().expect("cache storage present");
        let Some(computed) = write(keys, values, start) else {
            return Ok(None);
        };
        let (visible_k, visible_v) = self.visible(layer, start + block);
        if layer == 0 {
            self.pending = block;
        }
        Ok(Some((computed, visible_k, visible_v)))
    }

    /// Fails unless `layer` exists and a block of `block` slots fits.
    fn check_block(&self, layer: usize, block: usize) -> Result<()> {
        if layer >= self.num_layers {
            return Err(Error::InvalidConfig(format!(
                "layer {layer} out of range for a cache of {} layers",
                self.num_layers
            )));
        }
        self.ensure_room(block)
    }

    /// Layer `layer`'s keys and values of slots `0..end`: a view of the storage on the CubeCL
    /// backends, a copy elsewhere.
    fn visible(&self, layer: usize, end: usize) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let visible = [
            layer..layer + 1,
            0..self.batch_size(),
            0..self.kv_heads,
            0..end,
            0..self.head_dim,
        ];
        // Views of the storage on the GPUs and on Flex (no copy), else Burn's slice and squeeze.
        // They must be dropped before the next append, whose write would otherwise find the
        // storage shared and copy it whole; the layers drop them when their attention returns.
        let visible_of = |cache: &Tensor<B, 5>| {
            crate::cube_kernels::view::<B, 5, 4>(cache, visible.clone())
                .or_else(|| flex_view(cache, visible.clone()))
                .unwrap_or_else(|| cache.clone().slice(visible.clone()).squeeze_dim::<4>(0))
        };
        (
            visible_of(self.keys.as_ref().expect("cache storage present")),
            visible_of(self.values.as_ref().expect("cache storage present")),
        )
    }

    /// Keeps, for each row, the listed slots of the pending block (indices relative to the block
    /// start, in the order they should be stored) and discards the rest of the block.
    pub fn commit(&mut self, keep: &[Vec<usize>]) -> Result<()> {
        if keep.len() != self.batch_size() {
            return Err(Error::InvalidConfig(format!(
                "commit got {} rows for a batch of {}",
                keep.len(),
                self.batch_size()
            )));
        }
        let block_start = self.used();
        // Every row is checked before anything moves, so a failed commit changes nothing.
        let mut moves = Vec::new();
        for (row, kept) in keep.iter().enumerate() {
            if let Some(&bad) = kept.iter().find(|&&k| k >= self.pending) {
                return Err(Error::InvalidConfig(format!(
                    "commit keeps slot {bad} of a pending block of {}",
                    self.pending
                )));
            }
            let dest = self.lengths[row];
            if dest + kept.len() > self.capacity {
                return Err(Error::ContextOverflow {
                    prompt_len: dest,
                    required: dest + kept.len(),
                    max_context: self.capacity,
                });
            }
            // Already in place (e.g. plain decoding of a full-length row): nothing to move.
            let in_place = kept
                .iter()
                .enumerate()
                .all(|(i, &k)| block_start + k == dest + i);
            if !kept.is_empty() && !in_place {
                moves.push(SlotMove {
                    row,
                    dest,
                    sources: kept.iter().map(|&k| block_start + k).collect(),
                });
            }
        }
        self.move_slots(&moves)?;
        for (length, kept) in self.lengths.iter_mut().zip(keep) {
            *length += kept.len();
        }
        self.pending = 0;
        Ok(())
    }

    /// Discards the pending block.
    pub fn rollback(&mut self) {
        self.pending = 0;
    }

    /// Keeps only the listed rows (in that order), e.g. to stop spending work on finished
    /// sequences. Copies the kept rows once.
    pub fn retain_rows(&mut self, rows: &[usize]) -> Result<()> {
        if let Some(&bad) = rows.iter().find(|&&r| r >= self.batch_size()) {
            return Err(Error::InvalidConfig(format!(
                "row {bad} out of range for a batch of {}",
                self.batch_size()
            )));
        }
        if rows.len() == self.batch_size() && rows.iter().enumerate().all(|(i, &r)| i == r) {
            return Ok(());
        }
        let device = self.keys.as_ref().expect("cache storage present").device();
        let index = int_tensor(
            rows.iter().map(|&r| r as i64).collect(),
            [rows.len()],
            &device,
        );
        for slot in [&mut self.keys, &mut self.values] {
            *slot = slot.take().map(|t| t.select(1, index.clone()));
        }
        self.lengths = rows.iter().map(|&r| self.lengths[r]).collect();
        Ok(())
    }

    /// Forgets everything (the memory stays allocated).
    pub fn reset(&mut self) {
        self.lengths.iter_mut().for_each(|l| *l = 0);
        self.pending = 0;
    }

    /// Moves each row's slots as `moves` lists them: in one launch where the CubeCL kernel
    /// applies, else row by row with Burn's ops.
    fn move_slots(&mut self, moves: &[SlotMove]) -> Result<()> {
        if moves.is_empty() {
            return Ok(());
        }
        let on_gpu = crate::cube_kernels::move_kv_slots(SlotMoves {
            keys: self.keys.as_ref().expect("cache storage present"),
            values: self.values.as_ref().expect("cache storage present"),
            moves,
        });
        if on_gpu.is_some() {
            return Ok(());
        }
        for SlotMove { row, dest, sources } in moves {
            self.move_row(*row, sources, *dest)?;
        }
        Ok(())
    }

    /// Moves one row's slots `sources` of every layer to slots `dest..`, with Burn's ops: an
    /// index upload, then for keys and for values a gather and a region write.
    fn move_row(&mut self, row: usize, sources: &[usize], dest: usize) -> Result<()> {
        let count = sources.len();
        let device = self.keys.as_ref().expect("cache storage present").device();
        let index = int_tensor(
            sources.iter().map(|&s| s as i64).collect(),
            [count],
            &device,
        );
        let (layers, heads, dim) = (self.num_layers, self.kv_heads, self.head_dim);
        for slot in [&mut self.keys, &mut self.values] {
            let cache = slot.take().expect("cache storage present");
            // The gathered rows are a new tensor, so the write below is on a uniquely owned
            // cache again (in place).
            let rows = cache
                .clone()
                .slice([
                    0..layers,
                    row..row + 1,
                    0..heads,
                    0..self.storage_slots,
                    0..dim,
                ])
                .select(3, index.clone());
            *slot = Some(flex_write::slice_assign(
                cache,
                [
                    0..layers,
                    row..row + 1,
                    0..heads,
                    dest..dest + count,
                    0..dim,
                ],
                rows,
            )?);
        }
        Ok(())
    }

    /// The additive attention bias for a pending block of `block_len` tokens.
    ///
    /// Row `b` sees its committed slots `0..lengths[b]`; inside the block, token `t` sees token
    /// `s` where `block_mask[b][t * block_len + s]` is true (`None` means causal). Padding slots
    /// between a short row's prefix and the block are masked.
    ///
    /// # Shapes
    /// returns `[batch, 1, block_len, used() + block_len]`
    pub fn attention_bias(
        &self,
        block_len: usize,
        block_mask: Option<&[Vec<bool>]>,
        device: &B::Device,
    ) -> Tensor<B, 4> {
        let used = self.used();
        let width = used + block_len;
        let batch = self.batch_size();
        let mut bias = vec![MASKED; batch * block_len * width];
        for b in 0..batch {
            for t in 0..block_len {
                let row = &mut bias[(b * block_len + t) * width..(b * block_len + t + 1) * width];
                row[..self.lengths[b]].iter_mut().for_each(|v| *v = 0.0);
                for s in 0..block_len {
                    let visible = match block_mask {
                        Some(mask) => mask[b][t * block_len + s],
                        None => s <= t,
                    };
                    if visible {
                        row[used + s] = 0.0;
                    }
                }
            }
        }
        // One contiguous row, reshaped, as `generate::int_tensor` uploads: a 4-D upload gets
        // padded rows on CUDA (the attention reads the bias through its strides either way).
        // Converted on the host to the cache's float type, which the attention adds it in: an
        // f16 model's forward then casts nothing (a launch a tree on the GPUs).
        let count = bias.len();
        Tensor::<B, 1>::from_data(TensorData::new(bias, [count]), (device, self.dtype()))
            .reshape([batch, 1, block_len, width])
    }

    /// Whether a block needs no bias at all: a single row with a causal block, where every
    /// context slot is visible (plain decoding and batch-1 prefill).
    pub fn bias_is_trivial(&self, block_mask: Option<&[Vec<bool>]>, block_len: usize) -> bool {
        block_mask.is_none() && self.batch_size() == 1 && block_len == 1
    }
}

/// The slice `region` (`[1, ...]`) of the storage as a 4-D view sharing its buffer on Flex
/// ([`crate::flex_tensor::squeeze_leading`]); `None` elsewhere, with nothing sliced.
fn flex_view<B: Backend>(
    storage: &Tensor<B, 5>,
    region: [std::ops::Range<usize>; 5],
) -> Option<Tensor<B, 4>> {
    #[cfg(feature = "flex")]
    if crate::flex_tensor::is_flex::<B>() {
        return crate::flex_tensor::squeeze_leading::<B, 5, 4>(storage.clone().slice(region));
    }
    let _ = (storage, region);
    None
}

#[cfg(all(test, feature = "flex"))]
mod tests {
    use super::*;
    use burn::backend::Flex;
    use burn::backend::flex::FlexTensor;
    use burn::tensor::{Distribution, TensorPrimitive};

    /// Address of the buffer behind a Flex tensor.
    fn buffer<const D: usize>(tensor: &Tensor<Flex, D>) -> *const u8 {
        let TensorPrimitive::Float(primitive) = tensor.clone().into_primitive() else {
            unreachable!("float tensor")
        };
        let primitive: FlexTensor = primitive;
        primitive.bytes().as_ptr()
    }

    /// The bias comes in the cache's float type (an f16 model's forward casts nothing), with
    /// the values of the f32 bias converted.
    #[test]
    fn the_attention_bias_is_in_the_caches_float_type() {
        use burn::tensor::DType;
        let device = Default::default();
        let cache = KvCache::<Flex>::new(2, 1, 2, 4, 16, &device);
        let mask = vec![vec![true, false, true, true]];
        let bias = cache.attention_bias(2, Some(&mask), &device);
        assert_eq!(bias.dtype(), DType::F32);
        let half = cache.cast(DType::F16);
        assert_eq!(half.dtype(), DType::F16);
        let half_bias = half.attention_bias(2, Some(&mask), &device);
        assert_eq!(half_bias.dtype(), DType::F16);
        assert_eq!(half_bias.dims(), bias.dims());
        assert_eq!(
            half_bias.into_data().convert::<f32>(),
            bias.cast(DType::F16).into_data().convert::<f32>()
        );
    }

    /// Appending and committing on the CPU must not copy the whole cache (Burn's Flex
    /// `slice_assign` does; `flex_write` avoids it), nor must reading its visible slots (Flex's
    /// `squeeze` of a strided slice does; `flex_tensor::squeeze_leading` avoids it).
    #[test]
    fn appends_and_commits_write_the_flex_cache_in_place() {
        let device = Default::default();
        let mut cache = KvCache::<Flex>::new(3, 1, 2, 4, 16, &device);
        let keys_at = buffer(cache.keys.as_ref().unwrap());
        let values_at = buffer(cache.values.as_ref().unwrap());
        for _round in 0..2 {
            for layer in 0..3 {
                let k = Tensor::<Flex, 4>::random([1, 2, 3, 4], Distribution::Default, &device);
                let (visible_k, visible_v) = cache.append(layer, k.clone(), k.clone()).unwrap();
                // The visible slots are views of the storage, not copies; dropped before the
                // next append, they leave its write in place.
                assert_eq!(buffer(&visible_k), keys_at);
                assert_eq!(buffer(&visible_v), values_at);
                let tail = visible_k.dims()[2];
                visible_k
                    .slice([0..1, 0..2, tail - 3..tail, 0..4])
                    .into_data()
                    .assert_eq(&k.into_data(), true);
                drop(visible_v);
            }
            cache.commit(&[vec![0, 2]]).unwrap();
            assert_eq!(buffer(cache.keys.as_ref().unwrap()), keys_at);
            assert_eq!(buffer(cache.values.as_ref().unwrap()), values_at);
        }
        assert_eq!(cache.lengths(), &[4]);
    }
}
