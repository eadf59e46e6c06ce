//! The recurrent draft head of ReDrafter (SPEC §1): configuration, parameters and the two
//! building blocks ([`RecurrentDrafter::step`], [`RecurrentDrafter::head_logits`]) that both
//! beam search and training are made of.

use super::cpu_panels::DrafterPanels;
use super::{DraftVocabulary, TopKCache, TopKMethod};
use burn::module::{Module, Param};
use burn::nn::{Linear, LinearConfig};
use burn::tensor::activation::silu;
use burn::tensor::backend::Backend;
use burn::tensor::module::linear;
use burn::tensor::{DType, Int, Tensor, TensorData};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::target::TargetModel;

/// Added to a tapped layer's mean square before its root (see [`RecurrentDrafter::context`]).
const TAP_NORM_EPS: f64 = 1e-6;

/// Residual blocks of the published recipe.
pub const DEFAULT_NUM_DRAFT_LAYERS: usize = 2;
/// Draft steps the published recipe trains for.
pub const DEFAULT_TRAINED_STEPS: usize = 5;

/// How the draft head turns its `exit_dim` features into vocabulary logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DraftHeadKind {
    /// The reference head: its own `exit_dim → vocab` projection (no bias).
    #[default]
    Separate,
    /// Our small head for large vocabularies: `exit_dim → hidden` (no bias), then the target's
    /// frozen output embedding, so the head costs `exit_dim·H` instead of `exit_dim·V` parameters.
    Tied,
}

/// Configuration of a [`RecurrentDrafter`].
///
/// Serialises to JSON with these field names. Deserialising also accepts the reference
/// implementation's `config.json` (`hidden_size`, `vocab_size`, `exit_dim`, `num_draft_layers`,
/// `rnn`; other keys are ignored); absent fields take the defaults of [`Self::new`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "ConfigRepr")]
pub struct RecurrentDrafterConfig {
    /// Width `H` of the target hidden state (and of the token embeddings and the RNN state).
    pub hidden_size: usize,
    /// Vocabulary size `V`, shared with the target.
    pub vocab_size: usize,
    /// Width of the residual blocks. Default `2H`, which makes `input_proj` unnecessary.
    pub exit_dim: usize,
    /// Number of residual blocks. Default 2.
    pub num_draft_layers: usize,
    /// `true`: `s_t = SiLU(W·e + U·s + b)`; `false`: `s_t = s + e`. Default `true`.
    pub rnn: bool,
    /// Vocabulary head kind. Default [`DraftHeadKind::Separate`].
    pub head: DraftHeadKind,
    /// Draft steps the head was trained for; beams longer than `trained_steps + 1` are refused.
    /// `None` means unknown (no limit). Default `Some(5)`.
    pub trained_steps: Option<usize>,
    /// Target layers (0-based, strictly increasing) whose outputs the head reads besides the
    /// final hidden state, through its `fuse` projection (see [`RecurrentDrafter::context`]).
    /// Empty (the published head, the default): the final hidden state alone.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tapped_layers: Vec<usize>,
}

/// Wire form of [`RecurrentDrafterConfig`]: `exit_dim` defaults to `2H`, which a plain serde
/// default cannot express.
#[derive(Deserialize)]
struct ConfigRepr {
    hidden_size: usize,
    vocab_size: usize,
    #[serde(default)]
    exit_dim: Option<usize>,
    #[serde(default = "default_num_draft_layers")]
    num_draft_layers: usize,
    #[serde(default = "default_rnn")]
    rnn: bool,
    #[serde(default)]
    head: DraftHeadKind,
    #[serde(default = "default_trained_steps")]
    trained_steps: Option<usize>,
    #[serde(default)]
    tapped_layers: Vec<usize>,
}

fn default_num_draft_layers() -> usize {
    DEFAULT_NUM_DRAFT_LAYERS
}
fn default_rnn() -> bool {
    true
}
fn default_trained_steps() -> Option<usize> {
    Some(DEFAULT_TRAINED_STEPS)
}

impl From<ConfigRepr> for RecurrentDrafterConfig {
    fn from(r: ConfigRepr) -> Self {
        Self {
            hidden_size: r.hidden_size,
            vocab_size: r.vocab_size,
            exit_dim: r.exit_dim.unwrap_or(2 * r.hidden_size),
            num_draft_layers: r.num_draft_layers,
            rnn: r.rnn,
            head: r.head,
            trained_steps: r.trained_steps,
            tapped_layers: r.tapped_layers,
        }
    }
}

impl RecurrentDrafterConfig {
    /// The published recipe for a target of hidden size `hidden_size` and vocabulary
    /// `vocab_size`: `exit_dim = 2H`, 2 residual blocks, RNN on, separate head, 5 trained steps.
    pub fn new(hidden_size: usize, vocab_size: usize) -> Self {
        Self {
            hidden_size,
            vocab_size,
            exit_dim: 2 * hidden_size,
            num_draft_layers: DEFAULT_NUM_DRAFT_LAYERS,
            rnn: true,
            head: DraftHeadKind::Separate,
            trained_steps: Some(DEFAULT_TRAINED_STEPS),
            tapped_layers: Vec::new(),
        }
    }

    /// Sets the target layers the head reads besides the final hidden state (0-based, strictly
    /// increasing; see [`Self::tapped_layers`]).
    pub fn with_tapped_layers(mut self, layers: impl Into<Vec<usize>>) -> Self {
        self.tapped_layers = layers.into();
        self
    }

    /// Width of the features the head drafts from: the final hidden state and each tapped
    /// layer's output side by side, `H · (1 + taps)`.
    pub fn feature_width(&self) -> usize {
        self.hidden_size * (1 + self.tapped_layers.len())
    }

    /// Sets the residual-block width.
    pub fn with_exit_dim(mut self, exit_dim: usize) -> Self {
        self.exit_dim = exit_dim;
        self
    }

    /// Sets the number of residual blocks.
    pub fn with_num_draft_layers(mut self, num_draft_layers: usize) -> Self {
        self.num_draft_layers = num_draft_layers;
        self
    }

    /// Turns the recurrent update on or off.
    pub fn with_rnn(mut self, rnn: bool) -> Self {
        self.rnn = rnn;
        self
    }

    /// Sets the vocabulary head kind.
    pub fn with_head(mut self, head: DraftHeadKind) -> Self {
        self.head = head;
        self
    }

    /// Sets the number of trained draft steps (`None`: unknown, no limit).
    pub fn with_trained_steps(mut self, trained_steps: Option<usize>) -> Self {
        self.trained_steps = trained_steps;
        self
    }

    /// Whether the head needs `input_proj` (only when `exit_dim != 2H`, as in the reference).
    pub fn has_input_proj(&self) -> bool {
        self.exit_dim != 2 * self.hidden_size
    }

    /// Output width of the last head layer: `V` for the separate head, `H` for the tied one.
    pub fn head_out_dim(&self) -> usize {
        match self.head {
            DraftHeadKind::Separate => self.vocab_size,
            DraftHeadKind::Tied => self.hidden_size,
        }
    }

    /// Checks that every size is usable.
    pub fn validate(&self) -> Result<()> {
        for (name, value) in [
            ("hidden_size", self.hidden_size),
            ("vocab_size", self.vocab_size),
            ("exit_dim", self.exit_dim),
        ] {
            if value == 0 {
                return Err(Error::InvalidConfig(format!(
                    "draft head {name} must be positive"
                )));
            }
        }
        if self.tapped_layers.windows(2).any(|pair| pair[0] >= pair[1]) {
            return Err(Error::InvalidConfig(format!(
                "the draft head's tapped layers {:?} must be strictly increasing",
                self.tapped_layers
            )));
        }
        Ok(())
    }

    /// Creates a drafter with Burn's default initialisers (Kaiming-uniform, drawn from the
    /// backend's global RNG). Embeddings are not attached yet: see
    /// [`RecurrentDrafter::with_embeddings`].
    pub fn init<B: Backend>(&self, device: &B::Device) -> Result<RecurrentDrafter<B>> {
        self.validate()?;
        let linear = |d_in: usize, d_out: usize, bias: bool| -> Linear<B> {
            LinearConfig::new(d_in, d_out).with_bias(bias).init(device)
        };
        Ok(self.assemble(linear))
    }

    /// Creates a drafter whose weights depend only on `seed` (and the configuration): they are
    /// drawn on the host from a seeded [`StdRng`] with the same distribution as [`Self::init`],
    /// so the result does not depend on the backend's global RNG, on other threads drawing from
    /// it, or on the device. Use it for tests and for reproducible random drafters.
    pub fn init_seeded<B: Backend>(
        &self,
        seed: u64,
        device: &B::Device,
    ) -> Result<RecurrentDrafter<B>> {
        self.validate()?;
        let mut rng = StdRng::seed_from_u64(seed);
        let linear = |d_in: usize, d_out: usize, bias: bool| -> Linear<B> {
            // Burn's default Linear initialiser: U(-k, k) with k = 1/sqrt(d_in).
            let bound = 1.0 / (d_in as f32).sqrt();
            let mut sample = |n: usize| -> Vec<f32> {
                (0..n).map(|_| rng.random_range(-bound..bound)).collect()
            };
            let weight = sample(d_in * d_out);
            let bias = bias.then(|| sample(d_out));
            Linear {
                weight: Param::from_data(TensorData::new(weight, [d_in, d_out]), device),
                bias: bias.map(|b| Param::from_data(TensorData::new(b, [d_out]), device)),
            }
        };
        Ok(self.assemble(linear))
    }

    /// Builds the module from a linear-layer factory called in a fixed order (so seeded
    /// initialisation is reproducible).
    pub(crate) fn assemble<B: Backend>(
        &self,
        mut linear: impl FnMut(usize, usize, bool) -> Linear<B>,
    ) -> RecurrentDrafter<B> {
        let h = self.hidden_size;
        let (rnn_w, rnn_u) = if self.rnn {
            (Some(linear(h, h, false)), Some(linear(h, h, true)))
        } else {
            (None, None)
        };
        let input_proj = self
            .has_input_proj()
            .then(|| linear(2 * h, self.exit_dim, true));
        let res_blocks = (0..self.num_draft_layers)
            .map(|_| ResBlock {
                linear: linear(self.exit_dim, self.exit_dim, true),
            })
            .collect();
        let head = linear(self.exit_dim, self.head_out_dim(), false);
        let taps = self.tapped_layers.len();
        let fuse = (taps > 0).then(|| linear(taps * h, h, false));
        RecurrentDrafter {
            fuse,
            rnn_w,
            rnn_u,
            input_proj,
            res_blocks,
            head,
            input_embedding: None,
            output_embedding: None,
            config: self.clone(),
            top_k: TopKMethod::Auto,
            top_k_cache: TopKCache::default(),
            merges_exit: true,
            chains_draft: true,
            draft_vocabulary: None,
        }
    }
}

/// One residual block of the head: `x + SiLU(Linear(x))`, width `exit_dim`.
#[derive(Module, Debug)]
pub struct ResBlock<B: Backend> {
    pub(crate) linear: Linear<B>,
}

impl<B: Backend> ResBlock<B> {
    /// # Shapes
    /// `[..., exit_dim]` to `[..., exit_dim]`
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        if crate::cube_kernels::applies::<B>() {
            // On the GPUs the product, bias, SiLU and residual add are one launch.
            let bias = self.linear.bias.as_ref().map(Param::val);
            let weight = self.linear.weight.val();
            if let Some(out) = folded_product(&x, &weight, None, bias.as_ref(), true, true) {
                return out;
            }
            // Else two: the product, then the bias, SiLU and residual add (instead of nine).
            let product = gpu_product(x.clone(), weight);
            return fused_silu_sum(product, None, bias, Some(x));
        }
        x.clone() + silu(self.linear.forward(x))
    }
}

/// The recurrent draft head (SPEC §1).
///
/// A Burn [`Module`]: the trainable parameters are [`Param`]s (`rnn_w`, `rnn_u`, `input_proj`,
/// the residual blocks and the vocabulary head), so the same type trains under `Autodiff<B>`.
/// The target's input embedding `E` and (for the tied head) output embedding are *frozen and
/// shared*: they are held as plain tensors, not parameters, so optimisers never see them and
/// checkpoints never store them. Attach them with [`Self::with_embeddings`] or
/// [`Self::with_target`] (the `load` functions do it for you).
#[derive(Module, Debug)]
pub struct RecurrentDrafter<B: Backend> {
    /// With tapped layers: their normalised outputs, side by side, to a correction of the
    /// context `h` (`[taps · H, H]`, no bias; see [`Self::context`]).
    pub(crate) fuse: Option<Linear<B>>,
    pub(crate) rnn_w: Option<Linear<B>>,
    pub(crate) rnn_u: Option<Linear<B>>,
    pub(crate) input_proj: Option<Linear<B>>,
    pub(crate) res_blocks: Vec<ResBlock<B>>,
    pub(crate) head: Linear<B>,
    /// The target's input embedding `[V, H]` (frozen, not a parameter).
    pub(crate) input_embedding: Option<Tensor<B, 2>>,
    /// The target's output embedding `[V, H]`, kept only for the tied head.
    pub(crate) output_embedding: Option<Tensor<B, 2>>,
    #[module(skip)]
    pub(crate) config: RecurrentDrafterConfig,
    /// How beam search selects its top-k (a runtime choice, not part of the checkpoint).
    #[module(skip)]
    pub(crate) top_k: TopKMethod,
    /// Beam search's shape-only index tensors, built once per shape (shared by clones).
    #[module(skip)]
    pub(crate) top_k_cache: TopKCache,
    /// Whether a draft vocabulary merges the head's exit projection with its table where our GPU
    /// kernels run ([`Self::with_merged_exit`]; a runtime choice, not part of the checkpoint).
    #[module(skip)]
    pub(crate) merges_exit: bool,
    /// Whether a one-beam draft runs in one launch where it can ([`Self::with_draft_chain`]; a
    /// runtime choice, not part of the checkpoint).
    #[module(skip)]
    pub(crate) chains_draft: bool,
    /// A reduced drafting vocabulary, when set (a runtime choice, not part of the checkpoint:
    /// plain tensors, like the embeddings above, are not parameters).
    pub(crate) draft_vocabulary: Option<DraftTables<B>>,
}

/// A [`DraftVocabulary`] on the device: its ids and the tied table's rows for them.
#[derive(Module, Debug)]
pub(crate) struct DraftTables<B: Backend> {
    #[module(skip)]
    pub(crate) vocabulary: DraftVocabulary,
    /// `[N]`: the full-vocabulary id of each draft index.
    pub(crate) ids: Tensor<B, 1, Int>,
    /// The output embedding's rows for those ids: `[N, H]`, or `[H, N]` (a contiguous copy,
    /// `in_out`) where our GPU kernels take the head's product. Read along its rows, the `[N, H]`
    /// table's product cost a one-beam draft step 18.4 µs on the H200; a decoding step's LM
    /// head, the same product over an `[H, V]` copy, reads 3 TB/s (docs/benchmarks.md, session
    /// 26).
    pub(crate) table: Tensor<B, 2>,
    #[module(skip)]
    pub(crate) in_out: bool,
    /// Where our GPU kernels run an RNN head: the RNN's input projection `e·W + b_W` of each
    /// draft-vocabulary token, `[N, H]`, computed once by the product a draft step would run on
    /// that token's embedding (so the same bits). Beam search then gathers a new beam's row in
    /// its selection kernel instead of gathering the embedding and multiplying it by `W`: two
    /// launches fewer per draft step after the first. Derived from the drafter's `W` when the
    /// vocabulary is set: setting it again (or attaching the embeddings) rebuilds it.
    pub(crate) inputs: Option<Tensor<B, 2>>,
    /// Where our GPU kernels take the head's products: the head's exit projection and the
    /// table as one `[E, N]` matrix, `W_head · table`, computed once in f32 (see
    /// [`RecurrentDrafter::merged_exit`]). A draft step then multiplies its `E` features by it
    /// in one launch instead of two. Derived like `inputs`: setting the vocabulary again rebuilds
    /// it.
    pub(crate) exit: Option<Tensor<B, 2>>,
    /// On the CPU (Flex in f32): the head's weights and the table in panels for the panel
    /// kernel ([`DrafterPanels`]). Derived like `inputs`.
    pub(crate) panels: Option<DrafterPanels<B>>,
}

/// The environment variable that switches off [`DraftTables::exit`] (`off`, `0` or `false`):
/// draft steps then run the head's exit projection and the table's product apart, as before
/// session 29 — how the benchmarks measure what merging them saves.
pub const MERGED_EXIT_SWITCH_VARIABLE: &str = "REDRAFTER_MERGED_EXIT";

/// Most bytes a merged exit ([`DraftTables::exit`]) may read per draft step beyond the two
/// products it replaces. A launch costs the host ~10–15 µs on the H200 machines measured
/// (docs/benchmarks.md, session 28), the time HBM takes to stream ~32 MB; beyond that the merge
/// would trade host time the GPU no longer hides for device time. SmolLM2's 8,192-token draft
/// vocabulary reads 16.3 MB more in f32 (37.7 MB instead of 2.7 + 18.9), 8.2 MB in f16. With
/// `E = 2H` the extra is `H · (N − 2H)` elements: a 7B-shaped head (`H = 4096`) over 8,192 tokens
/// reads no more than the pair, over 32,000 tokens 195 MB more in f16 and stays apart.
const MERGED_EXIT_MAX_EXTRA_BYTES: usize = 32 << 20;

/// Whether draft vocabularies merge their table with the head's exit projection (they do
/// unless [`MERGED_EXIT_SWITCH_VARIABLE`] says otherwise). Read once.
fn merged_exit_switched_on() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| crate::cube_kernels::variable_allows(MERGED_EXIT_SWITCH_VARIABLE))
}

impl<B: Backend> RecurrentDrafter<B> {
    /// The configuration the drafter was built from.
    pub fn config(&self) -> &RecurrentDrafterConfig {
        &self.config
    }

    /// Chooses how beam search selects its top-k candidates ([`TopKMethod::Auto`] unless set).
    pub fn with_top_k(mut self, method: TopKMethod) -> Self {
        self.top_k = method;
        self
    }

    /// The top-k method set with [`Self::with_top_k`].
    pub fn top_k_method(&self) -> TopKMethod {
        self.top_k
    }

    /// Whether the target's embeddings are attached (needed by `propose` and, for the tied
    /// head, by [`Self::head_logits`]).
    pub fn has_embeddings(&self) -> bool {
        self.input_embedding.is_some()
            && (self.config.head == DraftHeadKind::Separate || self.output_embedding.is_some())
    }

    /// Attaches the target's frozen embeddings. `output_embedding` is the LM head as rows per
    /// token; it is kept only by the tied head.
    ///
    /// # Shapes
    /// `input_embedding`, `output_embedding`: `[V, H]`
    ///
    /// # Errors
    /// [`Error::DrafterMismatch`] if either table's vocabulary or width differs from the
    /// drafter's configuration.
    pub fn with_embeddings(
        mut self,
        input_embedding: Tensor<B, 2>,
        output_embedding: Tensor<B, 2>,
    ) -> Result<Self> {
        self.check_table("input embedding", &input_embedding)?;
        self.check_table("output embedding", &output_embedding)?;
        self.input_embedding = Some(input_embedding);
        // The separate head never reads it; dropping the handle keeps no extra reference alive.
        self.output_embedding =
            (self.config.head == DraftHeadKind::Tied).then_some(output_embedding);
        // Rebuild a draft vocabulary's rows from the new table.
        match self.draft_vocabulary.take() {
            Some(tables) => self.with_draft_vocabulary(tables.vocabulary),
            None => Ok(self),
        }
    }

    /// Drafts from `vocabulary` only: each step scores just those tokens (see
    /// [`DraftVocabulary`]). Decoding stays exact; acceptance drops only where a token outside
    /// the set would have been drafted.
    ///
    /// On the GPU backends with an RNN head this also computes the RNN's input projection of
    /// every token of the set once (`N × H` values: 18.9 MB for SmolLM2's 8,192 in f32), which
    /// beam search then gathers instead of multiplying at each step. It is derived from the
    /// drafter's weights as they are now: set the vocabulary again after changing them.
    ///
    /// # Errors
    /// [`Error::InvalidSettings`] for a separate (untied) head or a vocabulary of another size;
    /// [`Error::InvalidConfig`] if the target's embeddings are not attached yet.
    pub fn with_draft_vocabulary(mut self, vocabulary: DraftVocabulary) -> Result<Self> {
        if self.config.head != DraftHeadKind::Tied {
            return Err(Error::InvalidSettings(
                "a draft vocabulary needs a drafter with the tied head".into(),
            ));
        }
        if vocabulary.vocab_size() != self.config.vocab_size {
            return Err(Error::InvalidSettings(format!(
                "the draft vocabulary indexes {} tokens but the drafter has {}",
                vocabulary.vocab_size(),
                self.config.vocab_size
            )));
        }
        let table = self.output_embedding.as_ref().ok_or_else(|| {
            Error::InvalidConfig(
                "attach the target's embeddings (with_target) before a draft vocabulary".into(),
            )
        })?;
        let device = table.device();
        let ids: Vec<i64> = vocabulary.ids().iter().map(|&id| i64::from(id)).collect();
        let ids = Tensor::<B, 1, Int>::from_data(TensorData::new(ids, [vocabulary.len()]), &device);
        let mut table = table.clone().select(0, ids.clone());
        let in_out = crate::cube_kernels::applies::<B>();
        if in_out {
            // Once, at set-up: the transposed view's data in its logical order.
            table = Tensor::from_data(table.transpose().into_data(), &device);
        }
        let inputs = if in_out { self.rnn_inputs(&ids) } else { None };
        let exit = if in_out {
            self.merged_exit(&table)
        } else {
            None
        };
        let panels = if in_out {
            None
        } else {
            DrafterPanels::new(&self, &table)
        };
        self.draft_vocabulary = Some(DraftTables {
            vocabulary,
            ids,
            table,
            in_out,
            inputs,
            exit,
            panels,
        });
        Ok(self)
    }

    /// Whether a draft vocabulary's table is merged with the head's exit projection where our
    /// GPU kernels run (on by default): one product a draft step instead of two, rounded
    /// differently (see [`DraftTables::exit`]). Off, drafting over a draft vocabulary of every
    /// token gives the same bits as drafting over the whole vocabulary. Applies to the draft
    /// vocabulary already set, if any, and to those set later.
    pub fn with_merged_exit(mut self, merge: bool) -> Self {
        self.merges_exit = merge;
        let exit = match &self.draft_vocabulary {
            Some(tables) if merge && tables.in_out => self.merged_exit(&tables.table),
            _ => None,
        };
        if let Some(tables) = &mut self.draft_vocabulary {
            tables.exit = exit;
        }
        self
    }

    /// Whether a one-beam draft (beam width 1, log-probabilities not needed) runs as one launch
    /// on CUDA (on by default): every step's products and picks in one kernel
    /// ([`crate::cube_kernels::draft_chain`]) instead of `5 (C − 1) + 1` launches, the same beams
    /// bit for bit. It applies with a draft vocabulary whose exit is merged
    /// ([`Self::with_merged_exit`]), an RNN head and at most four batch rows; elsewhere drafting
    /// launches step by step whatever this says.
    pub fn with_draft_chain(mut self, chain: bool) -> Self {
        self.chains_draft = chain;
        self
    }

    /// Whether draft steps run the merged exit ([`Self::with_merged_exit`]): a draft vocabulary
    /// is set, on a backend with our kernels, and its merged matrix was built.
    pub fn has_merged_exit(&self) -> bool {
        self.draft_vocabulary
            .as_ref()
            .is_some_and(|tables| tables.exit.is_some())
    }

    /// The RNN's input projection `e·W + b_W` of the tokens `ids`, `[N, H]`, by the product a
    /// draft step runs on one token ([`folded_product`], in launches of at most
    /// [`crate::cube_kernels::MATMUL_MAX_ROWS`] rows: a row's sums do not depend on the other
    /// rows). `None` without an RNN or an input embedding, or where the product declines.
    fn rnn_inputs(&self, ids: &Tensor<B, 1, Int>) -> Option<Tensor<B, 2>> {
        let (w, _) = (self.rnn_w.as_ref()?, self.rnn_u.as_ref()?);
        let embeddings = self
            .input_embedding
            .as_ref()?
            .clone()
            .select(0, ids.clone())
            .cast(self.param_dtype());
        in_row_chunks(&embeddings, |rows| rnn_input_product(w, rows))
    }

    /// The head's exit projection `[E, H]` times the draft vocabulary's `[H, N]` table, `[E, N]`
    /// in the head's dtype, for [`DraftTables::exit`]. The product runs once, in f32, by our row
    /// product (launches of at most [`crate::cube_kernels::MATMUL_MAX_ROWS`] rows), and is rounded
    /// to the head's dtype once: drafting then rounds differently from the two products (the
    /// `H` features are no longer rounded in between), so a draft may differ at a near tie, never
    /// decoding's output.
    ///
    /// `None` where the head has a bias, where the merged matrix would read more than
    /// [`MERGED_EXIT_MAX_EXTRA_BYTES`] beyond the two products it replaces, where it is switched
    /// off ([`Self::with_merged_exit`], [`MERGED_EXIT_SWITCH_VARIABLE`]) or where the product
    /// declines.
    fn merged_exit(&self, table: &Tensor<B, 2>) -> Option<Tensor<B, 2>> {
        if self.head.bias.is_some() || !self.merges_exit || !merged_exit_switched_on() {
            return None;
        }
        let weight = self.head.weight.val();
        let [exit_dim, hidden] = weight.dims();
        let [table_hidden, tokens] = table.dims();
        if table_hidden != hidden {
            return None;
        }
        let element = self.param_dtype().size();
        let merged = exit_dim * tokens;
        let apart = exit_dim * hidden + hidden * tokens;
        if merged.saturating_sub(apart) * element > MERGED_EXIT_MAX_EXTRA_BYTES {
            tracing::debug!(
                exit_dim,
                tokens,
                "draft head's exit projection kept apart from its table (merging would read too much)"
            );
            return None;
        }
        let table = table.clone().cast(DType::F32);
        let merged = in_row_chunks(&weight.cast(DType::F32), |rows| {
            crate::cube_kernels::matmul(rows, &table)
        })?;
        Some(merged.cast(self.param_dtype()))
    }

    /// The draft vocabulary's weights in panels ([`DraftTables::panels`]), where they are kept.
    pub(crate) fn cpu_panels(&self) -> Option<&DrafterPanels<B>> {
        self.draft_vocabulary.as_ref()?.panels.as_ref()
    }

    /// The draft vocabulary's RNN inputs ([`DraftTables::inputs`]), where they are kept.
    pub(crate) fn draft_inputs(&self) -> Option<&Tensor<B, 2>> {
        self.draft_vocabulary.as_ref()?.inputs.as_ref()
    }

    /// The reduced drafting vocabulary, if one is set.
    pub fn draft_vocabulary(&self) -> Option<&DraftVocabulary> {
        self.draft_vocabulary.as_ref().map(|t| &t.vocabulary)
    }

    /// Checks the drafter against `target` and attaches its embeddings.
    ///
    /// # Errors
    /// [`Error::DrafterMismatch`] if hidden size or vocabulary differ.
    pub fn with_target<T: TargetModel<B>>(self, target: &T) -> Result<Self> {
        check_fits(&self.config, target.hidden_size(), target.vocab_size())?;
        self.with_embeddings(target.input_embedding(), target.output_embedding())
    }

    fn check_table(&self, what: &str, table: &Tensor<B, 2>) -> Result<()> {
        let [v, h] = table.dims();
        if h != self.config.hidden_size {
            return Err(Error::DrafterMismatch {
                what: format!("hidden size ({what} width)"),
                drafter: self.config.hidden_size,
                target: h,
            });
        }
        if v != self.config.vocab_size {
            return Err(Error::DrafterMismatch {
                what: format!("vocabulary size ({what} rows)"),
                drafter: self.config.vocab_size,
                target: v,
            });
        }
        Ok(())
    }

    /// The attached input embedding table.
    ///
    /// # Shapes
    /// `[V, H]`
    pub fn input_embedding(&self) -> Result<&Tensor<B, 2>> {
        self.input_embedding.as_ref().ok_or_else(|| {
            Error::InvalidConfig(
                "the draft head has no input embedding attached; call with_embeddings or \
                 with_target first"
                    .into(),
            )
        })
    }

    /// Appends `extra` residual blocks whose weights and biases are zero. Such a block is the
    /// identity (`x + SiLU(0 · x + 0) = x`, exactly), so the drafter drafts exactly as before;
    /// training then grows the new blocks from there (SiLU's slope at 0 is ½, so their gradients
    /// are not zero). This is how a trained head gets more depth without starting over
    /// (`train_drafter train --init-from … --num-layers N`).
    pub fn with_extra_res_blocks(mut self, extra: usize) -> Self {
        let width = self.config.exit_dim;
        let like = self.head.weight.val();
        for _ in 0..extra {
            let weight = Tensor::<B, 2>::zeros([width, width], &like.device()).cast(like.dtype());
            let bias = Tensor::<B, 1>::zeros([width], &like.device()).cast(like.dtype());
            self.res_blocks.push(ResBlock {
                linear: Linear {
                    weight: Param::from_tensor(weight),
                    bias: Some(Param::from_tensor(bias)),
                },
            });
        }
        self.config.num_draft_layers += extra;
        self
    }

    /// Makes a head that reads the final hidden state alone read the target layers `layers`
    /// too, starting as the same head: the new `fuse` projection is zero, so
    /// [`Self::context`] returns `h` unchanged until training moves it (its gradient is not
    /// zero: the tapped states multiply the context's). How a trained head learns from more
    /// layers without starting over (`train_drafter train --init-from … --tap-layers …`).
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] if the head already reads tapped layers or `layers` is not
    /// strictly increasing.
    pub fn with_tapped_layers(mut self, layers: impl Into<Vec<usize>>) -> Result<Self> {
        if self.fuse.is_some() {
            return Err(Error::InvalidConfig(format!(
                "the draft head already reads layers {:?}",
                self.config.tapped_layers
            )));
        }
        let config = self.config.clone().with_tapped_layers(layers);
        config.validate()?;
        let taps = config.tapped_layers.len();
        if taps > 0 {
            let h = config.hidden_size;
            let like = self.head.weight.val();
            let weight = Tensor::<B, 2>::zeros([taps * h, h], &like.device()).cast(like.dtype());
            self.fuse = Some(Linear {
                weight: Param::from_tensor(weight),
                bias: None,
            });
        }
        self.config = config;
        Ok(self)
    }

    /// The context the head drafts from, from the target's features at each position: the
    /// final hidden state `h` when the head taps no layer, else
    /// `h + fuse([rms(t_1) | … | rms(t_k)])`, each tapped layer's output `t_j` scaled to unit
    /// root mean square first (the residual stream's scale grows with depth; this keeps every
    /// layer's contribution on one scale without learned norms).
    ///
    /// # Shapes
    /// `features`: `[..., H · (1 + taps)]` (see
    /// [`RecurrentDrafterConfig::feature_width`]) to `[..., H]`
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] for features of another width.
    pub fn context<const D: usize>(&self, features: Tensor<B, D>) -> Result<Tensor<B, D>> {
        check_last_dim("features", &features.dims(), self.config.feature_width())?;
        let Some(fuse) = &self.fuse else {
            return Ok(features);
        };
        let h = self.config.hidden_size;
        let taps = self.config.tapped_layers.len();
        let dims = features.dims();
        let rows: usize = dims[..D - 1].iter().product();
        let flat = features.reshape([rows, (1 + taps) * h]);
        let hidden = flat.clone().narrow(1, 0, h);
        let tapped = flat.narrow(1, h, taps * h).reshape([rows * taps, h]);
        // Each tapped state to unit RMS: one kernel where ours run, else in f32 (an f16 sum of
        // squares overflows).
        let normalized = crate::cube_kernels::rms_norm(&tapped, TAP_NORM_EPS)
            .or_else(|| crate::cpu_kernels::rms_norm(&tapped, None, TAP_NORM_EPS))
            .unwrap_or_else(|| {
                let tapped = tapped.cast(DType::F32);
                let rms = tapped
                    .clone()
                    .square()
                    .mean_dim(1)
                    .add_scalar(TAP_NORM_EPS)
                    .sqrt();
                tapped.div(rms)
            })
            .reshape([rows, taps * h])
            .cast(self.param_dtype());
        let correction = match crate::cube_kernels::applies::<B>() {
            true => gpu_product(normalized, fuse.weight.val()),
            false => fuse.forward(normalized),
        }
        .cast(hidden.dtype());
        let mut out_dims = dims;
        out_dims[D - 1] = h;
        Ok((hidden + correction).reshape(out_dims))
    }

    /// Dtype the parameters compute in; inputs of another float dtype are cast to it.
    pub fn param_dtype(&self) -> DType {
        self.head.weight.val().dtype()
    }

    /// The drafter with its parameters in `dtype` (a float type), its draft vocabulary's derived
    /// tables rebuilt from them. [`Self::load`] computes in the target embedding's type, so a
    /// drafter for an f16 target drafts in f16: its inputs (the target's hidden state and
    /// embedding rows) then need no cast — on the GPUs two launches fewer a draft round, where
    /// every launch costs host time (our products accumulate in f32 either way).
    ///
    /// # Errors
    /// [`Error::InvalidSettings`] for a type that is not a float type.
    pub fn with_dtype(mut self, dtype: DType) -> Result<Self> {
        if !dtype.is_float() {
            return Err(Error::InvalidSettings(format!(
                "a draft head computes in a float type, not {dtype:?}"
            )));
        }
        if dtype == self.param_dtype() {
            return Ok(self);
        }
        let cast = |linear: Linear<B>| Linear {
            weight: Param::from_tensor(linear.weight.val().cast(dtype)),
            bias: linear
                .bias
                .map(|bias| Param::from_tensor(bias.val().cast(dtype))),
        };
        self.fuse = self.fuse.map(cast);
        self.rnn_w = self.rnn_w.map(cast);
        self.rnn_u = self.rnn_u.map(cast);
        self.input_proj = self.input_proj.map(cast);
        self.res_blocks = std::mem::take(&mut self.res_blocks)
            .into_iter()
            .map(|block| ResBlock {
                linear: cast(block.linear),
            })
            .collect();
        self.head = cast(self.head);
        match self.draft_vocabulary.take() {
            Some(tables) => self.with_draft_vocabulary(tables.vocabulary),
            None => Ok(self),
        }
    }

    /// Looks up token embeddings in the target's (frozen) input table.
    ///
    /// # Shapes
    /// `tokens`: `[N]` to `[N, H]`
    ///
    /// Token ids must be below `V`; like every Burn `select`, out-of-range ids are not checked
    /// on all backends.
    pub fn embed(&self, tokens: Tensor<B, 1, Int>) -> Result<Tensor<B, 2>> {
        Ok(self.input_embedding()?.clone().select(0, tokens))
    }

    /// One recurrent update: `s_t = SiLU(W·e + U·s + b_U)`, or `s_t = s + e` with `rnn = false`.
    ///
    /// # Shapes
    /// `state`, `token_embedding`: `[..., H]` (same shape) to `[..., H]`
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] if the shapes differ or the last dim is not `H`.
    pub fn step<const D: usize>(
        &self,
        state: Tensor<B, D>,
        token_embedding: Tensor<B, D>,
    ) -> Result<Tensor<B, D>> {
        let h = self.config.hidden_size;
        check_last_dim("state", &state.dims(), h)?;
        if state.dims() != token_embedding.dims() {
            return Err(Error::ShapeMismatch {
                tensor: "token_embedding".into(),
                expected: state.dims().to_vec(),
                found: token_embedding.dims().to_vec(),
            });
        }
        Ok(match (&self.rnn_w, &self.rnn_u) {
            (Some(w), Some(u)) if crate::cube_kernels::applies::<B>() => {
                // Two launches on the GPUs: `e·W (+ b)`, then `silu(s·U + that + b)`.
                let input = rnn_input_product(w, &token_embedding).unwrap_or_else(|| {
                    let input = gpu_product(token_embedding, w.weight.val());
                    match &w.bias {
                        Some(bias) => input + bias.val().unsqueeze(),
                        None => input,
                    }
                });
                gpu_rnn_update(u, state, input)
            }
            (Some(w), Some(u)) => self
                .cpu_panels()
                .and_then(|panels| panels.rnn_step(self, &state, &token_embedding))
                .unwrap_or_else(|| silu(w.forward(token_embedding) + u.forward(state))),
            _ => state + token_embedding,
        })
    }

    /// Draft logits from the context `h` and the recurrent state: `lm_head([h; s])` (context
    /// first, state second), before any warping.
    ///
    /// # Shapes
    /// `context`, `state`: `[..., H]` (same shape) to `[..., V]`
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] on inconsistent shapes; [`Error::InvalidConfig`] for a tied
    /// head without an attached output embedding.
    pub fn head_logits<const D: usize>(
        &self,
        context: Tensor<B, D>,
        state: Tensor<B, D>,
    ) -> Result<Tensor<B, D>> {
        self.logits(context, state, false)
    }

    /// [`head_logits`](Self::head_logits) over the draft vocabulary when one is set (`[..., N]`,
    /// index `i` meaning token `draft_ids()[i]`), else over the whole vocabulary.
    pub(crate) fn draft_logits(
        &self,
        context: Tensor<B, 2>,
        state: Tensor<B, 2>,
    ) -> Result<Tensor<B, 2>> {
        self.logits(context, state, true)
    }

    /// `[N]` full-vocabulary ids of the draft vocabulary's indices, when one is set.
    pub(crate) fn draft_ids(&self) -> Option<&Tensor<B, 1, Int>> {
        self.draft_vocabulary.as_ref().map(|t| &t.ids)
    }

    /// Tokens one draft step chooses from: the draft vocabulary's size when one is set, else the
    /// whole vocabulary's.
    pub fn draft_vocab_size(&self) -> usize {
        self.draft_vocabulary
            .as_ref()
            .map_or(self.config.vocab_size, |t| t.vocabulary.len())
    }

    fn logits<const D: usize>(
        &self,
        context: Tensor<B, D>,
        state: Tensor<B, D>,
        reduced: bool,
    ) -> Result<Tensor<B, D>> {
        check_last_dim("context", &context.dims(), self.config.hidden_size)?;
        if context.dims() != state.dims() {
            return Err(Error::ShapeMismatch {
                tensor: "state".into(),
                expected: context.dims().to_vec(),
                found: state.dims().to_vec(),
            });
        }
        self.head_input_logits(Tensor::cat(vec![context, state], D - 1), reduced)
    }

    /// The head on its input `x = [h | s]` `[..., 2H]` (see [`Self::logits`]).
    pub(crate) fn head_input_logits<const D: usize>(
        &self,
        x: Tensor<B, D>,
        reduced: bool,
    ) -> Result<Tensor<B, D>> {
        check_last_dim("x", &x.dims(), 2 * self.config.hidden_size)?;
        if reduced && let Some(logits) = self.cpu_panels().and_then(|p| p.head_logits(self, &x)) {
            return Ok(logits);
        }
        let mut x = match &self.input_proj {
            Some(proj) if crate::cube_kernels::applies::<B>() => {
                // Our row product with the bias folded in (Burn's Linear: CubeCL's matmul and an
                // add).
                let bias = proj.bias.as_ref().map(Param::val);
                folded_product(&x, &proj.weight.val(), None, bias.as_ref(), false, false)
                    .unwrap_or_else(|| proj.forward(x))
            }
            Some(proj) => proj.forward(x),
            None => x,
        };
        for block in &self.res_blocks {
            x = block.forward(x);
        }
        let merged_exit = self
            .draft_vocabulary
            .as_ref()
            .and_then(|tables| tables.exit.as_ref())
            .filter(|_| reduced);
        if let Some(exit) = merged_exit {
            // The exit projection and the table in one product (see `merged_exit`).
            let exit = exit.clone().cast(x.dtype());
            return Ok(gpu_product(x, exit));
        }
        let x = match &self.head.bias {
            None if crate::cube_kernels::applies::<B>() => gpu_product(x, self.head.weight.val()),
            _ => self.head.forward(x),
        };
        match self.config.head {
            DraftHeadKind::Separate => Ok(x),
            DraftHeadKind::Tied => {
                let table = self.output_embedding.as_ref().ok_or_else(|| {
                    Error::InvalidConfig(
                        "the tied draft head needs the target's output embedding; call \
                         with_embeddings or with_target first"
                            .into(),
                    )
                })?;
                let (table, in_out) = match (reduced, &self.draft_vocabulary) {
                    (true, Some(tables)) => (&tables.table, tables.in_out),
                    _ => (table, false),
                };
                // [.., H] x [H, V]: the table is stored as rows per token, as the target has it
                // (a draft vocabulary's rows already transposed where `in_out`). The cast is free
                // when the drafter computes in the target's dtype (the fast setup); otherwise it
                // converts the table on every call.
                let table = table.clone().cast(x.dtype());
                if in_out {
                    Ok(gpu_product(x, table))
                } else if crate::cube_kernels::applies::<B>() {
                    Ok(gpu_product(x, table.transpose()))
                } else if crate::projection::prefers_out_major::<B>(&table.device()) {
                    // The table is already `[out, in]`, this backend's fast layout.
                    Ok(crate::projection::matmul_out_major(x, table))
                } else {
                    Ok(linear(x, table.transpose(), None))
                }
            }
        }
    }
}

/// `x · weight` (`weight` `[in, out]`, possibly a transposed view) for the GPU branches of the
/// head: our row product ([`crate::cube_kernels::matmul`]) where it applies, else Burn's. For the
/// head's few rows CubeCL's matmul cost more device time: a draft round (M = 4, C = 5) took 1.55
/// ms with it and 1.03 ms with ours on the H200 (docs/benchmarks.md, session 12).
fn gpu_product<B: Backend, const D: usize>(x: Tensor<B, D>, weight: Tensor<B, 2>) -> Tensor<B, D> {
    let (flat, shape) = as_rows(&x, weight.dims()[1]);
    match crate::cube_kernels::matmul(&flat, &weight) {
        Some(product) => product.reshape(shape),
        None => linear(x, weight, None),
    }
}

/// `x` `[..., in]` as the rows `[rows, in]` our products take, and the shape `[..., outputs]` of
/// their product to reshape it back to.
pub(super) fn as_rows<B: Backend, const D: usize>(
    x: &Tensor<B, D>,
    outputs: usize,
) -> (Tensor<B, 2>, [usize; D]) {
    let mut shape = x.dims();
    let inputs = shape[D - 1];
    let rows = shape[..D - 1].iter().product::<usize>();
    shape[D - 1] = outputs;
    (x.clone().reshape([rows, inputs]), shape)
}

/// `[x +] act(x · weight [+ addend] [+ bias])` (`act` SiLU when `silu`, else none; `x` added when
/// `add_x`) in one launch on the GPUs ([`crate::cube_kernels::fused_matmul`]); `None` where it
/// does not apply (then compose [`gpu_product`] and [`fused_silu_sum`]).
///
/// # Shapes
/// `x`, `addend`: `[..., in]` and `[..., out]` (same leading dimensions); `weight`: `[in, out]`;
/// `bias`: `[out]`; returns `[..., out]`
pub(super) fn folded_product<B: Backend, const D: usize>(
    x: &Tensor<B, D>,
    weight: &Tensor<B, 2>,
    addend: Option<&Tensor<B, D>>,
    bias: Option<&Tensor<B, 1>>,
    silu: bool,
    add_x: bool,
) -> Option<Tensor<B, D>> {
    let outputs = weight.dims()[1];
    let (flat, shape) = as_rows(x, outputs);
    let rows = flat.dims()[0];
    let addend = match addend {
        Some(addend) if addend.dims() != shape => return None,
        Some(addend) => Some(addend.clone().reshape([rows, outputs])),
        None => None,
    };
    let folds = crate::cube_kernels::ProductFolds {
        addend: addend.as_ref(),
        bias,
        silu,
        residual: add_x.then_some(&flat),
        ..Default::default()
    };
    crate::cube_kernels::fused_matmul(&flat, weight, folds).map(|out| out.reshape(shape))
}

/// The RNN's input projection `e·W + b_W` in one launch on the GPUs ([`folded_product`]): the
/// product a draft step runs on its tokens' embeddings and the one that builds a draft
/// vocabulary's input table ([`DraftTables::inputs`]), so both give the same bits. `None` where
/// it does not apply.
///
/// # Shapes
/// `token_embedding`: `[..., H]` to `[..., H]`
pub(super) fn rnn_input_product<B: Backend, const D: usize>(
    w: &Linear<B>,
    token_embedding: &Tensor<B, D>,
) -> Option<Tensor<B, D>> {
    let bias = w.bias.as_ref().map(Param::val);
    folded_product(
        token_embedding,
        &w.weight.val(),
        None,
        bias.as_ref(),
        false,
        false,
    )
}

/// `product` of `x`'s rows `[N, in]` in launches of at most
/// [`crate::cube_kernels::MATMUL_MAX_ROWS`] rows, concatenated `[N, out]` (our row products sum
/// each row alone, so the chunking changes no bit). `None` where a launch declines.
fn in_row_chunks<B: Backend>(
    x: &Tensor<B, 2>,
    product: impl Fn(&Tensor<B, 2>) -> Option<Tensor<B, 2>>,
) -> Option<Tensor<B, 2>> {
    let rows = x.dims()[0];
    let chunk = crate::cube_kernels::MATMUL_MAX_ROWS;
    let products = (0..rows)
        .step_by(chunk)
        .map(|start| product(&x.clone().narrow(0, start, chunk.min(rows - start))))
        .collect::<Option<Vec<_>>>()?;
    Some(Tensor::cat(products, 0))
}

/// The RNN's update `silu(s·U + input + b_U)` from its input `e·W + b_W` on the GPUs: one launch
/// ([`folded_product`]), or the product and one fused sum (instead of nine launches) where that
/// declines.
///
/// # Shapes
/// `state`, `input`: `[..., H]` to `[..., H]`
pub(super) fn gpu_rnn_update<B: Backend, const D: usize>(
    u: &Linear<B>,
    state: Tensor<B, D>,
    input: Tensor<B, D>,
) -> Tensor<B, D> {
    let bias = u.bias.as_ref().map(Param::val);
    folded_product(
        &state,
        &u.weight.val(),
        Some(&input),
        bias.as_ref(),
        true,
        false,
    )
    .unwrap_or_else(|| fused_silu_sum(input, Some(gpu_product(state, u.weight.val())), bias, None))
}

/// `residual + silu(a + b + bias)` for the GPU branches of the head: one kernel
/// ([`crate::cube_kernels::silu_sum`]), or Burn's ops on the products already computed where the
/// kernel declines (a float type it does not take).
fn fused_silu_sum<B: Backend, const D: usize>(
    a: Tensor<B, D>,
    b: Option<Tensor<B, D>>,
    bias: Option<Tensor<B, 1>>,
    residual: Option<Tensor<B, D>>,
) -> Tensor<B, D> {
    if let Some(out) =
        crate::cube_kernels::silu_sum(&a, b.as_ref(), bias.as_ref(), residual.as_ref())
    {
        return out;
    }
    let mut sum = a;
    if let Some(b) = b {
        sum = sum + b;
    }
    if let Some(bias) = bias {
        sum = sum + bias.unsqueeze::<D>();
    }
    match residual {
        Some(residual) => residual + silu(sum),
        None => silu(sum),
    }
}

/// Checks a drafter configuration against a target's hidden size and vocabulary.
pub(crate) fn check_fits(
    config: &RecurrentDrafterConfig,
    target_hidden: usize,
    target_vocab: usize,
) -> Result<()> {
    if config.hidden_size != target_hidden {
        return Err(Error::DrafterMismatch {
            what: "hidden size".into(),
            drafter: config.hidden_size,
            target: target_hidden,
        });
    }
    if config.vocab_size != target_vocab {
        return Err(Error::DrafterMismatch {
            what: "vocabulary size".into(),
            drafter: config.vocab_size,
            target: target_vocab,
        });
    }
    Ok(())
}

fn check_last_dim(tensor: &str, dims: &[usize], expected: usize) -> Result<()> {
    if dims.last() != Some(&expected) {
        let mut want = dims.to_vec();
        if let Some(last) = want.last_mut() {
            *last = expected;
        }
        return Err(Error::ShapeMismatch {
            tensor: tensor.into(),
            expected: want,
            found: dims.to_vec(),
        });
    }
    Ok(())
}
