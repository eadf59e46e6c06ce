//! Grouped-query self-attention with a fused QKV projection, against a [`KvCache`].

use burn::module::Module;
use burn::tensor::{Tensor, activation::softmax, backend::Backend};

use super::rope::{RopeAngles, RotaryEmbedding};
use crate::error::Result;
use crate::kv_cache::KvCache;
use crate::projection::Projection;
use crate::{cpu_kernels, cube_kernels};

/// GQA attention. Q, K and V come from one matmul (fewer kernel launches per layer, which is
/// what bounds small models on GPU); the 1/sqrt(head_dim) score scale is folded into the Q
/// columns at load time.
#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    /// `hidden` to `(heads + 2 * kv_heads) * head_dim` features, ordered Q | K | V.
    pub qkv: Projection<B>,
    /// `heads * head_dim` to `hidden` features.
    pub output: Projection<B>,
    #[module(skip)]
    pub heads: usize,
    #[module(skip)]
    pub kv_heads: usize,
    #[module(skip)]
    pub head_dim: usize,
}

impl<B: Backend> Attention<B> {
    /// Attends the block to the cached context and to itself.
    ///
    /// # Shapes
    /// - `x`: `[batch, T, hidden]` (already normalised)
    /// - `rope`: angles of `[batch, 1, T, head_dim]`
    /// - `bias`: `[batch, 1, T, used + T]` or `None` (T = 1, every slot visible)
    /// - returns `[batch, T, hidden]`
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        rope: &RopeAngles<B>,
        bias: Option<&Tensor<B, 4>>,
        layer: usize,
        cache: &mut KvCache<B>,
    ) -> Result<Tensor<B, 3>> {
        let [batch, len, hidden] = x.dims();
        let (heads, kv_heads, dim) = (self.heads, self.kv_heads, self.head_dim);

        let qkv = self.qkv.forward(x.reshape([batch * len, hidden])).reshape([
            batch,
            len,
            (heads + 2 * kv_heads) * dim,
        ]);
        let fused = cube_kernels::rotate_qkv(&qkv, &rope.cos, &rope.sin, heads, kv_heads)
            .or_else(|| cpu_kernels::rotate_qkv(&qkv, &rope.cos, &rope.sin, heads, kv_heads));
        let (q, k, v) = match fused {
            Some(split) => split,
            None => {
                let qkv = qkv
                    .reshape([batch, len, heads + 2 * kv_heads, dim])
                    .swap_dims(1, 2);
                // Rotate Q and K together: one set of RoPE ops instead of two.
                let qk = qkv
                    .clone()
                    .slice([0..batch, 0..heads + kv_heads, 0..len, 0..dim]);
                let qk = RotaryEmbedding::apply(qk, rope);
                let q = qk.clone().slice([0..batch, 0..heads, 0..len, 0..dim]);
                let k = qk.slice([0..batch, heads..heads + kv_heads, 0..len, 0..dim]);
                let v = qkv.slice([
                    0..batch,
                    heads + kv_heads..heads + 2 * kv_heads,
                    0..len,
                    0..dim,
                ]);
                (q, k, v)
            }
        };

        let (keys, values) = cache.append(layer, k, v)?;
        let out = match cube_kernels::attention(&q, &keys, &values, bias) {
            Some(out) => out,
            None => match cpu_kernels::attention(&q, &keys, &values, bias) {
                Some(out) => out.reshape([batch * len, heads * dim]),
                None => grouped_attention(q, keys, values, bias, kv_heads),
            },
        };
        Ok(self.output.forward(out).reshape([batch, len, hidden]))
    }
}

/// Burn's ops for [`Attention::forward`]'s attention, where no fused kernel applies.
///
/// # Shapes
/// - `q`: `[batch, heads, len, dim]`; `keys`, `values`: `[batch, kv_heads, slots, dim]`
/// - `bias`: `[batch, 1, len, slots]`, or `None`
/// - returns `[batch · len, heads · dim]`
fn grouped_attention<B: Backend>(
    q: Tensor<B, 4>,
    keys: Tensor<B, 4>,
    values: Tensor<B, 4>,
    bias: Option<&Tensor<B, 4>>,
    kv_heads: usize,
) -> Tensor<B, 2> {
    let [batch, heads, len, dim] = q.dims();
    let groups = heads / kv_heads;
    let slots = keys.dims()[2];
    // Query heads of a group share one KV head: fold the group into the row dimension
    // instead of repeating K and V.
    let q = q.reshape([batch, kv_heads, groups * len, dim]);
    let scores = q.matmul(keys.swap_dims(2, 3));
    let probs = match cube_kernels::softmax_with_bias(&scores, bias) {
        Some(probs) => probs,
        None => {
            let scores = match bias {
                Some(bias) => scores
                    .reshape([batch, kv_heads, groups, len, slots])
                    .add(bias.clone().unsqueeze_dim::<5>(1))
                    .reshape([batch, kv_heads, groups * len, slots]),
                None => scores,
            };
            softmax(scores, 3)
        }
    };
    probs
        .matmul(values)
        .reshape([batch, heads, len, dim])
        .swap_dims(1, 2)
        .reshape([batch * len, heads * dim])
}
