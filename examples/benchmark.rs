//! Plain autoregressive decoding vs ReDrafter, in one process, on the same device and prompts.
//!
//! ```text
//! cargo run --release --example benchmark -- --drafter drafters/smollm2-135m-instruct.safetensors \
//!     --limit 80 --max-new-tokens 256 --beam-widths 1,4,16,64 --beam-lengths 5 --out bench.json
//! ```
//! Prompts are the first turns of MT-Bench (`benches/data/mt_bench_question.jsonl`) unless
//! `--prompts` names another JSONL file (`--field` picks the text; a list field takes its first
//! element). Every mode is warmed up first. Greedy outputs of AR and ReDrafter are compared; the
//! program exits non-zero if more than `--max-mismatches` prompts differ.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use burn::tensor::backend::Backend;
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use redrafter::backend::BackendKind;
use redrafter::decoder::{Acceptance, SpeculativeConfig, SpeculativeDecoder};
use redrafter::drafter::{DraftHeadKind, RecurrentDrafter, RecurrentDrafterConfig};
use redrafter::models::llama::{Llama, LlamaLoadOptions, load_llama};
use redrafter::tokenizer::{ChatMessage, Tokenizer};
use redrafter::{GenerationConfig, Sampling, Stats, TargetModel, generate};
use serde::Serialize;

#[derive(Parser, Debug)]
struct Args {
    #[arg(long)]
    model: Option<PathBuf>,
    /// Drafter checkpoint, or `random` for an untrained tied drafter (measures pure overhead).
    /// Without it only the autoregressive baseline runs.
    #[arg(long)]
    drafter: Option<String>,
    #[arg(long, default_value = "benches/data/mt_bench_question.jsonl")]
    prompts: PathBuf,
    #[arg(long, default_value = "turns")]
    field: String,
    /// Use only the first N prompts.
    #[arg(long)]
    limit: Option<usize>,
    #[arg(long, default_value_t = 256)]
    max_new_tokens: usize,
    #[arg(long, value_delimiter = ',', default_value = "16")]
    beam_widths: Vec<usize>,
    #[arg(long, value_delimiter = ',', default_value = "5")]
    beam_lengths: Vec<usize>,
    /// Temperatures; 0 runs greedy acceptance, others exact sampling.
    #[arg(long, value_delimiter = ',', default_value = "0")]
    temperatures: Vec<f32>,
    /// Acceptance for temperature > 0: exact | typical | reference-parity.
    #[arg(long, default_value = "exact")]
    sampled_acceptance: String,
    #[arg(long, default_value = "cpu")]
    backend: String,
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Warm-up generations per mode (not timed).
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Skip the AR baseline (e.g. for a τ-only sweep).
    #[arg(long)]
    no_baseline: bool,
    #[arg(long, default_value_t = 1)]
    max_mismatches: usize,
    /// Write all results as JSON here.
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Serialize, Clone)]
struct ModeResult {
    mode: String,
    beam_width: usize,
    beam_length: usize,
    temperature: f32,
    prompts: usize,
    new_tokens: usize,
    seconds: f64,
    tokens_per_second: f64,
    speedup_over_ar: Option<f64>,
    tau: f64,
    acceptance_per_depth: Vec<f64>,
    mean_packed_tokens: f64,
    syncs_per_round: f64,
    time_split_s: serde_json::Value,
    greedy_mismatches: Vec<usize>,
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let kind: BackendKind = args.backend.parse()?;
    match kind.ensure_compiled()? {
        #[cfg(any(feature = "flex", feature = "ndarray"))]
        BackendKind::Cpu => run::<redrafter::backend::Cpu>(&args, Default::default()),
        #[cfg(feature = "cuda")]
        BackendKind::Cuda => run::<redrafter::backend::Cuda>(&args, Default::default()),
        #[cfg(feature = "wgpu")]
        BackendKind::Wgpu => {
            run::<redrafter::backend::Wgpu>(&args, redrafter::backend::wgpu_device()?)
        }
        #[allow(unreachable_patterns)]
        other => bail!("backend {other:?} is not compiled in"),
    }
}

fn read_prompts(args: &Args, tokenizer: &Tokenizer) -> Result<Vec<Vec<u32>>> {
    let text = std::fs::read_to_string(&args.prompts)
        .with_context(|| format!("reading {}", args.prompts.display()))?;
    let mut prompts = Vec::new();
    for (line_no, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let value: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("line {} is not JSON", line_no + 1))?;
        let field = &value[&args.field];
        let content = match field {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Array(items) => items
                .first()
                .and_then(|v| v.as_str())
                .map(str::to_string)
                .with_context(|| {
                    format!("line {}: `{}` is an empty list", line_no + 1, args.field)
                })?,
            _ => bail!("line {}: no text field `{}`", line_no + 1, args.field),
        };
        prompts.push(tokenizer.encode_chat(&[ChatMessage::user(content)], true)?);
        if args.limit.is_some_and(|n| prompts.len() >= n) {
            break;
        }
    }
    if prompts.is_empty() {
        bail!("no prompts in {}", args.prompts.display());
    }
    Ok(prompts)
}

fn progress(len: usize, label: &str) -> ProgressBar {
    let bar = ProgressBar::new(len as u64);
    bar.set_style(
        ProgressStyle::with_template("{prefix:>28} [{bar:30}] {pos}/{len} {elapsed}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_prefix(label.to_string());
    bar
}

fn summarize(
    mode: String,
    (beam_width, beam_length, temperature): (usize, usize, f32),
    stats: &Stats,
    prompts: usize,
    ar_tps: Option<f64>,
    mismatches: Vec<usize>,
) -> ModeResult {
    let secs = stats.total_time.as_secs_f64();
    let tps = if secs > 0.0 {
        stats.new_tokens as f64 / secs
    } else {
        0.0
    };
    let rounds = stats.row_rounds.max(1) as f64;
    ModeResult {
        mode,
        beam_width,
        beam_length,
        temperature,
        prompts,
        new_tokens: stats.new_tokens,
        seconds: secs,
        tokens_per_second: tps,
        speedup_over_ar: ar_tps.map(|ar| tps / ar),
        tau: stats.tau(),
        acceptance_per_depth: stats.acceptance_rate_per_depth(),
        mean_packed_tokens: stats.packed_tokens as f64 / rounds,
        syncs_per_round: stats.syncs as f64 / (stats.target_forwards.max(1) as f64),
        time_split_s: serde_json::json!({
            "prefill": stats.prefill_time.as_secs_f64(),
            "draft": stats.draft_time.as_secs_f64(),
            "tree": stats.tree_time.as_secs_f64(),
            "verify": stats.verify_time.as_secs_f64(),
            "accept": stats.accept_time.as_secs_f64(),
                    "readback": stats.readback_time.as_secs_f64(),
        }),
        greedy_mismatches: mismatches,
    }
}

fn run<B: Backend>(args: &Args, device: B::Device) -> Result<()> {
    let model_path = match &args.model {
        Some(p) => p.clone(),
        None => redrafter::hub::smollm2_instruct_gguf()?,
    };
    let options = LlamaLoadOptions {
        dtype: redrafter::backend::parse_float_dtype(&args.dtype)?,
        ..Default::default()
    };
    let (model, tokenizer): (Llama<B>, _) = load_llama(&model_path, &options, &device)?;
    let drafter = match args.drafter.as_deref() {
        None => None,
        Some("random") => Some(
            RecurrentDrafterConfig::new(model.hidden_size(), model.vocab_size())
                .with_head(DraftHeadKind::Tied)
                .init_seeded::<B>(0, &device)?
                .with_target(&model)?,
        ),
        Some(path) => Some(RecurrentDrafter::load_for_target(path, &model)?),
    };
    let prompts = read_prompts(args, &tokenizer)?;
    let eos = tokenizer.eos_token_ids().to_vec();
    eprintln!(
        "{} prompts, {} new tokens, backend {}, dtype {}",
        prompts.len(),
        args.max_new_tokens,
        args.backend,
        args.dtype
    );
    let mut results = Vec::new();
    let mut failed = false;
    for &temperature in &args.temperatures {
        let generation = GenerationConfig {
            max_new_tokens: args.max_new_tokens,
            stop_tokens: eos.clone(),
            sampling: Sampling::with_temperature(temperature),
            seed: 0,
        };
        // Baseline.
        let mut ar_outputs = Vec::new();
        let mut ar_tps = None;
        if !args.no_baseline {
            for prompt in prompts.iter().take(args.warmup) {
                generate(&model, std::slice::from_ref(prompt), &generation, |_, _| {})?;
            }
            let bar = progress(prompts.len(), &format!("AR T={temperature}"));
            let mut stats = Stats::default();
            for prompt in &prompts {
                let out = generate(&model, std::slice::from_ref(prompt), &generation, |_, _| {})?;
                stats.merge(&out.stats);
                ar_outputs.push(out.tokens.into_iter().next().unwrap_or_default());
                bar.inc(1);
            }
            bar.finish_and_clear();
            let result = summarize(
                "ar".into(),
                (0, 0, temperature),
                &stats,
                prompts.len(),
                None,
                vec![],
            );
            eprintln!("AR  T={temperature}: {:.1} tok/s", result.tokens_per_second);
            ar_tps = Some(result.tokens_per_second);
            results.push(result);
        }
        let Some(drafter) = &drafter else { continue };
        let acceptance = if temperature == 0.0 {
            Acceptance::Greedy
        } else {
            args.sampled_acceptance.parse()?
        };
        for &beam_length in &args.beam_lengths {
            for &beam_width in &args.beam_widths {
                let config = SpeculativeConfig::default()
                    .beam_width(beam_width)
                    .beam_length(beam_length)
                    .acceptance(acceptance)
                    .generation(generation.clone());
                let decoder = SpeculativeDecoder::new(&model, drafter, config)?;
                for prompt in prompts.iter().take(args.warmup) {
                    decoder.generate(std::slice::from_ref(prompt), |_, _| {})?;
                }
                let bar = progress(
                    prompts.len(),
                    &format!("ReDrafter M={beam_width} C={beam_length} T={temperature}"),
                );
                let mut stats = Stats::default();
                let mut mismatches = Vec::new();
                for (i, prompt) in prompts.iter().enumerate() {
                    let out = decoder.generate(std::slice::from_ref(prompt), |_, _| {})?;
                    stats.merge(&out.stats);
                    if temperature == 0.0
                        && !ar_outputs.is_empty()
                        && out.tokens[0] != ar_outputs[i]
                    {
                        mismatches.push(i);
                    }
                    bar.inc(1);
                }
                bar.finish_and_clear();
                let result = summarize(
                    format!("redrafter-{acceptance:?}").to_lowercase(),
                    (beam_width, beam_length, temperature),
                    &stats,
                    prompts.len(),
                    ar_tps,
                    mismatches.clone(),
                );
                eprintln!(
                    "ReDrafter M={beam_width:<2} C={beam_length} T={temperature}: {:.1} tok/s, speedup {}, τ {:.2}, packed {:.1}, split draft/tree/verify/readback/accept {:.2}/{:.2}/{:.2}/{:.2}/{:.2} s, mismatches {:?}",
                    result.tokens_per_second,
                    result
                        .speedup_over_ar
                        .map(|s| format!("{s:.2}×"))
                        .unwrap_or("-".into()),
                    result.tau,
                    result.mean_packed_tokens,
                    stats.draft_time.as_secs_f64(),
                    stats.tree_time.as_secs_f64(),
                    stats.verify_time.as_secs_f64(),
                    stats.readback_time.as_secs_f64(),
                    stats.accept_time.as_secs_f64(),
                    mismatches
                );
                if mismatches.len() > args.max_mismatches {
                    eprintln!("greedy outputs differ from AR on prompts {mismatches:?}");
                    failed = true;
                }
                results.push(result);
            }
        }
    }
    let report = serde_json::json!({
        "model": model_path,
        "drafter": args.drafter,
        "backend": args.backend,
        "dtype": args.dtype,
        "prompts_file": args.prompts,
        "prompts": prompts.len(),
        "max_new_tokens": args.max_new_tokens,
        "results": results,
    });
    if let Some(out) = &args.out {
        std::fs::write(out, serde_json::to_string_pretty(&report)?)?;
    }
    println!("{}", serde_json::to_string(&report)?);
    if failed {
        std::process::exit(2);
    }
    Ok(())
}
