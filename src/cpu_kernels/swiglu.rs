//! `silu(gate) · up` from the fused gate/up product, for the Flex CPU backend.
//!
//! Burn's ops would take the gate and up halves as strided column slices of `[rows, 2 · inter]`
//! and walk them element by element whenever there is more than one row (a verification tree).

use burn::tensor::{Tensor, TensorData, backend::Backend};

use crate::flex_tensor::{into_flex, is_flex};

/// See [`crate::cpu_kernels::swiglu`].
pub(crate) fn swiglu<B: Backend>(gate_up: &Tensor<B, 2>) -> Option<Tensor<B, 2>> {
    if !is_flex::<B>() {
        return None;
    }
    let [rows, width] = gate_up.dims();
    if !width.is_multiple_of(2) {
        return None;
    }
    let inter = width / 2;
    let device = gate_up.device();
    let flex = into_flex(gate_up.clone())?;
    let values = flex.as_slice::<f32>()?;
    let mut out = vec![0.0f32; rows * inter];
    for (row, out) in values.chunks_exact(width).zip(out.chunks_exact_mut(inter)) {
        let (gate, up) = row.split_at(inter);
        for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
            *o = g / (1.0 + (-g).exp()) * u;
        }
    }
    Some(Tensor::from_data(
        TensorData::new(out, [rows, inter]),
        &device,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Distribution, Tolerance, activation::silu};

    type B = burn::backend::Flex;

    #[test]
    fn equals_burns_silu_times_up() {
        let device = Default::default();
        let gate_up = Tensor::<B, 2>::random([5, 24], Distribution::Normal(0.0, 3.0), &device);
        let got = swiglu(&gate_up).expect("f32 on Flex");
        let gate = gate_up.clone().slice([0..5, 0..12]);
        let up = gate_up.slice([0..5, 12..24]);
        got.into_data()
            .assert_approx_eq::<f32>(&silu(gate).mul(up).into_data(), Tolerance::default());
    }
}
