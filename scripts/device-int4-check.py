"""Checks, on a CUDA GPU, the exact int4/int8 weight layouts that src/inference/qlinear.rs
builds (group-wise min-max codes, two codes per byte with the even column in the high
nibble, scales and zeros as [K/32, N, 2] in bf16), against a dequantized reference, and
times batch-1 linear layers of SmolLM2-135M and Llama-3-8B shapes: bf16 vs int8 vs int4.
Also allocates every linear layer of an 8B model in int4 and reports the GPU memory.

Run with PyTorch (the kernels are the same ATen ops the Rust engine calls through tch):
    python3 scripts/device-int4-check.py > int4-check.json
"""
import json
import torch

G = 32
dev = "cuda"
torch.manual_seed(0)


def int4_codes(w):
    n, k = w.shape
    g = w.float().reshape(n, k // G, G)
    mn, mx = g.amin(2, keepdim=True), g.amax(2, keepdim=True)
    scale = (mx - mn).clamp_min(1e-8) / 15
    q = ((g - mn) / scale).round().clamp(0, 15).to(torch.int64)
    zero = mn + scale * 8
    return q.reshape(n, k), scale.squeeze(2), zero.squeeze(2)


def tiles(k):
    return next(t for t in (8, 4, 2) if k % (t * 16) == 0)


def int4_pack(w, with_reference=True):
    q, s, z = int4_codes(w)
    n, k = w.shape
    packed = torch._convert_weight_to_int4pack(((q[:, ::2] << 4) | q[:, 1::2]).to(torch.uint8), tiles(k))
    sz = torch.stack([s, z], 2).transpose(0, 1).contiguous().bfloat16()
    if not with_reference:
        return packed, sz, None
    ref = ((q.float() - 8).reshape(n, k // G, G) * s[..., None] + z[..., None]).reshape(n, k)
    return packed, sz, ref


def int8_pack(w):
    scales = w.float().abs().amax(1).clamp_min(1e-8) / 127
    q = (w.float() / scales[:, None]).round().clamp(-127, 127).to(torch.int8)
    return q, scales.bfloat16(), q.float() * scales[:, None]


def time_ms(fn, reps=200):
    for _ in range(10):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


SHAPES = {
    "smollm2-135m": dict(layers=30, linears=[(960, 576), (576, 576), (3072, 576), (576, 1536)], head=(49152, 576)),
    "llama3-8b": dict(layers=32, linears=[(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)], head=(128256, 4096)),
}
report = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(0), "layers": [], "models": {}}
for model, spec in SHAPES.items():
    per_token = {"bf16": 0.0, "int8": 0.0, "int4": 0.0}
    for (n, k) in spec["linears"] + [spec["head"]]:
        mult = spec["layers"] if (n, k) != spec["head"] else 1
        w = torch.randn(n, k, device=dev) * 0.02
        x1 = torch.randn(1, k, device=dev).bfloat16()
        x8 = torch.randn(8, k, device=dev).bfloat16()
        p4, sz, ref4 = int4_pack(w)
        q8, s8, ref8 = int8_pack(w)
        wb = w.bfloat16()
        y4 = torch._weight_int4pack_mm(x8, p4, G, sz)
        y8 = torch._weight_int8pack_mm(x8, q8, s8)
        row = {
            "model": model, "shape": [n, k],
            "int4_vs_dequantized_reference": rel(y4, x8.float() @ ref4.T),
            "int4_vs_bf16": rel(y4, x8.float() @ w.T),
            "int8_vs_dequantized_reference": rel(y8, x8.float() @ ref8.T),
            "int8_vs_bf16": rel(y8, x8.float() @ w.T),
            "ms_bf16": time_ms(lambda: torch.nn.functional.linear(x1, wb)),
            "ms_int8": time_ms(lambda: torch._weight_int8pack_mm(x1, q8, s8)),
            "ms_int4": time_ms(lambda: torch._weight_int4pack_mm(x1, p4, G, sz)),
        }
        for kind in per_token:
            per_token[kind] += row[f"ms_{kind}"] * mult
        report["layers"].append(row)
        print(json.dumps(row), flush=True)
        del w, p4, sz, ref4, q8, s8, ref8, wb
    report["models"][model] = {"linear_ms_per_token_batch1": per_token}
torch.cuda.empty_cache()

# Every linear layer of an 8B model, int4, resident on the GPU at once.
spec = SHAPES["llama3-8b"]
torch.cuda.reset_peak_memory_stats()
base = torch.cuda.memory_allocated()
kept = []
for _ in range(spec["layers"]):
    for (n, k) in spec["linears"]:
        p4, sz, _ = int4_pack(torch.randn(n, k, device=dev) * 0.02, False)
        kept.append((p4, sz))
p4, sz, _ = int4_pack(torch.randn(*spec["head"], device=dev) * 0.02, False)
kept.append((p4, sz))
embed_int8 = torch.zeros(spec["head"], dtype=torch.int8, device=dev)  # the int8 embedding
torch.cuda.synchronize()
report["models"]["llama3-8b"]["int4_weights_gib"] = (torch.cuda.memory_allocated() - base) / 2**30
report["models"]["llama3-8b"]["bf16_weights_gib"] = 8.03e9 * 2 / 2**30
print(json.dumps(report["models"]), flush=True)
json.dump(report, open(__import__("os").environ.get("OUT", ".") + "/int4-check.json", "w"), indent=1)
