"""Speed and memory benchmark of one artifact through the runtime contract, run in a process of its own.

Per batch size: time to first token (a 1-token generation = prefill), prefill tokens/s, and decode tokens/s
= batch x (gen_len - 1) / (time of a gen_len generation - time to first token). Warm-up runs are discarded and
the median of the repeats is reported. Peak resident memory is the bench process's own high-water mark
(VmHWM), so each variant's figure is its own; `load_rss_mib` is what loading the artifact added.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import torch
from tqdm import tqdm

from quantpipe import runtimes
from quantpipe.errors import QuantpipeError


def _timed(fn: Any, *args: Any) -> float:
    t = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t


def peak_rss_mib() -> float:
    """This process's resident-memory high-water mark. VmHWM belongs to the address space made at exec, unlike
    ru_maxrss, which Linux carries over from the parent across fork + exec (every child would report the
    parent's peak)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def prompt_batch(prompt_ids: list[int], prompt_len: int, batch: int) -> torch.Tensor:
    """`batch` different prompts of exactly `prompt_len` ids, cut from the given ids (repeated if short)."""
    need = prompt_len + batch
    ids = (prompt_ids * (need // max(1, len(prompt_ids)) + 1))[:need]
    return torch.tensor([ids[b:b + prompt_len] for b in range(batch)], dtype=torch.long)


def run_bench(artifact_dir: Path, cfg: dict[str, Any], prompt_ids: list[int]) -> dict[str, Any]:
    """Benchmark in this process. cfg keys: device, prompt_len, gen_len, batch_sizes, warmup, repeats, threads."""
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))
    proc = psutil.Process()
    runtimes.preload(artifact_dir)
    rss0 = proc.memory_info().rss
    t = time.perf_counter()
    rt = runtimes.load(artifact_dir, cfg.get("device", "auto"))
    load_s = time.perf_counter() - t
    load_rss = proc.memory_info().rss - rss0
    out: dict[str, Any] = {"runtime": rt.name, "device": rt.device,
                           "threads": getattr(rt, "threads", torch.get_num_threads()),
                           "load_s": load_s, "per_batch": {}}
    gen_len = int(cfg["gen_len"])
    for b in cfg["batch_sizes"]:
        x = prompt_batch(prompt_ids, int(cfg["prompt_len"]), b)
        ttft, full = [], []
        for i in tqdm(range(cfg["warmup"] + cfg["repeats"]), desc=f"  bench batch {b}", leave=False):
            t1 = _timed(rt.generate, x, 1)
            tn = _timed(rt.generate, x, gen_len)
            if i >= cfg["warmup"]:
                ttft.append(t1)
                full.append(tn)
        t1, tn = statistics.median(ttft), statistics.median(full)
        out["per_batch"][str(b)] = {
            "ttft_s": t1,
            "prefill_tok_s": b * x.shape[1] / t1,
            # None when the decode steps took no measurable time beyond the first token (noise)
            "decode_tok_s": b * (gen_len - 1) / (tn - t1) if tn > t1 and gen_len > 1 else None,
            "e2e_s": tn,
        }
    out["kernel"] = rt.kernel() if hasattr(rt, "kernel") else "unknown"
    out["peak_rss_mib"] = peak_rss_mib()
    out["load_rss_mib"] = load_rss / 2**20
    out["base_rss_mib"] = rss0 / 2**20  # before loading, libraries imported: peak - base is the model's share
    if rt.device == "cuda":
        out["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    rt.close()
    return out


def bench_in_subprocess(artifact_dir: Path, cfg: dict[str, Any], prompt_ids: list[int], work: Path) -> dict[str, Any]:
    """Run run_bench in a fresh Python process (clean peak-memory figure; a runtime crash cannot kill the run)."""
    work.mkdir(parents=True, exist_ok=True)
    req, res = work / "bench-request.json", work / "bench-result.json"
    res.unlink(missing_ok=True)
    req.write_text(json.dumps({"cfg": cfg, "prompt_ids": prompt_ids}))
    cmd = [sys.executable, "-m", "quantpipe", "bench", str(artifact_dir), "--request", str(req), "--out", str(res)]
    from quantpipe.worker import PARENT_ENV

    proc = subprocess.run(cmd, env={**os.environ, PARENT_ENV: str(os.getpid())})  # it dies with this process
    if proc.returncode != 0 or not res.is_file():
        raise QuantpipeError(f"benchmark of {artifact_dir} failed (exit code {proc.returncode}; its message is above)")
    return json.loads(res.read_text())
