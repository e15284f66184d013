"""Speed and memory benchmark of one artifact in one runtime through the runtime contract, in a process of its own.

Per batch size: time to first token (a 1-token generation = prefill), prefill tokens/s, and decode tokens/s
= batch x (gen_len - 1) / (time of a gen_len generation - time to first token). Warm-up runs are discarded and
the median of the repeats is reported. Peak resident memory is the bench process's own high-water mark
(VmHWM), so each variant's figure is its own; `load_rss_mib` is what loading the artifact added. On a CPU, one
more (untimed) generation at the largest batch follows, with glibc's malloc returning freed blocks and the
high-water mark restarted (isolate.start_memory_pass): `pass_rss_mib` is its peak, the process's memory without
the free blocks glibc otherwise keeps (a different 30-90 MiB on each run), which is what `quantpipe plan`'s
prediction is checked against.

The runtime is the recipe's choice (`bench.runtimes`): `auto` is the format's own runtime, and on a GPU the
compiled engine (runtimes/compiled.py: static KV cache, low-bit kernels, decode step in CUDA graphs) for the
formats it loads. The memory-bandwidth limit: the device's copy bandwidth is measured in the same process, and
a batch of B decodes at most B x bandwidth / (weight bytes a step reads + B x KV-cache bytes it reads) tokens/s;
`frac_of_limit` is the measured decode rate over that.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import psutil
import torch
from tqdm import tqdm

from quantpipe import isolate, runtimes


def _timed(fn: Any, *args: Any) -> float:
    t = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t


def prompt_batch(prompt_ids: list[int], prompt_len: int, batch: int) -> torch.Tensor:
    """`batch` different prompts of exactly `prompt_len` ids, cut from the given ids (repeated if short)."""
    need = prompt_len + batch
    ids = (prompt_ids * (need // max(1, len(prompt_ids)) + 1))[:need]
    return torch.tensor([ids[b:b + prompt_len] for b in range(batch)], dtype=torch.long)


def copy_bandwidth(device: str, mib: int | None = None, repeats: int = 10) -> float:
    """Measured device-memory copy bandwidth in bytes/s (bytes read + bytes written over the best time)."""
    n = (mib or (2048 if device == "cuda" else 128)) * 2**20
    src = torch.empty(n, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        dst.copy_(src)
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    del src, dst
    return 2 * n / best



def decode_limit(weight_bytes: int | None, kv_bytes_per_pos: int | None, positions: float, batch: int,
                 bandwidth: float | None) -> float | None:
    """Upper bound of decode tokens/s from memory traffic: each step reads the weights once and every
    sequence's KV cache (`positions` entries of `kv_bytes_per_pos`)."""
    if not weight_bytes or not bandwidth:
        return None
    step_bytes = weight_bytes + batch * (kv_bytes_per_pos or 0) * positions
    return batch * bandwidth / step_bytes


def no_native_speed(meta: Any, device: str) -> str | None:
    """Why the bench measures no speed of an artifact on this device: its format computes on tensor cores the
    device does not have (FP4 before Blackwell), so what would run is emulation, not the format's speed. The
    method says so in the artifact's `native_compute` ({what, min_cuda_capability})."""
    need = meta.extra("native_compute")
    if not need:
        return None
    cap = tuple(need.get("min_cuda_capability") or (0, 0))
    have = torch.cuda.get_device_capability() if device == "cuda" and torch.cuda.is_available() else None
    if have is not None and tuple(have) >= cap:
        return None
    where = "a CPU" if have is None else f"this GPU (compute capability {have[0]}.{have[1]})"
    return (f"speed not measured: {need.get('what')} need compute capability {cap[0]}.{cap[1]} or later; on {where} "
            "the format is only emulated (quality is measured, dequantized)")


def run_bench(artifact_dir: Path, cfg: dict[str, Any], prompt_ids: list[int], runtime: str = "auto"
              ) -> dict[str, Any]:
    """Benchmark in this process. cfg keys: device, prompt_len, gen_len, batch_sizes, warmup, repeats, threads."""
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))
    proc = psutil.Process()
    device = runtimes.pick_device(cfg.get("device", "auto"))
    runtimes.preload(artifact_dir, runtime, device)
    rss0 = proc.memory_info().rss
    t = time.perf_counter()
    rt = runtimes.load(artifact_dir, device, runtime)
    load_s = time.perf_counter() - t
    load_rss = proc.memory_info().rss - rss0
    caps = runtimes.capabilities(rt)
    out: dict[str, Any] = {"runtime": rt.name, "device": rt.device, "engine": rt.engine,
                           "threads": rt.threads or torch.get_num_threads(), "load_s": load_s, "per_batch": {}}
    if rt.fallback_note:
        out["engine_note"] = rt.fallback_note
    weight_bytes, kv_pos = rt.decode_bytes(), rt.kv_bytes_per_position()
    gen_len = int(cfg["gen_len"])
    static = caps.static_cache
    for b in cfg["batch_sizes"]:
        x = prompt_batch(prompt_ids, int(cfg["prompt_len"]), b)
        if static:  # compile and capture this batch's graphs before any timing: the decode step's on the first
            rt.generate(x, gen_len)  # call, the prompt's on the second (the compiled runtime captures a prompt
            rt.generate(x, 1)  # shape the second time it sees it)
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
        positions = rt.cache_length(x.shape[1], gen_len)
        out["per_batch"][str(b)] = {
            "ttft_s": t1,
            "prefill_tok_s": b * x.shape[1] / t1,
            # None when the decode steps took no measurable time beyond the first token (noise)
            "decode_tok_s": decode,
            "e2e_s": tn,
            "kv_positions_read": positions,
        }
    out["kernel"] = rt.kernel()
    out["peak_rss_mib"] = isolate.peak_rss_mib()
    if rt.device == "cpu" and cfg["batch_sizes"] and isolate.start_memory_pass():
        # one untimed generation at the largest batch, with glibc returning what is freed: its peak is the memory
        # `quantpipe plan` predicts (weights + KV cache + activations), without the allocator's retained free blocks
        b = max(int(x) for x in cfg["batch_sizes"])
        rt.generate(prompt_batch(prompt_ids, int(cfg["prompt_len"]), b), gen_len)
        out["pass_rss_mib"] = isolate.peak_rss_mib()
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
    bandwidth = copy_bandwidth(rt.device) if weight_bytes else None
    out.update(weight_bytes_per_step=weight_bytes, kv_bytes_per_position=kv_pos,
               copy_bandwidth_gbs=None if bandwidth is None else bandwidth / 1e9)
    for b, row in out["per_batch"].items():
        limit = decode_limit(weight_bytes, kv_pos, row["kv_positions_read"], int(b), bandwidth)
        row["limit_tok_s"] = limit
        row["frac_of_limit"] = None if row["decode_tok_s"] is None or limit is None else row["decode_tok_s"] / limit
    rt.close()
    return out


def prompt_ids(artifact: Path, meta: Any, n_random: int) -> list[int]:
    """Prompt ids for `quantpipe bench` on one artifact: the bundled eval text in the artifact's own tokenization
    (llama.cpp's for a GGUF), or `n_random` seeded random ids of the vocabulary for a random-weight artifact
    (it has no tokenizer)."""
    from transformers import AutoConfig, AutoTokenizer

    from quantpipe.archs import random_ids
    from quantpipe.data import eval_text
    from quantpipe.errors import QuantpipeError, first_line

    text = eval_text().read_text(encoding="utf-8")
    if meta.weights == "random":
        return random_ids(AutoConfig.from_pretrained(artifact).vocab_size, n_random, int(meta.seed or 0))
    if meta.format == "gguf":  # the vocabulary is inside the .gguf: llama.cpp tokenizes
        from quantpipe.backends import llamacpp_tools

        gguf = artifact / str(meta.file)
        llamacpp_tools.check_gguf(gguf)
        return llamacpp_tools.tokenize(gguf, text)
    try:
        tok = AutoTokenizer.from_pretrained(artifact)
    except (OSError, ValueError) as e:
        raise QuantpipeError(f"{artifact}: no usable tokenizer for the prompt ({first_line(e)})") from None
    return tok(text, add_special_tokens=False).input_ids


def bench_job(arg: tuple[str, dict[str, Any], list[int], str, list[str]]) -> dict[str, Any]:
    """The bench stage's body in its own process (isolate.run). Runtimes registered from modules outside
    quantpipe's runtimes package are imported first, so the fresh process knows them too."""
    import importlib

    artifact_dir, cfg, prompt_ids, runtime, plugins = arg
    for module in plugins:
        importlib.import_module(module)
    return run_bench(Path(artifact_dir), cfg, prompt_ids, runtime)


def bench_in_subprocess(artifact_dir: Path, cfg: dict[str, Any], prompt_ids: list[int], work: Path,
                        runtime: str = "auto", label: str = "bench") -> dict[str, Any]:
    """run_bench in a fresh Python process (a clean peak-memory figure; a runtime crash cannot kill the run)."""
    plugins = sorted({spec.load.__module__ for spec in runtimes.all_runtimes().values()
                      if not spec.load.__module__.startswith("quantpipe.runtimes")})
    arg = (str(Path(artifact_dir).absolute()), cfg, prompt_ids, runtime, plugins)
    return isolate.run("quantpipe.bench:bench_job", arg, work, label, what="the benchmark process",
                       who="the benchmark")
