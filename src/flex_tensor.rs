//! Flex's own tensor type, reached from code generic over the backend.
//!
//! The CPU fast paths ([`crate::skinny_matmul`], [`crate::flex_write`]) work on the buffer behind
//! a Flex tensor. Generic code holds a `Tensor<B, D>`; when `B` is `burn::backend::Flex` itself
//! (not `Autodiff<Flex>`, which must record every op) its float primitive *is* a `FlexTensor`, and
//! these functions move it across.

use std::any::{Any, TypeId};

use burn::backend::Flex;
use burn::backend::flex::FlexTensor;
use burn::tensor::{DType, Tensor, TensorPrimitive, backend::Backend};

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
