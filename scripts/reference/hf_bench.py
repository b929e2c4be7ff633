#!/usr/bin/env python3
"""Baseline decode throughput of Hugging Face transformers on the SmolLM2 GGUF.

Loads the GGUF with transformers (weights de-quantized to float32), sets
torch.set_num_threads(N), runs a warm-up, then times greedy decoding of
--new-tokens (default 128) new tokens at batch size 1 with use_cache=True on a
short chat prompt:

    model.generate(..., do_sample=False, min_new_tokens=128, max_new_tokens=128)

Prefill is excluded by separately timing a 1-new-token generate (prefill + one
sampling step) and subtracting it:

    decode_tok_s = (new_tokens - 1) / (t_generate(new_tokens) - t_generate(1))

Each timing is the median of --repeats runs.  Prints one JSON line on stdout
(progress goes to stderr).

Command (from the repository root):

    ~/.cache/ludus/venv/bin/python scripts/reference/hf_bench.py \
        --model models/SmolLM2-135M-Instruct.Q4_1.gguf --threads 2

Smoke test (what was checked when the script was written; not a timing):

    ~/.cache/ludus/venv/bin/python scripts/reference/hf_bench.py --new-tokens 5 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

MESSAGES = [{"role": "user", "content": "Tell me a short story about a brave little robot."}]


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def main():
    ap = argparse.ArgumentParser(description="HF transformers decode-throughput baseline")
    ap.add_argument("--model", default="models/SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(args.model)
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    model.eval()
    load_s = time.perf_counter() - t0

    prompt = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    ids = tok.encode(prompt, add_special_tokens=False)
    inp = torch.tensor([ids], dtype=torch.long)
    attn = torch.ones_like(inp)
    eos = tok.eos_token_id

    def gen(n: int) -> tuple[float, int]:
        with torch.no_grad():
            t = time.perf_counter()
            out = model.generate(
                input_ids=inp,
                attention_mask=attn,
                do_sample=False,
                num_beams=1,
                temperature=None,
                top_p=None,
                top_k=None,
                repetition_penalty=1.0,
                use_cache=True,
                min_new_tokens=n,
                max_new_tokens=n,
                pad_token_id=eos,
                eos_token_id=eos,
            )
            dt = time.perf_counter() - t
        return dt, out.shape[1] - inp.shape[1]

    log(f"loaded in {load_s:.1f}s; prompt {len(ids)} tokens; warm-up")
    gen(min(8, args.new_tokens))

    t1 = []
    tn = []
    for r in range(args.repeats):
        d1, n1 = gen(1)
        assert n1 == 1, n1
        dn, nn = gen(args.new_tokens)
        assert nn == args.new_tokens, nn
        t1.append(d1)
        tn.append(dn)
        log(f"repeat {r}: 1 tok {d1:.3f}s, {nn} tok {dn:.3f}s")
    m1 = statistics.median(t1)
    mn = statistics.median(tn)
    decode_s = mn - m1
    decode_tokens = args.new_tokens - 1
    res = {
        "engine": "hf-transformers",
        "model": path.name,
        "dtype": "float32",
        "threads": args.threads,
        "batch": 1,
        "prompt_tokens": len(ids),
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "prefill_plus_1_s": round(m1, 4),
        "generate_total_s": round(mn, 4),
        "decode_s": round(decode_s, 4),
        "decode_tok_s": round(decode_tokens / decode_s, 3) if decode_s > 0 else None,
        "load_s": round(load_s, 2),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu": platform.processor() or platform.machine(),
    }
    print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
