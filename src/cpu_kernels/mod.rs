//! Fused CPU kernels for the Llama layer on the Flex backend: the parts of a verification
//! forward that Burn's ops run element by element through strided views once a block has more
//! than one token (splitting and rotating Q/K, attention with the tree bias, SwiGLU), and the
//! norms, which Burn's ops spread over five to seven kernels each.
//!
//! Each entry point returns `None` unless `B` is `burn::backend::Flex` itself (not `Autodiff`)
//! with f32 tensors — and always `None` without the `flex` feature — so callers fall back to
//! Burn's ops. The GPU counterparts are in [`crate::cube_kernels`]; the projections' CPU kernel
//! is [`crate::panel_matmul`]. Every kernel computes each output element independently of the
//! block length, keeping a token's logits in a draft tree equal to its logits when decoded alone.

use burn::tensor::{Tensor, backend::Backend};

#[cfg(feature = "flex")]
mod attention;
#[cfg(feature = "flex")]
mod exp;
#[cfg(feature = "flex")]
mod norm;
#[cfg(feature = "flex")]
mod rope;
#[cfg(feature = "flex")]
mod swiglu;
#[cfg(feature = "flex")]
mod view;

/// `softmax(Q·Kᵀ + bias)·V` with grouped KV heads (query head `h` reads KV head
/// `h / (heads / kv_heads)`), the 1/√dim scale already folded into Q. The output is laid out for
/// the output projection.
///
/// # Shapes
/// - `queries`: `[batch, heads, len, dim]` (any strides with a dense last dimension)
/// - `keys`, `values`: `[batch, kv_heads, slots, dim]` (likewise, e.g. slices of the KV cache)
/// - `bias`: `[batch, 1, len, slots]`, or `None`
/// - returns `[batch, len, heads · dim]`
pub fn attention<B: Backend>(
    queries: &Tensor<B, 4>,
    keys: &Tensor<B, 4>,
    values: &Tensor<B, 4>,
    bias: Option<&Tensor<B, 4>>,
) -> Option<Tensor<B, 3>> {
    #[cfg(feature = "flex")]
    {
        attention::attention(queries, keys, values, bias)
    }
    #[cfg(not(feature = "flex"))]
    {
        let _ = (queries, keys, values, bias);
        None
    }
}

/// Splits a fused QKV projection into heads and rotates Q and K — the contract of
/// [`crate::cube_kernels::rotate_qkv`].
///
/// # Shapes
/// - `qkv`: `[batch, len, (heads + 2 * kv_heads) * head_dim]`, ordered Q | K | V
/// - `cos`, `sin`: `[batch, 1, len, head_dim]`
/// - returns Q `[batch, heads, len, head_dim]`, K and V `[batch, kv_heads, len, head_dim]`
pub fn rotate_qkv<B: Backend>(
    qkv: &Tensor<B, 3>,
    cos: &Tensor<B, 4>,
    sin: &Tensor<B, 4>,
    heads: usize,
    kv_heads: usize,
) -> Option<(Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>)> {
    #[cfg(feature = "flex")]
    {
        rope::rotate_qkv(qkv, cos, sin, heads, kv_heads)
    }
    #[cfg(not(feature = "flex"))]
    {
        let _ = (qkv, cos, sin, heads, kv_heads);
        None
    }
}

/// `silu(gate) * up` from a fused gate/up projection.
///
/// # Shapes
/// `[rows, 2 * inter]` (gate | up) to `[rows, inter]`
pub fn swiglu<B: Backend>(gate_up: &Tensor<B, 2>) -> Option<Tensor<B, 2>> {
    #[cfg(feature = "flex")]
    {
        swiglu::swiglu(gate_up)
    }
    #[cfg(not(feature = "flex"))]
    {
        let _ = gate_up;
        None
    }
}

/// `x / sqrt(mean(x²) + eps)` over the last dimension, times `weight` if given.
///
/// # Shapes
/// `x`: `[..., hidden]`, `weight`: `[hidden]`; returns `[..., hidden]`
pub fn rms_norm<B: Backend, const D: usize>(
    x: &Tensor<B, D>,
    weight: Option<&Tensor<B, 1>>,
    eps: f64,
) -> Option<Tensor<B, D>> {
    #[cfg(feature = "flex")]
    {
        norm::rms_norm(x, weight, eps)
    }
    #[cfg(not(feature = "flex"))]
    {
        let _ = (x, weight, eps);
        None
    }
}

/// The residual add and the norm after it: `(x + delta, rms_norm(x + delta))`.
///
/// # Shapes
/// `x`, `delta`: `[..., hidden]`, `weight`: `[hidden]`; both results `[..., hidden]`
pub fn add_rms_norm<B: Backend, const D: usize>(
    x: &Tensor<B, D>,
    delta: &Tensor<B, D>,
    weight: Option<&Tensor<B, 1>>,
    eps: f64,
) -> Option<(Tensor<B, D>, Tensor<B, D>)> {
    #[cfg(feature = "flex")]
    {
        norm::add_rms_norm(x, delta, weight, eps)
    }
    #[cfg(not(feature = "flex"))]
    {
        let _ = (x, delta, weight, eps);
        None
    }
}
