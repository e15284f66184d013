"""GPU check of the serving memory path (no engine needed): a stand-in server process that holds CUDA memory is
started through quantpipe's Server (guard included), and Server.gpu_mib (nvidia-smi, per process of the engine's
tree) must see it, and once the server is stopped no process may hold GPU memory.

    python scripts/gpu_serve_memory.py          # on a machine with an NVIDIA GPU, torch with CUDA, nvidia-smi
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from quantpipe.serving import engines  # noqa: E402
from quantpipe.serving.engines import Engine, Env, Launch  # noqa: E402
from quantpipe.serving.server import Server, pick_port  # noqa: E402

HOLDER = """
import sys, torch, http.server
x = torch.empty(int(sys.argv[2]) * 2**20, dtype=torch.uint8, device="cuda")  # MiB held
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b"{}")
    def log_message(self, *a): pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


def main() -> None:
    work = Path(tempfile.mkdtemp())
    (work / "holder.py").write_text(HOLDER)

    def command(launch: Launch, env: Env) -> tuple[list[str], dict[str, str]]:
        return [sys.executable, str(work / "holder.py"), str(launch.port), "2048"], {}

    engine = Engine("holder", "CUDA holder", frozenset({"safetensors"}), "-", lambda d: engines.VLLM_CUDA, command,
                    engines.VLLM.read_log, scores="none", health="/health")
    port, _ = pick_port("127.0.0.1", None)
    launch = Launch(artifact_dir=work, format="safetensors", model_name="m", host="127.0.0.1", port=port,
                    device="cuda")
    with Server(engine, engines.VLLM_CUDA, launch, work / "holder.log", 120) as s:
        time.sleep(2)
        out = {"gpu_mib": s.gpu_mib(), "pss_mib": s.pss_mib(), "pids": s.pids()}
    time.sleep(2)
    smi = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader"],
                         capture_output=True, text=True).stdout.strip()
    out["after_stop_compute_apps"] = smi
    print(json.dumps(out))


if __name__ == "__main__":
    main()
