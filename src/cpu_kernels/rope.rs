//! Splitting the fused QKV product into heads and rotating Q and K, for the Flex CPU backend.
//!
//! With Burn's ops the split is a `swap_dims` view, and RoPE's gather, two products and sum on
//! that view walk it element by element through a strided iterator: ~0.2 ms per layer for a
//! 5-token block on the development machine, more than its matmuls grow by. Here each output row
//! is written once, contiguous. Every element is `x·cos + x_rot·sin`, rounded as Burn's ops round
//! it, independently of the other positions.

use burn::tensor::{Tensor, TensorData, backend::Backend};

use super::view::View;
use crate::flex_tensor::{into_flex, is_flex};

/// Q, K and V as `[batch, heads, len, dim]` tensors (K and V with `kv_heads`), Q and K rotated.
pub(crate) type Qkv<B> = (Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>);

/// See [`crate::cpu_kernels::rotate_qkv`].
pub(crate) fn rotate_qkv<B: Backend>(
    qkv: &Tensor<B, 3>,
    cos: &Tensor<B, 4>,
    sin: &Tensor<B, 4>,
    heads: usize,
    kv_heads: usize,
) -> Option<Qkv<B>> {
    if !is_flex::<B>() {
        return None;
    }
    let [batch, len, width] = qkv.dims();
    let all_heads = heads + 2 * kv_heads;
    if all_heads == 0 || !width.is_multiple_of(all_heads) {
        return None;
    }
    let dim = width / all_heads;
    if !dim.is_multiple_of(2) || cos.dims() != [batch, 1, len, dim] || sin.dims() != cos.dims() {
        return None;
    }
    let device = qkv.device();
    let qkv = into_flex(qkv.clone().reshape([batch, len, all_heads, dim]))?;
    let cos = into_flex(cos.clone())?;
    let sin = into_flex(sin.clone())?;
    let (qkv, cos, sin) = (View::new(&qkv)?, View::new(&cos)?, View::new(&sin)?);
    let half = dim / 2;
    let split = |first: usize, count: usize, rotate: bool| {
        let mut out = vec![0.0f32; batch * count * len * dim];
        for (i, row) in out.chunks_exact_mut(dim).enumerate() {
            let (b, h, t) = (i / (count * len), i / len % count, i % len);
            let x = qkv.row(b, t, first + h, dim);
            if rotate {
                let (c, s) = (cos.row(b, 0, t, dim), sin.row(b, 0, t, dim));
                for d in 0..dim {
                    let rotated = x[(d + half) % dim];
                    row[d] = x[d] * c[d] + rotated * s[d];
                }
            } else {
                row.copy_from_slice(x);
            }
        }
        Tensor::from_data(TensorData::new(out, [batch, count, len, dim]), &device)
    };
    Some((
        split(0, heads, true),
        split(heads, kv_heads, true),
        split(heads + kv_heads, kv_heads, false),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Distribution, Int, Tolerance};

    use crate::models::llama::LlamaConfig;
    use crate::models::llama::RotaryEmbedding;

    type B = burn::backend::Flex;

    #[test]
    fn equals_burns_split_and_rotation() {
        let device = Default::default();
        let config = LlamaConfig::new(48, 32, 1, 6, 2, 8).with_max_position_embeddings(64);
        let (heads, kv_heads, dim, batch, len) = (6, 2, 8, 2, 3);
        let rope = RotaryEmbedding::<B>::new(&config, 64, &device);
        let positions = Tensor::<B, 2, Int>::from_data(
            TensorData::new(vec![4i64, 5, 6, 0, 17, 40], [batch, len]),
            &device,
        );
        let angles = rope.angles(&positions);
        let qkv = Tensor::<B, 3>::random(
            [batch, len, (heads + 2 * kv_heads) * dim],
            Distribution::Default,
            &device,
        );
        let (q, k, v) =
            rotate_qkv(&qkv, &angles.cos, &angles.sin, heads, kv_heads).expect("f32 on Flex");
        let split = qkv
            .reshape([batch, len, heads + 2 * kv_heads, dim])
            .swap_dims(1, 2);
        let part =
            |from: usize, to: usize| split.clone().slice([0..batch, from..to, 0..len, 0..dim]);
        let want_q = RotaryEmbedding::apply(part(0, heads), &angles);
        let want_k = RotaryEmbedding::apply(part(heads, heads + kv_heads), &angles);
        let want_v = part(heads + kv_heads, heads + 2 * kv_heads);
        for (got, want) in [(q, want_q), (k, want_k), (v, want_v)] {
            got.into_data()
                .assert_approx_eq::<f32>(&want.into_data(), Tolerance::default());
        }
    }
}
