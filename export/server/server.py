"""The model server: registry + serving core + gRPC and REST endpoints, with graceful shutdown.

One ``BatchScheduler`` (when ``ServerOptions.batching`` is set) serves every model;
``ServerOptions.per_model_batching`` lets each SavedModel version bring its own
batching parameters (TF Serving's ``--enable_per_model_batching_parameters``, see
``export.server.models``); without batching it is ignored with a warning.

Example (not run as a doctest: it starts a server on local ports;
`tests/test_server_grpc.py` and `tests/test_server_rest.py` do)::

    >>> from export.server import ModelServer, ServerOptions, single_model_config
    >>> server = ModelServer(single_model_config("m", "/models/m"),        # doctest: +SKIP
    ...                      ServerOptions(port=0, rest_api_port=0)).start()
    >>> server.grpc_address, server.rest_url                               # doctest: +SKIP
    ('127.0.0.1:40125', 'http://127.0.0.1:38277')
    >>> server.stop()                                                      # doctest: +SKIP
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Optional, Sequence

import grpc

from export.server.batching import BatchScheduler
from export.server.config import ServedModelConfig, ServerOptions
from export.server.core import ServingCore
from export.server.grpc_service import add_services
from export.server.metrics import ServingMetrics
from export.server.models import ModelRegistry
from export.server.rest import RestServer

logger = logging.getLogger(__name__)


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def _warn_if_no_model_follows(delta_path: str, configs) -> None:
    """Log a warning when no configured python model reads ``delta_path`` (``delta=`` option): items posted
    to ``/v1/items`` are then stored but recommended by nothing (until a config reload adds one)."""
    import os

    from export.server.config import PYTHON_PLATFORM, python_factory_spec

    for config in configs:
        if config.platform == PYTHON_PLATFORM:
            delta = python_factory_spec(config.base_path)[2].get("delta")
            if delta and os.path.abspath(delta) == delta_path:
                return
    logger.warning("--items_delta %s: no served model follows this file (an export.delta_retrieval model with "
                   "delta=%s): POST /v1/items stores items that nothing recommends yet", delta_path, delta_path)


def _warn_if_no_model_serves(ranker_out: str, configs) -> None:
    """Log a warning when no configured model has ``ranker_out`` (``--items_ranker_out``) as its base path: the
    ranker versions POST /v1/items publishes are then served by another server, or by nothing."""
    import os

    from export.server.config import PYTHON_PLATFORM

    if not any(config.platform != PYTHON_PLATFORM and "://" not in config.base_path
               and os.path.abspath(config.base_path) == ranker_out for config in configs):
        logger.warning("--items_ranker_out %s: no model of this server has it as its base path: the ranker versions "
                       "POST /v1/items publishes are not served here", ranker_out)


class ModelServer:
    """Serves the models of ``configs`` over gRPC and REST.

    Args:
        configs: ``Sequence[ServedModelConfig]`` (see ``load_model_config_file`` / ``single_model_config``).
        options: :class:`ServerOptions` (ports, batching, polling, shutdown grace).
        loader: optional ``callable(name, version, path) -> Servable`` replacing SavedModel loading.
    """

    def __init__(self, configs: Sequence[ServedModelConfig], options: Optional[ServerOptions] = None, loader=None):
        self.options = options or ServerOptions()
        self.configs = list(configs)
        kwargs = {} if loader is None else {"loader": loader}
        self.metrics = ServingMetrics()
        self.batch_scheduler = (
            BatchScheduler(self.options.batching, self.metrics) if self.options.batching is not None else None
        )
        if self.options.per_model_batching and self.batch_scheduler is None:
            logger.warning("per-model batching parameters (--enable_per_model_batching_parameters) "
                           "need batching (--enable_batching): ignored")
        self.registry = ModelRegistry(
            self.configs, self.options.file_system_poll_wait_seconds, batch_scheduler=self.batch_scheduler,
            per_model_batching=self.options.per_model_batching,
            allowed_python_modules=self.options.allowed_python_modules, **kwargs
        )
        self.history_store = None
        histories = None
        if self.options.history_store:
            from export.server.user_history import UserHistories
            from tfrec.history import open_store

            from tfrec.history import HistoryStoreError

            try:
                self.history_store = open_store(self.options.history_store)
            except HistoryStoreError as err:
                raise ValueError(f"cannot open the history store: {err}") from None
            try:
                histories = UserHistories(self.history_store, self.options.history_length)
            except ValueError:
                self.history_store.close()
                raise
        items = None
        if self.options.items_delta:
            from export.server.items import ItemsEndpoint

            options = self.options
            try:
                items = ItemsEndpoint.from_options(
                    options.items_delta, options.items_model, options.items_store, options.items_encoder,
                    ranker=options.items_ranker, ranker_out=options.items_ranker_out,
                    ranker_init=options.items_ranker_init, ranker_store=options.items_ranker_store,
                    history_store=options.history_store)
            except ValueError:
                self._close_history_store()
                raise
            _warn_if_no_model_follows(items.delta_path, self.configs)
            if items.ranker is not None:
                _warn_if_no_model_serves(items.ranker.ranker_out, self.configs)
        self.core = ServingCore(self.registry, self.metrics, histories, items)
        self.registry.context = self.core
        self.metrics.set_version_states(self.registry.version_states)
        self._grpc: Optional[grpc.Server] = None
        self._rest: Optional[RestServer] = None
        self.grpc_port: Optional[int] = None
        self.rest_port: Optional[int] = None
        self._stopped = threading.Event()
        self._stop_lock = threading.Lock()

    @property
    def grpc_address(self) -> str:
        return _hostport(self.options.host, self.grpc_port)

    @property
    def rest_url(self) -> Optional[str]:
        return None if self.rest_port is None else f"http://{_hostport(self.options.host, self.rest_port)}"

    def health(self):
        """``(ok, detail)``: ok when not shutting down and every model has an available version.

        A model whose base path cannot be read is listed under ``models_with_errors`` and
        does not hold the others' health (it serves nothing until its path is readable).
        """
        if self.core.draining:
            return False, {"status": "shutting down"}
        errors = self.registry.model_errors()
        missing = [name for name in self.registry.model_names()
                   if name not in errors and not self.registry.is_available(name)]
        detail = {"models_with_errors": sorted(errors)} if errors else {}
        if missing:
            return False, {"status": "not ready", "models_without_available_version": missing, **detail}
        return True, {"status": "ok", **detail}

    def start(self) -> "ModelServer":
        """Load the models present now, then open the gRPC and REST ports."""
        if self._grpc is not None or self._stopped.is_set():
            raise RuntimeError("ModelServer.start() can be called once")
        options = self.options
        self.registry.start()
        server = grpc.server(
            ThreadPoolExecutor(max_workers=options.grpc_max_threads, thread_name_prefix="tfrec-grpc"),
            options=[
                ("grpc.so_reuseport", 0),  # a second server on a busy port must fail, not share it
                ("grpc.max_receive_message_length", options.grpc_max_message_bytes),
                ("grpc.max_send_message_length", options.grpc_max_message_bytes),
            ],
        )
        add_services(server, self.core, options.grpc_use_tensor_content)
        try:
            port = server.add_insecure_port(_hostport(options.host, options.port))
        except RuntimeError as err:
            port, reason = 0, str(err)
        else:
            reason = "address in use or not available"
        if not port:
            self.registry.close(timeout=1)
            self._close_history_store()
            raise ValueError(f"cannot bind gRPC to {_hostport(options.host, options.port)}: {reason}")
        self.grpc_port = port
        if options.rest_api_port >= 0:
            try:
                self._rest = RestServer(self.core, self.metrics, options.host, options.rest_api_port, self.health,
                                        max_body_bytes=options.rest_max_body_bytes,
                                        max_connections=options.rest_max_connections,
                                        idle_timeout_seconds=options.rest_idle_timeout_seconds,
                                        allowed_hosts=options.rest_allowed_hosts)
            except ValueError:
                self.registry.close(timeout=1)
                self._close_history_store()
                raise
            self.rest_port = self._rest.port
            self._rest.start()
        server.start()
        self._grpc = server
        logger.info("serving gRPC on %s, REST on %s", self.grpc_address, self.rest_url)
        return self

    def stop(self, grace: Optional[float] = None) -> None:
        """Graceful shutdown: stop accepting, let in-flight requests finish (up to ``grace`` s), unload."""
        with self._stop_lock:
            if self._stopped.is_set():
                return
            grace = self.options.shutdown_grace_seconds if grace is None else grace
            deadline = time.monotonic() + grace
            grpc_done = self._grpc.stop(grace) if self._grpc is not None else None
            self.core.start_draining()
            if self._rest is not None:
                self._rest.stop(timeout=grace)
            if grpc_done is not None:
                grpc_done.wait(max(0.0, deadline - time.monotonic()))
            self.core.wait_idle(max(0.0, deadline - time.monotonic()))
            self.registry.close(timeout=max(0.0, deadline - time.monotonic()))
            if self.batch_scheduler is not None:
                self.batch_scheduler.close()
            self._close_history_store()
            self._stopped.set()

    def _close_history_store(self) -> None:
        if self.history_store is not None:
            self.history_store.close()

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Block until :meth:`stop` finished; ``False`` on timeout."""
        return self._stopped.wait(timeout)

    def __enter__(self) -> "ModelServer":
        return self.start() if self._grpc is None else self

    def __exit__(self, *exc) -> None:
        self.stop()
