//! Criterion micro-benchmarks of the pieces of one speculative round on the default CPU backend:
//! tree packing, a draft round (beam search), one verification forward at packed lengths
//! L ∈ {1, 8, 32, 64, 128}, a projection of a few rows in each weight layout (why CPUs store
//! weights in panels, `src/projection.rs`) and one layer's attention.
//!
//! ```text
//! cargo bench --bench round
//! cargo bench --bench round -- verify      # one group
//! ```
//! The models have SmolLM2-135M's shape with random weights (costs do not depend on the weights,
//! and no download is needed). GPU figures come from `examples/profile.rs`, which measures the
//! same pieces on any backend.

#[path = "../examples/common/shapes.rs"]
mod shapes;

use std::hint::black_box;

use burn::tensor::{Distribution, Tensor};
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use rand::{Rng, SeedableRng};
use redrafter::drafter::{DraftHead, DraftHeadKind, DraftRequest, RecurrentDrafterConfig};
use redrafter::generate::{int_tensor, prefill};
use redrafter::models::llama::{Llama, LlamaLoadOptions};
use redrafter::projection::{Projection, WeightLayout};
use redrafter::tree::DraftTree;
use redrafter::{Block, TargetModel};

type B = redrafter::backend::Cpu;

fn tree_packing(c: &mut Criterion) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    let mut group = c.benchmark_group("pack");
    let length = 5;
    for width in [1, 4, 16, 64] {
        // Beams sharing prefixes as drafted beams do: few distinct tokens per depth.
        let beams: Vec<u32> = (0..width * length)
            .map(|i| {
                if i % length == 0 {
                    7
                } else {
                    rng.random_range(0..4)
                }
            })
            .collect();
        group.bench_with_input(BenchmarkId::from_parameter(width), &beams, |b, beams| {
            b.iter(|| DraftTree::pack(black_box(beams), width, length).expect("valid beams"))
        });
    }
    group.finish();
}

fn model() -> Llama<B> {
    let options = LlamaLoadOptions {
        max_context: Some(512),
        ..Default::default()
    };
    Llama::init_random(shapes::smollm2_135m(), &options, &Default::default()).expect("valid shape")
}

fn draft_round(c: &mut Criterion) {
    let model = model();
    let device = Default::default();
    let drafter = RecurrentDrafterConfig::new(model.hidden_size(), model.vocab_size())
        .with_head(DraftHeadKind::Tied)
        .init_seeded::<B>(0, &device)
        .and_then(|d| d.with_target(&model))
        .expect("drafter fits the model");
    let context = Tensor::<B, 2>::random(
        [1, model.hidden_size()],
        Distribution::Normal(0.0, 1.0),
        &device,
    );
    let mut group = c.benchmark_group("draft");
    group.sample_size(10);
    for width in [1, 4, 16] {
        group.bench_function(BenchmarkId::from_parameter(width), |b| {
            b.iter(|| {
                let beams = drafter
                    .propose(DraftRequest {
                        context: context.clone(),
                        first_tokens: int_tensor(vec![42], [1], &device),
                        beam_width: width,
                        beam_length: 5,
                        needs_log_probs: false,
                        stop_below: None,
                    })
                    .expect("valid request");
                beams.tokens.into_data()
            })
        });
    }
    group.finish();
}

fn verify_forward(c: &mut Criterion) {
    let model = model();
    let device = Default::default();
    let context = 128;
    let mut cache = model.new_cache(1, context + 129);
    let prompt: Vec<u32> = (0..context as u32).map(|t| t * 7 % 49152).collect();
    prefill(&model, &mut cache, &[prompt]).expect("prefill");
    let mut group = c.benchmark_group("verify");
    group.sample_size(10);
    for len in [1, 8, 32, 64, 128] {
        let mask: Vec<bool> = (0..len * len).map(|i| i % len <= i / len).collect();
        let block = Block {
            tokens: int_tensor(
                (0..len as i64).map(|t| t * 13 % 49152).collect(),
                [1, len],
                &device,
            ),
            positions: int_tensor(
                (context as i64..(context + len) as i64).collect(),
                [1, len],
                &device,
            ),
            bias: Some(cache.attention_bias(len, Some(&[mask]), &device)),
        };
        group.bench_function(BenchmarkId::from_parameter(len), |b| {
            b.iter(|| {
                let hidden = model.forward(&block, &mut cache).expect("forward");
                let best = model.logits(hidden).argmax(2).into_data();
                cache.rollback();
                best
            })
        });
    }
    group.finish();
}

/// `x·W` for `rows` rows of SmolLM2's gate/up (576 → 3072) and vocabulary (576 → 49152)
/// shapes, with `W` stored `[in, out]`, `[out, in]` (on Flex: the skinny kernel up to 64 rows,
/// and `gemm` on the same layout) and in panels (the layout a model loads with on Flex in f32).
fn projection(c: &mut Criterion) {
    let device = Default::default();
    let mut group = c.benchmark_group("projection");
    group.sample_size(10);
    for (name, inputs, outputs) in [("gate_up", 576, 3072), ("vocab", 576, 49152)] {
        let weight = Tensor::<B, 2>::random([inputs, outputs], Distribution::Default, &device);
        let in_out = Projection::from_tensor(weight.clone(), WeightLayout::InOut);
        let transposed = Tensor::from_data(weight.transpose().into_data(), &device);
        let out_in = Projection::from_tensor(transposed.clone(), WeightLayout::OutIn);
        let panels = Projection::from_out_in_tensor(transposed);
        for rows in [1, 4, 16, 32, 64] {
            let x = Tensor::<B, 2>::random([rows, inputs], Distribution::Default, &device);
            let layouts = [
                ("in_out", &in_out),
                ("out_in", &out_in),
                ("panels", &panels),
            ];
            for (layout, p) in layouts {
                let id = BenchmarkId::new(format!("{name}/{layout}"), rows);
                group.bench_function(id, |b| b.iter(|| p.forward(x.clone()).into_data()));
            }
            // `out_in` above takes the skinny kernel up to its row limit; this is `gemm` on the
            // same layout, for comparison.
            let id = BenchmarkId::new(format!("{name}/out_in_gemm"), rows);
            let w = out_in.weight.val();
            group.bench_function(id, |b| {
                b.iter(|| {
                    w.clone()
                        .matmul(x.clone().transpose())
                        .transpose()
                        .into_data()
                })
            });
        }
    }
    group.finish();
}

/// One layer's attention at SmolLM2's shape (9 query heads over 3 KV heads of 64 dims) for
/// `len` query tokens over 256 cached ones, with a causal bias, the keys and values strided
/// views of a longer cache as in a forward. On Flex in f32 this is the crate's CPU kernel
/// (`redrafter::cpu_kernels::attention`).
fn attention(c: &mut Criterion) {
    let device = Default::default();
    let mut group = c.benchmark_group("attention");
    let (heads, kv_heads, dim, context, capacity) = (9, 3, 64, 256, 1024);
    let cache =
        Tensor::<B, 4>::random([1, kv_heads, capacity, dim], Distribution::Default, &device);
    for len in [1, 5, 18] {
        let slots = context + len;
        let queries = Tensor::<B, 4>::random([1, len, heads, dim], Distribution::Default, &device)
            .swap_dims(1, 2);
        let keys = cache.clone().slice([0..1, 0..kv_heads, 0..slots, 0..dim]);
        let values = cache.clone().slice([0..1, 0..kv_heads, 0..slots, 0..dim]);
        let mut bias = vec![redrafter::kv_cache::MASKED; len * slots];
        for t in 0..len {
            bias[t * slots..t * slots + context + t + 1].fill(0.0);
        }
        let bias = Tensor::<B, 4>::from_data(
            burn::tensor::TensorData::new(bias, [1, 1, len, slots]),
            &device,
        );
        group.bench_function(BenchmarkId::from_parameter(len), |b| {
            b.iter(|| {
                redrafter::cpu_kernels::attention(&queries, &keys, &values, Some(&bias))
                    .expect("f32 on Flex")
                    .into_data()
            })
        });
    }
    group.finish();
}

criterion_group!(
    benches,
    tree_packing,
    draft_round,
    verify_forward,
    projection,
    attention
);
criterion_main!(benches);
