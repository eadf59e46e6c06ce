//! Draft-head training by self-distillation (SPEC §6), behind the `train` feature.
//!
//! Two stages, each resumable:
//!
//! 1. **Data** ([`prompts`], [`data`]): read a prompt file (JSON array or JSON Lines, any field
//!    spec), apply the chat template, let the target answer in large batches with
//!    [`crate::generate()`], and write `{prompt_ids, response_ids}` records plus a manifest. The
//!    ablation "train on the dataset's reference answers" writes tokenised answers instead.
//!    Without a prompt file, [`synthesize`] lets the target write the prompts itself.
//! 2. **Training** ([`trainer`]): the frozen target (on `B`) gives hidden states; the
//!    [`RecurrentDrafter`](crate::drafter::RecurrentDrafter) trains on `Autodiff<B>` with
//!    teacher forcing over every position and K draft steps ([`targets`], [`loss`]), AdamW and a
//!    warmup + cosine schedule ([`schedule`]), with checkpoints ([`state`]).
//!
//! ```no_run
//! # fn main() -> redrafter::Result<()> {
//! use redrafter::drafter::{DraftHeadKind, RecurrentDrafterConfig, CheckpointDType};
//! use redrafter::models::llama::{LlamaLoadOptions, load_llama};
//! use redrafter::train::{data, dataset, prompts, trainer};
//! use redrafter::{GenerationConfig, TargetModel};
//! type B = redrafter::backend::Cpu;
//!
//! let path = redrafter::hub::smollm2_instruct_gguf()?;
//! let (model, tokenizer) = load_llama::<B>(&path, &LlamaLoadOptions::default(), &Default::default())?;
//!
//! // 1. Data.
//! let spec = prompts::FieldSpec::gsm8k();
//! let records = prompts::read_prompts("gsm8k_train.jsonl", &spec, None)?;
//! let prompts = data::tokenize_prompts(&records[..100], &tokenizer, None)?;
//! let config = data::DataGenConfig {
//!     generation: GenerationConfig::default()
//!         .with_max_new_tokens(256)
//!         .with_stop_tokens(tokenizer.eos_token_ids().to_vec()),
//!     ..Default::default()
//! };
//! let manifest = data::Manifest {
//!     version: data::MANIFEST_VERSION,
//!     target: data::TargetIdentity::from_path(&path, model.hidden_size(), model.vocab_size())?,
//!     source: data::PromptSource {
//!         path: "gsm8k_train.jsonl".into(),
//!         sha256: None,
//!         fields: spec.to_string(),
//!         reference_field: None,
//!         system: None,
//!     },
//!     responses: data::ResponseSource::Generated,
//!     generation: config.generation.clone(),
//!     max_prompt_tokens: config.max_prompt_tokens,
//!     counts: Default::default(),
//! };
//! data::generate_dataset(&model, &prompts, "data/gsm8k", manifest, &config, |_| {})?;
//!
//! // 2. Training.
//! let data = dataset::load_training_data(&["data/gsm8k"], 2048, model.vocab_size())?;
//! let (train, eval) = dataset::split_eval(data.sequences, 0.05, 0);
//! let drafter = RecurrentDrafterConfig::new(model.hidden_size(), model.vocab_size())
//!     .with_head(DraftHeadKind::Tied);
//! let report = trainer::train_drafter(
//!     &model, &drafter, &train, &eval, "drafter.safetensors",
//!     &trainer::TrainConfig::default(), CheckpointDType::F32, |_| {},
//! )?;
//! println!("τ(beam 1) ≈ {:.2}", 1.0 + report.eval.unwrap().mean_accepted);
//! # Ok(())
//! # }
//! ```

mod budget;
pub mod data;
pub mod dataset;
pub mod loss;
pub mod prompts;
pub mod schedule;
pub mod state;
pub mod synthesize;
pub mod targets;
pub mod trainer;

pub use budget::{CALIBRATION_STEPS, REPLAN_EVERY};
pub use data::{
    DataGenConfig, Manifest, ResponseSource, SequenceRecord, TargetIdentity, generate_dataset,
};
pub use dataset::{Sequence, TrainingData, load_training_data, split_eval};
pub use loss::{EvalReport, SoftLabels};
pub use prompts::{FieldSpec, PromptRecord, read_prompts};
pub use synthesize::{
    PromptSynthesisConfig, SynthesisCounts, SynthesizedPrompts, synthesize_prompts,
};
pub use trainer::{
    HiddenCache, TrainConfig, TrainEvent, TrainReport, evaluate_drafter, train_drafter,
};
