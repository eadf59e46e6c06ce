//! Flex's own tensor type, reached from code generic over the backend.
//!
//! The CPU fast paths ([`crate::skinny_matmul`], [`crate::flex_write`]) work on the buffer behind
//! a Flex tensor. Generic code holds a `Tensor<B, D>`; when `B` is `burn::backend::Flex` itself
//! (not `Autodiff<Flex>`, which must record every op) its float primitive *is* a `FlexTensor`, and
//! these functions move it across.

use std::any::{Any, TypeId};

use burn::backend::Flex;
use burn::backend::flex::{FlexTensor, Layout};
use burn::tensor::{DType, Shape, Tensor, TensorPrimitive, backend::Backend};

/// Whether `B` is the Flex backend itself.
pub(crate) fn is_flex<B: Backend>() -> bool {
    TypeId::of::<B>() == TypeId::of::<Flex>()
}

/// The Flex tensor behind `tensor` (sharing its buffer); `None` for a quantized tensor or when
/// `B` is not Flex — the tensor is consumed either way, so check [`is_flex`] first where it
/// must survive.
pub(crate) fn into_flex<B: Backend, const D: usize>(tensor: Tensor<B, D>) -> Option<FlexTensor> {
    let TensorPrimitive::Float(primitive) = tensor.into_primitive() else {
        return None;
    };
    let boxed: Box<dyn Any> = Box::new(primitive);
    boxed.downcast::<FlexTensor>().ok().map(|tensor| *tensor)
}

/// [`into_flex`] for an f32 tensor, copied into row-major order if it is a strided view, so that
/// `as_slice::<f32>` reads its elements in order; `None` for any other float type.
pub(crate) fn into_contiguous_flex<B: Backend, const D: usize>(
    tensor: Tensor<B, D>,
) -> Option<FlexTensor> {
    if tensor.dtype() != DType::F32 {
        return None;
    }
    let flex = into_flex(tensor)?;
    Some(if flex.as_slice::<f32>().is_some() {
        flex
    } else {
        flex.to_contiguous()
    })
}

/// `tensor` as a `Tensor<B, D>`; `None` when `B` is not Flex.
pub(crate) fn from_flex<B: Backend, const D: usize>(tensor: FlexTensor) -> Option<Tensor<B, D>> {
    let boxed: Box<dyn Any> = Box::new(tensor);
    boxed
        .downcast::<B::FloatTensorPrimitive>()
        .ok()
        .map(|primitive| Tensor::from_primitive(TensorPrimitive::Float(*primitive)))
}

/// `tensor` without its leading dimension of size 1, sharing the buffer; `None` when `B` is not
/// Flex, the leading dimension is not 1 or `D2 + 1 != D`. Burn's `squeeze` reshapes, and Flex
/// copies a strided view (a slice of the KV cache) into a new buffer to reshape it: ~13.8 MB a
/// SmolLM2 forward at 256 cached tokens. The view keeps the buffer shared while it lives, so an
/// in-place write into the source ([`crate::flex_write`]) copies instead until it is dropped.
pub(crate) fn squeeze_leading<B: Backend, const D: usize, const D2: usize>(
    tensor: Tensor<B, D>,
) -> Option<Tensor<B, D2>> {
    if !is_flex::<B>() || D2 + 1 != D || tensor.dims()[0] != 1 {
        return None;
    }
    let flex = into_flex(tensor)?;
    let layout = flex.layout();
    let shape = Shape::from(layout.shape()[1..].to_vec());
    let strides = layout.strides()[1..].to_vec();
    let view = Layout::new(shape, strides, layout.start_offset());
    from_flex(flex.with_layout(view))
}
