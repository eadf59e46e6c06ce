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

#[path = "common/backend.rs"]
mod backend;

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use backend::run_on_backend;
use burn::tensor::backend::Backend;
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use redrafter::cube_kernels;
use redrafter::decoder::{Acceptance, DraftTiming, SpeculativeConfig, SpeculativeDecoder};
use redrafter::drafter::{
    DraftHeadKind, DraftVocabulary, RecurrentDrafter, RecurrentDrafterConfig, TopKMethod,
};
use redrafter::generate::prefill;
use redrafter::models::llama::{Llama, LlamaLoadOptions, load_llama};
use redrafter::tokenizer::{ChatMessage, Tokenizer};
use redrafter::{GenerationConfig, PromptLookup, Sampling, Stats, TargetModel, generate};
use serde::Serialize;

#[derive(Parser, Debug)]
struct Args {
    #[arg(long)]
    model: Option<PathBuf>,
    /// Drafter checkpoint, or `random` for an untrained tied drafter (measures pure overhead);
    /// a list compares drafters in one process. Without it only the autoregressive baseline runs.
    #[arg(long, value_delimiter = ',')]
    drafter: Vec<String>,
    #[arg(long, default_value = "benches/data/mt_bench_question.jsonl")]
    prompts: PathBuf,
    #[arg(long, default_value = "turns")]
    field: String,
    /// Use only the first N prompts (after `--skip`).
    #[arg(long)]
    limit: Option<usize>,
    /// Skip the first N prompts of the file (to split a long run into parts).
    #[arg(long, default_value_t = 0)]
    skip: usize,
    /// Prompts decoded together. Speed figures are for batch 1; a larger batch measures τ
    /// (which greedy decoding does not change) in a fraction of the time.
    #[arg(long, default_value_t = 1)]
    batch_size: usize,
    #[arg(long, default_value_t = 256)]
    max_new_tokens: usize,
    #[arg(long, value_delimiter = ',', default_value = "16")]
    beam_widths: Vec<usize>,
    #[arg(long, value_delimiter = ',', default_value = "5")]
    beam_lengths: Vec<usize>,
    /// Prompt-lookup beams added to the drafted ones (0 = pure ReDrafter); a list sweeps.
    #[arg(long, value_delimiter = ',', default_value = "0")]
    lookup_beams: Vec<usize>,
    /// Tokens per prompt-lookup beam when longer than the beam length (drafted beams are then
    /// extended with guesses too, unless drafting overlaps the tree); a list sweeps.
    #[arg(long, value_delimiter = ',')]
    lookup_length: Vec<usize>,
    /// Shortest suffix match whose guess runs on to the lookup length (shorter matches stop at
    /// the beam length, `PromptLookup::extend_min_ngram`); a list sweeps.
    #[arg(long, value_delimiter = ',', default_value = "1")]
    lookup_extend_ngram: Vec<usize>,
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
    /// Draft head top-k: auto (rank selection on GPUs, sort on CPUs), sort or rank.
    #[arg(long, default_value = "auto")]
    top_k: String,
    /// Draft vocabulary (`train_drafter draft-vocab`): the drafter scores only these tokens.
    #[arg(long)]
    draft_vocab: Option<PathBuf>,
    /// With --draft-vocab: its first N tokens; a list sweeps, 0 = the whole vocabulary.
    #[arg(long, value_delimiter = ',')]
    draft_vocab_sizes: Vec<usize>,
    /// With --draft-vocab on the GPU backends: `on` merges the draft head's exit projection with
    /// the draft table (one product a draft step), `off` keeps them apart; `on,off` runs both in
    /// this process, one after the other, for a comparison free of the spread between processes.
    #[arg(long, value_delimiter = ',', default_value = "on", value_parser = parse_switch)]
    merged_exit: Vec<bool>,
    /// When each round's beams are drafted: auto, sequential or overlapped (the decoder's
    /// `DraftTiming`); a list runs each as a mode of its own.
    #[arg(long, value_delimiter = ',', default_value = "auto")]
    draft_timings: Vec<DraftTiming>,
    /// Verify drafted tokens only while their beam's draft probability is at least this, and
    /// stop drafting below it (`SpeculativeConfig::min_draft_probability`; 0 = off); a list
    /// sweeps.
    #[arg(long, value_delimiter = ',', default_value = "0")]
    min_draft_prob: Vec<f32>,
    /// Where the host hands queued GPU work to CubeCL's runner early: `none`, `draft` (after an
    /// overlapped round's draft), `layersN` (every N layers of a forward) or both joined by `+`
    /// (`draft+layers6`); a list runs each as a group of modes with its own AR baseline.
    #[arg(long, value_delimiter = ',', default_value = "draft", value_parser = parse_queue_flush)]
    queue_flush: Vec<cube_kernels::QueueFlush>,
    /// Decode each prompt in every mode in turn (AR, then each ReDrafter shape) instead of one
    /// mode over all prompts after the other: a host whose speed drifts between minutes then
    /// moves every mode alike, and the speedups compare like with like.
    #[arg(long)]
    interleave: bool,
    /// Write all results as JSON here.
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Serialize, Clone)]
struct ModeResult {
    mode: String,
    /// The drafter checkpoint (`--drafter`; empty for AR).
    drafter: String,
    /// Tokens the drafter chooses from (the draft vocabulary's size, else the vocabulary's).
    draft_vocab: usize,
    /// Whether the drafter's exit projection ran merged with its draft table.
    merged_exit: bool,
    beam_width: usize,
    beam_length: usize,
    /// Prompt-lookup beams next to the drafted ones.
    lookup_beams: usize,
    /// Tokens per beam of the verified tree (beam length, or the lookup length when longer).
    tree_length: usize,
    /// Shortest suffix match whose lookup guess ran past the beam length.
    lookup_extend_ngram: usize,
    /// The drafted beams' probability floor (0: none).
    min_draft_probability: f32,
    /// Where queued GPU work was handed over early (`--queue-flush`).
    queue_flush: String,
    /// Whether rounds drafted their own beams at their start (`DraftTiming::Overlapped`, or
    /// `Auto` resolved to it).
    overlapped_draft: bool,
    /// Fraction of rounds won by a prompt-lookup beam.
    lookup_round_share: f64,
    temperature: f32,
    prompts: usize,
    new_tokens: usize,
    seconds: f64,
    tokens_per_second: f64,
    /// Tokens per second with the prompt prefill's time left out.
    decode_tokens_per_second: f64,
    speedup_over_ar: Option<f64>,
    tau: f64,
    acceptance_per_depth: Vec<f64>,
    mean_packed_tokens: f64,
    syncs_per_round: f64,
    time_split_s: serde_json::Value,
    greedy_mismatches: Vec<usize>,
    /// Where and by how much each mismatching output left the AR one.
    divergences: Vec<Divergence>,
}

/// The first token where a speculative greedy output differs from the AR one, and the target's
/// logits for both candidates from a third, independent forward over their common prefix: a
/// margin near zero is a floating-point near-tie, a large one a bug.
#[derive(Serialize, Clone, Debug)]
struct Divergence {
    prompt: usize,
    position: usize,
    ar_token: Option<u32>,
    speculative_token: Option<u32>,
    ar_logit: f32,
    speculative_logit: f32,
}

fn divergence<B: Backend>(
    model: &Llama<B>,
    prompt_index: usize,
    prompt: &[u32],
    ar: &[u32],
    speculative: &[u32],
) -> Result<Divergence> {
    let position = ar
        .iter()
        .zip(speculative)
        .position(|(a, s)| a != s)
        .unwrap_or(ar.len().min(speculative.len()));
    let (ar_token, speculative_token) = (
        ar.get(position).copied(),
        speculative.get(position).copied(),
    );
    let context: Vec<u32> = prompt.iter().chain(&ar[..position]).copied().collect();
    let mut cache = model.new_cache(1, context.len());
    let hidden = prefill(model, &mut cache, &[context])?;
    let logits: Vec<f32> = model
        .logits(hidden.unsqueeze_dim::<3>(1))
        .into_data()
        .convert::<f32>()
        .to_vec()
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    // A missing token (one output stopped earlier) is reported as the EOS decision it was.
    let logit = |t: Option<u32>| t.map(|t| logits[t as usize]).unwrap_or(f32::NAN);
    Ok(Divergence {
        prompt: prompt_index,
        position,
        ar_token,
        speculative_token,
        ar_logit: logit(ar_token),
        speculative_logit: logit(speculative_token),
    })
}

fn main() -> Result<()> {
    backend::init_tracing();
    let args = Args::parse();
    run_on_backend!(args.backend, run, &args)
}

fn read_prompts(args: &Args, tokenizer: &Tokenizer) -> Result<Vec<Vec<u32>>> {
    let text = std::fs::read_to_string(&args.prompts)
        .with_context(|| format!("reading {}", args.prompts.display()))?;
    let mut prompts = Vec::new();
    for (line_no, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .skip(args.skip)
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

/// One mode's result; `speculative` is `None` for the AR baseline (its shape fields read 0).
fn summarize(
    mode: String,
    speculative: Option<&SpeculativeConfig>,
    temperature: f32,
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
        drafter: String::new(),
        draft_vocab: 0,
        merged_exit: false,
        beam_width: speculative.map_or(0, |c| c.beam_width),
        beam_length: speculative.map_or(0, |c| c.beam_length),
        lookup_beams: speculative.and_then(|c| c.lookup).map_or(0, |l| l.beams),
        lookup_extend_ngram: speculative
            .and_then(|c| c.lookup)
            .map_or(0, |l| l.extend_min_ngram),
        min_draft_probability: speculative
            .and_then(|c| c.min_draft_probability)
            .unwrap_or(0.0),
        tree_length: speculative.map_or(0, SpeculativeConfig::tree_length),
        overlapped_draft: false,
        queue_flush: String::new(),
        lookup_round_share: stats.lookup_rounds as f64 / rounds,
        temperature,
        prompts,
        new_tokens: stats.new_tokens,
        seconds: secs,
        tokens_per_second: tps,
        decode_tokens_per_second: {
            let decode = secs - stats.prefill_time.as_secs_f64();
            if decode > 0.0 {
                stats.new_tokens as f64 / decode
            } else {
                0.0
            }
        },
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
        divergences: Vec::new(),
    }
}

/// Plain autoregressive decoding's outputs and statistics so far.
#[derive(Default)]
struct ArRun {
    stats: Stats,
    outputs: Vec<Vec<u32>>,
    /// Where queued GPU work was handed over early while it ran.
    flush: cube_kernels::QueueFlush,
}

impl ArRun {
    fn warm_up<B: Backend>(
        &self,
        model: &Llama<B>,
        prompts: &[Vec<u32>],
        warmup: usize,
        generation: &GenerationConfig,
    ) -> Result<()> {
        for prompt in prompts.iter().take(warmup) {
            generate(model, std::slice::from_ref(prompt), generation, |_, _| {})?;
        }
        Ok(())
    }

    fn decode<B: Backend>(
        &mut self,
        model: &Llama<B>,
        chunk: &[Vec<u32>],
        generation: &GenerationConfig,
    ) -> Result<()> {
        let out = generate(model, chunk, generation, |_, _| {})?;
        self.stats.merge(&out.stats);
        self.outputs.extend(out.tokens);
        Ok(())
    }

    /// Reports the result; returns its tokens/s.
    fn finish(&self, temperature: f32, prompts: usize, results: &mut Vec<ModeResult>) -> f64 {
        let result = summarize(
            "ar".into(),
            None,
            temperature,
            &self.stats,
            prompts,
            None,
            vec![],
        );
        let result = ModeResult {
            queue_flush: flush_label(self.flush),
            ..result
        };
        eprintln!(
            "AR  T={temperature} flush {}: {:.1} tok/s",
            result.queue_flush, result.tokens_per_second
        );
        let tps = result.tokens_per_second;
        results.push(result);
        tps
    }
}

/// One ReDrafter shape's decoder, and its statistics and greedy mismatches so far.
struct SpeculativeRun<'a, B: Backend> {
    decoder: SpeculativeDecoder<'a, B, Llama<B>, RecurrentDrafter<B>>,
    drafter: &'a RecurrentDrafter<B>,
    /// The checkpoint it came from (`--drafter`).
    drafter_name: &'a str,
    stats: Stats,
    mismatches: Vec<usize>,
    divergences: Vec<Divergence>,
    /// Where queued GPU work was handed over early while it ran.
    flush: cube_kernels::QueueFlush,
}

impl<B: Backend> SpeculativeRun<'_, B> {
    fn label(&self, temperature: f32) -> String {
        let config = self.decoder.config();
        let lookup = config.lookup.map_or(0, |l| l.beams);
        format!(
            "ReDrafter M={}+{lookup} C={} {:?} T={temperature}",
            config.beam_width, config.beam_length, config.draft_timing
        )
    }

    fn warm_up(&self, prompts: &[Vec<u32>], warmup: usize) -> Result<()> {
        for prompt in prompts.iter().take(warmup) {
            self.decoder
                .generate(std::slice::from_ref(prompt), |_, _| {})?;
        }
        Ok(())
    }

    /// Decodes `chunk` (prompts `first..` of `prompts`); in greedy decoding, compares each
    /// output with AR's where `ar_outputs` has it.
    fn decode(
        &mut self,
        model: &Llama<B>,
        prompts: &[Vec<u32>],
        first: usize,
        chunk: &[Vec<u32>],
        ar_outputs: Option<&[Vec<u32>]>,
    ) -> Result<()> {
        let out = self.decoder.generate(chunk, |_, _| {})?;
        self.stats.merge(&out.stats);
        let greedy = self.decoder.config().generation.sampling.temperature == 0.0;
        for (j, tokens) in out.tokens.iter().enumerate() {
            let i = first + j;
            let Some(want) = ar_outputs.and_then(|outputs| outputs.get(i)) else {
                continue;
            };
            if greedy && tokens != want {
                self.mismatches.push(i);
                self.divergences
                    .push(divergence(model, i, &prompts[i], want, tokens)?);
            }
        }
        Ok(())
    }

    /// Reports the result; returns whether more greedy outputs differed than allowed.
    fn finish(
        &self,
        temperature: f32,
        prompts: usize,
        ar_tps: Option<f64>,
        args: &Args,
        results: &mut Vec<ModeResult>,
    ) -> bool {
        let config = self.decoder.config();
        let acceptance = config.acceptance;
        let result = summarize(
            format!("redrafter-{acceptance:?}").to_lowercase(),
            Some(config),
            temperature,
            &self.stats,
            prompts,
            ar_tps,
            self.mismatches.clone(),
        );
        let merged_exit = self.drafter.has_merged_exit();
        let result = ModeResult {
            divergences: self.divergences.clone(),
            drafter: self.drafter_name.to_string(),
            draft_vocab: self.drafter.draft_vocab_size(),
            merged_exit,
            overlapped_draft: self.decoder.overlaps_drafting(),
            queue_flush: flush_label(self.flush),
            ..result
        };
        let stats = &self.stats;
        eprintln!(
            "ReDrafter {} M={}+{} C={} V={}{}{} tree {} ext {} p≥{} flush {} T={temperature}: {:.1} tok/s, speedup {}, τ {:.2}, lookup wins {:.1} %, packed {:.1}, split draft/tree/verify/readback/accept {:.2}/{:.2}/{:.2}/{:.2}/{:.2} s, mismatches {:?}",
            result.drafter,
            result.beam_width,
            result.lookup_beams,
            result.beam_length,
            result.draft_vocab,
            if merged_exit { " merged" } else { "" },
            if result.overlapped_draft {
                " overlapped"
            } else {
                ""
            },
            result.tree_length,
            result.lookup_extend_ngram,
            result.min_draft_probability,
            result.queue_flush,
            result.tokens_per_second,
            result
                .speedup_over_ar
                .map(|s| format!("{s:.2}×"))
                .unwrap_or("-".into()),
            result.tau,
            100.0 * result.lookup_round_share,
            result.mean_packed_tokens,
            stats.draft_time.as_secs_f64(),
            stats.tree_time.as_secs_f64(),
            stats.verify_time.as_secs_f64(),
            stats.readback_time.as_secs_f64(),
            stats.accept_time.as_secs_f64(),
            self.mismatches
        );
        for d in &self.divergences {
            eprintln!(
                "  prompt {}: first difference at token {} (AR {:?} vs ReDrafter {:?}); a \
                 fresh forward over the common prefix gives logits {:.4} vs {:.4} (margin {:.4})",
                d.prompt,
                d.position,
                d.ar_token,
                d.speculative_token,
                d.ar_logit,
                d.speculative_logit,
                d.ar_logit - d.speculative_logit
            );
        }
        let failed = self.mismatches.len() > args.max_mismatches;
        if failed {
            eprintln!(
                "greedy outputs differ from AR on prompts {:?}",
                self.mismatches
            );
        }
        results.push(result);
        failed
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
    let top_k: TopKMethod = args.top_k.parse()?;
    let (model, tokenizer): (Llama<B>, _) = load_llama(&model_path, &options, &device)?;
    let vocabulary = args
        .draft_vocab
        .as_ref()
        .map(DraftVocabulary::load)
        .transpose()?;
    // Per checkpoint, one drafter per draft-vocabulary size (0 or none: the whole vocabulary),
    // each labelled with its checkpoint.
    let mut drafters: Vec<(String, RecurrentDrafter<B>)> = Vec::new();
    for name in &args.drafter {
        let drafter = match name.as_str() {
            "random" => RecurrentDrafterConfig::new(model.hidden_size(), model.vocab_size())
                .with_head(DraftHeadKind::Tied)
                .init_seeded::<B>(0, &device)?
                .with_dtype(options.dtype)?
                .with_target(&model)?,
            path => RecurrentDrafter::load_for_target(path, &model)?,
        }
        .with_top_k(top_k);
        let Some(vocabulary) = &vocabulary else {
            drafters.push((name.clone(), drafter));
            continue;
        };
        let sizes = if args.draft_vocab_sizes.is_empty() {
            vec![vocabulary.len()]
        } else {
            args.draft_vocab_sizes.clone()
        };
        for size in sizes {
            let sized = match size {
                0 => drafter.clone(),
                n => drafter
                    .clone()
                    .with_draft_vocabulary(vocabulary.truncated(n)?)?,
            };
            // One run per distinct drafter: where nothing merges (no draft vocabulary, a CPU
            // backend) `on` and `off` are the same drafter.
            let mut seen = Vec::new();
            for &merge in &args.merged_exit {
                let variant = sized.clone().with_merged_exit(merge);
                if !seen.contains(&variant.has_merged_exit()) {
                    seen.push(variant.has_merged_exit());
                    drafters.push((name.clone(), variant));
                }
            }
        }
    }
    let prompts = read_prompts(args, &tokenizer)?;
    let eos = tokenizer.eos_token_ids().to_vec();
    eprintln!(
        "{} prompts, {} new tokens, backend {}, dtype {}",
        prompts.len(),
        args.max_new_tokens,
        args.backend,
        args.dtype
    );
    let batch = args.batch_size.max(1);
    // Every prompt length compiles its own prefill kernels on first use (CubeCL JIT). Prefill each
    // prompt batch once, untimed, so that neither mode pays for compilation the other inherits.
    if args.warmup > 0 {
        let bar = progress(prompts.len().div_ceil(batch), "prefill warm-up");
        for chunk in prompts.chunks(batch) {
            let longest = chunk.iter().map(Vec::len).max().unwrap_or(0);
            let mut cache = model.new_cache(chunk.len(), longest);
            prefill(&model, &mut cache, chunk)?.into_data();
            bar.inc(1);
        }
        bar.finish_and_clear();
    }
    let mut results = Vec::new();
    let mut failed = false;
    for &temperature in &args.temperatures {
        let generation = GenerationConfig {
            max_new_tokens: args.max_new_tokens,
            stop_tokens: eos.clone(),
            sampling: Sampling::with_temperature(temperature),
            seed: 0,
        };
        let acceptance = if temperature == 0.0 {
            Acceptance::Greedy
        } else {
            args.sampled_acceptance.parse()?
        };
        // One group of modes per queue-flush setting, each with its own AR baseline: the
        // setting moves plain decoding too.
        let mut groups = Vec::new();
        for &flush in &args.queue_flush {
            let ar = (!args.no_baseline).then(|| ArRun {
                flush,
                ..ArRun::default()
            });
            let mut speculative = Vec::new();
            // No length given: the guesses are as long as the drafted beams.
            let lookup_lengths: Vec<Option<usize>> = if args.lookup_length.is_empty() {
                vec![None]
            } else {
                args.lookup_length.iter().map(|&l| Some(l)).collect()
            };
            let lookup_lengths = &lookup_lengths;
            let shapes = drafters.iter().flat_map(|d| {
                args.beam_lengths.iter().flat_map(move |&c| {
                    args.beam_widths.iter().flat_map(move |&m| {
                        args.lookup_beams.iter().flat_map(move |&k| {
                            lookup_lengths.iter().flat_map(move |&length| {
                                args.lookup_extend_ngram.iter().flat_map(move |&n| {
                                    args.draft_timings.iter().flat_map(move |&timing| {
                                        args.min_draft_prob
                                            .iter()
                                            .map(move |&p| (d, c, m, k, (length, n), (timing, p)))
                                    })
                                })
                            })
                        })
                    })
                })
            });
            for (
                (drafter_name, drafter),
                beam_length,
                beam_width,
                lookup_beams,
                (lookup_length, extend_ngram),
                (timing, min_draft_prob),
            ) in shapes
            {
                let config = SpeculativeConfig::default()
                    .draft_timing(timing)
                    .beam_width(beam_width)
                    .beam_length(beam_length)
                    .lookup(
                        PromptLookup {
                            beam_length: lookup_length,
                            ..PromptLookup::new(lookup_beams)
                        }
                        .with_extend_min_ngram(extend_ngram),
                    )
                    .acceptance(acceptance)
                    .min_draft_probability((min_draft_prob > 0.0).then_some(min_draft_prob))
                    .generation(generation.clone());
                speculative.push(SpeculativeRun {
                    decoder: SpeculativeDecoder::new(&model, drafter, config)?,
                    drafter,
                    drafter_name,
                    stats: Stats::default(),
                    mismatches: Vec::new(),
                    divergences: Vec::new(),
                    flush,
                });
            }
            groups.push((flush, ar, speculative));
        }
        if args.interleave {
            // Every mode on each prompt in turn: a host whose speed drifts over minutes (the
            // 2-core development machine's does by ±7 %) then slows or speeds all modes alike.
            for (flush, ar, speculative) in &mut groups {
                cube_kernels::set_queue_flush(*flush);
                if let Some(ar) = ar {
                    ar.warm_up(&model, &prompts, args.warmup, &generation)?;
                }
                for run in speculative.iter_mut() {
                    run.warm_up(&prompts, args.warmup)?;
                }
            }
            let bar = progress(prompts.len(), &format!("all modes T={temperature}"));
            for (c, chunk) in prompts.chunks(batch).enumerate() {
                for (flush, ar, speculative) in &mut groups {
                    cube_kernels::set_queue_flush(*flush);
                    if let Some(ar) = ar.as_mut() {
                        ar.decode(&model, chunk, &generation)?;
                    }
                    let ar_outputs = ar.as_ref().map(|ar| &ar.outputs[..]);
                    for run in speculative.iter_mut() {
                        run.decode(&model, &prompts, c * batch, chunk, ar_outputs)?;
                    }
                }
                bar.inc(chunk.len() as u64);
            }
            bar.finish_and_clear();
            for (_, ar, speculative) in &groups {
                let ar_tps = ar
                    .as_ref()
                    .map(|ar| ar.finish(temperature, prompts.len(), &mut results));
                for run in speculative {
                    failed |= run.finish(temperature, prompts.len(), ar_tps, args, &mut results);
                }
            }
            write_report::<B>(args, &model_path, &prompts, top_k, &device, &results)?;
        } else {
            // One mode after the other, each over all prompts.
            for (flush, ar, speculative) in &mut groups {
                cube_kernels::set_queue_flush(*flush);
                let mut ar_tps = None;
                if let Some(ar) = ar.as_mut() {
                    ar.warm_up(&model, &prompts, args.warmup, &generation)?;
                    let bar = progress(prompts.len(), &format!("AR T={temperature}"));
                    for chunk in prompts.chunks(batch) {
                        ar.decode(&model, chunk, &generation)?;
                        bar.inc(chunk.len() as u64);
                    }
                    bar.finish_and_clear();
                    ar_tps = Some(ar.finish(temperature, prompts.len(), &mut results));
                    // Written after every mode, so a run cut short keeps what it measured.
                    write_report::<B>(args, &model_path, &prompts, top_k, &device, &results)?;
                }
                let ar_outputs = ar.as_ref().map(|ar| &ar.outputs[..]);
                for run in speculative.iter_mut() {
                    run.warm_up(&prompts, args.warmup)?;
                    let bar = progress(prompts.len(), &run.label(temperature));
                    for (c, chunk) in prompts.chunks(batch).enumerate() {
                        run.decode(&model, &prompts, c * batch, chunk, ar_outputs)?;
                        bar.inc(chunk.len() as u64);
                    }
                    bar.finish_and_clear();
                    failed |= run.finish(temperature, prompts.len(), ar_tps, args, &mut results);
                    write_report::<B>(args, &model_path, &prompts, top_k, &device, &results)?;
                }
            }
        }
    }
    let report = write_report::<B>(args, &model_path, &prompts, top_k, &device, &results)?;
    println!("{}", serde_json::to_string(&report)?);
    if failed {
        std::process::exit(2);
    }
    Ok(())
}

/// The JSON report of everything measured so far, also written to `--out` if given.
fn write_report<B: Backend>(
    args: &Args,
    model_path: &std::path::Path,
    prompts: &[Vec<u32>],
    top_k: TopKMethod,
    device: &B::Device,
    results: &[ModeResult],
) -> Result<serde_json::Value> {
    let report = serde_json::json!({
        "model": model_path,
        "drafter": args.drafter,
        "backend": args.backend,
        "device": B::name(device),
        "dtype": args.dtype,
        "top_k": format!("{:?}", top_k.resolve::<B>(device)).to_lowercase(),
        // Whether our fused GPU kernels ran (REDRAFTER_CUBE_KERNELS) and, of them, the row-exact
        // product and attention (REDRAFTER_EXACT_KERNELS).
        "cube_kernels": redrafter::cube_kernels::applies::<B>(),
        "exact_kernels": redrafter::cube_kernels::applies::<B>()
            && redrafter::cube_kernels::exact_switched_on(),
        "prompts_file": args.prompts,
        "prompts": prompts.len(),
        "skipped_prompts": args.skip,
        "max_new_tokens": args.max_new_tokens,
        "batch_size": args.batch_size,
        "results": results,
    });
    if let Some(out) = &args.out {
        std::fs::write(out, serde_json::to_string_pretty(&report)?)?;
    }
    Ok(report)
}

/// `on` / `off` (also `true` / `false`, `1` / `0`) as a bool.
fn parse_switch(value: &str) -> Result<bool, String> {
    match value.to_ascii_lowercase().as_str() {
        "on" | "true" | "1" => Ok(true),
        "off" | "false" | "0" => Ok(false),
        other => Err(format!("expected on or off, got {other:?}")),
    }
}

/// Parses `--queue-flush`: `none`, `draft`, `layersN`, or both joined by `+`.
fn parse_queue_flush(value: &str) -> std::result::Result<cube_kernels::QueueFlush, String> {
    let mut flush = cube_kernels::QueueFlush::NONE;
    for part in value.split('+') {
        match part {
            "none" => {}
            "draft" => flush.after_draft = true,
            layers if layers.starts_with("layers") => {
                flush.every_layers = layers["layers".len()..]
                    .parse()
                    .map_err(|_| format!("`{layers}`: expected layersN, N a number"))?;
            }
            other => {
                return Err(format!(
                    "unknown queue flush `{other}` (expected none, draft, layersN or a + of them)"
                ));
            }
        }
    }
    Ok(flush)
}

/// `--queue-flush`'s spelling of a setting.
fn flush_label(flush: cube_kernels::QueueFlush) -> String {
    let mut parts = Vec::new();
    if flush.after_draft {
        parts.push("draft".to_string());
    }
    if flush.every_layers > 0 {
        parts.push(format!("layers{}", flush.every_layers));
    }
    if parts.is_empty() {
        "none".into()
    } else {
        parts.join("+")
    }
}
