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
//!
//! With `--features host-profile`, `--host-profile stacks.folded` also samples the host's stacks
//! (every thread) while it verifies `--host-profile-length` tokens over and over: where the time
//! to queue a forward goes, on machines without a system profiler.

use std::path::PathBuf;
use std::time::{Duration, Instant};

#[path = "common/backend.rs"]
mod backend;
#[path = "common/host_sampler.rs"]
mod host_sampler;
#[path = "common/shapes.rs"]
mod shapes;

use anyhow::{Result, bail};
use backend::run_on_backend;
use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, Int, Tensor};
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use rand::{Rng, SeedableRng};
use redrafter::drafter::{
    DraftHead, DraftHeadKind, DraftRequest, DraftVocabulary, RecurrentDrafterConfig, TopKMethod,
};
use redrafter::generate::{GenerationConfig, generate, int_tensor, prefill};
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
    /// Beam lengths C (the first token included) for the draft-round and packing measurements.
    #[arg(long, value_delimiter = ',', default_value = "5")]
    beam_lengths: Vec<usize>,
    /// Draft from this many tokens (the first ids of the vocabulary, as a draft vocabulary) instead
    /// of the whole vocabulary; 0 = all.
    #[arg(long, default_value_t = 0)]
    draft_vocab_size: usize,
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
    /// Also decode this many tokens greedily from a random prompt of `--context` tokens: the
    /// cache grows, so every step has a new attention shape, as in real decoding (what a backend
    /// that compiles or tunes kernels per shape pays). Reports ms per token of the first (cold)
    /// generation and the median of `--reps` warm ones. 0 skips it. (Speculative decoding is
    /// measured with real weights by the `benchmark` example.)
    #[arg(long, default_value_t = 0)]
    decode_tokens: usize,
    /// Also time single operations of the SmolLM2 shape's decoding step (one token), each
    /// enqueued `--op-repeats` times back to back before one device sync: the host's enqueue
    /// time per op next to the time per op until the device is done. Tells host overhead from
    /// device work on backends that run asynchronously.
    #[arg(long)]
    op_costs: bool,
    #[arg(long, default_value_t = 200)]
    op_repeats: usize,
    /// Also sample the host's stacks while verifying `--host-profile-length` tokens for
    /// `--host-profile-seconds`, and write them here as folded stacks (needs the
    /// `host-profile` feature).
    #[arg(long)]
    host_profile: Option<PathBuf>,
    #[arg(long, default_value_t = 1)]
    host_profile_length: usize,
    #[arg(long, default_value_t = 5.0)]
    host_profile_seconds: f64,
    #[arg(long, default_value_t = 1999)]
    host_profile_hertz: i32,
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
    /// Decoding only: ms per forward of the first generation, kernel compilation included.
    #[serde(skip_serializing_if = "Option::is_none")]
    cold_ms: Option<f64>,
}

fn main() -> Result<()> {
    backend::init_tracing();
    let args = Args::parse();
    run_on_backend!(args.backend, run, &args)
}

/// The shapes this program knows, by name.
fn shape_config(name: &str) -> Result<LlamaConfig> {
    Ok(match name {
        "smollm2-135m" => shapes::smollm2_135m(),
        "llama2-7b" => shapes::llama2_7b(),
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

/// A block of `len` random tokens after `context` cached ones, masked as a chain: the mask's
/// contents do not change the cost, only its size.
fn chain_block<B: Backend>(
    len: usize,
    context: usize,
    vocab: usize,
    rng: &mut impl Rng,
    cache: &redrafter::KvCache<B>,
    device: &B::Device,
) -> Block<B> {
    let mask: Vec<bool> = (0..len * len).map(|i| i % len <= i / len).collect();
    let tokens: Vec<i64> = (0..len)
        .map(|_| rng.random_range(0..vocab as i64))
        .collect();
    Block {
        tokens: int_tensor::<B, 2>(tokens, [1, len], device),
        positions: int_tensor::<B, 2>(
            (context as i64..(context + len) as i64).collect(),
            [1, len],
            device,
        ),
        bias: Some(cache.attention_bias(len, Some(&[mask]), device)),
    }
}

/// Queues a verification of `block` (forward, logits, each row's argmax) and returns the argmax,
/// as `[1, len]`, not yet read back: reading it is the round's one readback.
fn queue_verify<B: Backend>(
    model: &Llama<B>,
    block: &Block<B>,
    cache: &mut redrafter::KvCache<B>,
) -> Result<Tensor<B, 2, Int>> {
    let len = block.tokens.dims()[1];
    let hidden = model.forward(block, cache)?;
    Ok(redrafter::sampling::argmax_rows(model.logits(hidden)).reshape([1, len]))
}

/// CPU time this process has used, all threads (Linux; 0 elsewhere).
fn process_cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    // utime and stime are fields 14 and 15, counted after the command name's closing ')'.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or(vec![], |(_, rest)| rest.split_whitespace().collect());
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // Clock ticks are 100 per second on every Linux this runs on.
    (ticks(11) + ticks(12)) / 100.0
}

fn spinner(label: String) -> ProgressBar {
    let bar = ProgressBar::new_spinner();
    bar.set_style(ProgressStyle::with_template("{spinner} {msg} {elapsed}").expect("template"));
    bar.set_message(label);
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

/// Prints a measurement and keeps it for the JSON report.
fn report(
    rows: &mut Vec<Row>,
    what: &str,
    shape: &str,
    dtype: &str,
    (size, detail): (usize, String),
    (median_ms, min_ms): (f64, f64),
) {
    let row = Row {
        what: what.into(),
        shape: shape.into(),
        dtype: dtype.into(),
        size,
        detail,
        median_ms,
        min_ms,
        cold_ms: None,
    };
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
            max_context: Some(args.context + longest.max(args.decode_tokens) + 64),
        };
        let model: Llama<B> = Llama::init_random(config, &options, &device)?;
        bar.finish_and_clear();

        // Verification forward at each packed length, against `context` cached tokens.
        let mut cache = model.new_cache(1, args.context + longest + 1);
        let prompt: Vec<u32> = (0..args.context)
            .map(|_| rng.random_range(0..vocab as u32))
            .collect();
        prefill(&model, &mut cache, &[prompt])?;
        for &len in &args.lengths {
            let bar = spinner(format!("{shape}: verify L = {len}"));
            let block = chain_block::<B>(len, args.context, vocab, &mut rng, &cache, &device);
            // Also the host's share: the time to enqueue the forward, before the readback
            // waits for the device (on asynchronous backends).
            let mut enqueue = Vec::new();
            let timing = time(args.warmup, args.reps, || {
                let start = Instant::now();
                let best = queue_verify(&model, &block, &mut cache)?;
                enqueue.push(start.elapsed().as_secs_f64() * 1e3);
                cache.rollback();
                best.into_data();
                Ok(())
            })?;
            bar.finish_and_clear();
            enqueue.sort_by(f64::total_cmp);
            let size = (len, format!("context {}", args.context));
            report(&mut rows, "verify", shape, &args.dtype, size, timing);
            let host = enqueue[enqueue.len() / 2];
            let size = (len, format!("context {}", args.context));
            report(
                &mut rows,
                "enqueue",
                shape,
                &args.dtype,
                size,
                (host, enqueue[0]),
            );
        }

        if let Some(out) = &args.host_profile {
            let len = args.host_profile_length;
            let bar = spinner(format!("{shape}: sampling the host, verify L = {len}"));
            let block = chain_block::<B>(len, args.context, vocab, &mut rng, &cache, &device);
            let mut forwards = 0usize;
            let seconds = Duration::from_secs_f64(args.host_profile_seconds);
            let cpu_start = process_cpu_seconds();
            let kept = host_sampler::sample(out, args.host_profile_hertz, || {
                let start = Instant::now();
                while start.elapsed() < seconds {
                    let best = queue_verify(&model, &block, &mut cache)?;
                    cache.rollback();
                    best.into_data();
                    forwards += 1;
                }
                Ok(())
            })?;
            let cpu = process_cpu_seconds() - cpu_start;
            bar.finish_and_clear();
            eprintln!(
                "host profile: {forwards} forwards of {len} tokens, {kept} samples kept of \
                 ~{:.0} ({cpu:.2} s of CPU time at {} Hz) -> {}",
                cpu * f64::from(args.host_profile_hertz),
                args.host_profile_hertz,
                out.display()
            );
        }

        if args.decode_tokens > 0 {
            decode(&model, shape, args, &mut rows, &mut rng)?;
        }
        if args.op_costs && shape == "smollm2-135m" {
            op_costs(&model, args, &device, &mut rows)?;
        }

        // Drafting and packing are measured for the head of the model they belong to.
        if args.no_draft || shape != "smollm2-135m" {
            continue;
        }
        let drafter = RecurrentDrafterConfig::new(model.hidden_size(), vocab)
            .with_head(DraftHeadKind::Tied)
            .init_seeded::<B>(0, &device)?
            .with_dtype(dtype)?
            .with_target(&model)?;
        let drafter = match args.draft_vocab_size {
            0 => drafter,
            size => drafter
                .with_draft_vocabulary(DraftVocabulary::new((0..size as u32).collect(), vocab)?)?,
        };
        // Every beam width with every beam length, for drafting and packing alike.
        let beam_shapes: Vec<(usize, usize)> = args
            .beam_widths
            .iter()
            .flat_map(|&w| args.beam_lengths.iter().map(move |&c| (w, c)))
            .collect();
        for method in &args.top_k {
            let method: TopKMethod = method.parse()?;
            let drafter = drafter.clone().with_top_k(method);
            for &(width, length) in &beam_shapes {
                let bar = spinner(format!("draft M = {width}, C = {length} ({method:?})"));
                let context = Tensor::<B, 2>::random(
                    [1, model.hidden_size()],
                    Distribution::Normal(0.0, 1.0),
                    &device,
                );
                let first =
                    int_tensor::<B, 1>(vec![rng.random_range(0..vocab as i64)], [1], &device);
                let timing = time(args.warmup, args.reps, || {
                    let beams = drafter.propose(DraftRequest {
                        context: context.clone(),
                        first_tokens: first.clone(),
                        beam_width: width,
                        beam_length: length,
                        needs_log_probs: false,
                        stop_below: None,
                    })?;
                    beams.tokens.into_data();
                    Ok(())
                })?;
                bar.finish_and_clear();
                let size = (
                    width,
                    format!("{method:?} C={length} V={}", drafter.draft_vocab_size())
                        .to_lowercase(),
                );
                report(&mut rows, "draft", shape, &args.dtype, size, timing);
            }
        }
        for &(width, c) in &beam_shapes {
            // Beams sharing prefixes the way drafted beams do: a few tokens per depth.
            let beams: Vec<u32> = (0..width * c)
                .map(|i| {
                    if i % c == 0 {
                        7
                    } else {
                        rng.random_range(0..4)
                    }
                })
                .collect();
            let timing = time(args.warmup, args.reps.max(100), || {
                DraftTree::pack(&beams, width, c)?;
                Ok(())
            })?;
            report(
                &mut rows,
                "pack",
                shape,
                "-",
                (width, format!("C={c}")),
                timing,
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

/// Plain decoding of `--decode-tokens` tokens from one random prompt: ms per token of the first
/// generation (kernels compiled on the way) and of warm ones.
fn decode<B: Backend>(
    model: &Llama<B>,
    shape: &str,
    args: &Args,
    rows: &mut Vec<Row>,
    rng: &mut rand::rngs::StdRng,
) -> Result<()> {
    let vocab = model.vocab_size() as u32;
    let prompt: Vec<u32> = (0..args.context)
        .map(|_| rng.random_range(0..vocab))
        .collect();
    let prompts = [prompt];
    let generation = GenerationConfig::default().with_max_new_tokens(args.decode_tokens);
    let run = || -> Result<f64> {
        let stats = generate(model, &prompts, &generation, |_, _| {})?.stats;
        // ms per target forward, prefill excluded.
        Ok((stats.total_time - stats.prefill_time).as_secs_f64() * 1e3
            / stats.target_forwards.max(1) as f64)
    };
    let bar = spinner(format!("{shape}: decode {} tokens", args.decode_tokens));
    let cold = run()?;
    let mut warm = (0..args.reps.max(1))
        .map(|_| run())
        .collect::<Result<Vec<f64>>>()?;
    warm.sort_by(f64::total_cmp);
    bar.finish_and_clear();
    let size = (args.decode_tokens, format!("context {}", args.context));
    report(
        rows,
        "decode",
        shape,
        &args.dtype,
        size,
        (warm[warm.len() / 2], warm[0]),
    );
    eprintln!("{:>42} cold (first generation) {cold:>9.3} ms", "");
    if let Some(row) = rows.last_mut() {
        row.cold_ms = Some(cold);
    }
    Ok(())
}

/// An operation for [`op_costs`] that owns its inputs.
type OwnedOp<'a, B> = Box<dyn Fn() -> Tensor<B, 2> + 'a>;

/// A named operation for [`op_costs`].
type TimedOp<'a, B> = (&'a str, Box<dyn Fn() -> Tensor<B, 2> + 'a>);

/// Host enqueue time and time to completion per operation, for the ops of one decoding step.
fn op_costs<B: Backend>(
    model: &Llama<B>,
    args: &Args,
    device: &B::Device,
    rows: &mut Vec<Row>,
) -> Result<()> {
    use burn::tensor::activation::softmax;
    use redrafter::cube_kernels;
    use redrafter::projection::{Projection, WeightLayout};

    let config = model.config();
    let (hidden, inter, vocab) = (
        config.hidden_size,
        config.intermediate_size,
        config.vocab_size,
    );
    let (heads, kv_heads, dim) = (
        config.num_attention_heads,
        config.num_key_value_heads,
        config.head_dim(),
    );
    let groups = heads / kv_heads;
    let slots = args.context;
    let dtype = redrafter::backend::parse_float_dtype(&args.dtype)?;
    let random = |dims: [usize; 2]| {
        Tensor::<B, 2>::random(dims, Distribution::Normal(0.0, 1.0), device).cast(dtype)
    };
    let random4 = |dims: [usize; 4]| {
        Tensor::<B, 4>::random(dims, Distribution::Normal(0.0, 1.0), device).cast(dtype)
    };
    let out_major = redrafter::projection::prefers_out_major::<B>(device);
    let projection = |inputs: usize, outputs: usize| {
        if out_major {
            Projection::from_out_in_tensor(random([outputs, inputs]))
        } else {
            Projection::from_tensor(random([inputs, outputs]), WeightLayout::InOut)
        }
    };
    let x = random([1, hidden]);
    let x40 = random([40, hidden]);
    let qkv = projection(hidden, (heads + 2 * kv_heads) * dim);
    let gate_up = projection(hidden, 2 * inter);
    let down = projection(inter, hidden);
    let lm_head = projection(hidden, vocab);
    let gate_up_out = random([1, 2 * inter]);
    let activated = random([1, inter]);
    let q = random4([1, kv_heads, groups, dim]);
    let keys = random4([1, kv_heads, slots, dim]);
    let scores = random4([1, heads, 1, slots]);
    // Taken out and put back: a uniquely owned cache is written in place, as in decoding.
    let cache = std::cell::RefCell::new(Some(random4([1, kv_heads, slots + 64, dim])));
    let row = random4([1, kv_heads, 1, dim]);
    let eps = config.rms_norm_eps;

    let mut ops: Vec<TimedOp<'_, B>> = vec![
        ("add", Box::new(|| x.clone().add(x.clone()))),
        ("mul_scalar", Box::new(|| x.clone().mul_scalar(2.0))),
        (
            "norm_burn",
            Box::new(|| {
                let rms = x.clone().square().mean_dim(1).add_scalar(eps).sqrt();
                x.clone().div(rms)
            }),
        ),
        ("proj_qkv", Box::new(|| qkv.forward(x.clone()))),
        ("proj_gate_up", Box::new(|| gate_up.forward(x.clone()))),
        ("proj_down", Box::new(|| down.forward(activated.clone()))),
        ("proj_gate_up_40", Box::new(|| gate_up.forward(x40.clone()))),
        ("lm_head", Box::new(|| lm_head.forward(x.clone()))),
        (
            "attn_scores",
            Box::new(|| {
                q.clone()
                    .matmul(keys.clone().swap_dims(2, 3))
                    .reshape([groups * kv_heads, slots])
            }),
        ),
        (
            "softmax_burn",
            Box::new(|| softmax(scores.clone(), 3).reshape([heads, slots])),
        ),
        (
            "cache_write",
            Box::new(|| {
                let region = [0..1, 0..kv_heads, slots..slots + 1, 0..dim];
                let written = cache
                    .borrow_mut()
                    .take()
                    .expect("cache present")
                    .slice_assign(region, row.clone());
                *cache.borrow_mut() = Some(written);
                x.clone()
            }),
        ),
        (
            "swap_copy",
            Box::new(|| {
                keys.clone()
                    .swap_dims(1, 2)
                    .reshape([slots, kv_heads * dim])
            }),
        ),
    ];
    if cube_kernels::applies::<B>() {
        ops.push((
            "norm_kernel",
            Box::new(|| cube_kernels::rms_norm(&x, eps).expect("applies")),
        ));
        ops.push((
            "softmax_kernel",
            Box::new(|| {
                cube_kernels::softmax_with_bias(&scores, None)
                    .expect("applies")
                    .reshape([heads, slots])
            }),
        ));
        ops.push((
            "swiglu_kernel",
            Box::new(|| cube_kernels::swiglu(&gate_up_out).expect("applies")),
        ));
    }
    // The folded layer's kernels at the row counts of a decoding step and of verification trees.
    let mut folded: Vec<(String, OwnedOp<'_, B>)> = Vec::new();
    if cube_kernels::applies::<B>() {
        use cube_kernels::ProductFolds;
        let output = projection(heads * dim, hidden);
        let vocab_head = projection(hidden, vocab);
        let (qkv_w, gate_up_w, down_w, output_w, head_w) = (
            qkv.weight.val(),
            gate_up.weight.val(),
            down.weight.val(),
            output.weight.val(),
            vocab_head.weight.val(),
        );
        let cache_keys = Tensor::<B, 5>::random(
            [1, 1, kv_heads, slots + 64, dim],
            Distribution::Normal(0.0, 1.0),
            device,
        )
        .cast(dtype);
        let rope = redrafter::models::llama::RotaryEmbedding::<B>::new(config, slots + 64, device)
            .cast(dtype);
        for n in [1usize, 12, 24] {
            let x = random([n, hidden]);
            let attended = random([n, heads * dim]);
            let inner = random([n, inter]);
            let queries = random4([1, heads, n, dim]);
            let bias = (n > 1).then(|| random4([1, 1, n, slots]));
            let positions = Tensor::<B, 2, burn::tensor::Int>::from_data(
                burn::tensor::TensorData::new((0..n as i64).collect::<Vec<_>>(), [1, n]),
                device,
            );
            let angles = rope.angles(&positions);
            let qkv_rows = random([n, (heads + 2 * kv_heads) * dim]).reshape([
                1,
                n,
                (heads + 2 * kv_heads) * dim,
            ]);
            let norm = |weight: Tensor<B, 2>, swiglu: bool, x: Tensor<B, 2>| -> OwnedOp<'_, B> {
                Box::new(move || {
                    let folds = ProductFolds {
                        rms_norm_eps: Some(eps),
                        swiglu,
                        ..ProductFolds::default()
                    };
                    cube_kernels::fused_matmul(&x, &weight, folds).expect("applies")
                })
            };
            folded.push((
                format!("qkv_norm_{n}"),
                norm(qkv_w.clone(), false, x.clone()),
            ));
            folded.push((
                format!("gate_up_swiglu_{n}"),
                norm(gate_up_w.clone(), true, x.clone()),
            ));
            let residual =
                |weight: Tensor<B, 2>, input: Tensor<B, 2>, res: Tensor<B, 2>| -> OwnedOp<'_, B> {
                    Box::new(move || {
                        let folds = ProductFolds {
                            residual: Some(&res),
                            ..ProductFolds::default()
                        };
                        cube_kernels::fused_matmul(&input, &weight, folds).expect("applies")
                    })
                };
            folded.push((
                format!("output_residual_{n}"),
                residual(output_w.clone(), attended.clone(), x.clone()),
            ));
            folded.push((
                format!("down_residual_{n}"),
                residual(down_w.clone(), inner, x.clone()),
            ));
            let head_w = head_w.clone();
            let xh = x.clone();
            folded.push((
                format!("lm_head_{n}"),
                Box::new(move || cube_kernels::matmul(&xh, &head_w).expect("applies")),
            ));
            let (keys, values) = (keys.clone(), keys.clone());
            folded.push((
                format!("attention_{n}"),
                Box::new(move || {
                    cube_kernels::attention(&queries, &keys, &values, bias.as_ref())
                        .expect("applies")
                }),
            ));
            let cache_keys = cache_keys.clone();
            folded.push((
                format!("rotate_into_cache_{n}"),
                Box::new(move || {
                    cube_kernels::rotate_qkv_into_cache(
                        &qkv_rows,
                        &angles.cos,
                        &angles.sin,
                        heads,
                        kv_heads,
                        &cache_keys,
                        &cache_keys,
                        0,
                        slots,
                    )
                    .expect("applies")
                    .reshape([heads * n, dim])
                }),
            ));
            let logits = random([n, vocab]);
            folded.push((
                format!("argmax_{n}"),
                Box::new(move || {
                    cube_kernels::argmax(&logits)
                        .expect("applies")
                        .float()
                        .reshape([n, 1])
                }),
            ));
        }
    }
    let ops: Vec<(&str, &dyn Fn() -> Tensor<B, 2>)> = ops
        .iter()
        .map(|(name, op)| (*name, op.as_ref()))
        .chain(folded.iter().map(|(name, op)| (name.as_str(), op.as_ref())))
        .collect();
    let repeats = args.op_repeats.max(1);
    for (name, op) in &ops {
        let mut host = Vec::new();
        let mut total = Vec::new();
        for rep in 0..args.warmup + args.reps.max(1) {
            B::sync(device).map_err(|e| anyhow::anyhow!("{e:?}"))?;
            let start = Instant::now();
            for _ in 0..repeats {
                drop(op());
            }
            let enqueued = start.elapsed();
            B::sync(device).map_err(|e| anyhow::anyhow!("{e:?}"))?;
            let done = start.elapsed();
            if rep >= args.warmup {
                host.push(enqueued.as_secs_f64() * 1e6 / repeats as f64);
                total.push(done.as_secs_f64() * 1e6 / repeats as f64);
            }
        }
        host.sort_by(f64::total_cmp);
        total.sort_by(f64::total_cmp);
        let (host, total) = (host[host.len() / 2], total[total.len() / 2]);
        eprintln!("op       {name:<16} host {host:>8.1} us/op   until done {total:>8.1} us/op");
        rows.push(Row {
            what: "op".into(),
            shape: "smollm2-135m".into(),
            dtype: args.dtype.clone(),
            size: repeats,
            detail: format!("{name} host_us={host:.2}"),
            median_ms: total / 1e3,
            min_ms: host / 1e3,
            cold_ms: None,
        });
    }
    Ok(())
}
