"""A local stand-in for the two Google Cloud Storage JSON API calls a source makes: list
objects and download one (`STORAGE_EMULATOR_HOST` points the real client at it). It holds
files in memory and answers 404 for an unknown bucket, as the service does."""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlparse


class GCSStandIn:
    def __init__(self):
        self.buckets: dict[str, dict[str, bytes]] = {}
        self.requests: list[str] = []
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, status: int, body: bytes, content_type: str = "application/json"):
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                stand_in.requests.append(self.path)
                url = urlparse(self.path)
                parts = [unquote(p) for p in url.path.split("/") if p]
                if parts[:1] == ["download"]:
                    parts = parts[1:]
                # storage/v1/b/<bucket>/o[/<object>]
                if len(parts) < 5 or parts[:3] != ["storage", "v1", "b"] or parts[4] != "o":
                    return self._send(400, b'{"error": {"code": 400, "message": "bad request"}}')
                bucket = stand_in.buckets.get(parts[3])
                if bucket is None:
                    error = {"error": {"code": 404, "message": "The specified bucket does not exist."}}
                    return self._send(404, json.dumps(error).encode())
                if len(parts) == 5:
                    prefix = parse_qs(url.query).get("prefix", [""])[0]
                    items = [
                        {
                            "kind": "storage#object",
                            "bucket": parts[3],
                            "name": name,
                            "size": str(len(data)),
                            "etag": hashlib.md5(data).hexdigest(),
                        }
                        for name, data in sorted(bucket.items())
                        if name.startswith(prefix)
                    ]
                    return self._send(200, json.dumps({"kind": "storage#objects", "items": items}).encode())
                name = "/".join(parts[5:])
                if name not in bucket:
                    return self._send(404, b'{"error": {"code": 404, "message": "No such object"}}')
                return self._send(200, bucket[name], "application/octet-stream")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
