//! The Llama decoder stack and its [`TargetModel`] implementation.

use burn::module::{Module, Param};
use burn::tensor::{DType, Tensor, TensorData, backend::Backend};

use super::attention::Attention;
use super::config::LlamaConfig;
use super::fold::folds_layers;
use super::mlp::Mlp;
use super::norm::RmsNorm;
use super::rope::RotaryEmbedding;
use crate::error::{Error, Result};
use crate::io::WeightSource;
use crate::kv_cache::KvCache;
use crate::projection::{Projection, WeightLayout, prefers_out_major};
use crate::target::{Block, TargetModel};

/// How to materialise a Llama model on a device.
#[derive(Debug, Clone)]
pub struct LlamaLoadOptions {
    /// Float type of weights and activations (`F32`, or `F16`/`BF16` on GPUs).
    pub dtype: DType,
    /// Longest context to support; defaults to the configuration's `max_position_embeddings`.
    pub max_context: Option<usize>,
}

impl Default for LlamaLoadOptions {
    fn default() -> Self {
        Self {
            dtype: DType::F32,
            max_context: None,
        }
    }
}

/// One transformer block: pre-norm attention and pre-norm SwiGLU, each with a residual.
#[derive(Module, Debug)]
pub struct LlamaLayer<B: Backend> {
    pub input_norm: RmsNorm<B>,
    pub attention: Attention<B>,
    pub post_attention_norm: RmsNorm<B>,
    pub mlp: Mlp<B>,
}

impl<B: Backend> LlamaLayer<B> {
    /// Assembles a block from its (already laid out) weights; head counts come from `config`.
    /// The two norms' weights must already be folded into the inputs of `qkv` and `gate_up`
    /// (see [`fold_norm_into_columns`]).
    ///
    /// # Shapes
    /// `qkv` `H → (heads + 2·kv_heads)·D`, `output` `heads·D → H`, `gate_up` `H → 2·I`,
    /// `down` `I → H`
    fn new(
        config: &LlamaConfig,
        qkv: Projection<B>,
        output: Projection<B>,
        gate_up: Projection<B>,
        down: Projection<B>,
    ) -> Self {
        Self {
            input_norm: RmsNorm::unweighted(config.rms_norm_eps),
            attention: Attention {
                qkv,
                output,
                heads: config.num_attention_heads,
                kv_heads: config.num_key_value_heads,
                head_dim: config.head_dim(),
            },
            post_attention_norm: RmsNorm::unweighted(config.rms_norm_eps),
            mlp: Mlp { gate_up, down },
        }
    }
}

/// Multiplies column `c` of a row-major `[outputs, inputs]` matrix (HF's layout) by `norm[c]`:
/// a norm weight followed by a projection equals the plain norm followed by the scaled
/// projection.
fn fold_norm_into_columns(matrix: &mut [f32], norm: &[f32]) {
    for row in matrix.chunks_mut(norm.len().max(1)) {
        row.iter_mut().zip(norm).for_each(|(w, &scale)| *w *= scale);
    }
}

/// A Llama-architecture causal language model.
#[derive(Module, Debug)]
pub struct Llama<B: Backend> {
    /// `[vocab, hidden]`
    pub embed_tokens: Param<Tensor<B, 2>>,
    pub layers: Vec<LlamaLayer<B>>,
    pub norm: RmsNorm<B>,
    /// `hidden` to `vocab`. Tied embeddings: on a backend that prefers `[out, in]` the same
    /// tensor as `embed_tokens` (a copy in panels in f32 on Flex), elsewhere a transposed copy.
    pub lm_head: Projection<B>,
    rope: RotaryEmbedding<B>,
    /// Whether `lm_head` is the input embedding (tied weights).
    #[module(skip)]
    tied_head: bool,
    #[module(skip)]
    config: LlamaConfig,
    #[module(skip)]
    max_context: usize,
}

/// Reads a weight and checks its HF shape.
fn load_checked(weights: &dyn WeightSource, name: &str, expected: &[usize]) -> Result<Vec<f32>> {
    let (data, shape) = weights.tensor(name)?;
    if shape != expected {
        return Err(Error::ShapeMismatch {
            tensor: name.to_string(),
            expected: expected.to_vec(),
            found: shape,
        });
    }
    Ok(data)
}

fn load_vector(weights: &dyn WeightSource, name: &str, len: usize) -> Result<Vec<f32>> {
    load_checked(weights, name, &[len])
}

impl<B: Backend> Llama<B> {
    /// Builds the model from named weights (HF names), checking every shape against `config`.
    pub fn from_weights(
        config: LlamaConfig,
        weights: &dyn WeightSource,
        options: &LlamaLoadOptions,
        device: &B::Device,
    ) -> Result<Self> {
        config.validate()?;
        let h = config.hidden_size;
        let d = config.head_dim();
        let (heads, kv_heads) = (config.num_attention_heads, config.num_key_value_heads);
        let inter = config.intermediate_size;
        let vocab = config.vocab_size;
        let dtype = options.dtype;
        // `cast` is free for f32 (it returns the tensor when the type already matches).
        let matrix = |data: Vec<f32>, rows: usize, cols: usize| {
            Param::from_tensor(
                Tensor::<B, 2>::from_data(TensorData::new(data, [rows, cols]), device).cast(dtype),
            )
        };
        // A projection from a row-major `[outputs, inputs]` matrix (HF's layout).
        let projection = |data: Vec<f32>, inputs: usize, outputs: usize| {
            Projection::from_out_in(data, inputs, outputs, dtype, device)
        };
        let vector = |data: Vec<f32>| {
            let len = data.len();
            Tensor::<B, 1>::from_data(TensorData::new(data, [len]), device).cast(dtype)
        };

        let embed = load_checked(weights, "model.embed_tokens.weight", &[vocab, h])?;
        let tied = config.tie_word_embeddings || !weights.contains("lm_head.weight");
        // HF stores the LM head as `[V, H]`, like the embedding it may be tied to.
        let (embed_tokens, lm_head) = if tied && prefers_out_major::<B>(device) {
            // The embedding already has the head's `[out, in]` layout here: one tensor serves
            // both, except in f32 on Flex, where the head gets its own copy in panels.
            let embed_tokens = matrix(embed, vocab, h);
            let lm_head = Projection::from_out_in_tensor(embed_tokens.val());
            (embed_tokens, lm_head)
        } else {
            let head = if tied {
                embed.clone()
            } else {
                load_checked(weights, "lm_head.weight", &[vocab, h])?
            };
            (matrix(embed, vocab, h), projection(head, h, vocab))
        };

        let scale = 1.0 / (d as f32).sqrt();
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let p = format!("model.layers.{i}");
            // HF's `[outputs, inputs]` matrices: fusing projections stacks their rows.
            let mut q = load_checked(
                weights,
                &format!("{p}.self_attn.q_proj.weight"),
                &[heads * d, h],
            )?;
            q.iter_mut().for_each(|w| *w *= scale);
            let k = load_checked(
                weights,
                &format!("{p}.self_attn.k_proj.weight"),
                &[kv_heads * d, h],
            )?;
            let v = load_checked(
                weights,
                &format!("{p}.self_attn.v_proj.weight"),
                &[kv_heads * d, h],
            )?;
            let mut qkv = [q, k, v].concat();
            let o = load_checked(
                weights,
                &format!("{p}.self_attn.o_proj.weight"),
                &[h, heads * d],
            )?;
            let gate = load_checked(weights, &format!("{p}.mlp.gate_proj.weight"), &[inter, h])?;
            let up = load_checked(weights, &format!("{p}.mlp.up_proj.weight"), &[inter, h])?;
            let mut gate_up = [gate, up].concat();
            let down = load_checked(weights, &format!("{p}.mlp.down_proj.weight"), &[h, inter])?;
            let input_norm = load_vector(weights, &format!("{p}.input_layernorm.weight"), h)?;
            let post_norm =
                load_vector(weights, &format!("{p}.post_attention_layernorm.weight"), h)?;
            fold_norm_into_columns(&mut qkv, &input_norm);
            fold_norm_into_columns(&mut gate_up, &post_norm);
            layers.push(LlamaLayer::new(
                &config,
                projection(qkv, h, (heads + 2 * kv_heads) * d),
                projection(o, heads * d, h),
                projection(gate_up, h, 2 * inter),
                projection(down, inter, h),
            ));
        }
        let norm = load_vector(weights, "model.norm.weight", h)?;
        tracing::debug!(
            layers = layers.len(),
            hidden = h,
            vocab,
            ?dtype,
            "llama model loaded"
        );
        Ok(Self::assemble(
            config,
            options,
            device,
            embed_tokens,
            layers,
            vector(norm),
            lm_head,
        )
        .with_tied_head(tied))
    }

    /// Builds a model of `config`'s shape with random weights (normal, std 0.02; norms at 1),
    /// generated on the device. For measuring costs of shapes whose weights are not at hand
    /// (e.g. a 7B-shaped model on one GPU); its outputs are meaningless.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] if `config` does not validate.
    pub fn init_random(
        config: LlamaConfig,
        options: &LlamaLoadOptions,
        device: &B::Device,
    ) -> Result<Self> {
        use burn::tensor::Distribution;
        config.validate()?;
        let h = config.hidden_size;
        let d = config.head_dim();
        let (heads, kv_heads) = (config.num_attention_heads, config.num_key_value_heads);
        let inter = config.intermediate_size;
        let vocab = config.vocab_size;
        let dtype = options.dtype;
        let random = |rows: usize, cols: usize| {
            Tensor::<B, 2>::random([rows, cols], Distribution::Normal(0.0, 0.02), device)
                .cast(dtype)
        };
        let out_major = prefers_out_major::<B>(device);
        let matrix = |inputs: usize, outputs: usize| {
            if out_major {
                Projection::from_out_in_tensor(random(outputs, inputs))
            } else {
                Projection::from_tensor(random(inputs, outputs), WeightLayout::InOut)
            }
        };
        let ones = || Tensor::<B, 1>::ones([h], device).cast(dtype);
        let layers = (0..config.num_hidden_layers)
            .map(|_| {
                LlamaLayer::new(
                    &config,
                    matrix(h, (heads + 2 * kv_heads) * d),
                    matrix(heads * d, h),
                    matrix(h, 2 * inter),
                    matrix(inter, h),
                )
            })
            .collect();
        let (embed_tokens, lm_head) = (Param::from_tensor(random(vocab, h)), matrix(h, vocab));
        Ok(Self::assemble(
            config,
            options,
            device,
            embed_tokens,
            layers,
            ones(),
            lm_head,
        ))
    }

    /// Completes a model from its weights: the RoPE tables for the supported context, in the
    /// weights' float type.
    fn assemble(
        config: LlamaConfig,
        options: &LlamaLoadOptions,
        device: &B::Device,
        embed_tokens: Param<Tensor<B, 2>>,
        layers: Vec<LlamaLayer<B>>,
        norm: Tensor<B, 1>,
        lm_head: Projection<B>,
    ) -> Self {
        let max_context = options
            .max_context
            .unwrap_or(config.max_position_embeddings)
            .min(config.max_position_embeddings.max(1));
        // Casting to the tables' own type (f32) is free: Burn returns the tensor as it is.
        let rope = RotaryEmbedding::new(&config, max_context, device).cast(options.dtype);
        Self {
            embed_tokens,
            layers,
            norm: RmsNorm::new(norm, config.rms_norm_eps),
            lm_head,
            rope,
            tied_head: false,
            config,
            max_context,
        }
    }

    /// Marks the LM head as the input embedding (tied weights).
    fn with_tied_head(mut self, tied: bool) -> Self {
        self.tied_head = tied;
        self
    }

    /// The model's configuration.
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }
}

impl<B: Backend> TargetModel<B> for Llama<B> {
    fn hidden_size(&self) -> usize {
        self.config.hidden_size
    }

    fn vocab_size(&self) -> usize {
        self.config.vocab_size
    }

    fn max_context(&self) -> usize {
        self.max_context
    }

    fn device(&self) -> B::Device {
        self.embed_tokens.device()
    }

    fn new_cache(&self, batch: usize, capacity: usize) -> KvCache<B> {
        KvCache::new(
            self.config.num_hidden_layers,
            batch,
            self.config.num_key_value_heads,
            self.config.head_dim(),
            capacity,
            &self.device(),
        )
        .cast(self.embed_tokens.val().dtype())
    }

    fn forward(&self, block: &Block<B>, cache: &mut KvCache<B>) -> Result<Tensor<B, 3>> {
        Ok(self.forward_tapped(block, cache, &[])?.0)
    }

    fn forward_tapped(
        &self,
        block: &Block<B>,
        cache: &mut KvCache<B>,
        taps: &[usize],
    ) -> Result<(Tensor<B, 3>, Vec<Tensor<B, 3>>)> {
        let layers = self.layers.len();
        if taps.windows(2).any(|pair| pair[0] >= pair[1])
            || taps.last().is_some_and(|&l| l >= layers)
        {
            return Err(Error::InvalidSettings(format!(
                "tapped layers {taps:?} must be strictly increasing and below the model's {layers} layers"
            )));
        }
        let mut tapped = Vec::with_capacity(taps.len());
        let [batch, len] = block.tokens.dims();
        if batch != cache.batch_size() {
            return Err(Error::InvalidConfig(format!(
                "block of batch {batch} against a cache of batch {}",
                cache.batch_size()
            )));
        }
        cache.ensure_room(len)?;
        let hidden = self.config.hidden_size;
        let mut x = self
            .embed_tokens
            .val()
            .select(0, block.tokens.clone().reshape([batch * len]))
            .reshape([batch, len, hidden]);
        let rope = self.rope.angles(&block.positions);
        let dtype = self.embed_tokens.val().dtype();
        let bias = match &block.bias {
            Some(bias) => Some(bias.clone()),
            None if len > 1 || batch > 1 => Some(cache.attention_bias(len, None, &self.device())),
            None => None,
        }
        .map(|b| b.cast(dtype));
        let flush_every = crate::cube_kernels::queue_flush().every_layers;
        if folds_layers::<B>(batch * len) {
            for (i, layer) in self.layers.iter().enumerate() {
                if flush_every > 0 && i > 0 && i % flush_every == 0 {
                    crate::cube_kernels::flush_queue::<B>(&block.tokens.device());
                }
                x = layer.attention.forward_residual(
                    x,
                    &layer.input_norm,
                    &rope,
                    bias.as_ref(),
                    i,
                    cache,
                )?;
                x = layer.mlp.forward_residual(x, &layer.post_attention_norm);
                if taps.contains(&i) {
                    tapped.push(x.clone());
                }
            }
            return Ok((self.norm.forward(x), tapped));
        }
        // Each residual add is done by the norm that follows it (one kernel on the GPUs); the
        // last one by the final norm.
        let mut normed = match self.layers.first() {
            Some(layer) => layer.input_norm.forward(x.clone()),
            None => return Ok((self.norm.forward(x), tapped)),
        };
        for (i, layer) in self.layers.iter().enumerate() {
            let attn = layer
                .attention
                .forward(normed, &rope, bias.as_ref(), i, cache)?;
            let (h, mlp_input) = layer.post_attention_norm.add_forward(x, attn);
            let mlp = layer.mlp.forward(mlp_input);
            let next_norm = self
                .layers
                .get(i + 1)
                .map_or(&self.norm, |next| &next.input_norm);
            (x, normed) = next_norm.add_forward(h, mlp);
            if taps.contains(&i) {
                tapped.push(x.clone());
            }
        }
        Ok((normed, tapped))
    }

    fn logits(&self, hidden: Tensor<B, 3>) -> Tensor<B, 3> {
        self.lm_head.forward(hidden)
    }

    fn input_embedding(&self) -> Tensor<B, 2> {
        self.embed_tokens.val()
    }

    fn output_embedding(&self) -> Tensor<B, 2> {
        // A head in panels was packed from the tied embedding: hand out that tensor rather
        // than a copy unpacked from the panels.
        if self.tied_head && matches!(self.lm_head.layout, WeightLayout::Panels { .. }) {
            return self.embed_tokens.val();
        }
        self.lm_head.out_in()
    }
}
