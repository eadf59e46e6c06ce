#!/usr/bin/env python3
"""Writes tests/fixtures/tokenizer_cases.json: reference token ids for the Rust tokenizer tests.

The reference is SmolLM2-135M-Instruct's Hugging Face tokenizer, rebuilt from the vocabulary,
merges and chat template stored in the GGUF (the vocabulary itself is not committed; the Rust
tests read it from the same GGUF):

* model: byte-level BPE (no dropout, no unk token, ignore_merges false, byte_fallback false);
* normalizer: none;
* pre-tokenizer: Sequence[Digits(individual_digits=True),
  ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)] -- the one in HF's
  tokenizer.json for SmolLM2, and what llama.cpp's "smollm" pre-type does (split every \\p{N},
  then the GPT-2 regex);
* decoder: ByteLevel; control tokens (GGUF token_type 3) are special added tokens.

Ids come from the `tokenizers` library; chat prompts are rendered by transformers'
`apply_chat_template` on a `PreTrainedTokenizerFast` wrapping that tokenizer.

transformers' own GGUF conversion (`gguf_file=`) is not used as the reference: it does not know
the "smollm" pre-type and falls back to plain GPT-2 ByteLevel, which splits whitespace before
digits differently (e.g. "x  123"). The script reports the cases where the two disagree.

Usage: python scripts/make_tokenizer_fixtures.py [path/to/SmolLM2-135M-Instruct.Q4_1.gguf]
Needs: pip install gguf transformers (torch is not needed).
"""

import json
import os
import re
import sys
from pathlib import Path

import gguf
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "tokenizer_cases.json"
DEFAULT_GGUF = Path(os.environ.get("REDRAFTER_CACHE", Path.home() / ".cache" / "redrafter")) / (
    "SmolLM2-135M-Instruct.Q4_1.gguf"
)

CONTROL = 3
USER_DEFINED = 4

TEXTS = [
    "",
    "Hello world",
    "Hello, world! How are you today?",
    "I'm sure they'll say it's fine, don't you think? We've seen it.",
    "   leading spaces",
    "trailing spaces   ",
    "multiple     internal    spaces",
    " ",
    "   ",
    "\t",
    "tabs\tand\nnewlines\r\nmixed\n\n\n",
    "line one\n\n  indented line\n\t\ttabbed",
    "12345",
    "3.14159 and 1,000,000 and 2024-01-31",
    "x  123 y   4567",
    "123456789012345678901234567890",
    "Phone: +1 (555) 010-9999, room 42B",
    "Café naïve résumé façade Ångström",
    "Ünïcödé ƒ ∑ ∫ √ π ≈ ∞",
    "日本語のテキストとカタカナ ー",
    "你好，世界！这是一个测试。",
    "한국어 텍스트입니다",
    "Ελληνικά και Русский язык",
    "مرحبا بالعالم",
    "Emoji: 😀👍🏽🇺🇸 ❤️ and 🤖🦀",
    "a\u00a0b\u200bc\u3000d",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    'fn main() {\n    println!("{}", 1 << 20);\n}\n',
    "<html><body class=\"x\">&amp; &lt;tag&gt;</body></html>",
    "<|im_start|>user\nHi there<|im_end|>\n",
    "text<|endoftext|>more text",
    "<|im_start|><|im_end|><|im_start|>",
    "<|im_start no closing bar <|im_end",
    "<repo_name>redrafter<file_sep>src/lib.rs",
    "The quick brown fox jumps over the lazy dog. " * 3,
]

CHATS = [
    {"messages": [{"role": "user", "content": "What is the capital of France?"}], "add_generation_prompt": True},
    {
        "messages": [
            {"role": "system", "content": "You are a concise assistant."},
            {"role": "user", "content": "Explain speculative decoding in one sentence."},
        ],
        "add_generation_prompt": True,
    },
    {
        "messages": [
            {"role": "system", "content": "Answer in French."},
            {"role": "user", "content": "Hi! 😀"},
            {"role": "assistant", "content": "Bonjour !"},
            {"role": "user", "content": "Combien font 12 × 34 ?"},
        ],
        "add_generation_prompt": True,
    },
    {
        "messages": [
            {"role": "user", "content": "Write a haiku about\ttabs and   spaces."},
            {"role": "assistant", "content": "Tabs and spaces fight"},
        ],
        "add_generation_prompt": False,
    },
]


def field(reader, key):
    f = reader.fields.get(key)
    return None if f is None else f.contents()


def build_reference(reader):
    tokens = field(reader, "tokenizer.ggml.tokens")
    token_types = field(reader, "tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ", 1)) for m in field(reader, "tokenizer.ggml.merges")]
    assert field(reader, "tokenizer.ggml.model") == "gpt2"
    assert field(reader, "tokenizer.ggml.pre") == "smollm"
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(
        [AddedToken(t, normalized=False, special=True) for t, ty in zip(tokens, token_types) if ty == CONTROL]
    )
    tok.add_tokens(
        [AddedToken(t, normalized=False, special=False) for t, ty in zip(tokens, token_types) if ty == USER_DEFINED]
    )

    def token(key):
        i = field(reader, f"tokenizer.ggml.{key}")
        return None if i is None else tokens[i]

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=token("bos_token_id"),
        eos_token=token("eos_token_id"),
        unk_token=token("unknown_token_id"),
        pad_token=token("padding_token_id"),
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = field(reader, "tokenizer.chat_template")
    return tok, fast


def transformers_gguf_tokenizer(reader):
    """transformers' GGUF conversion, for the disagreement report only."""
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer
    except Exception as e:  # layout differs between transformers versions
        print(f"note: transformers' GGUF tokenizer conversion unavailable ({e})", file=sys.stderr)
        return None
    d = {
        "tokenizer_type": field(reader, "tokenizer.ggml.model"),
        "pre_tokenizer_type": field(reader, "tokenizer.ggml.pre"),
        "tokens": field(reader, "tokenizer.ggml.tokens"),
        "token_type": field(reader, "tokenizer.ggml.token_type"),
        "merges": field(reader, "tokenizer.ggml.merges"),
    }
    backend, _ = convert_gguf_tokenizer("llama", d)
    return backend


def main():
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_GGUF
    reader = gguf.GGUFReader(str(path))
    tok, fast = build_reference(reader)
    other = transformers_gguf_tokenizer(reader)

    cases = []
    disagreements = []
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False).ids
        assert fast(text, add_special_tokens=True)["input_ids"] == ids, "SmolLM2 adds no BOS"
        cases.append(
            {
                "text": text,
                "ids": ids,
                "decoded": tok.decode(ids, skip_special_tokens=False),
                "decoded_skip_special": tok.decode(ids, skip_special_tokens=True),
            }
        )
        if other is not None and other.encode(text, add_special_tokens=False).ids != ids:
            disagreements.append(text)

    chats = []
    for chat in CHATS:
        prompt = fast.apply_chat_template(
            chat["messages"], tokenize=False, add_generation_prompt=chat["add_generation_prompt"]
        )
        ids = fast.apply_chat_template(
            chat["messages"], tokenize=True, add_generation_prompt=chat["add_generation_prompt"]
        )
        if isinstance(ids, dict) or hasattr(ids, "keys"):  # transformers 5 returns a BatchEncoding
            ids = ids["input_ids"]
        chats.append({**chat, "prompt": prompt, "ids": list(ids)})

    fixture = {
        "generator": "scripts/make_tokenizer_fixtures.py",
        "model": path.name,
        "vocab_size": tok.get_vocab_size(with_added_tokens=True),
        "cases": cases,
        "chats": chats,
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(fixture, ensure_ascii=False, indent=1)
    # One line per id list keeps the fixture readable and its diffs small.
    text = re.sub(r"\[[\d,\s]*\]", lambda m: "[" + ", ".join(m.group(0)[1:-1].split()).replace(",,", ",") + "]", text)
    OUT.write_text(text + "\n", encoding="utf-8")
    print(f"wrote {len(cases)} cases and {len(chats)} chats to {OUT.relative_to(ROOT)}")
    if disagreements:
        print("transformers' gguf_file= tokenizer disagrees on:", file=sys.stderr)
        for t in disagreements:
            print(f"  {t!r}", file=sys.stderr)


if __name__ == "__main__":
    main()
