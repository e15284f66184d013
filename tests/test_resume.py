"""Crash and resume: `quantpipe run` killed with SIGKILL at random points of every stage resumes to the same
results, never reuses a half-written artifact and leaves no worker behind; a second run on the same directory
refuses; nothing in quantpipe unpickles."""

from __future__ import annotations

import copy
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import ROOT, read_results, tiny_recipe, write_recipe

from quantpipe.results import Results

# every kind of stage: quantize (in a worker process), eval-tokens, calibration, eval, lm-eval, bench (its own
# process); the static ONNX variant uses the calibration ids
VARIANTS = [{"name": "baseline", "method": "baseline"}, {"name": "int8", "method": "int8"},
            {"name": "onnx-static", "method": "onnx", "quantize": "static"}]
STAGE_RE = re.compile(r"^\[(\d+)/(\d+)\] (\S+?)( \.\.\.|: done in|: cached)")


def recipe(model: Path, run_dir: Path) -> dict:
    r = tiny_recipe(model, run_dir, variants=copy.deepcopy(VARIANTS))
    r["eval"]["lm_eval"] = {"tasks": ["qp_order", "qp_copy"], "limit": 4}
    r["bench"].update(batch_sizes=[1], repeats=1, gen_len=8)
    return r


def start(path: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-u", "-m", "quantpipe", "run", str(path)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def quality(results: Results) -> dict:
    """What must not change across a resume: every variant's quality numbers and lm-eval scores."""
    return {v.name: {"quality": v.quality.model_dump(exclude={"blocks"}),
                     "blocks": v.quality.blocks,
                     "lm_eval": {t: (s.value, s.stderr, s.per_doc) for t, s in v.lm_eval.items()}}
            for v in results.variants}


def kill_during(path: Path, stage: str, delay: float) -> tuple[str | None, list[str]]:
    """Run until `stage` starts, wait `delay` s, SIGKILL the run (not its workers). Return the stage that was
    running when the kill landed (None if the run finished first) and the run's output."""
    proc = start(path)
    lines, running = [], None
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line.rstrip())
        m = STAGE_RE.match(line)
        if not m:
            continue
        running = m.group(3) if m.group(4) == " ..." else None
        if m.group(4) == " ..." and m.group(3) == stage:
            break
    else:
        proc.wait()
        return None, lines
    children = psutil.Process(proc.pid).children(recursive=True)
    time.sleep(delay)
    # the stage may have finished in the meantime: read what was printed without blocking on more
    os.set_blocking(proc.stdout.fileno(), False)
    for line in proc.stdout:
        lines.append(line.rstrip())
        m = STAGE_RE.match(line)
        if m:
            running = m.group(3) if m.group(4) == " ..." else None
    children += [c for c in psutil.Process(proc.pid).children(recursive=True) if c not in children]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # the workers die with the run (PR_SET_PDEATHSIG): none keeps writing into the run directory
    gone, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, f"workers outlived the killed run: {alive}"
    return running, lines


@pytest.fixture(scope="module")
def reference(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Results, list[str], dict]:
    """An uninterrupted run: its results, its stage names in order and their durations (s)."""
    root = tmp_path_factory.mktemp("resume-ref")
    path = write_recipe(root / "r.yaml", recipe(tiny_model, root / "run"))
    proc = start(path)
    out, _ = proc.communicate()
    assert proc.returncode == 0, out[-3000:]
    stages = [m.group(3) for m in map(STAGE_RE.match, out.splitlines()) if m and m.group(4) == " ..."]
    took = {m.group(1): float(m.group(2)) for m in map(re.compile(r"^\[\d+/\d+\] (\S+): done in ([0-9.]+) s").match,
                                                       out.splitlines()) if m}
    return read_results(root / "run"), stages, took


def test_sigkill_in_every_stage_resumes_to_the_same_results(tiny_model: Path, tmp_path: Path,
                                                            reference: tuple[Results, list[str], dict]) -> None:
    """One chain of runs on one directory: run k is killed at a random point of stage k (a uniform share of
    that stage's duration in the uninterrupted run); run k+1 resumes (finished stages cached, the killed one
    redone, stale temp dirs removed) and is killed in stage k+1; the last run finishes. Its results equal the
    uninterrupted run's."""
    ref, stages, took = reference
    assert {s.split(":")[0] for s in stages} == {"quantize", "eval-tokens", "calibration", "eval", "lm-eval",
                                                 "bench"}, stages
    path = write_recipe(tmp_path / "r.yaml", recipe(tiny_model, tmp_path / "run"))
    rng = random.Random(0)
    killed: dict[str, int] = {}
    late: list[str] = []  # kills that landed after the stage wrote its record, before its "done" line was read
    previous, finished, i = None, None, 0
    while i < len(stages):
        landed, lines = kill_during(path, stages[i], rng.uniform(0.05, 0.9) * took[stages[i]])
        redone = [m.group(3) for m in map(STAGE_RE.match, lines) if m and m.group(4) == " ..."]
        if previous is not None:  # the stage the last kill hit left no record: this run redid it
            assert previous in redone, (previous, redone)
        if finished is not None:  # the stage had finished when the last kill landed: this run did not redo it
            assert finished not in redone and any(f"] {finished}: cached" in ln for ln in lines), (finished, lines)
        if landed is None:  # the run finished before this kill
            previous = finished = None
            break
        if (tmp_path / "run" / ".quantpipe" / "stages" / f"{landed.replace(':', '--')}.json").is_file():
            previous, finished = None, landed
            late.append(landed)
        else:
            previous, finished = landed, None
            killed[landed] = killed.get(landed, 0) + 1
        i = stages.index(landed) + 1  # the next kill: the first stage not yet started
    proc = start(path)
    out, _ = proc.communicate()
    assert proc.returncode == 0, out[-3000:]
    if previous is not None:
        assert any(ln.startswith("[") and f"] {previous} ..." in ln for ln in out.splitlines()), previous
    if finished is not None:
        assert any(f"] {finished}: cached" in ln for ln in out.splitlines()), finished
    assert not list((tmp_path / "run" / "artifacts").glob(".tmp-*"))
    res = read_results(tmp_path / "run")
    assert quality(res) == quality(ref)
    print("kills per stage:", killed, "landed after the stage finished:", late,
          "- the resumed run's results equal the uninterrupted run's")
    kinds = {s.split(":")[0] for s in killed}
    assert {"quantize", "eval", "lm-eval", "bench"} <= kinds, killed
    assert len(killed) + len(late) >= len(stages) - 3, killed  # a stage of a few ms may end before its kill lands
    # the manifest's digests are the files on disk
    from quantpipe.cache import dir_digests

    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    for name, files in manifest["artifacts"].items():
        assert dir_digests(tmp_path / "run" / "artifacts" / name) == files, name


def test_a_second_run_on_the_same_directory_refuses(tiny_model: Path, tmp_path: Path) -> None:
    path = write_recipe(tmp_path / "r.yaml", recipe(tiny_model, tmp_path / "run"))
    first = start(path)
    assert first.stdout is not None
    for line in first.stdout:  # the first holds the lock once it prints its first stage
        if STAGE_RE.match(line):
            break
    try:
        second = subprocess.run([sys.executable, "-m", "quantpipe", "run", str(path)], capture_output=True,
                                text=True, cwd=ROOT)
        assert second.returncode == 2
        assert "is in use by another quantpipe run (pid" in second.stderr and "Traceback" not in second.stderr
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()


def test_no_pickle_loading_in_quantpipe() -> None:
    """safetensors and JSON only: no pickle, no torch.load without weights_only, no lm-eval request cache unless
    the recipe asks for it (it stores pickles)."""
    from quantpipe.recipe import LMEvalSpec

    bad = re.compile(r"\bpickle\.loads?\(|\bdill\.|torch\.load\((?![^)]*weights_only=True)|np\.load\([^)]*"
                     r"allow_pickle=True|SqliteDict\(")
    hits = [f"{p.relative_to(ROOT)}:{i}" for p in (ROOT / "quantpipe").rglob("*.py")
            for i, line in enumerate(p.read_text().splitlines(), 1) if bad.search(line)]
    assert not hits, hits
    assert LMEvalSpec(tasks=["qp_copy"]).cache_requests is False


@pytest.mark.parametrize("name", ["../escape", "a/b", "/abs", ".hidden", "..", "x" * 65, "a\\b", "ok\n"])
def test_variant_and_recipe_names_cannot_leave_the_run_directory(tiny_model: Path, tmp_path: Path,
                                                                 name: str) -> None:
    from quantpipe.errors import QuantpipeError
    from quantpipe.recipe import parse_recipe

    r = recipe(tiny_model, tmp_path / "run")
    r["variants"][1]["name"] = name
    with pytest.raises(QuantpipeError, match=r"(?s)variants\[1\].*not a valid variant name"):
        parse_recipe(r)
    r = recipe(tiny_model, tmp_path / "run")
    r["name"] = name
    with pytest.raises(QuantpipeError, match="not a valid recipe name"):
        parse_recipe(r)


def test_trust_remote_code_is_off_unless_set_and_warns_when_set(tiny_model: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    from quantpipe import cli, pipeline
    from quantpipe.recipe import parse_recipe

    r = recipe(tiny_model, tmp_path / "run")
    assert parse_recipe(r).model.trust_remote_code is False
    pipeline.preflight(parse_recipe(r))
    assert "trust_remote_code" not in capsys.readouterr().out
    r["model"]["trust_remote_code"] = True
    pipeline.preflight(parse_recipe(r))  # what `quantpipe run` checks before any work
    assert "warning: model.trust_remote_code is true" in capsys.readouterr().out
    assert cli.main(["validate", str(write_recipe(tmp_path / "r.yaml", r))]) == 0
    assert "warning: model.trust_remote_code is true" in capsys.readouterr().out
