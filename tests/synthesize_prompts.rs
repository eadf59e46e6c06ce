//! Prompts written by the real SmolLM2-135M-Instruct: sampled after the start of a user turn,
//! they are requests in plain text that the data pipeline can answer like a prompt file's.
#![cfg(feature = "train")]

mod common;

use common::smollm2;
use redrafter::train::data::tokenize_prompts;
use redrafter::train::{PromptRecord, PromptSynthesisConfig, synthesize_prompts};

#[test]
fn smollm2_writes_distinct_finished_prompts_reproducibly() {
    let (model, tokenizer) = smollm2();
    let config = PromptSynthesisConfig {
        batch_size: 8,
        max_prompt_tokens: 64,
        seed: 3,
        ..PromptSynthesisConfig::new(6)
    };
    let mut streamed = Vec::new();
    let first = synthesize_prompts(&model, &tokenizer, &config, |kept, _| {
        streamed.extend_from_slice(kept)
    })
    .unwrap();
    let c = &first.counts;
    assert!(
        c.kept >= 3,
        "the model ends most of its user turns: {c:?} {:?}",
        first.prompts
    );
    assert!(c.sampled <= config.max_samples && c.kept <= config.count);
    assert_eq!(
        c.sampled,
        c.kept + c.unfinished + c.special + c.short + c.duplicate
    );
    assert_eq!(c.kept, first.prompts.len());
    assert_eq!(
        streamed, first.prompts,
        "every kept prompt is handed over once, in order"
    );
    for prompt in &first.prompts {
        assert!(prompt.chars().count() >= config.min_chars, "{prompt:?}");
        assert_eq!(prompt.trim(), prompt);
        assert!(!prompt.contains("<|im_"), "{prompt:?}");
    }
    let distinct: std::collections::HashSet<_> =
        first.prompts.iter().map(|p| p.to_lowercase()).collect();
    assert_eq!(distinct.len(), first.prompts.len());

    // The same seed gives the same prompts; another seed other ones.
    let again = synthesize_prompts(&model, &tokenizer, &config, |_, _| {}).unwrap();
    assert_eq!(again, first);
    let other = PromptSynthesisConfig { seed: 4, ..config };
    let different = synthesize_prompts(&model, &tokenizer, &other, |_, _| {}).unwrap();
    assert_ne!(different.prompts, first.prompts);

    // They are prompts like any other: the chat template takes them as user messages.
    let records: Vec<PromptRecord> = first
        .prompts
        .iter()
        .enumerate()
        .map(|(index, text)| PromptRecord {
            index,
            text: text.clone(),
            reference: None,
        })
        .collect();
    let tokenized = tokenize_prompts(&records, &tokenizer, None).unwrap();
    assert!(tokenized.iter().all(|p| p.ids.len() > 10));
}
