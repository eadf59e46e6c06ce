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

/// Reads integer tensor data as `i64` whatever the backend's int type.
pub(crate) fn ints(data: &TensorData) -> Vec<i64> {
    data.iter::<i64>().collect()
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
    let hidden = model.forward(&block, cache)?;
    let keep: Vec<Vec<usize>> = prompts.iter().map(|p| (0..p.len()).collect()).collect();
    cache.commit(&keep)?;
    let last: Vec<i64> = prompts
        .iter()
        .enumerate()
        .map(|(b, p)| (b * width + p.len() - 1) as i64)
        .collect();
    let hidden_size = hidden.dims()[2];
    Ok(hidden
        .reshape([batch * width, hidden_size])
        .select(0, int_tensor(last, [batch], &device)))
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
/// `on_tokens(row, tokens)` is called with each row's new tokens as soon as they are known.
pub fn generate<B: Backend, M: TargetModel<B>>(
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
        let tokens: Vec<i64> = next.iter().map(|&t| t as i64).collect();
        let positions: Vec<i64> = lengths.iter().map(|&l| l as i64).collect();
        let bias = (batch > 1).then(|| cache.attention_bias(1, None, &device));
        let block = Block {
            tokens: int_tensor(tokens, [batch, 1], &device),
            positions: int_tensor(positions, [batch, 1], &device),
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
    let device_argmax = |values: Tensor<B, 2>| {
        let ids = argmax_rows(values).into_data();
        ints(&ids).into_iter().map(|t| t as u32).collect()
    };
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
