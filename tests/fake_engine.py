"""A stand-in engine process for the server-lifecycle tests (the real engines are tested in test_serving_engines.py):
`python fake_engine.py PORT MODE [API_KEY]`. It starts a child process (as vLLM starts its engine core), then:
ok: answers /health and /v1/models (401 without the key when one is set); refuse: prints a traceback ending in
the reason and exits 1 (as an engine that cannot load a checkpoint); hang: never listens; crash-later: serves,
then exits after 3 s."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

port, mode = int(sys.argv[1]), sys.argv[2]
key = sys.argv[3] if len(sys.argv) > 3 else None
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
print(f"fake engine pid {child.pid} child", flush=True)
print("INFO Initializing a V1 LLM engine (v9.9.9) with config: quantization=fake-scheme", flush=True)

if mode == "refuse":
    print("Traceback (most recent call last):\n  File \"x.py\", line 1, in <module>", flush=True)
    print("(EngineCore pid=1) ValueError: No compatible scheme found for this fake checkpoint", flush=True)
    child.kill()
    sys.exit(1)
if mode == "hang":
    time.sleep(3600)


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        if key and self.headers.get("Authorization") != f"Bearer {key}":
            self.send_response(401)
            self.end_headers()
            return
        body = json.dumps({"data": [{"id": "fake"}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


server = HTTPServer(("127.0.0.1", port), Handler)
if mode == "crash-later":
    threading.Timer(3.0, lambda: (print("RuntimeError: fake engine died", flush=True), child.kill(),
                                  __import__("os")._exit(3))).start()
print("INFO CPU KV cache size: 1,234 tokens, Maximum concurrency for 2,048 tokens per request: 0.60x", flush=True)
server.serve_forever()
