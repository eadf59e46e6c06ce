//! RMSNorm.

use burn::module::{Module, Param};
use burn::tensor::{Tensor, backend::Backend};

/// Root-mean-square layer norm: `x / sqrt(mean(x²) + eps) * weight`.
#[derive(Module, Debug)]
pub struct RmsNorm<B: Backend> {
    pub weight: Param<Tensor<B, 1>>,
    #[module(skip)]
    pub eps: f64,
}

impl<B: Backend> RmsNorm<B> {
    /// Wraps a loaded weight vector.
    pub fn new(weight: Tensor<B, 1>, eps: f64) -> Self {
        Self {
            weight: Param::from_tensor(weight),
            eps,
        }
    }

    /// # Shapes
    /// `[..., hidden]` to `[..., hidden]`
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let rms = x
            .clone()
            .square()
            .mean_dim(D - 1)
            .add_scalar(self.eps)
            .sqrt();
        let weight = self.weight.val().unsqueeze::<D>();
        x.div(rms).mul(weight)
    }
}
