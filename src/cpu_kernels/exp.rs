//! `exp` for f32 in operations the compiler can vectorise, for the softmax of the CPU attention
//! and the SiLU of SwiGLU.
//!
//! The C library's `expf` is a call per element: a 5-token verification forward of SmolLM2
//! spent 1.3 CPU-ms in it (~350,000 calls: 15 query rows × 261 slots of softmax and 5 × 1,536
//! SiLUs in each of 30 layers; perf, docs/benchmarks.md session 31). This one is plain
//! arithmetic — a range reduction, a polynomial and an exponent built from integer bits — so a
//! loop over a row compiles to 16-lane AVX-512 (or 8-lane AVX2) code in the kernels' multiversioned
//! functions. Every step is an IEEE operation or a fused multiply-add, so a value's result does
//! not depend on the instruction set, the lane it falls in or its neighbours: a token's softmax in
//! a draft tree equals its softmax when decoded alone, bit for bit.

/// `1 / ln 2`.
const LOG2_E: f32 = std::f32::consts::LOG2_E;
/// `ln 2` split in two (Cody and Waite): `n · LN2_HI` is exact for the `|n| ≤ 127` used here,
/// and `LN2_LO` carries the rest, so `x − n · ln 2` keeps its low bits.
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// `1.5 · 2²³`: adding it rounds a float of magnitude below 2²² to an integer (ties to even)
/// and leaves that integer in the sum's low mantissa bits.
const ROUNDER: f32 = 12_582_912.0;
/// Below this, `exp` returns exactly zero (the true value is under 1.7e-38, at the bottom of
/// f32's normal range): a masked attention slot (bias −10⁹) gets a probability of exactly 0.
const ZERO_BELOW: f32 = -87.0;
/// Above this, `exp` returns infinity (the true value overflows f32 above 88.72; up to here
/// `n ≤ 127`, a finite power of two).
const INFINITE_ABOVE: f32 = 88.3;

/// `eˣ` with a relative error below 3·10⁻⁷ for `−87 ≤ x ≤ 88.3`; exactly 0 below −87, infinity
/// above 88.3, NaN for NaN.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    let clamped = x.clamp(ZERO_BELOW, INFINITE_ABOVE);
    // eˣ = 2ⁿ · eʳ with n = round(x / ln 2) and |r| ≤ ln 2 / 2.
    let shifted = clamped * LOG2_E + ROUNDER;
    let n = shifted - ROUNDER;
    let r = n.mul_add(-LN2_HI, clamped);
    let r = n.mul_add(-LN2_LO, r);
    // eʳ by its Taylor series to r⁷ (truncation error below 2·10⁻⁸ on |r| ≤ 0.347).
    let mut p: f32 = 1.0 / 5040.0;
    for c in [
        1.0 / 720.0,
        1.0 / 120.0,
        1.0 / 24.0,
        1.0 / 6.0,
        0.5,
        1.0,
        1.0,
    ] {
        p = p.mul_add(r, c);
    }
    // 2ⁿ from n's bits in `shifted`: its low 9 bits are n mod 512, so (n + 127) shifted into the
    // exponent field (1 ≤ n + 127 ≤ 255 here).
    let scale = f32::from_bits(shifted.to_bits().wrapping_add(127) << 23);
    let y = p * scale;
    if x < ZERO_BELOW {
        0.0
    } else if x > INFINITE_ABOVE {
        f32::INFINITY
    } else {
        y
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_exact_exponential() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x <= 88.3 {
            let want = f64::from(x).exp();
            let got = f64::from(exp(x));
            worst = worst.max(((got - want) / want).abs());
            x += 0.000_37;
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
        for x in [0.0f32, -0.0, 1.0, -1.0, 0.5, -1e-8, 1e-8] {
            let want = f64::from(x).exp();
            assert!(((f64::from(exp(x)) - want) / want).abs() < 3e-7, "exp({x})");
        }
        assert_eq!(exp(0.0), 1.0);
    }

    #[test]
    fn the_ends_of_the_range() {
        assert_eq!(exp(-87.01), 0.0);
        assert_eq!(exp(-1.0e9), 0.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(89.0), f32::INFINITY);
        assert_eq!(exp(f32::INFINITY), f32::INFINITY);
        assert!(exp(f32::NAN).is_nan());
        assert!(exp(-87.0) > 0.0 && exp(-87.0).is_normal());
        assert!(exp(88.3).is_finite());
    }
}
