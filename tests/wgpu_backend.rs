//! The WGPU backend on the real SmolLM2-135M-Instruct: logits against HF Transformers and the CPU
//! backend, lossless greedy speculative decoding, the sampling acceptance modes, and a training
//! step. Runs on any Vulkan adapter — in CI on Mesa's software driver (lavapipe), which `.ci/run`
//! installs:
//!
//! ```text
//! cargo test --release --features wgpu,train --test wgpu_backend
//! ```
#![cfg(feature = "wgpu")]

mod common;

use redrafter::backend::{Wgpu, wgpu_device};
use redrafter::decoder::{Acceptance, SpeculativeConfig, SpeculativeDecoder};
use redrafter::drafter::RecurrentDrafter;
use redrafter::models::llama::{Llama, LlamaLoadOptions, load_llama};
use redrafter::tokenizer::Tokenizer;
use redrafter::{GenerationConfig, TargetModel, generate};

const SHIPPED_DRAFTER: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/drafters/smollm2-135m-instruct.safetensors"
);

/// Lavapipe runs a 135M model at well under one token per second: keep generations short.
const NEW_TOKENS: usize = 16;

/// One test at a time: they share the device (a software one in CI, with two cores to run it)
/// and Burn's process-wide random generator, which a sampling test reseeds and draws from.
static DEVICE: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn exclusive() -> std::sync::MutexGuard<'static, ()> {
    DEVICE
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn smollm2_wgpu() -> (Llama<Wgpu>, Tokenizer) {
    let device = wgpu_device().expect("a Vulkan adapter (see .ci/run for the software one)");
    let path = redrafter::hub::smollm2_instruct_gguf().expect("SmolLM2 GGUF available");
    load_llama::<Wgpu>(&path, &LlamaLoadOptions::default(), &device).expect("model loads")
}

fn logits_of<B: burn::tensor::backend::Backend>(model: &Llama<B>, ids: &[u32]) -> Vec<f32> {
    model
        .logits(common::prompt_hidden(model, ids))
        .into_data()
        .iter::<f32>()
        .collect()
}

#[test]
fn logits_match_transformers_and_the_cpu_backend() {
    let _device = exclusive();
    let (model, _) = smollm2_wgpu();
    let (cpu_model, _) = common::smollm2();
    let fixture = common::reference();
    let probes = common::ids(&fixture["probe_ids"]);
    let vocab = model.vocab_size();
    let case = &fixture["logits"][0];
    let prompt = common::ids(&case["ids"]);
    let logits = logits_of(&model, &prompt);
    let cpu_logits = logits_of(&cpu_model, &prompt);

    // Independent reference: HF Transformers' fp32 logits at the fixture's positions.
    for position in case["positions"].as_array().unwrap() {
        let pos = position["pos"].as_u64().unwrap() as usize;
        let row = &logits[pos * vocab..(pos + 1) * vocab];
        assert_eq!(
            redrafter::sampling::argmax(row) as u64,
            position["argmax"].as_u64().unwrap(),
            "argmax at {pos}"
        );
        let expected = position["probe_values"].as_array().unwrap();
        for (probe, value) in probes.iter().zip(expected) {
            let value = value.as_f64().unwrap() as f32;
            let got = row[*probe as usize];
            assert!(
                (got - value).abs() < 2e-3,
                "pos {pos} id {probe}: {got} vs {value}"
            );
        }
    }

    // Every logit of every position against the CPU backend.
    let worst = logits
        .iter()
        .zip(&cpu_logits)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    eprintln!("max |wgpu - cpu| over {} logits: {worst:.2e}", logits.len());
    assert!(worst < 2e-3, "wgpu and cpu logits differ by {worst}");
}

fn chat_prompts(tokenizer: &Tokenizer) -> Vec<Vec<u32>> {
    common::chat_prompts(
        tokenizer,
        &["Write a haiku about rain.", "What is 17 times 23? Explain."],
    )
}

#[test]
fn greedy_speculative_equals_plain_greedy_and_transformers() {
    let _device = exclusive();
    let (model, tokenizer) = smollm2_wgpu();
    let fixture = common::reference();

    // Plain greedy on WGPU against HF's greedy continuation of the fixture's first prompt.
    let case = &fixture["greedy"][0];
    let hf_prompt = common::ids(&case["prompt_ids"]);
    let hf_new = common::ids(&case["new_ids"]);
    let n = NEW_TOKENS.min(hf_new.len());
    let ours = generate(
        &model,
        std::slice::from_ref(&hf_prompt),
        &GenerationConfig::default().with_max_new_tokens(n),
        |_, _| {},
    )
    .unwrap();
    assert_eq!(
        ours.tokens[0],
        hf_new[..n],
        "plain greedy vs HF Transformers"
    );

    // Speculative greedy with the shipped drafter, two prompts of different lengths batched.
    let prompts = chat_prompts(&tokenizer);
    let greedy = GenerationConfig::default().with_max_new_tokens(NEW_TOKENS);
    let plain = generate(&model, &prompts, &greedy, |_, _| {}).unwrap();
    let drafter = RecurrentDrafter::<Wgpu>::load_for_target(SHIPPED_DRAFTER, &model).unwrap();
    let config = SpeculativeConfig::default()
        .beam_width(4)
        .beam_length(4)
        .acceptance(Acceptance::Greedy)
        .generation(greedy);
    let speculative = SpeculativeDecoder::new(&model, &drafter, config)
        .unwrap()
        .generate(&prompts, |_, _| {})
        .unwrap();
    for (row, (got, want)) in speculative.tokens.iter().zip(&plain.tokens).enumerate() {
        assert_eq!(got, want, "row {row}");
        assert_eq!(got.len(), NEW_TOKENS);
    }
    eprintln!("τ on wgpu: {:.2}", speculative.stats.tau());
    assert!(speculative.stats.tau() >= 1.0);
}

#[test]
fn sampling_acceptance_modes_run_and_are_reproducible() {
    let _device = exclusive();
    let (model, tokenizer) = smollm2_wgpu();
    let prompts = chat_prompts(&tokenizer);
    let drafter = RecurrentDrafter::<Wgpu>::load_for_target(SHIPPED_DRAFTER, &model).unwrap();
    for acceptance in [Acceptance::Exact, Acceptance::typical()] {
        let run = || {
            let config = SpeculativeConfig::default()
                .beam_width(2)
                .beam_length(3)
                .acceptance(acceptance)
                .max_new_tokens(8)
                .temperature(0.7)
                .seed(11);
            SpeculativeDecoder::new(&model, &drafter, config)
                .unwrap()
                .generate(&prompts[..1], |_, _| {})
                .unwrap()
        };
        let (first, second) = (run(), run());
        assert_eq!(first.tokens[0].len(), 8, "{acceptance:?}");
        assert!(
            first.tokens[0]
                .iter()
                .all(|&t| (t as usize) < model.vocab_size()),
            "{acceptance:?}"
        );
        assert_eq!(first.tokens, second.tokens, "{acceptance:?} with one seed");
    }
}

/// A short training run on WGPU (target forward, drafter forward and backward, AdamW) reports the
/// same first loss as the same run on the CPU backend: the drafter's initial weights are seeded
/// on the host, so both start from identical weights and data.
#[cfg(feature = "train")]
#[test]
fn training_step_matches_the_cpu_backend() {
    let _device = exclusive();
    use redrafter::drafter::{CheckpointDType, DraftHeadKind, RecurrentDrafterConfig};
    use redrafter::train::{Sequence, TrainConfig, train_drafter};

    let fixture = common::reference();
    let sequences: Vec<Sequence> = fixture["greedy"]
        .as_array()
        .unwrap()
        .iter()
        .take(2)
        .map(|case| {
            let prompt = common::ids(&case["prompt_ids"]);
            let mut tokens = prompt.clone();
            tokens.extend(common::ids(&case["new_ids"]));
            Sequence {
                tokens,
                prompt_len: prompt.len(),
            }
        })
        .collect();
    let config = TrainConfig {
        draft_steps: 2,
        max_steps: Some(2),
        batch_size: 2,
        max_seq_len: 96,
        micro_batch_tokens: 128,
        eval_every: 0,
        checkpoint_every: 0,
        ..TrainConfig::default()
    };
    let dir = std::env::temp_dir().join(format!("redrafter-wgpu-train-{}", std::process::id()));
    let first_loss = |report: redrafter::train::TrainReport| report.first_loss.unwrap();

    let (model, _) = smollm2_wgpu();
    // The tied head (what ships): a separate head's [2H, V] weight is 226 MB here, over WGPU's
    // 128 MiB limit on one storage binding.
    let drafter = RecurrentDrafterConfig::new(model.hidden_size(), model.vocab_size())
        .with_head(DraftHeadKind::Tied);
    let on_wgpu = train_drafter(
        &model,
        &drafter,
        &sequences,
        &[],
        dir.join("wgpu.safetensors"),
        &config,
        CheckpointDType::F32,
        |_| {},
    )
    .unwrap();
    drop(model);
    let (cpu_model, _) = common::smollm2();
    let on_cpu = train_drafter(
        &cpu_model,
        &drafter,
        &sequences,
        &[],
        dir.join("cpu.safetensors"),
        &config,
        CheckpointDType::F32,
        |_| {},
    )
    .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let (wgpu_loss, cpu_loss) = (first_loss(on_wgpu.clone()), first_loss(on_cpu));
    eprintln!("first loss: wgpu {wgpu_loss:.6}, cpu {cpu_loss:.6}");
    assert!(wgpu_loss.is_finite() && on_wgpu.last_loss.unwrap().is_finite());
    assert!(
        (wgpu_loss - cpu_loss).abs() < 1e-3 * cpu_loss.abs().max(1.0),
        "wgpu {wgpu_loss} vs cpu {cpu_loss}"
    );
}
