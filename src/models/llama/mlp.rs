//! SwiGLU feed-forward block with a fused gate/up projection.

use burn::module::Module;
use burn::tensor::{Tensor, activation::silu, backend::Backend};

use super::fold;
use super::norm::RmsNorm;
use crate::projection::Projection;
use crate::{cpu_kernels, cube_kernels};

/// `down(silu(gate(x)) * up(x))`, gate and up computed by one matmul.
#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    /// `hidden` to `2 * intermediate` features, ordered gate | up.
    pub gate_up: Projection<B>,
    /// `intermediate` to `hidden` features.
    pub down: Projection<B>,
}

impl<B: Backend> Mlp<B> {
    /// # Shapes
    /// `[batch, T, hidden]` to `[batch, T, hidden]`
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let [batch, len, hidden] = x.dims();
        let gate_up = self.gate_up.forward(x.reshape([batch * len, hidden]));
        let activated = self.swiglu(gate_up);
        self.down.forward(activated).reshape([batch, len, hidden])
    }

    /// `silu(gate) * up` of a gate | up product: one kernel where the GPU or CPU kernels apply,
    /// Burn's ops otherwise.
    ///
    /// # Shapes
    /// `[rows, 2 * intermediate]` to `[rows, intermediate]`
    fn swiglu(&self, gate_up: Tensor<B, 2>) -> Tensor<B, 2> {
        let fused = cube_kernels::swiglu(&gate_up).or_else(|| cpu_kernels::swiglu(&gate_up));
        fused.unwrap_or_else(|| {
            let [rows, _] = gate_up.dims();
            let inter = self.down.inputs();
            let gate = gate_up.clone().slice([0..rows, 0..inter]);
            let up = gate_up.slice([0..rows, inter..2 * inter]);
            silu(gate).mul(up)
        })
    }

    /// The feed-forward half of a layer on the residual stream, `x + mlp(norm(x))`, with the norm
    /// and the SwiGLU folded into the gate/up product and the residual add into the down product
    /// where the GPU kernels take them (`super::fold`); Burn's ops for any part
    /// they decline. `norm` must have no weight of its own (the loader folds it into `gate_up`).
    ///
    /// # Shapes
    /// `[batch, T, hidden]` to `[batch, T, hidden]`
    pub fn forward_residual(&self, x: Tensor<B, 3>, norm: &RmsNorm<B>) -> Tensor<B, 3> {
        let [batch, len, hidden] = x.dims();
        let x = fold::rows(x);
        let activated = fold::normed_swiglu(&self.gate_up, &x, norm)
            .unwrap_or_else(|| self.swiglu(fold::normed_product(&self.gate_up, &x, norm)));
        fold::residual_product(&self.down, &activated, &x).reshape([batch, len, hidden])
    }
}
