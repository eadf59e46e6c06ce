//! Token selection settings, host-side sampling from a logit row, and the Gumbel-max
//! perturbation that lets a device sample without reading the rows back.

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Distribution, Int, Tensor};
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// How the next token is chosen from the target's distribution.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Sampling {
    /// `0` means greedy (argmax); otherwise logits are divided by it before sampling.
    pub temperature: f32,
    /// Keep only the `k` most likely tokens (plain decoding only).
    pub top_k: Option<usize>,
    /// Keep the smallest set of tokens whose probability reaches `p` (plain decoding only).
    pub top_p: Option<f32>,
}

impl Default for Sampling {
    fn default() -> Self {
        Self::greedy()
    }
}

impl Sampling {
    /// Argmax decoding.
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            top_k: None,
            top_p: None,
        }
    }

    /// Plain sampling at a temperature.
    pub fn with_temperature(temperature: f32) -> Self {
        Self {
            temperature,
            ..Self::greedy()
        }
    }

    /// Whether this is argmax decoding.
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }

    /// Rejects settings that cannot describe a distribution.
    pub fn validate(&self) -> Result<()> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(Error::InvalidSettings(format!(
                "temperature must be finite and ≥ 0, got {}",
                self.temperature
            )));
        }
        if self.top_k == Some(0) {
            return Err(Error::InvalidSettings("top_k must be ≥ 1".into()));
        }
        if let Some(p) = self.top_p
            && !(p > 0.0 && p <= 1.0)
        {
            return Err(Error::InvalidSettings(format!(
                "top_p must be in (0, 1], got {p}"
            )));
        }
        Ok(())
    }
}

/// The column of each row's largest entry over the last dimension, flattened to `[rows]`
/// (row-major), computed where the values live: our one-launch kernel on the GPUs (Burn's
/// argmax walks each row with one thread: 1.3 ms over SmolLM2's vocabulary on an H200), Burn's
/// argmax elsewhere.
///
/// # Shapes
/// `[…, V]` to `[rows]`, `rows` the product of the leading dimensions
pub fn argmax_rows<B: Backend, const D: usize>(values: Tensor<B, D>) -> Tensor<B, 1, Int> {
    if let Some(ids) = crate::cube_kernels::argmax(&values) {
        return ids;
    }
    #[cfg(feature = "flex")]
    if let Some(ids) = host_argmax_rows(&values) {
        return ids;
    }
    let rows = values.dims()[..D - 1].iter().product::<usize>();
    values.argmax(D - 1).reshape([rows])
}

/// Smallest and largest uniform draw fed to the Gumbel transform: keeps both logarithms finite.
/// A token whose probability is far below this bound is drawn slightly more often than it should
/// be, which no test of ours could see.
const GUMBEL_UNIFORM_CLAMP: f64 = 1e-7;

/// `logits / temperature` plus independent Gumbel(0, 1) noise, computed where the logits live,
/// in f32 whatever the logits' float type (the result is f32). The argmax of each row of the
/// result is an exact draw from `softmax(logits / temperature)` (the Gumbel-max trick), so
/// sampling needs one small readback of indices instead of the whole rows. Draws from the backend's random generator: seed it with [`Backend::seed`] for
/// reproducible runs.
///
/// # Shapes
/// Any; the noise has the logits' shape.
pub fn gumbel_perturbed<B: Backend, const D: usize>(
    logits: Tensor<B, D>,
    temperature: f32,
) -> Tensor<B, D> {
    // In f32 whatever the logits' type: in f16 a uniform draw rounds to 1.0 about once in 4,096
    // (and the clamp's upper bound is 1.0 too), its noise is +∞, and a row of SmolLM2's 49,152
    // logits held a dozen infinities — its argmax a uniformly random token. (Burn's `cast` hands
    // back an f32 tensor as it is.)
    let logits = logits.cast(DType::F32);
    let uniform = logits
        .random_like(Distribution::Uniform(0.0, 1.0))
        .clamp(GUMBEL_UNIFORM_CLAMP, 1.0 - GUMBEL_UNIFORM_CLAMP);
    let gumbel = uniform.log().neg().log().neg();
    logits.div_scalar(temperature).add(gumbel)
}

/// [`argmax_rows`] on the host's buffer for Flex in f32: [`argmax_in_lanes`] per row. Burn's Flex
/// argmax compares one element at a time (its SIMD path is behind a feature Burn leaves off):
/// ~0.25 ms for a six-row tree's logits over SmolLM2's 49,152 tokens, ~1 % of a CPU round.
#[cfg(feature = "flex")]
fn host_argmax_rows<B: Backend, const D: usize>(
    values: &Tensor<B, D>,
) -> Option<Tensor<B, 1, Int>> {
    if !crate::flex_tensor::is_flex::<B>() || values.dtype() != DType::F32 {
        return None;
    }
    let width = values.dims()[D - 1];
    let rows = values.dims()[..D - 1].iter().product::<usize>();
    if width == 0 {
        return None;
    }
    let device = values.device();
    let flex = crate::flex_tensor::into_contiguous_flex(values.clone())?;
    let ids: Vec<i64> = flex
        .as_slice::<f32>()?
        .chunks_exact(width)
        .map(|row| argmax_in_lanes(row) as i64)
        .collect();
    Some(crate::generate::int_tensor(ids, [rows], &device))
}

/// [`argmax`] in two passes that vectorise: the largest value over 16 lanes (any order gives the
/// same maximum), then the first index holding it. The same index as [`argmax`] for every input,
/// NaNs included (a NaN first entry wins there, as nothing compares greater; elsewhere NaNs
/// never win).
#[cfg(any(feature = "flex", test))]
pub(crate) fn argmax_in_lanes(values: &[f32]) -> usize {
    const LANES: usize = 16;
    match values.first() {
        None => return 0,
        Some(first) if first.is_nan() => return 0,
        Some(_) => {}
    }
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let mut chunks = values.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (lane, &v) in lanes.iter_mut().zip(chunk) {
            *lane = if v > *lane { v } else { *lane };
        }
    }
    let largest = chunks
        .remainder()
        .iter()
        .chain(&lanes)
        .fold(f32::NEG_INFINITY, |a, &v| if v > a { v } else { a });
    // Whole chunks compared at once, then the first hit inside the chunk that has one.
    let chunk = values
        .chunks(LANES)
        .position(|chunk| chunk.iter().fold(false, |hit, &v| hit | (v == largest)))
        .unwrap_or(0);
    let start = chunk * LANES;
    values[start..]
        .iter()
        .position(|&v| v == largest)
        .map_or(0, |i| start + i)
}

/// Index of the largest value (first on ties).
pub fn argmax(values: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in values.iter().enumerate() {
        if v > values[best] {
            best = i;
        }
    }
    best
}

/// Draws a token from one row of logits with temperature, top-k and top-p.
pub fn sample_logits(logits: &[f32], sampling: &Sampling, rng: &mut impl Rng) -> u32 {
    if sampling.is_greedy() || logits.is_empty() {
        return argmax(logits) as u32;
    }
    let mut candidates: Vec<(usize, f32)> = logits
        .iter()
        .map(|&l| l / sampling.temperature)
        .enumerate()
        .collect();
    if sampling.top_k.is_some() || sampling.top_p.is_some() {
        candidates.sort_by(|a, b| b.1.total_cmp(&a.1));
    }
    if let Some(k) = sampling.top_k {
        candidates.truncate(k.max(1));
    }
    let max = candidates
        .iter()
        .map(|c| c.1)
        .fold(f32::NEG_INFINITY, f32::max);
    let mut weights: Vec<f64> = candidates
        .iter()
        .map(|c| ((c.1 - max) as f64).exp())
        .collect();
    let total: f64 = weights.iter().sum();
    if let Some(p) = sampling.top_p {
        let mut acc = 0.0;
        let mut keep = weights.len();
        for (i, w) in weights.iter().enumerate() {
            acc += w / total;
            if acc >= p as f64 {
                keep = i + 1;
                break;
            }
        }
        weights.truncate(keep);
        candidates.truncate(keep);
    }
    let total: f64 = weights.iter().sum();
    let mut u = rng.random::<f64>() * total;
    for (c, w) in candidates.iter().zip(&weights) {
        if u < *w {
            return c.0 as u32;
        }
        u -= w;
    }
    candidates.last().map(|c| c.0 as u32).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    #[test]
    fn the_lane_argmax_picks_what_the_plain_one_picks() {
        let mut rng = StdRng::seed_from_u64(3);
        let special = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 2.0, -2.0];
        for case in 0..3000 {
            let len = if case % 100 == 0 {
                49_152
            } else {
                rng.random_range(0..70)
            };
            // Few distinct values, so ties are common; now and then NaNs and infinities.
            let values: Vec<f32> = (0..len)
                .map(|_| match rng.random_range(0..20) {
                    0 => special[rng.random_range(0..special.len())],
                    _ => rng.random_range(-3..4) as f32 * 0.5,
                })
                .collect();
            assert_eq!(
                argmax_in_lanes(&values),
                argmax(&values),
                "case {case}: {values:?}"
            );
        }
        assert_eq!(argmax_in_lanes(&[f32::NAN, 1.0]), 0);
        assert_eq!(argmax_in_lanes(&[f32::NEG_INFINITY; 20]), 0);
        assert_eq!(argmax_in_lanes(&[]), 0);
    }

    #[cfg(feature = "flex")]
    #[test]
    fn argmax_rows_on_flex_gives_each_rows_first_maximum() {
        use burn::backend::Flex;
        use burn::tensor::TensorData;
        let mut rng = StdRng::seed_from_u64(4);
        let (rows, width) = (6, 1000);
        let values: Vec<f32> = (0..rows * width)
            .map(|_| rng.random_range(0..50) as f32)
            .collect();
        let tensor = Tensor::<Flex, 3>::from_data(
            TensorData::new(values.clone(), [2, 3, width]),
            &Default::default(),
        );
        let ids: Vec<i64> = argmax_rows(tensor).into_data().iter::<i64>().collect();
        let want: Vec<i64> = values.chunks(width).map(|r| argmax(r) as i64).collect();
        assert_eq!(ids, want);
    }

    #[test]
    fn greedy_takes_first_max() {
        assert_eq!(
            sample_logits(
                &[1.0, 3.0, 3.0],
                &Sampling::greedy(),
                &mut StdRng::seed_from_u64(0)
            ),
            1
        );
    }

    #[test]
    fn sampling_matches_softmax_frequencies() {
        let logits = [0.0f32, 1.0, 2.0, -1.0];
        let sampling = Sampling::with_temperature(1.0);
        let mut rng = StdRng::seed_from_u64(7);
        let n = 200_000;
        let mut counts = [0usize; 4];
        for _ in 0..n {
            counts[sample_logits(&logits, &sampling, &mut rng) as usize] += 1;
        }
        let z: f64 = logits.iter().map(|&l| (l as f64).exp()).sum();
        for (i, &l) in logits.iter().enumerate() {
            let p = (l as f64).exp() / z;
            let freq = counts[i] as f64 / n as f64;
            // 5 standard deviations of a binomial proportion.
            let sd = (p * (1.0 - p) / n as f64).sqrt();
            assert!((freq - p).abs() < 5.0 * sd, "token {i}: {freq} vs {p}");
        }
    }

    #[test]
    fn gumbel_max_draws_match_softmax_frequencies() {
        type B = crate::backend::Cpu;
        let device = Default::default();
        let logits = [0.5f32, 2.0, -1.0, 1.0, 0.0];
        let rows = 40_000;
        for temperature in [1.0f32, 0.5] {
            B::seed(&device, 7);
            let tiled: Vec<f32> = logits.iter().copied().cycle().take(rows * 5).collect();
            let tensor =
                Tensor::<B, 2>::from_data(burn::tensor::TensorData::new(tiled, [rows, 5]), &device);
            let picks = gumbel_perturbed(tensor, temperature).argmax(1).into_data();
            let mut counts = [0usize; 5];
            for pick in picks.iter::<i64>() {
                counts[pick as usize] += 1;
            }
            let weights: Vec<f64> = logits
                .iter()
                .map(|&l| (f64::from(l) / f64::from(temperature)).exp())
                .collect();
            let total: f64 = weights.iter().sum();
            // χ² with 4 degrees of freedom: 18.5 is its 99.9 % point.
            let chi2: f64 = counts
                .iter()
                .zip(&weights)
                .map(|(&c, w)| {
                    let expected = rows as f64 * w / total;
                    (c as f64 - expected).powi(2) / expected
                })
                .sum();
            assert!(
                chi2 < 18.5,
                "T={temperature}: χ² = {chi2:.1}, counts {counts:?}"
            );
        }
    }

    /// With half-precision logits (a model run in f16) the noise must still be drawn and added in
    /// f32: in f16 a uniform draw rounds to 1.0 about once in 4,096 (and 1 − 1e-7 is 1.0), whose
    /// Gumbel noise is +∞, so a 49,152-token row held a dozen infinite entries and its argmax
    /// was a uniformly random token (session 34 on the H200: exact sampling accepted nothing, τ
    /// 1.00, and plain f16 sampling wrote noise).
    #[test]
    fn gumbel_max_draws_from_half_precision_logits_are_draws_from_their_softmax() {
        type B = crate::backend::Cpu;
        let device = Default::default();
        B::seed(&device, 11);
        // One clear favourite among 4,096 tokens: it holds all but ~e^-12 · 4,095 of the mass.
        let (rows, vocab) = (64, 4096);
        let mut values = vec![0.0f32; rows * vocab];
        for row in 0..rows {
            values[row * vocab + (row * 37) % vocab] = 12.0;
        }
        let logits = Tensor::<B, 2>::from_data(
            burn::tensor::TensorData::new(values, [rows, vocab]),
            &device,
        )
        .cast(DType::F16);
        for temperature in [1.0f32, 0.7] {
            let perturbed = gumbel_perturbed(logits.clone(), temperature);
            let picks: Vec<i64> = perturbed.argmax(1).into_data().iter::<i64>().collect();
            let favourites = (0..rows)
                .filter(|&row| picks[row] == ((row * 37) % vocab) as i64)
                .count();
            // P(another token) ≤ 4,095 · e^-12 / (1 + 4,095 · e^-12) ≈ 2.5 %: 64 rows missing
            // the favourite more than 10 times is a ~1e-5 event.
            assert!(
                favourites >= rows - 10,
                "T={temperature}: the favourite won {favourites} of {rows} rows"
            );
        }
    }

    #[test]
    fn top_k_and_top_p_restrict_support() {
        let logits = [0.0f32, 5.0, 4.9, -3.0];
        let mut rng = StdRng::seed_from_u64(1);
        let top_k = Sampling {
            top_k: Some(2),
            ..Sampling::with_temperature(1.0)
        };
        let top_p = Sampling {
            top_p: Some(0.5),
            ..Sampling::with_temperature(1.0)
        };
        for _ in 0..2000 {
            assert!(matches!(sample_logits(&logits, &top_k, &mut rng), 1 | 2));
            assert_eq!(sample_logits(&logits, &top_p, &mut rng), 1);
        }
    }

    #[test]
    fn invalid_settings_are_rejected() {
        assert!(Sampling::with_temperature(-1.0).validate().is_err());
        assert!(
            Sampling {
                top_k: Some(0),
                ..Sampling::greedy()
            }
            .validate()
            .is_err()
        );
        assert!(
            Sampling {
                top_p: Some(1.5),
                ..Sampling::greedy()
            }
            .validate()
            .is_err()
        );
    }
}
