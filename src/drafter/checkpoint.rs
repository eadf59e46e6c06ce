//! [`RecurrentDrafter`] checkpoints: safetensors files under the reference implementation's
//! tensor names, so its published drafters load and ours load back into it.
//!
//! | tensor | PyTorch shape `[out, in]` |
//! | --- | --- |
//! | `rnn_w.weight` | `[H, H]` |
//! | `rnn_u.weight`, `rnn_u.bias` | `[H, H]`, `[H]` |
//! | `input_proj.weight`, `input_proj.bias` (if `exit_dim != 2H`) | `[exit, 2H]`, `[exit]` |
//! | `lm_head.{i}.linear.weight`, `.bias`, i < N | `[exit, exit]`, `[exit]` |
//! | `lm_head.{N}.weight` | `[V, exit]` (separate head) or `[H, exit]` (tied head) |
//! | `fuse.weight` (ours; only with `k` tapped layers) | `[H, k·H]` |
//!
//! Burn stores a linear weight as `[in, out]`, so weights are transposed on the way in and out.
//! The configuration travels as JSON in the safetensors metadata under
//! [`CONFIG_METADATA_KEY`]. Files without it (the published layout) are read with a drafter
//! `config.json` beside them if there is one, else with the configuration inferred from the
//! tensor shapes.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};

use burn::module::Param;
use burn::nn::Linear;
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use memmap2::Mmap;
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use safetensors::{SafeTensorError, serialize_to_file};

use super::recurrent::{
    DEFAULT_TRAINED_STEPS, DraftHeadKind, RecurrentDrafter, RecurrentDrafterConfig, ResBlock,
    check_fits,
};
use crate::error::{Error, Result};
use crate::target::TargetModel;

/// Safetensors metadata key holding the drafter configuration as JSON.
pub const CONFIG_METADATA_KEY: &str = "redrafter_config";

/// Element type of a saved checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CheckpointDType {
    /// 32-bit floats: exact round trip.
    #[default]
    F32,
    /// IEEE half precision: half the size, ~3 significant digits.
    F16,
    /// bfloat16: half the size, f32's range, ~2 significant digits.
    BF16,
}

impl CheckpointDType {
    fn safetensors(self) -> Dtype {
        match self {
            CheckpointDType::F32 => Dtype::F32,
            CheckpointDType::F16 => Dtype::F16,
            CheckpointDType::BF16 => Dtype::BF16,
        }
    }

    fn encode(self, values: &[f32]) -> Vec<u8> {
        match self {
            CheckpointDType::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            CheckpointDType::F16 => values
                .iter()
                .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
                .collect(),
            CheckpointDType::BF16 => values
                .iter()
                .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
                .collect(),
        }
    }
}

/// One linear layer as the checkpoint names and shapes it.
struct LayerSpec {
    /// Name prefix: `{name}.weight`, `{name}.bias`.
    name: String,
    d_in: usize,
    d_out: usize,
    bias: bool,
}

/// Every linear layer a configuration has, under its checkpoint name.
fn layer_specs(config: &RecurrentDrafterConfig) -> Vec<LayerSpec> {
    let h = config.hidden_size;
    let exit = config.exit_dim;
    let spec = |name: String, d_in, d_out, bias| LayerSpec {
        name,
        d_in,
        d_out,
        bias,
    };
    let mut specs = Vec::new();
    let taps = config.tapped_layers.len();
    if taps > 0 {
        specs.push(spec("fuse".into(), taps * h, h, false));
    }
    if config.rnn {
        specs.push(spec("rnn_w".into(), h, h, false));
        specs.push(spec("rnn_u".into(), h, h, true));
    }
    if config.has_input_proj() {
        specs.push(spec("input_proj".into(), 2 * h, exit, true));
    }
    for i in 0..config.num_draft_layers {
        specs.push(spec(format!("lm_head.{i}.linear"), exit, exit, true));
    }
    specs.push(spec(
        format!("lm_head.{}", config.num_draft_layers),
        exit,
        config.head_out_dim(),
        false,
    ));
    specs
}

impl<B: Backend> RecurrentDrafter<B> {
    /// The parameters under their checkpoint names, in [`layer_specs`] order.
    pub(crate) fn named_layers(&self) -> Vec<(String, &Linear<B>)> {
        let mut layers = Vec::new();
        if let Some(fuse) = &self.fuse {
            layers.push(("fuse".to_string(), fuse));
        }
        if let Some(w) = &self.rnn_w {
            layers.push(("rnn_w".to_string(), w));
        }
        if let Some(u) = &self.rnn_u {
            layers.push(("rnn_u".to_string(), u));
        }
        if let Some(p) = &self.input_proj {
            layers.push(("input_proj".to_string(), p));
        }
        for (i, block) in self.res_blocks.iter().enumerate() {
            layers.push((format!("lm_head.{i}.linear"), &block.linear));
        }
        layers.push((format!("lm_head.{}", self.res_blocks.len()), &self.head));
        layers
    }

    /// Saves the parameters (not the target's embeddings) and the configuration.
    ///
    /// # Errors
    /// [`Error::Safetensors`] if the file cannot be written.
    pub fn save(&self, path: impl AsRef<Path>, dtype: CheckpointDType) -> Result<()> {
        let path = path.as_ref();
        let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
        for (name, linear) in self.named_layers() {
            // Burn's [in, out] → PyTorch's [out, in]; into_data yields the logical layout.
            let weight = linear.weight.val().transpose();
            let shape = weight.dims().to_vec();
            let values = host_f32(weight)?;
            tensors.push((format!("{name}.weight"), shape, dtype.encode(&values)));
            if let Some(bias) = &linear.bias {
                let bias = bias.val();
                let shape = bias.dims().to_vec();
                let values = host_f32(bias)?;
                tensors.push((format!("{name}.bias"), shape, dtype.encode(&values)));
            }
        }
        let views = tensors
            .iter()
            .map(|(name, shape, bytes)| {
                TensorView::new(dtype.safetensors(), shape.clone(), bytes)
                    .map(|view| (name.clone(), view))
            })
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| st_error(path, e))?;
        let config = serde_json::to_string(self.config()).map_err(|e| Error::Json {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let metadata = HashMap::from([
            (CONFIG_METADATA_KEY.to_string(), config),
            // What Hugging Face loaders expect of PyTorch-layout files.
            ("format".to_string(), "pt".to_string()),
        ]);
        serialize_to_file(views, Some(metadata), path).map_err(|e| st_error(path, e))?;
        tracing::info!(path = %path.display(), ?dtype, "saved draft head");
        Ok(())
    }

    /// Loads a checkpoint for a target of hidden size `target_hidden` and vocabulary
    /// `target_vocab`, and attaches the target's frozen embeddings. The parameters are stored
    /// in the embeddings' float type (whatever the file's), as
    /// [`with_dtype`](Self::with_dtype) does.
    ///
    /// # Shapes
    /// `input_embedding`, `output_embedding`: `[target_vocab, target_hidden]`
    ///
    /// # Errors
    /// [`Error::DrafterMismatch`] if the drafter was made for another hidden size or vocabulary
    /// (or the tables disagree with them); [`Error::MissingTensor`], [`Error::ShapeMismatch`],
    /// [`Error::Safetensors`], [`Error::Json`], [`Error::InvalidConfig`] for a bad file.
    pub fn load(
        path: impl AsRef<Path>,
        target_hidden: usize,
        target_vocab: usize,
        input_embedding: Tensor<B, 2>,
        output_embedding: Tensor<B, 2>,
        device: &B::Device,
    ) -> Result<Self> {
        let drafter = load_checked(path.as_ref(), Some((target_hidden, target_vocab)), device)?;
        // Draft in the target's float type: its hidden states and embedding rows then go in as
        // they are, with no cast (see `with_dtype`).
        drafter
            .with_dtype(input_embedding.dtype())?
            .with_embeddings(input_embedding, output_embedding)
    }

    /// [`Self::load`] with the sizes, embeddings and device taken from `target`.
    pub fn load_for_target<T: TargetModel<B>>(path: impl AsRef<Path>, target: &T) -> Result<Self> {
        Self::load(
            path,
            target.hidden_size(),
            target.vocab_size(),
            target.input_embedding(),
            target.output_embedding(),
            &target.device(),
        )
    }

    /// Loads only the parameters (no embeddings attached, no target check), e.g. to resume
    /// training or to inspect a checkpoint. A tied head without stored configuration cannot be
    /// loaded this way: its vocabulary is not in the tensors.
    pub fn load_parameters(path: impl AsRef<Path>, device: &B::Device) -> Result<Self> {
        load_checked(path.as_ref(), None, device)
    }
}

/// Reads the configuration a checkpoint would be loaded with, without loading the weights.
/// `target` (hidden size, vocabulary) helps to infer a tied head's vocabulary in files without
/// stored configuration.
pub fn read_checkpoint_config(
    path: impl AsRef<Path>,
    target: Option<(usize, usize)>,
) -> Result<RecurrentDrafterConfig> {
    let path = path.as_ref();
    let map = map_file(path)?;
    let file = SafeTensors::deserialize(&map).map_err(|e| st_error(path, e))?;
    resolve_config(path, &map, &file, target)
}

fn load_checked<B: Backend>(
    path: &Path,
    target: Option<(usize, usize)>,
    device: &B::Device,
) -> Result<RecurrentDrafter<B>> {
    let map = map_file(path)?;
    let file = SafeTensors::deserialize(&map).map_err(|e| st_error(path, e))?;
    let config = resolve_config(path, &map, &file, target)?;
    config.validate()?;
    if let Some((hidden, vocab)) = target {
        check_fits(&config, hidden, vocab)?;
    }

    let specs = layer_specs(&config);
    let mut used = HashSet::new();
    let mut layers: HashMap<String, Linear<B>> = HashMap::new();
    for spec in &specs {
        let weight_name = format!("{}.weight", spec.name);
        let weight = read_tensor(path, &file, &weight_name, &[spec.d_out, spec.d_in])?;
        used.insert(weight_name);
        let weight = transpose(&weight, spec.d_out, spec.d_in);
        let bias = if spec.bias {
            let bias_name = format!("{}.bias", spec.name);
            let bias = read_tensor(path, &file, &bias_name, &[spec.d_out])?;
            used.insert(bias_name);
            Some(Param::from_data(
                TensorData::new(bias, [spec.d_out]),
                device,
            ))
        } else {
            None
        };
        let linear = Linear {
            weight: Param::from_data(TensorData::new(weight, [spec.d_in, spec.d_out]), device),
            bias,
        };
        layers.insert(spec.name.clone(), linear);
    }
    let unused: Vec<_> = file
        .names()
        .into_iter()
        .filter(|name| !used.contains(*name))
        .collect();
    if !unused.is_empty() {
        tracing::warn!(path = %path.display(), ?unused, "ignoring tensors the draft head does not use");
    }

    let mut take = |name: &str| {
        layers
            .remove(name)
            .ok_or_else(|| Error::MissingTensor(format!("{name}.weight")))
    };
    let fuse = (!config.tapped_layers.is_empty())
        .then(|| take("fuse"))
        .transpose()?;
    let rnn_w = config.rnn.then(|| take("rnn_w")).transpose()?;
    let rnn_u = config.rnn.then(|| take("rnn_u")).transpose()?;
    let input_proj = config
        .has_input_proj()
        .then(|| take("input_proj"))
        .transpose()?;
    let res_blocks = (0..config.num_draft_layers)
        .map(|i| take(&format!("lm_head.{i}.linear")).map(|linear| ResBlock { linear }))
        .collect::<Result<Vec<_>>>()?;
    let head = take(&format!("lm_head.{}", config.num_draft_layers))?;
    tracing::info!(path = %path.display(), ?config, "loaded draft head");
    Ok(RecurrentDrafter {
        fuse,
        rnn_w,
        rnn_u,
        input_proj,
        res_blocks,
        head,
        input_embedding: None,
        output_embedding: None,
        config,
        top_k: super::TopKMethod::Auto,
        top_k_cache: super::TopKCache::default(),
        merges_exit: true,
        chains_draft: true,
        draft_vocabulary: None,
    })
}

fn map_file(path: &Path) -> Result<Mmap> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    // SAFETY: the map is read-only and lives only while this load runs; as with every
    // memory-mapped weight loader, the file must not be truncated meanwhile.
    unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))
}

fn st_error(path: &Path, e: SafeTensorError) -> Error {
    Error::Safetensors {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

/// Configuration of a checkpoint: stored metadata, else a drafter `config.json` beside the
/// file, else inferred from the tensor shapes.
fn resolve_config(
    path: &Path,
    map: &[u8],
    file: &SafeTensors<'_>,
    target: Option<(usize, usize)>,
) -> Result<RecurrentDrafterConfig> {
    let (_, metadata) = SafeTensors::read_metadata(map).map_err(|e| st_error(path, e))?;
    if let Some(json) = metadata
        .metadata()
        .as_ref()
        .and_then(|m| m.get(CONFIG_METADATA_KEY))
    {
        return serde_json::from_str(json).map_err(|e| Error::Json {
            path: path.to_path_buf(),
            message: format!("metadata `{CONFIG_METADATA_KEY}`: {e}"),
        });
    }
    if let Some(config) = sibling_config(path)? {
        return Ok(config);
    }
    let config = infer_config(file, target)?;
    tracing::info!(path = %path.display(), ?config, "no stored configuration; inferred it from tensor shapes");
    Ok(config)
}

/// A drafter `config.json` in the checkpoint's directory. A model directory's `config.json`
/// can belong to the target instead, so only a file that names drafter fields counts.
fn sibling_config(path: &Path) -> Result<Option<RecurrentDrafterConfig>> {
    let candidate: PathBuf = path.with_file_name("config.json");
    let Ok(text) = std::fs::read_to_string(&candidate) else {
        return Ok(None);
    };
    let json_error = |message: String| Error::Json {
        path: candidate.clone(),
        message,
    };
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| json_error(e.to_string()))?;
    if value.get("num_draft_layers").is_none() {
        tracing::debug!(path = %candidate.display(), "config.json is not a drafter configuration; ignoring it");
        return Ok(None);
    }
    let config = serde_json::from_value(value).map_err(|e| json_error(e.to_string()))?;
    tracing::info!(path = %candidate.display(), "using the drafter configuration beside the checkpoint");
    Ok(Some(config))
}

/// Infers the configuration of a published-layout file from its tensor shapes.
///
/// `num_draft_layers` counts the `lm_head.{i}.linear` blocks; `H` comes from `rnn_w`, else from
/// `input_proj` (`2H` inputs), else from `exit_dim = 2H`; `rnn` is the presence of `rnn_w`; the
/// last head's output is the vocabulary. An output of width `H` (and not the target's
/// vocabulary) marks a tied head, whose vocabulary is the target's. The trained steps are the
/// published recipe's.
fn infer_config(
    file: &SafeTensors<'_>,
    target: Option<(usize, usize)>,
) -> Result<RecurrentDrafterConfig> {
    let shape = |name: &str| file.tensor(name).ok().map(|t| t.shape().to_vec());
    let mut num_draft_layers = 0;
    while shape(&format!("lm_head.{num_draft_layers}.linear.weight")).is_some() {
        num_draft_layers += 1;
    }
    let head_name = format!("lm_head.{num_draft_layers}.weight");
    let head = shape(&head_name).ok_or_else(|| Error::MissingTensor(head_name.clone()))?;
    let [head_out, exit_dim] = matrix(&head_name, &head)?;

    let rnn = shape("rnn_w.weight");
    let input_proj = shape("input_proj.weight");
    let hidden_size = match (&rnn, &input_proj) {
        (Some(w), _) => matrix("rnn_w.weight", w)?[0],
        (None, Some(p)) => matrix("input_proj.weight", p)?[1] / 2,
        (None, None) => exit_dim / 2,
    };
    let (head, vocab_size) = match target {
        Some((_, vocab)) if head_out == vocab => (DraftHeadKind::Separate, head_out),
        Some((_, vocab)) if head_out == hidden_size => (DraftHeadKind::Tied, vocab),
        None if head_out == hidden_size => {
            return Err(Error::InvalidConfig(format!(
                "`{head_name}` maps to the hidden size {hidden_size}, i.e. a tied head, whose \
                 vocabulary is not stored; load it for a target (RecurrentDrafter::load)"
            )));
        }
        _ => (DraftHeadKind::Separate, head_out),
    };
    Ok(RecurrentDrafterConfig {
        hidden_size,
        vocab_size,
        exit_dim,
        num_draft_layers,
        rnn: rnn.is_some(),
        head,
        trained_steps: Some(DEFAULT_TRAINED_STEPS),
        // A published file stores no configuration, and the published head taps no layer.
        tapped_layers: Vec::new(),
    })
}

fn matrix(name: &str, shape: &[usize]) -> Result<[usize; 2]> {
    match shape {
        [a, b] => Ok([*a, *b]),
        _ => Err(Error::ShapeMismatch {
            tensor: name.into(),
            expected: vec![0, 0],
            found: shape.to_vec(),
        }),
    }
}

/// Reads a tensor as f32 (from f32, f16, bf16 or f64), checking its shape.
fn read_tensor(
    path: &Path,
    file: &SafeTensors<'_>,
    name: &str,
    expected: &[usize],
) -> Result<Vec<f32>> {
    let view = file
        .tensor(name)
        .map_err(|_| Error::MissingTensor(name.into()))?;
    if view.shape() != expected {
        return Err(Error::ShapeMismatch {
            tensor: name.into(),
            expected: expected.to_vec(),
            found: view.shape().to_vec(),
        });
    }
    let bytes = view.data();
    let values = match view.dtype() {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::F64 => bytes
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32)
            .collect(),
        other => {
            return Err(Error::Safetensors {
                path: path.to_path_buf(),
                message: format!(
                    "tensor `{name}` has element type {other:?}; draft heads load from F32, \
                     F16, BF16 or F64"
                ),
            });
        }
    };
    Ok(values)
}

/// Row-major `[rows, cols]` to row-major `[cols, rows]`.
fn transpose(values: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; values.len()];
    for (r, row) in values.chunks_exact(cols).enumerate() {
        for (c, v) in row.iter().enumerate() {
            out[c * rows + r] = *v;
        }
    }
    out
}

/// Copies a tensor to the host as f32.
fn host_f32<B: Backend, const D: usize>(tensor: Tensor<B, D>) -> Result<Vec<f32>> {
    tensor
        .into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .map_err(|e| Error::Backend(format!("reading draft head weights: {e:?}")))
}
