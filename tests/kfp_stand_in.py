"""A local stand-in for the Kubeflow Pipelines v2beta1 REST API, for contract tests.

Real HTTP on 127.0.0.1: the real `kfp.Client` talks to it. It keeps pipelines, versions,
experiments, runs and recurring runs in memory, answers in the API's JSON shapes, and records
every request (method, path, query, JSON body, headers) for the tests to assert on. It is not
Kubeflow: it checks only what the tests need (a bearer token, a namespace on experiments).
"""

from __future__ import annotations

import itertools
import json
import threading
from dataclasses import dataclass, field
from email.parser import BytesParser
from email.policy import default as email_policy
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

PREFIX = "/apis/v2beta1"


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    body: dict | None
    headers: dict[str, str]  # names lower-cased


@dataclass
class State:
    token: str = ""  # required as "Bearer <token>" when set
    run_states: list[str] = field(default_factory=lambda: ["PENDING", "RUNNING", "SUCCEEDED"])
    requests: list[Request] = field(default_factory=list)
    pipelines: dict[str, dict] = field(default_factory=dict)
    versions: dict[str, list[dict]] = field(default_factory=dict)
    experiments: dict[str, dict] = field(default_factory=dict)
    runs: dict[str, dict] = field(default_factory=dict)
    run_polls: dict[str, int] = field(default_factory=dict)
    recurring: dict[str, dict] = field(default_factory=dict)
    uploads: list[bytes] = field(default_factory=list)
    ids: itertools.count = field(default_factory=lambda: itertools.count(1))
    clock: itertools.count = field(default_factory=lambda: itertools.count(1))

    def new_id(self, kind: str) -> str:
        return f"{kind}-{next(self.ids)}"

    def now(self) -> str:
        return f"2026-11-26T00:00:{next(self.clock):02d}Z"

    def calls(self, method: str, path_prefix: str) -> list[Request]:
        return [r for r in self.requests if r.method == method and r.path.startswith(PREFIX + path_prefix)]


def _display_name_filter(query: dict[str, list[str]]) -> str | None:
    raw = query.get("filter", [""])[0]
    if not raw:
        return None
    for predicate in json.loads(raw).get("predicates", []):
        if predicate.get("key") in ("display_name", "name"):
            return predicate.get("string_value") or predicate.get("stringValue")
    return None


class Handler(BaseHTTPRequestHandler):
    state: State

    def log_message(self, *args):  # keep pytest output clean
        pass

    def _send(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _handle(self, method: str) -> None:
        parsed = urlparse(self.path)
        query = parse_qs(parsed.query)
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        body = None
        if raw and self.headers.get("Content-Type", "").startswith("application/json"):
            body = json.loads(raw)
        headers = {key.lower(): value for key, value in self.headers.items()}
        self.state.requests.append(Request(method, parsed.path, query, body, headers))
        if self.state.token and self.headers.get("Authorization") != f"Bearer {self.state.token}":
            message = "Unauthenticated: invalid or missing bearer token"
            return self._send(401, {"error": message, "code": 16, "message": message})
        path = parsed.path.removeprefix(PREFIX)
        try:
            status, payload = self.route(method, path, query, body, raw)
        except KeyError as error:
            message = f"not found: {error}"
            status, payload = 404, {"error": message, "code": 5, "message": message}
        self._send(status, payload)

    def do_GET(self):
        self._handle("GET")

    def do_POST(self):
        self._handle("POST")

    def do_DELETE(self):
        self._handle("DELETE")

    def route(self, method: str, path: str, query, body, raw: bytes):  # noqa: C901 (a router)
        s = self.state
        if method == "GET" and path == "/healthz":
            return 200, {"multi_user": True}
        if method == "GET" and path == "/pipelines":
            name = _display_name_filter(query)
            found = [p for p in s.pipelines.values() if name is None or p["display_name"] == name]
            return 200, {"pipelines": found, "total_size": len(found)} if found else {}
        if method == "POST" and path in ("/pipelines/upload", "/pipelines/upload_version"):
            message = BytesParser(policy=email_policy).parsebytes(
                b"Content-Type: " + self.headers["Content-Type"].encode() + b"\r\n\r\n" + raw
            )
            (upload,) = [
                part.get_payload(decode=True)
                for part in message.iter_parts()
                if part.get_param("name", header="content-disposition") == "uploadfile"
            ]
            s.uploads.append(upload)
            name = (query.get("display_name") or query.get("name") or ["?"])[0]
            if path == "/pipelines/upload":
                pipeline = {
                    "pipeline_id": s.new_id("pipeline"),
                    "display_name": name,
                    "created_at": s.now(),
                    "namespace": query.get("namespace", [""])[0],
                }
                s.pipelines[pipeline["pipeline_id"]] = pipeline
                s.versions[pipeline["pipeline_id"]] = [
                    {
                        "pipeline_id": pipeline["pipeline_id"],
                        "pipeline_version_id": s.new_id("version"),
                        "display_name": name,
                        "created_at": s.now(),
                    }
                ]
                return 200, pipeline
            pipeline_id = query["pipelineid"][0]
            s.pipelines[pipeline_id]  # noqa: B018 (404 for an unknown pipeline)
            version = {
                "pipeline_id": pipeline_id,
                "pipeline_version_id": s.new_id("version"),
                "display_name": name,
                "created_at": s.now(),
            }
            s.versions[pipeline_id].append(version)
            return 200, version
        if method == "GET" and path.startswith("/pipelines/") and path.endswith("/versions"):
            versions = list(s.versions[path.split("/")[2]])
            if query.get("sort_by", [""])[0] == "created_at desc":
                versions.reverse()
            size = int(query.get("page_size", ["100"])[0])
            return 200, {"pipeline_versions": versions[:size], "total_size": len(versions)}
        if method == "GET" and path == "/experiments":
            name = _display_name_filter(query)
            namespace = query.get("namespace", [""])[0]
            found = [
                e
                for e in s.experiments.values()
                if (name is None or e["display_name"] == name) and e["namespace"] == namespace
            ]
            return 200, {"experiments": found, "total_size": len(found)} if found else {}
        if method == "POST" and path == "/experiments":
            experiment = {**body, "experiment_id": s.new_id("experiment"), "created_at": s.now()}
            s.experiments[experiment["experiment_id"]] = experiment
            return 200, experiment
        if method == "POST" and path == "/runs":
            run = {**body, "run_id": s.new_id("run"), "state": s.run_states[0], "created_at": s.now()}
            s.runs[run["run_id"]] = run
            return 200, run
        if method == "GET" and path.startswith("/runs/"):
            run = s.runs[path.split("/")[2]]
            polls = s.run_polls.get(run["run_id"], 0)
            s.run_polls[run["run_id"]] = polls + 1
            run["state"] = s.run_states[min(polls, len(s.run_states) - 1)]
            return 200, run
        if method == "POST" and path == "/recurringruns":
            recurring = {
                **body,
                "recurring_run_id": s.new_id("recurring"),
                "created_at": s.now(),
                "status": "ENABLED" if body.get("mode", "ENABLE") == "ENABLE" else "DISABLED",
            }
            s.recurring[recurring["recurring_run_id"]] = recurring
            return 200, recurring
        if method == "GET" and path == "/recurringruns":
            experiment = query.get("experiment_id", [None])[0]
            found = [
                r for r in s.recurring.values() if experiment is None or r.get("experiment_id") == experiment
            ]
            return 200, {"recurringRuns": found, "total_size": len(found)}
        if path.startswith("/recurringruns/"):
            ident, _, action = path.split("/")[2].partition(":")
            recurring = s.recurring[ident]
            if method == "DELETE":
                del s.recurring[ident]
                return 200, {}
            if method == "POST" and action in ("enable", "disable"):
                recurring["status"] = "ENABLED" if action == "enable" else "DISABLED"
                return 200, {}
            if method == "GET":
                return 200, recurring
        return 404, {"error": f"no route for {method} {path}", "code": 5, "message": f"no route for {path}"}


@dataclass
class StandIn:
    url: str
    state: State
    server: ThreadingHTTPServer

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def start(token: str = "") -> StandIn:
    state = State(token=token)
    handler = type("BoundHandler", (Handler,), {"state": state})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return StandIn(url=f"http://127.0.0.1:{server.server_address[1]}", state=state, server=server)
