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

from quantpipe.errors import QuantpipeError
from quantpipe.recipe import GatesSpec, _format
from quantpipe.report import load_results

MIB = 2**20
PASS, FAIL, ERROR, NEW = "PASS", "FAIL", "ERROR", "NEW"

# One-sided Student t quantiles for 1..30 degrees of freedom at the confidences a gate is likely to use;
# beyond 30 the normal quantile. (Standard table values.)
_T = {
    0.95: [6.314, 2.920, 2.353, 2.132, 2.015, 1.943, 1.895, 1.860, 1.833, 1.812, 1.796, 1.782, 1.771, 1.761, 1.753,
           1.746, 1.740, 1.734, 1.729, 1.725, 1.721, 1.717, 1.714, 1.711, 1.708, 1.706, 1.703, 1.701, 1.699, 1.697],
    0.99: [31.821, 6.965, 4.541, 3.747, 3.365, 3.143, 2.998, 2.896, 2.821, 2.764, 2.718, 2.681, 2.650, 2.624, 2.602,
           2.583, 2.567, 2.552, 2.539, 2.528, 2.518, 2.508, 2.500, 2.492, 2.485, 2.479, 2.473, 2.467, 2.462, 2.457],
}


def normal_quantile(p: float) -> float:
    """Inverse standard normal CDF (bisection on erf; plenty for a threshold)."""
    lo, hi = -10.0, 10.0
    for _ in range(100):
        mid = (lo + hi) / 2
        if 0.5 * (1 + math.erf(mid / math.sqrt(2))) < p:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def t_quantile(p: float, dof: int) -> float:
    """One-sided Student t quantile: the table above where it has the confidence, else a Cornish-Fisher
    expansion around the normal quantile (accurate to ~1 % from 3 degrees of freedom)."""
    if p in _T and 1 <= dof <= 30:
        return _T[p][dof - 1]
    z = normal_quantile(p)
    if dof > 30:
        return z
    g1 = (z**3 + z) / 4
    g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
    g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384
    return z + g1 / dof + g2 / dof**2 + g3 / dof**3


@dataclass
class Row:
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
        raise QuantpipeError(f"--gates: '{path}' is not valid YAML: {str(e).splitlines()[0]}") from None
    if isinstance(data, dict) and "gates" in data:  # a gates file with a `gates:` key, or a recipe
        data = data["gates"]
    if not isinstance(data, dict):
        raise QuantpipeError(f"--gates: '{path}' must be a mapping with keys all, variants, ...")
    try:
        return GatesSpec.model_validate(data)
    except ValidationError as e:
        raise QuantpipeError(f"--gates: '{path}' is invalid:\n  " + "\n  ".join(_format(e, data, "gates."))) from None


# -- threshold checks ------------------------------------------------------------------------------------------
def _quality(v: dict[str, Any], key: str) -> float | None:
    q = v.get("quality") or {}
    return q.get(key)


def measure(check: str, v: dict[str, Any], base: dict[str, Any], gates: GatesSpec) -> tuple[float, str]:
    """The value a threshold compares, and how it was taken; QuantpipeError where the run did not measure it."""
    name = v["name"]

    def need(x: Any, what: str) -> Any:
        if x is None:
            raise QuantpipeError(f"{name}: {check} needs {what}, which this run did not record")
        return x

    if check == "max_kld":
        return need(_quality(v, "kld_mean"), "the eval's KL divergence"), "mean KL divergence from the baseline"
    if check == "min_top1":
        return need(_quality(v, "top1_agreement"), "the eval's top-1 agreement"), "share of positions"
    if check == "max_ppl_increase":
        p, p0 = _quality(v, "perplexity"), _quality(base, "perplexity")
        return need(p, "the eval's perplexity") / need(p0, "the baseline's perplexity") - 1, \
            f"{p:.3f} vs baseline {p0:.3f}"
    if check == "min_lm_eval_recovery":
        tasks, tasks0 = v.get("lm_eval") or {}, base.get("lm_eval") or {}
        common = sorted(t for t in tasks if t in tasks0 and tasks0[t].get("value"))
        if not common:
            raise QuantpipeError(f"{name}: min_lm_eval_recovery needs lm-eval scores of the variant and the "
                                 "baseline on the same tasks, which this run did not record")
        # the run's recovery where it recorded one (it inverts lower-is-better metrics), else value / baseline's
        ratios = [tasks[t]["recovery"] if tasks[t].get("recovery") is not None else
                  tasks[t]["value"] / tasks0[t]["value"] for t in common]
        return sum(ratios) / len(ratios), "mean over " + ", ".join(common)
    if check == "max_peak_memory_mib":
        mem, speed = v.get("memory") or {}, v.get("speed") or {}
        if speed.get("device") == "cuda" and mem.get("peak_gpu_mib") is not None:
            return mem["peak_gpu_mib"], "bench peak GPU memory allocated"
        return need(mem.get("peak_rss_mib"), "a benchmark (bench.enabled)"), "bench peak RSS"
    if check == "min_decode_speedup":
        per, per0 = (v.get("speed") or {}).get("per_batch"), (base.get("speed") or {}).get("per_batch")
        need(per, "a benchmark (bench.enabled)")
        need(per0, "a benchmark of the baseline")
        b = gates.speedup_batch or min(int(k) for k in per)
        if str(b) not in per or str(b) not in per0:
            raise QuantpipeError(f"{name}: min_decode_speedup at batch {b}, which the bench did not run "
                                 f"(it ran {', '.join(sorted(per, key=int))}); set gates.speedup_batch")
        return per[str(b)]["decode_tok_s"] / per0[str(b)]["decode_tok_s"], f"decode tok/s at batch {b}"
    if check == "max_size_mib":
        return need((v.get("artifact") or {}).get("size_bytes"), "the artifact size") / MIB, "artifact directory"
    if check == "max_size_ratio":
        s, s0 = (v.get("artifact") or {}).get("size_bytes"), (base.get("artifact") or {}).get("size_bytes")
        return need(s, "the artifact size") / need(s0, "the baseline's artifact size"), "size / baseline's"
    raise AssertionError(check)


def _fmt(x: float) -> str:
    return f"{x:.4g}" if abs(x) < 1000 else f"{x:.0f}"


def thresholds_for(gates: GatesSpec, name: str, is_reference: bool) -> dict[str, float]:
    out = {} if is_reference else {k: x for k, x in gates.all.model_dump().items() if x is not None}
    if name in gates.variants:
        out.update({k: x for k, x in gates.variants[name].model_dump().items() if x is not None})
    return out


def check_thresholds(results: dict[str, Any], gates: GatesSpec) -> list[Row]:
    variants = {v["name"]: v for v in results["variants"]}
    unknown = sorted(set(gates.variants) - set(variants))
    if unknown:
        raise QuantpipeError(f"gates.variants: {', '.join(unknown)} not in this run (its variants: "
                             f"{', '.join(variants)})")
    base = variants.get(results["reference"])
    if base is None:
        raise QuantpipeError(f"results: the reference '{results['reference']}' is not among its variants")
    rows = []
    for name, v in variants.items():
        for check, limit in thresholds_for(gates, name, name == results["reference"]).items():
            bound = "≤" if check.startswith("max_") else "≥"
            try:
                value, how = measure(check, v, base, gates)
            except QuantpipeError as e:
                rows.append(Row(name, check, f"{bound} {_fmt(limit)}", "–", ERROR, str(e)))
                continue
            ok = value <= limit if check.startswith("max_") else value >= limit
            rows.append(Row(name, check, f"{bound} {_fmt(limit)}", _fmt(value), PASS if ok else FAIL, how))
    return rows


# -- regressions against a previous run ------------------------------------------------------------------------
# metric: (results key, block key, token-level standard error key, higher is worse)
REGRESSION_METRICS = {"kld": ("kld_mean", "kld", "kld_se", True), "nll": ("nll_mean", "nll", "nll_se", True),
                      "top1": ("top1_agreement", "top1", None, False)}


def noise(metric: str, old: dict[str, Any], new: dict[str, Any], confidence: float) -> tuple[float, str]:
    """The allowance of a change of `metric` from old to new quality dicts (see the module docstring)."""
    key, wkey, se_key, _ = REGRESSION_METRICS[metric]
    wo, wn = (old.get("blocks") or {}).get(wkey), (new.get("blocks") or {}).get(wkey)
    if wo and wn and len(wo) == len(wn) and len(wo) >= 2:
        d = [b - a for a, b in zip(wo, wn, strict=True)]
        m = sum(d) / len(d)
        se = math.sqrt(sum((x - m) ** 2 for x in d) / (len(d) - 1) / len(d))
        t = t_quantile(confidence, len(d) - 1)
        return t * se, f"t{confidence:g}({len(d) - 1} dof) × paired SE over {len(d)} blocks"
    if se_key is not None:
        se_o, se_n = old.get(se_key), new.get(se_key)
    else:  # top-1 agreement: a proportion over the scored tokens
        se_o, se_n = (math.sqrt(q[key] * (1 - q[key]) / max(1, q.get("n_tokens_scored", 1))) for q in (old, new))
    if se_o is None or se_n is None or (isinstance(se_o, float) and math.isnan(se_o)):
        return 0.0, "no standard error recorded: any change beyond min_change"
    return normal_quantile(confidence) * math.sqrt(se_o**2 + se_n**2), \
        f"z{confidence:g} × token-level SE of both runs (no block values; understates the noise)"


def check_regressions(results: dict[str, Any], previous: dict[str, Any], gates: GatesSpec) -> list[Row]:
    if "random" in (results.get("weights"), previous.get("weights")):
        raise QuantpipeError("--baseline: a run of random weights (model.weights: random) has no quality to "
                             "compare; gate it on speed, memory and size thresholds only")
    th, tp = (results.get("eval") or {}).get("tokens_sha256"), (previous.get("eval") or {}).get("tokens_sha256")
    if th is None or tp is None or th != tp:
        raise QuantpipeError("--baseline: the two runs scored different eval tokens (eval.tokens_sha256 differs "
                             "or is missing): their quality is not comparable; keep eval.text, window and "
                             "max_tokens the same")
    old = {v["name"]: v for v in previous["variants"]}
    rows = []
    for v in results["variants"]:
        name, q = v["name"], v.get("quality")
        if name == results["reference"]:
            continue  # the reference's KLD is 0 and its perplexity is the text's, not a quantization result
        if name not in old or not old[name].get("quality"):
            rows.append(Row(name, "vs previous", "–", "–", NEW, "no result of this variant in the previous run"))
            continue
        if not q:
            rows.append(Row(name, "vs previous", "–", "–", ERROR, f"{name}: this run has no quality result"))
            continue
        q0 = old[name]["quality"]
        for metric, (key, _, _, worse_up) in REGRESSION_METRICS.items():
            if q.get(key) is None or q0.get(key) is None:
                rows.append(Row(name, f"{metric} vs previous", "–", "–", ERROR, f"{key} missing in a results file"))
                continue
            allowance, how = noise(metric, q0, q, gates.confidence)
            allowance = max(allowance, gates.min_change * abs(q0[key]))
            change = (q[key] - q0[key]) * (1 if worse_up else -1)  # > 0: worse
            bound = f"{'≤' if worse_up else '≥'} {_fmt(q0[key])} {'+' if worse_up else '−'} {_fmt(allowance)}"
            rows.append(Row(name, f"{metric} vs previous", bound, _fmt(q[key]),
                            FAIL if change > allowance else PASS, how))
    return rows


# -- outputs -----------------------------------------------------------------------------------------------
def exit_code(rows: list[Row]) -> int:
    verdicts = {r.verdict for r in rows}
    return 2 if ERROR in verdicts else 1 if FAIL in verdicts else 0


def table(rows: list[Row]) -> str:
    head = ["variant", "check", "threshold", "measured", "verdict", "how"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join([r.variant, r.check, r.threshold, r.measured, r.verdict,
                                 r.detail.replace("|", "/")]) + " |" for r in rows]
    return "\n".join(lines)


def summary(rows: list[Row], title: str) -> str:
    code = exit_code(rows)
    counts = {v: sum(r.verdict == v for r in rows) for v in (PASS, FAIL, ERROR, NEW)}
    word = {0: "passed", 1: "FAILED: a check regressed", 2: "ERROR: broken inputs"}[code]
    tally = ", ".join(f"{n} {v.lower()}" for v, n in counts.items() if n)
    return f"### quantpipe gate: {title}: {word} ({tally})\n\n{table(rows)}\n"


def junit_xml(rows: list[Row], suite: str, seconds: float) -> bytes:
    """JUnit XML: one testsuite, one testcase per check (classname = variant), <failure> or <error>."""
    cases = [r for r in rows if r.verdict != NEW]
    fails, errors = sum(r.verdict == FAIL for r in cases), sum(r.verdict == ERROR for r in cases)
    attrs = {"name": suite, "tests": str(len(cases)), "failures": str(fails), "errors": str(errors)}
    top = ET.Element("testsuites", {**attrs, "time": f"{seconds:.3f}"})
    ts = ET.SubElement(top, "testsuite", {**attrs, "skipped": "0", "time": f"{seconds:.3f}",
                                          "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S")})
    for r in cases:
        tc = ET.SubElement(ts, "testcase", {"classname": f"quantpipe.gate.{r.variant}", "name": r.check,
                                            "time": "0"})
        message = f"{r.variant} {r.check}: measured {r.measured}, threshold {r.threshold}"
        if r.verdict == FAIL:
            ET.SubElement(tc, "failure", {"message": message, "type": "regression"}).text = r.detail
        elif r.verdict == ERROR:
            ET.SubElement(tc, "error", {"message": r.detail, "type": "broken-input"}).text = r.detail
        else:
            ET.SubElement(tc, "system-out").text = f"{message} ({r.detail})"
    ET.indent(top)
    return ET.tostring(top, encoding="utf-8", xml_declaration=True) + b"\n"


def gate(run: Path, gates_file: Path | None = None, baseline: Path | None = None, junit: Path | None = None,
         gates: GatesSpec | None = None, previous: dict[str, Any] | None = None) -> tuple[int, list[Row]]:
    """Check a run; print the table; write JUnit XML and the GitHub step summary if asked. Returns the exit code.
    Thresholds: `gates_file`, else `gates`, else the `gates` the run's recipe recorded in results.json.
    Previous run: `previous` (already loaded), else the results file `baseline`."""
    t = time.perf_counter()
    results = load_results(run, "run")
    if gates_file is not None:
        gates = load_gates(gates_file)
    elif gates is None and results.get("gates"):
        gates = GatesSpec.model_validate(results["gates"])
    if previous is None and baseline is not None:
        previous = load_results(baseline, "--baseline")
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
