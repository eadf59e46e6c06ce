//! Training sequences: data directories (see [`super::data`]) read back as prompt + response
//! token sequences, truncated, checked against the target and split into train and eval sets.

use std::path::{Path, PathBuf};

use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;

use super::data::{Manifest, read_records};
use crate::error::{Error, Result};

/// One training sequence: prompt followed by response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sequence {
    /// Prompt then response token ids.
    pub tokens: Vec<u32>,
    /// Number of leading prompt tokens; labels at positions `≥ prompt_len` are response tokens
    /// and are the only ones trained on.
    pub prompt_len: usize,
}

impl Sequence {
    /// Builds a sequence, truncated to `max_len` tokens. `None` when no response token is left.
    pub fn new(prompt: &[u32], response: &[u32], max_len: usize) -> Option<Self> {
        let mut tokens = Vec::with_capacity((prompt.len() + response.len()).min(max_len));
        tokens.extend(prompt.iter().chain(response).copied().take(max_len));
        (tokens.len() > prompt.len()).then_some(Self {
            tokens,
            prompt_len: prompt.len(),
        })
    }

    /// Total length.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Whether the sequence has no tokens.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Number of response tokens.
    pub fn response_len(&self) -> usize {
        self.tokens.len().saturating_sub(self.prompt_len)
    }
}

/// Sequences read from one or more data directories, with their manifests.
#[derive(Debug, Clone)]
pub struct TrainingData {
    pub sequences: Vec<Sequence>,
    pub manifests: Vec<(PathBuf, Manifest)>,
    /// Records dropped because no response token survived truncation.
    pub dropped: usize,
}

/// Reads data directories into sequences of at most `max_len` tokens for a target of
/// `vocab_size` tokens.
///
/// # Errors
/// - [`Error::Data`] if no directory is given, the directories were made with different targets,
///   or no usable sequence remains;
/// - [`Error::TokenOutOfRange`] if a token does not fit the vocabulary;
/// - I/O and JSON errors of the files.
pub fn load_training_data(
    dirs: &[impl AsRef<Path>],
    max_len: usize,
    vocab_size: usize,
) -> Result<TrainingData> {
    if dirs.is_empty() {
        return Err(Error::Data("no data directory given".into()));
    }
    let mut sequences = Vec::new();
    let mut manifests: Vec<(PathBuf, Manifest)> = Vec::new();
    let mut dropped = 0;
    for dir in dirs {
        let dir = dir.as_ref();
        let manifest = Manifest::read(dir)?;
        if let Some((first_dir, first)) = manifests.first()
            && first.target != manifest.target
        {
            return Err(Error::Data(format!(
                "{} was made with target {:?} but {} with {:?}; train on data of one target",
                first_dir.display(),
                first.target,
                dir.display(),
                manifest.target
            )));
        }
        let records = read_records(dir)?;
        for record in &records {
            if let Some(&token) = record
                .prompt_ids
                .iter()
                .chain(&record.response_ids)
                .find(|&&t| t as usize >= vocab_size)
            {
                return Err(Error::TokenOutOfRange { token, vocab_size });
            }
            match Sequence::new(&record.prompt_ids, &record.response_ids, max_len) {
                Some(sequence) => sequences.push(sequence),
                None => dropped += 1,
            }
        }
        tracing::info!(dir = %dir.display(), records = records.len(), "read training data");
        manifests.push((dir.to_path_buf(), manifest));
    }
    if dropped > 0 {
        tracing::warn!(
            dropped,
            max_len,
            "dropped sequences with no response token within the length limit"
        );
    }
    if sequences.is_empty() {
        return Err(Error::Data(
            "the data directories hold no usable sequence".into(),
        ));
    }
    Ok(TrainingData {
        sequences,
        manifests,
        dropped,
    })
}

/// Splits sequences into (train, eval): a seeded shuffle, then `eval_fraction` of them (at
/// least one when the fraction is positive and at least two sequences exist) for evaluation.
pub fn split_eval(
    mut sequences: Vec<Sequence>,
    eval_fraction: f64,
    seed: u64,
) -> (Vec<Sequence>, Vec<Sequence>) {
    let n = sequences.len();
    let mut n_eval = (n as f64 * eval_fraction.clamp(0.0, 1.0)).round() as usize;
    if eval_fraction > 0.0 && n >= 2 {
        n_eval = n_eval.clamp(1, n - 1);
    }
    sequences.shuffle(&mut StdRng::seed_from_u64(seed));
    let train = sequences.split_off(n_eval);
    (train, sequences)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncation_keeps_the_prompt_and_drops_responseless_sequences() {
        let s = Sequence::new(&[1, 2, 3], &[4, 5, 6], 5).unwrap();
        assert_eq!(s.tokens, vec![1, 2, 3, 4, 5]);
        assert_eq!((s.prompt_len, s.response_len()), (3, 2));
        assert!(Sequence::new(&[1, 2, 3], &[4], 3).is_none());
        assert!(Sequence::new(&[1, 2], &[], 8).is_none());
    }

    #[test]
    fn split_is_seeded_and_keeps_everything() {
        let seqs: Vec<Sequence> = (0..20)
            .map(|i| Sequence::new(&[i], &[i + 1], 8).unwrap())
            .collect();
        let (train, eval) = split_eval(seqs.clone(), 0.1, 3);
        assert_eq!((train.len(), eval.len()), (18, 2));
        let (train2, eval2) = split_eval(seqs.clone(), 0.1, 3);
        assert_eq!((train, eval), (train2, eval2));
        assert_eq!(split_eval(seqs.clone(), 0.0, 3).1.len(), 0);
        assert_eq!(split_eval(seqs[..2].to_vec(), 0.01, 3).1.len(), 1);
    }
}
