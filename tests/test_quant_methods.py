"""GPTQ, AWQ and SmoothQuant W8A8 on the tiny random model: checkpoints in each format carry the params, hold
packed low-bit tensors, reload without quantpipe, and score in the matrix; bad params fail before any work."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import (
    artifact_tensors,
    quant_config,
    read_results,
    reloads_to_finite_logits,
    rows,
    tiny_recipe,
    write_recipe,
)

from quantpipe.cli import main
from quantpipe.errors import QuantpipeError
from quantpipe.methods import get_method
from quantpipe.recipe import parse_recipe
from quantpipe.results import Results

VARIANTS = [
    {"name": "baseline", "method": "baseline"},
    {"name": "gptq-ct", "method": "gptq", "bits": 4, "group_size": 64},
    {"name": "gptq-ct8", "method": "gptq", "bits": 8, "group_size": -1},
    {"name": "gptq-head", "method": "gptq", "bits": 4, "group_size": 64, "quantize_lm_head": True},
    {"name": "gptq-fmt", "method": "gptq", "bits": 4, "group_size": 32, "desc_act": True, "format": "gptq"},
    {"name": "awq-ct", "method": "awq", "bits": 4, "group_size": 64},
    {"name": "awq-fmt", "method": "awq", "bits": 4, "group_size": 64, "format": "awq"},
    {"name": "sq", "method": "smoothquant", "smoothing_strength": 0.5},
]


@pytest.fixture(scope="module")
def quant_run(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Results]:
    tmp = tmp_path_factory.mktemp("quant")
    recipe = tiny_recipe(tiny_model, tmp / "run", variants=VARIANTS)
    recipe["bench"]["batch_sizes"] = [1]
    path = write_recipe(tmp / "q.yaml", recipe)
    cwd = os.getcwd()
    (tmp / "run").mkdir()
    os.chdir(tmp / "run")  # the run dir is the working dir: nothing but quantpipe's outputs may appear in it
    try:
        assert main(["run", str(path)]) == 0
    finally:
        os.chdir(cwd)
    assert sorted(p.name for p in (tmp / "run").iterdir() if not p.name.startswith(".")) == [
        "artifacts", "manifest.json", "matrix.html", "matrix.md", "matrix.png", "results.json"]  # no library litter
    return tmp / "run", read_results(tmp / "run")


Q_PROJ = "model.layers.0.self_attn.q_proj."  # tiny model: 128 -> 128
DOWN = "model.layers.1.mlp.down_proj."  # 256 -> 128


def test_compressed_tensors_gptq_checkpoint(quant_run: tuple[Path, Results]) -> None:
    run_dir, _ = quant_run
    q = quant_config(run_dir, "gptq-ct")
    assert q["quant_method"] == "compressed-tensors" and q["format"] == "pack-quantized"
    w = q["config_groups"]["group_0"]["weights"]
    assert (w["num_bits"], w["group_size"], w["strategy"], w["symmetric"]) == (4, 64, "group", True)
    assert q["ignore"] == ["lm_head"]
    t = artifact_tensors(run_dir, "gptq-ct", DOWN)
    assert t["weight_packed"] == ([128, 256 * 4 // 32], "I32")  # eight 4-bit values per int32
    assert t["weight_scale"][0] == [128, 256 // 64]
    w8 = quant_config(run_dir, "gptq-ct8")["config_groups"]["group_0"]["weights"]
    assert (w8["num_bits"], w8["strategy"], w8["actorder"]) == (8, "channel", "static")
    assert artifact_tensors(run_dir, "gptq-ct8", Q_PROJ)["weight_scale"][0] == [128, 1]
    # quantize_lm_head: lm_head is packed like the decoder's Linears, and nothing is left out
    assert quant_config(run_dir, "gptq-head")["ignore"] == []
    head = artifact_tensors(run_dir, "gptq-head", "lm_head.")
    assert head["weight_packed"][1] == "I32" and head["weight_scale"][0][1] == 128 // 64


def test_classic_gptq_checkpoint(quant_run: tuple[Path, Results]) -> None:
    run_dir, _ = quant_run
    q = quant_config(run_dir, "gptq-fmt")
    assert (q["quant_method"], q["bits"], q["group_size"], q["desc_act"], q["sym"]) == ("gptq", 4, 32, True, True)
    t = artifact_tensors(run_dir, "gptq-fmt", DOWN)
    assert t["g_idx"] == ([256], "I32")  # desc_act: the group of each input column
    assert t["qweight"] == ([256 // 8, 128], "I32")
    assert t["scales"] == ([256 // 32, 128], "F16")
    assert t["qzeros"][0] == [256 // 32, 128 // 8]


def test_awq_checkpoints(quant_run: tuple[Path, Results]) -> None:
    run_dir, _ = quant_run
    w = quant_config(run_dir, "awq-ct")["config_groups"]["group_0"]["weights"]
    assert (w["num_bits"], w["group_size"], w["symmetric"]) == (4, 64, False)  # zero_point: true
    assert "weight_zero_point" in artifact_tensors(run_dir, "awq-ct", Q_PROJ)
    q = quant_config(run_dir, "awq-fmt")
    assert (q["quant_method"], q["bits"], q["group_size"], q["zero_point"], q["version"]) == ("awq", 4, 64, True,
                                                                                             "gemm")
    t = artifact_tensors(run_dir, "awq-fmt", DOWN)
    assert t["qweight"] == ([256, 128 // 8], "I32")  # GEMM layout packs along the output dim
    assert t["scales"] == ([256 // 64, 128], "F16")


def test_smoothquant_w8a8_checkpoint(quant_run: tuple[Path, Results]) -> None:
    run_dir, _ = quant_run
    g = quant_config(run_dir, "sq")["config_groups"]["group_0"]
    assert g["weights"]["num_bits"] == 8 and g["input_activations"]["num_bits"] == 8
    assert g["input_activations"]["dynamic"] is True and g["input_activations"]["strategy"] == "token"
    assert artifact_tensors(run_dir, "sq", Q_PROJ)["weight"] == ([128, 128], "I8")


@pytest.mark.parametrize("name", ["gptq-ct", "gptq-fmt", "awq-ct", "awq-fmt", "sq"])
def test_artifact_reloads_without_quantpipe(quant_run: tuple[Path, Results], name: str) -> None:
    run_dir, _ = quant_run
    reloads_to_finite_logits(run_dir / "artifacts" / name)


def test_every_variant_is_scored_benchmarked_and_described(quant_run: tuple[Path, Results]) -> None:
    run_dir, res = quant_run
    assert [v.name for v in res.variants] == [v["name"] for v in VARIANTS]
    base = res.variants[0]
    calib = json.loads((run_dir / "manifest.json").read_text())["calibration"]["sha256"]
    for v in res.variants[1:]:
        q = v.quality
        assert 0 < q.kld_mean < 1 and 0 < q.top1_agreement <= 1, v.name
        assert v.speed.per_batch["1"].prefill_tok_s > 0 and v.speed.kernel != "unknown"
        assert v.timings.quantize_s > 0 and v.memory.quantize_peak_rss_mib > 0
        assert v.artifact.size_bytes < base.artifact.size_bytes
        assert v.meta["calibration_sha256"] == calib  # one calibration set for every method
        readme = (run_dir / "artifacts" / v.name / "README.md").read_text()
        assert "vllm serve PATH" in readme and "pip install" in readme
    kernels = {v.name: v.speed.kernel for v in res.variants}
    assert "TorchAtenLinear" in kernels["gptq-fmt"] and "TorchAtenAwqLinear" in kernels["awq-fmt"]
    assert "activations fake-quantized to int8" in kernels["sq"]
    matrix = (run_dir / "matrix.md").read_text()
    assert "compressed-tensors (pack-quantized)" in matrix and "awq (gemm)" in matrix


@pytest.mark.parametrize("variant,expected", [
    ({"method": "awq", "bits": 3}, r"variants\[1\]\(v\)\.bits: Input should be 4 or 8"),
    ({"method": "gptq", "bits": 3}, r"variants\[1\]\(v\)\.bits: 3-bit GPTQ needs `format: gptq`"),
    ({"method": "gptq", "desc_act": True}, r"variants\[1\]\(v\)\.desc_act: true \(g_idx\) needs `format: gptq`"),
    ({"method": "gptq", "group_size": 100}, r"variants\[1\]\(v\)\.group_size: 100 is not a power of two >= 16 or -1"),
    ({"method": "awq", "format": "awq", "group_size": -1}, r"variants\[1\]\(v\)\.format: the AWQ GEMM format"),
    ({"method": "gptq", "format": "exl2"}, r"variants\[1\]\(v\)\.format: Input should be 'compressed-tensors' or"),
    ({"method": "gptq", "format": "gptq", "quantize_lm_head": True},
     r"variants\[1\]\(v\)\.quantize_lm_head: only the llm-compressor backend"),
    ({"method": "smoothquant", "smoothing_strength": 1.5}, r"variants\[1\]\(v\)\.smoothing_strength: Input should"),
])
def test_bad_params_fail_validation(tiny_model: Path, tmp_path: Path, variant: dict, expected: str) -> None:
    recipe = tiny_recipe(tiny_model, tmp_path, variants=[{"name": "baseline", "method": "baseline"},
                                                         {"name": "v", **variant}])
    with pytest.raises(QuantpipeError, match=expected):
        parse_recipe(recipe)


def test_group_size_must_divide_the_model_shapes(tiny_model: Path, tmp_path: Path, capsys) -> None:
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tiny_model, tmp_path / "run", variants=[
        {"name": "baseline", "method": "baseline"}, {"name": "g", "method": "gptq", "group_size": 256}]))
    want = ("variants[1](g).group_size: 256 does not divide hidden_size (q/k/v/gate/up inputs) = 128, "
            "num_heads*head_dim (o_proj input) = 128; use group_size 32 or 64 or 128")
    assert main(["validate", str(recipe)]) == 2
    assert want in capsys.readouterr().err
    assert main(["run", str(recipe)]) == 2  # before any work: no artifact, not even the baseline
    assert want in capsys.readouterr().err
    assert not (tmp_path / "run" / "artifacts").exists() or not any((tmp_path / "run" / "artifacts").iterdir())


def test_format_picks_the_backend_and_its_install_hint(monkeypatch) -> None:
    import importlib.util

    from quantpipe import methods

    gptq = get_method("gptq")
    ct, classic = gptq.Params(format="compressed-tensors"), gptq.Params(format="gptq")
    assert "gptqmodel" in gptq.versions(classic) and "llmcompressor" in gptq.versions(ct)
    real = importlib.util.find_spec
    monkeypatch.setattr(methods.importlib.util, "find_spec",
                        lambda name, *a: None if name == "gptqmodel" else real(name, *a))
    assert gptq.missing(ct) == []
    with pytest.raises(QuantpipeError, match=r"variants\(g\): method 'gptq' needs gptqmodel: "
                                             r"pip install 'quantpipe\[gptqmodel\]'"):
        gptq.require("g", classic)


def _quantize_killed(job):  # module level: the worker process imports it by name
    import os
    import signal

    os.kill(os.getpid(), signal.SIGKILL)


def _quantize_raises(job):
    raise RuntimeError("simulated library failure\nsecond line")


@pytest.mark.parametrize("fn,expected", [
    (_quantize_killed, r"quantize:v: the quantization process was killed by signal 9 \(SIGKILL; out of memory\?\)"),
    (_quantize_raises, r"quantize:v: method 'm' failed: RuntimeError: simulated library failure \(full log: "),
])
def test_quantize_worker_failures_are_one_line(tmp_path: Path, fn, expected: str) -> None:
    from quantpipe import isolate
    from quantpipe.methods import MethodParams, QuantizeJob

    job = QuantizeJob(variant="v", method="m", params=MethodParams(), out_dir=tmp_path / "out", base_dir=None,
                      model=None, calibration=None)
    with pytest.raises(QuantpipeError, match=expected) as e:
        isolate.run(f"{__name__}:{fn.__name__}", job, tmp_path / "logs", "quantize:v",
                    what="the quantization process", who="method 'm'")
    assert "\n" not in str(e.value)
    if fn is _quantize_raises:
        assert "Traceback" in (tmp_path / "logs" / "quantize-v.log").read_text()


@pytest.mark.parametrize("recipe", sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_shipped_recipes_validate(recipe: Path, capsys) -> None:
    assert main(["validate", str(recipe)]) == 0, capsys.readouterr().err
    assert ": valid (" in capsys.readouterr().out


def test_hub_recipes_cover_the_promised_variants() -> None:
    from quantpipe.recipe import load_recipe

    root = Path(__file__).parent.parent / "recipes"
    methods = {name: {(v.method, v.raw_params.get("format", "compressed-tensors")) for v in load_recipe(
        root / f"{name}.yaml").variants} for name in ("qwen7b-awq", "qwen7b-gptq", "llama3-8b-matrix")}
    assert {("awq", "compressed-tensors"), ("awq", "awq")} <= methods["qwen7b-awq"]
    assert {("gptq", "compressed-tensors"), ("gptq", "gptq")} <= methods["qwen7b-gptq"]
    assert {"int8", "smoothquant", "gptq", "awq"} <= {m for m, _ in methods["llama3-8b-matrix"]}


def test_bfloat16_recipe(tiny_model: Path, tmp_path: Path) -> None:
    """The hub recipes quantize bfloat16 models: every backend keeps the recipe dtype, except the classic AWQ
    format, which is float16 by definition."""
    recipe = tiny_recipe(tiny_model, tmp_path / "run", variants=[
        {"name": "baseline", "method": "baseline"},
        {"name": "gptq-ct", "method": "gptq", "group_size": 64},
        {"name": "gptq-fmt", "method": "gptq", "group_size": 64, "format": "gptq"},
        {"name": "awq-fmt", "method": "awq", "group_size": 64, "format": "awq"},
    ], bench={"enabled": False})
    recipe["model"]["dtype"] = "bfloat16"
    assert main(["run", str(write_recipe(tmp_path / "r.yaml", recipe))]) == 0
    res = rows(read_results(tmp_path / "run"))
    embed = "model.embed_tokens."
    assert artifact_tensors(tmp_path / "run", "baseline", embed)["weight"][1] == "BF16"
    assert artifact_tensors(tmp_path / "run", "gptq-ct", embed)["weight"][1] == "BF16"
    assert artifact_tensors(tmp_path / "run", "gptq-fmt", embed)["weight"][1] == "BF16"
    assert artifact_tensors(tmp_path / "run", "awq-fmt", embed)["weight"][1] == "F16"
    for name in ("gptq-ct", "gptq-fmt", "awq-fmt"):
        assert 0 < res[name].quality.kld_mean < 1, name


def test_methods_command_shows_each_format_backend(monkeypatch, capsys) -> None:
    import importlib.util

    from quantpipe import methods

    real = importlib.util.find_spec
    monkeypatch.setattr(methods.importlib.util, "find_spec",
                        lambda name, *a: None if name == "gptqmodel" else real(name, *a))
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "format compressed-tensors: ready" in out
    assert "format gptq: needs gptqmodel (pip install 'quantpipe[gptqmodel]')" in out
    assert "format awq: needs gptqmodel (pip install 'quantpipe[gptqmodel]')" in out


def test_predicted_weight_bytes_match_every_artifact_exactly(quant_run: tuple[Path, Results]) -> None:
    """`quantpipe plan`'s byte arithmetic against the tensors each backend wrote (untied lm_head, 4- and 8-bit,
    grouped and per-channel, symmetric and asymmetric, g_idx, the AWQ GEMM layout, int8 W8A8)."""
    run_dir, res = quant_run
    for v in res.variants:
        p = v.prediction
        assert p.weights_bytes == p.measured_weights_bytes > 0, v.name
    assert "Memory, predicted (`quantpipe plan`) vs measured" in (run_dir / "matrix.md").read_text()


def test_compiled_engine_runs_each_format_on_its_kernel(quant_run: tuple[Path, Results]) -> None:
    """The bench's compiled engine reads each checkpoint's packed tensors straight onto torch's low-bit kernels
    (CPU builds here) and computes what transformers' own loading of the format computes; formats it has no
    kernel for say so (the bench then runs them eagerly)."""
    import torch

    from quantpipe import runtimes
    from quantpipe.runtimes import compiled

    run_dir, _ = quant_run
    ids = list(range(3, 200))
    expect = {"baseline": "dense", "gptq-ct": "int4 tinygemm", "gptq-head": "int4 tinygemm",
              "gptq-ct8": "int8 weight-only",
              "awq-ct": "int4 tinygemm", "sq": "int8 x int8 dynamic"}
    for name, kernel in expect.items():
        art = run_dir / "artifacts" / name
        fast, ref = compiled.CompiledRuntime(art, "cpu"), runtimes.load(art, "cpu")
        assert kernel in fast.kernel() and not fast.compiled, (name, fast.kernel())
        lf, lr = torch.log_softmax(fast.logits(ids), -1), torch.log_softmax(ref.logits(ids), -1)
        kld = (lr.exp() * (lr - lf)).sum(-1).mean().item()
        # weight-only: the same weights, activations in bfloat16 (tinygemm) vs float32; W8A8: both round the
        # activations to int8 per token, at slightly different ties
        assert kld < (2e-3 if name == "sq" else 2e-4), (name, kld)
        x = torch.tensor([ids[:24], ids[30:54]])
        if name == "gptq-head":  # lm_head's output is bfloat16 (tinygemm): logits within 2 of its steps (0.0039
            # at these values) of each other are a tie there, so each greedy token must be the reference's best
            # up to that resolution, given the tokens before it
            for row, toks in zip(x.tolist(), fast.generate(x, 8).tolist(), strict=True):
                for t in toks:
                    lg = ref.logits(row)[-1]
                    assert lg[t] >= lg.max() - 8e-3, (name, t, lg.max().item(), lg[t].item())
                    row.append(t)
            continue
        assert (fast.generate(x, 8) == ref.generate(x, 8)).float().mean() >= 0.85, name
        if name != "baseline":  # packed: fewer bytes per step than the float baseline's
            assert fast.decode_bytes() < compiled.CompiledRuntime(run_dir / "artifacts" / "baseline",
                                                                "cpu").decode_bytes()
    head, body = (compiled.CompiledRuntime(run_dir / "artifacts" / n, "cpu") for n in ("gptq-head", "gptq-ct"))
    assert head.decode_bytes() < body.decode_bytes()  # lm_head on the int4 kernel too
    assert not isinstance(head.model.get_output_embeddings(), torch.nn.Linear)
    for name, why in {"gptq-fmt": "act-order", "awq-fmt": "quant_method awq"}.items():
        with pytest.raises(compiled.Unsupported, match=why):
            compiled.CompiledRuntime(run_dir / "artifacts" / name, "cpu")
