//! The distillation loss and the evaluation metrics, computed over all positions of a micro-batch
//! at once (teacher forcing, see [`super::targets`]).
//!
//! # Memory
//!
//! The recurrent state runs on the whole `[N, W_i, H]` grid (cheap), but the draft head — whose
//! `[·, V]` logits dominate memory — only runs on the trained pairs of each step: prompt and
//! padding positions cost nothing there. Under autodiff every step's logits, log-probabilities
//! and their gradients stay alive until the backward pass, about `12·K·P·V` bytes for `P`
//! trained pairs per step (f32); the trainer's `micro_batch_tokens` bounds `P`. Soft labels add
//! the target's probabilities, computed once per micro-batch and gathered per step: about
//! `4·(K+1)·P·V` bytes more.
//!
//! # Soft labels
//!
//! The data is the target's own output, so every label is the target's choice; the target's
//! whole distribution at that position says more: which other tokens were close, which is what
//! a beam's second and third candidates are made of. [`SoftLabels`] mixes the cross-entropy
//! against the label with the cross-entropy against that distribution, `softmax(H_{t+i} · Eᵀ)`
//! (the target's logits: its final-norm hidden state times its output embedding), computed
//! from the cached hidden states at no extra target cost.

use std::collections::HashMap;

use burn::tensor::activation::{log_softmax, softmax};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData, Transaction};
use serde::{Deserialize, Serialize};

use super::targets::{StepTargets, TeacherForcing};
use crate::drafter::RecurrentDrafter;
use crate::error::{Error, Result};

/// The target's distribution as a second training signal (see the module docs).
#[derive(Debug)]
pub struct SoftLabels<'a, B: Backend> {
    /// Weight of the soft cross-entropy; the label's gets `1 - weight`. In `(0, 1]`.
    pub weight: f32,
    /// The target's output embedding `[V, H]` (its LM head), or its rows for the draft
    /// vocabulary when the layout is restricted to one (`[N, H]`, in the vocabulary's order).
    pub table: &'a Tensor<B, 2>,
}

/// Runs the drafter over a micro-batch and hands `each_step` the logits of every step's trained
/// pairs. With a draft vocabulary set on the drafter the logits cover it alone, and `layout` must
/// be restricted to it ([`TeacherForcing::restrict`]).
///
/// # Shapes
/// - `hidden`: `[N, T, F]`, the draft head's features (constants): the target's final-norm
///   hidden states (`F = H`), followed by its tapped layers' outputs when the head reads them
///   (`F = H · (1 + taps)`, [`RecurrentDrafter::context`])
/// - `each_step(step, logits, targets)`: `step` is 0-based (draft step `step + 1`), `logits`
///   `[P_i, V]` (`[P_i, N]` over a draft vocabulary) for the `P_i` trained pairs of that step;
///   not called for steps without pairs
fn for_each_step<B: Backend>(
    drafter: &RecurrentDrafter<B>,
    hidden: Tensor<B, 3>,
    layout: &TeacherForcing,
    mut each_step: impl FnMut(usize, Tensor<B, 2>, &StepTargets) -> Result<()>,
) -> Result<()> {
    let [n, t, f] = hidden.dims();
    let h = drafter.config().hidden_size;
    let expected = drafter.config().feature_width();
    if n != layout.batch || t != layout.width || f != expected {
        return Err(Error::ShapeMismatch {
            tensor: "hidden".into(),
            expected: vec![layout.batch, layout.width, expected],
            found: vec![n, t, f],
        });
    }
    let reduced = drafter.draft_vocabulary().is_some();
    if reduced != layout.restricted {
        return Err(Error::InvalidSettings(if reduced {
            "the drafter drafts from a draft vocabulary but the labels are full-vocabulary ids \
             (restrict the layout to it)"
                .into()
        } else {
            "the labels are draft-vocabulary indices but the drafter has no draft vocabulary".into()
        }));
    }
    let device = hidden.device();
    let tokens =
        Tensor::<B, 1, Int>::from_data(TensorData::new(layout.tokens.clone(), [n * t]), &device);
    let embedded = drafter.embed(tokens)?.reshape([n, t, h]);
    let mut state: Option<Tensor<B, 3>> = None;
    for (k, targets) in layout.steps.iter().enumerate() {
        let width = targets.grid_width;
        if width == 0 {
            // Later steps have even narrower grids: nothing left to train.
            break;
        }
        let i = k + 1;
        // E[x_{t+i}] for t in 0..W_i.
        let inputs = embedded.clone().slice([0..n, i..i + width, 0..h]);
        let previous = match state.take() {
            None => Tensor::zeros([n, width, h], &device),
            Some(s) => s.slice([0..n, 0..width, 0..h]),
        };
        let next = drafter.step(previous, inputs)?;
        state = Some(next.clone());
        if targets.rows.is_empty() {
            continue;
        }
        let rows = Tensor::<B, 1, Int>::from_data(
            TensorData::new(targets.rows.clone(), [targets.rows.len()]),
            &device,
        );
        let features = hidden
            .clone()
            .slice([0..n, 0..width, 0..f])
            .reshape([n * width, f])
            .select(0, rows.clone());
        let context = drafter.context(features)?;
        let state = next.reshape([n * width, h]).select(0, rows);
        let logits = if reduced {
            drafter.draft_logits(context, state)?
        } else {
            drafter.head_logits(context, state)?
        };
        each_step(k, logits, targets)?;
    }
    Ok(())
}

/// Sum of the label cross-entropies of one step's pairs, from the draft's log-probabilities.
///
/// # Shapes
/// `log_probs`: `[P, V]` to `[1]`
fn cross_entropy_sum<B: Backend>(log_probs: Tensor<B, 2>, targets: &StepTargets) -> Tensor<B, 1> {
    let p = targets.labels.len();
    let labels = Tensor::<B, 2, Int>::from_data(
        TensorData::new(targets.labels.clone(), [p, 1]),
        &log_probs.device(),
    );
    log_probs.gather(1, labels).sum().neg()
}

/// The target's distribution at every labelled position of a micro-batch, computed once: a
/// label's position is the same whichever draft step predicts it (step `i` at `t` and step
/// `i + 1` at `t - 1` share the label `x_{t+i+1}`), so the steps share one product and softmax.
struct TeacherDistribution<B: Backend> {
    /// `[U, V]` for the `U` distinct teacher rows, in `rows` order.
    probs: Tensor<B, 2>,
    /// Flat hidden-state index of each teacher row → its row in `probs`.
    index: HashMap<i64, i64>,
}

impl<B: Backend> TeacherDistribution<B> {
    /// `None` when no step has a labelled pair.
    ///
    /// # Shapes
    /// `hidden`: `[N·T, H]`; `table`: `[V, H]`
    fn new(hidden: &Tensor<B, 2>, table: &Tensor<B, 2>, layout: &TeacherForcing) -> Option<Self> {
        let mut rows: Vec<i64> = layout
            .steps
            .iter()
            .flat_map(|step| step.teacher_rows.iter().copied())
            .collect();
        rows.sort_unstable();
        rows.dedup();
        if rows.is_empty() {
            return None;
        }
        let index = rows
            .iter()
            .enumerate()
            .map(|(at, &row)| (row, at as i64))
            .collect();
        let rows = Tensor::<B, 1, Int>::from_data(
            TensorData::new(rows.clone(), [rows.len()]),
            &hidden.device(),
        );
        // Constants: the hidden states and the table are not parameters, so nothing here is
        // differentiated.
        let probs = softmax(
            hidden
                .clone()
                .select(0, rows)
                .matmul(table.clone().transpose()),
            1,
        );
        Some(Self { probs, index })
    }

    /// Sum over one step's pairs of the cross-entropy against the target's distribution at the
    /// label's position, `-Σ_v p_target(v) · log p_draft(v)`, from the draft's log-probabilities.
    ///
    /// # Shapes
    /// `log_probs`: `[P, V]` to `[1]`
    fn cross_entropy_sum(&self, log_probs: Tensor<B, 2>, targets: &StepTargets) -> Tensor<B, 1> {
        let at: Vec<i64> = targets
            .teacher_rows
            .iter()
            .map(|row| self.index[row])
            .collect();
        let at = Tensor::<B, 1, Int>::from_data(
            TensorData::new(at, [targets.teacher_rows.len()]),
            &log_probs.device(),
        );
        (self.probs.clone().select(0, at) * log_probs).sum().neg()
    }
}

/// The teacher-forced distillation loss of one micro-batch, per draft step: the sum of the
/// cross-entropies of step `i`'s trained pairs divided by `normalizers[i]` (the number of
/// trained pairs of that step in the whole optimiser batch, so that accumulating the gradients
/// of all micro-batches gives exactly the batch mean). Steps with a zero normaliser or no pairs
/// contribute 0. The training loss is the sum of the returned vector (equal weights).
///
/// Each pair's cross-entropy is against its label, or with `soft` a mix:
/// `(1 - w) · CE(label) + w · CE(target's distribution)`.
///
/// # Shapes
/// - `hidden`: `[N, T, F]`, the head's features (see [`for_each_step`]; the soft labels read
///   their first `H` columns, the final hidden states)
/// - returns `[K]`
///
/// # Errors
/// Shape errors of the drafter, a missing embedding table, a soft-label weight outside
/// `(0, 1]`, or a layout restricted to a draft vocabulary the drafter does not have (or the
/// reverse).
pub fn teacher_forced_loss<B: Backend>(
    drafter: &RecurrentDrafter<B>,
    hidden: Tensor<B, 3>,
    layout: &TeacherForcing,
    normalizers: &[usize],
    soft: Option<SoftLabels<'_, B>>,
) -> Result<Tensor<B, 1>> {
    let device = hidden.device();
    let [n, t, _] = hidden.dims();
    let h = drafter.config().hidden_size;
    if let Some(soft) = &soft {
        if !(soft.weight > 0.0 && soft.weight <= 1.0) {
            return Err(Error::InvalidSettings(format!(
                "the soft-label weight must be in (0, 1], not {}",
                soft.weight
            )));
        }
        let [rows, width] = soft.table.dims();
        let expected = drafter.draft_vocab_size();
        if width != h || rows != expected {
            return Err(Error::ShapeMismatch {
                tensor: "soft-label table".into(),
                expected: vec![expected, h],
                found: vec![rows, width],
            });
        }
    }
    let teacher = soft.as_ref().and_then(|soft| {
        let final_hidden = hidden.clone().slice([0..n, 0..t, 0..h]).reshape([n * t, h]);
        TeacherDistribution::new(&final_hidden, soft.table, layout)
            .map(|teacher| (soft.weight, teacher))
    });
    let mut terms: Vec<Tensor<B, 1>> = (0..layout.steps.len())
        .map(|_| Tensor::zeros([1], &device))
        .collect();
    for_each_step(drafter, hidden, layout, |k, logits, targets| {
        let normalizer = normalizers.get(k).copied().unwrap_or(0);
        if normalizer == 0 {
            return Ok(());
        }
        // One log-softmax per step, shared by both terms of a mix.
        let log_probs = log_softmax(logits, 1);
        let sum = match &teacher {
            Some((weight, teacher)) if *weight >= 1.0 => {
                teacher.cross_entropy_sum(log_probs, targets)
            }
            Some((weight, teacher)) => {
                let hard = cross_entropy_sum(log_probs.clone(), targets);
                let soft = teacher.cross_entropy_sum(log_probs, targets);
                hard.mul_scalar(1.0 - weight) + soft.mul_scalar(*weight)
            }
            None => cross_entropy_sum(log_probs, targets),
        };
        terms[k] = sum.div_scalar(normalizer as f32);
        Ok(())
    })?;
    Ok(Tensor::cat(terms, 0))
}

/// Evaluation counts, summed over micro-batches.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EvalCounts {
    /// Per step: pairs whose top-1 draft equals the label.
    pub correct: Vec<usize>,
    /// Per step: pairs, those set aside by a draft vocabulary included (they count as wrong).
    pub total: Vec<usize>,
    /// Per step: pairs whose cross-entropy is summed (all but the set-aside ones).
    pub labelled: Vec<usize>,
    /// Per step: summed cross-entropy.
    pub cross_entropy: Vec<f64>,
    /// Sum over step-1 pairs of the number of leading draft steps that are all right.
    pub accepted: usize,
    /// Number of step-1 pairs.
    pub positions: usize,
}

impl EvalCounts {
    fn ensure(&mut self, steps: usize) {
        if self.total.len() < steps {
            self.correct.resize(steps, 0);
            self.total.resize(steps, 0);
            self.labelled.resize(steps, 0);
            self.cross_entropy.resize(steps, 0.0);
        }
    }

    /// Adds another batch's counts.
    pub fn merge(&mut self, other: &EvalCounts) {
        self.ensure(other.total.len());
        for k in 0..other.total.len() {
            self.correct[k] += other.correct[k];
            self.total[k] += other.total[k];
            self.labelled[k] += other.labelled[k];
            self.cross_entropy[k] += other.cross_entropy[k];
        }
        self.accepted += other.accepted;
        self.positions += other.positions;
    }

    /// The report these counts give.
    pub fn report(&self) -> EvalReport {
        let ratio = |a: f64, b: usize| if b == 0 { 0.0 } else { a / b as f64 };
        let step_loss: Vec<f64> = self
            .cross_entropy
            .iter()
            .zip(&self.labelled)
            .map(|(&ce, &n)| ratio(ce, n))
            .collect();
        EvalReport {
            loss: step_loss.iter().sum(),
            step_loss,
            step_accuracy: self
                .correct
                .iter()
                .zip(&self.total)
                .map(|(&c, &n)| ratio(c as f64, n))
                .collect(),
            mean_accepted: ratio(self.accepted as f64, self.positions),
            positions: self.positions,
        }
    }
}

/// Held-out metrics of a drafter.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    /// Sum over draft steps of the mean cross-entropy (the training objective).
    pub loss: f64,
    /// Mean cross-entropy per draft step (over a draft vocabulary: its softmax, and only the
    /// labels it holds).
    pub step_loss: Vec<f64>,
    /// Top-1 accuracy per draft step (teacher-forced: earlier tokens are the true ones); labels
    /// outside a draft vocabulary count as misses.
    pub step_accuracy: Vec<f64>,
    /// Mean number of leading draft steps whose top-1 prediction is right, over the positions
    /// where step 1 is trained. When the data is the target's greedy output, this is the
    /// number of drafts greedy decoding with one beam of length `K + 1` would accept at each
    /// position (teacher forcing changes nothing along a correct chain), averaged over all
    /// positions rather than over the round boundaries decoding visits; `1 + mean_accepted`
    /// estimates τ at beam width 1, and wider beams do better.
    pub mean_accepted: f64,
    /// Positions counted in `mean_accepted`.
    pub positions: usize,
}

/// Evaluates a drafter on one micro-batch with a single readback.
///
/// # Shapes
/// `hidden`: `[N, T, F]`, the head's features (see [`for_each_step`])
pub fn evaluate_batch<B: Backend>(
    drafter: &RecurrentDrafter<B>,
    hidden: Tensor<B, 3>,
    layout: &TeacherForcing,
) -> Result<EvalCounts> {
    let steps = layout.steps.len();
    let mut transaction = Transaction::default();
    let mut evaluated = Vec::with_capacity(steps);
    for_each_step(drafter, hidden, layout, |k, logits, targets| {
        let predictions = crate::sampling::argmax_rows(logits.clone());
        transaction = std::mem::take(&mut transaction)
            .register(predictions)
            .register(cross_entropy_sum(log_softmax(logits, 1), targets));
        evaluated.push(k);
        Ok(())
    })?;
    let data = transaction.execute();

    let (n, width) = (layout.batch, layout.width);
    let mut counts = EvalCounts::default();
    counts.ensure(steps);
    // right[k][n·T + t]: Some(correct) where step k is trained at (n, t).
    let mut right: Vec<Vec<Option<bool>>> = vec![vec![None; n * width]; steps];
    for (j, &k) in evaluated.iter().enumerate() {
        let targets = &layout.steps[k];
        let predicted = data[2 * j].iter::<i64>();
        let ce: f64 = data[2 * j + 1].iter::<f64>().next().unwrap_or(f64::NAN);
        counts.cross_entropy[k] += ce;
        counts.total[k] += targets.rows.len();
        counts.labelled[k] += targets.rows.len();
        for ((&row, &label), prediction) in targets.rows.iter().zip(&targets.labels).zip(predicted)
        {
            let (b, t) = (
                row as usize / targets.grid_width,
                row as usize % targets.grid_width,
            );
            let ok = prediction == label;
            counts.correct[k] += ok as usize;
            right[k][b * width + t] = Some(ok);
        }
    }
    // Labels outside a draft vocabulary: no draft can be right there.
    for (k, targets) in layout.steps.iter().enumerate() {
        counts.total[k] += targets.excluded.len();
        for &row in &targets.excluded {
            let (b, t) = (
                row as usize / targets.grid_width,
                row as usize % targets.grid_width,
            );
            right[k][b * width + t] = Some(false);
        }
    }
    if let Some(first) = right.first() {
        for (at, verdict) in first.iter().enumerate() {
            if verdict.is_none() {
                continue;
            }
            counts.positions += 1;
            counts.accepted += right
                .iter()
                .take_while(|step| step[at] == Some(true))
                .count();
        }
    }
    Ok(counts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Cpu;
    use crate::drafter::{DraftHeadKind, RecurrentDrafterConfig};
    use crate::train::dataset::Sequence;
    use burn::tensor::Distribution;

    type B = Cpu;

    fn drafter(head: DraftHeadKind, rnn: bool) -> RecurrentDrafter<B> {
        let device = Default::default();
        let (h, v) = (4, 7);
        let embed = Tensor::<B, 2>::from_data(
            TensorData::new(
                (0..v * h)
                    .map(|i| ((i * 37 % 11) as f32 - 5.0) / 4.0)
                    .collect::<Vec<_>>(),
                [v, h],
            ),
            &device,
        );
        let out = embed.clone().mul_scalar(0.7);
        RecurrentDrafterConfig::new(h, v)
            .with_head(head)
            .with_rnn(rnn)
            .init_seeded::<B>(3, &device)
            .unwrap()
            .with_embeddings(embed, out)
            .unwrap()
    }

    fn floats<const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
        t.into_data().iter::<f32>().collect()
    }

    /// Draft step `i`'s full-vocabulary logits at position `t` of sequence `n`, by the
    /// definition: the state rebuilt from zero over `x_{t+1..=t+i}`.
    fn pair_logits(
        d: &RecurrentDrafter<B>,
        hidden: &Tensor<B, 3>,
        s: &Sequence,
        n: usize,
        t: usize,
        i: usize,
    ) -> Vec<f32> {
        let device = hidden.device();
        let h = hidden.dims()[2];
        let context = hidden
            .clone()
            .slice([n..n + 1, t..t + 1, 0..h])
            .reshape([1, h]);
        let mut state = Tensor::<B, 2>::zeros([1, h], &device);
        for k in 1..=i {
            let token = Tensor::<B, 1, Int>::from_data(
                TensorData::new(vec![s.tokens[t + k] as i64], [1]),
                &device,
            );
            state = d.step(state, d.embed(token).unwrap()).unwrap();
        }
        floats(d.head_logits(context, state).unwrap())
    }

    #[test]
    fn batched_loss_equals_the_per_position_definition() {
        let device = Default::default();
        let a = Sequence {
            tokens: vec![1, 2, 3, 4, 5, 6, 0],
            prompt_len: 3,
        };
        let b = Sequence {
            tokens: vec![6, 5, 4, 3],
            prompt_len: 1,
        };
        let c = Sequence {
            tokens: vec![2, 2],
            prompt_len: 1,
        };
        let seqs = [&a, &b, &c];
        for (head, rnn) in [
            (DraftHeadKind::Separate, true),
            (DraftHeadKind::Tied, false),
        ] {
            let d = drafter(head, rnn);
            for steps in [1, 3, 6] {
                let layout = TeacherForcing::new(&seqs, steps);
                let hidden = Tensor::<B, 3>::random(
                    [3, layout.width, 4],
                    Distribution::Normal(0.0, 1.0),
                    &device,
                );
                // Normalisers of a larger (accumulated) batch: anything positive.
                let normalizers: Vec<usize> = layout.counts().iter().map(|c| c + 2).collect();
                let got = floats(
                    teacher_forced_loss(&d, hidden.clone(), &layout, &normalizers, None).unwrap(),
                );
                let table = Tensor::<B, 2>::zeros([7, 4], &device);
                let want = naive_loss(&d, &hidden, &seqs, steps, &normalizers, 0.0, &table, None);
                assert_eq!(got.len(), steps);
                for (g, w) in got.iter().zip(&want) {
                    assert!(
                        (g - w).abs() < 1e-4 * (1.0 + w.abs()),
                        "{head:?} steps {steps}: {got:?} vs {want:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn evaluation_counts_agree_with_the_loss_and_chain_rule() {
        let device = Default::default();
        let a = Sequence {
            tokens: vec![1, 2, 3, 4, 5, 6, 0, 3],
            prompt_len: 2,
        };
        let b = Sequence {
            tokens: vec![6, 5, 4, 3, 2],
            prompt_len: 2,
        };
        let seqs = [&a, &b];
        let d = drafter(DraftHeadKind::Separate, true);
        let layout = TeacherForcing::new(&seqs, 3);
        let hidden = Tensor::<B, 3>::random(
            [2, layout.width, 4],
            Distribution::Normal(0.0, 1.0),
            &device,
        );
        let counts = evaluate_batch(&d, hidden.clone(), &layout).unwrap();
        assert_eq!(counts.total, layout.counts());
        let loss =
            floats(teacher_forced_loss(&d, hidden, &layout, &layout.counts(), None).unwrap());
        let report = counts.report();
        for (l, r) in loss.iter().zip(&report.step_loss) {
            assert!(
                (*l as f64 - r).abs() < 1e-4,
                "{loss:?} vs {:?}",
                report.step_loss
            );
        }
        assert_eq!(counts.positions, layout.counts()[0]);
        assert!(counts.accepted <= counts.correct[0]);
        assert!(report.mean_accepted <= 3.0);
    }

    fn log_softmax_of(logits: &[f32]) -> Vec<f32> {
        let max = logits.iter().cloned().fold(f32::MIN, f32::max);
        let log_z = max + logits.iter().map(|l| (l - max).exp()).sum::<f32>().ln();
        logits.iter().map(|l| l - log_z).collect()
    }

    /// Per-step loss by the definition, one pair at a time (the state rebuilt from zero): the
    /// drafter's log-softmax over `vocab` (or everything) against the label and, weighted by
    /// `weight`, against the target's softmax of `H_{t+i} · tableᵀ` over the same tokens.
    #[allow(clippy::too_many_arguments)]
    fn naive_loss(
        d: &RecurrentDrafter<B>,
        hidden: &Tensor<B, 3>,
        seqs: &[&Sequence],
        steps: usize,
        normalizers: &[usize],
        weight: f32,
        table: &Tensor<B, 2>,
        vocab: Option<&[u32]>,
    ) -> Vec<f32> {
        let h = hidden.dims()[2];
        let v = table.dims()[0];
        let tokens: Vec<u32> = vocab.map_or_else(|| (0..v as u32).collect(), <[u32]>::to_vec);
        let table_rows = floats(table.clone());
        let mut loss = vec![0.0f32; steps];
        for (n, s) in seqs.iter().enumerate() {
            for i in 1..=steps {
                for t in 0..s.len() {
                    let j = t + i + 1;
                    if j >= s.len() || j < s.prompt_len {
                        continue;
                    }
                    let Some(label) = tokens.iter().position(|&x| x == s.tokens[j]) else {
                        continue;
                    };
                    let all = pair_logits(d, hidden, s, n, t, i);
                    let draft: Vec<f32> = tokens.iter().map(|&x| all[x as usize]).collect();
                    let log_p = log_softmax_of(&draft);
                    let teacher_hidden = floats(
                        hidden
                            .clone()
                            .slice([n..n + 1, j - 1..j, 0..h])
                            .reshape([h]),
                    );
                    let teacher_logits: Vec<f32> = (0..tokens.len())
                        .map(|r| {
                            (0..h)
                                .map(|c| teacher_hidden[c] * table_rows[tokens[r] as usize * h + c])
                                .sum()
                        })
                        .collect();
                    let teacher: Vec<f32> = log_softmax_of(&teacher_logits)
                        .iter()
                        .map(|l| l.exp())
                        .collect();
                    let soft: f32 = -teacher.iter().zip(&log_p).map(|(p, l)| p * l).sum::<f32>();
                    loss[i - 1] += ((1.0 - weight) * -log_p[label] + weight * soft)
                        / normalizers[i - 1] as f32;
                }
            }
        }
        loss
    }

    fn mixed_case() -> (Vec<Sequence>, Tensor<B, 2>) {
        let seqs = vec![
            Sequence {
                tokens: vec![1, 2, 3, 4, 5, 6, 0, 3],
                prompt_len: 2,
            },
            Sequence {
                tokens: vec![6, 5, 4, 3, 2],
                prompt_len: 1,
            },
        ];
        let table =
            Tensor::<B, 2>::random([7, 4], Distribution::Normal(0.0, 1.0), &Default::default());
        (seqs, table)
    }

    #[test]
    fn soft_labels_mix_the_targets_distribution_in() {
        let device = Default::default();
        let (seqs, table) = mixed_case();
        let refs: Vec<&Sequence> = seqs.iter().collect();
        let d = drafter(DraftHeadKind::Tied, true);
        let layout = TeacherForcing::new(&refs, 3);
        let hidden = Tensor::<B, 3>::random(
            [2, layout.width, 4],
            Distribution::Normal(0.0, 1.0),
            &device,
        );
        for weight in [0.3f32, 1.0] {
            let soft = SoftLabels {
                weight,
                table: &table,
            };
            let got = floats(
                teacher_forced_loss(&d, hidden.clone(), &layout, &layout.counts(), Some(soft))
                    .unwrap(),
            );
            let want = naive_loss(
                &d,
                &hidden,
                &refs,
                3,
                &layout.counts(),
                weight,
                &table,
                None,
            );
            for (g, w) in got.iter().zip(&want) {
                assert!(
                    (g - w).abs() < 1e-4 * (1.0 + w.abs()),
                    "w {weight}: {got:?} vs {want:?}"
                );
            }
        }
        // A weight outside (0, 1] and a table of the wrong size are errors.
        for (weight, table) in [
            (0.0, table.clone()),
            (1.5, table.clone()),
            (0.5, table.clone().slice([0..6, 0..4])),
        ] {
            let soft = SoftLabels {
                weight,
                table: &table,
            };
            assert!(matches!(
                teacher_forced_loss(&d, hidden.clone(), &layout, &layout.counts(), Some(soft)),
                Err(Error::InvalidSettings(_) | Error::ShapeMismatch { .. })
            ));
        }
    }

    #[test]
    fn a_draft_vocabulary_restricts_the_softmax_and_the_labels() {
        use crate::drafter::DraftVocabulary;
        let device = Default::default();
        let (seqs, _) = mixed_case();
        let refs: Vec<&Sequence> = seqs.iter().collect();
        // Tokens 1 and 6 are never drafted; the rest in a shuffled order.
        let ids = vec![4u32, 0, 3, 5, 2];
        let vocabulary = DraftVocabulary::new(ids.clone(), 7).unwrap();
        let full = drafter(DraftHeadKind::Tied, true);
        let table = full.output_embedding.clone().unwrap();
        let restricted_table = table.clone().select(
            0,
            Tensor::<B, 1, Int>::from_data(
                TensorData::new(ids.iter().map(|&x| x as i64).collect::<Vec<_>>(), [5]),
                &device,
            ),
        );
        let d = full
            .clone()
            .with_draft_vocabulary(vocabulary.clone())
            .unwrap();
        let mut layout = TeacherForcing::new(&refs, 3);
        let hidden = Tensor::<B, 3>::random(
            [2, layout.width, 4],
            Distribution::Normal(0.0, 1.0),
            &device,
        );
        // Labels and drafter must agree on the vocabulary.
        assert!(matches!(
            teacher_forced_loss(&d, hidden.clone(), &layout, &layout.counts(), None),
            Err(Error::InvalidSettings(_))
        ));
        layout.restrict(&vocabulary);
        assert!(matches!(
            teacher_forced_loss(&full, hidden.clone(), &layout, &layout.counts(), None),
            Err(Error::InvalidSettings(_))
        ));
        let soft = SoftLabels {
            weight: 0.5,
            table: &restricted_table,
        };
        let got = floats(
            teacher_forced_loss(&d, hidden.clone(), &layout, &layout.counts(), Some(soft)).unwrap(),
        );
        let want = naive_loss(
            &full,
            &hidden,
            &refs,
            3,
            &layout.counts(),
            0.5,
            &table,
            Some(&ids),
        );
        for (g, w) in got.iter().zip(&want) {
            assert!(
                (g - w).abs() < 1e-4 * (1.0 + w.abs()),
                "{got:?} vs {want:?}"
            );
        }
        // Evaluation counts the set-aside labels as misses, and no chain runs through them.
        let unrestricted = TeacherForcing::new(&refs, 3);
        let counts = evaluate_batch(&d, hidden, &layout).unwrap();
        assert_eq!(counts.total, unrestricted.counts());
        assert_eq!(counts.labelled, layout.counts());
        assert_eq!(counts.positions, unrestricted.counts()[0]);
        for (k, step) in layout.steps.iter().enumerate() {
            assert!(counts.correct[k] <= step.rows.len());
            assert!(!step.excluded.is_empty() || k == 2);
        }
    }
}
