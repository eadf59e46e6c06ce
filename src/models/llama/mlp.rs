//! SwiGLU feed-forward block with a fused gate/up projection.

use burn::module::{Module, Param};
use burn::tensor::{Tensor, activation::silu, backend::Backend};

/// `down(silu(gate(x)) * up(x))`, gate and up computed by one matmul.
#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    /// `[hidden, 2 * intermediate]`, columns ordered gate | up.
    pub gate_up: Param<Tensor<B, 2>>,
    /// `[intermediate, hidden]`
    pub down: Param<Tensor<B, 2>>,
}

impl<B: Backend> Mlp<B> {
    /// # Shapes
    /// `[batch, T, hidden]` to `[batch, T, hidden]`
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let [batch, len, hidden] = x.dims();
        let inter = self.down.dims()[0];
        let gate_up = x.reshape([batch * len, hidden]).matmul(self.gate_up.val());
        let gate = gate_up.clone().slice([0..batch * len, 0..inter]);
        let up = gate_up.slice([0..batch * len, inter..2 * inter]);
        silu(gate)
            .mul(up)
            .matmul(self.down.val())
            .reshape([batch, len, hidden])
    }
}
