//! The speculative decoder: recurrent beam drafting, dynamic tree attention, acceptance on the
//! device and KV commit, with one explicit host↔device readback per round.
//!
//! (The draft head's top-k avoids Burn's sort on GPU backends, which would read back to the host:
//! see [`crate::drafter::TopKMethod`].)
//!
//! # One round
//!
//! 1. The beams of this round were drafted at the end of the previous round and read back
//!    together with its acceptance result (the round's single readback) — or, with overlapped
//!    drafting ([`DraftTiming`]), the round queues their draft first, and the device drafts
//!    while the host does step 2 with stand-ins for the drafted tokens.
//! 2. With prompt lookup on ([`PromptLookup`]), the host first adds guesses copied from each
//!    row's text as extra beams. It packs each row's beams into a prefix tree ([`DraftTree`]) —
//!    microseconds — and uploads tokens, positions and the attention bias (overlapped: one
//!    launch then puts the drafted tokens in place of their stand-ins).
//! 3. The target verifies the packed tree in one forward against the KV cache.
//! 4. Still on the device: the target's verdict at every tree node (argmax, or one sample per
//!    node for exact sampling), each beam's accepted length, the best beam, the bonus token and
//!    the hidden state at the last accepted token; the draft head then proposes the next beams
//!    from that state — no host round-trip in between (sequential drafting; overlapped drafting
//!    leaves that to the next round's step 1, so the readback does not wait for the draft).
//! 5. One readback brings (best beam, accepted length, bonus, drafted beams); the host emits the
//!    tokens and commits the accepted path's KV slots.

use std::time::Instant;

use burn::tensor::{
    DType, Distribution, Int, Tensor, TensorData, Transaction, activation::softmax,
    backend::Backend,
};
use serde::{Deserialize, Serialize};

use crate::drafter::{DraftBeams, DraftHead, DraftRequest};
use crate::error::{Error, Result};
use crate::generate::{
    GenerationConfig, GenerationOutput, IntUpload, RowOutput, int_tensor, ints, prefill_tapped,
    token_ids, validate_prompts,
};
use crate::lookup::PromptLookup;
use crate::sampling::Sampling;
use crate::stats::Stats;
use crate::target::{Block, TargetModel};
use crate::tree::{BEAM_END, DraftTree, PackedBatch};

/// How drafted tokens are accepted.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum Acceptance {
    /// Lossless at temperature 0: output equals plain greedy decoding token for token.
    Greedy,
    /// Medusa-style typical acceptance (lossy): a drafted token `x` is accepted where
    /// `p(x) > min(epsilon, delta * exp(-H(p)))`.
    Typical { epsilon: f32, delta: f32 },
    /// Lossless sampling at temperature > 0: the tree is walked with one target sample per node,
    /// so every emitted token is exactly a sample of the target's distribution.
    Exact,
    /// The published rule (accept while `u < p/q` per beam, keep the best beam). Kept for
    /// comparison; **not** distribution-exact, because beam-search drafts are not samples of q.
    ReferenceParity,
}

impl Acceptance {
    /// Whether the rule accepts a drafted token by comparing it with the target's verdict at its
    /// parent (greedy and exact sampling) — what the device does in one kernel, and all it needs
    /// of the tree's tokens. The other rules read each node's token on the host.
    pub fn compares_tokens(self) -> bool {
        matches!(self, Acceptance::Greedy | Acceptance::Exact)
    }

    /// Typical acceptance with the usual Medusa constants (ε = 0.3, δ = 0.09).
    pub fn typical() -> Self {
        Acceptance::Typical {
            epsilon: 0.3,
            delta: 0.09,
        }
    }
}

impl std::str::FromStr for Acceptance {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "greedy" => Ok(Acceptance::Greedy),
            "typical" => Ok(Acceptance::typical()),
            "exact" => Ok(Acceptance::Exact),
            "reference" | "reference-parity" => Ok(Acceptance::ReferenceParity),
            other => Err(Error::InvalidSettings(format!(
                "unknown acceptance `{other}` (expected greedy, typical, exact or reference-parity)"
            ))),
        }
    }
}

/// When a round's beams are drafted.
///
/// A round verifies the beams drafted from the last accepted token. Drafting them right after
/// the acceptance that chose that token ([`Sequential`](Self::Sequential)) puts the draft's
/// device time between the acceptance and the round's readback: the host waits for it. Drafting
/// them at the start of the round that verifies them ([`Overlapped`](Self::Overlapped)) lets the
/// device draft while the host packs the tree and queues the verification, but the host then
/// packs the drafted beams without knowing their tokens (the round's readback brings them): the
/// tree cannot share their prefixes, nor extend them with prompt-lookup guesses.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum DraftTiming {
    /// [`Overlapped`](Self::Overlapped) where it pays — one drafted beam (nothing to share),
    /// greedy or exact acceptance, no [minimum draft
    /// probability](SpeculativeConfig::min_draft_probability), a backend that runs our CubeCL
    /// kernels (whose device works behind the host) — [`Sequential`](Self::Sequential)
    /// elsewhere.
    #[default]
    Auto,
    /// Drafted after the acceptance, read back with it.
    Sequential,
    /// Drafted at the start of the round that verifies them; needs greedy or exact acceptance
    /// (the other rules read the tree's tokens on the host).
    Overlapped,
}

impl std::str::FromStr for DraftTiming {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(DraftTiming::Auto),
            "sequential" => Ok(DraftTiming::Sequential),
            "overlapped" => Ok(DraftTiming::Overlapped),
            other => Err(Error::InvalidSettings(format!(
                "unknown draft timing `{other}` (expected auto, sequential or overlapped)"
            ))),
        }
    }
}

/// Settings of a speculative generation, built fluently:
///
/// ```
/// use redrafter::decoder::{Acceptance, SpeculativeConfig};
/// let config = SpeculativeConfig::default()
///     .beam_width(16)
///     .beam_length(5)
///     .acceptance(Acceptance::Exact)
///     .temperature(0.7)
///     .seed(42)
///     .max_new_tokens(256)
///     .stop_tokens(vec![2]);
/// assert_eq!(config.beam_width, 16);
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SpeculativeConfig {
    /// Beams per round (M).
    pub beam_width: usize,
    /// Tokens per beam, the first (already chosen) token included (C).
    pub beam_length: usize,
    pub acceptance: Acceptance,
    pub generation: GenerationConfig,
    /// Extra beams guessed by prompt lookup, verified next to the drafted ones (`None`: off).
    #[serde(default)]
    pub lookup: Option<PromptLookup>,
    /// When each round's beams are drafted.
    #[serde(default)]
    pub draft_timing: DraftTiming,
    /// Verify a drafted token only while its beam's probability under the draft head (the
    /// product of its drafted tokens' probabilities) is at least this, and stop drafting once
    /// no beam of any row reaches it (`None`: verify every drafted token). The beams then end
    /// early ([`BEAM_END`]) where the draft head is unsure: the tree is smaller where a long
    /// beam would likely be rejected and may run deep where the head is confident, with a
    /// longer [`beam_length`](Self::beam_length). Output is unchanged — the target still
    /// decides every token. Reads the draft scores on the host after every draft step, so it
    /// suits the CPU backends (where that read is free) and needs sequential drafting
    /// ([`DraftTiming::Auto`] resolves to it).
    #[serde(default)]
    pub min_draft_probability: Option<f32>,
}

impl Default for SpeculativeConfig {
    fn default() -> Self {
        Self {
            beam_width: 16,
            beam_length: 5,
            acceptance: Acceptance::Greedy,
            generation: GenerationConfig::default(),
            lookup: None,
            draft_timing: DraftTiming::Auto,
            min_draft_probability: None,
        }
    }
}

impl SpeculativeConfig {
    pub fn beam_width(mut self, m: usize) -> Self {
        self.beam_width = m;
        self
    }
    pub fn beam_length(mut self, c: usize) -> Self {
        self.beam_length = c;
        self
    }
    pub fn acceptance(mut self, acceptance: Acceptance) -> Self {
        self.acceptance = acceptance;
        self
    }
    /// Sets the temperature (0 = greedy).
    pub fn temperature(mut self, t: f32) -> Self {
        self.generation.sampling = Sampling::with_temperature(t);
        self
    }
    pub fn seed(mut self, seed: u64) -> Self {
        self.generation.seed = seed;
        self
    }
    pub fn max_new_tokens(mut self, n: usize) -> Self {
        self.generation.max_new_tokens = n;
        self
    }
    pub fn stop_tokens(mut self, stop: impl Into<Vec<u32>>) -> Self {
        self.generation.stop_tokens = stop.into();
        self
    }
    /// Adds prompt-lookup beams ([`PromptLookup`]); `None` or zero beams turn it off.
    pub fn lookup(mut self, lookup: impl Into<Option<PromptLookup>>) -> Self {
        self.lookup = lookup.into().filter(|l| l.beams > 0);
        self
    }
    /// Sets when each round's beams are drafted ([`DraftTiming`]).
    pub fn draft_timing(mut self, timing: DraftTiming) -> Self {
        self.draft_timing = timing;
        self
    }
    /// Verifies drafted tokens only while their beam's draft probability is at least `p`
    /// ([`SpeculativeConfig::min_draft_probability`]); `None` verifies them all.
    pub fn min_draft_probability(mut self, p: impl Into<Option<f32>>) -> Self {
        self.min_draft_probability = p.into();
        self
    }
    /// Replaces the shared generation settings.
    pub fn generation(mut self, generation: GenerationConfig) -> Self {
        self.generation = generation;
        self
    }

    fn temperature_value(&self) -> f32 {
        self.generation.sampling.temperature
    }

    /// Tokens per beam of the verified tree: the drafted beam length, or the prompt-lookup
    /// beams' when that is longer.
    pub fn tree_length(&self) -> usize {
        self.lookup
            .and_then(|l| l.beam_length)
            .map_or(self.beam_length, |l| l.max(self.beam_length))
    }

    /// Beams verified per round: the drafted ones plus the prompt-lookup ones.
    pub fn total_beams(&self) -> usize {
        self.beam_width + self.lookup.map_or(0, |l| l.beams)
    }
}

/// Accelerates a [`TargetModel`] with a [`DraftHead`].
pub struct SpeculativeDecoder<'a, B: Backend, T: TargetModel<B>, D: DraftHead<B>> {
    target: &'a T,
    drafter: &'a D,
    config: SpeculativeConfig,
    _backend: std::marker::PhantomData<B>,
}

/// Per-round results read back from the device.
struct RoundResult {
    best_beam: Vec<usize>,
    accepted: Vec<usize>,
    bonus: Vec<u32>,
    /// Drafted beams `[live, M, C]`: the next round's (sequential drafting) or this round's
    /// (overlapped).
    beams: Vec<u32>,
}

/// The drafted beams a round starts from.
enum Drafts<B: Backend> {
    /// Drafted after the last acceptance and read back with it ([`DraftTiming::Sequential`]).
    Ready {
        /// `[live, M, C]`, flattened.
        host: Vec<u32>,
        device: crate::drafter::DraftBeams<B>,
    },
    /// What the round drafts from at its start ([`DraftTiming::Overlapped`]).
    Pending {
        /// The hidden state at each row's last accepted node, `[live, H]`.
        context: Tensor<B, 2>,
        /// The token after it (the beams' shared first token), `[live]`, and its host copy.
        first_tokens: Tensor<B, 1, Int>,
        roots: Vec<u32>,
    },
}

impl<B: Backend> Drafts<B> {
    /// Keeps only the batch rows `keep` (increasing), on the host and on the device.
    fn retain_rows(&mut self, keep: &[usize], per_row: usize, device: &B::Device) {
        let index = int_tensor::<B, 1>(
            keep.iter().map(|&i| i as i64).collect(),
            [keep.len()],
            device,
        );
        match self {
            Drafts::Ready { host, device } => {
                *host = keep
                    .iter()
                    .flat_map(|&i| host[i * per_row..(i + 1) * per_row].iter().copied())
                    .collect();
                device.tokens = device.tokens.clone().select(0, index.clone());
                device.token_log_probs = device.token_log_probs.clone().select(0, index);
            }
            Drafts::Pending {
                context,
                first_tokens,
                roots,
            } => {
                *roots = keep.iter().map(|&i| roots[i]).collect();
                *context = context.clone().select(0, index.clone());
                *first_tokens = first_tokens.clone().select(0, index);
            }
        }
    }
}

/// Host stand-ins for drafted tokens not read back yet (overlapped drafting): `DRAFTED + i`
/// stands for element `i` of the round's drafted beams `[live, M, C]`, flattened. No vocabulary
/// reaches it, so the tree never merges a stand-in with a real token.
const DRAFTED: u32 = 0x8000_0000;

/// The round's drafted beams as the host knows them before the readback: each row's first token
/// (the `roots`, known), then stand-ins.
fn stand_in_beams(roots: &[u32], m: usize, c: usize) -> Vec<u32> {
    let mut beams = Vec::with_capacity(roots.len() * m * c);
    for &root in roots {
        for _ in 0..m {
            let first = beams.len();
            beams.push(root);
            beams.extend((first + 1..first + c).map(|index| DRAFTED + index as u32));
        }
    }
    beams
}

/// Replaces the stand-ins in `beams` by the drafted tokens they stand for, once read back.
fn resolve_stand_ins(beams: &mut [u32], drafted: &[u32]) -> Result<()> {
    for token in beams.iter_mut() {
        if *token >= DRAFTED && *token != BEAM_END {
            let index = (*token - DRAFTED) as usize;
            *token = *drafted.get(index).ok_or_else(|| {
                Error::Backend(format!(
                    "drafted token {index} missing from the {} read back",
                    drafted.len()
                ))
            })?;
        }
    }
    Ok(())
}

/// A host token as the device receives it: a vocabulary token as it is; the stand-in for drafted
/// element `i` as `-1 - i`, which [`IntSegments::resolve_drafted`](crate::generate::IntSegments)
/// replaces with the token; a beam's end as `i32::MAX`, which no choice of the target equals.
fn device_token(token: u32) -> i64 {
    match token {
        BEAM_END => i64::from(i32::MAX),
        t if t >= DRAFTED => -1 - i64::from(t - DRAFTED),
        t => i64::from(t),
    }
}

/// Drafted beams, `beams` of `C'` tokens, as a round packs them: `beams` of `c` tokens, each
/// ending ([`BEAM_END`]) after its `C'` tokens and, with a `floor`, before its first token whose
/// beam score — the running sum of `log_probs` (`[beams, C' - 1]`, one per drafted token) — is
/// below it.
fn cut_beams(
    tokens: &[u32],
    log_probs: Option<&[f32]>,
    beams: usize,
    c: usize,
    floor: Option<f32>,
) -> Result<Vec<u32>> {
    let drafted = tokens.len().checked_div(beams).unwrap_or(c);
    if drafted == 0 || drafted > c || tokens.len() != beams * drafted {
        return Err(Error::Backend(format!(
            "{} drafted tokens read back for {beams} beams of at most {c}",
            tokens.len()
        )));
    }
    if drafted == c && floor.is_none() {
        return Ok(tokens.to_vec());
    }
    let scored = match (floor, log_probs) {
        (Some(floor), Some(log_probs)) if log_probs.len() == beams * (drafted - 1) => {
            Some((floor, log_probs))
        }
        (Some(_), _) => {
            return Err(Error::Backend(format!(
                "{} drafted log-probabilities read back for {beams} beams of {drafted} tokens",
                log_probs.map_or(0, <[f32]>::len)
            )));
        }
        (None, _) => None,
    };
    let mut cut = Vec::with_capacity(beams * c);
    for b in 0..beams {
        let beam = &tokens[b * drafted..(b + 1) * drafted];
        let mut kept = drafted;
        if let Some((floor, log_probs)) = scored {
            let mut score = 0.0f32;
            for (k, &lp) in log_probs[b * (drafted - 1)..(b + 1) * (drafted - 1)]
                .iter()
                .enumerate()
            {
                score += lp;
                // A NaN score ends the beam too.
                if score.is_nan() || score < floor {
                    kept = k + 1;
                    break;
                }
            }
        }
        cut.extend_from_slice(&beam[..kept]);
        cut.extend(std::iter::repeat_n(BEAM_END, c - kept));
    }
    Ok(cut)
}

impl<'a, B: Backend, T: TargetModel<B>, D: DraftHead<B>> SpeculativeDecoder<'a, B, T, D> {
    /// Checks that the drafter fits the target and that the settings can work.
    pub fn new(target: &'a T, drafter: &'a D, config: SpeculativeConfig) -> Result<Self> {
        if drafter.hidden_size() != target.hidden_size() {
            return Err(Error::DrafterMismatch {
                what: "hidden size".into(),
                drafter: drafter.hidden_size(),
                target: target.hidden_size(),
            });
        }
        if drafter.vocab_size() != target.vocab_size() {
            return Err(Error::DrafterMismatch {
                what: "vocabulary size".into(),
                drafter: drafter.vocab_size(),
                target: target.vocab_size(),
            });
        }
        if config.beam_width == 0 {
            return Err(Error::InvalidSettings(
                "beam width must be at least 1".into(),
            ));
        }
        if config.beam_length == 0 {
            return Err(Error::InvalidSettings(
                "beam length must be at least 1 (it counts the first token)".into(),
            ));
        }
        if let Some(steps) = drafter.trained_steps()
            && config.beam_length > steps + 1
        {
            return Err(Error::InvalidSettings(format!(
                "beam length {} needs {} draft steps, but the drafter was trained for {steps}",
                config.beam_length,
                config.beam_length - 1
            )));
        }
        config.generation.sampling.validate()?;
        if let Some(lookup) = &config.lookup {
            lookup.validate()?;
            if let Some(length) = lookup.beam_length
                && length < config.beam_length
            {
                return Err(Error::InvalidSettings(format!(
                    "prompt lookup beams of {length} tokens are shorter than the drafted beams \
                     ({}); they may be longer, not shorter",
                    config.beam_length
                )));
            }
            if config.acceptance == Acceptance::ReferenceParity {
                return Err(Error::InvalidSettings(
                    "reference-parity acceptance needs the draft head's probability of every \
                     drafted token, which prompt-lookup beams do not have; turn lookup off"
                        .into(),
                ));
            }
        }
        let t = config.temperature_value();
        match config.acceptance {
            Acceptance::Greedy if t != 0.0 => {
                return Err(Error::InvalidSettings(format!(
                    "greedy acceptance needs temperature 0, got {t}; use exact acceptance to sample"
                )));
            }
            Acceptance::Typical { epsilon, delta } if !(epsilon > 0.0 && delta > 0.0) => {
                return Err(Error::InvalidSettings(
                    "typical acceptance needs epsilon > 0 and delta > 0".into(),
                ));
            }
            _ => {}
        }
        if config.draft_timing == DraftTiming::Overlapped && !config.acceptance.compares_tokens() {
            return Err(Error::InvalidSettings(format!(
                "overlapped drafting needs greedy or exact acceptance, not {:?}: the other rules \
                 read the drafted tokens on the host before the round's readback",
                config.acceptance
            )));
        }
        if let Some(p) = config.min_draft_probability {
            if !(p > 0.0 && p < 1.0) {
                return Err(Error::InvalidSettings(format!(
                    "the minimum draft probability must lie strictly between 0 and 1, got {p}"
                )));
            }
            if config.draft_timing == DraftTiming::Overlapped {
                return Err(Error::InvalidSettings(
                    "a minimum draft probability needs sequential drafting: overlapped drafting \
                     packs the tree before the drafted beams and their scores are known"
                        .into(),
                ));
            }
            if config.acceptance == Acceptance::ReferenceParity {
                return Err(Error::InvalidSettings(
                    "reference-parity acceptance needs the draft head's probability of every \
                     drafted token, which beams cut short by a minimum draft probability do not \
                     have"
                        .into(),
                ));
            }
        }
        if config.generation.sampling.top_k.is_some() || config.generation.sampling.top_p.is_some()
        {
            return Err(Error::InvalidSettings(
                "top-k / top-p are supported by plain decoding only".into(),
            ));
        }
        Ok(Self {
            target,
            drafter,
            config,
            _backend: std::marker::PhantomData,
        })
    }

    /// The settings.
    pub fn config(&self) -> &SpeculativeConfig {
        &self.config
    }

    /// Whether rounds draft their own beams at their start ([`DraftTiming::Overlapped`]), as
    /// the settings and the backend resolve [`DraftTiming::Auto`].
    pub fn overlaps_drafting(&self) -> bool {
        match self.config.draft_timing {
            DraftTiming::Sequential => false,
            DraftTiming::Overlapped => true,
            DraftTiming::Auto => {
                self.config.beam_width == 1
                    && self.config.acceptance.compares_tokens()
                    && self.config.min_draft_probability.is_none()
                    && crate::cube_kernels::applies::<B>()
            }
        }
    }

    /// Largest packed tree a round can produce.
    pub fn max_tree_len(&self) -> usize {
        1 + self.config.total_beams() * (self.config.tree_length() - 1)
    }

    /// Generates a continuation of each prompt. `on_tokens(row, tokens)` receives each row's
    /// new tokens as soon as a round accepts them.
    ///
    /// On the CPU (Flex) the loop, `on_tokens` included, runs on a worker thread of rayon's
    /// global pool while the calling thread waits, unless the caller is a pool worker already
    /// (see [`crate::cpu_workers`]); elsewhere on the calling thread.
    pub fn generate(
        &self,
        prompts: &[Vec<u32>],
        on_tokens: impl FnMut(usize, &[u32]) + Send,
    ) -> Result<GenerationOutput>
    where
        T: Sync,
        D: Sync,
    {
        crate::cpu_workers::on_cpu_workers::<B, _>(|| self.generate_here(prompts, on_tokens))
    }

    /// [`Self::generate`] on the calling thread.
    fn generate_here(
        &self,
        prompts: &[Vec<u32>],
        mut on_tokens: impl FnMut(usize, &[u32]),
    ) -> Result<GenerationOutput> {
        let config = &self.config;
        let gen_config = &config.generation;
        // `c`: drafted beam length; `depth`: the tree's (longer when lookup beams are).
        let (m, c) = (config.beam_width, config.beam_length);
        let (total, depth) = (config.total_beams(), config.tree_length());
        validate_prompts(
            prompts,
            self.target.vocab_size(),
            self.target.max_context(),
            gen_config.max_new_tokens,
            depth,
        )?;
        let start = Instant::now();
        let device = self.target.device();
        B::seed(&device, gen_config.seed);
        let batch = prompts.len();
        let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
        let capacity = longest + gen_config.max_new_tokens + depth + self.max_tree_len();
        let mut cache = self.target.new_cache(batch, capacity);
        let mut stats = Stats {
            accepted_at_depth: vec![0; depth.saturating_sub(1)],
            ..Stats::default()
        };
        let mut rows = vec![RowOutput::default(); batch];
        if gen_config.max_new_tokens == 0 {
            return Ok(GenerationOutput {
                tokens: vec![Vec::new(); batch],
                stats,
            });
        }

        // Prefill, first token and first beams: one readback.
        let overlapped = self.overlaps_drafting();
        let (hidden, features) = prefill_tapped(
            self.target,
            &mut cache,
            prompts,
            self.drafter.tapped_layers(),
        )?;
        let logits = self.target.logits(hidden.unsqueeze_dim::<3>(1));
        let context = self.draft_context(features)?;
        let first = self.choose(logits).reshape([batch]);
        let draft_start = Instant::now();
        // Sequential drafting drafts the first beams now; overlapped, the first round does.
        let beams = if overlapped {
            None
        } else {
            Some(self.draft(context.clone(), first.clone(), batch)?)
        };
        let mut readback = Transaction::default().register(first.clone());
        if let Some(beams) = &beams {
            readback = self.register_beams(readback, beams);
        }
        let data = readback.execute();
        let first_host = token_ids(&data[0]);
        let mut drafts = match beams {
            Some(device) => Drafts::Ready {
                host: self.host_beams(&data[1..], batch)?,
                device,
            },
            None => Drafts::Pending {
                context,
                first_tokens: first,
                roots: first_host.clone(),
            },
        };
        stats.syncs += 1;
        stats.draft_time += draft_start.elapsed();
        stats.prefill_time = start.elapsed();
        for (b, row) in rows.iter_mut().enumerate() {
            if row.push(&first_host[b..b + 1], gen_config) == 1 {
                stats.new_tokens += 1;
                on_tokens(b, &first_host[b..b + 1]);
            }
        }
        // `active[i]` is the original row of batch slot i; finished rows leave the batch.
        let mut active: Vec<usize> = (0..batch).collect();
        self.retire_finished(&rows, &mut active, &mut cache, &mut drafts)?;

        while !active.is_empty() {
            let live = active.len();
            // The round's drafted beams: drafted last round and known here, or drafted now, the
            // device working on them while the host packs and queues the tree below.
            let (drafted_host, device_beams) = match drafts {
                Drafts::Ready { host, device } => (host, device),
                Drafts::Pending {
                    context,
                    first_tokens,
                    roots,
                } => {
                    let draft_start = Instant::now();
                    let beams = self.draft(context, first_tokens, live)?;
                    if crate::cube_kernels::queue_flush().after_draft {
                        crate::cube_kernels::flush_queue::<B>(&device);
                    }
                    stats.draft_time += draft_start.elapsed();
                    (stand_in_beams(&roots, m, c), beams)
                }
            };
            // Prompt-lookup beams, tree packing and upload.
            let tree_start = Instant::now();
            // The round's integers (lookup guesses, tree tokens, positions, unpacker) go up in
            // one upload: each upload is a task for CubeCL's runner.
            let mut upload = IntUpload::default();
            // The device's drafted beams serve as the round's beams when they are exactly what
            // the host packs; beams cut short on the host go up with the other integers.
            let cut_short =
                config.min_draft_probability.is_some() || device_beams.tokens.dims()[2] != c;
            let (mut round_beams, beams_segment) = match &config.lookup {
                None if !cut_short => (drafted_host, None),
                None => {
                    let segment = upload.push(drafted_host.iter().map(|&t| device_token(t)));
                    (drafted_host, Some(segment))
                }
                Some(lookup) => {
                    let beams = self.with_lookup_beams(
                        lookup,
                        &drafted_host,
                        !overlapped,
                        &active,
                        prompts,
                        &rows,
                    );
                    let segment = upload.push(beams.iter().map(|&t| device_token(t)));
                    (beams, Some(segment))
                }
            };
            let trees = (0..live)
                .map(|i| {
                    DraftTree::pack(
                        &round_beams[i * total * depth..(i + 1) * total * depth],
                        total,
                        depth,
                    )
                })
                .collect::<Result<Vec<_>>>()?;
            let packed = PackedBatch::new(trees)?;
            let tree_len = packed.max_len();
            let starts: Vec<usize> = cache.lengths().to_vec();
            let tokens_segment =
                upload.push(packed.tokens(0).into_iter().map(|t| device_token(t as u32)));
            let positions_segment = upload.push(packed.positions(&starts)?);
            let unpacker_segment = upload.push(
                packed
                    .trees()
                    .iter()
                    .flat_map(|t| t.unpacker().iter().map(|&u| u as i64)),
            );
            let mut uploaded = upload.upload::<B>(&device);
            if overlapped {
                // The stand-ins become the drafted tokens, on the device.
                uploaded = uploaded.resolve_drafted(&device_beams.tokens);
            }
            let round_tokens = match beams_segment {
                Some(segment) => uploaded.get(segment, [live, total, depth])?,
                None => device_beams.tokens.clone(),
            };
            let block = Block {
                tokens: uploaded.get(tokens_segment, [live, tree_len])?,
                positions: uploaded.get(positions_segment, [live, tree_len])?,
                bias: Some(cache.attention_bias(tree_len, Some(&packed.block_masks()), &device)),
            };
            let unpacker_t = uploaded.get(unpacker_segment, [live, total * depth])?;
            stats.tree_time += tree_start.elapsed();

            // Verification and on-device acceptance, then the next beams.
            let verify_start = Instant::now();
            let (hidden, tapped) =
                self.target
                    .forward_tapped(&block, &mut cache, self.drafter.tapped_layers())?;
            let logits = self.target.logits(hidden.clone());
            // The head's features at every node; acceptance picks the last accepted node's.
            let features = if tapped.is_empty() {
                hidden
            } else {
                Tensor::cat(std::iter::once(hidden).chain(tapped).collect(), 2)
            };
            let (summary, bonus, next_features) = self.accept_on_device(
                &packed,
                features,
                logits,
                round_tokens,
                &device_beams,
                unpacker_t,
            )?;
            let next_context = self.draft_context(next_features)?;
            stats.verify_time += verify_start.elapsed();
            // Sequential drafting drafts the next beams now and reads them back with the
            // acceptance; overlapped drafting reads back this round's beams, drafted long ago.
            let next_beams = if overlapped {
                None
            } else {
                let draft_start = Instant::now();
                let beams = self.draft(next_context.clone(), bonus.clone(), live)?;
                stats.draft_time += draft_start.elapsed();
                Some(beams)
            };
            let readback_start = Instant::now();
            let beams_to_read = next_beams.as_ref().unwrap_or(&device_beams);
            let data = self
                .register_beams(
                    Transaction::default()
                        .register(summary)
                        .register(bonus.clone()),
                    beams_to_read,
                )
                .execute();
            stats.syncs += 1;
            stats.readback_time += readback_start.elapsed();

            let accept_start = Instant::now();
            // `summary` is `[live, 2]`: best beam, accepted drafts.
            let summary = ints(&data[0]);
            let result = RoundResult {
                best_beam: summary.iter().step_by(2).map(|&v| v as usize).collect(),
                accepted: summary
                    .iter()
                    .skip(1)
                    .step_by(2)
                    .map(|&v| v as usize)
                    .collect(),
                bonus: token_ids(&data[1]),
                beams: self.host_beams(&data[2..], live)?,
            };
            if overlapped {
                resolve_stand_ins(&mut round_beams, &result.beams)?;
            }
            let mut keep = Vec::with_capacity(live);
            stats.target_forwards += 1;
            for i in 0..live {
                let (beam, n) = (result.best_beam[i], result.accepted[i]);
                if beam >= total || n >= depth {
                    return Err(Error::Backend(format!(
                        "acceptance read back beam {beam} / length {n} outside {total}×{depth}"
                    )));
                }
                if beam >= m {
                    stats.lookup_rounds += 1;
                }
                let tree = &packed.trees()[i];
                let path: Vec<usize> = (0..=n).map(|k| tree.unpacker()[beam * depth + k]).collect();
                keep.push(path);
                stats.row_rounds += 1;
                stats.forward_tokens += n + 1;
                stats.packed_tokens += tree.len();
                for d in 0..n {
                    stats.accepted_at_depth[d] += 1;
                }
                let mut emitted: Vec<u32> = round_beams
                    [(i * total + beam) * depth + 1..(i * total + beam) * depth + 1 + n]
                    .to_vec();
                emitted.push(result.bonus[i]);
                let row = active[i];
                let taken = rows[row].push(&emitted, gen_config);
                if taken > 0 {
                    stats.new_tokens += taken;
                    on_tokens(row, &emitted[..taken]);
                }
            }
            cache.commit(&keep)?;
            drafts = match next_beams {
                Some(device) => Drafts::Ready {
                    host: result.beams,
                    device,
                },
                None => Drafts::Pending {
                    context: next_context,
                    first_tokens: bonus,
                    roots: result.bonus,
                },
            };
            let live_before = active.len();
            self.retire_finished(&rows, &mut active, &mut cache, &mut drafts)?;
            if active.len() != live_before {
                tracing::debug!(remaining = active.len(), "rows finished");
            }
            stats.accept_time += accept_start.elapsed();
        }
        stats.total_time = start.elapsed();
        Ok(GenerationOutput {
            tokens: rows.into_iter().map(|r| r.tokens).collect(),
            stats,
        })
    }

    /// The context the head drafts from, from the target's features at the rows it drafts
    /// after ([`DraftHead::context`]), checked to be `[rows, H]`: a head that lists tapped
    /// layers but does not fold them would otherwise draft from the wrong width.
    ///
    /// # Shapes
    /// `features`: `[rows, H · (1 + taps)]` to `[rows, H]`
    fn draft_context(&self, features: Tensor<B, 2>) -> Result<Tensor<B, 2>> {
        let rows = features.dims()[0];
        let context = self.drafter.context(features)?;
        let expected = [rows, self.target.hidden_size()];
        if context.dims() != expected {
            return Err(Error::ShapeMismatch {
                tensor: "draft context".into(),
                expected: expected.to_vec(),
                found: context.dims().to_vec(),
            });
        }
        Ok(context)
    }

    /// Asks the draft head for `live` rows' beams of the configured shape and checks the shape
    /// it returns.
    ///
    /// # Shapes
    /// `context`: `[live, H]`, `first_tokens`: `[live]`; returns tokens `[live, M, C']` with
    /// `C' = C`, or `2 <= C' < C` when the head stopped early
    fn draft(
        &self,
        context: Tensor<B, 2>,
        first_tokens: Tensor<B, 1, Int>,
        live: usize,
    ) -> Result<DraftBeams<B>> {
        let config = &self.config;
        let (m, c) = (config.beam_width, config.beam_length);
        let beams = self.drafter.propose(DraftRequest {
            context,
            first_tokens,
            beam_width: m,
            beam_length: c,
            // Only the reference-parity rule and the probability floor read the head's
            // probabilities.
            needs_log_probs: config.acceptance == Acceptance::ReferenceParity
                || config.min_draft_probability.is_some(),
            stop_below: config.min_draft_probability.map(f32::ln),
        })?;
        let [rows, width, drafted] = beams.tokens.dims();
        let shortest = if config.min_draft_probability.is_some() {
            c.min(2)
        } else {
            c
        };
        if rows != live || width != m || !(shortest..=c).contains(&drafted) {
            return Err(Error::ShapeMismatch {
                tensor: "drafted beams".into(),
                expected: vec![live, m, c],
                found: vec![rows, width, drafted],
            });
        }
        Ok(beams)
    }

    /// Adds drafted beams to a readback: their tokens and, with a probability floor, their
    /// tokens' log-probabilities ([`Self::host_beams`] reads them).
    fn register_beams(&self, readback: Transaction<B>, beams: &DraftBeams<B>) -> Transaction<B> {
        let readback = readback.register(beams.tokens.clone());
        match self.config.min_draft_probability {
            Some(_) => readback.register(beams.token_log_probs.clone().cast(DType::F32)),
            None => readback,
        }
    }

    /// The drafted beams of `live` rows as the host packs them, `[live, M, C]` flattened, from
    /// what [`Self::register_beams`] read back.
    fn host_beams(&self, data: &[TensorData], live: usize) -> Result<Vec<u32>> {
        let config = &self.config;
        let tokens = token_ids(&data[0]);
        let log_probs: Option<Vec<f32>> = config
            .min_draft_probability
            .map(|_| data[1].iter::<f32>().collect());
        cut_beams(
            &tokens,
            log_probs.as_deref(),
            live * config.beam_width,
            config.beam_length,
            config.min_draft_probability.map(f32::ln),
        )
    }

    /// Chooses a token from logits on the device: argmax at temperature 0, else a Gumbel-max
    /// sample (an exact draw from softmax(logits / T)).
    ///
    /// # Shapes
    /// `[batch, T, vocab]` to `[batch, T]`
    fn choose(&self, logits: Tensor<B, 3>) -> Tensor<B, 2, Int> {
        let t = self.config.temperature_value();
        let [batch, len, _] = logits.dims();
        let argmax = |values| crate::sampling::argmax_rows(values).reshape([batch, len]);
        if t == 0.0 {
            return argmax(logits);
        }
        argmax(crate::sampling::gumbel_perturbed(logits, t))
    }

    /// Computes, on the device, each row's best beam and its accepted draft count, the bonus
    /// token and the draft head's features at the last accepted node.
    ///
    /// # Shapes
    /// - `hidden`: `[live, L, F]` (the head's features, `F = H` unless it taps layers),
    ///   `logits`: `[live, L, V]`, `tokens`: `[live, M', C]` (the round's beams, prompt-lookup
    ///   ones included), `unpacker`: `[live, M'·C]`
    /// - returns `[live, 2]` ints (best beam, accepted count), `[live]` (bonus) and `[live, F]`
    #[allow(clippy::type_complexity)]
    fn accept_on_device(
        &self,
        packed: &PackedBatch,
        hidden: Tensor<B, 3>,
        logits: Tensor<B, 3>,
        tokens: Tensor<B, 3, Int>,
        drafted: &crate::drafter::DraftBeams<B>,
        unpacker: Tensor<B, 2, Int>,
    ) -> Result<(Tensor<B, 2, Int>, Tensor<B, 1, Int>, Tensor<B, 2>)> {
        let [_, m, c] = tokens.dims();
        let [live, len, vocab] = logits.dims();
        let hidden_size = hidden.dims()[2];
        let device = logits.device();
        let temperature = self.config.temperature_value();
        let verdict = self.choose(logits.clone());
        if self.config.acceptance.compares_tokens()
            && let Some(accepted) =
                crate::cube_kernels::greedy_accept(crate::cube_kernels::GreedyAcceptance {
                    choices: &verdict,
                    unpacker: &unpacker,
                    beams: &tokens,
                    hidden: &hidden,
                })
        {
            // One launch on the GPUs instead of ~20.
            return Ok(accepted);
        }

        // ok[b, i, k]: beam i's token k+1 is accepted at depth k.
        let ok: Option<Tensor<B, 3>> = if c == 1 {
            None
        } else {
            let drafted_tokens = tokens.slice([0..live, 0..m, 1..c]);
            Some(match self.config.acceptance {
                Acceptance::Greedy | Acceptance::Exact => verdict
                    .clone()
                    .gather(1, unpacker.clone())
                    .reshape([live, m, c])
                    .slice([0..live, 0..m, 0..c - 1])
                    .equal(drafted_tokens)
                    .float(),
                Acceptance::Typical { epsilon, delta } => {
                    let t = if temperature > 0.0 { temperature } else { 1.0 };
                    // In f32: in f16 the entropy's 1e-30 floor is 0, and 0 · log 0 is NaN.
                    let probs = softmax(logits.cast(DType::F32).div_scalar(t), 2);
                    let entropy = probs
                        .clone()
                        .mul(probs.clone().clamp_min(1e-30).log())
                        .sum_dim(2)
                        .neg()
                        .reshape([live, len]);
                    let child = self.child_probabilities(packed, probs, vocab, &device);
                    let threshold = entropy.neg().exp().mul_scalar(delta).clamp_max(epsilon);
                    let parents = self.parent_index(packed, &device);
                    let acceptable = child.greater(threshold.gather(1, parents)).float();
                    // A beam's end (`BEAM_END`) unpacks to its last real node, whose verdict
                    // would otherwise count again for every position past the end.
                    let real = drafted_tokens
                        .not_equal_elem(device_token(BEAM_END))
                        .float();
                    acceptable
                        .gather(1, unpacker.clone())
                        .reshape([live, m, c])
                        .slice([0..live, 0..m, 1..c])
                        .mul(real)
                }
                Acceptance::ReferenceParity => {
                    let t = if temperature > 0.0 { temperature } else { 1.0 };
                    let probs = softmax(logits.cast(DType::F32).div_scalar(t), 2);
                    let child = self.child_probabilities(packed, probs, vocab, &device);
                    let target_p = child
                        .gather(1, unpacker.clone())
                        .reshape([live, m, c])
                        .slice([0..live, 0..m, 1..c]);
                    // Only drafted beams here: `new` rejects prompt lookup with this rule.
                    let draft_q = drafted.token_log_probs.clone().cast(DType::F32).exp();
                    let uniform = draft_q.random_like(Distribution::Uniform(0.0, 1.0));
                    uniform.mul(draft_q).lower(target_p).float()
                }
            })
        };

        let (best_n, best_beam) = match ok {
            None => (
                Tensor::<B, 2, Int>::zeros([live, 1], &device),
                Tensor::<B, 2, Int>::zeros([live, 1], &device),
            ),
            Some(ok) => {
                let run = ok.cumprod(2).sum_dim(2).reshape([live, m]);
                let (n, beam) = run.max_dim_with_indices(1);
                (n.int(), beam)
            }
        };
        let end_index = best_beam.clone().mul_scalar(c as i64).add(best_n.clone());
        let end_node = unpacker.gather(1, end_index);
        let bonus = verdict.gather(1, end_node.clone());
        let row_offsets = int_tensor::<B, 1>(
            (0..live).map(|b| (b * len) as i64).collect(),
            [live],
            &device,
        );
        let flat_end = end_node.reshape([live]).add(row_offsets);
        let next_context = hidden
            .reshape([live * len, hidden_size])
            .select(0, flat_end);
        Ok((
            Tensor::cat(vec![best_beam, best_n], 1),
            bonus.reshape([live]),
            next_context,
        ))
    }

    /// The round's beams per live row: the `M` drafted beams, then `lookup.beams` guesses from
    /// the row's prompt and output. When the tree is deeper than the drafted beams, each drafted
    /// beam is extended with a guess for the text it ends with if `drafts_known` and the text
    /// offers one from a match of at least `lookup.extend_min_ngram` tokens, else it ends there
    /// ([`BEAM_END`]; without `drafts_known` its tokens are stand-ins); a guess from a shorter
    /// match also ends at the drafted beams' length. Rows with fewer guesses repeat drafted
    /// beam 0, which adds no node to the packed tree.
    ///
    /// # Shapes
    /// `drafted`: `[live, M, C]` flattened; returns `[live, M + lookup.beams, depth]` flattened
    fn with_lookup_beams(
        &self,
        lookup: &PromptLookup,
        drafted: &[u32],
        drafts_known: bool,
        active: &[usize],
        prompts: &[Vec<u32>],
        rows: &[RowOutput],
    ) -> Vec<u32> {
        let (m, c) = (self.config.beam_width, self.config.beam_length);
        let (total, depth) = (self.config.total_beams(), self.config.tree_length());
        let mut beams = Vec::with_capacity(active.len() * total * depth);
        let mut history = Vec::new();
        for (i, &row) in active.iter().enumerate() {
            // The row's text so far; it ends with the beams' shared first token.
            history.clear();
            history.extend_from_slice(&prompts[row]);
            history.extend_from_slice(&rows[row].tokens);
            let row_start = beams.len();
            for beam in drafted[i * m * c..(i + 1) * m * c].chunks(c) {
                beams.extend_from_slice(beam);
                // A beam cut short by the probability floor is not extended either.
                if depth > c && (!drafts_known || beam.contains(&BEAM_END)) {
                    beams.extend(std::iter::repeat_n(BEAM_END, depth - c));
                } else if depth > c {
                    let known = history.len();
                    history.extend_from_slice(&beam[1..]);
                    let extension = PromptLookup {
                        beams: 1,
                        ..*lookup
                    }
                    .guesses(&history, depth - c, &[])
                    .pop()
                    .filter(|guess| guess.ngram >= lookup.extend_min_ngram);
                    history.truncate(known);
                    match extension {
                        Some(guess) => beams.extend_from_slice(&guess.tokens),
                        None => beams.extend(std::iter::repeat_n(BEAM_END, depth - c)),
                    }
                }
            }
            let own = &beams[row_start..];
            let covered: Vec<&[u32]> = own.chunks(depth).map(|beam| &beam[1..]).collect();
            let guesses = lookup.guesses(&history, depth - 1, &covered);
            let (g0, first_beam) = (own[0], own[..depth].to_vec());
            for k in 0..lookup.beams {
                match guesses.get(k) {
                    Some(guess) => {
                        beams.push(g0);
                        // A weak guess stops where the drafted beams do.
                        let kept = if guess.ngram >= lookup.extend_min_ngram {
                            depth - 1
                        } else {
                            c.min(depth) - 1
                        };
                        beams.extend_from_slice(&guess.tokens[..kept]);
                        beams.extend(std::iter::repeat_n(BEAM_END, depth - 1 - kept));
                    }
                    None => beams.extend_from_slice(&first_beam),
                }
            }
        }
        beams
    }

    /// Index of each packed node's parent (the root points at itself).
    fn parent_index(&self, packed: &PackedBatch, device: &B::Device) -> Tensor<B, 2, Int> {
        let len = packed.max_len();
        let mut parents = Vec::with_capacity(packed.trees().len() * len);
        for tree in packed.trees() {
            for node in 0..len {
                let parent = if node < tree.len() {
                    tree.parent(node).unwrap_or(node)
                } else {
                    node
                };
                parents.push(parent as i64);
            }
        }
        int_tensor(parents, [packed.trees().len(), len], device)
    }

    /// `child[b, node]` = probability of the node's token under its parent's distribution.
    fn child_probabilities(
        &self,
        packed: &PackedBatch,
        probs: Tensor<B, 3>,
        vocab: usize,
        device: &B::Device,
    ) -> Tensor<B, 2> {
        let live = packed.trees().len();
        let len = packed.max_len();
        let mut index = Vec::with_capacity(live * len);
        for (b, tree) in packed.trees().iter().enumerate() {
            for node in 0..len {
                let (parent, token) = if node < tree.len() {
                    (
                        tree.parent(node).unwrap_or(node),
                        tree.tokens()[node] as usize,
                    )
                } else {
                    (node, 0)
                };
                index.push(((b * len + parent) * vocab + token) as i64);
            }
        }
        probs
            .reshape([live * len * vocab])
            .select(0, int_tensor(index, [live * len], device))
            .reshape([live, len])
    }

    /// Drops finished rows from the batch (cache, beams) so they stop costing work.
    fn retire_finished(
        &self,
        rows: &[RowOutput],
        active: &mut Vec<usize>,
        cache: &mut crate::kv_cache::KvCache<B>,
        drafts: &mut Drafts<B>,
    ) -> Result<()> {
        let keep: Vec<usize> = (0..active.len())
            .filter(|&i| !rows[active[i]].done)
            .collect();
        if keep.len() == active.len() {
            return Ok(());
        }
        *active = keep.iter().map(|&i| active[i]).collect();
        if keep.is_empty() {
            return Ok(());
        }
        cache.retain_rows(&keep)?;
        let per_row = self.config.beam_width * self.config.beam_length;
        drafts.retain_rows(&keep, per_row, &self.target.device());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const E: u32 = BEAM_END;

    #[test]
    fn beams_end_before_the_first_token_below_the_floor() {
        // Two beams of 4 tokens; log-probs of their 3 drafted tokens.
        let tokens = [7, 1, 2, 3, 7, 4, 5, 6];
        let log_probs = [-0.1, -0.2, -0.3, -1.5, -0.1, -0.1];
        let floor = Some(0.5f32.ln());
        // Beam 0 scores -0.1, -0.3, -0.6, all above ln 0.5 = -0.69; beam 1 -1.5 at once.
        let cut = cut_beams(&tokens, Some(&log_probs), 2, 4, floor).unwrap();
        assert_eq!(cut, vec![7, 1, 2, 3, 7, E, E, E]);
        // A higher floor: beam 0 keeps its first two drafted tokens (-0.3 ≥ ln 0.7 = -0.36).
        let cut = cut_beams(&tokens, Some(&log_probs), 2, 4, Some(0.7f32.ln())).unwrap();
        assert_eq!(cut, vec![7, 1, 2, E, 7, E, E, E]);
        // A NaN score ends the beam.
        let nan = [-0.1, f32::NAN, -0.1, -0.1, -0.1, -0.1];
        let cut = cut_beams(&tokens, Some(&nan), 2, 4, floor).unwrap();
        assert_eq!(cut, vec![7, 1, E, E, 7, 4, 5, 6]);
    }

    #[test]
    fn beams_drafted_short_are_padded_to_the_beam_length() {
        // The head stopped after 2 of 4 tokens.
        let cut = cut_beams(&[7, 1, 7, 4], Some(&[-0.1, -0.2]), 2, 4, Some(0.5f32.ln()));
        assert_eq!(cut.unwrap(), vec![7, 1, E, E, 7, 4, E, E]);
        // Without a floor, full beams pass unchanged.
        let full = [7, 1, 2, 7, 4, 5];
        assert_eq!(cut_beams(&full, None, 2, 3, None).unwrap(), full.to_vec());
    }

    #[test]
    fn a_malformed_readback_is_an_error() {
        // 5 tokens for 2 beams; more columns than the beam length; missing log-probs.
        assert!(cut_beams(&[7, 1, 2, 7, 4], None, 2, 3, None).is_err());
        assert!(cut_beams(&[7, 1, 2, 3, 7, 4, 5, 6], None, 2, 3, None).is_err());
        assert!(cut_beams(&[7, 1, 7, 4], None, 2, 2, Some(-1.0)).is_err());
    }
}
