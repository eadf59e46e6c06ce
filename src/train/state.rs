//! Training checkpoints: where they live, the JSON training state, the optimiser moments, and the
//! guard that keeps a diverged drafter from overwriting the last good one.
//!
//! For `--out drafter.safetensors` a checkpoint is
//!
//! | file | what |
//! | --- | --- |
//! | `drafter.safetensors` | the drafter ([`RecurrentDrafter::save`]), usable for inference at once |
//! | `drafter.train.json` | [`TrainState`]: step, epoch, best evaluation, settings |
//! | `drafter.optim.bin` | AdamW moments (Burn's binary record), keyed by parameter order |
//! | `drafter.best.safetensors` | the drafter with the best held-out `mean_accepted` so far |
//!
//! Every file is written to a temporary sibling and renamed into place, and nothing is written
//! unless every parameter is finite.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use burn::module::{AutodiffModule, Module, ModuleVisitor, Param, ParamId, list_param_ids};
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::{AdamW, Optimizer};
use burn::record::{BinFileRecorder, FullPrecisionSettings, Recorder};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{ElementConversion, Tensor};
use serde::{Deserialize, Serialize};

use super::data::{temporary_sibling, write_atomic};
use super::loss::EvalReport;
use super::trainer::TrainConfig;
use crate::drafter::{CheckpointDType, RecurrentDrafter, RecurrentDrafterConfig};
use crate::error::{Error, Result};

/// Version of the [`TrainState`] layout.
pub const STATE_VERSION: u32 = 1;

/// The optimiser the trainer uses.
pub type DraftOptimizer<AB> = OptimizerAdaptor<AdamW, RecurrentDrafter<AB>, AB>;

/// The files of one checkpoint, derived from the drafter's output path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointPaths {
    pub drafter: PathBuf,
    pub state: PathBuf,
    pub optimizer: PathBuf,
    pub best: PathBuf,
}

impl CheckpointPaths {
    /// `out` = `dir/name.safetensors` gives `dir/name.train.json`, `dir/name.optim.bin` and
    /// `dir/name.best.safetensors`.
    pub fn new(out: impl AsRef<Path>) -> Self {
        let out = out.as_ref();
        let stem = out
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "drafter".into());
        Self {
            drafter: out.to_path_buf(),
            state: out.with_file_name(format!("{stem}.train.json")),
            optimizer: out.with_file_name(format!("{stem}.optim.bin")),
            best: out.with_file_name(format!("{stem}.best.safetensors")),
        }
    }
}

/// Where a training run stands; written with every checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    pub version: u32,
    /// Optimiser steps done.
    pub step: usize,
    /// Epoch of the next step (0-based).
    pub epoch: usize,
    pub total_steps: usize,
    pub steps_per_epoch: usize,
    /// Training loss (sum over draft steps) of the last step.
    pub last_loss: Option<f64>,
    /// Last held-out evaluation.
    pub last_eval: Option<EvalReport>,
    /// Best held-out `mean_accepted` so far, and the step that reached it.
    pub best_eval: Option<f64>,
    pub best_step: Option<usize>,
    pub train_sequences: usize,
    pub eval_sequences: usize,
    pub drafter: RecurrentDrafterConfig,
    /// The settings of the run that wrote the file (informational: a resumed run takes the
    /// settings it is given). A draft vocabulary is not written out; its size is, below.
    pub config: TrainConfig,
    /// Size of the draft vocabulary the run trained over, if it had one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub draft_vocabulary_size: Option<usize>,
}

impl TrainState {
    /// Reads a state file; `None` if there is none.
    pub fn read(path: impl AsRef<Path>) -> Result<Option<Self>> {
        let path = path.as_ref();
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(path, e)),
        };
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| Error::Json {
                path: path.to_path_buf(),
                message: e.to_string(),
            })
    }

    /// Writes the state atomically.
    pub fn write(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let text = serde_json::to_string_pretty(self).map_err(|e| Error::Json {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        write_atomic(path, text.as_bytes())
    }
}

/// Sums `|p|` of every parameter, so one readback tells whether all are finite.
struct AbsSums<B: Backend> {
    sums: Vec<Tensor<B, 1>>,
}

impl<B: Backend> ModuleVisitor<B> for AbsSums<B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        self.sums.push(param.val().abs().sum());
    }
}

/// Whether every parameter of `module` is finite (one readback).
pub fn parameters_finite<B: Backend, M: Module<B>>(module: &M) -> bool {
    let mut visitor = AbsSums { sums: Vec::new() };
    module.visit(&mut visitor);
    if visitor.sums.is_empty() {
        return true;
    }
    let total: f64 = Tensor::cat(visitor.sums, 0)
        .sum()
        .into_scalar()
        .elem::<f64>();
    total.is_finite()
}

/// Saves a drafter atomically, refusing non-finite parameters.
///
/// # Errors
/// [`Error::NonFiniteLoss`] (with `loss` = NaN) if a parameter is not finite; nothing is
/// written then.
pub fn save_drafter_checked<B: Backend>(
    drafter: &RecurrentDrafter<B>,
    path: &Path,
    dtype: CheckpointDType,
    step: usize,
) -> Result<()> {
    if !parameters_finite(drafter) {
        return Err(Error::NonFiniteLoss {
            step,
            loss: f64::NAN,
        });
    }
    let tmp = temporary_sibling(path);
    drafter.save(&tmp, dtype)?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// Saves the optimiser moments, keyed by the position of each parameter in `drafter` (parameter
/// ids are fresh after every load, positions are not).
pub fn save_optimizer<AB: AutodiffBackend>(
    optimizer: &DraftOptimizer<AB>,
    drafter: &RecurrentDrafter<AB>,
    path: &Path,
) -> Result<()> {
    let position: HashMap<ParamId, u64> = list_param_ids(drafter)
        .into_iter()
        .enumerate()
        .map(|(i, id)| (id, i as u64))
        .collect();
    let record: <DraftOptimizer<AB> as Optimizer<RecurrentDrafter<AB>, AB>>::Record = optimizer
        .to_record()
        .into_iter()
        .filter_map(|(id, state)| position.get(&id).map(|&i| (ParamId::from(i), state)))
        .collect();
    // The recorder sets the extension itself: write `.name.tmp.bin`, then rename.
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp.bin"));
    BinFileRecorder::<FullPrecisionSettings>::new()
        .record(record, tmp.clone())
        .map_err(|e| {
            Error::Backend(format!(
                "saving optimiser state to {}: {e:?}",
                tmp.display()
            ))
        })?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// Loads optimiser moments saved by [`save_optimizer`] into `optimizer` for the parameters of
/// `drafter` (matched by position).
pub fn load_optimizer<AB: AutodiffBackend>(
    optimizer: DraftOptimizer<AB>,
    drafter: &RecurrentDrafter<AB>,
    path: &Path,
    device: &AB::Device,
) -> Result<DraftOptimizer<AB>> {
    let ids = list_param_ids(drafter);
    let record: <DraftOptimizer<AB> as Optimizer<RecurrentDrafter<AB>, AB>>::Record =
        BinFileRecorder::<FullPrecisionSettings>::new()
            .load(path.to_path_buf(), device)
            .map_err(|e| {
                Error::Backend(format!(
                    "loading optimiser state from {}: {e:?}",
                    path.display()
                ))
            })?;
    let record = record
        .into_iter()
        .filter_map(|(position, state)| ids.get(position.val() as usize).map(|&id| (id, state)))
        .collect();
    Ok(optimizer.load_record(record))
}

/// The inner-backend copy of a training drafter (no autodiff graph), e.g. for evaluation.
pub fn inference_copy<AB: AutodiffBackend>(
    drafter: &RecurrentDrafter<AB>,
) -> RecurrentDrafter<AB::InnerBackend> {
    drafter.valid()
}
