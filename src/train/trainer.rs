//! The training loop (SPEC §6): frozen target on the inner backend `B`, drafter on
//! `Autodiff<B>`, teacher forcing over all positions, AdamW with warmup + cosine, gradient
//! accumulation over token-bounded micro-batches, periodic evaluation and checkpoints.
//!
//! # One optimiser step
//!
//! 1. The next `batch_size` sequences of the epoch's seeded shuffle are sorted by length and cut
//!    into micro-batches of at most `micro_batch_tokens` padded tokens.
//! 2. Per micro-batch: one batched, causal target forward (a fresh KV cache) gives the
//!    final-norm hidden states `[N, T, H]` (or they come from the hidden-state cache); they
//!    enter the autodiff graph as constants ([`Tensor::from_inner`]); the teacher-forced loss
//!    ([`teacher_forced_loss`]) is back-propagated and the gradients accumulated.
//! 3. One readback of the step's loss; a non-finite loss stops training with
//!    [`Error::NonFiniteLoss`] before the optimiser touches the weights.
//! 4. AdamW steps with the scheduled learning rate.
//!
//! Nothing else synchronises with the device during a step.

use std::path::Path;
use std::time::{Duration, Instant};

use burn::backend::Autodiff;
use burn::grad_clipping::GradientClippingConfig;
use burn::module::AutodiffModule;
use burn::optim::{AdamWConfig, GradientsAccumulator, GradientsParams, Optimizer};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Int, Tensor, TensorData};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

use super::budget::StepBudget;
use super::dataset::Sequence;
use super::loss::{EvalCounts, EvalReport, SoftLabels, evaluate_batch, teacher_forced_loss};
use super::schedule::LrSchedule;
use super::state::{
    CheckpointPaths, DraftOptimizer, STATE_VERSION, TrainState, load_optimizer,
    save_drafter_checked, save_optimizer,
};
use super::targets::TeacherForcing;
use crate::drafter::{CheckpointDType, DraftVocabulary, RecurrentDrafter, RecurrentDrafterConfig};
use crate::error::{Error, Result};
use crate::target::{Block, TargetModel};

/// The backend the drafter trains on.
pub type TrainBackend<B> = Autodiff<B>;

/// Where the target's hidden states of the dataset are kept between epochs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HiddenCache {
    /// Recompute them for every micro-batch (no memory, one target forward per micro-batch).
    #[default]
    Off,
    /// Compute once, keep in host memory as f32 (`4·H` bytes per token; 2.3 KB for SmolLM2),
    /// upload per micro-batch.
    Host,
    /// Compute once, keep on the device (same size, in device memory).
    Device,
}

impl std::str::FromStr for HiddenCache {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "off" | "none" => Ok(Self::Off),
            "host" => Ok(Self::Host),
            "device" => Ok(Self::Device),
            other => Err(Error::InvalidSettings(format!(
                "unknown hidden-state cache `{other}` (expected off, host or device)"
            ))),
        }
    }
}

/// Training settings. The defaults follow the published recipe where it applies (AdamW,
/// lr 1e-3, no weight decay, 10% warmup, cosine, 2 epochs, 5 draft steps).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// Draft steps K trained per position (the beam length at inference is at most K + 1).
    pub draft_steps: usize,
    /// Peak learning rate.
    pub learning_rate: f64,
    /// AdamW decoupled weight decay.
    pub weight_decay: f64,
    /// Fraction of the steps spent warming up linearly.
    pub warmup_fraction: f64,
    /// Passes over the training set (ignored when `max_steps` is set).
    pub epochs: usize,
    /// Total optimiser steps; overrides `epochs` (the data is cycled as needed).
    pub max_steps: Option<usize>,
    /// Sequences per optimiser step (the recipe uses 128).
    pub batch_size: usize,
    /// Padded tokens (`N·T`) per micro-batch: bounds memory. The target forward holds
    /// `N·T` activations, the drafter about `12·K·P·V` bytes of logits for `P ≤ N·T` trained
    /// pairs per step. Gradients of a step's micro-batches are accumulated.
    pub micro_batch_tokens: usize,
    /// Sequences are truncated to this many tokens (prompt + response).
    pub max_seq_len: usize,
    /// Clip each parameter's gradient to this L2 norm (Burn clips per tensor).
    pub grad_clip_norm: Option<f32>,
    /// Evaluate every this many steps (0: only at the end).
    pub eval_every: usize,
    /// Checkpoint every this many steps (0: only at the end).
    pub checkpoint_every: usize,
    /// Where hidden states are kept between epochs.
    pub hidden_cache: HiddenCache,
    /// Seed of the initial weights and of the data order.
    pub seed: u64,
    /// Continue from the checkpoint at the output path if there is one (its drafter and
    /// `.train.json`; a drafter there without its state is an error, not a fresh start). A
    /// larger `max_steps` than the checkpoint's continues training on a stretched schedule.
    pub resume: bool,
    /// Also keep the drafter with the best held-out `mean_accepted`.
    pub keep_best: bool,
    /// Weight in `[0, 1]` of the cross-entropy against the target's whole distribution at each
    /// label (soft labels, [`SoftLabels`]); the label's own gets `1 - weight`. 0 trains on the
    /// labels alone, as the published recipe does.
    #[serde(default)]
    pub soft_label_weight: f64,
    /// Train on the target's greedy choices: every label becomes the target's argmax at the
    /// position that predicts it ([`TeacherForcing::relabel`]), computed once before the first
    /// step, in the forward that caches the hidden states (without a cache, in a pass of its
    /// own). For drafters of greedy decoding trained on sampled responses: a sampled token the
    /// target would not have chosen is not what verification accepts. Evaluation keeps the
    /// data's tokens, so its accuracies stay comparable between runs.
    #[serde(default)]
    pub greedy_labels: bool,
    /// Train the softmax over this draft vocabulary only (tied head): the drafter is then made
    /// for drafting from it, each step costs `V / N` times less in the head, and labels outside
    /// it are left out of the loss (and count as misses in evaluation). Not serialised (the
    /// training state records its size only).
    #[serde(skip)]
    pub draft_vocabulary: Option<DraftVocabulary>,
    /// Finish within this many seconds of wall-clock time (hidden-state caching included):
    /// after the first [`CALIBRATION_STEPS`](super::CALIBRATION_STEPS) steps the run measures
    /// its pace and, if the configured steps would not fit, lowers the step count — and with it
    /// the cosine schedule, which still decays to zero at the new end. Every
    /// [`REPLAN_EVERY`](super::REPLAN_EVERY) steps after that, until half of this run's steps
    /// are done (a resumed run counts from where it resumed), it measures again and moves the
    /// end either way (the first steps are slow: they compile kernels for new shapes), never
    /// above the configured count. The calibration steps follow the configured schedule: when
    /// resuming, give a step count near what fits, or they run at a learning rate the shortened
    /// schedule would not have used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_budget_secs: Option<f64>,
    /// Start from this drafter's weights instead of a random initialisation (a new run: step 0,
    /// a fresh schedule and optimiser), e.g. to fine-tune a trained drafter on new data or
    /// another objective. Its configuration must be the one asked for, except that it may have
    /// fewer residual blocks: the missing ones are added as the identity
    /// ([`RecurrentDrafter::with_extra_res_blocks`](crate::drafter::RecurrentDrafter::with_extra_res_blocks)),
    /// and that it may read no tapped layer where the one asked for reads some: they are added
    /// through a zero projection
    /// ([`RecurrentDrafter::with_tapped_layers`](crate::drafter::RecurrentDrafter::with_tapped_layers)).
    /// A checkpoint found by `resume` takes precedence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_from: Option<std::path::PathBuf>,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            draft_steps: crate::drafter::DEFAULT_TRAINED_STEPS,
            learning_rate: 1e-3,
            weight_decay: 0.0,
            warmup_fraction: 0.1,
            epochs: 2,
            max_steps: None,
            batch_size: 32,
            micro_batch_tokens: 8192,
            max_seq_len: 2048,
            grad_clip_norm: None,
            eval_every: 100,
            checkpoint_every: 100,
            hidden_cache: HiddenCache::Off,
            seed: 0,
            resume: false,
            keep_best: true,
            soft_label_weight: 0.0,
            greedy_labels: false,
            draft_vocabulary: None,
            time_budget_secs: None,
            init_from: None,
        }
    }
}

impl TrainConfig {
    /// Rejects settings that cannot train.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(Error::InvalidSettings(m.into()));
        if self.draft_steps == 0 {
            return bad("draft_steps must be at least 1");
        }
        if !(self.learning_rate.is_finite() && self.learning_rate > 0.0) {
            return bad("learning_rate must be finite and positive");
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return bad("weight_decay must be finite and ≥ 0");
        }
        if !(0.0..=1.0).contains(&self.warmup_fraction) {
            return bad("warmup_fraction must be in [0, 1]");
        }
        if self.batch_size == 0 || self.micro_batch_tokens == 0 {
            return bad("batch_size and micro_batch_tokens must be at least 1");
        }
        if self.max_seq_len < 2 {
            return bad("max_seq_len must be at least 2");
        }
        if self.max_steps.is_none() && self.epochs == 0 {
            return bad("give at least one epoch or a step count");
        }
        if self
            .time_budget_secs
            .is_some_and(|t| !(t.is_finite() && t > 0.0))
        {
            return bad("time_budget_secs must be finite and positive");
        }
        if !(0.0..=1.0).contains(&self.soft_label_weight) {
            return bad("soft_label_weight must be in [0, 1]");
        }
        if self
            .grad_clip_norm
            .is_some_and(|c| !(c.is_finite() && c > 0.0))
        {
            return bad("grad_clip_norm must be finite and positive");
        }
        Ok(())
    }
}

/// What one optimiser step did.
#[derive(Debug, Clone, PartialEq)]
pub struct StepReport {
    /// Steps done, this one included.
    pub step: usize,
    pub total_steps: usize,
    /// Epoch of this step (0-based).
    pub epoch: usize,
    /// Training loss: sum over draft steps of the mean cross-entropy.
    pub loss: f64,
    /// Mean cross-entropy per draft step.
    pub step_loss: Vec<f64>,
    /// Learning rate applied.
    pub learning_rate: f64,
    /// Sequences in the step.
    pub sequences: usize,
    /// Response tokens trained at draft step 1.
    pub trained_positions: usize,
    /// Padded tokens the target processed (0 when cached).
    pub target_tokens: usize,
    pub micro_batches: usize,
}

/// Progress events of [`train_drafter`], for progress bars and logs.
#[derive(Debug)]
pub enum TrainEvent<'a> {
    /// Training starts at `start_step` (nonzero when resumed).
    Started {
        start_step: usize,
        total_steps: usize,
        steps_per_epoch: usize,
    },
    /// Hidden-state cache filling: `done` of `total` sequences.
    CachingHidden { done: usize, total: usize },
    /// An optimiser step finished.
    Step(&'a StepReport),
    /// A held-out evaluation finished after `step` steps.
    Eval { step: usize, report: &'a EvalReport },
    /// A checkpoint was written after `step` steps.
    Checkpoint { step: usize, path: &'a Path },
    /// The time budget moved the run's end to `total_steps` (the schedule follows).
    Rescheduled { total_steps: usize },
}

/// What a training run did.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainReport {
    /// Step the run started from (0, or the resumed step).
    pub start_step: usize,
    /// Steps done in total.
    pub steps: usize,
    /// Loss of this run's first and last step.
    pub first_loss: Option<f64>,
    pub last_loss: Option<f64>,
    /// Final held-out evaluation (if there is an eval set).
    pub eval: Option<EvalReport>,
    /// Best held-out `mean_accepted`.
    pub best_eval: Option<f64>,
    /// Whether a resumed run restored the AdamW moments (else they restarted from zero).
    pub optimizer_restored: bool,
    /// Wall time of the whole run, the hidden-state cache included.
    pub elapsed: Duration,
    /// Wall time spent filling the hidden-state caches (zero with [`HiddenCache::Off`]).
    pub caching: Duration,
    /// Mean wall time per step over the second half of this run's steps (with the evaluations
    /// and checkpoints that fell there), `None` below two steps. The first steps compile GPU
    /// kernels; `elapsed − caching − steps × steady_step_secs` is what that warm-up cost.
    pub steady_step_secs: Option<f64>,
}

/// Trains a draft head for `target` on `train` (evaluating on `eval`) and writes it to `out`
/// (plus the checkpoint files of [`CheckpointPaths`]).
///
/// The target stays on `B` and is never differentiated; the drafter trains on `Autodiff<B>` in
/// f32 (a half-precision target's hidden states and embeddings are cast). `save_dtype` is the
/// element type of the written drafter; keep F32 if you intend to resume.
///
/// # Errors
/// - [`Error::InvalidSettings`] for unusable settings, [`Error::Data`] for an empty training set;
/// - [`Error::NonFiniteLoss`] when the loss (or a parameter at a checkpoint) stops being
///   finite — the last written checkpoint is left as it was;
/// - [`Error::DrafterMismatch`] / [`Error::InvalidConfig`] if the drafter does not fit the
///   target, or a checkpoint to resume has another configuration;
/// - target, I/O and checkpoint errors.
#[allow(clippy::too_many_arguments)]
pub fn train_drafter<B: Backend, T: TargetModel<B>>(
    target: &T,
    drafter_config: &RecurrentDrafterConfig,
    train: &[Sequence],
    eval: &[Sequence],
    out: impl AsRef<Path>,
    config: &TrainConfig,
    save_dtype: CheckpointDType,
    mut on_event: impl FnMut(TrainEvent<'_>),
) -> Result<TrainReport> {
    config.validate()?;
    let started = Instant::now();
    let device = target.device();
    let paths = CheckpointPaths::new(out);
    // The checkpoint files are written beside the output; its folder may not exist yet.
    if let Some(dir) = paths.drafter.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    let drafter_config = drafter_config
        .clone()
        .with_trained_steps(Some(config.draft_steps));
    let max_len = config.max_seq_len.min(target.max_context());
    let train = truncated(train, max_len);
    let eval = truncated(eval, max_len);
    if train.is_empty() {
        return Err(Error::Data(
            "no training sequence with a response token".into(),
        ));
    }
    check_tokens(&train, target.vocab_size())?;
    check_tokens(&eval, target.vocab_size())?;

    let steps_per_epoch = train.len().div_ceil(config.batch_size);
    let mut total_steps = config.max_steps.unwrap_or(config.epochs * steps_per_epoch);
    let mut schedule =
        LrSchedule::cosine_with_warmup(config.learning_rate, config.warmup_fraction, total_steps);

    // The drafter's frozen tables, as autodiff constants in f32.
    let input_embedding =
        Tensor::<TrainBackend<B>, 2>::from_inner(target.input_embedding().cast(DType::F32));
    let output_embedding =
        Tensor::<TrainBackend<B>, 2>::from_inner(target.output_embedding().cast(DType::F32));
    let output_table = output_embedding.clone();
    let mut optimizer: DraftOptimizer<TrainBackend<B>> = AdamWConfig::new()
        .with_weight_decay(config.weight_decay as f32)
        // PyTorch's AdamW default, which the recipe used (Burn defaults to 1e-5).
        .with_epsilon(1e-8)
        .with_grad_clipping(config.grad_clip_norm.map(GradientClippingConfig::Norm))
        .init();

    let mut state = TrainState {
        version: STATE_VERSION,
        step: 0,
        epoch: 0,
        total_steps,
        steps_per_epoch,
        last_loss: None,
        last_eval: None,
        best_eval: None,
        best_step: None,
        train_sequences: train.len(),
        eval_sequences: eval.len(),
        drafter: drafter_config.clone(),
        config: config.clone(),
        draft_vocabulary_size: config.draft_vocabulary.as_ref().map(DraftVocabulary::len),
    };
    let resumed = if config.resume {
        let previous = TrainState::read(&paths.state)?;
        if previous.is_none() {
            // Starting over would silently overwrite a drafter the user meant to continue.
            if paths.drafter.exists() {
                return Err(Error::InvalidConfig(format!(
                    "cannot resume: {} exists but {} does not, so the step its training reached \
                     is unknown (restore that file, or train into another output)",
                    paths.drafter.display(),
                    paths.state.display()
                )));
            }
            tracing::warn!(
                path = %paths.state.display(),
                "nothing to resume; training from the start"
            );
        }
        previous
    } else {
        None
    };
    let mut optimizer_restored = false;
    let drafter = match resumed {
        Some(previous) => {
            if previous.drafter != drafter_config {
                return Err(Error::InvalidConfig(format!(
                    "{} was trained with drafter {:?}; asked for {:?}",
                    paths.state.display(),
                    previous.drafter,
                    drafter_config
                )));
            }
            if previous.total_steps != total_steps {
                tracing::warn!(
                    before = previous.total_steps,
                    now = total_steps,
                    "resuming with another step count: the learning-rate schedule changes"
                );
            }
            let drafter =
                RecurrentDrafter::<TrainBackend<B>>::load_parameters(&paths.drafter, &device)?
                    .with_embeddings(input_embedding, output_embedding)?;
            if drafter.config() != &drafter_config {
                return Err(Error::InvalidConfig(format!(
                    "{} holds drafter {:?}; asked for {:?}",
                    paths.drafter.display(),
                    drafter.config(),
                    drafter_config
                )));
            }
            if paths.optimizer.exists() {
                optimizer = match load_optimizer(
                    optimizer.clone(),
                    &drafter,
                    &paths.optimizer,
                    &device,
                ) {
                    Ok(loaded) => {
                        optimizer_restored = true;
                        loaded
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "optimiser state not restored; AdamW moments restart");
                        optimizer
                    }
                };
            }
            tracing::info!(step = previous.step, path = %paths.drafter.display(), "resuming training");
            state.step = previous.step;
            state.best_eval = previous.best_eval;
            state.best_step = previous.best_step;
            state.last_loss = previous.last_loss;
            state.last_eval = previous.last_eval;
            drafter
        }
        None => match &config.init_from {
            Some(path) => {
                let mut drafter =
                    RecurrentDrafter::<TrainBackend<B>>::load_parameters(path, &device)?
                        .with_embeddings(input_embedding, output_embedding)?;
                // A shallower head grows: the new blocks start as the identity. A head that
                // reads no layer learns to read some from a zero correction.
                let loaded = drafter.config().clone();
                let taps = &drafter_config.tapped_layers;
                if loaded.tapped_layers.is_empty() && !taps.is_empty() {
                    tracing::info!(layers = ?taps, "adding tapped layers through a zero projection");
                    drafter = drafter.with_tapped_layers(taps.clone())?;
                }
                let loaded = drafter.config().clone();
                let extra = drafter_config
                    .num_draft_layers
                    .saturating_sub(loaded.num_draft_layers);
                if extra > 0
                    && loaded
                        .clone()
                        .with_num_draft_layers(drafter_config.num_draft_layers)
                        == drafter_config
                {
                    tracing::info!(
                        from = loaded.num_draft_layers,
                        to = drafter_config.num_draft_layers,
                        "adding residual blocks that start as the identity"
                    );
                    drafter = drafter.with_extra_res_blocks(extra);
                }
                if drafter.config() != &drafter_config {
                    return Err(Error::InvalidConfig(format!(
                        "{} holds drafter {:?}; asked for {:?}",
                        path.display(),
                        drafter.config(),
                        drafter_config
                    )));
                }
                tracing::info!(path = %path.display(), "starting from a trained drafter");
                drafter
            }
            // `with_embeddings` checks the tables against the configuration's sizes.
            None => drafter_config
                .init_seeded::<TrainBackend<B>>(config.seed, &device)?
                .with_embeddings(input_embedding, output_embedding)?,
        },
    };
    let mut drafter = match &config.draft_vocabulary {
        // Errors for a separate head or a vocabulary of another size, before any target work.
        Some(vocabulary) => drafter.with_draft_vocabulary(vocabulary.clone())?,
        None => drafter,
    };
    // The target's LM head over the tokens the drafter scores, for soft labels.
    let soft_table = (config.soft_label_weight > 0.0).then(|| match drafter.draft_ids() {
        Some(ids) => output_table.clone().select(0, ids.clone()),
        None => output_table.clone(),
    });
    let start_step = state.step;
    on_event(TrainEvent::Started {
        start_step,
        total_steps,
        steps_per_epoch,
    });

    // Sequences the target runs over before the first step.
    let hidden_total = match (config.hidden_cache, config.greedy_labels) {
        (HiddenCache::Off, false) => 0,
        (HiddenCache::Off, true) => train.len(),
        _ => train.len() + eval.len(),
    };
    let mut cached = 0;
    let mut caching = |done: usize| {
        cached += done;
        on_event(TrainEvent::CachingHidden {
            done: cached,
            total: hidden_total,
        });
    };
    let caching_started = Instant::now();
    // The target layers the head reads besides the final hidden state: cached beside it.
    let taps = drafter.config().tapped_layers.clone();
    let (train_hidden, train_predictions) = HiddenStore::build(
        target,
        &train,
        config,
        &taps,
        config.greedy_labels,
        &mut caching,
    )?;
    let (eval_hidden, _) = HiddenStore::build(target, &eval, config, &taps, false, &mut caching)?;
    let caching_time = caching_started.elapsed();
    tracing::info!(
        secs = caching_time.as_secs_f64(),
        "hidden states ready (cached or not needed)"
    );

    let mut report = TrainReport {
        start_step,
        steps: start_step,
        first_loss: None,
        last_loss: state.last_loss,
        eval: state.last_eval.clone(),
        best_eval: state.best_eval,
        optimizer_restored,
        elapsed: Duration::ZERO,
        caching: caching_time,
        steady_step_secs: None,
    };
    // When each of this run's steps ended, seconds into the run.
    let mut step_ends: Vec<f64> = Vec::new();
    let mut order: Option<(usize, Vec<usize>)> = None;
    let mut budget = config
        .time_budget_secs
        .map(|secs| StepBudget::new(secs, start_step, total_steps));
    for step in start_step.. {
        if step >= total_steps {
            break;
        }
        let epoch = step / steps_per_epoch;
        if order.as_ref().is_none_or(|(e, _)| *e != epoch) {
            order = Some((epoch, epoch_order(train.len(), config.seed, epoch)));
        }
        let (_, indices) = order.as_ref().expect("order set above");
        let within = step % steps_per_epoch;
        let batch = &indices
            [within * config.batch_size..((within + 1) * config.batch_size).min(indices.len())];

        let micro = micro_batches(&train, batch, config.micro_batch_tokens);
        let layouts: Vec<TeacherForcing> = micro
            .iter()
            .map(|ids| {
                layout_for(
                    &drafter,
                    &train,
                    train_predictions.as_deref(),
                    ids,
                    config.draft_steps,
                )
            })
            .collect::<Result<_>>()?;
        let mut normalizers = vec![0usize; config.draft_steps];
        for layout in &layouts {
            for (n, c) in normalizers.iter_mut().zip(layout.counts()) {
                *n += c;
            }
        }
        let mut accumulator = GradientsAccumulator::<RecurrentDrafter<TrainBackend<B>>>::new();
        let mut step_loss: Option<Tensor<B, 1>> = None;
        let mut target_tokens = 0;
        for (ids, layout) in micro.iter().zip(&layouts) {
            if layout.counts().iter().all(|&c| c == 0) {
                continue;
            }
            let hidden = train_hidden.get(target, &train, ids, layout.width, &taps)?;
            if matches!(train_hidden, HiddenStore::Off) {
                target_tokens += layout.padded_tokens();
            }
            let soft = soft_table.as_ref().map(|table| SoftLabels {
                weight: config.soft_label_weight as f32,
                table,
            });
            let losses = teacher_forced_loss(
                &drafter,
                Tensor::from_inner(hidden),
                layout,
                &normalizers,
                soft,
            )?;
            let value = losses.clone().inner();
            step_loss = Some(match step_loss {
                None => value,
                Some(sum) => sum + value,
            });
            let gradients = GradientsParams::from_grads(losses.sum().backward(), &drafter);
            accumulator.accumulate(&drafter, gradients);
        }
        // The step's only readback.
        let step_losses: Vec<f64> = match step_loss {
            Some(losses) => losses.into_data().iter::<f64>().collect(),
            None => vec![0.0; config.draft_steps],
        };
        let loss: f64 = step_losses.iter().sum();
        if !loss.is_finite() {
            tracing::error!(
                step = step + 1,
                loss,
                "non-finite loss; stopping, the last checkpoint is kept"
            );
            return Err(Error::NonFiniteLoss {
                step: step + 1,
                loss,
            });
        }
        let learning_rate = schedule.at(step);
        drafter = optimizer.step(learning_rate, drafter, accumulator.grads());

        state.step = step + 1;
        state.epoch = (step + 1) / steps_per_epoch;
        state.last_loss = Some(loss);
        report.steps = step + 1;
        report.first_loss.get_or_insert(loss);
        report.last_loss = Some(loss);
        let step_report = StepReport {
            step: step + 1,
            total_steps,
            epoch,
            loss,
            step_loss: step_losses,
            learning_rate,
            sequences: batch.len(),
            trained_positions: normalizers[0],
            target_tokens,
            micro_batches: micro.len(),
        };
        tracing::debug!(step = step + 1, loss, learning_rate, "step");
        on_event(TrainEvent::Step(&step_report));

        if let Some(planned) = budget.as_mut().and_then(|budget| {
            budget.after_step(step + 1, started.elapsed().as_secs_f64(), total_steps)
        }) {
            tracing::info!(
                before = total_steps,
                now = planned,
                "time budget: the run's end moves, the schedule with it"
            );
            total_steps = planned;
            schedule = LrSchedule::cosine_with_warmup(
                config.learning_rate,
                config.warmup_fraction,
                total_steps,
            );
            state.total_steps = total_steps;
            on_event(TrainEvent::Rescheduled { total_steps });
        }
        let last = step + 1 == total_steps;
        let due = |every: usize| last || (every > 0 && (step + 1) % every == 0);
        if due(config.eval_every) && !eval.is_empty() {
            let inference = drafter.valid();
            let result = evaluate_with(target, &inference, &eval, &eval_hidden, config)?;
            if !result.loss.is_finite() {
                return Err(Error::NonFiniteLoss {
                    step: step + 1,
                    loss: result.loss,
                });
            }
            tracing::info!(
                step = step + 1,
                loss = result.loss,
                mean_accepted = result.mean_accepted,
                accuracy = ?result.step_accuracy,
                "evaluation"
            );
            on_event(TrainEvent::Eval {
                step: step + 1,
                report: &result,
            });
            if state
                .best_eval
                .is_none_or(|best| result.mean_accepted > best)
            {
                state.best_eval = Some(result.mean_accepted);
                state.best_step = Some(step + 1);
                if config.keep_best {
                    save_drafter_checked(&inference, &paths.best, save_dtype, step + 1)?;
                }
            }
            report.best_eval = state.best_eval;
            report.eval = Some(result.clone());
            state.last_eval = Some(result);
        }
        if due(config.checkpoint_every) {
            checkpoint(&drafter, &optimizer, &state, &paths, save_dtype)?;
            on_event(TrainEvent::Checkpoint {
                step: step + 1,
                path: &paths.drafter,
            });
        }
        step_ends.push(started.elapsed().as_secs_f64());
    }
    if start_step >= total_steps {
        tracing::info!(
            step = start_step,
            "nothing to train: the checkpoint is complete"
        );
    }
    report.elapsed = started.elapsed();
    report.steady_step_secs = steady_pace(&step_ends);
    Ok(report)
}

/// Mean seconds per step over the second half of the steps that ended at `ends` (seconds into
/// the run, in order); `None` below two steps.
fn steady_pace(ends: &[f64]) -> Option<f64> {
    let n = ends.len();
    if n < 2 {
        return None;
    }
    let half = n / 2;
    Some((ends[n - 1] - ends[half - 1]) / (n - half) as f64)
}

/// The teacher-forcing layout of the micro-batch `ids`, labelled with the target's
/// `predictions` (one per token of every sequence) where given, and restricted to the drafter's
/// draft vocabulary when it has one (its logits then cover that vocabulary alone).
fn layout_for<B: Backend>(
    drafter: &RecurrentDrafter<B>,
    sequences: &[Sequence],
    predictions: Option<&[Vec<u32>]>,
    ids: &[usize],
    steps: usize,
) -> Result<TeacherForcing> {
    let refs: Vec<&Sequence> = ids.iter().map(|&i| &sequences[i]).collect();
    let mut layout = TeacherForcing::new(&refs, steps);
    if let Some(predictions) = predictions {
        let rows: Vec<&[u32]> = ids.iter().map(|&i| predictions[i].as_slice()).collect();
        layout.relabel(&rows)?;
    }
    if let Some(vocabulary) = drafter.draft_vocabulary() {
        layout.restrict(vocabulary);
    }
    Ok(layout)
}

/// Writes the optimiser state, the drafter and then the training state (which refers to both).
fn checkpoint<B: Backend>(
    drafter: &RecurrentDrafter<TrainBackend<B>>,
    optimizer: &DraftOptimizer<TrainBackend<B>>,
    state: &TrainState,
    paths: &CheckpointPaths,
    dtype: CheckpointDType,
) -> Result<()> {
    let inference = drafter.valid();
    // Checked first so that a diverged drafter writes nothing at all.
    save_drafter_checked(&inference, &paths.drafter, dtype, state.step)?;
    save_optimizer(optimizer, drafter, &paths.optimizer)?;
    state.write(&paths.state)?;
    tracing::info!(step = state.step, path = %paths.drafter.display(), "checkpoint");
    Ok(())
}

/// Evaluates `drafter` on `sequences` (teacher-forced, see [`EvalReport`]), running the target
/// for their hidden states in micro-batches of at most `micro_batch_tokens` padded tokens.
///
/// # Errors
/// [`Error::InvalidSettings`] for `draft_steps == 0`; target and drafter errors.
pub fn evaluate_drafter<B: Backend, T: TargetModel<B>>(
    target: &T,
    drafter: &RecurrentDrafter<B>,
    sequences: &[Sequence],
    draft_steps: usize,
    micro_batch_tokens: usize,
) -> Result<EvalReport> {
    let config = TrainConfig {
        draft_steps,
        micro_batch_tokens,
        ..TrainConfig::default()
    };
    config.validate()?;
    let sequences = truncated(sequences, target.max_context());
    evaluate_with(target, drafter, &sequences, &HiddenStore::Off, &config)
}

fn evaluate_with<B: Backend, T: TargetModel<B>>(
    target: &T,
    drafter: &RecurrentDrafter<B>,
    sequences: &[Sequence],
    hidden: &HiddenStore<B>,
    config: &TrainConfig,
) -> Result<EvalReport> {
    let all: Vec<usize> = (0..sequences.len()).collect();
    let mut counts = EvalCounts::default();
    for ids in micro_batches(sequences, &all, config.micro_batch_tokens) {
        let layout = layout_for(drafter, sequences, None, &ids, config.draft_steps)?;
        let taps = &drafter.config().tapped_layers;
        let states = hidden.get(target, sequences, &ids, layout.width, taps)?;
        counts.merge(&evaluate_batch(drafter, states, &layout)?);
    }
    Ok(counts.report())
}

/// Runs the target on right-padded sequences (causal attention, a fresh cache) and returns its
/// final-norm hidden states and a draft head's features: the hidden states followed by the
/// outputs of the layers `taps` ([`TargetModel::forward_tapped`]), side by side, all in f32 (the
/// features are the hidden states themselves without taps).
///
/// # Shapes
/// returns `[N, width, H]` and `[N, width, H · (1 + taps)]`
pub fn target_features<B: Backend, T: TargetModel<B>>(
    target: &T,
    sequences: &[&Sequence],
    width: usize,
    taps: &[usize],
) -> Result<(Tensor<B, 3>, Tensor<B, 3>)> {
    let device = target.device();
    let n = sequences.len();
    if n == 0 || width == 0 {
        return Err(Error::EmptyInput("no tokens to run the target on".into()));
    }
    let mut tokens = vec![0i64; n * width];
    for (row, seq) in sequences.iter().enumerate() {
        for (t, &token) in seq.tokens.iter().take(width).enumerate() {
            tokens[row * width + t] = token as i64;
        }
    }
    // Every row starts at position 0; padding continues the count and is never read (causal
    // attention keeps it out of real tokens' context).
    let positions: Vec<i64> = (0..n).flat_map(|_| 0..width as i64).collect();
    let block = Block {
        tokens: Tensor::<B, 2, Int>::from_data(TensorData::new(tokens, [n, width]), &device),
        positions: Tensor::<B, 2, Int>::from_data(TensorData::new(positions, [n, width]), &device),
        // None = causal over the (empty) cache: exactly right for right-padded rows.
        bias: None,
    };
    let mut cache = target.new_cache(n, width);
    let (hidden, tapped) = target.forward_tapped(&block, &mut cache, taps)?;
    let hidden = hidden.cast(DType::F32);
    let features = if tapped.is_empty() {
        hidden.clone()
    } else {
        let mut parts = vec![hidden.clone()];
        parts.extend(tapped.into_iter().map(|t| t.cast(DType::F32)));
        Tensor::cat(parts, 2)
    };
    Ok((hidden, features))
}

/// Hidden states of a sequence set, recomputed or cached.
enum HiddenStore<B: Backend> {
    Off,
    /// Per sequence, `len·H` f32 values.
    Host {
        /// `H`, or the head's feature width `H · (1 + taps)` when it taps layers.
        hidden_size: usize,
        states: Vec<Vec<f32>>,
    },
    /// Per sequence, `[len, H]` (`[len, H · (1 + taps)]` when the head taps layers).
    Device(Vec<Tensor<B, 2>>),
}

impl<B: Backend> HiddenStore<B> {
    /// Fills the cache the configuration asks for, reporting sequences done; with `predict`,
    /// also the target's greedy choice at every position of every sequence (the argmax of its
    /// logits there), from the same forward.
    fn build<T: TargetModel<B>>(
        target: &T,
        sequences: &[Sequence],
        config: &TrainConfig,
        taps: &[usize],
        predict: bool,
        mut progress: impl FnMut(usize),
    ) -> Result<(Self, Option<Vec<Vec<u32>>>)> {
        if (config.hidden_cache == HiddenCache::Off && !predict) || sequences.is_empty() {
            return Ok((Self::Off, predict.then(Vec::new)));
        }
        let h = target.hidden_size() * (1 + taps.len());
        let mut host: Vec<Vec<f32>> = vec![Vec::new(); sequences.len()];
        let mut device: Vec<Option<Tensor<B, 2>>> = vec![None; sequences.len()];
        let mut predictions: Vec<Vec<u32>> =
            vec![Vec::new(); if predict { sequences.len() } else { 0 }];
        let all: Vec<usize> = (0..sequences.len()).collect();
        for ids in micro_batches(sequences, &all, config.micro_batch_tokens) {
            let refs: Vec<&Sequence> = ids.iter().map(|&i| &sequences[i]).collect();
            let width = refs.iter().map(|s| s.len()).max().unwrap_or(0);
            let (hidden, features) = target_features(target, &refs, width, taps)?;
            if predict {
                let choices = target
                    .logits(hidden.clone())
                    .argmax(2)
                    .into_data()
                    .iter::<i64>()
                    .map(|id| id as u32)
                    .collect::<Vec<u32>>();
                for (row, &i) in ids.iter().enumerate() {
                    predictions[i] =
                        choices[row * width..row * width + sequences[i].len()].to_vec();
                }
            }
            match config.hidden_cache {
                HiddenCache::Host => {
                    let values: Vec<f32> = features.into_data().iter::<f32>().collect();
                    for (row, &i) in ids.iter().enumerate() {
                        let start = row * width * h;
                        host[i] = values[start..start + sequences[i].len() * h].to_vec();
                    }
                }
                HiddenCache::Device => {
                    for (row, &i) in ids.iter().enumerate() {
                        let len = sequences[i].len();
                        device[i] = Some(
                            features
                                .clone()
                                .slice([row..row + 1, 0..len, 0..h])
                                .reshape([len, h]),
                        );
                    }
                }
                // Only the predictions were asked for.
                HiddenCache::Off => {}
            }
            progress(ids.len());
        }
        let store = match config.hidden_cache {
            HiddenCache::Off => Self::Off,
            HiddenCache::Host => Self::Host {
                hidden_size: h,
                states: host,
            },
            HiddenCache::Device => Self::Device(
                device
                    .into_iter()
                    .map(|t| t.expect("every sequence cached"))
                    .collect(),
            ),
        };
        Ok((store, predict.then_some(predictions)))
    }

    /// The head's features (hidden states, and the layers `taps` it reads) of the sequences
    /// `ids`, right-padded with zeros to `width`.
    ///
    /// # Shapes
    /// returns `[ids.len(), width, H · (1 + taps)]`
    fn get<T: TargetModel<B>>(
        &self,
        target: &T,
        sequences: &[Sequence],
        ids: &[usize],
        width: usize,
        taps: &[usize],
    ) -> Result<Tensor<B, 3>> {
        match self {
            Self::Off => {
                let refs: Vec<&Sequence> = ids.iter().map(|&i| &sequences[i]).collect();
                Ok(target_features(target, &refs, width, taps)?.1)
            }
            Self::Host {
                hidden_size,
                states,
            } => {
                let h = *hidden_size;
                let mut values = vec![0.0f32; ids.len() * width * h];
                for (row, &i) in ids.iter().enumerate() {
                    let state = &states[i];
                    values[row * width * h..row * width * h + state.len()].copy_from_slice(state);
                }
                Ok(Tensor::from_data(
                    TensorData::new(values, [ids.len(), width, h]),
                    &target.device(),
                ))
            }
            Self::Device(states) => {
                let rows: Vec<Tensor<B, 3>> = ids
                    .iter()
                    .map(|&i| {
                        let state = states[i].clone();
                        let [len, h] = state.dims();
                        let state = if len < width {
                            let padding = Tensor::zeros([width - len, h], &state.device());
                            Tensor::cat(vec![state, padding], 0)
                        } else {
                            state
                        };
                        state.unsqueeze_dim::<3>(0)
                    })
                    .collect();
                Ok(Tensor::cat(rows, 0))
            }
        }
    }
}

/// Sequences truncated to `max_len`, dropping those left without a response token.
fn truncated(sequences: &[Sequence], max_len: usize) -> Vec<Sequence> {
    sequences
        .iter()
        .filter_map(|s| {
            // Sequences are public structs: a prompt length past the end means "no response".
            let prompt_len = s.prompt_len.min(s.len());
            if s.len() <= max_len && prompt_len < s.len() {
                Some(s.clone())
            } else {
                Sequence::new(&s.tokens[..prompt_len], &s.tokens[prompt_len..], max_len)
            }
        })
        .collect()
}

fn check_tokens(sequences: &[Sequence], vocab_size: usize) -> Result<()> {
    for s in sequences {
        if let Some(&token) = s.tokens.iter().find(|&&t| t as usize >= vocab_size) {
            return Err(Error::TokenOutOfRange { token, vocab_size });
        }
    }
    Ok(())
}

/// The epoch's seeded permutation of `0..n`.
fn epoch_order(n: usize, seed: u64, epoch: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng =
        StdRng::seed_from_u64(seed ^ (epoch as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    order.shuffle(&mut rng);
    order
}

/// Cuts `batch` (indices into `sequences`) into micro-batches of at most `token_budget` padded
/// tokens: longest first, each micro-batch as many sequences as fit (at least one).
pub(crate) fn micro_batches(
    sequences: &[Sequence],
    batch: &[usize],
    token_budget: usize,
) -> Vec<Vec<usize>> {
    let mut sorted = batch.to_vec();
    sorted.sort_by_key(|&i| std::cmp::Reverse(sequences[i].len()));
    let mut out: Vec<Vec<usize>> = Vec::new();
    let mut current: Vec<usize> = Vec::new();
    let mut width = 0;
    for i in sorted {
        let len = sequences[i].len();
        let new_width = width.max(len);
        if !current.is_empty() && (current.len() + 1) * new_width > token_budget {
            out.push(std::mem::take(&mut current));
            width = 0;
        }
        width = width.max(len);
        current.push(i);
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steady_pace_is_timed_over_the_second_half() {
        assert_eq!(steady_pace(&[]), None);
        assert_eq!(steady_pace(&[3.0]), None);
        // Four slow steps (compiling), then four of 0.5 s: the second half sees only the latter.
        let ends = [10.0, 20.0, 30.0, 40.0, 40.5, 41.0, 41.5, 42.0];
        assert_eq!(steady_pace(&ends), Some(0.5));
        // An odd count times the larger half.
        assert_eq!(steady_pace(&[1.0, 2.0, 4.0]), Some(1.5));
    }

    #[test]
    fn micro_batches_respect_the_budget_and_keep_everything() {
        let seqs: Vec<Sequence> = [5, 9, 3, 12, 7, 7, 2]
            .iter()
            .map(|&len| Sequence::new(&[1], &vec![2; len - 1], 100).unwrap())
            .collect();
        let all: Vec<usize> = (0..seqs.len()).collect();
        let micro = micro_batches(&seqs, &all, 24);
        let mut seen: Vec<usize> = micro.concat();
        seen.sort();
        assert_eq!(seen, all);
        for ids in &micro {
            let width = ids.iter().map(|&i| seqs[i].len()).max().unwrap();
            assert!(ids.len() == 1 || ids.len() * width <= 24, "{micro:?}");
        }
        // A sequence longer than the budget still gets a micro-batch of its own.
        assert_eq!(micro_batches(&seqs, &[3], 4), vec![vec![3]]);
    }

    #[test]
    fn epoch_orders_are_seeded_permutations() {
        let a = epoch_order(50, 1, 0);
        assert_eq!(a, epoch_order(50, 1, 0));
        assert_ne!(a, epoch_order(50, 1, 1));
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, (0..50).collect::<Vec<_>>());
    }
}
