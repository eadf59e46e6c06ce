//! Plain autoregressive generation (the baseline) and the pieces it shares with the speculative
//! decoder: settings, prompt validation, prefill and per-row output bookkeeping.

use std::time::Instant;

use burn::tensor::{Int, Tensor, TensorData, backend::Backend};
use rand::SeedableRng;
use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::kv_cache::KvCache;
use crate::sampling::{Sampling, argmax_rows, gumbel_perturbed, sample_logits};
use crate::stats::Stats;
use crate::target::{Block, TargetModel};

/// Settings shared by plain and speculative generation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerationConfig {
    /// Stop after this many new tokens per row.
    pub max_new_tokens: usize,
    /// A row stops after emitting any of these (the stop token is part of the output).
    pub stop_tokens: Vec<u32>,
    /// Greedy or sampled decoding.
    pub sampling: Sampling,
    /// Seed for every random choice. Sampling on the device draws from the backend's
    /// process-wide generator, which each generation reseeds with this value: a run is
    /// reproducible as long as no other thread draws random numbers from the same backend
    /// meanwhile.
    pub seed: u64,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        Self {
            max_new_tokens: 256,
            stop_tokens: Vec::new(),
            sampling: Sampling::greedy(),
            seed: 0,
        }
    }
}

impl GenerationConfig {
    /// Sets `max_new_tokens`.
    pub fn with_max_new_tokens(mut self, n: usize) -> Self {
        self.max_new_tokens = n;
        self
    }
    /// Sets the stop tokens.
    pub fn with_stop_tokens(mut self, stop: impl Into<Vec<u32>>) -> Self {
        self.stop_tokens = stop.into();
        self
    }
    /// Sets the sampling mode.
    pub fn with_sampling(mut self, sampling: Sampling) -> Self {
        self.sampling = sampling;
        self
    }
    /// Sets the seed.
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }
}

/// Generated tokens per prompt (without the prompt) and statistics.
#[derive(Debug, Clone)]
pub struct GenerationOutput {
    pub tokens: Vec<Vec<u32>>,
    pub stats: Stats,
}

/// Checks prompts against the vocabulary and the context window.
///
/// `reserve` is the number of positions needed beyond `prompt + max_new_tokens` (a speculative
/// round may run up to a beam length past the last emitted token).
pub(crate) fn validate_prompts(
    prompts: &[Vec<u32>],
    vocab_size: usize,
    max_context: usize,
    max_new_tokens: usize,
    reserve: usize,
) -> Result<()> {
    if prompts.is_empty() {
        return Err(Error::EmptyInput("no prompts given".into()));
    }
    for prompt in prompts {
        if prompt.is_empty() {
            return Err(Error::EmptyInput("a prompt has no tokens".into()));
        }
        if let Some(&token) = prompt.iter().find(|&&t| t as usize >= vocab_size) {
            return Err(Error::TokenOutOfRange { token, vocab_size });
        }
        let required = prompt.len() + max_new_tokens + reserve;
        if required > max_context {
            return Err(Error::ContextOverflow {
                prompt_len: prompt.len(),
                required,
                max_context,
            });
        }
    }
    Ok(())
}

/// Builds an integer tensor from host values.
///
/// Uploaded as one row and reshaped: on CUDA a tensor uploaded with several dimensions gets the
/// allocator's padded rows, and the first reshape of it (Burn's `select` flattens its indices)
/// then costs a copy launch — two a verification round for the tree's tokens and positions.
///
/// # Shapes
/// `values.len()` must equal the product of `shape`.
pub fn int_tensor<B: Backend, const D: usize>(
    values: Vec<i64>,
    shape: [usize; D],
    device: &B::Device,
) -> Tensor<B, D, Int> {
    let count = values.len();
    Tensor::<B, 1, Int>::from_data(TensorData::new(values, [count]), device).reshape(shape)
}

/// Integer tensors for one step gathered on the host and uploaded together ([`Self::upload`]):
/// each upload is a task for CubeCL's runner thread, which is what a step's time goes to on a
/// small model (docs/benchmarks.md, session 28), and a verification round needs four (lookup
/// guesses, tree tokens, positions, unpacker).
#[derive(Debug, Default)]
pub(crate) struct IntUpload {
    values: Vec<i64>,
    /// Each segment's range in `values`.
    segments: Vec<std::ops::Range<usize>>,
}

/// Segments start this many bytes apart at least: CUDA's allocation alignment (512 bytes; WGPU
/// asks for 256), where a view of the buffer may start without a copy.
const SEGMENT_ALIGNMENT_BYTES: usize = 512;

impl IntUpload {
    /// Appends a segment of values; returns its index for [`IntSegments::get`].
    pub(crate) fn push(&mut self, values: impl IntoIterator<Item = i64>) -> usize {
        let start = self.values.len();
        self.values.extend(values);
        self.segments.push(start..self.values.len());
        self.segments.len() - 1
    }

    /// Uploads every segment in one buffer, each starting on the allocation alignment (zeros in
    /// between), so that on the CubeCL backends each is a view of the buffer rather than a copy.
    pub(crate) fn upload<B: Backend>(self, device: &B::Device) -> IntSegments<B> {
        let int_size = <B::IntElem as burn::tensor::Element>::dtype().size().max(1);
        let stride = (SEGMENT_ALIGNMENT_BYTES / int_size).max(1);
        let mut padded = Vec::new();
        let mut segments = Vec::with_capacity(self.segments.len());
        for range in self.segments {
            let start = padded.len().next_multiple_of(stride);
            padded.resize(start, 0);
            padded.extend_from_slice(&self.values[range.clone()]);
            segments.push(start..start + range.len());
        }
        let count = padded.len();
        IntSegments {
            buffer: Tensor::from_data(TensorData::new(padded, [count]), device),
            segments,
        }
    }
}

/// The tensors of one [`IntUpload`], in one device buffer.
pub(crate) struct IntSegments<B: Backend> {
    buffer: Tensor<B, 1, Int>,
    segments: Vec<std::ops::Range<usize>>,
}

impl<B: Backend> IntSegments<B> {
    /// The segments with every stand-in `-1 - i` replaced by element `i` of `drafted`
    /// `[live, M, C]` (row-major numbering): the drafted tokens of an overlapped round, which the
    /// host uploaded before it knew them (`DraftTiming::Overlapped`). One launch on the CubeCL
    /// backends.
    pub(crate) fn resolve_drafted(self, drafted: &Tensor<B, 3, Int>) -> Self {
        let buffer =
            crate::cube_kernels::resolve_drafted(&self.buffer, drafted).unwrap_or_else(|| {
                let count = drafted.dims().iter().product::<usize>();
                let stand_in = self.buffer.clone().lower_elem(0);
                // Kept values index element 0, which every beam has; the mask drops them.
                let index = self.buffer.clone().neg().sub_scalar(1).clamp_min(0);
                let tokens = drafted.clone().reshape([count]).select(0, index);
                self.buffer.mask_where(stand_in, tokens)
            });
        Self {
            buffer,
            segments: self.segments,
        }
    }

    /// Segment `index` as a tensor of `shape`: a view of the buffer on the CubeCL backends,
    /// Burn's `slice` elsewhere.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] if `index` names no segment or `shape` does not hold its values.
    pub(crate) fn get<const D: usize>(
        &self,
        index: usize,
        shape: [usize; D],
    ) -> Result<Tensor<B, D, Int>> {
        let range = self.segments.get(index).cloned().unwrap_or(0..0);
        if index >= self.segments.len() || shape.iter().product::<usize>() != range.len() {
            return Err(Error::ShapeMismatch {
                tensor: format!("uploaded integer segment {index}"),
                expected: vec![range.len()],
                found: shape.to_vec(),
            });
        }
        let flat = crate::cube_kernels::view_int::<B, 1, 1>(&self.buffer, [range.clone()])
            .unwrap_or_else(|| self.buffer.clone().slice(range));
        Ok(flat.reshape(shape))
    }
}

/// Reads integer tensor data as `i64` whatever the backend's int type.
pub(crate) fn ints(data: &TensorData) -> Vec<i64> {
    data.iter::<i64>().collect()
}

/// Reads token ids (integer tensor data) as `u32` whatever the backend's int type.
pub(crate) fn token_ids(data: &TensorData) -> Vec<u32> {
    data.iter::<i64>().map(|t| t as u32).collect()
}

/// Runs right-padded prompts through the target, commits them to the cache and returns the
/// final-norm hidden state at each row's last prompt token.
///
/// # Shapes
/// `cache`: batch `prompts.len()`; returns `[batch, hidden]`
///
/// # Errors
/// [`Error::EmptyInput`], [`Error::TokenOutOfRange`] or [`Error::ContextOverflow`] for bad
/// prompts; the target's errors (e.g. a cache without room).
pub fn prefill<B: Backend, M: TargetModel<B>>(
    model: &M,
    cache: &mut KvCache<B>,
    prompts: &[Vec<u32>],
) -> Result<Tensor<B, 2>> {
    Ok(prefill_tapped(model, cache, prompts, &[])?.0)
}

/// [`prefill`] that also returns the draft head's features at each row's last prompt token: the
/// final-norm hidden state followed by the outputs of the layers `taps`
/// ([`TargetModel::forward_tapped`]), side by side.
///
/// # Shapes
/// returns `[batch, hidden]` and `[batch, hidden · (1 + taps)]`
///
/// # Errors
/// Those of [`prefill`], and the target's for taps it does not expose.
pub fn prefill_tapped<B: Backend, M: TargetModel<B>>(
    model: &M,
    cache: &mut KvCache<B>,
    prompts: &[Vec<u32>],
    taps: &[usize],
) -> Result<(Tensor<B, 2>, Tensor<B, 2>)> {
    validate_prompts(prompts, model.vocab_size(), model.max_context(), 0, 0)?;
    let device = model.device();
    let batch = prompts.len();
    let width = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let mut tokens = vec![0i64; batch * width];
    let mut positions = vec![0i64; batch * width];
    let mut masks = Vec::with_capacity(batch);
    for (b, prompt) in prompts.iter().enumerate() {
        let mut mask = vec![false; width * width];
        for t in 0..width {
            if t < prompt.len() {
                tokens[b * width + t] = prompt[t] as i64;
                positions[b * width + t] = t as i64;
                for s in 0..=t {
                    mask[t * width + s] = true;
                }
            } else {
                // Padding attends to itself only, so its softmax stays finite.
                mask[t * width + t] = true;
            }
        }
        masks.push(mask);
    }
    let bias = if batch == 1 && width == 1 {
        None
    } else {
        Some(cache.attention_bias(width, Some(&masks), &device))
    };
    let block = Block {
        tokens: int_tensor(tokens, [batch, width], &device),
        positions: int_tensor(positions, [batch, width], &device),
        bias,
    };
    let (hidden, tapped) = model.forward_tapped(&block, cache, taps)?;
    let keep: Vec<Vec<usize>> = prompts.iter().map(|p| (0..p.len()).collect()).collect();
    cache.commit(&keep)?;
    let last: Vec<i64> = prompts
        .iter()
        .enumerate()
        .map(|(b, p)| (b * width + p.len() - 1) as i64)
        .collect();
    let last = int_tensor(last, [batch], &device);
    let at_last = |states: Tensor<B, 3>| {
        let size = states.dims()[2];
        states
            .reshape([batch * width, size])
            .select(0, last.clone())
    };
    let hidden = at_last(hidden);
    let features = if tapped.is_empty() {
        hidden.clone()
    } else {
        let mut parts = vec![hidden.clone()];
        parts.extend(tapped.into_iter().map(at_last));
        Tensor::cat(parts, 1)
    };
    Ok((hidden, features))
}

/// Output bookkeeping for one row: appends tokens until a stop token or the length limit.
#[derive(Debug, Clone, Default)]
pub(crate) struct RowOutput {
    pub tokens: Vec<u32>,
    pub done: bool,
}

impl RowOutput {
    /// Appends as many of `new` as allowed and returns how many were taken.
    pub fn push(&mut self, new: &[u32], config: &GenerationConfig) -> usize {
        let mut taken = 0;
        for &token in new {
            if self.done {
                break;
            }
            self.tokens.push(token);
            taken += 1;
            if config.stop_tokens.contains(&token) || self.tokens.len() >= config.max_new_tokens {
                self.done = true;
            }
        }
        if config.max_new_tokens == 0 {
            self.done = true;
        }
        taken
    }
}

/// Plain autoregressive decoding: one target forward and at most one readback per token.
///
/// `on_tokens(row, tokens)` is called with each row's new tokens as soon as they are known. On
/// the CPU (Flex) the loop, `on_tokens` included, runs on a worker thread of rayon's global pool
/// while the calling thread waits, as [`SpeculativeDecoder::generate`](crate::SpeculativeDecoder::generate)'s does.
pub fn generate<B: Backend, M: TargetModel<B> + Sync>(
    model: &M,
    prompts: &[Vec<u32>],
    config: &GenerationConfig,
    on_tokens: impl FnMut(usize, &[u32]) + Send,
) -> Result<GenerationOutput> {
    crate::cpu_workers::on_cpu_workers::<B, _>(|| generate_here(model, prompts, config, on_tokens))
}

/// [`generate`] on the calling thread.
fn generate_here<B: Backend, M: TargetModel<B>>(
    model: &M,
    prompts: &[Vec<u32>],
    config: &GenerationConfig,
    mut on_tokens: impl FnMut(usize, &[u32]),
) -> Result<GenerationOutput> {
    config.sampling.validate()?;
    validate_prompts(
        prompts,
        model.vocab_size(),
        model.max_context(),
        config.max_new_tokens,
        0,
    )?;
    let start = Instant::now();
    let device = model.device();
    let batch = prompts.len();
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let mut cache = model.new_cache(batch, longest + config.max_new_tokens + 1);
    let mut rng = StdRng::seed_from_u64(config.seed);
    if !config.sampling.is_greedy() {
        // Temperature sampling draws its Gumbel noise from the backend's generator.
        B::seed(&device, config.seed);
    }
    let mut stats = Stats::default();
    let mut rows = vec![RowOutput::default(); batch];
    if config.max_new_tokens == 0 {
        return Ok(GenerationOutput {
            tokens: vec![Vec::new(); batch],
            stats,
        });
    }

    let mut hidden = prefill(model, &mut cache, prompts)?;
    let mut lengths: Vec<usize> = prompts.iter().map(Vec::len).collect();
    let mut first = true;
    loop {
        let logits = model
            .logits(hidden.unsqueeze_dim::<3>(1))
            .squeeze_dim::<2>(1);
        let next = select_tokens(logits, &config.sampling, &mut rng);
        stats.syncs += 1;
        if first {
            stats.prefill_time = start.elapsed();
            first = false;
        } else {
            stats.target_forwards += 1;
            stats.row_rounds += rows.iter().filter(|r| !r.done).count();
            stats.forward_tokens += rows.iter().filter(|r| !r.done).count();
        }
        for (b, row) in rows.iter_mut().enumerate() {
            if !row.done && row.push(&next[b..b + 1], config) == 1 {
                stats.new_tokens += 1;
                on_tokens(b, &next[b..b + 1]);
            }
        }
        if rows.iter().all(|r| r.done) {
            break;
        }
        // Finished rows keep decoding a pad token; their output is frozen.
        // Tokens and positions in one upload.
        let mut upload = IntUpload::default();
        let tokens = upload.push(next.iter().map(|&t| i64::from(t)));
        let positions = upload.push(lengths.iter().map(|&l| l as i64));
        let uploaded = upload.upload::<B>(&device);
        let bias = (batch > 1).then(|| cache.attention_bias(1, None, &device));
        let block = Block {
            tokens: uploaded.get(tokens, [batch, 1])?,
            positions: uploaded.get(positions, [batch, 1])?,
            bias,
        };
        hidden = model.forward(&block, &mut cache)?.squeeze_dim::<2>(1);
        cache.commit(&vec![vec![0]; batch])?;
        lengths.iter_mut().for_each(|l| *l += 1);
    }
    stats.total_time = start.elapsed();
    Ok(GenerationOutput {
        tokens: rows.into_iter().map(|r| r.tokens).collect(),
        stats,
    })
}

/// Picks one token per row with one small readback of indices: the argmax on the device when
/// greedy, the argmax of Gumbel-perturbed logits when sampling at a temperature (an exact draw,
/// from the backend's generator that [`generate`] seeds). With `top_k` or `top_p` it reads the
/// logit rows back and samples on the host with the seeded generator.
fn select_tokens<B: Backend>(
    logits: Tensor<B, 2>,
    sampling: &Sampling,
    rng: &mut StdRng,
) -> Vec<u32> {
    let [batch, vocab] = logits.dims();
    let device_argmax = |values: Tensor<B, 2>| token_ids(&argmax_rows(values).into_data());
    if sampling.is_greedy() {
        return device_argmax(logits);
    }
    if sampling.top_k.is_none() && sampling.top_p.is_none() {
        // Reading every row back and sampling on the host made batched data generation ~4.6x
        // slower than greedy on an H200 (docs/benchmarks.md, session 14).
        return device_argmax(gumbel_perturbed(logits, sampling.temperature));
    }
    let data: Vec<f32> = logits.into_data().iter::<f32>().collect();
    (0..batch)
        .map(|b| sample_logits(&data[b * vocab..(b + 1) * vocab], sampling, rng))
        .collect()
}

#[cfg(all(test, feature = "flex"))]
mod tests {
    use super::*;

    type B = burn::backend::Flex;

    #[test]
    fn one_upload_gives_each_segment_back_in_its_shape() {
        let device = Default::default();
        let mut upload = IntUpload::default();
        let tokens = upload.push([5, 6, 7, 8, 9, 10]);
        let empty = upload.push([]);
        let positions = upload.push((0..200).map(|p| p * 3));
        let uploaded = upload.upload::<B>(&device);
        let tokens = uploaded.get(tokens, [2, 3]).unwrap();
        assert_eq!(tokens.dims(), [2, 3]);
        assert_eq!(ints(&tokens.into_data()), vec![5, 6, 7, 8, 9, 10]);
        assert_eq!(uploaded.get(empty, [0]).unwrap().dims(), [0]);
        let positions = uploaded.get(positions, [1, 200]).unwrap();
        assert_eq!(
            ints(&positions.into_data()),
            (0..200).map(|p| p * 3).collect::<Vec<i64>>()
        );
    }

    #[test]
    fn a_segment_asked_for_in_the_wrong_shape_or_out_of_range_is_an_error() {
        let device = Default::default();
        let mut upload = IntUpload::default();
        let segment = upload.push([1, 2, 3]);
        let uploaded = upload.upload::<B>(&device);
        assert!(matches!(
            uploaded.get(segment, [2, 2]),
            Err(Error::ShapeMismatch { .. })
        ));
        assert!(matches!(
            uploaded.get(segment + 1, [3]),
            Err(Error::ShapeMismatch { .. })
        ));
    }
}
