//! Hugging Face model directories: `model.safetensors`, or shards listed by
//! `model.safetensors.index.json`, memory-mapped and converted to f32 on request.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::tensor::{Dtype, Metadata, SafeTensors, TensorInfo};

use super::WeightSource;
use crate::error::{Error, Result};

const SINGLE_FILE: &str = "model.safetensors";
const INDEX_FILE: &str = "model.safetensors.index.json";

/// One mapped safetensors file and its parsed header.
#[derive(Debug)]
struct Shard {
    path: PathBuf,
    mmap: Mmap,
    /// Byte offset of the data section (after the 8-byte length and the JSON header).
    data_start: usize,
    metadata: Metadata,
}

impl Shard {
    fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: read-only map; the checkpoint must not be modified while it is open (the same
        // contract as every mmap-based loader). All accesses are bounds-checked.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        // `read_metadata` checks that every tensor's byte range is consistent with its shape
        // and dtype and that the data section ends exactly at the end of the file.
        let (header_len, metadata) =
            SafeTensors::read_metadata(&mmap).map_err(|e| Error::Safetensors {
                path: path.to_path_buf(),
                message: e.to_string(),
            })?;
        let data_start = header_len
            .checked_add(8)
            .ok_or_else(|| Error::Safetensors {
                path: path.to_path_buf(),
                message: "header length overflows".to_string(),
            })?;
        Ok(Shard {
            path: path.to_path_buf(),
            mmap,
            data_start,
            metadata,
        })
    }

    fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.metadata.info(name)
    }

    fn bytes(&self, info: &TensorInfo) -> Option<&[u8]> {
        let (start, end) = info.data_offsets;
        let start = self.data_start.checked_add(start)?;
        let end = self.data_start.checked_add(end)?;
        self.mmap.get(start..end)
    }
}

/// The tensors of a HF model directory, by their HF names.
#[derive(Debug)]
pub struct HfWeights {
    dir: PathBuf,
    shards: Vec<Shard>,
    /// Tensor name → index into `shards`.
    index: HashMap<String, usize>,
}

impl HfWeights {
    /// Opens the checkpoint in `dir`: `model.safetensors.index.json` and the shards it names if
    /// the index exists, else `model.safetensors`.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let index_path = dir.join(INDEX_FILE);
        let shard_names = if index_path.is_file() {
            read_index(&index_path)?
        } else {
            let single = dir.join(SINGLE_FILE);
            if !single.is_file() {
                return Err(Error::io(
                    &single,
                    std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        format!("neither {SINGLE_FILE} nor {INDEX_FILE} exists in the directory"),
                    ),
                ));
            }
            IndexedShards {
                files: vec![SINGLE_FILE.to_string()],
                weight_map: Vec::new(),
            }
        };

        let mut shards = Vec::with_capacity(shard_names.files.len());
        let mut index = HashMap::new();
        for file_name in &shard_names.files {
            let shard = Shard::open(&dir.join(file_name))?;
            for name in shard.metadata.offset_keys() {
                if let Some(previous) = index.insert(name.clone(), shards.len()) {
                    let other = shards
                        .get(previous)
                        .map_or(Path::new(""), |s: &Shard| &s.path);
                    return Err(Error::Safetensors {
                        path: shard.path.clone(),
                        message: format!("tensor `{name}` also appears in {}", other.display()),
                    });
                }
            }
            shards.push(shard);
        }
        // The index must agree with the shards, or a tensor would silently come from elsewhere.
        for (name, file_name) in &shard_names.weight_map {
            let actual = index
                .get(name)
                .and_then(|&i| shards.get(i))
                .and_then(|s| s.path.file_name());
            if actual.and_then(|a| a.to_str()) != Some(file_name.as_str()) {
                return Err(Error::Safetensors {
                    path: index_path.clone(),
                    message: format!(
                        "the index puts `{name}` in {file_name}, but that shard lacks it"
                    ),
                });
            }
        }
        tracing::debug!(
            dir = %dir.display(),
            shards = shards.len(),
            tensors = index.len(),
            "opened safetensors checkpoint"
        );
        Ok(HfWeights {
            dir: dir.to_path_buf(),
            shards,
            index,
        })
    }

    /// The model directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Names of all tensors, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.index.keys().map(String::as_str).collect();
        names.sort_unstable();
        names
    }
}

/// The shard files of an index, in first-seen order, and its name → file map.
struct IndexedShards {
    files: Vec<String>,
    weight_map: Vec<(String, String)>,
}

fn read_index(path: &Path) -> Result<IndexedShards> {
    let json_error = |message: String| Error::Json {
        path: path.to_path_buf(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| json_error(e.to_string()))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| json_error("no `weight_map` object".to_string()))?;
    let mut files: Vec<String> = Vec::new();
    let mut weight_map = Vec::with_capacity(map.len());
    for (name, file) in map {
        let file = file
            .as_str()
            .ok_or_else(|| json_error(format!("weight_map entry `{name}` is not a file name")))?;
        // Shards must sit in the model directory; a path would let an index reach elsewhere.
        if file.is_empty() || file.contains('/') || file.contains('\\') || file == ".." {
            return Err(json_error(format!(
                "weight_map entry `{name}` names `{file}`, not a file in the directory"
            )));
        }
        if !files.iter().any(|f| f == file) {
            files.push(file.to_string());
        }
        weight_map.push((name.clone(), file.to_string()));
    }
    if files.is_empty() {
        return Err(json_error("`weight_map` is empty".to_string()));
    }
    Ok(IndexedShards { files, weight_map })
}

impl WeightSource for HfWeights {
    fn tensor(&self, hf_name: &str) -> Result<(Vec<f32>, Vec<usize>)> {
        let missing = || Error::MissingTensor(hf_name.to_string());
        let shard = self
            .index
            .get(hf_name)
            .and_then(|&i| self.shards.get(i))
            .ok_or_else(missing)?;
        let info = shard.info(hf_name).ok_or_else(missing)?;
        // `read_metadata` validated the ranges, so this only fails if that invariant broke.
        let bytes = shard.bytes(info).ok_or_else(|| Error::Safetensors {
            path: shard.path.clone(),
            message: format!("tensor `{hf_name}` lies outside the file"),
        })?;
        let values = match info.dtype {
            Dtype::F32 => bytes
                .as_chunks::<4>()
                .0
                .iter()
                .map(|b| f32::from_le_bytes(*b))
                .collect(),
            Dtype::F16 => bytes
                .as_chunks::<2>()
                .0
                .iter()
                .map(|b| half::f16::from_le_bytes(*b).to_f32())
                .collect(),
            Dtype::BF16 => bytes
                .as_chunks::<2>()
                .0
                .iter()
                .map(|b| half::bf16::from_le_bytes(*b).to_f32())
                .collect(),
            other => {
                return Err(Error::UnsupportedQuantization {
                    tensor: hf_name.to_string(),
                    kind: format!("safetensors dtype {other}"),
                });
            }
        };
        Ok((values, info.shape.clone()))
    }

    fn contains(&self, hf_name: &str) -> bool {
        self.index.contains_key(hf_name)
    }
}

#[cfg(test)]
mod tests {
    use safetensors::tensor::TensorView;

    use super::*;
    use crate::io::gguf::test_util::temp_path;

    fn le_bytes<T: Copy, const N: usize>(values: &[T], to: fn(T) -> [u8; N]) -> Vec<u8> {
        values.iter().flat_map(|&v| to(v)).collect()
    }

    /// Writes `tensors` (name, dtype, shape, bytes) as one safetensors file.
    fn write_shard(path: &Path, tensors: &[(&str, Dtype, Vec<usize>, Vec<u8>)]) {
        let views: Vec<(&str, TensorView<'_>)> = tensors
            .iter()
            .map(|(n, d, s, b)| (*n, TensorView::new(*d, s.clone(), b).unwrap()))
            .collect();
        safetensors::tensor::serialize_to_file(views, None, path).unwrap();
    }

    fn sample_tensors() -> Vec<(&'static str, Dtype, Vec<usize>, Vec<u8>)> {
        let f32s = [1.0f32, -2.5, 3.25, 0.0, 1e-3, 7.0];
        let f16s: Vec<half::f16> = [0.5f32, -1.0, 2.0, 65504.0]
            .map(half::f16::from_f32)
            .to_vec();
        let bf16s: Vec<half::bf16> = [3.0f32, -0.125].map(half::bf16::from_f32).to_vec();
        vec![
            (
                "model.embed_tokens.weight",
                Dtype::F32,
                vec![2, 3],
                le_bytes(&f32s, f32::to_le_bytes),
            ),
            (
                "model.norm.weight",
                Dtype::F16,
                vec![4],
                le_bytes(&f16s, half::f16::to_le_bytes),
            ),
            (
                "lm_head.weight",
                Dtype::BF16,
                vec![1, 2],
                le_bytes(&bf16s, half::bf16::to_le_bytes),
            ),
            (
                "model.layers.0.counts",
                Dtype::I64,
                vec![1],
                5i64.to_le_bytes().to_vec(),
            ),
        ]
    }

    fn check_sample(w: &HfWeights) {
        assert_eq!(
            w.tensor("model.embed_tokens.weight").unwrap(),
            (vec![1.0, -2.5, 3.25, 0.0, 1e-3, 7.0], vec![2, 3])
        );
        assert_eq!(
            w.tensor("model.norm.weight").unwrap(),
            (vec![0.5, -1.0, 2.0, 65504.0], vec![4])
        );
        assert_eq!(
            w.tensor("lm_head.weight").unwrap(),
            (vec![3.0, -0.125], vec![1, 2])
        );
        let err = w.tensor("model.layers.0.counts").unwrap_err();
        assert!(
            matches!(&err, Error::UnsupportedQuantization { kind, .. } if kind.contains("I64")),
            "{err}"
        );
        let err = w.tensor("model.layers.9.mlp.up_proj.weight").unwrap_err();
        assert!(matches!(err, Error::MissingTensor(_)), "{err}");
        assert!(w.contains("lm_head.weight"));
        assert!(!w.contains("model.layers.9.mlp.up_proj.weight"));
        assert_eq!(w.names().len(), 4);
    }

    #[test]
    fn reads_a_single_file_checkpoint() {
        let dir = temp_path("hf-single");
        std::fs::create_dir_all(&dir).unwrap();
        write_shard(&dir.join(SINGLE_FILE), &sample_tensors());
        check_sample(&HfWeights::open(&dir).unwrap());
        std::fs::remove_dir_all(dir).unwrap();
    }

    fn write_sharded(dir: &Path) {
        std::fs::create_dir_all(dir).unwrap();
        let tensors = sample_tensors();
        let (first, second) = tensors.split_at(2);
        let names = [
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors",
        ];
        write_shard(&dir.join(names[0]), first);
        write_shard(&dir.join(names[1]), second);
        let weight_map: serde_json::Map<String, serde_json::Value> = first
            .iter()
            .map(|t| (t.0.to_string(), names[0].into()))
            .chain(second.iter().map(|t| (t.0.to_string(), names[1].into())))
            .collect();
        let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": weight_map});
        std::fs::write(dir.join(INDEX_FILE), index.to_string()).unwrap();
    }

    #[test]
    fn reads_a_sharded_checkpoint() {
        let dir = temp_path("hf-sharded");
        write_sharded(&dir);
        let w = HfWeights::open(&dir).unwrap();
        assert_eq!(w.shards.len(), 2);
        check_sample(&w);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn missing_directory_contents_are_io_errors() {
        let dir = temp_path("hf-empty");
        std::fs::create_dir_all(&dir).unwrap();
        assert!(matches!(HfWeights::open(&dir), Err(Error::Io { .. })));

        // An index naming a shard that is not there.
        write_sharded(&dir);
        std::fs::remove_file(dir.join("model-00002-of-00002.safetensors")).unwrap();
        assert!(matches!(HfWeights::open(&dir), Err(Error::Io { .. })));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn bad_indexes_are_rejected() {
        let dir = temp_path("hf-badindex");
        write_sharded(&dir);
        let index_path = dir.join(INDEX_FILE);
        let good = std::fs::read_to_string(&index_path).unwrap();
        let cases = [
            ("{ not json".to_string(), "json"),
            (r#"{"metadata": {}}"#.to_string(), "json"),
            (r#"{"weight_map": {"a": 3}}"#.to_string(), "json"),
            (r#"{"weight_map": {}}"#.to_string(), "json"),
            (
                r#"{"weight_map": {"a": "../x.safetensors"}}"#.to_string(),
                "json",
            ),
            // The index places a tensor in the wrong shard.
            (
                good.replacen("model-00001-of-00002", "model-00002-of-00002", 1),
                "safetensors",
            ),
        ];
        for (text, kind) in cases {
            std::fs::write(&index_path, &text).unwrap();
            let err = HfWeights::open(&dir).unwrap_err();
            let ok = match kind {
                "json" => matches!(err, Error::Json { .. }),
                _ => matches!(err, Error::Safetensors { .. }),
            };
            assert!(ok, "{text}: {err}");
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn corrupt_shard_is_a_safetensors_error() {
        let dir = temp_path("hf-corrupt");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(SINGLE_FILE);
        write_shard(&path, &sample_tensors());
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 3]).unwrap();
        assert!(matches!(
            HfWeights::open(&dir),
            Err(Error::Safetensors { .. })
        ));
        std::fs::write(&path, &bytes[..5]).unwrap();
        assert!(matches!(
            HfWeights::open(&dir),
            Err(Error::Safetensors { .. })
        ));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
