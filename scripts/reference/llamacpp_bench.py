"""llama.cpp through its C API (llama-cpp-python's low-level ctypes bindings), measured the
way `ludus bench decode` and `ludus bench persona` measure Ludus: prefill of a prompt,
then B sequences decoded together with one `llama_decode` per step, greedy sampling by
llama.cpp's own sampler (C), nothing sampled in Python. Prints one JSON object.

  python llamacpp_bench.py --model M.gguf --threads 2 --batch 1,8 --tokens 64 \
      --prompt-tokens 256 [--persona-tokens 1000 --line-tokens 20 --requests 5]

- decode: tokens/s of B sequences after each prefilled a `--prompt-tokens` prompt.
- prefill: tokens/s of one `--prompt-tokens` prompt (chunks of `n_batch`), and the time to
  its first token.
- persona (with `--persona-tokens`): time to first token of a persona plus a player line
  computed from nothing (cold) and with the persona's KV kept from an earlier request
  (warm: llama.cpp's prompt cache, `llama_memory_seq_rm` back to the shared prefix).
"""

import argparse
import ctypes
import json
import statistics
import time

import llama_cpp as L


def tokens_of(n, vocab_size, seed):
    """`n` ordinary token ids (deterministic; ids 1000+ avoid the special tokens)."""
    state = seed
    out = []
    for _ in range(n):
        state = (state * 1103515245 + 12345) % (1 << 31)
        out.append(1000 + state % (vocab_size - 2000))
    return out


class Runner:
    def __init__(self, path, threads, n_ctx, n_seq):
        L.llama_backend_init()
        mparams = L.llama_model_default_params()
        self.model = L.llama_model_load_from_file(path.encode(), mparams)
        if not self.model:
            raise SystemExit(f"llama.cpp could not load {path}")
        cparams = L.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = 512
        cparams.n_ubatch = 512
        cparams.n_seq_max = n_seq
        cparams.n_threads = threads
        cparams.n_threads_batch = threads
        self.ctx = L.llama_init_from_model(self.model, cparams)
        self.vocab = L.llama_model_get_vocab(self.model)
        self.vocab_size = L.llama_vocab_n_tokens(self.vocab)
        self.memory = L.llama_get_memory(self.ctx)
        self.batch = L.llama_batch_init(512, 0, n_seq)
        self.sampler = L.llama_sampler_init_greedy()

    def clear(self):
        L.llama_memory_clear(self.memory, True)

    def fill(self, items):
        """items: (token, pos, seq, wants_logits) — at most 512."""
        b = self.batch
        for i, (token, pos, seq, logits) in enumerate(items):
            b.token[i] = token
            b.pos[i] = pos
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = seq
            b.logits[i] = 1 if logits else 0
        b.n_tokens = len(items)
        rc = L.llama_decode(self.ctx, b)
        if rc != 0:
            raise SystemExit(f"llama_decode failed: {rc}")

    def prefill(self, tokens, seq, start=0):
        """Prompt `tokens` of sequence `seq` from position `start`, in chunks of 512;
        returns the greedy next token."""
        for at in range(0, len(tokens), 512):
            chunk = tokens[at:at + 512]
            last = at + len(chunk) == len(tokens)
            self.fill([(t, start + at + i, seq, last and i == len(chunk) - 1) for i, t in enumerate(chunk)])
        return L.llama_sampler_sample(self.sampler, self.ctx, -1)

    def decode(self, batch, prompt_tokens, steps):
        """`batch` sequences, each after its own prompt, `steps` tokens each; tokens/s."""
        self.clear()
        nxt = [self.prefill(tokens_of(prompt_tokens, self.vocab_size, 7 + s), s) for s in range(batch)]
        pos = prompt_tokens
        started = time.perf_counter()
        for _ in range(steps):
            self.fill([(nxt[s], pos, s, True) for s in range(batch)])
            nxt = [L.llama_sampler_sample(self.sampler, self.ctx, s) for s in range(batch)]
            pos += 1
        return batch * steps / (time.perf_counter() - started)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--persona-tokens", type=int, default=0)
    ap.add_argument("--line-tokens", type=int, default=20)
    ap.add_argument("--requests", type=int, default=5)
    args = ap.parse_args()
    batches = [int(b) for b in args.batch.split(",")]
    # llama.cpp splits the context evenly among the sequences: each needs room for the
    # longest of its uses.
    per_sequence = max(args.prompt_tokens + args.tokens + 8, args.persona_tokens + 4 * args.line_tokens + 64)
    n_ctx = max(batches) * per_sequence
    runner = Runner(args.model, args.threads, n_ctx, max(batches))
    out = {"llama_cpp_python": L.__version__, "threads": args.threads, "model": args.model}

    runner.decode(1, 16, 8)  # warm-up: weights paged in, threads started
    out["decode"] = [{"batch": b, "decode_tokens_per_s": runner.decode(b, args.prompt_tokens, args.tokens)} for b in batches]

    runner.clear()
    prompt = tokens_of(args.prompt_tokens, runner.vocab_size, 99)
    started = time.perf_counter()
    runner.prefill(prompt, 0)
    took = time.perf_counter() - started
    out["prefill_prompt_tokens"] = args.prompt_tokens
    out["prefill_tokens_per_s"] = args.prompt_tokens / took
    out["time_to_first_token_ms"] = took * 1000

    if args.persona_tokens:
        cold, warm = [], []
        for r in range(args.requests):
            persona = tokens_of(args.persona_tokens, runner.vocab_size, 1000 + r)
            line = tokens_of(args.line_tokens, runner.vocab_size, 5000 + r)
            runner.clear()
            started = time.perf_counter()
            runner.prefill(persona + line, 0)
            cold.append((time.perf_counter() - started) * 1000)
        shared = tokens_of(args.persona_tokens, runner.vocab_size, 42)
        runner.clear()
        runner.prefill(shared, 0)  # the request that filled the cache
        for r in range(args.requests):
            line = tokens_of(args.line_tokens, runner.vocab_size, 7000 + r)
            L.llama_memory_seq_rm(runner.memory, 0, len(shared), -1)  # back to the persona
            started = time.perf_counter()
            runner.prefill(line, 0, start=len(shared))
            warm.append((time.perf_counter() - started) * 1000)
        out["persona"] = {
            "prompt_tokens": args.persona_tokens + args.line_tokens,
            "cold_ttft_ms": statistics.median(cold),
            "warm_ttft_ms": statistics.median(warm),
        }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
