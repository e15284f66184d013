"""Paths in a recipe: relative ones are taken from the working directory once, when the recipe loads, and nothing
after that depends on the working directory. Every shipped recipe has a relative `output.dir`; `make demo` failed
on it at the first GGUF row (llama.cpp's converter runs in its own folder and was handed relative paths), while
every test used absolute temporary directories."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, build_smol_tokenizer_model, read_results

from quantpipe import cli, pipeline
from quantpipe.recipe import load_recipe, parse_recipe

# One variant of every method, each backend once: the methods that run libraries in other processes or
# directories (llama.cpp's converter, GPTQModel, the ONNX builder, the bench process) are the ones at risk.
ALL_METHODS = [
    {"name": "baseline", "method": "baseline"},
    {"name": "int8", "method": "int8"},
    {"name": "sq", "method": "smoothquant", "smoothing_strength": 0.5},
    {"name": "gptq-ct", "method": "gptq", "bits": 4, "group_size": 64},
    {"name": "gptq-fmt", "method": "gptq", "bits": 4, "group_size": 64, "format": "gptq"},
    {"name": "awq-ct", "method": "awq", "bits": 4, "group_size": 64},
    {"name": "gguf-q4_0-imatrix", "method": "gguf", "type": "Q4_0", "imatrix": True},
    {"name": "onnx-int8-static", "method": "onnx", "quantize": "static"},
]


def relative_recipe() -> dict:
    """A tiny recipe whose every path is relative: model, calibration file, eval text, run directory."""
    return {
        "name": "rel",
        "model": {"path": "models/tiny", "dtype": "float32"},
        "calibration": {"source": "files", "files": ["data/calib.txt"], "n_samples": 4, "seq_len": 64},
        "variants": ALL_METHODS,
        "eval": {"text": "data/eval.txt", "window": 128, "max_tokens": 256},
        "bench": {"device": "cpu", "prompt_len": 16, "gen_len": 32, "batch_sizes": [1], "warmup": 1, "repeats": 3},
        "output": {"dir": "out/rel-run"},
    }


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A user's project folder: the model, the texts and the recipe, all named relative to it."""
    root = tmp_path_factory.mktemp("project")
    build_smol_tokenizer_model(root / "models" / "tiny")
    (root / "data").mkdir()
    shutil.copy(ROOT / "calibration" / "default.txt", root / "data" / "calib.txt")
    shutil.copy(ROOT / "evals" / "eval-text.txt", root / "data" / "eval.txt")
    (root / "recipe.yaml").write_text(yaml.safe_dump(relative_recipe(), sort_keys=False))
    return root


def test_relative_paths_resolve_from_the_working_directory(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(project)
    r = load_recipe("recipe.yaml")
    assert r.output.dir == str(project / "out" / "rel-run") and r.run_dir() == project / "out" / "rel-run"
    assert r.model.path == str(project / "models" / "tiny")
    assert r.calibration.files == [str(project / "data" / "calib.txt")] and r.eval.text == str(project / "data" /
                                                                                               "eval.txt")
    assert r.run_dir("elsewhere") == project / "elsewhere"  # --out is relative to the working directory too
    # a recipe without output.dir runs in runs/<name> of the working directory
    data = relative_recipe()
    del data["output"]
    assert parse_recipe(data).run_dir() == project / "runs" / "rel"
    # a path that is not there is named as written and as looked for
    data["eval"]["text"] = "data/missing.txt"
    with pytest.raises(Exception, match=r"eval.text: file 'data/missing.txt' \(.*/data/missing.txt\) does not"):
        parse_recipe(data)


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="needs the gguf extra (make setup)")
def test_every_method_runs_with_relative_paths_from_another_directory(project: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """`quantpipe run recipe.yaml` from the project folder, and the working directory moved to an empty folder
    as soon as the recipe has loaded: every stage of every method must still find its files."""
    elsewhere = project.parent / "elsewhere"
    elsewhere.mkdir()
    real_run = pipeline.run

    def run_elsewhere(*args: object, **kw: object) -> dict:
        os.chdir(elsewhere)  # what a subprocess started in another folder sees
        return real_run(*args, **kw)

    monkeypatch.chdir(project)
    monkeypatch.setattr(pipeline, "run", run_elsewhere)
    assert cli.main(["run", "recipe.yaml"]) == 0
    assert os.getcwd() == str(elsewhere) and not any(elsewhere.iterdir())  # nothing was written there
    run = project / "out" / "rel-run"
    res = read_results(run)
    assert [v.name for v in res.variants] == [v["name"] for v in ALL_METHODS]
    assert res.run_dir == str(run) and res.recipe.path == str(project / "recipe.yaml")
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["recipe_content"]["model"]["path"] == str(project / "models" / "tiny")
    for v in res.variants:
        assert v.quality.perplexity > 1 and v.speed.per_batch["1"].decode_tok_s > 0, v.name
        assert (run / "artifacts" / v.name / "quantpipe.json").is_file()
    assert {v.runtime for v in res.variants} == {"hf", "llama.cpp", "onnxruntime"}
    assert (run / "artifacts" / "gguf-q4_0-imatrix" / "imatrix.gguf").is_file()
