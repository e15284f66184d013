"""The stages of a run, their cache keys, and the files they leave in the run directory.

A stage's key hashes what it computes from: its recipe slice, the keys of the stages it reads, the library
versions it runs and, for eval, lm-eval and bench, the runtime that measures. A row's stages are named after the
row (`eval:int8`, `bench:gptq@compiled`), so each (variant, runtime) pair is cached on its own.
"""

from __future__ import annotations

import hashlib
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from quantpipe import (
    __version__,
    artifact,
    bench,
    calibration,
    data,
    evaluate,
    isolate,
    lmeval,
    plan,
    runtimes,
    sysinfo,
)
from quantpipe.archs import random_ids
from quantpipe.cache import StageCache, atomic_dir, digest, dir_size, explain_os_error, file_sha256, no_space
from quantpipe.errors import QuantpipeError
from quantpipe.methods import QuantizeJob, get_method
from quantpipe.pipeline.rows import Plan, RowPlan, plan_rows, reference_row
from quantpipe.recipe import Recipe, VariantSpec


def tokenize_prefix(tok: Any, text: str, n_tokens: int, margin: int = 64) -> list[int]:
    """The ids of the text's beginning, tokenizing only as much text as `n_tokens` ids need (a 40 MB eval text
    with max_tokens 1024 must not be tokenized whole): prefixes cut at whitespace, doubled until one yields
    n_tokens + margin ids. Tokens that far before the cut are the whole text's tokens (tokenizers split words
    at whitespace first); a short text is tokenized whole."""
    size = max(4096, 8 * (n_tokens + margin))
    while size < len(text):
        cut = max(text.rfind(" ", 0, size), text.rfind("\n", 0, size))
        ids = tok(text[:cut if cut > 0 else size], add_special_tokens=False).input_ids
        if len(ids) >= n_tokens + margin:
            return ids
        size *= 2
    return tok(text, add_special_tokens=False).input_ids


class Run:
    """State of one run: the recipe, the run dir, its rows, the cache and the keys of the stages done so far."""

    def __init__(self, recipe: Recipe, run_dir: Path, force: bool = False) -> None:
        self.recipe, self.dir, self.force = recipe, run_dir, force
        self.cache = StageCache(run_dir)
        self.state = run_dir / ".quantpipe"
        self.keys: dict[str, str] = {}
        self.results: dict[str, dict[str, Any]] = {}
        self.device = runtimes.pick_device(recipe.bench.device)
        self.plan: Plan = plan_rows(recipe, self.device)
        self.ref_row: RowPlan = reference_row(self.plan, recipe)
        self.uses_calibration = any(get_method(v.method).calibrates(v.params) for v in recipe.variants)
        rows = self.plan.rows
        self.n_stages = (len(recipe.variants) + 1 + int(self.uses_calibration)
                         + sum(r.evaluates for r in rows) * (int(recipe.eval.enabled)
                                                             + int(recipe.eval.lm_eval is not None))
                         + sum(r.benches for r in rows) + len(self.served()))
        self.step = 0
        self.log: list[dict[str, Any]] = []  # (stage, how it ended, seconds) in order: the Ray executor reports it
        self.node: dict[str, Any] | None = None  # where the stages run (set by the Ray executor): kept in records
        self.failed: list[dict[str, str]] = []  # variants whose Ray task failed: {variant, stage, node, error}
        self.cluster_address: str | None = None

    def stage(self, name: str, payload: dict[str, Any], compute: Any, artifact_dir: Path | None = None) -> dict:
        """Return the cached result of a stage if its content key matches, else compute and record it."""
        self.step += 1
        key = digest({"stage": name.split(":")[0], "payload": payload})
        self.keys[name] = key
        label = f"[{self.step}/{self.n_stages}] {name}"
        cached = None if self.force else self.cache.get(name, key, artifact_dir)
        if cached is not None:
            print(f"{label}: cached")
            self.results[name] = cached
            self.log.append({"stage": name, "status": "cached", "node": cached.get("node")})
            return cached
        print(f"{label} ...", flush=True)
        t = time.perf_counter()
        try:
            result = compute()
        except OSError as e:
            raise explain_os_error(e, f"running stage {name}") from None
        except QuantpipeError:
            raise
        except Exception as e:  # a library's own error type around a full disk (safetensors' SafetensorError)
            if no_space(e):
                raise QuantpipeError(f"no space left on the device while running stage {name}; free space and "
                                     "re-run (finished stages are kept and will not be redone)") from None
            raise
        result["wall_s"] = time.perf_counter() - t
        if self.node is not None:
            result["node"] = self.node
        if result.get("complete") is False:  # a serve stage that could not finish: kept, not cached
            print(f"{label}: incomplete after {result['wall_s']:.1f} s (not cached; a re-run tries again)", flush=True)
            self.results[name] = result
            self.log.append({"stage": name, "status": "incomplete", "wall_s": result["wall_s"], "node": self.node})
            return result
        self.cache.put(name, key, result, artifact_dir)
        print(f"{label}: done in {result['wall_s']:.1f} s", flush=True)
        self.results[name] = result
        self.log.append({"stage": name, "status": "done", "wall_s": result["wall_s"], "node": self.node})
        return result

    def artifact_dir(self, variant: VariantSpec) -> Path:
        return self.dir / "artifacts" / variant.name

    # -- quantize ---------------------------------------------------------------------------------------------
    def quantize(self, variant: VariantSpec, calib: torch.Tensor | None) -> dict[str, Any]:
        method, params = get_method(variant.method), variant.params
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
                job = QuantizeJob(variant=variant.name, method=method.name, params=params, out_dir=tmp,
                                  base_dir=None if is_ref else self.artifact_dir(ref), model=self.recipe.model,
                                  calibration=calib if method.calibrates(params) else None)
                done = isolate.run("quantpipe.methods:run_quantize", (method, job), self.state / "logs",
                                   f"quantize:{variant.name}", preimport=method.requirements(params).imports,
                                   what="the quantization process", who=f"method '{method.name}'")
                meta = {"meta_version": artifact.META_VERSION, "quantpipe_version": __version__,
                        "variant": variant.name, "method": method.name,
                        "format": method.format(params), "params": params.model_dump(mode="json"),
                        "library_versions": method.versions(params), **done["meta"]}
                if method.calibrates(params):
                    meta["calibration_sha256"] = self.results["calibration"]["sha256"]
                if self.recipe.model.weights == "random":  # every artifact says so, not only the baseline
                    meta.update(weights="random", arch=self.recipe.model.arch, seed=self.recipe.model.seed)
                typed = artifact.parse(meta, f"quantize:{variant.name}")
                artifact.write(tmp, typed)
                (tmp / "README.md").write_text(artifact.readme(typed))
            return {"meta": typed.to_dict(), "quantize_s": done["quantize_s"],
                    "quantize_peak_rss_mib": done["peak_rss_mib"], "quantize_base_rss_mib": done["base_rss_mib"],
                    "quantize_peak_gpu_mib": done.get("peak_gpu_mib"), "size_bytes": dir_size(out),
                    "tensor_bytes": plan.tensor_bytes(out)}

        return self.stage(f"quantize:{variant.name}", payload, compute, artifact_dir=out)

    def meta(self, variant: VariantSpec) -> artifact.ArtifactMeta:
        """The artifact's metadata as its quantize stage recorded it (cached records of older runs upgraded)."""
        return artifact.parse(self.results[f"quantize:{variant.name}"]["meta"], f"quantize:{variant.name}")

    # -- token ids --------------------------------------------------------------------------------------------
    def eval_tokens(self) -> list[list[int]]:
        """The eval windows (the bench's prompts are cut from them too). A random-weight model has no tokenizer:
        its windows are seeded random ids of its vocabulary (prompts for the bench only; it is not evaluated)."""
        spec = self.recipe.eval
        if self.recipe.model.weights == "random":
            return self._random_tokens()
        path = data.eval_text() if spec.text == "bundled" else Path(spec.text)
        text = path.read_text(encoding="utf-8")
        # which runtimes measure, and lm-eval's settings, are not part of the windows: changing them leaves every
        # window stage cached
        payload = {"eval": spec.model_dump(mode="json", exclude={"lm_eval", "runtimes"}),
                   "text_sha256": hashlib.sha256(text.encode()).hexdigest(),
                   "base": self.keys[f"quantize:{self.recipe.reference.name}"]}

        def compute() -> dict[str, Any]:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(self.artifact_dir(self.recipe.reference))
            ids = tokenize_prefix(tok, text, spec.max_tokens)
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

    def max_positions(self) -> int:
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(self.artifact_dir(self.recipe.reference))
        return int(getattr(cfg, "max_position_embeddings", 0) or 0)

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
            payload["bundled_sha256"] = file_sha256(data.calibration_text())
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

        self.stage("calibration", payload, compute, artifact_dir=store)
        return self.load_calibration_ids()

    def load_calibration_ids(self) -> torch.Tensor:
        """The calibration ids the calibration stage wrote (here or on a Ray node)."""
        return load_file(str(self.state / "calibration" / "ids.safetensors"))["input_ids"].clone()  # off the mmap

    # -- measurements of a row --------------------------------------------------------------------------------
    def _runtime_payload(self, row: RowPlan) -> dict[str, Any]:
        return {"runtime": row.runtime, "requested": row.requested, "device": self.device}

    def evaluate(self, row: RowPlan, windows: list[list[int]]) -> dict[str, Any] | None:
        if not (row.evaluates and self.recipe.eval.enabled):
            return None
        is_ref = row.name == self.ref_row.name
        payload = {"windows": self.keys["eval-tokens"], "artifact": self.keys[f"quantize:{row.variant.name}"],
                   **self._runtime_payload(row), "output_version": evaluate.OUTPUT_VERSION}
        if not is_ref:
            payload["reference"] = self.keys[f"eval:{self.ref_row.name}"]
        ref_dir = self.state / "reference"

        def compute() -> dict[str, Any]:
            if is_ref and ref_dir.exists():
                shutil.rmtree(ref_dir)  # stale windows of an older eval definition must not linger
            rt = runtimes.load(self.artifact_dir(row.variant), self.device, row.requested)
            try:
                quality = evaluate.score(rt, windows, ref_dir, write_reference=is_ref)
                return {"quality": quality, "runtime": rt.name, "device": rt.device, "kernel": rt.kernel(),
                        "note": rt.fallback_note}
            finally:
                rt.close()

        return self.stage(f"eval:{row.name}", payload, compute, artifact_dir=ref_dir if is_ref else None)

    def lm_eval(self, row: RowPlan) -> dict[str, Any] | None:
        """lm-eval's tasks on the row's artifact through its runtime, tokenized by the baseline's tokenizer."""
        spec = self.recipe.eval.lm_eval
        if spec is None or not row.evaluates:
            return None
        work = self.state / "lm_eval"
        _, _, tasks_sha = lmeval.prepare_tasks(spec.tasks, spec.include_path, work / "tasks")
        artifact_key = self.keys[f"quantize:{row.variant.name}"]
        payload = {"lm_eval": spec.model_dump(mode="json"), "task_files_sha256": tasks_sha,
                   "artifact": artifact_key, "tokenizer": self.keys[f"quantize:{self.recipe.reference.name}"],
                   **self._runtime_payload(row),
                   "versions": {**sysinfo.versions(("lm-eval", "datasets")),
                                "adapter": str(lmeval.ADAPTER_VERSION)}}

        def compute() -> dict[str, Any]:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(self.artifact_dir(self.recipe.reference))
            rt = runtimes.load(self.artifact_dir(row.variant), self.device, row.requested)
            try:  # responses are the runtime's: one cache per (variant, runtime, artifact)
                cache = work / "responses" / f"{row.variant.name}-{row.runtime}-{artifact_key[:16]}.sqlite"
                return lmeval.evaluate(rt, tok, spec, work, cache)
            finally:
                rt.close()

        return self.stage(f"lm-eval:{row.name}", payload, compute)

    def bench(self, row: RowPlan, windows: list[list[int]]) -> dict[str, Any] | None:
        spec = self.recipe.bench
        if not (row.benches and spec.enabled) or bench.no_native_speed(self.meta(row.variant), self.device):
            return None
        hw = sysinfo.hardware()
        cfg = spec.model_dump(mode="json", exclude={"runtimes"})
        payload = {"bench": cfg, "artifact": self.keys[f"quantize:{row.variant.name}"],
                   **self._runtime_payload(row), "hardware": {k: hw.get(k) for k in ("cpu", "cpu_count", "gpu")}}
        prompt = [t for w in windows for t in w]

        def compute() -> dict[str, Any]:
            return bench.bench_in_subprocess(self.artifact_dir(row.variant), cfg, prompt, self.state / "bench",
                                             runtime=row.requested, label=f"bench:{row.name}")

        return self.stage(f"bench:{row.name}", payload, compute)

    # -- serving ----------------------------------------------------------------------------------------------
    def served(self) -> list[tuple[VariantSpec, str]]:
        """The (variant, engine) pairs the recipe's serve block asks for, in recipe order."""
        spec = self.recipe.serve
        if spec is None:
            return []
        names = spec.variants or [v.name for v in self.recipe.variants]
        return [(v, e) for v in self.recipe.variants if v.name in names for e in spec.engines]

    def serve(self, variant: VariantSpec, engine: str, windows: list[list[int]]) -> dict[str, Any]:
        from quantpipe.serving import engines, measure

        spec = self.recipe.serve
        assert spec is not None
        quality = spec.quality and self.recipe.eval.enabled
        env = engines.get_engine(engine).env(self.device)
        dtype = spec.dtype_of(variant.name, self.recipe.model.dtype)
        cfg = {**spec.model_dump(mode="json", exclude={"host", "port", "startup_timeout_s", "variants", "engines",
                                                       "dtype", "dtype_overrides"}),
               "dtype": dtype, "max_model_len": spec.context(self.recipe.eval.window, self.max_positions()),
               "engine_args": spec.engine_args.get(engine)}
        hw = sysinfo.hardware()
        payload = {"serve": cfg, "engine": engine, "engine_env": env.version(),
                   "guidellm": engines.GUIDELLM.version(), "artifact": self.keys[f"quantize:{variant.name}"],
                   "device": self.device, "hardware": {k: hw.get(k) for k in ("cpu", "cpu_count", "gpu")},
                   "measure_version": measure.VERSION}
        if quality:
            payload["reference"] = self.keys[f"eval:{self.ref_row.name}"]

        def compute() -> dict[str, Any]:
            fmt = self.meta(variant).format
            work = self.state / "serve" / f"{variant.name}@{engine}"
            return measure.measure(engine, self.artifact_dir(variant), fmt,
                                   {**cfg, "host": spec.host, "port": spec.port,
                                    "startup_timeout_s": spec.startup_timeout_s,
                                    "engine_args": spec.engine_args},
                                   self.device, windows if quality else [], self.state / "reference" if quality
                                   else None, self.artifact_dir(self.recipe.reference), work, variant.name, dtype,
                                   file=self.meta(variant).file)

        return self.stage(f"serve:{variant.name}@{engine}", payload, compute)
