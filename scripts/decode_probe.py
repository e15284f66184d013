"""GPU decode measurements outside a recipe (docs/benchmarks.md, "GPU decode at the bandwidth limit"):

  random DIR --arch qwen2-7b          a random-weight bf16 checkpoint of a shipped shape (quantpipe artifact)
  w4 SRC DIR [--asym] [--group 128] [--bits 8] [--head]
                                      a compressed-tensors W4A16 (or W8A16) checkpoint of SRC's shape with random
                                      values and scales (the layout llm-compressor's GPTQ/AWQ write; no
                                      quantization is run: for kernel speed only)
  profile DIR --batch 1 [--hf] [--json F]
                                      torch.profiler over 32 decode steps of the compiled runtime (after the
                                      prompt, CUDA graphs captured): the step time, the top kernels and their
                                      share; --hf runs transformers' modeling code instead of the decoder
  crossover [--json F]                Marlin against dequantize + cuBLAS per row count on the Qwen2-7B layer
                                      shapes (W4 g128): where prefill should stop using Marlin
  marlin-opts [--json F]              per 7B projection at 1/8/32 rows, from CUDA graphs: Marlin with float32 and
                                      bfloat16 split-K sums, tinygemm and bf16 cuBLAS
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quantpipe import archs, artifact  # noqa: E402
from quantpipe.artifact import ArtifactMeta  # noqa: E402
from quantpipe.runtimes.marlin import pack_along_k  # noqa: E402


def make_random(out: Path, arch: str) -> None:
    model = archs.random_model(arch, torch.bfloat16)
    model.save_pretrained(out)
    artifact.write(out, ArtifactMeta(variant="baseline", method="baseline", format="safetensors", weights="random",
                                     arch=arch, seed=0))


def make_w4(src: Path, out: Path, asym: bool, group: int, bits: int = 4, head: bool = False) -> None:
    from safetensors.torch import load_file, save_file

    dev = "cuda" if torch.cuda.is_available() else "cpu"  # 7B random values: seconds on a GPU
    g = torch.Generator(dev).manual_seed(0)
    cfg = json.loads((src / "config.json").read_text())
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(src.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    out.mkdir(parents=True, exist_ok=True)
    res: dict[str, torch.Tensor] = {}
    if bits == 8:
        group = 0  # 8-bit: one scale per output channel (what the int8 kernels read)
    for name, t in tensors.items():
        linear = name.startswith("model.layers.") and name.endswith("_proj.weight")
        if not (linear or head and name == "lm_head.weight"):
            res[name] = t
            continue
        n, k = t.shape
        base = name[: -len(".weight")]
        u = torch.randint(0, 1 << bits, (n, k), generator=g, dtype=torch.int64, device=dev)  # signed + 2^(bits-1)
        res[f"{base}.weight_packed"] = pack_along_k(u, bits).t().contiguous().cpu()  # [N, K/per]: along K
        scale = torch.rand(n, k // (group or k), generator=g, device=dev) * 0.002 + 0.001
        res[f"{base}.weight_scale"] = scale.to(torch.bfloat16).cpu()
        res[f"{base}.weight_shape"] = torch.tensor([n, k], dtype=torch.int64)
        if asym:
            z = torch.randint(5, 11, (n, k // group), generator=g, device=dev) - 8  # signed zero points
            res[f"{base}.weight_zero_point"] = pack_along_k((z + 8).t(), 4).cpu()  # [N/8, G]: along N
    save_file({k: v.contiguous() for k, v in res.items()}, str(out / "model.safetensors"))
    cfg["quantization_config"] = {
        "quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
        "ignore": [] if head else ["lm_head"], "kv_cache_scheme": None,
        "config_groups": {"group_0": {"targets": ["Linear"], "format": "pack-quantized", "input_activations": None,
                                      "output_activations": None, "weights": {
            "num_bits": bits, "type": "int", "symmetric": not asym, "group_size": group or None,
            "strategy": "group" if group else "channel",
            "dynamic": False, "actorder": None, "observer": "minmax", "zp_dtype": "torch.int8" if asym else None}}}}
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    for extra in ("generation_config.json",):
        if (src / extra).exists():
            (out / extra).write_text((src / extra).read_text())
    meta = artifact.read(src)
    artifact.write(out, ArtifactMeta(variant="w4-random", method="awq" if asym else "gptq", format="compressed-tensors",
                                     weights="random", arch=meta.arch, seed=0,
                                     params={"bits": bits, "group_size": group or None, "symmetric": not asym,
                                             "lm_head": head}))


def _top(prof: Any, calls: int) -> tuple[float, list[dict[str, Any]]]:
    by_name: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            by_name[ev.name][0] += ev.device_time_total
            by_name[ev.name][1] += 1
    total = sum(v[0] for v in by_name.values())
    top = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:15]
    return total, [{"name": n[:110], "share": round(v[0] / total, 4), "us_per_call": round(v[0] / calls, 1),
                    "launches_per_call": round(v[1] / calls, 2)} for n, v in top]


def _busy_ms(prof: Any) -> float:
    """The GPU's busy time in a profile: the union of its kernels' intervals (kernels on two streams that overlap
    count once), in ms."""
    spans = sorted((ev.time_range.start, ev.time_range.end) for ev in prof.events()
                   if ev.device_type == torch.autograd.DeviceType.CUDA)
    busy, end = 0.0, float("-inf")
    for a, b in spans:
        if b > end:
            busy += b - max(a, end)
            end = b
    return busy / 1e3


def profile_prefill(path: Path, batch: int, out: Path | None) -> None:
    """The prompt pass (512 tokens per sequence) of the compiled runtime, profiled: its wall time (three passes
    back to back) eagerly and as the runtime runs a prompt shape it has seen (replayed from a CUDA graph unless
    QUANTPIPE_PROMPT_GRAPH=0), the sum of the latter's kernel times and the GPU's busy time (their union: less
    than the sum where a second stream overlaps, QUANTPIPE_PREFILL_PREFETCH), and the memory the prompt held
    beyond the weights and cache (allocator peak)."""
    from quantpipe.runtimes.compiled import CompiledRuntime

    rt = CompiledRuntime(path, "cuda")
    vocab = rt.model.config.vocab_size
    x = torch.randint(0, vocab, (batch, 512), generator=torch.Generator().manual_seed(0)).cuda()

    def wall(fn: Any) -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(3):
            fn(x, cache)
        torch.cuda.synchronize()
        return (time.perf_counter() - t0) / 3 * 1e3

    with torch.inference_mode():
        cache = rt._cache(batch, rt.cache_length(512, 128))
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(3):  # eager, captured, replayed
            rt._prompt(x, cache)
        held = (torch.cuda.max_memory_allocated() - base) / 2**20
        eager_ms, ms = wall(rt._prompt_eager), wall(rt._prompt)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            rt._prompt(x, cache)
            torch.cuda.synchronize()
    total, top = _top(prof, 1)
    res = {"artifact": str(path), "kernel": rt.kernels, "engine": rt.engine, "batch": batch,
           "graphed": bool(rt.prompts and rt.prompts.graphs), "prefill_ms": round(ms, 2),
           "eager_ms": round(eager_ms, 2), "kernel_ms": round(total / 1e3, 2), "gpu_busy_ms": round(_busy_ms(prof), 2),
           "prompt_held_mib": round(held, 1), "top_kernels": top}
    text = json.dumps(res, indent=1)
    print(text)
    if out:
        out.write_text(text + "\n")


def profile(path: Path, batch: int, hf: bool, out: Path | None) -> None:
    from quantpipe.runtimes.compiled import CompiledRuntime

    rt = CompiledRuntime(path, "cuda", own_decoder=not hf)
    vocab = rt.model.config.vocab_size
    x = torch.randint(0, vocab, (batch, 512), generator=torch.Generator().manual_seed(0))
    rt.generate(x, 40)  # compiles the step and captures its graph
    length = rt.cache_length(512, 128)
    with torch.inference_mode():
        cache = rt._cache(batch, length)
        xd = x.cuda()
        tok = rt._prompt_eager(xd, cache)
        positions = torch.arange(512, 640, device="cuda")
        for i in range(8):  # warm
            tok = rt._step(tok, positions[i:i + 1], cache).clone()
        torch.cuda.synchronize()
        steps = 32
        t0 = time.perf_counter()
        for i in range(8, 8 + steps):
            tok = rt._step(tok, positions[i:i + 1], cache).clone()
        torch.cuda.synchronize()
        step_ms = (time.perf_counter() - t0) / steps * 1e3
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for i in range(40, 40 + steps):
                tok = rt._step(tok, positions[i:i + 1], cache).clone()
            torch.cuda.synchronize()
    total, top = _top(prof, steps)
    res = {"artifact": str(path), "engine": rt.engine, "kernel": rt.kernels, "batch": batch,
           "attention": getattr(rt.model, "attn", "transformers"),
           "step_ms": round(step_ms, 3), "kernel_ms_per_step": round(total / steps / 1e3, 3),
           "idle_ms_per_step": round(step_ms - total / steps / 1e3, 3),
           "weight_bytes_per_step": rt.decode_bytes(), "top_kernels": top}
    text = json.dumps(res, indent=1)
    print(text)
    if out:
        out.write_text(text + "\n")


SHAPES_7B = {"qkv": (4608, 3584), "o_proj": (3584, 3584), "gate_up": (37888, 3584), "down": (3584, 18944)}


def _time(fn: Any, reps: int = 10) -> float:
    """Median ms of `fn` over `reps` runs (CUDA events), after two warm-up runs."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def crossover(out: Path | None) -> None:
    """Per row count, the four projections of one Qwen2-7B layer (W4 g128, symmetric): Marlin's GEMM against
    the dequantized path (the fastest dequantization + cuBLAS), and each dequantization alone (the Triton
    kernels and the compiled gather; `fields_match` says whether the `fields` kernel ran or fell back to the
    table-reading one): one eager call, host time included (what an eager prompt pays), and from a CUDA graph (the
    kernels alone, `_graph`: what a prompt replayed from a graph pays). The crossover is given both ways
    (`dequant_wins_from_rows`, `dequant_wins_from_rows_graph`)."""
    import os

    from quantpipe.runtimes import marlin

    why = marlin.unusable()
    if why:
        sys.exit(f"Marlin: {why}")
    rows = [16, 64, 128, 256, 512, 1024, 2048, 4096]
    g = torch.Generator("cuda").manual_seed(0)
    res: dict[str, Any] = {"shapes": SHAPES_7B, "rows": rows, "ms": {}}
    lins = {}
    for name, (n, k) in SHAPES_7B.items():
        u = torch.randint(0, 16, (n, k), generator=g, device="cuda", dtype=torch.int32)
        scale = torch.rand(n, k // 128, generator=g, device="cuda") * 0.002 + 0.001
        lins[name] = lin = marlin.MarlinLinear(u, scale, None, 4, None, torch.bfloat16)
        del u
        want = None
        d: dict[str, Any] = {}
        for mode in marlin.DEQUANT_MODES:
            os.environ["QUANTPIPE_MARLIN_DEQUANT"] = mode
            try:
                w = lin.dequantized()
            except Exception as e:  # a kernel that does not build here is reported, and the others still run
                d[f"dequant_{mode}_error"] = f"{type(e).__name__}: {e}"[:300]
                continue
            if want is None:
                want = w
            elif not torch.equal(w, want):  # the kernels must agree before their times mean anything
                d[f"dequant_{mode}_differs"] = float((w.float() - want.float()).abs().max())
            d[f"dequant_{mode}"] = _time(lin.dequantized)  # one eager call: the host's launch time included
            d[f"dequant_{mode}_gbps"] = round((n * k * 2.5) / d[f"dequant_{mode}"] / 1e6, 1)  # bf16 out + int4 in
            try:  # the kernels alone, replayed from a CUDA graph
                d[f"dequant_{mode}_graph"] = _graph_ms([lin.dequantized])
                d[f"dequant_{mode}_graph_gbps"] = round((n * k * 2.5) / d[f"dequant_{mode}_graph"] / 1e6, 1)
            except Exception as e:
                d[f"dequant_{mode}_graph_error"] = f"{type(e).__name__}: {e}"[:300]
        res["ms"][name] = d
        print(name, json.dumps({key: round(v, 4) if isinstance(v, float) else v for key, v in d.items()}), flush=True)
    res["fields_match"] = marlin.fields_match(4, torch.device("cuda"))
    print("tile order is TILE_FIELDS':", res["fields_match"])
    ok = [md for md in marlin.DEQUANT_MODES
          if not any(f"dequant_{md}_{bad}" in res["ms"][s] for s in SHAPES_7B for bad in ("differs", "error"))]
    res["dequant_faster"] = min(ok, key=lambda md: sum(res["ms"][s][f"dequant_{md}"] for s in SHAPES_7B))
    os.environ["QUANTPIPE_MARLIN_DEQUANT"] = res["dequant_faster"]
    for name, (_, k) in SHAPES_7B.items():
        d, lin = res["ms"][name], lins[name]
        for m in rows:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=g)
            for path, rows_at in (("marlin", 1 << 30), ("dequant_mm", 0)):
                lin.prefill_rows = rows_at  # read when called, so a capture keeps the path it saw
                d[f"{path}_{m}"] = _time(lambda x=x, lin=lin: lin(x))  # eager: what an eager prompt pays
                d[f"{path}_{m}_graph"] = _graph_ms([lambda x=x, lin=lin: lin(x)])  # a prompt replayed from a graph
        res["ms"][name] = {key: round(v, 4) if isinstance(v, float) else v for key, v in d.items()}
    os.environ.pop("QUANTPIPE_MARLIN_DEQUANT")
    for tag, suffix in (("", ""), ("_graph", "_graph")):
        layer = {m: (sum(res["ms"][s][f"marlin_{m}{suffix}"] for s in SHAPES_7B),
                     sum(res["ms"][s][f"dequant_mm_{m}{suffix}"] for s in SHAPES_7B)) for m in rows}
        res[f"layer_ms{tag}"] = {m: {"marlin": round(a, 3), "dequant_mm": round(b, 3)} for m, (a, b) in layer.items()}
        res[f"dequant_wins_from_rows{tag}"] = next((m for m in rows if layer[m][1] < layer[m][0]), None)
        for m, v in res[f"layer_ms{tag}"].items():
            print(f"  rows {m}{tag}: layer marlin {v['marlin']} ms, dequantized + cuBLAS {v['dequant_mm']} ms")
    print("dequantizing wins from", res["dequant_wins_from_rows"], "rows eagerly,", res["dequant_wins_from_rows_graph"],
          "from a graph; faster dequantization:", res["dequant_faster"], "(of", ", ".join(ok), "agreeing)")
    if out:
        out.write_text(json.dumps(res, indent=1) + "\n")


def _graph_ms(fns: list[Any], reps: int = 5) -> float:
    """Median ms per call of `fns` (one call each, in turn; several copies of a weight so that it is read from
    memory, not the 50 MB L2) replayed from one CUDA graph: no host time inside."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(4):
            for f in fns:
                f()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / (4 * len(fns)))
    return sorted(times)[reps // 2]


def marlin_opts(out: Path | None) -> None:
    """Per Qwen2-7B projection (and lm_head) at 1, 8 and 32 rows, from CUDA graphs: Marlin W4 g128 with float32
    and with bfloat16 split-K sums, tinygemm, and the bf16 matmul (cuBLAS); us per call, GB/s of the weight's
    bytes, and each kernel's speed over bf16's."""
    from quantpipe.runtimes import kernels, marlin

    why = marlin.unusable()
    if why:
        sys.exit(f"Marlin: {why}")
    g = torch.Generator("cuda").manual_seed(0)
    shapes = {**SHAPES_7B, "lm_head": (152064, 3584)}
    res: dict[str, Any] = {"shapes": shapes, "rows": [1, 8, 32], "us": {}}
    for name, (n, k) in shapes.items():
        w4_bytes, bf_bytes = n * k // 2 + n * (k // 128) * 2, n * k * 2
        copies_w4, copies_bf = max(1, -(-200_000_000 // w4_bytes)), max(1, -(-200_000_000 // bf_bytes))
        mods: dict[str, list[Any]] = {"marlin": [], "tinygemm": [], "bf16": []}
        for _ in range(min(copies_w4, 24)):
            u = torch.randint(0, 16, (n, k), generator=g, device="cuda", dtype=torch.int32)
            scale = torch.rand(n, k // 128, generator=g, device="cuda") * 0.002 + 0.001
            mods["marlin"].append(marlin.MarlinLinear(u, scale, None, 4, None, torch.bfloat16))
            mods["tinygemm"].append(kernels.int4_from_unsigned(u, scale, None, None, torch.bfloat16))
            del u
        for _ in range(min(copies_bf, 24)):
            mods["bf16"].append(torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16))
        d: dict[str, float] = {}
        for m in res["rows"]:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=g)
            with torch.inference_mode():
                for reduce in (True, False):
                    for lin in mods["marlin"]:
                        lin.fp32_reduce = reduce
                    d[f"marlin{'' if reduce else '_bf16_reduce'}_{m}"] = 1e3 * _graph_ms(
                        [lambda lin=lin, x=x: lin(x) for lin in mods["marlin"]])
                for key in ("tinygemm", "bf16"):
                    d[f"{key}_{m}"] = 1e3 * _graph_ms([lambda lin=lin, x=x: lin(x) for lin in mods[key]])
            for key in ("marlin", "marlin_bf16_reduce", "tinygemm"):
                d[f"{key}_{m}_x_bf16"] = d[f"bf16_{m}"] / d[f"{key}_{m}"]
            d[f"marlin_{m}_gbps"] = w4_bytes / d[f"marlin_{m}"] / 1e3
            d[f"bf16_{m}_gbps"] = bf_bytes / d[f"bf16_{m}"] / 1e3
        res["us"][name] = {key: round(v, 3) for key, v in d.items()}
        print(name, json.dumps(res["us"][name]), flush=True)
        del mods
        torch.cuda.empty_cache()
    layer = {}
    for key in ("marlin", "marlin_bf16_reduce", "tinygemm", "bf16"):
        layer[key] = {m: round(sum(res["us"][s][f"{key}_{m}"] for s in SHAPES_7B), 1) for m in res["rows"]}
    res["layer_us"] = layer
    res["bf16_reduce_faster"] = all(layer["marlin_bf16_reduce"][m] < layer["marlin"][m] for m in res["rows"])
    for key, v in layer.items():
        print(f"  one layer, {key}: " + ", ".join(f"{m} rows {us} us" for m, us in v.items()))
    if out:
        out.write_text(json.dumps(res, indent=1) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("random")
    r.add_argument("dir", type=Path)
    r.add_argument("--arch", default="qwen2-7b")
    w = sub.add_parser("w4")
    w.add_argument("src", type=Path)
    w.add_argument("dir", type=Path)
    w.add_argument("--asym", action="store_true")
    w.add_argument("--group", type=int, default=128)
    w.add_argument("--bits", type=int, choices=[4, 8], default=4, help="8: per-channel scales, symmetric")
    w.add_argument("--head", action="store_true", help="lm_head quantized too")
    p = sub.add_parser("profile")
    p.add_argument("dir", type=Path)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--hf", action="store_true")
    p.add_argument("--json", type=Path)
    p.add_argument("--prefill", action="store_true", help="profile the prompt pass instead of decode steps")
    c = sub.add_parser("crossover")
    c.add_argument("--json", type=Path)
    o = sub.add_parser("marlin-opts")
    o.add_argument("--json", type=Path)
    a = ap.parse_args()
    if a.cmd == "w4" and a.bits == 8 and a.asym:
        ap.error("w4 --bits 8 is symmetric (the 8-bit kernels have no zero points): drop --asym")
    if a.cmd == "crossover":
        crossover(a.json)
    elif a.cmd == "marlin-opts":
        marlin_opts(a.json)
    elif a.cmd == "random":
        make_random(a.dir, a.arch)
    elif a.cmd == "w4":
        make_w4(a.src, a.dir, a.asym, a.group, a.bits, a.head)
    elif a.prefill:
        profile_prefill(a.dir, a.batch, a.json)
    else:
        profile(a.dir, a.batch, a.hf, a.json)


if __name__ == "__main__":
    main()
