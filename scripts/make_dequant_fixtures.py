#!/usr/bin/env python3
"""Writes the reference fixtures for the Rust dequantisation and GGUF tests.

The expected values come from gguf-py (the `gguf` package of llama.cpp), an implementation
independent of ours, so the Rust tests check our block layouts against ggml's.

Regenerate (from the crate root):

    pip install gguf numpy            # gguf 0.19 was used
    python3 scripts/make_dequant_fixtures.py [path/to/SmolLM2-135M-Instruct.Q4_1.gguf]

Outputs, under tests/fixtures/dequant/:

* `<type>.bin` for each supported ggml type: u32 ggml type id, u32 block count, the raw blocks,
  then the f32 values gguf-py dequantises them to (all little-endian). Blocks are seeded random
  bytes whose f16 scale fields are overwritten with sane finite values, so every bit pattern of
  the quants is exercised but no value is NaN or infinite.
* `smollm2_reference.json` (only when the model path is given or found in the cache): for a few
  tensors of the real SmolLM2-135M-Instruct GGUF, gguf-py's dequantised shape, first 64 values,
  sum and sum of absolute values, and for the Q/K projections some rows after undoing llama.cpp's
  RoPE row permutation (computed here with numpy, independently of the Rust code).
"""

import json
import os
import struct
import sys
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import dequantize

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "dequant"

# type -> (number of blocks, byte offsets of the f16 scale fields inside one block)
TYPES = {
    T.F32: (64, []),
    T.F16: (64, []),
    T.BF16: (64, []),
    T.Q4_0: (6, [0]),
    T.Q4_1: (6, [0, 2]),
    T.Q5_0: (6, [0]),
    T.Q5_1: (6, [0, 2]),
    T.Q8_0: (6, [0]),
    T.Q2_K: (2, [80, 82]),
    T.Q3_K: (2, [108]),
    T.Q4_K: (2, [0, 2]),
    T.Q5_K: (2, [0, 2]),
    T.Q6_K: (2, [208]),
}


def sane_f16(rng, n):
    """Finite f16 values of either sign with magnitudes between 1e-3 and 2."""
    mag = np.exp(rng.uniform(np.log(1e-3), np.log(2.0), n))
    sign = rng.choice([-1.0, 1.0], n)
    return (mag * sign).astype(np.float16)


def make_blocks(rng, qtype, n_blocks, scale_offsets):
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    n = n_blocks * block_size
    if qtype == T.F32:
        return rng.standard_normal(n).astype(np.float32).view(np.uint8)
    if qtype == T.F16:
        return rng.standard_normal(n).astype(np.float16).view(np.uint8)
    if qtype == T.BF16:
        bits = rng.standard_normal(n).astype(np.float32).view(np.uint32) >> 16
        return bits.astype(np.uint16).view(np.uint8)
    raw = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    for off in scale_offsets:
        raw[:, off : off + 2] = sane_f16(rng, n_blocks).view(np.uint8).reshape(n_blocks, 2)
    return raw.reshape(-1)


def write_type_fixture(qtype, n_blocks, scale_offsets, seed):
    rng = np.random.default_rng(seed)
    raw = make_blocks(rng, qtype, n_blocks, scale_offsets)
    values = dequantize(raw, qtype).astype("<f4").reshape(-1)
    assert values.size == n_blocks * GGML_QUANT_SIZES[qtype][0]
    assert np.all(np.isfinite(values)), qtype.name
    path = OUT / f"{qtype.name.lower()}.bin"
    with open(path, "wb") as f:
        f.write(struct.pack("<II", int(qtype), n_blocks))
        f.write(raw.tobytes())
        f.write(values.tobytes())
    print(f"wrote {path} ({path.stat().st_size} bytes)")


def unpermute_rows(w, n_head):
    """Inverse of llama.cpp's `w.reshape(n_head, 2, hd // 2, in).swapaxes(1, 2).reshape(out, in)`."""
    rows, cols = w.shape
    hd = rows // n_head
    return w.reshape(n_head, hd // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def write_model_fixture(model_path):
    reader = GGUFReader(model_path)
    n_head = int(reader.fields["llama.attention.head_count"].contents())
    n_kv = int(reader.fields["llama.attention.head_count_kv"].contents())
    wanted = {
        "token_embd.weight": None,  # Q8_0
        "blk.0.ffn_down.weight": None,  # Q4_1
        "blk.7.attn_output.weight": None,  # Q4_1
        "blk.29.ffn_norm.weight": None,  # F32
        "blk.0.attn_q.weight": n_head,  # Q4_1, RoPE-permuted
        "blk.3.attn_k.weight": n_kv,  # Q4_1, RoPE-permuted
    }
    sample_rows = [0, 1, 2, 3, 31, 32, 33, 63, 64, 65, 127]
    out = {}
    for t in reader.tensors:
        if t.name not in wanted:
            continue
        # Row-major shape: ggml lists dimensions innermost first.
        shape = [int(d) for d in reversed(t.shape.tolist())]
        w = dequantize(t.data, t.tensor_type).astype(np.float32).reshape(shape)
        flat = w.reshape(-1)
        entry = {
            "type": t.tensor_type.name,
            "shape": shape,
            "first": [float(x) for x in flat[:64]],
            "sum": float(flat.astype(np.float64).sum()),
            "abs_sum": float(np.abs(flat.astype(np.float64)).sum()),
        }
        heads = wanted[t.name]
        if heads is not None:
            hf = unpermute_rows(w, heads)
            entry["n_head"] = heads
            entry["hf_rows"] = {str(r): [float(x) for x in hf[r, :8]] for r in sample_rows}
        out[t.name] = entry
    missing = set(wanted) - set(out)
    assert not missing, missing
    path = OUT / "smollm2_reference.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path} ({path.stat().st_size} bytes)")


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    for seed, (qtype, (n_blocks, offsets)) in enumerate(TYPES.items()):
        write_type_fixture(qtype, n_blocks, offsets, seed=1000 + seed)
    if len(sys.argv) > 1:
        model = Path(sys.argv[1])
    else:
        cache = os.environ.get("REDRAFTER_CACHE") or os.path.join(
            os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "redrafter"
        )
        model = Path(cache) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if model.exists():
        write_model_fixture(model)
    else:
        print(f"{model} not found: skipped smollm2_reference.json")


if __name__ == "__main__":
    main()
