//! The fused CubeCL kernels (`redrafter::cube_kernels`) against the same operations written in
//! Burn's tensor ops, on the WGPU backend — in CI on Mesa's software Vulkan driver (lavapipe),
//! which `.ci/run` installs — or, built without `wgpu`, on CUDA:
//!
//! ```text
//! cargo test --release --features wgpu --test cube_kernels
//! cargo test --release --no-default-features --features cuda --test cube_kernels
//! ```
//!
//! Shapes are odd on purpose: widths that are not multiples of the 128 units a row kernel uses,
//! several batch entries and heads, masked attention slots.
#![cfg(any(feature = "wgpu", feature = "cuda"))]

use burn::tensor::activation::{silu, softmax};
use burn::tensor::{Distribution, Int, Tensor, TensorData, Tolerance};
use redrafter::cube_kernels;
use redrafter::kv_cache::MASKED;
use redrafter::models::llama::{LlamaConfig, RotaryEmbedding};

#[cfg(feature = "wgpu")]
type B = redrafter::backend::Wgpu;
#[cfg(not(feature = "wgpu"))]
type B = redrafter::backend::Cuda;

type Device = burn::tensor::Device<B>;

#[cfg(feature = "wgpu")]
fn device() -> Device {
    redrafter::backend::wgpu_device().expect("a Vulkan adapter (see .ci/run for the software one)")
}
#[cfg(not(feature = "wgpu"))]
fn device() -> Device {
    Default::default()
}

fn random<const D: usize>(dims: [usize; D]) -> Tensor<B, D> {
    Tensor::random(dims, Distribution::Normal(0.0, 2.0), &device())
}

fn close<const D: usize>(got: Tensor<B, D>, expected: Tensor<B, D>) {
    got.into_data()
        .assert_approx_eq::<f32>(&expected.into_data(), Tolerance::absolute(1e-5));
}

fn reference_norm<const D: usize>(x: Tensor<B, D>, eps: f64) -> Tensor<B, D> {
    let rms = x.clone().square().mean_dim(D - 1).add_scalar(eps).sqrt();
    x.div(rms)
}

#[test]
fn the_kernels_apply_to_the_gpu_backend_only() {
    assert!(cube_kernels::applies::<B>());
    #[cfg(feature = "flex")]
    {
        use redrafter::backend::Cpu;
        assert!(!cube_kernels::applies::<Cpu>());
        let x = Tensor::<Cpu, 2>::ones([2, 3], &Default::default());
        assert!(cube_kernels::rms_norm(&x, 1e-5).is_none());
    }
}

#[test]
fn rms_norm_matches_burn_ops() {
    let x = random([3, 5, 300]);
    let got = cube_kernels::rms_norm(&x, 1e-5).expect("applies on the GPU backend");
    close(got, reference_norm(x, 1e-5));
}

#[test]
fn a_rows_norm_does_not_depend_on_the_other_rows() {
    let x = random([70, 576]);
    let all = cube_kernels::rms_norm(&x, 1e-5).unwrap();
    let one = cube_kernels::rms_norm(&x.clone().slice([13..14, 0..576]), 1e-5).unwrap();
    all.slice([13..14, 0..576])
        .into_data()
        .assert_eq(&one.into_data(), true);
}

#[test]
fn add_rms_norm_returns_the_sum_and_its_norm() {
    let (x, delta) = (random([2, 7, 576]), random([2, 7, 576]));
    let (sum, normalized) = cube_kernels::add_rms_norm(&x, &delta, 1e-6).unwrap();
    let expected = x.add(delta);
    close(sum, expected.clone());
    close(normalized, reference_norm(expected, 1e-6));
}

#[test]
fn softmax_with_bias_matches_burn_ops() {
    let (batch, heads, len, slots) = (2, 6, 5, 157);
    let scores = random([batch, heads, len, slots]);
    // Causal-style bias: slot s visible to position t when s <= slots - len + t, and a few
    // context slots masked for the second batch entry.
    let bias: Vec<f32> = (0..batch * len * slots)
        .map(|i| {
            let (b, t, s) = (i / (len * slots), (i / slots) % len, i % slots);
            let hidden = s > slots - len + t || (b == 1 && s % 7 == 3);
            if hidden { MASKED } else { 0.0 }
        })
        .collect();
    let bias = Tensor::<B, 4>::from_data(TensorData::new(bias, [batch, 1, len, slots]), &device());
    let got = cube_kernels::softmax_with_bias(&scores, Some(&bias)).unwrap();
    close(got, softmax(scores.clone().add(bias.clone()), 3));

    // GQA's layout: 3 KV heads × 2 query heads each, folded into rows.
    let grouped = scores.clone().reshape([batch, 3, 2 * len, slots]);
    let got = cube_kernels::softmax_with_bias(&grouped, Some(&bias)).unwrap();
    let expected = grouped
        .reshape([batch, 3, 2, len, slots])
        .add(bias.clone().unsqueeze_dim::<5>(1));
    close(
        got,
        softmax(expected, 4).reshape([batch, 3, 2 * len, slots]),
    );

    let got = cube_kernels::softmax_with_bias(&scores, None).unwrap();
    close(got, softmax(scores, 3));
}

#[test]
fn softmax_covers_more_rows_than_one_grid_axis_holds() {
    // 70,000 rows: more than the 65,535 cubes WGPU allows along one axis.
    let scores = random([1, 10, 7_000, 3]);
    let got = cube_kernels::softmax_with_bias(&scores, None).unwrap();
    close(got, softmax(scores, 3));
}

#[test]
fn rotate_qkv_matches_the_rotary_embedding_in_burn_ops() {
    let (batch, len, heads, kv_heads, dim) = (2, 3, 4, 2, 8);
    let config = LlamaConfig {
        hidden_size: heads * dim,
        intermediate_size: 8,
        num_hidden_layers: 1,
        num_attention_heads: heads,
        num_key_value_heads: kv_heads,
        vocab_size: 8,
        max_position_embeddings: 64,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        tie_word_embeddings: true,
        rope_scaling: None,
        bos_token_id: None,
        eos_token_id: None,
    };
    let rope = RotaryEmbedding::<B>::new(&config, 64, &device());
    let positions = Tensor::<B, 2, Int>::from_data(
        TensorData::new(vec![0i64, 7, 7, 30, 31, 63], [batch, len]),
        &device(),
    );
    let angles = rope.angles(&positions);
    let qkv = random([batch, len, (heads + 2 * kv_heads) * dim]);
    let (q, k, v) =
        cube_kernels::rotate_qkv(&qkv, &angles.cos, &angles.sin, heads, kv_heads).unwrap();

    let split = qkv
        .reshape([batch, len, heads + 2 * kv_heads, dim])
        .swap_dims(1, 2);
    let part = |from: usize, to: usize| split.clone().slice([0..batch, from..to, 0..len, 0..dim]);
    close(q, RotaryEmbedding::apply(part(0, heads), &angles));
    close(
        k,
        RotaryEmbedding::apply(part(heads, heads + kv_heads), &angles),
    );
    close(v, part(heads + kv_heads, heads + 2 * kv_heads));
}

#[test]
fn swiglu_matches_burn_ops() {
    let (rows, inter) = (5, 1_536);
    let gate_up = random([rows, 2 * inter]);
    let got = cube_kernels::swiglu(&gate_up).unwrap();
    let gate = gate_up.clone().slice([0..rows, 0..inter]);
    let up = gate_up.slice([0..rows, inter..2 * inter]);
    close(got, silu(gate).mul(up));
}

/// A prefill of a 37-token prompt through one SmolLM2-shaped layer's fused ops, with the large
/// entries real residual streams carry: every kernel against Burn's ops, and every output finite.
#[test]
fn a_smollm2_shaped_prefill_matches_burn_ops() {
    let (len, hidden, heads, kv_heads, dim, inter) = (37, 576, 9, 3, 64, 1536);
    let residual = random([1, len, hidden]).mul_scalar(50.0);
    let delta = random([1, len, hidden]);
    let (sum, normalized) = cube_kernels::add_rms_norm(&residual, &delta, 1e-5).unwrap();
    let expected = residual.add(delta);
    sum.into_data()
        .assert_approx_eq::<f32>(&expected.clone().into_data(), Tolerance::absolute(1e-3));
    close(normalized, reference_norm(expected, 1e-5));

    let scores = random([1, heads, len, len]).mul_scalar(10.0);
    let causal: Vec<f32> = (0..len * len)
        .map(|i| if i % len <= i / len { 0.0 } else { MASKED })
        .collect();
    let bias = Tensor::<B, 4>::from_data(TensorData::new(causal, [1, 1, len, len]), &device());
    let probs = cube_kernels::softmax_with_bias(&scores, Some(&bias)).unwrap();
    close(probs, softmax(scores.add(bias), 3));

    let gate_up = random([len, 2 * inter]).mul_scalar(20.0);
    let got = cube_kernels::swiglu(&gate_up).unwrap();
    let gate = gate_up.clone().slice([0..len, 0..inter]);
    let up = gate_up.slice([0..len, inter..2 * inter]);
    got.into_data()
        .assert_approx_eq::<f32>(&silu(gate).mul(up).into_data(), Tolerance::absolute(1e-3));

    let qkv = random([1, len, (heads + 2 * kv_heads) * dim]);
    let cos = random([1, 1, len, dim]);
    let sin = random([1, 1, len, dim]);
    let (q, k, v) = cube_kernels::rotate_qkv(&qkv, &cos, &sin, heads, kv_heads).unwrap();
    for part in [q, k, v] {
        let values: Vec<f32> = part.into_data().iter::<f32>().collect();
        assert!(values.iter().all(|v| v.is_finite()));
    }
}
