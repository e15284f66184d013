"""`quantpipe plan`: byte arithmetic checked against hand-computed 7B cases, fit arithmetic, the command line.

The expected numbers below are worked out by hand from the published configs (comments show the sums), not by
calling the code under test."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from quantpipe import archs, cli, plan
from quantpipe.errors import QuantpipeError
from quantpipe.memory import Storage
from quantpipe.methods import get_method, parse_params

ROOT = Path(__file__).resolve().parent.parent


def storage(method: str, dtype: str = "float16", **params: object) -> Storage:
    m = get_method(method)
    return m.storage(m.Params.model_validate(params), dtype)


def test_llama2_7b_fp16_and_params():
    s = plan.shapes(archs.config("llama-2-7b"))
    # per layer: 4 × 4096² (attention) + 3 × 4096 × 11008 (MLP) + 2 × 4096 (norms) = 202,383,360
    # 32 layers + embed 32000 × 4096 + untied lm_head 32000 × 4096 + final norm 4096
    assert s.n_params() == 32 * 202_383_360 + 2 * 131_072_000 + 4096 == 6_738_415_616
    w = plan.weight_bytes(s, storage("baseline"))
    assert w["total"] == 13_476_831_232  # 2 bytes each
    assert w["lm_head"] == w["embeddings"] == 262_144_000


def test_llama2_7b_int4_g128_compressed_tensors():
    s = plan.shapes(archs.config("llama-2-7b"))
    # Linear (out, in): packed int32 out·in/2 bytes + fp16 scales out·(in/128)·2 + weight_shape 16
    qkvo = 4 * (8_388_608 + 262_144 + 16)  # 4096 × 4096
    mlp = 3 * (22_544_384 + 704_512 + 16)  # gate, up: 11008 × 4096; down: 4096 × 11008
    layers = 32 * (qkvo + mlp)
    assert layers == 3_339_193_856
    norms = 32 * 2 * 4096 * 2 + 4096 * 2
    embed_head = 2 * 32000 * 4096 * 2  # embeddings and lm_head stay fp16
    w = plan.weight_bytes(s, storage("gptq", bits=4, group_size=128))
    assert w["total"] == layers + norms + embed_head == 3_864_014_336


def test_llama2_7b_int4_g128_gptq_format():
    s = plan.shapes(archs.config("llama-2-7b"))
    # qweight out·in/2 + qzeros (in/128)·(out/8)·4 + fp16 scales (in/128)·out·2 + g_idx in·4
    q = 8_388_608 + 65_536 + 262_144 + 16_384  # 4096 × 4096
    gate = 22_544_384 + 176_128 + 704_512 + 16_384  # out 11008, in 4096
    down = 22_544_384 + 176_128 + 704_512 + 44_032  # out 4096, in 11008
    total = 32 * (4 * q + 2 * gate + down) + 32 * 2 * 4096 * 2 + 4096 * 2 + 2 * 32000 * 4096 * 2
    w = plan.weight_bytes(s, storage("gptq", bits=4, group_size=128, format="gptq"))
    assert w["total"] == total == 3_893_862_400


def test_qwen2_7b_gqa_bias_fp16_and_int4():
    s = plan.shapes(archs.config("qwen2-7b"))
    assert (s.kv_heads, s.head_dim, s.qkv_bias, s.o_bias) == (4, 128, True, False)
    # per layer: q, o 3584² each; k, v 512 × 3584 each; gate, up, down 18944 × 3584; q/k/v biases 3584 + 512 + 512;
    # two norms 2 × 3584 -> 233,057,792; 28 layers; untied 152064 × 3584 embeddings and lm_head; final norm
    assert s.n_params() == 28 * 233_057_792 + 2 * 544_997_376 + 3584 == 7_615_616_512
    assert plan.weight_bytes(s, storage("baseline", "bfloat16"))["total"] == 15_231_233_024
    # int4 g128 symmetric, compressed-tensors, bf16 scales: per Linear out·in/2 + out·in/64 + 16
    qo = 2 * (6_422_528 + 200_704 + 16)
    kv = 2 * (917_504 + 28_672 + 16)
    mlp = 3 * (33_947_648 + 1_060_864 + 16)
    per_layer = qo + kv + mlp + (3584 + 512 + 512) * 2 + 2 * 3584 * 2
    total = 28 * per_layer + 2 * 544_997_376 * 2 + 3584 * 2
    w = plan.weight_bytes(s, storage("gptq", "bfloat16", bits=4, group_size=128))
    assert w["total"] == total == 5_545_261_120


def test_one_row_tinygemm_copies_on_a_gpu(monkeypatch: pytest.MonkeyPatch):
    """The compiled runtime's one-row tinygemm copies (runtimes.marlin.ONE_ROW_MAX_ELEMENTS = 24 Mi values) in
    the bench prediction of a 4-bit bf16 variant on a GPU: Qwen2-7B's fused q/k/v (4608 x 3584) and o_proj
    (3584 x 3584) get one, the MLP weights (135.8 M and 67.9 M values) do not; none on a CPU, in float32, for
    float variants or with QUANTPIPE_ONE_ROW_TINYGEMM=0."""
    s = plan.shapes(archs.config("qwen2-7b"))
    w4 = storage("gptq", "bfloat16", bits=4, group_size=128)
    bench = {"batch_sizes": [1], "prompt_len": 512, "gen_len": 128}
    # tinygemm: out·in/2 packed + (in/128)·out·2·2 scales and zeros
    qkv = 4608 * 3584 // 2 + 28 * 4608 * 4
    o = 3584 * 3584 // 2 + 28 * 3584 * 4
    assert plan.one_row_copies(s, w4, "bfloat16", "cuda") == 28 * (qkv + o) == 436_731_904  # 416.5 MiB
    assert plan.bench_memory(s, w4, "bfloat16", "cuda", bench)["one_row_copies"] == 436_731_904
    assert "one_row_copies" not in plan.bench_memory(s, w4, "bfloat16", "cpu", bench)
    assert plan.one_row_copies(s, storage("gptq", "float32", bits=4, group_size=128), "float32", "cuda") == 0
    assert plan.one_row_copies(s, storage("baseline", "bfloat16"), "bfloat16", "cuda") == 0
    assert plan.one_row_copies(s, storage("gptq", "bfloat16", bits=8, group_size=128), "bfloat16", "cuda") == 0
    # GPTQModel's format too; per channel runs as groups of 128
    gptq = storage("gptq", "bfloat16", bits=4, group_size=-1, format="gptq")
    assert plan.one_row_copies(s, gptq, "bfloat16", "cuda") == 28 * (qkv + o)
    monkeypatch.setenv("QUANTPIPE_ONE_ROW_TINYGEMM", "0")
    assert plan.one_row_copies(s, w4, "bfloat16", "cuda") == 0


def test_kv_bytes_per_token_counts_kv_heads():
    assert plan.kv_bytes_per_token(plan.shapes(archs.config("llama-2-7b")), 2) == 2 * 32 * 32 * 128 * 2 == 524_288
    qwen = plan.shapes(archs.config("qwen2-7b"))
    assert plan.kv_bytes_per_token(qwen, 2) == 2 * 28 * 4 * 128 * 2 == 57_344  # GQA: 4 KV heads, not 28
    assert plan.kv_bytes_per_token(qwen, 1) == 28_672  # fp8 KV cache


def test_fit_arithmetic_and_a_variant_that_does_not_fit():
    s = plan.shapes(archs.config("llama-2-7b"))
    w = plan.weight_bytes(s, storage("baseline"))["total"]
    f = plan.fit("baseline", "baseline", w, s, 2, 2, plan.GPUS["A100-40GB"], 4096, [1, 8, 32])
    acts = plan.activation_bytes(s, 4096, 32, 2)
    room = int(40960 * 2**20 * 0.9) - w - acts
    assert f.kv_budget == room and f.max_concurrency == room // (524_288 * 4096)
    assert f.max_context[1] == 4096  # capped at max_position_embeddings
    assert f.max_context[32] == room // 524_288 // 32
    tiny_gpu = plan.fit("baseline", "baseline", w, s, 2, 2, plan.GPUS["T4-16GB"], 4096, [1])
    assert tiny_gpu.fits is False and tiny_gpu.max_concurrency == 0  # 12.6 GiB of weights: no room for 4096 KV


@pytest.mark.parametrize("text,expected", [("24GiB", 24 * 2**30), ("80GB", 80 * 10**9), ("81559MiB", 81559 * 2**20),
                                           ("1.5 TiB", int(1.5 * 2**40))])
def test_parse_memory(text, expected):
    assert plan.parse_memory(text) == expected


def test_bad_inputs_are_one_line_errors(capsys):
    for bad in ("24 apples", "GiB"):
        with pytest.raises(QuantpipeError, match="--gpu-memory"):
            plan.parse_memory(bad)
    with pytest.raises(QuantpipeError, match="unknown GPU"):
        plan.gpu_memory("Z80")
    with pytest.raises(QuantpipeError, match="unknown architecture"):
        archs.config("gpt-5")
    recipe = str(ROOT / "recipes" / "qwen7b-awq.yaml")
    for argv, field in ((["--concurrency", "1,x"], "--concurrency"), (["--gpu", "Z80"], "--gpu"),
                        (["--utilization", "1.5"], "--utilization"), (["--arch", "nope.json"], "--arch")):
        assert cli.main(["plan", recipe, *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("quantpipe: error: " + field) and "\n" not in err


def test_plan_command_on_a_hub_recipe_uses_shipped_shapes(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert cli.main(["plan", str(ROOT / "recipes" / "qwen7b-awq.yaml"), "--gpu", "L4-24GB", "--context", "8192",
                     "--concurrency", "1,8,32", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "shipped architecture 'qwen2.5-7b'" in text and "7.616 B params" in text
    p = json.loads(out.read_text())
    base = next(v for v in p["variants"] if v["name"] == "baseline")
    awq = next(v for v in p["variants"] if v["name"] == "awq-w4g128")
    assert base["weights"]["total"] == 15_231_233_024 and base["kv_bytes_per_token"] == 57_344
    assert awq["weights"]["total"] < base["weights"]["total"] / 2.5
    assert awq["max_concurrency"] > base["max_concurrency"] >= 1  # smaller weights leave more KV room
    assert awq["quantize"]["total"] > base["weights"]["total"]  # the float model is loaded to calibrate
    assert base["quantize"] is None  # the baseline does not calibrate
    assert "| awq-w4g128 | awq |" in text and "Calibrated quantization, 256 samples × 512 tokens" in text


def test_plan_marks_what_does_not_fit(capsys):
    recipe = str(ROOT / "recipes" / "llama3-8b-matrix.yaml")
    assert cli.main(["plan", recipe, "--gpu-memory", "12GiB", "--context", "8192"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| baseline ")]
    assert rows and "NO: weights + activations exceed" in rows[0]


def test_calibration_warning_before_a_run(monkeypatch):
    from quantpipe.recipe import load_recipe

    recipe = load_recipe(ROOT / "recipes" / "qwen7b-gptq.yaml")
    config = archs.config("qwen2.5-7b")
    monkeypatch.setattr(plan, "available_memory", lambda: ("available RAM", 8 * 2**30))
    warnings = plan.calibration_warnings(recipe, config)
    assert warnings and all("calibration.n_samples" in w for w in warnings)
    assert len(warnings) == sum(1 for v in recipe.variants if get_method(v.method).calibrates(parse_params(v)))
    monkeypatch.setattr(plan, "available_memory", lambda: ("available RAM", 2**50))
    assert plan.calibration_warnings(recipe, config) == []


def memory_pass_job(arg: tuple[int, bool]) -> dict:
    """In a fresh process (isolate.run): memory freed but kept by glibc, then (when `arg[1]`)
    isolate.start_memory_pass, then 2 x `mib` blocks of 1 MiB of which every other one is freed."""
    import torch

    from quantpipe import isolate

    mib, use_pass = arg
    blocks = [torch.ones(256, 1024) for _ in range(mib)]
    big = torch.ones(8, 2**18)  # 8 MiB: mapped, and freeing it raises glibc's mmap threshold above 1 MiB
    del blocks, big
    before = isolate.peak_rss_mib()
    ok = isolate.start_memory_pass() if use_pass else False
    start = isolate.peak_rss_mib() if use_pass else isolate.rss_mib()
    blocks = [torch.ones(256, 1024) for _ in range(2 * mib)]
    peak = isolate.peak_rss_mib()
    del blocks[::2]  # freed blocks between live ones: no heap top to trim
    return {"ok": ok, "before": before, "start": start, "peak": peak, "half": isolate.rss_mib()}


def test_memory_pass_measures_what_follows(tmp_path: Path) -> None:
    """The bench's untimed memory pass: the high-water mark restarts at the current RSS (the free blocks glibc
    kept are given back), it sees what is allocated later, and blocks freed later leave the process at once,
    where without the pass glibc keeps them resident."""
    from quantpipe import isolate

    mib = 100
    r = isolate.run(f"{__name__}:memory_pass_job", (mib, True), tmp_path, "pass")
    assert r["ok"], "no /proc/self/clear_refs"
    assert r["start"] < r["before"] - 0.8 * mib, r  # restarted lower than the process's earlier peak
    assert r["peak"] - r["start"] >= 1.9 * mib, r  # what came after the restart is in it
    assert r["half"] < r["start"] + 1.2 * mib, r  # the freed half went back to the system
    plain = isolate.run(f"{__name__}:memory_pass_job", (mib, False), tmp_path, "plain")
    assert plain["half"] > plain["start"] + 1.8 * mib, plain  # glibc's default: kept


def test_natural_zero_points_on_a_gpu():
    """The zero points the compiled runtime keeps in natural order for the prompt's dequantization
    (runtimes.marlin.MarlinLinear.zeros_natural: one uint8 per group and output) in the bench prediction of a
    4-bit bf16 variant with zero points on a GPU: Qwen2-7B at group 128 has 7.6 G / 128 of them in its decoder
    Linears (lm_head too where it is quantized); none for symmetric variants, on a CPU or in float32."""
    s = plan.shapes(archs.config("qwen2-7b"))
    bench = {"batch_sizes": [1], "prompt_len": 512, "gen_len": 128}
    # per layer: out · in / 128 over q, k, v, o, gate, up, down
    per_layer = (3584 * 3584 * 2 + 512 * 3584 * 2 + 18944 * 3584 * 3) // 128
    awq = storage("awq", "bfloat16", bits=4, group_size=128, zero_point=True)
    assert plan.natural_zero_points(s, awq, "bfloat16", "cuda") == 28 * per_layer == 50_978_816  # 48.6 MiB
    assert plan.bench_memory(s, awq, "bfloat16", "cuda", bench)["natural_zero_points"] == 50_978_816
    head = storage("awq", "bfloat16", bits=4, group_size=128, zero_point=True, quantize_lm_head=True)
    assert plan.natural_zero_points(s, head, "bfloat16", "cuda") == 50_978_816 + 152064 * 3584 // 128
    assert "natural_zero_points" not in plan.bench_memory(s, awq, "bfloat16", "cpu", bench)
    assert plan.natural_zero_points(s, storage("awq", "float32", bits=4, group_size=128, zero_point=True),
                                   "float32", "cuda") == 0
    assert plan.natural_zero_points(s, storage("gptq", "bfloat16", bits=4, group_size=128), "bfloat16", "cuda") == 0
    # GPTQModel's format: asymmetric GPTQ has zero points, symmetric does not
    assert plan.natural_zero_points(s, storage("gptq", "bfloat16", bits=4, group_size=128, format="gptq", sym=False),
                                   "bfloat16", "cuda") == 50_978_816
    assert plan.natural_zero_points(s, storage("gptq", "bfloat16", bits=4, group_size=128, format="gptq"),
                                   "bfloat16", "cuda") == 0
