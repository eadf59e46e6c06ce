//! Text ↔ token ids, chat prompts and streaming detokenisation.
//!
//! [`Tokenizer`] wraps the Hugging Face `tokenizers` crate. It loads a `tokenizer.json`
//! ([`Tokenizer::from_file`], [`Tokenizer::from_hf_dir`]) or rebuilds the same tokenizer from
//! the vocabulary a GGUF file carries ([`Tokenizer::from_gguf`]).
//!
//! A GGUF stores tokens, merges and a pre-tokenizer *name* (`tokenizer.ggml.pre`), not the
//! normalizer / pre-tokenizer pipeline of `tokenizer.json`; `pre_tokenizer_for` maps the names
//! to the pipeline of the model's own `tokenizer.json`. For SmolLM2 (`smollm`) that is
//! `Digits(individual_digits)` then GPT-2 `ByteLevel`, with no normalizer, and the ids match
//! transformers exactly (tests/fixtures/tokenizer_cases.json).

use std::collections::HashMap;
use std::path::Path;

use tokenizers::decoders::DecoderWrapper;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::normalizers::{NFC, NormalizerWrapper};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::PostProcessorWrapper;
use tokenizers::processors::template::{Template, TemplateProcessing};
use tokenizers::{AddedToken, SplitDelimiterBehavior};

pub use crate::chat_template::{ChatMessage, ChatTemplate};
use crate::error::{Error, Result};

/// GGUF `tokenizer.ggml.token_type` values (llama.cpp's `llama_token_type`).
mod token_type {
    pub const UNKNOWN: i32 = 2;
    pub const CONTROL: i32 = 3;
    pub const USER_DEFINED: i32 = 4;
}

/// The split regex of Llama 3's `tokenizer.json` (cl100k-style, digits in groups of three).
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// The split regex of Qwen2's `tokenizer.json` (like Llama 3, but single digits).
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// A tokenizer with the model's special tokens and chat template.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    vocab_size: usize,
    eos_token_ids: Vec<u32>,
    bos_token_id: Option<u32>,
    chat_template: Option<ChatTemplate>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The wrapped tokenizer's Debug prints the whole vocabulary.
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size)
            .field("eos_token_ids", &self.eos_token_ids)
            .field("bos_token_id", &self.bos_token_id)
            .field("chat_template", &self.chat_template.is_some())
            .finish()
    }
}

/// The tokenizer description a GGUF file carries, already read out of its metadata.
///
/// [`Tokenizer::from_gguf`] fills this from the `tokenizer.ggml.*` keys; building one by hand
/// lets a tokenizer be made without a GGUF file.
#[derive(Debug, Clone, Default)]
pub struct GgufTokenizerParts {
    /// `tokenizer.ggml.model`; only `gpt2` (byte-level BPE) is supported.
    pub model: String,
    /// `tokenizer.ggml.pre`: llama.cpp's name of the pre-tokenizer (`smollm`, `llama-bpe`...).
    pub pre: Option<String>,
    /// `tokenizer.ggml.tokens`, in id order.
    pub tokens: Vec<String>,
    /// `tokenizer.ggml.token_type`, one per token (empty: all normal).
    pub token_types: Vec<i32>,
    /// `tokenizer.ggml.merges`: `"left right"` pairs, highest priority first.
    pub merges: Vec<String>,
    /// `tokenizer.ggml.bos_token_id`.
    pub bos: Option<u32>,
    /// `tokenizer.ggml.eos_token_id`.
    pub eos: Option<u32>,
    /// `tokenizer.ggml.eot_token_id` (end of turn, e.g. Llama 3's `<|eot_id|>`); also ends generation.
    pub eot: Option<u32>,
    /// `tokenizer.ggml.unknown_token_id`.
    pub unk: Option<u32>,
    /// `tokenizer.ggml.padding_token_id`.
    pub pad: Option<u32>,
    /// `tokenizer.ggml.add_bos_token`: whether encoding with special tokens prepends BOS.
    pub add_bos: bool,
    /// `tokenizer.chat_template`.
    pub chat_template: Option<String>,
}

impl Tokenizer {
    /// Loads a Hugging Face `tokenizer.json`.
    ///
    /// The file says nothing about which token ends generation or about a chat template, so
    /// [`eos_token_ids`](Self::eos_token_ids) is empty and there is no template: use
    /// [`from_hf_dir`](Self::from_hf_dir), or [`with_eos_token_ids`](Self::with_eos_token_ids)
    /// and [`with_chat_template`](Self::with_chat_template).
    pub fn from_file(tokenizer_json: impl AsRef<Path>) -> Result<Self> {
        let path = tokenizer_json.as_ref();
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let inner = tokenizers::Tokenizer::from_bytes(&bytes)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
        // One past the largest id, not the count: added tokens may leave holes in the ids.
        let vocab_size = inner
            .get_vocab(true)
            .values()
            .max()
            .map_or(0, |&max| max as usize + 1);
        Ok(Self::from_parts(inner, vocab_size, Vec::new(), None, None))
    }

    /// Loads a Hugging Face model directory: `tokenizer.json`, plus the special tokens and chat
    /// template of `tokenizer_config.json` (the template may also sit in `chat_template.jinja`
    /// or `chat_template.json`) and the end-of-sequence ids of `generation_config.json`, when
    /// those files exist.
    pub fn from_hf_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let mut tokenizer = Self::from_file(dir.join("tokenizer.json"))?;
        let config = read_json_if_exists(&dir.join("tokenizer_config.json"))?;
        let config = config.as_ref();

        let special = |key: &str| -> Result<Option<(String, u32)>> {
            let Some(text) = config.and_then(|c| c.get(key)).and_then(added_token_text) else {
                return Ok(None);
            };
            let id = tokenizer.inner.token_to_id(&text).ok_or_else(|| {
                Error::Tokenizer(format!(
                    "tokenizer_config.json names {key} `{text}`, which is not in the vocabulary"
                ))
            })?;
            Ok(Some((text, id)))
        };
        let bos = special("bos_token")?;
        let eos = special("eos_token")?;

        let mut eos_ids: Vec<u32> = eos.iter().map(|(_, id)| *id).collect();
        let mut bos_id = bos.as_ref().map(|(_, id)| *id);
        if let Some(generation) = read_json_if_exists(&dir.join("generation_config.json"))? {
            // Instruct models often end a turn with a token other than the tokenizer's EOS
            // (Llama 3: <|eot_id|>); generation_config lists every id that stops generation.
            match generation.get("eos_token_id") {
                Some(serde_json::Value::Array(ids)) => {
                    eos_ids.extend(ids.iter().filter_map(json_u32));
                }
                Some(id) => eos_ids.extend(json_u32(id)),
                None => {}
            }
            if bos_id.is_none() {
                bos_id = generation.get("bos_token_id").and_then(json_u32);
            }
        }
        for &id in &eos_ids {
            tokenizer.check_id(id)?;
        }
        dedup_in_order(&mut eos_ids);
        tokenizer.eos_token_ids = eos_ids;
        tokenizer.bos_token_id = bos_id;

        if let Some(source) = chat_template_source(dir, config)? {
            let template = ChatTemplate::new(source)?
                .with_bos_token(bos.map(|(text, _)| text))
                .with_eos_token(eos.map(|(text, _)| text));
            tokenizer.chat_template = Some(template);
        }
        tracing::debug!(
            dir = %dir.display(),
            vocab_size = tokenizer.vocab_size,
            eos = ?tokenizer.eos_token_ids,
            chat_template = tokenizer.chat_template.is_some(),
            "loaded Hugging Face tokenizer"
        );
        Ok(tokenizer)
    }

    /// Builds the tokenizer described by a GGUF file's `tokenizer.*` metadata.
    pub fn from_gguf(gguf: &crate::io::gguf::GgufFile) -> Result<Self> {
        Self::from_gguf_parts(gguf_parts(gguf)?)
    }

    /// Builds a byte-level BPE tokenizer from a GGUF vocabulary.
    ///
    /// Control (and unknown) tokens become special added tokens and user-defined tokens plain
    /// added tokens, so `<|im_start|>` in a prompt is one token, as in llama.cpp and transformers.
    pub fn from_gguf_parts(parts: GgufTokenizerParts) -> Result<Self> {
        if parts.model != "gpt2" {
            return Err(Error::Tokenizer(format!(
                "unsupported GGUF tokenizer model `{}`: only byte-level BPE (`gpt2`) is supported; \
                 load the model's tokenizer.json with Tokenizer::from_hf_dir instead",
                parts.model
            )));
        }
        if parts.tokens.is_empty() {
            return Err(Error::Tokenizer("the GGUF vocabulary is empty".into()));
        }
        if !parts.token_types.is_empty() && parts.token_types.len() != parts.tokens.len() {
            return Err(Error::Tokenizer(format!(
                "the GGUF has {} token types for {} tokens",
                parts.token_types.len(),
                parts.tokens.len()
            )));
        }
        let vocab_size = parts.tokens.len();
        for (name, id) in [
            ("bos", parts.bos),
            ("eos", parts.eos),
            ("eot", parts.eot),
            ("unk", parts.unk),
            ("pad", parts.pad),
        ] {
            if let Some(id) = id.filter(|&id| id as usize >= vocab_size) {
                return Err(Error::Tokenizer(format!(
                    "{name} token id {id} is outside the vocabulary of {vocab_size}"
                )));
            }
        }
        let kind = |id: usize| parts.token_types.get(id).copied().unwrap_or(1);

        // Spellings: BPE tokens must be written in the byte-level alphabet; added tokens are
        // matched against raw text and keep their own spelling.
        let alphabet = byte_level_alphabet();
        let mut vocab = Vocab::with_capacity(vocab_size);
        let mut special = Vec::new();
        let mut user_defined = Vec::new();
        for (id, token) in parts.tokens.iter().enumerate() {
            let spelled = match kind(id) {
                token_type::CONTROL | token_type::UNKNOWN => {
                    special.push(AddedToken::from(token.clone(), true).normalized(false));
                    token.clone()
                }
                token_type::USER_DEFINED => {
                    user_defined.push(AddedToken::from(token.clone(), false).normalized(false));
                    token.clone()
                }
                _ if token.chars().all(|c| alphabet.contains_key(&c)) => token.clone(),
                // A converter wrote raw text; BPE could never produce it unless respelled.
                _ => token.bytes().map(|b| BYTE_TO_CHAR[b as usize]).collect(),
            };
            if vocab.insert(spelled, id as u32).is_some() {
                tracing::warn!(id, token = %token, "duplicate token in the GGUF vocabulary");
            }
        }
        let merges = parts
            .merges
            .iter()
            .map(|merge| {
                merge
                    .split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| Error::Tokenizer(format!("malformed GGUF merge `{merge}`")))
            })
            .collect::<Result<Vec<_>>>()?;
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| Error::Tokenizer(format!("building the BPE model: {e}")))?;

        let (normalizer, pre_tokenizer) = pre_tokenizer_for(parts.pre.as_deref())?;
        let mut inner = tokenizers::Tokenizer::new(bpe);
        inner.with_normalizer(normalizer);
        inner.with_pre_tokenizer(Some(pre_tokenizer));
        inner.with_decoder(Some(DecoderWrapper::ByteLevel(ByteLevelDecoder::default())));
        match parts.bos {
            Some(bos) if parts.add_bos => {
                let text = parts.tokens[bos as usize].clone();
                // Pieces are given one by one so a token with spaces in it stays whole.
                let template = Template::try_from(vec![text.as_str(), "$A"])
                    .and_then(|single| {
                        TemplateProcessing::builder()
                            .single(single)
                            .special_tokens(vec![(text.clone(), bos)])
                            .build()
                            .map_err(|e| e.to_string())
                    })
                    .map_err(|e| Error::Tokenizer(format!("BOS template for `{text}`: {e}")))?;
                inner.with_post_processor(Some(PostProcessorWrapper::Template(template)));
            }
            None if parts.add_bos => {
                tracing::warn!("the GGUF asks for a BOS token but names none; adding nothing");
            }
            _ => {}
        }
        inner.add_special_tokens(&special);
        inner.add_tokens(&user_defined);

        let token_text = |id: Option<u32>| id.map(|id| parts.tokens[id as usize].clone());
        let chat_template = parts
            .chat_template
            .as_deref()
            .map(|source| {
                ChatTemplate::new(source).map(|t| {
                    t.with_bos_token(token_text(parts.bos))
                        .with_eos_token(token_text(parts.eos))
                })
            })
            .transpose()?;
        let mut eos_ids: Vec<u32> = parts.eos.into_iter().chain(parts.eot).collect();
        dedup_in_order(&mut eos_ids);
        // Added tokens take the id of the vocabulary entry spelled like them; a fresh id would
        // mean the GGUF's own ids were not kept.
        if let Some(&id) = inner
            .get_added_tokens_decoder()
            .keys()
            .find(|&&id| id as usize >= vocab_size)
        {
            return Err(Error::Tokenizer(format!(
                "added token id {id} falls outside the GGUF vocabulary of {vocab_size}"
            )));
        }
        let tokenizer = Self::from_parts(inner, vocab_size, eos_ids, parts.bos, chat_template);
        tracing::debug!(
            vocab_size,
            pre = parts.pre.as_deref().unwrap_or("default"),
            special = special.len(),
            "built tokenizer from GGUF metadata"
        );
        Ok(tokenizer)
    }

    fn from_parts(
        inner: tokenizers::Tokenizer,
        vocab_size: usize,
        eos_token_ids: Vec<u32>,
        bos_token_id: Option<u32>,
        chat_template: Option<ChatTemplate>,
    ) -> Self {
        Self {
            inner,
            vocab_size,
            eos_token_ids,
            bos_token_id,
            chat_template,
        }
    }

    /// Replaces the ids that end generation.
    pub fn with_eos_token_ids(mut self, ids: Vec<u32>) -> Result<Self> {
        for &id in &ids {
            self.check_id(id)?;
        }
        self.eos_token_ids = ids;
        Ok(self)
    }

    /// Replaces the chat template.
    pub fn with_chat_template(mut self, template: ChatTemplate) -> Self {
        self.chat_template = Some(template);
        self
    }

    /// Text → ids. `add_special_tokens` applies the tokenizer's post-processor (BOS for models
    /// that want it); special tokens written in `text` are always matched whole.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode_fast(text, add_special_tokens)
            .map_err(|e| Error::Tokenizer(format!("encoding failed: {e}")))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Ids → text. An id outside the vocabulary is [`Error::TokenOutOfRange`].
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        for &id in ids {
            self.check_id(id)?;
        }
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| Error::Tokenizer(format!("decoding failed: {e}")))
    }

    /// Number of ids (one past the largest id).
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// The ids that end generation.
    pub fn eos_token_ids(&self) -> &[u32] {
        &self.eos_token_ids
    }

    /// Whether `id` ends generation.
    pub fn is_eos(&self, id: u32) -> bool {
        self.eos_token_ids.contains(&id)
    }

    /// The beginning-of-sequence id, if the model has one.
    pub fn bos_token_id(&self) -> Option<u32> {
        self.bos_token_id
    }

    /// The id of a token written as it appears in the vocabulary (`<|im_end|>`).
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The vocabulary entry of an id (byte-level spelling for BPE tokens: `Ġthe`).
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The wrapped `tokenizers` tokenizer, for what this type does not expose.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// The model's chat template, if it has one.
    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.chat_template.as_ref()
    }

    /// Renders a conversation with the model's chat template.
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        self.chat_template
            .as_ref()
            .ok_or_else(|| Error::ChatTemplate("the tokenizer has no chat template".into()))?
            .render(messages, add_generation_prompt)
    }

    /// Renders a conversation and encodes it. The template writes its own special tokens, so
    /// none are added on top (transformers' `apply_chat_template(tokenize=True)`).
    pub fn encode_chat(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<Vec<u32>> {
        let prompt = self.apply_chat_template(messages, add_generation_prompt)?;
        self.encode(&prompt, false)
    }

    /// An incremental decoder for streaming generated text; special tokens are left out, as
    /// with `decode(ids, true)`.
    pub fn stream_decoder(&self) -> StreamDecoder<'_> {
        self.stream_decoder_with(true)
    }

    /// An incremental decoder that matches `decode(ids, skip_special_tokens)`.
    pub fn stream_decoder_with(&self, skip_special_tokens: bool) -> StreamDecoder<'_> {
        StreamDecoder {
            tokenizer: self,
            skip_special_tokens,
            ids: Vec::new(),
            read_offset: 0,
        }
    }

    fn check_id(&self, id: u32) -> Result<()> {
        if (id as usize) < self.vocab_size {
            Ok(())
        } else {
            Err(Error::TokenOutOfRange {
                token: id,
                vocab_size: self.vocab_size,
            })
        }
    }
}

/// Turns generated ids into text as they arrive.
///
/// A byte-level token can end in the middle of a UTF-8 character (an emoji is often three or
/// four tokens), and some decoders change a token's text depending on what precedes it
/// (SentencePiece's leading space). So each step decodes a short window of recent ids and
/// returns only the text that grew past what was already returned, and only once it ends in a
/// complete character. Concatenating every chunk, then [`flush`](Self::flush), gives exactly
/// `decode(all_ids)`.
#[derive(Debug)]
pub struct StreamDecoder<'a> {
    tokenizer: &'a Tokenizer,
    skip_special_tokens: bool,
    /// The tokens of the last returned chunk (decoded again only as context), then the tokens
    /// not returned yet.
    ids: Vec<u32>,
    /// How many of `ids` are context.
    read_offset: usize,
}

impl StreamDecoder<'_> {
    /// Adds one id; returns the text it completes, or `None` while a character is still
    /// incomplete (or the token has no text, like a skipped special token).
    pub fn push(&mut self, id: u32) -> Result<Option<String>> {
        self.tokenizer.check_id(id)?;
        self.ids.push(id);
        let prefix = self.decode(&self.ids[..self.read_offset])?;
        let text = self.decode(&self.ids)?;
        // U+FFFD at the end means the last token stopped inside a character.
        if text.len() <= prefix.len()
            || text.ends_with(char::REPLACEMENT_CHARACTER)
            || !text.is_char_boundary(prefix.len())
        {
            return Ok(None);
        }
        let chunk = text[prefix.len()..].to_string();
        // The tokens just read become the next step's context; older ones are no longer needed.
        self.ids.drain(..self.read_offset);
        self.read_offset = self.ids.len();
        Ok(Some(chunk))
    }

    /// Returns what is left undecoded (a character cut off at the end comes out as U+FFFD,
    /// as in `decode`), and resets the decoder.
    pub fn flush(&mut self) -> Result<Option<String>> {
        let prefix = self.decode(&self.ids[..self.read_offset])?;
        let text = self.decode(&self.ids)?;
        self.reset();
        Ok(
            (text.len() > prefix.len() && text.is_char_boundary(prefix.len()))
                .then(|| text[prefix.len()..].to_string()),
        )
    }

    /// Forgets everything pushed so far.
    pub fn reset(&mut self) {
        self.ids.clear();
        self.read_offset = 0;
    }

    fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer
            .inner
            .decode(ids, self.skip_special_tokens)
            .map_err(|e| Error::Tokenizer(format!("decoding failed: {e}")))
    }
}

/// The normalizer and pre-tokenizer Hugging Face uses for the models llama.cpp labels with
/// `tokenizer.ggml.pre`.
fn pre_tokenizer_for(
    pre: Option<&str>,
) -> Result<(Option<NormalizerWrapper>, PreTokenizerWrapper)> {
    let byte_level =
        |use_regex: bool| PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, use_regex));
    let split = |regex: &str| -> Result<PreTokenizerWrapper> {
        let split = Split::new(
            SplitPattern::Regex(regex.to_string()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| Error::Tokenizer(format!("pre-tokenizer regex: {e}")))?;
        Ok(PreTokenizerWrapper::Split(split))
    };
    let sequence =
        |steps: Vec<PreTokenizerWrapper>| PreTokenizerWrapper::Sequence(Sequence::new(steps));
    Ok(match pre.unwrap_or("default") {
        // StarCoder-family vocabularies (SmolLM, SmolLM2...) were trained on single digits:
        // HF's tokenizer.json runs Digits(individual_digits) before GPT-2's ByteLevel regex,
        // and llama.cpp splits every \p{N} before the GPT-2 regex.
        "smollm" | "starcoder" | "refact" | "codeshell" => (
            None,
            sequence(vec![
                PreTokenizerWrapper::Digits(Digits::new(true)),
                byte_level(true),
            ]),
        ),
        "default" | "gpt-2" | "gpt2" => (None, byte_level(true)),
        "llama3" | "llama-bpe" | "llama-v3" | "falcon3" | "smaug-bpe" => (
            None,
            sequence(vec![split(LLAMA3_SPLIT)?, byte_level(false)]),
        ),
        "qwen2" | "deepseek-r1-qwen" => (
            Some(NormalizerWrapper::NFC(NFC)),
            sequence(vec![split(QWEN2_SPLIT)?, byte_level(false)]),
        ),
        other => {
            return Err(Error::Tokenizer(format!(
                "unsupported GGUF pre-tokenizer `{other}`; load the model's tokenizer.json \
                 with Tokenizer::from_hf_dir instead"
            )));
        }
    })
}

/// GPT-2's byte → printable character table (the byte-level BPE alphabet).
static BYTE_TO_CHAR: std::sync::LazyLock<[char; 256]> = std::sync::LazyLock::new(|| {
    // Printable Latin-1 bytes stand for themselves; the others are moved to U+0100 onwards.
    let mut table = ['\0'; 256];
    let mut next = 256u32;
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        table[b as usize] = if printable {
            char::from(b)
        } else {
            let c = char::from_u32(next).expect("U+0100..U+0143 are valid");
            next += 1;
            c
        };
    }
    table
});

fn byte_level_alphabet() -> HashMap<char, u8> {
    BYTE_TO_CHAR
        .iter()
        .enumerate()
        .map(|(b, &c)| (c, b as u8))
        .collect()
}

fn dedup_in_order(ids: &mut Vec<u32>) {
    let mut seen = std::collections::HashSet::new();
    ids.retain(|id| seen.insert(*id));
}

fn read_json_if_exists(path: &Path) -> Result<Option<serde_json::Value>> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(path, e)),
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| Error::Json {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
}

/// A special token in tokenizer_config.json: a string, or a serialized `AddedToken` object.
fn added_token_text(value: &serde_json::Value) -> Option<String> {
    match value {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

fn json_u32(value: &serde_json::Value) -> Option<u32> {
    value.as_u64().and_then(|v| u32::try_from(v).ok())
}

/// The chat template of a HF model directory: `chat_template.jinja`, else
/// `tokenizer_config.json`'s `chat_template` (a string, or a list of named templates of which
/// `default` is used), else `chat_template.json`.
fn chat_template_source(dir: &Path, config: Option<&serde_json::Value>) -> Result<Option<String>> {
    let jinja = dir.join("chat_template.jinja");
    match std::fs::read_to_string(&jinja) {
        Ok(source) => return Ok(Some(source)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io(&jinja, e)),
    }
    let from_value = |value: &serde_json::Value| -> Option<String> {
        match value {
            serde_json::Value::String(s) => Some(s.clone()),
            serde_json::Value::Array(named) => {
                let template_of = |entry: &serde_json::Value| {
                    entry
                        .get("template")
                        .and_then(|t| t.as_str())
                        .map(str::to_string)
                };
                named
                    .iter()
                    .find(|entry| entry.get("name").and_then(|n| n.as_str()) == Some("default"))
                    .and_then(template_of)
                    .or_else(|| named.first().and_then(template_of))
            }
            _ => None,
        }
    };
    if let Some(source) = config
        .and_then(|c| c.get("chat_template"))
        .and_then(from_value)
    {
        return Ok(Some(source));
    }
    Ok(read_json_if_exists(&dir.join("chat_template.json"))?
        .as_ref()
        .and_then(|c| c.get("chat_template"))
        .and_then(from_value))
}

/// Reads the `tokenizer.*` metadata of a GGUF file.
fn gguf_parts(gguf: &crate::io::gguf::GgufFile) -> Result<GgufTokenizerParts> {
    use crate::io::gguf::MetadataValue;

    let require = |key: &str| {
        gguf.metadata(key)
            .ok_or_else(|| Error::MissingMetadata(key.to_string()))
    };
    let wrong_type = |key: &str, expected: &str| {
        Error::Tokenizer(format!("GGUF metadata `{key}` is not {expected}"))
    };
    let string = |key: &str| -> Result<Option<String>> {
        gguf.metadata(key)
            .map(|v| {
                v.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| wrong_type(key, "a string"))
            })
            .transpose()
    };
    let strings = |key: &str, required: bool| -> Result<Vec<String>> {
        let value = match gguf.metadata(key) {
            Some(value) => value,
            None if required => return Err(Error::MissingMetadata(key.to_string())),
            None => return Ok(Vec::new()),
        };
        value
            .as_array()
            .ok_or_else(|| wrong_type(key, "an array"))?
            .iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| wrong_type(key, "an array of strings"))
            })
            .collect()
    };
    let id = |key: &str| -> Result<Option<u32>> {
        gguf.metadata(key)
            .map(|v| {
                v.as_u64()
                    .and_then(|v| u32::try_from(v).ok())
                    .ok_or_else(|| wrong_type(key, "a token id"))
            })
            .transpose()
    };
    let integer = |v: &MetadataValue| -> Option<i32> {
        match *v {
            MetadataValue::I8(x) => Some(x.into()),
            MetadataValue::U8(x) => Some(x.into()),
            MetadataValue::I16(x) => Some(x.into()),
            MetadataValue::U16(x) => Some(x.into()),
            MetadataValue::I32(x) => Some(x),
            MetadataValue::U32(x) => i32::try_from(x).ok(),
            MetadataValue::I64(x) => i32::try_from(x).ok(),
            MetadataValue::U64(x) => i32::try_from(x).ok(),
            _ => None,
        }
    };

    let model = require("tokenizer.ggml.model")?
        .as_str()
        .ok_or_else(|| wrong_type("tokenizer.ggml.model", "a string"))?
        .to_string();
    if model != "gpt2" {
        // Fail before copying a vocabulary that cannot be used.
        return Err(Error::Tokenizer(format!(
            "unsupported GGUF tokenizer model `{model}`: only byte-level BPE (`gpt2`) is supported; \
             load the model's tokenizer.json with Tokenizer::from_hf_dir instead"
        )));
    }
    let token_types = match gguf.metadata("tokenizer.ggml.token_type") {
        None => Vec::new(),
        Some(value) => value
            .as_array()
            .ok_or_else(|| wrong_type("tokenizer.ggml.token_type", "an array"))?
            .iter()
            .map(|v| integer(v).ok_or_else(|| wrong_type("tokenizer.ggml.token_type", "integers")))
            .collect::<Result<_>>()?,
    };
    Ok(GgufTokenizerParts {
        model,
        pre: string("tokenizer.ggml.pre")?,
        tokens: strings("tokenizer.ggml.tokens", true)?,
        token_types,
        merges: strings("tokenizer.ggml.merges", true)?,
        bos: id("tokenizer.ggml.bos_token_id")?,
        eos: id("tokenizer.ggml.eos_token_id")?,
        eot: id("tokenizer.ggml.eot_token_id")?,
        unk: id("tokenizer.ggml.unknown_token_id")?,
        pad: id("tokenizer.ggml.padding_token_id")?,
        add_bos: gguf
            .metadata("tokenizer.ggml.add_bos_token")
            .and_then(|v| v.as_bool())
            .unwrap_or(false),
        chat_template: string("tokenizer.chat_template")?,
    })
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::sync::OnceLock;

    use serde_json::json;

    use super::*;

    const ENDOFTEXT: u32 = 0;
    const IM_START: u32 = 1;
    const IM_END: u32 = 2;
    const THINK: u32 = 3;
    /// Id of the first byte token in [`tiny_parts`].
    const BYTES: u32 = 4;

    /// A byte-level vocabulary: three control tokens, one user-defined token, the 256 byte
    /// symbols, then a few merged tokens.
    fn tiny_parts() -> GgufTokenizerParts {
        let mut tokens: Vec<String> = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>"]
            .map(String::from)
            .to_vec();
        let mut token_types = vec![3, 3, 3, 4];
        tokens.extend(BYTE_TO_CHAR.iter().map(|c| c.to_string()));
        token_types.extend([1; 256]);
        let merges = ["h e", "l l", "he ll", "hell o", "Ġ t", "Ġt he", "Ã ©"];
        for merge in merges {
            tokens.push(merge.replace(' ', ""));
            token_types.push(1);
        }
        GgufTokenizerParts {
            model: "gpt2".into(),
            pre: Some("smollm".into()),
            tokens,
            token_types,
            merges: merges.map(String::from).to_vec(),
            bos: Some(IM_START),
            eos: Some(IM_END),
            unk: Some(ENDOFTEXT),
            pad: Some(IM_END),
            chat_template: Some(
                "{% for m in messages %}{{ '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>\n' }}{% endfor %}\
                 {% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
                    .into(),
            ),
            ..Default::default()
        }
    }

    fn tiny() -> Tokenizer {
        Tokenizer::from_gguf_parts(tiny_parts()).unwrap()
    }

    fn byte_id(b: u8) -> u32 {
        BYTES + b as u32
    }

    fn id_of(tokenizer: &Tokenizer, token: &str) -> u32 {
        tokenizer.token_to_id(token).unwrap()
    }

    /// Pushes every id through a stream decoder and concatenates the chunks.
    fn stream(tokenizer: &Tokenizer, ids: &[u32], skip_special: bool) -> (String, usize) {
        let mut decoder = tokenizer.stream_decoder_with(skip_special);
        let mut out = String::new();
        let mut pending = 0;
        for &id in ids {
            match decoder.push(id).unwrap() {
                Some(chunk) => {
                    assert!(
                        !chunk.contains(char::REPLACEMENT_CHARACTER),
                        "chunk {chunk:?}"
                    );
                    out.push_str(&chunk);
                }
                None => pending += 1,
            }
        }
        if let Some(rest) = decoder.flush().unwrap() {
            out.push_str(&rest);
        }
        (out, pending)
    }

    #[test]
    fn gguf_parts_build_a_byte_level_bpe() {
        let tok = tiny();
        assert_eq!(tok.vocab_size(), 4 + 256 + 7);
        assert_eq!(tok.eos_token_ids(), &[IM_END]);
        assert_eq!(tok.bos_token_id(), Some(IM_START));
        let ids = tok.encode("hello the", false).unwrap();
        assert_eq!(ids, vec![id_of(&tok, "hello"), id_of(&tok, "Ġthe")]);
        assert_eq!(tok.decode(&ids, false).unwrap(), "hello the");
        // Digits are split one by one, and the space before them stays on its own.
        let ids = tok.encode("x  12", false).unwrap();
        let expected: Vec<u32> = vec![
            byte_id(b'x'),
            byte_id(b' '),
            byte_id(b' '),
            byte_id(b'1'),
            byte_id(b'2'),
        ];
        assert_eq!(ids, expected);
    }

    #[test]
    fn special_and_user_defined_tokens_are_matched_whole() {
        let tok = tiny();
        let ids = tok
            .encode("<|im_start|>hello<think><|im_end|>", false)
            .unwrap();
        assert_eq!(ids, vec![IM_START, id_of(&tok, "hello"), THINK, IM_END]);
        assert_eq!(
            tok.decode(&ids, false).unwrap(),
            "<|im_start|>hello<think><|im_end|>"
        );
        // User-defined tokens are not special, so skipping special tokens keeps them.
        assert_eq!(tok.decode(&ids, true).unwrap(), "hello<think>");
    }

    #[test]
    fn add_bos_prepends_bos_only_with_special_tokens() {
        let tok = Tokenizer::from_gguf_parts(GgufTokenizerParts {
            add_bos: true,
            ..tiny_parts()
        })
        .unwrap();
        let hello = id_of(&tok, "hello");
        assert_eq!(tok.encode("hello", true).unwrap(), vec![IM_START, hello]);
        assert_eq!(tok.encode("hello", false).unwrap(), vec![hello]);
        assert_eq!(tiny().encode("hello", true).unwrap(), vec![hello]);
    }

    #[test]
    fn unsupported_or_malformed_gguf_tokenizers_are_errors() {
        let unsupported = |parts: GgufTokenizerParts| match Tokenizer::from_gguf_parts(parts) {
            Err(Error::Tokenizer(message)) => message,
            other => panic!("expected Error::Tokenizer, got {other:?}"),
        };
        let message = unsupported(GgufTokenizerParts {
            model: "llama".into(),
            ..tiny_parts()
        });
        assert!(
            message.contains("unsupported") && message.contains("llama"),
            "{message}"
        );
        let message = unsupported(GgufTokenizerParts {
            pre: Some("mystery".into()),
            ..tiny_parts()
        });
        assert!(message.contains("mystery"), "{message}");
        let mut parts = tiny_parts();
        parts.merges.push("nospace".into());
        assert!(unsupported(parts).contains("nospace"));
        let mut parts = tiny_parts();
        parts.token_types.pop();
        unsupported(parts);
        unsupported(GgufTokenizerParts {
            eos: Some(100_000),
            ..tiny_parts()
        });
        unsupported(GgufTokenizerParts {
            tokens: Vec::new(),
            token_types: Vec::new(),
            ..tiny_parts()
        });
    }

    #[test]
    fn other_pre_tokenizers_build() {
        for pre in [None, Some("gpt2"), Some("llama-bpe"), Some("qwen2")] {
            let tok = Tokenizer::from_gguf_parts(GgufTokenizerParts {
                pre: pre.map(String::from),
                ..tiny_parts()
            })
            .unwrap();
            assert_eq!(
                tok.decode(&tok.encode("hello 123", false).unwrap(), false)
                    .unwrap(),
                "hello 123"
            );
        }
    }

    #[test]
    fn byte_level_alphabet_is_gpt2s() {
        assert_eq!(BYTE_TO_CHAR[b' ' as usize], 'Ġ');
        assert_eq!(BYTE_TO_CHAR[b'\n' as usize], 'Ċ');
        assert_eq!(BYTE_TO_CHAR[b'a' as usize], 'a');
        assert_eq!(BYTE_TO_CHAR[0xC3], 'Ã');
        assert_eq!(byte_level_alphabet().len(), 256);
    }

    #[test]
    fn raw_spelled_tokens_are_respelled_into_the_byte_alphabet() {
        let mut parts = tiny_parts();
        // A converter that wrote " x" with a real space instead of "Ġx".
        parts.tokens.push(" x".into());
        parts.token_types.push(1);
        parts.merges.push("Ġ x".into());
        let id = parts.tokens.len() as u32 - 1;
        let tok = Tokenizer::from_gguf_parts(parts).unwrap();
        assert_eq!(tok.encode(" x", false).unwrap(), vec![id]);
        assert_eq!(tok.decode(&[id], false).unwrap(), " x");
    }

    #[test]
    fn tokenizer_can_be_shared_between_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Tokenizer>();
        assert_send_sync::<ChatTemplate>();
    }

    #[test]
    fn decode_rejects_out_of_range_ids() {
        let tok = tiny();
        let n = tok.vocab_size() as u32;
        match tok.decode(&[IM_START, n], false) {
            Err(Error::TokenOutOfRange { token, vocab_size }) => {
                assert_eq!((token, vocab_size), (n, n as usize));
            }
            other => panic!("expected TokenOutOfRange, got {other:?}"),
        }
        assert!(matches!(
            tok.stream_decoder().push(u32::MAX),
            Err(Error::TokenOutOfRange { .. })
        ));
        assert!(tok.is_eos(IM_END) && !tok.is_eos(IM_START));
    }

    #[test]
    fn stream_decoder_waits_for_complete_characters() {
        let tok = tiny();
        // "é" is one merged token; the robot emoji and CJK are several byte tokens each.
        let text = "hello é 🤖 the 日本";
        let ids = tok.encode(text, false).unwrap();
        let (streamed, pending) = stream(&tok, &ids, false);
        assert_eq!(streamed, text);
        assert_eq!(streamed, tok.decode(&ids, false).unwrap());
        assert!(
            pending >= 3 + 2 + 2,
            "multi-byte characters must be held back ({pending})"
        );
    }

    #[test]
    fn stream_decoder_skips_special_tokens_like_decode() {
        let tok = tiny();
        let ids = tok
            .encode("<|im_start|>hello<|im_end|>🤖<think>", false)
            .unwrap();
        for skip in [true, false] {
            assert_eq!(stream(&tok, &ids, skip).0, tok.decode(&ids, skip).unwrap());
        }
    }

    #[test]
    fn stream_decoder_flushes_a_cut_off_character() {
        let tok = tiny();
        let robot = "🤖".as_bytes();
        let ids = vec![id_of(&tok, "hello"), byte_id(robot[0]), byte_id(robot[1])];
        let mut decoder = tok.stream_decoder();
        assert_eq!(decoder.push(ids[0]).unwrap().as_deref(), Some("hello"));
        assert_eq!(decoder.push(ids[1]).unwrap(), None);
        assert_eq!(decoder.push(ids[2]).unwrap(), None);
        let rest = decoder.flush().unwrap().unwrap();
        assert_eq!(format!("hello{rest}"), tok.decode(&ids, true).unwrap());
        // After a flush the decoder starts over.
        assert_eq!(decoder.push(ids[0]).unwrap().as_deref(), Some("hello"));
        assert_eq!(decoder.flush().unwrap(), None);
    }

    #[test]
    fn chat_template_from_gguf_parts() {
        let tok = tiny();
        let messages = [ChatMessage::system("s"), ChatMessage::user("hello")];
        let prompt = tok.apply_chat_template(&messages, true).unwrap();
        assert_eq!(
            prompt,
            "<|im_start|>system\ns<|im_end|>\n<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
        );
        let ids = tok.encode_chat(&messages, true).unwrap();
        assert_eq!(ids, tok.encode(&prompt, false).unwrap());
        assert_eq!(ids[0], IM_START);
        assert_eq!(tok.chat_template().unwrap().eos_token(), Some("<|im_end|>"));

        let without = Tokenizer::from_gguf_parts(GgufTokenizerParts {
            chat_template: None,
            ..tiny_parts()
        })
        .unwrap();
        assert!(matches!(
            without.apply_chat_template(&messages, true),
            Err(Error::ChatTemplate(_))
        ));
    }

    #[test]
    fn template_exceptions_surface_as_chat_template_errors() {
        let tok = tiny().with_chat_template(
            ChatTemplate::new(
                "{{ raise_exception('Only user and assistant roles are supported!') }}",
            )
            .unwrap(),
        );
        match tok.encode_chat(&[ChatMessage::user("x")], true) {
            Err(Error::ChatTemplate(message)) => {
                assert!(
                    message.contains("Only user and assistant roles are supported!"),
                    "{message}"
                )
            }
            other => panic!("expected ChatTemplate error, got {other:?}"),
        }
    }

    /// A directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> Self {
            let dir = std::env::temp_dir()
                .join(format!("redrafter-tokenizer-{}-{name}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }

        fn write(&self, file: &str, value: &serde_json::Value) {
            std::fs::write(self.0.join(file), value.to_string()).unwrap();
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A small byte-level BPE tokenizer.json written by hand, with BOS added by its
    /// post-processor as Llama's files do.
    fn handmade_tokenizer_json() -> serde_json::Value {
        json!({
            "version": "1.0",
            "added_tokens": [
                {"id": 0, "content": "<s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
                {"id": 1, "content": "</s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
                {"id": 2, "content": "<|eot|>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}
            ],
            "normalizer": null,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
            "post_processor": {
                "type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {"<s>": {"id": "<s>", "ids": [0], "tokens": ["<s>"]}}
            },
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {
                "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                "vocab": {"<s>": 0, "</s>": 1, "<|eot|>": 2, "h": 3, "i": 4, "Ġ": 5, "y": 6, "o": 7, "u": 8,
                          "hi": 9, "Ġy": 10, "ou": 11, "Ġyou": 12, "!": 13, "Ċ": 14, ":": 15},
                "merges": ["h i", "Ġ y", "o u", "Ġy ou"]
            }
        })
    }

    #[test]
    fn from_hf_dir_reads_config_generation_config_and_template() {
        let dir = TempDir::new("hf");
        dir.write("tokenizer.json", &handmade_tokenizer_json());
        dir.write(
            "tokenizer_config.json",
            &json!({
                "bos_token": "<s>",
                "eos_token": {"__type": "AddedToken", "content": "</s>", "special": true},
                "chat_template": "{{ bos_token }}{% for m in messages %}{{ m.content + eos_token }}{% endfor %}{% if add_generation_prompt %}{{ 'hi:' }}{% endif %}"
            }),
        );
        dir.write("generation_config.json", &json!({"eos_token_id": [1, 2]}));

        let tok = Tokenizer::from_hf_dir(&dir.0).unwrap();
        assert_eq!(tok.vocab_size(), 16);
        assert_eq!(tok.bos_token_id(), Some(0));
        assert_eq!(tok.eos_token_ids(), &[1, 2]);
        assert_eq!(tok.encode("hi you!", true).unwrap(), vec![0, 9, 12, 13]);
        assert_eq!(tok.encode("hi you!", false).unwrap(), vec![9, 12, 13]);
        assert_eq!(tok.decode(&[0, 9, 12, 13, 1], true).unwrap(), "hi you!");

        let messages = [ChatMessage::user("hi")];
        let prompt = tok.apply_chat_template(&messages, true).unwrap();
        assert_eq!(prompt, "<s>hi</s>hi:");
        // The template wrote <s> already; encode_chat must not add a second one.
        assert_eq!(
            tok.encode_chat(&messages, true).unwrap(),
            vec![0, 9, 1, 9, 15]
        );
    }

    #[test]
    fn from_hf_dir_without_config_and_with_bad_config() {
        let dir = TempDir::new("bare");
        dir.write("tokenizer.json", &handmade_tokenizer_json());
        let tok = Tokenizer::from_hf_dir(&dir.0).unwrap();
        assert!(tok.eos_token_ids().is_empty());
        assert!(tok.chat_template().is_none());
        assert_eq!(
            Tokenizer::from_file(dir.0.join("tokenizer.json"))
                .unwrap()
                .vocab_size(),
            16
        );

        // A template in chat_template.jinja, as recent transformers saves it.
        std::fs::write(
            dir.0.join("chat_template.jinja"),
            "{{ messages[0].content }}",
        )
        .unwrap();
        let tok = Tokenizer::from_hf_dir(&dir.0).unwrap();
        assert_eq!(
            tok.apply_chat_template(&[ChatMessage::user("x")], false)
                .unwrap(),
            "x"
        );

        dir.write("tokenizer_config.json", &json!({"eos_token": "<missing>"}));
        assert!(matches!(
            Tokenizer::from_hf_dir(&dir.0),
            Err(Error::Tokenizer(_))
        ));
        std::fs::write(dir.0.join("tokenizer_config.json"), "{not json").unwrap();
        assert!(matches!(
            Tokenizer::from_hf_dir(&dir.0),
            Err(Error::Json { .. })
        ));
        assert!(matches!(
            Tokenizer::from_hf_dir(dir.0.join("nowhere")),
            Err(Error::Io { .. })
        ));
        std::fs::write(dir.0.join("tokenizer.json"), "{}").unwrap();
        assert!(matches!(
            Tokenizer::from_file(dir.0.join("tokenizer.json")),
            Err(Error::Tokenizer(_))
        ));
    }

    // ---- SmolLM2-135M-Instruct, against ids from transformers (scripts/make_tokenizer_fixtures.py)

    fn smollm2() -> &'static Tokenizer {
        static TOKENIZER: OnceLock<Tokenizer> = OnceLock::new();
        TOKENIZER.get_or_init(|| {
            let path =
                crate::hub::smollm2_instruct_gguf().expect("SmolLM2 GGUF (downloaded with pip)");
            let gguf = crate::io::gguf::GgufFile::open(&path).expect("open GGUF");
            Tokenizer::from_gguf(&gguf).expect("tokenizer from GGUF")
        })
    }

    fn fixture() -> serde_json::Value {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizer_cases.json");
        serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
    }

    fn ids(value: &serde_json::Value) -> Vec<u32> {
        value
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect()
    }

    #[test]
    fn smollm2_special_tokens() {
        let tok = smollm2();
        assert_eq!(tok.vocab_size(), 49152);
        assert_eq!(tok.eos_token_ids(), &[2]);
        assert_eq!(tok.bos_token_id(), Some(1));
        assert_eq!(tok.token_to_id("<|im_end|>"), Some(2));
        assert_eq!(
            tok.vocab_size(),
            fixture()["vocab_size"].as_u64().unwrap() as usize
        );
    }

    #[test]
    fn smollm2_encode_matches_transformers() {
        let tok = smollm2();
        let cases = fixture()["cases"].as_array().unwrap().clone();
        assert!(cases.len() >= 30);
        for case in &cases {
            let text = case["text"].as_str().unwrap();
            let expected = ids(&case["ids"]);
            assert_eq!(
                tok.encode(text, false).unwrap(),
                expected,
                "encode({text:?})"
            );
            // SmolLM2 adds no BOS.
            assert_eq!(
                tok.encode(text, true).unwrap(),
                expected,
                "encode({text:?}, special)"
            );
            assert_eq!(
                tok.decode(&expected, false).unwrap(),
                case["decoded"].as_str().unwrap()
            );
            assert_eq!(tok.decode(&expected, false).unwrap(), text, "round trip");
            assert_eq!(
                tok.decode(&expected, true).unwrap(),
                case["decoded_skip_special"].as_str().unwrap()
            );
        }
    }

    #[test]
    fn smollm2_stream_decoding_matches_decode() {
        let tok = smollm2();
        let mut held_back = 0;
        for case in fixture()["cases"].as_array().unwrap() {
            let ids = ids(&case["ids"]);
            for skip in [false, true] {
                let (streamed, pending) = stream(tok, &ids, skip);
                assert_eq!(
                    streamed,
                    tok.decode(&ids, skip).unwrap(),
                    "{:?}",
                    case["text"]
                );
                held_back += pending;
            }
        }
        // Emoji and CJK split across byte-level tokens must have been held back somewhere.
        assert!(held_back > 0);
    }

    #[test]
    fn smollm2_chat_template_matches_transformers() {
        let tok = smollm2();
        for chat in fixture()["chats"].as_array().unwrap() {
            let messages: Vec<ChatMessage> =
                serde_json::from_value(chat["messages"].clone()).unwrap();
            let add = chat["add_generation_prompt"].as_bool().unwrap();
            assert_eq!(
                tok.apply_chat_template(&messages, add).unwrap(),
                chat["prompt"].as_str().unwrap()
            );
            assert_eq!(tok.encode_chat(&messages, add).unwrap(), ids(&chat["ids"]));
        }
    }
}
