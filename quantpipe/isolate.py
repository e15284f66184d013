"""Run one function in a fresh Python process: the quantize and bench stages use it, so each one's peak memory is
its own, a library's global patches stay inside it, and a crash (or the kernel's OOM killer) ends that process
with a clear message instead of the run. The function travels by reference ("module:function"), its argument by
pickle (plain data); it returns a JSON-able dict. All of its output goes to a log file (unfiltered, for
debugging); the run prints one line per stage. The process dies with its parent (PR_SET_PDEATHSIG), so a killed
`quantpipe run` leaves nothing writing into a run directory that a re-run now owns.
"""

from __future__ import annotations

import importlib
import json
import multiprocessing
import os
import resource
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from quantpipe.errors import QuantpipeError, first_line


def die_with_parent(parent_pid: int | None) -> None:
    """Linux: have the kernel SIGKILL this process when its parent dies (PR_SET_PDEATHSIG). Also exits at once if
    the parent is already gone. A no-op elsewhere."""
    if parent_pid is None or not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def peak_rss_mib() -> float:
    """This process's resident-memory high-water mark. VmHWM belongs to the address space made at exec, unlike
    ru_maxrss, which Linux carries over from the parent across fork + exec (every child would report the
    parent's peak)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def _libc() -> Any:
    import ctypes

    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def start_memory_pass() -> bool:
    """Prepare this process to measure the memory of what it runs next: free what reference cycles hold, return
    glibc's free heap memory to the system (malloc_trim), have glibc map each block of 128 KiB or more on its own
    and trim its heap's top whenever it frees there, and restart the resident high-water mark at the current RSS
    (Linux: /proc/self/clear_refs "5"), so that peak_rss_mib() then covers what comes after.

    Why: glibc keeps freed blocks resident (its mmap threshold rises as large blocks are freed, so later ones come
    from the heap, where free chunks stay mapped). A CPU benchmark's peak RSS held 30-90 MiB of such free memory,
    a different amount on each identical run, and malloc_trim gave all of it back (docs/benchmarks.md). With these
    settings the figure repeats to the MiB; decoding is then ~3x slower, so only an untimed pass runs this way.
    False where the high-water mark cannot be restarted (it then still covers the whole process)."""
    import gc

    gc.collect()
    libc = _libc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, 128 << 10)
        libc.mallopt(_M_TRIM_THRESHOLD, 0)
        libc.malloc_trim(0)
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _child(target: str, arg: Any, preimport: tuple[str, ...], result: str, log: str, parent_pid: int,
           who: str | None) -> None:
    die_with_parent(parent_pid)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout = os.fdopen(1, "w", buffering=1, closefd=False)
    sys.stderr = os.fdopen(2, "w", buffering=1, closefd=False)
    t = time.perf_counter()
    try:
        for name in preimport:  # the libraries first, so base_rss_mib is the process before any weights
            importlib.import_module(name)
        base = rss_mib()
        module, _, fn = target.partition(":")
        out = dict(getattr(importlib.import_module(module), fn)(arg))
        out.setdefault("wall_in_process_s", time.perf_counter() - t)
        out.setdefault("peak_rss_mib", peak_rss_mib())  # the function may have read its own, earlier
        out.setdefault("base_rss_mib", base)
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
            out.setdefault("peak_gpu_mib", torch.cuda.max_memory_allocated() / 2**20)
    except QuantpipeError as e:
        out = {"error": str(e)}
    except OSError as e:
        from quantpipe.cache import explain_os_error

        traceback.print_exc()
        out = {"error": str(explain_os_error(e, "writing its output"))}
    except Exception as e:  # any library failure becomes one line; the traceback stays in the log
        traceback.print_exc()
        why = f"{type(e).__name__}: {first_line(e, '')}"
        out = {"error": f"{who} failed: {why}" if who else why}
    tmp = result + ".tmp"
    Path(tmp).write_text(json.dumps(out, default=str))
    os.replace(tmp, result)


def run(target: str, arg: Any, work: Path, label: str, preimport: tuple[str, ...] = (),
        what: str = "its process", who: str | None = None) -> dict[str, Any]:
    """`target(arg)` in a fresh process; its dict result plus `peak_rss_mib`, `base_rss_mib` (after `preimport`)
    and, on CUDA, `peak_gpu_mib`. Failures raise a one-line QuantpipeError that starts with `label` and names the
    log file `work/<label>.log`: "<label>: <what> was killed by signal 9 ...", or for an exception in `target`
    "<label>: <who> failed: <type>: <first line>"."""
    work.mkdir(parents=True, exist_ok=True)
    stem = label.replace(":", "-").replace("@", "-")
    result, log = work / f"{stem}.json", work / f"{stem}.log"
    result.unlink(missing_ok=True)
    proc = multiprocessing.get_context("spawn").Process(
        target=_child, args=(target, arg, tuple(preimport), str(result), str(log), os.getpid(), who),
        name=f"quantpipe-{stem}")
    proc.start()
    try:
        proc.join()
    except BaseException:  # Ctrl-C or a kill of the parent: do not leave the child running
        proc.kill()
        proc.join()
        raise
    if not result.is_file():
        code = proc.exitcode
        how = (f"was killed by signal {-code} ({signal.Signals(-code).name}"
               + ("; out of memory?" if -code == signal.SIGKILL else "") + ")") if code and code < 0 else \
            f"exited with code {code}"
        raise QuantpipeError(f"{label}: {what} {how}; its output is in {log}")
    out = json.loads(result.read_text())
    if "error" in out:
        raise QuantpipeError(f"{label}: {out['error']} (full log: {log})")
    return out
