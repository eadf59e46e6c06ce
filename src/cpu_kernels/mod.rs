//! Fused CPU kernels for the Llama layer on the Flex backend: the parts of a verification
//! forward that Burn's ops run element by element through strided views once a block has more
//! than one token (splitting and rotating Q/K, attention with the tree bias, SwiGLU).
//!
//! Each entry point returns `None` unless `B` is `burn::backend::Flex` itself (not `Autodiff`)
//! with f32 tensors — and always `None` without the `flex` feature — so callers fall back to
//! Burn's ops. The GPU counterparts are in [`crate::cube_kernels`]; the projections' CPU kernel
//! is [`crate::skinny_matmul`]. Every kernel computes each output element independently of the
//! block length, keeping a token's logits in a draft tree equal to its logits when decoded alone.

use burn::tensor::{Tensor, backend::Backend};

#[cfg(feature = "flex")]
mod attention;
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
