"""results.json: the typed record of a run, written from these models and read back through them.

One `Row` per (variant, runtime) pair measured: the variant's artifact (method, params, format, size, how it was
quantized) and what that runtime measured of it (quality, lm-eval scores, speed, memory). A variant measured in
one runtime has one row named after it; a second runtime adds a row named `variant@runtime`.

Schema version 2. Version 1 files (one row per variant, before the runtime axis) are upgraded when read, so
`quantpipe gate --baseline OLD.json` and `quantpipe report` keep working on them. Reading validates once: a file
with a missing field, a string where a number belongs, a NaN or an impossible value (a negative KL divergence,
a top-1 agreement above 1) is a one-line error naming the row and the field, never a crash further on.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from quantpipe.artifact import FORMATS
from quantpipe.errors import QuantpipeError, location
from quantpipe.recipe import GatesSpec

SCHEMA_VERSION = 2


class Model(BaseModel):
    """Strict about what it knows (a number is a JSON number, never a string; finite), open for what a newer
    quantpipe adds: unknown keys are kept, not refused."""

    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False, protected_namespaces=())


class Quality(Model):
    """The window eval of one row against the reference (evaluate.py defines every figure)."""

    perplexity: float = Field(gt=0)
    nll_mean: float | None = None
    nll_se: float | None = None  # a single token has none
    kld_mean: float = Field(ge=0)
    kld_se: float | None = None
    kld_p99: float | None = Field(None, ge=0)
    top1_agreement: float = Field(ge=0, le=1)
    n_windows: int | None = Field(None, ge=1)
    n_tokens_scored: int | None = Field(None, ge=1)
    block_tokens: int | None = None
    blocks: dict[str, list[float]] = Field(default_factory=dict)
    kld_estimator: str = "full vocabulary"


class BatchSpeed(Model):
    ttft_s: float | None = Field(None, gt=0)
    prefill_tok_s: float | None = Field(None, gt=0)
    decode_tok_s: float | None = Field(None, gt=0)  # None: decode took no measurable time beyond the first token
    e2e_s: float | None = Field(None, gt=0)
    kv_positions_read: float | None = None
    limit_tok_s: float | None = Field(None, gt=0)
    frac_of_limit: float | None = Field(None, ge=0)


class Speed(Model):
    runtime: str | None = None
    device: str | None = None
    engine: str | None = None
    engine_note: str | None = None
    threads: int | None = None
    kernel: str | None = None
    per_batch: dict[str, BatchSpeed] = Field(default_factory=dict)
    copy_bandwidth_gbs: float | None = None
    weight_bytes_per_step: int | None = None
    kv_bytes_per_position: int | None = None
    gpu: str | None = None

    @field_validator("per_batch")
    @classmethod
    def _batch_sizes(cls, v: dict[str, BatchSpeed]) -> dict[str, BatchSpeed]:
        for k in v:
            if not k.isdigit() or int(k) < 1:
                raise ValueError(f"batch size '{k}' is not a positive integer")
        return v


class TaskScore(Model):
    metric: str
    value: float | None = None
    stderr: float | None = None
    n: int | None = None
    recovery: float | None = None
    recovery_se: float | None = None
    higher_is_better: bool | None = True
    per_doc: list[Any] | None = None


class Memory(Model):
    peak_rss_mib: float | None = Field(None, ge=0)
    load_rss_mib: float | None = None
    peak_gpu_mib: float | None = Field(None, ge=0)
    peak_gpu_reserved_mib: float | None = None
    gpu_driver_used_mib: float | None = None
    quantize_peak_rss_mib: float | None = None
    quantize_peak_gpu_mib: float | None = None


class Timings(Model):
    quantize_s: float | None = None
    eval_s: float | None = None
    lm_eval_s: float | None = None
    bench_s: float | None = None
    load_s: float | None = None


class ArtifactRef(Model):
    path: str = ""
    size_bytes: int = Field(gt=0)
    n_files: int | None = None


class Prediction(Model):
    """`quantpipe plan`'s memory arithmetic for one row beside what the run measured (MiB unless named bytes).
    `error` alone: plan does not know this model family. The measures say what a measured figure is."""

    error: str | None = None
    weights_bytes: int | None = Field(None, ge=0)  # the artifact's tensors as plan computes them
    measured_weights_bytes: int | None = Field(None, ge=0)  # ... as the artifact holds them
    weights_nominal: str | None = None  # why the weights figure is nominal (the backend picks some types itself)
    bench: dict[str, float] | None = None  # the largest batch: weights, kv_cache, activations, ..., total
    measured_bench_mib: float | None = None
    bench_measure: str | None = None
    bench_not_modelled: str | None = None  # what the bench prediction leaves out for this format's runtime
    quantize: dict[str, float] | None = None  # calibrated quantization: model, calibration, ..., total
    measured_quantize_mib: float | None = None
    quantize_measure: str | None = None
    quantize_upper_bound: str | None = None  # why the quantize prediction is an upper bound

    @field_validator("bench", "quantize")
    @classmethod
    def _has_total(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        if v is not None and "total" not in v:
            raise ValueError("has no 'total'")
        return v


class Row(Model):
    """One (variant, runtime) pair of the matrix."""

    name: str  # the row's name: the variant's, or `variant@runtime` for its further runtimes
    variant: str
    runtime: str | None = None  # the runtime that measured it (None: measured nothing)
    requested_runtime: str = "auto"  # as the recipe named it (auto, natural, or a runtime)
    method: str
    params: dict[str, Any] = Field(default_factory=dict)
    format: str | None = None
    format_detail: str | None = None
    artifact: ArtifactRef
    weights: Literal["real", "random"] = "real"
    quality: Quality | None = None
    speed: Speed | None = None
    eval_kernel: str | None = None
    lm_eval: dict[str, TaskScore] | None = None
    lm_eval_meta: dict[str, Any] | None = None
    memory: Memory = Field(default_factory=Memory)
    timings: Timings = Field(default_factory=Timings)
    meta: dict[str, Any] = Field(default_factory=dict)
    prediction: Prediction | None = None
    note: str | None = None  # why a runtime measured nothing here (it does not serve this artifact), or a fallback
    nodes: dict[str, str] = Field(default_factory=dict)  # stage kind -> the Ray node that ran it (--executor ray)

    @model_validator(mode="before")
    @classmethod
    def _variant(cls, data: Any) -> Any:
        if isinstance(data, dict) and "variant" not in data and "name" in data:
            data = {**data, "variant": data["name"]}
        return data


class ServedQuality(Model):
    kld_mean: float | None = Field(None, ge=0)
    kld_se: float | None = None
    top1_agreement: float | None = Field(None, ge=0, le=1)
    perplexity: float | None = Field(None, gt=0)
    n_positions: int | None = None
    positions_dropped: int | None = None
    kld_estimator: str | None = None
    note: str | None = None
    error: str | None = None


class Percentiles(Model):
    p50: float | None = None
    p95: float | None = None
    p99: float | None = None
    mean: float | None = None


class LoadLevel(Model):
    """One concurrency level of the load test (GuideLLM)."""

    concurrency: int = Field(ge=1)
    requests: dict[str, int] = Field(default_factory=dict)
    duration_s: float | None = None
    ttft_ms: Percentiles | None = None
    itl_ms: Percentiles | None = None
    e2e_ms: Percentiles | None = None
    output_tok_s: float | None = Field(None, ge=0)
    requests_per_s: float | None = Field(None, ge=0)
    failed: int | None = Field(None, ge=0)
    error: str | None = None  # the level did not finish: why (GuideLLM's or the server's last lines)
    log_tail: str | None = None
    retried: str | None = None  # the first run measured no request (GuideLLM's line); these figures are the second's


class ServedMemory(Model):
    pss_loaded_mib: float | None = None  # the server's process tree after loading (sum of PSS)
    peak_pss_mib: float | None = None  # ... at its peak during the load test
    gpu_mib: float | None = None
    kv_cache_tokens: int | None = None  # as the engine reports it (vLLM: its capacity; llama.cpp: n_ctx)
    kv_cache_mib: float | None = None  # the KV cache's allocation as the engine reports it (llama.cpp)
    predicted_kv_cache_mib: float | None = None  # plan's KV bytes (llama.cpp: for its n_ctx; vLLM: the budget)
    predicted_weights_mib: float | None = None  # `quantpipe plan`'s arithmetic for the same model and dtype
    predicted_kv_cache_tokens: int | None = None  # ... for the same KV-cache budget
    predicted_note: str | None = None


class Served(Model):
    """One (variant, engine) of the serve stage."""

    variant: str
    engine: str
    device: str = "cpu"
    format: str | None = None
    loads: bool
    tried: bool = True  # false: the engine does not load this format, so it was not started
    reason: str | None = None  # why it does not load: the engine's own words where it was tried
    complete: bool = True
    error: str | None = None
    engine_version: str | None = None
    dtype: str | None = None  # as asked ("auto": the engine's choice)
    engine_dtype: str | None = None  # as the engine reports it
    quantization: str | None = None
    kernel: str | None = None
    command: str | None = None
    start_s: float | None = None
    quality: ServedQuality | None = None
    in_process_kld: float | None = None  # the variant's KL divergence in quantpipe's own runtime (full vocabulary)
    in_process_kld_topk: float | None = None  # ... with the served figure's estimator (top k + rest)
    greedy: dict[str, Any] | None = None
    levels: list[LoadLevel] = Field(default_factory=list)
    memory: ServedMemory = Field(default_factory=ServedMemory)
    log_tail: str | None = None
    wall_s: float | None = None

    def level(self, concurrency: int) -> LoadLevel | None:
        return next((lv for lv in self.levels if lv.concurrency == concurrency and lv.error is None), None)


def mean_recovery(v: Row) -> float | None:
    """Mean over tasks of a row's lm-eval score recovery vs the baseline (what the gate's min_lm_eval_recovery
    checks)."""
    rec = [sc.recovery for sc in (v.lm_eval or {}).values() if sc.recovery is not None]
    return sum(rec) / len(rec) if rec else None


class RecipeRef(Model):
    name: str = "?"
    path: str = "?"
    sha256: str | None = None


class Results(Model):
    schema_version: Literal[2] = SCHEMA_VERSION
    quantpipe_version: str = "?"
    created: str = "?"
    recipe: RecipeRef = Field(default_factory=RecipeRef)
    run_dir: str | None = None
    model: str = "?"
    model_digest: str | None = None  # sha256 over the baseline artifact's weight files: which model this run measured
    weights: Literal["real", "random"] = "real"
    reference: str  # the reference row's name
    eval: dict[str, Any] = Field(default_factory=dict)
    bench: dict[str, Any] = Field(default_factory=dict)
    hardware: dict[str, Any] = Field(default_factory=dict)
    variants: list[Row] = Field(min_length=1)
    gates: GatesSpec | None = None
    skipped: list[dict[str, str]] = Field(default_factory=list)  # (variant, runtime) pairs a runtime cannot serve
    serve: dict[str, Any] | None = None  # the recipe's serve block
    served: list[Served] = Field(default_factory=list)  # one per (variant, engine) of the serve block
    failed: list[dict[str, str]] = Field(default_factory=list)  # variants whose stage failed (--executor ray)
    execution: dict[str, Any] | None = None  # a Ray run: executor, cluster address, the nodes that ran stages
    upgraded_from: int | None = None  # set when read from an older schema

    def row(self, name: str) -> Row | None:
        return next((r for r in self.variants if r.name == name), None)

    @property
    def reference_row(self) -> Row:
        ref = self.row(self.reference)
        if ref is None:
            raise QuantpipeError(f"results: the reference '{self.reference}' is not among its rows")
        return ref

    def reference_for(self, row: Row) -> Row:
        """The baseline row a row's speed-up and size compare with: the reference variant in the same runtime
        when it was measured there, else the reference row."""
        ref = self.reference_row
        same = [r for r in self.variants if r.variant == ref.variant and r.runtime == row.runtime]
        return same[0] if same else ref

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json", exclude={"upgraded_from"}), indent=2) + "\n"


def upgrade_v1(data: dict[str, Any]) -> dict[str, Any]:
    """A version 1 results mapping as version 2: every v1 variant is one row in the runtime it named."""
    out = {**data, "schema_version": SCHEMA_VERSION, "upgraded_from": 1}
    rows = []
    for v in data.get("variants") or []:
        if not isinstance(v, dict):
            rows.append(v)  # validation names it
            continue
        row = {**v, "variant": v.get("name")}
        fmt = row.get("format")
        if isinstance(fmt, str) and fmt not in FORMATS:
            row["format_detail"] = fmt
        rows.append(row)
    out["variants"] = rows
    bench = dict(out.get("bench") or {})
    engine = bench.pop("engine", None)
    if engine is not None and "runtimes" not in bench:
        bench["runtimes"] = ["compiled"] if engine == "compiled" else ["auto"]
    out["bench"] = bench
    return out


def parse(data: Any, where: str = "results.json") -> Results:
    """Validate a results mapping (upgrading version 1) into the typed model; one-line QuantpipeError."""
    if not isinstance(data, dict):
        raise QuantpipeError(f"{where}: not a quantpipe results file (a JSON {type(data).__name__}, not an object)")
    version = data.get("schema_version")
    if version == 1:
        data = upgrade_v1(data)
    elif version != SCHEMA_VERSION:
        raise QuantpipeError(f"{where}: schema_version {version!r}; this quantpipe reads {SCHEMA_VERSION} and 1 "
                             "(re-run it with this version)")
    try:
        return Results.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "finite_number":
            msg = "not a finite number (NaN or infinity): the run that wrote it is broken"
        extra = f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""
        raise QuantpipeError(f"{where}: {location(err['loc'], data, 'results')}: {msg}{extra}") from None


def as_results(data: Results | dict[str, Any]) -> Results:
    """A Results model from itself or from a results mapping (validated)."""
    return data if isinstance(data, Results) else parse(data)


def as_row(data: Row | dict[str, Any]) -> Row:
    if isinstance(data, Row):
        return data
    try:
        return Row.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        raise QuantpipeError(f"results: row {data.get('name') if isinstance(data, dict) else '?'}: "
                             f"{'.'.join(map(str, err['loc']))}: {err['msg']}") from None


def load(path: Path, what: str) -> Results:
    """A results.json (or a run directory holding one); `what` names the command or option in errors."""
    p = path / "results.json" if path.is_dir() else path
    if not p.is_file():
        raise QuantpipeError(f"{what}: '{p}' does not exist (give a run directory or its results.json)")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise QuantpipeError(f"{what}: '{p}' is not valid JSON ({e}); re-render it with `quantpipe run`") from None
    except RecursionError:
        raise QuantpipeError(f"{what}: '{p}' is nested too deeply to be a quantpipe results file") from None
    return parse(data, f"{what}: '{p}'")


def write(path: Path, results: Results) -> None:
    """results.json, atomically (temp file + rename)."""
    from quantpipe.cache import write_text

    write_text(path, results.to_json())
