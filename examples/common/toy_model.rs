//! A tiny transformer written from scratch with Burn, wrapped as a [`TargetModel`].
//!
//! It is the template for plugging your own model into the speculative decoder: the only
//! contract is to append each layer's keys and values to the [`KvCache`] and to attend over
//! what `append` returns with the block's bias. Positions are explicit per token (draft-tree
//! tokens at the same depth share a position); this model uses a learned position table.

use burn::module::{Module, Param};
use burn::tensor::{Distribution, Tensor, activation, backend::Backend};
use redrafter::{Block, KvCache, Result, TargetModel};

/// Sizes of the toy model.
#[derive(Debug, Clone, Copy)]
pub struct ToyConfig {
    pub vocab: usize,
    pub hidden: usize,
    pub heads: usize,
    pub layers: usize,
    pub max_len: usize,
}

#[derive(Module, Debug)]
pub struct ToyLayer<B: Backend> {
    qkv: Param<Tensor<B, 2>>,
    out: Param<Tensor<B, 2>>,
    up: Param<Tensor<B, 2>>,
    down: Param<Tensor<B, 2>>,
}

/// Embedding, position table, pre-norm-free attention + MLP layers, LM head.
#[derive(Module, Debug)]
pub struct ToyModel<B: Backend> {
    embed: Param<Tensor<B, 2>>,
    positions: Param<Tensor<B, 2>>,
    layers: Vec<ToyLayer<B>>,
    head: Param<Tensor<B, 2>>,
    #[module(skip)]
    heads: usize,
    #[module(skip)]
    max_len: usize,
}

impl<B: Backend> ToyModel<B> {
    /// Random weights; `B::seed` makes them reproducible. `sharpness` scales the LM head
    /// (larger = more peaked next-token distributions).
    pub fn new(config: ToyConfig, sharpness: f32, device: &B::Device) -> Self {
        let h = config.hidden;
        let init = |rows: usize, cols: usize, scale: f32| {
            Param::from_tensor(Tensor::random(
                [rows, cols],
                Distribution::Normal(0.0, scale as f64),
                device,
            ))
        };
        let layer_scale = 1.0 / (h as f32).sqrt();
        Self {
            embed: init(config.vocab, h, 1.0),
            positions: init(config.max_len, h, 0.5),
            layers: (0..config.layers)
                .map(|_| ToyLayer {
                    qkv: init(h, 3 * h, layer_scale),
                    out: init(h, h, layer_scale),
                    up: init(h, 2 * h, layer_scale),
                    down: init(2 * h, h, layer_scale / 2.0),
                })
                .collect(),
            head: init(h, config.vocab, sharpness * layer_scale),
            heads: config.heads,
            max_len: config.max_len,
        }
    }

    fn normalize(x: Tensor<B, 3>) -> Tensor<B, 3> {
        let rms = x.clone().square().mean_dim(2).add_scalar(1e-5).sqrt();
        x.div(rms)
    }
}

impl<B: Backend> TargetModel<B> for ToyModel<B> {
    fn hidden_size(&self) -> usize {
        self.embed.dims()[1]
    }
    fn vocab_size(&self) -> usize {
        self.embed.dims()[0]
    }
    fn max_context(&self) -> usize {
        self.max_len
    }
    fn device(&self) -> B::Device {
        self.embed.device()
    }
    fn new_cache(&self, batch: usize, capacity: usize) -> KvCache<B> {
        let head_dim = self.hidden_size() / self.heads;
        KvCache::new(
            self.layers.len(),
            batch,
            self.heads,
            head_dim,
            capacity,
            &self.device(),
        )
    }

    fn forward(&self, block: &Block<B>, cache: &mut KvCache<B>) -> Result<Tensor<B, 3>> {
        let [batch, len] = block.tokens.dims();
        let (h, heads) = (self.hidden_size(), self.heads);
        let dim = h / heads;
        let flat_tokens = block.tokens.clone().reshape([batch * len]);
        let flat_positions = block.positions.clone().reshape([batch * len]);
        let mut x = self
            .embed
            .val()
            .select(0, flat_tokens)
            .add(self.positions.val().select(0, flat_positions))
            .reshape([batch, len, h]);
        // A block of several tokens without a bias is causal over the whole cache.
        let bias = match &block.bias {
            Some(b) => Some(b.clone()),
            None if len > 1 || batch > 1 => Some(cache.attention_bias(len, None, &self.device())),
            None => None,
        };
        for (i, layer) in self.layers.iter().enumerate() {
            let qkv = Self::normalize(x.clone())
                .reshape([batch * len, h])
                .matmul(layer.qkv.val())
                .reshape([batch, len, 3, heads, dim]);
            let part = |j: usize| {
                qkv.clone()
                    .slice([0..batch, 0..len, j..j + 1, 0..heads, 0..dim])
                    .reshape([batch, len, heads, dim])
                    .swap_dims(1, 2)
            };
            let (keys, values) = cache.append(i, part(1), part(2))?;
            let mut scores = part(0)
                .matmul(keys.swap_dims(2, 3))
                .div_scalar((dim as f32).sqrt());
            if let Some(bias) = &bias {
                scores = scores.add(bias.clone());
            }
            let attended = activation::softmax(scores, 3)
                .matmul(values)
                .swap_dims(1, 2)
                .reshape([batch * len, h])
                .matmul(layer.out.val());
            x = x.add(attended.reshape([batch, len, h]));
            let mlp = activation::gelu(
                Self::normalize(x.clone())
                    .reshape([batch * len, h])
                    .matmul(layer.up.val()),
            )
            .matmul(layer.down.val());
            x = x.add(mlp.reshape([batch, len, h]));
        }
        Ok(Self::normalize(x))
    }

    fn logits(&self, hidden: Tensor<B, 3>) -> Tensor<B, 3> {
        let [batch, len, h] = hidden.dims();
        hidden
            .reshape([batch * len, h])
            .matmul(self.head.val())
            .reshape([batch, len, self.vocab_size()])
    }

    fn input_embedding(&self) -> Tensor<B, 2> {
        self.embed.val()
    }

    fn output_embedding(&self) -> Tensor<B, 2> {
        self.head.val().transpose()
    }
}
