#!/usr/bin/env python3
"""Tiny random models of every family Ludus runs besides Llama, from Hugging Face
transformers, with their reference outputs -- nothing is downloaded.

For each family (Qwen2, Qwen3, Gemma2, Gemma3 text, Phi3) this builds a model from a
small config in transformers, gives it random weights of a useful size (norm gains,
biases and Gemma's `w` of `1 + w` included, so a loader that ignores one of them
fails), saves it as a safetensors directory, and records in ``reference.json``:

* ``prompts``: token-id sequences longer than the sliding window;
* ``logits_file``: the float32 logits of every prompt position (little-endian,
  ``[positions, vocab]`` per prompt, prompts one after another);
* ``greedy``: 12 tokens of greedy continuation (``generate``, KV cache, no EOS);

and, for Qwen2, Qwen3, Gemma3 and Phi3, ``model.gguf``: the same weights as
llama.cpp's converter would write them.

The configs turn on each family's quirks: Qwen2's Q/K/V bias; Qwen3's per-head
Q/K norms and a head_dim that is not hidden/heads; Gemma2's soft-capping,
query_pre_attn_scalar and alternating sliding layers; Gemma3's Q/K norms,
local rotary base, linear scaling of global layers and 2:1 sliding pattern;
Phi3's partial rotary embedding and LongRoPE factors.

Regenerate (from the repository root, CPU, a few seconds):

    ~/.cache/ludus/venv/bin/python scripts/reference/families.py --out tests/fixtures/families

Needs ``pip install transformers safetensors`` in the venv beside torch.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import transformers

VOCAB = 384
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6)

FAMILIES = {
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM",
              dict(COMMON, num_hidden_layers=2, rope_theta=1_000_000.0, tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM",
              dict(COMMON, num_hidden_layers=2, head_dim=24, rope_theta=1_000_000.0, tie_word_embeddings=False)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",
               dict(COMMON, num_hidden_layers=3, head_dim=16, query_pre_attn_scalar=24,
                    attn_logit_softcapping=50.0, final_logit_softcapping=30.0, sliding_window=8,
                    hidden_activation="gelu_pytorch_tanh")),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM",
               dict(COMMON, num_hidden_layers=3, num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=32,
                    sliding_window=8, sliding_window_pattern=3,
                    layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                    rope_theta=1_000_000.0, rope_local_base_freq=10_000.0,
                    rope_scaling={"rope_type": "linear", "factor": 8.0},
                    final_logit_softcapping=None, attn_logit_softcapping=None,
                    hidden_activation="gelu_pytorch_tanh")),
    "phi3": ("Phi3Config", "Phi3ForCausalLM",
             dict(COMMON, num_hidden_layers=2, partial_rotary_factor=0.75, max_position_embeddings=1024,
                  original_max_position_embeddings=256, sliding_window=None, tie_word_embeddings=False,
                  pad_token_id=0,
                  rope_scaling={"type": "longrope",
                                "short_factor": [1.0, 1.1, 1.3, 1.7, 2.4, 3.5],
                                "long_factor": [2.0, 2.5, 3.0, 4.0, 6.0, 9.0]})),
}

# One small byte-level BPE (Qwen's pre-tokenizer) for every tiny model, so each directory
# is a complete model Ludus can serve; the families' real tokenizers are checked on their
# own (family_tokenizers.py).
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def write_tokenizer(out: Path) -> None:
    import tokenizers
    from tokenizers import models, pre_tokenizers, decoders, trainers
    sys.path.insert(0, str(Path(__file__).parent))
    from hf_reference import TEXTS
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(tokenizers.Regex(QWEN_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = TEXTS * 4 + ["You are an NPC in a fantasy village. Greet the traveller, merchant, blacksmith."] * 8
    tok.train_from_iterator(corpus, trainer)
    assert tok.get_vocab_size() <= VOCAB, tok.get_vocab_size()
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "<|im_end|>", "bos_token": None, "add_bos_token": False}, indent=1) + "\n")


# GGUF copies, written the way llama.cpp's convert_hf_to_gguf.py writes these families
# (gguf-py's tensor name map and keys; Gemma's norms stored as 1 + w; Phi-3's LongRoPE
# factors as tensors). Gemma 2 has none: GGUF has no key for query_pre_attn_scalar
# (llama.cpp derives the scale from the head size), which this tiny model sets apart.
GGUF_ARCH = {"qwen2": "QWEN2", "qwen3": "QWEN3", "gemma3": "GEMMA3", "phi3": "PHI3"}


def write_gguf(family: str, model: torch.nn.Module, config, out: Path) -> None:
    import gguf
    arch = getattr(gguf.MODEL_ARCH, GGUF_ARCH[family])
    writer = gguf.GGUFWriter(str(out / "model.gguf"), gguf.MODEL_ARCH_NAMES[arch])
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    rope = config.rope_parameters
    if family == "gemma3":
        rope_global = rope["full_attention"]
        writer.add_rope_freq_base(rope_global["rope_theta"])
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope_global["factor"])
        writer.add_sliding_window(config.sliding_window)
        writer.add_sliding_window_pattern([t == "sliding_attention" for t in config.layer_types])
    else:
        writer.add_rope_freq_base(rope["rope_theta"])
    rotary = int(head_dim * getattr(config, "partial_rotary_factor", 1.0))
    if family == "phi3":
        original = config.original_max_position_embeddings
        scale = config.max_position_embeddings / original
        writer.add_rope_dimension_count(rotary)
        writer.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(original)))
        writer.add_rope_scaling_orig_ctx_len(original)
        for kind in ("long", "short"):
            name = gguf.TENSOR_NAMES[getattr(gguf.MODEL_TENSOR, f"ROPE_FACTORS_{kind.upper()}")] + ".weight"
            writer.add_tensor(name, torch.tensor(rope[f"{kind}_factor"], dtype=torch.float32).numpy())
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        assert name is not None, hf_name
        data = tensor.float()
        if family.startswith("gemma") and hf_name.endswith("norm.weight"):
            data = data + 1.0
        writer.add_tensor(name, data.contiguous().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


PROMPT_LEN = 20
GREEDY = 12


def randomize(model: torch.nn.Module, family: str, gen: torch.Generator) -> None:
    gemma = family.startswith("gemma")
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("norm.weight"):
                # Gemma multiplies by 1 + w; the others by w.
                p.copy_((0.0 if gemma else 1.0) + 0.2 * noise)
            elif name.endswith(".bias"):
                p.copy_(0.5 * noise)
            else:
                fan_in = p.shape[-1]
                if "embed" not in name:
                    p.copy_(noise * (1.5 / math.sqrt(fan_in)))
                else:
                    # Gemma multiplies the embedding by sqrt(hidden): keep the stream the same size.
                    p.copy_(noise * 0.5 / (math.sqrt(fan_in) if gemma else 1.0))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1234)
    prompts = [torch.randint(3, VOCAB, (PROMPT_LEN,), generator=gen).tolist() for _ in range(2)]
    for family, (config_name, model_name, kwargs) in FAMILIES.items():
        config = getattr(transformers, config_name)(**kwargs)
        config._attn_implementation = "eager"
        model = getattr(transformers, model_name)(config).eval().float()
        randomize(model, family, gen)
        if config.tie_word_embeddings:
            model.tie_weights()
        out = args.out / family
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out, safe_serialization=True)
        logits_bytes = bytearray()
        greedy = []
        for prompt in prompts:
            ids = torch.tensor([prompt])
            with torch.no_grad():
                logits = model(ids).logits[0].float().contiguous()
                logits_bytes += logits.numpy().astype("<f4").tobytes()
                generated = model.generate(ids, max_new_tokens=GREEDY, min_new_tokens=GREEDY, do_sample=False,
                                           eos_token_id=None, pad_token_id=0)
            greedy.append(generated[0, PROMPT_LEN:].tolist())
        write_tokenizer(out)
        if family in GGUF_ARCH:
            write_gguf(family, model, config, out)
        (out / "logits.f32").write_bytes(bytes(logits_bytes))
        (out / "reference.json").write_text(json.dumps({
            "family": family,
            "prompts": prompts,
            "logits_file": "logits.f32",
            "vocab_size": VOCAB,
            "greedy": greedy,
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        }, indent=1) + "\n")
        for junk in ["generation_config.json"]:
            (out / junk).unlink(missing_ok=True)
        print(family, "greedy", greedy, "logit range", float(logits.min()), float(logits.max()))


if __name__ == "__main__":
    main()
