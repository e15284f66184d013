"""The load test: GuideLLM (its own environment, `quantpipe setup-engine guidellm`) against a served endpoint.

One GuideLLM run per (variant, engine): a scenario file with the `concurrent` profile, one benchmark per
concurrency level, each bounded by a request count and a time limit, synthetic prompts of a fixed token length
built from the baseline tokenizer (offline), a fixed seed, and the API key when the server has one. From its JSON
report each level keeps TTFT, inter-token latency and end-to-end latency p50/p95/p99, output tokens/s and
requests/s over the level's duration, and the failed requests. quantpipe generates no load itself.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

PERCENTILES = ("p50", "p95", "p99")
# GuideLLM's error when a level ended before any request was measured (no request sent or finished)
NO_REQUEST_MEASURED = "No measurement start or end times available"


def scenario(url: str, model: str, tokenizer_dir: Path, concurrency: list[int], requests: int, prompt_tokens: int,
             output_tokens: int, max_seconds: float, seed: int, out_json: Path, api_key: str | None,
             health: str = "/health") -> dict:
    # GuideLLM checks the server at /health first; llama-cpp-python's server has none, its /v1/models answers
    backend: dict[str, Any] = {"kind": "openai_http", "target": url, "request_format": "/v1/completions",
                               "model": model, "api_routes": {"/health": health.lstrip("/")}}
    if api_key:
        backend["api_key"] = api_key
    return {
        "spec": {
            "backend": backend,
            "profile": {"kind": "concurrent"},
            "tokenizer": {"kind": "huggingface_auto", "model": str(tokenizer_dir)},
            "data": [{"kind": "synthetic_text", "prompt_tokens": prompt_tokens, "output_tokens": output_tokens}],
            "constraints": [{"kind": "max_requests", "count": requests},
                            {"kind": "max_duration", "seconds": max_seconds}],
            "seed": {"kind": "static", "value": seed},
            "outputs": [{"kind": "json", "path": str(out_json)}],
        },
        "benchmarks": [{"profile.streams": c} for c in concurrency],
    }


def run(python: Path, scenario_doc: dict, work: Path, timeout_s: float) -> tuple[dict[str, Any] | None, str]:
    """Run GuideLLM; returns (its JSON report or None, the last lines of its output)."""
    work.mkdir(parents=True, exist_ok=True)
    path = work / "scenario.json"
    path.write_text(json.dumps(scenario_doc, indent=1))
    out_json = Path(scenario_doc["spec"]["outputs"][0]["path"])
    out_json.unlink(missing_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    argv = [str(python.parent / "guidellm"), "run", "-c", str(path), "--disable-progress"]
    with open(work / "guidellm.log", "wb") as log:
        try:
            p = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=timeout_s, cwd=work)
            rc: int | str = p.returncode
        except subprocess.TimeoutExpired:
            rc = f"timed out after {timeout_s:.0f} s"
    tail = "\n".join(ln for ln in (work / "guidellm.log").read_text(errors="replace").splitlines()[-12:] if ln.strip())
    if rc != 0 or not out_json.is_file():
        return None, f"guidellm exited with {rc}: {tail.splitlines()[-1] if tail else ''}"
    return json.loads(out_json.read_text()), tail


def levels(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One record per concurrency level from GuideLLM's JSON report."""
    out = []
    for b in report.get("benchmarks") or []:
        m = b["metrics"]
        strategy = b["config"]["strategy"]
        totals = m["request_totals"]
        dur = float(b.get("duration") or 0) or None
        tokens = m["output_token_count"]["successful"].get("total_sum") or 0

        def pct(name: str, scale: float = 1.0, m: dict[str, Any] = m) -> dict[str, float | None]:
            s = m[name]["successful"]
            p = s.get("percentiles") or {}
            return {q: (None if p.get(q) is None else p[q] * scale) for q in PERCENTILES} | {
                "mean": None if s.get("mean") is None else s["mean"] * scale}

        out.append({
            "concurrency": int(strategy.get("streams") or strategy.get("max_concurrency")),
            "requests": {k: int(totals.get(k) or 0) for k in ("successful", "errored", "incomplete", "total")},
            "duration_s": dur,
            "ttft_ms": pct("time_to_first_token_ms"),
            "itl_ms": pct("inter_token_latency_ms"),
            "e2e_ms": pct("request_latency", 1000.0),
            "output_tok_s": tokens / dur if dur else None,
            "requests_per_s": (totals.get("successful") or 0) / dur if dur else None,
            "failed": int(totals.get("errored") or 0),  # incomplete: still running when the time limit ended it
        })
    return out

