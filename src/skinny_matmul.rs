//! A product of a few rows with an `[out, in]` weight, for the Flex CPU backend.
//!
//! Since session 30 the target's projections are stored in panels and multiplied by
//! [`crate::panel_matmul`], about twice as fast; this kernel still serves `[out, in]` weights used
//! as they are, such as the draft head's tied vocabulary table (rows of the target's embedding).
//!
//! Decoding multiplies 1–64 rows (one token, a draft tree, a few beams) by weights of up to
//! 49,152 × 576. `gemm`, behind Flex's matmul, packs the weight into panels at every call (~15 %
//! of a decoding step in a profile) and its 1–4-row products run far below the memory's speed.
//! Here each task streams a block of weight rows once, straight from memory, and dots them with
//! every input row in register tiles while they sit in L1: 2 input rows × 4 weight rows of 8
//! lanes with AVX2, 4 × 4 of 16 lanes where the CPU has AVX-512 (5–10 % faster from 8 to 32 rows
//! with the weights coming from memory, as in a forward; equal for 1–5 rows, which are bound by
//! memory bandwidth). On the 2-core development
//! machine that is 2× faster than `gemm` for one row and 2.8× for four (the 576 × 49,152
//! vocabulary product: 5.2 vs 11.6 ms, 6.9 vs 19.5 ms) and still ahead at 64 rows
//! (`cargo bench --bench round -- projection`, docs/benchmarks.md).
//!
//! Every output element is one dot product whose summation order does not depend on how many
//! rows are multiplied, so a token's logits in a verification tree equal its logits in a
//! one-token step — which keeps greedy speculative decoding equal to plain greedy decoding on
//! this backend.
//!
//! [`matmul_out_major`](crate::projection::matmul_out_major) calls [`try_skinny_matmul`] first;
//! it declines (returns `None`) for anything but f32 tensors of `burn::backend::Flex` (not under
//! `Autodiff`, which must record the op) with at most [`MAX_ROWS`] rows.

use burn::tensor::{Tensor, TensorData, backend::Backend};
use rayon::prelude::*;

use crate::cpu_simd::Simd;
use crate::flex_tensor::{into_contiguous_flex, into_flex, is_flex};

/// Largest row count sent here (measured faster than `gemm` up to it; prefills of longer prompts
/// go to `gemm`).
pub const MAX_ROWS: usize = 64;

/// Outputs per parallel task: enough work to amortise a task, enough tasks to balance cores.
const OUTPUTS_PER_TASK: usize = 128;

/// `x · weightᵀ` for `x: [rows, in]` and `weight: [out, in]`, both f32 on Flex, computed
/// here when `rows <= MAX_ROWS`; `None` leaves the product to the caller.
///
/// # Shapes
/// `x`: `[rows, in]`, `weight`: `[out, in]` to `[rows, out]`
pub fn try_skinny_matmul<B: Backend>(
    x: &Tensor<B, 2>,
    weight: &Tensor<B, 2>,
) -> Option<Tensor<B, 2>> {
    if !is_flex::<B>() {
        return None;
    }
    let [rows, inputs] = x.dims();
    let [outputs, weight_inputs] = weight.dims();
    if rows == 0 || rows > MAX_ROWS || inputs != weight_inputs {
        return None;
    }
    let device = x.device();
    let x = into_contiguous_flex(x.clone())?;
    let weight = into_flex(weight.clone())?;
    let weight_values = weight.as_slice::<f32>()?;
    let x_values = x.as_slice::<f32>()?;
    let out = skinny_matmul(x_values, rows, weight_values, outputs, inputs);
    Some(Tensor::from_data(
        TensorData::new(out, [rows, outputs]),
        &device,
    ))
}

/// `y = x · wᵀ` for row-major `x: [rows, inputs]` and `w: [outputs, inputs]`, row-major
/// `[rows, outputs]` out.
pub fn skinny_matmul(x: &[f32], rows: usize, w: &[f32], outputs: usize, inputs: usize) -> Vec<f32> {
    skinny_matmul_with(Simd::detect(), x, rows, w, outputs, inputs)
}

fn skinny_matmul_with(
    simd: Simd,
    x: &[f32],
    rows: usize,
    w: &[f32],
    outputs: usize,
    inputs: usize,
) -> Vec<f32> {
    debug_assert_eq!(x.len(), rows * inputs);
    debug_assert_eq!(w.len(), outputs * inputs);
    // Tasks write disjoint output-major blocks `[out, rows]`; one transpose at the end.
    let mut by_output = vec![0.0f32; outputs * rows];
    by_output
        .par_chunks_mut(OUTPUTS_PER_TASK * rows)
        .zip(w.par_chunks(OUTPUTS_PER_TASK * inputs))
        .for_each(|(out, w)| match simd {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Simd` names AVX-512 only where the CPU has AVX-512F.
            Simd::Avx512 => unsafe { avx512::block(x, rows, w, inputs, out) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Simd` names AVX2 only where the CPU has AVX2 and FMA.
            Simd::Avx2 => unsafe { avx2::block(x, rows, w, inputs, out) },
            Simd::Portable => block_portable(x, rows, w, inputs, out),
        });
    if rows == 1 {
        return by_output;
    }
    let mut y = vec![0.0f32; rows * outputs];
    for (o, values) in by_output.chunks_exact(rows).enumerate() {
        for (r, &v) in values.iter().enumerate() {
            y[r * outputs + o] = v;
        }
    }
    y
}

/// One task without AVX2: `out[o * rows + r] = x[r] · w[o]` for the weight rows in `w`.
fn block_portable(x: &[f32], rows: usize, w: &[f32], inputs: usize, out: &mut [f32]) {
    for (w_row, out) in w.chunks_exact(inputs).zip(out.chunks_exact_mut(rows)) {
        for (x_row, y) in x.chunks_exact(inputs).zip(out.iter_mut()) {
            let mut acc = [0.0f32; 8];
            let body = inputs - inputs % 8;
            for (a, b) in x_row[..body]
                .chunks_exact(8)
                .zip(w_row[..body].chunks_exact(8))
            {
                for l in 0..8 {
                    acc[l] += a[l] * b[l];
                }
            }
            let tail: f32 = x_row[body..]
                .iter()
                .zip(&w_row[body..])
                .map(|(a, b)| a * b)
                .sum();
            *y = acc.iter().sum::<f32>() + tail;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// Input rows and weight rows per register tile: 2 × 4 accumulators of 8 lanes plus 4
    /// weight vectors and 1 input vector fit AVX2's 16 registers (a 4 × 4 tile spills).
    const TILE_ROWS: usize = 2;
    const TILE_OUTPUTS: usize = 4;

    /// One task: `out[o * rows + r] = x[r] · w[o]` for the weight rows in `w`, in tiles of up to
    /// 2 input rows × 4 weight rows. Every element is summed in the same order whatever the
    /// tile, so results do not depend on `rows`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn block(x: &[f32], rows: usize, w: &[f32], inputs: usize, out: &mut [f32]) {
        let outputs = w.len() / inputs;
        let mut o = 0;
        while o < outputs {
            let wide = outputs - o >= TILE_OUTPUTS;
            let mut r = 0;
            while r < rows {
                let tall = rows - r >= TILE_ROWS;
                let at = Tile {
                    x,
                    w,
                    inputs,
                    rows,
                    r,
                    o,
                };
                match (tall, wide) {
                    (true, true) => tile::<TILE_ROWS, TILE_OUTPUTS>(at, out),
                    (true, false) => tile::<TILE_ROWS, 1>(at, out),
                    (false, true) => tile::<1, TILE_OUTPUTS>(at, out),
                    (false, false) => tile::<1, 1>(at, out),
                }
                r += if tall { TILE_ROWS } else { 1 };
            }
            o += if wide { TILE_OUTPUTS } else { 1 };
        }
    }

    #[derive(Clone, Copy)]
    struct Tile<'a> {
        x: &'a [f32],
        w: &'a [f32],
        inputs: usize,
        rows: usize,
        /// First input row and first weight row of the tile.
        r: usize,
        o: usize,
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn tile<const MR: usize, const NR: usize>(t: Tile<'_>, out: &mut [f32]) {
        let Tile {
            x,
            w,
            inputs,
            rows,
            r,
            o,
        } = t;
        let x_rows: [&[f32]; MR] = std::array::from_fn(|i| &x[(r + i) * inputs..][..inputs]);
        let w_rows: [&[f32]; NR] = std::array::from_fn(|j| &w[(o + j) * inputs..][..inputs]);
        let body = inputs - inputs % 8;
        let mut acc = [[_mm256_setzero_ps(); NR]; MR];
        let mut i = 0;
        while i < body {
            // No closures here: they would not inherit the target features and every load would
            // become a call.
            let mut wv = [_mm256_setzero_ps(); NR];
            for (wv, w_row) in wv.iter_mut().zip(&w_rows) {
                // SAFETY: `i + 8 <= body <= inputs`, the length of every row slice.
                *wv = unsafe { _mm256_loadu_ps(w_row.as_ptr().add(i)) };
            }
            for (acc, x_row) in acc.iter_mut().zip(&x_rows) {
                // SAFETY: as above.
                let xv = unsafe { _mm256_loadu_ps(x_row.as_ptr().add(i)) };
                for (acc, wv) in acc.iter_mut().zip(&wv) {
                    *acc = _mm256_fmadd_ps(xv, *wv, *acc);
                }
            }
            i += 8;
        }
        for (ri, (acc, x_row)) in acc.iter().zip(&x_rows).enumerate() {
            for (j, (acc, w_row)) in acc.iter().zip(&w_rows).enumerate() {
                let tail: f32 = x_row[body..]
                    .iter()
                    .zip(&w_row[body..])
                    .map(|(a, b)| a * b)
                    .sum();
                out[(o + j) * rows + r + ri] = horizontal_sum(*acc) + tail;
            }
        }
    }

    /// The 8 lanes' sum, in a fixed order.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn horizontal_sum(v: __m256) -> f32 {
        let halves = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let pairs = _mm_add_ps(halves, _mm_movehl_ps(halves, halves));
        let one = _mm_add_ss(pairs, _mm_shuffle_ps::<0b01>(pairs, pairs));
        _mm_cvtss_f32(one)
    }
}

// Written out next to `avx2` rather than generated with it from one macro: a macro-generated pair
// measured ~8 % slower on one-row products (the decoding step) on the development machine. The
// cause was not found and may be code layout: two builds of the same source once differed by ~6 %
// there (session 9), so a re-measurement may well clear the macro.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    /// Input rows and weight rows per register tile: 4 × 4 accumulators of 16 lanes plus 4
    /// weight vectors and 1 input vector, 21 of AVX-512's 32 registers. Each step loads 4 + 4
    /// vectors for 16 multiply-adds (AVX2's 2 × 4 tile: 6 loads for 8 of half the width), so a
    /// verification tree of a few rows is no longer bound by loads.
    const TILE_ROWS: usize = 4;
    const TILE_OUTPUTS: usize = 4;
    const LANES: usize = 16;

    /// One task: `out[o * rows + r] = x[r] · w[o]` for the weight rows in `w`, in tiles of up to
    /// 4 input rows × 4 weight rows. Every element is summed in the same order whatever the
    /// tile, so results do not depend on `rows`.
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(super) fn block(x: &[f32], rows: usize, w: &[f32], inputs: usize, out: &mut [f32]) {
        let outputs = w.len() / inputs;
        let mut o = 0;
        while o < outputs {
            let wide = outputs - o >= TILE_OUTPUTS;
            let mut r = 0;
            while r < rows {
                let left = rows - r;
                let at = Tile {
                    x,
                    w,
                    inputs,
                    rows,
                    r,
                    o,
                };
                // Const generics need every shape spelled out; a remainder of 1–3 rows takes
                // the matching short tile.
                let taken = match (left.min(TILE_ROWS), wide) {
                    (4, true) => tile::<4, TILE_OUTPUTS>(at, out),
                    (3, true) => tile::<3, TILE_OUTPUTS>(at, out),
                    (2, true) => tile::<2, TILE_OUTPUTS>(at, out),
                    (1, true) => tile::<1, TILE_OUTPUTS>(at, out),
                    (4, false) => tile::<4, 1>(at, out),
                    (3, false) => tile::<3, 1>(at, out),
                    (2, false) => tile::<2, 1>(at, out),
                    _ => tile::<1, 1>(at, out),
                };
                r += taken;
            }
            o += if wide { TILE_OUTPUTS } else { 1 };
        }
    }

    #[derive(Clone, Copy)]
    struct Tile<'a> {
        x: &'a [f32],
        w: &'a [f32],
        inputs: usize,
        rows: usize,
        /// First input row and first weight row of the tile.
        r: usize,
        o: usize,
    }

    /// One `MR × NR` tile; returns `MR`, the input rows it covered.
    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma")]
    fn tile<const MR: usize, const NR: usize>(t: Tile<'_>, out: &mut [f32]) -> usize {
        let Tile {
            x,
            w,
            inputs,
            rows,
            r,
            o,
        } = t;
        let x_rows: [&[f32]; MR] = std::array::from_fn(|i| &x[(r + i) * inputs..][..inputs]);
        let w_rows: [&[f32]; NR] = std::array::from_fn(|j| &w[(o + j) * inputs..][..inputs]);
        let body = inputs - inputs % LANES;
        let mut acc = [[_mm512_setzero_ps(); NR]; MR];
        let mut i = 0;
        while i < body {
            // No closures here: they would not inherit the target features.
            let mut wv = [_mm512_setzero_ps(); NR];
            for (wv, w_row) in wv.iter_mut().zip(&w_rows) {
                // SAFETY: `i + LANES <= body <= inputs`, the length of every row slice.
                *wv = unsafe { _mm512_loadu_ps(w_row.as_ptr().add(i)) };
            }
            for (acc, x_row) in acc.iter_mut().zip(&x_rows) {
                // SAFETY: as above.
                let xv = unsafe { _mm512_loadu_ps(x_row.as_ptr().add(i)) };
                for (acc, wv) in acc.iter_mut().zip(&wv) {
                    *acc = _mm512_fmadd_ps(xv, *wv, *acc);
                }
            }
            i += LANES;
        }
        for (ri, (acc, x_row)) in acc.iter().zip(&x_rows).enumerate() {
            for (j, (acc, w_row)) in acc.iter().zip(&w_rows).enumerate() {
                let tail: f32 = x_row[body..]
                    .iter()
                    .zip(&w_row[body..])
                    .map(|(a, b)| a * b)
                    .sum();
                out[(o + j) * rows + r + ri] = horizontal_sum(*acc) + tail;
            }
        }
        MR
    }

    /// The 16 lanes' sum, in a fixed order: halves, then quarters, then pairs.
    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma")]
    fn horizontal_sum(v: __m512) -> f32 {
        let low = _mm512_castps512_ps256(v);
        let high = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)));
        let eight = _mm256_add_ps(low, high);
        let halves = _mm_add_ps(
            _mm256_castps256_ps128(eight),
            _mm256_extractf128_ps::<1>(eight),
        );
        let pairs = _mm_add_ps(halves, _mm_movehl_ps(halves, halves));
        let one = _mm_add_ss(pairs, _mm_shuffle_ps::<0b01>(pairs, pairs));
        _mm_cvtss_f32(one)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Distribution, Tolerance};

    type B = burn::backend::Flex;

    fn reference(x: &[f32], rows: usize, w: &[f32], outputs: usize, inputs: usize) -> Vec<f32> {
        let mut y = vec![0.0f32; rows * outputs];
        for r in 0..rows {
            for o in 0..outputs {
                y[r * outputs + o] = (0..inputs)
                    .map(|i| x[r * inputs + i] as f64 * w[o * inputs + i] as f64)
                    .sum::<f64>() as f32;
            }
        }
        y
    }

    #[test]
    fn matches_a_plain_product_for_odd_shapes() {
        let mut seed = 1u32;
        let mut next = || {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (seed >> 8) as f32 / (1u32 << 24) as f32 - 0.5
        };
        // Every kernel this CPU runs, not only the one it picks.
        let kernels = Simd::available();
        // Inputs below, at and past both lane counts; row counts that leave every remainder of
        // both tile heights; outputs across several tasks.
        let shapes = [
            (1, 5, 3),
            (3, 300, 16),
            (16, 129, 37),
            (5, 1000, 576),
            (6, 77, 40),
            (7, 260, 33),
        ];
        for kernel in kernels {
            for (rows, outputs, inputs) in shapes {
                let x: Vec<f32> = (0..rows * inputs).map(|_| next()).collect();
                let w: Vec<f32> = (0..outputs * inputs).map(|_| next()).collect();
                let got = skinny_matmul_with(kernel, &x, rows, &w, outputs, inputs);
                let want = reference(&x, rows, &w, outputs, inputs);
                for (g, w) in got.iter().zip(&want) {
                    assert!(
                        (g - w).abs() <= 1e-5 * (1.0 + w.abs()),
                        "{kernel:?} {rows}x{inputs}·{outputs}: {g} vs {w}"
                    );
                }
                // A row alone gets the bits it gets among the others.
                let last = rows - 1;
                let alone = skinny_matmul_with(kernel, &x[last * inputs..], 1, &w, outputs, inputs);
                assert_eq!(alone[..], got[last * outputs..], "{kernel:?} rows {rows}");
            }
        }
    }

    #[test]
    fn tensors_get_the_plain_product_and_a_row_the_same_bits_alone_or_not() {
        let device = Default::default();
        let x = Tensor::<B, 2>::random([7, 96], Distribution::Default, &device);
        let w = Tensor::<B, 2>::random([200, 96], Distribution::Default, &device);
        let all = try_skinny_matmul(&x, &w).expect("f32 on Flex with 7 rows");
        let want = x.clone().matmul(w.clone().transpose());
        all.clone()
            .into_data()
            .assert_approx_eq::<f32>(&want.into_data(), Tolerance::default());
        let third = try_skinny_matmul(&x.clone().slice([2..3, 0..96]), &w).expect("one row");
        assert_eq!(
            all.clone()
                .slice([2..3, 0..200])
                .into_data()
                .to_vec::<f32>()
                .unwrap(),
            third.into_data().to_vec::<f32>().unwrap()
        );
        // A non-contiguous input is copied first.
        let xt = x.clone().transpose().into_data();
        let xt = Tensor::<B, 2>::from_data(xt, &device).transpose();
        let strided = try_skinny_matmul(&xt, &w).expect("transposed view of x");
        assert_eq!(
            strided.into_data().to_vec::<f32>().unwrap(),
            all.into_data().to_vec::<f32>().unwrap()
        );
    }

    #[test]
    fn declines_what_it_does_not_handle() {
        let device = Default::default();
        let w = Tensor::<B, 2>::random([10, 8], Distribution::Default, &device);
        let many = Tensor::<B, 2>::random([MAX_ROWS + 1, 8], Distribution::Default, &device);
        assert!(try_skinny_matmul(&many, &w).is_none());
        let half = Tensor::<B, 2>::random([2, 8], Distribution::Default, &device)
            .cast(burn::tensor::DType::F16);
        assert!(try_skinny_matmul(&half, &w.clone().cast(burn::tensor::DType::F16)).is_none());
        // A transposed (non-contiguous) weight view is not read in place.
        let wt = Tensor::<B, 2>::random([8, 10], Distribution::Default, &device).transpose();
        let x = Tensor::<B, 2>::random([2, 8], Distribution::Default, &device);
        assert!(try_skinny_matmul(&x, &wt).is_none());
    }
}
