"""A real HTTP server that records what is POSTed to it: a Slack-style incoming webhook's stand-in.

with WebhookReceiver(fail_first=2) as hook:   # answers 503 twice, then 200
    ... RETRAIN_WEBHOOK_URL=hook.url ...
    hook.received  # the parsed JSON bodies, in order
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class WebhookReceiver:
    def __init__(self, fail_first: int = 0, status: int = 200, secret_path: str = "/services/T0/B0/s3cr3t"):
        self.fail_first = fail_first
        self.status = status
        self.received: list[dict] = []
        self.attempts = 0
        self.content_types: list[str] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                receiver.attempts += 1
                if receiver.attempts <= receiver.fail_first:
                    self._answer(503, b"try later")
                    return
                receiver.content_types.append(self.headers.get("Content-Type", ""))
                receiver.received.append(json.loads(body))
                self._answer(receiver.status, b"ok" if receiver.status < 300 else b"invalid_token")

            def _answer(self, code: int, body: bytes):
                self.send_response(code)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}{secret_path}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> WebhookReceiver:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
