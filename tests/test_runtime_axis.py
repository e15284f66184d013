"""The runtime axis: artifacts say their format, runtimes declare what they load, the recipe picks runtimes, and each
(variant, runtime) pair is a row cached on its own. A runtime added from one file (tests/topk_runtime.py) runs a
recipe; quality over top-k log-probs; version-1 results still gate and render, version 2 round-trips; the
layers hold (import-linter), and an upward import breaks them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, read_results, rows, tiny_recipe, write_recipe

from quantpipe import artifact, evaluate, results, runtimes
from quantpipe.cli import main
from quantpipe.results import Row

BENCH = {"device": "cpu", "prompt_len": 16, "gen_len": 32, "batch_sizes": [1], "warmup": 1, "repeats": 3}


def rows_of(run_dir: Path) -> dict[str, Row]:
    return rows(read_results(run_dir))


def test_one_artifact_in_two_runtimes_gives_two_rows_cached_on_their_own(tiny_model: Path, tmp_path: Path,
                                                                          capsys) -> None:
    """A GPTQ artifact measured by transformers and by the compiled engine (its int4 kernel, uncompiled on a
    CPU): two rows, each with its own quality, speed and stage records; a second run is all cache."""
    recipe = tiny_recipe(tiny_model, tmp_path / "run", variants=[
        {"name": "baseline", "method": "baseline"}, {"name": "gptq", "method": "gptq", "group_size": 64}])
    recipe["eval"]["runtimes"] = ["auto", "compiled"]
    recipe["bench"] = {**BENCH, "runtimes": ["auto", "compiled"]}
    path = write_recipe(tmp_path / "r.yaml", recipe)
    assert main(["run", str(path)]) == 0
    rows = rows_of(tmp_path / "run")
    assert list(rows) == ["baseline", "baseline@compiled", "gptq", "gptq@compiled"]
    assert [r.runtime for r in rows.values()] == ["hf", "compiled", "hf", "compiled"]
    assert rows["gptq@compiled"].variant == "gptq" and rows["gptq@compiled"].format == "compressed-tensors"
    hf, fast = rows["gptq"], rows["gptq@compiled"]
    assert "int4 tinygemm" in fast.speed.kernel and fast.speed.engine.endswith("eager, static KV cache")
    assert "decompressed to float" in hf.speed.kernel
    # the same weights in two runtimes: KL divergences from the one reference close, not identical
    assert hf.quality.kld_mean > 0 and fast.quality.kld_mean > 0
    assert abs(hf.quality.kld_mean - fast.quality.kld_mean) < 0.2 * hf.quality.kld_mean + 1e-3
    stages = tmp_path / "run" / ".quantpipe" / "stages"
    keys = {name: json.loads((stages / f"{name}.json").read_text())["key"]
            for name in ("eval--gptq", "eval--gptq@compiled", "bench--gptq", "bench--gptq@compiled")}
    assert len(set(keys.values())) == 4
    matrix = (tmp_path / "run" / "matrix.md").read_text()
    assert "| runtime |" in matrix and "| gptq@compiled | gptq | compiled |" in matrix
    capsys.readouterr()
    assert main(["run", str(path)]) == 0
    stage_lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[")]
    assert len(stage_lines) == 2 + 1 + 1 + 4 + 4 and all(line.endswith(": cached") for line in stage_lines)


def test_a_runtime_added_from_one_file_runs_a_recipe_with_top_k_quality(tiny_model: Path, tmp_path: Path) -> None:
    """tests/topk_runtime.py registers 'topk-hf' (transformers answering with top-k log-probs only, as a server's
    API does). Its rows get the same perplexity, top-1 agreement and lm-eval answers as transformers' own, and a
    KL estimate that stays below the full KLD; its bench runs in the bench's own process."""
    import topk_runtime  # noqa: F401 - registers the runtime

    recipe = tiny_recipe(tiny_model, tmp_path / "run", variants=[
        {"name": "baseline", "method": "baseline"}, {"name": "int8", "method": "int8"}])
    recipe["eval"].update(runtimes=["auto", "topk-hf"], lm_eval={"tasks": ["qp_sequence", "qp_copy"], "limit": 6})
    recipe["bench"] = {**BENCH, "runtimes": ["auto", "topk-hf"]}
    assert main(["run", str(write_recipe(tmp_path / "r.yaml", recipe))]) == 0
    rows = rows_of(tmp_path / "run")
    assert list(rows) == ["baseline", "baseline@topk-hf", "int8", "int8@topk-hf"]
    full, est = rows["int8"].quality, rows["int8@topk-hf"].quality
    assert est.perplexity == pytest.approx(full.perplexity, rel=1e-5)
    assert est.top1_agreement == full.top1_agreement
    assert est.kld_estimator.startswith("top-20") and full.kld_estimator == "full vocabulary"
    assert 0 < est.kld_mean <= full.kld_mean + 1e-6
    assert rows["baseline@topk-hf"].quality.kld_mean < 1e-6  # the reference model, scored through the API
    for task, s in rows["int8"].lm_eval.items():
        assert rows["int8@topk-hf"].lm_eval[task].per_doc == s.per_doc, task
    assert rows["int8@topk-hf"].speed.engine == "transformers behind a top-k API"
    assert rows["int8@topk-hf"].speed.per_batch["1"].decode_tok_s > 0
    assert "top-20 + rest bucket" in (tmp_path / "run" / "matrix.md").read_text()


def test_the_reference_needs_a_full_logits_runtime(tiny_model: Path, tmp_path: Path, capsys) -> None:
    import topk_runtime  # noqa: F401

    recipe = tiny_recipe(tiny_model, tmp_path / "run")
    recipe["eval"]["runtimes"] = ["topk-hf"]
    assert main(["run", str(write_recipe(tmp_path / "r.yaml", recipe))]) == 2
    assert "returns only top-k log-probs" in capsys.readouterr().err
    assert not (tmp_path / "run" / "artifacts").exists()  # refused before any work
    recipe["eval"]["runtimes"] = ["no-such-runtime"]
    assert main(["validate", str(write_recipe(tmp_path / "r.yaml", recipe))]) == 2
    assert "eval.runtimes: unknown runtime 'no-such-runtime'" in capsys.readouterr().err
    recipe["eval"]["runtimes"] = ["auto"]
    recipe["bench"]["engine"] = "compiled"
    assert main(["validate", str(write_recipe(tmp_path / "r.yaml", recipe))]) == 2
    assert "bench.engine: replaced by bench.runtimes; write `runtimes: [compiled]`" in capsys.readouterr().err


def test_topk_estimator_is_a_lower_bound_that_grows_with_k() -> None:
    """kl_topk is the KL of the distributions coarsened to Q's top k plus a rest bucket: never above the full KL,
    non-decreasing in k (the top-k sets are nested, so the partitions refine), exact at k = V."""
    g = torch.Generator().manual_seed(0)
    p = torch.log_softmax(torch.randn(64, 300, generator=g) * 3, -1)
    q = torch.log_softmax(torch.log_softmax(torch.randn(64, 300, generator=g) * 3, -1) * 0.3 + p, -1)
    full = evaluate.kl_divergence(p, q)
    prev = torch.zeros_like(full)
    for k in (1, 5, 20, 100, 300):
        top = q.topk(k, dim=-1)
        est = evaluate.kl_topk(p, top.indices, top.values)
        assert (est <= full + 1e-5).all() and (est >= prev - 1e-5).all(), k
        prev = est
    assert torch.allclose(prev, full, atol=1e-5)


def test_runtimes_declare_formats_and_capabilities(capsys) -> None:
    specs = runtimes.all_runtimes()
    assert {"hf", "compiled", "llama.cpp", "onnxruntime"} <= set(specs)
    assert runtimes.natural("gguf").name == "llama.cpp" and runtimes.natural("awq").name == "hf"
    assert runtimes.resolve("auto", "compressed-tensors", "cuda").name == "compiled"
    assert runtimes.resolve("auto", "awq", "cuda").name == "hf"  # no kernel for the AWQ GEMM layout
    assert runtimes.resolve("auto", "compressed-tensors", "cpu").name == "hf"
    assert runtimes.resolve("llama.cpp", "safetensors", "cpu") is None
    assert main(["runtimes"]) == 0
    out = capsys.readouterr().out
    assert "loads: gguf" in out and "scores: full, batched scoring: yes" in out


def test_artifact_metadata_is_typed_and_reads_version_1(tmp_path: Path) -> None:
    meta = artifact.parse({"meta_version": 2, "variant": "v", "method": "gguf", "format": "gguf",
                           "file": "model-Q4_K_M.gguf", "vocab": {"one_to_one": True}})
    assert meta.format == "gguf" and meta.extra("vocab") == {"one_to_one": True}
    artifact.write(tmp_path, meta)
    assert artifact.read(tmp_path) == meta
    v1 = {"quantpipe_version": "0.1.0", "variant": "g", "method": "gptq", "runtime": "hf",
          "format": "compressed-tensors (pack-quantized)", "params": {"bits": 4}}
    up = artifact.parse(v1)
    assert up.format == "compressed-tensors" and up.format_detail == "compressed-tensors (pack-quantized)"
    assert artifact.parse({**v1, "runtime": "llama.cpp", "format": "gguf"}).format == "gguf"
    with pytest.raises(Exception, match="corrupt metadata: format"):
        artifact.parse({"meta_version": 2, "format": "exl2"})


# a real version-1 results.json: the demo run of 2026-11-28 (also docs/bench-smollm2-demo-lmeval-cpu.json)
V1_FILE = ROOT / "tests" / "data" / "results-v1-smollm2-demo.json"


def test_version_1_results_still_gate_and_render(tmp_path: Path, capsys) -> None:
    run = tmp_path / "old"
    run.mkdir()
    shutil.copy(V1_FILE, run / "results.json")
    assert main(["report", str(run)]) == 0
    md = (run / "matrix.md").read_text()
    assert "| gguf-q4_k_m-imatrix | gguf |" in md and "| onnx-int8-static | onnx |" in md
    capsys.readouterr()
    assert main(["gate", str(run), "--baseline", str(run / "results.json")]) == 0  # its own gates, itself
    assert "passed" in capsys.readouterr().out
    old = results.load(run, "test")
    assert old.upgraded_from == 1 and len(old.variants) == 14 and old.row("gguf-f16").runtime == "llama.cpp"


def test_version_2_results_round_trip(tmp_path: Path) -> None:
    typed = results.parse(json.loads(V1_FILE.read_text()))
    again = results.parse(json.loads(typed.to_json()))
    assert again.model_dump(exclude={"upgraded_from"}) == typed.model_dump(exclude={"upgraded_from"})
    assert json.loads(typed.to_json())["schema_version"] == 2


def _lint_imports(root: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "lint-imports"
    return subprocess.run([str(exe), "--no-cache", str(root / "pyproject.toml")], cwd=root, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(root)})


@pytest.mark.skipif(not (Path(sys.executable).parent / "lint-imports").exists(), reason="needs the dev extra")
def test_layers_hold_and_an_upward_import_breaks_them(tmp_path: Path) -> None:
    copy = tmp_path / "repo"
    shutil.copytree(ROOT / "quantpipe", copy / "quantpipe", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", copy / "pyproject.toml")
    ok = _lint_imports(copy)
    assert ok.returncode == 0 and "Contracts: 2 kept, 0 broken." in ok.stdout, ok.stdout + ok.stderr
    with open(copy / "quantpipe" / "memory.py", "a") as f:  # the byte arithmetic reaching up into the run
        f.write("\n\ndef _upward() -> None:\n    from quantpipe import pipeline  # noqa: F401\n")
    broken = _lint_imports(copy)
    assert broken.returncode != 0 and "quantpipe layers BROKEN" in broken.stdout, broken.stdout
    assert "quantpipe.memory -> quantpipe.pipeline" in broken.stdout
