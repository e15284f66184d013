"""`quantpipe gate`: a run's results.json against thresholds (the recipe's `gates:` or a file) and, optionally,
against a previous results.json, flagging quality regressions beyond the eval's noise. Prints a table; writes
JUnit XML and a GitHub step summary. Exit codes: 0 every check holds, 1 one regresses, 2 broken inputs.

Noise against a previous run (`--baseline`): both runs score the same eval windows (checked by the token
hash), so each metric's change is paired block by block (the eval records the mean of every block of 64
tokens of every window: batch means): d_b = new_b - old_b, its standard error se = stdev(d_b) / sqrt(n_blocks),
and a change is a regression when it is worse than both t(confidence, n_blocks - 1) × se and `min_change` ×
the old value. Blocks, not tokens: neighbouring tokens are correlated, so a token-level standard error would
understate the noise; blocks of 64 tokens are close to independent. Where a results file has no block values
(an older run), the token-level standard errors of both runs are combined instead (sqrt(se_old² + se_new²),
normal quantile), and the table says that this understates the noise.
"""

from __future__ import annotations

import math
import os
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from quantpipe.errors import QuantpipeError, first_line
from quantpipe.recipe import SERVE_GATES, GatesSpec, _format
from quantpipe.results import Quality, Results, Row, Served, as_results, as_row, load
from quantpipe.stats import normal_quantile, paired_difference, t_quantile  # noqa: F401 - tests read them here

MIB = 2**20
PASS, FAIL, ERROR, NEW, SKIP = "PASS", "FAIL", "ERROR", "NEW", "SKIP"
BENCH_GATES = ("max_peak_memory_mib", "min_decode_speedup")
# a row the bench left out by design (bench.no_native_speed: FP4 without FP4 tensor cores) skips the speed gates
NO_SPEED_BY_DESIGN = "speed not measured: "

@dataclass
class Check:
    """One check: what, against which threshold, the measured value and the verdict."""

    variant: str
    check: str
    threshold: str
    measured: str
    verdict: str
    detail: str = ""


# -- inputs --------------------------------------------------------------------------------------------------
def load_gates(path: Path) -> GatesSpec:
    """A gates file: YAML or JSON holding a `gates:` mapping (at top level, under `gates:`, or a whole recipe)."""
    if not path.is_file():
        raise QuantpipeError(f"--gates: '{path}' does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise QuantpipeError(f"--gates: '{path}' is not valid YAML: {first_line(e)}") from None
    except RecursionError:
        raise QuantpipeError(f"--gates: '{path}' is nested too deeply to be a gates file") from None
    if isinstance(data, dict) and "gates" in data:  # a gates file with a `gates:` key, or a recipe
        data = data["gates"]
    if not isinstance(data, dict):
        raise QuantpipeError(f"--gates: '{path}' must be a mapping with keys all, variants, ...")
    try:
        return GatesSpec.model_validate(data)
    except RecursionError:
        raise QuantpipeError(f"--gates: '{path}' is nested too deeply to be a gates file") from None
    except ValidationError as e:
        raise QuantpipeError(f"--gates: '{path}' is invalid:\n  " + "\n  ".join(_format(e, data, "gates."))) from None


# -- threshold checks ------------------------------------------------------------------------------------------
def measure(check: str, v: Row | dict[str, Any], base: Row | dict[str, Any], gates: GatesSpec
            ) -> tuple[float, str]:
    """The value a threshold compares, and how it was taken; QuantpipeError where the run did not measure it."""
    v, base = as_row(v), as_row(base)
    name = v.name

    def need(x: Any, what: str) -> Any:
        if x is None:
            raise QuantpipeError(f"{name}: {check} needs {what}, which this run did not record")
        return x

    q, q0 = v.quality, base.quality
    if check == "max_kld":
        how = "mean KL divergence from the baseline"
        if q is not None and q.kld_estimator != "full vocabulary":  # a top-k runtime: an estimate, biased low
            how += f" ({q.kld_estimator}: thresholds set on full-vocabulary KLD are lenient here)"
        return need(q and q.kld_mean, "the eval's KL divergence"), how
    if check == "min_top1":
        return need(q and q.top1_agreement, "the eval's top-1 agreement"), "share of positions"
    if check == "max_ppl_increase":
        p, p0 = need(q and q.perplexity, "the eval's perplexity"), need(q0 and q0.perplexity,
                                                                         "the baseline's perplexity")
        return p / p0 - 1, f"{p:.3f} vs baseline {p0:.3f}"
    if check == "min_lm_eval_recovery":
        tasks, tasks0 = v.lm_eval or {}, base.lm_eval or {}
        common = sorted(t for t in tasks if t in tasks0 and tasks0[t].value and tasks[t].value is not None)
        if not common:
            raise QuantpipeError(f"{name}: min_lm_eval_recovery needs lm-eval scores of the variant and the "
                                 "baseline on the same tasks, which this run did not record")
        # the run's recovery where it recorded one (it inverts lower-is-better metrics), else value / baseline's
        ratios = [tasks[t].recovery if tasks[t].recovery is not None else tasks[t].value / tasks0[t].value
                  for t in common]
        return sum(ratios) / len(ratios), "mean over " + ", ".join(common)
    if check == "max_peak_memory_mib":
        mem, speed = v.memory, v.speed
        if speed is not None and speed.device == "cuda" and mem.peak_gpu_mib is not None:
            return mem.peak_gpu_mib, "bench peak GPU memory allocated"
        return need(mem.peak_rss_mib, "a benchmark (bench.enabled)"), "bench peak RSS"
    if check == "min_decode_speedup":
        per = need(v.speed.per_batch if v.speed and v.speed.per_batch else None, "a benchmark (bench.enabled)")
        per0 = need(base.speed.per_batch if base.speed and base.speed.per_batch else None,
                    "a benchmark of the baseline")
        b = gates.speedup_batch or min(int(k) for k in per)
        if str(b) not in per or str(b) not in per0:
            raise QuantpipeError(f"{name}: min_decode_speedup at batch {b}, which the bench did not run "
                                 f"(it ran {', '.join(sorted(per, key=int))}); set gates.speedup_batch")
        d = need(per[str(b)].decode_tok_s, f"a decode speed at batch {b} (the bench measured none: decode took no "
                                           "time beyond the first token)")
        d0 = need(per0[str(b)].decode_tok_s, f"the baseline's decode speed at batch {b}")
        return d / d0, f"decode tok/s at batch {b}"
    if check == "max_size_mib":
        return v.artifact.size_bytes / MIB, "artifact directory"
    if check == "max_size_ratio":
        return v.artifact.size_bytes / base.artifact.size_bytes, "size / baseline's"
    raise AssertionError(check)


def _fmt(x: float) -> str:
    return f"{x:.4g}" if abs(x) < 1000 else f"{x:.0f}"


def thresholds_for(gates: GatesSpec, name: str, is_reference: bool) -> dict[str, float]:
    out = {} if is_reference else {k: x for k, x in gates.all.model_dump().items() if x is not None}
    if name in gates.variants:
        out.update({k: x for k, x in gates.variants[name].model_dump().items() if x is not None})
    return out


def check_thresholds(results: Results | dict[str, Any], gates: GatesSpec) -> list[Check]:
    res = as_results(results)
    variants = {r.variant for r in res.variants}
    unknown = sorted(set(gates.variants) - variants)
    if unknown:
        raise QuantpipeError(f"gates.variants: {', '.join(unknown)} not in this run (its variants: "
                             f"{', '.join(dict.fromkeys(r.variant for r in res.variants))})")
    ref = res.reference_row
    rows = []
    for v in res.variants:
        is_ref = v.variant == ref.variant
        for check, limit in thresholds_for(gates, v.variant, is_ref).items():
            if check in SERVE_GATES:
                continue
            bound = "≤" if check.startswith("max_") else "≥"
            if check in BENCH_GATES and v.speed is None and NO_SPEED_BY_DESIGN in (v.note or ""):
                rows.append(Check(v.name, check, f"{bound} {_fmt(limit)}", "–", SKIP, v.note or ""))
                continue
            try:
                value, how = measure(check, v, res.reference_for(v), gates)
            except QuantpipeError as e:
                rows.append(Check(v.name, check, f"{bound} {_fmt(limit)}", "–", ERROR, str(e)))
                continue
            ok = value <= limit if check.startswith("max_") else value >= limit
            rows.append(Check(v.name, check, f"{bound} {_fmt(limit)}", _fmt(value), PASS if ok else FAIL, how))
    for variant in dict.fromkeys(r.variant for r in res.variants):
        for check, limit in thresholds_for(gates, variant, variant == ref.variant).items():
            if check in SERVE_GATES:
                rows += serve_checks(res, gates, variant, check, limit)
    return rows


def serve_checks(res: Results, gates: GatesSpec, variant: str, check: str, limit: Any) -> list[Check]:
    """A serve gate of one variant, one check per engine (latency gates assume a dedicated machine)."""
    served = [s for s in res.served if s.variant == variant]
    if check == "require_servable":
        out = []
        for engine in limit:
            s = next((x for x in served if x.engine == engine), None)
            if s is None:
                out.append(Check(variant, check, f"servable by {engine}", "–", ERROR,
                                 f"{variant} was not served in {engine} (serve.engines, serve.variants)"))
            elif s.loads:
                out.append(Check(f"{variant}@{engine}", check, "loads", "yes", PASS, s.quantization or s.format or ""))
            else:
                out.append(Check(f"{variant}@{engine}", check, "loads", "no", FAIL if s.complete else ERROR,
                                 s.reason or s.error or ""))
        return out
    loaded = [s for s in served if s.loads]
    if not loaded:
        return [Check(variant, check, _bound(check, limit), "–", ERROR, f"{variant} was not served by any engine")]
    out = []
    for s in loaded:
        try:
            value, how = _served_value(res, gates, s, check)
        except QuantpipeError as e:
            out.append(Check(f"{variant}@{s.engine}", check, _bound(check, limit), "–", ERROR, str(e)))
            continue
        ok = value <= limit if check.startswith("max_") else value >= limit
        out.append(Check(f"{variant}@{s.engine}", check, _bound(check, limit), _fmt(value), PASS if ok else FAIL,
                         how))
    return out


def _bound(check: str, limit: float) -> str:
    return f"{'≤' if check.startswith('max_') else '≥'} {_fmt(limit)}"


def _served_value(res: Results, gates: GatesSpec, s: Served, check: str) -> tuple[float, str]:
    name = f"{s.variant}@{s.engine}"
    if check == "max_served_kld":
        if s.quality is None or s.quality.kld_mean is None:
            raise QuantpipeError(f"{name}: max_served_kld needs the served quality (serve.quality), which this run "
                                 "did not record" + (f": {s.quality.error}" if s.quality and s.quality.error else ""))
        return s.quality.kld_mean, f"served KLD ({s.quality.kld_estimator})"
    levels = (res.serve or {}).get("concurrency") or [lv.concurrency for lv in s.levels]
    c = gates.serve_concurrency or min(levels)
    lv = s.level(c)
    if lv is None:
        raise QuantpipeError(f"{name}: {check} at concurrency {c}, which the load test did not finish")
    if check == "max_ttft_p95_ms":
        if lv.ttft_ms is None or lv.ttft_ms.p95 is None:
            raise QuantpipeError(f"{name}: no TTFT recorded at concurrency {c}")
        return lv.ttft_ms.p95, f"p95 TTFT at concurrency {c} (dedicated machine)"
    if lv.output_tok_s is None:
        raise QuantpipeError(f"{name}: no throughput recorded at concurrency {c}")
    return lv.output_tok_s, f"output tokens/s at concurrency {c} (dedicated machine)"


# -- regressions against a previous run ------------------------------------------------------------------------
# metric: (results key, block key, token-level standard error key, higher is worse)
REGRESSION_METRICS = {"kld": ("kld_mean", "kld", "kld_se", True), "nll": ("nll_mean", "nll", "nll_se", True),
                      "top1": ("top1_agreement", "top1", None, False)}


def noise(metric: str, old: Quality, new: Quality, confidence: float) -> tuple[float, str]:
    """The allowance of a change of `metric` from old to new quality (see the module docstring)."""
    key, wkey, se_key, _ = REGRESSION_METRICS[metric]
    wo, wn = old.blocks.get(wkey), new.blocks.get(wkey)
    paired = paired_difference(wo or [], wn or [])
    if paired is not None:
        _, se, n = paired
        return t_quantile(confidence, n - 1) * se, f"t{confidence:g}({n - 1} dof) × paired SE over {n} blocks"
    if se_key is not None:
        se_o, se_n = getattr(old, se_key), getattr(new, se_key)
    else:  # top-1 agreement: a proportion over the scored tokens
        se_o, se_n = (math.sqrt(q.top1_agreement * (1 - q.top1_agreement) / max(1, q.n_tokens_scored or 1))
                      for q in (old, new))
    if se_o is None or se_n is None:
        return 0.0, "no standard error recorded: any change beyond min_change"
    return normal_quantile(confidence) * math.sqrt(se_o**2 + se_n**2), \
        f"z{confidence:g} × token-level SE of both runs (no block values; understates the noise)"


def check_regressions(results: Results | dict[str, Any], previous: Results | dict[str, Any], gates: GatesSpec
                      ) -> list[Check]:
    res, prev = as_results(results), as_results(previous)
    if "random" in (res.weights, prev.weights):
        raise QuantpipeError("--baseline: a run of random weights (model.weights: random) has no quality to "
                             "compare; gate it on speed, memory and size thresholds only")
    if res.model_digest and prev.model_digest and res.model_digest != prev.model_digest:
        raise QuantpipeError(f"--baseline: the previous run measured another base model (weights digest "
                             f"{prev.model_digest[:12]}… of '{prev.model}', this run {res.model_digest[:12]}… of "
                             f"'{res.model}'): their quality is not comparable")
    if not (res.model_digest and prev.model_digest):
        print("note: --baseline: a results file records no base-model digest (written by an older quantpipe): "
              "the two runs' models were not compared, only their eval tokens")
    th, tp = res.eval.get("tokens_sha256"), prev.eval.get("tokens_sha256")
    if th is None or tp is None or th != tp:
        raise QuantpipeError("--baseline: the two runs scored different eval tokens (eval.tokens_sha256 differs "
                             "or is missing): their quality is not comparable; keep eval.text, window and "
                             "max_tokens the same")
    # a row is compared with the previous run's row of the same variant in the same runtime (by name where a
    # file recorded no runtime)
    old = {(r.variant, r.runtime): r for r in prev.variants}
    old_by_name = {r.name: r for r in prev.variants}
    ref_variant = res.reference_row.variant
    rows = []
    for v in res.variants:
        name, q = v.name, v.quality
        if v.variant == ref_variant:
            continue  # the reference's KLD is 0 and its perplexity is the text's, not a quantization result
        before = old.get((v.variant, v.runtime)) or old_by_name.get(name)
        if before is None or before.quality is None:
            rows.append(Check(name, "vs previous", "–", "–", NEW, "no result of this variant in the previous run"))
            continue
        if q is None:
            rows.append(Check(name, "vs previous", "–", "–", ERROR, f"{name}: this run has no quality result"))
            continue
        q0 = before.quality
        for metric, (key, _, _, worse_up) in REGRESSION_METRICS.items():
            new_v, old_v = getattr(q, key), getattr(q0, key)
            if new_v is None or old_v is None:
                rows.append(Check(name, f"{metric} vs previous", "–", "–", ERROR, f"{key} missing in a results file"))
                continue
            allowance, how = noise(metric, q0, q, gates.confidence)
            allowance = max(allowance, gates.min_change * abs(old_v))
            change = (new_v - old_v) * (1 if worse_up else -1)  # > 0: worse
            bound = f"{'≤' if worse_up else '≥'} {_fmt(old_v)} {'+' if worse_up else '−'} {_fmt(allowance)}"
            rows.append(Check(name, f"{metric} vs previous", bound, _fmt(new_v),
                              FAIL if change > allowance else PASS, how))
    return rows


# -- outputs -----------------------------------------------------------------------------------------------
def exit_code(rows: list[Check]) -> int:
    verdicts = {r.verdict for r in rows}
    return 2 if ERROR in verdicts else 1 if FAIL in verdicts else 0


def table(rows: list[Check]) -> str:
    head = ["variant", "check", "threshold", "measured", "verdict", "how"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join([r.variant, r.check, r.threshold, r.measured, r.verdict,
                                 r.detail.replace("|", "/")]) + " |" for r in rows]
    return "\n".join(lines)


def summary(rows: list[Check], title: str) -> str:
    code = exit_code(rows)
    counts = {v: sum(r.verdict == v for r in rows) for v in (PASS, FAIL, ERROR, NEW, SKIP)}
    word = {0: "passed", 1: "FAILED: a check regressed", 2: "ERROR: broken inputs"}[code]
    tally = ", ".join(f"{n} {v.lower()}" for v, n in counts.items() if n)
    return f"### quantpipe gate: {title}: {word} ({tally})\n\n{table(rows)}\n"


def junit_xml(rows: list[Check], suite: str, seconds: float) -> bytes:
    """JUnit XML: one testsuite, one testcase per check (classname = variant), <failure> or <error>."""
    cases = [r for r in rows if r.verdict != NEW]
    fails, errors = sum(r.verdict == FAIL for r in cases), sum(r.verdict == ERROR for r in cases)
    attrs = {"name": suite, "tests": str(len(cases)), "failures": str(fails), "errors": str(errors)}
    top = ET.Element("testsuites", {**attrs, "time": f"{seconds:.3f}"})
    skipped = str(sum(r.verdict == SKIP for r in cases))
    ts = ET.SubElement(top, "testsuite", {**attrs, "skipped": skipped, "time": f"{seconds:.3f}",
                                          "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S")})
    for r in cases:
        tc = ET.SubElement(ts, "testcase", {"classname": f"quantpipe.gate.{r.variant}", "name": r.check,
                                            "time": "0"})
        message = f"{r.variant} {r.check}: measured {r.measured}, threshold {r.threshold}"
        if r.verdict == FAIL:
            ET.SubElement(tc, "failure", {"message": message, "type": "regression"}).text = r.detail
        elif r.verdict == ERROR:
            ET.SubElement(tc, "error", {"message": r.detail, "type": "broken-input"}).text = r.detail
        elif r.verdict == SKIP:
            ET.SubElement(tc, "skipped", {"message": r.detail})
        else:
            ET.SubElement(tc, "system-out").text = f"{message} ({r.detail})"
    ET.indent(top)
    return ET.tostring(top, encoding="utf-8", xml_declaration=True) + b"\n"


def gate(run: Path, gates_file: Path | None = None, baseline: Path | None = None, junit: Path | None = None,
         gates: GatesSpec | None = None, previous: Results | None = None) -> tuple[int, list[Check]]:
    """Check a run; print the table; write JUnit XML and the GitHub step summary if asked. Returns the exit code.
    Thresholds: `gates_file`, else `gates`, else the `gates` the run's recipe recorded in results.json.
    Previous run: `previous` (already loaded), else the results file `baseline`."""
    t = time.perf_counter()
    results = load(run, "run")
    if gates_file is not None:
        gates = load_gates(gates_file)
    elif gates is None and results.gates is not None:
        gates = results.gates
    if previous is None and baseline is not None:
        previous = load(baseline, "--baseline")
    if gates is None and previous is None:
        raise QuantpipeError("nothing to check: the run's recipe has no `gates:`; add one, or pass --gates FILE "
                             "or --baseline OLD_RESULTS.json")
    gates = gates or GatesSpec()
    rows = check_thresholds(results, gates)
    if previous is not None:
        rows += check_regressions(results, previous, gates)
    if not rows:
        raise QuantpipeError("nothing to check: the gates hold no threshold for any variant of this run")
    title = str(run)
    print(summary(rows, title))
    for r in rows:
        if r.verdict == ERROR:
            print(f"error: {r.detail}")
    if junit is not None:
        try:
            junit.parent.mkdir(parents=True, exist_ok=True)
            junit.write_bytes(junit_xml(rows, f"quantpipe gate {title}", time.perf_counter() - t))
        except OSError as e:
            raise QuantpipeError(f"--junit: cannot write '{junit}': {e.strerror}") from None
    step = os.environ.get("GITHUB_STEP_SUMMARY")
    if step:
        try:
            with open(step, "a", encoding="utf-8") as f:
                f.write(summary(rows, title) + "\n")
        except OSError as e:
            print(f"warning: cannot append to GITHUB_STEP_SUMMARY '{step}': {e.strerror}")
    return exit_code(rows), rows
