//! Speculative decoding on a tiny custom model wrapped as a `TargetModel` (the same wrapper as
//! examples/custom_model.rs): exact sampling is distribution-exact, the reference-parity rule is
//! not, and bad settings are typed errors.

mod common;
#[path = "../examples/common/toy_model.rs"]
mod toy_model;

use std::collections::HashMap;

use burn::tensor::activation::softmax;
use redrafter::decoder::{Acceptance, DraftTiming, SpeculativeConfig, SpeculativeDecoder};
use redrafter::drafter::{DraftHeadKind, RecurrentDrafter, RecurrentDrafterConfig};
use redrafter::{Error, GenerationConfig, PromptLookup, TargetModel, generate};
use toy_model::{ToyConfig, ToyModel};

type B = redrafter::backend::Cpu;

const TOY: ToyConfig = ToyConfig {
    vocab: 6,
    hidden: 16,
    heads: 2,
    layers: 1,
    max_len: 32,
};

/// The backend's random generator is one per process, seeded by `B::seed` (models here, and every
/// `generate` at a temperature): tests running in parallel would draw from each other's streams,
/// and the reproducibility check failed now and then. Each test holds this while it runs.
static BACKEND_RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn exclusive_rng() -> std::sync::MutexGuard<'static, ()> {
    // A test that failed while holding it leaves it poisoned; the generator is still usable.
    BACKEND_RNG
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn toy(seed: u64) -> ToyModel<B> {
    use burn::tensor::backend::Backend;
    let device = Default::default();
    B::seed(&device, seed);
    ToyModel::new(TOY, 2.0, &device)
}

fn drafter(model: &ToyModel<B>, seed: u64) -> RecurrentDrafter<B> {
    RecurrentDrafterConfig::new(TOY.hidden, TOY.vocab)
        .with_head(DraftHeadKind::Tied)
        .init_seeded::<B>(seed, &model.device())
        .unwrap()
        .with_target(model)
        .unwrap()
}

/// Next-token distribution after `prefix`, by a fresh full forward.
fn next_distribution(model: &ToyModel<B>, prefix: &[u32]) -> Vec<f64> {
    let len = prefix.len();
    let hidden = common::prompt_hidden(model, prefix);
    let logits = model
        .logits(hidden)
        .slice([0..1, len - 1..len, 0..TOY.vocab]);
    softmax(logits, 2)
        .into_data()
        .iter::<f32>()
        .map(|p| p as f64)
        .collect()
}

/// Exact probability of every continuation of `depth` tokens.
fn exact_joint(model: &ToyModel<B>, prompt: &[u32], depth: usize) -> HashMap<Vec<u32>, f64> {
    let mut joint = HashMap::from([(Vec::new(), 1.0)]);
    for _ in 0..depth {
        let mut next = HashMap::new();
        for (seq, p) in joint {
            let mut prefix = prompt.to_vec();
            prefix.extend(&seq);
            for (token, q) in next_distribution(model, &prefix).into_iter().enumerate() {
                let mut longer = seq.clone();
                longer.push(token as u32);
                next.insert(longer, p * q);
            }
        }
        joint = next;
    }
    joint
}

/// Pearson χ² of observed sequences against the exact joint, merging cells expected below 5.
/// Returns (statistic, degrees of freedom).
fn chi_square(joint: &HashMap<Vec<u32>, f64>, samples: &[Vec<u32>]) -> (f64, usize) {
    let n = samples.len() as f64;
    let mut counts: HashMap<&[u32], f64> = HashMap::new();
    for s in samples {
        *counts.entry(s.as_slice()).or_default() += 1.0;
    }
    let (mut stat, mut cells) = (0.0, 0usize);
    let (mut rare_expected, mut rare_observed) = (0.0, 0.0);
    for (seq, &p) in joint {
        let observed = counts.get(seq.as_slice()).copied().unwrap_or(0.0);
        if p * n < 5.0 {
            rare_expected += p * n;
            rare_observed += observed;
        } else {
            stat += (observed - p * n).powi(2) / (p * n);
            cells += 1;
        }
    }
    if rare_expected > 0.0 {
        stat += (rare_observed - rare_expected).powi(2) / rare_expected;
        cells += 1;
    }
    (stat, cells - 1)
}

fn sample_sequences(
    model: &ToyModel<B>,
    acceptance: Acceptance,
    lookup: Option<PromptLookup>,
    timing: DraftTiming,
    calls: u64,
    rows: usize,
) -> Vec<Vec<u32>> {
    let drafter = drafter(model, 3);
    let prompt = vec![1u32, 4, 2];
    let mut samples = Vec::new();
    for call in 0..calls {
        let config = SpeculativeConfig::default()
            .beam_width(3)
            .beam_length(3)
            .acceptance(acceptance)
            .lookup(lookup)
            .draft_timing(timing)
            .temperature(1.0)
            .seed(1000 + call)
            .max_new_tokens(3);
        let decoder = SpeculativeDecoder::new(model, &drafter, config).unwrap();
        let out = decoder
            .generate(&vec![prompt.clone(); rows], |_, _| {})
            .unwrap();
        samples.extend(out.tokens);
    }
    samples
}

/// Asserts that `samples` pass a χ² test against the exact `joint`.
fn assert_exact_samples(joint: &HashMap<Vec<u32>, f64>, samples: &[Vec<u32>], what: &str) {
    let (stat, dof) = chi_square(joint, samples);
    // χ²(dof) has mean dof and sd sqrt(2 dof): 5 standard deviations is a p-value near 1e-6.
    let bound = dof as f64 + 5.0 * (2.0 * dof as f64).sqrt();
    eprintln!(
        "{what}: χ² = {stat:.1}, {dof} dof, {} samples",
        samples.len()
    );
    assert!(
        stat < bound,
        "{what}: χ² = {stat:.1} with {dof} dof exceeds {bound:.1}"
    );
}

#[test]
fn exact_sampling_matches_the_target_distribution() {
    let _rng = exclusive_rng();
    let model = toy(11);
    let joint = exact_joint(&model, &[1, 4, 2], 3);
    // The same walk over a tree that also holds prompt-lookup guesses: the guesses depend only
    // on tokens already emitted, so every emitted token stays an exact sample.
    // Overlapped drafting changes the tree (no shared drafted prefixes, drafted beams ending
    // where the guesses go on) and the order of the random draws, not the distribution.
    for (lookup, timing) in [
        (None, DraftTiming::Sequential),
        (Some(PromptLookup::new(2)), DraftTiming::Sequential),
        (
            Some(PromptLookup::new(1).with_beam_length(5)),
            DraftTiming::Sequential,
        ),
        (
            Some(PromptLookup::new(1).with_beam_length(5)),
            DraftTiming::Overlapped,
        ),
    ] {
        let samples = sample_sequences(&model, Acceptance::Exact, lookup, timing, 40, 500);
        assert_exact_samples(
            &joint,
            &samples,
            &format!("exact sampling, lookup {lookup:?}, {timing:?} drafting"),
        );
    }
}

#[test]
fn plain_sampling_matches_the_target_distribution_and_is_reproducible() {
    let _rng = exclusive_rng();
    // `generate` at a temperature draws on the device (Gumbel-max): the same χ² check as the
    // speculative modes, against the exact joint of three tokens.
    let model = toy(11);
    let joint = exact_joint(&model, &[1, 4, 2], 3);
    let config = |seed| {
        GenerationConfig::default()
            .with_sampling(redrafter::Sampling::with_temperature(1.0))
            .with_max_new_tokens(3)
            .with_seed(seed)
    };
    let prompts = vec![vec![1u32, 4, 2]; 500];
    let mut samples = Vec::new();
    for call in 0..40 {
        let out = generate(&model, &prompts, &config(2000 + call), |_, _| {}).unwrap();
        samples.extend(out.tokens);
    }
    assert_exact_samples(&joint, &samples, "plain sampling");

    let again = |seed| {
        generate(&model, &prompts[..8], &config(seed), |_, _| {})
            .unwrap()
            .tokens
    };
    assert_eq!(again(5), again(5));
    assert_ne!(again(5), again(6));
}

#[test]
fn reference_parity_mode_is_measurably_biased() {
    let _rng = exclusive_rng();
    let model = toy(11);
    let joint = exact_joint(&model, &[1, 4, 2], 3);
    let samples = sample_sequences(
        &model,
        Acceptance::ReferenceParity,
        None,
        DraftTiming::Sequential,
        40,
        500,
    );
    let (stat, dof) = chi_square(&joint, &samples);
    let bound = dof as f64 + 10.0 * (2.0 * dof as f64).sqrt();
    eprintln!(
        "reference parity: χ² = {stat:.1}, {dof} dof, {} samples",
        samples.len()
    );
    assert!(
        stat > bound,
        "χ² = {stat:.1} with {dof} dof: the p/q rule should be biased here"
    );
}

#[test]
fn greedy_speculative_equals_plain_greedy_on_the_toy_model() {
    let _rng = exclusive_rng();
    let model = toy(5);
    let drafter = drafter(&model, 9);
    let prompts = vec![vec![1u32, 2, 3], vec![5, 0], vec![3, 3, 3, 1, 2]];
    let config = GenerationConfig::default().with_max_new_tokens(20);
    let expected = generate(&model, &prompts, &config, |_, _| {}).unwrap();
    // (M, C, lookup beams, lookup beam length, shortest match extended): the last four extend
    // the drafted beams too, the last two only from matches of two tokens or more.
    let shapes = [
        (1, 2, 0, None, 1),
        (3, 3, 0, None, 1),
        (6, 4, 0, None, 1),
        (1, 4, 1, None, 1),
        (2, 5, 3, None, 1),
        (2, 2, 1, Some(6), 1),
        (3, 4, 2, Some(5), 1),
        (1, 3, 2, Some(6), 2),
        (2, 2, 1, Some(5), 2),
    ];
    let timings = [DraftTiming::Sequential, DraftTiming::Overlapped];
    for ((m, c, k, length, extend), timing) in shapes
        .into_iter()
        .flat_map(|shape| timings.map(|timing| (shape, timing)))
    {
        let spec = SpeculativeConfig::default()
            .beam_width(m)
            .beam_length(c)
            .lookup(
                PromptLookup {
                    beam_length: length,
                    ..PromptLookup::new(k)
                }
                .with_extend_min_ngram(extend),
            )
            .draft_timing(timing)
            .generation(config.clone());
        let decoder = SpeculativeDecoder::new(&model, &drafter, spec).unwrap();
        assert_eq!(
            decoder.overlaps_drafting(),
            timing == DraftTiming::Overlapped
        );
        let out = decoder.generate(&prompts, |_, _| {}).unwrap();
        assert_eq!(
            out.tokens, expected.tokens,
            "M={m} C={c} lookup {k} × {length:?} (n ≥ {extend}), {timing:?} drafting"
        );
        if k > 0 {
            // Six tokens repeat a lot: some rounds must be won by a guess from the text.
            assert!(
                out.stats.lookup_rounds > 0,
                "M={m} C={c} lookup {k} × {length:?}, {timing:?}"
            );
        }
        if let Some(length) = length {
            // Accepted runs reach past the drafted beams' length.
            let depths = out.stats.acceptance_rate_per_depth();
            assert_eq!(depths.len(), length - 1);
            assert!(
                depths[c - 1] > 0.0,
                "M={m} C={c} lookup {k} × {length}, {timing:?}: {depths:?}"
            );
        }
    }
}

/// With one drafted beam and no guesses the tree is that beam whenever it is drafted, so
/// overlapped drafting (its tokens filled in on the device) must accept exactly what sequential
/// drafting (its tokens packed on the host) accepts, round for round: a wrong drafted token would
/// leave the output right (decoding is lossless) but cut an accepted run short.
#[test]
fn overlapped_drafting_accepts_what_sequential_drafting_accepts() {
    let _rng = exclusive_rng();
    let model = toy(5);
    let drafter = drafter(&model, 9);
    let prompts = vec![vec![1u32, 2, 3], vec![5, 0], vec![3, 3, 3, 1, 2]];
    let config = GenerationConfig::default().with_max_new_tokens(20);
    let run = |timing| {
        let spec = SpeculativeConfig::default()
            .beam_width(1)
            .beam_length(4)
            .draft_timing(timing)
            .generation(config.clone());
        SpeculativeDecoder::new(&model, &drafter, spec)
            .unwrap()
            .generate(&prompts, |_, _| {})
            .unwrap()
    };
    let (sequential, overlapped) = (run(DraftTiming::Sequential), run(DraftTiming::Overlapped));
    assert_eq!(overlapped.tokens, sequential.tokens);
    assert_eq!(overlapped.stats.row_rounds, sequential.stats.row_rounds);
    assert_eq!(
        overlapped.stats.accepted_at_depth,
        sequential.stats.accepted_at_depth
    );
    assert!(
        sequential.stats.accepted_at_depth[0] > 0,
        "nothing accepted: the comparison says nothing"
    );
}

#[test]
fn bad_settings_and_inputs_are_typed_errors() {
    let _rng = exclusive_rng();
    let model = toy(1);
    let d = drafter(&model, 1);
    let make = |config: SpeculativeConfig| SpeculativeDecoder::new(&model, &d, config).err();
    assert!(matches!(
        make(SpeculativeConfig::default().beam_width(0)),
        Some(Error::InvalidSettings(_))
    ));
    assert!(matches!(
        make(SpeculativeConfig::default().beam_length(0)),
        Some(Error::InvalidSettings(_))
    ));
    // Trained for 5 draft steps: a beam of 7 tokens needs 6.
    assert!(matches!(
        make(SpeculativeConfig::default().beam_length(7)),
        Some(Error::InvalidSettings(_))
    ));
    assert!(matches!(
        make(
            SpeculativeConfig::default()
                .acceptance(Acceptance::Greedy)
                .temperature(0.7)
        ),
        Some(Error::InvalidSettings(_))
    ));

    // Overlapped drafting: only the rules that compare tokens on the device.
    for acceptance in [Acceptance::typical(), Acceptance::ReferenceParity] {
        assert!(matches!(
            make(
                SpeculativeConfig::default()
                    .acceptance(acceptance)
                    .temperature(0.7)
                    .draft_timing(DraftTiming::Overlapped)
            ),
            Some(Error::InvalidSettings(_))
        ));
    }

    // A draft-probability floor: strictly inside (0, 1), with sequential drafting, not with the
    // p/q rule (which needs every drafted token's probability).
    for p in [0.0, 1.0, -0.5, f32::NAN] {
        assert!(matches!(
            make(SpeculativeConfig::default().min_draft_probability(p)),
            Some(Error::InvalidSettings(_))
        ));
    }
    let floored = SpeculativeConfig::default().min_draft_probability(0.3);
    for config in [
        floored.clone().draft_timing(DraftTiming::Overlapped),
        floored
            .acceptance(Acceptance::ReferenceParity)
            .temperature(1.0),
    ] {
        assert!(matches!(make(config), Some(Error::InvalidSettings(_))));
    }

    // Prompt lookup: an empty n-gram range, and the p/q rule, which needs drafter probabilities.
    assert!(matches!(
        make(SpeculativeConfig::default().lookup(PromptLookup::new(2).with_ngrams(0, 3))),
        Some(Error::InvalidSettings(_))
    ));
    assert!(matches!(
        make(
            SpeculativeConfig::default()
                .beam_length(5)
                .lookup(PromptLookup::new(2).with_beam_length(3))
        ),
        Some(Error::InvalidSettings(_))
    ));
    assert!(matches!(
        make(
            SpeculativeConfig::default()
                .lookup(PromptLookup::new(2))
                .acceptance(Acceptance::ReferenceParity)
                .temperature(1.0)
        ),
        Some(Error::InvalidSettings(_))
    ));

    // A drafter built for another target.
    let other = RecurrentDrafterConfig::new(TOY.hidden * 2, TOY.vocab)
        .init_seeded::<B>(0, &model.device())
        .unwrap();
    assert!(matches!(
        SpeculativeDecoder::new(&model, &other, SpeculativeConfig::default()).err(),
        Some(Error::DrafterMismatch { .. })
    ));
    let other_vocab = RecurrentDrafterConfig::new(TOY.hidden, TOY.vocab + 3)
        .init_seeded::<B>(0, &model.device())
        .unwrap();
    assert!(matches!(
        SpeculativeDecoder::new(&model, &other_vocab, SpeculativeConfig::default()).err(),
        Some(Error::DrafterMismatch { .. })
    ));

    let decoder = SpeculativeDecoder::new(
        &model,
        &d,
        SpeculativeConfig::default()
            .beam_width(3)
            .beam_length(4)
            .max_new_tokens(8),
    )
    .unwrap();
    // 22 + 8 new tokens leaves no room for a 4-token beam in a 32-token context.
    let long = vec![vec![1u32; 22]];
    assert!(matches!(
        decoder.generate(&long, |_, _| {}),
        Err(Error::ContextOverflow { .. })
    ));
    assert!(matches!(
        decoder.generate(&[vec![1, 99]], |_, _| {}),
        Err(Error::TokenOutOfRange { token: 99, .. })
    ));
    assert!(matches!(
        decoder.generate(&[vec![]], |_, _| {}),
        Err(Error::EmptyInput(_))
    ));
    assert!(matches!(
        decoder.generate(&[], |_, _| {}),
        Err(Error::EmptyInput(_))
    ));
    // Plain decoding validates the same way.
    let plain = GenerationConfig::default().with_max_new_tokens(40);
    assert!(matches!(
        generate(&model, &[vec![1]], &plain, |_, _| {}),
        Err(Error::ContextOverflow { .. })
    ));
}

#[test]
fn typical_acceptance_thresholds_bound_the_accepted_length() {
    let _rng = exclusive_rng();
    let model = toy(5);
    let drafter = drafter(&model, 9);
    let prompts = vec![vec![1u32, 2, 3], vec![4, 0]];
    // Decodes 13 tokens per prompt at T = 1 and checks they are 13 vocabulary tokens.
    let decode = |config: SpeculativeConfig| {
        let config = config.temperature(1.0).seed(3).max_new_tokens(13);
        let out = SpeculativeDecoder::new(&model, &drafter, config)
            .unwrap()
            .generate(&prompts, |_, _| {})
            .unwrap();
        for row in &out.tokens {
            assert_eq!(row.len(), 13);
            assert!(row.iter().all(|&t| (t as usize) < TOY.vocab), "{row:?}");
        }
        out.stats
    };
    let run = |epsilon: f32, delta: f32| {
        let config = SpeculativeConfig::default()
            .beam_width(3)
            .beam_length(4)
            .acceptance(Acceptance::Typical { epsilon, delta });
        decode(config).tau()
    };
    // A threshold above any probability accepts nothing: one token per forward.
    assert_eq!(run(10.0, 10.0), 1.0);
    // A threshold below every drafted token's probability accepts every beam in full.
    assert_eq!(run(1e-12, 1e-12), 4.0);

    // Beams that end early (`BEAM_END`: weak lookup guesses, unextended drafted beams, beams
    // cut by a draft-probability floor) are accepted up to their end, never past it.
    let ended = |lookup: Option<PromptLookup>, floor: Option<f32>| {
        let config = SpeculativeConfig::default()
            .beam_width(2)
            .beam_length(3)
            .lookup(lookup)
            .min_draft_probability(floor)
            .acceptance(Acceptance::Typical {
                epsilon: 1e-12,
                delta: 1e-12,
            });
        decode(config)
    };
    // Every guess from a match shorter than 3 tokens stops at the drafted beams' length.
    let gated = PromptLookup::new(2)
        .with_beam_length(6)
        .with_extend_min_ngram(3);
    let stats = ended(Some(gated), None);
    assert!(stats.tau() <= 6.0);
    // A floor above every beam's probability verifies the first token alone.
    let stats = ended(None, Some(0.999_999));
    assert_eq!(stats.tau(), 1.0);
    assert_eq!(stats.packed_tokens, stats.row_rounds);
}
