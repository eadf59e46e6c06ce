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

/// A Llama configuration of the given attention shape, with small MLP and vocabulary.
fn small_config(
    heads: usize,
    kv_heads: usize,
    dim: usize,
    layers: usize,
    vocab: usize,
) -> LlamaConfig {
    LlamaConfig::new(heads * dim, 8 * dim, layers, heads, kv_heads, vocab)
        .with_max_position_embeddings(64)
}

fn bits<const D: usize>(tensor: Tensor<B, D>) -> Vec<u32> {
    tensor
        .cast(burn::tensor::DType::F32)
        .into_data()
        .iter::<f32>()
        .map(f32::to_bits)
        .collect()
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
    let config = small_config(heads, kv_heads, dim, 1, 8);
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
fn silu_sum_matches_burn_ops() {
    let (a, b, residual) = (random([2, 3, 40]), random([2, 3, 40]), random([2, 3, 40]));
    let bias = Tensor::<B, 1>::random([40], Distribution::Normal(0.0, 1.0), &device());
    let broadcast = bias.clone().unsqueeze::<3>();
    let got = cube_kernels::silu_sum(&a, Some(&b), Some(&bias), None).expect("applies");
    close(got, silu(a.clone() + b.clone() + broadcast.clone()));
    let got = cube_kernels::silu_sum(&a, None, Some(&bias), Some(&residual)).unwrap();
    close(got, residual.clone() + silu(a.clone() + broadcast));
    let got = cube_kernels::silu_sum(&a, Some(&b), None, Some(&residual)).unwrap();
    close(got, residual + silu(a.clone() + b));
    assert!(cube_kernels::silu_sum(&a, Some(&random([2, 3, 39])), None, None).is_none());
}

/// Top-k against a host sort by (value descending, column ascending), with and without ties.
#[test]
fn top_k_matches_a_host_sort_ties_to_the_lower_column() {
    for (rows, width, k, levels) in [
        (4, 8192, 50, None),
        (1, 16, 4, None),
        (3, 300, 64, Some(5.0)),
        (2, 1000, 7, Some(2.0)),
        // Wider than a cube holds in registers: read at every pick.
        (2, 10_000, 5, Some(3.0)),
    ] {
        let mut values = random([rows, width]);
        if let Some(levels) = levels {
            // Few distinct values: many exact ties.
            values = values.mul_scalar(levels).round();
        }
        let (sorted, columns) = cube_kernels::top_k(&values, k).expect("applies");
        assert_eq!(sorted.dims(), [rows, k]);
        let host_values: Vec<f32> = values.into_data().iter::<f32>().collect();
        let got_values: Vec<f32> = sorted.into_data().iter::<f32>().collect();
        let got_columns: Vec<i64> = columns.into_data().iter::<i64>().collect();
        for r in 0..rows {
            let row = &host_values[r * width..(r + 1) * width];
            let mut order: Vec<usize> = (0..width).collect();
            order.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
            let want_columns: Vec<i64> = order[..k].iter().map(|&c| c as i64).collect();
            let want_values: Vec<f32> = order[..k].iter().map(|&c| row[c]).collect();
            assert_eq!(
                &got_columns[r * k..(r + 1) * k],
                &want_columns[..],
                "row {r}"
            );
            assert_eq!(&got_values[r * k..(r + 1) * k], &want_values[..], "row {r}");
        }
    }
    assert!(cube_kernels::top_k(&random([2, 5]), 6).is_none());
}

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

fn host<const D: usize>(tensor: &Tensor<B, D>) -> Vec<f64> {
    tensor
        .clone()
        .into_data()
        .iter::<f32>()
        .map(f64::from)
        .collect()
}

/// `got` against a reference computed on the host in f64 (not with Burn's GPU ops: on CUDA
/// CubeCL's matmul rounds f32 through TF32, ~1e-3 relative).
fn close_to_host(got: Tensor<B, 2>, want: &[f64], tolerance: f64) {
    let got = host(&got);
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= tolerance * (1.0 + w.abs()),
            "element {i}: {g} vs {w}"
        );
    }
}

#[test]
fn matmul_matches_a_host_product() {
    // Every layout of the kernel. Widths that are not multiples of 4 read one element at a time:
    // 1 and 7 rows of 130 outputs take one column per unit, 70 rows of 130 two, 13 and 70 rows of
    // 4,001 four. Multiples of 4 read vectors of 4 columns (and of 4 inputs with 576): trees of
    // 13, 40 and 70 rows take row tiles of 4, 8 and 16 for 1,024 outputs.
    for (inputs, outputs, row_counts) in [
        (301, 130, &[1, 7, 13, 70][..]),
        (301, 4001, &[13, 70]),
        (301, 4000, &[1, 20]),
        (576, 1024, &[1, 13, 40, 70]),
    ] {
        product_matches_the_host(inputs, outputs, row_counts);
    }
}

fn product_matches_the_host(inputs: usize, outputs: usize, row_counts: &[usize]) {
    let w = random([inputs, outputs]);
    let weights = host(&w);
    for &rows in row_counts {
        let x = random([rows, inputs]);
        let got = cube_kernels::matmul(&x, &w).expect("applies on the GPU backend");
        let xs = host(&x);
        let want: Vec<f64> = (0..rows * outputs)
            .map(|i| {
                let (r, c) = (i / outputs, i % outputs);
                (0..inputs)
                    .map(|k| xs[r * inputs + k] * weights[k * outputs + c])
                    .sum()
            })
            .collect();
        close_to_host(got, &want, 1e-4);
    }
}

#[test]
fn a_rows_product_does_not_depend_on_the_other_rows() {
    let x = random([70, 576]);
    // Row 13 of 70 against the row alone (one row's layout) and first of 3: every tree layout —
    // 70 rows of 960 outputs take row tiles of 16, of 4,001 four columns per unit; 40 rows of
    // 1,024 tiles of 8; 3 rows of 960 tiles of 4.
    for (rows, outputs) in [(70, 960), (70, 4001), (40, 1024)] {
        let x = x.clone().slice([0..rows, 0..576]);
        let w = random([576, outputs]);
        let all = cube_kernels::matmul(&x, &w).unwrap();
        // Row 13 alone, and as the first row of a 3-row product: another place in a tile.
        let alone = cube_kernels::matmul(&x.clone().slice([13..14, 0..576]), &w).unwrap();
        let first = cube_kernels::matmul(&x.clone().slice([13..16, 0..576]), &w).unwrap();
        let want = bits(all.slice([13..14, 0..outputs]));
        assert_eq!(bits(alone), want, "{outputs} outputs");
        assert_eq!(
            bits(first.slice([0..1, 0..outputs])),
            want,
            "{outputs} outputs"
        );
    }
}

/// The folds of [`cube_kernels::fused_matmul`] against the operations they replace, in f32 and
/// f16, for a decoding step's one row and a tree's many (every tile layout): the norm before the
/// product, the SwiGLU after a gate | up product, the residual add, and all of them together.
#[test]
fn fused_products_match_the_operations_they_fold() {
    use burn::tensor::DType;
    use cube_kernels::ProductFolds;
    // 301 inputs and 130 outputs are read an element at a time, 576 and 192 four at a time.
    for (dtype, (inputs, inter)) in [DType::F32, DType::F16]
        .into_iter()
        .flat_map(|dtype| [(dtype, (301, 130)), (dtype, (576, 192))])
    {
        let eps = 1e-5;
        // The reference runs in f32 on the same (f16-valued) inputs: the kernel also sums in f32
        // and rounds once, at the end, so f16 differs by about its last digit. (Rounding the
        // reference's norm and gate/up product to f16 too put it ~2 % off where the residual and
        // the SwiGLU cancel.)
        let tolerance = if dtype == DType::F32 { 1e-4 } else { 3e-3 };
        let w = random([inputs, 2 * inter]).div_scalar(10.0).cast(dtype);
        let w32 = w.clone().cast(DType::F32);
        for rows in [1, 7, 70] {
            let x = random([rows, inputs]).cast(dtype);
            let residual = random([rows, inter]).cast(dtype);
            let (x32, residual32) = (
                x.clone().cast(DType::F32),
                residual.clone().cast(DType::F32),
            );
            let normed = reference_norm(x32.clone(), eps);
            let product = |x: &Tensor<B, 2>| cube_kernels::matmul(x, &w32).unwrap();
            let swiglu = |gate_up: Tensor<B, 2>| cube_kernels::swiglu(&gate_up).unwrap();
            let w_half = w.clone().slice([0..inputs, 0..inter]);
            let w32_half = w32.clone().slice([0..inputs, 0..inter]);
            let cases: [(ProductFolds<'_, B>, Tensor<B, 2>); 4] = [
                (
                    ProductFolds {
                        rms_norm_eps: Some(eps),
                        ..Default::default()
                    },
                    product(&normed),
                ),
                (
                    ProductFolds {
                        swiglu: true,
                        ..Default::default()
                    },
                    swiglu(product(&x32)),
                ),
                (
                    ProductFolds {
                        residual: Some(&residual),
                        ..Default::default()
                    },
                    residual32.clone() + cube_kernels::matmul(&x32, &w32_half).unwrap(),
                ),
                (
                    ProductFolds {
                        rms_norm_eps: Some(eps),
                        swiglu: true,
                        residual: Some(&residual),
                        ..Default::default()
                    },
                    residual32.clone() + swiglu(product(&normed)),
                ),
            ];
            for (folds, want) in cases {
                let weight = if folds.residual.is_some() && !folds.swiglu {
                    &w_half
                } else {
                    &w
                };
                let got = cube_kernels::fused_matmul(&x, weight, folds).expect("applies");
                assert_eq!(got.dtype(), dtype);
                close_to_host(got.cast(DType::F32), &host(&want), tolerance);
            }
        }
    }
}

/// The draft head's folds: `x + silu(x·W + b)` (a residual block), `silu(s·U + a + b)` (the RNN
/// update) and `x·W + b`, against Burn's ops.
#[test]
fn fused_products_fold_the_draft_heads_bias_silu_and_adds() {
    use cube_kernels::ProductFolds;
    let (rows, width) = (6, 130);
    let x = random([rows, width]);
    let w = random([width, width]).div_scalar(10.0);
    let addend = random([rows, width]);
    let bias = Tensor::<B, 1>::random([width], Distribution::Normal(0.0, 1.0), &device());
    let product = cube_kernels::matmul(&x, &w).unwrap();
    let row_bias = bias.clone().unsqueeze::<2>();
    let cases = [
        (
            ProductFolds {
                bias: Some(&bias),
                silu: true,
                residual: Some(&x),
                ..Default::default()
            },
            x.clone() + silu(product.clone() + row_bias.clone()),
        ),
        (
            ProductFolds {
                addend: Some(&addend),
                bias: Some(&bias),
                silu: true,
                ..Default::default()
            },
            silu(product.clone() + addend.clone() + row_bias.clone()),
        ),
        (
            ProductFolds {
                bias: Some(&bias),
                ..Default::default()
            },
            product.clone() + row_bias.clone(),
        ),
    ];
    for (folds, want) in cases {
        let got = cube_kernels::fused_matmul(&x, &w, folds).expect("applies");
        close_to_host(got, &host(&want), 1e-4);
    }
    // SiLU and SwiGLU together, or a bias of the wrong width, are declined.
    let both = ProductFolds {
        silu: true,
        swiglu: true,
        ..Default::default()
    };
    assert!(cube_kernels::fused_matmul(&x, &w, both).is_none());
    let short = bias.clone().narrow(0, 0, width - 1);
    let wrong = ProductFolds {
        bias: Some(&short),
        ..Default::default()
    };
    assert!(cube_kernels::fused_matmul(&x, &w, wrong).is_none());
}

/// The draft head's joined state: a product written after a copy of its prefix (`[prefix |
/// product]`) and a product reading its inputs from the second half of such a buffer give the
/// same bits as the plain product on the plain inputs, in f32 and f16, for one row and for a
/// tree's tiles, with vector loads (576 wide) and element loads (130).
#[test]
fn a_joined_product_equals_the_product_and_the_concatenation() {
    use burn::tensor::DType;
    use cube_kernels::ProductFolds;
    for (dtype, width, rows) in [DType::F32, DType::F16]
        .into_iter()
        .flat_map(|dtype| [(dtype, 576), (dtype, 130)])
        .flat_map(|(dtype, width)| [1, 6, 18].map(|rows| (dtype, width, rows)))
    {
        let case = format!("{dtype:?}, width {width}, {rows} rows");
        let context = random([rows, width]).cast(dtype);
        let state = random([rows, width]).cast(dtype);
        let addend = random([rows, width]).cast(dtype);
        let u = random([width, width]).div_scalar(10.0).cast(dtype);
        let bias =
            Tensor::<B, 1>::random([width], Distribution::Normal(0.0, 1.0), &device()).cast(dtype);
        let folds = ProductFolds {
            addend: Some(&addend),
            bias: Some(&bias),
            silu: true,
            ..Default::default()
        };
        let want = cube_kernels::fused_matmul(&state, &u, folds).expect("applies");
        // The state in the second half of a joined buffer, as the previous step leaves it.
        let joined_state = Tensor::cat(vec![random([rows, width]).cast(dtype), state.clone()], 1);
        for (source, input_offset) in [(&state, 0), (&joined_state, width)] {
            let got = cube_kernels::fused_matmul(
                source,
                &u,
                ProductFolds {
                    prefix: Some(&context),
                    input_offset,
                    ..folds
                },
            )
            .expect("applies");
            assert_eq!(got.dims(), [rows, 2 * width], "{case}");
            assert_eq!(
                bits(got.clone().slice([0..rows, 0..width])),
                bits(context.clone()),
                "{case}: the prefix"
            );
            assert_eq!(
                bits(got.slice([0..rows, width..2 * width])),
                bits(want.clone()),
                "{case}, inputs from column {input_offset}"
            );
        }
    }
    // An offset past the inputs the weight has, or a prefix of the wrong width, is declined.
    let (x, w) = (random([2, 8]), random([8, 8]));
    let beyond = ProductFolds {
        input_offset: 4,
        ..Default::default()
    };
    assert!(cube_kernels::fused_matmul(&x, &w, beyond).is_none());
    let short = random([2, 4]);
    let narrow_prefix = ProductFolds {
        prefix: Some(&short),
        ..Default::default()
    };
    assert!(cube_kernels::fused_matmul(&x, &w, narrow_prefix).is_none());
}

/// A folded product's rows, like the plain product's, do not depend on the other rows: the
/// norm's sums of squares included, a row alone and among 70 give the same bits.
#[test]
fn a_rows_fused_product_does_not_depend_on_the_other_rows() {
    use cube_kernels::ProductFolds;
    let x = random([70, 576]);
    let residual = random([70, 480]);
    let w = random([576, 960]);
    let folds = |residual| ProductFolds {
        rms_norm_eps: Some(1e-5),
        swiglu: true,
        residual,
        ..Default::default()
    };
    let all = cube_kernels::fused_matmul(&x, &w, folds(Some(&residual))).unwrap();
    let alone_residual = residual.clone().slice([13..14, 0..480]);
    let alone = cube_kernels::fused_matmul(
        &x.clone().slice([13..14, 0..576]),
        &w,
        folds(Some(&alone_residual)),
    )
    .unwrap();
    assert_eq!(bits(alone), bits(all.slice([13..14, 0..480])));
}

/// The rotation that writes K and V into a cache's storage writes what the rotation into new
/// tensors returns, at the block's slots of the layer asked for, and nothing else.
#[test]
fn rotating_into_the_cache_writes_the_rotated_keys_and_values_in_place() {
    let (batch, len, heads, kv_heads, dim) = (2, 3, 4, 2, 8);
    let (layers, slots, layer, start) = (3, 10, 1, 4);
    let config = small_config(heads, kv_heads, dim, 1, 8);
    let rope = RotaryEmbedding::<B>::new(&config, 64, &device());
    let positions = Tensor::<B, 2, Int>::from_data(
        TensorData::new(vec![4i64, 5, 6, 9, 10, 11], [batch, len]),
        &device(),
    );
    let angles = rope.angles(&positions);
    let qkv = random([batch, len, (heads + 2 * kv_heads) * dim]);
    let (q, k, v) =
        cube_kernels::rotate_qkv(&qkv, &angles.cos, &angles.sin, heads, kv_heads).unwrap();
    let keys = random([layers, batch, kv_heads, slots, dim]);
    let values = random([layers, batch, kv_heads, slots, dim]);
    let (keys_before, values_before) = (bits(keys.clone()), bits(values.clone()));
    let q_cached = cube_kernels::rotate_qkv_into_cache(
        &qkv,
        &angles.cos,
        &angles.sin,
        heads,
        kv_heads,
        &keys,
        &values,
        layer,
        start,
    )
    .expect("applies");
    assert_eq!(bits(q_cached), bits(q));
    let block = [
        layer..layer + 1,
        0..batch,
        0..kv_heads,
        start..start + len,
        0..dim,
    ];
    let expect = |before: Vec<u32>, written: Tensor<B, 4>| {
        let mut want = Tensor::<B, 5>::from_data(
            TensorData::new(
                before.into_iter().map(f32::from_bits).collect::<Vec<_>>(),
                [layers, batch, kv_heads, slots, dim],
            ),
            &device(),
        );
        want = want.slice_assign(block.clone(), written.unsqueeze_dim(0));
        bits(want)
    };
    assert_eq!(bits(keys), expect(keys_before, k));
    assert_eq!(bits(values), expect(values_before, v));
    // A block past the storage's slots is declined.
    let too_late = random([layers, batch, kv_heads, start + len - 1, dim]);
    assert!(
        cube_kernels::rotate_qkv_into_cache(
            &qkv,
            &angles.cos,
            &angles.sin,
            heads,
            kv_heads,
            &too_late,
            &too_late,
            layer,
            start,
        )
        .is_none()
    );
}

/// The QKV product that rotates its own outputs (`rotary_product_into_cache`, one launch) gives bit
/// for bit what the normed product and the rotation into the cache give (two launches), and
/// writes the same keys and values: f32 and f16, GQA, several batch entries, a decoding step's
/// one row and a tree's many, head dimensions whose halves are and are not a multiple of the
/// product's four-column loads, inputs read one at a time and four at a time. A block past the
/// storage's slots is declined and nothing is written.
#[test]
fn the_rotating_product_equals_product_then_rotation_bit_for_bit() {
    use burn::tensor::DType;
    use cube_kernels::ProductFolds;
    let (layers, layer, start, eps) = (2, 1, 5, 1e-5);
    for dtype in [DType::F32, DType::F16] {
        for (batch, len, heads, kv_heads, dim, inputs) in [
            (1, 1, 9, 3, 64, 576),
            (1, 18, 9, 3, 64, 576),
            (2, 5, 4, 2, 8, 301),
            (2, 13, 3, 1, 6, 64),
        ] {
            let config = small_config(heads, kv_heads, dim, 1, 8);
            let rope = RotaryEmbedding::<B>::new(&config, 64, &device());
            let positions: Vec<i64> = (0..batch * len).map(|i| (start + i % len) as i64).collect();
            let positions =
                Tensor::<B, 2, Int>::from_data(TensorData::new(positions, [batch, len]), &device());
            let angles = rope.angles(&positions);
            let (cos, sin) = (angles.cos.cast(dtype), angles.sin.cast(dtype));
            let width = (heads + 2 * kv_heads) * dim;
            let x = random([batch * len, inputs]).cast(dtype);
            let weight = random([inputs, width]).div_scalar(10.0).cast(dtype);
            let slots = start + len + 2;
            let storage = || random([layers, batch, kv_heads, slots, dim]).cast(dtype);
            let (keys, values) = (storage(), storage());
            // Copies (f16 values round-trip exactly through f32).
            let copy = |tensor: &Tensor<B, 5>| {
                Tensor::<B, 5>::from_data(tensor.to_data(), &device()).cast(dtype)
            };
            let (keys2, values2) = (copy(&keys), copy(&values));
            let folds = ProductFolds {
                rms_norm_eps: Some(eps),
                ..Default::default()
            };
            let case = format!("{dtype:?} batch {batch} len {len} dim {dim}");
            let qkv = cube_kernels::fused_matmul(&x, &weight, folds)
                .expect("the product applies")
                .reshape([batch, len, width]);
            let q_two_launches = cube_kernels::rotate_qkv_into_cache(
                &qkv, &cos, &sin, heads, kv_heads, &keys2, &values2, layer, start,
            )
            .unwrap_or_else(|| panic!("{case}: the rotation applies"));
            let rotating_product = |keys: &Tensor<B, 5>, values: &Tensor<B, 5>| {
                cube_kernels::rotary_product_into_cache(
                    &x,
                    &weight,
                    Some(eps),
                    &cos,
                    &sin,
                    heads,
                    kv_heads,
                    keys,
                    values,
                    layer,
                    start,
                )
            };
            let q = rotating_product(&keys, &values)
                .unwrap_or_else(|| panic!("{case}: the rotating product applies"));
            assert_eq!(q.dims(), [batch, heads, len, dim], "{case}");
            assert_eq!(bits(q), bits(q_two_launches), "{case}: queries");
            assert_eq!(bits(keys), bits(keys2), "{case}: keys");
            assert_eq!(bits(values), bits(values2), "{case}: values");

            let too_late = random([layers, batch, kv_heads, start + len - 1, dim]).cast(dtype);
            let before = bits(too_late.clone());
            let declined = rotating_product(&too_late, &too_late);
            assert!(declined.is_none(), "{case}: past the storage");
            assert_eq!(bits(too_late), before, "{case}: nothing written");
        }
    }
}

/// The attention that rotates its block itself (`rotary_attention_into_cache`, one launch) gives
/// bit for bit what the rotation into the cache and the attention over the cache's view give (two
/// launches), and writes the same keys and values: with and without a tree's bias, in f32 and f16,
/// GQA, several batch entries, a head dimension that is not a multiple of the kernels' load
/// groups, blocks filling its shared buffer, and a context past the 2,048 slots whose
/// scores the kernel keeps. A longer block is declined and nothing is written.
#[test]
fn the_rotating_attention_equals_rotation_then_attention_bit_for_bit() {
    use burn::tensor::DType;
    // (batch, heads, kv_heads, dim, len, start)
    let cases = [
        (2, 6, 2, 40, 3, 7),
        (1, 9, 3, 64, 1, 40),
        (1, 9, 3, 64, 8, 300),
        (2, 4, 1, 32, 16, 5),
        (1, 9, 3, 64, 2, 2100),
    ];
    for dtype in [DType::F32, DType::F16] {
        for (batch, heads, kv_heads, dim, len, start) in cases {
            let (layers, layer) = (2, 1);
            let slots = start + len + 3;
            let config = small_config(heads, kv_heads, dim, 1, 8)
                .with_max_position_embeddings(start + len + 1);
            let rope = RotaryEmbedding::<B>::new(&config, start + len + 1, &device());
            let positions: Vec<i64> = (0..batch * len).map(|i| (start + i % len) as i64).collect();
            let positions =
                Tensor::<B, 2, Int>::from_data(TensorData::new(positions, [batch, len]), &device());
            let angles = rope.angles(&positions);
            let (cos, sin) = (angles.cos.cast(dtype), angles.sin.cast(dtype));
            let qkv = random([batch, len, (heads + 2 * kv_heads) * dim])
                .mul_scalar(0.3)
                .cast(dtype);
            // `from_data` makes f32 tensors: cast them back to the case's type.
            let storage =
                |data: &TensorData| Tensor::<B, 5>::from_data(data.clone(), &device()).cast(dtype);
            let keys_data = random([layers, batch, kv_heads, slots, dim])
                .cast(dtype)
                .into_data();
            let values_data = random([layers, batch, kv_heads, slots, dim])
                .cast(dtype)
                .into_data();
            let tree_bias = tree_like_bias(batch, len, start + len).cast(dtype);
            for bias in [Some(&tree_bias), None] {
                let case = format!(
                    "{dtype:?}, batch {batch}, {heads}/{kv_heads} heads of {dim}, {len} tokens \
                     after {start}, bias {}",
                    bias.is_some()
                );
                let (keys, values) = (storage(&keys_data), storage(&values_data));
                let q = cube_kernels::rotate_qkv_into_cache(
                    &qkv, &cos, &sin, heads, kv_heads, &keys, &values, layer, start,
                )
                .unwrap_or_else(|| panic!("the rotation declined {case}"));
                let visible = |cache: &Tensor<B, 5>| {
                    cache
                        .clone()
                        .slice([
                            layer..layer + 1,
                            0..batch,
                            0..kv_heads,
                            0..start + len,
                            0..dim,
                        ])
                        .squeeze_dim::<4>(0)
                };
                let want = cube_kernels::attention(&q, &visible(&keys), &visible(&values), bias)
                    .expect("the attention applies");

                let (fused_keys, fused_values) = (storage(&keys_data), storage(&values_data));
                let got = cube_kernels::rotary_attention_into_cache(
                    &qkv,
                    &cos,
                    &sin,
                    heads,
                    kv_heads,
                    &fused_keys,
                    &fused_values,
                    layer,
                    start,
                    bias,
                )
                .unwrap_or_else(|| panic!("the rotating attention declined {case}"));
                assert_eq!(bits(got), bits(want), "output: {case}");
                assert_eq!(bits(fused_keys), bits(keys), "keys: {case}");
                assert_eq!(bits(fused_values), bits(values), "values: {case}");
            }
        }
    }

    // 9 tokens of 64 are more than the 512 keys it rotates: declined, nothing written.
    let (heads, kv_heads, dim, len) = (2, 1, 64, 9);
    let config = small_config(heads, kv_heads, dim, 1, 8).with_max_position_embeddings(len);
    let rope = RotaryEmbedding::<B>::new(&config, len, &device());
    let positions = Tensor::<B, 2, Int>::from_data(
        TensorData::new((0..len as i64).collect::<Vec<_>>(), [1, len]),
        &device(),
    );
    let angles = rope.angles(&positions);
    let qkv = random([1, len, (heads + 2 * kv_heads) * dim]);
    let keys = random([1, 1, kv_heads, len, dim]);
    let values = random([1, 1, kv_heads, len, dim]);
    let (keys_before, values_before) = (bits(keys.clone()), bits(values.clone()));
    let declined = cube_kernels::rotary_attention_into_cache(
        &qkv,
        &angles.cos,
        &angles.sin,
        heads,
        kv_heads,
        &keys,
        &values,
        0,
        0,
        None,
    );
    assert!(declined.is_none());
    assert_eq!(bits(keys), keys_before);
    assert_eq!(bits(values), values_before);
}

/// The kernels read their inputs through the strides, never through a contiguous copy: a column
/// window of a wider tensor and a transposed weight give bit for bit the product of the same
/// values laid out contiguously (on CUDA every padded row counts as non-contiguous).
#[test]
fn strided_inputs_give_the_contiguous_inputs_results() {
    let (rows, inputs, outputs) = (5, 96, 70);
    let wide = random([rows, inputs + 9]);
    let x = wide.clone().slice([0..rows, 4..4 + inputs]);
    let x_contiguous = Tensor::<B, 2>::from_data(x.to_data(), &device());
    let w_out_in = random([outputs, inputs]);
    let w = w_out_in.clone().transpose();
    let w_contiguous = Tensor::<B, 2>::from_data(w.to_data(), &device());
    let want = bits(cube_kernels::matmul(&x_contiguous, &w_contiguous).unwrap());
    assert_eq!(bits(cube_kernels::matmul(&x, &w).unwrap()), want);

    let eps = 1e-5;
    let want = bits(cube_kernels::rms_norm(&x_contiguous, eps).unwrap());
    assert_eq!(bits(cube_kernels::rms_norm(&x, eps).unwrap()), want);
    let gate_up = wide.slice([0..rows, 1..1 + 2 * 48]);
    let gate_up_contiguous = Tensor::<B, 2>::from_data(gate_up.to_data(), &device());
    let want = bits(cube_kernels::swiglu(&gate_up_contiguous).unwrap());
    assert_eq!(bits(cube_kernels::swiglu(&gate_up).unwrap()), want);
}

/// The cache hands attention a view of its storage; what it returns must be what was written.
#[test]
fn the_cache_returns_what_was_appended() {
    use redrafter::kv_cache::KvCache;
    let (layers, heads, dim, capacity) = (3, 2, 16, 70);
    let mut cache = KvCache::<B>::new(layers, 1, heads, dim, capacity, &device());
    let mut written: Vec<Vec<Tensor<B, 4>>> = vec![Vec::new(); layers];
    for block in [5, 1, 3] {
        for (layer, history) in written.iter_mut().enumerate() {
            let keys = random([1, heads, block, dim]);
            let (visible_k, visible_v) = cache
                .append(layer, keys.clone(), keys.clone().neg())
                .unwrap();
            history.push(keys);
            let want = Tensor::cat(history.clone(), 2);
            assert_eq!(visible_k.dims(), want.dims());
            assert_eq!(bits(visible_k), bits(want.clone()));
            assert_eq!(bits(visible_v), bits(want.neg()));
        }
        cache.commit(&[(0..block).collect()]).unwrap();
    }
}

/// A Gumbel-max draw from f16 logits on the GPU (`sampling::gumbel_perturbed`, then our argmax):
/// one favourite among 4,096 tokens must win nearly every row. Until session 34 the noise was
/// drawn in the logits' type, where a uniform draw of 1.0 gives +∞ noise: a random token won
/// most rows, and f16 sampling on the H200 wrote noise.
#[test]
fn a_gumbel_draw_from_half_precision_logits_picks_the_favourite() {
    use burn::tensor::DType;
    use redrafter::sampling::{argmax_rows, gumbel_perturbed};
    let (rows, vocab) = (64, 4096);
    let favourite = |row: usize| (row * 37) % vocab;
    let mut values = vec![0.0f32; rows * vocab];
    for row in 0..rows {
        values[row * vocab + favourite(row)] = 12.0;
    }
    let logits = Tensor::<B, 2>::from_data(TensorData::new(values, [rows, vocab]), &device())
        .cast(DType::F16);
    for temperature in [1.0f32, 0.7] {
        let picks: Vec<i64> = argmax_rows(gumbel_perturbed(logits.clone(), temperature))
            .into_data()
            .iter::<i64>()
            .collect();
        let won = (0..rows)
            .filter(|&row| picks[row] == favourite(row) as i64)
            .count();
        // Another token wins a row with probability ≤ 4,095 · e^-12 ≈ 2.5 %.
        assert!(
            won >= rows - 10,
            "T={temperature}: the favourite won {won} of {rows} rows"
        );
    }
}

#[test]
fn matmul_declines_what_it_does_not_cover() {
    let w = random([16, 8]);
    assert!(cube_kernels::matmul(&random([cube_kernels::MATMUL_MAX_ROWS + 1, 16]), &w).is_none());
    assert!(cube_kernels::matmul(&random([4, 15]), &w).is_none());
}

/// [`cube_kernels::attention`] on the host, in f64.
fn host_attention(
    q: &Tensor<B, 4>,
    keys: &Tensor<B, 4>,
    values: &Tensor<B, 4>,
    bias: Option<&Tensor<B, 4>>,
) -> Vec<f64> {
    let [batch, heads, len, dim] = q.dims();
    let [_, kv_heads, slots, _] = keys.dims();
    let (qs, ks, vs) = (host(q), host(keys), host(values));
    let bias = bias.map(host);
    let mut out = vec![0.0; batch * len * heads * dim];
    for b in 0..batch {
        for h in 0..heads {
            let kv = h / (heads / kv_heads);
            for t in 0..len {
                let query = &qs[((b * heads + h) * len + t) * dim..][..dim];
                let scores: Vec<f64> = (0..slots)
                    .map(|s| {
                        let key = &ks[((b * kv_heads + kv) * slots + s) * dim..][..dim];
                        let dot: f64 = query.iter().zip(key).map(|(a, b)| a * b).sum();
                        dot + bias
                            .as_ref()
                            .map_or(0.0, |bias| bias[(b * len + t) * slots + s])
                    })
                    .collect();
                let largest = scores.iter().cloned().fold(f64::MIN, f64::max);
                let weights: Vec<f64> = scores.iter().map(|s| (s - largest).exp()).collect();
                let total: f64 = weights.iter().sum();
                for d in 0..dim {
                    let sum: f64 = (0..slots)
                        .map(|s| weights[s] * vs[((b * kv_heads + kv) * slots + s) * dim + d])
                        .sum();
                    out[(b * len + t) * heads * dim + h * dim + d] = sum / total;
                }
            }
        }
    }
    out
}

/// A causal bias over `slots` for the last `len` of them, with some context slots masked too.
fn tree_like_bias(batch: usize, len: usize, slots: usize) -> Tensor<B, 4> {
    let data: Vec<f32> = (0..batch * len * slots)
        .map(|i| {
            let (t, s) = ((i / slots) % len, i % slots);
            let hidden = s > slots - len + t || (s % 5 == 3 && s < slots - len);
            if hidden { MASKED } else { 0.0 }
        })
        .collect();
    Tensor::from_data(TensorData::new(data, [batch, 1, len, slots]), &device())
}

/// The attention over a view of a cache, against a host computation: the cache's keys and values
/// are read four elements at a time where the head dimension and the layout allow it (40 and 64
/// here), one at a time where they do not (a transposed cache, whose head dimension is not the
/// contiguous one).
#[test]
fn attention_matches_a_host_computation_over_a_strided_cache() {
    let (batch, heads, kv_heads, len) = (2, 6, 2, 5);
    // 300 slots (two per unit of the cube, units past 150 with none) visible out of a cache of
    // 320: a strided view. 2,100 slots also pass the 2,048 whose scores the kernel keeps. The
    // transposed cache is stored `[batch, kv_heads, dim, slots]` and read through swapped strides.
    for (dim, slots, capacity, transposed) in [
        (40, 300, 320, false),
        (40, 2100, 2112, false),
        (64, 300, 320, false),
        (64, 2100, 2112, false),
        (128, 300, 320, false),
        (64, 300, 300, true),
    ] {
        // Queries scaled so that the scores stay ~5 in size whatever the dimension.
        let q = random([batch, heads, len, dim]).mul_scalar(0.2 * (40.0 / dim as f32).sqrt());
        let cache = || match transposed {
            true => random([batch, kv_heads, dim, capacity]).swap_dims(2, 3),
            false => random([batch, kv_heads, capacity, dim]),
        };
        let view = |cache: Tensor<B, 4>| cache.slice([0..batch, 0..kv_heads, 0..slots, 0..dim]);
        let (keys, values) = (view(cache()), view(cache()));
        let bias = tree_like_bias(batch, len, slots);
        // Scores here are ~5 in size (40 products of N(0, 0.4) and N(0, 2) values): f32 rounds
        // each by ~1e-6, exp turns that into a relative error of the weights, and the outputs
        // (values of size ~2, partly cancelling) carry ~1e-5 of it. 1e-5 failed once in CUDA
        // runs (session 18, 1.1e-5); 3e-5 still catches any misread slot or weight.
        let tolerance = 3e-5;
        let got = cube_kernels::attention(&q, &keys, &values, Some(&bias)).expect("applies");
        close_to_host(
            got,
            &host_attention(&q, &keys, &values, Some(&bias)),
            tolerance,
        );
        let got = cube_kernels::attention(&q, &keys, &values, None).unwrap();
        close_to_host(got, &host_attention(&q, &keys, &values, None), tolerance);
    }
}

/// A tree row masked down to some slots gives, bit for bit, the output of the same query over
/// just those slots, unmasked: what makes a verification tree agree with plain decoding. The
/// kernel splits the value sums among groups of units by the rank of a slot among the visible
/// ones, so the masks interleave masked and visible slots over more than one block of the cube,
/// the visible counts do not divide evenly among the groups (four for a head dimension of 64, six
/// for 40, two for 128), and the slots pass the 2,048 whose scores the kernel keeps in shared
/// memory while the visible ones do not. Past those 2,048 a score is computed again by one unit,
/// where the first pass on a device with plane operations had a team of units compute it (head
/// dimensions 64 and 128): a slot visible past 2,048 in the masked row but before it in the
/// dense one only agrees if both give the same bits.
#[test]
fn a_masked_attention_row_equals_the_row_over_its_visible_slots() {
    for (heads, kv_heads, dim, slots, len) in [
        (9, 3, 64, 333, 3),
        (4, 2, 40, 2200, 3),
        (3, 1, 64, 2300, 3),
        (2, 1, 128, 150, 2),
    ] {
        let visible = |t: usize, s: usize| match t {
            0 => s % 3 != 1,
            1 => (s * 7 + 3) % 11 < 6 && !(slots / 3..slots / 3 + 40).contains(&s),
            _ => s % 17 != 5 && s + 9 < slots && !(700..1500).contains(&s),
        };
        let q = random([1, heads, len, dim]).mul_scalar(0.2);
        let keys = random([1, kv_heads, slots, dim]);
        let values = random([1, kv_heads, slots, dim]);
        let mask: Vec<f32> = (0..len * slots)
            .map(|i| {
                if visible(i / slots, i % slots) {
                    0.0
                } else {
                    MASKED
                }
            })
            .collect();
        let bias = Tensor::<B, 4>::from_data(TensorData::new(mask, [1, 1, len, slots]), &device());
        let masked = cube_kernels::attention(&q, &keys, &values, Some(&bias)).unwrap();

        for t in 0..len {
            let ids: Vec<i64> = (0..slots)
                .filter(|&s| visible(t, s))
                .map(|s| s as i64)
                .collect();
            let ids = Tensor::<B, 1, Int>::from_data(
                TensorData::new(ids.clone(), [ids.len()]),
                &device(),
            );
            let dense_k = keys.clone().select(2, ids.clone());
            let dense_v = values.clone().select(2, ids);
            let query = q.clone().slice([0..1, 0..heads, t..t + 1, 0..dim]);
            let dense = cube_kernels::attention(&query, &dense_k, &dense_v, None).unwrap();
            let row = masked.clone().slice([t..t + 1, 0..heads * dim]);
            assert_eq!(bits(row), bits(dense), "dim {dim}, {slots} slots, row {t}");
        }
    }
}

/// One row of token ids (or positions) on the test device.
fn ids(values: &[i64]) -> Tensor<B, 2, Int> {
    Tensor::<B, 2, Int>::from_data(
        TensorData::new(values.to_vec(), [1, values.len()]),
        &device(),
    )
}

/// The whole Llama forward on the GPU: a verification tree's logits along its accepted path are
/// bit for bit those of one-token decoding steps, in f32 and f16 — so greedy speculative decoding
/// emits exactly plain greedy decoding's tokens.
#[test]
fn a_verification_tree_reproduces_decoding_bit_for_bit() {
    use redrafter::kv_cache::KvCache;
    use redrafter::models::llama::{Llama, LlamaLoadOptions};
    use redrafter::target::{Block, TargetModel};

    for dtype in [burn::tensor::DType::F32, burn::tensor::DType::F16] {
        let options = LlamaLoadOptions {
            dtype,
            max_context: Some(64),
        };
        let model =
            Llama::<B>::init_random(small_config(4, 2, 32, 2, 300), &options, &device()).unwrap();
        let prompt: Vec<i64> = vec![5, 17, 250, 3, 99, 42, 7, 7, 120];
        let p = prompt.len() as i64;
        let prefill = |cache: &mut KvCache<B>| {
            let block = Block {
                tokens: ids(&prompt),
                positions: ids(&(0..p).collect::<Vec<_>>()),
                bias: None,
            };
            model.forward(&block, cache).unwrap();
            cache.commit(&[(0..prompt.len()).collect()]).unwrap();
        };

        // Plain decoding of a, b, c.
        let path = [11i64, 222, 33];
        let mut cache = model.new_cache(1, 64);
        prefill(&mut cache);
        let mut decoded = Vec::new();
        for (i, &token) in path.iter().enumerate() {
            let block = Block {
                tokens: ids(&[token]),
                positions: ids(&[p + i as i64]),
                bias: None,
            };
            let hidden = model.forward(&block, &mut cache).unwrap();
            decoded.push(bits(model.logits(hidden)));
            cache.commit(&[vec![0]]).unwrap();
        }

        // One tree: a → {x, b}, b → {y, c}; the path a, b, c sits at indices 0, 2, 4. Five
        // tokens take the attention that rotates its block; with 14 more children of a, too many
        // keys for it, the QKV product rotates them.
        for extra in [0usize, 14] {
            let mut cache = model.new_cache(1, 64);
            prefill(&mut cache);
            let mut tokens = vec![path[0], 77, path[1], 150, path[2]];
            let mut parents = vec![None, Some(0), Some(0), Some(2), Some(2)];
            let mut positions = vec![p, p + 1, p + 1, p + 2, p + 2];
            for i in 0..extra {
                tokens.push(180 + i as i64);
                parents.push(Some(0));
                positions.push(p + 1);
            }
            let n = tokens.len();
            let mut mask = vec![false; n * n];
            for t in 0..n {
                let mut node = Some(t);
                while let Some(index) = node {
                    mask[t * n + index] = true;
                    node = parents[index];
                }
            }
            let block = Block {
                tokens: ids(&tokens),
                positions: ids(&positions),
                bias: Some(cache.attention_bias(n, Some(&[mask]), &device())),
            };
            let hidden = model.forward(&block, &mut cache).unwrap();
            let logits = model.logits(hidden);
            let vocab = 300;
            for (step, index) in [0usize, 2, 4].into_iter().enumerate() {
                let row = logits.clone().slice([0..1, index..index + 1, 0..vocab]);
                assert_eq!(
                    bits(row),
                    decoded[step],
                    "{dtype:?}, {n}-token tree: path token {step}"
                );
            }
        }
    }
}

/// Beam search with the one-launch selection step (`cube_kernels::beam_advance`, used with the
/// rank top-k) against the composition of Burn's ops (used with the sort top-k), on the same
/// random draft head: the same beams, the same scores up to the normaliser's rounding. Covers
/// several batch entries, a draft vocabulary, beam width 1 and a width above the warp's 50 (the
/// placeholder ranks).
#[test]
fn the_fused_beam_search_step_selects_the_composed_steps_beams() {
    use redrafter::drafter::{
        DraftHeadKind, DraftRequest, DraftVocabulary, RecurrentDrafterConfig, TopKMethod,
    };
    let (hidden, vocab) = (64, 1000);
    let device = device();
    let embedding = random([vocab, hidden]).mul_scalar(0.5);
    for (batch, width, length, draft_vocab) in [
        (1, 1, 2, None),
        (2, 1, 5, Some(300)),
        (2, 4, 5, None),
        (3, 4, 4, Some(300)),
        (1, 60, 3, None),
    ] {
        // The tied head, as shipped (a draft vocabulary needs it).
        let config = RecurrentDrafterConfig::new(hidden, vocab).with_head(DraftHeadKind::Tied);
        let mut drafter = config
            .init_seeded::<B>(7, &device)
            .unwrap()
            .with_embeddings(embedding.clone(), embedding.clone())
            .unwrap();
        if let Some(size) = draft_vocab {
            // Every third token, in an order that is not sorted.
            let ids: Vec<u32> = (0..size as u32)
                .map(|i| (i * 3 + 1) % vocab as u32)
                .rev()
                .collect();
            drafter = drafter
                .with_draft_vocabulary(DraftVocabulary::new(ids, vocab).unwrap())
                .unwrap();
        }
        let context = random([batch, hidden]);
        let first: Vec<i64> = (0..batch as i64).map(|b| 17 + 101 * b).collect();
        let search = |method: TopKMethod, needs_log_probs: bool| {
            drafter
                .clone()
                .with_top_k(method)
                .beam_search(DraftRequest {
                    context: context.clone(),
                    first_tokens: Tensor::<B, 1, Int>::from_data(
                        TensorData::new(first.clone(), [batch]),
                        &device,
                    ),
                    beam_width: width,
                    beam_length: length,
                    needs_log_probs,
                    stop_below: None,
                })
                .unwrap()
        };
        let tokens = |output: &redrafter::drafter::BeamSearchOutput<B>| {
            output
                .tokens
                .clone()
                .into_data()
                .iter::<i64>()
                .collect::<Vec<_>>()
        };
        let (fused, composed) = (
            search(TopKMethod::Rank, true),
            search(TopKMethod::Sort, true),
        );
        let case = format!("batch {batch}, width {width}, length {length}, {draft_vocab:?}");
        assert_eq!(fused.tokens.dims(), [batch, width, length], "{case}");
        assert_eq!(tokens(&fused), tokens(&composed), "{case}");
        // Without log-probs (one beam selects only each step's best token): the same tokens.
        for method in [TopKMethod::Rank, TopKMethod::Sort] {
            let quick = search(method, false);
            assert_eq!(
                tokens(&quick),
                tokens(&fused),
                "{case}, {method:?} without log-probs"
            );
        }
        for (got, want) in [
            (
                fused.scores.flatten::<1>(0, 1),
                composed.scores.flatten::<1>(0, 1),
            ),
            (
                fused.token_log_probs.flatten::<1>(0, 2),
                composed.token_log_probs.flatten::<1>(0, 2),
            ),
        ] {
            got.into_data()
                .assert_approx_eq::<f32>(&want.into_data(), Tolerance::absolute(1e-3));
        }
    }
}

/// On the GPU backends a draft vocabulary's table is kept transposed (`[H, N]`, a copy in the
/// layout our product reads fastest) where the whole vocabulary's is read through a transposed
/// view, and its tokens' RNN inputs `e·W + b` are computed once and gathered by the selection
/// kernel where a step without a draft vocabulary gathers the embedding and multiplies it: with
/// the exit projection kept apart from the table, a draft vocabulary of every token, in order,
/// gives the same beams and log-probabilities bit for bit as no draft vocabulary (each sum has
/// one order whatever the weight's layout and the other rows). Merged with the table (the
/// default), the beams stay the same and the log-probabilities move only by rounding; a merge of
/// the wrong rows or columns would change them. Without log-probabilities one beam's selection
/// picks from the whole row of logits in the same launch; with them it takes the top-k first.
#[test]
fn a_transposed_draft_table_gives_the_whole_tables_beams() {
    use redrafter::drafter::{
        BeamSearchOutput, DraftHeadKind, DraftRequest, DraftVocabulary, RecurrentDrafterConfig,
    };
    let (hidden, vocab, batch, length) = (64, 1000, 2, 5);
    let embedding = random([vocab, hidden]).mul_scalar(0.5);
    let drafter = RecurrentDrafterConfig::new(hidden, vocab)
        .with_head(DraftHeadKind::Tied)
        .init_seeded::<B>(11, &device())
        .unwrap()
        .with_embeddings(embedding.clone(), embedding)
        .unwrap();
    let every_token = DraftVocabulary::new((0..vocab as u32).collect(), vocab).unwrap();
    let merged = drafter
        .clone()
        .with_draft_vocabulary(every_token.clone())
        .unwrap();
    // Kept apart set before and after the vocabulary: both must drop the merged matrix.
    let apart = drafter
        .clone()
        .with_merged_exit(false)
        .with_draft_vocabulary(every_token.clone())
        .unwrap();
    let apart_after = merged.clone().with_merged_exit(false);
    assert!(merged.has_merged_exit());
    assert!(!apart.has_merged_exit() && !apart_after.has_merged_exit());
    assert!(apart_after.clone().with_merged_exit(true).has_merged_exit());
    let context = random([batch, hidden]);
    let first =
        Tensor::<B, 1, Int>::from_data(TensorData::new(vec![17i64, 118], [batch]), &device());
    for (width, needs_log_probs) in [(1, true), (1, false), (3, true), (3, false)] {
        let request = || DraftRequest {
            context: context.clone(),
            first_tokens: first.clone(),
            beam_width: width,
            beam_length: length,
            needs_log_probs,
            stop_below: None,
        };
        let case = format!("width {width}, log-probs {needs_log_probs}");
        let whole: BeamSearchOutput<B> = drafter.beam_search(request()).unwrap();
        for (name, reduced) in [("apart", &apart), ("apart after", &apart_after)] {
            let transposed = reduced.beam_search(request()).unwrap();
            assert_eq!(
                transposed.tokens.into_data(),
                whole.tokens.clone().into_data(),
                "{name}, {case}"
            );
            assert_eq!(
                bits(transposed.token_log_probs),
                bits(whole.token_log_probs.clone()),
                "{name}, {case}"
            );
        }
        let merged = merged.beam_search(request()).unwrap();
        assert_eq!(
            merged.tokens.into_data(),
            whole.tokens.into_data(),
            "merged, {case}"
        );
        merged.token_log_probs.into_data().assert_approx_eq::<f32>(
            &whole.token_log_probs.into_data(),
            Tolerance::absolute(1e-4),
        );
    }
}

/// A one-beam draft in one launch (`cube_kernels::draft_chain`, CUDA only: a grid-wide barrier
/// between its products) drafts the beams, log-probabilities and scores of the launch-per-step
/// path bit for bit: its sums run in the row product's order. Odd shapes on purpose: a hidden
/// size whose slices leave splits empty, a draft vocabulary that ends mid-tile, batches of one to
/// four rows (five falls back), beams of two to six tokens, f32 and f16. On WGPU both sides
/// launch step by step (the chain does not apply there), so only CUDA tests the chain itself.
#[test]
fn a_chained_draft_equals_the_launch_per_step_draft() {
    use burn::tensor::DType;
    use redrafter::drafter::{
        DraftHeadKind, DraftRequest, DraftVocabulary, RecurrentDrafterConfig,
    };
    #[cfg(not(feature = "wgpu"))]
    assert!(cube_kernels::draft_chain_applies::<B>());
    let (hidden, vocab, draft_vocab) = (72, 1000, 301);
    let device = device();
    let embedding = random([vocab, hidden]).mul_scalar(0.5);
    // Every third token, in an order that is not sorted.
    let ids: Vec<u32> = (0..draft_vocab as u32)
        .map(|i| (i * 3 + 1) % vocab as u32)
        .rev()
        .collect();
    for dtype in [DType::F32, DType::F16] {
        let table = embedding.clone().cast(dtype);
        let drafter = RecurrentDrafterConfig::new(hidden, vocab)
            .with_head(DraftHeadKind::Tied)
            .init_seeded::<B>(5, &device)
            .unwrap()
            .with_embeddings(table.clone(), table)
            .unwrap()
            .with_dtype(dtype)
            .unwrap()
            .with_draft_vocabulary(DraftVocabulary::new(ids.clone(), vocab).unwrap())
            .unwrap();
        assert!(drafter.has_merged_exit());
        let stepped = drafter.clone().with_draft_chain(false);
        for (batch, length) in [(1, 5), (1, 2), (2, 6), (3, 4), (4, 5), (5, 3)] {
            let context = random([batch, hidden]).cast(dtype);
            let first: Vec<i64> = (0..batch as i64).map(|b| 17 + 101 * b).collect();
            let request = || DraftRequest {
                context: context.clone(),
                first_tokens: Tensor::<B, 1, Int>::from_data(
                    TensorData::new(first.clone(), [batch]),
                    &device,
                ),
                beam_width: 1,
                beam_length: length,
                needs_log_probs: false,
                stop_below: None,
            };
            let case = format!("{dtype:?}, batch {batch}, length {length}");
            let (chained, apart) = (
                drafter.beam_search(request()).unwrap(),
                stepped.beam_search(request()).unwrap(),
            );
            assert_eq!(chained.tokens.dims(), [batch, 1, length], "{case}");
            assert_eq!(
                chained.tokens.into_data().iter::<i64>().collect::<Vec<_>>(),
                apart.tokens.into_data().iter::<i64>().collect::<Vec<_>>(),
                "{case}"
            );
            for (got, want) in [
                (
                    chained.token_log_probs.flatten::<1>(0, 2),
                    apart.token_log_probs.flatten::<1>(0, 2),
                ),
                (
                    chained.scores.flatten::<1>(0, 1),
                    apart.scores.flatten::<1>(0, 1),
                ),
            ] {
                assert_eq!(bits(got), bits(want), "{case}");
            }
        }
    }
}

/// Speculative decoding on the GPU backend, where acceptance runs as one kernel
/// (`cube_kernels::greedy_accept`) and beam search through `beam_advance`: greedy output equals
/// plain greedy decoding token for token. A random model's greedy text falls into loops, so
/// prompt-lookup beams get accepted and the acceptance walks runs longer than zero (checked).
#[test]
fn greedy_speculative_decoding_on_the_kernels_equals_plain_decoding() {
    use redrafter::decoder::{Acceptance, DraftTiming, SpeculativeConfig, SpeculativeDecoder};
    use redrafter::drafter::{DraftHeadKind, RecurrentDrafterConfig};
    use redrafter::lookup::PromptLookup;
    use redrafter::models::llama::{Llama, LlamaLoadOptions};
    use redrafter::{GenerationConfig, TargetModel, generate};

    let options = LlamaLoadOptions {
        dtype: burn::tensor::DType::F32,
        max_context: Some(256),
    };
    let config = small_config(4, 2, 32, 2, 300).with_max_position_embeddings(256);
    let model = Llama::<B>::init_random(config, &options, &device()).unwrap();
    let drafter = RecurrentDrafterConfig::new(model.hidden_size(), model.vocab_size())
        .with_head(DraftHeadKind::Tied)
        .init_seeded::<B>(3, &device())
        .unwrap()
        .with_target(&model)
        .unwrap();
    let prompts = vec![vec![5, 17, 250, 3, 99, 42, 7], vec![1, 2, 3, 1, 2, 3, 1, 2]];
    let greedy = GenerationConfig::default().with_max_new_tokens(60);
    let plain = generate(&model, &prompts, &greedy, |_, _| {}).unwrap();
    // Three drafted beams drafted after each acceptance; one drafted beam (which `Auto` drafts
    // at the start of the round that verifies it, filling its tokens in on the device), with
    // and without guesses, and forced sequential for comparison.
    // (A random drafter's own beams are hardly ever accepted: the guesses carry τ here, and
    // `overlapped_drafting_accepts_what_sequential_drafting_accepts` on the CPU and
    // `drafted_stand_ins_are_replaced_by_the_drafted_tokens` here check the drafted tokens.)
    let lookup = Some(PromptLookup::new(2).with_beam_length(6));
    let shapes = [
        (3, DraftTiming::Auto),
        (1, DraftTiming::Auto),
        (1, DraftTiming::Sequential),
    ];
    for (m, timing) in shapes {
        let config = SpeculativeConfig::default()
            .beam_width(m)
            .beam_length(4)
            .acceptance(Acceptance::Greedy)
            .lookup(lookup)
            .draft_timing(timing)
            .generation(greedy.clone());
        let decoder = SpeculativeDecoder::new(&model, &drafter, config).unwrap();
        assert_eq!(
            decoder.overlaps_drafting(),
            m == 1 && timing == DraftTiming::Auto
        );
        let speculative = decoder.generate(&prompts, |_, _| {}).unwrap();
        let case = format!("M={m}, lookup {lookup:?}, {timing:?}");
        assert_eq!(speculative.tokens, plain.tokens, "{case}");
        assert!(
            speculative.stats.tau() > 1.2,
            "{case}: too few accepted drafts to exercise acceptance: τ {:.2}",
            speculative.stats.tau()
        );
    }
}

/// An overlapped round's upload holds stand-ins `-1 - i` for drafted tokens the host has not
/// read back yet; one launch puts element `i` of the drafted beams in their place (here read
/// through a strided view) and keeps every other value.
#[test]
fn drafted_stand_ins_are_replaced_by_the_drafted_tokens() {
    let drafted: Tensor<B, 3, Int> = Tensor::from_data(
        TensorData::new((100..112).collect::<Vec<i64>>(), [2, 2, 3]),
        &device(),
    );
    // Beam 1 of each row: [[103, 104, 105]], [[109, 110, 111]] as `[2, 1, 3]`.
    let view = drafted.slice([0..2, 1..2, 0..3]);
    let values: Tensor<B, 1, Int> = Tensor::from_data(
        TensorData::new(vec![3i64, -1, 7, -6, 0, -4, i64::from(i32::MAX), -3], [8]),
        &device(),
    );
    let got = cube_kernels::resolve_drafted(&values, &view).expect("applies");
    assert_eq!(
        got.into_data().iter::<i64>().collect::<Vec<_>>(),
        vec![3, 103, 7, 111, 0, 109, i64::from(i32::MAX), 105]
    );
}

/// Argmax over the last dimension against a host scan (first column on ties), for 2-D and 3-D
/// inputs, rows wider and narrower than a cube (and than its batched loads), many ties, and a
/// strided view.
#[test]
fn argmax_matches_a_host_scan_first_column_on_ties() {
    let host_argmax = |values: Vec<f32>, width: usize| -> Vec<i64> {
        values
            .chunks(width)
            .map(|row| redrafter::sampling::argmax(row) as i64)
            .collect()
    };
    for (rows, width, levels) in [
        (1, 49_152, None),
        (2, 10_000, Some(3.0)),
        (5, 300, Some(2.0)),
        (3, 7, None),
    ] {
        let mut values = random([rows, width]);
        if let Some(levels) = levels {
            values = values.mul_scalar(levels).round();
        }
        let got = cube_kernels::argmax(&values).expect("applies");
        let want = host_argmax(values.into_data().iter::<f32>().collect(), width);
        assert_eq!(got.into_data().iter::<i64>().collect::<Vec<_>>(), want);
    }
    // 3-D, and a strided view (every other row of a larger tensor).
    let values = random([2, 6, 1000]).mul_scalar(3.0).round();
    let got = cube_kernels::argmax(&values).expect("applies");
    let want = host_argmax(values.clone().into_data().iter::<f32>().collect(), 1000);
    assert_eq!(got.into_data().iter::<i64>().collect::<Vec<_>>(), want);
    let view = values.slice([0..2, 0..6, 0..500]);
    let got = cube_kernels::argmax(&view).expect("applies");
    let want = host_argmax(view.into_data().iter::<f32>().collect(), 500);
    assert_eq!(got.into_data().iter::<i64>().collect::<Vec<_>>(), want);
}

/// Committing a verified block (`KvCache::commit`, which moves every row's accepted slots in one
/// launch on the GPU backends) leaves each row's visible keys and values, bit for bit, the slots
/// the host picks from what the cache held before the commit: a row kept from where its block
/// starts (`[0, 2, 5]`, sources overlapping destinations), a path not starting at the block's
/// first slot (`[1, 3]`), a long overlapping run, a row keeping nothing, a row already in place,
/// a row with no committed prefix; rows of different lengths, several layers and KV heads, a head
/// dimension not a multiple of 4, f32 and f16. A commit keeping a row's slots out of order, which
/// the kernel declines, moves them with Burn's ops instead.
#[test]
fn committing_moves_each_rows_accepted_slots_bit_for_bit() {
    use redrafter::kv_cache::KvCache;
    /// A layer's keys or values as bits, `[row][head][slot][d]`.
    type Rows = Vec<Vec<Vec<Vec<u32>>>>;
    let (layers, batch, heads, dim, capacity) = (3, 7, 2, 7, 40);
    // Each round appends a block of this many slots, then keeps these slots of it per row.
    let rounds: [(usize, [Vec<usize>; 7]); 4] = [
        // Lengths 7, 5, 3, 7, 0, 4, 7: only the last row but one moves (to slots 0..4).
        (
            7,
            [
                (0..7).collect(),
                (0..5).collect(),
                (0..3).collect(),
                (0..7).collect(),
                vec![],
                vec![1, 2, 4, 6],
                (0..7).collect(),
            ],
        ),
        // The block starts at slot 7.
        (
            6,
            [
                vec![0, 2, 5],
                vec![0, 1, 3, 4, 5],
                vec![],
                vec![0, 1, 2],
                vec![1, 3],
                (0..6).collect(),
                vec![1, 3],
            ],
        ),
        // The block starts at slot 10.
        (
            5,
            [
                vec![1, 2, 4],
                vec![0],
                vec![0, 1, 2, 3, 4],
                vec![],
                vec![0, 2, 3],
                vec![4],
                vec![0, 1, 2, 3],
            ],
        ),
        // The block starts at slot 13; a row keeping slots out of order (which the kernel
        // declines: the whole commit takes Burn's ops).
        (
            4,
            [
                vec![0, 1],
                vec![3, 0],
                vec![],
                vec![1, 2, 3],
                vec![2],
                vec![0, 3],
                vec![],
            ],
        ),
    ];
    for dtype in [burn::tensor::DType::F32, burn::tensor::DType::F16] {
        let mut cache =
            KvCache::<B>::new(layers, batch, heads, dim, capacity, &device()).cast(dtype);
        // Each layer's keys and values the host expects.
        let mut expected: Option<Vec<[Rows; 2]>> = None;
        // Appends a block to every layer; returns each layer's visible keys and values (all
        // slots up to the block's end) as bits, checking the rows'
        // committed slots against `expected` first.
        let append = |cache: &mut KvCache<B>, block: usize, expected: &Option<Vec<[Rows; 2]>>| {
            let mut seen = Vec::new();
            for layer in 0..layers {
                let keys = random([batch, heads, block, dim]).cast(dtype);
                let values = random([batch, heads, block, dim]).cast(dtype);
                let (visible_k, visible_v) = cache.append(layer, keys, values).unwrap();
                let slots = visible_k.dims()[2];
                let nest = |tensor: Tensor<B, 4>| -> Rows {
                    let flat = bits(tensor);
                    (0..batch)
                        .map(|b| {
                            (0..heads)
                                .map(|h| {
                                    (0..slots)
                                        .map(|s| {
                                            let at = ((b * heads + h) * slots + s) * dim;
                                            flat[at..at + dim].to_vec()
                                        })
                                        .collect()
                                })
                                .collect()
                        })
                        .collect()
                };
                let layer_seen = [nest(visible_k), nest(visible_v)];
                if let Some(expected) = expected {
                    for (kind, name) in ["keys", "values"].into_iter().enumerate() {
                        for (row, &length) in cache.lengths().iter().enumerate() {
                            for head in 0..heads {
                                assert_eq!(
                                    layer_seen[kind][row][head][..length],
                                    expected[layer][kind][row][head][..length],
                                    "{dtype:?}: layer {layer}, {name} of row {row}, head {head}"
                                );
                            }
                        }
                    }
                }
                seen.push(layer_seen);
            }
            seen
        };
        for (block, keep) in &rounds {
            let before = append(&mut cache, *block, &expected);
            let block_start = cache.used();
            let dests = cache.lengths().to_vec();
            // The host's commit: slot `dest + i` of a row takes the block's slot `keep[i]`.
            let after = before
                .into_iter()
                .map(|kinds| {
                    kinds.map(|rows| {
                        rows.into_iter()
                            .zip(keep)
                            .zip(&dests)
                            .map(|((heads, kept), &dest)| {
                                heads
                                    .into_iter()
                                    .map(|slots| {
                                        let mut moved = slots[..dest].to_vec();
                                        moved.extend(
                                            kept.iter().map(|&k| slots[block_start + k].clone()),
                                        );
                                        moved
                                    })
                                    .collect()
                            })
                            .collect()
                    })
                })
                .collect();
            expected = Some(after);
            cache.commit(keep).unwrap();
            let want: Vec<usize> = dests.iter().zip(keep).map(|(d, k)| d + k.len()).collect();
            assert_eq!(cache.lengths(), want.as_slice());
        }
        // The last commit's result, read through one more block.
        append(&mut cache, 1, &expected);
    }
}

/// A head that taps the target's layers reads the same outputs whichever way the layers run:
/// folded (a block of at most `MATMUL_MAX_ROWS` rows, one launch per projection with its norm,
/// bias and residual) or unfolded (a longer prompt); and the final norm of the last layer's
/// output is the hidden state the forward returns.
#[test]
fn tapped_layers_agree_between_folded_and_unfolded_layers() {
    use redrafter::models::llama::{Llama, LlamaLoadOptions};
    use redrafter::target::{Block, TargetModel};

    let n = cube_kernels::MATMUL_MAX_ROWS + 4;
    let options = LlamaLoadOptions {
        dtype: burn::tensor::DType::F32,
        max_context: Some(n + 8),
    };
    let config = small_config(4, 2, 32, 3, 300).with_max_position_embeddings(n + 8);
    let model = Llama::<B>::init_random(config, &options, &device()).unwrap();
    let tokens: Vec<i64> = (0..n as i64).map(|i| (i * 37 + 11) % 300).collect();
    let positions: Vec<i64> = (0..n as i64).collect();
    let taps = [0, 2];

    // The whole prompt at once: unfolded layers.
    let mut cache = model.new_cache(1, n);
    let block = Block {
        tokens: ids(&tokens),
        positions: ids(&positions),
        bias: None,
    };
    let (hidden_all, taps_all) = model.forward_tapped(&block, &mut cache, &taps).unwrap();
    // All but the last token, then the last one alone: folded layers.
    let mut cache = model.new_cache(1, n);
    let block = Block {
        tokens: ids(&tokens[..n - 1]),
        positions: ids(&positions[..n - 1]),
        bias: None,
    };
    model.forward(&block, &mut cache).unwrap();
    cache.commit(&[(0..n - 1).collect()]).unwrap();
    let block = Block {
        tokens: ids(&tokens[n - 1..]),
        positions: ids(&positions[n - 1..]),
        bias: None,
    };
    let (hidden_one, taps_one) = model.forward_tapped(&block, &mut cache, &taps).unwrap();

    let last = |t: Tensor<B, 3>| t.narrow(1, n - 1, 1);
    last(hidden_all)
        .into_data()
        .assert_approx_eq::<f32>(&hidden_one.clone().into_data(), Tolerance::absolute(1e-3));
    assert_eq!(taps_one.len(), 2);
    for (all, one) in taps_all.into_iter().zip(&taps_one) {
        last(all)
            .into_data()
            .assert_approx_eq::<f32>(&one.clone().into_data(), Tolerance::absolute(1e-3));
    }
    // The random model's final norm has unit weights: an RMS norm of the last layer's output.
    let out = taps_one[1].clone();
    let rms = out.clone().square().mean_dim(2).add_scalar(1e-5).sqrt();
    out.div(rms)
        .into_data()
        .assert_approx_eq::<f32>(&hidden_one.into_data(), Tolerance::absolute(1e-3));
}
