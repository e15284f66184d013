"""`quantpipe run --executor ray` on a Ray cluster the test starts on 127.0.0.1 (2 CPUs): the same quality numbers
as the local executor, a shared stage cache (a local re-run is all cache hits), the node on every row, a worker
killed during a stage survived, an unreachable cluster refused at once, a failing variant reported while the others
finish."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import yaml
from conftest import read_results, tiny_recipe

# gptq: a calibrated method, whose float sums depend on the thread count (the Ray tasks must use the local run's)
VARIANTS = [{"name": "baseline", "method": "baseline"}, {"name": "int8", "method": "int8"},
            {"name": "int8-dyn", "method": "int8", "scheme": "dynamic"},
            {"name": "gptq", "method": "gptq", "bits": 4, "group_size": 64}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> str:
    """`ray start --head` on 127.0.0.1 with 2 CPUs, from this environment; stopped after the module."""
    ray = Path(sys.prefix) / "bin" / "ray"
    port = free_port()
    tmp = tmp_path_factory.mktemp("ray")
    # token authentication, with a token of this test's (Ray reads it from the environment in every process: the
    # cluster's and quantpipe's, which inherit this one's)
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": os.urandom(16).hex(), "RAY_USAGE_STATS_ENABLED": "0"}
    saved = {k: os.environ.get(k) for k in auth}
    os.environ.update(auth)
    subprocess.run([str(ray), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
                    "--num-cpus", "2", "--include-dashboard", "false", f"--temp-dir={tmp}",
                    "--disable-usage-stats"], check=True, capture_output=True, timeout=180)
    yield f"127.0.0.1:{port}"
    subprocess.run([str(ray), "stop", "--force"], capture_output=True, timeout=120)
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def quantpipe(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "quantpipe", *args], cwd=cwd, capture_output=True, text=True,
                          env=env, timeout=1200)


def write_recipe(tmp: Path, model: Path, run_dir: Path, **overrides: object) -> Path:
    recipe = tiny_recipe(model, run_dir, variants=VARIANTS, **overrides)
    recipe["bench"]["batch_sizes"] = [1]
    path = tmp / f"{run_dir.name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


QUALITY = ("perplexity", "kld_mean", "kld_se", "top1_agreement", "nll_mean", "blocks")


def quality(run_dir: Path) -> dict[str, dict]:
    return {r.name: {k: getattr(r.quality, k) for k in QUALITY} for r in read_results(run_dir).variants}


@pytest.fixture(scope="module")
def local_run(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("local")
    p = quantpipe("run", str(write_recipe(tmp, tiny_model, tmp / "local")), cwd=tmp)
    assert p.returncode == 0, p.stderr[-3000:]
    return tmp / "local"


def test_ray_run_survives_a_killed_worker_equals_local_and_shares_the_cache(
        cluster: str, local_run: Path, tiny_model: Path, tmp_path: Path) -> None:
    """The Ray run's quality equals the local run's to the last bit, although the Ray worker running
    `quantize:int8` is SIGKILLed mid-stage (once its artifact's temp directory exists): Ray runs the task again and
    the stage is redone from scratch. Then a local re-run of the same recipe finds every stage cached."""
    run_dir = tmp_path / "ray"
    recipe = write_recipe(tmp_path, tiny_model, run_dir)
    killed: list[int] = []

    def killer() -> None:
        deadline = time.time() + 600
        while time.time() < deadline and not killed:
            if list((run_dir / "artifacts").glob(".tmp-int8-*")):
                for proc in ray_workers("quantize:int8"):
                    proc.send_signal(signal.SIGKILL)
                    killed.append(proc.pid)
            time.sleep(0.05)

    watch = threading.Thread(target=killer, daemon=True)
    watch.start()
    t = time.perf_counter()
    p = quantpipe("run", str(recipe), "--executor", "ray", "--address", cluster, cwd=tmp_path)
    wall = time.perf_counter() - t
    watch.join(timeout=5)
    assert killed, "the quantize:int8 worker was never seen mid-stage"
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    print(f"ray run: {wall:.0f} s")
    print(p.stdout)
    port = cluster.rsplit(":", 1)[1]
    assert re.search(rf"^Ray cluster \S+:{port}: 1 node\(s\), \S+ \(2 CPU, 0 GPU\)$", p.stdout, re.M), p.stdout
    node = f"{socket.gethostname()} ("  # Ray names the node by this machine's address, not the loopback's
    for stage in ("quantize:baseline", "eval-tokens", "eval:baseline", "quantize:int8", "eval:int8",
                  "bench:int8", "quantize:int8-dyn", "bench:int8-dyn", "bench:baseline", "calibration",
                  "quantize:gptq", "eval:gptq", "bench:gptq"):
        assert any(line.split("] ", 1)[-1].startswith(f"{stage}: done in") and f" on {node}" in line
                   for line in p.stdout.splitlines()), stage
    assert quality(tmp_path / "ray") == quality(local_run)  # the same numbers, to the last bit
    res = read_results(tmp_path / "ray")
    for row in res.variants:
        assert set(row.nodes) == {"quantize", "eval", "bench"} and row.nodes["bench"].startswith(node)
        assert row.speed.per_batch["1"].decode_tok_s > 0
    assert "ran on" in (tmp_path / "ray" / "matrix.md").read_text()
    assert res.execution["executor"] == "ray" and res.execution["address"].endswith(f":{port}")
    assert [n.split(" ")[0] for n in res.execution["nodes"]] == [socket.gethostname()]
    # the stage cache is the run directory's: a local re-run of the same recipe redoes nothing
    again = quantpipe("run", str(recipe), cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    stages = [line for line in again.stdout.splitlines() if line.startswith("[")]
    assert stages and all(line.endswith(": cached") for line in stages), stages
    assert quality(tmp_path / "ray") == quality(local_run)


def ray_workers(name: str) -> list[psutil.Process]:
    out = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(f"ray::{name}" in part for part in proc.info["cmdline"] or []):
                out.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return out


def test_unreachable_cluster_is_one_line_before_any_work(tiny_model: Path, tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, tiny_model, tmp_path / "nowhere")
    t = time.perf_counter()
    p = quantpipe("run", str(recipe), "--executor", "ray", "--address", f"ray://127.0.0.1:{free_port()}",
                  cwd=tmp_path)
    assert p.returncode == 2 and time.perf_counter() - t < 60
    assert p.stderr.startswith("quantpipe: error: execution.address: the Ray cluster at ray://127.0.0.1:")
    assert "cannot be reached" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "nowhere").exists()
    p = quantpipe("run", str(recipe), "--address", "auto", cwd=tmp_path)
    assert p.returncode == 2 and "--address: only the ray executor connects to a cluster" in p.stderr


def test_a_failing_variant_is_reported_and_the_others_finish(cluster: str, local_run: Path, tiny_model: Path,
                                                             tmp_path: Path) -> None:
    """int8's artifact path is taken by a file (its quantize stage cannot write there): int8 fails with that
    reason, baseline and int8-dyn are measured, results.json and the matrix say which failed and why."""
    run_dir = tmp_path / "partial"
    (run_dir / ".quantpipe").mkdir(parents=True)  # a quantpipe run directory (as after an earlier run)
    (run_dir / "artifacts").mkdir()
    (run_dir / "artifacts" / "int8").write_text("in the way")
    recipe = write_recipe(tmp_path, tiny_model, run_dir)
    p = quantpipe("run", str(recipe), "--executor", "ray", "--address", cluster, cwd=tmp_path)
    assert p.returncode == 2, p.stdout[-3000:] + p.stderr[-3000:]
    assert "variant 'int8' failed at its quantize task on " in p.stderr
    assert "the other variants' results are written" in p.stderr
    res = read_results(run_dir)
    assert [r.name for r in res.variants] == ["baseline", "int8-dyn", "gptq"]
    assert [f["variant"] for f in res.failed] == ["int8"] and res.failed[0]["stage"] == "quantize"
    local = quality(local_run)
    assert quality(run_dir) == {n: local[n] for n in ("baseline", "int8-dyn", "gptq")}
    assert "- int8: FAILED at its quantize task" in (run_dir / "matrix.md").read_text()


def test_recipe_execution_block(tiny_model: Path, tmp_path: Path) -> None:
    from quantpipe.errors import QuantpipeError
    from quantpipe.recipe import parse_recipe

    base = tiny_recipe(tiny_model, tmp_path / "r")
    r = parse_recipe({**base, "execution": {"executor": "ray", "address": "auto", "max_retries": 3}})
    assert (r.execution.executor, r.execution.address, r.execution.max_retries) == ("ray", "auto", 3)
    assert parse_recipe(base).execution.executor == "local"
    with pytest.raises(QuantpipeError, match="execution: address: only the ray executor connects to a cluster"):
        parse_recipe({**base, "execution": {"address": "auto"}})
    with pytest.raises(QuantpipeError, match="execution.executor"):
        parse_recipe({**base, "execution": {"executor": "slurm"}})
