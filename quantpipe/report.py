"""The run's outputs for people: the comparison matrix as Markdown and HTML, the quality-vs-memory plot, and (with a
`serve:` block) the served table, the latency table under load and served.png (p95 TTFT and output tokens/s
against concurrency).

Everything here is rendered from results.json alone (the typed `results.Results`), so `quantpipe report RUN_DIR`
can redo it at any time. Text that comes from users (variant names, paths, task names) is escaped in both the
Markdown and the HTML; the three files are rendered before any is written.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

from quantpipe import select
from quantpipe.results import Results, Row, as_results, mean_recovery


def cell(text: Any) -> str:
    """A table cell of the Markdown matrix: HTML escaped (Markdown renders raw HTML), `|` escaped, one line."""
    return html.escape(str(text), quote=False).replace("|", "\\|").replace("\n", " ")


def _f(x: Any, fmt: str) -> str:
    return "–" if x is None else format(x, fmt)


def _batches(res: Results) -> list[str]:
    return [str(b) for b in res.bench.get("batch_sizes", [])]


def several_runtimes(res: Results) -> bool:
    return any(r.name != r.variant for r in res.variants)


def grouped_rows(results: Results | dict[str, Any]) -> tuple[list[tuple[str, str]], list[list[str]]]:
    """(group, header) of every column of the matrix and its cells, one row per (variant, runtime), reference
    first. Groups: identity, quality, tasks (lm-eval), speed, memory, build, frontier. A column none of whose rows
    has a figure (a stage that did not run: bench off, random weights) is left out."""
    res = as_results(results)
    batches = _batches(res)
    tasks = lm_eval_tasks(res)
    ref = res.reference_row
    ref_ppl = ref.quality.perplexity if ref.quality else None
    front = frontier_status(res)
    runtime_col = several_runtimes(res)
    cols: list[tuple[str, str]] = [("", "variant"), ("", "method")] + ([("", "runtime")] if runtime_col else [])
    cols += [("quality", h) for h in ("PPL", "ΔPPL %", "KLD", "top-1 %")]
    cols += [("tasks", f"{t} {m}") for t, m in tasks] + ([("tasks", "lm-eval recovery %")] if tasks else [])
    cols += [("speed", h) for h in ("prefill tok/s", *[f"decode tok/s b{b}" for b in batches], "TTFT ms")]
    cols += [("memory", h) for h in ("size MiB", "size ×", "peak RSS MiB")] + [("build", "quantize s")]
    cols += [("frontier", "Pareto frontier")]
    body = []
    for v in res.variants:
        q, s = v.quality, v.speed
        pb = s.per_batch if s else {}
        first = pb.get(batches[0]) if batches else None
        ppl = q.perplexity if q else None
        dppl = None if ppl is None or not ref_ppl else 100 * (ppl / ref_ppl - 1)
        base_size = res.reference_for(v).artifact.size_bytes
        body.append([
            v.name, v.method, *([v.runtime or "–"] if runtime_col else []),
            _f(ppl, ".3f"), _f(dppl, "+.2f"), _f(q.kld_mean if q else None, ".5f"),
            _f(100 * q.top1_agreement if q else None, ".1f"),
            *lm_eval_cells(v, tasks),
            _f(first.prefill_tok_s if first else None, ".1f"),
            *[_f(pb[b].decode_tok_s if b in pb else None, ".1f") for b in batches],
            _f(1000 * first.ttft_s if first and first.ttft_s is not None else None, ".1f"),
            _f(v.artifact.size_bytes / 2**20, ".1f"), _f(v.artifact.size_bytes / base_size, ".2f"),
            _f(v.memory.peak_rss_mib, ".0f"), _f(v.timings.quantize_s, ".1f"),
            front.get(v.name, "–"),
        ])
    keep = [i for i, (g, _) in enumerate(cols) if not g or any(r[i] != "–" for r in body)]
    return [cols[i] for i in keep], [[r[i] for i in keep] for r in body]


def rows(results: Results | dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and cells of the matrix (grouped_rows without the groups)."""
    cols, body = grouped_rows(results)
    return [h for _, h in cols], body


def frontier_status(res: Results) -> dict[str, str]:
    """The matrix's frontier column: row name -> 'yes', 'dominated by X', or why the row is not on the axes
    (`quantpipe select`'s frontier over KLD, the artifact's weight bytes and the measured throughput; rows of a
    variant's further runtimes carry nothing)."""
    return select.run_frontier(res).status


def lm_eval_tasks(res: Results) -> list[tuple[str, str]]:
    """(task, metric) of every lm-eval score in the run, in task order."""
    seen: dict[str, str] = {}
    for v in res.variants:
        for t, sc in sorted((v.lm_eval or {}).items()):
            seen.setdefault(t, sc.metric)
    return list(seen.items())


def lm_eval_cells(v: Row, tasks: list[tuple[str, str]]) -> list[str]:
    if not tasks:
        return []
    cells = []
    for t, _ in tasks:
        sc = (v.lm_eval or {}).get(t)
        if sc is None or sc.value is None:
            cells.append("–")
            continue
        text = f"{sc.value:.3f}" + (f" ± {sc.stderr:.3f}" if sc.stderr is not None else "")
        if sc.recovery is not None:
            se = sc.recovery_se
            text += f" ({100 * sc.recovery:.0f}" + (f" ± {100 * se:.0f}" if se else "") + " %)"
        cells.append(text)
    rec = mean_recovery(v)
    return [*cells, _f(None if rec is None else 100 * rec, ".1f")]


def _context(res: Results) -> str:
    ev, hw, b = res.eval, res.hardware, res.bench
    where = hw.get("gpu") or f"{hw.get('cpu', 'unknown CPU')} ({hw.get('cpu_count', '?')} cores)"
    used = {v.speed.device for v in res.variants if v.speed and v.speed.device}
    device = ", ".join(sorted(used)) or b.get("device")
    bench = (f"bench: {device} prompt {b.get('prompt_len')} + {b.get('gen_len')} new tokens, median of "
             f"{b.get('repeats')}" if b.get("enabled") else "bench: off")
    lm = ev.get("lm_eval")
    lm_line = "" if not lm else (
        f"; lm-eval: {', '.join(lm['tasks'])}, {lm.get('num_fewshot')}-shot, "
        + (f"first {lm['limit']} documents per task" if lm.get("limit") else "all documents")
        + ", score ± stderr (recovery vs the baseline)")
    if res.execution:
        where += f"; executor {res.execution.get('executor')}: {', '.join(res.execution.get('nodes') or [])}"
    if res.weights == "random":
        return (f"{res.recipe.name} — **random weights** ({res.model}): speed and memory only, "
                f"no quality evaluation; {bench}; {where}")
    if not ev.get("enabled", True):
        return f"{res.recipe.name} — eval: off; {bench}; {where}"
    return (f"{res.recipe.name} — eval: {ev.get('n_windows')} windows × {ev.get('window')} tokens, KLD vs "
            f"'{res.reference}'{lm_line}; {bench}; {where}")


def vocab_note(v: Row) -> str:
    """For formats that carry their own vocabulary (GGUF): whether its ids are the baseline tokenizer's."""
    voc = v.meta.get("vocab")
    if not isinstance(voc, dict):
        return ""
    if not voc.get("one_to_one"):
        return (f"; **vocabulary NOT one to one with the baseline's** ({voc.get('n_different')} of "
                f"{voc.get('n_baseline')} ids differ): its PPL/KLD/top-1 score different tokens and are not comparable")
    tok = "" if voc.get("tokenization_matches") is None else (
        "; llama.cpp tokenizes the eval text as the baseline does" if voc["tokenization_matches"]
        else "; llama.cpp tokenizes the eval text differently (scores use the baseline's ids)")
    return f"; vocabulary one to one with the baseline's ({voc.get('n_baseline')} ids){tok}"


def nodes_note(v: Row) -> str:
    """Where a row's stages ran (a Ray run): one node for all, or each stage's."""
    if not v.nodes:
        return ""
    names = set(v.nodes.values())
    if len(names) == 1:
        return f"; ran on {names.pop()}"
    return "; ran on " + ", ".join(f"{k} {n}" for k, n in v.nodes.items())


def _table(head: list[str], body: list[list[str]]) -> list[str]:
    return (["| " + " | ".join(cell(h) for h in head) + " |", "|" + "---|" * len(head)]
            + ["| " + " | ".join(cell(c) for c in r) + " |" for r in body])


def markdown(results: Results | dict[str, Any]) -> str:
    res = as_results(results)
    head, body = rows(res)
    lines = [f"# quantpipe matrix: {cell(res.recipe.name)}", "", cell(_context(res)), "", *_table(head, body)]
    note = frontier_note(res)
    if note:
        lines += ["", cell(note)]
    lines += ["", "Formats and the code that ran each row's matmuls (eval / bench):", ""]
    for v in res.variants:
        kernels = {k for k in (v.eval_kernel, v.speed.kernel if v.speed else None) if k}
        layout = v.format or "?"
        if v.format_detail and v.format_detail != layout:  # the library's own name of the layout
            layout = v.format_detail if v.format_detail.startswith(layout) else f"{layout} ({v.format_detail})"
        lines.append(cell(f"- {v.name}: {layout}; runtime {v.runtime}; "
                          + ("; ".join(sorted(kernels)) or "kernel not recorded") + vocab_note(v)
                          + (f"; {v.note}" if v.note else "") + nodes_note(v)))
    for f in res.failed:
        lines.append(cell(f"- {f.get('variant')}: FAILED at its {f.get('stage')} task on {f.get('node')}: "
                          f"{f.get('error')} (no row)"))
    for s in res.skipped:
        lines.append(cell(f"- {s.get('variant')}: not measured in runtime '{s.get('runtime')}' ({s.get('purpose')}): "
                          f"{s.get('reason')}"))
    estimators = {v.quality.kld_estimator for v in res.variants if v.quality} - {"full vocabulary"}
    if estimators:
        lines += ["", cell("KLD of the rows measured by top-k runtimes is estimated: " + ", ".join(sorted(estimators))
                           + " (docs/architecture.md defines it; docs/benchmarks.md measures how close it is).")]
    shead, sbody = speed_rows(res)
    if sbody:
        lines += ["", "Decode against the memory-bandwidth limit: a step reads the weights once and each sequence's "
                  "KV cache; limit = batch × measured copy bandwidth / those bytes. Engine and kernel as run by "
                  "the bench; GPU memory: allocator peak / what the driver reports in use:", "", *_table(shead, sbody)]
    mhead, mbody = memory_rows(res)
    if mbody:
        lines += ["", "Memory, predicted (`quantpipe plan`) vs measured. Weights: the artifact's tensors. Bench: the "
                  "largest batch's weights + KV cache + activations vs the bench process's peak over its memory "
                  "before loading. Quantize: float model + calibration working set + packed output vs the "
                  "quantize process's peak over its memory with the libraries loaded:", "", *_table(mhead, mbody)]
    notes: dict[str, list[str]] = {}
    for v in res.variants:
        p = v.prediction
        for note in (p.bench_not_modelled, p.quantize_upper_bound) if p else ():
            if note:
                notes.setdefault(note, []).append(v.name)
    for note, names in notes.items():
        lines += ["", cell(f"Note ({', '.join(names)}): {note}.")]
    errors = {v.prediction.error for v in res.variants if v.prediction and v.prediction.error}
    for e in errors:
        lines += ["", cell(f"Memory prediction unavailable: {e}")]
    return "\n".join(lines + served_markdown(res)) + "\n"


def served_markdown(res: Results) -> list[str]:
    if not res.served:
        return []
    head, body = served_rows(res)
    lines = ["", "## Served", "", cell("Each variant in the engine's own OpenAI-compatible server (quantpipe talks "
             "HTTP only). Served KLD: the server's prompt log-probs (top-k + rest bucket, a lower bound) against the "
             "baseline's full log-probs, beside quantpipe's own runtime's with the same estimator (the difference is "
             "the engine's) and over the full vocabulary; greedy: share of greedy tokens equal to "
             "quantpipe's own runtime's; memory: the server's process tree (PSS: shared pages once; GPU memory) "
             "after loading and at its peak under load; KV: the engine's reported capacity (vLLM, tokens) or "
             "allocation (llama.cpp, for its n_ctx) / `quantpipe plan`'s for the same budget."), "",
             *_table(head, body)]
    lhead, lbody = latency_rows(res)
    if lbody:
        lines += ["", cell("Under load (GuideLLM, synthetic prompts of "
                           f"{(res.serve or {}).get('prompt_tokens')} tokens, {(res.serve or {}).get('output_tokens')} "
                           "output tokens, bounded by request count and time; latency figures assume a machine "
                           "doing nothing else):"), "", *_table(lhead, lbody)]
    for s in res.served:
        if s.error or any(lv.error for lv in s.levels):
            why = s.error or next(lv.error for lv in s.levels if lv.error)
            lines += ["", cell(f"Incomplete ({s.variant} in {s.engine}): {why}")]
        if s.quality and s.quality.note:
            lines += ["", cell(f"Note ({s.engine}): {s.quality.note}.")]
            break
    return lines


def served_rows(res: Results) -> tuple[list[str], list[list[str]]]:
    head = ["variant", "engine", "loads", "dtype", "quantization / kernel", "served KLD (top-k)",
            "in-process KLD (top-k)", "in-process KLD (full)", "served top-1 %", "served PPL", "greedy match %",
            "PSS MiB loaded / peak", "GPU MiB", "plan MiB weights + KV", "KV engine / plan", "start s"]
    body = []
    for s in res.served:
        if not s.loads:
            verb = "not tried" if not s.tried else ("did not start" if not s.complete else "no")
            body.append([s.variant, s.engine, f"{verb}: {s.reason or s.error or '?'}", *["–"] * (len(head) - 3)])
            continue
        q, m, g = s.quality, s.memory, s.greedy or {}
        share = g.get("matching_prefix_share")
        planned = ("–" if m.predicted_weights_mib is None or m.predicted_kv_cache_mib is None else
                   f"{m.predicted_weights_mib:.0f} + {m.predicted_kv_cache_mib:.0f}")
        if m.kv_cache_mib is not None:  # llama.cpp: the allocation for its n_ctx tokens
            kv = f"{m.kv_cache_mib:.1f} / {_f(m.predicted_kv_cache_mib, '.1f')} MiB ({_f(m.kv_cache_tokens, ',')} tok)"
        else:
            kv = f"{_f(m.kv_cache_tokens, ',')} / {_f(m.predicted_kv_cache_tokens, ',')} tokens"
        loads = f"yes ({s.engine_version})" if s.engine_version else "yes"
        if s.error:
            loads += f", but {s.error.removeprefix('the engine ')}"
        body.append([s.variant, s.engine, loads, s.engine_dtype or s.dtype or "–",
                     " / ".join(x for x in (s.quantization, s.kernel) if x) or "–",
                     _f(q.kld_mean if q else None, ".5f") if not (q and q.error) else f"error: {q.error}",
                     _f(s.in_process_kld_topk, ".5f"), _f(s.in_process_kld, ".5f"),
                     _f(None if not q or q.top1_agreement is None else 100 * q.top1_agreement, ".1f"),
                     _f(q.perplexity if q else None, ".3f"), _f(None if share is None else 100 * share, ".0f"),
                     f"{_f(m.pss_loaded_mib, '.0f')} / {_f(m.peak_pss_mib, '.0f')}", _f(m.gpu_mib, ".0f"), planned, kv,
                     _f(s.start_s, ".1f")])
    return head, body


def latency_rows(res: Results) -> tuple[list[str], list[list[str]]]:
    head = ["variant", "engine", "concurrency", "TTFT p50 ms", "TTFT p95 ms", "TTFT p99 ms", "ITL p50 ms",
            "ITL p95 ms", "e2e p50 ms", "e2e p95 ms", "e2e p99 ms", "output tok/s", "requests/s", "requests ok",
            "failed"]
    body = []
    for s in res.served:
        for lv in s.levels:
            if lv.error:
                body.append([s.variant, s.engine, str(lv.concurrency), "failed: " + lv.error.splitlines()[-1],
                             *["–"] * (len(head) - 4)])
                continue
            t, i, e = lv.ttft_ms, lv.itl_ms, lv.e2e_ms
            body.append([s.variant, s.engine, str(lv.concurrency),
                         *[_f(getattr(t, q) if t else None, ".1f") for q in ("p50", "p95", "p99")],
                         *[_f(getattr(i, q) if i else None, ".1f") for q in ("p50", "p95")],
                         *[_f(getattr(e, q) if e else None, ".0f") for q in ("p50", "p95", "p99")],
                         _f(lv.output_tok_s, ".1f"), _f(lv.requests_per_s, ".2f"),
                         str(lv.requests.get("successful", "–")), _f(lv.failed, "d")])
    return head, body


def served_png(res: Results) -> bytes | None:
    """p95 TTFT and output tokens/s against concurrency, one line per served (variant, engine)."""
    series = [(f"{s.variant} @ {s.engine}", [lv for lv in s.levels if lv.error is None and lv.ttft_ms])
              for s in res.served if s.loads]
    series = [(n, lv) for n, lv in series if lv]
    if not series:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4.2), dpi=110)
    for name, lvs in series:
        xs = [lv.concurrency for lv in lvs]
        a.plot(xs, [lv.ttft_ms.p95 for lv in lvs], marker="o", label=name)  # type: ignore[union-attr]
        b.plot(xs, [lv.output_tok_s for lv in lvs], marker="o", label=name)
    for ax, what in ((a, "p95 time to first token (ms)"), (b, "output tokens/s")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent requests")
        ax.set_ylabel(what)
        ax.grid(alpha=0.3)
    b.legend(fontsize=7, loc="best")
    fig.suptitle(f"{res.recipe.name}: served under load", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def speed_rows(res: Results) -> tuple[list[str], list[list[str]]]:
    """Per row and batch: engine, kernel, decode tok/s against the bandwidth limit, prefill, TTFT, memory, and
    quantization time (rows only where the bench recorded a limit)."""
    head = ["variant", "engine", "kernel", "batch", "decode tok/s", "limit tok/s", "% of limit", "prefill tok/s",
            "TTFT ms", "peak memory MiB", "quantize s", "quantize peak GPU MiB"]
    body = []
    for v in res.variants:
        s, mem, t = v.speed, v.memory, v.timings
        if s is None:
            continue
        gpu = mem.peak_gpu_mib
        peak = (f"{gpu:.0f} / {mem.gpu_driver_used_mib:.0f}" if gpu is not None and mem.gpu_driver_used_mib
                else _f(mem.peak_rss_mib, ".0f") + " RSS")
        for b, row in s.per_batch.items():
            if row.limit_tok_s is None:
                continue
            frac = row.frac_of_limit
            body.append([v.name, s.engine or "–", s.kernel or "–", b, _f(row.decode_tok_s, ".1f"),
                         _f(row.limit_tok_s, ".1f"), _f(None if frac is None else 100 * frac, ".1f"),
                         _f(row.prefill_tok_s, ".0f"), _f(None if row.ttft_s is None else 1000 * row.ttft_s, ".1f"),
                         peak, _f(t.quantize_s, ".1f"), _f(mem.quantize_peak_gpu_mib, ".0f")])
    return head, body


def _diff(pred: float | None, meas: float | None) -> str:
    return "–" if pred is None or not meas else f"{100 * (pred / meas - 1):+.0f}"


def memory_rows(res: Results) -> tuple[list[str], list[list[str]]]:
    """Predicted (`quantpipe plan`'s arithmetic) beside measured memory, per row, with the difference."""
    head = ["variant", "weights pred MiB", "in artifact MiB", "Δ %", "bench pred MiB", "bench meas MiB", "Δ %",
            "quantize pred MiB", "quantize meas MiB", "Δ %"]
    body = []
    for v in res.variants:
        p = v.prediction
        if p is None or p.error or p.weights_bytes is None:
            continue
        w, wm = p.weights_bytes / 2**20, (p.measured_weights_bytes or 0) / 2**20 or None
        b, bm = (p.bench or {}).get("total"), p.measured_bench_mib
        q, qm = (p.quantize or {}).get("total"), p.measured_quantize_mib
        mark = " (note)" if p.bench_not_modelled else ""
        nominal = " (nominal)" if p.weights_nominal else ""
        bound = " (upper bound)" if p.quantize_upper_bound else ""
        body.append([v.name, _f(w, ".1f") + nominal, _f(wm, ".1f"), _diff(w, wm), _f(b, ".0f"), _f(bm, ".0f"),
                     _diff(b, bm) + mark, _f(q, ".0f") + bound, _f(qm, ".0f"), _diff(q, qm)])
    return head, body


FRONTIER_COLOR, DOMINATED_COLOR = "#d62728", "#7f7f7f"


def envelope(front: list[Any]) -> tuple[list[float], list[float]]:
    """The frontier's quality-memory staircase: (MiB, KLD) corners of the best KLD at each memory, from frontier
    points sorted by memory."""
    xs: list[float] = []
    ys: list[float] = []
    best = float("inf")
    for p in front:
        if p.kld < best:
            if xs:
                xs.append(p.memory / 2**20)
                ys.append(best)
            xs.append(p.memory / 2**20)
            ys.append(p.kld)
            best = p.kld
    return xs, ys


def plot_figure(res: Results) -> Any:
    """Quality (KL divergence from the baseline) against the weights' memory (the artifact's tensor bytes), one
    point per variant on the frontier's axes: frontier points as red diamonds joined by the quality-memory
    envelope, dominated ones grey; labels placed so that none overlaps another label or a point. A run without
    quality figures gets an empty plot that says so."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fr = select.run_frontier(res)
    fig, ax = plt.subplots(figsize=(7.2, 4.6), dpi=110)
    ax.set_title(f"{res.recipe.name}: quality vs memory", parse_math=False)
    if not fr.points:
        ax.text(0.5, 0.5, "no quality figures (random weights or eval off)", ha="center", va="center",
                transform=ax.transAxes)
        ax.set_axis_off()
        fig.tight_layout()
        return fig
    pts = sorted(fr.points, key=lambda p: p.memory)
    on = [p for p in pts if fr.dominated_by[p.name] is None]
    xs = {p.name: p.memory / 2**20 for p in pts}
    for p in pts:
        front = fr.dominated_by[p.name] is None
        ax.scatter([xs[p.name]], [p.kld], s=70 if front else 40, marker="D" if front else "o",
                   color=FRONTIER_COLOR if front else DOMINATED_COLOR, zorder=3,
                   edgecolors="black" if front else "none", linewidths=0.6)
    env_x, env_y = envelope(on)
    ax.plot(env_x, env_y, color=FRONTIER_COLOR, lw=1.2, zorder=2, label="Pareto frontier (KLD, memory"
            + (", throughput)" if fr.throughput else ")"))
    ax.scatter([], [], color=DOMINATED_COLOR, s=40, label="dominated")
    for p in fr.off_axes:
        xs[p.name] = p.memory / 2**20
        ax.scatter([xs[p.name]], [p.kld], s=40, facecolors="none", edgecolors=DOMINATED_COLOR, zorder=3)
    if fr.off_axes:
        ax.scatter([], [], s=40, facecolors="none", edgecolors=DOMINATED_COLOR, label="not served: off the frontier")
    ax.set_xlabel("weights in the artifact (MiB)")
    ax.set_ylabel("KL divergence from the baseline (lower is better)")
    ax.grid(alpha=0.3)
    legend = ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    renderer = fig.canvas.get_renderer()
    path = ax.transData.transform(list(zip(env_x, env_y, strict=True))) if env_x else []
    line = [p for a, b in zip(path, path[1:], strict=False) for p in _segment(a, b)]
    place_labels(fig, ax, [(p.name, xs[p.name], p.kld) for p in [*pts, *fr.off_axes]],
                 avoid=[legend.get_window_extent(renderer)], line=line)
    return fig


def _segment(a: Any, b: Any, step: float = 4.0) -> list[tuple[float, float]]:
    """Points every `step` pixels along a line segment (what a label must not sit on)."""
    n = max(1, int(((b[0] - a[0]) ** 2 + (b[1] - a[1]) ** 2) ** 0.5 / step))
    return [(a[0] + (b[0] - a[0]) * i / n, a[1] + (b[1] - a[1]) * i / n) for i in range(n + 1)]


# label offsets tried around a point, in points (right, above, left, below, then the diagonals), at growing radii
_OFFSETS = [(1, 0.3), (1, -1.2), (-1, 0.3), (-1, -1.2), (0, 1.2), (0, -2.2), (1, 1.5), (-1, 1.5), (1, -2.5),
            (-1, -2.5)]


def place_labels(fig: Any, ax: Any, labels: list[tuple[str, float, float]], avoid: list[Any] | None = None,
                 line: list[tuple[float, float]] | None = None) -> list[Any]:
    """Annotate each (name, x, y) at the first offset whose text box overlaps no placed label, no point's marker
    and stays inside the axes; further out (with a leader line) when the near ones are taken. Names are drawn
    as plain text (no math-text parsing of `$`)."""
    renderer = fig.canvas.get_renderer()
    inside = ax.get_window_extent(renderer)
    markers = [ax.transData.transform((x, y)) for _, x, y in labels]
    placed: list[Any] = list(avoid or [])
    texts = []
    for name, x, y in labels:
        best = None
        for radius in (7, 14, 24, 36, 50):
            for dx, dy in _OFFSETS:
                ha = "left" if dx > 0 else "right" if dx < 0 else "center"
                t = ax.annotate(name, (x, y), textcoords="offset points", xytext=(dx * radius, dy * radius * 0.8),
                                fontsize=8, ha=ha, parse_math=False, zorder=4,
                                arrowprops={"arrowstyle": "-", "color": "#999999", "lw": 0.6} if radius > 14
                                else None)
                box = t.get_window_extent(renderer).expanded(1.05, 1.1)
                clash = (any(box.overlaps(b) for b in placed)
                         or any(_near(box, mx, my, 6) for mx, my in markers)
                         or any(_near(box, lx, ly, 1) for lx, ly in line or [])
                         or not (inside.contains(box.x0, box.y0) and inside.contains(box.x1, box.y1)))
                if not clash:
                    best = (t, box)
                    break
                t.remove()
            if best:
                break
        if best is None:  # nowhere free: the last resort sits far right of the point, outside the crowd
            t = ax.annotate(name, (x, y), textcoords="offset points", xytext=(60, 20), fontsize=8,
                            parse_math=False, arrowprops={"arrowstyle": "-", "color": "#999999", "lw": 0.6})
            best = (t, t.get_window_extent(renderer))
        placed.append(best[1])
        texts.append(best[0])
    return texts


def _near(box: Any, x: float, y: float, pad: float) -> bool:
    return box.x0 - pad <= x <= box.x1 + pad and box.y0 - pad <= y <= box.y1 + pad


def plot_png(res: Results) -> bytes:
    import matplotlib.pyplot as plt

    fig = plot_figure(res)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _html_table(head: list[str], body: list[list[str]], groups: list[str] | None = None) -> str:
    """A table in a scrolling box whose header stays in view; `groups` (one per column) adds a header row that
    spans each run of equal groups."""
    group_row = ""
    if groups:
        spans: list[list[Any]] = []
        for g in groups:
            if spans and spans[-1][0] == g:
                spans[-1][1] += 1
            else:
                spans.append([g, 1])
        group_row = ('<tr class="groups">' + "".join(f'<th colspan="{n}">{html.escape(g)}</th>' for g, n in spans)
                     + "</tr>")
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    trs = "\n".join("<tr>" + "".join(f'<td class="long">{html.escape(c)}</td>' if len(c) > 60 else
                                      f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in body)
    return (f'<div class="scroll"><table><thead>{group_row}<tr class="heads">{th}</tr></thead><tbody>\n{trs}\n'
            "</tbody></table></div>")


def frontier_chart(res: Results) -> str:
    """The quality-vs-memory chart as an interactive Plotly figure (plotly.js inlined: works offline): one trace
    per variant, frontier points as outlined diamonds joined by the frontier, each point's name and figures on
    hover. Empty for a run without quality figures."""
    fr = select.run_frontier(res)
    if not fr.points:
        return ""
    import plotly.graph_objects as go

    fig = go.Figure()
    on = sorted((p for p in fr.points if fr.dominated_by[p.name] is None), key=lambda p: p.memory)
    env_x, env_y = envelope(on)
    fig.add_trace(go.Scatter(x=env_x, y=env_y, mode="lines", name="Pareto frontier",
                             line={"color": FRONTIER_COLOR, "width": 2}, hoverinfo="skip"))
    for p in sorted([*fr.points, *fr.off_axes], key=lambda p: p.memory):
        status = fr.status[p.name]
        front = status == "yes"
        hover = (f"<b>{html.escape(p.name)}</b><br>KLD {p.kld:.5f}" + (f" ± {p.kld_se:.5f}" if p.kld_se else "")
                 + f"<br>weights {p.memory / 2**20:.1f} MiB"
                 + (f"<br>{p.throughput:.1f} tok/s" if p.throughput is not None else "")
                 + f"<br>{'on the frontier' if front else html.escape(status)}<extra></extra>")
        fig.add_trace(go.Scatter(
            x=[p.memory / 2**20], y=[p.kld], mode="markers", name=p.name + (" ◆" if front else ""),
            hovertemplate=hover, meta=["frontier" if front else "other"],
            marker={"size": 14 if front else 10, "symbol": "diamond" if front else "circle",
                    "color": FRONTIER_COLOR if front else DOMINATED_COLOR,
                    "line": {"color": "black", "width": 1} if front else {"width": 0},
                    **({} if p.throughput is not None or not fr.throughput else
                       {"color": "white", "line": {"color": DOMINATED_COLOR, "width": 2}})}))
    fig.update_layout(title=f"{res.recipe.name}: quality vs memory (◆ Pareto frontier over KLD, memory"
                      + (", throughput)" if fr.throughput else ")"),
                      xaxis_title="weights in the artifact (MiB)",
                      yaxis_title="KL divergence from the baseline (lower is better)", width=1000, height=560,
                      template="plotly_white", legend={"title": {"text": "variant"}})
    div = fig.to_html(full_html=False, include_plotlyjs=True, div_id="frontier-chart",
                      config={"displaylogo": False, "responsive": False})
    names = ",".join(p.name for p in on)
    return f'<div class="chart" data-frontier="{html.escape(names)}">{div}</div>'


def frontier_note(res: Results) -> str:
    fr = select.run_frontier(res)
    if not fr.points:
        return ""
    return (f"Pareto frontier: {', '.join(p.name for p in fr.points if fr.dominated_by[p.name] is None)}: over KL "
            "divergence, the artifact's weight bytes and "
            + (fr.throughput if fr.throughput else "no throughput (none measured)")
            + "; dominated = another variant at least as good on every axis and better on one beyond noise "
            "(KLD: paired t over the eval's blocks). For a GPU, a context and a concurrency: `quantpipe select "
            "RUN_DIR --gpu L4-24GB,H100-80GB --context 8192 --concurrency 16`.")


CSS = """body{font-family:sans-serif;margin:2em}
.scroll{overflow:auto;max-height:80vh;max-width:100%;border:1px solid #ccc;margin:0.5em 0 1.5em}
table{border-collapse:separate;border-spacing:0}
td,th{border-bottom:1px solid #ddd;border-right:1px solid #eee;padding:4px 8px;text-align:right;white-space:nowrap}
thead th{position:sticky;top:0;background:#f3f3f3;z-index:2}
thead tr.groups th{height:26px;box-sizing:border-box;text-align:center;border-bottom:2px solid #bbb}
thead tr.groups + tr.heads th{top:26px}
td:first-child,th:first-child{position:sticky;left:0;text-align:left;z-index:1}
td:first-child{background:#fff}
thead th:first-child{z-index:3}
td.long{white-space:normal;min-width:24em;text-align:left}"""


def html_page(res: Results, png: bytes, served: bytes | None = None) -> str:
    cols, body = grouped_rows(res)
    matrix = _html_table([h for _, h in cols], body, [g for g, _ in cols])
    img = base64.b64encode(png).decode()
    serve_html = ""
    if res.served:
        serve_html = "<h2>Served</h2>" + _html_table(*served_rows(res))
        lhead, lbody = latency_rows(res)
        if lbody:
            serve_html += "<h3>Under load (GuideLLM)</h3>" + _html_table(lhead, lbody)
        if served is not None:
            serve_html += (f'<p><img alt="served latency and throughput against concurrency" '
                           f'src="data:image/png;base64,{base64.b64encode(served).decode()}"></p>')
    name = html.escape(res.recipe.name)
    chart = frontier_chart(res)
    png_img = f'<img alt="quality vs memory" src="data:image/png;base64,{img}">'
    plot = (f"{chart}<noscript><p>{png_img}</p></noscript>" if chart else f"<p>{png_img}</p>")
    note = frontier_note(res)
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>quantpipe: {name}</title>
<style>{CSS}</style>
</head><body>
<h1>quantpipe matrix: {name}</h1>
<p>{html.escape(_context(res))}</p>
{matrix}
{f"<p>{html.escape(note)}</p>" if note else ""}
{plot}
{serve_html}
</body></html>
"""


def write(run_dir: Path, results: Results | dict[str, Any]) -> None:
    """matrix.png, matrix.md and matrix.html: all rendered first, then each written atomically (never through a
    symlink), so a rendering failure leaves the previous three as they were."""
    from quantpipe.cache import write_bytes, write_text

    res = as_results(results)
    png, served = plot_png(res), served_png(res)
    md, page = markdown(res), html_page(res, png, served)
    write_bytes(run_dir / "matrix.png", png)
    if served is not None:
        write_bytes(run_dir / "served.png", served)
    write_text(run_dir / "matrix.md", md)
    write_text(run_dir / "matrix.html", page)
