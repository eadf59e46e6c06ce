//! Region writes that stay in place on the Flex CPU backend.
//!
//! Burn 0.21's Flex `slice_assign` always copies the whole destination: its `slice_write_impl`
//! takes a second handle to the buffer (`to_contiguous` returns a clone of a contiguous tensor)
//! before asking for mutable storage, so the copy-on-write fires even for a uniquely owned tensor.
//! The KV cache keeps every layer in one tensor (tens of MB for SmolLM2 at a few hundred slots)
//! and writes into it once per layer per forward, so on the CPU each decoding step copied the
//! whole cache 60 times — a cost that grew with the cache's capacity, not with the work done.
//! [`slice_assign`] writes the region directly when the destination is a uniquely owned,
//! contiguous Flex tensor, and otherwise defers to Burn's `slice_assign` (every other backend,
//! `Autodiff`, shared buffers, quantized tensors).

use std::ops::Range;

use burn::tensor::{Tensor, backend::Backend};

use crate::error::Result;

/// `tensor[region] = value`, in place where possible (see the module docs).
///
/// # Shapes
/// `value` has the region's shape.
pub fn slice_assign<B: Backend, const D: usize>(
    tensor: Tensor<B, D>,
    region: [Range<usize>; D],
    value: Tensor<B, D>,
) -> Result<Tensor<B, D>> {
    #[cfg(feature = "flex")]
    let tensor = match flex::write_in_place(tensor, &region, &value)? {
        Ok(written) => return Ok(written),
        Err(untouched) => untouched,
    };
    Ok(tensor.slice_assign(region, value))
}

#[cfg(feature = "flex")]
mod flex {
    use std::ops::Range;

    use burn::backend::flex::FlexTensor;
    use burn::tensor::{DType, Tensor, backend::Backend};
    use half::{bf16, f16};

    use crate::error::{Error, Result};
    use crate::flex_tensor::{from_flex, into_flex, is_flex};

    /// `Ok(Ok(written))` when the region was written in place, `Ok(Err(tensor))` (untouched) when
    /// this path does not apply.
    pub(super) fn write_in_place<B: Backend, const D: usize>(
        tensor: Tensor<B, D>,
        region: &[Range<usize>; D],
        value: &Tensor<B, D>,
    ) -> Result<std::result::Result<Tensor<B, D>, Tensor<B, D>>> {
        if !is_flex::<B>() || tensor.dtype() != value.dtype() {
            return Ok(Err(tensor));
        }
        let shape = tensor.dims();
        let fits = region
            .iter()
            .zip(shape)
            .all(|(r, n)| r.start <= r.end && r.end <= n)
            && region.iter().zip(value.dims()).all(|(r, n)| r.len() == n);
        if !fits || D == 0 {
            return Ok(Err(tensor));
        }
        let internal = |what: &str| Error::Backend(format!("internal: {what}"));
        let mut destination =
            into_flex(tensor).ok_or_else(|| internal("a Flex float tensor is not a FlexTensor"))?;
        let back = |tensor: FlexTensor| {
            from_flex::<B, D>(tensor).ok_or_else(|| internal("a FlexTensor is not Flex's tensor"))
        };
        let Some(source) = into_flex(value.clone()) else {
            // A quantized value: Burn's op handles it.
            return Ok(Err(back(destination)?));
        };
        let source = source.to_contiguous();
        let whole = destination.is_contiguous()
            && destination.layout().start_offset() == 0
            && destination.bytes().len()
                == shape.iter().product::<usize>() * destination.dtype().size();
        let written = whole
            && match destination.dtype() {
                DType::F32 => write::<f32, D>(&mut destination, &shape, region, &source),
                DType::F16 => write::<f16, D>(&mut destination, &shape, region, &source),
                DType::BF16 => write::<bf16, D>(&mut destination, &shape, region, &source),
                _ => false,
            };
        let tensor = back(destination)?;
        Ok(if written { Ok(tensor) } else { Err(tensor) })
    }

    /// Copies `source` (contiguous, the region's shape) into `region` of the contiguous
    /// `destination` of `shape`; false (nothing written) when the buffer is shared.
    fn write<E: burn::tensor::Element + bytemuck::Pod, const D: usize>(
        destination: &mut FlexTensor,
        shape: &[usize; D],
        region: &[Range<usize>; D],
        source: &FlexTensor,
    ) -> bool {
        let Some(source) = source.as_slice::<E>() else {
            return false;
        };
        let Some(buffer) = destination.try_storage_mut::<E>() else {
            tracing::debug!(
                "flex_write: the destination's buffer is shared; Burn's slice_assign copies it whole"
            );
            return false;
        };
        if region.iter().any(|r| r.is_empty()) {
            return true;
        }
        let mut strides = [1usize; D];
        for d in (0..D - 1).rev() {
            strides[d] = strides[d + 1] * shape[d + 1];
        }
        let run = region[D - 1].len();
        // Walk the region's outer indices like an odometer; each step copies one innermost run.
        let mut index: [usize; D] = std::array::from_fn(|d| region[d].start);
        for chunk in source.chunks_exact(run) {
            let start: usize = index.iter().zip(&strides).map(|(i, s)| i * s).sum();
            buffer[start..start + run].copy_from_slice(chunk);
            for d in (0..D - 1).rev() {
                index[d] += 1;
                if index[d] < region[d].end {
                    break;
                }
                index[d] = region[d].start;
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Distribution, TensorData};

    type B = crate::backend::Cpu;

    #[test]
    fn writes_the_region_like_burn_does() {
        let device = Default::default();
        let base = Tensor::<B, 4>::random([3, 2, 5, 4], Distribution::Default, &device);
        let value = Tensor::<B, 4>::random([2, 1, 3, 4], Distribution::Default, &device);
        let region = [1..3, 1..2, 2..5, 0..4];
        let want = base
            .clone()
            .slice_assign(region.clone(), value.clone())
            .into_data();
        // A fresh copy, uniquely owned, so the in-place path applies on Flex.
        let fresh = Tensor::<B, 4>::from_data(base.clone().into_data(), &device);
        let got = slice_assign(fresh, region.clone(), value.clone()).unwrap();
        assert_eq!(got.into_data(), want);
        // A shared buffer falls back to Burn's copy and leaves the other handle untouched.
        let before = base.clone().into_data();
        let got = slice_assign(base.clone(), region.clone(), value.clone()).unwrap();
        assert_eq!(got.into_data(), want);
        assert_eq!(base.into_data(), before);
        // Partial inner runs and a non-contiguous value.
        let base = Tensor::<B, 2>::zeros([4, 6], &device);
        let value = Tensor::<B, 2>::from_data(
            TensorData::new(vec![1.0f32, 2.0, 3.0, 4.0], [2, 2]),
            &device,
        )
        .transpose();
        let got = slice_assign(base, [1..3, 2..4], value).unwrap();
        let got: Vec<f32> = got.into_data().to_vec().unwrap();
        assert_eq!(&got[6..12], &[0.0, 0.0, 1.0, 3.0, 0.0, 0.0]);
        assert_eq!(&got[12..18], &[0.0, 0.0, 2.0, 4.0, 0.0, 0.0]);
        assert_eq!(got.iter().filter(|&&v| v != 0.0).count(), 4);
    }
}
