"""Loading a recipe: YAML to the typed schema, every relative path made absolute once (from the working
directory), each variant's params validated by its method, the files the run will read checked, and every
problem reported as `field: message` naming the fix (QuantpipeError, exit 2), never a traceback.
"""

from __future__ import annotations

import codecs
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from quantpipe.errors import QuantpipeError, first_line, location
from quantpipe.recipe.schema import Recipe, absolute


def _arch_is_path(arch: str) -> bool:
    """model.arch names a config.json (or a folder holding one) rather than a shipped architecture."""
    return arch.endswith(".json") or Path(os.path.expanduser(arch)).is_dir()


def resolve_paths(recipe: Recipe, base: Path | None = None) -> Recipe:
    """A copy of the recipe whose every path is absolute, relative ones taken from `base` (default the working
    directory): output.dir (runs/<name> when unset), model.path, model.arch when it is a config file,
    calibration.files, eval.text and eval.lm_eval.include_path. Done once, when the recipe loads; the run
    records these absolute paths (results.json, manifest.json)."""
    r = recipe.model_copy(deep=True)
    r.output.dir = str(absolute(r.output.dir or f"runs/{r.name}", base))
    if r.model.path:
        r.model.path = str(absolute(r.model.path, base))
    if r.model.arch and _arch_is_path(r.model.arch):
        r.model.arch = str(absolute(r.model.arch, base))
    r.calibration.files = [str(absolute(f, base)) for f in r.calibration.files]
    if r.eval.text != "bundled":
        r.eval.text = str(absolute(r.eval.text, base))
    if r.eval.lm_eval is not None:
        r.eval.lm_eval.include_path = [str(absolute(d, base)) for d in r.eval.lm_eval.include_path]
    return r


def _loc(loc: tuple[Any, ...], data: Any) -> str:
    """Turn a pydantic error location into `variants[1](q).bits`, naming the variant where possible."""
    return location(loc, data, "recipe")


def _format(err: ValidationError, data: Any, prefix: str = "") -> list[str]:
    lines = []
    for e in err.errors():
        loc = [p for p in e["loc"] if not (isinstance(p, str) and p.startswith("function-"))]
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key; remove it or check its spelling"
        elif e["type"] == "missing":
            msg = "required field is missing"
        elif e["type"] == "literal_error":
            msg = msg.replace("Input should be", "must be")
        where = _loc(tuple(loc), data)
        lines.append(f"{prefix}{where}: {msg}")
    return lines


def _shown(given: str, resolved: str) -> str:
    """A path as the recipe wrote it, and where it was looked for when that differs."""
    return f"'{given}'" if given == resolved else f"'{given}' ({resolved})"


def parse_recipe(data: Any, origin: str = "recipe", base: Path | None = None) -> Recipe:
    """Validate a recipe mapping, including every variant's method parameters; raise QuantpipeError. Relative
    paths in it are made absolute from `base` (default the working directory): see resolve_paths."""
    from quantpipe.methods import check_params

    if not isinstance(data, dict):
        raise QuantpipeError(f"{origin}: the recipe must be a YAML mapping with keys name, model, variants, ...")
    try:
        given = Recipe.model_validate(data)
    except ValidationError as e:
        raise QuantpipeError(f"{origin} is invalid:\n  " + "\n  ".join(_format(e, data))) from None
    recipe = resolve_paths(given, base)
    problems: list[str] = []
    for i, v in enumerate(recipe.variants):
        v._params, errors = check_params(v.method, v.raw_params)
        problems += [f"variants[{i}]({v.name}).{p}" for p in errors]
    problems += _runtime_problems(recipe)
    if recipe.calibration.source == "files":
        for f, p in zip(given.calibration.files, recipe.calibration.files, strict=True):
            problems += _text_file_problems("calibration.files", f, p)
    if recipe.eval.text != "bundled":
        problems += _text_file_problems("eval.text", given.eval.text, recipe.eval.text)
    if recipe.eval.lm_eval is not None and given.eval.lm_eval is not None:
        for d, p in zip(given.eval.lm_eval.include_path, recipe.eval.lm_eval.include_path, strict=True):
            if not Path(p).is_dir():
                problems.append(f"eval.lm_eval.include_path: {_shown(d, p)} is not a directory")
    if recipe.model.path and not Path(recipe.model.path).exists():
        problems.append(f"model.path: {_shown(given.model.path or '', recipe.model.path)} does not exist")
    if recipe.model.arch:
        problems += _random_model_problems(recipe)
    if problems:
        raise QuantpipeError(f"{origin} is invalid:\n  " + "\n  ".join(problems))
    return recipe


def _text_file_problems(field: str, given: str, path: str) -> list[str]:
    """A text file the run will read: it exists and is UTF-8 (checked now, not after the baseline stage)."""
    p = Path(path)
    if not p.is_file():
        return [f"{field}: file {_shown(given, path)} does not exist"]
    try:
        with open(p, "rb") as fh:
            decoder, offset = codecs.getincrementaldecoder("utf-8")(), 0
            for block in iter(lambda: fh.read(1 << 20), b""):
                try:
                    decoder.decode(block)
                except UnicodeDecodeError as e:
                    return [f"{field}: file {_shown(given, path)} is not UTF-8 text (byte {offset + e.start}: "
                            f"{block[e.start:e.start + 4]!r}); save it as UTF-8"]
                offset += len(block)
            decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return [f"{field}: file {_shown(given, path)} ends inside a UTF-8 character; save it as UTF-8"]
    except OSError as e:
        return [f"{field}: file {_shown(given, path)} cannot be read ({e.strerror})"]
    return []


def _runtime_problems(recipe: Recipe) -> list[str]:
    """Every runtime named in eval.runtimes and bench.runtimes is 'auto', 'natural' or registered."""
    from quantpipe import runtimes

    known = runtimes.all_runtimes()
    out = []
    for field, names in (("eval.runtimes", recipe.eval.runtimes), ("bench.runtimes", recipe.bench.runtimes)):
        for n in names:
            if n not in known and n not in PSEUDO_RUNTIMES:
                out.append(f"{field}: unknown runtime '{n}'; use auto, natural or a registered runtime "
                           f"({', '.join(known)})")
    return out


PSEUDO_RUNTIMES = ("auto", "natural")


def _random_model_problems(recipe: Recipe) -> list[str]:
    """The architecture must be known, and every method must run without a tokenizer (a random-weight model has
    none): the formats converted for llama.cpp and ONNX Runtime need one."""
    from quantpipe import archs
    from quantpipe.artifact import TRANSFORMERS_FORMATS
    from quantpipe.methods import get_method

    problems = []
    try:
        archs.config_from(recipe.model.arch or "")
    except QuantpipeError as e:
        problems.append(str(e))
    for i, v in enumerate(recipe.variants):
        if v._params is not None and get_method(v.method).format(v._params) not in TRANSFORMERS_FORMATS:
            problems.append(f"variants[{i}]({v.name}).method: '{v.method}' converts the tokenizer too, and a "
                            "random-weight model (model.weights: random) has none; use the methods served by "
                            "transformers (baseline, int8, gptq, awq, smoothquant)")
    return problems


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe file; every failure is a QuantpipeError naming the field."""
    p = Path(path)
    if not p.is_file():
        raise QuantpipeError(f"recipe file '{p}' does not exist")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or first_line(e)
        raise QuantpipeError(f"{p}: YAML syntax error{where}: {problem}") from None
    except UnicodeDecodeError:
        raise QuantpipeError(f"{p}: not a UTF-8 text file") from None
    except RecursionError:
        raise QuantpipeError(f"{p}: nested too deeply to be a recipe") from None
    try:
        return parse_recipe(data, origin=str(p))
    except RecursionError:
        raise QuantpipeError(f"{p}: nested too deeply to be a recipe") from None
