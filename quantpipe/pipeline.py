"""`quantpipe run`: the stages of a run, their cache keys, and the files they leave in the run directory.

Stages, in order: the baseline artifact; the eval token ids; the calibration ids (only when a method uses
them); one quantize stage per variant; one eval stage per variant (the baseline's writes the reference
log-probs); one lm-eval stage per variant when the recipe asks for tasks; one bench stage per variant (own
process); then results.json, manifest.json and the matrix.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from quantpipe import (
    __version__,
    bench,
    calibration,
    evaluate,
    lmeval,
    plan,
    report,
    runtimes,
    sources,
    sysinfo,
    worker,
)
from quantpipe.cache import (
    StageCache,
    atomic_dir,
    clean_stale_temps,
    digest,
    dir_size,
    explain_os_error,
    file_sha256,
    run_lock,
    write_json,
)
from quantpipe.errors import QuantpipeError
from quantpipe.methods import QuantizeJob, check_against_model, get_method, parse_params
from quantpipe.recipe import Recipe, VariantSpec


class Run:
    """State of one run: the recipe, the run dir, the cache and the keys of the stages done so far."""

    def __init__(self, recipe: Recipe, run_dir: Path, force: bool = False) -> None:
        self.recipe, self.dir, self.force = recipe, run_dir, force
        self.cache = StageCache(run_dir)
        self.state = run_dir / ".quantpipe"
        self.keys: dict[str, str] = {}
        self.results: dict[str, dict[str, Any]] = {}
        self.uses_calibration = any(get_method(v.method).calibrates(parse_params(v)) for v in recipe.variants)
        # eval-tokens, calibration (if any method uses it), quantize + eval (+ lm-eval) + bench per variant
        per_variant = 3 + int(recipe.eval.lm_eval is not None)
        self.n_stages = 1 + int(self.uses_calibration) + per_variant * len(recipe.variants)
        self.step = 0

    def stage(self, name: str, payload: dict[str, Any], compute: Any, artifact: Path | None = None) -> dict:
        """Return the cached result of a stage if its content key matches, else compute and record it."""
        self.step += 1
        key = digest({"stage": name.split(":")[0], "payload": payload})
        self.keys[name] = key
        label = f"[{self.step}/{self.n_stages}] {name}"
        cached = None if self.force else self.cache.get(name, key, artifact)
        if cached is not None:
            print(f"{label}: cached")
            self.results[name] = cached
            return cached
        print(f"{label} ...", flush=True)
        t = time.perf_counter()
        try:
            result = compute()
        except OSError as e:
            raise explain_os_error(e, f"running stage {name}") from None
        result["wall_s"] = time.perf_counter() - t
        self.cache.put(name, key, result, artifact)
        print(f"{label}: done in {result['wall_s']:.1f} s", flush=True)
        self.results[name] = result
        return result

    # -- stages ---------------------------------------------------------------------------------------------
    def artifact_dir(self, variant: VariantSpec) -> Path:
        return self.dir / "artifacts" / variant.name

    def quantize(self, variant: VariantSpec, calib: torch.Tensor | None) -> dict[str, Any]:
        method = get_method(variant.method)
        params = parse_params(variant)
        method.require(variant.name, params)
        ref = self.recipe.reference
        is_ref = variant.name == ref.name
        payload = {"variant": variant.model_dump(mode="json"), "versions": sysinfo.versions(),
                   "method_versions": method.versions(params), "method_revision": method.version}
        if is_ref:
            payload["model"] = self.recipe.model.model_dump(mode="json")
        else:
            payload["base"] = self.keys[f"quantize:{ref.name}"]
            if method.calibrates(params):
                payload["calibration"] = self.keys["calibration"]
        out = self.artifact_dir(variant)

        def compute() -> dict[str, Any]:
            with atomic_dir(out) as tmp:
                job = QuantizeJob(variant=variant.name, params=params, out_dir=tmp,
                                  base_dir=None if is_ref else self.artifact_dir(ref), model=self.recipe.model,
                                  calibration=calib if method.calibrates(params) else None)
                done = worker.quantize_in_subprocess(method, job, self.state / "logs")
                meta = {"quantpipe_version": __version__, "variant": variant.name, "method": method.name,
                        "params": params.model_dump(mode="json"), "runtime": method.runtime,
                        "library_versions": method.versions(params), **done["meta"]}
                if method.calibrates(params):
                    meta["calibration_sha256"] = self.results["calibration"]["sha256"]
                if self.recipe.model.weights == "random":  # every artifact says so, not only the baseline
                    meta.update(weights="random", arch=self.recipe.model.arch, seed=self.recipe.model.seed)
                (tmp / runtimes.META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
                (tmp / "README.md").write_text(artifact_readme(meta))
            return {"meta": meta, "quantize_s": done["quantize_s"], "quantize_peak_rss_mib": done["peak_rss_mib"],
                    "quantize_base_rss_mib": done["base_rss_mib"], "quantize_peak_gpu_mib": done.get("peak_gpu_mib"),
                    "size_bytes": dir_size(out),
                    "tensor_bytes": plan.tensor_bytes(out)}

        return self.stage(f"quantize:{variant.name}", payload, compute, artifact=out)

    def eval_tokens(self) -> list[list[int]]:
        """The eval windows (the bench's prompts are cut from them too). A random-weight model has no tokenizer:
        its windows are seeded random ids of its vocabulary (prompts for the bench only; it is not evaluated)."""
        spec = self.recipe.eval
        if self.recipe.model.weights == "random":
            return self._random_tokens()
        path = calibration.data_path("evals", "eval-text.txt") if spec.text == "bundled" else Path(spec.text)
        text = path.read_text(encoding="utf-8")
        # lm-eval's settings are not part of the windows: changing them leaves every window stage cached
        payload = {"eval": spec.model_dump(mode="json", exclude={"lm_eval"}),
                   "text_sha256": hashlib.sha256(text.encode()).hexdigest(),
                   "base": self.keys[f"quantize:{self.recipe.reference.name}"]}

        def compute() -> dict[str, Any]:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(self.artifact_dir(self.recipe.reference))
            ids = tok(text, add_special_tokens=False).input_ids
            windows = evaluate.make_windows(ids, spec.window, spec.max_tokens)
            return {"n_windows": len(windows), "n_text_tokens": len(ids), "tokens_sha256": digest(windows),
                    "windows": windows}

        return self.stage("eval-tokens", payload, compute)["windows"]

    def _random_tokens(self) -> list[list[int]]:
        spec = self.recipe.eval
        payload = {"random_ids": {"window": spec.window, "max_tokens": spec.max_tokens, "seed": self.recipe.model.seed},
                   "base": self.keys[f"quantize:{self.recipe.reference.name}"]}

        def compute() -> dict[str, Any]:
            ids = random_ids(self.vocab_size(), spec.max_tokens, self.recipe.model.seed)
            windows = evaluate.make_windows(ids, spec.window, spec.max_tokens)
            return {"n_windows": len(windows), "n_text_tokens": len(ids), "tokens_sha256": digest(windows),
                    "windows": windows, "random_ids": True}

        return self.stage("eval-tokens", payload, compute)["windows"]

    def vocab_size(self) -> int:
        from transformers import AutoConfig

        return int(AutoConfig.from_pretrained(self.artifact_dir(self.recipe.reference)).vocab_size)

    def calibration_ids(self) -> torch.Tensor:
        spec = self.recipe.calibration
        store = self.state / "calibration"
        payload = {"calibration": spec.model_dump(mode="json"),
                   "base": self.keys[f"quantize:{self.recipe.reference.name}"]}
        random = self.recipe.model.weights == "random"
        if random:  # no tokenizer and no text worth calibrating on: seeded random ids of the vocabulary
            payload = {"random_ids": {"n_samples": spec.n_samples, "seq_len": spec.seq_len, "seed": spec.seed},
                       "base": payload["base"]}
        elif spec.source == "bundled":
            payload["bundled_sha256"] = file_sha256(calibration.data_path("calibration", "default.txt"))
        for f in spec.files if spec.source == "files" and not random else []:
            payload.setdefault("files_sha256", {})[f] = file_sha256(Path(f)) if Path(f).is_file() else None

        def compute() -> dict[str, Any]:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            base = self.artifact_dir(self.recipe.reference)
            if random:
                ids = torch.tensor(random_ids(self.vocab_size(), spec.n_samples * spec.seq_len, spec.seed))
                ids = ids.view(spec.n_samples, spec.seq_len)
            else:
                tok = AutoTokenizer.from_pretrained(base)
                model = AutoModelForCausalLM.from_pretrained(base) if spec.source == "generated" else None
                ids = calibration.build(spec, tok, calibration.documents(spec, model, tok))
            with atomic_dir(store) as tmp:
                save_file({"input_ids": ids}, str(tmp / "ids.safetensors"))
            return {"shape": list(ids.shape), "sha256": file_sha256(store / "ids.safetensors")}

        self.stage("calibration", payload, compute, artifact=store)
        return load_file(str(store / "ids.safetensors"))["input_ids"].clone()  # detach from the mmap

    def evaluate(self, variant: VariantSpec, windows: list[list[int]]) -> dict[str, Any] | None:
        if not self.recipe.eval.enabled:
            self.step += 1
            return None
        ref = self.recipe.reference
        is_ref = variant.name == ref.name
        payload = {"windows": self.keys["eval-tokens"], "artifact": self.keys[f"quantize:{variant.name}"],
                   "device": runtimes.pick_device(self.recipe.bench.device),  # the device used, not the word
                   "output_version": evaluate.OUTPUT_VERSION}
        if not is_ref:
            payload["reference"] = self.keys[f"eval:{ref.name}"]
        ref_dir = self.state / "reference"

        def compute() -> dict[str, Any]:
            if is_ref and ref_dir.exists():
                shutil.rmtree(ref_dir)  # stale windows of an older eval definition must not linger
            rt = runtimes.load(self.artifact_dir(variant), self.recipe.bench.device)
            try:
                quality = evaluate.score(rt, windows, ref_dir, write_reference=is_ref)
                kernel = rt.kernel() if hasattr(rt, "kernel") else "unknown"
                return {"quality": quality, "runtime": rt.name, "device": rt.device, "kernel": kernel}
            finally:
                rt.close()

        return self.stage(f"eval:{variant.name}", payload, compute, artifact=ref_dir if is_ref else None)

    def lm_eval(self, variant: VariantSpec) -> dict[str, Any] | None:
        """lm-eval's tasks on the variant through its runtime, tokenized by the baseline's tokenizer."""
        spec = self.recipe.eval.lm_eval
        if spec is None:
            return None
        work = self.state / "lm_eval"
        _, _, tasks_sha = lmeval.prepare_tasks(spec.tasks, spec.include_path, work / "tasks")
        artifact_key = self.keys[f"quantize:{variant.name}"]
        payload = {"lm_eval": spec.model_dump(mode="json"), "task_files_sha256": tasks_sha,
                   "artifact": artifact_key, "tokenizer": self.keys[f"quantize:{self.recipe.reference.name}"],
                   "device": runtimes.pick_device(self.recipe.bench.device),
                   "versions": {**sysinfo.versions(("lm-eval", "datasets")),
                                "adapter": str(lmeval.ADAPTER_VERSION)}}

        def compute() -> dict[str, Any]:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(self.artifact_dir(self.recipe.reference))
            rt = runtimes.load(self.artifact_dir(variant), self.recipe.bench.device)
            try:
                cache = work / "responses" / f"{variant.name}-{artifact_key[:16]}.sqlite"
                return lmeval.evaluate(rt, tok, spec, work, cache)
            finally:
                rt.close()

        return self.stage(f"lm-eval:{variant.name}", payload, compute)

    def bench(self, variant: VariantSpec, windows: list[list[int]]) -> dict[str, Any] | None:
        spec = self.recipe.bench
        if not spec.enabled:
            self.step += 1
            return None
        hw = sysinfo.hardware()
        payload = {"bench": spec.model_dump(mode="json"), "artifact": self.keys[f"quantize:{variant.name}"],
                   "hardware": {k: hw.get(k) for k in ("cpu", "cpu_count", "gpu")}}
        cfg = spec.model_dump(mode="json")
        prompt = [t for w in windows for t in w]

        def compute() -> dict[str, Any]:
            return bench.bench_in_subprocess(self.artifact_dir(variant), cfg, prompt, self.state / "bench")

        return self.stage(f"bench:{variant.name}", payload, compute)


def random_ids(vocab: int, n: int, seed: int) -> list[int]:
    """n token ids drawn uniformly from the vocabulary with a fixed seed (random-weight models)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n,), generator=g).tolist()


def artifact_readme(meta: dict[str, Any]) -> str:
    usage = meta.get("usage") or (
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "model = AutoModelForCausalLM.from_pretrained(\"PATH\")\n"
        "tokenizer = AutoTokenizer.from_pretrained(\"PATH\")")
    needs, serve = meta.get("needs"), meta.get("serve")
    return (f"# {meta['variant']}\n\nMade by quantpipe {meta['quantpipe_version']} with method `{meta['method']}` "
            f"({meta.get('format', '')}), params `{json.dumps(meta['params'])}`"
            + (f", library {meta['library']}" if meta.get("library") else "") + ".\n\n"
            + (f"Loading needs: `{needs}`.\n\n" if needs else "")
            + f"```python\n{usage}\n```\n\n"
            + (f"Serving (PATH is this directory):\n\n```sh\n{serve}\n```\n\n" if serve else "")
            + "`quantpipe.json` holds the full metadata.\n")


def run(recipe: Recipe, recipe_path: str, out_dir: str | None = None, force: bool = False) -> dict[str, Any]:
    """Run every stage of the recipe; return results (also written to RUN_DIR/results.json)."""
    run_dir = recipe.run_dir(out_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise explain_os_error(e, f"creating the run directory {run_dir}") from None
    with run_lock(run_dir):
        clean_stale_temps(run_dir / "artifacts")
        return _run(Run(recipe, run_dir, force), recipe_path)


def _run(r: Run, recipe_path: str) -> dict[str, Any]:
    recipe = r.recipe
    started = time.perf_counter()
    config = preflight(recipe)
    ref = recipe.reference
    r.quantize(ref, None)
    if config is None:  # the source's config was not reachable before; the baseline artifact has it
        from transformers import AutoConfig

        check_shapes(recipe, AutoConfig.from_pretrained(r.artifact_dir(ref)))
    windows = r.eval_tokens()
    calib = r.calibration_ids() if r.uses_calibration else None
    for v in recipe.variants:
        if v.name != ref.name:
            r.quantize(v, calib)
    ordered = [ref] + [v for v in recipe.variants if v.name != ref.name]
    for v in ordered:
        r.evaluate(v, windows)
    for v in ordered:
        r.lm_eval(v)
    for v in ordered:
        r.bench(v, windows)
    results = collect(r, recipe_path)
    add_predictions(r, results)
    write_outputs(r, results, time.perf_counter() - started)
    return results


TRUST_WARNING = ("model.trust_remote_code is true: Python code shipped with the model source will run when it is "
                 "loaded; keep it false unless you trust that source")


def preflight(recipe: Recipe) -> Any:
    """Checks that need no work: every method's libraries are installed and its params fit the model's shapes
    (read from the config alone). Returns the config, or None where it cannot be had offline."""
    if recipe.model.trust_remote_code:
        print(f"warning: {TRUST_WARNING}")
    for v in recipe.variants:
        get_method(v.method).require(v.name, parse_params(v))
    if recipe.eval.lm_eval is not None:
        lmeval.check_tasks(recipe.eval.lm_eval)
    config = check_shapes(recipe)
    if config is not None:
        for line in plan.calibration_warnings(recipe, config):
            print(f"warning: {line}")
    return config


def check_shapes(recipe: Recipe, config: Any = None) -> Any:
    """Raise when a variant's params do not fit the model's shapes. `config` defaults to the source's, read
    without weights; returns it, or None where it cannot be had offline (then nothing is checked)."""
    if config is None:
        config = sources.load_config(recipe.model)
    problems = check_against_model(recipe, config) if config is not None else []
    if problems:
        raise QuantpipeError("; ".join(problems))
    return config


def collect(r: Run, recipe_path: str) -> dict[str, Any]:
    recipe = r.recipe
    variants = []
    for v in [recipe.reference] + [v for v in recipe.variants if v.name != recipe.reference.name]:
        q = r.results[f"quantize:{v.name}"]
        e = r.results.get(f"eval:{v.name}") or {}
        b = r.results.get(f"bench:{v.name}")
        lm = r.results.get(f"lm-eval:{v.name}")
        variants.append({
            "name": v.name,
            "method": v.method,
            "params": q["meta"]["params"],
            "runtime": q["meta"]["runtime"],
            "format": q["meta"].get("format"),
            "artifact": {"path": f"artifacts/{v.name}", "size_bytes": q["size_bytes"],
                         "n_files": len(r.cache.files(f"quantize:{v.name}"))},
            "weights": recipe.model.weights,
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
            "meta": q["meta"],
        })
    lmeval.add_recoveries(variants, recipe.reference.name)
    return {
        "schema_version": report.RESULTS_SCHEMA_VERSION,
        "quantpipe_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "recipe": {"name": recipe.name, "path": recipe_path, "sha256": recipe.sha256()},
        "run_dir": str(r.dir),
        "model": sources.describe(recipe.model),
        "weights": recipe.model.weights,
        "reference": recipe.reference.name,
        "eval": {**recipe.eval.model_dump(mode="json"), "n_windows": r.results["eval-tokens"]["n_windows"],
                 "random_ids": bool(r.results["eval-tokens"].get("random_ids")),
                 "tokens_sha256": r.results["eval-tokens"]["tokens_sha256"]},
        "bench": recipe.bench.model_dump(mode="json"),
        "hardware": sysinfo.hardware(),
        "variants": variants,
        "gates": recipe.gates.model_dump(mode="json") if recipe.gates else None,
    }


def add_predictions(r: Run, results: dict[str, Any]) -> None:
    """Put `quantpipe plan`'s predictions beside each variant's measured memory (`prediction` per variant):
    artifact tensor bytes, the bench process's memory at its largest batch, and calibrated quantization's peak.
    Measured process memory is the peak minus the process's memory before any weights (libraries loaded)."""
    from transformers import AutoConfig

    try:
        s = plan.shapes(AutoConfig.from_pretrained(r.artifact_dir(r.recipe.reference)))
    except QuantpipeError as e:  # a model family plan does not know: the matrix says so
        for v in results["variants"]:
            v["prediction"] = {"error": str(e)}
        return
    dtype, cal, spec = r.recipe.model.dtype, r.recipe.calibration, r.recipe.bench.model_dump(mode="json")
    for v in results["variants"]:
        method = get_method(v["method"])
        params = method.params.model_validate(v["params"])
        storage = method.storage(params, dtype)
        q, b = r.results[f"quantize:{v['name']}"], r.results.get(f"bench:{v['name']}")
        pred: dict[str, Any] = {"weights_bytes": plan.weight_bytes(s, storage)["total"],
                                "measured_weights_bytes": q.get("tensor_bytes")}
        if not storage.exact:
            pred["weights_nominal"] = "the backend picks some tensors' types itself: nominal bytes of the main type"
        if b is not None:
            device = b["device"]
            pred["bench"] = {k: x / plan.MIB for k, x in plan.bench_memory(s, storage, dtype, device, spec).items()}
            measured = b.get("peak_gpu_mib") if device == "cuda" else (
                b["peak_rss_mib"] - b["base_rss_mib"] if "base_rss_mib" in b else None)
            pred["measured_bench_mib"] = measured
            pred["bench_measure"] = "peak CUDA memory allocated" if device == "cuda" else "peak RSS - RSS before load"
            if device == "cpu" and storage.cpu_note:
                pred["bench_not_modelled"] = storage.cpu_note
        need = plan.quantize_memory(s, method, params, dtype, cal.n_samples, cal.seq_len)
        if need is not None:
            pred["quantize"] = {k: x / plan.MIB for k, x in need.items()}
            base = q.get("quantize_base_rss_mib")
            on_gpu = q["meta"].get("quantize_device") == "cuda" and q.get("quantize_peak_gpu_mib") is not None
            pred["measured_quantize_mib"] = q["quantize_peak_gpu_mib"] if on_gpu else (
                None if base is None else q["quantize_peak_rss_mib"] - base)
            pred["quantize_measure"] = "peak CUDA memory allocated" if on_gpu else "peak RSS - RSS before load"
            if storage.quantize_upper_bound:
                pred["quantize_upper_bound"] = storage.quantize_upper_bound
            elif on_gpu:
                pred["quantize_upper_bound"] = GPU_LAYERWISE
        v["prediction"] = pred


GPU_LAYERWISE = ("on a GPU the quantizing library keeps the float model in CPU memory and moves one decoder layer "
                 "at a time onto the GPU, so the prediction's whole-model term is an upper bound")


def write_outputs(r: Run, results: dict[str, Any], wall_s: float) -> None:
    try:
        write_json(r.dir / "results.json", results)
        report.write(r.dir, results)
        calib = r.results.get("calibration")
        manifest = {
            "quantpipe_version": __version__,
            "created": results["created"],
            "recipe": results["recipe"],
            "recipe_content": r.recipe.model_dump(mode="json"),
            "stage_keys": r.keys,
            "library_versions": sysinfo.versions(),
            "method_versions": {v.name: get_method(v.method).versions(parse_params(v)) for v in r.recipe.variants},
            "seeds": {"calibration": r.recipe.calibration.seed},
            "hardware": results["hardware"],
            "calibration": None if calib is None else {"shape": calib["shape"], "sha256": calib["sha256"]},
            "eval_tokens_sha256": results["eval"]["tokens_sha256"],
            "artifacts": {v["name"]: r.cache.files(f"quantize:{v['name']}") for v in results["variants"]},
            "run_wall_s": wall_s,
        }
        write_json(r.dir / "manifest.json", manifest)
    except OSError as e:
        raise explain_os_error(e, f"writing the results into {r.dir}") from None
