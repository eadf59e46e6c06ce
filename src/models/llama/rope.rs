//! Rotary position embedding (rotate-half convention, as in HF Llama) at explicit positions.

use burn::module::Module;
use burn::tensor::{Int, Tensor, TensorData, backend::Backend};

use super::config::{Llama3RopeScaling, LlamaConfig};

/// Precomputed cos/sin tables for every position up to the model's context.
///
/// Positions are explicit per token, not implied by slot order: tokens of a draft tree at the
/// same depth share a position.
#[derive(Module, Debug)]
pub struct RotaryEmbedding<B: Backend> {
    cos: Tensor<B, 2>,
    sin: Tensor<B, 2>,
    #[module(skip)]
    half_dim: usize,
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
        let mut cos = Vec::with_capacity(max_positions * half_dim);
        let mut sin = Vec::with_capacity(max_positions * half_dim);
        for pos in 0..max_positions {
            for &f in &inv {
                // Angles in f64 so that large positions keep full f32 accuracy.
                let angle = pos as f64 * f;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        let shape = [max_positions, half_dim];
        Self {
            cos: Tensor::from_data(TensorData::new(cos, shape), device),
            sin: Tensor::from_data(TensorData::new(sin, shape), device),
            half_dim,
        }
    }

    /// Casts the tables (e.g. to f16 for a half-precision model).
    pub fn cast(self, dtype: burn::tensor::DType) -> Self {
        Self {
            cos: self.cos.cast(dtype),
            sin: self.sin.cast(dtype),
            half_dim: self.half_dim,
        }
    }

    /// Number of positions covered.
    pub fn max_positions(&self) -> usize {
        self.cos.dims()[0]
    }

    /// Looks up the tables at the given positions, shaped to broadcast over heads.
    ///
    /// # Shapes
    /// `[batch, T]` to two tensors of `[batch, 1, T, head_dim / 2]`
    pub fn tables(&self, positions: &Tensor<B, 2, Int>) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let [batch, len] = positions.dims();
        let flat = positions.clone().reshape([batch * len]);
        let pick = |t: &Tensor<B, 2>| {
            t.clone()
                .select(0, flat.clone())
                .reshape([batch, 1, len, self.half_dim])
        };
        (pick(&self.cos), pick(&self.sin))
    }

    /// Rotates `x` by the angles of its positions.
    ///
    /// # Shapes
    /// - `x`: `[batch, heads, T, head_dim]`
    /// - `cos`, `sin`: `[batch, 1, T, head_dim / 2]`
    pub fn apply(x: Tensor<B, 4>, cos: &Tensor<B, 4>, sin: &Tensor<B, 4>) -> Tensor<B, 4> {
        let [b, h, t, d] = x.dims();
        let half = d / 2;
        let x1 = x.clone().slice([0..b, 0..h, 0..t, 0..half]);
        let x2 = x.slice([0..b, 0..h, 0..t, half..d]);
        let rotated_1 = x1.clone().mul(cos.clone()).sub(x2.clone().mul(sin.clone()));
        let rotated_2 = x2.mul(cos.clone()).add(x1.mul(sin.clone()));
        Tensor::cat(vec![rotated_1, rotated_2], 3)
    }
}
