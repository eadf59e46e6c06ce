//! Strided read access to a Flex tensor's buffer.

use burn::backend::flex::FlexTensor;

/// A read-only view of a 4-D f32 Flex tensor whose last dimension is dense: rows are read in
/// place, whatever the strides of the other three dimensions (slices of the KV cache, heads
/// split off a fused product by `swap_dims`).
pub(crate) struct View<'a> {
    data: &'a [f32],
    offset: usize,
    strides: [usize; 4],
}

impl<'a> View<'a> {
    /// `None` unless the tensor is 4-D f32 with non-negative strides and a dense last dimension.
    pub(crate) fn new(tensor: &'a FlexTensor) -> Option<Self> {
        if tensor.dtype() != burn::tensor::DType::F32 {
            return None;
        }
        let layout = tensor.layout();
        let strides: Vec<usize> = layout
            .strides()
            .iter()
            .map(|&s| usize::try_from(s).ok())
            .collect::<Option<_>>()?;
        let strides: [usize; 4] = strides.try_into().ok()?;
        let shape = layout.shape();
        // A size-1 dimension's stride is never used; only a longer last dimension must be dense.
        if shape[3] > 1 && strides[3] != 1 {
            return None;
        }
        Some(Self {
            data: tensor.storage::<f32>(),
            offset: layout.start_offset(),
            strides,
        })
    }

    /// The `len` contiguous values starting at `[a, b, c, 0]`.
    pub(crate) fn row(&self, a: usize, b: usize, c: usize, len: usize) -> &'a [f32] {
        let start = self.offset + a * self.strides[0] + b * self.strides[1] + c * self.strides[2];
        &self.data[start..start + len]
    }
}
