"""The run's outputs for people: the comparison matrix as Markdown and HTML, and the quality-vs-memory plot.

Everything here is rendered from results.json alone, so `quantpipe report RUN_DIR` can redo it at any time.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

from quantpipe.errors import QuantpipeError

RESULTS_SCHEMA_VERSION = 1


def load_results(path: Path, what: str) -> dict[str, Any]:
    """A results.json (or a run directory holding one), checked for the schema this quantpipe reads; `what`
    names the command or option in the error."""
    p = path / "results.json" if path.is_dir() else path
    if not p.is_file():
        raise QuantpipeError(f"{what}: '{p}' does not exist (give a run directory or its results.json)")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise QuantpipeError(f"{what}: '{p}' is not valid JSON ({e}); re-render it with `quantpipe run`") from None
    if not isinstance(data, dict) or data.get("schema_version") != RESULTS_SCHEMA_VERSION:
        got = data.get("schema_version") if isinstance(data, dict) else type(data).__name__
        raise QuantpipeError(f"{what}: '{p}' has schema_version {got!r}; this quantpipe reads "
                             f"{RESULTS_SCHEMA_VERSION} (re-run it with this version)")
    if not isinstance(data.get("variants"), list) or not data.get("reference"):
        raise QuantpipeError(f"{what}: '{p}' has no 'variants' list or 'reference'; not a quantpipe results file")
    return data


def _f(x: Any, fmt: str) -> str:
    return "–" if x is None else format(x, fmt)


def rows(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and cells of the matrix, one row per variant, reference first."""
    batches = [str(b) for b in results.get("bench", {}).get("batch_sizes", [])]
    tasks = lm_eval_tasks(results)
    lm_head = [f"{t} {m}" for t, m in tasks] + (["lm-eval recovery %"] if tasks else [])
    head = ["variant", "method", "size MiB", "size ×", "PPL", "ΔPPL %", "KLD", "top-1 %", *lm_head, "prefill tok/s",
            *[f"decode tok/s b{b}" for b in batches], "TTFT ms", "peak RSS MiB", "quantize s"]
    ref = next(v for v in results["variants"] if v["name"] == results["reference"])
    ref_size = ref["artifact"]["size_bytes"]
    ref_ppl = ref["quality"].get("perplexity") if ref.get("quality") else None
    body = []
    for v in results["variants"]:
        q, s = v.get("quality") or {}, v.get("speed") or {}
        pb = s.get("per_batch", {})
        first = pb.get(batches[0], {}) if batches else {}
        ppl = q.get("perplexity")
        dppl = None if ppl is None or not ref_ppl else 100 * (ppl / ref_ppl - 1)
        body.append([
            v["name"], v["method"],
            _f(v["artifact"]["size_bytes"] / 2**20, ".1f"),
            _f(v["artifact"]["size_bytes"] / ref_size, ".2f"),
            _f(ppl, ".3f"), _f(dppl, "+.2f"),
            _f(q.get("kld_mean"), ".5f"),
            _f(None if q.get("top1_agreement") is None else 100 * q["top1_agreement"], ".1f"),
            *lm_eval_cells(v, tasks),
            _f(first.get("prefill_tok_s"), ".1f"),
            *[_f(pb.get(b, {}).get("decode_tok_s"), ".1f") for b in batches],
            _f(None if first.get("ttft_s") is None else 1000 * first["ttft_s"], ".1f"),
            _f((v.get("memory") or {}).get("peak_rss_mib"), ".0f"),
            _f((v.get("timings") or {}).get("quantize_s"), ".1f"),
        ])
    return head, body


def lm_eval_tasks(results: dict[str, Any]) -> list[tuple[str, str]]:
    """(task, metric) of every lm-eval score in the run, in task order."""
    seen: dict[str, str] = {}
    for v in results["variants"]:
        for t, sc in sorted((v.get("lm_eval") or {}).items()):
            seen.setdefault(t, sc.get("metric", "?"))
    return list(seen.items())


def mean_recovery(v: dict[str, Any]) -> float | None:
    """Mean over tasks of the score recovery vs the baseline (what the gate's min_lm_eval_recovery checks)."""
    rec = [sc["recovery"] for sc in (v.get("lm_eval") or {}).values() if sc.get("recovery") is not None]
    return sum(rec) / len(rec) if rec else None


def lm_eval_cells(v: dict[str, Any], tasks: list[tuple[str, str]]) -> list[str]:
    if not tasks:
        return []
    cells = []
    for t, _ in tasks:
        sc = (v.get("lm_eval") or {}).get(t)
        if not sc or sc.get("value") is None:
            cells.append("–")
            continue
        cell = f"{sc['value']:.3f}" + (f" ± {sc['stderr']:.3f}" if sc.get("stderr") is not None else "")
        if sc.get("recovery") is not None:
            se = sc.get("recovery_se")
            cell += f" ({100 * sc['recovery']:.0f}" + (f" ± {100 * se:.0f}" if se else "") + " %)"
        cells.append(cell)
    rec = mean_recovery(v)
    return [*cells, _f(None if rec is None else 100 * rec, ".1f")]


def _context(results: dict[str, Any]) -> str:
    ev, hw, b = results["eval"], results["hardware"], results.get("bench", {})
    where = hw.get("gpu") or f"{hw['cpu']} ({hw['cpu_count']} cores)"
    used = {(v.get("speed") or {}).get("device") for v in results["variants"]} - {None}
    device = ", ".join(sorted(used)) or b.get("device")
    bench = (f"bench: {device} prompt {b['prompt_len']} + {b['gen_len']} new tokens, median of "
             f"{b['repeats']}" if b.get("enabled") else "bench: off")
    lm = ev.get("lm_eval")
    lm_line = "" if not lm else (
        f"; lm-eval: {', '.join(lm['tasks'])}, {lm.get('num_fewshot')}-shot, "
        + (f"first {lm['limit']} documents per task" if lm.get("limit") else "all documents")
        + ", score ± stderr (recovery vs the baseline)")
    if results.get("weights") == "random":
        return (f"{results['recipe']['name']} — **random weights** ({results.get('model')}): speed and memory only, "
                f"no quality evaluation; {bench}; {where}")
    if not ev.get("enabled", True):
        return f"{results['recipe']['name']} — eval: off; {bench}; {where}"
    return (f"{results['recipe']['name']} — eval: {ev['n_windows']} windows × {ev['window']} tokens, KLD vs "
            f"'{results['reference']}'{lm_line}; {bench}; {where}")


def vocab_note(v: dict[str, Any]) -> str:
    """For formats that carry their own vocabulary (GGUF): whether its ids are the baseline tokenizer's."""
    voc = (v.get("meta") or {}).get("vocab")
    if not voc:
        return ""
    if not voc.get("one_to_one"):
        return (f"; **vocabulary NOT one to one with the baseline's** ({voc['n_different']} of {voc['n_baseline']} "
                "ids differ): its PPL/KLD/top-1 score different tokens and are not comparable")
    tok = "" if voc.get("tokenization_matches") is None else (
        "; llama.cpp tokenizes the eval text as the baseline does" if voc["tokenization_matches"]
        else "; llama.cpp tokenizes the eval text differently (scores use the baseline's ids)")
    return f"; vocabulary one to one with the baseline's ({voc['n_baseline']} ids){tok}"


def markdown(results: dict[str, Any]) -> str:
    head, body = rows(results)
    lines = [f"# quantpipe matrix: {results['recipe']['name']}", "", _context(results), "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    lines += ["", "Formats and the code that ran each variant's matmuls (eval / bench):", ""]
    for v in results["variants"]:
        kernels = {k for k in (v.get("eval_kernel"), (v.get("speed") or {}).get("kernel")) if k}
        lines.append(f"- {v['name']}: {v.get('format') or '?'}; runtime {v.get('runtime')}; "
                     + ("; ".join(sorted(kernels)) or "kernel not recorded") + vocab_note(v))
    shead, sbody = speed_rows(results)
    if sbody:
        lines += ["", "Decode against the memory-bandwidth limit: a step reads the weights once and each sequence's "
                  "KV cache; limit = batch × measured copy bandwidth / those bytes. Engine and kernel as run by "
                  "the bench; GPU memory: allocator peak / what the driver reports in use:", "",
                  "| " + " | ".join(shead) + " |", "|" + "---|" * len(shead)]
        lines += ["| " + " | ".join(r) + " |" for r in sbody]
    mhead, mbody = memory_rows(results)
    if mbody:
        lines += ["", "Memory, predicted (`quantpipe plan`) vs measured. Weights: the artifact's tensors. Bench: the "
                  "largest batch's weights + KV cache + activations vs the bench process's peak over its memory "
                  "before loading. Quantize: float model + calibration working set + packed output vs the "
                  "quantize process's peak over its memory with the libraries loaded:", "",
                  "| " + " | ".join(mhead) + " |", "|" + "---|" * len(mhead)]
        lines += ["| " + " | ".join(r) + " |" for r in mbody]
    notes: dict[str, list[str]] = {}
    for v in results["variants"]:
        for key in ("bench_not_modelled", "quantize_upper_bound"):
            note = (v.get("prediction") or {}).get(key)
            if note:
                notes.setdefault(note, []).append(v["name"])
    lines += [f"\nNote ({', '.join(names)}): {note}." for note, names in notes.items()]
    errors = {(v.get("prediction") or {}).get("error") for v in results["variants"]} - {None}
    lines += [f"\nMemory prediction unavailable: {e}" for e in errors]
    return "\n".join(lines) + "\n"


def speed_rows(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Per variant and batch: engine, kernel, decode tok/s against the bandwidth limit, prefill, TTFT, memory,
    and quantization time (rows only where the bench recorded a limit)."""
    head = ["variant", "engine", "kernel", "batch", "decode tok/s", "limit tok/s", "% of limit", "prefill tok/s",
            "TTFT ms", "peak memory MiB", "quantize s", "quantize peak GPU MiB"]
    body = []
    for v in results["variants"]:
        s = v.get("speed") or {}
        mem, t = v.get("memory") or {}, v.get("timings") or {}
        gpu = mem.get("peak_gpu_mib")
        peak = (f"{gpu:.0f} / {mem['gpu_driver_used_mib']:.0f}" if gpu is not None and mem.get("gpu_driver_used_mib")
                else _f(mem.get("peak_rss_mib"), ".0f") + " RSS")
        for b, row in (s.get("per_batch") or {}).items():
            if row.get("limit_tok_s") is None:
                continue
            frac = row.get("frac_of_limit")
            body.append([v["name"], s.get("engine") or "–", s.get("kernel") or "–", b,
                         _f(row.get("decode_tok_s"), ".1f"), _f(row["limit_tok_s"], ".1f"),
                         _f(None if frac is None else 100 * frac, ".1f"), _f(row.get("prefill_tok_s"), ".0f"),
                         _f(None if row.get("ttft_s") is None else 1000 * row["ttft_s"], ".1f"), peak,
                         _f(t.get("quantize_s"), ".1f"), _f(mem.get("quantize_peak_gpu_mib"), ".0f")])
    return head, body


def _diff(pred: float | None, meas: float | None) -> str:
    return "–" if pred is None or not meas else f"{100 * (pred / meas - 1):+.0f}"


def memory_rows(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Predicted (`quantpipe plan`'s arithmetic) beside measured memory, per variant, with the difference."""
    head = ["variant", "weights pred MiB", "in artifact MiB", "Δ %", "bench pred MiB", "bench meas MiB", "Δ %",
            "quantize pred MiB", "quantize meas MiB", "Δ %"]
    body = []
    for v in results["variants"]:
        p = v.get("prediction")
        if not p or "error" in p:
            continue
        w, wm = p["weights_bytes"] / 2**20, (p.get("measured_weights_bytes") or 0) / 2**20 or None
        b, bm = (p.get("bench") or {}).get("total"), p.get("measured_bench_mib")
        q, qm = (p.get("quantize") or {}).get("total"), p.get("measured_quantize_mib")
        mark = " (note)" if p.get("bench_not_modelled") else ""
        nominal = " (nominal)" if p.get("weights_nominal") else ""
        bound = " (upper bound)" if p.get("quantize_upper_bound") else ""
        body.append([v["name"], _f(w, ".1f") + nominal, _f(wm, ".1f"), _diff(w, wm), _f(b, ".0f"), _f(bm, ".0f"),
                     _diff(b, bm) + mark,
                     _f(q, ".0f") + bound, _f(qm, ".0f"), _diff(q, qm)])
    return head, body


def plot_png(results: dict[str, Any]) -> bytes:
    """Quality (perplexity) against memory (peak RSS if benchmarked, else artifact size), one point per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    use_rss = all((v.get("memory") or {}).get("peak_rss_mib") for v in results["variants"])
    for v in results["variants"]:
        x = v["memory"]["peak_rss_mib"] if use_rss else v["artifact"]["size_bytes"] / 2**20
        y = (v.get("quality") or {}).get("perplexity")
        if y is None:
            continue
        ax.scatter([x], [y], s=40)
        ax.annotate(v["name"], (x, y), textcoords="offset points", xytext=(5, 4), fontsize=9)
    ax.set_xlabel("peak resident memory while benchmarking (MiB)" if use_rss else "artifact size (MiB)")
    ax.set_ylabel("perplexity (lower is better)")
    ax.set_title(f"{results['recipe']['name']}: quality vs memory")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def html_page(results: dict[str, Any], png: bytes) -> str:
    head, body = rows(results)
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    trs = "\n".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in body)
    img = base64.b64encode(png).decode()
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>quantpipe: {html.escape(results['recipe']['name'])}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}td:first-child,th:first-child{{text-align:left}}</style>
</head><body>
<h1>quantpipe matrix: {html.escape(results['recipe']['name'])}</h1>
<p>{html.escape(_context(results))}</p>
<table><thead><tr>{th}</tr></thead><tbody>
{trs}
</tbody></table>
<p><img alt="quality vs memory" src="data:image/png;base64,{img}"></p>
</body></html>
"""


def write(run_dir: Path, results: dict[str, Any]) -> None:
    png = plot_png(results)
    (run_dir / "matrix.png").write_bytes(png)
    (run_dir / "matrix.md").write_text(markdown(results))
    (run_dir / "matrix.html").write_text(html_page(results, png))
