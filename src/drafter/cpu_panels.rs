//! The draft head's weights in panels of 16 outputs for the CPU (Flex in f32), so that a draft
//! step's products run on [`crate::panel_matmul`] instead of Burn's `gemm` and the `[out, in]`
//! kernel of [`crate::skinny_matmul`].
//!
//! A one-beam draft step multiplies one row by every weight of the head: SmolLM2's drafter reads
//! 34.8 MB a step in f32 (the two residual blocks' 10.6 MB, the exit projection's 2.7 MB, the
//! RNN's 2.7 MB and the 8,192-token draft table's 18.9 MB). Burn's `gemm` and the `[out, in]`
//! kernel stream one row's weights at about 17–19 GB/s on the 2-core development machine, the
//! panel kernel at 31 GB/s (docs/benchmarks.md, session 30), and a draft round was a tenth of a
//! ReDrafter round on the CPU.
//!
//! A weight whose values are all f16 values — every layer of a checkpoint saved in f16, as the
//! shipped drafter is — is stored in f16 and widened exactly as it is read
//! ([`crate::panel_matmul::PanelElement`]): the same products from half the bytes (the README's
//! CPU shape drafted in 2.4 ms a round instead of 2.9 with f32 layers; session 31). The table,
//! rows of the target's embedding, stays f32 unless its values are f16 values too; a one-beam
//! draft, which only ranks the table's logits, reads a copy rounded to f16 ([`super::cpu_chain`]).
//!
//! The panels are copies laid out when a draft vocabulary is set
//! ([`RecurrentDrafter::with_draft_vocabulary`](super::RecurrentDrafter::with_draft_vocabulary)),
//! from the weights as they are then — like the vocabulary's other derived tables. They are
//! plain tensors, not parameters: optimisers never see them, checkpoints never store them, and
//! under `Autodiff` (which must record every op) none are built.

use burn::module::Module;
use burn::nn::Linear;
use burn::tensor::activation::silu;
use burn::tensor::{DType, Tensor, backend::Backend};
use half::f16;

use super::recurrent::{RecurrentDrafter, as_rows};
use crate::projection::panel_tensor;

/// A weight laid out in panels ([`crate::projection::WeightLayout::Panels`]).
#[derive(Module, Debug)]
pub(crate) struct PanelWeight<B: Backend> {
    /// `[⌈outputs / 16⌉ · inputs, 16]`.
    pub(super) panels: Tensor<B, 2>,
    #[module(skip)]
    pub(super) outputs: usize,
}

impl<B: Backend> PanelWeight<B> {
    /// The panels of a weight stored `[in, out]` (Burn's `Linear`) or, with `out_major`,
    /// `[out, in]` (a table of token rows), in f16 where that loses nothing.
    fn new(weight: &Tensor<B, 2>, out_major: bool) -> Self {
        let [rows, cols] = weight.dims();
        let (inputs, outputs) = if out_major {
            (cols, rows)
        } else {
            (rows, cols)
        };
        let values: Vec<f32> = weight.clone().into_data().iter::<f32>().collect();
        let panels = panel_tensor(&values, inputs, outputs, out_major, &weight.device());
        // In f16 where every value is an f16 value (a checkpoint saved in f16, as the shipped
        // drafter is): half the bytes, the same products (the kernel widens each weight exactly).
        // Elsewhere (SmolLM2's table, rows of a Q8_0 embedding) f32, so drafts never change.
        let exact_in_half = values
            .iter()
            .all(|&v| f16::from_f32(v).to_f32().to_bits() == v.to_bits());
        let panels = if exact_in_half {
            panels.cast(DType::F16)
        } else {
            panels
        };
        Self { panels, outputs }
    }

    /// The same panels rounded to f16 (to the nearest f16 value, so no longer the same products
    /// unless the values were f16 values).
    fn rounded_to_half(&self) -> Self {
        Self {
            panels: self.panels.clone().cast(DType::F16),
            outputs: self.outputs,
        }
    }

    /// `x · W`; `None` where the panel kernel declines (another float type, another width).
    ///
    /// # Shapes
    /// `[..., in]` to `[..., out]`
    fn forward<const D: usize>(&self, x: &Tensor<B, D>) -> Option<Tensor<B, D>> {
        let (flat, shape) = as_rows(x, self.outputs);
        #[cfg(feature = "flex")]
        return crate::panel_matmul::try_panel_matmul(&flat, &self.panels, self.outputs)
            .map(|y| y.reshape(shape));
        #[cfg(not(feature = "flex"))]
        {
            let _ = (flat, shape);
            None
        }
    }

    /// `x · W + b` for a `Linear`'s bias.
    fn linear<const D: usize>(&self, x: &Tensor<B, D>, linear: &Linear<B>) -> Option<Tensor<B, D>> {
        let y = self.forward(x)?;
        Some(match &linear.bias {
            Some(bias) => y + bias.val().unsqueeze(),
            None => y,
        })
    }
}

/// Every weight a draft step multiplies by, in panels.
#[derive(Module, Debug)]
pub(crate) struct DrafterPanels<B: Backend> {
    pub(super) rnn_w: Option<PanelWeight<B>>,
    pub(super) rnn_u: Option<PanelWeight<B>>,
    pub(super) input_proj: Option<PanelWeight<B>>,
    pub(super) res_blocks: Vec<PanelWeight<B>>,
    /// The tied head's exit projection `[E, H]`.
    pub(super) exit: PanelWeight<B>,
    /// The draft vocabulary's rows of the output embedding, `[N, H]`.
    pub(super) table: PanelWeight<B>,
    /// The table rounded to f16 where it is not f16 already, for drafts that only rank its
    /// logits ([`super::cpu_chain`]): half the bytes of the largest product of a draft step.
    pub(super) half_table: Option<PanelWeight<B>>,
}

impl<B: Backend> DrafterPanels<B> {
    /// The panels of `drafter`'s weights and of the draft vocabulary's `table` (`[N, H]`, rows
    /// per token); `None` where the panel kernel does not run: a backend other than Flex itself,
    /// or parameters in another type than f32.
    pub(crate) fn new(drafter: &RecurrentDrafter<B>, table: &Tensor<B, 2>) -> Option<Self> {
        #[cfg(feature = "flex")]
        let flex = crate::flex_tensor::is_flex::<B>();
        #[cfg(not(feature = "flex"))]
        let flex = false;
        if !flex || drafter.param_dtype() != DType::F32 || table.dtype() != DType::F32 {
            return None;
        }
        let of = |linear: &Linear<B>| PanelWeight::new(&linear.weight.val(), false);
        let table = PanelWeight::new(table, true);
        let panels = Self {
            rnn_w: drafter.rnn_w.as_ref().map(of),
            rnn_u: drafter.rnn_u.as_ref().map(of),
            input_proj: drafter.input_proj.as_ref().map(of),
            res_blocks: drafter.res_blocks.iter().map(|b| of(&b.linear)).collect(),
            exit: of(&drafter.head),
            half_table: (table.panels.dtype() != DType::F16).then(|| table.rounded_to_half()),
            table,
        };
        tracing::debug!(
            half = panels.half_weights(),
            "draft head's weights laid out in panels for the CPU"
        );
        Some(panels)
    }

    /// How many of the weights (the table included) are stored in f16.
    pub(crate) fn half_weights(&self) -> usize {
        let weights = [&self.rnn_w, &self.rnn_u, &self.input_proj]
            .into_iter()
            .flatten()
            .chain(&self.res_blocks)
            .chain([&self.exit, &self.table]);
        weights.filter(|w| w.panels.dtype() == DType::F16).count()
    }

    /// The RNN's update `silu(e·W + b_W + s·U + b_U)`, as `Linear`s compute it; `None` where a
    /// product declines or the drafter has no RNN.
    ///
    /// # Shapes
    /// `state`, `token_embedding`: `[..., H]` to `[..., H]`
    pub(crate) fn rnn_step<const D: usize>(
        &self,
        drafter: &RecurrentDrafter<B>,
        state: &Tensor<B, D>,
        token_embedding: &Tensor<B, D>,
    ) -> Option<Tensor<B, D>> {
        let (w, u) = (drafter.rnn_w.as_ref()?, drafter.rnn_u.as_ref()?);
        let input = self.rnn_w.as_ref()?.linear(token_embedding, w)?;
        let recurrent = self.rnn_u.as_ref()?.linear(state, u)?;
        Some(silu(input + recurrent))
    }

    /// The tied head's logits over the draft vocabulary from its input `[h | s]`: the input
    /// projection, the residual blocks `x + silu(x·W + b)`, the exit projection and the table;
    /// `None` where a product declines or the drafter's blocks no longer match the panels.
    ///
    /// # Shapes
    /// `x`: `[..., 2H]` to `[..., N]`
    pub(crate) fn head_logits<const D: usize>(
        &self,
        drafter: &RecurrentDrafter<B>,
        x: &Tensor<B, D>,
    ) -> Option<Tensor<B, D>> {
        if self.res_blocks.len() != drafter.res_blocks.len()
            || self.input_proj.is_some() != drafter.input_proj.is_some()
        {
            return None;
        }
        let mut x = match (&self.input_proj, &drafter.input_proj) {
            (Some(panels), Some(proj)) => panels.linear(x, proj)?,
            _ => x.clone(),
        };
        for (panels, block) in self.res_blocks.iter().zip(&drafter.res_blocks) {
            x = x.clone() + silu(panels.linear(&x, &block.linear)?);
        }
        let features = self.exit.linear(&x, &drafter.head)?;
        self.table.forward(&features)
    }
}
