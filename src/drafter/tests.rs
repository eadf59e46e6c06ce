//! Tests of the recurrent draft head, its beam search and its checkpoints (Flex backend, tiny
//! sizes).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use burn::backend::Flex;
use burn::module::Module;
use burn::tensor::{Int, Tensor, TensorData};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use safetensors::SafeTensors;
use safetensors::tensor::TensorView;

use super::*;
use crate::error::Error;

type B = Flex;

fn device() -> burn::tensor::Device<B> {
    Default::default()
}

fn floats<const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().into_vec::<f32>().unwrap()
}

fn ints<const D: usize>(t: Tensor<B, D, Int>) -> Vec<i64> {
    t.into_data().convert::<i64>().into_vec::<i64>().unwrap()
}

fn random(rows: usize, cols: usize, seed: u64) -> Tensor<B, 2> {
    let mut rng = StdRng::seed_from_u64(seed);
    let values: Vec<f32> = (0..rows * cols)
        .map(|_| rng.random_range(-1.0..1.0))
        .collect();
    Tensor::from_data(TensorData::new(values, [rows, cols]), &device())
}

/// A seeded drafter with random target embeddings attached.
fn drafter(config: &RecurrentDrafterConfig, seed: u64) -> RecurrentDrafter<B> {
    let (v, h) = (config.vocab_size, config.hidden_size);
    config
        .init_seeded::<B>(seed, &device())
        .unwrap()
        .with_embeddings(random(v, h, seed + 100), random(v, h, seed + 200))
        .unwrap()
}

fn request(h: usize, first: &[i64], width: usize, length: usize, seed: u64) -> DraftRequest<B> {
    DraftRequest {
        context: random(first.len(), h, seed),
        first_tokens: Tensor::from_data(TensorData::new(first.to_vec(), [first.len()]), &device()),
        beam_width: width,
        beam_length: length,
        needs_log_probs: true,
        stop_below: None,
    }
}

/// One beam on the host: tokens, per-token log-probs, score.
#[derive(Debug, Clone)]
struct HostBeam {
    tokens: Vec<i64>,
    log_probs: Vec<f32>,
    score: f64,
}

/// Host view of a [`BeamSearchOutput`]: `[batch][beam]`.
fn host_beams(out: BeamSearchOutput<B>) -> Vec<Vec<HostBeam>> {
    let [b, m, c] = out.tokens.dims();
    let tokens = ints(out.tokens);
    let lps = floats(out.token_log_probs);
    let scores = floats(out.scores);
    (0..b)
        .map(|i| {
            (0..m)
                .map(|j| HostBeam {
                    tokens: tokens[(i * m + j) * c..(i * m + j + 1) * c].to_vec(),
                    log_probs: lps[(i * m + j) * (c - 1)..(i * m + j + 1) * (c - 1)].to_vec(),
                    score: scores[i * m + j] as f64,
                })
                .collect()
        })
        .collect()
}

/// Drafter logits for whole prefixes, recomputed from scratch with the building blocks.
fn prefix_logits(d: &RecurrentDrafter<B>, context: &[f32], prefixes: &[Vec<i64>]) -> Vec<Vec<f32>> {
    let h = d.config().hidden_size;
    let n = prefixes.len();
    let mut state = Tensor::<B, 2>::zeros([n, h], &device());
    for k in 0..prefixes[0].len() {
        let column: Vec<i64> = prefixes.iter().map(|p| p[k]).collect();
        let tokens = Tensor::<B, 1, Int>::from_data(TensorData::new(column, [n]), &device());
        state = d.step(state, d.embed(tokens).unwrap()).unwrap();
    }
    let ctx = Tensor::<B, 2>::from_data(TensorData::new(context.to_vec(), [1, h]), &device())
        .repeat_dim(0, n);
    let logits = floats(d.head_logits(ctx, state).unwrap());
    logits
        .chunks(d.config().vocab_size)
        .map(<[f32]>::to_vec)
        .collect()
}

/// SPEC §2 warp + log_softmax, literally: subtract the max, mask everything below the 50th
/// largest with -5e4, log-softmax over the whole vocabulary (f64).
fn warped_log_probs(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let mut sorted: Vec<f64> = logits.iter().map(|&x| x as f64 - max).collect();
    sorted.sort_by(|a, b| b.partial_cmp(a).unwrap());
    let kth = sorted[WARP_TOP_K.min(logits.len()) - 1];
    let warped: Vec<f64> = logits
        .iter()
        .map(|&x| {
            let x = x as f64 - max;
            if x < kth { LOG_ZERO as f64 } else { x }
        })
        .collect();
    let norm = warped.iter().map(|x| x.exp()).sum::<f64>().ln();
    warped.iter().map(|x| x - norm).collect()
}

/// SPEC §2 beam search, literally and densely on the host: `[0, -5e4, …]` init, top-M over all
/// `M·V` candidates each step.
fn reference_beam_search(
    d: &RecurrentDrafter<B>,
    context: &[f32],
    first: i64,
    width: usize,
    length: usize,
) -> Vec<HostBeam> {
    let vocab = d.config().vocab_size;
    let mut beams: Vec<HostBeam> = (0..width)
        .map(|j| HostBeam {
            tokens: vec![first],
            log_probs: vec![],
            score: if j == 0 { 0.0 } else { LOG_ZERO as f64 },
        })
        .collect();
    for _ in 1..length {
        let prefixes: Vec<Vec<i64>> = beams.iter().map(|b| b.tokens.clone()).collect();
        let logits = prefix_logits(d, context, &prefixes);
        let mut candidates = Vec::with_capacity(width * vocab);
        for (j, row) in logits.iter().enumerate() {
            for (t, lp) in warped_log_probs(row).into_iter().enumerate() {
                candidates.push((beams[j].score + lp, j, t, lp));
            }
        }
        candidates.sort_by(|a, b| b.0.partial_cmp(&a.0).unwrap());
        beams = candidates[..width]
            .iter()
            .map(|&(score, j, t, lp)| {
                let mut beam = beams[j].clone();
                beam.tokens.push(t as i64);
                beam.log_probs.push(lp as f32);
                beam.score = score;
                beam
            })
            .collect();
    }
    beams
}

/// Asserts that the device search equals the host reference for every batch row.
fn assert_matches_reference(d: &RecurrentDrafter<B>, first: &[i64], width: usize, length: usize) {
    let h = d.config().hidden_size;
    let req = request(h, first, width, length, 42);
    let context = floats(req.context.clone());
    let got = host_beams(d.beam_search(req).unwrap());
    for (b, row) in got.iter().enumerate() {
        let want = reference_beam_search(d, &context[b * h..(b + 1) * h], first[b], width, length);
        for (j, (g, w)) in row.iter().zip(&want).enumerate() {
            assert_eq!(g.tokens, w.tokens, "batch {b} beam {j}");
            for (x, y) in g.log_probs.iter().zip(&w.log_probs) {
                assert!((x - y).abs() < 1e-4, "batch {b} beam {j}: {x} vs {y}");
            }
            assert!((g.score - w.score).abs() < 1e-3, "batch {b} beam {j}");
        }
    }
}

fn small_config() -> RecurrentDrafterConfig {
    RecurrentDrafterConfig::new(8, 7)
}

// ---------------------------------------------------------------------------------------------
// Building blocks
// ---------------------------------------------------------------------------------------------

#[test]
fn config_defaults_and_json() {
    let c = RecurrentDrafterConfig::new(16, 100);
    assert_eq!(c.exit_dim, 32);
    assert_eq!(c.num_draft_layers, 2);
    assert!(c.rnn);
    assert_eq!(c.head, DraftHeadKind::Separate);
    assert_eq!(c.trained_steps, Some(5));
    assert!(!c.has_input_proj());

    let tied = c.clone().with_head(DraftHeadKind::Tied).with_exit_dim(24);
    let json = serde_json::to_string(&tied).unwrap();
    let back: RecurrentDrafterConfig = serde_json::from_str(&json).unwrap();
    assert_eq!(back, tied);

    // The reference's config.json: defaults fill what it lacks, unknown keys are ignored.
    let reference: RecurrentDrafterConfig = serde_json::from_str(
        r#"{"vocab_size": 100, "hidden_size": 16, "exit_dim": 32, "num_draft_layers": 2,
            "rnn": true, "num_lookback_tokens": -1, "model_type": "recurrent_drafting_drafter"}"#,
    )
    .unwrap();
    assert_eq!(reference, c);
    let minimal: RecurrentDrafterConfig =
        serde_json::from_str(r#"{"vocab_size": 100, "hidden_size": 16}"#).unwrap();
    assert_eq!(minimal, c);

    assert!(matches!(
        RecurrentDrafterConfig::new(0, 10).init::<B>(&device()),
        Err(Error::InvalidConfig(_))
    ));
}

#[test]
fn parameter_counts() {
    let h = 8;
    let v = 7;
    let d = RecurrentDrafterConfig::new(h, v)
        .init::<B>(&device())
        .unwrap();
    let exit = 2 * h;
    let expected = 2 * h * h + h + 2 * (exit * exit + exit) + exit * v;
    assert_eq!(d.num_params(), expected);

    let tied = RecurrentDrafterConfig::new(h, v)
        .with_head(DraftHeadKind::Tied)
        .with_exit_dim(12)
        .init::<B>(&device())
        .unwrap();
    let expected = 2 * h * h + h + (2 * h * 12 + 12) + 2 * (12 * 12 + 12) + 12 * h;
    assert_eq!(tied.num_params(), expected);
}

#[test]
fn seeded_init_is_deterministic() {
    let c = small_config();
    let a = c.init_seeded::<B>(3, &device()).unwrap();
    let b = c.init_seeded::<B>(3, &device()).unwrap();
    let other = c.init_seeded::<B>(4, &device()).unwrap();
    let wa = floats(a.head.weight.val());
    assert_eq!(wa, floats(b.head.weight.val()));
    assert_eq!(
        floats(a.rnn_u.as_ref().unwrap().weight.val()),
        floats(b.rnn_u.unwrap().weight.val())
    );
    assert_ne!(wa, floats(other.head.weight.val()));
}

#[test]
fn forward_shapes_on_any_leading_dims() {
    for config in [
        small_config(),
        small_config().with_exit_dim(10),
        small_config().with_rnn(false),
        small_config().with_head(DraftHeadKind::Tied),
    ] {
        let d = drafter(&config, 1);
        let (h, v) = (config.hidden_size, config.vocab_size);
        let state = Tensor::<B, 3>::zeros([2, 3, h], &device());
        let emb = random(6, h, 5).reshape([2, 3, h]);
        let state = d.step(state, emb).unwrap();
        assert_eq!(state.dims(), [2, 3, h]);
        let ctx = random(6, h, 6).reshape([2, 3, h]);
        assert_eq!(d.head_logits(ctx, state.clone()).unwrap().dims(), [2, 3, v]);
        let flat = d
            .head_logits(random(6, h, 6), state.reshape([6, h]))
            .unwrap();
        assert_eq!(flat.dims(), [6, v]);
    }
}

#[test]
fn forward_shape_errors() {
    let d = drafter(&small_config(), 1);
    let h = 8;
    let bad = d.step(Tensor::<B, 2>::zeros([2, h], &device()), random(3, h, 1));
    assert!(matches!(bad, Err(Error::ShapeMismatch { .. })));
    let bad = d.step(
        Tensor::<B, 2>::zeros([2, h + 1], &device()),
        random(2, h + 1, 1),
    );
    assert!(matches!(bad, Err(Error::ShapeMismatch { .. })));
    let bad = d.head_logits(random(2, h, 1), random(2, h - 1, 1));
    assert!(matches!(bad, Err(Error::ShapeMismatch { .. })));
    // A tied head without the output embedding cannot produce logits.
    let tied = small_config()
        .with_head(DraftHeadKind::Tied)
        .init_seeded::<B>(1, &device())
        .unwrap();
    let bad = tied.head_logits(random(2, h, 1), random(2, h, 2));
    assert!(matches!(bad, Err(Error::InvalidConfig(_))));
    // Embedding tables must fit.
    let bad = small_config()
        .init_seeded::<B>(1, &device())
        .unwrap()
        .with_embeddings(random(7, 9, 1), random(7, 9, 1));
    assert!(matches!(bad, Err(Error::DrafterMismatch { .. })));
    let bad = small_config()
        .init_seeded::<B>(1, &device())
        .unwrap()
        .with_embeddings(random(6, 8, 1), random(6, 8, 1));
    assert!(matches!(bad, Err(Error::DrafterMismatch { .. })));
}

/// The building blocks compute SPEC §1's formulas: checked against a host forward pass.
#[test]
fn forward_matches_host_math() {
    for config in [
        small_config().with_exit_dim(10).with_num_draft_layers(1),
        small_config()
            .with_rnn(false)
            .with_head(DraftHeadKind::Tied),
    ] {
        let d = drafter(&config, 9);
        let h = config.hidden_size;
        let host_linear = |l: &burn::nn::Linear<B>, x: &[f32]| -> Vec<f32> {
            let [d_in, d_out] = l.weight.val().dims();
            let w = floats(l.weight.val());
            let b = l.bias.as_ref().map(|b| floats(b.val()));
            (0..d_out)
                .map(|o| {
                    let dot: f32 = (0..d_in).map(|i| x[i] * w[i * d_out + o]).sum();
                    dot + b.as_ref().map_or(0.0, |b| b[o])
                })
                .collect()
        };
        let silu = |x: f32| x / (1.0 + (-x).exp());
        let ctx = floats(random(1, h, 3));
        let s0 = floats(random(1, h, 4));
        let e = floats(random(1, h, 5));

        let s1: Vec<f32> = match (&d.rnn_w, &d.rnn_u) {
            (Some(w), Some(u)) => host_linear(w, &e)
                .iter()
                .zip(host_linear(u, &s0))
                .map(|(a, b)| silu(a + b))
                .collect(),
            _ => s0.iter().zip(&e).map(|(a, b)| a + b).collect(),
        };
        let mut x: Vec<f32> = ctx.iter().chain(&s1).cloned().collect();
        if let Some(p) = &d.input_proj {
            x = host_linear(p, &x);
        }
        for block in &d.res_blocks {
            let y = host_linear(&block.linear, &x);
            x = x.iter().zip(y).map(|(a, b)| a + silu(b)).collect();
        }
        let mut logits = host_linear(&d.head, &x);
        if config.head == DraftHeadKind::Tied {
            let table = floats(d.output_embedding.clone().unwrap());
            logits = table
                .chunks(h)
                .map(|row| row.iter().zip(&logits).map(|(a, b)| a * b).sum())
                .collect();
        }

        let tensor =
            |v: &[f32]| Tensor::<B, 2>::from_data(TensorData::new(v.to_vec(), [1, h]), &device());
        let state = d.step(tensor(&s0), tensor(&e)).unwrap();
        let got_state = floats(state.clone());
        let got_logits = floats(d.head_logits(tensor(&ctx), state).unwrap());
        for (a, b) in got_state.iter().zip(&s1) {
            assert!((a - b).abs() < 1e-5);
        }
        assert_eq!(got_logits.len(), config.vocab_size);
        for (a, b) in got_logits.iter().zip(&logits) {
            assert!((a - b).abs() < 1e-4, "{a} vs {b}");
        }
    }
}

#[test]
fn extra_zero_blocks_leave_the_drafter_unchanged() {
    let config = small_config().with_head(DraftHeadKind::Tied);
    let h = config.hidden_size;
    let d = drafter(&config, 9);
    let grown = d.clone().with_extra_res_blocks(2);
    assert_eq!(grown.config().num_draft_layers, config.num_draft_layers + 2);
    assert_eq!(grown.res_blocks.len(), config.num_draft_layers + 2);
    let (ctx, s0, e) = (random(3, h, 3), random(3, h, 4), random(3, h, 5));
    let logits = |d: &RecurrentDrafter<B>| {
        let state = d.step(s0.clone(), e.clone()).unwrap();
        floats(d.head_logits(ctx.clone(), state).unwrap())
    };
    // Bit for bit: a zero block adds an exact zero.
    assert_eq!(logits(&d), logits(&grown));
    // The new blocks are parameters like the others (trained, saved).
    assert_eq!(
        grown.num_params(),
        d.num_params() + 2 * (config.exit_dim * config.exit_dim + config.exit_dim)
    );
}

// ---------------------------------------------------------------------------------------------
// Beam search
// ---------------------------------------------------------------------------------------------

#[test]
fn beam_search_invariants() {
    let d = drafter(&RecurrentDrafterConfig::new(8, 30), 2);
    let first = [3, 17, 29];
    let out = d.beam_search(request(8, &first, 6, 5, 7)).unwrap();
    assert_eq!(out.tokens.dims(), [3, 6, 5]);
    assert_eq!(out.token_log_probs.dims(), [3, 6, 4]);
    assert_eq!(out.scores.dims(), [3, 6]);
    for (b, row) in host_beams(out).iter().enumerate() {
        let mut seen = HashSet::new();
        for (j, beam) in row.iter().enumerate() {
            assert_eq!(beam.tokens[0], first[b], "every beam starts with g0");
            assert!(beam.tokens.iter().all(|&t| (0..30).contains(&t)));
            assert!(
                seen.insert(beam.tokens.clone()),
                "beams are distinct sequences"
            );
            let sum: f64 = beam.log_probs.iter().map(|&x| x as f64).sum();
            assert!(
                (sum - beam.score).abs() < 1e-4,
                "score is the sum of log-probs"
            );
            assert!(beam.log_probs.iter().all(|&x| x <= 0.0));
            if j > 0 {
                assert!(row[j - 1].score >= beam.score, "scores sorted, beam 0 best");
            }
        }
    }
    // Step 1 spreads over M different tokens instead of M copies of one beam.
    for row in host_beams(d.beam_search(request(8, &first, 6, 2, 7)).unwrap()) {
        let firsts: HashSet<i64> = row.iter().map(|b| b.tokens[1]).collect();
        assert_eq!(firsts.len(), 6);
    }
}

#[test]
fn beam_search_matches_dense_reference() {
    // Tiny vocabulary (the warp keeps everything), several batch rows.
    let d = drafter(&small_config(), 11);
    assert_matches_reference(&d, &[0, 4, 6], 3, 4);
    // Width 1 is greedy drafting; width V takes every first token.
    assert_matches_reference(&d, &[2], 1, 5);
    assert_matches_reference(&d, &[5, 1], 7, 3);
    // Vocabulary above 50: the warp drops the tail.
    let d = drafter(&RecurrentDrafterConfig::new(8, 60).with_exit_dim(12), 12);
    assert_matches_reference(&d, &[1, 59], 4, 4);
    // Large enough for the grouped top-k.
    let d = drafter(&RecurrentDrafterConfig::new(8, 4096), 13);
    assert_matches_reference(&d, &[7, 4000], 3, 3);
}

/// The device-only rank selection (the GPU default) drafts exactly the reference beams too.
#[test]
fn beam_search_with_rank_top_k_matches_reference() {
    use super::TopKMethod;
    let d = drafter(&small_config(), 11).with_top_k(TopKMethod::Rank);
    assert_matches_reference(&d, &[0, 4, 6], 3, 4);
    let d = drafter(&RecurrentDrafterConfig::new(8, 4096), 13).with_top_k(TopKMethod::Rank);
    assert_matches_reference(&d, &[7, 4000], 3, 3);
    assert_matches_reference(&d, &[9], 16, 4);
}

#[test]
fn beam_search_variants_match_reference() {
    let d = drafter(&small_config().with_rnn(false), 21);
    assert_matches_reference(&d, &[1, 3], 3, 4);
    let d = drafter(&small_config().with_head(DraftHeadKind::Tied), 22);
    assert_matches_reference(&d, &[1, 3], 3, 4);
    let d = drafter(
        &RecurrentDrafterConfig::new(8, 60)
            .with_head(DraftHeadKind::Tied)
            .with_num_draft_layers(0),
        23,
    );
    assert_matches_reference(&d, &[7], 5, 3);
}

/// One beam whose log-probs nobody reads: the same tokens as the full search (each step's best
/// token, which the warp does not change), the log-probs left as zeros; with more beams the
/// request's flag changes nothing.
#[test]
fn one_beam_without_log_probs_drafts_the_same_tokens() {
    use super::TopKMethod;
    for method in [TopKMethod::Sort, TopKMethod::Rank] {
        let d = drafter(&RecurrentDrafterConfig::new(8, 300), 41).with_top_k(method);
        for width in [1, 3] {
            let full = d.beam_search(request(8, &[3, 250], width, 5, 7)).unwrap();
            let quick = d
                .beam_search(DraftRequest {
                    needs_log_probs: false,
                    ..request(8, &[3, 250], width, 5, 7)
                })
                .unwrap();
            assert_eq!(
                ints(quick.tokens),
                ints(full.tokens),
                "{method:?}, width {width}"
            );
            let (quick_lp, full_lp) = (floats(quick.token_log_probs), floats(full.token_log_probs));
            if width == 1 {
                assert!(quick_lp.iter().all(|&x| x == 0.0), "{method:?}");
                assert!(full_lp.iter().any(|&x| x < 0.0), "{method:?}");
            } else {
                assert_eq!(quick_lp, full_lp, "{method:?}, width {width}");
            }
        }
    }
}

/// A score floor stops drafting once every beam of every row is below it: the beams are then
/// those of a search that was asked for that many steps, and a floor below every score changes
/// nothing.
#[test]
fn a_score_floor_stops_drafting_early() {
    let d = drafter(&RecurrentDrafterConfig::new(8, 300), 43);
    for width in [1, 3] {
        let search = |length: usize, floor: Option<f32>| {
            d.beam_search(DraftRequest {
                stop_below: floor,
                ..request(8, &[3, 250], width, length, 7)
            })
            .unwrap()
        };
        let tokens = |out: &BeamSearchOutput<B>| ints(out.tokens.clone());
        let full = search(5, None);
        let (one_step, two_steps) = (search(2, None), search(3, None));
        // The best score after two steps, over every row and beam.
        let best = floats(two_steps.scores.clone())
            .into_iter()
            .fold(f32::NEG_INFINITY, f32::max);
        // Above every score (log-probabilities are at most 0): one draft step only.
        let stopped = search(5, Some(1.0));
        assert_eq!(stopped.tokens.dims(), [2, width, 2], "width {width}");
        assert_eq!(tokens(&stopped), tokens(&one_step), "width {width}");
        assert_eq!(stopped.token_log_probs.dims(), [2, width, 1]);
        // Just above the best two-step score: the third step does not run.
        let stopped = search(5, Some(best + 1e-4));
        assert_eq!(stopped.tokens.dims(), [2, width, 3], "width {width}");
        assert_eq!(tokens(&stopped), tokens(&two_steps), "width {width}");
        // Below every score: the whole search.
        assert_eq!(
            tokens(&search(5, Some(-1.0e9))),
            tokens(&full),
            "width {width}"
        );
    }
}

/// The first step of a beam search is exhaustive: it is the top-M single tokens.
#[test]
fn first_step_is_exhaustive_top_m() {
    let d = drafter(&RecurrentDrafterConfig::new(8, 60), 31);
    let req = request(8, &[9], 5, 2, 3);
    let context = floats(req.context.clone());
    let got = host_beams(d.beam_search(req).unwrap());
    let lp = warped_log_probs(&prefix_logits(&d, &context, &[vec![9]])[0]);
    let mut order: Vec<usize> = (0..60).collect();
    order.sort_by(|&a, &b| lp[b].partial_cmp(&lp[a]).unwrap());
    let want: Vec<i64> = order[..5].iter().map(|&t| t as i64).collect();
    let got: Vec<i64> = got[0].iter().map(|b| b.tokens[1]).collect();
    assert_eq!(got, want);
}

#[test]
fn wide_beams_beyond_the_warp() {
    let d = drafter(&RecurrentDrafterConfig::new(8, 80), 41);
    // One step, M = 64 > 50: the first 50 beams are the real top-50, the other 14 take the
    // next tokens by logit rank with placeholder scores; all distinct, deterministic.
    let run = |length| host_beams(d.beam_search(request(8, &[5, 6], 64, length, 9)).unwrap());
    let one = run(2);
    assert_eq!(host_beams_tokens(&one), host_beams_tokens(&run(2)));
    for row in &one {
        let tokens: HashSet<i64> = row.iter().map(|b| b.tokens[1]).collect();
        assert_eq!(tokens.len(), 64);
        for (j, beam) in row.iter().enumerate() {
            assert_eq!(beam.score > -1e4, j < 50, "beam {j}: {}", beam.score);
            if j > 0 {
                assert!(row[j - 1].score >= beam.score);
            }
        }
    }
    // The real beams match the dense reference; a second step needs no placeholders at all,
    // so there everything matches.
    let context = floats(request(8, &[5, 6], 64, 2, 9).context);
    for (b, row) in one.iter().enumerate() {
        let want = reference_beam_search(&d, &context[b * 8..(b + 1) * 8], [5, 6][b], 64, 2);
        for j in 0..50 {
            assert_eq!(row[j].tokens, want[j].tokens);
        }
    }
    assert_matches_reference(&d, &[5, 6], 64, 3);
}

fn host_beams_tokens(beams: &[Vec<HostBeam>]) -> Vec<Vec<i64>> {
    beams.iter().flatten().map(|b| b.tokens.clone()).collect()
}

#[test]
fn propose_and_single_token_beams() {
    let d = drafter(&small_config(), 51);
    assert_eq!(DraftHead::<B>::hidden_size(&d), 8);
    assert_eq!(DraftHead::<B>::vocab_size(&d), 7);
    assert_eq!(DraftHead::<B>::trained_steps(&d), Some(5));
    let beams = d.propose(request(8, &[2, 3], 3, 4, 1)).unwrap();
    assert_eq!(beams.tokens.dims(), [2, 3, 4]);
    assert_eq!(beams.token_log_probs.dims(), [2, 3, 3]);
    // C = 1: nothing drafted, every beam is g0.
    let beams = d.propose(request(8, &[2, 3], 3, 1, 1)).unwrap();
    assert_eq!(beams.tokens.dims(), [2, 3, 1]);
    assert_eq!(beams.token_log_probs.dims(), [2, 3, 0]);
    assert_eq!(ints(beams.tokens), vec![2, 2, 2, 3, 3, 3]);
}

#[test]
fn invalid_requests_are_typed_errors() {
    let d = drafter(&small_config(), 61);
    let err = |r: DraftRequest<B>| d.propose(r).err().unwrap();
    assert!(matches!(
        err(request(8, &[1], 0, 3, 1)),
        Error::InvalidSettings(_)
    ));
    assert!(matches!(
        err(request(8, &[1], 2, 0, 1)),
        Error::InvalidSettings(_)
    ));
    // Trained for 5 steps: length 6 is fine, 7 is not.
    assert!(d.propose(request(8, &[1], 2, 6, 1)).is_ok());
    assert!(matches!(
        err(request(8, &[1], 2, 7, 1)),
        Error::InvalidSettings(_)
    ));
    // More beams than step 1 has continuations.
    assert!(matches!(
        err(request(8, &[1], 8, 3, 1)),
        Error::InvalidSettings(_)
    ));
    // Context of the wrong width, first tokens of the wrong length, empty batch.
    assert!(matches!(
        err(request(9, &[1], 2, 3, 1)),
        Error::ShapeMismatch { .. }
    ));
    let mut r = request(8, &[1, 2], 2, 3, 1);
    r.first_tokens = Tensor::from_data(TensorData::new(vec![1i64], [1]), &device());
    assert!(matches!(err(r), Error::ShapeMismatch { .. }));
    let mut r = request(8, &[1], 2, 3, 1);
    r.context = Tensor::zeros([0, 8], &device());
    r.first_tokens = Tensor::from_data(TensorData::new(Vec::<i64>::new(), [0]), &device());
    assert!(matches!(err(r), Error::EmptyInput(_)));
    // No embeddings attached.
    let bare = small_config().init_seeded::<B>(1, &device()).unwrap();
    assert!(matches!(
        bare.propose(request(8, &[1], 2, 3, 1)),
        Err(Error::InvalidConfig(_))
    ));
    // Unknown trained steps: no length limit.
    let free = drafter(&small_config().with_trained_steps(None), 62);
    assert!(free.propose(request(8, &[1], 2, 9, 1)).is_ok());
}

// ---------------------------------------------------------------------------------------------
// Checkpoints
// ---------------------------------------------------------------------------------------------

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("redrafter-drafter-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// All parameters on the host, by checkpoint name.
fn params(d: &RecurrentDrafter<B>) -> HashMap<String, Vec<f32>> {
    let mut out = HashMap::new();
    for (name, linear) in d.named_layers() {
        out.insert(format!("{name}.weight"), floats(linear.weight.val()));
        if let Some(b) = &linear.bias {
            out.insert(format!("{name}.bias"), floats(b.val()));
        }
    }
    out
}

/// Copies a safetensors file, optionally dropping the metadata and editing tensors
/// (`None` drops a tensor).
fn rewrite(
    from: &Path,
    to: &Path,
    keep_metadata: bool,
    edit: impl Fn(&str, Vec<usize>, Vec<u8>) -> Option<(Vec<usize>, Vec<u8>)>,
) {
    let bytes = std::fs::read(from).unwrap();
    let file = SafeTensors::deserialize(&bytes).unwrap();
    let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
    let mut kept = Vec::new();
    for (name, view) in file.tensors() {
        if let Some((shape, data)) = edit(&name, view.shape().to_vec(), view.data().to_vec()) {
            kept.push((name, view.dtype(), shape, data));
        }
    }
    let views: Vec<(String, TensorView<'_>)> = kept
        .iter()
        .map(|(n, dt, s, d)| (n.clone(), TensorView::new(*dt, s.clone(), d).unwrap()))
        .collect();
    let metadata = if keep_metadata {
        meta.metadata().clone()
    } else {
        None
    };
    safetensors::serialize_to_file(views, metadata, to).unwrap();
}

#[test]
fn save_load_round_trip() {
    let dir = temp_dir("round-trip");
    for config in [
        small_config(),
        small_config()
            .with_exit_dim(10)
            .with_rnn(false)
            .with_trained_steps(Some(3)),
        small_config()
            .with_head(DraftHeadKind::Tied)
            .with_num_draft_layers(1),
    ] {
        let d = drafter(&config, 71);
        let input = d.input_embedding.clone().unwrap();
        let output = random(7, 8, 271);
        let d = d.with_embeddings(input.clone(), output.clone()).unwrap();
        let want = params(&d);

        let path = dir.join("f32.safetensors");
        d.save(&path, CheckpointDType::F32).unwrap();
        let back =
            RecurrentDrafter::<B>::load(&path, 8, 7, input.clone(), output.clone(), &device())
                .unwrap();
        assert_eq!(back.config(), &config);
        assert_eq!(params(&back), want, "f32 round trip is exact");
        let req = || request(8, &[1, 2], 3, 3, 5);
        assert_eq!(
            host_beams_tokens(&host_beams(back.beam_search(req()).unwrap())),
            host_beams_tokens(&host_beams(d.beam_search(req()).unwrap()))
        );
        assert_eq!(read_checkpoint_config(&path, None).unwrap(), config);

        for (dtype, tol) in [(CheckpointDType::F16, 1e-3), (CheckpointDType::BF16, 8e-3)] {
            let path = dir.join("half.safetensors");
            d.save(&path, dtype).unwrap();
            let back =
                RecurrentDrafter::<B>::load(&path, 8, 7, input.clone(), output.clone(), &device())
                    .unwrap();
            let got = params(&back);
            for (name, values) in &want {
                for (a, b) in got[name].iter().zip(values) {
                    assert!(
                        (a - b).abs() <= tol * b.abs().max(0.1),
                        "{name}: {a} vs {b}"
                    );
                }
            }
        }
    }
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn a_loaded_drafter_computes_in_its_targets_float_type() {
    use burn::tensor::DType;
    let dir = temp_dir("target-dtype");
    let config = small_config().with_head(DraftHeadKind::Tied);
    let path = dir.join("half.safetensors");
    drafter(&config, 95)
        .save(&path, CheckpointDType::F16)
        .unwrap();
    let (input, output) = (random(7, 8, 3), random(7, 8, 4));
    let full =
        RecurrentDrafter::<B>::load(&path, 8, 7, input.clone(), output.clone(), &device()).unwrap();
    assert_eq!(full.param_dtype(), DType::F32);

    // For an f16 target every parameter is f16, holding the file's values exactly.
    let (input_half, output_half) = (input.cast(DType::F16), output.cast(DType::F16));
    let half =
        RecurrentDrafter::<B>::load(&path, 8, 7, input_half, output_half, &device()).unwrap();
    assert_eq!(half.param_dtype(), DType::F16);
    for (name, linear) in half.named_layers() {
        assert_eq!(linear.weight.val().dtype(), DType::F16, "{name}");
        if let Some(bias) = &linear.bias {
            assert_eq!(bias.val().dtype(), DType::F16, "{name}.bias");
        }
    }
    assert_eq!(params(&half), params(&full));
    // And back: f32 parameters with the same values.
    let widened = half.clone().with_dtype(DType::F32).unwrap();
    assert_eq!(widened.param_dtype(), DType::F32);
    assert_eq!(params(&widened), params(&full));

    // A draft vocabulary is rebuilt for the new type: the CPU's panels exist only in f32.
    let vocabulary = DraftVocabulary::new(vec![5, 1, 3], 7).unwrap();
    let reduced = full.with_draft_vocabulary(vocabulary.clone()).unwrap();
    assert!(reduced.cpu_panels().is_some());
    let reduced_half = reduced.with_dtype(DType::F16).unwrap();
    assert_eq!(reduced_half.draft_vocabulary(), Some(&vocabulary));
    assert!(reduced_half.cpu_panels().is_none());
    let reduced_back = reduced_half.with_dtype(DType::F32).unwrap();
    assert!(reduced_back.cpu_panels().is_some());

    // Not a float type: a typed error.
    assert!(matches!(
        widened.with_dtype(DType::I32),
        Err(Error::InvalidSettings(_))
    ));
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn reference_layout_without_metadata() {
    let dir = temp_dir("reference-layout");
    for config in [
        small_config(),
        small_config().with_exit_dim(10).with_num_draft_layers(3),
        small_config().with_rnn(false).with_num_draft_layers(1),
        small_config().with_rnn(false).with_exit_dim(6),
        small_config().with_head(DraftHeadKind::Tied),
    ] {
        let d = drafter(&config, 81);
        let ours = dir.join("ours.safetensors");
        let bare = dir.join("published.safetensors");
        d.save(&ours, CheckpointDType::F16).unwrap();
        rewrite(&ours, &bare, false, |_, s, d| Some((s, d)));
        let back =
            RecurrentDrafter::<B>::load(&bare, 8, 7, random(7, 8, 1), random(7, 8, 2), &device())
                .unwrap();
        assert_eq!(back.config(), &config, "inferred configuration");
    }
    // A tied head's vocabulary is not in the tensors: inferring it needs the target.
    assert!(matches!(
        RecurrentDrafter::<B>::load_parameters(dir.join("published.safetensors"), &device()),
        Err(Error::InvalidConfig(_))
    ));
    // Separate heads load without a target.
    let d = drafter(&small_config(), 82);
    let ours = dir.join("ours.safetensors");
    let bare = dir.join("published.safetensors");
    d.save(&ours, CheckpointDType::F32).unwrap();
    rewrite(&ours, &bare, false, |_, s, d| Some((s, d)));
    let back = RecurrentDrafter::<B>::load_parameters(&bare, &device()).unwrap();
    assert_eq!(back.config(), &small_config());
    assert_eq!(params(&back), params(&d));
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn drafter_config_json_beside_the_checkpoint() {
    let dir = temp_dir("config-json");
    // Shapes alone would read this as trained for 5 steps; a config.json names the real setup.
    let config = small_config().with_exit_dim(10);
    let d = drafter(&config, 91);
    let ours = dir.join("ours.safetensors");
    let bare = dir.join("model.safetensors");
    d.save(&ours, CheckpointDType::F32).unwrap();
    rewrite(&ours, &bare, false, |_, s, d| Some((s, d)));

    // A target's config.json (no drafter fields) is ignored.
    std::fs::write(
        dir.join("config.json"),
        r#"{"hidden_size": 8, "vocab_size": 7}"#,
    )
    .unwrap();
    assert_eq!(read_checkpoint_config(&bare, Some((8, 7))).unwrap(), config);

    std::fs::write(
        dir.join("config.json"),
        r#"{"vocab_size": 7, "hidden_size": 8, "exit_dim": 10, "num_draft_layers": 2,
            "rnn": true, "model_type": "recurrent_drafting_drafter", "trained_steps": 4}"#,
    )
    .unwrap();
    let back =
        RecurrentDrafter::<B>::load(&bare, 8, 7, random(7, 8, 1), random(7, 8, 2), &device())
            .unwrap();
    assert_eq!(back.config(), &config.clone().with_trained_steps(Some(4)));

    // A config.json that contradicts the tensors is a shape error, not a silent misload.
    std::fs::write(
        dir.join("config.json"),
        r#"{"vocab_size": 7, "hidden_size": 8, "exit_dim": 12, "num_draft_layers": 2}"#,
    )
    .unwrap();
    assert!(matches!(
        RecurrentDrafter::<B>::load(&bare, 8, 7, random(7, 8, 1), random(7, 8, 2), &device()),
        Err(Error::ShapeMismatch { .. })
    ));
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn checkpoint_errors_are_typed() {
    let dir = temp_dir("errors");
    let d = drafter(&small_config(), 101);
    let path = dir.join("ok.safetensors");
    d.save(&path, CheckpointDType::F32).unwrap();
    let load = |p: &Path, h: usize, v: usize| {
        RecurrentDrafter::<B>::load(p, h, v, random(v, h, 1), random(v, h, 2), &device())
    };

    // Made for another target.
    match load(&path, 16, 7) {
        Err(Error::DrafterMismatch {
            drafter, target, ..
        }) => assert_eq!((drafter, target), (8, 16)),
        other => panic!("{other:?}"),
    }
    match load(&path, 8, 9) {
        Err(Error::DrafterMismatch {
            drafter, target, ..
        }) => assert_eq!((drafter, target), (7, 9)),
        other => panic!("{other:?}"),
    }

    let missing = dir.join("missing.safetensors");
    rewrite(&path, &missing, true, |n, s, d| {
        (n != "lm_head.1.linear.bias").then_some((s, d))
    });
    match load(&missing, 8, 7) {
        Err(Error::MissingTensor(name)) => assert_eq!(name, "lm_head.1.linear.bias"),
        other => panic!("{other:?}"),
    }

    let misshapen = dir.join("misshapen.safetensors");
    rewrite(&path, &misshapen, true, |n, s, d| {
        Some(if n == "rnn_u.weight" {
            (vec![4, 16], d)
        } else {
            (s, d)
        })
    });
    assert!(matches!(
        load(&misshapen, 8, 7),
        Err(Error::ShapeMismatch { .. })
    ));

    let garbage = dir.join("garbage.safetensors");
    std::fs::write(&garbage, b"not a safetensors file").unwrap();
    assert!(matches!(
        load(&garbage, 8, 7),
        Err(Error::Safetensors { .. })
    ));
    assert!(matches!(
        load(&dir.join("absent.safetensors"), 8, 7),
        Err(Error::Io { .. })
    ));
    std::fs::remove_dir_all(dir).ok();
}

/// The grouped top-k equals a full sort (and falls back to it where grouping does not pay).
#[test]
fn grouped_top_k_matches_full_sort() {
    for (rows, width, k) in [
        (3, 49152 / 8, 50),
        (2, 12288, 64),
        (2, 4000, 64),
        (1, 1000, 1),
        (2, 997, 50),
        (2, 60, 50),
    ] {
        let values = random(rows, width, width as u64);
        let (got_values, got_index) = super::top_k(values.clone(), k, super::TopKMethod::Sort);
        assert_eq!(got_values.dims(), [rows, k]);
        let (sorted, index) = values.sort_descending_with_indices(1);
        assert_eq!(floats(got_values), floats(sorted.narrow(1, 0, k)));
        assert_eq!(ints(got_index), ints(index.narrow(1, 0, k)));
    }
}

/// Compile-time check that the drafter trains under any autodiff backend (the `train` feature's
/// `Autodiff<B>` is not built in these tests): gradients reach the parameters, and the frozen
/// embeddings are plain tensors.
#[allow(dead_code)]
fn trains_under_autodiff<AB: burn::tensor::backend::AutodiffBackend>(
    drafter: RecurrentDrafter<AB>,
    context: Tensor<AB, 3>,
    tokens: Tensor<AB, 1, Int>,
) -> crate::Result<RecurrentDrafter<AB::InnerBackend>> {
    use burn::module::AutodiffModule;
    let [b, t, h] = context.dims();
    let embedded = drafter.embed(tokens)?.reshape([b, t, h]);
    let state = drafter.step(Tensor::zeros([b, t, h], &context.device()), embedded)?;
    let loss = drafter.head_logits(context, state)?.sum();
    let grads = loss.backward();
    let _gradient: Option<Tensor<AB::InnerBackend, 2>> = drafter.head.weight.grad(&grads);
    Ok(drafter.valid())
}

// ---------------------------------------------------------------------------------------------
// Draft vocabulary
// ---------------------------------------------------------------------------------------------

#[test]
fn a_draft_vocabulary_of_every_token_drafts_the_same_beams() {
    let config = RecurrentDrafterConfig::new(8, 60)
        .with_head(DraftHeadKind::Tied)
        .with_num_draft_layers(1);
    let full = drafter(&config, 31);
    // All 60 ids, in a scrambled order: only the indices change, never the scores.
    let ids: Vec<u32> = (0..60u32).map(|i| (i * 37) % 60).collect();
    let reduced = full
        .clone()
        .with_draft_vocabulary(DraftVocabulary::new(ids, 60).unwrap())
        .unwrap();
    let want = host_beams(full.beam_search(request(8, &[4, 9], 4, 4, 32)).unwrap());
    let got = host_beams(reduced.beam_search(request(8, &[4, 9], 4, 4, 32)).unwrap());
    assert_eq!(host_beams_tokens(&want), host_beams_tokens(&got));
    for (w, g) in want.iter().flatten().zip(got.iter().flatten()) {
        assert!(
            (w.score - g.score).abs() < 1e-5,
            "{} vs {}",
            w.score,
            g.score
        );
    }
}

/// `reduced`'s RNN step and draft logits (through its CPU panels) against `full`'s linears over
/// the whole vocabulary, at the draft vocabulary's `ids`.
fn assert_panels_match(
    full: &RecurrentDrafter<B>,
    reduced: &RecurrentDrafter<B>,
    ids: &[u32],
    seed: u64,
    label: &str,
) {
    let (context, state, embedding) = (
        random(3, 8, seed),
        random(3, 8, seed + 1),
        random(3, 8, seed + 2),
    );
    let want = floats(full.step(state.clone(), embedding.clone()).unwrap());
    let got = floats(reduced.step(state.clone(), embedding).unwrap());
    for (w, g) in want.iter().zip(&got) {
        assert!((w - g).abs() < 1e-5, "{label}: state {w} vs {g}");
    }
    let columns = Tensor::<B, 1, Int>::from_data(
        TensorData::new(
            ids.iter().map(|&i| i as i64).collect::<Vec<_>>(),
            [ids.len()],
        ),
        &device(),
    );
    let whole = full.head_logits(context.clone(), state.clone()).unwrap();
    let want = floats(whole.select(1, columns));
    let got = floats(reduced.draft_logits(context, state).unwrap());
    assert_eq!(want.len(), got.len());
    for (w, g) in want.iter().zip(&got) {
        assert!(
            (w - g).abs() < 1e-4 * w.abs().max(1.0),
            "{label}: logit {w} vs {g}"
        );
    }
}

#[test]
fn the_cpu_panels_compute_what_the_linears_compute() {
    let tied = RecurrentDrafterConfig::new(8, 60).with_head(DraftHeadKind::Tied);
    let configs = [
        tied.clone().with_num_draft_layers(2),
        // An exit width other than 2H: the head starts with an input projection.
        tied.clone().with_exit_dim(12),
        tied.clone().with_rnn(false),
    ];
    let ids: Vec<u32> = vec![7, 3, 59, 0, 22, 41, 18, 30, 5, 50, 11, 44, 2, 36, 27, 9, 55];
    let vocabulary = DraftVocabulary::new(ids.clone(), 60).unwrap();
    for (n, config) in configs.iter().enumerate() {
        let full = drafter(config, 61 + n as u64);
        let reduced = full
            .clone()
            .with_draft_vocabulary(vocabulary.clone())
            .unwrap();
        let panels = reduced.cpu_panels().expect("panels on Flex in f32");
        // Random f32 weights are not f16 values: every panel stays f32.
        assert_eq!(panels.half_weights(), 0, "config {n}");
        assert_panels_match(&full, &reduced, &ids, 70, &format!("config {n}"));
    }
    // A drafter whose weights are all f16 values (a checkpoint saved in f16, as the shipped one
    // is) keeps its layers' panels in f16 — the same products as f32 panels of those values.
    struct RoundToHalf;
    impl burn::module::ModuleMapper<B> for RoundToHalf {
        fn map_float<const D: usize>(
            &mut self,
            param: burn::module::Param<Tensor<B, D>>,
        ) -> burn::module::Param<Tensor<B, D>> {
            let (id, tensor, mapper) = param.consume();
            let rounded = tensor
                .cast(burn::tensor::DType::F16)
                .cast(burn::tensor::DType::F32);
            burn::module::Param::from_mapped_value(id, rounded, mapper)
        }
    }
    let full = drafter(&configs[0], 64).map(&mut RoundToHalf);
    let reduced = full
        .clone()
        .with_draft_vocabulary(vocabulary.clone())
        .unwrap();
    // The RNN's two, two blocks and the exit projection; the table (random embeddings) is f32.
    assert_eq!(reduced.cpu_panels().unwrap().half_weights(), 5);
    assert_panels_match(&full, &reduced, &ids, 75, "f16 layers");

    // Blocks added after the vocabulary no longer match its panels: the head falls back to its
    // linears (zero blocks are the identity, so the logits stay the same).
    let reduced = drafter(&configs[0], 61)
        .with_draft_vocabulary(DraftVocabulary::new(ids.clone(), 60).unwrap())
        .unwrap();
    let grown = reduced.clone().with_extra_res_blocks(1);
    let (context, state) = (random(2, 8, 73), random(2, 8, 74));
    let want = floats(
        reduced
            .draft_logits(context.clone(), state.clone())
            .unwrap(),
    );
    let got = floats(grown.draft_logits(context, state).unwrap());
    for (w, g) in want.iter().zip(&got) {
        assert!(
            (w - g).abs() < 1e-4 * w.abs().max(1.0),
            "grown: logit {w} vs {g}"
        );
    }
}

#[test]
fn a_small_draft_vocabulary_drafts_only_its_tokens() {
    let config = RecurrentDrafterConfig::new(8, 60).with_head(DraftHeadKind::Tied);
    let allowed: Vec<u32> = vec![5, 17, 2, 40, 33, 59, 11];
    let d = drafter(&config, 41)
        .with_draft_vocabulary(DraftVocabulary::new(allowed.clone(), 60).unwrap())
        .unwrap();
    assert_eq!(d.draft_vocabulary().unwrap().ids(), &allowed[..]);
    let beams = host_beams(d.beam_search(request(8, &[3], 5, 4, 42)).unwrap());
    for beam in &beams[0] {
        // Column 0 is the target's own token g0.
        assert_eq!(beam.tokens[0], 3);
        for &t in &beam.tokens[1..] {
            assert!(allowed.contains(&(t as u32)), "drafted {t} outside the set");
        }
    }
    // More beams than the set has tokens: a typed error, not a panic.
    assert!(matches!(
        d.beam_search(request(8, &[3], 8, 3, 43)),
        Err(Error::InvalidSettings(_))
    ));
    // The set survives re-attaching embeddings (its rows are re-read from the new table).
    let d = d
        .with_embeddings(random(60, 8, 44), random(60, 8, 45))
        .unwrap();
    assert_eq!(d.draft_vocabulary().unwrap().len(), allowed.len());
}

#[test]
fn draft_vocabulary_misuse_is_a_typed_error() {
    let separate = drafter(&RecurrentDrafterConfig::new(8, 60), 51);
    let vocabulary = DraftVocabulary::new(vec![1, 2, 3], 60).unwrap();
    assert!(matches!(
        separate.with_draft_vocabulary(vocabulary.clone()),
        Err(Error::InvalidSettings(_))
    ));
    let tied = drafter(
        &RecurrentDrafterConfig::new(8, 60).with_head(DraftHeadKind::Tied),
        52,
    );
    let other_size = DraftVocabulary::new(vec![1, 2, 3], 61).unwrap();
    assert!(matches!(
        tied.clone().with_draft_vocabulary(other_size),
        Err(Error::InvalidSettings(_))
    ));
    let bare = RecurrentDrafterConfig::new(8, 60)
        .with_head(DraftHeadKind::Tied)
        .init_seeded::<B>(53, &device())
        .unwrap();
    assert!(matches!(
        bare.with_draft_vocabulary(vocabulary),
        Err(Error::InvalidConfig(_))
    ));
}

#[test]
fn a_one_beam_draft_on_the_host_drafts_beam_searchs_tokens() {
    let tied = RecurrentDrafterConfig::new(8, 60).with_head(DraftHeadKind::Tied);
    // The published head and one that starts with an input projection (exit width other than 2H).
    let configs = [tied.clone(), tied.with_exit_dim(12)];
    let ids: Vec<u32> = vec![7, 3, 59, 0, 22, 41, 18, 30, 5, 50, 11, 44, 2, 36, 27, 9, 55];
    let vocabulary = DraftVocabulary::new(ids.clone(), 60).unwrap();
    for (n, config) in configs.iter().enumerate() {
        let drafter = drafter(config, 90 + n as u64)
            .with_draft_vocabulary(vocabulary.clone())
            .unwrap();
        let first = [5i64, 59, 12];
        for seed in 0..4u64 {
            let request = request(8, &first, 1, 5, 300 + seed);
            let (context, first_tokens) = (request.context.clone(), request.first_tokens.clone());
            // With log-probs wanted, beam search keeps the top 50 and walks Burn's ops.
            let searched = host_beams(drafter.beam_search(request.clone()).unwrap());
            let embedding = drafter.input_embedding().unwrap();
            let host = cpu_chain::draft_one_beam(&drafter, embedding, &context, &first_tokens, 5)
                .expect("the host path applies: Flex, f32, an RNN head with a draft vocabulary");
            assert_eq!(host.dims(), [3, 1, 5]);
            let host = ints(host);
            for (row, beams) in searched.iter().enumerate() {
                assert_eq!(
                    host[row * 5..(row + 1) * 5],
                    beams[0].tokens[..],
                    "config {n}, seed {seed}, row {row}"
                );
                assert_eq!(host[row * 5], first[row]);
                assert!(
                    host[row * 5 + 1..(row + 1) * 5]
                        .iter()
                        .all(|t| ids.contains(&(*t as u32)))
                );
            }
            // Without log-probs, beam search takes the host path, log-probs and scores zero.
            let quick = drafter
                .beam_search(DraftRequest {
                    needs_log_probs: false,
                    ..request
                })
                .unwrap();
            assert_eq!(ints(quick.tokens), host);
            assert!(floats(quick.token_log_probs).iter().all(|&v| v == 0.0));
            assert!(floats(quick.scores).iter().all(|&v| v == 0.0));
        }
    }
    // Not for a drafter without an RNN, nor without a draft vocabulary: beam search's ops then.
    let request = request(8, &[1], 1, 3, 310);
    let plain = drafter(&configs[0], 97);
    let no_rnn = drafter(&configs[0].clone().with_rnn(false), 98)
        .with_draft_vocabulary(vocabulary)
        .unwrap();
    for (what, drafter) in [("no draft vocabulary", plain), ("no RNN", no_rnn)] {
        let embedding = drafter.input_embedding().unwrap();
        let host = cpu_chain::draft_one_beam(
            &drafter,
            embedding,
            &request.context,
            &request.first_tokens,
            3,
        );
        assert!(host.is_none(), "{what}");
    }
}
