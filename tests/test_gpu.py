"""CUDA branches of the HF runtime and the bench (device_map, synchronize, peak GPU memory).

Skipped where no CUDA device is visible (CI); on the lent GPU machine run:
    python -m pytest tests/test_gpu.py
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_recipe, write_recipe

from quantpipe import runtimes
from quantpipe.cli import main

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_run_on_cuda(tiny_model: Path, tmp_path: Path) -> None:
    recipe = tiny_recipe(tiny_model, tmp_path / "run")
    recipe["bench"]["device"] = "cuda"
    assert main(["run", str(write_recipe(tmp_path / "r.yaml", recipe))]) == 0
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["hardware"]["cuda"] and res["hardware"]["gpu"]
    for v in res["variants"]:
        assert v["speed"]["device"] == "cuda"
        assert v["speed"]["per_batch"]["1"]["decode_tok_s"] > 0
    base, int8 = res["variants"]
    assert base["quality"]["kld_mean"] == 0 and int8["quality"]["kld_mean"] > 0


def test_cuda_logits_match_cpu(tiny_model: Path, tmp_path: Path) -> None:
    recipe = tiny_recipe(tiny_model, tmp_path / "run", variants=[{"name": "baseline", "method": "baseline"}])
    recipe["bench"]["enabled"] = False
    assert main(["run", str(write_recipe(tmp_path / "r.yaml", recipe))]) == 0
    art = tmp_path / "run" / "artifacts" / "baseline"
    ids = list(range(1, 65))
    cpu, gpu = runtimes.load(art, "cpu"), runtimes.load(art, "cuda")
    assert gpu.device == "cuda"
    assert torch.allclose(cpu.logits(ids), gpu.logits(ids), atol=1e-3, rtol=1e-3)
    x = torch.tensor([ids[:16]])
    assert gpu.generate(x, 5).shape == (1, 5)
