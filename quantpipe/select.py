"""`quantpipe select`: which variant to ship on which GPU. From a run's results.json: each variant's quality (KL
divergence from the baseline, with its standard error), the memory it needs on a GPU at a context × concurrency
(`quantpipe plan`'s arithmetic, from the run's measured artifact bytes where it has them) and its measured
throughput (served by an engine under load where the run served it, else quantpipe's bench); then what fits,
the Pareto frontier over (quality, memory, throughput), the recommendation for an objective, and one reason for
every variant left out.

Dominance: A dominates B when A is at least as good as B on every axis (KLD lower or equal, memory lower or
equal, throughput higher or equal) and better on one beyond noise: KLD by the paired test over the eval's block
means (both rows scored the same blocks: t × paired standard error at `confidence`), throughput by more than
`speed_noise` (a relative margin: the bench and the load test record one figure, no spread), memory by any byte
(arithmetic has no noise). Two variants whose KLDs differ within noise and whose other axes tie do not dominate
each other. The recommendation then picks, among the frontier, the best on the objective's axis, treating
figures within noise (KLD), `speed_noise` (throughput) or `memory_noise` (memory) of the best as equal and
breaking those ties on the next axis (quality → memory → throughput, memory → quality → throughput, speed →
quality → memory).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from quantpipe.errors import QuantpipeError
from quantpipe.memory import DTYPE_BYTES, GIB, MIB, Shapes, shapes, weight_bytes
from quantpipe.plan import GPUS, KV_DTYPES, fit, gpu_memory, parse_memory
from quantpipe.results import Results, Row, mean_recovery
from quantpipe.stats import normal_quantile, paired_difference, t_quantile

OBJECTIVES = {"quality": ("quality", "memory", "speed"), "memory": ("memory", "quality", "speed"),
              "speed": ("speed", "quality", "memory")}


@dataclass
class Point:
    """One variant's figures on the three axes (memory in bytes; throughput None where the axis is not used)."""

    name: str
    kld: float
    kld_se: float | None = None
    kld_blocks: list[float] = field(default_factory=list)
    memory: float = 0.0
    throughput: float | None = None


@dataclass
class Noise:
    confidence: float = 0.95
    speed: float = 0.05  # relative: throughputs within 5 % are not told apart
    memory: float = 0.01  # relative, for the recommendation's ties only (dominance counts every byte)


def quality_diff(a: Point, b: Point, confidence: float) -> tuple[float, float, str]:
    """(KLD of b minus a, the noise allowance of that difference, how the allowance was taken)."""
    d = b.kld - a.kld
    paired = paired_difference(a.kld_blocks, b.kld_blocks)
    if paired is not None:
        _, se, n = paired
        return d, t_quantile(confidence, n - 1) * se, f"paired t over {n} blocks"
    if a.kld_se is not None and b.kld_se is not None:
        return d, normal_quantile(confidence) * math.hypot(a.kld_se, b.kld_se), "both standard errors"
    return d, 0.0, "no standard error recorded"


def better(a: Point, b: Point, axis: str, noise: Noise) -> int:
    """+1: a better than b beyond noise on the axis; -1: worse beyond noise; 0: within noise."""
    if axis == "quality":
        d, allow, _ = quality_diff(a, b, noise.confidence)
        return 0 if abs(d) <= allow else (1 if d > 0 else -1)
    if axis == "memory":
        return (a.memory < b.memory) - (a.memory > b.memory)
    if a.throughput is None or b.throughput is None:
        return 0
    hi, lo = max(a.throughput, b.throughput), min(a.throughput, b.throughput)
    if hi <= lo * (1 + noise.speed):
        return 0
    return 1 if a.throughput > b.throughput else -1


def at_least_as_good(a: Point, b: Point, axis: str) -> bool:
    if axis == "quality":
        return a.kld <= b.kld
    if axis == "memory":
        return a.memory <= b.memory
    return a.throughput is None or b.throughput is None or a.throughput >= b.throughput


def axes(points: list[Point]) -> list[str]:
    return ["quality", "memory"] + (["speed"] if any(p.throughput is not None for p in points) else [])


def dominates(a: Point, b: Point, noise: Noise, use: list[str]) -> list[str]:
    """The axes on which a beats b beyond noise, when a is at least as good on every axis; else []."""
    if not all(at_least_as_good(a, b, ax) for ax in use):
        return []
    return [ax for ax in use if better(a, b, ax, noise) > 0]


def frontier(points: list[Point], noise: Noise) -> dict[str, tuple[str, list[str]] | None]:
    """name -> None on the Pareto frontier, else (a dominating variant, the axes it is better on beyond noise);
    of several dominating variants the one better on most axes, then the best quality."""
    use = axes(points)
    out: dict[str, tuple[str, list[str]] | None] = {}
    for b in points:
        best: tuple[str, list[str]] | None = None
        for a in sorted(points, key=lambda p: p.kld):
            if a is b:
                continue
            won = dominates(a, b, noise, use)
            if won and (best is None or len(won) > len(best[1])):
                best = (a.name, won)
        out[b.name] = best
    return out


def _key(p: Point, axis: str) -> float:
    return {"quality": p.kld, "memory": p.memory, "speed": -(p.throughput or 0.0)}[axis]


def _ties(best: Point, p: Point, axis: str, noise: Noise) -> bool:
    """p is as good as the best on the axis, within noise (quality, speed) or the memory margin."""
    if axis == "memory":
        return p.memory <= best.memory * (1 + noise.memory)
    return better(best, p, axis, noise) == 0


def recommend(points: list[Point], objective: str, noise: Noise) -> tuple[Point | None, str]:
    """The frontier point for the objective, and why: best on the objective's axis, ties (within noise) broken
    on the next axes."""
    if not points:
        return None, ""
    order = [ax for ax in OBJECTIVES[objective] if ax in axes(points)]
    pool, why = list(points), []
    for i, ax in enumerate(order):
        best = min(pool, key=lambda p: (_key(p, ax), *[_key(p, o) for o in order[i + 1:]]))
        tied = [p for p in pool if _ties(best, p, ax, noise)]
        label = {"quality": "lowest KLD", "memory": "least memory", "speed": "highest throughput"}[ax]
        if len(tied) == 1:
            why.append(label if i == 0 else f"then {label}")
            pool = tied
            break
        why.append(f"{label} (tied within noise: {', '.join(p.name for p in tied)})" if i == 0
                   else f"then {label} among those ({', '.join(p.name for p in tied)})")
        pool = tied
    chosen = min(pool, key=lambda p: tuple(_key(p, ax) for ax in order))
    return chosen, "; ".join(why)


# -- a run's figures ---------------------------------------------------------------------------------------------
@dataclass
class Figures:
    """A variant's GPU-independent figures from the run; `unavailable` says why it cannot be chosen at all."""

    variant: str
    method: str
    kld: float | None
    kld_se: float | None
    kld_blocks: list[float]
    perplexity: float | None
    recovery: float | None
    weights: int
    weights_how: str
    kv_bytes: int  # bytes per KV-cache element
    overhead: int  # measured runtime memory beyond plan's (a bench on a GPU), else 0
    throughput: float | None
    throughput_how: str
    unavailable: str | None = None


def primary_rows(res: Results) -> list[Row]:
    """One row per variant: the one named after it (its first runtime)."""
    seen: dict[str, Row] = {}
    for r in res.variants:
        if r.name == r.variant or r.variant not in seen:
            seen[r.variant] = r
    return list(seen.values())


def has_quality(res: Results) -> bool:
    """Whether the run measured the quality of a variant other than the reference."""
    return res.weights != "random" and any(r.quality for r in res.variants if r.variant != res.reference_row.variant)


def require_quality(res: Results) -> None:
    if res.weights == "random":
        raise QuantpipeError("select needs a quality eval: this run has random weights (model.weights: random), so "
                             "it measured no quality; run a recipe on real weights with eval enabled")
    if not has_quality(res):
        raise QuantpipeError("select needs a quality eval: this run recorded no KL divergence of any variant "
                             "(eval.enabled: false?); run it with eval enabled")


def _level(available: list[int], concurrency: int) -> int:
    below = [c for c in available if c <= concurrency]
    return max(below) if below else min(available)


def hardware(res: Results) -> str:
    hw = res.hardware
    return hw.get("gpu") or f"{hw.get('cpu', 'an unknown CPU')} ({hw.get('cpu_count', '?')} cores)"


def throughput(res: Results, concurrency: int, source: str = "auto"
               ) -> tuple[str, dict[str, tuple[float | None, str]], str]:
    """(source used, variant -> (tok/s or None, how or why not), a description): served output tok/s at the
    largest measured concurrency up to `concurrency` (the best engine), or the bench's decode tok/s at the
    largest batch up to it; "none" where the run measured neither."""
    served_levels = sorted({lv.concurrency for s in res.served for lv in s.levels if lv.error is None})
    asked = source
    if source == "auto":
        source = "served" if served_levels else "bench"
    out: dict[str, tuple[float | None, str]] = {}
    if source == "served":
        if not served_levels:
            raise QuantpipeError("--speed served: this run served nothing under load (no serve: block, or every "
                                 "load test failed); use --speed bench")
        c = _level(served_levels, concurrency)
        for r in primary_rows(res):
            runs = [s for s in res.served if s.variant == r.variant]
            got = [(lv.output_tok_s, s.engine) for s in runs if (lv := s.level(c)) and lv.output_tok_s]
            if got:
                v, engine = max(got)
                out[r.variant] = (v, f"served by {engine} at concurrency {c}")
            else:
                why = "; ".join(f"{s.engine}: {_why_not(s, c)}" for s in runs) or "not in the serve block's variants"
                out[r.variant] = (None, f"no engine served it at concurrency {c} ({why})")
        return "served", out, (f"served output tok/s at concurrency {c} (GuideLLM; the best engine per variant), "
                               f"measured on {hardware(res)}")
    batches = sorted({int(b) for r in res.variants if r.speed for b in r.speed.per_batch})
    if not batches:
        if asked == "bench":
            raise QuantpipeError("--speed bench: this run has no benchmark (bench.enabled: false)")
        return "none", {r.variant: (None, "no speed measured") for r in primary_rows(res)}, "no speed measured"
    b = _level(batches, concurrency)
    for r in primary_rows(res):
        row = (r.speed.per_batch if r.speed else {}).get(str(b))
        tps = row.decode_tok_s if row else None
        why = f"no bench decode at batch {b}" + (f" ({r.note})" if r.note and not r.speed else "")
        out[r.variant] = (tps, f"bench decode at batch {b} ({r.runtime})" if tps else why)
    devices = sorted({r.speed.device for r in res.variants if r.speed and r.speed.device})
    return "bench", out, (f"bench decode tok/s at batch {b} (quantpipe's runtimes), measured on {hardware(res)} "
                          f"({', '.join(devices) or '?'})")


def _why_not(s: Any, c: int) -> str:
    if not s.loads:
        return ("not tried: " if not s.tried else "does not load: ") + (s.reason or s.error or "?").splitlines()[0]
    lv = next((x for x in s.levels if x.concurrency == c), None)
    return f"the load test at {c} failed: {(lv.error or '').splitlines()[-1] if lv and lv.error else 'not run'}"


def _weights(r: Row, s: Shapes, run_dtype: str, dtype: str) -> tuple[int, str]:
    """The variant's weight bytes when loaded in `dtype`: the artifact's measured tensor bytes, with the float
    parts moved from the run's dtype to `dtype` by plan's arithmetic; plan's arithmetic where nothing was
    measured."""
    from quantpipe.methods import check_params, get_method

    params, _ = check_params(r.method, r.params)
    measured = r.prediction.measured_weights_bytes if r.prediction else None
    if params is None:
        if measured:
            return measured, "the artifact's tensors"
        return r.artifact.size_bytes, "the artifact's size"
    method = get_method(r.method)
    at_run = weight_bytes(s, method.storage(params, run_dtype))["total"]
    at_dtype = weight_bytes(s, method.storage(params, dtype))["total"]
    if measured:
        moved = at_dtype - at_run
        return measured + moved, "the artifact's tensors" + (f", float parts {run_dtype} → {dtype}" if moved else "")
    return at_dtype, "plan's arithmetic"


def figures(res: Results, s: Shapes, dtype: str, kv_dtype: str, concurrency: int, speed: str = "auto"
            ) -> tuple[list[Figures], str]:
    """Every variant's figures, and the description of the throughput figure."""
    require_quality(res)
    ref = res.reference_row
    run_dtype = ref.meta.get("dtype") if ref.meta.get("dtype") in DTYPE_BYTES else dtype
    kv = KV_DTYPES[dtype if kv_dtype == "auto" else kv_dtype]
    _, tps, how = throughput(res, concurrency, speed)
    out = []
    for r in primary_rows(res):
        q = r.quality
        w, w_how = _weights(r, s, run_dtype, dtype)
        value, t_how = tps.get(r.variant, (None, "no speed measured"))
        unavailable = None
        if q is None:
            unavailable = "no quality figures (the eval did not score it)"
        elif value is None and how != "no speed measured":
            unavailable = t_how
        rec = 1.0 if r.variant == ref.variant else mean_recovery(r)
        out.append(Figures(variant=r.variant, method=r.method, kld=q.kld_mean if q else None,
                           kld_se=q.kld_se if q else None, kld_blocks=list(q.blocks.get("kld", [])) if q else [],
                           perplexity=q.perplexity if q else None, recovery=rec, weights=w, weights_how=w_how,
                           kv_bytes=KV_DTYPES["fp8"] if kv_dtype == "auto" and r.meta.get("kv_cache") == "fp8"
                           else kv,
                           overhead=_overhead(r), throughput=value, throughput_how=t_how, unavailable=unavailable))
    return out, how


def _overhead(r: Row) -> int:
    """What a bench on a GPU measured beyond plan's prediction of it (CUDA workspaces, allocator slack): added to
    the activations; 0 where the bench ran on a CPU (its RSS says nothing about a GPU) or measured less."""
    p = r.prediction
    if not (r.speed and r.speed.device == "cuda" and p and p.bench and p.measured_bench_mib):
        return 0
    return max(0, int((p.measured_bench_mib - p.bench["total"]) * MIB))


@dataclass
class RunFrontier:
    """The run's own frontier, as the matrix shows it: no GPU, no context, no quality floor."""

    status: dict[str, str]  # variant -> "yes", "dominated by X", or why it is not on the axes
    points: list[Point]
    dominated_by: dict[str, str | None]
    throughput: str  # what the throughput axis is ("" where the run measured no speed)
    off_axes: list[Point] = field(default_factory=list)  # variants with quality but no throughput (not served)


def run_frontier(res: Results, noise: Noise | None = None) -> RunFrontier:
    """The frontier over KLD, the artifact's weight bytes as written (measured tensor bytes, else the artifact's
    size) and the throughput `throughput` picks at the largest concurrency (or batch) measured. Empty for a run
    without quality figures."""
    empty = RunFrontier({}, [], {}, "")
    if not has_quality(res):
        return empty
    source, tps, how = throughput(res, 2**31)
    status, points, off = {}, [], []
    for r in primary_rows(res):
        q = r.quality
        if q is None:
            status[r.variant] = "no quality figures"
            continue
        value, t_how = tps.get(r.variant, (None, ""))
        mem = (r.prediction.measured_weights_bytes if r.prediction else None) or r.artifact.size_bytes
        point = Point(r.variant, q.kld_mean, q.kld_se, list(q.blocks.get("kld", [])), mem, value)
        if source == "served" and value is None:
            status[r.variant] = "not served"
            off.append(point)
            continue
        points.append(point)
    front = frontier(points, noise or Noise())
    dominated = {p.name: (front[p.name] or (None,))[0] for p in points}
    for p in points:
        status[p.name] = "yes" if dominated[p.name] is None else f"dominated by {dominated[p.name]}"
    return RunFrontier(status, points, dominated, how if source != "none" else "", off)


# -- the selection ------------------------------------------------------------------------------------------------
def select(res: Results, config: Any, gpus: list[tuple[str, int]], context: int, concurrency: int,
           objective: str = "quality", max_kld: float | None = None, min_recovery: float | None = None,
           dtype: str = "bfloat16", kv_dtype: str = "auto", utilization: float = 0.9, speed: str = "auto",
           noise: Noise | None = None) -> dict[str, Any]:
    """Per GPU: each variant's memory, fit, quality, throughput and verdict; the frontier and the
    recommendation. Plain data (printed by `format_select`, or JSON)."""
    noise = noise or Noise()
    if objective not in OBJECTIVES:
        raise QuantpipeError(f"--objective: '{objective}' is not one of {', '.join(OBJECTIVES)}")
    s = shapes(config)
    if s.max_positions and context > s.max_positions:
        raise QuantpipeError(f"--context: {context} tokens is more than the model's {s.max_positions} positions")
    figs, speed_how = figures(res, s, dtype, kv_dtype, concurrency, speed)
    if objective == "speed" and all(f.throughput is None for f in figs):
        raise QuantpipeError("--objective speed: this run measured no speed (no bench, no load test)")
    act_bytes = DTYPE_BYTES[dtype]
    tables = []
    for name, memory in gpus:
        rows, points = [], []
        for f in figs:
            ft = fit(f.variant, f.method, f.weights + f.overhead, s, f.kv_bytes, act_bytes, memory, context,
                     [concurrency], utilization)
            kv = ft.kv_per_token * context * concurrency
            need = f.weights + f.overhead + ft.activations + kv
            row = {"variant": f.variant, "method": f.method, "kld": f.kld, "kld_se": f.kld_se,
                   "perplexity": f.perplexity, "recovery": f.recovery, "weights": f.weights,
                   "weights_how": f.weights_how, "kv_cache": kv, "activations": ft.activations + f.overhead,
                   "measured_overhead": f.overhead, "need": need, "fits": need <= ft.budget,
                   "max_concurrency": ft.max_concurrency, "throughput": f.throughput,
                   "throughput_how": f.throughput_how,
                   "status": "excluded", "reason": ""}
            row["reason"] = _exclusion(f, row, ft.budget, concurrency, context, max_kld, min_recovery)
            if not row["reason"]:
                points.append(Point(f.variant, f.kld or 0.0, f.kld_se, f.kld_blocks, need, f.throughput))
            rows.append(row)
        front = frontier(points, noise)
        on_front = [p for p in points if front[p.name] is None]
        chosen, why = recommend(on_front, objective, noise)
        by_name = {p.name: p for p in points}
        for row in rows:
            if row["reason"]:
                continue
            dom = front[row["variant"]]
            if dom is not None:
                row["status"], row["dominated_by"] = "dominated", dom[0]
                row["reason"] = f"dominated by {dom[0]}: " + _compare(by_name[dom[0]], by_name[row["variant"]],
                                                                        noise)
            elif chosen is not None and row["variant"] == chosen.name:
                row["status"], row["reason"] = "recommended", f"recommended for {objective}: {why}"
            else:
                row["status"] = "frontier"
                row["reason"] = (f"on the frontier; for {objective} {chosen.name if chosen else '?'} is preferred: "
                                 + _compare(chosen, by_name[row["variant"]], noise) if chosen else "")
        hint = ""
        if chosen is None:  # what would fit: the variants left out only for their memory, at a lower concurrency
            mem_only = [r for r in rows if r["reason"].startswith("does not fit") and r["max_concurrency"] >= 1]
            if mem_only:
                top = max(mem_only, key=lambda r: (r["max_concurrency"], -(r["kld"] or 0.0)))
                hint = (f"at {context} tokens, {top['variant']} fits {top['max_concurrency']} concurrent sequences "
                        "(--concurrency); or a shorter --context, an fp8 KV cache (--kv-dtype fp8) or a larger GPU")
        tables.append({"gpu": name, "memory": memory, "budget": int(memory * utilization),
                       "recommended": chosen.name if chosen else None, "why": why, "hint": hint,
                       "frontier": [p.name for p in on_front], "variants": rows})
    return {"run": res.run_dir, "recipe": res.recipe.name, "reference": res.reference, "context": context,
            "concurrency": concurrency, "objective": objective, "dtype": dtype,
            "kv_dtype": kv_dtype if kv_dtype != "auto" else dtype + (
                "; fp8 for the variants quantized with kv_cache: fp8" if any(
                    r.meta.get("kv_cache") == "fp8" for r in primary_rows(res)) else ""),
            "utilization": utilization,
            "max_kld": max_kld, "min_recovery": min_recovery, "throughput": speed_how,
            "noise": asdict(noise), "eval": {k: res.eval.get(k) for k in ("n_windows", "window")}, "gpus": tables}


def _exclusion(f: Figures, row: dict[str, Any], budget: int, concurrency: int, context: int,
               max_kld: float | None, min_recovery: float | None) -> str:
    if f.unavailable:
        return f.unavailable
    if not row["fits"]:
        return (f"does not fit: needs {row['need'] / GIB:.2f} GiB of {budget / GIB:.2f} GiB usable at {context} "
                f"tokens × {concurrency} (fits {row['max_concurrency']} at that context)")
    if max_kld is not None and f.kld is not None and f.kld > max_kld:
        return f"below the quality floor: KLD {f.kld:.4g} > --max-kld {max_kld:g}"
    if min_recovery is not None:
        if f.recovery is None:
            return "no lm-eval recovery recorded (--min-recovery needs eval.lm_eval)"
        if f.recovery < min_recovery:
            return f"below the quality floor: lm-eval recovery {100 * f.recovery:.1f} % < {100 * min_recovery:.1f} %"
    return ""


def _compare(a: Point, b: Point, noise: Noise) -> str:
    """a against b on every axis, in words ('beyond noise' where it is)."""
    parts = []
    d, allow, how = quality_diff(a, b, noise.confidence)
    beyond = abs(d) > allow
    parts.append(f"KLD {a.kld:.4g} vs {b.kld:.4g} ({'beyond' if beyond else 'within'} noise, ±{allow:.2g} "
                 f"{how})")
    parts.append(f"memory {a.memory / GIB:.3f} vs {b.memory / GIB:.3f} GiB")
    if a.throughput is not None and b.throughput is not None:
        parts.append(f"{a.throughput:.1f} vs {b.throughput:.1f} tok/s")
    return "; ".join(parts)


# -- text ------------------------------------------------------------------------------------------------------------
def gpu_list(gpu: str | None, gpu_memory_arg: str | None) -> list[tuple[str, int]]:
    """--gpu A,B (known names) and/or --gpu-memory 24GiB,80GB -> [(name, bytes)]."""
    out = []
    for name in filter(None, (x.strip() for x in (gpu or "").split(","))):
        gpu_memory(name)  # an unknown name: the error lists the known ones
        out.append(next((k, v) for k, v in GPUS.items() if name.lower() in (k.lower(), k.split("-")[0].lower())))
    for text in filter(None, (gpu_memory_arg or "").split(",")):
        out.append((text.strip(), parse_memory(text)))
    if not out:
        raise QuantpipeError(f"select: give --gpu ({', '.join(GPUS)}) or --gpu-memory (e.g. 24GiB)")
    return out


def _g(x: float) -> str:
    return f"{x / GIB:.2f}"


def format_select(r: dict[str, Any]) -> str:
    lines = [f"quantpipe select: {r['recipe']} ({r['run']}), objective {r['objective']}",
             f"context {r['context']} tokens × {r['concurrency']} concurrent sequences; weights in {r['dtype']}, KV "
             f"cache {r['kv_dtype']}, activations for one prefill chunk (`quantpipe plan`); usable memory = GPU "
             f"memory × {r['utilization']:g}",
             f"quality: KL divergence from '{r['reference']}' ± standard error ({r['eval']['n_windows']} windows × "
             f"{r['eval']['window']} tokens); throughput: {r['throughput']}, not on the GPUs below",
             f"dominated: another variant at least as good on every axis and better on one beyond noise (KLD: "
             f"paired t at {r['noise']['confidence']:g}; throughput: beyond {100 * r['noise']['speed']:g} %; "
             "memory: any byte)"]
    floors = [f"KLD ≤ {r['max_kld']:g}" if r["max_kld"] is not None else "",
              f"lm-eval recovery ≥ {100 * r['min_recovery']:g} %" if r["min_recovery"] is not None else ""]
    lines.append("quality floor: " + (", ".join(x for x in floors if x) or "none (--max-kld, --min-recovery)"))
    for t in r["gpus"]:
        lines += ["", f"## {t['gpu']}: {_g(t['memory'])} GiB, {_g(t['budget'])} GiB usable", ""]
        head = ["variant", "method", "KLD ± SE", "lm-eval rec. %", "weights GiB", "KV GiB", "act. GiB", "needs GiB",
                "fits", f"max conc. @ {r['context']}", "tok/s", "verdict"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for v in t["variants"]:
            kld = "–" if v["kld"] is None else f"{v['kld']:.4f}" + (f" ± {v['kld_se']:.4f}" if v["kld_se"] else "")
            lines.append("| " + " | ".join([
                v["variant"], v["method"], kld, "–" if v["recovery"] is None else f"{100 * v['recovery']:.1f}",
                _g(v["weights"]), _g(v["kv_cache"]), _g(v["activations"]), _g(v["need"]),
                "yes" if v["fits"] else "no", str(v["max_concurrency"]),
                "–" if v["throughput"] is None else f"{v['throughput']:.1f}",
                {"recommended": "**recommended**", "frontier": "frontier", "dominated": "dominated",
                 "excluded": "excluded"}[v["status"]]]).replace("\n", " ") + " |")
        lines.append("")
        if t["recommended"]:
            lines.append(f"Recommended on {t['gpu']}: {t['recommended']} ({t['why']}); frontier: "
                         f"{', '.join(t['frontier'])}")
        else:
            lines.append(f"Recommended on {t['gpu']}: none: no variant fits and meets the quality floor"
                         + (f"; {t['hint']}" if t["hint"] else ""))
        for v in t["variants"]:
            if v["status"] != "recommended":
                lines.append(f"- {v['variant']}: {v['reason']}")
    if len(r["gpus"]) > 1:
        lines += ["", "Per GPU: " + "; ".join(f"{t['gpu']} → {t['recommended'] or 'none'}" for t in r["gpus"])]
    return "\n".join(lines) + "\n"


def write_json(path: Path, r: dict[str, Any]) -> None:
    from quantpipe.cache import write_text

    write_text(path, json.dumps(r, indent=2) + "\n")
