"""A TF Serving-compatible model server (gRPC ``PredictionService`` / ``ModelService`` + REST).

Serves any SavedModel's signatures from TF Serving's model config file (or one
``name`` + ``base_path``), watches base paths for new numbered versions and
hot-swaps them without failing in-flight requests, batches concurrent requests
(optional), exports Prometheus metrics, and shuts down gracefully. Stock TF
Serving clients (``PredictionServiceStub``, the REST API) work unmodified.

Modules: ``config`` (model config file, version policies, batching/server
options), ``models`` (version watching, loading, retiring), ``servable``
(SavedModel and Python composite servables), ``batching``, ``core`` (request
handling), ``grpc_service``, ``rest`` + ``json_format``, ``metrics``, ``server``.

Example (not run as a doctest: it starts a server on local ports;
`tests/test_server_grpc.py` and `tests/test_server_rest.py` do)::

    >>> from export.server import ModelServer, ServerOptions, single_model_config
    >>> with ModelServer(single_model_config("m", "/models/m"),          # doctest: +SKIP
    ...                  ServerOptions(port=0, rest_api_port=0)) as server:
    ...     print(server.grpc_address)
"""

from export.server.config import (
    BatchingOptions,
    ServedModelConfig,
    ServerOptions,
    VersionPolicy,
    load_batching_parameters,
    load_model_config_file,
    parse_model_config_text,
    single_model_config,
)
from export.server.errors import ServingError
from export.server.server import ModelServer
from export.server.servable import PythonServable, Signature

__all__ = [
    "BatchingOptions",
    "ServedModelConfig",
    "ModelServer",
    "PythonServable",
    "ServerOptions",
    "ServingError",
    "Signature",
    "VersionPolicy",
    "load_batching_parameters",
    "load_model_config_file",
    "parse_model_config_text",
    "single_model_config",
]
