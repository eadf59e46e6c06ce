//! Cost of the pieces of a speculative round, measured on one device with random weights:
//! a verification forward at packed tree lengths L, a draft round per beam width and top-k
//! method, and tree packing.
//!
//! ```text
//! cargo run --release --example profile -- --shapes smollm2-135m --lengths 1,8,32,64,128
//! profile --backend cuda --shapes smollm2-135m,llama2-7b --dtype f16 --out profile.json
//! ```
//! Random weights cost exactly what trained ones do, so no checkpoint is needed: `llama2-7b`
//! (Llama-2-7B's shape) runs on a GPU where no 7B weights are at hand. Every figure is the
//! median of `--reps` timed repetitions after `--warmup` untimed ones, each ending with the one
//! small readback a real round makes.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, Int, Tensor, TensorData};
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use rand::{Rng, SeedableRng};
use redrafter::backend::BackendKind;
use redrafter::drafter::{
    DraftHead, DraftHeadKind, DraftRequest, RecurrentDrafterConfig, TopKMethod,
};
use redrafter::models::llama::{Llama, LlamaConfig, LlamaLoadOptions};
use redrafter::tree::DraftTree;
use redrafter::{Block, TargetModel};
use serde::Serialize;

#[derive(Parser, Debug)]
struct Args {
    /// Model shapes: smollm2-135m, llama2-7b.
    #[arg(long, value_delimiter = ',', default_value = "smollm2-135m")]
    shapes: Vec<String>,
    /// Packed tree lengths L to verify.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8,16,32,64,128")]
    lengths: Vec<usize>,
    /// Tokens already in the KV cache when verifying.
    #[arg(long, default_value_t = 256)]
    context: usize,
    /// Beam widths for the draft-round and tree-packing measurements (SmolLM2 shape only).
    #[arg(long, value_delimiter = ',', default_value = "1,4,16,64")]
    beam_widths: Vec<usize>,
    #[arg(long, default_value_t = 5)]
    beam_length: usize,
    /// Top-k methods to time in the draft round: auto, sort, rank.
    #[arg(long, value_delimiter = ',', default_value = "sort,rank")]
    top_k: Vec<String>,
    #[arg(long, default_value = "cpu")]
    backend: String,
    #[arg(long, default_value = "f32")]
    dtype: String,
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    #[arg(long, default_value_t = 10)]
    reps: usize,
    /// Skip the draft-round measurements.
    #[arg(long)]
    no_draft: bool,
    /// Write all results as JSON here.
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Serialize)]
struct Row {
    what: String,
    shape: String,
    dtype: String,
    /// Packed length (verify) or beam width (draft, pack).
    size: usize,
    detail: String,
    median_ms: f64,
    min_ms: f64,
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

/// The shapes this program knows, as HF configs.
fn shape_config(name: &str) -> Result<LlamaConfig> {
    let base = |hidden, inter, layers, heads, kv_heads, vocab, theta, tied| LlamaConfig {
        hidden_size: hidden,
        intermediate_size: inter,
        num_hidden_layers: layers,
        num_attention_heads: heads,
        num_key_value_heads: kv_heads,
        vocab_size: vocab,
        rms_norm_eps: 1e-5,
        rope_theta: theta,
        max_position_embeddings: 4096,
        tie_word_embeddings: tied,
        rope_scaling: None,
        bos_token_id: None,
        eos_token_id: None,
    };
    Ok(match name {
        "smollm2-135m" => base(576, 1536, 30, 9, 3, 49152, 100_000.0, true),
        "llama2-7b" => base(4096, 11008, 32, 32, 32, 32000, 10_000.0, false),
        other => bail!("unknown shape `{other}` (known: smollm2-135m, llama2-7b)"),
    })
}

/// Median and minimum of `reps` timings of `f` after `warmup` untimed calls.
fn time(warmup: usize, reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<(f64, f64)> {
    for _ in 0..warmup {
        f()?;
    }
    let mut times: Vec<Duration> = Vec::with_capacity(reps);
    for _ in 0..reps.max(1) {
        let start = Instant::now();
        f()?;
        times.push(start.elapsed());
    }
    times.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    Ok((ms(times[times.len() / 2]), ms(times[0])))
}

fn ints<B: Backend, const D: usize>(
    values: Vec<i64>,
    shape: [usize; D],
    device: &B::Device,
) -> Tensor<B, D, Int> {
    Tensor::from_data(TensorData::new(values, shape), device)
}

fn spinner(label: String) -> ProgressBar {
    let bar = ProgressBar::new_spinner();
    bar.set_style(ProgressStyle::with_template("{spinner} {msg} {elapsed}").expect("template"));
    bar.set_message(label);
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

fn report(rows: &mut Vec<Row>, row: Row) {
    eprintln!(
        "{:<8} {:<13} {:<4} {:>4} {:<14} median {:>9.3} ms  min {:>9.3} ms",
        row.what, row.shape, row.dtype, row.size, row.detail, row.median_ms, row.min_ms
    );
    rows.push(row);
}

fn run<B: Backend>(args: &Args, device: B::Device) -> Result<()> {
    let dtype = redrafter::backend::parse_float_dtype(&args.dtype)?;
    let mut rows = Vec::new();
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    let longest = args.lengths.iter().copied().max().unwrap_or(1);
    for shape in &args.shapes {
        let config = shape_config(shape)?;
        let vocab = config.vocab_size;
        let bar = spinner(format!("building {shape} with random weights"));
        let options = LlamaLoadOptions {
            dtype,
            max_context: Some(args.context + longest + 64),
        };
        let model: Llama<B> = Llama::init_random(config, &options, &device)?;
        bar.finish_and_clear();

        // Verification forward at each packed length, against `context` cached tokens.
        let mut cache = model.new_cache(1, args.context + longest + 1);
        let prompt: Vec<i64> = (0..args.context)
            .map(|_| rng.random_range(0..vocab as i64))
            .collect();
        let prefill = Block {
            tokens: ints::<B, 2>(prompt, [1, args.context], &device),
            positions: ints::<B, 2>(
                (0..args.context as i64).collect(),
                [1, args.context],
                &device,
            ),
            bias: Some(cache.attention_bias(args.context, None, &device)),
        };
        model.forward(&prefill, &mut cache)?;
        cache.commit(&[(0..args.context).collect()])?;
        for &len in &args.lengths {
            let bar = spinner(format!("{shape}: verify L = {len}"));
            // A chain: the mask's contents do not change the cost, only its size.
            let mask: Vec<bool> = (0..len * len).map(|i| i % len <= i / len).collect();
            let tokens: Vec<i64> = (0..len)
                .map(|_| rng.random_range(0..vocab as i64))
                .collect();
            let block = Block {
                tokens: ints::<B, 2>(tokens, [1, len], &device),
                positions: ints::<B, 2>(
                    (args.context as i64..(args.context + len) as i64).collect(),
                    [1, len],
                    &device,
                ),
                bias: Some(cache.attention_bias(len, Some(&[mask]), &device)),
            };
            let (median_ms, min_ms) = time(args.warmup, args.reps, || {
                let hidden = model.forward(&block, &mut cache)?;
                let best = model.logits(hidden).argmax(2);
                cache.rollback();
                best.into_data();
                Ok(())
            })?;
            bar.finish_and_clear();
            report(
                &mut rows,
                Row {
                    what: "verify".into(),
                    shape: shape.clone(),
                    dtype: args.dtype.clone(),
                    size: len,
                    detail: format!("context {}", args.context),
                    median_ms,
                    min_ms,
                },
            );
        }

        // Drafting and packing are measured for the head of the model they belong to.
        if args.no_draft || shape != "smollm2-135m" {
            continue;
        }
        let drafter = RecurrentDrafterConfig::new(model.hidden_size(), vocab)
            .with_head(DraftHeadKind::Tied)
            .init_seeded::<B>(0, &device)?
            .with_target(&model)?;
        for method in &args.top_k {
            let method: TopKMethod = method.parse()?;
            let drafter = drafter.clone().with_top_k(method);
            for &width in &args.beam_widths {
                let bar = spinner(format!("draft M = {width} ({method:?})"));
                let context = Tensor::<B, 2>::random(
                    [1, model.hidden_size()],
                    Distribution::Normal(0.0, 1.0),
                    &device,
                );
                let first = ints::<B, 1>(vec![rng.random_range(0..vocab as i64)], [1], &device);
                let (median_ms, min_ms) = time(args.warmup, args.reps, || {
                    let beams = drafter.propose(DraftRequest {
                        context: context.clone(),
                        first_tokens: first.clone(),
                        beam_width: width,
                        beam_length: args.beam_length,
                    })?;
                    beams.tokens.into_data();
                    Ok(())
                })?;
                bar.finish_and_clear();
                report(
                    &mut rows,
                    Row {
                        what: "draft".into(),
                        shape: shape.clone(),
                        dtype: args.dtype.clone(),
                        size: width,
                        detail: format!("{method:?} C={}", args.beam_length).to_lowercase(),
                        median_ms,
                        min_ms,
                    },
                );
            }
        }
        for &width in &args.beam_widths {
            // Beams sharing prefixes the way drafted beams do: a few tokens per depth.
            let c = args.beam_length;
            let beams: Vec<u32> = (0..width * c)
                .map(|i| {
                    if i % c == 0 {
                        7
                    } else {
                        rng.random_range(0..4)
                    }
                })
                .collect();
            let (median_ms, min_ms) = time(args.warmup, args.reps.max(100), || {
                DraftTree::pack(&beams, width, c)?;
                Ok(())
            })?;
            report(
                &mut rows,
                Row {
                    what: "pack".into(),
                    shape: shape.clone(),
                    dtype: "-".into(),
                    size: width,
                    detail: format!("C={c}"),
                    median_ms,
                    min_ms,
                },
            );
        }
    }
    let report = serde_json::json!({
        "backend": args.backend,
        "device": B::name(&device),
        "dtype": args.dtype,
        "context": args.context,
        "rows": rows,
    });
    if let Some(out) = &args.out {
        std::fs::write(out, serde_json::to_string_pretty(&report)?)?;
    }
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}
