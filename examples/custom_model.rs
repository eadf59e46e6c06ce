//! Plugging your own Burn model into the speculative decoder.
//!
//! `common/toy_model.rs` implements [`redrafter::TargetModel`] for a tiny transformer written from
//! scratch; this program wraps it with an untrained recurrent drafter, decodes greedily both ways
//! and checks that the outputs agree.
//!
//! ```text
//! cargo run --release --example custom_model
//! ```

#[path = "common/toy_model.rs"]
mod toy_model;

use anyhow::Result;
use burn::tensor::backend::Backend;
use redrafter::decoder::{SpeculativeConfig, SpeculativeDecoder};
use redrafter::drafter::{DraftHeadKind, RecurrentDrafterConfig};
use redrafter::{GenerationConfig, TargetModel, generate};
use toy_model::{ToyConfig, ToyModel};

type B = redrafter::backend::Cpu;

fn main() -> Result<()> {
    let device = Default::default();
    B::seed(&device, 42);
    let config = ToyConfig {
        vocab: 32,
        hidden: 32,
        heads: 4,
        layers: 2,
        max_len: 128,
    };
    let model = ToyModel::<B>::new(config, 4.0, &device);

    // A draft head sized for the target, sharing its (frozen) embeddings.
    let drafter = RecurrentDrafterConfig::new(model.hidden_size(), model.vocab_size())
        .with_head(DraftHeadKind::Tied)
        .init_seeded::<B>(7, &device)?
        .with_target(&model)?;

    let prompts = vec![vec![1, 2, 3, 4], vec![9, 8, 7]];
    let generation = GenerationConfig::default().with_max_new_tokens(24);
    let plain = generate(&model, &prompts, &generation, |_, _| {})?;
    let speculative = SpeculativeDecoder::new(
        &model,
        &drafter,
        SpeculativeConfig::default()
            .beam_width(8)
            .beam_length(4)
            .generation(generation),
    )?
    .generate(&prompts, |_, _| {})?;

    for (row, (a, b)) in plain.tokens.iter().zip(&speculative.tokens).enumerate() {
        println!("row {row}: plain       {a:?}");
        println!("row {row}: speculative {b:?}");
    }
    anyhow::ensure!(plain.tokens == speculative.tokens, "greedy outputs differ");
    println!(
        "identical; τ = {:.2} (an untrained drafter is rarely right)",
        speculative.stats.tau()
    );
    Ok(())
}
