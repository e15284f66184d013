"""Runs one method's `quantize` in its own process: its peak memory is its own, a library's global patches
stay inside it, and a crash (or the kernel's OOM killer) ends that process with a clear message instead of
the run. All library output goes to a log file (unfiltered, for debugging); the run prints one line per stage."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from quantpipe.errors import QuantpipeError
from quantpipe.methods import Method, QuantizeJob

PARENT_ENV = "QUANTPIPE_PARENT_PID"


def die_with_parent(parent_pid: int | None = None) -> None:
    """Linux: have the kernel SIGKILL this process when its parent dies (PR_SET_PDEATHSIG), so a killed
    `quantpipe run` leaves no worker writing into a run directory that a re-run now owns. Also exits at once
    if the parent is already gone. A no-op elsewhere."""
    if parent_pid is None:
        env = os.environ.get(PARENT_ENV)
        parent_pid = int(env) if env and env.isdigit() else None
    if parent_pid is None or not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def _child(method_name: str, quantize: Callable[[QuantizeJob], dict[str, Any]], job: QuantizeJob, result: str,
           log: str, imports: tuple[str, ...], parent_pid: int | None = None) -> None:
    die_with_parent(parent_pid)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout = os.fdopen(1, "w", buffering=1, closefd=False)
    sys.stderr = os.fdopen(2, "w", buffering=1, closefd=False)
    import importlib

    import psutil

    from quantpipe.bench import peak_rss_mib
    from quantpipe.cache import explain_os_error

    t = time.perf_counter()
    try:
        for name in imports:  # the method's libraries first, so base_rss_mib is the process before any weights
            importlib.import_module(name)
        base = psutil.Process().memory_info().rss / 2**20
        meta = quantize(job)
        out: dict[str, Any] = {"meta": meta, "quantize_s": time.perf_counter() - t, "peak_rss_mib": peak_rss_mib(),
                               "base_rss_mib": base}
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
            out["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    except QuantpipeError as e:
        out = {"error": str(e)}
    except OSError as e:
        traceback.print_exc()
        out = {"error": str(explain_os_error(e, f"method '{method_name}' was writing its artifact"))}
    except Exception as e:  # any library failure becomes one line; the traceback stays in the log
        traceback.print_exc()
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        out = {"error": f"method '{method_name}' failed: {type(e).__name__}: {first}"}
    tmp = result + ".tmp"
    Path(tmp).write_text(json.dumps(out))
    os.replace(tmp, result)


def quantize_in_subprocess(method: Method, job: QuantizeJob, work: Path) -> dict[str, Any]:
    """Return {'meta', 'quantize_s', 'peak_rss_mib', 'base_rss_mib'} of `method.quantize(job)` run in a fresh
    process, or raise a QuantpipeError naming the log file. The function travels by reference (module and name)."""
    work.mkdir(parents=True, exist_ok=True)
    result, log = work / f"quantize-{job.variant}.json", work / f"quantize-{job.variant}.log"
    result.unlink(missing_ok=True)
    proc = multiprocessing.get_context("spawn").Process(
        target=_child, args=(method.name, method.quantize, job, str(result), str(log),
                             method.imports(job.params), os.getpid()),
        name=f"quantpipe-quantize-{job.variant}")
    proc.start()
    try:
        proc.join()
    except BaseException:  # Ctrl-C or a kill of the parent: do not leave the worker running
        proc.kill()
        proc.join()
        raise
    if not result.is_file():
        code = proc.exitcode
        how = (f"was killed by signal {-code} ({signal.Signals(-code).name}"
               + ("; out of memory?" if -code == signal.SIGKILL else "") + ")") if code and code < 0 else \
            f"exited with code {code}"
        raise QuantpipeError(f"quantize:{job.variant}: the quantization process {how}; its output is in {log}")
    out = json.loads(result.read_text())
    if "error" in out:
        raise QuantpipeError(f"quantize:{job.variant}: {out['error']} (full log: {log})")
    return out
