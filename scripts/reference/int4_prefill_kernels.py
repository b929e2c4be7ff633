"""Why int4 prefill is slow on CPU (issue 20): one SmolLM2-135M projection at prefill
width (128 rows, the default prefill chunk) and at decode width (1 row), through libtorch's
f32 matmul, bf16 matmul (oneDNN), the int4 kernel the engine uses
(`_weight_int4pack_mm_for_cpu`, bf16 activations) and a plain dequantization of the same
int4 codes to bf16. Times in ms, best of 3 runs of 20.

  ~/.cache/ludus/venv/bin/python scripts/reference/int4_prefill_kernels.py [THREADS]
"""

import sys
import time

import torch

torch.manual_seed(0)
torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 2)


def best_ms(f, n=20):
    f()
    runs = []
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(n):
            f()
        runs.append((time.perf_counter() - t) / n * 1000)
    return min(runs)


print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
for rows in (1, 128):
    for k, n in ((576, 1536), (1536, 576)):
        x, w = torch.randn(rows, k), torch.randn(n, k)
        xb, wb = x.bfloat16(), w.bfloat16()
        codes = torch.randint(0, 16, (n, k), dtype=torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2)
        scales_zeros = torch.randn(k // 32, n, 2).bfloat16()
        codes8 = codes.to(torch.uint8).view(n, k // 32, 32)
        scale, zero = scales_zeros[..., 0].t().unsqueeze(-1), scales_zeros[..., 1].t().unsqueeze(-1)
        f32 = best_ms(lambda: x @ w.t())
        bf16 = best_ms(lambda: xb @ wb.t())
        int4 = best_ms(lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(xb, packed, 32, scales_zeros))
        dequant = best_ms(lambda: ((codes8.to(torch.bfloat16) - 8) * scale + zero).view(n, k))
        print(f"rows {rows:3} [{k}x{n}]: f32 {f32:.3f}  bf16 {bf16:.3f}  int4 {int4:.3f}  "
              f"dequant int4->bf16 {dequant:.3f} ms  (int4/f32 x{int4 / f32:.2f}, int4/bf16 x{int4 / bf16:.2f})")
