"""A local stand-in for the few Kubernetes API reads `pipeline.py doctor` makes, for contract tests.

Real HTTP on 127.0.0.1, reached by the real `kubernetes` client through a kubeconfig written by
`kubeconfig()`. It serves namespaces, secrets and nodes from in-memory dicts, requires the
kubeconfig's bearer token, and records each request path.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

TOKEN = "k8s-stand-in-token"


@dataclass
class Cluster:
    namespaces: set[str] = field(default_factory=set)
    secrets: dict[tuple[str, str], dict[str, str]] = field(default_factory=dict)  # base64 values
    nodes: list[dict] = field(default_factory=list)  # {"name", "labels", "allocatable"}
    requests: list[str] = field(default_factory=list)


def _not_found(what: str) -> tuple[int, dict]:
    return 404, {
        "kind": "Status",
        "apiVersion": "v1",
        "status": "Failure",
        "reason": "NotFound",
        "message": f"{what} not found",
        "code": 404,
    }


class Handler(BaseHTTPRequestHandler):
    cluster: Cluster

    def log_message(self, *args):
        pass

    def do_GET(self):
        parsed = urlparse(self.path)
        self.cluster.requests.append(self.path)
        if self.headers.get("Authorization") != f"Bearer {TOKEN}":
            status, body = (
                401,
                {
                    "kind": "Status",
                    "apiVersion": "v1",
                    "status": "Failure",
                    "reason": "Unauthorized",
                    "code": 401,
                },
            )
        else:
            status, body = self.route(parsed.path.strip("/").split("/"), parse_qs(parsed.query))
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def route(self, parts: list[str], query) -> tuple[int, dict]:
        c = self.cluster
        if parts[:2] != ["api", "v1"]:
            return _not_found("/".join(parts))
        rest = parts[2:]
        if rest == ["nodes"]:
            key, _, value = query.get("labelSelector", [""])[0].partition("=")
            items = [
                {
                    "metadata": {"name": n["name"], "labels": n["labels"]},
                    "status": {"allocatable": n["allocatable"]},
                }
                for n in c.nodes
                if not key or n["labels"].get(key) == value
            ]
            return 200, {"kind": "NodeList", "apiVersion": "v1", "metadata": {}, "items": items}
        if len(rest) == 2 and rest[0] == "namespaces":
            if rest[1] in c.namespaces:
                return 200, {"kind": "Namespace", "apiVersion": "v1", "metadata": {"name": rest[1]}}
            return _not_found(f"namespace {rest[1]}")
        if len(rest) == 4 and rest[0] == "namespaces" and rest[2] == "secrets":
            data = c.secrets.get((rest[1], rest[3]))
            if data is None:
                return _not_found(f"secret {rest[3]}")
            return 200, {
                "kind": "Secret",
                "apiVersion": "v1",
                "type": "Opaque",
                "data": data,
                "metadata": {"name": rest[3], "namespace": rest[1]},
            }
        return _not_found("/".join(parts))


@dataclass
class StandIn:
    url: str
    cluster: Cluster
    server: ThreadingHTTPServer

    def kubeconfig(self, path: Path) -> Path:
        path.write_text(
            json.dumps(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "current-context": "stand-in",
                    "clusters": [{"name": "stand-in", "cluster": {"server": self.url}}],
                    "users": [{"name": "ci", "user": {"token": TOKEN}}],
                    "contexts": [{"name": "stand-in", "context": {"cluster": "stand-in", "user": "ci"}}],
                }
            )
        )
        return path

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def start() -> StandIn:
    cluster = Cluster()
    server = ThreadingHTTPServer(("127.0.0.1", 0), type("Bound", (Handler,), {"cluster": cluster}))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return StandIn(url=f"http://127.0.0.1:{server.server_address[1]}", cluster=cluster, server=server)
