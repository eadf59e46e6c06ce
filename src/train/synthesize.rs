//! Prompts written by the target itself, for distillation data beyond a fixed prompt set.
//!
//! An instruction-tuned model has learnt what its users write. Rendered up to the start of a user
//! turn — the chat template's text before the user's message — and sampled from, it writes a
//! user message and closes the turn with its stop token. Those messages, filtered and
//! deduplicated, are prompts drawn from the model's own idea of its users (the Magpie recipe, Xu
//! et al. 2024): they bring kinds of requests a prompt file lacks, and
//! [`generate_dataset`](super::data::generate_dataset) then answers them like any other prompt.
//!
//! A sampled message is kept only if the model ended the turn within
//! [`PromptSynthesisConfig::max_prompt_tokens`], it contains no special token (a model that
//! opens another turn inside the message wrote something else than a request), and, trimmed, it
//! has at least [`PromptSynthesisConfig::min_chars`] characters and differs from every kept one
//! (compared case- and whitespace-insensitively).

use std::collections::HashSet;

use burn::tensor::backend::Backend;

use crate::chat_template::{ChatMessage, ChatTemplate};
use crate::error::{Error, Result};
use crate::generate::{GenerationConfig, generate};
use crate::sampling::Sampling;
use crate::target::TargetModel;
use crate::tokenizer::Tokenizer;

/// Stands in for the user's message while the template is rendered, to find where it starts.
const USER_MESSAGE_SENTINEL: &str = "REDRAFTERUSERMESSAGESENTINEL";

/// How to sample prompts from the target.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptSynthesisConfig {
    /// Prompts wanted.
    pub count: usize,
    /// Give up after sampling this many messages in all, kept or not (a model that rarely ends
    /// its user turns must not loop forever).
    pub max_samples: usize,
    /// Messages sampled per [`generate`] call.
    pub batch_size: usize,
    /// A message that has not ended after this many tokens is dropped.
    pub max_prompt_tokens: usize,
    /// Shorter messages (in characters, trimmed) are dropped.
    pub min_chars: usize,
    /// Sampling temperature; Magpie samples at 1.
    pub temperature: f32,
    /// Seed of the first batch; each batch's seed is derived from it and the batch number.
    pub seed: u64,
    /// System message rendered before the user turn (default: none, the template's default).
    pub system: Option<String>,
}

impl PromptSynthesisConfig {
    /// `count` prompts with the defaults: up to 4× as many samples, batches of 32, messages of
    /// at most 128 tokens and at least 10 characters, temperature 1, seed 0.
    pub fn new(count: usize) -> Self {
        Self {
            count,
            max_samples: count.saturating_mul(4),
            batch_size: 32,
            max_prompt_tokens: 128,
            min_chars: 10,
            temperature: 1.0,
            seed: 0,
            system: None,
        }
    }

    fn validate(&self) -> Result<()> {
        if self.count == 0 || self.batch_size == 0 || self.max_prompt_tokens == 0 {
            return Err(Error::InvalidSettings(format!(
                "prompt synthesis needs a count, a batch size and a prompt length of at least 1 (got {}, {} and {})",
                self.count, self.batch_size, self.max_prompt_tokens
            )));
        }
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            return Err(Error::InvalidSettings(format!(
                "prompt synthesis samples: the temperature must be positive and finite, got {}",
                self.temperature
            )));
        }
        Ok(())
    }
}

/// What happened to the sampled messages.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SynthesisCounts {
    /// Messages sampled.
    pub sampled: usize,
    /// Kept as prompts.
    pub kept: usize,
    /// Dropped: no stop token within `max_prompt_tokens`.
    pub unfinished: usize,
    /// Dropped: a special token inside the message.
    pub special: usize,
    /// Dropped: shorter than `min_chars`.
    pub short: usize,
    /// Dropped: the same as a kept one.
    pub duplicate: usize,
}

/// The prompts and how they were chosen.
#[derive(Debug, Clone, PartialEq)]
pub struct SynthesizedPrompts {
    /// The kept messages, trimmed, in the order they were sampled.
    pub prompts: Vec<String>,
    pub counts: SynthesisCounts,
}

/// The chat text before the user's message: what the model sees before it writes a request.
///
/// # Errors
/// [`Error::ChatTemplate`] if the template fails or does not show the user's message verbatim.
pub fn user_turn_prefix(template: &ChatTemplate, system: Option<&str>) -> Result<String> {
    let mut messages = Vec::with_capacity(2);
    if let Some(system) = system {
        messages.push(ChatMessage::system(system));
    }
    messages.push(ChatMessage::user(USER_MESSAGE_SENTINEL));
    let rendered = template.render(&messages, false)?;
    let start = rendered.find(USER_MESSAGE_SENTINEL).ok_or_else(|| {
        Error::ChatTemplate(
            "the chat template does not render the user's message verbatim, so the start of a user turn is unknown".into(),
        )
    })?;
    Ok(rendered[..start].to_string())
}

/// Samples prompts from `model` (see the module docs), calling `on_batch` after every batch with
/// the prompts that batch kept and the counts so far (a caller that writes them as they come
/// keeps them if the run is cut short).
///
/// Stops when `config.count` prompts are kept or `config.max_samples` messages were sampled;
/// fewer prompts than asked for is not an error (the counts say why).
///
/// # Errors
/// [`Error::InvalidSettings`] for a zero count, batch size or length, or a temperature that is
/// not positive; [`Error::ChatTemplate`] if the tokenizer has no usable chat template;
/// [`Error::InvalidSettings`] if the tokenizer knows no stop token; whatever generation returns.
pub fn synthesize_prompts<B: Backend, M: TargetModel<B> + Sync>(
    model: &M,
    tokenizer: &Tokenizer,
    config: &PromptSynthesisConfig,
    mut on_batch: impl FnMut(&[String], &SynthesisCounts),
) -> Result<SynthesizedPrompts> {
    config.validate()?;
    let template = tokenizer
        .chat_template()
        .ok_or_else(|| Error::ChatTemplate("the tokenizer has no chat template".into()))?;
    if tokenizer.eos_token_ids().is_empty() {
        return Err(Error::InvalidSettings(
            "prompt synthesis needs the tokenizer's stop tokens to know where a user turn ends"
                .into(),
        ));
    }
    let prefix = tokenizer.encode(
        &user_turn_prefix(template, config.system.as_deref())?,
        false,
    )?;
    tracing::debug!(
        prefix_tokens = prefix.len(),
        "sampling prompts after the user-turn prefix"
    );

    let mut selection = PromptSelection::new(config.min_chars);
    let mut batch_number = 0u64;
    while selection.prompts.len() < config.count && selection.counts.sampled < config.max_samples {
        let rows = config
            .batch_size
            .min(config.max_samples - selection.counts.sampled);
        let generation = GenerationConfig::default()
            .with_max_new_tokens(config.max_prompt_tokens)
            .with_stop_tokens(tokenizer.eos_token_ids().to_vec())
            .with_sampling(Sampling::with_temperature(config.temperature))
            .with_seed(batch_seed(config.seed, batch_number));
        let output = generate(model, &vec![prefix.clone(); rows], &generation, |_, _| {})?;
        let kept_before = selection.prompts.len();
        for ids in &output.tokens {
            let message = match ids.split_last() {
                Some((last, body)) if tokenizer.is_eos(*last) => body,
                _ => {
                    selection.reject_unfinished();
                    continue;
                }
            };
            let text = tokenizer.decode(message, true)?;
            let has_special = tokenizer.decode(message, false)? != text;
            selection.offer(&text, has_special);
            if selection.prompts.len() == config.count {
                break;
            }
        }
        batch_number += 1;
        on_batch(&selection.prompts[kept_before..], &selection.counts);
    }
    Ok(SynthesizedPrompts {
        prompts: selection.prompts,
        counts: selection.counts,
    })
}

/// The filter and deduplication of sampled messages.
struct PromptSelection {
    min_chars: usize,
    seen: HashSet<String>,
    prompts: Vec<String>,
    counts: SynthesisCounts,
}

impl PromptSelection {
    fn new(min_chars: usize) -> Self {
        Self {
            min_chars,
            seen: HashSet::new(),
            prompts: Vec::new(),
            counts: SynthesisCounts::default(),
        }
    }

    /// Counts a message that did not end its turn within the length limit.
    fn reject_unfinished(&mut self) {
        self.counts.sampled += 1;
        self.counts.unfinished += 1;
    }

    /// Counts a finished message and keeps it if it passes.
    fn offer(&mut self, text: &str, has_special: bool) {
        self.counts.sampled += 1;
        let text = text.trim();
        if has_special {
            self.counts.special += 1;
        } else if text.chars().count() < self.min_chars {
            self.counts.short += 1;
        } else if !self.seen.insert(dedup_key(text)) {
            self.counts.duplicate += 1;
        } else {
            self.counts.kept += 1;
            self.prompts.push(text.to_string());
        }
    }
}

/// Case- and whitespace-insensitive identity of a message.
fn dedup_key(text: &str) -> String {
    text.split_whitespace()
        .map(str::to_lowercase)
        .collect::<Vec<_>>()
        .join(" ")
}

/// A batch's seed: SplitMix64 of the run's seed and the batch number, so runs with nearby seeds
/// (one per process) do not share batches.
fn batch_seed(seed: u64, batch: u64) -> u64 {
    fn mix(mut z: u64) -> u64 {
        z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    mix(seed ^ mix(batch))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SmolLM2's template, shortened: a default system turn unless one is given.
    const TEMPLATE: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are helpful.<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn the_prefix_ends_where_the_user_message_starts() {
        let template = ChatTemplate::new(TEMPLATE).unwrap();
        assert_eq!(
            user_turn_prefix(&template, None).unwrap(),
            "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\n"
        );
        assert_eq!(
            user_turn_prefix(&template, Some("Be brief.")).unwrap(),
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"
        );
    }

    #[test]
    fn a_template_that_rewrites_the_message_is_refused() {
        let template =
            ChatTemplate::new("{% for m in messages %}{{ m['content'] | lower }}{% endfor %}")
                .unwrap();
        assert!(matches!(
            user_turn_prefix(&template, None),
            Err(Error::ChatTemplate(_))
        ));
    }

    #[test]
    fn unfinished_short_special_and_repeated_messages_are_dropped_and_counted() {
        let mut selection = PromptSelection::new(10);
        selection.offer("  Write a poem about rain.\n", false);
        selection.offer("write a   POEM about rain.", false);
        selection.offer("Hi there", false);
        selection.offer("Explain photosynthesis simply.", true);
        selection.offer("Explain photosynthesis simply.", false);
        selection.reject_unfinished();
        assert_eq!(
            selection.prompts,
            ["Write a poem about rain.", "Explain photosynthesis simply."]
        );
        assert_eq!(
            selection.counts,
            SynthesisCounts {
                sampled: 6,
                kept: 2,
                unfinished: 1,
                special: 1,
                short: 1,
                duplicate: 1,
            }
        );
    }

    #[test]
    fn bad_settings_are_refused() {
        for config in [
            PromptSynthesisConfig::new(0),
            PromptSynthesisConfig {
                batch_size: 0,
                ..PromptSynthesisConfig::new(4)
            },
            PromptSynthesisConfig {
                temperature: 0.0,
                ..PromptSynthesisConfig::new(4)
            },
            PromptSynthesisConfig {
                temperature: f32::NAN,
                ..PromptSynthesisConfig::new(4)
            },
        ] {
            assert!(matches!(config.validate(), Err(Error::InvalidSettings(_))));
        }
        assert!(PromptSynthesisConfig::new(4).validate().is_ok());
    }

    #[test]
    fn nearby_seeds_give_different_batches() {
        let seeds: HashSet<u64> = (0..8)
            .flat_map(|seed| (0..64).map(move |batch| batch_seed(seed, batch)))
            .collect();
        assert_eq!(seeds.len(), 8 * 64);
    }
}
