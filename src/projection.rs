//! Dense projections stored in the orientation each backend multiplies fastest.
//!
//! A projection `y = x·W` with `x` of a few rows (one decoding step, or a draft tree of 4–70
//! tokens) is a short, wide product. The GPU backends take `W` as `[in, out]`, as they always
//! did here, but the `gemm` kernels behind the default CPU backend (Flex) are up to 2× faster for
//! about 8–32 rows when they compute `W'·xᵀ` with `W' = Wᵀ` stored contiguously as `[out, in]`
//! (SmolLM2's shapes on the 2-core development machine: `cargo bench --bench round --
//! projection`, docs/benchmarks.md "CPU: projection layout"; mixed at 4 and 64 rows, equal at
//! one). End to end a 5-token verification runs 1.5× faster. So weights are laid out per backend
//! when a model is loaded, and [`Projection::forward`] picks the matching product. On Flex in f32,
//! [`matmul_out_major`] hands products of up to 64 rows to [`crate::skinny_matmul`], which beats
//! `gemm` there by streaming the weight once. On CUDA and WGPU, products of up to
//! [`crate::cube_kernels::MATMUL_MAX_ROWS`] rows go to [`crate::cube_kernels::matmul`], whose
//! results do not depend on the row count (CubeCL's own matmul rounds a one-token step and a
//! verification tree differently).

use burn::module::{Module, Param};
use burn::tensor::{DType, Tensor, TensorData, backend::Backend};

/// The transpose of a row-major `[rows, cols]` matrix, row-major `[cols, rows]`.
pub(crate) fn transpose(data: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; data.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = data[r * cols + c];
        }
    }
    out
}

/// Whether backend `B` multiplies a few rows faster against an `[out, in]` weight (`W'·xᵀ`)
/// than against `[in, out]` (`x·W`): true for Flex (also under `Autodiff`), where it was
/// measured; every other backend keeps `[in, out]`.
pub fn prefers_out_major<B: Backend>(device: &B::Device) -> bool {
    B::name(device).contains("flex")
}

/// `x · weightᵀ` for a weight stored `[out, in]`, computed as `(weight · xᵀ)ᵀ` — the fast form
/// on Flex (see the module docs).
///
/// # Shapes
/// `x`: `[..., in]`, `weight`: `[out, in]` to `[..., out]`
pub fn matmul_out_major<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    weight: Tensor<B, 2>,
) -> Tensor<B, D> {
    let mut shape = x.dims();
    let inputs = shape[D - 1];
    let rows = shape[..D - 1].iter().product::<usize>();
    shape[D - 1] = weight.dims()[0];
    let x = x.reshape([rows, inputs]);
    #[cfg(feature = "flex")]
    if let Some(y) = crate::skinny_matmul::try_skinny_matmul(&x, &weight) {
        return y.reshape(shape);
    }
    weight.matmul(x.transpose()).transpose().reshape(shape)
}

/// A bias-free dense projection `x·W` of `in` to `out` features whose weight is laid out for the
/// backend it lives on: `[out, in]` where [`prefers_out_major`] says so, else `[in, out]`.
#[derive(Module, Debug)]
pub struct Projection<B: Backend> {
    /// `[in, out]`, or `[out, in]` when `out_major`.
    pub weight: Param<Tensor<B, 2>>,
    /// Layout of `weight` (fixed at construction, not part of any checkpoint).
    #[module(skip)]
    pub out_major: bool,
}

impl<B: Backend> Projection<B> {
    /// Builds the projection from a row-major `[inputs, outputs]` matrix (the `x·W` layout),
    /// transposed on the host if the device prefers `[out, in]`, then cast to `dtype`.
    pub fn from_in_out(
        data: Vec<f32>,
        inputs: usize,
        outputs: usize,
        dtype: DType,
        device: &B::Device,
    ) -> Self {
        Self::from_host(data, inputs, outputs, false, dtype, device)
    }

    /// Builds the projection from a row-major `[outputs, inputs]` matrix (HF's `nn.Linear`
    /// layout), transposed on the host if the device prefers `[in, out]`, then cast to `dtype`.
    pub fn from_out_in(
        data: Vec<f32>,
        inputs: usize,
        outputs: usize,
        dtype: DType,
        device: &B::Device,
    ) -> Self {
        Self::from_host(data, inputs, outputs, true, dtype, device)
    }

    fn from_host(
        data: Vec<f32>,
        inputs: usize,
        outputs: usize,
        data_out_major: bool,
        dtype: DType,
        device: &B::Device,
    ) -> Self {
        let out_major = prefers_out_major::<B>(device);
        let data = match (data_out_major, out_major) {
            (false, true) => transpose(&data, inputs, outputs),
            (true, false) => transpose(&data, outputs, inputs),
            _ => data,
        };
        let shape = if out_major {
            [outputs, inputs]
        } else {
            [inputs, outputs]
        };
        let weight = Tensor::<B, 2>::from_data(TensorData::new(data, shape), device).cast(dtype);
        Self::from_tensor(weight, out_major)
    }

    /// Wraps a weight already on the device: `[in, out]`, or `[out, in]` when `out_major`.
    pub fn from_tensor(weight: Tensor<B, 2>, out_major: bool) -> Self {
        Self {
            weight: Param::from_tensor(weight),
            out_major,
        }
    }

    /// Number of input features.
    pub fn inputs(&self) -> usize {
        self.weight.dims()[usize::from(self.out_major)]
    }

    /// Number of output features.
    pub fn outputs(&self) -> usize {
        self.weight.dims()[usize::from(!self.out_major)]
    }

    /// The weight as `[out, in]` (a transposed view when stored `[in, out]`).
    pub fn out_in(&self) -> Tensor<B, 2> {
        if self.out_major {
            self.weight.val()
        } else {
            self.weight.val().transpose()
        }
    }

    /// `x·W`.
    ///
    /// # Shapes
    /// `[..., in]` to `[..., out]`
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        if self.out_major {
            matmul_out_major(x, self.weight.val())
        } else {
            let mut shape = x.dims();
            let inputs = shape[D - 1];
            let rows = shape[..D - 1].iter().product::<usize>();
            shape[D - 1] = self.outputs();
            let x = x.reshape([rows, inputs]);
            let weight = self.weight.val();
            match crate::cube_kernels::matmul(&x, &weight) {
                Some(y) => y.reshape(shape),
                None => x.matmul(weight).reshape(shape),
            }
        }
    }

    /// `x·W` with a layer's neighbouring operations folded into the product, one launch on the
    /// GPU backends ([`crate::cube_kernels::fused_matmul`]); `None` where that does not apply (an
    /// `[out, in]` weight, another backend, too many rows): compose the operations instead.
    ///
    /// # Shapes
    /// `x`: `[rows, in]` to `[rows, out]` (`[rows, out / 2]` with `folds.swiglu`)
    pub fn fused_forward(
        &self,
        x: &Tensor<B, 2>,
        folds: crate::cube_kernels::ProductFolds<'_, B>,
    ) -> Option<Tensor<B, 2>> {
        if self.out_major {
            return None;
        }
        crate::cube_kernels::fused_matmul(x, &self.weight.val(), folds)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Distribution, Tolerance};

    type B = crate::backend::Cpu;

    #[test]
    fn both_layouts_compute_the_same_product() {
        let device = Default::default();
        let (inputs, outputs) = (7, 5);
        let w = Tensor::<B, 2>::random([inputs, outputs], Distribution::Default, &device);
        let data: Vec<f32> = w.clone().into_data().to_vec().unwrap();
        let x = Tensor::<B, 3>::random([2, 3, inputs], Distribution::Default, &device);
        let want = x.clone().reshape([6, inputs]).matmul(w.clone());

        let auto = Projection::<B>::from_in_out(data.clone(), inputs, outputs, DType::F32, &device);
        assert_eq!(auto.out_major, prefers_out_major::<B>(&device));
        let from_hf = transpose(&data, inputs, outputs);
        let hf = Projection::<B>::from_out_in(from_hf, inputs, outputs, DType::F32, &device);
        let in_out = Projection::<B>::from_tensor(w.clone(), false);
        let out_in = Projection::<B>::from_tensor(w.transpose(), true);
        for p in [&auto, &hf, &in_out, &out_in] {
            assert_eq!((p.inputs(), p.outputs()), (inputs, outputs));
            let got = p.forward(x.clone()).reshape([6, outputs]);
            got.into_data()
                .assert_approx_eq::<f32>(&want.clone().into_data(), Tolerance::default());
            let rows = p.forward(x.clone().reshape([6, inputs]));
            rows.into_data()
                .assert_approx_eq::<f32>(&want.clone().into_data(), Tolerance::default());
        }
        out_in
            .out_in()
            .into_data()
            .assert_approx_eq::<f32>(&in_out.out_in().into_data(), Tolerance::default());
    }
}
