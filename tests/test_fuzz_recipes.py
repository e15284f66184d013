"""Property-based fuzzing of malformed recipes: every one exits 2 with one message naming the field, never a
traceback, through `quantpipe validate` and `quantpipe run` (which must refuse before any work)."""

from __future__ import annotations

import contextlib
import copy
import io
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quantpipe import cli, pipeline

EXAMPLES = 250  # fixed: the suite's run is reproducible (derandomize) and its time bounded


def base_recipe(tmp: Path) -> dict:
    model = tmp / "model"
    model.mkdir(exist_ok=True)
    return {
        "name": "fuzz",
        "model": {"path": str(model), "dtype": "float32"},
        "calibration": {"source": "bundled", "n_samples": 4, "seq_len": 64, "seed": 0},
        "variants": [
            {"name": "baseline", "method": "baseline"},
            {"name": "int8", "method": "int8", "scheme": "weight_only"},
            {"name": "gptq", "method": "gptq", "bits": 4, "group_size": 128},
            {"name": "gguf", "method": "gguf", "type": "Q8_0"},
            {"name": "onnx", "method": "onnx", "quantize": "dynamic"},
        ],
        "eval": {"text": "bundled", "window": 128, "max_tokens": 256,
                 "lm_eval": {"tasks": ["qp_copy"], "limit": 5}},
        "bench": {"device": "cpu", "prompt_len": 16, "gen_len": 8, "batch_sizes": [1], "repeats": 1},
        "output": {"dir": str(tmp / "run")},
        "gates": {"all": {"max_kld": 0.1}},
    }


# field paths whose value a fuzzed 'wrong type' replaces, with the kind of value they hold
FIELDS = {
    ("name",): "str", ("model", "dtype"): "str", ("model", "path"): "str", ("model", "trust_remote_code"): "bool",
    ("calibration", "source"): "str", ("calibration", "n_samples"): "int", ("calibration", "seq_len"): "int",
    ("calibration", "seed"): "int", ("eval", "window"): "int", ("eval", "max_tokens"): "int",
    ("eval", "text"): "str", ("eval", "lm_eval", "tasks"): "list", ("eval", "lm_eval", "limit"): "num",
    ("bench", "prompt_len"): "int", ("bench", "batch_sizes"): "list", ("bench", "repeats"): "int",
    ("bench", "device"): "str", ("gates", "all", "max_kld"): "num", ("variants",): "list",
    ("variants", 1, "scheme"): "str", ("variants", 2, "bits"): "int", ("variants", 2, "group_size"): "int",
    ("variants", 3, "type"): "str", ("variants", 4, "quantize"): "str", ("output", "dir"): "str",
    ("calibration",): "dict", ("eval",): "dict", ("bench",): "dict", ("model",): "dict",
}
# values no field of that kind accepts (pydantic's lax mode takes "yes" for a bool and "3" for an int)
WRONG = {
    "str": [{"a": 1}, [1, 2], 3.5, True],
    "bool": [{"a": 1}, [True], "maybe", 2.5],
    "int": [{"a": 1}, [1], "many", 2.5, -7],
    "num": [{"a": 1}, [0.1], "much", -1],
    "list": [{"a": 1}, 7, "x"],
    "dict": [[1, 2], 7, "x", True],
}
SECTIONS = [(), ("model",), ("calibration",), ("eval",), ("eval", "lm_eval"), ("bench",), ("output",),
            ("gates",), ("gates", "all"), ("variants", 0), ("variants", 1), ("variants", 2), ("variants", 4)]
REQUIRED = [("name",), ("model",), ("variants",), ("variants", 0, "name"), ("variants", 1, "method"),
            ("eval", "lm_eval", "tasks")]
IMPOSSIBLE = [
    (("variants", 2, "bits"), 3), (("variants", 2, "group_size"), 7), (("variants", 1, "scheme"), "int3"),
    (("variants", 3, "type"), "Q9_9"), (("variants", 4, "quantize"), "int2"), (("calibration", "n_samples"), 0),
    (("eval", "window"), 8), (("eval", "max_tokens"), 64), (("bench", "batch_sizes"), [0]),
    (("bench", "gen_len"), 1), (("calibration", "source"), "files"), (("model", "dtype"), "int4"),
    (("eval", "lm_eval", "limit"), 2.5), (("eval", "lm_eval", "metrics"), {"qp_order": "acc"}),
    (("gates", "variants"), {"nope": {"max_kld": 1}}), (("gates", "all", "min_top1"), 1.5),
    (("variants", 4, "calibrate_method"), "entropy"), (("variants", 0, "method"), "no-such-method"),
    (("variants", 1, "name"), "../escape"), (("variants", 1, "name"), "baseline"), (("variants",), []),
    (("name",), "bad name/with slash"), (("output",), {"dir": None, "extra": 1}),
]
MISSING_FILES = [(("eval", "text"), "/nonexistent/eval.txt"), (("model", "path"), "/nonexistent/model"),
                 (("calibration",), {"source": "files", "files": ["/nonexistent/c.txt"]}),
                 (("eval", "lm_eval", "include_path"), ["/nonexistent/tasks"])]
BROKEN_YAML = ["name: [unclosed\n", "variants:\n\t- {name: a}\n", "a: b: c\n", "- just\n- a list\n", "42\n", "",
               "name: x\nname: y\nmodel: {path: '", "variants: {name: a, method: baseline\n", "\x00\x01binary"]


DEEP_KEYS = ["zz_deep", "variants", "gates", "model"]  # where the nested value goes (top-level keys)


def deep_yaml(recipe: dict, key: str, depth: int) -> str:
    """The recipe as YAML with `key` holding lists nested `depth` deep (yaml.safe_dump would recurse itself)."""
    rest = {k: v for k, v in recipe.items() if k != key}
    return yaml.safe_dump(rest, sort_keys=False) + f"{key}: " + "[" * depth + "]" * depth + "\n"


def latin1_recipe(recipe: dict, tmp: Path, field: str, offset: int, byte: int) -> dict:
    """The recipe reading a copy of the bundled text with one non-UTF-8 byte inserted at `offset`."""
    from conftest import ROOT

    text = (ROOT / "calibration" / "default.txt").read_bytes()
    bad = tmp / "latin1.txt"
    bad.write_bytes(text[:offset] + bytes([byte]) + b" " + text[offset:])
    r = copy.deepcopy(recipe)
    if field == "eval.text":
        r["eval"]["text"] = str(bad)
    else:
        r["calibration"] = {"source": "files", "files": [str(bad)], "n_samples": 4, "seq_len": 64}
    return r


def _set(d: dict, path: tuple, value: object) -> None:
    for p in path[:-1]:
        d = d[p]
    d[path[-1]] = value


def _del(d: dict, path: tuple) -> None:
    for p in path[:-1]:
        d = d[p]
    del d[path[-1]]


@st.composite
def malformed(draw: st.DrawFn) -> tuple[str, object]:
    """(kind, mutation) where the mutation makes the base recipe invalid, whatever else it holds."""
    kind = draw(st.sampled_from(["wrong_type", "unknown_key", "missing", "impossible", "missing_file", "yaml",
                                 "duplicate", "several", "deep", "non_utf8"]))
    if kind == "deep":  # a value nested 2 to 60,000 lists deep (Python's parser recursion ends near 1,000)
        return kind, [("deep", draw(st.sampled_from(DEEP_KEYS)), draw(st.integers(2, 60_000)))]
    if kind == "non_utf8":  # a text file the run would read, with one Latin-1 byte somewhere
        return kind, [("latin1", draw(st.sampled_from(["eval.text", "calibration.files"])),
                       draw(st.integers(0, 5000)), draw(st.integers(0x80, 0xFF)))]
    if kind == "wrong_type":
        path = draw(st.sampled_from(sorted(FIELDS, key=str)))
        return kind, [("set", path, draw(st.sampled_from(WRONG[FIELDS[path]])))]
    if kind == "unknown_key":
        section = draw(st.sampled_from(SECTIONS))
        key = draw(st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=3, max_size=12))
        return kind, [("set", (*section, "zz_" + key), draw(st.sampled_from([1, "x", [1], {"a": 1}, None])))]
    if kind == "missing":
        return kind, [("del", draw(st.sampled_from(REQUIRED)))]
    if kind == "impossible":
        path, value = draw(st.sampled_from(IMPOSSIBLE))
        return kind, [("set", path, value)]
    if kind == "missing_file":
        path, value = draw(st.sampled_from(MISSING_FILES))
        return kind, [("set", path, value)]
    if kind == "yaml":
        return kind, draw(st.sampled_from(BROKEN_YAML))
    if kind == "duplicate":
        return kind, [("dup", draw(st.integers(0, 4)))]
    parts = draw(st.lists(st.sampled_from(IMPOSSIBLE + MISSING_FILES), min_size=2, max_size=4))
    return kind, [("set", p, v) for p, v in parts]


def apply(recipe: dict, ops: list) -> tuple[dict, list]:
    """The recipe with the ops applied, and the ops that applied (a later op of several may address a part an
    earlier one removed: it is skipped)."""
    r, done = copy.deepcopy(recipe), []
    for op in ops:
        try:
            if op[0] == "set":
                _set(r, op[1], op[2])
            elif op[0] == "del":
                _del(r, op[1])
            else:
                r["variants"].append(dict(r["variants"][op[1]]))
        except (KeyError, IndexError, TypeError):
            continue
        done.append(op)
    return r, done


def field_names(kind: str, mutation: object) -> list[str]:
    """What the message must mention: the field a mutation broke (any of them, for several), the duplicated
    name, or, for broken YAML, where the syntax error is (or that the file is not a recipe mapping)."""
    if kind == "yaml":
        return ["YAML syntax error", "must be a YAML mapping", "not a UTF-8 text file"]
    if kind == "deep":
        return ["nested too deeply", mutation[0][1]]
    if kind == "non_utf8":
        return [f"{mutation[0][1]}: file"]
    if kind == "duplicate":
        return ["is used twice"]
    names = []
    for op in mutation:
        keys = [p for p in op[1] if isinstance(p, str)]
        names += [keys[-1] if keys else "variants"]
    return names


def run_cli(args: list[str]) -> tuple[int, str]:
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        code = cli.main(args)
    return code, err.getvalue() + out.getvalue()


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def test_the_base_recipe_is_valid(fuzz_dir: Path) -> None:
    """The mutations start from a valid recipe, so each failure is the mutation's."""
    from quantpipe.recipe import parse_recipe

    parse_recipe(base_recipe(fuzz_dir))


COUNTS: dict[str, int] = {}


@settings(max_examples=EXAMPLES, derandomize=True, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(case=malformed())
def test_malformed_recipes_exit_2_with_one_message(case: tuple[str, object], fuzz_dir: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    kind, mutation = case
    path = fuzz_dir / "recipe.yaml"
    if kind == "yaml":
        path.write_bytes(str(mutation).encode("utf-8", "surrogateescape"))
    elif kind == "deep":
        path.write_text(deep_yaml(base_recipe(fuzz_dir), *mutation[0][1:]))
    elif kind == "non_utf8":
        path.write_text(yaml.safe_dump(latin1_recipe(base_recipe(fuzz_dir), fuzz_dir, *mutation[0][1:])))
    else:
        broken, mutation = apply(base_recipe(fuzz_dir), mutation)
        path.write_text(yaml.safe_dump(broken, sort_keys=False))

    def accepted(*a: object, **k: object) -> None:
        raise AssertionError(f"quantpipe run accepted a malformed recipe ({kind}: {mutation})")

    monkeypatch.setattr(pipeline, "run", accepted)
    for args in (["validate", str(path)], ["run", str(path)]):
        code, text = run_cli(args)
        assert code == 2, (kind, mutation, args, text)
        assert "Traceback" not in text and text.startswith("quantpipe: error: "), (kind, mutation, text)
        assert text.count("quantpipe: error:") == 1
        assert any(named in text for named in field_names(kind, mutation)), (kind, mutation, text)
    COUNTS[kind] = COUNTS.get(kind, 0) + 1


def test_every_kind_of_malformation_was_tried() -> None:
    """The fuzzer above ran (in file order) and covered every kind; the counts go into the closing note."""
    print("malformed recipes tried per kind:", COUNTS, "total", sum(COUNTS.values()))
    assert sum(COUNTS.values()) >= 200 and len(COUNTS) == 10, COUNTS
