"""lm-evaluation-harness on every artifact format: the lm-eval stage (tasks, scores, recovery vs the baseline).

The model lm-eval talks to is `lm_adapter.RuntimeLM`: lm-eval's `loglikelihood`, `loglikelihood_rolling` and
`generate_until` over nothing but the runtime contract and the baseline's tokenizer, so every runtime's rows are
scored by the same harness on the same token ids. Generation is greedy (the contract's); a task that asks to
sample is scored greedily and says so in its result.

Model responses are cached per artifact in a SQLite file of JSON values (`ResponseCache`), so a re-run, or a
run that adds a task, only computes what is new; nothing is unpickled. lm-eval's own request-building cache
stores pickles and is off unless the recipe sets `cache_requests: true`.

The bundled tasks live in `evals/lm_eval/` (task YAMLs over jsonl files that scripts/make_eval_tasks.py
generated); `prepare_tasks` copies them with their data paths made absolute, so they run fully offline.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from quantpipe import data
from quantpipe.cache import write_text
from quantpipe.errors import QuantpipeError, first_line
from quantpipe.lm_responses import ADAPTER_VERSION, ResponseCache  # noqa: F401 - the stage keys read it here


def bundled_dir() -> Path:
    return data.data_dir("evals", "lm_eval")


def _yaml_tasks(directory: Path) -> dict[str, Path]:
    """{task, tag or group name: YAML file} of the task YAMLs in a directory tree (unparsable files skipped)."""
    out: dict[str, Path] = {}
    for path in sorted(directory.rglob("*.yaml")):
        try:
            cfg = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)
        except (yaml.YAMLError, OSError, UnicodeDecodeError):
            continue
        except RecursionError:  # lm-eval would crash on it too
            raise QuantpipeError(f"eval.lm_eval.include_path: {path} is nested too deeply to be a task YAML") from None
        if not isinstance(cfg, dict):
            continue
        names = [cfg.get("task"), cfg.get("group")]
        tags = cfg.get("tag") or []
        names += [tags] if isinstance(tags, str) else list(tags)
        for n in names:
            if isinstance(n, str):
                out.setdefault(n, path)
    return out


class _Loader(yaml.SafeLoader):
    """Safe YAML that tolerates lm-eval's `!function module.name` tags (read as plain strings)."""


_Loader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))


def bundled_tasks() -> dict[str, Path]:
    """{name: YAML} of quantpipe's offline tasks (and their tag `quantpipe`)."""
    return _yaml_tasks(bundled_dir())


def prepare_tasks(tasks: list[str], include_path: list[str], work: Path) -> tuple[list[str], bool, str]:
    """Write the bundled task YAMLs with absolute data paths into `work`; return (include paths for lm-eval's
    TaskManager, whether lm-eval's built-in tasks must be indexed, a digest of every local task file used)."""
    work.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()
    src = bundled_dir()
    for path in sorted(src.glob("*.yaml")):
        cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
        files = (cfg.get("dataset_kwargs") or {}).get("data_files") or {}
        for split, rel in files.items():
            data = src / Path(rel).name
            files[split] = str(data)
            h.update(data.read_bytes())
        # atomically: the Ray executor's tasks prepare the same files at once, and read them
        write_text(work / path.name, yaml.safe_dump(cfg, sort_keys=False))
        h.update(path.read_bytes())
    local = set(bundled_tasks())
    for p in include_path:
        d = Path(p)
        local |= set(_yaml_tasks(d))
        for f in sorted(d.rglob("*")):
            if f.is_file() and f.suffix in (".yaml", ".jsonl", ".json", ".py", ".txt", ".csv"):
                h.update(f.name.encode() + f.read_bytes())
    return [str(work), *include_path], any(t not in local for t in tasks), h.hexdigest()


def make_lm(runtime: Any, tokenizer: Any, max_length: int, max_gen_toks: int | None = None,
            cache: ResponseCache | None = None) -> Any:
    """An lm-eval model over a loaded quantpipe runtime (lm_adapter.py; it imports lm-eval, so only here)."""
    from quantpipe.lm_adapter import RuntimeLM

    return RuntimeLM(runtime, tokenizer, max_length, max_gen_toks, cache)


@contextlib.contextmanager
def _quiet(offline: bool) -> Iterator[None]:
    """lm-eval and datasets log at INFO and draw progress bars; the run prints one line per stage. Offline
    tasks also set the hub's offline switches, so nothing tries the network."""
    saved = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TQDM_DISABLE")}
    os.environ["TQDM_DISABLE"] = "1"
    if offline:
        os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"
    levels = {name: logging.getLogger(name).level for name in ("lm_eval", "lm-eval", "datasets")}
    for name in levels:
        logging.getLogger(name).setLevel(logging.ERROR)
    import lm_eval.api.task as task_module  # its request-building bar takes no `disable` argument

    bar = task_module.tqdm
    task_module.tqdm = lambda it=None, *a, **k: it
    try:
        import datasets

        datasets.disable_progress_bars()
        datasets.config.HF_DATASETS_OFFLINE = offline or datasets.config.HF_DATASETS_OFFLINE
        yield
    finally:
        task_module.tqdm = bar
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def primary_metric(task_results: dict[str, Any], wanted: str | None) -> tuple[str, str]:
    """(metric, filter) reported for a task: `wanted` (a metric name, optionally `name,filter`), else the
    task's first metric with a value; lm-eval keys results as 'metric,filter'."""
    keys = [k for k in task_results if "," in k and "_stderr" not in k and k != "alias"]
    if wanted:
        match = [k for k in keys if k == wanted or k.split(",")[0] == wanted]
        if not match:
            have = sorted({k.split(",")[0] for k in keys})
            raise QuantpipeError(f"eval.lm_eval.metrics: the task has no metric '{wanted}'; it has {', '.join(have)}")
        keys = match
    if not keys:
        raise QuantpipeError("lm-eval returned no metric for a task")
    metric, filt = keys[0].split(",", 1)
    return metric, filt


def evaluate(runtime: Any, tokenizer: Any, spec: Any, work: Path, cache_path: Path | None) -> dict[str, Any]:
    """Run lm-eval's `simple_evaluate` with the runtime as the model; return {task: score dict}, plus
    '_meta' with the harness version, request counts and cache hits."""
    import importlib.metadata

    include, needs_defaults, _ = prepare_tasks(spec.tasks, spec.include_path, work / "tasks")
    if spec.cache_requests:
        os.environ["LM_HARNESS_CACHE_PATH"] = str(work / "requests")
    cache = ResponseCache(cache_path)
    lm = make_lm(runtime, tokenizer, spec.max_length, spec.max_gen_toks, cache)
    with _quiet(offline=not needs_defaults):
        from lm_eval import simple_evaluate
        from lm_eval.tasks import TaskManager

        tm = TaskManager(include_path=include, include_defaults=needs_defaults)
        _require_known(spec.tasks, tm.all_tasks)
        try:
            res = simple_evaluate(
                model=lm, tasks=list(spec.tasks), num_fewshot=spec.num_fewshot, limit=spec.limit,
                task_manager=tm, cache_requests=spec.cache_requests, log_samples=True,
                random_seed=spec.seed, numpy_random_seed=spec.seed, torch_random_seed=spec.seed,
                fewshot_random_seed=spec.seed, bootstrap_iters=spec.bootstrap_iters)
        except QuantpipeError:
            raise
        except Exception as e:  # a task that needs the hub while offline, a broken task YAML, ...
            first = first_line(e)
            net = any(w in f"{type(e).__name__} {first}".lower() for w in ("offline", "connect", "reach", "hub"))
            hint = "; lm-eval's own tasks need network access or their datasets in the HF cache" if (
                needs_defaults and net) else ""
            raise QuantpipeError(f"lm-eval failed: {type(e).__name__}: {first}{hint}") from None
        finally:
            cache.close()
    scores = {}
    for task in sorted(res["results"]):
        if task not in res.get("samples", {}):
            continue  # a group or tag line: its member tasks carry the scores
        tr = res["results"][task]
        metric, filt = primary_metric(tr, spec.metrics.get(task))
        value, se = tr.get(f"{metric},{filt}"), tr.get(f"{metric}_stderr,{filt}")
        samples = sorted(res["samples"][task], key=lambda s: s["doc_id"])
        per_doc = [float(s[metric]) if s.get(metric) is not None else None for s in samples]
        hib = (res.get("higher_is_better", {}).get(task) or {}).get(metric, True)
        cfg = res.get("configs", {}).get(task, {})
        scores[task] = {
            "metric": metric, "filter": filt, "value": _num(value), "stderr": _num(se),
            "higher_is_better": bool(hib), "n": len(samples), "num_fewshot": res.get("n-shot", {}).get(task),
            "output_type": cfg.get("output_type"),
            "all_metrics": {k: _num(v) for k, v in tr.items() if "," in k and isinstance(v, (int, float))},
            "per_doc": per_doc,
        }
    return {"tasks": scores, "_meta": {
        "lm_eval_version": importlib.metadata.version("lm-eval"), "adapter_version": ADAPTER_VERSION,
        "forwards": lm.forwards, "cache_hits": cache.hits, "cache_misses": cache.misses,
        "sampled_requests_scored_greedily": lm.sampled_requests, "decoding": "greedy"}}


def _num(x: Any) -> float | None:
    try:
        f = float(x)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def recovery(v: dict[str, Any], base: dict[str, Any]) -> tuple[float | None, float | None]:
    """Score recovery (variant / baseline, or baseline / variant for lower-is-better metrics) and its standard
    error from the per-document differences (paired: both rows scored the same documents), delta method."""
    x, b = v.get("value"), base.get("value")
    if x is None or not b:
        return None, None
    hib = base.get("higher_is_better", True)
    if not hib and not x:
        return None, None
    r = x / b if hib else b / x
    pv, pb = v.get("per_doc") or [], base.get("per_doc") or []
    if len(pv) != len(pb) or len(pv) < 2 or any(a is None for a in pv + pb):
        return r, None
    # r = mean(x)/mean(b): var(r) ≈ var(x_i - r b_i) / (n mean(b)^2) (ratio estimator), paired by document
    if not hib:
        pv, pb = pb, pv
    n, mb = len(pv), sum(pb) / len(pb)
    d = [xi - r * bi for xi, bi in zip(pv, pb, strict=True)]
    md = sum(d) / n
    var = sum((di - md) ** 2 for di in d) / (n - 1)
    return r, math.sqrt(var / n) / abs(mb) if mb else None


def check_tasks(spec: Any) -> None:
    """Before any work: lm-eval is installed and every task name is known (bundled, include_path, or lm-eval's
    own, whose index takes a few seconds to build)."""
    import importlib.util
    import tempfile

    if importlib.util.find_spec("lm_eval") is None:
        raise QuantpipeError("eval.lm_eval needs EleutherAI's lm-evaluation-harness: pip install 'quantpipe[eval]'")
    with tempfile.TemporaryDirectory() as tmp:
        include, needs_defaults, _ = prepare_tasks(spec.tasks, spec.include_path, Path(tmp))
        if not needs_defaults:
            return
        with _quiet(offline=False):
            from lm_eval.tasks import TaskManager

            _require_known(spec.tasks, TaskManager(include_path=include, include_defaults=True).all_tasks)


def _require_known(tasks: list[str], known: Any) -> None:
    unknown = [t for t in tasks if t not in known]
    if unknown:
        raise QuantpipeError(f"eval.lm_eval.tasks: unknown task {', '.join(unknown)}; bundled (offline): "
                             f"{', '.join(sorted(bundled_tasks()))}; lm-eval's own: `lm_eval ls tasks`")


def add_recoveries(variants: list[dict[str, Any]], reference: str) -> None:
    """Give every variant's lm-eval task scores their recovery against the reference's (and its stderr)."""
    base = next((v.get("lm_eval") or {} for v in variants if v["name"] == reference), {})
    for v in variants:
        for task, score in (v.get("lm_eval") or {}).items():
            b = base.get(task)
            if b is None or b.get("metric") != score.get("metric"):
                score["recovery"] = score["recovery_se"] = None
                continue
            score["recovery"], score["recovery_se"] = recovery(score, b)
