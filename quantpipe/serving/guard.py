"""The engine's guard: `python guard.py ENGINE ARGV...` runs the engine as its child, in the
process group it leads, and takes the whole group down when quantpipe goes away.

quantpipe starts this guard in a new session with PR_SET_PDEATHSIG = SIGTERM, so the kernel signals it when
quantpipe dies, even by SIGKILL. A signal on the engine alone is not enough: vLLM's API server starts an engine
core and workers, which outlive it. The guard forwards SIGTERM/SIGINT to its process group (every process the
engine started that did not leave the group), waits up to 15 s, then SIGKILLs the group. It exits with the
engine's own exit code. Standard library only: it runs in quantpipe's Python, next to an engine in another.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time


def _stop_group(signum: int, _frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    pgid = os.getpgid(0)
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            time.sleep(0.2)
    os.killpg(pgid, signal.SIGKILL)  # what did not stop, and this guard with it


def main(argv: list[str]) -> int:
    if os.getppid() == 1:  # quantpipe is already gone
        return 1
    signal.signal(signal.SIGTERM, _stop_group)
    signal.signal(signal.SIGINT, _stop_group)
    child = subprocess.Popen(argv)
    return child.wait()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
