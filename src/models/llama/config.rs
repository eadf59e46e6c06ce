//! Llama hyper-parameters, mirroring the fields of a Hugging Face `config.json`.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::io::gguf::{GgufFile, MetadataValue};

/// Llama-3 style RoPE frequency scaling (`rope_scaling` with `rope_type = "llama3"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Llama3RopeScaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: usize,
}

/// Configuration of a Llama-architecture model. Field names follow HF `config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub rope_scaling: Option<Llama3RopeScaling>,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    #[serde(default)]
    pub eos_token_id: Option<u32>,
}

impl LlamaConfig {
    /// A configuration of the given shape; the rest as in SmolLM2 and Llama-2 (RMSNorm eps 1e-5,
    /// RoPE θ 10,000 without scaling, embeddings tied, 4,096 positions, no special tokens), to
    /// adjust with the `with_*` methods. For models with random weights
    /// ([`super::Llama::init_random`]) and tests; real models read theirs with
    /// [`Self::from_hf_config`] or [`Self::from_gguf`].
    pub fn new(
        hidden_size: usize,
        intermediate_size: usize,
        num_hidden_layers: usize,
        num_attention_heads: usize,
        num_key_value_heads: usize,
        vocab_size: usize,
    ) -> Self {
        Self {
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            vocab_size,
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            max_position_embeddings: 4096,
            tie_word_embeddings: true,
            rope_scaling: None,
            bos_token_id: None,
            eos_token_id: None,
        }
    }

    /// With RoPE base `theta`.
    pub fn with_rope_theta(mut self, theta: f64) -> Self {
        self.rope_theta = theta;
        self
    }

    /// With the output head tied to the input embedding or not.
    pub fn with_tied_embeddings(mut self, tied: bool) -> Self {
        self.tie_word_embeddings = tied;
        self
    }

    /// With `positions` supported positions.
    pub fn with_max_position_embeddings(mut self, positions: usize) -> Self {
        self.max_position_embeddings = positions;
        self
    }

    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// Checks the invariants the model relies on.
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("vocab_size", self.vocab_size),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        for (name, value) in positive {
            if value == 0 {
                return Err(Error::InvalidConfig(format!("{name} must be positive")));
            }
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(Error::InvalidConfig(format!(
                "hidden_size {} is not divisible by num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            )));
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            return Err(Error::InvalidConfig(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_attention_heads, self.num_key_value_heads
            )));
        }
        if !self.head_dim().is_multiple_of(2) {
            return Err(Error::InvalidConfig(format!(
                "head dimension {} must be even for RoPE",
                self.head_dim()
            )));
        }
        Ok(())
    }
}

/// Reading a configuration from a GGUF file's `llama.*` metadata.
impl LlamaConfig {
    /// The configuration stored in a llama.cpp GGUF file (`general.architecture = "llama"`).
    ///
    /// Embeddings are tied iff the file has no `output.weight` tensor. Llama-3.1-style RoPE
    /// scaling, which llama.cpp stores as a `rope_freqs.weight` tensor of per-frequency factors,
    /// is recognised when the factors match the standard Llama 3 parameters; other RoPE scaling
    /// schemes are rejected rather than silently ignored.
    pub fn from_gguf(file: &GgufFile) -> Result<Self> {
        let arch = gguf_str(file, "general.architecture")?;
        if arch != "llama" {
            return Err(Error::InvalidConfig(format!(
                "general.architecture is `{arch}`, only `llama` is supported"
            )));
        }
        let num_attention_heads = gguf_usize(file, "llama.attention.head_count")?;
        let num_key_value_heads =
            gguf_opt_usize(file, "llama.attention.head_count_kv")?.unwrap_or(num_attention_heads);
        let vocab_size = match gguf_opt_usize(file, "llama.vocab_size")? {
            Some(v) => v,
            None => file
                .metadata("tokenizer.ggml.tokens")
                .and_then(MetadataValue::as_array)
                .map(<[MetadataValue]>::len)
                .ok_or_else(|| Error::MissingMetadata("llama.vocab_size".to_string()))?,
        };
        let mut config = LlamaConfig {
            hidden_size: gguf_usize(file, "llama.embedding_length")?,
            intermediate_size: gguf_usize(file, "llama.feed_forward_length")?,
            num_hidden_layers: gguf_usize(file, "llama.block_count")?,
            num_attention_heads,
            num_key_value_heads,
            vocab_size,
            rms_norm_eps: gguf_f64(file, "llama.attention.layer_norm_rms_epsilon")?,
            // llama.cpp's default when the key is absent.
            rope_theta: gguf_opt_f64(file, "llama.rope.freq_base")?.unwrap_or(10_000.0),
            max_position_embeddings: gguf_usize(file, "llama.context_length")?,
            tie_word_embeddings: file.tensor_info("output.weight").is_none(),
            rope_scaling: None,
            bos_token_id: gguf_opt_u32(file, "tokenizer.ggml.bos_token_id")?,
            eos_token_id: gguf_opt_u32(file, "tokenizer.ggml.eos_token_id")?,
        };
        config.validate()?;
        // Head sizes other than hidden / heads, or RoPE on part of a head, cannot be expressed
        // by this configuration.
        for key in [
            "llama.rope.dimension_count",
            "llama.attention.key_length",
            "llama.attention.value_length",
        ] {
            if let Some(v) = gguf_opt_usize(file, key)?
                && v != config.head_dim()
            {
                return Err(Error::InvalidConfig(format!(
                    "{key} is {v}, but only a head dimension of hidden / heads = {} is supported",
                    config.head_dim()
                )));
            }
        }
        if let Some(kind) = file.metadata("llama.rope.scaling.type") {
            let kind = kind.as_str().unwrap_or("<non-string>");
            if kind != "none" {
                return Err(Error::InvalidConfig(format!(
                    "RoPE scaling type `{kind}` is not supported"
                )));
            }
        }
        if file.tensor_info("rope_freqs.weight").is_some() {
            let (factors, _) = file.tensor_f32("rope_freqs.weight")?;
            let original =
                gguf_opt_usize(file, "llama.rope.scaling.original_context_length")?.unwrap_or(8192);
            config.rope_scaling = Some(llama3_scaling_from_factors(&config, &factors, original)?);
        }
        tracing::debug!(?config, "read Llama configuration from GGUF");
        Ok(config)
    }
}

/// The per-frequency RoPE factors llama.cpp's converter derives from Llama 3 scaling
/// parameters (one per pair of head dimensions).
fn llama3_rope_factors(rope_theta: f64, head_dim: usize, s: &Llama3RopeScaling) -> Vec<f64> {
    let low_wavelen = s.original_max_position_embeddings as f64 / s.low_freq_factor;
    let high_wavelen = s.original_max_position_embeddings as f64 / s.high_freq_factor;
    (0..head_dim / 2)
        .map(|i| {
            let freq = 1.0 / rope_theta.powf((2 * i) as f64 / head_dim as f64);
            let wavelen = 2.0 * std::f64::consts::PI / freq;
            if wavelen < high_wavelen {
                1.0
            } else if wavelen > low_wavelen {
                s.factor
            } else {
                let smooth = (s.original_max_position_embeddings as f64 / wavelen
                    - s.low_freq_factor)
                    / (s.high_freq_factor - s.low_freq_factor);
                1.0 / ((1.0 - smooth) / s.factor + smooth)
            }
        })
        .collect()
}

/// Recovers Llama 3 scaling parameters from stored factors: the largest factor is `factor`;
/// the frequency thresholds are the published Llama 3 ones (1 and 4), accepted only if they
/// reproduce every stored factor.
fn llama3_scaling_from_factors(
    config: &LlamaConfig,
    factors: &[f32],
    original_max_position_embeddings: usize,
) -> Result<Llama3RopeScaling> {
    let factor = factors.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let candidate = Llama3RopeScaling {
        factor,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings,
    };
    let expected = llama3_rope_factors(config.rope_theta, config.head_dim(), &candidate);
    let matches = expected.len() == factors.len()
        && expected
            .iter()
            .zip(factors)
            .all(|(e, &f)| (e - f as f64).abs() <= 1e-4 * e.abs());
    if !matches || !factor.is_finite() {
        return Err(Error::InvalidConfig(
            "rope_freqs.weight holds RoPE factors that do not match Llama 3 scaling \
             (low_freq_factor 1, high_freq_factor 4); this scaling is not supported"
                .to_string(),
        ));
    }
    Ok(candidate)
}

fn gguf_value<'a>(file: &'a GgufFile, key: &str) -> Result<&'a MetadataValue> {
    file.metadata(key)
        .ok_or_else(|| Error::MissingMetadata(key.to_string()))
}

fn gguf_str<'a>(file: &'a GgufFile, key: &str) -> Result<&'a str> {
    gguf_value(file, key)?
        .as_str()
        .ok_or_else(|| Error::InvalidConfig(format!("GGUF metadata `{key}` is not a string")))
}

fn gguf_opt_usize(file: &GgufFile, key: &str) -> Result<Option<usize>> {
    file.metadata(key)
        .map(|v| {
            v.as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .ok_or_else(|| {
                    Error::InvalidConfig(format!(
                        "GGUF metadata `{key}` is not a non-negative integer: {v:?}"
                    ))
                })
        })
        .transpose()
}

fn gguf_usize(file: &GgufFile, key: &str) -> Result<usize> {
    gguf_opt_usize(file, key)?.ok_or_else(|| Error::MissingMetadata(key.to_string()))
}

fn gguf_opt_u32(file: &GgufFile, key: &str) -> Result<Option<u32>> {
    gguf_opt_usize(file, key)?
        .map(|v| {
            u32::try_from(v)
                .map_err(|_| Error::InvalidConfig(format!("GGUF metadata `{key}` is too large")))
        })
        .transpose()
}

fn gguf_opt_f64(file: &GgufFile, key: &str) -> Result<Option<f64>> {
    file.metadata(key)
        .map(|v| {
            v.as_f64().ok_or_else(|| {
                Error::InvalidConfig(format!("GGUF metadata `{key}` is not a number: {v:?}"))
            })
        })
        .transpose()
}

fn gguf_f64(file: &GgufFile, key: &str) -> Result<f64> {
    gguf_opt_f64(file, key)?.ok_or_else(|| Error::MissingMetadata(key.to_string()))
}

/// Reading a configuration from a Hugging Face `config.json`.
impl LlamaConfig {
    /// Reads a HF `config.json` (the file itself, or the model directory containing it).
    ///
    /// Accepts `eos_token_id` as an integer or a list (the first entry is kept), `rope_scaling`
    /// (or Transformers 5's `rope_parameters`) of type `llama3` or `default`; other RoPE types
    /// are an error naming the type. Missing optional keys take HF's Llama defaults.
    pub fn from_hf_config(path: impl AsRef<Path>) -> Result<Self> {
        let mut path = path.as_ref().to_path_buf();
        if path.is_dir() {
            path.push("config.json");
        }
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Json {
            path: path.clone(),
            message: e.to_string(),
        })?;
        let config = Self::from_hf_json(&json).map_err(|e| match e {
            Error::InvalidConfig(m) => Error::InvalidConfig(format!("{}: {m}", path.display())),
            other => other,
        })?;
        tracing::debug!(path = %path.display(), ?config, "read Llama configuration");
        Ok(config)
    }

    /// [`from_hf_config`](Self::from_hf_config) on an already parsed `config.json`.
    pub fn from_hf_json(json: &serde_json::Value) -> Result<Self> {
        let obj = json
            .as_object()
            .ok_or_else(|| Error::InvalidConfig("config.json is not a JSON object".to_string()))?;
        if let Some(model_type) = obj.get("model_type").and_then(|v| v.as_str())
            && model_type != "llama"
        {
            tracing::warn!(
                model_type,
                "config.json is not a `llama` model; reading it as one"
            );
        }
        let num_attention_heads = json_usize(obj, "num_attention_heads")?;
        // Transformers 5 moves RoPE settings into `rope_parameters`.
        let rope = obj
            .get("rope_parameters")
            .or_else(|| obj.get("rope_scaling"))
            .filter(|v| !v.is_null());
        let rope_theta = match rope.and_then(|r| r.get("rope_theta")) {
            Some(v) => Some(v.as_f64().ok_or_else(|| {
                Error::InvalidConfig("rope_parameters.rope_theta is not a number".to_string())
            })?),
            None => json_opt_f64(obj, "rope_theta")?,
        };
        let config = LlamaConfig {
            hidden_size: json_usize(obj, "hidden_size")?,
            intermediate_size: json_usize(obj, "intermediate_size")?,
            num_hidden_layers: json_usize(obj, "num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads: json_opt_usize(obj, "num_key_value_heads")?
                .unwrap_or(num_attention_heads),
            vocab_size: json_usize(obj, "vocab_size")?,
            rms_norm_eps: json_opt_f64(obj, "rms_norm_eps")?.unwrap_or(1e-6),
            rope_theta: rope_theta.unwrap_or(10_000.0),
            max_position_embeddings: json_opt_usize(obj, "max_position_embeddings")?
                .unwrap_or(2048),
            tie_word_embeddings: match obj.get("tie_word_embeddings") {
                None | Some(serde_json::Value::Null) => false,
                Some(v) => v.as_bool().ok_or_else(|| {
                    Error::InvalidConfig("tie_word_embeddings is not a boolean".to_string())
                })?,
            },
            rope_scaling: rope.map(hf_rope_scaling).transpose()?.flatten(),
            bos_token_id: json_token_id(obj, "bos_token_id")?,
            eos_token_id: json_token_id(obj, "eos_token_id")?,
        };
        if let Some(head_dim) = json_opt_usize(obj, "head_dim")?
            && head_dim != config.hidden_size / config.num_attention_heads.max(1)
        {
            return Err(Error::InvalidConfig(format!(
                "head_dim {head_dim} differs from hidden_size / num_attention_heads; \
                 only the standard head dimension is supported"
            )));
        }
        config.validate()?;
        Ok(config)
    }
}

/// The Llama 3 scaling of a HF `rope_scaling` / `rope_parameters` object; `None` for the
/// default (unscaled) RoPE.
fn hf_rope_scaling(rope: &serde_json::Value) -> Result<Option<Llama3RopeScaling>> {
    let kind = rope
        .get("rope_type")
        .or_else(|| rope.get("type"))
        .and_then(|v| v.as_str())
        .unwrap_or("default");
    match kind {
        "default" => Ok(None),
        "llama3" => {
            let field = |name: &str| {
                rope.get(name).and_then(|v| v.as_f64()).ok_or_else(|| {
                    Error::InvalidConfig(format!("llama3 rope_scaling lacks a numeric `{name}`"))
                })
            };
            let original = field("original_max_position_embeddings")?;
            if original < 1.0 || original.fract() != 0.0 {
                return Err(Error::InvalidConfig(format!(
                    "rope_scaling.original_max_position_embeddings {original} is not a positive integer"
                )));
            }
            let scaling = Llama3RopeScaling {
                factor: field("factor")?,
                low_freq_factor: field("low_freq_factor")?,
                high_freq_factor: field("high_freq_factor")?,
                original_max_position_embeddings: original as usize,
            };
            let valid = scaling.factor > 0.0
                && scaling.low_freq_factor > 0.0
                && scaling.high_freq_factor > scaling.low_freq_factor;
            if !valid {
                return Err(Error::InvalidConfig(format!(
                    "llama3 rope_scaling needs factor > 0 and high_freq_factor > low_freq_factor > 0, \
                     got {scaling:?}"
                )));
            }
            Ok(Some(scaling))
        }
        other => Err(Error::InvalidConfig(format!(
            "rope_scaling type `{other}` is not supported (only `llama3`)"
        ))),
    }
}

type JsonObject = serde_json::Map<String, serde_json::Value>;

fn json_opt_usize(obj: &JsonObject, key: &str) -> Result<Option<usize>> {
    match obj.get(key) {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .and_then(|n| usize::try_from(n).ok())
            .map(Some)
            .ok_or_else(|| {
                Error::InvalidConfig(format!("`{key}` is not a non-negative integer: {v}"))
            }),
    }
}

fn json_usize(obj: &JsonObject, key: &str) -> Result<usize> {
    json_opt_usize(obj, key)?.ok_or_else(|| Error::MissingMetadata(key.to_string()))
}

fn json_opt_f64(obj: &JsonObject, key: &str) -> Result<Option<f64>> {
    match obj.get(key) {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(v) => v
            .as_f64()
            .map(Some)
            .ok_or_else(|| Error::InvalidConfig(format!("`{key}` is not a number: {v}"))),
    }
}

/// A token id given as an integer or a list of integers (HF allows several EOS ids; the first
/// is the canonical one).
fn json_token_id(obj: &JsonObject, key: &str) -> Result<Option<u32>> {
    let value = match obj.get(key) {
        None | Some(serde_json::Value::Null) => return Ok(None),
        Some(serde_json::Value::Array(items)) => match items.first() {
            None => return Ok(None),
            Some(first) => first,
        },
        Some(v) => v,
    };
    value
        .as_u64()
        .and_then(|n| u32::try_from(n).ok())
        .map(Some)
        .ok_or_else(|| Error::InvalidConfig(format!("`{key}` is not a token id: {value}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::gguf::test_util::{RawTensor, build_gguf, temp_path, write_temp};

    fn llama_metadata() -> Vec<(&'static str, MetadataValue)> {
        vec![
            (
                "general.architecture",
                MetadataValue::String("llama".into()),
            ),
            ("llama.block_count", MetadataValue::U32(2)),
            ("llama.context_length", MetadataValue::U32(4096)),
            ("llama.embedding_length", MetadataValue::U32(128)),
            ("llama.feed_forward_length", MetadataValue::U32(256)),
            ("llama.attention.head_count", MetadataValue::U32(2)),
            ("llama.attention.head_count_kv", MetadataValue::U32(1)),
            ("llama.rope.freq_base", MetadataValue::F32(500000.0)),
            (
                "llama.attention.layer_norm_rms_epsilon",
                MetadataValue::F32(1e-5),
            ),
            ("llama.vocab_size", MetadataValue::U32(100)),
            ("tokenizer.ggml.bos_token_id", MetadataValue::U32(7)),
            ("tokenizer.ggml.eos_token_id", MetadataValue::U32(8)),
        ]
    }

    fn config_of(metadata: &[(&str, MetadataValue)], tensors: &[RawTensor]) -> Result<LlamaConfig> {
        let path = write_temp("config.gguf", &build_gguf(metadata, tensors));
        let result = GgufFile::open(&path).and_then(|f| LlamaConfig::from_gguf(&f));
        std::fs::remove_file(path).unwrap();
        result
    }

    #[test]
    fn smollm2_gguf_config() {
        let path = crate::hub::smollm2_instruct_gguf().expect("SmolLM2 GGUF");
        let c = LlamaConfig::from_gguf(&GgufFile::open(path).unwrap()).unwrap();
        assert_eq!(c.num_hidden_layers, 30);
        assert_eq!(c.hidden_size, 576);
        assert_eq!(c.num_attention_heads, 9);
        assert_eq!(c.num_key_value_heads, 3);
        assert_eq!(c.intermediate_size, 1536);
        assert_eq!(c.vocab_size, 49152);
        assert_eq!(c.rope_theta, 100000.0);
        assert_eq!(c.max_position_embeddings, 8192);
        assert!((c.rms_norm_eps - 1e-5).abs() < 1e-10);
        assert!(c.tie_word_embeddings);
        assert_eq!(c.rope_scaling, None);
        assert_eq!((c.bos_token_id, c.eos_token_id), (Some(1), Some(2)));
        assert_eq!(c.head_dim(), 64);
    }

    #[test]
    fn synthetic_gguf_config() {
        let c = config_of(&llama_metadata(), &[]).unwrap();
        assert_eq!(
            (c.hidden_size, c.num_key_value_heads, c.vocab_size),
            (128, 1, 100)
        );
        assert_eq!(c.rope_theta, 500000.0);
        assert!(c.tie_word_embeddings);
        assert_eq!((c.bos_token_id, c.eos_token_id), (Some(7), Some(8)));

        // An output projection means untied embeddings.
        let output = RawTensor::f32("output.weight", &[1, 4], &[0.0; 4]);
        assert!(
            !config_of(&llama_metadata(), &[output])
                .unwrap()
                .tie_word_embeddings
        );
    }

    #[test]
    fn vocab_falls_back_to_token_list_and_kv_heads_to_heads() {
        let mut md = llama_metadata();
        md.retain(|(k, _)| *k != "llama.vocab_size" && *k != "llama.attention.head_count_kv");
        let tokens = (0..5)
            .map(|i| MetadataValue::String(format!("t{i}")))
            .collect();
        md.push(("tokenizer.ggml.tokens", MetadataValue::Array(tokens)));
        let c = config_of(&md, &[]).unwrap();
        assert_eq!((c.vocab_size, c.num_key_value_heads), (5, 2));

        md.retain(|(k, _)| *k != "tokenizer.ggml.tokens");
        let err = config_of(&md, &[]).unwrap_err();
        assert!(
            matches!(&err, Error::MissingMetadata(k) if k == "llama.vocab_size"),
            "{err}"
        );
    }

    #[test]
    fn bad_gguf_configs_are_rejected() {
        let mut md = llama_metadata();
        md[0].1 = MetadataValue::String("qwen2".into());
        let err = config_of(&md, &[]).unwrap_err();
        assert!(
            matches!(&err, Error::InvalidConfig(m) if m.contains("qwen2")),
            "{err}"
        );

        let mut md = llama_metadata();
        md.retain(|(k, _)| *k != "llama.block_count");
        let err = config_of(&md, &[]).unwrap_err();
        assert!(
            matches!(&err, Error::MissingMetadata(k) if k == "llama.block_count"),
            "{err}"
        );

        let mut md = llama_metadata();
        md.push((
            "llama.rope.scaling.type",
            MetadataValue::String("yarn".into()),
        ));
        let err = config_of(&md, &[]).unwrap_err();
        assert!(
            matches!(&err, Error::InvalidConfig(m) if m.contains("yarn")),
            "{err}"
        );

        let mut md = llama_metadata();
        md.push(("llama.rope.dimension_count", MetadataValue::U32(32)));
        assert!(matches!(config_of(&md, &[]), Err(Error::InvalidConfig(_))));

        let mut md = llama_metadata();
        md[1].1 = MetadataValue::String("two".into());
        assert!(matches!(config_of(&md, &[]), Err(Error::InvalidConfig(_))));

        // validate() runs: 128 is not divisible by 3 heads.
        let mut md = llama_metadata();
        md[5].1 = MetadataValue::U32(3);
        md[6].1 = MetadataValue::U32(3);
        assert!(matches!(config_of(&md, &[]), Err(Error::InvalidConfig(_))));
    }

    #[test]
    fn llama3_rope_freqs_are_recognised() {
        let scaling = Llama3RopeScaling {
            factor: 32.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        };
        // head_dim 64 with theta 500000, as in Llama 3.2.
        let factors: Vec<f32> = llama3_rope_factors(500000.0, 64, &scaling)
            .into_iter()
            .map(|f| f as f32)
            .collect();
        assert!(factors.contains(&1.0) && factors.contains(&32.0));
        assert!(
            factors.iter().any(|&f| f > 1.0 && f < 32.0),
            "some factors are smoothed"
        );
        let t = RawTensor::f32("rope_freqs.weight", &[32], &factors);
        let c = config_of(&llama_metadata(), &[t]).unwrap();
        assert_eq!(c.rope_scaling, Some(scaling));

        let mut odd = factors.clone();
        odd[20] *= 1.5;
        let t = RawTensor::f32("rope_freqs.weight", &[32], &odd);
        assert!(matches!(
            config_of(&llama_metadata(), &[t]),
            Err(Error::InvalidConfig(_))
        ));
    }

    fn hf_config(json: &str) -> Result<LlamaConfig> {
        let dir = temp_path("hfconfig");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("config.json"), json).unwrap();
        let result = LlamaConfig::from_hf_config(&dir);
        let by_file = LlamaConfig::from_hf_config(dir.join("config.json"));
        assert_eq!(format!("{result:?}"), format!("{by_file:?}"));
        std::fs::remove_dir_all(dir).unwrap();
        result
    }

    const SMOLLM2_JSON: &str = r#"{
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
        "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152,
        "rms_norm_eps": 1e-05, "rope_theta": 100000, "max_position_embeddings": 8192,
        "tie_word_embeddings": true, "rope_scaling": null,
        "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16"
    }"#;

    #[test]
    fn hf_config_smollm2() {
        let c = hf_config(SMOLLM2_JSON).unwrap();
        assert_eq!(
            (c.num_hidden_layers, c.hidden_size, c.num_attention_heads),
            (30, 576, 9)
        );
        assert_eq!(
            (c.num_key_value_heads, c.intermediate_size, c.vocab_size),
            (3, 1536, 49152)
        );
        assert_eq!((c.rope_theta, c.rms_norm_eps), (100000.0, 1e-5));
        assert!(c.tie_word_embeddings);
        assert_eq!(
            (c.bos_token_id, c.eos_token_id, c.rope_scaling),
            (Some(1), Some(2), None)
        );
    }

    #[test]
    fn hf_config_llama3_with_eos_list() {
        let c = hf_config(
            r#"{"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
                "rope_theta": 500000.0, "max_position_embeddings": 131072,
                "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009],
                "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                 "original_max_position_embeddings": 8192, "rope_type": "llama3"}}"#,
        )
        .unwrap();
        assert_eq!(c.eos_token_id, Some(128001));
        assert_eq!(c.rms_norm_eps, 1e-6, "HF default");
        assert!(!c.tie_word_embeddings, "HF default");
        assert_eq!(
            c.rope_scaling,
            Some(Llama3RopeScaling {
                factor: 32.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192
            })
        );
    }

    #[test]
    fn hf_config_transformers5_rope_parameters() {
        let c = hf_config(
            r#"{"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
                "num_attention_heads": 4, "vocab_size": 10,
                "rope_parameters": {"rope_theta": 12345.0, "rope_type": "default"}}"#,
        )
        .unwrap();
        assert_eq!(
            (c.rope_theta, c.num_key_value_heads, c.rope_scaling),
            (12345.0, 4, None)
        );
    }

    #[test]
    fn bad_hf_configs_are_rejected() {
        let err = hf_config(&SMOLLM2_JSON.replace(
            r#""rope_scaling": null"#,
            r#""rope_scaling": {"type": "yarn", "factor": 4.0}"#,
        ))
        .unwrap_err();
        assert!(
            matches!(&err, Error::InvalidConfig(m) if m.contains("yarn")),
            "{err}"
        );

        let err = hf_config(&SMOLLM2_JSON.replace(r#""hidden_size": 576,"#, "")).unwrap_err();
        assert!(
            matches!(&err, Error::MissingMetadata(k) if k == "hidden_size"),
            "{err}"
        );

        let err = hf_config(&SMOLLM2_JSON.replace("576", "\"576\"")).unwrap_err();
        assert!(matches!(err, Error::InvalidConfig(_)), "{err}");

        let err = hf_config(&SMOLLM2_JSON.replace("576", "577")).unwrap_err();
        assert!(
            matches!(err, Error::InvalidConfig(_)),
            "validate() runs: {err}"
        );

        let err = hf_config("{ not json").unwrap_err();
        assert!(matches!(err, Error::Json { .. }), "{err}");

        let err = LlamaConfig::from_hf_config(temp_path("absent/config.json")).unwrap_err();
        assert!(matches!(err, Error::Io { .. }), "{err}");
    }
}
