//! A reduced vocabulary for drafting: the draft head scores only the tokens that occur often.
//!
//! With a tied head the last draft op is a `[rows, H] × [H, V]` product against the target's
//! whole output embedding — on SmolLM2 49,152 × 576 floats, 113 MB read per draft step, as much
//! as a fifth of a target forward. Most of those rows are tokens the target almost never writes.
//! Scoring only the `N` most frequent ones (as FR-Spec does for EAGLE) makes every draft step
//! `V / N` times cheaper there, and costs acceptance only when a rare token would have been
//! drafted. Verification is untouched: the target still scores the whole vocabulary, so
//! decoding stays exact — only the proposals change.

use std::collections::HashSet;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The token ids a drafter may propose, a subset of the target's vocabulary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DraftVocabulary {
    /// Size of the full vocabulary the ids index into.
    vocab_size: usize,
    /// Distinct ids below `vocab_size`, most frequent first when built from counts.
    ids: Vec<u32>,
}

impl DraftVocabulary {
    /// A vocabulary of the given ids.
    ///
    /// # Errors
    /// [`Error::InvalidSettings`] if `ids` is empty, repeats an id or holds one `>= vocab_size`.
    pub fn new(ids: Vec<u32>, vocab_size: usize) -> Result<Self> {
        let vocabulary = Self { vocab_size, ids };
        vocabulary.validate()?;
        Ok(vocabulary)
    }

    /// The `size` most frequent ids of `counts` (indexed by token id; ties go to the lower id),
    /// followed by every id in `always` not already among them (e.g. the stop tokens, which
    /// occur once per response but end every one).
    ///
    /// # Errors
    /// [`Error::InvalidSettings`] if `size` is 0 or an `always` id is out of range.
    pub fn most_frequent(counts: &[u64], size: usize, always: &[u32]) -> Result<Self> {
        if size == 0 {
            return Err(Error::InvalidSettings(
                "a draft vocabulary needs at least one token".into(),
            ));
        }
        let mut ranked: Vec<u32> = (0..counts.len() as u32).collect();
        ranked.sort_by(|&a, &b| counts[b as usize].cmp(&counts[a as usize]).then(a.cmp(&b)));
        ranked.truncate(size);
        let present: HashSet<u32> = ranked.iter().copied().collect();
        for &id in always {
            if !present.contains(&id) {
                ranked.push(id);
            }
        }
        Self::new(ranked, counts.len())
    }

    /// Reads a vocabulary written by [`save`](Self::save).
    ///
    /// # Errors
    /// [`Error::Io`] / [`Error::Json`] for an unreadable or malformed file;
    /// [`Error::InvalidSettings`] for invalid ids.
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let vocabulary: Self = serde_json::from_str(&text).map_err(|e| Error::Json {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        vocabulary.validate()?;
        Ok(vocabulary)
    }

    /// Writes the vocabulary as JSON (`{"vocab_size": V, "ids": [...]}`).
    ///
    /// # Errors
    /// [`Error::Io`] if the file cannot be written.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let text = serde_json::to_string(self).map_err(|e| Error::Json {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        std::fs::write(path, text).map_err(|e| Error::io(path, e))
    }

    /// The first `size` ids (the most frequent ones, for a vocabulary built from counts).
    ///
    /// # Errors
    /// [`Error::InvalidSettings`] if `size` is 0.
    pub fn truncated(&self, size: usize) -> Result<Self> {
        Self::new(
            self.ids[..size.min(self.ids.len())].to_vec(),
            self.vocab_size,
        )
    }

    /// The ids, in stored order.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    /// Number of ids.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Always false for a validated vocabulary.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Size of the full vocabulary the ids index into.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    fn validate(&self) -> Result<()> {
        if self.ids.is_empty() {
            return Err(Error::InvalidSettings(
                "a draft vocabulary needs at least one token".into(),
            ));
        }
        let mut seen = HashSet::with_capacity(self.ids.len());
        for &id in &self.ids {
            if id as usize >= self.vocab_size {
                return Err(Error::InvalidSettings(format!(
                    "draft vocabulary id {id} is outside the vocabulary of {} tokens",
                    self.vocab_size
                )));
            }
            if !seen.insert(id) {
                return Err(Error::InvalidSettings(format!(
                    "draft vocabulary lists token {id} twice"
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_most_frequent_ids_then_the_always_ones() {
        let counts = [5u64, 0, 9, 5, 1];
        let v = DraftVocabulary::most_frequent(&counts, 3, &[1, 2]).unwrap();
        assert_eq!(v.ids(), &[2, 0, 3, 1]);
        assert_eq!(v.vocab_size(), 5);
        assert_eq!(v.truncated(2).unwrap().ids(), &[2, 0]);
    }

    #[test]
    fn rejects_bad_ids_and_sizes() {
        assert!(DraftVocabulary::new(vec![], 4).is_err());
        assert!(DraftVocabulary::new(vec![1, 1], 4).is_err());
        assert!(DraftVocabulary::new(vec![4], 4).is_err());
        assert!(DraftVocabulary::most_frequent(&[1, 2], 0, &[]).is_err());
        assert!(DraftVocabulary::most_frequent(&[1, 2], 1, &[7]).is_err());
    }

    #[test]
    fn round_trips_through_a_file_and_refuses_a_corrupt_one() {
        let dir = std::env::temp_dir().join(format!("redrafter-vocab-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("vocab.json");
        let v = DraftVocabulary::new(vec![3, 0, 2], 6).unwrap();
        v.save(&path).unwrap();
        assert_eq!(DraftVocabulary::load(&path).unwrap(), v);
        std::fs::write(&path, r#"{"vocab_size": 2, "ids": [0, 5]}"#).unwrap();
        assert!(matches!(
            DraftVocabulary::load(&path),
            Err(Error::InvalidSettings(_))
        ));
        std::fs::write(&path, "{").unwrap();
        assert!(matches!(
            DraftVocabulary::load(&path),
            Err(Error::Json { .. })
        ));
        std::fs::remove_dir_all(&dir).ok();
    }
}
