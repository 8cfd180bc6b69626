"""The daemon's HTTP side: ``/metrics`` (Prometheus), ``/healthz`` and ``/readyz``.

A threaded wsgiref server in a daemon thread (a slow scraper never blocks a health probe),
bound to ``[metrics] address``/``port`` (loopback by default). It reads the pipeline at
every request: its ``metrics.prom.registry``, ``state``, ``ready`` and ``heartbeat()``.

* ``/healthz``: 200 while the process serves and every processing loop went round within
  ``heartbeat_timeout`` seconds (also while starting: loading is not a failure); 503 when a
  loop is stuck or the pipeline has stopped.
* ``/readyz``: 200 only when ``pipeline.ready`` (bundle loaded, sockets open, workers
  spawned, loops running); 503 while starting and from the moment shutdown begins.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import make_wsgi_app

log = logging.getLogger(__name__)


class MonitorError(ValueError):
    """The HTTP server could not listen (the message names the address)."""


def health(state: str, heartbeat: dict[str, float], timeout: float) -> tuple[bool, dict]:
    """(healthy, body) from the pipeline state and each loop's seconds since its last round."""
    stale = {loop: round(age, 3) for loop, age in heartbeat.items() if age > timeout}
    ok = state == "starting" or (state in ("running", "stopping") and not stale)
    body = {"status": "ok" if ok else "unhealthy", "state": state,
            "heartbeat_seconds": {loop: round(age, 3) for loop, age in heartbeat.items()},
            "heartbeat_timeout_seconds": timeout}
    if stale and state != "starting":
        body["stale"] = stale
    return ok, body


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True


class _Handler(WSGIRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the base class's name; scrapes go to debug, not stderr
        log.debug("%s %s", self.address_string(), format % args)


class MonitorServer:
    """Serves ``pipeline`` over HTTP until :meth:`close`; ``port`` is the bound one (0 = any free)."""

    def __init__(self, pipeline, *, address: str = "127.0.0.1", port: int = 0, heartbeat_timeout: float = 10.0):
        self.pipeline = pipeline
        self.heartbeat_timeout = float(heartbeat_timeout)
        server_class = _Server
        if ":" in address:  # an IPv6 literal
            server_class = type("_Server6", (_Server,), {"address_family": socket.AF_INET6})
        try:
            self.server = make_server(address, port, self.app, server_class=server_class, handler_class=_Handler)
        except OSError as exc:
            raise MonitorError(f"metrics.address/metrics.port {address}:{port}: cannot listen for HTTP: "
                               f"{exc.strerror or exc} (choose another [metrics] port, or set enabled = false)"
                               ) from None
        self.address = address
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="xtalsym-metrics-http", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"http://{host}:{self.port}"

    def app(self, environ, start_response):
        path = environ.get("PATH_INFO", "/")
        if path == "/metrics":
            return make_wsgi_app(self.pipeline.metrics.prom.registry)(environ, start_response)
        if path == "/healthz":
            ok, body = health(self.pipeline.state, self.pipeline.heartbeat(), self.heartbeat_timeout)
            return _json(start_response, ok, body)
        if path == "/readyz":
            ready = self.pipeline.ready
            body = {"status": "ready" if ready else "not ready", "state": self.pipeline.state,
                    "model_id": self.pipeline.model_info.get("model_id")}
            return _json(start_response, ready, body)
        return _json(start_response, None, {"error": f"no such path {path!r}",
                                            "paths": ["/metrics", "/healthz", "/readyz"]})

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(5)


def _json(start_response, ok: bool | None, body: dict):
    status = "200 OK" if ok else ("404 Not Found" if ok is None else "503 Service Unavailable")
    data = (json.dumps(body) + "\n").encode()
    start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(data))),
                            ("Cache-Control", "no-store")])
    return [data]
