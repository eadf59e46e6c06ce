//! RMSNorm, and the residual add before it, for the Flex CPU backend, one pass per row.
//!
//! Burn's ops take five to seven kernels a norm (square, mean, add, root, a broadcast division
//! walked element by element through a strided iterator, the scale, the residual add), each with
//! its own allocation; a Llama forward runs 61 norms. Here a row's sum of squares is kept in 16
//! partial sums added in a fixed order, so a row's result does not depend on how many rows are
//! normalised with it.

use burn::backend::flex::FlexTensor;
use burn::tensor::{Tensor, TensorData, backend::Backend};

use crate::flex_tensor::{into_contiguous_flex, is_flex};

/// Partial sums of a row's squares.
const LANES: usize = 16;

/// See [`crate::cpu_kernels::rms_norm`].
pub(crate) fn rms_norm<B: Backend, const D: usize>(
    x: &Tensor<B, D>,
    weight: Option<&Tensor<B, 1>>,
    eps: f64,
) -> Option<Tensor<B, D>> {
    let (rows, width) = flex_rows(x)?;
    let scale = flex_scale(weight, width)?;
    let out = normalize_rows(rows.as_slice::<f32>()?, width, scale_values(&scale)?, eps);
    Some(Tensor::from_data(
        TensorData::new(out, x.dims()),
        &x.device(),
    ))
}

/// See [`crate::cpu_kernels::add_rms_norm`].
pub(crate) fn add_rms_norm<B: Backend, const D: usize>(
    x: &Tensor<B, D>,
    delta: &Tensor<B, D>,
    weight: Option<&Tensor<B, 1>>,
    eps: f64,
) -> Option<(Tensor<B, D>, Tensor<B, D>)> {
    if x.dims() != delta.dims() {
        return None;
    }
    let (rows, width) = flex_rows(x)?;
    let (deltas, _) = flex_rows(delta)?;
    let scale = flex_scale(weight, width)?;
    let sum: Vec<f32> = (rows.as_slice::<f32>()?.iter())
        .zip(deltas.as_slice::<f32>()?)
        .map(|(a, b)| a + b)
        .collect();
    let out = normalize_rows(&sum, width, scale_values(&scale)?, eps);
    let device = x.device();
    Some((
        Tensor::from_data(TensorData::new(sum, x.dims()), &device),
        Tensor::from_data(TensorData::new(out, x.dims()), &device),
    ))
}

/// The tensor's buffer in row-major order (read in place unless it is a strided view) and its
/// last dimension; `None` unless f32 on Flex.
fn flex_rows<B: Backend, const D: usize>(x: &Tensor<B, D>) -> Option<(FlexTensor, usize)> {
    if !is_flex::<B>() {
        return None;
    }
    let width = x.dims()[D - 1];
    if width == 0 {
        return None;
    }
    Some((into_contiguous_flex(x.clone())?, width))
}

/// The scale's buffer, `Some(None)` without one; `None` (decline) if it does not fit the rows.
fn flex_scale<B: Backend>(
    weight: Option<&Tensor<B, 1>>,
    width: usize,
) -> Option<Option<FlexTensor>> {
    match weight {
        None => Some(None),
        Some(weight) if weight.dims() == [width] => Some(Some(flex_rows(weight)?.0)),
        Some(_) => None,
    }
}

/// The scale's values, `Some(None)` without one.
fn scale_values(scale: &Option<FlexTensor>) -> Option<Option<&[f32]>> {
    match scale {
        Some(scale) => Some(Some(scale.as_slice::<f32>()?)),
        None => Some(None),
    }
}

/// [`normalize_row`] over every row of `values` (`width` floats each).
fn normalize_rows(values: &[f32], width: usize, weight: Option<&[f32]>, eps: f64) -> Vec<f32> {
    let mut out = vec![0.0f32; values.len()];
    for (row, out) in values.chunks_exact(width).zip(out.chunks_exact_mut(width)) {
        normalize_row(row, weight, eps as f32, out);
    }
    out
}

/// `out = row / sqrt(mean(row²) + eps) [· weight]`.
fn normalize_row(row: &[f32], weight: Option<&[f32]>, eps: f32, out: &mut [f32]) {
    let mut acc = [0.0f32; LANES];
    let (body, tail) = row.as_chunks::<LANES>();
    for chunk in body {
        acc = std::array::from_fn(|l| acc[l] + chunk[l] * chunk[l]);
    }
    let mut width = LANES;
    while width > 1 {
        width /= 2;
        for l in 0..width {
            acc[l] += acc[l + width];
        }
    }
    let squares = acc[0] + tail.iter().map(|x| x * x).sum::<f32>();
    let rms = (squares / row.len() as f32 + eps).sqrt();
    match weight {
        Some(weight) => {
            for ((o, &x), &w) in out.iter_mut().zip(row).zip(weight) {
                *o = x / rms * w;
            }
        }
        None => {
            for (o, &x) in out.iter_mut().zip(row) {
                *o = x / rms;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Distribution, Tolerance};

    type B = burn::backend::Flex;

    fn reference(x: Tensor<B, 3>, weight: Option<Tensor<B, 1>>, eps: f64) -> Tensor<B, 3> {
        let rms = x.clone().square().mean_dim(2).add_scalar(eps).sqrt();
        let normalized = x.div(rms);
        match weight {
            Some(w) => normalized.mul(w.unsqueeze::<3>()),
            None => normalized,
        }
    }

    #[test]
    fn equals_burns_ops_with_and_without_a_scale_and_a_residual() {
        let device = Default::default();
        let x = Tensor::<B, 3>::random([2, 5, 37], Distribution::Normal(0.0, 3.0), &device);
        let delta = Tensor::<B, 3>::random([2, 5, 37], Distribution::Default, &device);
        let weight = Tensor::<B, 1>::random([37], Distribution::Default, &device);
        for weight in [None, Some(weight)] {
            let got = rms_norm(&x, weight.as_ref(), 1e-5).expect("f32 on Flex");
            let want = reference(x.clone(), weight.clone(), 1e-5);
            got.into_data()
                .assert_approx_eq::<f32>(&want.into_data(), Tolerance::default());
            let (sum, normed) = add_rms_norm(&x, &delta, weight.as_ref(), 1e-5).unwrap();
            let want_sum = x.clone() + delta.clone();
            sum.into_data()
                .assert_approx_eq::<f32>(&want_sum.clone().into_data(), Tolerance::default());
            normed.into_data().assert_approx_eq::<f32>(
                &reference(want_sum, weight, 1e-5).into_data(),
                Tolerance::default(),
            );
        }
    }

    #[test]
    fn a_row_gets_the_same_bits_alone_or_with_others_and_bad_input_is_declined() {
        let device = Default::default();
        let x = Tensor::<B, 2>::random([7, 576], Distribution::Default, &device);
        let all: Vec<f32> = rms_norm(&x, None, 1e-5)
            .unwrap()
            .into_data()
            .to_vec()
            .unwrap();
        let row = x.clone().slice([3..4, 0..576]);
        let alone: Vec<f32> = rms_norm(&row, None, 1e-5)
            .unwrap()
            .into_data()
            .to_vec()
            .unwrap();
        assert_eq!(alone, all[3 * 576..4 * 576]);
        let wrong_scale = Tensor::<B, 1>::ones([5], &device);
        assert!(rms_norm(&x, Some(&wrong_scale), 1e-5).is_none());
        assert!(rms_norm(&x.clone().cast(burn::tensor::DType::F16), None, 1e-5).is_none());
        let other = Tensor::<B, 2>::zeros([6, 576], &device);
        assert!(add_rms_norm(&x, &other, None, 1e-5).is_none());
    }
}
