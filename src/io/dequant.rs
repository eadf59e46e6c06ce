//! ggml tensor types and their dequantisation to f32.
//!
//! Every quantised ggml type stores a tensor as a sequence of fixed-size blocks; each block
//! encodes `block_size` consecutive values of a row. The functions here follow the block
//! layouts of ggml's reference `dequantize_row_*` implementations exactly, including the order
//! of the floating-point operations, so the results are bit-identical to ggml's (and gguf-py's).

use half::{bf16, f16};

use crate::error::{Error, Result};

/// Values per super-block of the k-quants (`QK_K` in ggml).
const QK_K: usize = 256;

/// A ggml tensor element type, as stored in a GGUF tensor table.
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2_K,
    Q3_K,
    Q4_K,
    Q5_K,
    Q6_K,
    Q8_K,
    IQ2_XXS,
    IQ2_XS,
    IQ3_XXS,
    IQ1_S,
    IQ4_NL,
    IQ3_S,
    IQ2_S,
    IQ4_XS,
    I8,
    I16,
    I32,
    I64,
    F64,
    IQ1_M,
    BF16,
    TQ1_0,
    TQ2_0,
    MXFP4,
}

/// (type, ggml id, name, values per block, bytes per block), from ggml's type traits.
/// Knowing the sizes of types we cannot dequantise still lets a file that contains them open:
/// its other tensors stay usable and the data ranges can be validated.
const TYPE_TABLE: &[(GgmlType, u32, &str, usize, usize)] = &[
    (GgmlType::F32, 0, "F32", 1, 4),
    (GgmlType::F16, 1, "F16", 1, 2),
    (GgmlType::Q4_0, 2, "Q4_0", 32, 18),
    (GgmlType::Q4_1, 3, "Q4_1", 32, 20),
    (GgmlType::Q5_0, 6, "Q5_0", 32, 22),
    (GgmlType::Q5_1, 7, "Q5_1", 32, 24),
    (GgmlType::Q8_0, 8, "Q8_0", 32, 34),
    (GgmlType::Q8_1, 9, "Q8_1", 32, 40),
    (GgmlType::Q2_K, 10, "Q2_K", QK_K, 84),
    (GgmlType::Q3_K, 11, "Q3_K", QK_K, 110),
    (GgmlType::Q4_K, 12, "Q4_K", QK_K, 144),
    (GgmlType::Q5_K, 13, "Q5_K", QK_K, 176),
    (GgmlType::Q6_K, 14, "Q6_K", QK_K, 210),
    (GgmlType::Q8_K, 15, "Q8_K", QK_K, 292),
    (GgmlType::IQ2_XXS, 16, "IQ2_XXS", QK_K, 66),
    (GgmlType::IQ2_XS, 17, "IQ2_XS", QK_K, 74),
    (GgmlType::IQ3_XXS, 18, "IQ3_XXS", QK_K, 98),
    (GgmlType::IQ1_S, 19, "IQ1_S", QK_K, 50),
    (GgmlType::IQ4_NL, 20, "IQ4_NL", 32, 18),
    (GgmlType::IQ3_S, 21, "IQ3_S", QK_K, 110),
    (GgmlType::IQ2_S, 22, "IQ2_S", QK_K, 82),
    (GgmlType::IQ4_XS, 23, "IQ4_XS", QK_K, 136),
    (GgmlType::I8, 24, "I8", 1, 1),
    (GgmlType::I16, 25, "I16", 1, 2),
    (GgmlType::I32, 26, "I32", 1, 4),
    (GgmlType::I64, 27, "I64", 1, 8),
    (GgmlType::F64, 28, "F64", 1, 8),
    (GgmlType::IQ1_M, 29, "IQ1_M", QK_K, 56),
    (GgmlType::BF16, 30, "BF16", 1, 2),
    (GgmlType::TQ1_0, 34, "TQ1_0", QK_K, 54),
    (GgmlType::TQ2_0, 35, "TQ2_0", QK_K, 66),
    (GgmlType::MXFP4, 39, "MXFP4", 32, 17),
];

impl GgmlType {
    fn entry(self) -> (GgmlType, u32, &'static str, usize, usize) {
        // The table lists every variant, so the fallback is never taken; it keeps this total
        // without a panic path.
        TYPE_TABLE.iter().copied().find(|e| e.0 == self).unwrap_or((
            self,
            u32::MAX,
            "unknown",
            1,
            1,
        ))
    }

    /// The type with ggml id `id`, or `None` for ids this crate does not know.
    pub fn from_id(id: u32) -> Option<Self> {
        TYPE_TABLE.iter().find(|e| e.1 == id).map(|e| e.0)
    }

    /// ggml's numeric id of the type.
    pub fn id(self) -> u32 {
        self.entry().1
    }

    /// ggml's name of the type (`"Q4_K"`, ...).
    pub fn name(self) -> &'static str {
        self.entry().2
    }

    /// Number of values one block encodes.
    pub fn block_size(self) -> usize {
        self.entry().3
    }

    /// Number of bytes one block occupies.
    pub fn type_size(self) -> usize {
        self.entry().4
    }

    /// Whether [`dequantize`] supports this type.
    pub fn can_dequantize(self) -> bool {
        matches!(
            self,
            GgmlType::F32
                | GgmlType::F16
                | GgmlType::BF16
                | GgmlType::Q4_0
                | GgmlType::Q4_1
                | GgmlType::Q5_0
                | GgmlType::Q5_1
                | GgmlType::Q8_0
                | GgmlType::Q2_K
                | GgmlType::Q3_K
                | GgmlType::Q4_K
                | GgmlType::Q5_K
                | GgmlType::Q6_K
        )
    }

    /// Bytes needed for `n_elements` values, or `None` when `n_elements` is not a whole number
    /// of blocks or the size overflows.
    pub fn bytes_for(self, n_elements: u64) -> Option<u64> {
        let block = self.block_size() as u64;
        if !n_elements.is_multiple_of(block) {
            return None;
        }
        (n_elements / block).checked_mul(self.type_size() as u64)
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Dequantises `data`, the raw bytes of tensor `tensor` of type `ty`, to `n_elements` f32 values.
///
/// `tensor` only names the tensor in error messages.
pub fn dequantize(tensor: &str, ty: GgmlType, data: &[u8], n_elements: usize) -> Result<Vec<f32>> {
    let mut out = vec![0.0f32; n_elements];
    dequantize_into(tensor, ty, data, &mut out)?;
    Ok(out)
}

/// Like [`dequantize`], writing into `out`, whose length is the number of values.
pub fn dequantize_into(tensor: &str, ty: GgmlType, data: &[u8], out: &mut [f32]) -> Result<()> {
    if !ty.can_dequantize() {
        return Err(Error::UnsupportedQuantization {
            tensor: tensor.to_string(),
            kind: ty.name().to_string(),
        });
    }
    let expected = ty.bytes_for(out.len() as u64);
    if expected != Some(data.len() as u64) {
        return Err(Error::InvalidGguf(format!(
            "tensor `{tensor}`: {} values of type {ty} need {} bytes, got {}",
            out.len(),
            expected.map_or_else(
                || "a whole number of blocks and".to_string(),
                |b| b.to_string()
            ),
            data.len()
        )));
    }
    match ty {
        GgmlType::F32 => f32_row(data, out),
        GgmlType::F16 => f16_row(data, out),
        GgmlType::BF16 => bf16_row(data, out),
        GgmlType::Q4_0 => blocks::<18, 32>(data, out, q4_0_block),
        GgmlType::Q4_1 => blocks::<20, 32>(data, out, q4_1_block),
        GgmlType::Q5_0 => blocks::<22, 32>(data, out, q5_0_block),
        GgmlType::Q5_1 => blocks::<24, 32>(data, out, q5_1_block),
        GgmlType::Q8_0 => blocks::<34, 32>(data, out, q8_0_block),
        GgmlType::Q2_K => blocks::<84, QK_K>(data, out, q2_k_block),
        GgmlType::Q3_K => blocks::<110, QK_K>(data, out, q3_k_block),
        GgmlType::Q4_K => blocks::<144, QK_K>(data, out, q4_k_block),
        GgmlType::Q5_K => blocks::<176, QK_K>(data, out, q5_k_block),
        GgmlType::Q6_K => blocks::<210, QK_K>(data, out, q6_k_block),
        // `can_dequantize` rejected everything else above.
        _ => {}
    }
    Ok(())
}

/// Applies `f` to each `BYTES`-byte block of `data` and the matching `VALUES` outputs.
/// Fixed-size arrays make every index inside the block functions compile-time checked.
fn blocks<const BYTES: usize, const VALUES: usize>(
    data: &[u8],
    out: &mut [f32],
    f: fn(&[u8; BYTES], &mut [f32; VALUES]),
) {
    let (inputs, _) = data.as_chunks::<BYTES>();
    let (outputs, _) = out.as_chunks_mut::<VALUES>();
    for (block, y) in inputs.iter().zip(outputs.iter_mut()) {
        f(block, y);
    }
}

#[inline]
fn f16_at(bytes: [u8; 2]) -> f32 {
    f16::from_le_bytes(bytes).to_f32()
}

fn f32_row(data: &[u8], out: &mut [f32]) {
    let (inputs, _) = data.as_chunks::<4>();
    for (x, y) in inputs.iter().zip(out.iter_mut()) {
        *y = f32::from_le_bytes(*x);
    }
}

fn f16_row(data: &[u8], out: &mut [f32]) {
    let (inputs, _) = data.as_chunks::<2>();
    for (x, y) in inputs.iter().zip(out.iter_mut()) {
        *y = f16_at(*x);
    }
}

fn bf16_row(data: &[u8], out: &mut [f32]) {
    let (inputs, _) = data.as_chunks::<2>();
    for (x, y) in inputs.iter().zip(out.iter_mut()) {
        *y = bf16::from_le_bytes(*x).to_f32();
    }
}

/// Q4_0: f16 scale `d`, then 16 bytes of 4-bit quants; low nibbles are values 0..16, high
/// nibbles values 16..32; value = (q - 8) * d.
fn q4_0_block(b: &[u8; 18], y: &mut [f32; 32]) {
    let d = f16_at([b[0], b[1]]);
    for j in 0..16 {
        let q = b[2 + j];
        y[j] = ((q & 0x0F) as i32 - 8) as f32 * d;
        y[j + 16] = ((q >> 4) as i32 - 8) as f32 * d;
    }
}

/// Q4_1: f16 scale `d`, f16 offset `m`, 16 bytes of nibbles; value = q * d + m.
fn q4_1_block(b: &[u8; 20], y: &mut [f32; 32]) {
    let d = f16_at([b[0], b[1]]);
    let m = f16_at([b[2], b[3]]);
    for j in 0..16 {
        let q = b[4 + j];
        y[j] = (q & 0x0F) as f32 * d + m;
        y[j + 16] = (q >> 4) as f32 * d + m;
    }
}

/// Q5_0: f16 `d`, a little-endian u32 holding the fifth bit of each of the 32 values, then the
/// low nibbles as in Q4_0; value = (q - 16) * d.
fn q5_0_block(b: &[u8; 22], y: &mut [f32; 32]) {
    let d = f16_at([b[0], b[1]]);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    for j in 0..16 {
        let q = b[6 + j];
        let h0 = ((qh >> j) & 1) << 4;
        let h1 = ((qh >> (j + 16)) & 1) << 4;
        y[j] = (((q & 0x0F) as u32 | h0) as i32 - 16) as f32 * d;
        y[j + 16] = (((q >> 4) as u32 | h1) as i32 - 16) as f32 * d;
    }
}

/// Q5_1: f16 `d`, f16 `m`, u32 of fifth bits, nibbles; value = q * d + m.
fn q5_1_block(b: &[u8; 24], y: &mut [f32; 32]) {
    let d = f16_at([b[0], b[1]]);
    let m = f16_at([b[2], b[3]]);
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    for j in 0..16 {
        let q = b[8 + j];
        let h0 = ((qh >> j) & 1) << 4;
        let h1 = ((qh >> (j + 16)) & 1) << 4;
        y[j] = ((q & 0x0F) as u32 | h0) as f32 * d + m;
        y[j + 16] = ((q >> 4) as u32 | h1) as f32 * d + m;
    }
}

/// Q8_0: f16 `d`, 32 signed bytes; value = q * d.
fn q8_0_block(b: &[u8; 34], y: &mut [f32; 32]) {
    let d = f16_at([b[0], b[1]]);
    for j in 0..32 {
        y[j] = (b[2 + j] as i8) as f32 * d;
    }
}

/// Q2_K: 16 bytes of 4-bit scale/min pairs, 64 bytes of 2-bit quants, f16 `d`, f16 `dmin`.
/// Each 128-value half uses 32 quant bytes at four shifts; each 16-value group has its own
/// scale (`d * (s & 15)`) and min (`dmin * (s >> 4)`).
fn q2_k_block(b: &[u8; 84], y: &mut [f32; QK_K]) {
    let d = f16_at([b[80], b[81]]);
    let dmin = f16_at([b[82], b[83]]);
    let mut is = 0;
    let mut out = 0;
    for half in 0..2 {
        let q = 16 + 32 * half;
        for shift in [0, 2, 4, 6] {
            for part in 0..2 {
                let sc = b[is];
                is += 1;
                let dl = d * (sc & 0x0F) as f32;
                let ml = dmin * (sc >> 4) as f32;
                for l in 0..16 {
                    let v = (b[q + 16 * part + l] >> shift) & 3;
                    y[out] = dl * v as f32 - ml;
                    out += 1;
                }
            }
        }
    }
}

/// The 16 6-bit signed scales of a Q3_K block, unpacked from 12 bytes: the low four bits of
/// scale `i` are nibble `i / 8` of byte `i % 8`, the high two bits are bits `2 * (i / 4)` of
/// byte `8 + i % 4`; the stored value is offset by 32.
fn q3_k_scales(s: &[u8; 12]) -> [i32; 16] {
    let mut out = [0i32; 16];
    for (i, o) in out.iter_mut().enumerate() {
        let low = (s[i % 8] >> (4 * (i / 8))) & 0x0F;
        let high = (s[8 + i % 4] >> (2 * (i / 4))) & 0x03;
        *o = (low | (high << 4)) as i32 - 32;
    }
    out
}

/// Q3_K: 32 bytes of high-bit masks, 64 bytes of 2-bit low quants, 12 bytes of packed scales,
/// f16 `d`. A value is `d * scale * (low - (high bit clear ? 4 : 0))`.
fn q3_k_block(b: &[u8; 110], y: &mut [f32; QK_K]) {
    let mut packed = [0u8; 12];
    packed.copy_from_slice(&b[96..108]);
    let scales = q3_k_scales(&packed);
    let d = f16_at([b[108], b[109]]);
    let mut is = 0;
    let mut out = 0;
    let mut mask_bit = 0;
    for half in 0..2 {
        let q = 32 + 32 * half;
        for shift in [0, 2, 4, 6] {
            for part in 0..2 {
                let dl = d * scales[is] as f32;
                is += 1;
                for l in 0..16 {
                    let idx = 16 * part + l;
                    let low = ((b[q + idx] >> shift) & 3) as i32;
                    let high = if b[idx] & (1 << mask_bit) != 0 { 0 } else { 4 };
                    y[out] = dl * (low - high) as f32;
                    out += 1;
                }
            }
            mask_bit += 1;
        }
    }
}

/// Scale and min of sub-block `j` (0..8) of a Q4_K/Q5_K block, packed as 6-bit values in 12
/// bytes (ggml's `get_scale_min_k4`).
#[inline]
fn scale_min_k4(j: usize, q: &[u8; 12]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

fn k_scales(b: &[u8]) -> [u8; 12] {
    let mut s = [0u8; 12];
    s.copy_from_slice(&b[4..16]);
    s
}

/// Q4_K: f16 `d`, f16 `dmin`, 12 bytes of packed 6-bit scales/mins, 128 bytes of nibbles. Each
/// 64 values use 32 bytes: low nibbles with sub-block `2k`, high nibbles with `2k + 1`.
fn q4_k_block(b: &[u8; 144], y: &mut [f32; QK_K]) {
    let d = f16_at([b[0], b[1]]);
    let dmin = f16_at([b[2], b[3]]);
    let scales = k_scales(b);
    for k in 0..4 {
        let (sc1, m1) = scale_min_k4(2 * k, &scales);
        let (sc2, m2) = scale_min_k4(2 * k + 1, &scales);
        let (d1, m1) = (d * sc1 as f32, dmin * m1 as f32);
        let (d2, m2) = (d * sc2 as f32, dmin * m2 as f32);
        let q = 16 + 32 * k;
        for l in 0..32 {
            y[64 * k + l] = d1 * (b[q + l] & 0x0F) as f32 - m1;
            y[64 * k + 32 + l] = d2 * (b[q + l] >> 4) as f32 - m2;
        }
    }
}

/// Q5_K: as Q4_K with 32 bytes of fifth bits (at byte 16) before the nibbles (at byte 48);
/// the pair of sub-blocks `k` uses bits `2k` and `2k + 1` of each high-bit byte.
fn q5_k_block(b: &[u8; 176], y: &mut [f32; QK_K]) {
    let d = f16_at([b[0], b[1]]);
    let dmin = f16_at([b[2], b[3]]);
    let scales = k_scales(b);
    for k in 0..4 {
        let (sc1, m1) = scale_min_k4(2 * k, &scales);
        let (sc2, m2) = scale_min_k4(2 * k + 1, &scales);
        let (d1, m1) = (d * sc1 as f32, dmin * m1 as f32);
        let (d2, m2) = (d * sc2 as f32, dmin * m2 as f32);
        let q = 48 + 32 * k;
        for l in 0..32 {
            let h = b[16 + l];
            let h1 = if h & (1 << (2 * k)) != 0 { 16 } else { 0 };
            let h2 = if h & (1 << (2 * k + 1)) != 0 { 16 } else { 0 };
            y[64 * k + l] = d1 * ((b[q + l] & 0x0F) + h1) as f32 - m1;
            y[64 * k + 32 + l] = d2 * ((b[q + l] >> 4) + h2) as f32 - m2;
        }
    }
}

/// Q6_K: 128 bytes of low nibbles, 64 bytes of 2-bit high parts, 16 signed 8-bit scales, f16
/// `d`. Each 128-value half uses 64 low bytes, 32 high bytes and 8 scales (one per 16 values).
fn q6_k_block(b: &[u8; 210], y: &mut [f32; QK_K]) {
    let d = f16_at([b[208], b[209]]);
    for half in 0..2 {
        let ql = 64 * half;
        let qh = 128 + 32 * half;
        let sc = 192 + 8 * half;
        let out = 128 * half;
        for l in 0..32 {
            let is = l / 16;
            let h = b[qh + l];
            let q1 = ((b[ql + l] & 0x0F) | ((h & 3) << 4)) as i32 - 32;
            let q2 = ((b[ql + l + 32] & 0x0F) | (((h >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((b[ql + l] >> 4) | (((h >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((b[ql + l + 32] >> 4) | (((h >> 6) & 3) << 4)) as i32 - 32;
            let s = |k: usize| b[sc + is + k] as i8 as f32;
            y[out + l] = d * s(0) * q1 as f32;
            y[out + l + 32] = d * s(2) * q2 as f32;
            y[out + l + 64] = d * s(4) * q3 as f32;
            y[out + l + 96] = d * s(6) * q4 as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fixture written by `scripts/make_dequant_fixtures.py`: u32 ggml type id, u32 block
    /// count, the raw blocks, then gguf-py's dequantised f32 values (all little-endian).
    fn check_fixture(bytes: &[u8], ty: GgmlType) {
        let word = |i: usize| u32::from_le_bytes(bytes[4 * i..4 * i + 4].try_into().unwrap());
        assert_eq!(word(0), ty.id(), "fixture is for another type");
        let n_blocks = word(1) as usize;
        let raw_len = n_blocks * ty.type_size();
        let n = n_blocks * ty.block_size();
        let raw = &bytes[8..8 + raw_len];
        let expected: Vec<f32> = bytes[8 + raw_len..]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(expected.len(), n, "fixture length");
        let got = dequantize("fixture", ty, raw, n).unwrap();
        let mut nonzero = 0;
        for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
            assert!(e.is_finite(), "{ty}: fixture value {i} is not finite");
            let tol = 1e-6 * e.abs().max(f32::MIN_POSITIVE);
            assert!(
                (g - e).abs() <= tol,
                "{ty}: value {i}: got {g}, gguf-py {e}"
            );
            nonzero += usize::from(*e != 0.0);
        }
        // Guard against a degenerate fixture that would pass any implementation.
        assert!(nonzero > n / 2, "{ty}: fixture is mostly zeros");
    }

    macro_rules! fixture_test {
        ($name:ident, $ty:expr, $file:literal) => {
            #[test]
            fn $name() {
                check_fixture(
                    include_bytes!(concat!(
                        env!("CARGO_MANIFEST_DIR"),
                        "/tests/fixtures/dequant/",
                        $file
                    )),
                    $ty,
                );
            }
        };
    }

    fixture_test!(f32_matches_gguf_py, GgmlType::F32, "f32.bin");
    fixture_test!(f16_matches_gguf_py, GgmlType::F16, "f16.bin");
    fixture_test!(bf16_matches_gguf_py, GgmlType::BF16, "bf16.bin");
    fixture_test!(q4_0_matches_gguf_py, GgmlType::Q4_0, "q4_0.bin");
    fixture_test!(q4_1_matches_gguf_py, GgmlType::Q4_1, "q4_1.bin");
    fixture_test!(q5_0_matches_gguf_py, GgmlType::Q5_0, "q5_0.bin");
    fixture_test!(q5_1_matches_gguf_py, GgmlType::Q5_1, "q5_1.bin");
    fixture_test!(q8_0_matches_gguf_py, GgmlType::Q8_0, "q8_0.bin");
    fixture_test!(q2_k_matches_gguf_py, GgmlType::Q2_K, "q2_k.bin");
    fixture_test!(q3_k_matches_gguf_py, GgmlType::Q3_K, "q3_k.bin");
    fixture_test!(q4_k_matches_gguf_py, GgmlType::Q4_K, "q4_k.bin");
    fixture_test!(q5_k_matches_gguf_py, GgmlType::Q5_K, "q5_k.bin");
    fixture_test!(q6_k_matches_gguf_py, GgmlType::Q6_K, "q6_k.bin");

    #[test]
    fn type_table_is_consistent() {
        for &(ty, id, name, block, size) in TYPE_TABLE {
            assert_eq!(GgmlType::from_id(id), Some(ty));
            assert_eq!(
                (ty.id(), ty.name(), ty.block_size(), ty.type_size()),
                (id, name, block, size)
            );
        }
        assert_eq!(
            GgmlType::from_id(4),
            None,
            "ids 4 and 5 were removed from ggml"
        );
        assert_eq!(GgmlType::from_id(1000), None);
        assert_eq!(GgmlType::Q4_K.bytes_for(512), Some(288));
        assert_eq!(GgmlType::Q4_K.bytes_for(100), None);
    }

    #[test]
    fn wrong_byte_count_is_an_error() {
        let err = dequantize("t", GgmlType::Q8_0, &[0u8; 33], 32).unwrap_err();
        assert!(matches!(err, Error::InvalidGguf(_)), "{err}");
        let err = dequantize("t", GgmlType::Q8_0, &[0u8; 34], 31).unwrap_err();
        assert!(matches!(err, Error::InvalidGguf(_)), "{err}");
    }

    #[test]
    fn unsupported_type_names_tensor_and_type() {
        let err =
            dequantize("blk.0.attn_q.weight", GgmlType::IQ2_XXS, &[0u8; 66], 256).unwrap_err();
        match err {
            Error::UnsupportedQuantization { tensor, kind } => {
                assert_eq!(tensor, "blk.0.attn_q.weight");
                assert_eq!(kind, "IQ2_XXS");
            }
            other => panic!("unexpected error {other}"),
        }
    }

    #[test]
    fn q8_0_by_hand() {
        // d = 0.5 (f16 0x3800), quants 0, 1, -1, 127, -128, ...
        let mut block = vec![0x00, 0x38];
        let qs: Vec<i8> = (0..32).map(|i| [0, 1, -1, 127, -128][i % 5]).collect();
        block.extend(qs.iter().map(|&q| q as u8));
        let y = dequantize("t", GgmlType::Q8_0, &block, 32).unwrap();
        for (v, q) in y.iter().zip(&qs) {
            assert_eq!(*v, *q as f32 * 0.5);
        }
    }
}
