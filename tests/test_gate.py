"""`quantpipe gate`: every threshold kind passing and failing, exit codes 0/1/2, regressions against a previous
run beyond the paired window noise, JUnit XML and the GitHub step summary. Synthetic results files: the gate
reads only results.json (test_pipeline and the SmolLM2 test run it on real runs)."""

from __future__ import annotations

import copy
import json
import math
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml

from quantpipe import gate
from quantpipe.cli import main
from quantpipe.errors import QuantpipeError
from quantpipe.recipe import GatesSpec


def variant(name: str, method: str, kld: float, top1: float, ppl: float, size_mib: float, rss: float,
            decode: dict[str, float], kld_blocks: list[float], lm: float | None = None) -> dict:
    """A results.json variant; block values spread around the means the way real blocks do."""
    nll = math.log(ppl)
    v = {"name": name, "method": method,
         "quality": {"perplexity": ppl, "nll_mean": nll, "nll_se": 0.08, "kld_mean": kld, "kld_se": 0.005,
                     "top1_agreement": top1, "n_windows": 2, "n_tokens_scored": 1022, "block_tokens": 64,
                     "blocks": {"kld": kld_blocks, "nll": [nll + 0.3 * (-1) ** i for i in range(len(kld_blocks))],
                                "top1": [top1 + 0.05 * (-1) ** i for i in range(len(kld_blocks))]}},
         "artifact": {"size_bytes": int(size_mib * 2**20)},
         "memory": {"peak_rss_mib": rss, "peak_gpu_mib": None},
         "speed": {"device": "cpu", "per_batch": {b: {"decode_tok_s": x} for b, x in decode.items()}}}
    if lm is not None:
        v["lm_eval"] = {"arc_easy": {"metric": "acc", "value": lm}, "hellaswag": {"metric": "acc_norm", "value": lm}}
    return v


W4_BLOCKS = [0.15, 0.25, 0.17, 0.21, 0.12, 0.26, 0.19, 0.17]  # 8 blocks, mean 0.19


def results() -> dict:
    return {"schema_version": 1, "reference": "baseline",
            "eval": {"tokens_sha256": "ab" * 32, "n_windows": 2},
            "variants": [
                variant("baseline", "baseline", 0.0, 1.0, 33.0, 516.5, 900, {"1": 20.0, "4": 60.0}, [0.0] * 8, 0.60),
                variant("w4", "gptq", 0.19, 0.75, 39.0, 168.5, 1000, {"1": 30.0, "4": 70.0}, W4_BLOCKS, 0.57),
            ],
            "gates": None}


def write(tmp: Path, data: dict, name: str = "run") -> Path:
    d = tmp / name
    d.mkdir(exist_ok=True)
    (d / "results.json").write_text(json.dumps(data))
    return d


# (threshold, a value the w4 row passes, one it fails): measured kld 0.19, top1 0.75, ppl +18.2 %, lm-eval
# recovery 0.95, peak RSS 1000 MiB, decode speed-up 1.5 at batch 1, size 168.5 MiB = 0.326 × baseline
KINDS = [("max_kld", 0.3, 0.1), ("min_top1", 0.7, 0.8), ("max_ppl_increase", 0.2, 0.1),
         ("min_lm_eval_recovery", 0.9, 0.97), ("max_peak_memory_mib", 1200, 800), ("min_decode_speedup", 1.2, 2.0),
         ("max_size_mib", 200, 100), ("max_size_ratio", 0.4, 0.3)]


@pytest.mark.parametrize(("check", "ok", "bad"), KINDS)
def test_every_threshold_kind_passes_and_fails(check: str, ok: float, bad: float) -> None:
    res = results()
    rows = gate.check_thresholds(res, GatesSpec.model_validate({"all": {check: ok}}))
    assert [(r.variant, r.check, r.verdict) for r in rows] == [("w4", check, "PASS")]
    rows = gate.check_thresholds(res, GatesSpec.model_validate({"all": {check: bad}}))
    assert [(r.variant, r.check, r.verdict) for r in rows] == [("w4", check, "FAIL")]


def test_measured_values() -> None:
    res, g = results(), GatesSpec()
    base, w4 = res["variants"]
    assert gate.measure("max_ppl_increase", w4, base, g)[0] == pytest.approx(39 / 33 - 1)
    assert gate.measure("min_lm_eval_recovery", w4, base, g)[0] == pytest.approx(0.95)
    assert gate.measure("min_decode_speedup", w4, base, g)[0] == pytest.approx(1.5)
    assert gate.measure("min_decode_speedup", w4, base, GatesSpec(speedup_batch=4))[0] == pytest.approx(70 / 60)
    assert gate.measure("max_size_ratio", w4, base, g)[0] == pytest.approx(168.5 / 516.5, rel=1e-6)
    w4["speed"]["device"], w4["memory"]["peak_gpu_mib"] = "cuda", 321.0
    assert gate.measure("max_peak_memory_mib", w4, base, g) == (321.0, "bench peak GPU memory allocated")


def test_per_variant_overrides_all_and_may_name_the_baseline() -> None:
    g = GatesSpec.model_validate({"all": {"max_kld": 0.1, "min_top1": 0.5},
                                  "variants": {"w4": {"max_kld": 0.3}, "baseline": {"max_size_mib": 600}}})
    rows = {(r.variant, r.check): r.verdict for r in gate.check_thresholds(results(), g)}
    assert rows == {("baseline", "max_size_mib"): "PASS", ("w4", "max_kld"): "PASS", ("w4", "min_top1"): "PASS"}


def test_exit_codes(tmp_path: Path, capsys) -> None:
    run = write(tmp_path, results())
    ok, bad = tmp_path / "ok.yaml", tmp_path / "bad.yaml"
    ok.write_text("gates:\n  all: {max_kld: 0.3, min_top1: 0.7}\n")
    bad.write_text("all: {max_kld: 0.1}\n")  # the bare mapping is accepted too
    assert main(["gate", str(run), "--gates", str(ok)]) == 0
    out = capsys.readouterr().out
    assert "passed" in out and "| w4 | max_kld | ≤ 0.3 | 0.19 | PASS |" in out
    assert main(["gate", str(run), "--gates", str(bad)]) == 1
    assert "| w4 | max_kld | ≤ 0.1 | 0.19 | FAIL |" in capsys.readouterr().out
    # broken inputs: 2, with a one-line reason
    assert main(["gate", str(tmp_path / "missing"), "--gates", str(ok)]) == 2
    assert "does not exist" in capsys.readouterr().err
    old = copy.deepcopy(results())
    old["schema_version"] = 0
    assert main(["gate", str(write(tmp_path, old, "old")), "--gates", str(ok)]) == 2
    assert "schema_version 0" in capsys.readouterr().err
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "results.json").write_text("{not json")
    assert main(["gate", str(tmp_path / "junk"), "--gates", str(ok)]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    assert main(["gate", str(run)]) == 2  # no thresholds anywhere
    assert "nothing to check" in capsys.readouterr().err


def test_a_threshold_the_run_did_not_measure_is_broken_input(tmp_path: Path, capsys) -> None:
    res = results()
    for v in res["variants"]:
        del v["lm_eval"]
        v["speed"] = None
    res["gates"] = {"all": {"max_kld": 0.3, "min_lm_eval_recovery": 0.9, "min_decode_speedup": 1.0}}
    assert main(["gate", str(write(tmp_path, res))]) == 2  # thresholds recorded by the run's recipe
    out = capsys.readouterr().out
    assert "| w4 | max_kld | ≤ 0.3 | 0.19 | PASS |" in out
    assert "min_lm_eval_recovery needs lm-eval scores" in out and "min_decode_speedup needs a benchmark" in out


def test_gates_file_errors_name_the_field(tmp_path: Path, capsys) -> None:
    run = write(tmp_path, results())
    f = tmp_path / "g.yaml"
    f.write_text("all: {max_kdl: 0.3}\n")
    assert main(["gate", str(run), "--gates", str(f)]) == 2
    assert "gates.all.max_kdl: unknown key" in capsys.readouterr().err
    f.write_text("variants: {nope: {max_kld: 0.3}}\n")
    assert main(["gate", str(run), "--gates", str(f)]) == 2
    assert "gates.variants: nope not in this run" in capsys.readouterr().err


def test_regression_beyond_paired_block_noise(tmp_path: Path) -> None:
    old, g = results(), GatesSpec()
    same = gate.check_regressions(results(), old, g)
    assert {r.check for r in same} == {"kld vs previous", "nll vs previous", "top1 vs previous"}
    assert all(r.verdict == "PASS" for r in same)

    def with_kld(blocks: list[float]) -> dict:
        r = results()
        r["variants"][1]["quality"]["blocks"]["kld"] = blocks
        r["variants"][1]["quality"]["kld_mean"] = sum(blocks) / len(blocks)
        return r

    # +0.02 in every block, give or take 0.005: a small change, but far beyond its paired noise
    worse = with_kld([x + 0.02 + 0.005 * (-1) ** i for i, x in enumerate(W4_BLOCKS)])
    row = {r.check: r for r in gate.check_regressions(worse, old, g)}["kld vs previous"]
    assert row.verdict == "FAIL" and "paired SE over 8 blocks" in row.detail
    # the same mean change, with blocks moving ±0.1 either way: within the noise
    noisy = with_kld([x + 0.02 + 0.1 * (-1) ** i for i, x in enumerate(W4_BLOCKS)])
    assert {r.check: r for r in gate.check_regressions(noisy, old, g)}["kld vs previous"].verdict == "PASS"
    # below min_change (0.5 % of the old value) nothing is a regression, however consistent
    tiny = with_kld([x + 0.0005 for x in W4_BLOCKS])
    assert {r.check: r for r in gate.check_regressions(tiny, old, g)}["kld vs previous"].verdict == "PASS"
    # an improvement is never a regression
    better = with_kld([x - 0.05 for x in W4_BLOCKS])
    assert all(r.verdict == "PASS" for r in gate.check_regressions(better, old, g))
    # top-1 agreement regresses downwards
    lower = results()
    q = lower["variants"][1]["quality"]
    q["top1_agreement"] -= 0.05
    q["blocks"]["top1"] = [x - 0.05 for x in q["blocks"]["top1"]]
    assert {r.check: r for r in gate.check_regressions(lower, old, g)}["top1 vs previous"].verdict == "FAIL"


def test_regression_noise_without_window_values_and_new_variants() -> None:
    old, new = results(), results()
    for v in old["variants"] + new["variants"]:
        del v["quality"]["blocks"]
    new["variants"][1]["quality"]["kld_mean"] = 0.19 + 0.01  # token SE 0.005 each: z99 × 0.00707 = 0.0164
    rows = {r.check: r for r in gate.check_regressions(new, old, GatesSpec())}
    assert rows["kld vs previous"].verdict == "PASS" and "token-level SE" in rows["kld vs previous"].detail
    new["variants"][1]["quality"]["kld_mean"] = 0.19 + 0.02
    assert {r.check: r for r in gate.check_regressions(new, old, GatesSpec())}["kld vs previous"].verdict == "FAIL"
    new["variants"].append({**copy.deepcopy(new["variants"][1]), "name": "w3"})
    assert [r.verdict for r in gate.check_regressions(new, old, GatesSpec()) if r.variant == "w3"] == ["NEW"]


def test_baseline_with_other_eval_tokens_is_broken_input(tmp_path: Path, capsys) -> None:
    old = results()
    old["eval"]["tokens_sha256"] = "cd" * 32
    run, prev = write(tmp_path, results()), write(tmp_path, old, "prev")
    assert main(["gate", str(run), "--baseline", str(prev / "results.json")]) == 2
    assert "different eval tokens" in capsys.readouterr().err


def test_junit_xml_and_github_summary(tmp_path: Path, monkeypatch, capsys) -> None:
    summary = tmp_path / "summary.md"
    summary.write_text("earlier step\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    res = results()
    res["gates"] = {"all": {"max_kld": 0.1, "min_top1": 0.7, "min_lm_eval_recovery": 0.9}}
    del res["variants"][1]["lm_eval"]
    xml = tmp_path / "out" / "gate.xml"
    assert main(["gate", str(write(tmp_path, res)), "--junit", str(xml)]) == 2
    root = ET.parse(xml).getroot()
    assert root.tag == "testsuites"
    (suite,) = root.findall("testsuite")
    cases = suite.findall("testcase")
    assert [(c.get("classname"), c.get("name")) for c in cases] == [
        ("quantpipe.gate.w4", "max_kld"), ("quantpipe.gate.w4", "min_top1"), ("quantpipe.gate.w4",
                                                                              "min_lm_eval_recovery")]
    assert (suite.get("tests"), suite.get("failures"), suite.get("errors")) == ("3", "1", "1")
    assert root.get("tests") == "3" and float(suite.get("time")) >= 0 and suite.get("timestamp")
    assert cases[0].find("failure").get("message") == "w4 max_kld: measured 0.19, threshold ≤ 0.1"
    assert cases[1].find("failure") is None and cases[1].find("error") is None
    assert "lm-eval" in cases[2].find("error").get("message")
    text = summary.read_text()
    assert text.startswith("earlier step\n") and "### quantpipe gate" in text and "ERROR: broken inputs" in text
    assert "| w4 | max_kld | ≤ 0.1 | 0.19 | FAIL |" in text


def test_t_quantiles() -> None:
    from quantpipe import stats

    assert gate.t_quantile(0.99, 1) == 31.821 and gate.t_quantile(0.95, 10) == 1.812
    assert gate.normal_quantile(0.99) == pytest.approx(2.3263, abs=1e-4)
    assert gate.t_quantile(0.99, 1000) == pytest.approx(2.3263, abs=1e-4)
    for p in (0.95, 0.99):  # the expansion used for other confidences agrees with the table from 3 dof
        for dof in range(3, 31):
            approx = gate.t_quantile(p + 1e-12, dof)
            assert approx == pytest.approx(stats._T[p][dof - 1], rel=0.02), (p, dof)


def test_recipe_gates_must_name_its_variants() -> None:
    from quantpipe.recipe import parse_recipe

    with pytest.raises(QuantpipeError, match="gates.variants: no variant is named 'w9'"):
        parse_recipe({"name": "x", "model": {"id": "org/m"}, "variants": [{"name": "b", "method": "baseline"}],
                      "gates": {"variants": {"w9": {"max_kld": 0.1}}}})


def test_ci_doc_workflow_parses_and_calls_real_flags() -> None:
    """docs/ci.md's GitHub Actions workflow: valid YAML, and its quantpipe commands parse with this CLI."""
    import shlex

    from conftest import ROOT

    from quantpipe.cli import parser

    text = (ROOT / "docs" / "ci.md").read_text()
    block = text.split("```yaml\nname: quantization gate")[1].split("```")[0]
    flow = yaml.safe_load("name: quantization gate" + block)
    steps = flow["jobs"]["gate"]["steps"]
    commands = [line.strip() for s in steps for line in s.get("run", "").splitlines() if "quantpipe " in line]
    assert commands, "the workflow runs no quantpipe command"
    for cmd in commands:
        argv = shlex.split(cmd.replace("$baseline", "--baseline gate-baseline/results.json"))
        args = parser().parse_args(argv[1:])
        assert args.command == "run" and args.gate and args.junit == "gate.xml"
    assert any("make setup" in s.get("run", "") for s in steps)
