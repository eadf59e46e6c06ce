//! RMSNorm.

use burn::module::{Module, Param};
use burn::tensor::{DType, Tensor, backend::Backend};

use crate::{cpu_kernels, cube_kernels};

/// Root-mean-square layer norm: `x / sqrt(mean(x²) + eps) * weight`.
///
/// The weight is optional: where a norm feeds a projection, the Llama loader multiplies the norm
/// weight into the projection's rows instead (`(x ⊙ w) W = x (diag(w) W)`), which saves one
/// element-wise kernel per norm — small models on GPUs are bound by kernel launches.
#[derive(Module, Debug)]
pub struct RmsNorm<B: Backend> {
    pub weight: Option<Param<Tensor<B, 1>>>,
    #[module(skip)]
    pub eps: f64,
}

impl<B: Backend> RmsNorm<B> {
    /// A norm with a learned scale.
    pub fn new(weight: Tensor<B, 1>, eps: f64) -> Self {
        Self {
            weight: Some(Param::from_tensor(weight)),
            eps,
        }
    }

    /// A norm whose scale was folded into the following projection.
    pub fn unweighted(eps: f64) -> Self {
        Self { weight: None, eps }
    }

    /// Half-precision inputs are normalised in f32 and cast back (as HF Transformers does): the
    /// residual stream of real models holds entries whose square overflows f16 (|x| > 256), which
    /// would turn the whole row into zeros.
    ///
    /// # Shapes
    /// `[..., hidden]` to `[..., hidden]`
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let weight = self.weight.as_ref().map(|w| w.val());
        if let Some(normalized) = cpu_kernels::rms_norm(&x, weight.as_ref(), self.eps) {
            return normalized;
        }
        let normalized = match cube_kernels::rms_norm(&x, self.eps) {
            Some(normalized) => normalized,
            None => self.normalize(x),
        };
        self.scale(normalized)
    }

    /// The residual add before a norm: returns `(x + delta, norm(x + delta))`, in one kernel on
    /// the GPU backends ([`cube_kernels::add_rms_norm`]).
    ///
    /// # Shapes
    /// `x`, `delta`: `[..., hidden]`; both results `[..., hidden]`
    pub fn add_forward<const D: usize>(
        &self,
        x: Tensor<B, D>,
        delta: Tensor<B, D>,
    ) -> (Tensor<B, D>, Tensor<B, D>) {
        if let Some((sum, normalized)) = cube_kernels::add_rms_norm(&x, &delta, self.eps) {
            return (sum, self.scale(normalized));
        }
        let weight = self.weight.as_ref().map(|w| w.val());
        if let Some(both) = cpu_kernels::add_rms_norm(&x, &delta, weight.as_ref(), self.eps) {
            return both;
        }
        let sum = x.add(delta);
        let normalized = self.forward(sum.clone());
        (sum, normalized)
    }

    /// The norm in Burn's ops.
    fn normalize<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        // `cast` returns the tensor itself when it already has the type (no kernel).
        let dtype = x.dtype();
        let x = x.cast(DType::F32);
        let rms = x
            .clone()
            .square()
            .mean_dim(D - 1)
            .add_scalar(self.eps)
            .sqrt();
        x.div(rms).cast(dtype)
    }

    fn scale<const D: usize>(&self, normalized: Tensor<B, D>) -> Tensor<B, D> {
        match &self.weight {
            Some(weight) => normalized.mul(weight.val().unsqueeze::<D>()),
            None => normalized,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{TensorData, Tolerance};

    type B = crate::backend::Cpu;

    #[test]
    fn folding_the_weight_into_a_projection_is_exact() {
        let device = Default::default();
        let x = Tensor::<B, 2>::from_data(
            TensorData::new(vec![0.5f32, -1.0, 2.0, 0.25, 3.0, -0.5], [2, 3]),
            &device,
        );
        let weight =
            Tensor::<B, 1>::from_data(TensorData::new(vec![0.5f32, 2.0, -1.5], [3]), &device);
        let projection = Tensor::<B, 2>::from_data(
            TensorData::new(vec![1.0f32, 0.0, -2.0, 0.5, 0.25, 3.0], [3, 2]),
            &device,
        );
        let weighted = RmsNorm::new(weight.clone(), 1e-5)
            .forward(x.clone())
            .matmul(projection.clone());
        let folded = RmsNorm::<B>::unweighted(1e-5)
            .forward(x)
            .matmul(projection.mul(weight.unsqueeze_dim(1)));
        weighted
            .into_data()
            .assert_approx_eq::<f32>(&folded.into_data(), Tolerance::default());
    }
}
