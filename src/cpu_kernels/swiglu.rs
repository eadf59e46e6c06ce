//! `silu(gate) · up` from the fused gate/up product, for the Flex CPU backend.
//!
//! Burn's ops would take the gate and up halves as strided column slices of `[rows, 2 · inter]`
//! and walk them element by element whenever there is more than one row (a verification tree).

use burn::tensor::{Tensor, TensorData, backend::Backend};

use super::exp::exp;
use crate::cpu_simd::Simd;
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
    let simd = Simd::detect();
    for (row, out) in values.chunks_exact(width).zip(out.chunks_exact_mut(inter)) {
        let (gate, up) = row.split_at(inter);
        match simd {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Simd` names AVX-512 only where the CPU has AVX-512F.
            Simd::Avx512 => unsafe { swiglu_row_avx512(gate, up, out) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Simd` names AVX2 only where the CPU has AVX2 and FMA.
            Simd::Avx2 => unsafe { swiglu_row_avx2(gate, up, out) },
            Simd::Portable => swiglu_row(gate, up, out),
        }
    }
    Some(Tensor::from_data(
        TensorData::new(out, [rows, inter]),
        &device,
    ))
}

/// [`swiglu_row`] compiled with more instruction-set features enabled.
macro_rules! swiglu_row_for {
    ($name:ident, $features:literal) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $features)]
        fn $name(gate: &[f32], up: &[f32], out: &mut [f32]) {
            swiglu_row(gate, up, out)
        }
    };
}

swiglu_row_for!(swiglu_row_avx512, "avx512f,avx2,fma");
swiglu_row_for!(swiglu_row_avx2, "avx2,fma");

/// `out = silu(gate) · up`, element by element (the same bits whatever the instruction set: see
/// [`super::exp`]).
#[inline(always)]
fn swiglu_row(gate: &[f32], up: &[f32], out: &mut [f32]) {
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = g / (1.0 + exp(-g)) * u;
    }
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

    /// Every instruction set's loop gives the same bits, and extreme gates give SiLU's limits.
    #[test]
    fn every_instruction_set_gives_the_same_bits() {
        let mut gate: Vec<f32> = (0..403).map(|i| (i as f32 - 200.0) * 0.37).collect();
        gate.extend([-1.0e9, 1.0e9, -100.0, 100.0, 0.0]);
        let up: Vec<f32> = (0..gate.len()).map(|i| 1.0 + i as f32 * 0.01).collect();
        let run = |simd| {
            let mut out = vec![0.0f32; gate.len()];
            match simd {
                #[cfg(target_arch = "x86_64")]
                Simd::Avx512 => unsafe { swiglu_row_avx512(&gate, &up, &mut out) },
                #[cfg(target_arch = "x86_64")]
                Simd::Avx2 => unsafe { swiglu_row_avx2(&gate, &up, &mut out) },
                Simd::Portable => swiglu_row(&gate, &up, &mut out),
            }
            out
        };
        let portable = run(Simd::Portable);
        for simd in Simd::available() {
            let got = run(simd);
            let same = got
                .iter()
                .zip(&portable)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "{simd:?}");
        }
        let n = portable.len();
        // silu(-1e9) = -0 (exp overflows), silu(1e9) = 1e9, silu(0) = 0.
        assert_eq!(portable[n - 5], 0.0);
        assert_eq!(portable[n - 4], 1.0e9 * up[n - 4]);
        assert_eq!(portable[n - 1], 0.0);
    }
}
