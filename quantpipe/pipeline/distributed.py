"""`quantpipe run --executor ray`: a recipe's variants in parallel on a Ray cluster, through the same stages, cache
keys and stage records as one process, so the results are the same and a local re-run finds every stage cached.

Route: the head (the `quantpipe run` process) connects, checks that every node sees the run directory, runs the
preflight, then sends Ray tasks: first the reference's (quantize the baseline, the eval token ids, the
calibration ids, the reference's eval: every other row is scored against it), then for every other variant a
chain of three tasks (quantize -> eval and lm-eval of its rows -> bench of its rows) and the reference's own
lm-eval and bench, all chains at once. A task rebuilds the `Run` on its node, takes the stage keys and records
it depends on from its arguments, runs its stages (each writes its cache record and artifact into the shared run
directory, atomically, as locally) and returns the records; the head merges them, prints one line per stage with
the node that ran it, runs the serve stages itself, and writes results.json and the matrix from the merged
records.

Resources come from `quantpipe plan`: on a GPU every task takes a whole GPU (so two benches, or a bench and a
quantization, never share one); on CPUs every task asks for as many CPUs as a local run uses threads (the head's
OMP_NUM_THREADS, else its cores; `bench.threads` for a bench): Ray gives the task that many threads, so the
float sums, and the results, are the local run's on a node like the head, and tasks do not share cores. A
quantization also asks for the memory plan predicts for it (calibration included), a bench for the memory of its
largest batch. A worker or node that dies is retried
elsewhere (`execution.max_retries`): the stage is redone from scratch (its temp directory is never reused).
A task that fails with an error is not retried: that variant's later stages are not run, its rows say why, and
the other variants finish.

The run directory must be on a filesystem every node sees (NFS or the like): artifacts and stage records are
written where the stage runs, and the head reads them; the head checks this before any work.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from pathlib import Path
from typing import Any

from quantpipe.errors import QuantpipeError, first_line

RAY_VERSION = "2.60.0"
# environment a task needs from the head: the caches and offline switches
ENV_PREFIXES = ("QUANTPIPE_", "HF_", "TRANSFORMERS_", "TORCH_", "OMP_", "MKL_")


# -- the cluster ---------------------------------------------------------------------------------------------------
def ray_module() -> Any:
    try:
        import ray
    except ImportError:
        raise QuantpipeError(f"execution.executor: ray needs Ray, which is not installed: pip install "
                             f"'ray=={RAY_VERSION}' (or the project's `ray` extra)") from None
    return ray


def _reachable(address: str) -> None:
    """For HOST:PORT addresses: a TCP connection within 5 s, so an unreachable cluster is one line, at once."""
    hostport = address.removeprefix("ray://")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as e:
        raise QuantpipeError(f"execution.address: the Ray cluster at {address} cannot be reached ({e.strerror or e});"
                             " start it (`ray start --head`) or fix the address") from None


def connect(address: str | None) -> dict[str, Any]:
    """Join the cluster at `address` (None: start a Ray instance on this machine). Returns what the run prints:
    the address, the dashboard's URL where there is one, the alive nodes."""
    ray = ray_module()
    if address and address != "auto":
        _reachable(address)
    env = {k: v for k, v in os.environ.items() if k.startswith(ENV_PREFIXES)}
    try:
        ctx = ray.init(address=address, log_to_driver=False, ignore_reinit_error=True, namespace="quantpipe",
                       runtime_env={"env_vars": env} if env else None)
    except Exception as e:  # ConnectionError, RuntimeError, ValueError: Ray's words, one line
        raise QuantpipeError(f"execution.address: cannot join the Ray cluster at {address or 'a new local one'}: "
                             f"{first_line(e)}") from None
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    return {"address": getattr(ctx, "address_info", {}).get("address") or address,
            "dashboard": getattr(ctx, "dashboard_url", None) or None, "nodes": nodes}


def node_info() -> dict[str, Any]:
    """The node a task runs on: host name, IP, Ray's node id and the GPUs Ray gave the task."""
    import ray

    gpus = [str(g) for g in ray.get_gpu_ids()]
    ip = ray.util.get_node_ip_address()
    name = socket.gethostname() + (f" ({ip})" if ip else "") + (f" GPU {','.join(gpus)}" if gpus else "")
    return {"name": name, "host": socket.gethostname(), "ip": ip,
            "node_id": ray.get_runtime_context().get_node_id(), "gpus": gpus}


def _probe(path: str) -> dict[str, Any]:
    return {"sees": Path(path).is_file(), **node_info()}


def check_shared(run_dir: Path, nodes: list[dict[str, Any]]) -> None:
    """Every alive node reads a file the head just wrote into the run directory; else one line naming the node."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    probe = run_dir / ".quantpipe" / f"shared-{uuid.uuid4().hex[:8]}"
    probe.parent.mkdir(parents=True, exist_ok=True)
    probe.write_text("quantpipe")
    try:
        remote = ray.remote(num_cpus=0)(_probe)
        refs = [remote.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(
            str(probe)) for n in nodes]
        for seen in ray.get(refs, timeout=120):
            if not seen["sees"]:
                raise QuantpipeError(f"--executor ray: node {seen['name']} does not see the run directory {run_dir}; "
                                     "put it on a filesystem every node mounts at the same path (output.dir, --out)")
    finally:
        probe.unlink(missing_ok=True)


# -- resources -----------------------------------------------------------------------------------------------------
def resources(r: Any, variant: Any, kind: str, config: Any) -> dict[str, Any]:
    """Ray's resource request of a task (`kind`: quantize, measure, bench) from `quantpipe plan`'s predictions."""
    from quantpipe import plan
    from quantpipe.methods import get_method

    if r.device == "cuda":
        return {"num_gpus": 1, "num_cpus": 1}
    recipe = r.recipe
    # as many CPUs as the stage's threads, which are the local run's: Ray sets a task's OMP_NUM_THREADS to its
    # num_cpus, and a calibrated method's float sums depend on the thread count (GPTQ on 1 thread gave another
    # SmolLM2 KLD than on 2), so fewer would change the numbers, more would oversubscribe
    out: dict[str, Any] = {"num_cpus": head_threads()}
    try:
        s = plan.shapes(config) if config is not None else None
    except QuantpipeError:  # a family plan does not know: no memory request
        s = None
    if s is not None and kind == "quantize":
        cal = recipe.calibration
        need = plan.quantize_memory(s, get_method(variant.method), variant.params, recipe.model.dtype, cal.n_samples,
                                    cal.seq_len)
        if need is not None:
            out["memory"] = need["total"]
    elif s is not None and kind == "bench":
        storage = get_method(variant.method).storage(variant.params, recipe.model.dtype)
        out["memory"] = plan.bench_memory(s, storage, recipe.model.dtype, r.device,
                                          recipe.bench.model_dump(mode="json"))["total"]
    if kind == "bench" and recipe.bench.threads:
        out["num_cpus"] = recipe.bench.threads
    return out


def omp_threads() -> int | None:
    """OMP_NUM_THREADS where it is set to a positive count (Ray sets it in a task to the task's num_cpus)."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    return int(env) if env.isdigit() and int(env) > 0 else None


def head_threads() -> int:
    """The threads a local run of this machine uses: OMP_NUM_THREADS where set, else torch's default (the
    cores)."""
    import torch

    return omp_threads() or torch.get_num_threads()


def fit_to_cluster(req: dict[str, Any], nodes: list[dict[str, Any]], what: str) -> dict[str, Any]:
    """A request no node could ever hold would wait forever: CPUs and memory are capped at the largest node's
    (with a note); a GPU request on a cluster without GPUs is an error."""
    largest = {k: max((n["Resources"].get(k, 0) for n in nodes), default=0) for k in ("CPU", "GPU", "memory")}
    out = dict(req)
    if req.get("num_gpus") and largest["GPU"] < req["num_gpus"]:
        raise QuantpipeError(f"--executor ray: {what} needs a GPU (bench.device) and no node of the cluster has one")
    if out.get("num_cpus", 0) > largest["CPU"]:
        out["num_cpus"] = largest["CPU"]
    if out.get("memory", 0) > largest["memory"] > 0:
        print(f"note: {what}: plan predicts {out['memory'] / 2**30:.1f} GiB, more than any node offers Ray "
              f"({largest['memory'] / 2**30:.1f} GiB); asking for that")
        out["memory"] = largest["memory"]
    return out


# -- the tasks -----------------------------------------------------------------------------------------------------
def task(kind: str, recipe: Any, run_dir: str, force: bool, variant: str, windows: list[list[int]] | None,
         calib: Any, *states: dict[str, Any]) -> dict[str, Any]:
    """One Ray task: rebuild the run on this node, take the records it depends on (`states`: the returns of the
    tasks before it, which Ray hands over once they finished), run its stages, return their records (cached
    ones included) and the log. `kind`: reference, quantize, measure or bench."""
    from quantpipe.pipeline.stages import Run

    threads = omp_threads()  # Ray's: the task's num_cpus
    if threads:
        import torch

        torch.set_num_threads(threads)  # a reused worker keeps the count of the task before
    r = Run(recipe, Path(run_dir), force)
    for st in states:
        r.keys.update(st["keys"])
        r.results.update(st["results"])
    r.node = node_info()
    v = next(x for x in recipe.variants if x.name == variant)
    rows = [row for row in r.plan.rows if row.variant.name == variant]
    if kind == "reference":
        r.quantize(v, None)
        windows = r.eval_tokens()
        if r.uses_calibration:
            r.calibration_ids()
        r.evaluate(r.ref_row, windows)
    elif kind == "quantize":
        r.quantize(v, calib)
    elif kind == "measure":
        for row in rows:
            if row is not r.ref_row:
                r.evaluate(row, windows or [])
        for row in rows:
            r.lm_eval(row)
    elif kind == "bench":
        for row in rows:
            r.bench(row, windows or [])
    made = {e["stage"] for e in r.log}
    return {"keys": {k: r.keys[k] for k in made}, "results": {k: r.results[k] for k in made}, "log": r.log,
            "node": r.node}


def run_stages(r: Any, config: Any, cluster: dict[str, Any]) -> list[dict[str, str]]:
    """Every stage but serving, as Ray tasks; merges their records into `r`. Returns the failed variants:
    [{variant, stage, node, error}]."""
    import ray

    recipe, nodes = r.recipe, cluster["nodes"]
    retries = recipe.execution.max_retries
    remote = ray.remote(task)
    ref = recipe.reference

    def submit(kind: str, variant: Any, deps: list[Any], windows: Any = None, calib: Any = None) -> Any:
        req = fit_to_cluster(resources(r, variant, "quantize" if kind == "reference" else kind, config), nodes,
                             f"{kind} of {variant.name}")
        return remote.options(max_retries=retries, retry_exceptions=False, name=f"{kind}:{variant.name}",
                              **req).remote(kind, recipe, str(r.dir), r.force, variant.name, windows, calib, *deps)

    failed: list[dict[str, str]] = []
    start = time.perf_counter()
    first = submit("reference", ref, [])
    done = _wait([first], {first: ("reference", ref.name)}, r, failed, start)
    if failed:  # nothing can be measured without the baseline and the reference's log-probs
        raise QuantpipeError(f"the reference '{ref.name}' failed on {failed[0]['node']}: {failed[0]['error']}")
    base = done[first]
    windows = r.results["eval-tokens"]["windows"]
    calib = r.load_calibration_ids() if r.uses_calibration else None
    refs: dict[Any, tuple[str, str]] = {}
    for v in recipe.variants:
        deps = [base]  # the reference's records hold its quantize stage too
        if v.name != ref.name:
            q = submit("quantize", v, [base], calib=calib)
            refs[q] = ("quantize", v.name)
            deps.append(q)
        m = submit("measure", v, deps, windows)
        b = submit("bench", v, [*deps, m], windows)
        refs[m], refs[b] = ("measure", v.name), ("bench", v.name)
    _wait(list(refs), refs, r, failed, start)
    return failed


def _wait(pending: list[Any], names: dict[Any, tuple[str, str]], r: Any, failed: list[dict[str, str]],
          start: float) -> dict[Any, dict[str, Any]]:
    """Collect tasks as they finish: merge their records into `r`, print one line per stage with its node; a
    failed task's variant goes into `failed` once (its later tasks fail with the same cause)."""
    import ray

    out: dict[Any, dict[str, Any]] = {}
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        kind, variant = names[ready[0]]
        try:
            got = ray.get(ready[0])
        except Exception as e:  # RayTaskError (the stage raised) or a worker lost beyond its retries
            if not any(f["variant"] == variant for f in failed):
                failed.append(_failure(kind, variant, e))
                print(f"{kind}:{variant}: FAILED on {failed[-1]['node']}: {failed[-1]['error']}", flush=True)
            continue
        out[ready[0]] = got
        r.keys.update(got["keys"])
        r.results.update(got["results"])
        for e in got["log"]:
            how = "cached" if e["status"] == "cached" else f"{e['status']} in {e.get('wall_s', 0):.1f} s"
            print(f"[{time.perf_counter() - start:6.1f} s] {e['stage']}: {how} on {got['node']['name']}", flush=True)
    return out


def _failure(kind: str, variant: str, e: Exception) -> dict[str, str]:
    cause = getattr(e, "cause", None) or e
    text = first_line(cause) if str(cause) else type(cause).__name__
    node = "?"
    if "ip=" in str(e):  # RayTaskError names the worker: "... (pid=123, ip=10.0.0.2)"
        node = str(e).split("ip=", 1)[1].split(")", 1)[0]
    return {"variant": variant, "stage": kind, "node": node, "error": text}
