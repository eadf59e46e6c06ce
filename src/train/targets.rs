//! Teacher-forcing layout: which (position, draft step) pairs are trained and on which label.
//!
//! # Indexing (SPEC §6)
//!
//! For a sequence `x_0 … x_{L-1}` with target hidden states `H_t`, draft step `i = 1..=K` at
//! context position `t` computes
//!
//! ```text
//! s^(0)_t = 0,   s^(i)_t = f(s^(i-1)_t, E[x_{t+i}]),   logits^(i)_t = head([H_t; s^(i)_t])
//! ```
//!
//! and is trained to predict `x_{t+i+1}`. This is what inference does: the context is the
//! hidden state at the last accepted token `t`, the first beam token `g0 = x_{t+1}` comes from
//! the target's own logits at `t`, and draft step 1 embeds `g0` and predicts `x_{t+2}`.
//!
//! A pair is trained when its label `x_{t+i+1}` exists (`t+i+1 < L`) and is a response token
//! (`t+i+1 ≥ prompt_len`); prompt and padding labels are never trained.
//!
//! # Grids
//!
//! Step `i` only needs the positions `t < T - i - 1` of a batch padded to width `T`, so the
//! recurrent state is computed on a grid of width `W_i = T - i - 1` that shrinks by one per step
//! (step `i + 1`'s grid is a prefix of step `i`'s). [`StepTargets::rows`] index that grid
//! row-major, so the draft head runs on trained pairs only.
//!
//! # A draft vocabulary
//!
//! A drafter that will draft from a [`DraftVocabulary`] can be trained over it alone
//! ([`TeacherForcing::restrict`]): its softmax then runs over the `N` tokens it will choose
//! from, labels become draft indices, and pairs whose label lies outside the set (the drafter
//! could never propose it) are set aside as [`StepTargets::excluded`].

use std::collections::HashMap;

use super::dataset::Sequence;
use crate::drafter::DraftVocabulary;
use crate::error::{Error, Result};

/// The trained pairs of one draft step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepTargets {
    /// Width `W_i = T - i - 1` of this step's grid (0 when the batch is too short).
    pub grid_width: usize,
    /// Trained pairs as flat indices `n * grid_width + t` into the `[N, W_i]` grid.
    pub rows: Vec<i64>,
    /// Their labels `x^n_{t+i+1}` (draft-vocabulary indices after [`TeacherForcing::restrict`]).
    pub labels: Vec<i64>,
    /// Where the target's distribution over each label lives: the flat index `n * T + t + i`
    /// of `H_{t+i}` (the hidden state whose logits predicted `x_{t+i+1}`) in the `[N, T]` grid.
    pub teacher_rows: Vec<i64>,
    /// Pairs set aside by [`TeacherForcing::restrict`] (grid rows like `rows`): their label is
    /// outside the draft vocabulary, so no draft can be right there.
    pub excluded: Vec<i64>,
}

/// One micro-batch laid out for teacher forcing over `steps` draft steps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TeacherForcing {
    /// Sequences N.
    pub batch: usize,
    /// Padded width T (longest sequence).
    pub width: usize,
    /// Right-padded tokens (padding id 0). Length `N·T`.
    pub tokens: Vec<i64>,
    /// Length of each sequence.
    pub lengths: Vec<usize>,
    /// Draft steps `1..=K`, in order.
    pub steps: Vec<StepTargets>,
    /// Whether the labels are draft-vocabulary indices ([`TeacherForcing::restrict`]).
    pub restricted: bool,
}

impl TeacherForcing {
    /// Lays out `sequences` (right-padded) for `steps` draft steps.
    pub fn new(sequences: &[&Sequence], steps: usize) -> Self {
        let batch = sequences.len();
        let width = sequences.iter().map(|s| s.len()).max().unwrap_or(0);
        let mut tokens = vec![0i64; batch * width];
        for (n, seq) in sequences.iter().enumerate() {
            for (t, &token) in seq.tokens.iter().enumerate() {
                tokens[n * width + t] = token as i64;
            }
        }
        let steps = (1..=steps)
            .map(|i| {
                let grid_width = width.saturating_sub(i + 1);
                let mut rows = Vec::new();
                let mut labels = Vec::new();
                let mut teacher_rows = Vec::new();
                for (n, seq) in sequences.iter().enumerate() {
                    // Labels j = t + i + 1 in [max(prompt_len, i + 1), len).
                    let first = seq.prompt_len.max(i + 1);
                    for j in first..seq.len() {
                        let t = j - i - 1;
                        rows.push((n * grid_width + t) as i64);
                        labels.push(seq.tokens[j] as i64);
                        teacher_rows.push((n * width + j - 1) as i64);
                    }
                }
                StepTargets {
                    grid_width,
                    rows,
                    labels,
                    teacher_rows,
                    excluded: Vec::new(),
                }
            })
            .collect();
        Self {
            batch,
            width,
            tokens,
            lengths: sequences.iter().map(|s| s.len()).collect(),
            steps,
            restricted: false,
        }
    }

    /// Trains over `vocabulary` only: labels become its indices, and pairs whose label it
    /// lacks move to [`StepTargets::excluded`]. A second call does nothing.
    pub fn restrict(&mut self, vocabulary: &DraftVocabulary) {
        if self.restricted {
            return;
        }
        self.restricted = true;
        let index: HashMap<i64, i64> = vocabulary
            .ids()
            .iter()
            .enumerate()
            .map(|(i, &id)| (i64::from(id), i as i64))
            .collect();
        for step in &mut self.steps {
            let mut kept = StepTargets {
                grid_width: step.grid_width,
                rows: Vec::with_capacity(step.rows.len()),
                labels: Vec::with_capacity(step.rows.len()),
                teacher_rows: Vec::with_capacity(step.rows.len()),
                excluded: std::mem::take(&mut step.excluded),
            };
            for ((&row, &label), &teacher) in
                step.rows.iter().zip(&step.labels).zip(&step.teacher_rows)
            {
                match index.get(&label) {
                    Some(&draft_index) => {
                        kept.rows.push(row);
                        kept.labels.push(draft_index);
                        kept.teacher_rows.push(teacher);
                    }
                    None => kept.excluded.push(row),
                }
            }
            *step = kept;
        }
    }

    /// Trains on the target's own choices instead of the data's tokens: each pair's label
    /// becomes `predictions[n][t + i]`, the target's argmax at the position whose logits predict
    /// `x_{t+i+1}` (its [`StepTargets::teacher_rows`] entry). The drafter's inputs stay the
    /// data's tokens. For greedy verification this is the exact target: after an accepted prefix
    /// `x_{t+1..=t+i}` the next token the target emits is its argmax there, whatever token the
    /// data (a sampled response, say) continued with. Call before [`Self::restrict`].
    ///
    /// # Errors
    /// [`Error::InvalidSettings`] after `restrict` (labels are then draft indices);
    /// [`Error::ShapeMismatch`] when `predictions` does not hold one entry per token of each
    /// sequence.
    pub fn relabel(&mut self, predictions: &[&[u32]]) -> Result<()> {
        if self.restricted {
            return Err(Error::InvalidSettings(
                "relabel before restricting the layout to a draft vocabulary".into(),
            ));
        }
        let found: Vec<usize> = predictions.iter().map(|p| p.len()).collect();
        if found != self.lengths {
            return Err(Error::ShapeMismatch {
                tensor: "greedy predictions (one per token of each sequence)".into(),
                expected: self.lengths.clone(),
                found,
            });
        }
        let width = self.width;
        for step in &mut self.steps {
            for (label, &teacher) in step.labels.iter_mut().zip(&step.teacher_rows) {
                let teacher = teacher as usize;
                *label = i64::from(predictions[teacher / width][teacher % width]);
            }
        }
        Ok(())
    }

    /// Trained pairs per draft step.
    pub fn counts(&self) -> Vec<usize> {
        self.steps.iter().map(|s| s.rows.len()).collect()
    }

    /// Padded tokens `N·T` (what the target and the embedding lookups process).
    pub fn padded_tokens(&self) -> usize {
        self.batch * self.width
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    fn seq(tokens: &[u32], prompt_len: usize) -> Sequence {
        Sequence {
            tokens: tokens.to_vec(),
            prompt_len,
        }
    }

    /// (n, step, t, label) for every trained pair, by the definition.
    fn naive(sequences: &[&Sequence], steps: usize) -> BTreeSet<(usize, usize, usize, u32)> {
        let mut pairs = BTreeSet::new();
        for (n, s) in sequences.iter().enumerate() {
            for i in 1..=steps {
                for t in 0..s.len() {
                    let label = t + i + 1;
                    if label < s.len() && label >= s.prompt_len {
                        pairs.insert((n, i, t, s.tokens[label]));
                    }
                }
            }
        }
        pairs
    }

    fn decoded(layout: &TeacherForcing) -> BTreeSet<(usize, usize, usize, u32)> {
        let mut pairs = BTreeSet::new();
        for (k, step) in layout.steps.iter().enumerate() {
            for ((&row, &label), &teacher) in
                step.rows.iter().zip(&step.labels).zip(&step.teacher_rows)
            {
                let (n, t) = (
                    row as usize / step.grid_width,
                    row as usize % step.grid_width,
                );
                assert_eq!(teacher as usize, n * layout.width + t + k + 1);
                // The embedded tokens x_{t+1..=t+i} must lie inside the grid's input range.
                assert!(t + k + 1 < layout.width);
                assert!(pairs.insert((n, k + 1, t, label as u32)), "duplicate pair");
            }
        }
        pairs
    }

    #[test]
    fn hand_made_example() {
        // prompt [10, 11], response [12, 13, 14]; second row shorter and padded.
        let a = seq(&[10, 11, 12, 13, 14], 2);
        let b = seq(&[20, 21, 22], 1);
        let layout = TeacherForcing::new(&[&a, &b], 2);
        assert_eq!(layout.width, 5);
        assert_eq!(layout.tokens, vec![10, 11, 12, 13, 14, 20, 21, 22, 0, 0]);
        // Step 1 (grid width 3): row a, t = 0, 1, 2 → labels 12, 13, 14 (t = 0 embeds the prompt
        // token 11 and predicts the first response token but one); row b, t = 0 → label 22
        // (label 21 at t = -1 does not exist).
        assert_eq!(layout.steps[0].grid_width, 3);
        assert_eq!(layout.steps[0].rows, vec![0, 1, 2, 3]);
        assert_eq!(layout.steps[0].labels, vec![12, 13, 14, 22]);
        // Step 2 (grid width 2): row a, t = 0, 1 → labels 13, 14; row b has none (t + 3 ≥ 3).
        assert_eq!(layout.steps[1].grid_width, 2);
        assert_eq!(layout.steps[1].rows, vec![0, 1]);
        assert_eq!(layout.steps[1].labels, vec![13, 14]);
        assert_eq!(layout.counts(), vec![4, 2]);
        // The target's logits at n·T + t + i predicted each label.
        assert_eq!(layout.steps[0].teacher_rows, vec![1, 2, 3, 6]);
        assert_eq!(layout.steps[1].teacher_rows, vec![2, 3]);
    }

    #[test]
    fn restricting_to_a_draft_vocabulary_remaps_and_sets_aside() {
        let a = seq(&[10, 11, 12, 13, 14], 2);
        let b = seq(&[20, 21, 22], 1);
        let mut layout = TeacherForcing::new(&[&a, &b], 2);
        // Index 0 = token 14, 1 = 12, 2 = 22; 13 is not drafted.
        let vocabulary = DraftVocabulary::new(vec![14, 12, 22], 30).unwrap();
        layout.restrict(&vocabulary);
        let first = &layout.steps[0];
        assert_eq!(first.rows, vec![0, 2, 3]);
        assert_eq!(first.labels, vec![1, 0, 2]);
        assert_eq!(first.teacher_rows, vec![1, 3, 6]);
        assert_eq!(first.excluded, vec![1]);
        let second = &layout.steps[1];
        assert_eq!(second.rows, vec![1]);
        assert_eq!(second.labels, vec![0]);
        assert_eq!(second.teacher_rows, vec![3]);
        assert_eq!(second.excluded, vec![0]);
        assert_eq!(layout.counts(), vec![3, 1]);
    }

    #[test]
    fn relabelling_takes_the_prediction_at_the_teacher_position() {
        let a = seq(&[10, 11, 12, 13, 14], 2);
        let b = seq(&[20, 21, 22], 1);
        let mut layout = TeacherForcing::new(&[&a, &b], 2);
        // The target's argmax at each position of each sequence (position p predicts p + 1).
        let predictions_a = [100, 101, 102, 103, 104];
        let predictions_b = [200, 201, 202];
        layout.relabel(&[&predictions_a, &predictions_b]).unwrap();
        // Teacher rows [1, 2, 3, 6] and [2, 3] (see `hand_made_example`): a's positions 1, 2, 3
        // and b's position 1 (6 = 1·5 + 1).
        assert_eq!(layout.steps[0].labels, vec![101, 102, 103, 201]);
        assert_eq!(layout.steps[1].labels, vec![102, 103]);
        // Inputs and pairs are untouched.
        assert_eq!(layout.tokens, vec![10, 11, 12, 13, 14, 20, 21, 22, 0, 0]);
        assert_eq!(layout.steps[0].rows, vec![0, 1, 2, 3]);
        // Predictions equal to the data's next tokens give the data's labels back.
        let mut same = TeacherForcing::new(&[&a, &b], 2);
        same.relabel(&[&[11, 12, 13, 14, 0], &[21, 22, 0]]).unwrap();
        assert_eq!(same, TeacherForcing::new(&[&a, &b], 2));
    }

    #[test]
    fn relabelling_rejects_wrong_lengths_and_restricted_layouts() {
        let a = seq(&[10, 11, 12, 13, 14], 2);
        let mut layout = TeacherForcing::new(&[&a], 2);
        assert!(matches!(
            layout.relabel(&[&[1, 2, 3]]),
            Err(Error::ShapeMismatch { .. })
        ));
        assert!(matches!(
            layout.relabel(&[]),
            Err(Error::ShapeMismatch { .. })
        ));
        layout.restrict(&DraftVocabulary::new(vec![12, 13], 30).unwrap());
        assert!(matches!(
            layout.relabel(&[&[1, 2, 3, 4, 5]]),
            Err(Error::InvalidSettings(_))
        ));
    }

    #[test]
    fn matches_the_naive_loop() {
        let mut state = 12345u64;
        let mut next = |m: u64| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 33) % m
        };
        for _ in 0..50 {
            let n = 1 + next(5) as usize;
            let steps = 1 + next(6) as usize;
            let sequences: Vec<Sequence> = (0..n)
                .map(|_| {
                    let len = 2 + next(12) as usize;
                    let prompt_len = 1 + next(len as u64 - 1) as usize;
                    let tokens: Vec<u32> = (0..len).map(|_| next(50) as u32).collect();
                    seq(&tokens, prompt_len)
                })
                .collect();
            let refs: Vec<&Sequence> = sequences.iter().collect();
            let layout = TeacherForcing::new(&refs, steps);
            assert_eq!(decoded(&layout), naive(&refs, steps));
        }
    }
}
