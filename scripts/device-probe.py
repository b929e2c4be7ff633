"""Where a CUDA decode step's time goes, on the device: what the machine charges for a
launch and for a synchronizing copy, and what an eager PyTorch step of SmolLM2-135M's
shape (bf16, random weights, one token, KV cache of 64 positions) costs with the same
kernels Ludus calls, plain and replayed as a CUDA graph. The ceiling `ludus bench decode
--device cuda` is compared with in docs/benchmarks.md.

    python3 scripts/device-probe.py > probe.json
"""
import json
import time

import torch
import torch.nn.functional as F

dev = "cuda"
torch.manual_seed(0)


def median_ms(fn, repeat=50, warmup=5):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    return times[len(times) // 2]


report = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(0)}
x = torch.randn(1024, device=dev)
# One tiny kernel then a synchronize: the floor of any step that reads a result.
report["launch_and_sync_ms"] = median_ms(lambda: x.add_(1.0))
# 1,000 tiny kernels, synchronized once: the cost of one launch.
report["launch_us"] = median_ms(lambda: [x.add_(1.0) for _ in range(1000)], repeat=10) * 1e3 / 1000
logits = torch.randn(49152, device=dev)
report["copy_logits_to_host_ms"] = median_ms(lambda: logits.cpu())
ids = list(range(8))
report["copy_ids_to_device_ms"] = median_ms(lambda: torch.tensor(ids, device=dev))

# SmolLM2-135M: 30 layers, hidden 576, 9 heads of 64, 3 KV heads, FFN 1536, vocab 49152.
L, D, H, KV, HD, F_, V, T = 30, 576, 9, 3, 64, 1536, 49152, 64
kind = torch.bfloat16
layers = [dict(qkv=torch.randn((H + 2 * KV) * HD, D, device=dev, dtype=kind) * 0.02,
               o=torch.randn(D, H * HD, device=dev, dtype=kind) * 0.02,
               gate_up=torch.randn(2 * F_, D, device=dev, dtype=kind) * 0.02,
               down=torch.randn(D, F_, device=dev, dtype=kind) * 0.02,
               n1=torch.ones(D, device=dev, dtype=kind), n2=torch.ones(D, device=dev, dtype=kind),
               k=torch.randn(1, KV, T, HD, device=dev, dtype=kind), v=torch.randn(1, KV, T, HD, device=dev, dtype=kind))
          for _ in range(L)]
embed = torch.randn(V, D, device=dev, dtype=kind) * 0.02
mask = torch.zeros(1, 1, 1, T, device=dev, dtype=kind)


def rms(h, w):
    return h * torch.rsqrt(h.float().pow(2).mean(-1, keepdim=True) + 1e-5).to(h.dtype) * w


def step(token):
    h = embed.index_select(0, token)
    for lay in layers:
        qkv = F.linear(rms(h, lay["n1"]), lay["qkv"])
        q = qkv[:, : H * HD].view(1, KV, H // KV, HD)
        attn = F.scaled_dot_product_attention(q, lay["k"], lay["v"], attn_mask=mask)
        h = h + F.linear(attn.reshape(1, H * HD), lay["o"])
        gate, up = F.linear(rms(h, lay["n2"]), lay["gate_up"]).chunk(2, -1)
        h = h + F.linear(F.silu(gate) * up, lay["down"])
    return F.linear(h, embed).float()


token = torch.tensor([5], device=dev)
with torch.no_grad():
    for cudnn in (True, False):
        torch.backends.cuda.enable_cudnn_sdp(cudnn)
        report[f"eager_step_ms_cudnn_attention_{'on' if cudnn else 'off'}"] = median_ms(lambda: step(token))
    report["eager_step_ms"] = median_ms(lambda: step(token))
    report["eager_step_with_host_copy_ms"] = median_ms(lambda: step(token).argmax().item())
    static_out = None
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            step(token)
    torch.cuda.current_stream().wait_stream(stream)
    with torch.cuda.graph(graph):
        static_out = step(token)
    report["graph_step_ms"] = median_ms(lambda: graph.replay())
print(json.dumps(report, indent=1))
