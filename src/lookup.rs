//! Prompt lookup: extra draft beams copied from the text itself.
//!
//! Small models repeat themselves and their prompt — lists that restate the question, code that
//! reuses names, loops. Where the last few tokens already occurred earlier in the prompt or the
//! output, the tokens that followed them then are a free guess for what follows now. The
//! speculative decoder appends such guesses as extra beams next to the draft head's, and the
//! target verifies all of them in the same packed tree: the guesses cost no drafting, share the
//! first token (and any common prefix) with the drafted beams, and since the target decides
//! every accepted token, the output is unchanged (lossless in greedy and exact-sampling modes).
//!
//! This is the prompt-lookup idea (as in "prompt lookup decoding") used as a second candidate
//! source; it is our addition to ReDrafter, off by default.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Settings of prompt lookup.
///
/// ```
/// use redrafter::lookup::PromptLookup;
/// let lookup = PromptLookup::new(2);
/// // "a b c a b" → the suffix "a b" occurred before, followed by "c a b": guess "c a b …".
/// let guesses = lookup.candidates(&[1, 2, 3, 1, 2], 4, &[]);
/// assert_eq!(guesses, vec![vec![3, 1, 2, 3]]);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PromptLookup {
    /// Extra beams per round (at most; fewer when the text offers fewer distinct guesses).
    pub beams: usize,
    /// Longest suffix searched for (tried first: a longer match is a more specific guess).
    pub max_ngram: usize,
    /// Shortest suffix searched for.
    pub min_ngram: usize,
    /// Tokens per beam, the shared first token included, when longer than the drafted beams
    /// (`None`: as long as they are). Copied text often runs on further than a draft head can
    /// guess; the decoder then extends every drafted beam to this length with a guess from the
    /// text that follows it, so all beams of the tree stay equally long.
    #[serde(default)]
    pub beam_length: Option<usize>,
    /// Shortest matching suffix whose guess may run past the drafted beams' length to
    /// [`beam_length`](Self::beam_length) (`1`: every guess does). A guess from a shorter match,
    /// and a drafted beam whose extension would come from one, ends at the drafted beams' length
    /// instead ([`BEAM_END`](crate::tree::BEAM_END)): a one-token match is a weak guess, and on a
    /// backend where every verified token costs (the CPU) its long tail costs more than it wins.
    #[serde(default = "one")]
    pub extend_min_ngram: usize,
}

fn one() -> usize {
    1
}

/// A guess and the length of the suffix match it continues.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Guess {
    /// The guessed tokens.
    pub tokens: Vec<u32>,
    /// Tokens of the history's suffix that matched before the guess's source.
    pub ngram: usize,
}

impl PromptLookup {
    /// `beams` extra beams, suffixes of 3 down to 1 token.
    pub fn new(beams: usize) -> Self {
        Self {
            beams,
            max_ngram: 3,
            min_ngram: 1,
            beam_length: None,
            extend_min_ngram: 1,
        }
    }

    /// Lets only guesses from suffix matches of at least `ngram` tokens run past the drafted
    /// beams' length (see [`PromptLookup::extend_min_ngram`]).
    pub fn with_extend_min_ngram(mut self, ngram: usize) -> Self {
        self.extend_min_ngram = ngram;
        self
    }

    /// Makes the beams `beam_length` tokens long (see [`PromptLookup::beam_length`]).
    pub fn with_beam_length(mut self, beam_length: usize) -> Self {
        self.beam_length = Some(beam_length);
        self
    }

    /// Sets the suffix lengths searched for.
    pub fn with_ngrams(mut self, min: usize, max: usize) -> Self {
        self.min_ngram = min;
        self.max_ngram = max;
        self
    }

    /// Checks the settings.
    pub fn validate(&self) -> Result<()> {
        if self.min_ngram == 0 || self.max_ngram < self.min_ngram {
            return Err(Error::InvalidSettings(format!(
                "prompt lookup needs 1 <= min_ngram <= max_ngram, got {} and {}",
                self.min_ngram, self.max_ngram
            )));
        }
        if self.extend_min_ngram == 0 || self.extend_min_ngram > self.max_ngram {
            return Err(Error::InvalidSettings(format!(
                "prompt lookup needs 1 <= extend_min_ngram <= max_ngram ({}), got {}: no longer \
                 match is searched for, so no guess would ever be extended",
                self.max_ngram, self.extend_min_ngram
            )));
        }
        if self.beam_length == Some(0) {
            return Err(Error::InvalidSettings(
                "prompt lookup beam length must be at least 1".into(),
            ));
        }
        Ok(())
    }

    /// Up to `self.beams` distinct guesses of the `len` tokens that follow `history`, best first:
    /// longer matching suffixes before shorter ones, later occurrences before earlier ones.
    /// Guesses equal to one in `exclude` (beams already proposed) are skipped.
    ///
    /// A match near the end of the history continues into the guess itself, so a repeating
    /// pattern is extended periodically ("x y x y" guesses "x y x y …").
    pub fn candidates(&self, history: &[u32], len: usize, exclude: &[&[u32]]) -> Vec<Vec<u32>> {
        self.guesses(history, len, exclude)
            .into_iter()
            .map(|guess| guess.tokens)
            .collect()
    }

    /// [`candidates`](Self::candidates) with the length of the suffix match behind each.
    pub fn guesses(&self, history: &[u32], len: usize, exclude: &[&[u32]]) -> Vec<Guess> {
        let mut found: Vec<Guess> = Vec::new();
        if self.beams == 0 || len == 0 {
            return found;
        }
        let end = history.len();
        for n in (self.min_ngram..=self.max_ngram).rev() {
            if end <= n {
                continue;
            }
            let suffix = &history[end - n..];
            // Occurrences that end before the suffix itself, latest first.
            for start in (0..end - n).rev() {
                if &history[start..start + n] != suffix {
                    continue;
                }
                let mut guess = Vec::with_capacity(len);
                for j in 0..len {
                    let index = start + n + j;
                    // index - end < j because start + n < end + 1: the guess feeds itself.
                    let token = if index < end {
                        history[index]
                    } else {
                        guess[index - end]
                    };
                    guess.push(token);
                }
                if found.iter().any(|g| g.tokens == guess) || exclude.contains(&guess.as_slice()) {
                    continue;
                }
                found.push(Guess {
                    tokens: guess,
                    ngram: n,
                });
                if found.len() == self.beams {
                    return found;
                }
            }
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn continues_the_latest_occurrence_of_the_longest_suffix() {
        let lookup = PromptLookup::new(1);
        // "5 6" occurs twice before the end; the later occurrence (followed by 8) wins.
        let history = [5, 6, 7, 1, 5, 6, 8, 2, 5, 6];
        assert_eq!(lookup.candidates(&history, 2, &[]), vec![vec![8, 2]]);
    }

    #[test]
    fn prefers_longer_suffixes_and_lists_distinct_guesses() {
        let lookup = PromptLookup::new(3);
        // Suffix "3 4" matches once (→ 9); suffix "4" also matches at index 6 (→ 7) and at
        // index 2 (→ 9, a duplicate, skipped).
        let history = [1, 3, 4, 9, 9, 2, 4, 7, 3, 4];
        assert_eq!(lookup.candidates(&history, 1, &[]), vec![vec![9], vec![7]]);
    }

    #[test]
    fn extends_a_repeating_pattern_through_its_own_guess() {
        let lookup = PromptLookup::new(1).with_ngrams(2, 2);
        assert_eq!(
            lookup.candidates(&[8, 1, 2, 1, 2], 5, &[]),
            vec![vec![1, 2, 1, 2, 1]]
        );
        // A single repeated token.
        let lookup = PromptLookup::new(1).with_ngrams(1, 1);
        assert_eq!(lookup.candidates(&[4, 4], 3, &[]), vec![vec![4, 4, 4]]);
    }

    #[test]
    fn skips_excluded_guesses_and_stops_without_matches() {
        let lookup = PromptLookup::new(2).with_ngrams(1, 1);
        let history = [1, 2, 1, 3, 1];
        assert_eq!(lookup.candidates(&history, 1, &[&[3]]), vec![vec![2]]);
        assert!(lookup.candidates(&[1, 2, 3], 2, &[]).is_empty());
        assert!(lookup.candidates(&[], 2, &[]).is_empty());
        assert!(PromptLookup::new(0).candidates(&[1, 1], 2, &[]).is_empty());
    }

    #[test]
    fn reports_the_suffix_length_behind_each_guess() {
        let lookup = PromptLookup::new(2);
        // "3 4" matches once (→ 9, a 2-token match); "4" alone also at index 6 (→ 7).
        let history = [1, 3, 4, 9, 9, 2, 4, 7, 3, 4];
        let guesses = lookup.guesses(&history, 1, &[]);
        let found: Vec<(Vec<u32>, usize)> =
            guesses.into_iter().map(|g| (g.tokens, g.ngram)).collect();
        assert_eq!(found, vec![(vec![9], 2), (vec![7], 1)]);
    }

    #[test]
    fn rejects_empty_ngram_ranges() {
        assert!(PromptLookup::new(1).with_ngrams(0, 2).validate().is_err());
        assert!(PromptLookup::new(1).with_ngrams(3, 2).validate().is_err());
        assert!(PromptLookup::new(1).with_beam_length(0).validate().is_err());
        for (ngram, valid) in [(0, false), (1, true), (3, true), (4, false)] {
            let lookup = PromptLookup::new(1).with_extend_min_ngram(ngram);
            assert_eq!(lookup.validate().is_ok(), valid, "extend_min_ngram {ngram}");
        }
        assert!(PromptLookup::new(1).validate().is_ok());
    }
}
