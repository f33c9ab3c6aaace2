"""TF Serving's REST API on the standard library's threading HTTP server.

Routes (paths are case-insensitive, as in TF Serving):

- ``GET  /v1/models/<name>[/versions/<v>|/labels/<l>]``: model status;
- ``GET  /v1/models/<name>[/versions/<v>|/labels/<l>]/metadata``: signatures;
- ``POST /v1/models/<name>[/versions/<v>|/labels/<l>]:predict|classify|regress``;
- ``GET  /monitoring/prometheus/metrics``: Prometheus metrics (text format);
- ``GET  /healthz``: 200 ``{"status": "ok"}`` when every configured model has an
  available version and the server is not shutting down, else 503 naming what is
  missing (a readiness check for load balancers).

Errors answer ``{"error": "<message>"}`` with TF Serving's HTTP status for the
failure (400 bad input, 404 unknown model/version, 503 unavailable, ...); any
other ``/v1/`` path is ``400 Malformed request``, any other path 404.
Connections are HTTP/1.1 keep-alive; on shutdown idle connections are closed and
in-flight requests finish.

Example::

    >>> rest = RestServer(core, host="127.0.0.1", port=0)    # doctest: +SKIP
    >>> rest.start(); rest.port                               # doctest: +SKIP
    41873
"""

from __future__ import annotations

import json
import logging
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional
from urllib.parse import unquote, urlsplit

from google.protobuf import json_format as pb_json

from export.server import json_format
from export.server.core import ModelRef, ServingCore
from export.server.errors import ServingError

logger = logging.getLogger(__name__)

PROMETHEUS_PATH = "/monitoring/prometheus/metrics"
MAX_BODY_BYTES = 1 << 30

_VERSION = r"(?:(?:/versions/(\d+))|(?:/labels/([^/:]+)))?"
_PREDICT_RE = re.compile(r"/v1/models/([^/:]+)" + _VERSION + r":(classify|regress|predict)", re.IGNORECASE)
_STATUS_RE = re.compile(r"/v1/models(?:/([^/:]+))?" + _VERSION + r"(?:/(metadata))?", re.IGNORECASE)


def _ref(name: str, version: Optional[str], label: Optional[str], signature: str = "") -> ModelRef:
    parsed_version = None
    if version:
        parsed_version = int(version)
        if parsed_version >= 2**63:
            raise ServingError.invalid_argument(f"Failed to convert version: {version} to numeric.")
    return ModelRef(unquote(name), parsed_version, unquote(label) if label else None, signature)


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # RestServer.stop joins handler threads itself, with a deadline
    allow_reuse_address = True

    def __init__(self, address, handler, core: ServingCore, metrics, health):
        self.core, self.metrics, self.health = core, metrics, health
        self.stopping = False
        self._conn_lock = threading.Lock()
        self._connections = {}  # socket -> busy flag
        self._handler_threads = []
        super().__init__(address, handler)

    def process_request(self, request, client_address):
        thread = threading.Thread(
            target=self.process_request_thread, args=(request, client_address), name="tfrec-rest-conn", daemon=True
        )
        with self._conn_lock:
            self._handler_threads = [t for t in self._handler_threads if t.is_alive()] + [thread]
        thread.start()

    def join_handlers(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self._conn_lock:
            threads = list(self._handler_threads)
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def track(self, conn, busy: Optional[bool]) -> bool:
        """Record a connection's state; ``False`` if the server is stopping and it must close."""
        with self._conn_lock:
            if busy is None:
                self._connections.pop(conn, None)
            else:
                self._connections[conn] = busy
            return not self.stopping

    def close_idle_connections(self) -> None:
        with self._conn_lock:
            self.stopping = True
            for conn, busy in self._connections.items():
                if not busy:
                    try:
                        conn.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

    def handle_error(self, request, client_address):  # quiet: a client hanging up is not a server error
        logger.debug("REST connection from %s ended with an error", client_address, exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "tfrec-model-server"
    timeout = 120  # idle keep-alive connections are dropped after this many seconds

    def setup(self):
        super().setup()
        self.server.track(self.connection, False)

    def finish(self):
        self.server.track(self.connection, None)
        super().finish()

    def parse_request(self):
        self.server.track(self.connection, True)
        return super().parse_request()

    def log_message(self, fmt, *args):
        logger.debug("%s " + fmt, self.address_string(), *args)

    # --- responses ------------------------------------------------------------------
    def _send(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        if self.server.stopping:
            self.close_connection = True
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()
        if not self.server.track(self.connection, False):  # idle again; close if the server is stopping
            self.close_connection = True

    def _send_json(self, status: int, obj) -> None:
        self._send(status, json.dumps(obj).encode("utf-8"))

    def _send_error(self, err: ServingError) -> None:
        self._send_json(err.http_status, {"error": err.message})

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks, total = [], 0
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                total += size
                if total > MAX_BODY_BYTES:
                    raise ServingError.invalid_argument(f"request body larger than {MAX_BODY_BYTES} bytes")
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = self.headers.get("Content-Length")
        if length is None:
            return b""
        try:
            length = int(length)
        except ValueError:
            raise ServingError.invalid_argument(f"bad Content-Length {length!r}") from None
        if length < 0 or length > MAX_BODY_BYTES:
            raise ServingError.invalid_argument(f"Content-Length {length} out of range (max {MAX_BODY_BYTES})")
        return self.rfile.read(length)

    # --- dispatch ---------------------------------------------------------------------
    def do_GET(self):  # noqa: N802
        self._dispatch("GET")

    def do_POST(self):  # noqa: N802
        self._dispatch("POST")

    def do_PUT(self):  # noqa: N802
        self._dispatch("PUT")

    def do_DELETE(self):  # noqa: N802
        self._dispatch("DELETE")

    def do_PATCH(self):  # noqa: N802
        self._dispatch("PATCH")

    def _dispatch(self, method: str) -> None:
        try:
            path = urlsplit(self.path).path
            body = self._read_body()  # always consumed, so a keep-alive connection stays in sync
            if path == PROMETHEUS_PATH and method == "GET":
                text = self.server.metrics.render() if self.server.metrics is not None else ""
                return self._send(200, text.encode("utf-8"), "text/plain; version=0.0.4")
            if path == "/healthz" and method == "GET":
                ok, detail = self.server.health()
                return self._send_json(200 if ok else 503, detail)
            if not path.lower().startswith("/v1/"):
                return self._send_json(404, {"error": f"Not found: {path}"})
            status, obj = self._v1(method, path, body)
            self._send_json(status, obj)
        except ServingError as err:
            self._send_error(err)
        except (ConnectionError, socket.timeout):
            self.close_connection = True
        except Exception as err:  # noqa: BLE001 - answer 500, keep serving
            logger.exception("REST request %s %s failed", method, self.path)
            self._send_error(ServingError.from_exception(err))

    def _v1(self, method: str, path: str, body: bytes):
        core: ServingCore = self.server.core
        if method == "POST":
            match = _PREDICT_RE.fullmatch(path)
            if match:
                name, version, label, verb = match.groups()
                doc = json_format.parse_body(body)
                ref = _ref(name, version, label, doc.get("signature_name", ""))
                if verb.lower() == "predict":
                    return 200, self._predict(core, ref, doc)
                examples = json_format.examples_from_json(doc, verb.lower())
                if verb.lower() == "classify":
                    results = core.classify(ref, examples, protocol="rest")[3]
                    return 200, json_format.classify_results_to_json(results)
                return 200, json_format.regress_results_to_json(core.regress(ref, examples, protocol="rest")[3])
        elif method == "GET":
            match = _STATUS_RE.fullmatch(path)
            if match:
                name, version, label, subresource = match.groups()
                if not name:
                    raise ServingError.invalid_argument("Missing model name in request.")
                ref = _ref(name, version, label)
                if subresource:
                    return 200, self._metadata(core, ref)
                from export.server.grpc_service import status_response

                response = status_response(core.status(ref, protocol="rest"))
                return 200, pb_json.MessageToDict(response, including_default_value_fields=True)
        raise ServingError.invalid_argument(f"Malformed request: {method} {path}")

    @staticmethod
    def _predict(core: ServingCore, ref: ModelRef, doc: dict) -> dict:
        fmt = {}

        def decode(signature, document):
            arrays, fmt["format"] = json_format.predict_inputs_from_json(document, signature)
            return arrays

        from export.server.servable import SignatureNotFound

        try:
            result = core.predict(ref, doc, decode=decode, protocol="rest")
        except SignatureNotFound as err:  # REST reports it as a bad request (GetInfoMap)
            raise ServingError.invalid_argument(
                f'Serving signature name: "{err.signature_name}" not found in signature def'
            ) from None
        return json_format.outputs_to_json(result.outputs, fmt["format"])

    @staticmethod
    def _metadata(core: ServingCore, ref: ModelRef) -> dict:
        from tensorflow_serving.apis import model_pb2

        name, version, signature_defs = core.metadata(ref, protocol="rest")
        spec = model_pb2.ModelSpec(name=name)
        spec.version.value = version
        options = dict(including_default_value_fields=True, preserving_proto_field_name=True)
        return {
            "model_spec": pb_json.MessageToDict(spec, **options),
            "metadata": {"signature_def": pb_json.MessageToDict(signature_defs, **options)},
        }


class RestServer:
    """The REST endpoint of a :class:`ServingCore`.

    Args:
        core: ``ServingCore``. metrics: optional ``ServingMetrics`` (``/monitoring/prometheus/metrics``).
        host: ``str`` to bind, default loopback. port: ``int``, 0 picks a free port.
        health: ``callable() -> (ok, detail_dict)`` for ``/healthz``.
    """

    def __init__(self, core: ServingCore, metrics=None, host: str = "127.0.0.1", port: int = 8501, health=None):
        health = health or (lambda: (not core.draining, {"status": "ok" if not core.draining else "shutting down"}))
        try:
            self._httpd = _HTTPServer((host, port), _Handler, core, metrics, health)
        except OSError as err:
            raise ValueError(f"cannot bind REST API to {host}:{port}: {err}") from None
        self.host, self.port = host, self._httpd.server_address[1]
        self._thread: Optional[threading.Thread] = None

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.1}, name="tfrec-rest", daemon=True
        )
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop accepting, close idle keep-alive connections, wait for in-flight requests."""
        self._httpd.shutdown()
        self._httpd.close_idle_connections()
        self._httpd.join_handlers(timeout)
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(1.0)
