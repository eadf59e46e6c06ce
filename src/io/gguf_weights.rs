//! A GGUF Llama checkpoint seen through Hugging Face tensor names.
//!
//! llama.cpp renames tensors (`model.layers.0.self_attn.q_proj.weight` becomes
//! `blk.0.attn_q.weight`) and, for Llama, permutes the rows of the Q and K projections so its
//! RoPE can rotate adjacent pairs `(x[2i], x[2i+1])`. HF Llama rotates the two halves of each
//! head (`rotate_half`), so [`GgufWeights`] undoes that permutation: the tensors it yields are
//! the ones of the original HF checkpoint, ready for a model that uses HF RoPE.

use std::path::Path;

use super::WeightSource;
use super::gguf::GgufFile;
use crate::error::{Error, Result};
use crate::models::llama::LlamaConfig;

/// Per-layer HF suffix ↔ llama.cpp suffix, after `model.layers.{i}.` ↔ `blk.{i}.`.
const LAYER_NAMES: &[(&str, &str)] = &[
    ("self_attn.q_proj", "attn_q"),
    ("self_attn.k_proj", "attn_k"),
    ("self_attn.v_proj", "attn_v"),
    ("self_attn.o_proj", "attn_output"),
    ("mlp.gate_proj", "ffn_gate"),
    ("mlp.up_proj", "ffn_up"),
    ("mlp.down_proj", "ffn_down"),
    ("input_layernorm", "attn_norm"),
    ("post_attention_layernorm", "ffn_norm"),
];

/// Whole-model HF name ↔ llama.cpp name.
const GLOBAL_NAMES: &[(&str, &str)] = &[
    ("model.embed_tokens.weight", "token_embd.weight"),
    ("model.norm.weight", "output_norm.weight"),
    ("lm_head.weight", "output.weight"),
];

/// The llama.cpp name of HF tensor `hf_name`, or `None` if it has no GGUF counterpart.
pub fn hf_to_gguf_name(hf_name: &str) -> Option<String> {
    if let Some(&(_, g)) = GLOBAL_NAMES.iter().find(|(h, _)| *h == hf_name) {
        return Some(g.to_string());
    }
    let rest = hf_name.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, param) = rest.rsplit_once('.')?;
    if param != "weight" && param != "bias" {
        return None;
    }
    let &(_, g) = LAYER_NAMES.iter().find(|(h, _)| *h == module)?;
    Some(format!("blk.{layer}.{g}.{param}"))
}

/// The HF name of llama.cpp tensor `gguf_name`, or `None` if it has no HF counterpart
/// (e.g. `rope_freqs.weight`).
pub fn gguf_to_hf_name(gguf_name: &str) -> Option<String> {
    if let Some(&(h, _)) = GLOBAL_NAMES.iter().find(|(_, g)| *g == gguf_name) {
        return Some(h.to_string());
    }
    let rest = gguf_name.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, param) = rest.rsplit_once('.')?;
    if param != "weight" && param != "bias" {
        return None;
    }
    let &(h, _) = LAYER_NAMES.iter().find(|(_, g)| *g == module)?;
    Some(format!("model.layers.{layer}.{h}.{param}"))
}

/// Which RoPE permutation, if any, HF tensor `hf_name` carries in a GGUF file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RopeRows {
    None,
    Query,
    Key,
}

fn rope_rows(hf_name: &str) -> RopeRows {
    if hf_name.contains(".self_attn.q_proj.") {
        RopeRows::Query
    } else if hf_name.contains(".self_attn.k_proj.") {
        RopeRows::Key
    } else {
        RopeRows::None
    }
}

/// Applies llama.cpp's RoPE row permutation to a `[rows, cols]` matrix (or a bias, `cols` = 1):
/// within each of the `n_head` heads of `head_dim = rows / n_head` rows, HF row
/// `j * head_dim / 2 + i` moves to row `2 * i + j` (numpy:
/// `w.reshape(n_head, 2, head_dim // 2, cols).swapaxes(1, 2).reshape(rows, cols)`).
///
/// Fails if the rows do not split into heads of even size.
pub fn permute_rope_rows(data: &[f32], rows: usize, n_head: usize) -> Result<Vec<f32>> {
    let (cols, half) = rope_geometry(data, rows, n_head)?;
    let mut out = vec![0.0; data.len()];
    for (src_row, dst_row) in rope_row_pairs(n_head, half) {
        copy_row(data, &mut out, src_row, dst_row, cols);
    }
    Ok(out)
}

/// The inverse of [`permute_rope_rows`]: turns a GGUF Q/K projection back into the HF one.
pub fn unpermute_rope_rows(data: &[f32], rows: usize, n_head: usize) -> Result<Vec<f32>> {
    let (cols, half) = rope_geometry(data, rows, n_head)?;
    let mut out = vec![0.0; data.len()];
    for (hf_row, gguf_row) in rope_row_pairs(n_head, half) {
        copy_row(data, &mut out, gguf_row, hf_row, cols);
    }
    Ok(out)
}

/// Columns and half head size of a `rows`-row matrix split into `n_head` heads.
fn rope_geometry(data: &[f32], rows: usize, n_head: usize) -> Result<(usize, usize)> {
    let bad = |why: &str| {
        Error::InvalidConfig(format!(
            "cannot undo the RoPE permutation of {rows} rows over {n_head} heads: {why}"
        ))
    };
    if n_head == 0 || !rows.is_multiple_of(n_head) || !(rows / n_head).is_multiple_of(2) {
        return Err(bad("rows must split into heads of even size"));
    }
    if rows == 0 || !data.len().is_multiple_of(rows) {
        return Err(bad("the data is not a whole number of rows"));
    }
    Ok((data.len() / rows, rows / n_head / 2))
}

/// `(hf_row, gguf_row)` for every row.
fn rope_row_pairs(n_head: usize, half: usize) -> impl Iterator<Item = (usize, usize)> {
    let head_dim = 2 * half;
    (0..n_head).flat_map(move |h| {
        (0..2).flat_map(move |j| {
            (0..half).map(move |i| (h * head_dim + j * half + i, h * head_dim + 2 * i + j))
        })
    })
}

fn copy_row(src: &[f32], dst: &mut [f32], src_row: usize, dst_row: usize, cols: usize) {
    let from = src.get(src_row * cols..(src_row + 1) * cols);
    let to = dst.get_mut(dst_row * cols..(dst_row + 1) * cols);
    // Both ranges are in bounds by construction (rows * cols == len); `get` keeps it panic-free.
    if let (Some(from), Some(to)) = (from, to) {
        to.copy_from_slice(from);
    }
}

/// A GGUF Llama checkpoint implementing [`WeightSource`] with HF names and HF layouts.
#[derive(Debug)]
pub struct GgufWeights {
    file: GgufFile,
    config: LlamaConfig,
}

impl GgufWeights {
    /// Opens `path` and reads its configuration with [`LlamaConfig::from_gguf`].
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let file = GgufFile::open(path)?;
        let config = LlamaConfig::from_gguf(&file)?;
        Ok(GgufWeights { file, config })
    }

    /// Wraps an open file; `config` supplies the head counts for undoing the Q/K permutation.
    pub fn new(file: GgufFile, config: LlamaConfig) -> Self {
        GgufWeights { file, config }
    }

    /// The model configuration used to interpret the file.
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// The underlying GGUF file (metadata, tokenizer, raw tensors).
    pub fn file(&self) -> &GgufFile {
        &self.file
    }

    /// Unwraps the GGUF file.
    pub fn into_file(self) -> GgufFile {
        self.file
    }

    /// HF names of all tensors in the file that have one, in file order.
    pub fn hf_names(&self) -> impl Iterator<Item = String> + '_ {
        self.file
            .tensors()
            .iter()
            .filter_map(|t| gguf_to_hf_name(&t.name))
    }
}

impl WeightSource for GgufWeights {
    fn tensor(&self, hf_name: &str) -> Result<(Vec<f32>, Vec<usize>)> {
        let gguf_name =
            hf_to_gguf_name(hf_name).ok_or_else(|| Error::MissingTensor(hf_name.to_string()))?;
        if self.file.tensor_info(&gguf_name).is_none() {
            return Err(Error::MissingTensor(hf_name.to_string()));
        }
        let (data, shape) = self.file.tensor_f32(&gguf_name)?;
        let n_head = match rope_rows(hf_name) {
            RopeRows::None => return Ok((data, shape)),
            RopeRows::Query => self.config.num_attention_heads,
            RopeRows::Key => self.config.num_key_value_heads,
        };
        let rows = shape.first().copied().unwrap_or(0);
        let expected_rows = n_head * self.config.head_dim();
        if rows != expected_rows {
            let mut expected = shape.clone();
            if let Some(r) = expected.first_mut() {
                *r = expected_rows;
            } else {
                expected.push(expected_rows);
            }
            return Err(Error::ShapeMismatch {
                tensor: hf_name.to_string(),
                expected,
                found: shape,
            });
        }
        let data = unpermute_rope_rows(&data, rows, n_head)?;
        Ok((data, shape))
    }

    fn contains(&self, hf_name: &str) -> bool {
        hf_to_gguf_name(hf_name).is_some_and(|g| self.file.tensor_info(&g).is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::gguf::MetadataValue;
    use crate::io::gguf::test_util::{RawTensor, build_gguf, write_temp};

    #[test]
    fn names_map_both_ways() {
        let pairs = [
            ("model.embed_tokens.weight", "token_embd.weight"),
            ("model.norm.weight", "output_norm.weight"),
            ("lm_head.weight", "output.weight"),
            (
                "model.layers.0.self_attn.q_proj.weight",
                "blk.0.attn_q.weight",
            ),
            (
                "model.layers.12.self_attn.k_proj.weight",
                "blk.12.attn_k.weight",
            ),
            (
                "model.layers.3.self_attn.v_proj.weight",
                "blk.3.attn_v.weight",
            ),
            (
                "model.layers.3.self_attn.o_proj.weight",
                "blk.3.attn_output.weight",
            ),
            (
                "model.layers.29.mlp.gate_proj.weight",
                "blk.29.ffn_gate.weight",
            ),
            ("model.layers.29.mlp.up_proj.weight", "blk.29.ffn_up.weight"),
            (
                "model.layers.29.mlp.down_proj.weight",
                "blk.29.ffn_down.weight",
            ),
            (
                "model.layers.1.input_layernorm.weight",
                "blk.1.attn_norm.weight",
            ),
            (
                "model.layers.1.post_attention_layernorm.weight",
                "blk.1.ffn_norm.weight",
            ),
            ("model.layers.1.self_attn.q_proj.bias", "blk.1.attn_q.bias"),
        ];
        for (hf, gguf) in pairs {
            assert_eq!(hf_to_gguf_name(hf).as_deref(), Some(gguf));
            assert_eq!(gguf_to_hf_name(gguf).as_deref(), Some(hf));
        }
        for bad in [
            "model.layers.x.mlp.up_proj.weight",
            "model.layers.1.mlp.side_proj.weight",
            "model.layers.1.mlp.up_proj.scale",
            "model.layers.1",
            "rope_freqs.weight",
            "",
        ] {
            assert_eq!(hf_to_gguf_name(bad), None, "{bad}");
            assert_eq!(gguf_to_hf_name(bad), None, "{bad}");
        }
    }

    /// numpy's `w.reshape(n_head, 2, hd // 2, cols).swapaxes(1, 2).reshape(rows, cols)`, written
    /// as index arithmetic independent of `rope_row_pairs`.
    fn numpy_permute(w: &[f32], rows: usize, cols: usize, n_head: usize) -> Vec<f32> {
        let hd = rows / n_head;
        let mut out = Vec::with_capacity(w.len());
        // Output axes after swapaxes: (head, half index, pair index, col).
        for h in 0..n_head {
            for i in 0..hd / 2 {
                for j in 0..2 {
                    let src = h * hd + j * (hd / 2) + i;
                    out.extend_from_slice(&w[src * cols..(src + 1) * cols]);
                }
            }
        }
        out
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permutation() {
        for (n_head, head_dim, cols) in [(3, 4, 5), (2, 8, 1), (1, 2, 3), (9, 64, 2)] {
            let rows = n_head * head_dim;
            let w: Vec<f32> = (0..rows * cols).map(|x| x as f32).collect();
            let permuted = permute_rope_rows(&w, rows, n_head).unwrap();
            assert_eq!(permuted, numpy_permute(&w, rows, cols, n_head));
            if head_dim > 2 {
                assert_ne!(permuted, w, "the permutation should move rows");
            }
            assert_eq!(unpermute_rope_rows(&permuted, rows, n_head).unwrap(), w);
            assert_eq!(
                permute_rope_rows(
                    &unpermute_rope_rows(&w, rows, n_head).unwrap(),
                    rows,
                    n_head
                )
                .unwrap(),
                w
            );
        }
        // One head of 4 rows, 1 column: HF rows [a, b, c, d] (halves [a, b] and [c, d]) are
        // stored interleaved as [a, c, b, d].
        assert_eq!(
            permute_rope_rows(&[1.0, 2.0, 3.0, 4.0], 4, 1).unwrap(),
            [1.0, 3.0, 2.0, 4.0]
        );
    }

    #[test]
    fn unpermute_rejects_bad_geometry() {
        assert!(unpermute_rope_rows(&[0.0; 12], 6, 4).is_err()); // 6 rows over 4 heads
        assert!(unpermute_rope_rows(&[0.0; 6], 6, 2).is_err()); // odd head size 3
        assert!(unpermute_rope_rows(&[0.0; 7], 4, 1).is_err()); // not whole rows
        assert!(unpermute_rope_rows(&[], 0, 0).is_err());
    }

    fn tiny_config() -> LlamaConfig {
        LlamaConfig::new(8, 16, 1, 2, 1, 4).with_max_position_embeddings(32)
    }

    #[test]
    fn weight_source_undoes_permutation_for_q_and_k_only() {
        let config = tiny_config();
        let hd = config.head_dim();
        let q: Vec<f32> = (0..8 * 8).map(|x| x as f32).collect();
        let k: Vec<f32> = (0..hd * 8).map(|x| 100.0 + x as f32).collect();
        let v = k.clone();
        let norm = vec![1.0; 8];
        let tensors = [
            RawTensor::f32(
                "blk.0.attn_q.weight",
                &[8, 8],
                &permute_rope_rows(&q, 8, 2).unwrap(),
            ),
            RawTensor::f32(
                "blk.0.attn_k.weight",
                &[hd, 8],
                &permute_rope_rows(&k, hd, 1).unwrap(),
            ),
            RawTensor::f32("blk.0.attn_v.weight", &[hd, 8], &v),
            RawTensor::f32("blk.0.attn_norm.weight", &[8], &norm),
        ];
        let path = write_temp(
            "weights.gguf",
            &build_gguf(
                &[(
                    "general.architecture",
                    MetadataValue::String("llama".into()),
                )],
                &tensors,
            ),
        );
        let w = GgufWeights::new(GgufFile::open(&path).unwrap(), config);
        assert_eq!(
            w.tensor("model.layers.0.self_attn.q_proj.weight").unwrap(),
            (q, vec![8, 8])
        );
        assert_eq!(
            w.tensor("model.layers.0.self_attn.k_proj.weight").unwrap(),
            (k, vec![hd, 8])
        );
        assert_eq!(
            w.tensor("model.layers.0.self_attn.v_proj.weight").unwrap(),
            (v, vec![hd, 8])
        );
        assert_eq!(
            w.tensor("model.layers.0.input_layernorm.weight").unwrap(),
            (norm, vec![8])
        );
        assert!(w.contains("model.layers.0.self_attn.q_proj.weight"));
        assert!(!w.contains("lm_head.weight"));
        assert!(!w.contains("nonsense"));
        for name in [
            "lm_head.weight",
            "model.layers.0.mlp.up_proj.weight",
            "nonsense",
        ] {
            let err = w.tensor(name).unwrap_err();
            assert!(
                matches!(&err, Error::MissingTensor(n) if n == name),
                "{err}"
            );
        }
        assert_eq!(w.hf_names().count(), 4);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn q_projection_with_wrong_rows_is_a_shape_mismatch() {
        let config = tiny_config();
        let tensors = [RawTensor::f32("blk.0.attn_q.weight", &[4, 8], &[0.0; 32])];
        let path = write_temp("badq.gguf", &build_gguf(&[], &tensors));
        let w = GgufWeights::new(GgufFile::open(&path).unwrap(), config);
        let err = w
            .tensor("model.layers.0.self_attn.q_proj.weight")
            .unwrap_err();
        assert!(matches!(err, Error::ShapeMismatch { .. }), "{err}");
        std::fs::remove_file(path).unwrap();
    }

    /// The real model: the un-permuted Q/K rows equal numpy's inverse permutation of gguf-py's
    /// dequantisation (`tests/fixtures/dequant/smollm2_reference.json`).
    #[test]
    fn smollm2_q_k_rows_match_reference() {
        let path = crate::hub::smollm2_instruct_gguf().expect("SmolLM2 GGUF");
        let w = GgufWeights::open(&path).unwrap();
        let reference: serde_json::Value = serde_json::from_str(include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/dequant/smollm2_reference.json"
        )))
        .unwrap();
        for (gguf, hf) in [
            (
                "blk.0.attn_q.weight",
                "model.layers.0.self_attn.q_proj.weight",
            ),
            (
                "blk.3.attn_k.weight",
                "model.layers.3.self_attn.k_proj.weight",
            ),
        ] {
            let (data, shape) = w.tensor(hf).unwrap();
            let cols = shape[1];
            let rows = reference[gguf]["hf_rows"].as_object().unwrap();
            assert!(!rows.is_empty());
            for (row, expected) in rows {
                let r: usize = row.parse().unwrap();
                let expected: Vec<f32> = serde_json::from_value(expected.clone()).unwrap();
                assert_eq!(
                    &data[r * cols..r * cols + expected.len()],
                    &expected[..],
                    "{hf} row {r}"
                );
            }
        }
        let names: Vec<String> = w.hf_names().collect();
        assert_eq!(names.len(), 272);
        assert!(names.iter().all(|n| w.contains(n)));
        assert!(!w.contains("lm_head.weight"), "SmolLM2 ties its embeddings");
    }
}
