"""`quantpipe run`: a recipe through every stage, into a run directory.

Route: preflight (libraries installed, params against the model's shapes, lm-eval tasks known, the rows planned:
rows.py) -> the baseline artifact -> the eval token ids -> the calibration ids (when a method uses them) -> one
quantize stage per variant (own process) -> one eval stage per evaluating row (the reference row's writes the
reference log-probs) -> one lm-eval stage per evaluating row when the recipe asks for tasks -> one bench stage per
benchmarking row (own process) -> with a `serve:` block, one serve stage per (variant, engine) (the engine's own
server, serving/) -> results.json, the matrix and manifest.json (outputs.py). Every stage is cached by content
(stages.py); a killed run resumes from the last finished one.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from quantpipe import lmeval, plan, sources
from quantpipe.archs import random_ids
from quantpipe.cache import check_run_dir, clean_stale_temps, explain_os_error, run_lock
from quantpipe.errors import QuantpipeError
from quantpipe.methods import check_against_model, get_method
from quantpipe.pipeline.outputs import add_predictions, collect, write_outputs
from quantpipe.pipeline.stages import Run
from quantpipe.recipe import Recipe
from quantpipe.results import Results

__all__ = ["run", "preflight", "check_shapes", "check_bounds", "random_ids", "TRUST_WARNING", "Run"]

TRUST_WARNING = ("model.trust_remote_code is true: Python code shipped with the model source will run when it is "
                 "loaded; keep it false unless you trust that source")


def run(recipe: Recipe, recipe_path: str, out_dir: str | None = None, force: bool = False,
        adopt: bool = False) -> Results:
    """Run every stage of the recipe; return the results (also written to RUN_DIR/results.json). A non-empty
    directory that is not a quantpipe run is refused unless `adopt` (cache.check_run_dir)."""
    run_dir = recipe.run_dir(out_dir)
    cluster = None
    if recipe.execution.executor == "ray":  # an unreachable cluster is one line, before any work
        from quantpipe.pipeline import distributed

        cluster = distributed.connect(recipe.execution.address)
    check_run_dir(run_dir, [v.name for v in recipe.variants], adopt)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise explain_os_error(e, f"creating the run directory {run_dir}") from None
    with run_lock(run_dir):
        clean_stale_temps(run_dir / "artifacts")
        return _run(recipe, run_dir, force, recipe_path, cluster)


def _run(recipe: Recipe, run_dir: Path, force: bool, recipe_path: str, cluster: dict[str, Any] | None = None
         ) -> Results:
    started = time.perf_counter()
    config = preflight(recipe)
    r = Run(recipe, run_dir, force)  # plans the rows: a runtime that cannot score the reference fails here
    if cluster is not None:
        return _run_on_ray(r, config, cluster, recipe_path, started)
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
    ordered = [r.ref_row] + [row for row in r.plan.rows if row is not r.ref_row]
    for row in ordered:
        r.evaluate(row, windows)
    for row in ordered:
        r.lm_eval(row)
    for row in ordered:
        r.bench(row, windows)
    for variant, engine in r.served():
        r.serve(variant, engine, windows)
    for s in r.plan.skipped:
        print(f"note: {s['variant']} not measured in runtime '{s['runtime']}' ({s['purpose']}): {s['reason']}")
    res = collect(r, recipe_path)
    add_predictions(r, res)
    return write_outputs(r, res, time.perf_counter() - started)


def _run_on_ray(r: Run, config: Any, cluster: dict[str, Any], recipe_path: str, started: float) -> Results:
    """The stages as Ray tasks (distributed.py), then the serve stages here, then the outputs."""
    from quantpipe.pipeline import distributed

    nodes = cluster["nodes"]
    print(f"Ray cluster {cluster['address']}: {len(nodes)} node(s), "
          + ", ".join(f"{n['NodeManagerAddress']} ({n['Resources'].get('CPU', 0):g} CPU, "
                      f"{n['Resources'].get('GPU', 0):g} GPU)" for n in nodes)
          + (f"; dashboard http://{cluster['dashboard']}" if cluster["dashboard"] else ""))
    distributed.check_shared(r.dir, nodes)
    r.cluster_address = cluster["address"]
    r.failed = distributed.run_stages(r, config, cluster)
    if config is None:
        from transformers import AutoConfig

        check_shapes(r.recipe, AutoConfig.from_pretrained(r.artifact_dir(r.recipe.reference)))
    windows = r.results["eval-tokens"]["windows"]
    failed = {f["variant"] for f in r.failed}
    for variant, engine in r.served():
        if variant.name not in failed:
            r.serve(variant, engine, windows)
    res = collect(r, recipe_path)
    add_predictions(r, res)
    typed = write_outputs(r, res, time.perf_counter() - started)
    if r.failed:
        raise QuantpipeError("; ".join(f"variant '{f['variant']}' failed at its {f['stage']} task on {f['node']}: "
                                       f"{f['error']}" for f in r.failed)
                             + " (the other variants' results are written: results.json, matrix.md)")
    return typed


def preflight(recipe: Recipe) -> Any:
    """Checks that need no work: every method's libraries are installed and its params fit the model's shapes
    (read from the config alone). Returns the config, or None where it cannot be had offline."""
    if recipe.model.trust_remote_code:
        print(f"warning: {TRUST_WARNING}")
    for v in recipe.variants:
        get_method(v.method).require(v.name, v.params)
    if recipe.eval.lm_eval is not None:
        lmeval.check_tasks(recipe.eval.lm_eval)
    if recipe.serve is not None:
        check_engines(recipe)
    config = check_shapes(recipe)
    if config is not None:
        check_bounds(recipe, config)
        for line in plan.calibration_warnings(recipe, config):
            print(f"warning: {line}")
    return config


def check_engines(recipe: Recipe) -> None:
    """Every engine the serve block names, and GuideLLM, is installed (each in its own environment)."""
    from quantpipe import runtimes
    from quantpipe.serving import engines

    assert recipe.serve is not None
    device = runtimes.pick_device(recipe.bench.device)
    for name in recipe.serve.engines:
        engines.get_engine(name).env(device).require(f"serve.engines: {name}")
    engines.GUIDELLM.require("serve (the load test)")


def check_bounds(recipe: Recipe, config: Any) -> None:
    """Sizes checked before any work, from the config alone: the sequences the run makes fit the model's context
    (eval windows, bench prompt + new tokens), and the bench's largest batch fits
    this machine's memory (`quantpipe plan`'s arithmetic for the baseline, the biggest variant)."""
    from quantpipe import runtimes

    limit = int(getattr(config, "max_position_embeddings", 0) or 0)
    b = recipe.bench
    lengths = [("eval.window", recipe.eval.window, recipe.eval.enabled)]
    lengths.append(("bench.prompt_len + bench.gen_len", b.prompt_len + b.gen_len, b.enabled))
    if recipe.serve is not None:
        s = recipe.serve
        lengths.append(("serve.prompt_tokens + serve.output_tokens (+16)", s.needed_context(recipe.eval.window),
                        True))
        if s.max_model_len:
            lengths.append(("serve.max_model_len", s.max_model_len, True))
    for field, n, on in lengths:
        if on and limit and n > limit:
            raise QuantpipeError(f"{field}: {n} tokens is longer than the model's context (max_position_embeddings "
                                 f"{limit}); lower it")
    if not b.enabled:
        return
    try:
        s = plan.shapes(config)
    except QuantpipeError:  # a model family plan does not know: no estimate
        return
    import torch

    if b.device == "cuda" and not torch.cuda.is_available():
        return  # a GPU recipe checked on a machine without one: its memory is the GPU's, not known here
    ref = recipe.reference
    device = runtimes.pick_device(b.device)
    storage = get_method(ref.method).storage(ref.params, recipe.model.dtype)
    need = plan.bench_memory(s, storage, recipe.model.dtype, device, b.model_dump(mode="json"))["total"]
    where, have = plan.available_memory()
    if need > have:
        raise QuantpipeError(f"bench.batch_sizes: batch {max(b.batch_sizes)} of {b.prompt_len} + {b.gen_len} tokens "
                             f"needs about {need / 2**30:.1f} GiB for the baseline (weights, KV cache, activations: "
                             f"`quantpipe plan`) and this machine has {have / 2**30:.1f} GiB of {where}; lower "
                             "bench.batch_sizes, prompt_len or gen_len")


def check_shapes(recipe: Recipe, config: Any = None) -> Any:
    """Raise when a variant's params do not fit the model's shapes. `config` defaults to the source's, read
    without weights; returns it, or None where it cannot be had offline (then nothing is checked)."""
    if config is None:
        config = sources.load_config(recipe.model)
    problems = check_against_model(recipe, config) if config is not None else []
    if problems:
        raise QuantpipeError("; ".join(problems))
    return config
