"""`quantpipe run` end to end on the tiny random model: outputs, quality relations, cache, resume, corruption."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch
import yaml
from conftest import check_memory_prediction, read_results, reload_without_quantpipe, rows, tiny_recipe, write_recipe

from quantpipe import artifact, report, runtimes
from quantpipe.cache import file_sha256
from quantpipe.cli import main
from quantpipe.deps import Requirements
from quantpipe.errors import QuantpipeError
from quantpipe.methods import Method, MethodParams
from quantpipe.methods.int8 import Int8
from quantpipe.pipeline import Run
from quantpipe.recipe import parse_recipe
from quantpipe.results import Results


@pytest.fixture(scope="module")
def tiny_run(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Results]:
    tmp = tmp_path_factory.mktemp("run")
    recipe = write_recipe(tmp / "tiny.yaml", tiny_recipe(tiny_model, tmp / "run", variants=[
        {"name": "baseline", "method": "baseline"},
        {"name": "int8", "method": "int8"},
        {"name": "int8-dyn", "method": "int8", "scheme": "dynamic"},
    ]))
    assert main(["run", str(recipe)]) == 0
    return recipe, tmp / "run", read_results(tmp / "run")


def test_outputs_exist(tiny_run: tuple[Path, Path, Results]) -> None:
    _, run_dir, _ = tiny_run
    for name in ("results.json", "manifest.json", "matrix.md", "matrix.html", "matrix.png"):
        assert (run_dir / name).is_file(), name
    for v in ("baseline", "int8", "int8-dyn"):
        art = run_dir / "artifacts" / v
        assert (art / "model.safetensors").is_file() and (art / "tokenizer.json").is_file()
        assert artifact.read(art).variant == v
        assert "from_pretrained" in (art / "README.md").read_text()
    assert not list((run_dir / "artifacts").glob(".tmp-*"))


def test_results_quality_and_size(tiny_run: tuple[Path, Path, Results]) -> None:
    _, _, res = tiny_run
    assert res.schema_version == 2 and res.reference == "baseline"
    v = rows(res)
    assert list(v) == ["baseline", "int8", "int8-dyn"]
    assert v["baseline"].quality.kld_mean == 0 and v["baseline"].quality.top1_agreement == 1
    assert v["int8"].quality.kld_mean > 0
    assert v["int8-dyn"].quality.kld_mean > 0
    assert v["int8"].artifact.size_bytes < v["baseline"].artifact.size_bytes
    ppl = v["baseline"].quality.perplexity
    assert 1 < ppl < 2 * 512  # random weights: near the vocab size, finite
    assert v["baseline"].quality.n_tokens_scored == 4 * 127


def test_results_speed_and_memory(tiny_run: tuple[Path, Path, Results]) -> None:
    _, _, res = tiny_run
    for v in res.variants:
        pb = v.speed.per_batch
        assert set(pb) == {"1", "2"}
        for b in pb.values():
            assert b.decode_tok_s > 0 and b.prefill_tok_s > 0 and b.ttft_s > 0
        assert 50 < v.memory.peak_rss_mib < 20_000
        assert v.timings.quantize_s > 0 and v.speed.device == "cpu"


def test_manifest_digests_match_files(tiny_run: tuple[Path, Path, Results]) -> None:
    _, run_dir, res = tiny_run
    man = json.loads((run_dir / "manifest.json").read_text())
    assert man["recipe"]["sha256"] == res.recipe.sha256
    assert man["library_versions"]["transformers"] == "5.17.0"
    for name, files in man["artifacts"].items():
        assert files, name
        for rel, sha in files.items():
            assert file_sha256(run_dir / "artifacts" / name / rel) == sha


def test_int8_artifact_reloads_without_quantpipe(tiny_run: tuple[Path, Path, Results]) -> None:
    _, run_dir, _ = tiny_run
    out = reload_without_quantpipe(run_dir / "artifacts" / "int8", (
        "w = m.model.layers[0].self_attn.q_proj.weight\n"
        "assert type(w).__module__.startswith('torchao'), type(w)\n"
        "assert torch.isfinite(m(torch.tensor([[1, 2, 3]])).logits).all()\n"
        "print('ok', type(w).__name__)\n"))
    assert out.startswith("ok Int8")


def test_second_run_is_served_from_cache(tiny_run: tuple[Path, Path, Results], capsys) -> None:
    recipe, run_dir, first = tiny_run
    capsys.readouterr()
    assert main(["run", str(recipe)]) == 0
    out = capsys.readouterr().out
    stages = [line for line in out.splitlines() if line.startswith("[")]
    assert stages and all(line.endswith(": cached") for line in stages), stages
    again = read_results(run_dir)
    assert [v.quality for v in again.variants] == [v.quality for v in first.variants]


def test_run_with_gate(tiny_run: tuple[Path, Path, Results], tiny_model: Path, capsys) -> None:
    """`run --gate` gates the run's results with the recipe's thresholds (stages cached: gates are not part of
    any stage's key), against the previous results too; its exit code is the run's."""
    recipe, run_dir, first = tiny_run
    previous = run_dir.parent / "previous-results.json"
    previous.write_text(first.to_json())
    data = yaml.safe_load(recipe.read_text())
    data["gates"] = {"all": {"max_kld": 1.0, "max_size_ratio": 0.8}, "variants": {"int8": {"min_top1": 0.5}}}
    gated = write_recipe(recipe.parent / "gated.yaml", data)
    junit = run_dir.parent / "gate.xml"
    capsys.readouterr()
    assert main(["run", str(gated), "--gate", "--baseline", str(previous), "--junit", str(junit)]) == 0
    out = capsys.readouterr().out
    assert all(line.endswith(": cached") for line in out.splitlines() if line.startswith("["))
    assert "quantpipe gate" in out and "| int8 | min_top1 | ≥ 0.5 |" in out and "| int8-dyn | kld vs previous |" in out
    assert read_results(run_dir).gates.variants["int8"].min_top1 == 0.5
    assert int(ET.parse(junit).getroot().get("tests")) == 5 + 2 * 3  # 5 thresholds, 3 metrics × 2 variants
    data["gates"]["all"]["max_kld"] = 1e-9  # quantized rows cannot pass it: exit 1
    assert main(["run", str(write_recipe(recipe.parent / "strict.yaml", data)), "--gate"]) == 1
    assert "| int8 | max_kld | ≤ 1e-09 |" in capsys.readouterr().out
    assert main(["gate", str(run_dir)]) == 1  # the recorded gates, without running anything
    capsys.readouterr()
    # the gate's inputs are checked before any work
    assert main(["run", str(gated), "--junit", str(junit)]) == 2
    assert "go with --gate" in capsys.readouterr().err
    assert main(["run", str(gated), "--gate", "--baseline", str(run_dir / "missing.json")]) == 2
    out, err = capsys.readouterr()
    assert "--baseline" in err and "does not exist" in err and "[1/" not in out


def test_corrupted_artifact_is_rebuilt(tiny_run: tuple[Path, Path, Results], capsys) -> None:
    recipe, run_dir, first = tiny_run
    weights = run_dir / "artifacts" / "int8" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["run", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert "does not match its recorded sha256 digests; rebuilding it" in out
    assert "quantize:int8: done" in out and "quantize:baseline: cached" in out
    again = read_results(run_dir)
    assert again.variants[1].quality == first.variants[1].quality


def test_changed_bench_settings_redo_only_bench(tiny_run: tuple[Path, Path, Results], tiny_model: Path, capsys) -> None:
    recipe, run_dir, _ = tiny_run
    data = tiny_recipe(tiny_model, run_dir, variants=[{"name": "baseline", "method": "baseline"}],
                       bench={"device": "auto", "prompt_len": 8, "gen_len": 3, "batch_sizes": [1], "warmup": 0,
                              "repeats": 1})
    capsys.readouterr()
    assert main(["run", str(write_recipe(recipe.parent / "b.yaml", data))]) == 0
    out = capsys.readouterr().out
    assert "quantize:baseline: cached" in out
    assert "bench:baseline: done" in out
    if not torch.cuda.is_available():  # 'auto' resolved to the cpu the first run used: eval stays cached
        assert "eval:baseline: cached" in out


def test_corrupt_artifact_gives_clear_error(tiny_run: tuple[Path, Path, Results], tmp_path: Path) -> None:
    _, run_dir, _ = tiny_run
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in (run_dir / "artifacts" / "baseline").iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    (bad / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(QuantpipeError, match="could not load with runtime 'hf'") as e:
        runtimes.load(bad, "cpu")
    assert "\n" not in str(e.value)
    (bad / "quantpipe.json").write_text("{broken")
    with pytest.raises(QuantpipeError, match="corrupt metadata"):
        runtimes.load(bad, "cpu")


def test_calibration_stage_is_cached_and_verified(tiny_model: Path, tmp_path: Path, capsys) -> None:
    recipe = parse_recipe(tiny_recipe(tiny_model, tmp_path / "run"))
    r = Run(recipe, tmp_path / "run")
    r.quantize(recipe.reference, None)
    ids = r.calibration_ids()
    assert ids.shape == (4, 64)
    r2 = Run(recipe, tmp_path / "run")
    r2.quantize(recipe.reference, None)
    assert r2.calibration_ids().equal(ids)
    assert "calibration: cached" in capsys.readouterr().out
    (tmp_path / "run" / ".quantpipe" / "calibration" / "ids.safetensors").write_bytes(b"garbage")
    r3 = Run(recipe, tmp_path / "run")
    r3.quantize(recipe.reference, None)
    assert r3.calibration_ids().equal(ids)  # rebuilt, not trusted


def test_missing_library_names_the_install(monkeypatch) -> None:
    class Fake(Method):
        name, summary, Params = "fake", "", MethodParams
        needs = Requirements(("surely_not_installed_pkg",), "gptq")

    m = Fake()
    assert m.missing() == ["surely_not_installed_pkg"]
    assert m.install_hint() == "pip install 'quantpipe[gptq]'"
    with pytest.raises(QuantpipeError, match=r"variants\(q\): method 'fake' needs surely_not_installed_pkg: pip inst"):
        m.require("q")


def test_unwritable_output_dir(tiny_model: Path, tmp_path: Path, capsys) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tiny_model, blocker / "run"))
    assert main(["run", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("quantpipe: error: ") and "Traceback" not in err


class _DiskFullInt8(Int8):  # module level: the quantize process imports it by name
    def quantize(self, job):
        import errno

        raise OSError(errno.ENOSPC, "No space left on device", str(job.out_dir / "model.safetensors"))


def test_disk_full_during_a_stage_keeps_finished_stages(tiny_model: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    from quantpipe import methods

    run_dir = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tiny_model, run_dir))
    methods.all_methods()

    monkeypatch.setitem(methods._REGISTRY, "int8", _DiskFullInt8())
    assert main(["run", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "quantize:int8: no space left on the device while method 'int8' was writing its artifact" in err
    assert "Traceback" not in err
    assert not (run_dir / "artifacts" / "int8").exists() and not list((run_dir / "artifacts").glob(".tmp-*"))
    monkeypatch.undo()
    assert main(["run", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert "quantize:baseline: cached" in out and "quantize:int8: done" in out



def test_memory_predicted_beside_measured(tiny_run: tuple[Path, Path, Results]) -> None:
    _, _, res = tiny_run
    for v in res.variants:
        check_memory_prediction(v.name, v.prediction)
        assert v.prediction.bench_measure.startswith("peak RSS of a generation at the largest batch"), v.name
    matrix = report.markdown(res)  # the run dir's matrix.md is rewritten by later tests of this module
    table = matrix[matrix.index("Memory, predicted"):]
    assert all(f"| {v} | " in table for v in ("baseline", "int8", "int8-dyn"))
