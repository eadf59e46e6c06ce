//! Draft-head training end to end on a tiny random target (CPU): self-distillation data, training,
//! τ with the speculative decoder, checkpoints, resume and divergence handling.
#![cfg(feature = "train")]

#[path = "../examples/common/toy_model.rs"]
mod toy_model;

use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use redrafter::decoder::{Acceptance, SpeculativeConfig, SpeculativeDecoder};
use redrafter::drafter::{
    CheckpointDType, DraftHeadKind, DraftVocabulary, RecurrentDrafter, RecurrentDrafterConfig,
};
use redrafter::train::data::{
    DataCounts, DataGenConfig, MANIFEST_VERSION, Manifest, PromptSource, ResponseSource,
    TargetIdentity, TokenizedPrompt, generate_dataset,
};
use redrafter::train::state::{CheckpointPaths, TrainState};
use redrafter::train::{
    Sequence, TrainConfig, TrainReport, load_training_data, split_eval, train_drafter,
};
use redrafter::{Block, Error, GenerationConfig, KvCache, TargetModel, generate};
use toy_model::{ToyConfig, ToyModel};

type B = redrafter::backend::Cpu;

const TOY: ToyConfig = ToyConfig {
    vocab: 64,
    hidden: 32,
    heads: 4,
    layers: 2,
    max_len: 128,
};
/// LM-head scale of the toy target: peaked enough that its greedy continuations follow
/// learnable patterns rather than near-ties.
const SHARPNESS: f32 = 4.0;
const NEW_TOKENS: usize = 24;
const DRAFT_STEPS: usize = 3;

/// The backend RNG is global: build models one at a time so each gets the same weights.
static MODEL_LOCK: Mutex<()> = Mutex::new(());

fn toy() -> ToyModel<B> {
    let _guard = MODEL_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let device = Default::default();
    B::seed(&device, 11);
    ToyModel::new(TOY, SHARPNESS, &device)
}

fn temp_dir(name: &str) -> PathBuf {
    let dir =
        std::env::temp_dir().join(format!("redrafter-train-e2e-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn random_prompts(count: usize, seed: u64) -> Vec<TokenizedPrompt> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..count)
        .map(|index| {
            let len = rng.random_range(3..9);
            TokenizedPrompt {
                index,
                ids: (0..len)
                    .map(|_| rng.random_range(0..TOY.vocab as u32))
                    .collect(),
                reference_ids: None,
            }
        })
        .collect()
}

fn greedy() -> GenerationConfig {
    GenerationConfig::default().with_max_new_tokens(NEW_TOKENS)
}

/// Generates the toy target's greedy answers to `count` random prompts into `dir`.
fn make_dataset(model: &ToyModel<B>, dir: &Path, count: usize) -> Manifest {
    let config = DataGenConfig {
        generation: greedy(),
        batch_size: 32,
        ..DataGenConfig::default()
    };
    let manifest = Manifest {
        version: MANIFEST_VERSION,
        target: TargetIdentity::named("toy", TOY.hidden, TOY.vocab),
        source: PromptSource {
            path: "random".into(),
            sha256: None,
            fields: "ids".into(),
            reference_field: None,
            system: None,
        },
        responses: ResponseSource::Generated,
        generation: config.generation.clone(),
        max_prompt_tokens: config.max_prompt_tokens,
        counts: DataCounts::default(),
    };
    generate_dataset(
        model,
        &random_prompts(count, 1),
        dir,
        manifest,
        &config,
        |_| {},
    )
    .unwrap()
}

fn drafter_config() -> RecurrentDrafterConfig {
    RecurrentDrafterConfig::new(TOY.hidden, TOY.vocab).with_head(DraftHeadKind::Separate)
}

fn tau<D: redrafter::drafter::DraftHead<B> + Sync>(
    model: &ToyModel<B>,
    drafter: &D,
    prompts: &[Vec<u32>],
) -> f64 {
    let config = SpeculativeConfig::default()
        .beam_width(4)
        .beam_length(DRAFT_STEPS + 1)
        .acceptance(Acceptance::Greedy)
        .generation(greedy());
    let decoder = SpeculativeDecoder::new(model, drafter, config).unwrap();
    let output = decoder.generate(prompts, |_, _| {}).unwrap();
    // Lossless: whatever the drafter, greedy speculative output is plain greedy output.
    let plain = generate(model, prompts, &greedy(), |_, _| {}).unwrap();
    assert_eq!(output.tokens, plain.tokens);
    output.stats.tau()
}

/// τ on 8 held-out prompts of an untrained drafter of `config` (initialised with `seed`) and of
/// the one trained into `out`, both drafting from `vocabulary` when one is given.
fn tau_untrained_and_trained(
    model: &ToyModel<B>,
    config: RecurrentDrafterConfig,
    seed: u64,
    out: &Path,
    vocabulary: Option<DraftVocabulary>,
) -> (f64, f64) {
    let restrict = |drafter: RecurrentDrafter<B>| match &vocabulary {
        Some(vocabulary) => drafter.with_draft_vocabulary(vocabulary.clone()).unwrap(),
        None => drafter,
    };
    let held_out: Vec<Vec<u32>> = random_prompts(8, 99).into_iter().map(|p| p.ids).collect();
    let untrained = restrict(
        config
            .with_trained_steps(Some(DRAFT_STEPS))
            .init_seeded::<B>(seed, &model.device())
            .unwrap()
            .with_target(model)
            .unwrap(),
    );
    let trained = restrict(RecurrentDrafter::<B>::load_for_target(out, model).unwrap());
    (
        tau(model, &untrained, &held_out),
        tau(model, &trained, &held_out),
    )
}

#[test]
fn self_distillation_raises_tau_on_held_out_prompts() {
    let started = std::time::Instant::now();
    let model = toy();
    let dir = temp_dir("tau");
    let manifest = make_dataset(&model, &dir.join("data"), 96);
    assert_eq!(manifest.counts.written, 96);
    assert_eq!(manifest.counts.response_tokens, 96 * NEW_TOKENS);
    let data = load_training_data(&[dir.join("data")], 256, TOY.vocab).unwrap();
    let (train, eval) = split_eval(data.sequences, 0.1, 0);
    let config = TrainConfig {
        draft_steps: DRAFT_STEPS,
        learning_rate: 3e-3,
        max_steps: Some(300),
        batch_size: 8,
        eval_every: 100,
        checkpoint_every: 0,
        ..TrainConfig::default()
    };
    let out = dir.join("not-yet-created").join("drafter.safetensors");
    let mut evals = Vec::new();
    let report = train_drafter(
        &model,
        &drafter_config(),
        &train,
        &eval,
        &out,
        &config,
        CheckpointDType::F32,
        |event| {
            if let redrafter::train::TrainEvent::Eval { report, .. } = event {
                evals.push(report.mean_accepted);
            }
        },
    )
    .unwrap();
    let (first, last) = (report.first_loss.unwrap(), report.last_loss.unwrap());
    eprintln!(
        "loss {first:.3} → {last:.3}, eval mean accepted {evals:?}, {:?}",
        started.elapsed()
    );
    assert!(
        last < 0.5 * first,
        "training loss did not drop enough: {first} → {last}"
    );
    assert_eq!(evals.len(), 3);
    // The timing the example reports: a pace inside the run's wall time.
    let pace = report.steady_step_secs.expect("300 steps were timed");
    assert!(pace > 0.0 && pace * 150.0 <= report.elapsed.as_secs_f64());
    assert!(report.caching <= report.elapsed);

    let (before, after) =
        tau_untrained_and_trained(&model, drafter_config(), config.seed, &out, None);
    eprintln!(
        "τ untrained {before:.3}, trained {after:.3}; {:?}",
        started.elapsed()
    );
    assert!(after - before > 0.3, "τ {before} → {after}");
    std::fs::remove_dir_all(&dir).ok();
}

/// A target that turns its hidden states into NaN from the `fail_after`-th forward on.
struct FailingTarget<'a> {
    inner: &'a ToyModel<B>,
    forwards: Cell<usize>,
    fail_after: usize,
}

impl TargetModel<B> for FailingTarget<'_> {
    fn hidden_size(&self) -> usize {
        self.inner.hidden_size()
    }
    fn vocab_size(&self) -> usize {
        self.inner.vocab_size()
    }
    fn max_context(&self) -> usize {
        self.inner.max_context()
    }
    fn device(&self) -> burn::tensor::Device<B> {
        self.inner.device()
    }
    fn new_cache(&self, batch: usize, capacity: usize) -> KvCache<B> {
        self.inner.new_cache(batch, capacity)
    }
    fn forward(&self, block: &Block<B>, cache: &mut KvCache<B>) -> redrafter::Result<Tensor<B, 3>> {
        let hidden = self.inner.forward(block, cache)?;
        self.forwards.set(self.forwards.get() + 1);
        Ok(if self.forwards.get() > self.fail_after {
            hidden.mul_scalar(f32::NAN)
        } else {
            hidden
        })
    }
    fn logits(&self, hidden: Tensor<B, 3>) -> Tensor<B, 3> {
        self.inner.logits(hidden)
    }
    fn input_embedding(&self) -> Tensor<B, 2> {
        self.inner.input_embedding()
    }
    fn output_embedding(&self) -> Tensor<B, 2> {
        self.inner.output_embedding()
    }
}

fn small_config(max_steps: usize) -> TrainConfig {
    TrainConfig {
        draft_steps: DRAFT_STEPS,
        max_steps: Some(max_steps),
        batch_size: 4,
        eval_every: 0,
        checkpoint_every: 3,
        ..TrainConfig::default()
    }
}

fn small_data(model: &ToyModel<B>, dir: &Path) -> (Vec<Sequence>, Vec<Sequence>) {
    make_dataset(model, &dir.join("data"), 24);
    let data = load_training_data(&[dir.join("data")], 256, TOY.vocab).unwrap();
    split_eval(data.sequences, 0.1, 0)
}

fn weights(path: &Path, model: &ToyModel<B>) -> Vec<f32> {
    let drafter = RecurrentDrafter::<B>::load_for_target(path, model).unwrap();
    let probe = Tensor::<B, 2>::ones([1, TOY.hidden], &model.device());
    let state = drafter.step(probe.clone(), probe.clone()).unwrap();
    drafter
        .head_logits(probe, state)
        .unwrap()
        .into_data()
        .iter::<f32>()
        .collect()
}

/// Trains the toy drafter on `target` with f32 checkpoints at `out`, ignoring progress events.
fn train_quietly<T: TargetModel<B>>(
    target: &T,
    train: &[Sequence],
    eval: &[Sequence],
    out: &Path,
    config: &TrainConfig,
) -> redrafter::Result<TrainReport> {
    train_drafter(
        target,
        &drafter_config(),
        train,
        eval,
        out,
        config,
        CheckpointDType::F32,
        |_| {},
    )
}

#[test]
fn divergence_keeps_the_last_checkpoint_and_resume_continues_exactly() {
    let model = toy();
    let dir = temp_dir("resume");
    let (train, eval) = small_data(&model, &dir);
    let out = dir.join("drafter.safetensors");
    let paths = CheckpointPaths::new(&out);
    let config = small_config(12);

    // Run 1 diverges at step 8 (one target forward per step): the step-6 checkpoint survives.
    let failing = FailingTarget {
        inner: &model,
        forwards: Cell::new(0),
        fail_after: 7,
    };
    let err = train_quietly(&failing, &train, &eval, &out, &config).unwrap_err();
    assert!(
        matches!(err, Error::NonFiniteLoss { step: 8, .. }),
        "{err:?}"
    );
    assert_eq!(TrainState::read(&paths.state).unwrap().unwrap().step, 6);
    let drafter_bytes = std::fs::read(&paths.drafter).unwrap();
    let state_bytes = std::fs::read(&paths.state).unwrap();

    // A run that diverges at once writes nothing either.
    let nan = FailingTarget {
        inner: &model,
        forwards: Cell::new(0),
        fail_after: 0,
    };
    let resume = TrainConfig {
        resume: true,
        ..config.clone()
    };
    let err = train_quietly(&nan, &train, &eval, &out, &resume).unwrap_err();
    assert!(
        matches!(err, Error::NonFiniteLoss { step: 7, .. }),
        "{err:?}"
    );
    assert_eq!(std::fs::read(&paths.drafter).unwrap(), drafter_bytes);
    assert_eq!(std::fs::read(&paths.state).unwrap(), state_bytes);

    // Run 2 resumes at step 6 (weights and AdamW moments) and finishes.
    let report = train_quietly(&model, &train, &eval, &out, &resume).unwrap();
    assert_eq!((report.start_step, report.steps), (6, 12));
    assert!(report.optimizer_restored);
    assert_eq!(TrainState::read(&paths.state).unwrap().unwrap().step, 12);

    // It ends where an uninterrupted run ends.
    let straight = dir.join("straight.safetensors");
    train_quietly(&model, &train, &eval, &straight, &config).unwrap();
    let (resumed, uninterrupted) = (weights(&out, &model), weights(&straight, &model));
    let diff = resumed
        .iter()
        .zip(&uninterrupted)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(
        diff < 1e-4,
        "resumed and uninterrupted runs differ by {diff}"
    );

    // A drafter without its state cannot be resumed: an error, not an overwrite.
    std::fs::remove_file(&paths.state).unwrap();
    let drafter_bytes = std::fs::read(&paths.drafter).unwrap();
    let err = train_quietly(&model, &train, &eval, &out, &resume).unwrap_err();
    assert!(
        matches!(&err, Error::InvalidConfig(m) if m.contains("cannot resume")),
        "{err:?}"
    );
    assert_eq!(std::fs::read(&paths.drafter).unwrap(), drafter_bytes);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn soft_labels_over_a_draft_vocabulary_train_a_drafter_for_that_vocabulary() {
    let model = toy();
    let dir = temp_dir("vocab");
    make_dataset(&model, &dir.join("data"), 96);
    let data = load_training_data(&[dir.join("data")], 256, TOY.vocab).unwrap();
    // The 48 tokens most frequent in the responses (and the prompts' stray ones left out).
    let mut counts = vec![0u64; TOY.vocab];
    for sequence in &data.sequences {
        for &token in &sequence.tokens[sequence.prompt_len..] {
            counts[token as usize] += 1;
        }
    }
    let vocabulary = DraftVocabulary::most_frequent(&counts, 48, &[]).unwrap();
    let (train, eval) = split_eval(data.sequences, 0.1, 0);
    let config = TrainConfig {
        draft_steps: DRAFT_STEPS,
        learning_rate: 3e-3,
        max_steps: Some(200),
        batch_size: 8,
        eval_every: 100,
        checkpoint_every: 0,
        soft_label_weight: 0.5,
        draft_vocabulary: Some(vocabulary.clone()),
        ..TrainConfig::default()
    };
    let tied = RecurrentDrafterConfig::new(TOY.hidden, TOY.vocab).with_head(DraftHeadKind::Tied);

    // The separate head cannot draft from a vocabulary: refused before any work.
    let separate = train_drafter(
        &model,
        &drafter_config(),
        &train,
        &eval,
        dir.join("separate.safetensors"),
        &config,
        CheckpointDType::F32,
        |_| {},
    );
    assert!(
        matches!(separate, Err(Error::InvalidSettings(_))),
        "{separate:?}"
    );

    let out = dir.join("drafter.safetensors");
    let report = train_drafter(
        &model,
        &tied,
        &train,
        &eval,
        &out,
        &config,
        CheckpointDType::F32,
        |_| {},
    )
    .unwrap();
    let (first, last) = (report.first_loss.unwrap(), report.last_loss.unwrap());
    let eval = report.eval.unwrap();
    eprintln!("loss {first:.3} → {last:.3}, held-out {eval:?}");
    assert!(last < 0.6 * first, "loss {first} → {last}");
    assert!(eval.step_accuracy[0] > 0.3, "{eval:?}");

    // τ with the vocabulary it was trained for, against an untrained drafter with it.
    let (before, after) =
        tau_untrained_and_trained(&model, tied, config.seed, &out, Some(vocabulary));
    eprintln!("τ untrained {before:.3}, trained {after:.3}");
    assert!(after - before > 0.3, "τ {before} → {after}");
    std::fs::remove_dir_all(&dir).ok();
}

/// Sampled responses, as far as a drafter of greedy decoding is concerned: 70 % of each
/// greedy response's tokens replaced by random ones. Trained on these tokens a drafter learns
/// noise; trained on the target's greedy choices along the same sequences it learns what
/// verification accepts.
#[test]
fn greedy_labels_learn_greedy_decoding_from_noisy_responses() {
    let model = toy();
    let dir = temp_dir("greedy-labels");
    make_dataset(&model, &dir.join("data"), 96);
    let data = load_training_data(&[dir.join("data")], 256, TOY.vocab).unwrap();
    let mut rng = StdRng::seed_from_u64(5);
    let noisy: Vec<Sequence> = data
        .sequences
        .into_iter()
        .map(|mut sequence| {
            for token in &mut sequence.tokens[sequence.prompt_len..] {
                if rng.random_bool(0.7) {
                    *token = rng.random_range(0..TOY.vocab as u32);
                }
            }
            sequence
        })
        .collect();
    let (train, eval) = split_eval(noisy, 0.1, 0);
    let config = |greedy_labels| TrainConfig {
        draft_steps: DRAFT_STEPS,
        learning_rate: 3e-3,
        max_steps: Some(200),
        batch_size: 8,
        eval_every: 0,
        checkpoint_every: 0,
        greedy_labels,
        ..TrainConfig::default()
    };
    let held_out: Vec<Vec<u32>> = random_prompts(8, 99).into_iter().map(|p| p.ids).collect();
    let mut taus = Vec::new();
    for greedy_labels in [false, true] {
        let out = dir.join(format!("greedy-{greedy_labels}.safetensors"));
        let report = train_quietly(&model, &train, &eval, &out, &config(greedy_labels)).unwrap();
        let (first, last) = (report.first_loss.unwrap(), report.last_loss.unwrap());
        let drafter = RecurrentDrafter::<B>::load_for_target(&out, &model).unwrap();
        let tau = tau(&model, &drafter, &held_out);
        eprintln!("greedy labels {greedy_labels}: loss {first:.3} → {last:.3}, τ {tau:.3}");
        taus.push(tau);
    }
    assert!(taus[1] - taus[0] > 0.2, "τ with the data's tokens {taus:?}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_time_budget_lowers_the_step_count_after_calibration() {
    let model = toy();
    let dir = temp_dir("budget");
    let (train, eval) = small_data(&model, &dir);
    let out = dir.join("drafter.safetensors");
    let mut rescheduled = Vec::new();
    // A budget already spent when the pace is known: the run ends right after calibrating,
    // with its schedule (and final checkpoint and evaluation) at the new end.
    let config = TrainConfig {
        time_budget_secs: Some(1e-3),
        eval_every: 0,
        ..small_config(10_000)
    };
    let report = train_drafter(
        &model,
        &drafter_config(),
        &train,
        &eval,
        &out,
        &config,
        CheckpointDType::F32,
        |event| {
            if let redrafter::train::TrainEvent::Rescheduled { total_steps } = event {
                rescheduled.push(total_steps);
            }
        },
    )
    .unwrap();
    assert_eq!(rescheduled, vec![redrafter::train::CALIBRATION_STEPS]);
    assert_eq!(report.steps, redrafter::train::CALIBRATION_STEPS);
    assert!(report.eval.is_some());
    let state = TrainState::read(CheckpointPaths::new(&out).state)
        .unwrap()
        .unwrap();
    assert_eq!(state.step, state.total_steps);
    // A generous budget changes nothing.
    let config = TrainConfig {
        time_budget_secs: Some(1e6),
        ..small_config(25)
    };
    let report = train_quietly(&model, &train, &eval, &dir.join("b.safetensors"), &config).unwrap();
    assert_eq!(report.steps, 25);
    for bad in [0.0, -1.0, f64::NAN] {
        let config = TrainConfig {
            time_budget_secs: Some(bad),
            ..small_config(5)
        };
        assert!(matches!(
            train_quietly(&model, &train, &eval, &dir.join("c.safetensors"), &config),
            Err(Error::InvalidSettings(_))
        ));
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn init_from_starts_a_new_run_from_trained_weights() {
    let model = toy();
    let dir = temp_dir("init");
    let (train, eval) = small_data(&model, &dir);
    let trained = dir.join("trained.safetensors");
    let first = train_quietly(&model, &train, &eval, &trained, &small_config(150)).unwrap();
    let fresh = train_quietly(
        &model,
        &train,
        &eval,
        &dir.join("fresh.safetensors"),
        &small_config(1),
    )
    .unwrap();
    let config = TrainConfig {
        init_from: Some(trained.clone()),
        ..small_config(1)
    };
    let tuned = train_quietly(
        &model,
        &train,
        &eval,
        &dir.join("tuned.safetensors"),
        &config,
    )
    .unwrap();
    // A new run (step 0 of its own schedule) whose first loss, on the same first batch as the
    // fresh run's, is a trained drafter's.
    assert_eq!(tuned.start_step, 0);
    let (trained_loss, fresh_loss, tuned_loss) = (
        first.last_loss.unwrap(),
        fresh.first_loss.unwrap(),
        tuned.first_loss.unwrap(),
    );
    assert!(
        tuned_loss < 0.8 * fresh_loss,
        "fresh {fresh_loss}, trained {trained_loss}, tuned {tuned_loss}"
    );
    // A deeper head grows from the file: its extra block starts as the identity, so its first
    // loss is the trained drafter's, to the bit.
    let deeper = train_drafter(
        &model,
        &drafter_config().with_num_draft_layers(3),
        &train,
        &eval,
        dir.join("deeper.safetensors"),
        &config,
        CheckpointDType::F32,
        |_| {},
    )
    .unwrap();
    assert_eq!(deeper.first_loss, tuned.first_loss);
    // Another architecture than the file's is refused: a narrower head, or fewer blocks.
    for other in [
        drafter_config().with_exit_dim(TOY.hidden),
        drafter_config().with_num_draft_layers(1),
    ] {
        let other = train_drafter(
            &model,
            &other,
            &train,
            &eval,
            dir.join("other.safetensors"),
            &config,
            CheckpointDType::F32,
            |_| {},
        );
        assert!(matches!(other, Err(Error::InvalidConfig(_))), "{other:?}");
    }
    std::fs::remove_dir_all(&dir).ok();
}
