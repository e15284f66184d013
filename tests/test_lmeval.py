"""lm-eval through quantpipe's runtime contract: the adapter's three request types against hand computation,
the bundled offline tasks, the response cache, recovery, recipe errors, and a pipeline run with task columns."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, read_results, tiny_recipe, write_recipe

from quantpipe import cli, lmeval, runtimes
from quantpipe.errors import QuantpipeError
from quantpipe.recipe import LMEvalSpec, parse_recipe


@pytest.fixture(scope="module")
def tiny_artifact(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model as an artifact the HF runtime loads (a quantpipe.json naming the runtime)."""
    import shutil

    out = tmp_path_factory.mktemp("lm") / "artifact"
    shutil.copytree(tiny_model, out)
    (out / "quantpipe.json").write_text(json.dumps({"runtime": "hf"}))
    return out


@pytest.fixture(scope="module")
def lm_parts(tiny_artifact: Path) -> tuple:
    from transformers import AutoTokenizer

    rt = runtimes.load(tiny_artifact, "cpu")
    return rt, AutoTokenizer.from_pretrained(tiny_artifact)


def manual_ll(rt, ctx: list[int], cont: list[int]) -> float:
    lp = torch.log_softmax(rt.logits(ctx + cont[:-1]), -1)
    return sum(lp[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont))


def test_bundled_task_data_is_the_generators_output() -> None:
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_eval_tasks.py"), "--check"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    tasks = lmeval.bundled_tasks()
    assert {"qp_arith", "qp_order", "qp_sequence", "qp_copy", "quantpipe"} <= set(tasks)
    for name in ("qp_arith", "qp_order", "qp_sequence", "qp_copy"):
        rows = [json.loads(x) for x in (ROOT / "evals" / "lm_eval" / f"{name}.jsonl").read_text().splitlines()]
        assert len(rows) == 200
        if "choices" in rows[0]:  # the labelled choice is the right answer, and distinct from the others
            assert all(0 <= r["label"] < len(r["choices"]) == len(set(r["choices"])) for r in rows)
    arith = [json.loads(x) for x in (ROOT / "evals" / "lm_eval" / "qp_arith.jsonl").read_text().splitlines()]
    for r in arith:
        a, b = (int(w) for w in r["question"].removeprefix("What is ").rstrip("?").split(" plus "))
        assert int(r["choices"][r["label"]]) == a + b


def test_loglikelihood_batched_and_single_token_paths_match_hand_computation(lm_parts: tuple) -> None:
    rt, tok = lm_parts
    lm = lmeval.make_lm(rt, tok, max_length=512)
    ctx = tok("The river ran under the old stone bridge").input_ids
    conts = [tok(" and the town").input_ids, tok(" of it").input_ids, tok(" x").input_ids[:1]]
    singles = [[c] for c in range(5, 9)]  # one-token continuations of a second context: one forward for all
    ctx2 = ctx[:5]
    reqs = [(("a", "b"), ctx, c) for c in conts] + [(("c", "d"), ctx2, c) for c in singles]
    got = lm._loglikelihood_tokens(reqs)
    for (_, cx, c), (ll, greedy) in zip(reqs, got, strict=True):
        assert ll == pytest.approx(manual_ll(rt, cx, c), abs=1e-4)
        lp = torch.log_softmax(rt.logits(cx + c[:-1]), -1)[len(cx) - 1:]
        assert greedy == all(int(lp[i].argmax()) == t for i, t in enumerate(c))
    assert lm.forwards == len(conts) + 1


def test_loglikelihood_rolling_is_the_sum_of_token_logprobs(lm_parts: tuple) -> None:
    rt, tok = lm_parts
    text = "Water runs down to the sea. The sea is wide and the wind is cold."
    ids = tok(text).input_ids

    class Req:
        args = (text,)

    lm = lmeval.make_lm(rt, tok, max_length=512)
    (got,) = lm.loglikelihood_rolling([Req()])
    full = [lm.prefix_token_id, *ids]  # the first token is scored after the prefix token, as lm-eval does
    lp = torch.log_softmax(rt.logits(full[:-1]), -1)
    assert got == pytest.approx(sum(lp[i, t].item() for i, t in enumerate(full[1:])), abs=1e-3)
    # windows shorter than the text: disjoint windows, every token still scored once
    short = lmeval.make_lm(rt, tok, max_length=8)
    (rolled,) = short.loglikelihood_rolling([Req()])
    assert math.isfinite(rolled) and rolled < 0 and short.forwards == math.ceil(len(ids) / 8)


class ScriptedRuntime:
    """Greedy 'generation' from a fixed token script, to test stop handling without a model."""

    name, device = "scripted", "cpu"

    def __init__(self, script: list[int]) -> None:
        self.script, self.calls = script, []

    def generate(self, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
        done = ids.shape[1] - self.prompt_len
        self.calls.append(new_tokens)
        return torch.tensor([self.script[done:done + new_tokens]])


def test_generate_until_stops_at_stop_strings_eos_and_the_token_cap(lm_parts: tuple) -> None:
    _, tok = lm_parts
    words = tok(" red fish blue green tree house lamp milk moon salt ship star stone sun table").input_ids
    nl = tok("\n").input_ids

    class Req:
        def __init__(self, until: list[str], n: int) -> None:
            self.args = ("Repeat:", {"until": until, "max_gen_toks": n})

    prompt_len = len(tok("Repeat:").input_ids)

    def run(script: list[int], until: list[str], n: int, cap: int | None = None) -> tuple[str, list[int]]:
        rt = ScriptedRuntime(script + [0] * 64)
        rt.prompt_len = prompt_len
        lm = lmeval.make_lm(rt, tok, max_length=512, max_gen_toks=cap)
        return lm.generate_until([Req(until, n)])[0], rt.calls

    text, calls = run(words[:3] + nl + words[3:], ["\n"], 64)
    assert text == tok.decode(words[:3]) and calls == [8]  # stopped inside the first chunk
    long = words * 3
    text, calls = run(long[:20] + nl, ["\n"], 64)
    assert text == tok.decode(long[:20]) and calls == [8, 16]  # chunks double until the stop string shows
    text, calls = run(long, ["\n"], 12)
    assert text == tok.decode(long[:12]) and sum(calls) == 12  # max_gen_toks
    text, _ = run(long, ["\n"], 64, cap=5)
    assert text == tok.decode(long[:5])  # the recipe's max_gen_toks caps the task's
    text, _ = run(words[:2] + [tok.eos_token_id] + words, [], 64)
    assert text == tok.decode(words[:2])  # EOS ends generation


def test_offline_bundled_tasks_on_the_tiny_model_and_the_response_cache(
        lm_parts: tuple, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    rt, tok = lm_parts
    spec = LMEvalSpec(tasks=["quantpipe"], limit=6)
    cache = tmp_path / "responses.sqlite"
    first = lmeval.evaluate(rt, tok, spec, tmp_path / "work", cache)
    assert set(first["tasks"]) == {"qp_arith", "qp_order", "qp_sequence", "qp_copy"}
    for name, s in first["tasks"].items():
        assert 0 <= s["value"] <= 1 and s["stderr"] is not None and s["stderr"] >= 0, (name, s)
        assert s["n"] == 6 and len(s["per_doc"]) == 6 and s["higher_is_better"]
        assert s["metric"] == ("exact_match" if name == "qp_copy" else "acc")
    assert first["_meta"]["forwards"] > 0 and first["_meta"]["cache_hits"] == 0
    again = lmeval.evaluate(rt, tok, spec, tmp_path / "work", cache)
    assert again["_meta"]["forwards"] == 0 and again["_meta"]["cache_misses"] == 0
    assert {k: v["value"] for k, v in again["tasks"].items()} == {k: v["value"] for k, v in first["tasks"].items()}
    other = lmeval.evaluate(rt, tok, LMEvalSpec(tasks=["qp_order"], limit=6, metrics={"qp_order": "acc_norm"}),
                            tmp_path / "work", cache)
    assert other["tasks"]["qp_order"]["metric"] == "acc_norm" and other["_meta"]["forwards"] == 0


def test_recovery_and_its_paired_standard_error() -> None:
    base = {"value": 0.5, "higher_is_better": True, "per_doc": [1, 0, 1, 0, 1, 0, 1, 0]}
    same = dict(base)
    assert lmeval.recovery(same, base) == (1.0, 0.0)
    worse = {"value": 0.25, "per_doc": [1, 0, 0, 0, 1, 0, 0, 0]}
    r, se = lmeval.recovery(worse, base)
    assert r == 0.5 and 0 < se < 0.5
    ppl_base = {"value": 10.0, "higher_is_better": False}
    assert lmeval.recovery({"value": 12.5}, ppl_base)[0] == pytest.approx(0.8)  # lower is better: inverted
    variants = [{"name": "b", "lm_eval": {"t": {"metric": "acc", **base}}},
                {"name": "q", "lm_eval": {"t": {"metric": "acc", **worse}}}]
    lmeval.add_recoveries(variants, "b")
    assert variants[1]["lm_eval"]["t"]["recovery"] == 0.5 and variants[0]["lm_eval"]["t"]["recovery"] == 1.0


@pytest.mark.parametrize("lm_eval,message", [
    ({"tasks": []}, "eval.lm_eval.tasks: List should have at least 1 item"),
    ({"tasks": ["qp_copy"], "limit": 1.5}, "eval.lm_eval.limit: Value error, a fractional limit"),
    ({"tasks": ["qp_copy"], "limits": 5}, "eval.lm_eval.limits: unknown key"),
    ({"tasks": ["qp_copy", "qp_copy"]}, "a task is listed twice"),
    ({"tasks": ["qp_copy"], "metrics": {"qp_order": "acc"}}, "metrics: 'qp_order' is not one of the tasks"),
    ({"tasks": ["qp_copy"], "include_path": ["/nonexistent/tasks"]}, "eval.lm_eval.include_path: '/nonexistent"),
])
def test_recipe_errors_name_the_field(tiny_model: Path, tmp_path: Path, lm_eval: dict, message: str) -> None:
    recipe = tiny_recipe(tiny_model, tmp_path / "run")
    recipe["eval"]["lm_eval"] = lm_eval
    with pytest.raises(QuantpipeError) as e:
        parse_recipe(recipe)
    assert message.replace("Value error, ", "") in str(e.value), str(e.value)


def test_unknown_task_and_missing_harness_are_one_line_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(QuantpipeError, match="unknown task no_such_task; bundled .*qp_copy"):
        lmeval.check_tasks(LMEvalSpec(tasks=["qp_copy", "no_such_task"]))
    lmeval.check_tasks(LMEvalSpec(tasks=["quantpipe"]))  # bundled only: no index of lm-eval's own tasks
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "lm_eval" else real(n, *a))
    with pytest.raises(QuantpipeError, match=r"pip install 'quantpipe\[eval\]'"):
        lmeval.check_tasks(LMEvalSpec(tasks=["qp_copy"]))


def test_pipeline_records_scores_recovery_and_matrix_columns(tiny_model: Path, tmp_path: Path) -> None:
    recipe = tiny_recipe(tiny_model, tmp_path / "run")
    recipe["bench"]["enabled"] = False
    recipe["eval"]["lm_eval"] = {"tasks": ["qp_sequence", "qp_copy"], "limit": 5}
    recipe["gates"] = {"all": {"min_lm_eval_recovery": 0.0}}
    path = write_recipe(tmp_path / "r.yaml", recipe)
    assert cli.main(["run", str(path), "--gate"]) == 0
    res = read_results(tmp_path / "run")
    for v in res.variants:
        assert set(v.lm_eval) == {"qp_sequence", "qp_copy"}
        for s in v.lm_eval.values():
            assert 0 <= s.value <= 1 and s.stderr is not None and s.n == 5
            assert v.name != "baseline" or s.recovery in (1.0, None)  # None where the baseline scored 0
        assert v.lm_eval_meta["lm_eval_version"] == "0.4.13" and v.timings.lm_eval_s > 0
    md = (tmp_path / "run" / "matrix.md").read_text()
    assert "qp_copy exact_match" in md and "qp_sequence acc" in md and "lm-eval: qp_sequence, qp_copy" in md
    # another limit redoes only the lm-eval stages: quantize and the window eval stay cached
    recipe["eval"]["lm_eval"]["limit"] = 4
    out = subprocess.run([sys.executable, "-m", "quantpipe", "run", str(write_recipe(path, recipe))],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    redone = [ln for ln in out.stdout.splitlines() if ln.startswith("[") and not ln.endswith(": cached")]
    assert redone and all("lm-eval:" in ln for ln in redone), redone
    res = read_results(tmp_path / "run")
    assert all(s.n == 4 for v in res.variants for s in v.lm_eval.values())


def test_lm_eval_command_on_one_artifact(tiny_artifact: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "scores.json"
    assert cli.main(["lm-eval", str(tiny_artifact), "--tasks", "qp_order", "--limit", "4", "--device", "cpu",
                     "--work", str(tmp_path / "work"), "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["tasks"]["qp_order"]["n"] == 4 and "per_doc" not in res["tasks"]["qp_order"]
    assert "qp_order: acc" in capsys.readouterr().err
    assert cli.main(["lm-eval", str(tiny_artifact), "--limit", "2.5"]) == 2
    assert "--limit: a fractional limit" in capsys.readouterr().err
    no_tok = tmp_path / "no-tokenizer"
    no_tok.mkdir()
    (no_tok / "quantpipe.json").write_text(json.dumps({"runtime": "hf"}))
    assert cli.main(["lm-eval", str(no_tok), "--tasks", "qp_order"]) == 2
    assert "no usable tokenizer" in capsys.readouterr().err


def test_hf_batched_logits_equal_single_sequence_logits(lm_parts: tuple) -> None:
    rt, tok = lm_parts
    seqs = [tok("one two three four five").input_ids, tok("six").input_ids, tok("seven eight nine").input_ids]
    batched = runtimes.logits_batch(rt, seqs)
    for s, b in zip(seqs, batched, strict=True):
        single = rt.logits(s)
        assert b.shape == single.shape and torch.allclose(b, single, atol=1e-4, rtol=1e-4)
