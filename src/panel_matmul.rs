//! Products with a weight laid out in panels of 16 outputs, for the Flex CPU backend.
//!
//! A Llama forward on the CPU is a chain of products of a few rows (one decoding step, a
//! verification tree of 2–30 tokens) with weights that come from memory at every call. The
//! `[out, in]` kernel of [`crate::skinny_matmul`] dots rows with rows, so every output ends in a
//! horizontal sum and its input rows must be reloaded for every four weight rows; on the 2-core
//! development machine its 64-row vocabulary product ran at 35 G multiply-adds/s. Here the
//! weight is stored once, at load time, as panels `[out / 16][in][16]`: a step of the kernel loads
//! one vector of 16 outputs' weights for input `k` and multiplies it by input `k` of up to 12 rows,
//! broadcast — the register-tile scheme of BLAS micro-kernels, with no horizontal sums. The same
//! product runs at 79 G multiply-adds/s, and one row streams the 113 MB vocabulary weight at
//! 31 GB/s instead of 19 (criterion, docs/benchmarks.md, session 30).
//!
//! Every output element is one chain of fused multiply-adds over `k = 0, 1, …, in − 1`, started
//! from zero — whatever the number of rows, the tile it falls in or the instruction set (AVX-512,
//! AVX2 and the portable loop give the same bits, since each step is one correctly rounded
//! `a·b + c`). So a token's logits in a verification tree equal its logits in a one-token step,
//! which keeps greedy speculative decoding equal to plain greedy decoding on this backend.
//!
//! [`Projection`](crate::projection::Projection) stores its weight this way on Flex in f32
//! ([`WeightLayout::Panels`](crate::projection::WeightLayout::Panels)) and calls
//! [`try_panel_matmul`].

use burn::backend::flex::FlexTensor;
use burn::tensor::{DType, Tensor, TensorData, backend::Backend};
use half::f16;
use rayon::prelude::*;

use crate::cpu_simd::Simd;
use crate::flex_tensor::{into_contiguous_flex, into_flex, is_flex};
use crate::projection::{PANEL, panel_len};

/// Panels per parallel task (128 outputs): enough work to amortise a task, enough tasks to
/// balance two cores on the smallest SmolLM2 product (576 outputs).
const PANELS_PER_TASK: usize = 8;

/// How far ahead a tile that prefetches asks for its panel's weights: 64 steps of 64 bytes per
/// f32 panel, 4 KB (32 and 128 steps were slower on the Zen 4 guest, docs/benchmarks.md session 43).
#[cfg(target_arch = "x86_64")]
const PREFETCH_STEPS: usize = 64;

/// Rows multiplied per pass over the weight: a prefill of many tokens goes through in blocks
/// whose inputs (64 × 1,536 floats at most for SmolLM2) stay in L2 while the weight streams.
const ROW_BLOCK: usize = 64;

// No software prefetch in the tiles: asking for each panel's weights 16–32 steps ahead made six
// rows through every SmolLM2 product ~15 % faster on an Intel guest but one row 5–10 % slower
// and six rows no faster (1–10 % slower on average) on an AMD Zen 4 guest, whose hardware
// prefetcher already keeps the weights coming (docs/benchmarks.md, session 41).

/// `x · Wᵀ` for `x: [rows, in]` (f32) and the panels of an `[outputs, in]` weight (f32, or f16
/// widened as it is read — see [`PanelElement`]) on Flex; `None` leaves the product to the caller
/// (another backend, another float type, a panel tensor whose size does not match `outputs` and
/// `x`'s width).
///
/// # Shapes
/// `x`: `[rows, in]`, `panels`: `[⌈outputs / 16⌉ · in, 16]` to `[rows, outputs]`
pub fn try_panel_matmul<B: Backend>(
    x: &Tensor<B, 2>,
    panels: &Tensor<B, 2>,
    outputs: usize,
) -> Option<Tensor<B, 2>> {
    if !is_flex::<B>() {
        return None;
    }
    let [rows, inputs] = x.dims();
    if panels.dims() != [outputs.div_ceil(PANEL) * inputs, PANEL] {
        return None;
    }
    let device = x.device();
    let x = into_contiguous_flex(x.clone())?;
    let panels = into_flex(panels.clone())?;
    let y = flex_panel_matmul(x.as_slice::<f32>()?, rows, &panels, outputs, inputs)?;
    Some(Tensor::from_data(
        TensorData::new(y, [rows, outputs]),
        &device,
    ))
}

/// [`panel_matmul`] over the panels held by a Flex tensor, f32 or f16; `None` for another element
/// type or for sizes that do not match.
pub(crate) fn flex_panel_matmul(
    x: &[f32],
    rows: usize,
    panels: &FlexTensor,
    outputs: usize,
    inputs: usize,
) -> Option<Vec<f32>> {
    match panels.dtype() {
        DType::F32 => panel_matmul(x, rows, panels.as_slice::<f32>()?, outputs, inputs),
        DType::F16 => panel_matmul(x, rows, panels.as_slice::<f16>()?, outputs, inputs),
        _ => None,
    }
}

/// A weight element the panel kernel reads: f32, or f16 widened to f32 as it is loaded (exactly:
/// every f16 value is an f32 value), so f16 panels give the bits of the f32 panels of the same
/// values while streaming half the bytes.
pub trait PanelElement: Copy + Send + Sync + 'static {
    /// Whether the element is f16 (the SIMD loops convert it with `vcvtph2ps`).
    const HALF: bool;
    /// The element as f32 (the portable loop).
    fn widen(self) -> f32;
}

impl PanelElement for f32 {
    const HALF: bool = false;
    fn widen(self) -> f32 {
        self
    }
}

impl PanelElement for f16 {
    const HALF: bool = true;
    fn widen(self) -> f32 {
        self.to_f32()
    }
}

/// `y = x · Wᵀ` for row-major `x: [rows, inputs]` and `W: [outputs, inputs]` given as its
/// panels ([`crate::projection::pack_out_in`]); row-major `[rows, outputs]` out. `None` when
/// `x` or `panels` does not have the length these sizes give.
pub fn panel_matmul<E: PanelElement>(
    x: &[f32],
    rows: usize,
    panels: &[E],
    outputs: usize,
    inputs: usize,
) -> Option<Vec<f32>> {
    if x.len() != rows * inputs || panels.len() != panel_len(outputs, inputs) {
        return None;
    }
    Some(panel_matmul_with(
        Simd::detect(),
        x,
        rows,
        panels,
        outputs,
        inputs,
    ))
}

/// A pointer to the output that tasks share: each writes its own columns of every row.
#[derive(Clone, Copy)]
struct Output(*mut f32);
// SAFETY: tasks write disjoint sets of elements (their own panels' columns), and the buffer
// outlives them (`for_each` returns after every task).
unsafe impl Send for Output {}
unsafe impl Sync for Output {}

impl Output {
    /// The pointer (a method, so that closures capture the whole `Output`, which is `Sync`,
    /// rather than its field).
    fn get(self) -> *mut f32 {
        self.0
    }
}

fn panel_matmul_with<E: PanelElement>(
    simd: Simd,
    x: &[f32],
    rows: usize,
    panels: &[E],
    outputs: usize,
    inputs: usize,
) -> Vec<f32> {
    debug_assert_eq!(x.len(), rows * inputs);
    debug_assert_eq!(panels.len(), panel_len(outputs, inputs));
    let mut y = vec![0.0f32; rows * outputs];
    if inputs == 0 {
        return y;
    }
    let panel_count = outputs.div_ceil(PANEL);
    for first_row in (0..rows).step_by(ROW_BLOCK) {
        let block_rows = ROW_BLOCK.min(rows - first_row);
        let x_block = &x[first_row * inputs..(first_row + block_rows) * inputs];
        let y_block = Output(y[first_row * outputs..].as_mut_ptr());
        (0..panel_count.div_ceil(PANELS_PER_TASK))
            .into_par_iter()
            .for_each(|task| {
                let first = task * PANELS_PER_TASK;
                let task_panels = Panels {
                    data: panels,
                    inputs,
                    outputs,
                    first,
                    end: (first + PANELS_PER_TASK).min(panel_count),
                };
                // SAFETY: `y_block` has `block_rows × outputs` elements from its start (it is
                // inside `y`, `rows × outputs`), and this task writes only its panels' columns
                // `first · 16 .. end · 16` (clipped to `outputs`) of each row.
                match simd {
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: and `Simd` names AVX-512 only where the CPU has AVX-512F.
                    Simd::Avx512 => unsafe {
                        avx512::block(x_block, block_rows, task_panels, y_block.get())
                    },
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: and `Simd` names AVX2 only where the CPU has AVX2, FMA and F16C.
                    Simd::Avx2 => unsafe {
                        avx2::block(x_block, block_rows, task_panels, y_block.get())
                    },
                    Simd::Portable => unsafe {
                        block_portable(x_block, block_rows, task_panels, y_block.get())
                    },
                }
            });
    }
    y
}

/// The panels one task multiplies: `first..end` of the weight's panels.
#[derive(Clone, Copy)]
struct Panels<'a, E> {
    data: &'a [E],
    inputs: usize,
    outputs: usize,
    first: usize,
    end: usize,
}

impl<E> Panels<'_, E> {
    /// Panel `p`'s `inputs × 16` weights.
    fn panel(&self, p: usize) -> &[E] {
        &self.data[p * self.inputs * PANEL..][..self.inputs * PANEL]
    }

    /// How many of panel `p`'s 16 lanes are real outputs.
    fn lanes(&self, p: usize) -> usize {
        (self.outputs - p * PANEL).min(PANEL)
    }
}

/// Where a SIMD loop's register tile works: rows `r..` of `x` times the panels from `p` on (as
/// many as the tile takes), written into `y`.
#[derive(Clone, Copy)]
#[cfg(target_arch = "x86_64")]
struct Tile<'a, E> {
    x: &'a [f32],
    panels: Panels<'a, E>,
    /// First row and first panel of the tile.
    r: usize,
    p: usize,
    y: *mut f32,
    /// Whether to ask for the weights [`PREFETCH_STEPS`] steps ahead.
    prefetch: bool,
}

/// Asks for `panel`'s weights [`PREFETCH_STEPS`] steps past step `k`, into L2. Past the panel's
/// end this names the next panel's first weights, or an address outside the weight, which a
/// prefetch ignores.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn prefetch_ahead<E>(panel: &[E], k: usize) {
    use std::arch::x86_64::{_MM_HINT_T1, _mm_prefetch};
    let ahead = panel.as_ptr().wrapping_add((k + PREFETCH_STEPS) * PANEL);
    // SAFETY: SSE, the instruction's only requirement, is part of every x86_64 CPU, and a
    // prefetch reads nothing and never faults, whatever the address.
    unsafe { _mm_prefetch::<_MM_HINT_T1>(ahead.cast()) };
}

/// One task without SIMD: the same chain per element, with `mul_add`.
///
/// # Safety
/// `y` must point at `rows × panels.outputs` writable floats that no other thread touches in
/// this task's columns.
unsafe fn block_portable<E: PanelElement>(
    x: &[f32],
    rows: usize,
    panels: Panels<'_, E>,
    y: *mut f32,
) {
    let inputs = panels.inputs;
    for p in panels.first..panels.end {
        let panel = panels.panel(p);
        let lanes = panels.lanes(p);
        for (r, x_row) in x.chunks_exact(inputs).enumerate().take(rows) {
            let mut acc = [0.0f32; PANEL];
            for (&xk, w) in x_row.iter().zip(panel.chunks_exact(PANEL)) {
                for (acc, &w) in acc.iter_mut().zip(w) {
                    *acc = xk.mul_add(w.widen(), *acc);
                }
            }
            for (lane, &value) in acc.iter().enumerate().take(lanes) {
                // SAFETY: the caller's contract; `r < rows`, `p · 16 + lane < outputs`.
                unsafe { *y.add(r * panels.outputs + p * PANEL + lane) = value };
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{PANEL, PanelElement, Panels, Tile, prefetch_ahead};
    use std::arch::x86_64::*;

    /// 16 weights at `at`, as f32.
    ///
    /// # Safety
    /// The CPU must have AVX-512F; `at` must point at 16 readable elements.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load<E: PanelElement>(at: *const E) -> __m512 {
        // SAFETY: the caller's contract.
        unsafe {
            if E::HALF {
                _mm512_cvtph_ps(_mm256_loadu_si256(at.cast()))
            } else {
                _mm512_loadu_ps(at.cast())
            }
        }
    }

    /// Rows and panels per register tile: up to 12 × 2 accumulators, 2 weight vectors and a
    /// broadcast input, 27 of the 32 registers; each step loads 2 vectors for up to 24
    /// multiply-adds. Twelve rows rather than eight so that a verification tree of 9–12 tokens
    /// still reads each weight once (docs/benchmarks.md, session 43).
    const TILE_ROWS: usize = 12;
    const TILE_PANELS: usize = 2;

    /// Above this many rows a tile's multiply-adds outlast its weights' trip from memory, and
    /// the hardware prefetcher, which follows the loads, no longer keeps the stream busy: the
    /// first tile of each panel (pair) then asks for the weights [`super::PREFETCH_STEPS`] steps ahead
    /// into L2 itself — SmolLM2's products at 9–12 rows ~15 % faster, at 13–20 rows 8–10 %
    /// (Zen 4 guest, docs/benchmarks.md session 43). At eight rows and fewer the product is
    /// bound by memory and the hardware keeps up (session 41 measured a prefetch there as a
    /// loss on the same kind of guest), so a one-token step takes the same path as before.
    const PREFETCH_ABOVE_ROWS: usize = 8;

    /// `tile::<rows, NP, E>(at)` for a run-time `rows` in `1..=TILE_ROWS`.
    macro_rules! tiles {
        ($rows:expr, $np:literal, $at:expr) => {
            tiles!(@arms $rows, $np, $at; 1 2 3 4 5 6 7 8 9 10 11)
        };
        (@arms $rows:expr, $np:literal, $at:expr; $($mr:literal)*) => {
            match $rows {
                $($mr => tile::<$mr, $np, E>($at),)*
                _ => tile::<TILE_ROWS, $np, E>($at),
            }
        };
    }

    /// One task: its panels, in pairs, times every row, in tiles of up to 12 rows.
    ///
    /// # Safety
    /// The CPU must have AVX-512F; `y` as for `block_portable`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn block<E: PanelElement>(
        x: &[f32],
        rows: usize,
        panels: Panels<'_, E>,
        y: *mut f32,
    ) {
        let prefetch = rows > PREFETCH_ABOVE_ROWS;
        let mut p = panels.first;
        while p < panels.end {
            let pair = panels.end - p >= TILE_PANELS;
            let mut r = 0;
            while r < rows {
                let tile_rows = (rows - r).min(TILE_ROWS);
                let at = Tile {
                    x,
                    panels,
                    r,
                    p,
                    y,
                    // The later tiles find the weights in L2, brought there by the first.
                    prefetch: prefetch && r == 0,
                };
                // SAFETY: the caller's contract; the tile lies inside `rows` and the task.
                unsafe {
                    if pair {
                        tiles!(tile_rows, 2, at)
                    } else {
                        tiles!(tile_rows, 1, at)
                    }
                }
                r += tile_rows;
            }
            p += if pair { TILE_PANELS } else { 1 };
        }
    }

    /// Rows `r..r + MR` times panels `p..p + NP`.
    ///
    /// # Safety
    /// As for `block`; `r + MR <= rows` and `p + NP <= panels.end`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn tile<const MR: usize, const NP: usize, E: PanelElement>(t: Tile<'_, E>) {
        let Tile {
            x,
            panels,
            r,
            p,
            y,
            prefetch,
        } = t;
        let inputs = panels.inputs;
        let x_rows: [&[f32]; MR] = std::array::from_fn(|i| &x[(r + i) * inputs..][..inputs]);
        let weights: [&[E]; NP] = std::array::from_fn(|j| panels.panel(p + j));
        let mut acc = [[_mm512_setzero_ps(); NP]; MR];
        for k in 0..inputs {
            if prefetch {
                for panel in &weights {
                    prefetch_ahead(panel, k);
                }
            }
            // No closures here: they would not inherit the target features.
            let mut w = [_mm512_setzero_ps(); NP];
            for (w, panel) in w.iter_mut().zip(&weights) {
                // SAFETY: `(k + 1) · 16 <= inputs · 16`, the panel's length.
                *w = unsafe { load(panel.as_ptr().add(k * PANEL)) };
            }
            for (acc, x_row) in acc.iter_mut().zip(&x_rows) {
                let xk = _mm512_set1_ps(x_row[k]);
                for (acc, w) in acc.iter_mut().zip(&w) {
                    *acc = _mm512_fmadd_ps(xk, *w, *acc);
                }
            }
        }
        for (i, acc) in acc.iter().enumerate() {
            for (j, acc) in acc.iter().enumerate() {
                let lanes = panels.lanes(p + j);
                // SAFETY: the caller's contract: row `r + i`, columns `(p + j) · 16 ..` up to
                // `lanes` of them, all inside this task's part of `y`.
                unsafe {
                    let at = y.add((r + i) * panels.outputs + (p + j) * PANEL);
                    if lanes == PANEL {
                        _mm512_storeu_ps(at, *acc);
                    } else {
                        _mm512_mask_storeu_ps(at, ((1u32 << lanes) - 1) as __mmask16, *acc);
                    }
                }
            }
        }
    }
}

// Written out next to `avx512` rather than generated with it from one macro: the two differ in
// vector width (a panel is one AVX-512 vector, two AVX2 vectors), tile shape and tail stores.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{PANEL, PanelElement, Panels, Tile, prefetch_ahead};
    use std::arch::x86_64::*;

    /// 8 weights at `at`, as f32.
    ///
    /// # Safety
    /// The CPU must have AVX2 and F16C; `at` must point at 8 readable elements.
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn load<E: PanelElement>(at: *const E) -> __m256 {
        // SAFETY: the caller's contract.
        unsafe {
            if E::HALF {
                _mm256_cvtph_ps(_mm_loadu_si128(at.cast()))
            } else {
                _mm256_loadu_ps(at.cast())
            }
        }
    }

    /// Rows per register tile: 6 rows × 2 half-panels of 8 lanes, 12 accumulators, 2 weight
    /// vectors and a broadcast input, 15 of AVX2's 16 registers. Six rather than four so that a
    /// verification tree of up to six tokens reads each weight once: a 5-token verification
    /// took 38.5–39.3 ms with four and 31.6–32.5 with six (random weights). End to end the
    /// README shape's ReDrafter moved only within the noise (1.25–1.32× → 1.32–1.35× plain
    /// decoding, AVX-512 1.61–1.65×): its trees reach 7 tokens (docs/benchmarks.md, session 32).
    const TILE_ROWS: usize = 6;
    const HALF: usize = PANEL / 2;

    /// One task: its panels times every row, in tiles of up to 6 rows. With more rows than one
    /// tile, the first tile of each panel asks for the weights [`super::PREFETCH_STEPS`] steps ahead
    /// into L2, as the AVX-512 loop does above eight rows: the later tiles read the panel from L2
    /// and the hardware prefetcher, which follows the loads, leaves the memory stream idle
    /// meanwhile.
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA; `y` as for `block_portable`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn block<E: PanelElement>(
        x: &[f32],
        rows: usize,
        panels: Panels<'_, E>,
        y: *mut f32,
    ) {
        let prefetch = rows > TILE_ROWS;
        for p in panels.first..panels.end {
            let mut r = 0;
            while r < rows {
                let tile_rows = (rows - r).min(TILE_ROWS);
                let at = Tile {
                    x,
                    panels,
                    r,
                    p,
                    y,
                    prefetch: prefetch && r == 0,
                };
                // SAFETY: the caller's contract; the tile lies inside `rows` and the task.
                unsafe {
                    match tile_rows {
                        6 => tile::<6, E>(at),
                        5 => tile::<5, E>(at),
                        4 => tile::<4, E>(at),
                        3 => tile::<3, E>(at),
                        2 => tile::<2, E>(at),
                        _ => tile::<1, E>(at),
                    }
                }
                r += tile_rows;
            }
        }
    }

    /// Rows `r..r + MR` times panel `p`.
    ///
    /// # Safety
    /// As for `block`; `r + MR <= rows`, `p < panels.end`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn tile<const MR: usize, E: PanelElement>(t: Tile<'_, E>) {
        let Tile {
            x,
            panels,
            r,
            p,
            y,
            prefetch,
        } = t;
        let inputs = panels.inputs;
        let x_rows: [&[f32]; MR] = std::array::from_fn(|i| &x[(r + i) * inputs..][..inputs]);
        let panel = panels.panel(p);
        let mut acc = [[_mm256_setzero_ps(); 2]; MR];
        for k in 0..inputs {
            if prefetch {
                prefetch_ahead(panel, k);
            }
            // SAFETY: `k · 16 + 16 <= inputs · 16`, the panel's length.
            let w = unsafe {
                [
                    load(panel.as_ptr().add(k * PANEL)),
                    load(panel.as_ptr().add(k * PANEL + HALF)),
                ]
            };
            for (acc, x_row) in acc.iter_mut().zip(&x_rows) {
                let xk = _mm256_set1_ps(x_row[k]);
                acc[0] = _mm256_fmadd_ps(xk, w[0], acc[0]);
                acc[1] = _mm256_fmadd_ps(xk, w[1], acc[1]);
            }
        }
        let lanes = panels.lanes(p);
        for (i, acc) in acc.iter().enumerate() {
            let mut values = [0.0f32; PANEL];
            // SAFETY: `values` holds 16 floats.
            unsafe {
                _mm256_storeu_ps(values.as_mut_ptr(), acc[0]);
                _mm256_storeu_ps(values.as_mut_ptr().add(HALF), acc[1]);
            }
            for (lane, &value) in values.iter().enumerate().take(lanes) {
                // SAFETY: the caller's contract: row `r + i`, column `p · 16 + lane < outputs`.
                unsafe { *y.add((r + i) * panels.outputs + p * PANEL + lane) = value };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::projection::{pack_in_out, pack_out_in, unpack_out_in};

    fn random(len: usize, seed: u64) -> Vec<f32> {
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
            })
            .collect()
    }

    /// The chain every kernel must compute: fused multiply-adds over `k` in order, from zero.
    fn chained(x: &[f32], rows: usize, w: &[f32], outputs: usize, inputs: usize) -> Vec<f32> {
        let mut y = vec![0.0f32; rows * outputs];
        for r in 0..rows {
            for o in 0..outputs {
                let mut acc = 0.0f32;
                for k in 0..inputs {
                    acc = x[r * inputs + k].mul_add(w[o * inputs + k], acc);
                }
                y[r * outputs + o] = acc;
            }
        }
        y
    }

    fn bits(values: &[f32]) -> Vec<u32> {
        values.iter().map(|v| v.to_bits()).collect()
    }

    #[test]
    fn packing_both_layouts_gives_the_same_panels_and_unpacks_back() {
        let (outputs, inputs) = (37, 11);
        let out_in = random(outputs * inputs, 1);
        let in_out = crate::projection::transpose(&out_in, outputs, inputs);
        let panels = pack_out_in(&out_in, outputs, inputs);
        assert_eq!(panels.len(), 3 * inputs * PANEL);
        assert_eq!(panels, pack_in_out(&in_out, inputs, outputs));
        assert_eq!(unpack_out_in(&panels, outputs, inputs), out_in);
        // Output 17 is lane 1 of panel 1; the padding lanes are zero.
        assert_eq!(panels[(inputs + 4) * PANEL + 1], out_in[17 * inputs + 4]);
        assert!(
            panels[2 * inputs * PANEL..]
                .chunks(PANEL)
                .all(|l| l[5..] == [0.0; 11])
        );
    }

    #[test]
    fn every_kernel_computes_the_same_chain_of_multiply_adds_for_any_shape() {
        // Outputs that fill no panel, one, an odd number of them, a partial pair; rows across
        // tile sizes (with and without the prefetch above eight rows) and past one row block.
        for (outputs, inputs) in [(5, 3), (16, 1), (48, 17), (129, 40), (300, 64)] {
            for rows in [1, 2, 3, 5, 6, 7, 8, 9, 12, 13, 18, 24, 65, 70] {
                let x = random(rows * inputs, (outputs * 1000 + rows) as u64);
                let w = random(outputs * inputs, inputs as u64);
                let want = bits(&chained(&x, rows, &w, outputs, inputs));
                let panels = pack_out_in(&w, outputs, inputs);
                for kernel in Simd::available() {
                    let got = panel_matmul_with(kernel, &x, rows, &panels, outputs, inputs);
                    assert_eq!(
                        bits(&got),
                        want,
                        "{kernel:?}: {rows} rows × [{outputs}, {inputs}]"
                    );
                }
            }
        }
    }

    /// f16 panels are read as the f32 values they hold: every kernel gives the chain of the f32
    /// weights of the same values, bit for bit, through the tensor entry point too.
    #[test]
    fn half_panels_compute_the_chain_of_their_values() {
        for (outputs, inputs) in [(5, 3), (48, 17), (300, 64)] {
            let w: Vec<f32> = random(outputs * inputs, 11)
                .into_iter()
                .map(|v| f16::from_f32(v).to_f32())
                .collect();
            let half: Vec<f16> = pack_out_in(&w, outputs, inputs)
                .into_iter()
                .map(f16::from_f32)
                .collect();
            for rows in [1, 3, 8, 9, 70] {
                let x = random(rows * inputs, (outputs + rows) as u64);
                let want = bits(&chained(&x, rows, &w, outputs, inputs));
                for kernel in Simd::available() {
                    let got = panel_matmul_with(kernel, &x, rows, &half, outputs, inputs);
                    assert_eq!(
                        bits(&got),
                        want,
                        "{kernel:?}: {rows} × [{outputs}, {inputs}]"
                    );
                }
            }
        }
        type B = burn::backend::Flex;
        let device = Default::default();
        let (rows, outputs, inputs) = (2, 20, 6);
        let x = random(rows * inputs, 12);
        let w: Vec<f32> = random(outputs * inputs, 13)
            .into_iter()
            .map(|v| f16::from_f32(v).to_f32())
            .collect();
        let half: Vec<f16> = pack_out_in(&w, outputs, inputs)
            .into_iter()
            .map(f16::from_f32)
            .collect();
        let x_tensor =
            Tensor::<B, 2>::from_data(TensorData::new(x.clone(), [rows, inputs]), &device);
        let panels = Tensor::<B, 2>::from_data(TensorData::new(half, [2 * inputs, PANEL]), &device);
        let y: Vec<f32> = try_panel_matmul(&x_tensor, &panels, outputs)
            .expect("f32 rows and f16 panels on Flex")
            .into_data()
            .to_vec()
            .unwrap();
        assert_eq!(bits(&y), bits(&chained(&x, rows, &w, outputs, inputs)));
    }

    #[test]
    fn a_row_gets_the_same_bits_alone_or_in_a_tree() {
        let (outputs, inputs) = (960, 576);
        let rows = 18;
        let x = random(rows * inputs, 7);
        let panels = pack_out_in(&random(outputs * inputs, 8), outputs, inputs);
        let all = panel_matmul(&x, rows, &panels, outputs, inputs).unwrap();
        for r in 0..rows {
            let alone =
                panel_matmul(&x[r * inputs..][..inputs], 1, &panels, outputs, inputs).unwrap();
            assert_eq!(
                bits(&alone),
                bits(&all[r * outputs..][..outputs]),
                "row {r}"
            );
        }
        assert!(panel_matmul(&x, rows + 1, &panels, outputs, inputs).is_none());
        assert!(panel_matmul(&x, rows, &panels, outputs + 16, inputs).is_none());
    }

    #[test]
    fn tensors_take_the_kernel_and_mismatched_panels_are_declined() {
        type B = burn::backend::Flex;
        let device = Default::default();
        let (rows, outputs, inputs) = (3, 20, 6);
        let x = random(rows * inputs, 3);
        let w = random(outputs * inputs, 4);
        let panels = pack_out_in(&w, outputs, inputs);
        let x_tensor =
            Tensor::<B, 2>::from_data(TensorData::new(x.clone(), [rows, inputs]), &device);
        let panel_tensor =
            Tensor::<B, 2>::from_data(TensorData::new(panels, [2 * inputs, PANEL]), &device);
        let y = try_panel_matmul(&x_tensor, &panel_tensor, outputs).expect("f32 on Flex");
        assert_eq!(y.dims(), [rows, outputs]);
        let y: Vec<f32> = y.into_data().to_vec().unwrap();
        assert_eq!(bits(&y), bits(&chained(&x, rows, &w, outputs, inputs)));
        // A column view of `x` (not contiguous) gives the same product.
        let wide = Tensor::<B, 2>::cat(vec![x_tensor.clone(), x_tensor.clone()], 1);
        let view = wide.slice([0..rows, inputs..2 * inputs]);
        let y_view: Vec<f32> = try_panel_matmul(&view, &panel_tensor, outputs)
            .unwrap()
            .into_data()
            .to_vec()
            .unwrap();
        assert_eq!(bits(&y_view), bits(&y));
        assert!(try_panel_matmul(&x_tensor, &panel_tensor, 40).is_none());
        let half = x_tensor.cast(burn::tensor::DType::F16);
        let half_panels = panel_tensor.cast(burn::tensor::DType::F16);
        assert!(try_panel_matmul(&half, &half_panels, outputs).is_none());
    }
}
