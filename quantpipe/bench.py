"""Speed and memory benchmark of one artifact through the runtime contract, run in a process of its own.

Per batch size: time to first token (a 1-token generation = prefill), prefill tokens/s, and decode tokens/s
= batch x (gen_len - 1) / (time of a gen_len generation - time to first token). Warm-up runs are discarded and
the median of the repeats is reported. Peak resident memory is the bench process's own high-water mark
(VmHWM), so each variant's figure is its own; `load_rss_mib` is what loading the artifact added.

Engines: `eager` is the artifact's runtime as eval uses it (transformers `generate` with a dynamic cache,
llama.cpp, ONNX Runtime); `compiled` is engine.py (static KV cache, low-bit kernels, the decode step in CUDA
graphs on a GPU); `auto` takes `compiled` on a GPU for transformers artifacts. The memory-bandwidth limit:
the device's copy bandwidth is measured in the same process, and a batch of B decodes at most
B x bandwidth / (weight bytes a step reads + B x KV-cache bytes it reads) tokens/s; `frac_of_limit` is the
measured decode rate over that.
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


def load_for_bench(artifact_dir: Path, device: str, engine_name: str = "auto") -> tuple[Any, str, str | None]:
    """(runtime, engine description, why the compiled engine was not used or None)."""
    from quantpipe import engine

    device = runtimes.pick_device(device)
    is_hf = runtimes.read_meta(artifact_dir).get("runtime") == "hf"
    want = engine_name == "compiled" or (engine_name == "auto" and device == "cuda")
    why = None
    if want and not is_hf:
        why = "the compiled engine serves transformers artifacts; this one has its own runtime"
    elif want:
        try:
            rt = engine.CompiledRuntime(artifact_dir, device)
            return rt, rt.engine, None
        except engine.Unsupported as e:
            why = f"no low-bit kernel here for this format ({e})"
    rt = runtimes.load(artifact_dir, device)
    label = {"hf": "transformers generate, dynamic KV cache (eager)"}.get(rt.name, f"{rt.name} runtime")
    return rt, label, why


def decode_limit(weight_bytes: int | None, kv_bytes_per_pos: int | None, positions: float, batch: int,
                 bandwidth: float | None) -> float | None:
    """Upper bound of decode tokens/s from memory traffic: each step reads the weights once and every
    sequence's KV cache (`positions` entries of `kv_bytes_per_pos`)."""
    if not weight_bytes or not bandwidth:
        return None
    step_bytes = weight_bytes + batch * (kv_bytes_per_pos or 0) * positions
    return batch * bandwidth / step_bytes


def run_bench(artifact_dir: Path, cfg: dict[str, Any], prompt_ids: list[int]) -> dict[str, Any]:
    """Benchmark in this process. cfg keys: device, prompt_len, gen_len, batch_sizes, warmup, repeats, threads,
    engine."""
    from quantpipe import engine

    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))
    proc = psutil.Process()
    runtimes.preload(artifact_dir)
    rss0 = proc.memory_info().rss
    t = time.perf_counter()
    rt, engine_label, why = load_for_bench(artifact_dir, cfg.get("device", "auto"), cfg.get("engine", "auto"))
    load_s = time.perf_counter() - t
    load_rss = proc.memory_info().rss - rss0
    out: dict[str, Any] = {"runtime": rt.name, "device": rt.device, "engine": engine_label,
                           "threads": getattr(rt, "threads", torch.get_num_threads()),
                           "load_s": load_s, "per_batch": {}}
    if why:
        out["engine_note"] = why
    weight_bytes = rt.decode_bytes() if hasattr(rt, "decode_bytes") else None
    kv_pos = rt.kv_bytes_per_position() if hasattr(rt, "kv_bytes_per_position") else None
    gen_len = int(cfg["gen_len"])
    static = isinstance(rt, engine.CompiledRuntime)
    for b in cfg["batch_sizes"]:
        x = prompt_batch(prompt_ids, int(cfg["prompt_len"]), b)
        if static:  # compile and capture this batch's graphs before any timing
            rt.generate(x, gen_len)
        ttft, full = [], []
        for i in tqdm(range(cfg["warmup"] + cfg["repeats"]), desc=f"  bench batch {b}", leave=False):
            t1 = _timed(rt.generate, x, 1)
            tn = _timed(rt.generate, x, gen_len)
            if i >= cfg["warmup"]:
                ttft.append(t1)
                full.append(tn)
        t1, tn = statistics.median(ttft), statistics.median(full)
        decode = b * (gen_len - 1) / (tn - t1) if tn > t1 and gen_len > 1 else None
        # KV entries a step reads: the whole static cache, or on average the dynamic cache's middle length
        positions = rt.cache_length(x.shape[1], gen_len) if static else x.shape[1] + gen_len / 2
        out["per_batch"][str(b)] = {
            "ttft_s": t1,
            "prefill_tok_s": b * x.shape[1] / t1,
            # None when the decode steps took no measurable time beyond the first token (noise)
            "decode_tok_s": decode,
            "e2e_s": tn,
            "kv_positions_read": positions,
        }
    out["kernel"] = rt.kernel() if hasattr(rt, "kernel") else "unknown"
    out["peak_rss_mib"] = peak_rss_mib()
    out["load_rss_mib"] = load_rss / 2**20
    out["base_rss_mib"] = rss0 / 2**20  # before loading, libraries imported: peak - base is the model's share
    if rt.device == "cuda":
        free, total = torch.cuda.mem_get_info()
        out.update(peak_gpu_mib=torch.cuda.max_memory_allocated() / 2**20,
                   peak_gpu_reserved_mib=torch.cuda.max_memory_reserved() / 2**20,
                   # what the driver reports in use on the device (this process's context and cache included)
                   gpu_driver_used_mib=(total - free) / 2**20, gpu_total_mib=total / 2**20,
                   gpu=torch.cuda.get_device_name())
    # the copy's buffers come after every memory figure is read, so they are not in them
    bandwidth = engine.copy_bandwidth(rt.device) if weight_bytes else None
    out.update(weight_bytes_per_step=weight_bytes, kv_bytes_per_position=kv_pos,
               copy_bandwidth_gbs=None if bandwidth is None else bandwidth / 1e9)
    for b, row in out["per_batch"].items():
        limit = decode_limit(weight_bytes, kv_pos, row["kv_positions_read"], int(b), bandwidth)
        row["limit_tok_s"] = limit
        row["frac_of_limit"] = None if row["decode_tok_s"] is None or limit is None else row["decode_tok_s"] / limit
    rt.close()
    return out


def bench_in_subprocess(artifact_dir: Path, cfg: dict[str, Any], prompt_ids: list[int], work: Path) -> dict[str, Any]:
    """Run run_bench in a fresh Python process (clean peak-memory figure; a runtime crash cannot kill the run)."""
    work.mkdir(parents=True, exist_ok=True)
    req, res = work / "bench-request.json", work / "bench-result.json"
    res.unlink(missing_ok=True)
    req.write_text(json.dumps({"cfg": cfg, "prompt_ids": prompt_ids}))
    cmd = [sys.executable, "-m", "quantpipe", "bench", str(Path(artifact_dir).absolute()), "--request",
           str(req.absolute()), "--out", str(res.absolute())]
    from quantpipe.worker import PARENT_ENV

    proc = subprocess.run(cmd, env={**os.environ, PARENT_ENV: str(os.getpid())})  # it dies with this process
    if proc.returncode != 0 or not res.is_file():
        raise QuantpipeError(f"benchmark of {artifact_dir} failed (exit code {proc.returncode}; its message is above)")
    return json.loads(res.read_text())
