//! Grouped-query self-attention with a fused QKV projection, against a [`KvCache`].

use burn::module::Module;
use burn::tensor::{Tensor, activation::softmax, backend::Backend};

use super::fold;
use super::norm::RmsNorm;
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
        let qkv = self.qkv.forward(x.reshape([batch * len, hidden]));
        let out = self.attend(qkv, batch, rope, bias, layer, cache)?;
        Ok(self.output.forward(out).reshape([batch, len, hidden]))
    }

    /// The attention half of a layer on the residual stream, `x + attention(norm(x))`, with the
    /// norm folded into the QKV product and the residual add into the output product where the
    /// GPU kernels take them (`super::fold`); Burn's ops for any part they
    /// decline. `norm` must have no weight of its own (the loader folds it into `qkv`).
    ///
    /// # Shapes
    /// as [`Attention::forward`], `x` not normalised
    pub fn forward_residual(
        &self,
        x: Tensor<B, 3>,
        norm: &RmsNorm<B>,
        rope: &RopeAngles<B>,
        bias: Option<&Tensor<B, 4>>,
        layer: usize,
        cache: &mut KvCache<B>,
    ) -> Result<Tensor<B, 3>> {
        let [batch, len, hidden] = x.dims();
        let x = fold::rows(x);
        let out = match self.attend_rotated_product(&x, norm, rope, bias, layer, cache)? {
            Some(out) => out,
            None => {
                let qkv = fold::normed_product(&self.qkv, &x, norm);
                self.attend(qkv, batch, rope, bias, layer, cache)?
            }
        };
        Ok(fold::residual_product(&self.output, &out, &x).reshape([batch, len, hidden]))
    }

    /// The attention of a block too long for the GPUs' rotating attention kernel, its rotation
    /// folded into the QKV product instead (which also writes K and V into the cache): two
    /// launches where the rotation would take a third. `None`, with nothing computed, where that
    /// does not apply (a short block, a norm with a weight of its own, another backend).
    ///
    /// # Shapes
    /// - `x`: `[batch · T, hidden]` (not normalised); `rope`, `bias` as in [`Self::forward`]
    /// - returns `[batch · T, heads · head_dim]`
    fn attend_rotated_product(
        &self,
        x: &Tensor<B, 2>,
        norm: &RmsNorm<B>,
        rope: &RopeAngles<B>,
        bias: Option<&Tensor<B, 4>>,
        layer: usize,
        cache: &mut KvCache<B>,
    ) -> Result<Option<Tensor<B, 2>>> {
        let [batch, _, len, _] = rope.cos.dims();
        let (heads, kv_heads, dim) = (self.heads, self.kv_heads, self.head_dim);
        if norm.weight.is_some()
            || self.qkv.out_major()
            || cube_kernels::rotary_attention_takes(len, dim)
        {
            return Ok(None);
        }
        let weight = self.qkv.weight.val();
        let written = cache.append_written(layer, len, |keys, values, start| {
            cube_kernels::rotary_product_into_cache(
                x,
                &weight,
                Some(norm.eps),
                &rope.cos,
                &rope.sin,
                heads,
                kv_heads,
                keys,
                values,
                layer,
                start,
            )
        })?;
        Ok(written.map(|(q, keys, values)| self.attention(q, keys, values, bias, batch, len)))
    }

    /// Q, K and V from the QKV product, rotated, K and V appended to the cache, and the block's
    /// attention over the visible slots.
    ///
    /// # Shapes
    /// - `qkv`: `[batch · T, (heads + 2 · kv_heads) · head_dim]`
    /// - returns `[batch · T, heads · head_dim]`
    fn attend(
        &self,
        qkv: Tensor<B, 2>,
        batch: usize,
        rope: &RopeAngles<B>,
        bias: Option<&Tensor<B, 4>>,
        layer: usize,
        cache: &mut KvCache<B>,
    ) -> Result<Tensor<B, 2>> {
        let (heads, kv_heads) = (self.heads, self.kv_heads);
        let [rows, width] = qkv.dims();
        let len = rows / batch.max(1);
        let qkv = qkv.reshape([batch, len, width]);
        // On the GPUs the attention kernel rotates Q and K itself and writes K and V into the
        // cache's storage: one launch for the rotation, the cache's append and the attention.
        let attended = cache.append_written(layer, len, |keys, values, start| {
            cube_kernels::rotary_attention_into_cache(
                &qkv, &rope.cos, &rope.sin, heads, kv_heads, keys, values, layer, start, bias,
            )
        })?;
        if let Some((out, _, _)) = attended {
            return Ok(out);
        }
        // Else the rotation may still write K and V straight into the cache's storage.
        let written = cache.append_written(layer, len, |keys, values, start| {
            cube_kernels::rotate_qkv_into_cache(
                &qkv, &rope.cos, &rope.sin, heads, kv_heads, keys, values, layer, start,
            )
        })?;
        let (q, keys, values) = match written {
            Some(appended) => appended,
            None => {
                let (q, k, v) = self.rotate(qkv, rope);
                let (keys, values) = cache.append(layer, k, v)?;
                (q, keys, values)
            }
        };
        Ok(self.attention(q, keys, values, bias, batch, len))
    }

    /// The attention of rotated queries over the cache's visible keys and values.
    ///
    /// # Shapes
    /// - `q`: `[batch, heads, T, head_dim]`; `keys`, `values`: `[batch, kv_heads, slots, head_dim]`
    /// - `bias`: `[batch, 1, T, slots]`, or `None`
    /// - returns `[batch · T, heads · head_dim]`
    fn attention(
        &self,
        q: Tensor<B, 4>,
        keys: Tensor<B, 4>,
        values: Tensor<B, 4>,
        bias: Option<&Tensor<B, 4>>,
        batch: usize,
        len: usize,
    ) -> Tensor<B, 2> {
        let (heads, kv_heads, dim) = (self.heads, self.kv_heads, self.head_dim);
        match cube_kernels::attention(&q, &keys, &values, bias) {
            Some(out) => out,
            None => match cpu_kernels::attention(&q, &keys, &values, bias) {
                Some(out) => out.reshape([batch * len, heads * dim]),
                None => grouped_attention(q, keys, values, bias, kv_heads),
            },
        }
    }

    /// Q, K and V split into heads, Q and K rotated.
    ///
    /// # Shapes
    /// - `qkv`: `[batch, T, (heads + 2 · kv_heads) · head_dim]`
    /// - returns Q `[batch, heads, T, head_dim]`, K and V `[batch, kv_heads, T, head_dim]`
    fn rotate(
        &self,
        qkv: Tensor<B, 3>,
        rope: &RopeAngles<B>,
    ) -> (Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>) {
        let (heads, kv_heads, dim) = (self.heads, self.kv_heads, self.head_dim);
        let [batch, len, _] = qkv.dims();
        let fused = cube_kernels::rotate_qkv(&qkv, &rope.cos, &rope.sin, heads, kv_heads)
            .or_else(|| cpu_kernels::rotate_qkv(&qkv, &rope.cos, &rope.sin, heads, kv_heads));
        if let Some(split) = fused {
            return split;
        }
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
