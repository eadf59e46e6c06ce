//! Rotary position embedding (rotate-half convention, as in HF Llama) at explicit positions.

use burn::module::Module;
use burn::tensor::{Int, Tensor, TensorData, backend::Backend};

use super::config::{Llama3RopeScaling, LlamaConfig};

/// Precomputed cos/sin tables for every position up to the model's context.
///
/// Positions are explicit per token, not implied by slot order: tokens of a draft tree at the
/// same depth share a position.
///
/// The tables are stored over the whole head dimension, `cos` as `[cos, cos]` and `sin` with the
/// rotate-half sign folded in, `[-sin, sin]`, so that rotating is
/// `x ⊙ cos + rotate_half(x) ⊙ sin` with `rotate_half` a single gather: four kernels per
/// rotation instead of eight (slice-wise products and a concatenation).
#[derive(Module, Debug)]
pub struct RotaryEmbedding<B: Backend> {
    /// `[max_positions, head_dim]`
    cos: Tensor<B, 2>,
    /// `[max_positions, head_dim]`
    sin: Tensor<B, 2>,
    /// `[head_dim]`: `half..dim` followed by `0..half`.
    rotate_half: Tensor<B, 1, Int>,
    #[module(skip)]
    head_dim: usize,
}

/// The rotation of one forward's tokens, shared by every layer.
#[derive(Debug, Clone)]
pub struct RopeAngles<B: Backend> {
    /// `[batch, 1, T, head_dim]`
    pub cos: Tensor<B, 4>,
    /// `[batch, 1, T, head_dim]`, signed for rotate-half.
    pub sin: Tensor<B, 4>,
    /// `[head_dim]`
    pub rotate_half: Tensor<B, 1, Int>,
}

/// The inverse frequencies, with Llama-3 scaling when configured.
pub fn inverse_frequencies(config: &LlamaConfig) -> Vec<f64> {
    let dim = config.head_dim();
    let base: Vec<f64> = (0..dim / 2)
        .map(|i| 1.0 / config.rope_theta.powf((2 * i) as f64 / dim as f64))
        .collect();
    match &config.rope_scaling {
        None => base,
        Some(scaling) => base.into_iter().map(|f| llama3_scale(f, scaling)).collect(),
    }
}

fn llama3_scale(freq: f64, s: &Llama3RopeScaling) -> f64 {
    let old_len = s.original_max_position_embeddings as f64;
    let low_wavelen = old_len / s.low_freq_factor;
    let high_wavelen = old_len / s.high_freq_factor;
    let wavelen = 2.0 * std::f64::consts::PI / freq;
    if wavelen < high_wavelen {
        freq
    } else if wavelen > low_wavelen {
        freq / s.factor
    } else {
        let smooth =
            (old_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
        (1.0 - smooth) * freq / s.factor + smooth * freq
    }
}

impl<B: Backend> RotaryEmbedding<B> {
    /// Builds tables for positions `0..max_positions`.
    pub fn new(config: &LlamaConfig, max_positions: usize, device: &B::Device) -> Self {
        let inv = inverse_frequencies(config);
        let half_dim = inv.len();
        let head_dim = 2 * half_dim;
        let mut cos = Vec::with_capacity(max_positions * head_dim);
        let mut sin = Vec::with_capacity(max_positions * head_dim);
        for pos in 0..max_positions {
            // Angles in f64 so that large positions keep full f32 accuracy.
            let angles = || inv.iter().map(|&f| pos as f64 * f);
            cos.extend(angles().chain(angles()).map(|a| a.cos() as f32));
            sin.extend(angles().map(|a| -a.sin() as f32));
            sin.extend(angles().map(|a| a.sin() as f32));
        }
        let shape = [max_positions, head_dim];
        let rotate_half: Vec<i64> = (half_dim..head_dim)
            .chain(0..half_dim)
            .map(|i| i as i64)
            .collect();
        Self {
            cos: Tensor::from_data(TensorData::new(cos, shape), device),
            sin: Tensor::from_data(TensorData::new(sin, shape), device),
            rotate_half: Tensor::from_data(TensorData::new(rotate_half, [head_dim]), device),
            head_dim,
        }
    }

    /// Casts the tables (e.g. to f16 for a half-precision model).
    pub fn cast(self, dtype: burn::tensor::DType) -> Self {
        Self {
            cos: self.cos.cast(dtype),
            sin: self.sin.cast(dtype),
            ..self
        }
    }

    /// Number of positions covered.
    pub fn max_positions(&self) -> usize {
        self.cos.dims()[0]
    }

    /// Looks up the tables at the given positions, shaped to broadcast over heads.
    ///
    /// # Shapes
    /// `positions`: `[batch, T]`
    pub fn angles(&self, positions: &Tensor<B, 2, Int>) -> RopeAngles<B> {
        let [batch, len] = positions.dims();
        let flat = positions.clone().reshape([batch * len]);
        let pick = |t: &Tensor<B, 2>| {
            t.clone()
                .select(0, flat.clone())
                .reshape([batch, 1, len, self.head_dim])
        };
        RopeAngles {
            cos: pick(&self.cos),
            sin: pick(&self.sin),
            rotate_half: self.rotate_half.clone(),
        }
    }

    /// Rotates `x` by the angles of its positions.
    ///
    /// # Shapes
    /// `x`: `[batch, heads, T, head_dim]`, angles of `[batch, 1, T, head_dim]`
    pub fn apply(x: Tensor<B, 4>, angles: &RopeAngles<B>) -> Tensor<B, 4> {
        let rotated = x.clone().select(3, angles.rotate_half.clone());
        x.mul(angles.cos.clone())
            .add(rotated.mul(angles.sin.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type B = crate::backend::Cpu;

    /// The rotation written out pair by pair (HF's rotate-half convention), independent of the
    /// folded tables and the gather.
    #[test]
    fn rotation_equals_the_pairwise_formula() {
        let config = LlamaConfig::new(16, 32, 1, 2, 1, 8).with_max_position_embeddings(64);
        let device = Default::default();
        let rope = RotaryEmbedding::<B>::new(&config, 64, &device);
        let (heads, dim, positions) = (2, 8, [0i64, 5, 63]);
        let x: Vec<f32> = (0..heads * positions.len() * dim)
            .map(|i| ((i * 7 % 11) as f32 - 5.0) / 3.0)
            .collect();
        let angles = rope.angles(&Tensor::from_data(
            TensorData::new(positions.to_vec(), [1, positions.len()]),
            &device,
        ));
        let got: Vec<f32> = RotaryEmbedding::apply(
            Tensor::<B, 4>::from_data(
                TensorData::new(x.clone(), [1, heads, positions.len(), dim]),
                &device,
            ),
            &angles,
        )
        .into_data()
        .iter::<f32>()
        .collect();
        let inv = inverse_frequencies(&config);
        for h in 0..heads {
            for (t, &pos) in positions.iter().enumerate() {
                let row = (h * positions.len() + t) * dim;
                for i in 0..dim / 2 {
                    let (c, s) = ((pos as f64 * inv[i]).cos(), (pos as f64 * inv[i]).sin());
                    let (a, b) = (x[row + i] as f64, x[row + i + dim / 2] as f64);
                    let expect = [a * c - b * s, b * c + a * s];
                    let found = [got[row + i] as f64, got[row + i + dim / 2] as f64];
                    for (e, f) in expect.iter().zip(found) {
                        assert!(
                            (e - f).abs() < 1e-5,
                            "head {h} pos {pos} pair {i}: {e} vs {f}"
                        );
                    }
                }
            }
        }
    }
}
