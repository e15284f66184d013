"""What the recipe's `serve:` stage records for one (variant, engine): does the engine load the artifact (its
version, the quantization and kernel it reports, or its own reason for refusing), the served quality against the
baseline's full log-probs, whether its greedy completions match quantpipe's own runtime, GuideLLM's latency and
throughput at each concurrency, and the server's memory (and vLLM's KV-cache capacity).

A record with `complete: false` (the server never became healthy, crashed during the load test, or GuideLLM
failed) is kept in the matrix but not cached: a re-run tries again. A refusal is an answer and is cached.
"""

from __future__ import annotations

import secrets
import time
from pathlib import Path
from typing import Any

import torch

from quantpipe import evaluate, runtimes
from quantpipe.errors import QuantpipeError, first_line
from quantpipe.serving import loadtest
from quantpipe.serving.client import Client, text_vocab
from quantpipe.serving.engines import ENGINES, GUIDELLM, Engine, Launch
from quantpipe.serving.server import EngineRefused, EngineTimeout, Server, pick_port

VERSION = 3  # bumped when what a serve stage records changes (cached records are then redone)


def served_quality(client: Client, engine: Engine, windows: list[list[int]], ref_dir: Path, tokenizer: Any,
                   k: int) -> dict[str, Any]:
    """KL divergence (top-k estimate), top-1 agreement and (where the engine returns the scored token's own
    log-prob) perplexity of the served model on the eval windows, against the reference's full log-probs."""
    klds, agree, nlls, dropped = [], [], [], 0
    vocab = text_vocab(tokenizer) if engine.scores == "text" else None
    for i, ids in enumerate(windows):
        if vocab is None:
            sc = client.topk_ids(ids, k)
        else:
            sc = client.topk_text(ids, k, tokenizer, vocab)
        ref = evaluate.reference_logprobs(ref_dir, i)[torch.tensor(sc.positions, dtype=torch.long)]
        top = torch.tensor(sc.ids, dtype=torch.long)
        klds.append(evaluate.kl_topk(ref, top, torch.tensor(sc.logprobs)))
        agree.append((ref.argmax(-1) == top[:, 0]).float())
        if sc.target is not None:
            nlls.append(-torch.tensor(sc.target, dtype=torch.float64))
        dropped += sc.unmapped
    kld, top1 = torch.cat(klds), torch.cat(agree)
    kld_mean, kld_se = evaluate.mean_se(kld)
    out: dict[str, Any] = {"kld_mean": kld_mean, "kld_se": kld_se, "top1_agreement": top1.mean().item(),
                           "n_positions": int(kld.numel()), "positions_dropped": dropped,
                           "kld_estimator": f"top-{k} + rest bucket (a lower bound)"}
    if nlls:
        out["perplexity"] = evaluate.perplexity(torch.cat(nlls))
    else:
        out["note"] = ("llama-cpp-python's server returns each position's top log-probs by text, one position late, "
                       "without the scored token's own log-prob: no served perplexity; position 0 of each window "
                       "is not scored")
    return out


def in_process(artifact_dir: Path, device: str, prompts: list[list[int]], n: int, windows: list[list[int]],
               ref_dir: Path | None, k: int) -> tuple[list[list[int]], float | None]:
    """quantpipe's own runtime (the format's natural one) on what the server is asked: the greedy continuation
    of each prompt, and the KL divergence of the windows with the served figure's estimator (top k + rest),
    so that served and in-process KLD differ only by the engine."""
    rt = runtimes.load(artifact_dir, device, "natural")
    try:
        greedy = [rt.generate(torch.tensor([p]), n)[0].tolist() for p in prompts] if n else []
        kld = None
        if ref_dir is not None and windows:
            klds = []
            for i, ids in enumerate(windows):
                top = rt.topk(ids, k)
                klds.append(evaluate.kl_topk(evaluate.reference_logprobs(ref_dir, i), top.ids, top.logprobs))
            kld = torch.cat(klds).double().mean().item()
        return greedy, kld
    finally:
        rt.close()


def greedy_match(client: Client, engine: Engine, prompts: list[list[int]], own: list[list[int]], n: int,
                 tokenizer: Any) -> dict[str, Any]:
    """How many of the served greedy tokens equal quantpipe's own, as a common prefix per prompt."""
    prefix, compared, exact = 0, 0, 0
    for p, mine in zip(prompts, own, strict=True):
        theirs = client.greedy(p, n, by_text=tokenizer if engine.scores == "text" else None)
        m = min(len(theirs), len(mine))
        same = next((i for i in range(m) if theirs[i] != mine[i]), m)
        prefix += same
        compared += m
        exact += int(same == m and m > 0)
    return {"prompts": len(prompts), "tokens": n, "matching_prefix_share": prefix / compared if compared else None,
            "identical_prompts": exact}


def measure(engine_name: str, artifact_dir: Path, fmt: str, spec: dict[str, Any], device: str,
            windows: list[list[int]], ref_dir: Path | None, tokenizer_dir: Path, work: Path, model_name: str,
            dtype: str | None, file: str | None = None, log: Any = print) -> dict[str, Any]:
    """Serve one artifact in one engine and measure it (the module docstring says what)."""
    engine = ENGINES[engine_name]
    rec: dict[str, Any] = {"engine": engine.name, "device": device, "format": fmt, "complete": True}
    if fmt not in engine.formats:
        return {**rec, "loads": False, "tried": False, "reason": f"{engine.refuses}, not {fmt}"}
    env = engine.env(device)
    env.require(f"serve.engines: {engine.name}")
    rec["engine_version"] = env.version()
    port, port_note = pick_port(spec["host"], spec.get("port"))
    launch = Launch(artifact_dir=artifact_dir, format=fmt, model_name=model_name, host=spec["host"], port=port,
                    file=file, tokenizer_dir=tokenizer_dir, api_key=secrets.token_hex(16), dtype=dtype,
                    max_model_len=spec["max_model_len"], kv_cache_gib=spec["kv_cache_gib"],
                    gpu_memory_utilization=spec["gpu_memory_utilization"], threads=spec.get("threads"),
                    device=device, extra_args=tuple(spec.get("engine_args", {}).get(engine.name, [])))
    server = Server(engine, env, launch, work / f"{engine.name}.log", spec["startup_timeout_s"])
    rec["command"] = server.command_line()
    if engine.name == "vllm":  # llama.cpp computes in the GGUF's own types
        rec["dtype"] = dtype or "auto"
    if port_note:
        rec["port_note"] = port_note
    own = None
    prompts = [w[: spec["prompt_tokens"]] for w in windows[: spec["greedy_prompts"]]] if windows else []
    k = min(spec["topk"], engine.max_topk)
    if prompts and ref_dir is not None:
        try:
            own, rec["in_process_kld_topk"] = in_process(artifact_dir, "cuda" if device == "cuda" else "cpu",
                                                         prompts, spec["greedy_tokens"], windows, ref_dir, k)
        except QuantpipeError as e:
            rec["greedy"] = {"error": f"quantpipe's own runtime: {e}"}
    try:
        server.start()
    except EngineRefused as e:
        return {**rec, "loads": False, "tried": True, "reason": e.reason, "log_tail": e.tail,
                **_log_fields(server)}
    except EngineTimeout as e:
        return {**rec, "loads": False, "tried": True, "complete": False, "error": str(e), "log_tail": e.tail}
    try:
        rec.update(loads=True, tried=True, start_s=server.start_s, **_log_fields(server))
        rec["memory"] = {"pss_loaded_mib": server.pss_mib(), "gpu_mib": server.gpu_mib()}
        client = Client(server.url, model_name, launch.api_key)
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tokenizer_dir)
        if ref_dir is not None and spec["quality"]:
            t = time.perf_counter()
            try:
                rec["quality"] = served_quality(client, engine, windows, ref_dir, tok, k)
                rec["quality"]["wall_s"] = time.perf_counter() - t
            except QuantpipeError as e:
                rec["quality"] = {"error": str(e)}
        if own:
            try:
                rec["greedy"] = greedy_match(client, engine, prompts, own, spec["greedy_tokens"], tok)
            except QuantpipeError as e:
                rec["greedy"] = {"error": str(e)}
        client.close()
        if not server.alive():  # it loaded, then died on the first requests: no load test to run
            return {**rec, "complete": False, "error": _died(server, "on the first requests"),
                    "log_tail": server.log_tail()}
        rec["load_test"] = _load_test(server, spec, tokenizer_dir, work, model_name, launch.api_key, log)
        if not rec["load_test"].get("ok"):
            rec["complete"] = False
        if not server.alive():
            rec.update(complete=False, error=_died(server, "during the load test"), log_tail=server.log_tail())
    finally:
        server.stop()
    return rec


def _died(server: Server, when: str) -> str:
    return f"the engine died {when}: {server.report().refusal or server.log_tail(1)}"


def _log_fields(server: Server) -> dict[str, Any]:
    rep = server.report()
    return {k: v for k, v in {"engine_reported_version": rep.version, "quantization": rep.quantization,
                              "kernel": rep.kernel, "kv_cache_tokens": rep.kv_cache_tokens,
                              "kv_cache_mib": rep.kv_cache_mib, "engine_dtype": rep.dtype}.items() if v is not None}


def _run_level(server: Server, python: Path, doc: dict[str, Any], work: Path, timeout_s: float
               ) -> tuple[dict[str, Any] | None, str, float]:
    """One GuideLLM run (loadtest.run) and the server's peak PSS meanwhile."""
    with server.sample_memory() as mem:
        report, tail = loadtest.run(python, doc, work, timeout_s)
    return report, tail, mem["peak_pss_mib"]


def _load_test(server: Server, spec: dict[str, Any], tokenizer_dir: Path, work: Path, model: str, api_key: str,
               log: Any) -> dict[str, Any]:
    python = GUIDELLM.require("serve (the load test)")
    levels_out: list[dict[str, Any]] = []
    peak = 0.0
    for c in spec["concurrency"]:  # one GuideLLM run per level: a crash ends that level, not the whole sweep
        doc = loadtest.scenario(server.url, model, tokenizer_dir, [c], spec["requests"], spec["prompt_tokens"],
                                spec["output_tokens"], spec["max_seconds"], spec["seed"],
                                work / f"guidellm-c{c}.json", api_key, server.engine.health)
        timeout_s = spec["max_seconds"] * 2 + 120
        report, tail, pss = _run_level(server, python, doc, work / f"guidellm-c{c}", timeout_s)
        retried = None
        if report is None and server.alive() and loadtest.NO_REQUEST_MEASURED in tail:
            # GuideLLM ended the level before it measured any request (seen once on a loaded 2-core machine,
            # the server healthy and idle): nothing was measured, so the level runs once more, and says so
            retried = tail.splitlines()[-1]
            log(f"  serve: concurrency {c}: GuideLLM measured no request ({retried}); running the level again")
            report, tail, again = _run_level(server, python, doc, work / f"guidellm-c{c}", timeout_s)
            pss = max(pss, again)
        peak = max(peak, pss)
        if report is None or not server.alive():
            why = tail if report is None else "the server died during this level"
            levels_out.append({"concurrency": c, "error": why, "log_tail": server.log_tail()})
            log(f"  serve: concurrency {c} failed: {first_line(QuantpipeError(why))}")
            if not server.alive():
                break
            continue
        lv = loadtest.levels(report)
        if retried is not None:
            lv = [{**x, "retried": retried} for x in lv]
        levels_out += lv or [{"concurrency": c, "error": "GuideLLM reported no benchmark"}]
    ok = all("error" not in lv for lv in levels_out) and len(levels_out) == len(spec["concurrency"])
    return {"ok": ok, "levels": levels_out, "peak_pss_mib": peak, "tool": GUIDELLM.version()}
