//! A Llama layer's norms, SwiGLU and residual adds folded into its products.
//!
//! On the GPUs a layer is bound by kernel launches, not arithmetic: eleven launches per layer
//! (norm, QKV product, rotation, two cache writes, attention, output product, residual add and
//! norm, gate/up product, SwiGLU, down product) become six when the norm before a product is
//! computed inside it, the SwiGLU and residual add after one are applied to its sums, and the
//! rotation writes K and V into the cache (`Attention::attend`); five where the rotation itself
//! folds into the attention (blocks of up to 512 keys: 8 tokens of a head dimension of 64) or
//! into the QKV product (longer blocks, `Attention::attend_rotated_product`). Each function here falls back to
//! composing the operations where the fused product does not apply (the CPU backends, a prompt of
//! more rows than [`crate::cube_kernels::MATMUL_MAX_ROWS`], `REDRAFTER_FOLDED_LAYERS=off`).

use burn::tensor::{Tensor, backend::Backend};

use super::norm::RmsNorm;
use crate::cube_kernels::ProductFolds;
use crate::projection::Projection;

/// `norm(x) · W`. `norm` must have no weight of its own (folded into `projection`).
///
/// # Shapes
/// `x`: `[rows, in]` to `[rows, out]`
pub(super) fn normed_product<B: Backend>(
    projection: &Projection<B>,
    x: &Tensor<B, 2>,
    norm: &RmsNorm<B>,
) -> Tensor<B, 2> {
    let folds = ProductFolds {
        rms_norm_eps: Some(norm.eps),
        ..ProductFolds::default()
    };
    fused(norm, || projection.fused_forward(x, folds))
        .unwrap_or_else(|| projection.forward(norm.forward(x.clone())))
}

/// `silu(gate) · up` of `[gate | up] = norm(x) · W`, if one launch computes it (else `None`:
/// compose [`normed_product`] and a SwiGLU).
///
/// # Shapes
/// `x`: `[rows, in]` to `[rows, out / 2]`
pub(super) fn normed_swiglu<B: Backend>(
    projection: &Projection<B>,
    x: &Tensor<B, 2>,
    norm: &RmsNorm<B>,
) -> Option<Tensor<B, 2>> {
    let folds = ProductFolds {
        rms_norm_eps: Some(norm.eps),
        swiglu: true,
        ..ProductFolds::default()
    };
    fused(norm, || projection.fused_forward(x, folds))
}

/// `residual + x · W`.
///
/// # Shapes
/// `x`: `[rows, in]`, `residual`: `[rows, out]`; returns `[rows, out]`
pub(super) fn residual_product<B: Backend>(
    projection: &Projection<B>,
    x: &Tensor<B, 2>,
    residual: &Tensor<B, 2>,
) -> Tensor<B, 2> {
    let folds = ProductFolds {
        residual: Some(residual),
        ..ProductFolds::default()
    };
    projection
        .fused_forward(x, folds)
        .unwrap_or_else(|| residual.clone() + projection.forward(x.clone()))
}

/// A block's residual stream `[batch, T, hidden]` as the products' rows `[batch · T, hidden]`.
///
/// For one sequence this is a view of the same buffer on the CubeCL backends: the embedding's
/// `select` hands the first layer rows padded to the allocator's 512-byte pitch, which Burn's
/// `reshape` copies whenever a dimension is dropped (one copy launch per forward) while our
/// kernels read any row pitch through the strides. Elsewhere, and for batches, Burn's `reshape`.
pub(super) fn rows<B: Backend>(x: Tensor<B, 3>) -> Tensor<B, 2> {
    let [batch, len, hidden] = x.dims();
    if batch == 1
        && let Some(rows) = crate::cube_kernels::view::<B, 3, 2>(&x, [0..1, 0..len, 0..hidden])
    {
        return rows;
    }
    x.reshape([batch * len, hidden])
}

/// `product()` where `norm` can be folded (it has no weight left), else `None`.
fn fused<B: Backend>(
    norm: &RmsNorm<B>,
    product: impl FnOnce() -> Option<Tensor<B, 2>>,
) -> Option<Tensor<B, 2>> {
    norm.weight.is_none().then(product).flatten()
}

/// Whether a forward of `rows` tokens runs the folded layer ([`super::Attention::forward_residual`],
/// [`super::Mlp::forward_residual`]): on the CubeCL backends with the folds switched on
/// ([`crate::cube_kernels::folds_switched_on`]), for up to
/// [`crate::cube_kernels::MATMUL_MAX_ROWS`] rows (a longer prompt takes CubeCL's tiled matmul).
pub(super) fn folds_layers<B: Backend>(rows: usize) -> bool {
    crate::cube_kernels::applies::<B>()
        && crate::cube_kernels::folds_switched_on()
        && rows <= crate::cube_kernels::MATMUL_MAX_ROWS
}
