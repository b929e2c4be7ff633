"""The memory-bandwidth ceiling of batch-1 f32 decode (issue 20): `torch.mv` over an f32
matrix far larger than any cache (450 MB, close to SmolLM2-135M's 538 MB of f32 weights
per token), best of 5 runs of 10 products. Prints one JSON line: threads and GB/s.

  ~/.cache/ludus/venv/bin/python scripts/reference/mv_bandwidth.py [THREADS]
"""

import json
import sys
import time

import torch

torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
w = torch.randn(24576, 4608)  # 452,984,832 bytes
x = torch.randn(4608)
torch.mv(w, x)


def one_run():
    t = time.perf_counter()
    for _ in range(10):
        torch.mv(w, x)
    return (time.perf_counter() - t) / 10


best = min(one_run() for _ in range(5))
print(json.dumps({"threads": torch.get_num_threads(), "bytes": w.numel() * 4, "gb_s": w.numel() * 4 / best / 1e9}))
