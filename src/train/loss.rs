//! The distillation loss and the evaluation metrics, computed over all positions of a micro-batch
//! at once (teacher forcing, see [`super::targets`]).
//!
//! # Memory
//!
//! The recurrent state runs on the whole `[N, W_i, H]` grid (cheap), but the draft head — whose
//! `[·, V]` logits dominate memory — only runs on the trained pairs of each step: prompt and
//! padding positions cost nothing there. Under autodiff every step's logits, log-probabilities
//! and their gradients stay alive until the backward pass, about `12·K·P·V` bytes for `P`
//! trained pairs per step (f32); the trainer's `micro_batch_tokens` bounds `P`.

use burn::tensor::activation::log_softmax;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData, Transaction};
use serde::{Deserialize, Serialize};

use super::targets::{StepTargets, TeacherForcing};
use crate::drafter::RecurrentDrafter;
use crate::error::{Error, Result};

/// Runs the drafter over a micro-batch and hands `each_step` the logits of every step's trained
/// pairs.
///
/// # Shapes
/// - `hidden`: `[N, T, H]`, the target's final-norm hidden states (constants)
/// - `each_step(step, logits, targets)`: `step` is 0-based (draft step `step + 1`), `logits`
///   `[P_i, V]` for the `P_i` trained pairs of that step; not called for steps without pairs
fn for_each_step<B: Backend>(
    drafter: &RecurrentDrafter<B>,
    hidden: Tensor<B, 3>,
    layout: &TeacherForcing,
    mut each_step: impl FnMut(usize, Tensor<B, 2>, &StepTargets) -> Result<()>,
) -> Result<()> {
    let [n, t, h] = hidden.dims();
    if n != layout.batch || t != layout.width {
        return Err(Error::ShapeMismatch {
            tensor: "hidden".into(),
            expected: vec![layout.batch, layout.width, h],
            found: vec![n, t, h],
        });
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
        let context = hidden
            .clone()
            .slice([0..n, 0..width, 0..h])
            .reshape([n * width, h])
            .select(0, rows.clone());
        let state = next.reshape([n * width, h]).select(0, rows);
        let logits = drafter.head_logits(context, state)?;
        each_step(k, logits, targets)?;
    }
    Ok(())
}

/// Sum of the label cross-entropies of one step's pairs.
///
/// # Shapes
/// `logits`: `[P, V]` to `[1]`
fn cross_entropy_sum<B: Backend>(logits: Tensor<B, 2>, targets: &StepTargets) -> Tensor<B, 1> {
    let p = targets.labels.len();
    let labels = Tensor::<B, 2, Int>::from_data(
        TensorData::new(targets.labels.clone(), [p, 1]),
        &logits.device(),
    );
    log_softmax(logits, 1).gather(1, labels).sum().neg()
}

/// The teacher-forced distillation loss of one micro-batch, per draft step: the sum of the
/// cross-entropies of step `i`'s trained pairs divided by `normalizers[i]` (the number of
/// trained pairs of that step in the whole optimiser batch, so that accumulating the gradients
/// of all micro-batches gives exactly the batch mean). Steps with a zero normaliser or no pairs
/// contribute 0. The training loss is the sum of the returned vector (equal weights).
///
/// # Shapes
/// - `hidden`: `[N, T, H]`
/// - returns `[K]`
///
/// # Errors
/// Shape errors of the drafter, or a missing embedding table.
pub fn teacher_forced_loss<B: Backend>(
    drafter: &RecurrentDrafter<B>,
    hidden: Tensor<B, 3>,
    layout: &TeacherForcing,
    normalizers: &[usize],
) -> Result<Tensor<B, 1>> {
    let device = hidden.device();
    let mut terms: Vec<Tensor<B, 1>> = (0..layout.steps.len())
        .map(|_| Tensor::zeros([1], &device))
        .collect();
    for_each_step(drafter, hidden, layout, |k, logits, targets| {
        let normalizer = normalizers.get(k).copied().unwrap_or(0);
        if normalizer > 0 {
            terms[k] = cross_entropy_sum(logits, targets).div_scalar(normalizer as f32);
        }
        Ok(())
    })?;
    Ok(Tensor::cat(terms, 0))
}

/// Evaluation counts, summed over micro-batches.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EvalCounts {
    /// Per step: pairs whose top-1 draft equals the label.
    pub correct: Vec<usize>,
    /// Per step: trained pairs.
    pub total: Vec<usize>,
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
            self.cross_entropy.resize(steps, 0.0);
        }
    }

    /// Adds another batch's counts.
    pub fn merge(&mut self, other: &EvalCounts) {
        self.ensure(other.total.len());
        for k in 0..other.total.len() {
            self.correct[k] += other.correct[k];
            self.total[k] += other.total[k];
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
            .zip(&self.total)
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
    /// Mean cross-entropy per draft step.
    pub step_loss: Vec<f64>,
    /// Top-1 accuracy per draft step (teacher-forced: earlier tokens are the true ones).
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
/// `hidden`: `[N, T, H]`
pub fn evaluate_batch<B: Backend>(
    drafter: &RecurrentDrafter<B>,
    hidden: Tensor<B, 3>,
    layout: &TeacherForcing,
) -> Result<EvalCounts> {
    let steps = layout.steps.len();
    let mut transaction = Transaction::default();
    let mut evaluated = Vec::with_capacity(steps);
    for_each_step(drafter, hidden, layout, |k, logits, targets| {
        let predictions = logits.clone().argmax(1);
        transaction = std::mem::take(&mut transaction)
            .register(predictions)
            .register(cross_entropy_sum(logits, targets));
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

    /// Per-step loss by the definition: one position at a time, the state rebuilt from zero.
    fn naive_loss(
        d: &RecurrentDrafter<B>,
        hidden: &Tensor<B, 3>,
        seqs: &[&Sequence],
        steps: usize,
        normalizers: &[usize],
    ) -> Vec<f32> {
        let device = hidden.device();
        let h = hidden.dims()[2];
        let mut loss = vec![0.0f32; steps];
        for (n, s) in seqs.iter().enumerate() {
            for i in 1..=steps {
                for t in 0..s.len() {
                    let j = t + i + 1;
                    if j >= s.len() || j < s.prompt_len {
                        continue;
                    }
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
                    let logits = floats(d.head_logits(context, state).unwrap());
                    let max = logits.iter().cloned().fold(f32::MIN, f32::max);
                    let log_z = max + logits.iter().map(|l| (l - max).exp()).sum::<f32>().ln();
                    loss[i - 1] +=
                        (log_z - logits[s.tokens[j] as usize]) / normalizers[i - 1] as f32;
                }
            }
        }
        loss
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
                let got =
                    floats(teacher_forced_loss(&d, hidden.clone(), &layout, &normalizers).unwrap());
                let want = naive_loss(&d, &hidden, &seqs, steps, &normalizers);
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
        let loss = floats(teacher_forced_loss(&d, hidden, &layout, &layout.counts()).unwrap());
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
}
