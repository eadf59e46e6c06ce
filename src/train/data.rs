//! Distillation data: prompts → the target's own responses (SPEC §6), written as JSON Lines with
//! a manifest, resumably.
//!
//! # Files in the output directory
//!
//! - [`DATA_FILE`] (`data.jsonl`): one [`SequenceRecord`] `{"index", "prompt_ids",
//!   "response_ids"}` per line, in the order batches finished (not by index).
//! - [`MANIFEST_FILE`] (`manifest.json`): a [`Manifest`] — which target, which prompt file and
//!   fields, which generation settings, and counts. It is rewritten after every batch.
//!
//! # Resuming
//!
//! Rerunning with the same settings skips every prompt whose index is already in `data.jsonl`.
//! A half-written last line (the process died mid-write) is cut off first. Different settings
//! (another model, prompt file, field spec or generation setting) are refused, so one directory
//! never mixes two distributions.
//!
//! # Batching
//!
//! [`crate::generate()`] right-pads a batch and keeps finished rows running until the last row
//! stops, so a batch costs as much as its longest prompt plus its longest response. Prompts are
//! therefore sorted by length within chunks of [`DataGenConfig::sort_chunk`] batches before
//! they are cut into batches.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use burn::tensor::backend::Backend;
use serde::{Deserialize, Serialize};

use super::prompts::PromptRecord;
use crate::chat_template::ChatMessage;
use crate::error::{Error, Result};
use crate::generate::{GenerationConfig, generate};
use crate::target::TargetModel;
use crate::tokenizer::Tokenizer;

/// Name of the records file inside a data directory.
pub const DATA_FILE: &str = "data.jsonl";
/// Name of the manifest inside a data directory.
pub const MANIFEST_FILE: &str = "manifest.json";
/// Version of the manifest layout.
pub const MANIFEST_VERSION: u32 = 1;

/// One training sequence as stored on disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SequenceRecord {
    /// Index of the prompt in its prompt file.
    pub index: usize,
    /// The chat-formatted prompt, generation prompt included.
    pub prompt_ids: Vec<u32>,
    /// The response: the target's own continuation (stop token included when it stopped), or
    /// the tokenised reference answer.
    pub response_ids: Vec<u32>,
}

/// Where the responses come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResponseSource {
    /// Self-distillation: the target generates them (the paper's recipe).
    Generated,
    /// Ablation: the dataset's reference answers, tokenised.
    Reference,
}

/// Identity of the target the data was made with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetIdentity {
    /// File (or directory) name of the model.
    pub name: String,
    /// sha256 of the weight file, or of `config.json` for a model directory; `None` for models
    /// that are not files (tests).
    pub sha256: Option<String>,
    pub hidden_size: usize,
    pub vocab_size: usize,
}

impl TargetIdentity {
    /// Identifies a model by its path: a GGUF/safetensors file is hashed whole; a Hugging Face
    /// directory by its `config.json` (hashing gigabytes of shards on every run would be slow).
    pub fn from_path(
        path: impl AsRef<Path>,
        hidden_size: usize,
        vocab_size: usize,
    ) -> Result<Self> {
        let path = path.as_ref();
        let hashed = if path.is_dir() {
            path.join("config.json")
        } else {
            path.to_path_buf()
        };
        let sha256 = crate::hub::sha256_file(&hashed)?;
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| path.display().to_string());
        Ok(Self {
            name,
            sha256: Some(sha256),
            hidden_size,
            vocab_size,
        })
    }

    /// Identifies a model that has no file (e.g. built in memory).
    pub fn named(name: impl Into<String>, hidden_size: usize, vocab_size: usize) -> Self {
        Self {
            name: name.into(),
            sha256: None,
            hidden_size,
            vocab_size,
        }
    }
}

/// Where the prompts came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PromptSource {
    /// The prompt file as given (informational: the file is identified by `sha256`).
    pub path: String,
    /// sha256 of the prompt file, if it is a file.
    pub sha256: Option<String>,
    /// The field spec (`instruction+input?`).
    pub fields: String,
    /// The reference-answer field, for [`ResponseSource::Reference`].
    pub reference_field: Option<String>,
    /// System message rendered before each prompt, if any.
    pub system: Option<String>,
}

/// Counts of a data directory.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataCounts {
    /// Prompts asked for (after offset/limit).
    pub prompts: usize,
    /// Records in `data.jsonl`.
    pub written: usize,
    /// Prompts skipped because they do not fit (`max_prompt_tokens` or the context window).
    pub skipped: usize,
    pub prompt_tokens: usize,
    pub response_tokens: usize,
    /// Responses that ended with a stop token (the rest hit `max_new_tokens`).
    pub stopped: usize,
}

/// The manifest of a data directory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub version: u32,
    pub target: TargetIdentity,
    pub source: PromptSource,
    pub responses: ResponseSource,
    /// Generation settings (for reference answers only `max_new_tokens` and the stop tokens
    /// matter: answers are cut to that length, and a stop token is appended to uncut ones).
    pub generation: GenerationConfig,
    /// Prompts longer than this many tokens are skipped.
    pub max_prompt_tokens: usize,
    pub counts: DataCounts,
}

impl Manifest {
    /// Reads `manifest.json` from a data directory.
    pub fn read(dir: impl AsRef<Path>) -> Result<Self> {
        let path = dir.as_ref().join(MANIFEST_FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        serde_json::from_str(&text).map_err(|e| Error::Json {
            path,
            message: e.to_string(),
        })
    }

    /// Writes it atomically (temporary file + rename), so a crash never leaves half a manifest.
    pub fn write(&self, dir: impl AsRef<Path>) -> Result<()> {
        let path = dir.as_ref().join(MANIFEST_FILE);
        let text = serde_json::to_string_pretty(self).map_err(|e| Error::Json {
            path: path.clone(),
            message: e.to_string(),
        })?;
        write_atomic(&path, text.as_bytes())
    }

    /// Records the settings of `config` (they are part of the data's identity).
    fn with_settings(mut self, config: &DataGenConfig) -> Self {
        self.generation = config.generation.clone();
        self.max_prompt_tokens = config.max_prompt_tokens;
        self
    }

    /// Why `other` describes different data, if it does (counts are not compared).
    fn difference(&self, other: &Manifest) -> Option<String> {
        fn differs<T: PartialEq + std::fmt::Debug>(what: &str, a: &T, b: &T) -> Option<String> {
            (a != b).then(|| format!("{what} {a:?} vs {b:?}"))
        }
        differs("target", &self.target, &other.target)
            .or_else(|| differs("prompt source", &self.source, &other.source))
            .or_else(|| differs("responses", &self.responses, &other.responses))
            .or_else(|| differs("generation settings", &self.generation, &other.generation))
            .or_else(|| {
                differs(
                    "max_prompt_tokens",
                    &self.max_prompt_tokens,
                    &other.max_prompt_tokens,
                )
            })
    }
}

/// A prompt ready for the target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenizedPrompt {
    /// Index in the prompt file (the resume key).
    pub index: usize,
    /// Chat-formatted prompt ids, generation prompt included.
    pub ids: Vec<u32>,
    /// Tokenised reference answer, for [`ResponseSource::Reference`].
    pub reference_ids: Option<Vec<u32>>,
}

/// Applies the chat template to each prompt (`system` first if given, then the prompt as the
/// user message, then the generation prompt) and tokenises reference answers (without special
/// tokens; [`write_reference_dataset`] appends the stop token).
pub fn tokenize_prompts(
    records: &[PromptRecord],
    tokenizer: &Tokenizer,
    system: Option<&str>,
) -> Result<Vec<TokenizedPrompt>> {
    records
        .iter()
        .map(|record| {
            let mut messages = Vec::with_capacity(2);
            if let Some(system) = system {
                messages.push(ChatMessage::system(system));
            }
            messages.push(ChatMessage::user(&record.text));
            let ids = tokenizer.encode_chat(&messages, true)?;
            let reference_ids = record
                .reference
                .as_deref()
                .map(|answer| tokenizer.encode(answer, false))
                .transpose()?;
            Ok(TokenizedPrompt {
                index: record.index,
                ids,
                reference_ids,
            })
        })
        .collect()
}

/// How to generate the responses.
#[derive(Debug, Clone, PartialEq)]
pub struct DataGenConfig {
    /// Passed to [`crate::generate()`]: max new tokens, stop tokens (EOS), greedy or sampled, seed.
    pub generation: GenerationConfig,
    /// Prompts per [`crate::generate()`] call. Large batches amortise the per-token overhead on
    /// GPUs (a decode step costs about the same for 1 or 64 rows).
    pub batch_size: usize,
    /// Prompts are sorted by length within chunks of this many batches.
    pub sort_chunk: usize,
    /// Prompts longer than this are skipped (and counted).
    pub max_prompt_tokens: usize,
}

impl Default for DataGenConfig {
    fn default() -> Self {
        Self {
            generation: GenerationConfig::default(),
            batch_size: 32,
            sort_chunk: 8,
            max_prompt_tokens: 1024,
        }
    }
}

/// Progress of a data-generation run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DataProgress {
    /// Prompts done (written or skipped), those of earlier runs included.
    pub done: usize,
    /// Prompts in this run's selection.
    pub total: usize,
    /// Prompts found already written when the run started.
    pub resumed: usize,
    /// Response tokens written by this run.
    pub new_tokens: usize,
}

/// Generates the target's responses to `prompts` into `out_dir` (see the module docs), calling
/// `on_progress` after every batch. `manifest` describes the run; its counts are filled in.
///
/// # Errors
/// [`Error::Data`] if `out_dir` holds data made with other settings; [`Error::InvalidSettings`]
/// for a zero batch size; whatever generation or I/O returns.
pub fn generate_dataset<B: Backend, M: TargetModel<B> + Sync>(
    model: &M,
    prompts: &[TokenizedPrompt],
    out_dir: impl AsRef<Path>,
    manifest: Manifest,
    config: &DataGenConfig,
    mut on_progress: impl FnMut(&DataProgress),
) -> Result<Manifest> {
    let manifest = manifest.with_settings(config);
    if config.batch_size == 0 {
        return Err(Error::InvalidSettings(
            "batch size must be at least 1".into(),
        ));
    }
    if manifest.responses != ResponseSource::Generated {
        return Err(Error::InvalidSettings(
            "generate_dataset makes generated responses; use write_reference_dataset for reference answers".into(),
        ));
    }
    let generation = &config.generation;
    let mut writer = DatasetWriter::open(out_dir.as_ref(), manifest, prompts.len())?;
    let mut progress = writer.progress();
    on_progress(&progress);

    // Prompts that can run: not done yet and short enough.
    let max_context = model.max_context();
    let mut todo: Vec<&TokenizedPrompt> = Vec::new();
    let pending: Vec<&TokenizedPrompt> = prompts
        .iter()
        .filter(|p| !writer.is_done(p.index))
        .collect();
    for prompt in pending {
        let fits = !prompt.ids.is_empty()
            && prompt.ids.len() <= config.max_prompt_tokens
            && prompt.ids.len() + generation.max_new_tokens <= max_context;
        if fits {
            todo.push(prompt);
        } else {
            tracing::warn!(
                index = prompt.index,
                tokens = prompt.ids.len(),
                "skipping a prompt that does not fit"
            );
            writer.manifest.counts.skipped += 1;
            progress.done += 1;
        }
    }

    let chunk = config.batch_size * config.sort_chunk.max(1);
    for block in todo.chunks(chunk) {
        let mut block = block.to_vec();
        block.sort_by_key(|p| p.ids.len());
        for batch in block.chunks(config.batch_size) {
            let ids: Vec<Vec<u32>> = batch.iter().map(|p| p.ids.clone()).collect();
            // A seed per batch (from its first index) keeps sampled runs reproducible.
            let batch_config = generation
                .clone()
                .with_seed(generation.seed.wrapping_add(batch[0].index as u64));
            let output = generate(model, &ids, &batch_config, |_, _| {})?;
            let records: Vec<SequenceRecord> = batch
                .iter()
                .zip(output.tokens)
                .map(|(p, response_ids)| SequenceRecord {
                    index: p.index,
                    prompt_ids: p.ids.clone(),
                    response_ids,
                })
                .collect();
            progress.new_tokens += records.iter().map(|r| r.response_ids.len()).sum::<usize>();
            progress.done += records.len();
            writer.append(&records)?;
            tracing::debug!(
                batch = records.len(),
                tokens_per_second = output.stats.tokens_per_second(),
                "generated a batch"
            );
            on_progress(&progress);
        }
    }
    writer.finish()
}

/// Writes the reference answers of `prompts` as responses (the ablation "train on the
/// dataset's answers"): each answer is cut to `generation.max_new_tokens`, and the first stop
/// token is appended to answers that were not cut — what the target emits at the end of a
/// turn.
///
/// # Errors
/// [`Error::Data`] if a prompt has no reference answer or `out_dir` holds other data.
pub fn write_reference_dataset(
    prompts: &[TokenizedPrompt],
    out_dir: impl AsRef<Path>,
    manifest: Manifest,
    config: &DataGenConfig,
    mut on_progress: impl FnMut(&DataProgress),
) -> Result<Manifest> {
    let manifest = manifest.with_settings(config);
    if manifest.responses != ResponseSource::Reference {
        return Err(Error::InvalidSettings(
            "write_reference_dataset writes reference answers; the manifest says generated".into(),
        ));
    }
    let generation = &config.generation;
    let mut writer = DatasetWriter::open(out_dir.as_ref(), manifest, prompts.len())?;
    let mut progress = writer.progress();
    let mut records = Vec::new();
    let pending: Vec<&TokenizedPrompt> = prompts
        .iter()
        .filter(|p| !writer.is_done(p.index))
        .collect();
    for prompt in pending {
        let answer = prompt.reference_ids.as_ref().ok_or_else(|| {
            Error::Data(format!("prompt {} has no reference answer", prompt.index))
        })?;
        if prompt.ids.is_empty() || prompt.ids.len() > config.max_prompt_tokens {
            writer.manifest.counts.skipped += 1;
            progress.done += 1;
            continue;
        }
        let mut response: Vec<u32> = answer
            .iter()
            .copied()
            .take(generation.max_new_tokens)
            .collect();
        if answer.len() < generation.max_new_tokens
            && let Some(&stop) = generation.stop_tokens.first()
        {
            response.push(stop);
        }
        progress.new_tokens += response.len();
        progress.done += 1;
        records.push(SequenceRecord {
            index: prompt.index,
            prompt_ids: prompt.ids.clone(),
            response_ids: response,
        });
    }
    writer.append(&records)?;
    on_progress(&progress);
    writer.finish()
}

/// Appends records to `data.jsonl` and keeps the manifest's counts in step.
struct DatasetWriter {
    dir: PathBuf,
    file: File,
    done: HashSet<usize>,
    manifest: Manifest,
    resumed: usize,
}

impl DatasetWriter {
    /// Opens (or creates) a data directory, checking an existing manifest against `manifest`
    /// and counting the records already there.
    fn open(dir: &Path, mut manifest: Manifest, prompts: usize) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        if dir.join(MANIFEST_FILE).exists() {
            let existing = Manifest::read(dir)?;
            if let Some(diff) = existing.difference(&manifest) {
                return Err(Error::Data(format!(
                    "{} holds data made with other settings ({diff}); use another output directory",
                    dir.display()
                )));
            }
        }
        let data_path = dir.join(DATA_FILE);
        let existing = read_records_repairing(&data_path)?;
        let mut counts = DataCounts {
            prompts,
            ..DataCounts::default()
        };
        let mut done = HashSet::with_capacity(existing.len());
        for record in &existing {
            if done.insert(record.index) {
                add_counts(&mut counts, record, &manifest.generation.stop_tokens);
            }
        }
        if !existing.is_empty() {
            tracing::info!(dir = %dir.display(), records = existing.len(), "resuming: skipping prompts already written");
        }
        manifest.counts = counts;
        manifest.version = MANIFEST_VERSION;
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&data_path)
            .map_err(|e| Error::io(&data_path, e))?;
        manifest.write(dir)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            file,
            resumed: done.len(),
            done,
            manifest,
        })
    }

    fn is_done(&self, index: usize) -> bool {
        self.done.contains(&index)
    }

    fn progress(&self) -> DataProgress {
        DataProgress {
            done: self.resumed,
            total: self.manifest.counts.prompts,
            resumed: self.resumed,
            new_tokens: 0,
        }
    }

    /// Appends whole lines in one write, then updates the manifest.
    fn append(&mut self, records: &[SequenceRecord]) -> Result<()> {
        if records.is_empty() {
            return Ok(());
        }
        let path = self.dir.join(DATA_FILE);
        let mut text = String::new();
        for record in records {
            let line = serde_json::to_string(record).map_err(|e| Error::Json {
                path: path.clone(),
                message: e.to_string(),
            })?;
            text.push_str(&line);
            text.push('\n');
            if self.done.insert(record.index) {
                add_counts(
                    &mut self.manifest.counts,
                    record,
                    &self.manifest.generation.stop_tokens,
                );
            }
        }
        self.file
            .write_all(text.as_bytes())
            .map_err(|e| Error::io(&path, e))?;
        self.file.flush().map_err(|e| Error::io(&path, e))?;
        self.manifest.write(&self.dir)
    }

    fn finish(self) -> Result<Manifest> {
        self.manifest.write(&self.dir)?;
        let counts = &self.manifest.counts;
        tracing::info!(
            dir = %self.dir.display(),
            written = counts.written,
            skipped = counts.skipped,
            response_tokens = counts.response_tokens,
            "data directory complete"
        );
        Ok(self.manifest)
    }
}

fn add_counts(counts: &mut DataCounts, record: &SequenceRecord, stop_tokens: &[u32]) {
    counts.written += 1;
    counts.prompt_tokens += record.prompt_ids.len();
    counts.response_tokens += record.response_ids.len();
    if record
        .response_ids
        .last()
        .is_some_and(|t| stop_tokens.contains(t))
    {
        counts.stopped += 1;
    }
}

/// Reads the records of a data directory.
///
/// # Errors
/// [`Error::Io`] if `data.jsonl` is missing; [`Error::Json`] (with the line) for a malformed
/// line.
pub fn read_records(dir: impl AsRef<Path>) -> Result<Vec<SequenceRecord>> {
    let path = dir.as_ref().join(DATA_FILE);
    let file = File::open(&path).map_err(|e| Error::io(&path, e))?;
    let mut records = Vec::new();
    for (i, line) in BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|e| Error::io(&path, e))?;
        if line.trim().is_empty() {
            continue;
        }
        records.push(serde_json::from_str(&line).map_err(|e| Error::Json {
            path: path.clone(),
            message: format!("line {}: {e}", i + 1),
        })?);
    }
    Ok(records)
}

/// Reads `data.jsonl` if it exists, cutting off a last line that was not completely written
/// (no trailing newline and not parseable) so appending continues on a clean line.
fn read_records_repairing(path: &Path) -> Result<Vec<SequenceRecord>> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(path, e)),
    };
    let complete = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    if complete < bytes.len() {
        tracing::warn!(path = %path.display(), bytes = bytes.len() - complete, "cutting off a half-written last line");
        let file = OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(|e| Error::io(path, e))?;
        file.set_len(complete as u64)
            .map_err(|e| Error::io(path, e))?;
    }
    let text = std::str::from_utf8(&bytes[..complete])
        .map_err(|e| Error::Data(format!("{}: {e}", path.display())))?;
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(i, line)| {
            serde_json::from_str(line).map_err(|e| Error::Json {
                path: path.to_path_buf(),
                message: format!("line {}: {e}", i + 1),
            })
        })
        .collect()
}

/// Writes a file through a temporary sibling and a rename, so readers (and a crash) see either
/// the old or the new contents, never a mix.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = temporary_sibling(path);
    std::fs::write(&tmp, bytes).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// `dir/.name.tmp` next to `path`.
pub(crate) fn temporary_sibling(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest() -> Manifest {
        Manifest {
            version: MANIFEST_VERSION,
            target: TargetIdentity::named("test", 4, 10),
            source: PromptSource {
                path: "p.jsonl".into(),
                sha256: None,
                fields: "question".into(),
                reference_field: Some("answer".into()),
                system: None,
            },
            responses: ResponseSource::Reference,
            generation: GenerationConfig::default()
                .with_max_new_tokens(3)
                .with_stop_tokens(vec![9]),
            max_prompt_tokens: 8,
            counts: DataCounts::default(),
        }
    }

    fn prompt(index: usize, answer: &[u32]) -> TokenizedPrompt {
        TokenizedPrompt {
            index,
            ids: vec![1, 2, index as u32],
            reference_ids: Some(answer.to_vec()),
        }
    }

    #[test]
    fn reference_answers_are_cut_and_stopped_and_runs_resume() {
        let dir = std::env::temp_dir().join(format!("redrafter-data-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let config = DataGenConfig {
            generation: manifest().generation,
            ..DataGenConfig::default()
        };
        let first = [prompt(0, &[5, 6]), prompt(1, &[5, 6, 7, 8])];
        let m = write_reference_dataset(&first, &dir, manifest(), &config, |_| {}).unwrap();
        assert_eq!(m.counts.written, 2);
        assert_eq!(m.counts.stopped, 1);
        let records = read_records(&dir).unwrap();
        assert_eq!(records[0].response_ids, vec![5, 6, 9]);
        assert_eq!(records[1].response_ids, vec![5, 6, 7]);

        // A crash mid-write leaves half a line; the rerun cuts it and adds only prompt 2.
        let mut file = OpenOptions::new()
            .append(true)
            .open(dir.join(DATA_FILE))
            .unwrap();
        file.write_all(b"{\"index\": 2, \"prompt_ids\": [1")
            .unwrap();
        drop(file);
        let all = [prompt(0, &[5]), prompt(1, &[5]), prompt(2, &[4])];
        let mut last = DataProgress::default();
        let m =
            write_reference_dataset(&all, &dir, manifest(), &config, |p| last = p.clone()).unwrap();
        assert_eq!(last.resumed, 2);
        assert_eq!(last.done, 3);
        assert_eq!(m.counts.written, 3);
        let records = read_records(&dir).unwrap();
        assert_eq!(records.len(), 3);
        assert_eq!(
            records[2],
            SequenceRecord {
                index: 2,
                prompt_ids: vec![1, 2, 2],
                response_ids: vec![4, 9]
            }
        );
        assert_eq!(Manifest::read(&dir).unwrap().counts, m.counts);

        // Other settings are refused.
        let mut other = config.clone();
        other.generation.max_new_tokens = 4;
        let err = write_reference_dataset(&all, &dir, manifest(), &other, |_| {}).unwrap_err();
        assert!(
            matches!(&err, Error::Data(m) if m.contains("other settings")),
            "{err:?}"
        );
        std::fs::remove_dir_all(&dir).ok();
    }
}
