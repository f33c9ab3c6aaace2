"""TF Serving's REST API on the standard library's threading HTTP server.

Routes (paths are case-insensitive, as in TF Serving):

- ``GET  /v1/models/<name>[/versions/<v>|/labels/<l>]``: model status;
- ``GET  /v1/models/<name>[/versions/<v>|/labels/<l>]/metadata``: signatures;
- ``POST /v1/models/<name>[/versions/<v>|/labels/<l>]:predict|classify|regress``;
- ``POST /v1/events``: append user events to the history store (servers started with
  one; ``export.server.user_history``), ``{"events": [...]}`` -> ``{"received", "appended"}``;
- ``POST /v1/items``: embed new catalogue items and add them to the delta file (servers started
  with ``--items_delta``; ``export.server.items``), ``{"items": [...]}`` -> ``{"added", "replaced",
  "items", "generation", "seconds"}``;
- ``GET  /monitoring/prometheus/metrics``: Prometheus metrics (text format);
- ``GET  /healthz``: 200 ``{"status": "ok"}`` when every configured model has an
  available version and the server is not shutting down, else 503 naming what is
  missing (a readiness check for load balancers).

Errors answer ``{"error": "<message>"}`` with TF Serving's HTTP status for the
failure (400 bad input, 404 unknown model/version, 503 unavailable, ...); any
other ``/v1/`` path is ``400 Malformed request``, any other path 404. Messages
never carry stack traces or server file paths.
Connections are HTTP/1.1 keep-alive; on shutdown idle connections are closed and
in-flight requests finish.

Limits (``ServerOptions``): bodies above ``max_body_bytes`` (default 64 MiB) and
malformed chunked encodings are answered 400 before anything is buffered; JSON
nested deeper than :data:`export.server.json_format.MAX_JSON_DEPTH` is 400; at most
``max_connections`` connections are served at once (one thread each; the next
ones get 503 and are closed); a connection idle for ``idle_timeout_seconds`` is
closed. Each response leaves in one ``send`` on a ``TCP_NODELAY`` socket (no
Nagle / delayed-ACK stall on kept-open connections).

``Host`` / ``Origin`` checks: bound to a loopback address, only loopback names
(``localhost``, ``127.0.0.1``, ``[::1]``, plus ``allowed_hosts``) are accepted in
``Host`` and ``Origin`` (403 otherwise), so neither a web page in a local browser
nor DNS rebinding can reach the models; bound wider, any ``Host`` is accepted and
an ``Origin`` must name the ``Host`` itself or an ``allowed_hosts`` entry.

Example (not run as a doctest: it starts an HTTP server on a local port;
`tests/test_server_rest.py` does)::

    >>> rest = RestServer(core, host="127.0.0.1", port=0)    # doctest: +SKIP
    >>> rest.start(); rest.port                               # doctest: +SKIP
    41873
"""

from __future__ import annotations

import ipaddress
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
from export.server.core import TRIM_AFTER_BYTES, ModelRef, ServingCore, release_memory
from export.server.errors import ServingError, wire_message
from export.server.metrics import CONTENT_TYPE
from export.server.user_history import request_input_names

logger = logging.getLogger(__name__)

PROMETHEUS_PATH = "/monitoring/prometheus/metrics"
EVENTS_PATH = "/v1/events"
ITEMS_PATH = "/v1/items"
MAX_BODY_BYTES = 64 << 20  # default body limit (ServerOptions.rest_max_body_bytes)
MAX_LINE_BYTES = 8192  # a chunk-size line longer than this is malformed
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1", "[::1]", "ip6-localhost"})
_BUSY_RESPONSE = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 47\r\nConnection: close\r\n\r\n"
                  b'{"error": "too many connections, retry later"}\n')

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


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host.lower() in LOOPBACK_NAMES


def _host_name(value: str) -> str:
    """The host of a ``Host`` header value (``name[:port]``, ``[v6][:port]``), lower-cased."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[: value.find("]") + 1] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # RestServer.stop joins handler threads itself, with a deadline
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address, handler, core: ServingCore, metrics, health, max_body_bytes=MAX_BODY_BYTES,
                 max_connections=64, idle_timeout_seconds=30.0, allowed_hosts=()):
        self.core, self.metrics, self.health = core, metrics, health
        self.max_body_bytes, self.idle_timeout = int(max_body_bytes), float(idle_timeout_seconds)
        self.loopback_only = _is_loopback(address[0])
        self.allowed_hosts = frozenset(h.lower() for h in allowed_hosts) | LOOPBACK_NAMES
        self.stopping = False
        self._slots = threading.BoundedSemaphore(max_connections)
        self._conn_lock = threading.Lock()
        self._connections = {}  # socket -> busy flag
        self._handler_threads = []
        super().__init__(address, handler)

    def process_request(self, request, client_address):
        if not self._slots.acquire(blocking=False):  # bounded threads: refuse, never queue unboundedly
            try:
                request.settimeout(1.0)
                request.sendall(_BUSY_RESPONSE)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        thread = threading.Thread(
            target=self._serve_connection, args=(request, client_address), name="tfrec-rest-conn", daemon=True
        )
        with self._conn_lock:
            self._handler_threads = [t for t in self._handler_threads if t.is_alive()] + [thread]
        thread.start()

    def _serve_connection(self, request, client_address):
        try:
            self.process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def host_allowed(self, host: Optional[str]) -> bool:
        """Whether a request's ``Host`` header is acceptable (absent: HTTP/1.0 clients, allowed)."""
        if host is None or not self.loopback_only:
            return True
        name = _host_name(host)
        return name in self.allowed_hosts or _is_loopback(name)

    def origin_allowed(self, origin: Optional[str], host: Optional[str]) -> bool:
        """Whether a request's ``Origin`` header (sent by browsers) is acceptable."""
        if origin is None:
            return True
        name = _host_name(urlsplit(origin).netloc) if "://" in origin else ""
        if not name:  # "null" (sandboxed pages, files) or garbage
            return False
        if name in self.allowed_hosts or _is_loopback(name):
            return True
        return not self.loopback_only and host is not None and name == _host_name(host)

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
    sys_version = ""

    def setup(self):
        self.timeout = self.server.idle_timeout  # idle (or stalled) connections are dropped after this
        super().setup()
        try:
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
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
        if self.server.stopping or self.close_connection:
            self.close_connection = True
            self.send_header("Connection", "close")
        # Status line, headers and body leave in one write (one send on a TCP_NODELAY socket).
        self._headers_buffer.append(b"\r\n")
        self._headers_buffer.append(body)
        self.flush_headers()
        if not self.server.track(self.connection, False):  # idle again; close if the server is stopping
            self.close_connection = True

    def _send_json(self, status: int, obj) -> None:
        self._send(status, json.dumps(obj).encode("utf-8"))

    def _send_error(self, err: ServingError) -> None:
        self._send_json(err.http_status, {"error": wire_message(err.message)})

    def _bad_body(self, message: str) -> ServingError:
        self.close_connection = True  # the rest of the body was not read: the connection is out of sync
        return ServingError.invalid_argument(message)

    def _read_line(self) -> bytes:
        line = self.rfile.readline(MAX_LINE_BYTES + 1)
        if len(line) > MAX_LINE_BYTES:
            raise self._bad_body("chunked encoding: line too long")
        return line

    def _read_exact(self, size: int) -> bytes:
        data = self.rfile.read(size)
        if len(data) != size:
            raise ConnectionError("client closed the connection inside the body")
        return data

    def _read_body(self) -> bytes:
        limit = self.server.max_body_bytes
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks, total = [], 0
            while True:
                text = self._read_line().split(b";")[0].strip()
                if not text or not re.fullmatch(rb"[0-9a-fA-F]{1,16}", text):
                    raise self._bad_body(f"chunked encoding: bad chunk size {text[:32].decode('latin-1')!r}")
                size = int(text, 16)
                if size == 0:
                    while self._read_line() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                total += size
                if total > limit:
                    raise self._bad_body(f"request body larger than {limit} bytes")
                chunks.append(self._read_exact(size))
                if self._read_line() not in (b"\r\n", b"\n"):
                    raise self._bad_body("chunked encoding: chunk data not followed by CRLF")
        length = self.headers.get("Content-Length")
        if length is None:
            return b""
        if not re.fullmatch(r"[0-9]{1,19}", length.strip()):
            raise self._bad_body(f"bad Content-Length {length[:32]!r}")
        length = int(length)
        if length > limit:
            raise self._bad_body(f"Content-Length {length} exceeds the body limit of {limit} bytes")
        return self._read_exact(length)

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
        large = False
        try:
            host, origin = self.headers.get("Host"), self.headers.get("Origin")
            if not self.server.host_allowed(host) or not self.server.origin_allowed(origin, host):
                self.close_connection = True
                raise ServingError.permission_denied(
                    "Host or Origin not allowed: this server accepts loopback names only "
                    "(start it with --rest_allowed_hosts, or bound to a wider interface, to accept others)"
                )
            path = urlsplit(self.path).path
            body = self._read_body()  # always consumed, so a keep-alive connection stays in sync
            large = len(body) > TRIM_AFTER_BYTES
            if path == PROMETHEUS_PATH and method == "GET":
                text = self.server.metrics.render() if self.server.metrics is not None else b""
                return self._send(200, text, CONTENT_TYPE)
            if path == "/healthz" and method == "GET":
                ok, detail = self.server.health()
                return self._send_json(200 if ok else 503, detail)
            if not path.lower().startswith("/v1/"):
                return self._send_json(404, {"error": f"Not found: {path}"})
            status, obj = self._v1(method, path, body)
            del body
            self._send_json(status, obj)
            del obj
        except ServingError as err:
            self._send_error(err)
        except (ConnectionError, socket.timeout):
            self.close_connection = True
        except Exception as err:  # noqa: BLE001 - answer 500, keep serving
            logger.exception("REST request %s %.200s failed", method, self.path)
            self._send_error(ServingError.from_exception(err))
        finally:
            if large:
                release_memory()

    def _v1(self, method: str, path: str, body: bytes):
        core: ServingCore = self.server.core
        if method == "POST":
            if path.lower() == EVENTS_PATH:
                return 200, core.ingest_events(json_format.parse_body(body), protocol="rest")
            if path.lower() == ITEMS_PATH:
                return 200, core.add_items(json_format.parse_body(body), protocol="rest")
            match = _PREDICT_RE.fullmatch(path)
            if match:
                name, version, label, verb = match.groups()
                doc = json_format.parse_body(body)
                del body  # parsed: let large bodies go
                ref = _ref(name, version, label, doc.get("signature_name", ""))
                if verb.lower() == "predict":
                    holder = [doc]  # decode takes the document out: large bodies are freed once converted
                    del doc
                    return 200, self._predict(core, ref, holder)
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
    def _predict(core: ServingCore, ref: ModelRef, holder: list) -> dict:
        fmt = {}

        def decode(signature, holder):
            document = holder.pop()
            try:
                arrays, fmt["format"] = json_format.predict_inputs_from_json(document, signature)
            except ServingError:
                raise
            except (ValueError, TypeError, OverflowError) as err:  # numpy refusing a shape etc.: bad input
                raise ServingError.invalid_argument(f"cannot convert the request to tensors: {err}") from None
            return arrays

        from export.server.servable import SignatureNotFound

        try:
            result = core.predict(ref, holder, decode=decode, protocol="rest",
                                  input_names=request_input_names(holder[0]))
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
        max_body_bytes, max_connections, idle_timeout_seconds, allowed_hosts: see the module docstring
            (``ServerOptions.rest_*``).
    """

    def __init__(self, core: ServingCore, metrics=None, host: str = "127.0.0.1", port: int = 8501, health=None,
                 max_body_bytes: int = MAX_BODY_BYTES, max_connections: int = 64,
                 idle_timeout_seconds: float = 30.0, allowed_hosts=()):
        health = health or (lambda: (not core.draining, {"status": "ok" if not core.draining else "shutting down"}))
        try:
            self._httpd = _HTTPServer((host, port), _Handler, core, metrics, health, max_body_bytes,
                                      max_connections, idle_timeout_seconds, allowed_hosts)
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
