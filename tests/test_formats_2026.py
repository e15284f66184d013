"""FP8 (dynamic, static, FP8 KV cache), NVFP4 and MXFP4, bitsandbytes NF4 and LLM.int8(), AutoRound on the tiny
random model: each writes a loadable checkpoint with the expected quantization config and tensor dtypes, reloads
without quantpipe to finite logits, scores in the matrix, and `quantpipe plan` predicts its bytes; bad params fail
before any work."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import artifact_tensors, quant_config, read_results, reloads_to_finite_logits, tiny_recipe, write_recipe

from quantpipe.cli import main
from quantpipe.errors import QuantpipeError
from quantpipe.recipe import parse_recipe
from quantpipe.results import Results

VARIANTS = [
    {"name": "baseline", "method": "baseline"},
    {"name": "fp8-dyn", "method": "fp8"},
    {"name": "fp8-static-kv", "method": "fp8", "scheme": "static", "kv_cache": "fp8"},
    {"name": "nvfp4", "method": "fp4", "scheme": "nvfp4"},
    {"name": "mxfp4-a16", "method": "fp4", "scheme": "mxfp4", "activations": False},
    {"name": "bnb-nf4", "method": "bnb", "scheme": "nf4"},
    {"name": "bnb-int8", "method": "bnb", "scheme": "int8"},
    {"name": "autoround", "method": "autoround", "bits": 4, "group_size": 64, "iters": 4, "batch_size": 2},
]
Q_PROJ = "model.layers.0.self_attn.q_proj."  # tiny model: 128 -> 128
ATTN = "model.layers.0.self_attn."


@pytest.fixture(scope="module")
def fmt_run(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Results]:
    tmp = tmp_path_factory.mktemp("fmt")
    recipe = tiny_recipe(tiny_model, tmp / "run", variants=VARIANTS)
    recipe["bench"]["batch_sizes"] = [1]
    cwd = os.getcwd()
    (tmp / "run").mkdir()
    os.chdir(tmp / "run")
    try:
        assert main(["run", str(write_recipe(tmp / "f.yaml", recipe))]) == 0
    finally:
        os.chdir(cwd)
    return tmp / "run", read_results(tmp / "run")


def test_fp8_checkpoints(fmt_run: tuple[Path, Results]) -> None:
    run_dir, _ = fmt_run
    dyn = quant_config(run_dir, "fp8-dyn")
    g = dyn["config_groups"]["group_0"]
    assert dyn["format"] == "float-quantized" and dyn.get("kv_cache_scheme") is None
    assert (g["weights"]["type"], g["weights"]["num_bits"], g["weights"]["strategy"]) == ("float", 8, "channel")
    assert g["input_activations"]["dynamic"] is True and g["input_activations"]["strategy"] == "token"
    t = artifact_tensors(run_dir, "fp8-dyn", Q_PROJ)
    assert t["weight"] == ([128, 128], "F8_E4M3") and t["weight_scale"] == ([128, 1], "F32")
    assert "input_scale" not in t
    static = quant_config(run_dir, "fp8-static-kv")
    g = static["config_groups"]["group_0"]
    assert g["weights"]["strategy"] == "tensor" and g["input_activations"]["dynamic"] is False
    assert static["kv_cache_scheme"]["num_bits"] == 8 and static["kv_cache_scheme"]["type"] == "float"
    t = artifact_tensors(run_dir, "fp8-static-kv", Q_PROJ)
    assert t["weight_scale"] == ([1], "F32") and t["input_scale"] == ([1], "F32")
    kv = artifact_tensors(run_dir, "fp8-static-kv", ATTN)
    assert kv["k_scale"] == ([1], "F32") and kv["v_scale"] == ([1], "F32")  # calibrated on the calibration set


def test_fp4_checkpoints(fmt_run: tuple[Path, Results]) -> None:
    run_dir, _ = fmt_run
    nv = quant_config(run_dir, "nvfp4")
    assert nv["format"] == "nvfp4-pack-quantized"
    g = nv["config_groups"]["group_0"]
    assert g["weights"]["group_size"] == 16 and g["input_activations"]["num_bits"] == 4
    t = artifact_tensors(run_dir, "nvfp4", Q_PROJ)
    assert t["weight_packed"] == ([128, 64], "U8") and t["weight_scale"] == ([128, 8], "F8_E4M3")
    assert t["weight_global_scale"] == ([1], "F32") and t["input_global_scale"] == ([1], "F32")
    mx = quant_config(run_dir, "mxfp4-a16")
    assert mx["format"] == "mxfp4-pack-quantized"
    assert mx["config_groups"]["group_0"].get("input_activations") is None
    t = artifact_tensors(run_dir, "mxfp4-a16", Q_PROJ)
    assert t["weight_packed"] == ([128, 64], "U8") and t["weight_scale"] == ([128, 4], "U8")


def test_bnb_checkpoints(fmt_run: tuple[Path, Results]) -> None:
    run_dir, _ = fmt_run
    nf4, i8 = quant_config(run_dir, "bnb-nf4"), quant_config(run_dir, "bnb-int8")
    assert nf4["quant_method"] == "bitsandbytes" and nf4["load_in_4bit"] and nf4["bnb_4bit_quant_type"] == "nf4"
    assert nf4["bnb_4bit_use_double_quant"] is True and nf4["bnb_4bit_compute_dtype"] == "float32"
    assert i8["load_in_8bit"] and i8["llm_int8_threshold"] == 6.0
    assert artifact_tensors(run_dir, "bnb-nf4", Q_PROJ)["weight"] == ([128 * 128 // 2, 1], "U8")
    t = artifact_tensors(run_dir, "bnb-int8", Q_PROJ)
    assert t["weight"] == ([128, 128], "I8") and t["SCB"] == ([128], "F32")


def test_autoround_checkpoint(fmt_run: tuple[Path, Results]) -> None:
    run_dir, res = fmt_run
    q = quant_config(run_dir, "autoround")
    assert q["format"] == "pack-quantized"
    w = q["config_groups"]["group_0"]["weights"]
    assert (w["num_bits"], w["group_size"], w["symmetric"]) == (4, 64, True)
    assert artifact_tensors(run_dir, "autoround", Q_PROJ)["weight_packed"] == ([128, 16], "I32")
    row = next(v for v in res.variants if v.name == "autoround")
    assert "auto-round" in row.meta["library"]


@pytest.mark.parametrize("name", ["fp8-dyn", "fp8-static-kv", "nvfp4", "mxfp4-a16", "bnb-nf4", "bnb-int8",
                                  "autoround"])
def test_artifact_reloads_without_quantpipe(fmt_run: tuple[Path, Results], name: str) -> None:
    run_dir, _ = fmt_run
    reloads_to_finite_logits(run_dir / "artifacts" / name)


def test_every_variant_is_scored_and_its_bytes_predicted(fmt_run: tuple[Path, Results]) -> None:
    run_dir, res = fmt_run
    assert [v.name for v in res.variants] == [v["name"] for v in VARIANTS]
    base = res.variants[0]
    calib = json.loads((run_dir / "manifest.json").read_text())["calibration"]["sha256"]
    for v in res.variants[1:]:
        q = v.quality
        assert 0 < q.kld_mean < 1 and 0 < q.top1_agreement <= 1, v.name
        if v.method == "fp4":  # no FP4 tensor cores on a CPU: emulation is not the format's speed
            assert v.speed is None and "FP4 tensor cores (Blackwell) need compute capability 10.0" in v.note, v.note
            assert "on a CPU the format is only emulated" in v.note
        else:
            assert v.speed.per_batch["1"].decode_tok_s > 0, v.name
        assert v.artifact.size_bytes < base.artifact.size_bytes, v.name
        p = v.prediction
        if v.name == "bnb-nf4":  # the quant_state JSON's printed float: a few bytes per Linear
            assert 0 <= p.measured_weights_bytes - p.weights_bytes <= 3 * 7 * 2, (p.weights_bytes,
                                                                                 p.measured_weights_bytes)
            assert "quant_state" in p.weights_nominal
        else:
            assert p.weights_bytes == p.measured_weights_bytes > 0, v.name
    by = {v.name: v for v in res.variants}
    # the calibration set is read only where something calibrates
    assert by["fp8-static-kv"].meta["calibration_sha256"] == calib == by["autoround"].meta["calibration_sha256"]
    assert by["fp8-dyn"].meta.get("calibration_sha256") is None and by["bnb-nf4"].meta.get(
        "calibration_sha256") is None
    # FP8 KV cache: the eval measures it (transformers quantizes K and V with the calibrated scales)
    assert by["fp8-static-kv"].meta["kv_cache"] == "fp8"
    assert "speed not measured" in (run_dir / "matrix.md").read_text()


def test_plan_uses_the_fp8_kv_cache(tiny_model: Path, tmp_path: Path, capsys) -> None:
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tiny_model, tmp_path / "run", variants=[
        {"name": "baseline", "method": "baseline"}, {"name": "f", "method": "fp8"},
        {"name": "fkv", "method": "fp8", "kv_cache": "fp8"}]))
    assert main(["plan", str(recipe), "--gpu-memory", "1GiB", "--json", str(tmp_path / "p.json")]) == 0
    v = {x["name"]: x for x in json.loads((tmp_path / "p.json").read_text())["variants"]}
    assert v["baseline"]["kv_dtype_bytes"] == 4 == v["f"]["kv_dtype_bytes"] and v["fkv"]["kv_dtype_bytes"] == 1
    assert v["fkv"]["kv_bytes_per_token"] * 4 == v["f"]["kv_bytes_per_token"]
    assert v["fkv"]["weights"]["other"] == 2 * 2 * 4  # k_scale and v_scale per layer
    assert v["fkv"]["max_concurrency"]["512"] > v["f"]["max_concurrency"]["512"] if isinstance(
        v["f"]["max_concurrency"], dict) else True


@pytest.mark.parametrize("variant,expected", [
    ({"method": "fp4", "scheme": "nvfp4", "group_size": 32},
     r"variants\[1\]\(v\)\.group_size: nvfp4 groups are 16 values by definition \(got 32\)"),
    ({"method": "fp4", "scheme": "mxfp4", "group_size": 16}, r"variants\[1\]\(v\)\.group_size: mxfp4 groups are 32"),
    ({"method": "fp8", "scheme": "block"}, r"variants\[1\]\(v\)\.scheme: Input should be 'dynamic' or 'static'"),
    ({"method": "fp8", "kv_cache": "int8"}, r"variants\[1\]\(v\)\.kv_cache: Input should be 'fp8'"),
    ({"method": "bnb", "scheme": "int4"}, r"variants\[1\]\(v\)\.scheme: Input should be 'nf4', 'fp4' or 'int8'"),
    ({"method": "bnb", "threshold": -1}, r"variants\[1\]\(v\)\.threshold: Input should be greater than or equal"),
    ({"method": "autoround", "bits": 5}, r"variants\[1\]\(v\)\.bits: Input should be 2, 3, 4 or 8"),
    ({"method": "autoround", "lr": 0}, r"variants\[1\]\(v\)\.lr: Input should be greater than 0"),
    ({"method": "gptq", "kv_cache": "fp8"}, r"variants\[1\]\(v\)\.kv_cache: unknown parameter for method 'gptq'"),
])
def test_bad_params_fail_validation(tiny_model: Path, tmp_path: Path, variant: dict, expected: str) -> None:
    recipe = tiny_recipe(tiny_model, tmp_path, variants=[{"name": "baseline", "method": "baseline"},
                                                         {"name": "v", **variant}])
    with pytest.raises(QuantpipeError, match=expected):
        parse_recipe(recipe)


def test_shapes_the_scheme_cannot_tile_fail_before_any_work(tiny_model: Path, tmp_path: Path, capsys) -> None:
    """A model whose Linear sizes FP8 GEMMs (multiples of 16) or NVFP4 groups (16) cannot tile: `validate` and
    `run` name the field and stop before the baseline is quantized."""
    import shutil

    odd = tmp_path / "odd"
    shutil.copytree(tiny_model, odd)
    cfg = json.loads((odd / "config.json").read_text())
    cfg["intermediate_size"] = 264  # 8 x 33
    (odd / "config.json").write_text(json.dumps(cfg))
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(odd, tmp_path / "run", variants=[
        {"name": "baseline", "method": "baseline"}, {"name": "f", "method": "fp8"},
        {"name": "n", "method": "fp4"}]))
    assert main(["validate", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "variants[1](f).scheme: FP8 (torch._scaled_mm, vLLM's FP8 GEMMs) needs every Linear dimension to be a " \
           "multiple of 16; this model has intermediate_size (down_proj input) = 264" in err
    assert "variants[2](n).scheme: nvfp4 groups 16 input columns, which do not tile intermediate_size" in err
    assert main(["run", str(recipe)]) == 2
    assert not (tmp_path / "run" / "artifacts").exists() or not any((tmp_path / "run" / "artifacts").iterdir())


def test_compiled_engine_runs_fp8_on_scaled_mm(fmt_run: tuple[Path, Results]) -> None:
    """The compiled engine reads the FP8 checkpoint's tensors onto `torch._scaled_mm` (its CPU build here) and
    computes what transformers' own loading computes; an FP8 KV cache and FP4 weights have no kernel there and
    say why (auto then measures them in transformers)."""
    import torch

    from quantpipe import runtimes
    from quantpipe.runtimes import compiled, kernels

    run_dir, _ = fmt_run
    ids = list(range(3, 200))
    art = run_dir / "artifacts" / "fp8-dyn"
    fast, ref = compiled.CompiledRuntime(art, "cpu"), runtimes.load(art, "cpu")
    assert "fp8 e4m3 x fp8 (_scaled_mm)" in fast.kernel() and not fast.compiled
    lf, lr = torch.log_softmax(fast.logits(ids), -1), torch.log_softmax(ref.logits(ids), -1)
    kld = (lr.exp() * (lr - lf)).sum(-1).mean().item()
    assert kld < 2e-4, kld  # the same FP8 rounding of weights and activations; bfloat16 kernel output here
    greedy = fast.generate(torch.tensor([ids[:16]]), 8)
    assert greedy.shape == (1, 8)
    with pytest.raises(kernels.Unsupported, match="quantized KV cache"):
        kernels.load_model(run_dir / "artifacts" / "fp8-static-kv", "cpu")
    with pytest.raises(kernels.Unsupported, match="FP4 weights"):
        kernels.load_model(run_dir / "artifacts" / "nvfp4", "cpu")


@pytest.mark.parametrize("static", [False, True])
def test_fp8_linear_equals_the_dequantized_matmul(static: bool) -> None:
    """Fp8Linear = (x quantized to FP8 with its scale) @ (FP8 weight x its scale)^T, per token or per tensor."""
    import torch

    from quantpipe.runtimes.kernels import FP8_MAX, Fp8Linear

    torch.manual_seed(0)
    w = torch.randn(64, 128)
    ws = w.abs().amax(1, keepdim=True) / FP8_MAX
    wq = (w / ws).to(torch.float8_e4m3fn)
    x = torch.randn(5, 128)
    xs = (x.abs().amax() / FP8_MAX).reshape(1) if static else None
    lin = Fp8Linear(wq, ws, xs, None, torch.float32)
    sx = xs if static else x.abs().amax(-1, keepdim=True) / FP8_MAX
    xq = (x / sx).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float() * sx
    want = xq @ (wq.float() * ws).t()
    got = lin(x)
    assert got.dtype == torch.float32 and torch.allclose(got, want, rtol=1e-2, atol=1e-2)
    assert (got - want).abs().max() < 0.02 * want.abs().max()


def test_fp8_linear_without_cpu_rowwise_kernel(monkeypatch) -> None:
    """Where the CPU `_scaled_mm` takes per-tensor scales only (torch 2.11), Fp8Linear computes the same product
    unfused."""
    import torch

    from quantpipe.runtimes import kernels

    torch.manual_seed(1)
    w = torch.randn(32, 64)
    ws = w.abs().amax(1, keepdim=True) / kernels.FP8_MAX
    lin = kernels.Fp8Linear((w / ws).to(torch.float8_e4m3fn), ws, None, None, torch.float32)
    x = torch.randn(3, 64)
    fused = lin(x)
    monkeypatch.setattr(kernels, "_CPU_ROWWISE", [False])
    assert torch.allclose(lin(x), fused, rtol=1e-2, atol=1e-2)


def test_select_counts_the_fp8_kv_cache_of_the_variant_that_has_one(fmt_run: tuple[Path, Results]) -> None:
    """`quantpipe select` (KV dtype auto): a variant quantized with `kv_cache: fp8` holds twice the bf16 cache's
    tokens; the FP4 rows, without a speed on this CPU, say why they are left out."""
    run_dir, _ = fmt_run
    out = run_dir.parent / "sel.json"
    assert main(["select", str(run_dir), "--gpu-memory", "1GiB", "--context", "256", "--json", str(out)]) == 0
    sel = json.loads(out.read_text())
    rows = {r["variant"]: r for r in sel["gpus"][0]["variants"]}
    assert rows["fp8-static-kv"]["kv_cache"] * 2 == rows["fp8-dyn"]["kv_cache"]
    assert rows["fp8-static-kv"]["max_concurrency"] > 1.9 * rows["fp8-dyn"]["max_concurrency"]
    assert "fp8 for the variants quantized with kv_cache: fp8" in sel["kv_dtype"]
    assert rows["nvfp4"]["status"] == "excluded" and "FP4 tensor cores" in rows["nvfp4"]["reason"]


def test_gate_skips_the_bench_gates_of_rows_without_a_native_speed(fmt_run: tuple[Path, Results], capsys) -> None:
    """An FP4 row has no speed on a CPU by design: its bench gates are SKIP (not an error, not a pass) in the
    table and in JUnit; every other check runs."""
    import xml.etree.ElementTree as ET

    run_dir, _ = fmt_run
    gates = run_dir.parent / "gates.yaml"
    gates.write_text("gates:\n  all: {max_kld: 0.5, max_peak_memory_mib: 100000}\n")
    junit = run_dir.parent / "gate.xml"
    assert main(["gate", str(run_dir), "--gates", str(gates), "--junit", str(junit)]) == 0
    out = capsys.readouterr().out
    skipped = [line.split(" | ")[:2] for line in out.splitlines() if "| SKIP |" in line]
    assert skipped == [["| nvfp4", "max_peak_memory_mib"], ["| mxfp4-a16", "max_peak_memory_mib"]], out
    assert out.count("| PASS |") == 7 + 5 and "2 skip" in out
    suite = ET.parse(junit).getroot().find("testsuite")
    assert suite.get("skipped") == "2" and suite.get("failures") == "0" and suite.get("errors") == "0"
