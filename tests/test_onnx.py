"""ONNX on the tiny random Llama: both exporters against transformers (logits on the same ids, greedy generation
with the KV cache token for token), INT8 dynamic and static through onnxruntime.quantization, the artifact loaded
by plain onnxruntime and by onnxruntime-genai without quantpipe, params errors, and corrupt files."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import (
    TINY_LM_EVAL,
    check_lm_eval_agrees,
    check_memory_prediction,
    eval_windows,
    rows,
    run_tiny_recipe,
    tiny_recipe,
    write_recipe,
)

from quantpipe import cli, runtimes
from quantpipe.errors import QuantpipeError
from quantpipe.results import Results

if importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnxruntime_genai") is None:
    if os.environ.get("CI"):  # CI installs the onnx extra: a missing onnxruntime there is a broken set-up
        raise RuntimeError("onnxruntime or onnxruntime-genai is not installed; run `make setup`")
    pytest.skip("needs the onnx extra (make setup)", allow_module_level=True)

VARIANTS = [
    {"name": "baseline", "method": "baseline"},
    {"name": "onnx-fp32", "method": "onnx"},
    {"name": "onnx-fp32-torch", "method": "onnx", "exporter": "torch"},
    {"name": "onnx-int8", "method": "onnx", "quantize": "dynamic"},
    {"name": "onnx-int8-static", "method": "onnx", "quantize": "static"},
    {"name": "onnx-int8-keep", "method": "onnx", "quantize": "dynamic", "keep_float": ["down_proj"]},
]
FP32 = ("onnx-fp32", "onnx-fp32-torch")


@pytest.fixture(scope="module")
def onnx_run(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Results]:
    root = tmp_path_factory.mktemp("onnx")
    return run_tiny_recipe(tiny_model, root, VARIANTS, lm_eval=TINY_LM_EVAL)


def _windows(run_dir: Path) -> list[list[int]]:
    return eval_windows(run_dir, 128, 512)


@pytest.mark.parametrize("variant", FP32)
def test_onnx_logits_match_pytorch_on_the_same_ids(onnx_run: tuple[Path, Results], variant: str) -> None:
    run_dir, _ = onnx_run
    hf = runtimes.load(run_dir / "artifacts" / "baseline", "cpu")
    ort = runtimes.load(run_dir / "artifacts" / variant, "cpu")
    try:
        assert ort.name == "onnxruntime" and ort.device == "cpu"
        for w in _windows(run_dir)[:2]:
            want, got = hf.logits(w), ort.logits(w)
            assert got.shape == want.shape == (len(w), 512)
            assert (got - want).abs().max() <= 1e-4 * want.abs().max(), (got - want).abs().max()
    finally:
        hf.close()
        ort.close()


@pytest.mark.parametrize("variant", FP32)
def test_onnx_generation_with_past_matches_greedy_hf(onnx_run: tuple[Path, Results], variant: str) -> None:
    run_dir, _ = onnx_run
    ids = torch.tensor([w[:24] for w in _windows(run_dir)[:2]])  # two different prompts, one batch
    hf = runtimes.load(run_dir / "artifacts" / "baseline", "cpu")
    ort = runtimes.load(run_dir / "artifacts" / variant, "cpu")
    try:
        want = hf.generate(ids, 12)
        got = ort.generate(ids, 12)
        assert got.shape == (2, 12) and torch.equal(got, want)
        assert torch.equal(ort.generate(ids[1:], 12), want[1:])
    finally:
        hf.close()
        ort.close()


def test_onnx_int8_quality_sizes_and_metadata(onnx_run: tuple[Path, Results]) -> None:
    run_dir, res = onnx_run
    v = rows(res)
    kld = {n: v[n].quality.kld_mean for n in v}
    assert kld["onnx-fp32"] < 1e-6 and kld["onnx-fp32-torch"] < 1e-6  # fp32 rounding (measured 8e-8)
    for name in ("onnx-int8", "onnx-int8-static", "onnx-int8-keep"):
        assert kld[name] > 1e-6, (name, kld)
        assert v[name].artifact.size_bytes < 0.6 * v["onnx-fp32"].artifact.size_bytes
    assert v["onnx-int8-keep"].artifact.size_bytes > v["onnx-int8"].artifact.size_bytes
    q = {n: v[n].meta["quantization"] for n in ("onnx-int8", "onnx-int8-static", "onnx-int8-keep")}
    assert q["onnx-int8"]["matmuls_quantized"] == 2 * 5 + 1 and q["onnx-int8"]["matmuls_float"] == 0  # + lm_head
    assert q["onnx-int8-keep"]["matmuls_float"] == 2
    assert "4 calibration rows" in q["onnx-int8-static"]["activations"]
    ops = {n: v[n].meta["io"]["ops"] for n in v if n.startswith("onnx")}
    assert ops["onnx-int8"].get("MatMulInteger") == 11 and "DynamicQuantizeLinear" in ops["onnx-int8"]
    assert ops["onnx-int8-static"].get("QuantizeLinear") and ops["onnx-int8-static"].get("DequantizeLinear")
    assert "com.microsoft.GroupQueryAttention" in ops["onnx-fp32"]  # the builder's fused attention
    assert not any("com.microsoft" in k for k in ops["onnx-fp32-torch"])  # standard ops only
    for name in (n for n in v if n.startswith("onnx")):
        meta, art = v[name].meta, run_dir / "artifacts" / name
        assert v[name].runtime == "onnxruntime" and meta["format"] == "onnx"
        assert meta["io"]["inputs"][:2] == ["input_ids", "attention_mask"]
        assert "present.1.value" in meta["io"]["outputs"]
        assert sorted(p.name for p in art.glob("model.onnx*")) == ["model.onnx", "model.onnx.data"]
        assert (art / "config.json").is_file() and (art / "tokenizer.json").is_file()
        assert (art / "genai_config.json").is_file() == (name != "onnx-fp32-torch")
        assert ("onnxruntime_genai" in (art / "README.md").read_text()) == (name != "onnx-fp32-torch")
        assert not list(art.glob(".*")), list(art.glob(".*"))  # no export or calibration leftovers
        speed = v[name].speed
        assert speed.runtime == "onnxruntime" and "CPUExecutionProvider" in speed.kernel
        assert speed.per_batch["2"].decode_tok_s > 0 and v[name].memory.peak_rss_mib > 0
        # torch.onnx's optimizer merges identical constants: the tiny model's norm weights are all ones, so
        # four of its five [128] float norms become one (2 KiB under the prediction)
        check_memory_prediction(name, v[name].prediction, nominal_slack=4 * 128 * 4)
    assert v["onnx-fp32"].meta["exporter"]["name"] == "onnxruntime-genai model builder"
    assert v["onnx-fp32-torch"].meta["exporter"]["name"] == "torch.onnx (dynamo)"
    assert v["onnx-int8-static"].meta["exporter"]["version"] and v["onnx-int8"].meta["export_s"] > 0


def test_plain_onnxruntime_and_genai_load_the_artifact(onnx_run: tuple[Path, Results]) -> None:
    """Outside quantpipe: plain onnxruntime scores the exported ids as the runtime does, and onnxruntime-genai
    (the README's snippet) generates from the builder's artifact."""
    run_dir, _ = onnx_run
    art = run_dir / "artifacts" / "onnx-fp32"
    ids = _windows(run_dir)[0][:16]
    code = f"""
import sys, numpy as np, onnxruntime as ort, onnxruntime_genai as og
import json
cfg = json.load(open({str(art / 'config.json')!r}))
sess = ort.InferenceSession({str(art / 'model.onnx')!r})
feed = {{"input_ids": np.array([{ids}]), "attention_mask": np.ones((1, {len(ids)}), np.int64)}}
head = cfg["hidden_size"] // cfg["num_attention_heads"]
for i in sess.get_inputs():
    if i.name.startswith("past_key_values."):
        feed[i.name] = np.zeros((1, cfg["num_key_value_heads"], 0, head), np.float32)
print(int(sess.run(["logits"], feed)[0][0, -1].argmax()))
model = og.Model({str(art)!r}); params = og.GeneratorParams(model); params.set_search_options(max_length={len(ids) + 6})
gen = og.Generator(model, params); gen.append_tokens({ids})
while not gen.is_done(): gen.generate_next_token()
print([int(t) for t in gen.get_sequence(0)][{len(ids)}:])
assert "quantpipe" not in sys.modules
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    first, generated = out.stdout.strip().splitlines()[-2:]
    rt = runtimes.load(art, "cpu")
    try:
        want = rt.generate(torch.tensor([ids]), 6)[0].tolist()
    finally:
        rt.close()
    assert int(first) == want[0] and json.loads(generated) == want


@pytest.mark.parametrize("params,message", [
    ({"keep_float": ["down_proj"]}, "keep_float: only applies with quantize"),
    ({"quantize": "dynamic", "calibrate_method": "entropy"}, "calibrate_method: dynamic quantization does not"),
    ({"calibrate_method": "percentile"}, "calibrate_method: none quantization does not calibrate"),
    ({"quantize": "int4"}, "quantize: Input should be 'none', 'dynamic' or 'static'"),
    ({"exporter": "optimum"}, "exporter: Input should be 'builder' or 'torch'"),
])
def test_onnx_params_errors_name_the_field(tiny_model: Path, tmp_path: Path, params: dict, message: str,
                                           capsys: pytest.CaptureFixture) -> None:
    recipe = tiny_recipe(tiny_model, tmp_path / "run", variants=[{"name": "baseline", "method": "baseline"},
                                                                  {"name": "x", "method": "onnx", **params}])
    assert cli.main(["run", str(write_recipe(tmp_path / "r.yaml", recipe))]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err


def test_keep_float_that_matches_nothing_is_an_error(tiny_model: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    recipe = tiny_recipe(tiny_model, tmp_path / "run", variants=[
        {"name": "baseline", "method": "baseline"},
        {"name": "x", "method": "onnx", "quantize": "dynamic", "keep_float": ["no_such_proj"]}])
    recipe["bench"]["enabled"] = False
    assert cli.main(["run", str(write_recipe(tmp_path / "r.yaml", recipe))]) == 2
    err = capsys.readouterr().err
    assert "keep_float: no MatMul node name contains 'no_such_proj'" in err and "Traceback" not in err, err
    assert (tmp_path / "run" / "artifacts" / "baseline" / "model.safetensors").is_file()  # kept
    assert not (tmp_path / "run" / "artifacts" / "x").exists()


@pytest.mark.parametrize("what,keep", [("model.onnx", 200), ("model.onnx.data", 1000)])
def test_corrupt_onnx_is_a_clear_error(onnx_run: tuple[Path, Results], tmp_path: Path, what: str, keep: int) -> None:
    run_dir, _ = onnx_run
    bad = tmp_path / "bad"
    import shutil

    shutil.copytree(run_dir / "artifacts" / "onnx-int8", bad)
    data = (bad / what).read_bytes()
    (bad / what).write_bytes(data[:keep])
    with pytest.raises(QuantpipeError) as e:
        runtimes.load(bad, "cpu")
    assert str(bad) in str(e.value) and "\n" not in str(e.value)
    out = subprocess.run([sys.executable, "-m", "quantpipe", "bench", str(bad)], capture_output=True, text=True)
    assert out.returncode == 2 and "Traceback" not in out.stderr and "could not load" in out.stderr, out.stderr


def test_lm_eval_through_the_ort_runtime_agrees_with_transformers(onnx_run: tuple[Path, Results]) -> None:
    """lm-eval's requests through quantpipe's adapter: the onnx-fp32 row (onnxruntime) scores what the HF
    baseline scores, within the standard errors, and every row of the run has task scores."""
    _, res = onnx_run
    check_lm_eval_agrees(res, "onnx-fp32")
    assert {v.runtime for v in res.variants if v.lm_eval} == {"hf", "onnxruntime"}
