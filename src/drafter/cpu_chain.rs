//! A one-beam draft on the CPU computed on the host's buffers, step after step, with no Burn op
//! between the panel products.
//!
//! A one-beam draft whose log-probabilities nobody reads (the README's CPU shape) only needs each
//! step's best token. Through Burn's ops a step is some forty small ops — the embedding's gather,
//! the RNN's products and adds, the concatenation, the residual blocks, the table's product, a
//! top-k over the draft vocabulary and the warp of its one kept logit — each paying Flex's
//! dispatch and allocation. Here the same products run on [`crate::panel_matmul`] over the same
//! panels ([`super::cpu_panels`]), and the rest (bias, SiLU, residual adds, the argmax) are loops
//! over a few thousand floats.
//!
//! The table's product, the largest of a step (SmolLM2's 8,192-token draft vocabulary: 18.9 MB
//! in f32), reads the table rounded to f16 (the `half_table` of
//! [`DrafterPanels`](super::cpu_panels::DrafterPanels)): a step only ranks its logits. The tokens
//! are therefore beam search's unless two logits of a step lie within that rounding (~10⁻³ of
//! their size) of each other — the other products give beam search's bits, the SiLU comes from
//! another formula. A draft only decides what gets verified, so speculative output is the same
//! either way. Measured on the 2-core development machine in docs/benchmarks.md (session 42).

use burn::backend::flex::FlexTensor;
use burn::nn::Linear;
use burn::tensor::{Int, Tensor, backend::Backend};

use super::cpu_panels::PanelWeight;
use super::recurrent::RecurrentDrafter;
use crate::flex_tensor::{into_contiguous_flex, into_flex, is_flex};
use crate::generate::{int_tensor, ints};

/// The tokens of a one-beam draft of `length` tokens (the first one given) for each row:
/// `[B, length]` row-major as token ids; `None` where this path does not apply (not Flex, a
/// drafter without an RNN or without a draft vocabulary's panels, weights in another type than
/// f32), before anything is computed.
///
/// # Shapes
/// `context`: `[B, H]`, `first`: `[B]`; returns `[B, 1, length]`
pub(crate) fn draft_one_beam<B: Backend>(
    drafter: &RecurrentDrafter<B>,
    embedding: &Tensor<B, 2>,
    context: &Tensor<B, 2>,
    first: &Tensor<B, 1, Int>,
    length: usize,
) -> Option<Tensor<B, 3, Int>> {
    if !is_flex::<B>() || length < 2 {
        return None;
    }
    let panels = drafter.cpu_panels()?;
    let draft_ids = drafter.draft_vocabulary.as_ref()?.vocabulary.ids();
    let (rnn_w, rnn_u) = (drafter.rnn_w.as_ref()?, drafter.rnn_u.as_ref()?);
    if panels.res_blocks.len() != drafter.res_blocks.len()
        || panels.input_proj.is_some() != drafter.input_proj.is_some()
    {
        return None;
    }
    let [batch, hidden] = context.dims();
    let device = context.device();
    let [vocab, embedding_width] = embedding.dims();
    if embedding_width != hidden {
        return None;
    }
    let context = into_contiguous_flex(context.clone())?;
    let context = context.as_slice::<f32>()?;
    let embedding = into_contiguous_flex(embedding.clone())?;
    let embedding = embedding.as_slice::<f32>()?;
    let mut last: Vec<usize> = ints(&first.clone().into_data())
        .into_iter()
        .map(|t| usize::try_from(t).ok().filter(|&t| t < vocab))
        .collect::<Option<_>>()?;
    if last.len() != batch {
        return None;
    }

    let rnn_w = Layer::new(panels.rnn_w.as_ref()?, rnn_w)?;
    let rnn_u = Layer::new(panels.rnn_u.as_ref()?, rnn_u)?;
    let input_proj = match (&panels.input_proj, &drafter.input_proj) {
        (Some(panels), Some(linear)) => Some(Layer::new(panels, linear)?),
        _ => None,
    };
    let res_blocks = panels
        .res_blocks
        .iter()
        .zip(&drafter.res_blocks)
        .map(|(panels, block)| Layer::new(panels, &block.linear))
        .collect::<Option<Vec<_>>>()?;
    let exit = Layer::new(&panels.exit, &drafter.head)?;
    // Ranking the candidates only: the f16 copy of the table, half the bytes.
    let table = Weights::of(panels.half_table.as_ref().unwrap_or(&panels.table))?;

    let mut tokens = vec![0i64; batch * length];
    for (row, &token) in last.iter().enumerate() {
        tokens[row * length] = token as i64;
    }
    let mut state = vec![0.0f32; batch * hidden];
    for step in 1..length {
        // s = silu(e·W + b_W + s·U + b_U)
        let token_embedding: Vec<f32> = last
            .iter()
            .flat_map(|&t| &embedding[t * hidden..(t + 1) * hidden])
            .copied()
            .collect();
        let from_token = rnn_w.forward(&token_embedding, batch)?;
        let from_state = rnn_u.forward(&state, batch)?;
        for ((s, a), b) in state.iter_mut().zip(from_token).zip(from_state) {
            *s = silu(a + b);
        }
        // The head's input [h | s], its blocks x + silu(x·R + b), the exit and the table.
        let input: Vec<f32> = context
            .chunks_exact(hidden)
            .zip(state.chunks_exact(hidden))
            .flat_map(|(h, s)| h.iter().chain(s))
            .copied()
            .collect();
        let mut x = match &input_proj {
            Some(layer) => layer.forward(&input, batch)?,
            None => input,
        };
        for block in &res_blocks {
            let delta = block.forward(&x, batch)?;
            for (x, d) in x.iter_mut().zip(delta) {
                *x += silu(d);
            }
        }
        let features = exit.forward(&x, batch)?;
        let logits = table.product(&features, batch)?;
        let columns = logits.len() / batch;
        for (row, row_logits) in logits.chunks_exact(columns).enumerate() {
            let best = crate::sampling::argmax_in_lanes(row_logits);
            let token = *draft_ids.get(best)? as usize;
            tokens[row * length + step] = token as i64;
            last[row] = token;
        }
    }
    Some(int_tensor(tokens, [batch, 1, length], &device))
}

/// `v · sigmoid(v)`.
fn silu(v: f32) -> f32 {
    v / (1.0 + (-v).exp())
}

/// A panel weight's host buffer.
struct Weights {
    panels: FlexTensor,
    outputs: usize,
}

impl Weights {
    fn of<B: Backend>(weight: &PanelWeight<B>) -> Option<Self> {
        Some(Self {
            panels: into_flex(weight.panels.clone())?,
            outputs: weight.outputs,
        })
    }

    /// `x · W` for `rows` rows of `x`.
    fn product(&self, x: &[f32], rows: usize) -> Option<Vec<f32>> {
        crate::panel_matmul::flex_panel_matmul(x, rows, &self.panels, self.outputs, x.len() / rows)
    }
}

/// A `Linear`'s panels and bias on the host.
struct Layer {
    weights: Weights,
    /// The bias's Flex tensor (sharing the parameter's buffer).
    bias: Option<FlexTensor>,
}

impl Layer {
    fn new<B: Backend>(panels: &PanelWeight<B>, linear: &Linear<B>) -> Option<Self> {
        let bias = match &linear.bias {
            Some(bias) => Some(into_contiguous_flex(bias.val())?),
            None => None,
        };
        Some(Self {
            weights: Weights::of(panels)?,
            bias,
        })
    }

    /// `x · W + b` for `rows` rows of `x`.
    fn forward(&self, x: &[f32], rows: usize) -> Option<Vec<f32>> {
        let mut y = self.weights.product(x, rows)?;
        if let Some(bias) = &self.bias {
            let bias = bias.as_slice::<f32>()?;
            for row in y.chunks_exact_mut(bias.len()) {
                for (v, b) in row.iter_mut().zip(bias) {
                    *v += b;
                }
            }
        }
        Some(y)
    }
}
