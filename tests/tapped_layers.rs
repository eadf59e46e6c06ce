//! A draft head that reads several of the target's layers besides its final hidden state
//! (`RecurrentDrafterConfig::tapped_layers`, EAGLE-3 style), on a tiny random Llama: the decoder
//! stays lossless with it, a head grown with a zero projection drafts exactly as before, bad
//! taps are typed errors, checkpoints keep the projection and the trainer learns it.

#[path = "../examples/common/toy_model.rs"]
mod toy_model;

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Distribution, Tensor};
use redrafter::decoder::{DraftTiming, SpeculativeConfig, SpeculativeDecoder};
use redrafter::drafter::{
    CheckpointDType, DraftBeams, DraftHead, DraftHeadKind, DraftRequest, RecurrentDrafter,
    RecurrentDrafterConfig,
};
use redrafter::generate::prefill_tapped;
use redrafter::models::llama::{Llama, LlamaConfig, LlamaLoadOptions};
use redrafter::{Error, GenerationConfig, PromptLookup, TargetModel, generate};

type B = redrafter::backend::Cpu;

const HIDDEN: usize = 32;
const LAYERS: usize = 3;
const VOCAB: usize = 40;

fn tiny_llama() -> Llama<B> {
    let device = Default::default();
    B::seed(&device, 7);
    let config = LlamaConfig::new(HIDDEN, 2 * HIDDEN, LAYERS, 4, 2, VOCAB);
    let options = LlamaLoadOptions {
        dtype: DType::F32,
        max_context: Some(160),
    };
    Llama::init_random(config, &options, &device).unwrap()
}

fn drafter_config() -> RecurrentDrafterConfig {
    RecurrentDrafterConfig::new(HIDDEN, VOCAB).with_head(DraftHeadKind::Tied)
}

fn drafter(config: RecurrentDrafterConfig, model: &Llama<B>, seed: u64) -> RecurrentDrafter<B> {
    config
        .init_seeded::<B>(seed, &model.device())
        .unwrap()
        .with_target(model)
        .unwrap()
}

fn prompts() -> Vec<Vec<u32>> {
    vec![vec![1, 2, 3, 4], vec![9, 30, 7], vec![5, 5, 11, 39, 20, 2]]
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("redrafter-tapped-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The head's features after each prompt and the final hidden states there.
fn prompt_features(model: &Llama<B>, taps: &[usize]) -> (Tensor<B, 2>, Tensor<B, 2>) {
    let prompts = prompts();
    let mut cache = model.new_cache(prompts.len(), 16);
    prefill_tapped(model, &mut cache, &prompts, taps).unwrap()
}

fn max_difference(a: Tensor<B, 2>, b: Tensor<B, 2>) -> f32 {
    a.sub(b).abs().max().into_scalar()
}

#[test]
fn the_llama_returns_its_layers_outputs_beside_the_same_hidden_states() {
    let model = tiny_llama();
    let (hidden, features) = prompt_features(&model, &[0, LAYERS - 1]);
    let (plain, plain_features) = prompt_features(&model, &[]);
    assert_eq!(max_difference(hidden.clone(), plain.clone()), 0.0);
    assert_eq!(max_difference(plain_features, plain), 0.0);
    assert_eq!(features.dims(), [3, 3 * HIDDEN]);
    assert_eq!(
        max_difference(features.clone().narrow(1, 0, HIDDEN), hidden.clone()),
        0.0
    );
    // The final norm of the last layer's output is the hidden state (the random model's norm
    // weights are ones: an RMS norm).
    let last = features.clone().narrow(1, 2 * HIDDEN, HIDDEN);
    let rms = last.clone().square().mean_dim(1).add_scalar(1e-5).sqrt();
    let normed = last.div(rms);
    assert!(max_difference(normed, hidden.clone()) < 1e-4);
    // The first layer's output is another vector.
    let first = features.narrow(1, HIDDEN, HIDDEN);
    assert!(max_difference(first, hidden) > 1e-2);
}

#[test]
fn a_tapped_head_keeps_greedy_decoding_exact() {
    let model = tiny_llama();
    let tapped = drafter(drafter_config().with_tapped_layers([0, 1]), &model, 3);
    // Its random projection changes the context the head drafts from.
    let (hidden, features) = prompt_features(&model, &[0, 1]);
    assert!(max_difference(tapped.context(features).unwrap(), hidden) > 1e-3);

    let prompts = prompts();
    let generation = GenerationConfig::default().with_max_new_tokens(24);
    let expected = generate(&model, &prompts, &generation, |_, _| {}).unwrap();
    for (m, c, guesses) in [(1, 3, 0), (3, 4, 0), (1, 4, 2)] {
        for timing in [DraftTiming::Sequential, DraftTiming::Overlapped] {
            let config = SpeculativeConfig::default()
                .beam_width(m)
                .beam_length(c)
                .lookup(PromptLookup::new(guesses))
                .draft_timing(timing)
                .generation(generation.clone());
            let decoder = SpeculativeDecoder::new(&model, &tapped, config).unwrap();
            let out = decoder.generate(&prompts, |_, _| {}).unwrap();
            assert_eq!(
                out.tokens, expected.tokens,
                "M={m} C={c} guesses {guesses} {timing:?}"
            );
        }
    }
}

#[test]
fn a_head_grown_with_tapped_layers_drafts_exactly_as_before() {
    let model = tiny_llama();
    let base = drafter(drafter_config(), &model, 5);
    let grown = base.clone().with_tapped_layers([1, 2]).unwrap();
    assert_eq!(grown.config().tapped_layers, [1, 2]);
    let (hidden, features) = prompt_features(&model, &[1, 2]);
    assert_eq!(
        max_difference(grown.context(features).unwrap(), hidden),
        0.0
    );

    let config = SpeculativeConfig::default()
        .beam_width(2)
        .beam_length(4)
        .generation(GenerationConfig::default().with_max_new_tokens(24));
    let run = |head: &RecurrentDrafter<B>| {
        SpeculativeDecoder::new(&model, head, config.clone())
            .unwrap()
            .generate(&prompts(), |_, _| {})
            .unwrap()
    };
    let (before, after) = (run(&base), run(&grown));
    assert_eq!(before.tokens, after.tokens);
    // The same drafts: every round accepts as many tokens.
    assert_eq!(before.stats.tau(), after.stats.tau());
    assert_eq!(
        before.stats.acceptance_rate_per_depth(),
        after.stats.acceptance_rate_per_depth()
    );
    // A head that taps layers already cannot grow more.
    assert!(matches!(
        grown.with_tapped_layers([0]),
        Err(Error::InvalidConfig(_))
    ));
}

/// A custom head that lists a tapped layer but leaves [`DraftHead::context`] at its default,
/// which hands the wider features back as they are.
struct UnfoldedTaps(RecurrentDrafter<B>);

impl DraftHead<B> for UnfoldedTaps {
    fn hidden_size(&self) -> usize {
        self.0.config().hidden_size
    }
    fn vocab_size(&self) -> usize {
        self.0.config().vocab_size
    }
    fn trained_steps(&self) -> Option<usize> {
        self.0.config().trained_steps
    }
    fn propose(&self, request: DraftRequest<B>) -> redrafter::Result<DraftBeams<B>> {
        self.0.propose(request)
    }
    fn tapped_layers(&self) -> &[usize] {
        &[0]
    }
}

#[test]
fn bad_taps_are_typed_errors() {
    let model = tiny_llama();
    let device = model.device();
    // Not increasing.
    assert!(matches!(
        drafter_config()
            .with_tapped_layers([2, 1])
            .init_seeded::<B>(1, &device),
        Err(Error::InvalidConfig(_))
    ));
    // A layer the target does not have.
    let beyond = drafter(drafter_config().with_tapped_layers([LAYERS]), &model, 1);
    let config =
        SpeculativeConfig::default().generation(GenerationConfig::default().with_max_new_tokens(8));
    let decoder = SpeculativeDecoder::new(&model, &beyond, config.clone()).unwrap();
    let result = decoder.generate(&prompts(), |_, _| {});
    assert!(
        matches!(result, Err(Error::InvalidSettings(_))),
        "{:?}",
        result.err()
    );
    // A target that does not expose its layers (the default `forward_tapped`).
    let toy = toy_model::ToyModel::<B>::new(
        toy_model::ToyConfig {
            vocab: VOCAB,
            hidden: HIDDEN,
            heads: 2,
            layers: 2,
            max_len: 64,
        },
        1.0,
        &device,
    );
    let tapped = drafter_config()
        .with_tapped_layers([0])
        .init_seeded::<B>(1, &device)
        .unwrap()
        .with_target(&toy)
        .unwrap();
    let decoder = SpeculativeDecoder::new(&toy, &tapped, config.clone()).unwrap();
    assert!(matches!(
        decoder.generate(&prompts(), |_, _| {}),
        Err(Error::InvalidSettings(_))
    ));
    // A head that lists taps but does not fold them into its context.
    let unfolded = UnfoldedTaps(drafter(drafter_config(), &model, 1));
    let decoder = SpeculativeDecoder::new(&model, &unfolded, config).unwrap();
    assert!(matches!(
        decoder.generate(&prompts(), |_, _| {}),
        Err(Error::ShapeMismatch { .. })
    ));
    // Features of the wrong width.
    let features = Tensor::<B, 2>::random([2, HIDDEN], Distribution::Default, &device);
    assert!(matches!(
        tapped.context(features),
        Err(Error::ShapeMismatch { .. })
    ));
}

#[test]
fn tapped_checkpoints_round_trip() {
    let model = tiny_llama();
    let tapped = drafter(drafter_config().with_tapped_layers([0, 2]), &model, 9);
    let dir = temp_dir("checkpoint");
    let path = dir.join("tapped.safetensors");
    tapped.save(&path, CheckpointDType::F32).unwrap();
    let loaded = RecurrentDrafter::<B>::load_for_target(&path, &model).unwrap();
    assert_eq!(loaded.config(), tapped.config());
    let (_, features) = prompt_features(&model, &[0, 2]);
    assert_eq!(
        max_difference(
            loaded.context(features.clone()).unwrap(),
            tapped.context(features).unwrap()
        ),
        0.0
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[cfg(feature = "train")]
#[test]
fn the_trainer_learns_the_tapped_projection_from_a_head_that_had_none() {
    use redrafter::train::{HiddenCache, Sequence, TrainConfig, evaluate_drafter, train_drafter};
    let model = tiny_llama();
    // The target's own greedy continuations of random prompts.
    let prompts: Vec<Vec<u32>> = (0..24u32)
        .map(|i| {
            (0..4 + i % 5)
                .map(|j| (i * 7 + j * 13) % VOCAB as u32)
                .collect()
        })
        .collect();
    let generation = GenerationConfig::default().with_max_new_tokens(24);
    let responses = generate(&model, &prompts, &generation, |_, _| {}).unwrap();
    let sequences: Vec<Sequence> = prompts
        .iter()
        .zip(&responses.tokens)
        .filter_map(|(p, r)| Sequence::new(p, r, 64))
        .collect();
    let (train, eval) = sequences.split_at(20);

    let dir = temp_dir("train");
    let base_path = dir.join("base.safetensors");
    let base = drafter(drafter_config(), &model, 2);
    base.save(&base_path, CheckpointDType::F32).unwrap();
    let steps = redrafter::drafter::DEFAULT_TRAINED_STEPS;
    // Grown, it evaluates exactly as it did.
    let grown = base.clone().with_tapped_layers([0, 1]).unwrap();
    let before = evaluate_drafter(&model, &base, eval, steps, 4096).unwrap();
    let grown_eval = evaluate_drafter(&model, &grown, eval, steps, 4096).unwrap();
    assert_eq!(before.step_accuracy, grown_eval.step_accuracy);
    assert_eq!(before.loss, grown_eval.loss);

    let config = TrainConfig {
        draft_steps: steps,
        learning_rate: 3e-3,
        max_steps: Some(40),
        batch_size: 8,
        eval_every: 40,
        checkpoint_every: 40,
        hidden_cache: HiddenCache::Host,
        init_from: Some(base_path),
        ..TrainConfig::default()
    };
    let out = dir.join("tapped.safetensors");
    let report = train_drafter(
        &model,
        &drafter_config().with_tapped_layers([0, 1]),
        train,
        eval,
        &out,
        &config,
        CheckpointDType::F32,
        |_| {},
    )
    .unwrap();
    assert!(report.last_loss.unwrap() < report.first_loss.unwrap());
    let trained = RecurrentDrafter::<B>::load_for_target(&out, &model).unwrap();
    assert_eq!(trained.config().tapped_layers, [0, 1]);
    // The projection moved off zero: the context is no longer the hidden state.
    let (hidden, features) = prompt_features(&model, &[0, 1]);
    assert!(max_difference(trained.context(features).unwrap(), hidden) > 1e-4);
    let _ = std::fs::remove_dir_all(dir);
}
