"""What a finished run writes: results.json (typed, results.py), the matrix (report.py), manifest.json, and
`quantpipe plan`'s predictions beside each row's measured memory."""

from __future__ import annotations

import datetime
from typing import Any

from quantpipe import __version__, bench, lmeval, plan, report, results, runtimes, sources, sysinfo
from quantpipe.cache import digest, explain_os_error, write_json
from quantpipe.errors import QuantpipeError
from quantpipe.methods import get_method
from quantpipe.pipeline.stages import Run


def row_result(r: Run, row: Any) -> dict[str, Any]:
    """One (variant, runtime) row of results.json from its stages' records."""
    v = row.variant
    q = r.results[f"quantize:{v.name}"]
    meta = r.meta(v)
    e = r.results.get(f"eval:{row.name}") or {}
    b = r.results.get(f"bench:{row.name}")
    lm = r.results.get(f"lm-eval:{row.name}")
    measured = e.get("runtime") or (b or {}).get("runtime")
    note = e.get("note") or (b or {}).get("engine_note")
    if b is None and row.benches and r.recipe.bench.enabled:
        note = "; ".join(x for x in (note, bench.no_native_speed(meta, r.device)) if x) or None
    return {
        "name": row.name,
        "variant": v.name,
        "runtime": measured or row.runtime,
        "requested_runtime": row.requested,
        "method": v.method,
        "params": meta.params,
        "format": meta.format,
        "format_detail": meta.format_detail,
        "artifact": {"path": f"artifacts/{v.name}", "size_bytes": q["size_bytes"],
                     "n_files": len(r.cache.files(f"quantize:{v.name}"))},
        "weights": r.recipe.model.weights,
        "quality": e.get("quality"),
        "speed": None if b is None else {k: b.get(k) for k in (
            "runtime", "device", "engine", "engine_note", "threads", "kernel", "per_batch", "copy_bandwidth_gbs",
            "weight_bytes_per_step", "kv_bytes_per_position", "gpu")},
        "eval_kernel": e.get("kernel"),
        "lm_eval": None if lm is None else lm["tasks"],
        "lm_eval_meta": None if lm is None else {**lm["_meta"], "wall_s": lm["wall_s"]},
        "memory": {"peak_rss_mib": None if b is None else b["peak_rss_mib"],
                   "load_rss_mib": None if b is None else b["load_rss_mib"],
                   "peak_gpu_mib": None if b is None else b.get("peak_gpu_mib"),
                   "peak_gpu_reserved_mib": None if b is None else b.get("peak_gpu_reserved_mib"),
                   "gpu_driver_used_mib": None if b is None else b.get("gpu_driver_used_mib"),
                   "quantize_peak_rss_mib": q["quantize_peak_rss_mib"],
                   "quantize_peak_gpu_mib": q.get("quantize_peak_gpu_mib")},
        "timings": {"quantize_s": q["quantize_s"], "eval_s": e.get("wall_s"),
                    "lm_eval_s": None if lm is None else lm["wall_s"],
                    "bench_s": None if b is None else b["wall_s"], "load_s": None if b is None else b["load_s"]},
        "meta": meta.to_dict(),
        "note": note,
        "nodes": {kind: rec["node"]["name"] for kind, rec in (("quantize", q), ("eval", e), ("lm-eval", lm or {}),
                                                              ("bench", b or {})) if rec.get("node")},
    }


def collect(r: Run, recipe_path: str) -> dict[str, Any]:
    recipe = r.recipe
    rows = [row_result(r, row) for row in r.plan.rows if f"quantize:{row.variant.name}" in r.results]
    lmeval.add_recoveries(rows, r.ref_row.name)
    return {
        "schema_version": results.SCHEMA_VERSION,
        "quantpipe_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "recipe": {"name": recipe.name, "path": recipe_path, "sha256": recipe.sha256()},
        "run_dir": str(r.dir),
        "model": sources.describe(recipe.model),
        "model_digest": model_digest(r),
        "weights": recipe.model.weights,
        "reference": r.ref_row.name,
        "eval": {**recipe.eval.model_dump(mode="json"), "n_windows": r.results["eval-tokens"]["n_windows"],
                 "random_ids": bool(r.results["eval-tokens"].get("random_ids")),
                 "tokens_sha256": r.results["eval-tokens"]["tokens_sha256"]},
        "bench": recipe.bench.model_dump(mode="json"),
        "hardware": sysinfo.hardware(),
        "variants": rows,
        "gates": recipe.gates.model_dump(mode="json") if recipe.gates else None,
        "skipped": r.plan.skipped,
        "serve": None if recipe.serve is None else recipe.serve.model_dump(mode="json"),
        "served": [served_result(r, v, e, rows) for v, e in r.served() if f"serve:{v.name}@{e}" in r.results],
        "failed": r.failed,
        "execution": execution(r),
    }


def execution(r: Run) -> dict[str, Any] | None:
    """Where the stages ran (a Ray run): the executor, the cluster and each node that ran a stage."""
    if r.recipe.execution.executor == "local":
        return None
    nodes = sorted({rec["node"]["name"] for rec in r.results.values() if isinstance(rec, dict) and rec.get("node")})
    return {"executor": r.recipe.execution.executor, "address": r.cluster_address, "nodes": nodes}


def served_result(r: Run, variant: Any, engine: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One (variant, engine) record of results.json: the serve stage's record, typed, with `quantpipe plan`'s
    predictions for the same model, dtype and KV-cache budget beside the measured memory."""
    rec = dict(r.results[f"serve:{variant.name}@{engine}"])
    if rec.get("tried") is False:  # not a measurement: what the engine loads, as this quantpipe declares it
        from quantpipe.serving import engines

        rec["reason"] = f"{engines.get_engine(engine).refuses}, not {rec.get('format')}"
    lt = rec.pop("load_test", None) or {}
    mem = {**(rec.pop("memory", None) or {}), "peak_pss_mib": lt.get("peak_pss_mib") or None,
           "kv_cache_tokens": rec.pop("kv_cache_tokens", None), "kv_cache_mib": rec.pop("kv_cache_mib", None)}
    mem.update(served_prediction(r, variant, rec, mem))
    row = next((x for x in rows if x["variant"] == variant.name and x.get("quality")), None)
    keep = set(results.Served.model_fields) - {"levels", "memory", "in_process_kld", "variant"}
    return {**{k: v for k, v in rec.items() if k in keep}, "variant": variant.name, "levels": lt.get("levels", []),
            "memory": {k: v for k, v in mem.items() if v is not None},
            "in_process_kld": None if row is None else row["quality"]["kld_mean"]}


def served_prediction(r: Run, variant: Any, rec: dict[str, Any], mem: dict[str, Any]) -> dict[str, Any]:
    """Weights and KV-cache capacity as `quantpipe plan` computes them for what the engine was given."""
    from transformers import AutoConfig

    spec = r.recipe.serve
    if not rec.get("loads") or spec is None:
        return {}
    try:
        s = plan.shapes(AutoConfig.from_pretrained(r.artifact_dir(r.recipe.reference)))
    except QuantpipeError as e:
        return {"predicted_note": str(e)}
    dtype = rec.get("engine_dtype") or spec.dtype_of(variant.name, r.recipe.model.dtype) or r.recipe.model.dtype
    if dtype not in plan.DTYPE_BYTES:
        return {"predicted_note": f"the engine computes in {dtype}, which plan does not model"}
    storage = get_method(variant.method).storage(variant.params, dtype)
    out: dict[str, Any] = {"predicted_weights_mib": plan.weight_bytes(s, storage)["total"] / plan.MIB}
    if rec.get("engine") == "llama.cpp":  # a KV cache of n_ctx tokens in float16 (llama.cpp's default type)
        # its weights are the GGUF's own types, which plan does not model: the file's tensor bytes instead
        tensors = r.results[f"quantize:{variant.name}"].get("tensor_bytes")
        out["predicted_weights_mib"] = None if tensors is None else tensors / plan.MIB
        if mem.get("kv_cache_tokens"):
            out["predicted_kv_cache_mib"] = mem["kv_cache_tokens"] * plan.kv_bytes_per_token(s, 2) / plan.MIB
            out["predicted_note"] = (f"weights: the GGUF's tensor bytes; KV cache: n_ctx {mem['kv_cache_tokens']} "
                                     "tokens in float16")
        return out
    per_token = plan.kv_bytes_per_token(s, plan.DTYPE_BYTES[dtype])
    if rec.get("device") == "cpu":
        out["predicted_kv_cache_tokens"] = int(spec.kv_cache_gib * 2**30 // per_token)
        out["predicted_kv_cache_mib"] = spec.kv_cache_gib * 1024
        out["predicted_note"] = (f"KV cache of {spec.kv_cache_gib:g} GiB (serve.kv_cache_gib) at {per_token} bytes "
                                 f"per token ({dtype})")
    elif (gib := sysinfo.hardware().get("gpu_memory_gib")) is not None:
        budget = spec.gpu_memory_utilization * gib * 2**30 - out["predicted_weights_mib"] * plan.MIB
        out["predicted_kv_cache_tokens"] = max(0, int(budget // per_token))
        out["predicted_kv_cache_mib"] = max(0.0, budget / plan.MIB)
        out["predicted_note"] = (f"{spec.gpu_memory_utilization:g} of {gib} GiB less the weights, at {per_token} "
                                 f"bytes per token ({dtype}): an upper bound (the engine also keeps activations "
                                 "and CUDA graphs)")
    return out


def model_digest(r: Run) -> str:
    """The base model's identity: sha256 over the baseline artifact's weight files' digests (not its metadata,
    which names library versions)."""
    files = r.cache.files(f"quantize:{r.recipe.reference.name}")
    return digest({k: v for k, v in files.items() if k.endswith((".safetensors", ".gguf", ".bin"))})


GPU_LAYERWISE = ("on a GPU the quantizing library keeps the float model in CPU memory and moves one decoder layer "
                 "at a time onto the GPU, so the prediction's whole-model term is an upper bound")


def add_predictions(r: Run, res: dict[str, Any]) -> None:
    """Put `quantpipe plan`'s predictions beside each row's measured memory (`prediction` per row): artifact
    tensor bytes, the bench process's memory at its largest batch, and calibrated quantization's peak.
    Measured process memory is the peak minus the process's memory before any weights (libraries loaded)."""
    from transformers import AutoConfig

    try:
        s = plan.shapes(AutoConfig.from_pretrained(r.artifact_dir(r.recipe.reference)))
    except QuantpipeError as e:  # a model family plan does not know: the matrix says so
        for row in res["variants"]:
            row["prediction"] = results.Prediction(error=str(e)).model_dump(mode="json", exclude_none=True)
        return
    dtype, cal, spec = r.recipe.model.dtype, r.recipe.calibration, r.recipe.bench.model_dump(mode="json")
    by_name = {row.name: row for row in r.plan.rows}
    for row in res["variants"]:
        variant = by_name[row["name"]].variant
        method, params = get_method(variant.method), variant.params
        storage = method.storage(params, dtype)
        q, b = r.results[f"quantize:{variant.name}"], r.results.get(f"bench:{row['name']}")
        pred: dict[str, Any] = {"weights_bytes": plan.weight_bytes(s, storage)["total"],
                                "measured_weights_bytes": q.get("tensor_bytes")}
        if not storage.exact:
            pred["weights_nominal"] = storage.inexact or ("the backend picks some tensors' types itself: nominal "
                                                          "bytes of the main type")
        if b is not None:
            device = b["device"]
            pred["bench"] = {k: x / plan.MIB for k, x in plan.bench_memory(s, storage, dtype, device, spec).items()}
            cpu_peak = b.get("pass_rss_mib", b["peak_rss_mib"])  # older bench records have no pass_rss_mib
            measured = b.get("peak_gpu_mib") if device == "cuda" else (
                cpu_peak - b["base_rss_mib"] if "base_rss_mib" in b else None)
            pred["measured_bench_mib"] = measured
            pred["bench_measure"] = ("peak CUDA memory allocated" if device == "cuda" else
                                     "peak RSS of a generation at the largest batch after the timed runs - RSS "
                                     "before load" if "pass_rss_mib" in b else "peak RSS - RSS before load")
            # the storage's CPU note is about the format's own runtime (e.g. GPTQModel's kernel repacking)
            if device == "cpu" and storage.cpu_note and b.get("runtime") == runtimes.natural(row["format"]).name:
                pred["bench_not_modelled"] = storage.cpu_note
        need = plan.quantize_memory(s, method, params, dtype, cal.n_samples, cal.seq_len)
        if need is not None:
            pred["quantize"] = {k: x / plan.MIB for k, x in need.items()}
            base = q.get("quantize_base_rss_mib")
            on_gpu = row["meta"].get("quantize_device") == "cuda" and q.get("quantize_peak_gpu_mib") is not None
            pred["measured_quantize_mib"] = q["quantize_peak_gpu_mib"] if on_gpu else (
                None if base is None else q["quantize_peak_rss_mib"] - base)
            pred["quantize_measure"] = "peak CUDA memory allocated" if on_gpu else "peak RSS - RSS before load"
            if storage.quantize_upper_bound:
                pred["quantize_upper_bound"] = storage.quantize_upper_bound
            elif on_gpu:
                pred["quantize_upper_bound"] = GPU_LAYERWISE
        row["prediction"] = results.Prediction(**pred).model_dump(mode="json", exclude_none=True)


def write_outputs(r: Run, res: dict[str, Any], wall_s: float) -> results.Results:
    """Validate the results through the typed model, then write results.json, the matrix and manifest.json."""
    typed = results.parse(res, "results of this run")
    try:
        results.write(r.dir / "results.json", typed)
        report.write(r.dir, typed)
        calib = r.results.get("calibration")
        manifest = {
            "quantpipe_version": __version__,
            "created": typed.created,
            "recipe": typed.recipe.model_dump(mode="json"),
            "recipe_content": r.recipe.model_dump(mode="json"),
            "stage_keys": r.keys,
            "library_versions": sysinfo.versions(),
            "method_versions": {v.name: get_method(v.method).versions(v.params) for v in r.recipe.variants},
            "runtimes": {row.name: row.runtime for row in r.plan.rows},
            "seeds": {"calibration": r.recipe.calibration.seed},
            "hardware": typed.hardware,
            "calibration": None if calib is None else {"shape": calib["shape"], "sha256": calib["sha256"]},
            "eval_tokens_sha256": typed.eval["tokens_sha256"],
            "artifacts": {v.name: r.cache.files(f"quantize:{v.name}") for v in r.recipe.variants},
            "run_wall_s": wall_s,
        }
        write_json(r.dir / "manifest.json", manifest)
    except OSError as e:
        raise explain_os_error(e, f"writing the results into {r.dir}") from None
    return typed
