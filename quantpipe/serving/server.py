"""One engine server process: a free port, waiting for health, its log, its memory, and a clean stop.

The engine runs under its guard (guard.py) in a session of its own: a Ctrl-C in the terminal reaches quantpipe,
which then stops it; when quantpipe is killed outright, the kernel signals the guard (PR_SET_PDEATHSIG), which
stops the engine's whole process group (vLLM's API server starts an engine core and workers that would outlive
a signal to the server alone). Nothing is left behind either way.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil

from quantpipe.errors import QuantpipeError
from quantpipe.serving.engines import Engine, Env, Launch, LogReport


def _guard_dies_with(parent: int) -> None:
    """In the guard's child side of fork: SIGTERM it when quantpipe dies (Linux), or exit if it already has."""
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != parent:
        os._exit(1)


GUARD = Path(__file__).resolve().parent / "guard.py"  # run as a file: standard library only, needs no quantpipe


class EngineRefused(QuantpipeError):
    """The engine exited while loading the artifact: `reason` is its own one-line explanation."""

    def __init__(self, engine: str, reason: str, tail: str) -> None:
        super().__init__(f"not servable by {engine}: {reason}")
        self.reason, self.tail = reason, tail


class EngineTimeout(QuantpipeError):
    """The server never became healthy within the time allowed."""

    def __init__(self, engine: str, seconds: float, tail: str) -> None:
        super().__init__(f"{engine} did not become healthy within {seconds:.0f} s; its log ends: "
                         f"{tail.strip().splitlines()[-1] if tail.strip() else '(empty)'}")
        self.tail = tail


def port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def pick_port(host: str, wanted: int | None) -> tuple[int, str | None]:
    """`wanted` if it is free, else a free port the OS gives; the note says when the wanted one was taken."""
    if wanted and port_free(host, wanted):
        return wanted, None
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port = s.getsockname()[1]
    return port, None if not wanted else f"port {wanted} on {host} is taken; using {port}"


class Server:
    """An engine serving one artifact. Use as a context manager: entering starts it and waits for health."""

    def __init__(self, engine: Engine, env: Env, launch: Launch, log_path: Path, startup_timeout_s: float = 600):
        self.engine, self.env, self.launch, self.log_path = engine, env, launch, log_path
        self.startup_timeout_s = startup_timeout_s
        self.proc: subprocess.Popen | None = None
        self.argv, self.environ = engine.command(launch, env)
        self.start_s: float | None = None

    @property
    def url(self) -> str:
        host = f"[{self.launch.host}]" if ":" in self.launch.host else self.launch.host
        return f"http://{host}:{self.launch.port}"

    def command_line(self) -> str:
        env = " ".join(f"{k}={v}" for k, v in self.environ.items() if k.startswith(("VLLM_CPU", "OMP")))
        argv = [a.split("=", 1)[0] + "=***" if a.startswith(("--api-key=", "--api_key=")) else a for a in self.argv]
        return (env + " " if env else "") + " ".join(argv)

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        parent = os.getpid()
        log = open(self.log_path, "wb")  # noqa: SIM115 - the child owns it while it runs
        t = time.perf_counter()
        try:
            self.proc = subprocess.Popen([sys.executable, str(GUARD), *self.argv], stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env={**os.environ, **self.environ}, start_new_session=True,
                                         cwd=self.log_path.parent, preexec_fn=lambda: _guard_dies_with(parent))
        except OSError as e:
            raise QuantpipeError(f"could not start {self.engine.label}: {e}") from None
        finally:
            log.close()
        self._wait_healthy()
        self.start_s = time.perf_counter() - t

    def _wait_healthy(self) -> None:
        import httpx

        deadline = time.monotonic() + self.startup_timeout_s
        headers = {"Authorization": f"Bearer {self.launch.api_key}"} if self.launch.api_key else {}
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                tail = self.log_tail()
                reason = self.report().refusal or f"the server exited with code {self.proc.returncode}"
                self.stop()
                raise EngineRefused(self.engine.label, reason, tail)
            try:
                r = httpx.get(self.url + self.engine.health, headers=headers, timeout=2.0)
                if r.status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                tail = self.log_tail()
                self.stop()
                raise EngineTimeout(self.engine.label, self.startup_timeout_s, tail)
            time.sleep(0.5)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, n: int = 15) -> str:
        lines = [ln for ln in self.log_text().splitlines() if ln.strip() and "Route:" not in ln]
        return "\n".join(lines[-n:])

    def report(self) -> LogReport:
        return self.engine.read_log(self.log_text())

    def pids(self) -> list[int]:
        """The engine's processes (the guard's descendants; not the guard)."""
        if not self.alive():
            return []
        try:
            return [c.pid for c in psutil.Process(self.proc.pid).children(recursive=True)]  # type: ignore[union-attr]
        except psutil.Error:
            return []

    def pss_mib(self) -> float:
        """Memory of the server's whole process tree: the sum of each process's proportional set size (PSS), so
        pages the processes share (vLLM's engine core and workers map the same libraries and weights) count
        once, not once per process as a sum of RSS would."""
        total = 0
        for pid in self.pids():
            with contextlib.suppress(psutil.Error):
                info = psutil.Process(pid).memory_full_info()
                total += getattr(info, "pss", info.rss)
        return total / 2**20

    def gpu_mib(self) -> float | None:
        """GPU memory the server's processes hold (nvidia-smi), None without a GPU."""
        try:
            out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,"
                                  "nounits"], capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            return None
        pids = set(self.pids())
        used = [float(b) for a, b in (ln.split(",") for ln in out.splitlines() if "," in ln) if int(a) in pids]
        return sum(used) if used else None

    @contextlib.contextmanager
    def sample_memory(self) -> Iterator[dict[str, float]]:
        """Sample the tree's memory (PSS) every 0.25 s while the block runs; the dict gets `peak_pss_mib`."""
        out: dict[str, float] = {}
        sampler = _RssSampler(self)
        sampler.start()
        try:
            yield out
        finally:
            sampler.stop.set()
            sampler.join()
            out["peak_pss_mib"] = sampler.peak

    def stop(self) -> None:
        """SIGTERM to the server's process group and every descendant, SIGKILL after 20 s."""
        if self.proc is None:
            return
        procs = []
        with contextlib.suppress(psutil.Error):
            root = psutil.Process(self.proc.pid)
            procs = [root] + root.children(recursive=True)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        for p in procs:
            with contextlib.suppress(psutil.Error):
                p.terminate()
        _, alive = psutil.wait_procs(procs, timeout=20)
        for p in alive:
            with contextlib.suppress(psutil.Error):
                p.kill()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)

    def __enter__(self) -> Server:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


class _RssSampler(threading.Thread):
    def __init__(self, server: Server) -> None:
        super().__init__(daemon=True)
        self.server, self.stop, self.peak = server, threading.Event(), 0.0

    def run(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, self.server.pss_mib())
            self.stop.wait(0.25)
