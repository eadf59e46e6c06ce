//! Dense projections stored in the layout each backend multiplies fastest ([`WeightLayout`]).
//!
//! A projection `y = x·W` with `x` of a few rows (one decoding step, or a draft tree of 4–70
//! tokens) is a short, wide product. The GPU backends take `W` as `[in, out]`: on CUDA and WGPU,
//! products of up to [`crate::cube_kernels::MATMUL_MAX_ROWS`] rows go to
//! [`crate::cube_kernels::matmul`], whose results do not depend on the row count (CubeCL's own
//! matmul rounds a one-token step and a verification tree differently). On the default CPU
//! backend (Flex) in f32 the weight is stored in panels of 16 outputs, `[out / 16][in][16]`, and
//! multiplied by [`crate::panel_matmul`] (register tiles of 8 rows × 32 outputs, every element
//! one chain of fused multiply-adds: 1.3–2.5× faster than the `[out, in]` kernel of
//! [`crate::skinny_matmul`] from 1 to 64 rows, docs/benchmarks.md, session 30). Elsewhere on Flex
//! (f16, or under `Autodiff`) it is `[out, in]`, for which `gemm` computes `W'·xᵀ` up to 2×
//! faster than `x·W` at 8–32 rows (docs/benchmarks.md "CPU: projection layout"). Weights are laid
//! out when a model is loaded, and [`Projection::forward`] picks the matching product.

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

/// How a [`Projection`] stores its weight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightLayout {
    /// `[in, out]`: the GPU backends, whose kernels read it so.
    InOut,
    /// `[out, in]`: Flex where the panel kernel does not apply (f16, or under `Autodiff`).
    OutIn,
    /// Panels of 16 outputs, `[⌈out / 16⌉ · in, 16]` ([`crate::panel_matmul`]): Flex in f32.
    Panels {
        /// The real output count (the last panel is padded with zeros).
        outputs: usize,
    },
}

/// A bias-free dense projection `x·W` of `in` to `out` features whose weight is laid out for the
/// backend it lives on ([`WeightLayout`]): panels on Flex in f32, `[out, in]` where
/// [`prefers_out_major`] says so otherwise, else `[in, out]`.
#[derive(Module, Debug)]
pub struct Projection<B: Backend> {
    /// The weight, in `layout`.
    pub weight: Param<Tensor<B, 2>>,
    /// Layout of `weight` (fixed at construction, not part of any checkpoint).
    #[module(skip)]
    pub layout: WeightLayout,
}

impl<B: Backend> Projection<B> {
    /// Builds the projection from a row-major `[inputs, outputs]` matrix (the `x·W` layout), laid
    /// out on the host for the device ([`WeightLayout`]), then cast to `dtype`.
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
    /// layout), laid out on the host for the device ([`WeightLayout`]), then cast to `dtype`.
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
        #[cfg(feature = "flex")]
        if takes_panels::<B>(dtype) {
            let weight = panel_tensor(&data, inputs, outputs, data_out_major, device);
            return Self::from_tensor(weight, WeightLayout::Panels { outputs });
        }
        let out_major = prefers_out_major::<B>(device);
        let data = match (data_out_major, out_major) {
            (false, true) => transpose(&data, inputs, outputs),
            (true, false) => transpose(&data, outputs, inputs),
            _ => data,
        };
        let (shape, layout) = if out_major {
            ([outputs, inputs], WeightLayout::OutIn)
        } else {
            ([inputs, outputs], WeightLayout::InOut)
        };
        let weight = Tensor::<B, 2>::from_data(TensorData::new(data, shape), device).cast(dtype);
        Self::from_tensor(weight, layout)
    }

    /// Builds the projection from a weight already on the device, given `[out, in]`: kept so
    /// where [`prefers_out_major`] says so (re-laid in panels on Flex in f32, through the host),
    /// transposed to `[in, out]` elsewhere.
    pub fn from_out_in_tensor(weight: Tensor<B, 2>) -> Self {
        #[cfg(feature = "flex")]
        if takes_panels::<B>(weight.dtype()) {
            let [outputs, inputs] = weight.dims();
            let device = weight.device();
            let values: Vec<f32> = weight.into_data().iter::<f32>().collect();
            return Self::from_out_in(values, inputs, outputs, DType::F32, &device);
        }
        if prefers_out_major::<B>(&weight.device()) {
            Self::from_tensor(weight, WeightLayout::OutIn)
        } else {
            Self::from_tensor(weight.transpose(), WeightLayout::InOut)
        }
    }

    /// Wraps a weight already on the device, stored in `layout`.
    pub fn from_tensor(weight: Tensor<B, 2>, layout: WeightLayout) -> Self {
        Self {
            weight: Param::from_tensor(weight),
            layout,
        }
    }

    /// Number of input features.
    pub fn inputs(&self) -> usize {
        let [rows, cols] = self.weight.dims();
        match self.layout {
            WeightLayout::InOut => rows,
            WeightLayout::OutIn => cols,
            WeightLayout::Panels { outputs } => rows / outputs.div_ceil(PANEL).max(1),
        }
    }

    /// Number of output features.
    pub fn outputs(&self) -> usize {
        let [rows, cols] = self.weight.dims();
        match self.layout {
            WeightLayout::InOut => cols,
            WeightLayout::OutIn => rows,
            WeightLayout::Panels { outputs } => outputs,
        }
    }

    /// Whether the weight is stored with outputs first (`[out, in]` or panels): the layouts of
    /// the CPU, which the GPU kernels do not read.
    pub fn out_major(&self) -> bool {
        self.layout != WeightLayout::InOut
    }

    /// The weight as `[out, in]`: a transposed view when stored `[in, out]`, a copy unpacked on
    /// the host when stored in panels.
    pub fn out_in(&self) -> Tensor<B, 2> {
        match self.layout {
            WeightLayout::OutIn => self.weight.val(),
            WeightLayout::InOut => self.weight.val().transpose(),
            WeightLayout::Panels { outputs } => {
                let inputs = self.inputs();
                let weight = self.weight.val();
                let device = weight.device();
                let panels: Vec<f32> = weight.into_data().iter::<f32>().collect();
                let weight = unpack_out_in(&panels, outputs, inputs);
                Tensor::from_data(TensorData::new(weight, [outputs, inputs]), &device)
            }
        }
    }

    /// `x·W`.
    ///
    /// # Shapes
    /// `[..., in]` to `[..., out]`
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let mut shape = x.dims();
        let inputs = shape[D - 1];
        let rows = shape[..D - 1].iter().product::<usize>();
        shape[D - 1] = self.outputs();
        let x = x.reshape([rows, inputs]);
        let y = match self.layout {
            WeightLayout::OutIn => return matmul_out_major(x, self.weight.val()).reshape(shape),
            WeightLayout::Panels { outputs } => {
                #[cfg(feature = "flex")]
                if let Some(y) =
                    crate::panel_matmul::try_panel_matmul(&x, &self.weight.val(), outputs)
                {
                    return y.reshape(shape);
                }
                // Only inputs of another float type than the weight's get here.
                let _ = outputs;
                matmul_out_major(x, self.out_in())
            }
            WeightLayout::InOut => {
                let weight = self.weight.val();
                match crate::cube_kernels::matmul(&x, &weight) {
                    Some(y) => y,
                    None => x.matmul(weight),
                }
            }
        };
        y.reshape(shape)
    }

    /// `x·W` with a layer's neighbouring operations folded into the product, one launch on the
    /// GPU backends ([`crate::cube_kernels::fused_matmul`]); `None` where that does not apply (a
    /// CPU layout, another backend, too many rows): compose the operations instead.
    ///
    /// # Shapes
    /// `x`: `[rows, in]` to `[rows, out]` (`[rows, out / 2]` with `folds.swiglu`)
    pub fn fused_forward(
        &self,
        x: &Tensor<B, 2>,
        folds: crate::cube_kernels::ProductFolds<'_, B>,
    ) -> Option<Tensor<B, 2>> {
        if self.layout != WeightLayout::InOut {
            return None;
        }
        crate::cube_kernels::fused_matmul(x, &self.weight.val(), folds)
    }
}

/// Whether a weight of `dtype` on backend `B` is stored in panels: Flex itself (not under
/// `Autodiff`, which must record every op) in f32, where [`crate::panel_matmul`] multiplies.
#[cfg(feature = "flex")]
fn takes_panels<B: Backend>(dtype: DType) -> bool {
    crate::flex_tensor::is_flex::<B>() && dtype == DType::F32
}

/// Outputs per panel of [`WeightLayout::Panels`]: one AVX-512 vector, two AVX2 vectors.
pub const PANEL: usize = 16;

/// Floats in the panel layout of a weight with `outputs × inputs` elements (the last panel is
/// padded with zeros to 16 outputs).
pub fn panel_len(outputs: usize, inputs: usize) -> usize {
    outputs.div_ceil(PANEL) * inputs * PANEL
}

/// The panels of a row-major weight, `[outputs, inputs]` when `out_major` (HF's `nn.Linear`
/// layout, a table of token rows), else `[inputs, outputs]` (the `x·W` layout), as an f32 tensor
/// `[⌈outputs / 16⌉ · inputs, 16]` on `device`.
pub(crate) fn panel_tensor<B: Backend>(
    weight: &[f32],
    inputs: usize,
    outputs: usize,
    out_major: bool,
    device: &B::Device,
) -> Tensor<B, 2> {
    let panels = if out_major {
        pack_out_in(weight, outputs, inputs)
    } else {
        pack_in_out(weight, inputs, outputs)
    };
    let shape = [outputs.div_ceil(PANEL) * inputs, PANEL];
    Tensor::from_data(TensorData::new(panels, shape), device)
}

/// The panel layout of a row-major `[outputs, inputs]` weight (HF's `nn.Linear` layout).
pub fn pack_out_in(weight: &[f32], outputs: usize, inputs: usize) -> Vec<f32> {
    debug_assert_eq!(weight.len(), outputs * inputs);
    let mut panels = vec![0.0f32; panel_len(outputs, inputs)];
    pack_rows_into(weight.chunks_exact(inputs), inputs, &mut panels);
    panels
}

/// Writes output rows of `inputs` floats each (row `o` is output `o`) into a panel buffer of
/// [`panel_len`] floats, leaving the last panel's padding lanes as they are (zero in a fresh
/// buffer) — also the CPU attention's keys, whose rows are strided views of the KV cache.
pub(crate) fn pack_rows_into<'a>(
    rows: impl IntoIterator<Item = &'a [f32]>,
    inputs: usize,
    panels: &mut [f32],
) {
    for (o, row) in rows.into_iter().enumerate() {
        let (panel, lane) = (o / PANEL, o % PANEL);
        let base = panel * inputs * PANEL + lane;
        for (k, &w) in row.iter().enumerate() {
            panels[base + k * PANEL] = w;
        }
    }
}

/// The panel layout of a row-major `[inputs, outputs]` weight (the `x·W` layout).
pub fn pack_in_out(weight: &[f32], inputs: usize, outputs: usize) -> Vec<f32> {
    debug_assert_eq!(weight.len(), outputs * inputs);
    let mut panels = vec![0.0f32; panel_len(outputs, inputs)];
    for (k, row) in weight.chunks_exact(outputs).enumerate() {
        for (panel, lanes) in row.chunks(PANEL).enumerate() {
            let at = (panel * inputs + k) * PANEL;
            panels[at..at + lanes.len()].copy_from_slice(lanes);
        }
    }
    panels
}

/// The row-major `[outputs, inputs]` weight back from its panels.
pub fn unpack_out_in(panels: &[f32], outputs: usize, inputs: usize) -> Vec<f32> {
    debug_assert_eq!(panels.len(), panel_len(outputs, inputs));
    let mut weight = vec![0.0f32; outputs * inputs];
    for (o, row) in weight.chunks_exact_mut(inputs).enumerate() {
        let (panel, lane) = (o / PANEL, o % PANEL);
        let base = panel * inputs * PANEL + lane;
        for (k, w) in row.iter_mut().enumerate() {
            *w = panels[base + k * PANEL];
        }
    }
    weight
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Distribution, Tolerance};

    type B = crate::backend::Cpu;

    #[test]
    fn every_layout_computes_the_same_product() {
        let device = Default::default();
        let (inputs, outputs) = (7, 21);
        let w = Tensor::<B, 2>::random([inputs, outputs], Distribution::Default, &device);
        let data: Vec<f32> = w.clone().into_data().to_vec().unwrap();
        let x = Tensor::<B, 3>::random([2, 3, inputs], Distribution::Default, &device);
        let want = x.clone().reshape([6, inputs]).matmul(w.clone());

        let auto = Projection::<B>::from_in_out(data.clone(), inputs, outputs, DType::F32, &device);
        assert_eq!(auto.out_major(), prefers_out_major::<B>(&device));
        if crate::flex_tensor::is_flex::<B>() {
            assert_eq!(auto.layout, WeightLayout::Panels { outputs });
        }
        let from_hf = transpose(&data, inputs, outputs);
        let hf = Projection::<B>::from_out_in(from_hf, inputs, outputs, DType::F32, &device);
        let in_out = Projection::<B>::from_tensor(w.clone(), WeightLayout::InOut);
        let out_in = Projection::<B>::from_tensor(w.clone().transpose(), WeightLayout::OutIn);
        let from_device = Projection::<B>::from_out_in_tensor(w.clone().transpose());
        assert_eq!(from_device.layout, auto.layout);
        for p in [&auto, &hf, &in_out, &out_in, &from_device] {
            assert_eq!(
                (p.inputs(), p.outputs()),
                (inputs, outputs),
                "{:?}",
                p.layout
            );
            let got = p.forward(x.clone()).reshape([6, outputs]);
            got.into_data()
                .assert_approx_eq::<f32>(&want.clone().into_data(), Tolerance::default());
            let rows = p.forward(x.clone().reshape([6, inputs]));
            rows.into_data()
                .assert_approx_eq::<f32>(&want.clone().into_data(), Tolerance::default());
            // The weight comes back exactly as given, whatever the layout.
            let back: Vec<f32> = p.out_in().transpose().into_data().to_vec().unwrap();
            assert_eq!(back, data, "{:?}", p.layout);
        }
        // In f16 the weight stays `[out, in]` (no panels), still the same product.
        let half = Projection::<B>::from_in_out(data, inputs, outputs, DType::F16, &device);
        assert_ne!(half.layout, WeightLayout::Panels { outputs });
        half.forward(x.reshape([6, inputs]).cast(DType::F16))
            .cast(DType::F32)
            .into_data()
            .assert_approx_eq::<f32>(&want.into_data(), Tolerance::rel_abs(1e-2, 1e-2));
    }
}
