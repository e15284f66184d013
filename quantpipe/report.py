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

from quantpipe.results import Results, Row, as_results


def cell(text: Any) -> str:
    """A table cell of the Markdown matrix: HTML escaped (Markdown renders raw HTML), `|` escaped, one line."""
    return html.escape(str(text), quote=False).replace("|", "\\|").replace("\n", " ")


def _f(x: Any, fmt: str) -> str:
    return "–" if x is None else format(x, fmt)


def _batches(res: Results) -> list[str]:
    return [str(b) for b in res.bench.get("batch_sizes", [])]


def several_runtimes(res: Results) -> bool:
    return any(r.name != r.variant for r in res.variants)


def rows(results: Results | dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and cells of the matrix, one row per (variant, runtime), reference first."""
    res = as_results(results)
    batches = _batches(res)
    tasks = lm_eval_tasks(res)
    lm_head = [f"{t} {m}" for t, m in tasks] + (["lm-eval recovery %"] if tasks else [])
    runtime_col = ["runtime"] if several_runtimes(res) else []
    head = ["variant", "method", *runtime_col, "size MiB", "size ×", "PPL", "ΔPPL %", "KLD", "top-1 %", *lm_head,
            "prefill tok/s", *[f"decode tok/s b{b}" for b in batches], "TTFT ms", "peak RSS MiB", "quantize s"]
    ref = res.reference_row
    ref_ppl = ref.quality.perplexity if ref.quality else None
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
            _f(v.artifact.size_bytes / 2**20, ".1f"),
            _f(v.artifact.size_bytes / base_size, ".2f"),
            _f(ppl, ".3f"), _f(dppl, "+.2f"),
            _f(q.kld_mean if q else None, ".5f"),
            _f(100 * q.top1_agreement if q else None, ".1f"),
            *lm_eval_cells(v, tasks),
            _f(first.prefill_tok_s if first else None, ".1f"),
            *[_f(pb[b].decode_tok_s if b in pb else None, ".1f") for b in batches],
            _f(1000 * first.ttft_s if first and first.ttft_s is not None else None, ".1f"),
            _f(v.memory.peak_rss_mib, ".0f"),
            _f(v.timings.quantize_s, ".1f"),
        ])
    return head, body


def lm_eval_tasks(res: Results) -> list[tuple[str, str]]:
    """(task, metric) of every lm-eval score in the run, in task order."""
    seen: dict[str, str] = {}
    for v in res.variants:
        for t, sc in sorted((v.lm_eval or {}).items()):
            seen.setdefault(t, sc.metric)
    return list(seen.items())


def mean_recovery(v: Row) -> float | None:
    """Mean over tasks of the score recovery vs the baseline (what the gate's min_lm_eval_recovery checks)."""
    rec = [sc.recovery for sc in (v.lm_eval or {}).values() if sc.recovery is not None]
    return sum(rec) / len(rec) if rec else None


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


def _table(head: list[str], body: list[list[str]]) -> list[str]:
    return (["| " + " | ".join(cell(h) for h in head) + " |", "|" + "---|" * len(head)]
            + ["| " + " | ".join(cell(c) for c in r) + " |" for r in body])


def markdown(results: Results | dict[str, Any]) -> str:
    res = as_results(results)
    head, body = rows(res)
    lines = [f"# quantpipe matrix: {cell(res.recipe.name)}", "", cell(_context(res)), "", *_table(head, body)]
    lines += ["", "Formats and the code that ran each row's matmuls (eval / bench):", ""]
    for v in res.variants:
        kernels = {k for k in (v.eval_kernel, v.speed.kernel if v.speed else None) if k}
        layout = v.format or "?"
        if v.format_detail and v.format_detail != layout:  # the library's own name of the layout
            layout = v.format_detail if v.format_detail.startswith(layout) else f"{layout} ({v.format_detail})"
        lines.append(cell(f"- {v.name}: {layout}; runtime {v.runtime}; "
                          + ("; ".join(sorted(kernels)) or "kernel not recorded") + vocab_note(v)
                          + (f"; {v.note}" if v.note else "")))
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


def plot_png(res: Results) -> bytes:
    """Quality (perplexity) against memory (peak RSS if benchmarked, else artifact size), one point per row.
    Names are drawn as plain text (no math-text parsing of `$`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    use_rss = all(v.memory.peak_rss_mib for v in res.variants)
    for v in res.variants:
        x = v.memory.peak_rss_mib if use_rss else v.artifact.size_bytes / 2**20
        y = v.quality.perplexity if v.quality else None
        if y is None or x is None:
            continue
        ax.scatter([x], [y], s=40)
        ax.annotate(v.name, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=9, parse_math=False)
    ax.set_xlabel("peak resident memory while benchmarking (MiB)" if use_rss else "artifact size (MiB)")
    ax.set_ylabel("perplexity (lower is better)")
    ax.set_title(f"{res.recipe.name}: quality vs memory", parse_math=False)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _html_table(head: list[str], body: list[list[str]]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    trs = "\n".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in body)
    return f"<table><thead><tr>{th}</tr></thead><tbody>\n{trs}\n</tbody></table>"


def html_page(res: Results, png: bytes, served: bytes | None = None) -> str:
    matrix = _html_table(*rows(res))
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
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>quantpipe: {name}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}td:first-child,th:first-child{{text-align:left}}</style>
</head><body>
<h1>quantpipe matrix: {name}</h1>
<p>{html.escape(_context(res))}</p>
{matrix}
<p><img alt="quality vs memory" src="data:image/png;base64,{img}"></p>
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
