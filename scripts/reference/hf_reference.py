#!/usr/bin/env python3
"""Generate Hugging Face reference fixtures for Ludus' SmolLM2 tests.

What it does
------------
Loads the SmolLM2-135M-Instruct GGUF with Hugging Face `transformers` (the
GGUF is de-quantized to float32 by transformers) and with the `gguf` package,
and writes, into the output directory:

* ``tokenize.json``        -- [{"text", "ids"}] for ~30 varied texts, plain
                              encode (no BOS, add_special_tokens=False).
* ``tokenize_notes.json``  -- which tokenizer produced the ids and every
                              difference found between it and transformers'
                              GGUF-converted tokenizer.
* ``chat.json``            -- 5 chat conversations: ChatML prompt rendered with
                              the GGUF's own chat template, its ids, a 64-token
                              greedy continuation (EOS suppressed by
                              min_new_tokens) and the greedy continuation that
                              stops at EOS.
* ``chat_{i}.logits.f32``  -- raw little-endian float32 logits (vocab_size
                              values) at the last prompt position of the
                              prompt's forward pass.
* ``dequant.json``         -- random raw GGUF blocks for F16, BF16, Q8_0, Q4_0,
                              Q4_1, Q4_K, Q5_K, Q6_K and the float32 values
                              `gguf.quants.dequantize` gives for them.

Tokenizer reference
-------------------
The real SmolLM2 tokenizer (tokenizer.json on the Hub) pre-tokenizes with
``Sequence[Digits(individual_digits=True), ByteLevel(add_prefix_space=False,
use_regex=True)]`` (llama.cpp's ``smollm`` pre-tokenizer is the same: ``\\p{N}``
first, then the GPT-2 regex).  transformers' GGUF converter builds only the
ByteLevel pre-tokenizer, so this script builds the reference tokenizer itself
with the `tokenizers` library from the GGUF vocab (tokenizer.ggml.tokens) and
merges (tokenizer.ggml.merges) plus that pre-tokenizer, registers the control
tokens (token_type == 3, ids 0..16) as special tokens, and cross-checks it
against transformers' tokenizer on every text (see tokenize_notes.json).

Regenerate (from the repository root; CPU only, about a minute or two):

    ~/.cache/ludus/venv/bin/python scripts/reference/hf_reference.py \
        --model models/SmolLM2-135M-Instruct.Q4_1.gguf --out tests/fixtures/smollm2

Environment used for the committed fixtures: torch 2.13.0 (CPU), transformers
5.24.0, tokenizers 0.23.3, gguf 0.19.0, numpy 2.4.6 (see the "versions" fields
written into the fixtures).  Install with
``~/.cache/ludus/venv/bin/pip install numpy gguf transformers accelerate tokenizers sentencepiece``.

Block layouts used for dequant.json (byte offsets inside one block; checked
against gguf-py's quants.py and GGML_QUANT_SIZES, which match ggml-common.h):

* F16  : 1 value = 2 bytes, IEEE half.                    (we emit 64 values)
* BF16 : 1 value = 2 bytes, upper half of an f32.         (we emit 64 values)
* Q8_0 : 34 B / 32 values.  d: f16 @ [0,2)  | qs: 32 x int8 @ [2,34)
* Q4_0 : 18 B / 32 values.  d: f16 @ [0,2)  | qs: 16 B @ [2,18);
         value j<16 = low nibble of qs[j], j>=16 = high nibble of qs[j-16];
         x = d * (q - 8)
* Q4_1 : 20 B / 32 values.  d: f16 @ [0,2)  | m: f16 @ [2,4) | qs: 16 B @ [4,20)
         (nibble order as Q4_0); x = d * q + m
* Q4_K : 144 B / 256 values. d: f16 @ [0,2) | dmin: f16 @ [2,4) |
         scales: 12 B @ [4,16) (8 x 6-bit scale + 8 x 6-bit min, packed as in
         get_scale_min_k4) | qs: 128 B @ [16,144).  x = d*sc*q - dmin*m
* Q5_K : 176 B / 256 values. d: f16 @ [0,2) | dmin: f16 @ [2,4) |
         scales: 12 B @ [4,16) | qh: 32 B @ [16,48) | qs: 128 B @ [48,176)
* Q6_K : 210 B / 256 values. ql: 128 B @ [0,128) | qh: 64 B @ [128,192) |
         scales: 16 x int8 @ [192,208) | d: f16 @ [208,210)
The f16 scale fields above (d, and dmin / m where present) are overwritten with
random f16 values of magnitude 1e-3..1e-1 (d positive, dmin positive, Q4_1's m
of random sign), so nothing decodes to inf/NaN.  Everything else is random
bytes from numpy.random.default_rng(7).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

TEXTS = [
    # English prose
    "The quick brown fox jumps over the lazy dog.",
    "Once upon a time, in a land far, far away, there lived a curious little robot named Pip.",
    # code
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "fn main() {\n    let v: Vec<u32> = (0..10).map(|x| x * x).collect();\n    println!(\"{:?}\", v);\n}\n",
    # emoji, incl. ZWJ sequences, skin tones and flags
    "I love pizza 🍕🍕! 😂👍🏽",
    "Family: 👨‍👩‍👧‍👦, rainbow flag: 🏳️‍🌈, France: 🇫🇷",
    # digits and numbers
    "1234567",
    "3.14159",
    "In 2024, the population was 8,118,835,999 (approx. 8.1e9).",
    # digits next to whitespace runs (where the Digits pre-tokenizer matters)
    "x  = 10;\ty =\t\t20\n\n30",
    "Total:   42 items, line 3   4",
    # other languages
    "Bonjour, je m'appelle Élodie et j'habite à Paris. Ça va très bien !",
    "Größenordnung: Die Straße ist übermäßig lang, sagt Jürgen.",
    "我们今天去北京的天安门广场散步。",
    "日本語のテキスト：こんにちは、世界！カタカナとひらがな。",
    "안녕하세요, 만나서 반갑습니다.",
    "مرحبا بالعالم، كيف حالك اليوم؟",
    "नमस्ते, आप कैसे हैं? क्षत्रिय हिन्दी",
    "Привет, мир! Как дела? Ёжик в тумане.",
    # whitespace
    "a   b",
    "\n\n\n",
    "\t\tx",
    "trailing spaces   ",
    "   leading spaces",
    # contractions
    "I'm sure they'll say DON'T, but we've done it and she'd agree.",
    # punctuation runs
    "Wait... what?!?! ---> (see [1]) {{x}} ;;; @@## $$%% ^^&& **",
    # special-token text inside plain encode (see notes: parsed as special)
    "<|im_start|>user\nhi<|im_end|>",
    # mixed
    "Über café naïve résumé — “smart quotes” and ‘single’ … ellipsis",
    # empty string
    "",
]

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {
            "role": "system",
            "content": (
                "You are Brom, a gruff dwarven blacksmith in the mountain village of Emberfall. "
                "Stay in character. Answer in one or two short sentences."
            ),
        },
        {"role": "user", "content": "Greetings, smith. Can you repair my broken sword before nightfall?"},
    ],
    [{"role": "user", "content": "Write a Python function that returns True if a number is prime."}],
    [
        {"role": "user", "content": "Hi! Can you recommend a good science fiction book?"},
        {"role": "assistant", "content": "Sure! \"Dune\" by Frank Herbert is a classic of the genre."},
        {"role": "user", "content": "I'd like something shorter, please."},
    ],
    [{"role": "user", "content": "Quelle est la plus haute montagne d'Europe ?"}],
]

N_GREEDY = 64
MAX_UNTIL_EOS = 256


def log(*a):
    print(*a, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# tokenizer
# --------------------------------------------------------------------------

def build_reference_tokenizer(reader):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    merges = reader.fields["tokenizer.ggml.merges"].contents()
    ttypes = reader.fields["tokenizer.ggml.token_type"].contents()
    vocab = {t: i for i, t in enumerate(tokens)}
    assert len(vocab) == len(tokens), "duplicate tokens in GGUF vocab"
    pairs = []
    for m in merges:
        a, b = m.split(" ")  # byte-level tokens never contain a raw space
        pairs.append((a, b))
    bpe = models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False)
    tk = Tokenizer(bpe)
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ]
    )
    tk.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    specials = [tokens[i] for i in range(len(tokens)) if int(ttypes[i]) == 3]
    tk.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    for s in specials:
        assert tk.token_to_id(s) == vocab[s], s
    return tk, specials


def make_tokenize_fixture(out: Path, reader, hf_tok, versions):
    ref, specials = build_reference_tokenizer(reader)
    items = []
    diffs = []
    digit_texts = []
    for text in TEXTS:
        ids = ref.encode(text, add_special_tokens=False).ids
        hf_ids = hf_tok.encode(text, add_special_tokens=False)
        has_digit = any(ch.isdigit() for ch in text)
        if has_digit:
            digit_texts.append(text)
        if ids != hf_ids:
            diffs.append(
                {
                    "text": text,
                    "has_digit": has_digit,
                    "reference_ids": ids,
                    "reference_tokens": [ref.id_to_token(i) for i in ids],
                    "transformers_ids": hf_ids,
                    "transformers_tokens": hf_tok.convert_ids_to_tokens(hf_ids),
                }
            )
            if not has_digit:
                raise SystemExit(f"reference and transformers tokenizers disagree on digit-free text {text!r}")
        # round trip
        dec = ref.decode(ids, skip_special_tokens=False)
        assert dec == text, (text, dec)
        items.append({"text": text, "ids": ids})

    probes = {}
    for p in ["12345", "a 1234567 b", "a  1", "x  = 10"]:
        probes[p] = {
            "reference": [ref.id_to_token(i) for i in ref.encode(p, add_special_tokens=False).ids],
            "transformers": hf_tok.convert_ids_to_tokens(hf_tok.encode(p, add_special_tokens=False)),
        }

    hf_pre = None
    try:
        hf_pre = json.loads(hf_tok.backend_tokenizer.to_str())["pre_tokenizer"]
    except Exception as e:  # pragma: no cover
        hf_pre = f"unavailable: {e}"

    notes = {
        "source": (
            "ids in tokenize.json come from a `tokenizers` (Rust HF tokenizers) BPE built from the GGUF's "
            "tokenizer.ggml.tokens + tokenizer.ggml.merges, no normalizer, pre-tokenizer "
            "Sequence[Digits(individual_digits=True), ByteLevel(add_prefix_space=False, trim_offsets=True, "
            "use_regex=True)], ByteLevel decoder, control tokens (token_type 3, ids 0..16) registered as "
            "special added tokens. Encoded with add_special_tokens=False (no BOS)."
        ),
        "notes": [
            "transformers' GGUF-converted tokenizer (TokenizersBackend) uses only "
            "ByteLevel(add_prefix_space=False, use_regex=True) as pre-tokenizer; it lacks the "
            "Digits(individual_digits=True) step of the real SmolLM2 tokenizer.json and of llama.cpp's "
            "'smollm' pre-tokenizer.",
            "The GGUF merges contain no merge whose parts are digits and no 'Ġ'+digit merge, so digit runs "
            "still come out one digit per token in both tokenizers (e.g. '12345' -> 1,2,3,4,5 and "
            "' 1234567' -> 'Ġ','1',...,'7'). The missing Digits step only shows where a whitespace run "
            "precedes a digit: the GPT-2 regex alternative '\\s+(?!\\S)' then leaves the last space to join the "
            "digit (' ?\\p{N}+'), whereas after the Digits split the whole whitespace run is one piece "
            "(e.g. 'a  1': reference 'a','ĠĠ','1'; transformers 'a','Ġ','Ġ','1').",
            "All digit-free texts agree exactly between the two tokenizers (checked by the script).",
            "Text containing control-token strings such as '<|im_start|>' is split as the special token by "
            "both tokenizers even with add_special_tokens=False (see the '<|im_start|>user\\nhi<|im_end|>' "
            "entry).",
            "Every reference encoding decodes back to its input text exactly.",
        ],
        "differences": diffs,
        "texts_with_digits": digit_texts,
        "probes": probes,
        "transformers_pre_tokenizer": hf_pre,
        "special_tokens": specials,
        "versions": versions,
    }
    (out / "tokenize.json").write_text(json.dumps(items, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    (out / "tokenize_notes.json").write_text(json.dumps(notes, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    log(f"tokenize: {len(items)} texts, {len(diffs)} differing from transformers")
    return ref


# --------------------------------------------------------------------------
# chat / logits
# --------------------------------------------------------------------------

def render_template(template: str, messages, add_generation_prompt=True) -> str:
    import jinja2

    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt)


def make_chat_fixture(out: Path, reader, hf_tok, ref_tok, model, versions):
    template = reader.fields["tokenizer.chat_template"].contents()
    eos = int(reader.fields["tokenizer.ggml.eos_token_id"].contents())
    vocab_size = model.config.vocab_size
    entries = []
    for i, messages in enumerate(CONVERSATIONS):
        prompt_text = render_template(template, messages, add_generation_prompt=True)
        hf_text = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert prompt_text == hf_text, (prompt_text, hf_text)
        prompt_ids = ref_tok.encode(prompt_text, add_special_tokens=False).ids
        hf_ids = hf_tok.encode(prompt_text, add_special_tokens=False)
        assert prompt_ids == hf_ids, (prompt_ids, hf_ids)
        inp = torch.tensor([prompt_ids], dtype=torch.long)
        attn = torch.ones_like(inp)

        with torch.no_grad():
            logits = model(input_ids=inp, attention_mask=attn, use_cache=False).logits[0, -1].float().numpy()
        assert logits.shape == (vocab_size,)
        lf = f"chat_{i}.logits.f32"
        logits.astype("<f4").tofile(out / lf)
        top5 = np.argsort(-logits, kind="stable")[:5]

        common = dict(
            input_ids=inp,
            attention_mask=attn,
            do_sample=False,
            num_beams=1,
            repetition_penalty=1.0,
            temperature=None,
            top_p=None,
            top_k=None,
            use_cache=True,
            pad_token_id=eos,
            eos_token_id=eos,
        )
        with torch.no_grad():
            g = model.generate(
                **common,
                max_new_tokens=N_GREEDY,
                min_new_tokens=N_GREEDY,
                return_dict_in_generate=True,
                output_scores=True,
                output_logits=True,
            )
        greedy = g.sequences[0, len(prompt_ids):].tolist()
        assert len(greedy) == N_GREEDY, len(greedy)
        # raw (unprocessed) logits per step: where the raw argmax was EOS, min_new_tokens masked it
        raw_argmax = [int(s[0].argmax()) for s in g.logits]
        eos_masked_steps = [k for k, a in enumerate(raw_argmax) if a != greedy[k]]
        assert all(raw_argmax[k] == eos for k in eos_masked_steps), "unexpected non-EOS mismatch"
        margins = []
        for s in g.scores:
            top2 = torch.topk(s[0].float(), 2).values
            margins.append(round(float(top2[0] - top2[1]), 5))
        assert greedy[0] == int(np.argmax(logits)) or eos_masked_steps[:1] == [0]

        with torch.no_grad():
            g2 = model.generate(**common, max_new_tokens=MAX_UNTIL_EOS)
        until = g2[0, len(prompt_ids):].tolist()
        stopped = bool(until) and until[-1] == eos
        body = until[:-1] if stopped else until
        # the EOS-stopping run must be a prefix of the forced 64-token run
        n = min(len(body), N_GREEDY)
        assert body[:n] == greedy[:n], "until-eos run diverges from forced run"

        entries.append(
            {
                "messages": messages,
                "prompt_text": prompt_text,
                "prompt_ids": prompt_ids,
                "greedy_ids": greedy,
                "greedy_text": ref_tok.decode(greedy, skip_special_tokens=False),
                "logits_file": lf,
                "logits_top5_ids": [int(t) for t in top5],
                "logits_top5_values": [float(logits[t]) for t in top5],
                "greedy_step_margins": margins,
                "eos_masked_steps": eos_masked_steps,
                "greedy_ids_until_eos": until,
                "greedy_text_until_eos": ref_tok.decode(body, skip_special_tokens=False),
                "stopped_at_eos": stopped,
            }
        )
        log(f"chat {i}: prompt {len(prompt_ids)} tok; eos masked at {eos_masked_steps}; "
            f"until-eos {len(until)} tok: {entries[-1]['greedy_text_until_eos'][:80]!r}")

    doc = {
        "about": (
            "prompt_text: GGUF chat template rendered with add_generation_prompt=True (identical to "
            "transformers' apply_chat_template). prompt_ids: plain encode of prompt_text, no extra BOS "
            "(template adds none). greedy_ids: model.generate(do_sample=False, max_new_tokens=64, "
            "min_new_tokens=64, repetition_penalty=1.0): min_new_tokens sets the EOS logit to -inf, so at "
            "the steps listed in eos_masked_steps the raw argmax was EOS (id 2) and the second-best token was "
            "taken instead. greedy_step_margins: top1 - top2 of the (EOS-masked) logits at each step; small "
            "margins mark steps where an engine with slightly different numerics may legitimately pick "
            "another token. logits_file: little-endian f32, vocab_size values, last prompt position of a "
            "full (no-cache) prompt forward pass. greedy_ids_until_eos: generate() without min_new_tokens, "
            f"max_new_tokens={MAX_UNTIL_EOS}, includes the final EOS when stopped_at_eos; "
            "greedy_text_until_eos excludes it. Model: GGUF Q4_1 weights de-quantized by transformers to "
            "float32; float32 compute on CPU, torch.set_num_threads(2)."
        ),
        "vocab_size": vocab_size,
        "eos_token_id": eos,
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "versions": versions,
        "conversations": entries,
    }
    # The brief asks for an array: chat.json is the array; metadata goes to chat_meta.json.
    (out / "chat.json").write_text(json.dumps(entries, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    meta = {k: v for k, v in doc.items() if k != "conversations"}
    (out / "chat_meta.json").write_text(json.dumps(meta, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------
# dequant
# --------------------------------------------------------------------------

def rand_f16_scale(rng, n, signed=False) -> np.ndarray:
    mag = 10.0 ** rng.uniform(-3.0, -1.0, size=n)
    if signed:
        mag *= rng.choice([-1.0, 1.0], size=n)
    return mag.astype(np.float16)


def make_dequant_fixture(out: Path, versions):
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T
    from gguf.quants import dequantize

    rng = np.random.default_rng(7)
    nblocks = 2
    # f16 fields: (byte offset, signed)
    scale_fields = {
        T.Q8_0: [(0, False)],
        T.Q4_0: [(0, False)],
        T.Q4_1: [(0, False), (2, True)],
        T.Q4_K: [(0, False), (2, False)],
        T.Q5_K: [(0, False), (2, False)],
        T.Q6_K: [(208, False)],
    }
    expected_sizes = {T.Q8_0: (32, 34), T.Q4_0: (32, 18), T.Q4_1: (32, 20), T.Q4_K: (256, 144),
                      T.Q5_K: (256, 176), T.Q6_K: (256, 210), T.F16: (1, 2), T.BF16: (1, 2)}
    res = []
    for qt in [T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q4_K, T.Q5_K, T.Q6_K]:
        bs, ts = GGML_QUANT_SIZES[qt]
        assert (bs, ts) == expected_sizes[qt], (qt, bs, ts)
        if qt in (T.F16, T.BF16):
            # 2 "blocks" of 32 values each; whole values are the payload
            n = 64
            raw16 = rng.integers(0, 1 << 16, size=n, dtype=np.uint16)
            if qt == T.F16:
                expmask = np.uint16(0x7C00)
            else:
                expmask = np.uint16(0x7F80)
            # exponent all ones -> inf/NaN: clear the top exponent bit
            bad = (raw16 & expmask) == expmask
            top = np.uint16(0x4000)
            raw16 = np.where(bad, raw16 & ~top, raw16).astype(np.uint16)
            # make sure a few notable values are present
            if qt == T.F16:
                raw16[:4] = np.array([0x0000, 0x8000, 0x0001, 0x3C00], dtype=np.uint16)  # +0, -0, subnormal, 1.0
            else:
                raw16[:4] = np.array([0x0000, 0x8000, 0x3F80, 0xC040], dtype=np.uint16)  # +0, -0, 1.0, -3.0
            raw = raw16.astype("<u2").view(np.uint8)
        else:
            raw = rng.integers(0, 256, size=(nblocks, ts), dtype=np.uint8)
            for off, signed in scale_fields[qt]:
                s = rand_f16_scale(rng, nblocks, signed).astype("<f2").view(np.uint8).reshape(nblocks, 2)
                raw[:, off:off + 2] = s
            raw = raw.reshape(-1)
        vals = dequantize(raw.copy(), qt).astype(np.float32).reshape(-1)
        assert np.all(np.isfinite(vals)), qt
        assert vals.size == (64 if qt in (T.F16, T.BF16) else nblocks * bs)
        res.append(
            {
                "type": qt.name,
                "type_id": int(qt.value),
                "block_size": bs,
                "type_size": ts,
                "raw_hex": raw.tobytes().hex(),
                "values": [float(v) for v in vals],
            }
        )
        log(f"dequant {qt.name}: {raw.size} bytes -> {vals.size} values")
    (out / "dequant.json").write_text(json.dumps(res, indent=1) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="models/SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--out", default="tests/fixtures/smollm2")
    ap.add_argument("--skip-model", action="store_true", help="only tokenizer and dequant fixtures")
    args = ap.parse_args()

    torch.set_num_threads(2)
    torch.manual_seed(0)

    import gguf
    import tokenizers
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    versions = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "gguf": getattr(gguf, "__version__", None) or _dist_version("gguf"),
        "numpy": np.__version__,
    }
    model_path = Path(args.model)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    reader = gguf.GGUFReader(str(model_path))
    hf_tok = AutoTokenizer.from_pretrained(str(model_path.parent), gguf_file=model_path.name)

    make_dequant_fixture(out, versions)
    ref_tok = make_tokenize_fixture(out, reader, hf_tok, versions)
    if args.skip_model:
        return
    model = AutoModelForCausalLM.from_pretrained(
        str(model_path.parent), gguf_file=model_path.name, dtype=torch.float32
    )
    model.eval()
    with torch.no_grad():
        make_chat_fixture(out, reader, hf_tok, ref_tok, model, versions)
    log("done")


def _dist_version(name):
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:
        return None


if __name__ == "__main__":
    main()
