"""FP8 against bf16 matmuls on the GPU at decode row counts, and a profile of the compiled engine's FP8 decode
(docs/benchmarks.md, "FP8 and bitsandbytes on the GPU"). Run on the device after the 7B formats recipe:
    python3 scripts/fp8_gemm_probe.py [runs/gpu-qwen2-7b-formats/artifacts/fp8-dynamic]
Times: wall clock over 50 calls after 5 warm-ups, synchronized; bandwidth = weight bytes / time."""

from __future__ import annotations

import sys
import time

import torch


def timed(f, n: int = 50) -> float:
    for _ in range(5):
        f()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        f()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n * 1e6


def main() -> None:
    one = torch.tensor(1.0, device="cuda")
    for m in (1, 8, 32):
        for n, k in ((18944 * 2, 3584), (3584, 18944), (4608, 3584)):  # Qwen2-7B: gate+up, down, qkv
            w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            wq, xq = w.to(torch.float8_e4m3fn), x.to(torch.float8_e4m3fn)
            sx, sw = torch.ones(m, 1, device="cuda"), torch.ones(1, n, device="cuda")
            tb = timed(lambda x=x, w=w: x @ w.t())
            tf = timed(lambda xq=xq, wq=wq, a=sx, b=sw: torch._scaled_mm(xq, wq.t(), a, b, out_dtype=torch.bfloat16))
            tt = timed(lambda xq=xq, wq=wq: torch._scaled_mm(xq, wq.t(), one, one, out_dtype=torch.bfloat16))
            print(f"M={m} N={n} K={k}: bf16 {tb:.1f} us ({n * k * 2 / tb / 1e3:.0f} GB/s)  fp8 row-wise {tf:.1f} us "
                  f"({n * k / tf / 1e3:.0f} GB/s)  fp8 per-tensor {tt:.1f} us")
    if len(sys.argv) > 1:
        from torch.profiler import ProfilerActivity, profile

        from quantpipe.runtimes.compiled import CompiledRuntime

        rt = CompiledRuntime(sys.argv[1], "cuda")
        ids = torch.randint(0, 1000, (1, 512))
        rt.generate(ids, 16)
        with profile(activities=[ProfilerActivity.CUDA]) as p:
            rt.generate(ids, 32)
            torch.cuda.synchronize()
        print(p.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=70))


if __name__ == "__main__":
    main()
