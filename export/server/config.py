"""Server configuration: TF Serving's model config file, version policies, batching options.

The model config file is TF Serving's own text-proto ``ModelServerConfig``::

    model_config_list {
      config {
        name: 'recommender'
        base_path: '/models/recommender'
        model_platform: 'tensorflow'
        model_version_policy { latest { num_versions: 2 } }   # or all {} / specific { versions: 3 }
        version_labels { key: 'stable' value: 3 }
      }
    }

``base_path`` holds numbered version folders (``<base_path>/<version>/saved_model.pb``).
One extension of ours: ``model_platform: 'python'`` with ``base_path: 'package.module:factory'``
serves a composite servable written in Python (see ``export.server.servable.PythonServable``);
options for the factory follow as a URL query, ``'package.module:factory?key=value&key2=value2'``
(values are strings, ``%``-escaped as in URLs; see :func:`python_factory_spec`).
Such modules must be allowed by the operator (``ServerOptions.allowed_python_modules``,
``--allowed_python_modules``): a config file or a reload request cannot add one
(:func:`check_python_module_allowed`).

Batching options follow TF Serving's ``BatchingParameters`` names; a
``--batching_parameters_file`` in TF Serving's text format is read by
:func:`load_batching_parameters`. With ``ServerOptions.per_model_batching``
(TF Serving's ``--enable_per_model_batching_parameters``) each SavedModel
version brings its own parameters in ``<version>/batching_params.pbtxt``
(:func:`load_per_model_batching_parameters`).

Example::

    >>> configs = parse_model_config_text(
    ...     "model_config_list { config { name: 'm' base_path: '/tmp/m' model_platform: 'tensorflow' } }")
    >>> configs[0].name, configs[0].version_policy.select([1, 3, 2])
    ('m', [3])
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import urllib.parse
from typing import Iterable, Mapping, Optional, Sequence

TENSORFLOW_PLATFORM = "tensorflow"
PYTHON_PLATFORM = "python"
PLATFORMS = (TENSORFLOW_PLATFORM, PYTHON_PLATFORM)
PER_MODEL_BATCHING_FILE = "batching_params.pbtxt"  # TF Serving's name, in the version folder

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class VersionPolicy:
    """Which numbered versions of a model to serve (TF Serving's ``ServableVersionPolicy``).

    Args:
        kind: ``"latest"`` (the ``num_versions`` highest), ``"all"`` or ``"specific"``.
        num_versions: ``int`` for ``latest``, default 1.
        versions: ``tuple[int, ...]`` for ``specific``.
    """

    kind: str = "latest"
    num_versions: int = 1
    versions: tuple = ()

    def __post_init__(self):
        if self.kind not in ("latest", "all", "specific"):
            raise ValueError(f"version policy must be 'latest', 'all' or 'specific', got {self.kind!r}")
        if self.kind == "latest" and self.num_versions < 1:
            raise ValueError(f"latest version policy needs num_versions >= 1, got {self.num_versions}")
        if self.kind == "specific" and not self.versions:
            raise ValueError("specific version policy needs at least one version")

    def select(self, available: Iterable[int]) -> list:
        """The versions to serve among ``available``, highest first."""
        available = sorted(set(available), reverse=True)
        if self.kind == "latest":
            return available[: self.num_versions]
        if self.kind == "all":
            return available
        wanted = set(self.versions)
        return [v for v in available if v in wanted]


@dataclasses.dataclass(frozen=True)
class ServedModelConfig:
    """One served model.

    Args:
        name: ``str``, the model name clients ask for.
        base_path: ``str``, the folder of numbered versions (local or a ``tf.io.gfile`` URL);
            for ``platform="python"``, ``"package.module:factory"``.
        platform: ``"tensorflow"`` (default) or ``"python"``.
        version_policy: :class:`VersionPolicy`, default latest 1.
        version_labels: ``Mapping[str, int]``, label -> version (``/labels/<label>`` in REST).
    """

    name: str
    base_path: str
    platform: str = TENSORFLOW_PLATFORM
    version_policy: VersionPolicy = VersionPolicy()
    version_labels: Mapping[str, int] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if not self.name or not re.fullmatch(r"[^/:\s]+", self.name):
            raise ValueError(f"model name must be non-empty without '/', ':' or spaces, got {self.name!r}")
        if not self.base_path:
            raise ValueError(f"model {self.name!r} has no base_path")
        if self.platform not in PLATFORMS:
            raise ValueError(
                f"model {self.name!r} requests unsupported platform {self.platform!r}; supported: {', '.join(PLATFORMS)}"
            )
        if self.platform == TENSORFLOW_PLATFORM and "://" not in self.base_path:
            object.__setattr__(self, "base_path", os.path.abspath(self.base_path))
        if self.platform == PYTHON_PLATFORM:
            try:
                python_factory_spec(self.base_path)
            except ValueError as err:
                raise ValueError(f"python model {self.name!r}: {err}") from None


def python_factory_spec(base_path: str):
    """``(module, factory, options)`` of a python model's ``base_path``.

    ``'package.module:factory'`` or ``'package.module:factory?key=value&...'``;
    the server calls ``factory(name, context, **options)`` (options only when given).

    >>> python_factory_spec("export.two_stage:factory?ranker=ctr&k=5")
    ('export.two_stage', 'factory', {'ranker': 'ctr', 'k': '5'})
    """
    target, _, query = base_path.partition("?")
    module, sep, attr = target.partition(":")
    if not sep or not module or not attr.isidentifier():
        raise ValueError(f"base_path must be 'package.module:factory[?key=value&...]', got {base_path!r}")
    try:
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True, strict_parsing=True) if query else []
    except ValueError:
        raise ValueError(f"base_path options must be 'key=value' pairs joined by '&', got {query!r}") from None
    options = dict(pairs)
    if len(options) != len(pairs):
        raise ValueError(f"base_path options repeat a key: {query!r}")
    bad = [key for key in options if not key.isidentifier()]
    if bad:
        raise ValueError(f"base_path option names must be identifiers, got {bad}")
    return module, attr, options


def check_python_module_allowed(config: ServedModelConfig, allowed: Iterable[str]) -> None:
    """``ServingError`` PERMISSION_DENIED (a ``ValueError``) unless python model ``config``
    names a module in ``allowed``.

    Called before anything of the module is imported or called: the operator names
    the trusted modules (``tfrec serve --allowed_python_modules export.two_stage``);
    a config (file or ``HandleReloadConfigRequest``) cannot add one. Exact module
    names only, no prefixes: allowing ``export`` does not allow ``export.two_stage``.

    >>> check_python_module_allowed(ServedModelConfig("t", "export.two_stage:factory", platform="python"),
    ...                             ["export.two_stage"])
    >>> check_python_module_allowed(ServedModelConfig("x", "shutil:rmtree", platform="python"), ["export.two_stage"])
    Traceback (most recent call last):
    ...
    export.server.errors.ServingError: python model 'x': module 'shutil' is not allowed; the server allows python servables only from modules named by --allowed_python_modules (allowed: export.two_stage)
    """
    if config.platform != PYTHON_PLATFORM:
        return
    module = python_factory_spec(config.base_path)[0]
    allowed = sorted(set(allowed))
    if module not in allowed:
        from export.server.errors import ServingError

        raise ServingError.permission_denied(
            f"python model {config.name!r}: module {module!r} is not allowed; the server allows python "
            f"servables only from modules named by --allowed_python_modules (allowed: {', '.join(allowed) or 'none'})"
        )


def _from_proto_list(model_config_list, source: str) -> list:
    from tensorflow_serving.config import model_server_config_pb2

    configs, seen = [], set()
    for proto in model_config_list.config:
        if proto.name in seen:
            raise ValueError(f"{source}: illegal to list model {proto.name!r} multiple times in config list")
        seen.add(proto.name)
        platform = proto.model_platform
        if not platform:
            if proto.model_type == model_server_config_pb2.TENSORFLOW:
                platform = TENSORFLOW_PLATFORM
            else:
                raise ValueError(f"{source}: model {proto.name!r} sets no model_platform (expected 'tensorflow')")
        which = proto.model_version_policy.WhichOneof("policy_choice")
        try:
            if which == "all":
                policy = VersionPolicy("all")
            elif which == "specific":
                policy = VersionPolicy("specific", versions=tuple(proto.model_version_policy.specific.versions))
            else:  # latest, or unset -> TF Serving's default: latest 1
                num = proto.model_version_policy.latest.num_versions if which == "latest" else 1
                policy = VersionPolicy("latest", num_versions=max(1, num))
            configs.append(
                ServedModelConfig(
                    name=proto.name,
                    base_path=proto.base_path,
                    platform=platform,
                    version_policy=policy,
                    version_labels=dict(proto.version_labels),
                )
            )
        except ValueError as err:
            raise ValueError(f"{source}: {err}") from None
    return configs


def from_model_server_config(server_config, source: str = "<ModelServerConfig>") -> list:
    """:class:`ServedModelConfig` s of a ``ModelServerConfig`` proto (``model_config_list`` only)."""
    if server_config.WhichOneof("config") == "custom_model_config":
        raise ValueError(f"{source}: custom_model_config is not supported; use model_config_list")
    return _from_proto_list(server_config.model_config_list, source)


def parse_model_config_text(text: str, source: str = "<model config>") -> list:
    """Parse a text-proto ``ModelServerConfig`` (or a bare ``ModelConfigList``) into :class:`ServedModelConfig` s."""
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    server_config = model_server_config_pb2.ModelServerConfig()
    try:
        text_format.Parse(text, server_config)
    except text_format.ParseError as err:
        config_list = model_server_config_pb2.ModelConfigList()
        try:
            text_format.Parse(text, config_list)
        except text_format.ParseError:
            raise ValueError(f"{source}: not a text-proto ModelServerConfig: {err}") from None
        return _from_proto_list(config_list, source)
    return from_model_server_config(server_config, source)


def load_model_config_file(path) -> list:
    """Read TF Serving's ``--model_config_file`` (text proto)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"model config file not found: {path}")
    with open(path, encoding="utf-8") as f:
        return parse_model_config_text(f.read(), source=path)


def single_model_config(name: str, base_path: str, version_policy: Optional[VersionPolicy] = None) -> list:
    """The config list for TF Serving's ``--model_name`` / ``--model_base_path`` flags."""
    return [ServedModelConfig(name=name, base_path=base_path, version_policy=version_policy or VersionPolicy())]


def to_model_server_config(configs: Sequence[ServedModelConfig]):
    """The ``ModelServerConfig`` proto for ``configs`` (e.g. for ``HandleReloadConfigRequest``)."""
    from tensorflow_serving.config import model_server_config_pb2

    server_config = model_server_config_pb2.ModelServerConfig()
    for config in configs:
        proto = server_config.model_config_list.config.add(
            name=config.name, base_path=config.base_path, model_platform=config.platform
        )
        policy = config.version_policy
        if policy.kind == "all":
            proto.model_version_policy.all.SetInParent()
        elif policy.kind == "specific":
            proto.model_version_policy.specific.versions.extend(policy.versions)
        else:
            proto.model_version_policy.latest.num_versions = policy.num_versions
        for label, version in config.version_labels.items():
            proto.version_labels[label] = version
    return server_config


@dataclasses.dataclass
class BatchingOptions:
    """Server-side request batching (names follow TF Serving's ``BatchingParameters``).

    Concurrent requests to the same (model, version, signature) are merged along
    dimension 0 into one model call of at most ``max_batch_size`` rows, waiting at
    most ``batch_timeout_micros`` after the first request of a batch; outputs are
    split back by rows. A request larger than ``max_batch_size`` runs alone
    (TF Serving rejects it; we do not). Signatures with a scalar input or a fixed
    first dimension run unbatched.

    Requests are merged only when their non-batch dimensions agree, unless
    ``pad_variable_length_inputs`` is on: then dimensions the signature declares
    as ``None`` are right-padded to the longest request with ``pad_values`` (by
    dtype kind: ``"string"`` default ``b""``, ``"float"`` and ``"int"`` default 0,
    ``"bool"`` default False). Padding is off by default (as in TF Serving): turn
    it on only for models that treat the pad value as padding (tfrec exports map
    ``""`` to the padding id) and whose outputs do not depend on the padded length.
    ``max_padding_ratio`` (ours; TF Serving has no such field) bounds the waste:
    a request joins a batch only while the batch's longest row stays within that
    factor of its shortest, per padded dimension; the others wait for a later
    batch (oldest request first, so none starves). Useful when lengths vary a lot
    (lifelong histories: tens to thousands of items), where padding every row to
    the longest can cost more than batching saves.

    Args:
        max_batch_size: ``int``, rows per model call, default 32.
        batch_timeout_micros: ``int``, longest wait for a batch to fill, default 2000.
        num_batch_threads: ``int``, most batches running at once (over all signatures),
            default the number of CPUs.
        max_enqueued_batches: ``int``, queue bound in batches; beyond it requests fail
            with RESOURCE_EXHAUSTED. Default 100.
        pad_variable_length_inputs: ``bool``, default False.
        max_padding_ratio: ``float``, 0 (default) = pad to the longest request
            whatever the spread (TF Serving's behaviour); e.g. 2 = merge only
            requests within 2x of each other's length.
        pad_values: ``Mapping[str, object]`` overriding the pad value per dtype kind.
    """

    max_batch_size: int = 32
    batch_timeout_micros: int = 2000
    num_batch_threads: int = dataclasses.field(default_factory=lambda: os.cpu_count() or 1)
    max_enqueued_batches: int = 100
    pad_variable_length_inputs: bool = False
    max_padding_ratio: float = 0.0
    pad_values: Mapping[str, object] = dataclasses.field(default_factory=dict)

    DEFAULT_PAD_VALUES = {"string": b"", "float": 0, "int": 0, "bool": False}

    def __post_init__(self):
        for field in ("max_batch_size", "num_batch_threads", "max_enqueued_batches"):
            if int(getattr(self, field)) < 1:
                raise ValueError(f"batching {field} must be >= 1, got {getattr(self, field)}")
        if self.max_padding_ratio != 0 and self.max_padding_ratio < 1:
            raise ValueError(f"batching max_padding_ratio must be 0 (no limit) or >= 1, got {self.max_padding_ratio}")
        if self.batch_timeout_micros < 0:
            raise ValueError(f"batching batch_timeout_micros must be >= 0, got {self.batch_timeout_micros}")
        unknown = set(self.pad_values) - set(self.DEFAULT_PAD_VALUES)
        if unknown:
            raise ValueError(
                f"unknown pad_values kind(s) {sorted(unknown)}; expected some of {sorted(self.DEFAULT_PAD_VALUES)}"
            )

    def pad_value(self, kind: str):
        value = {**self.DEFAULT_PAD_VALUES, **self.pad_values}[kind]
        return value.encode() if kind == "string" and isinstance(value, str) else value


_BATCHING_FIELDS = {
    "max_batch_size": int,
    "batch_timeout_micros": int,
    "num_batch_threads": int,
    "max_enqueued_batches": int,
    "pad_variable_length_inputs": lambda s: s.lower() == "true",
    "max_padding_ratio": float,  # ours, see BatchingOptions
}


def parse_batching_parameters(text: str, source: str = "<batching parameters>") -> BatchingOptions:
    """Read TF Serving's batching parameters text format (``max_batch_size { value: 32 }`` ...).

    Fields we do not implement (``allowed_batch_sizes``, ``thread_pool_name`` ...) are
    rejected by name rather than silently ignored.
    """
    kwargs = {}
    text = re.sub(r"#[^\n]*", "", text)
    pattern = re.compile(r"(\w+)\s*(?::\s*([^\s{}]+)|\{\s*value\s*:\s*([^\s{}]+)\s*\})")
    pos = 0
    for match in pattern.finditer(text):
        if text[pos : match.start()].strip():
            raise ValueError(f"{source}: cannot parse {text[pos:match.start()].strip()!r}")
        pos = match.end()
        key, value = match.group(1), (match.group(2) or match.group(3)).strip("'\"")
        if key not in _BATCHING_FIELDS:
            raise ValueError(f"{source}: unsupported batching parameter {key!r}; supported: {', '.join(_BATCHING_FIELDS)}")
        try:
            kwargs[key] = _BATCHING_FIELDS[key](value)
        except ValueError:
            raise ValueError(f"{source}: {key} expects a number, got {value!r}") from None
    if text[pos:].strip():
        raise ValueError(f"{source}: cannot parse {text[pos:].strip()!r}")
    try:
        return BatchingOptions(**kwargs)
    except ValueError as err:
        raise ValueError(f"{source}: {err}") from None


def load_batching_parameters(path) -> BatchingOptions:
    """Read a ``--batching_parameters_file``."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"batching parameters file not found: {path}")
    with open(path, encoding="utf-8") as f:
        return parse_batching_parameters(f.read(), source=path)


def load_per_model_batching_parameters(version_path: str) -> Optional[BatchingOptions]:
    """The batching parameters a SavedModel version brings, or ``None`` if it brings none.

    Reads ``<version_path>/batching_params.pbtxt``: the file (same text format as
    ``--batching_parameters_file``) and place TF Serving reads under
    ``--enable_per_model_batching_parameters``, so one SavedModel folder carries its
    batching to either server. Its ``num_batch_threads`` is not used: the batch
    threads are the server's, shared by all models (as in TF Serving). A malformed
    file raises ``ValueError`` naming it. URLs (``gs://`` ...) are read with ``tf.io.gfile``.

    >>> load_per_model_batching_parameters("/no/such/version") is None
    True
    """
    if "://" in version_path:
        import tensorflow as tf

        exists, open_text = tf.io.gfile.exists, lambda p: tf.io.gfile.GFile(p, "r")
    else:
        exists, open_text = os.path.isfile, lambda p: open(p, encoding="utf-8")
    path = os.path.join(version_path, PER_MODEL_BATCHING_FILE)
    if not exists(path):
        misplaced = os.path.join(version_path, "assets.extra", PER_MODEL_BATCHING_FILE)
        if exists(misplaced):
            logger.warning("ignoring %s: per-model batching parameters belong in %s (where TF Serving reads them)",
                           misplaced, path)
        return None
    with open_text(path) as f:
        return parse_batching_parameters(f.read(), source=path)


@dataclasses.dataclass
class ServerOptions:
    """Where and how the model server listens.

    Args:
        host: ``str``, interface to bind, default ``"127.0.0.1"`` (loopback only;
            ``"0.0.0.0"`` exposes the server).
        port: ``int``, gRPC port, default 8500; 0 picks a free port.
        rest_api_port: ``int``, REST port, default 8501; 0 picks a free port, a
            negative value disables REST.
        file_system_poll_wait_seconds: ``float``, how often base paths are polled
            for new versions, default 1.
        batching: :class:`BatchingOptions` or ``None`` (default: no batching).
        per_model_batching: ``bool`` (TF Serving's ``--enable_per_model_batching_parameters``),
            default False. With ``batching``, a SavedModel version is batched with the
            parameters of its own ``batching_params.pbtxt``
            (:func:`load_per_model_batching_parameters`) and is not batched without
            one; only ``num_batch_threads`` of ``batching`` still applies (the batch
            threads all models share). Python composites keep ``batching``.
            Without ``batching`` it does nothing (a warning is logged), as in TF Serving.
        grpc_max_threads: ``int``, gRPC worker threads, default 4 per CPU (TF Serving's
            default; 8 on 2 cores): more threads only contend for the GIL and the cores (server
            CPU per request in ``reports/history_store.md``). Requests waiting for a batch hold
            a thread, so raise it to let batches grow past it.
        shutdown_grace_seconds: ``float``, how long shutdown waits for in-flight
            requests, default 30.
        allowed_python_modules: ``tuple[str, ...]``, the only modules ``model_platform:
            'python'`` servables may come from (exact names), default none. Checked before
            anything is imported or called, at start-up and on every config reload.
        grpc_max_message_bytes: ``int``, largest gRPC message received or sent, default
            256 MiB (ours; TF Serving allows 2 GiB - 1: a decoded request costs about twice
            its size, so the default bounds a request's memory). RESOURCE_EXHAUSTED beyond.
        rest_max_body_bytes: ``int``, largest REST request body, default 64 MiB (ours;
            TF Serving sets none). 400 beyond, before the body is read.
        rest_max_connections: ``int``, most REST connections served at once (one
            thread each), default 64; further connections are answered 503 and closed.
        rest_idle_timeout_seconds: ``float``, an open REST connection that sends nothing
            for this long is closed, default 30.
        rest_allowed_hosts: ``tuple[str, ...]``, extra names accepted in the ``Host`` and
            ``Origin`` headers. Bound to loopback, only loopback names (``localhost``,
            ``127.0.0.1``, ``[::1]``) are accepted otherwise (DNS rebinding, pages in a
            local browser); bound wider, any ``Host`` is accepted and an ``Origin`` must
            match the ``Host`` or be listed here.
        grpc_use_tensor_content: ``bool``, Predict responses pack values into
            ``tensor_content`` instead of the typed fields (``float_val`` ...), default False
            (TF Serving's default: typed fields).
        history_store: ``str`` or ``None`` (default: off), the URL of a ``tfrec.history``
            store (``sqlite:///path/events.db``, ``redis://127.0.0.1:6379/0``): enables requests
            by ``user_id`` and ``POST /v1/events`` (``export.server.user_history``).
        history_length: ``int``, most recent events read per user for a request by user id,
            default 256 (ours; at least the longest history the served models read).
        items_delta: ``str`` or ``None`` (default: off), the delta file (``export.items_add``) that
            ``POST /v1/items`` adds new items to (``export.server.items``); needs exactly one of
            ``items_model`` and ``items_encoder``.
        items_model: ``str`` or ``None``, a trained DMESR run (folder or ``model.keras``): the built-in
            encoder ``tfrec.semantics.new_items.NewItemEncoder``, loaded at start-up.
        items_store: ``str`` or ``None``, with ``items_model``: the semantic store (default: the model's).
        items_encoder: ``str`` or ``None``, ``module:function`` of another encoder, loaded at start-up.
        items_ranker: ``str`` or ``None``, with ``items_delta``: a trained CTR run (``tfrec ctr train``) whose
            ranker gets the posted items too, a new version under ``items_ranker_out`` per add (as
            ``tfrec items add --ranker``); loaded at start-up. Needs ``items_ranker_out``.
        items_ranker_out: ``str`` or ``None``, the served ranker's base directory (goes with ``items_ranker``).
        items_ranker_init: ``str`` or ``None``, ``sid_neighbours`` (default) or ``zero``: a new item's ID row
            and bias (``tfrec.ctr.new_items``).
        items_ranker_store: ``str`` or ``None``, the ranker run's semantic store (default: the one it records).
    """

    host: str = "127.0.0.1"
    port: int = 8500
    rest_api_port: int = 8501
    file_system_poll_wait_seconds: float = 1.0
    batching: Optional[BatchingOptions] = None
    per_model_batching: bool = False
    grpc_max_threads: int = dataclasses.field(default_factory=lambda: 4 * (os.cpu_count() or 1))
    shutdown_grace_seconds: float = 30.0
    allowed_python_modules: tuple = ()
    grpc_max_message_bytes: int = 256 << 20
    rest_max_body_bytes: int = 64 << 20
    rest_max_connections: int = 64
    rest_idle_timeout_seconds: float = 30.0
    rest_allowed_hosts: tuple = ()
    grpc_use_tensor_content: bool = False
    history_store: Optional[str] = None
    history_length: int = 256
    items_delta: Optional[str] = None
    items_model: Optional[str] = None
    items_store: Optional[str] = None
    items_encoder: Optional[str] = None
    items_ranker: Optional[str] = None
    items_ranker_out: Optional[str] = None
    items_ranker_init: Optional[str] = None
    items_ranker_store: Optional[str] = None

    def __post_init__(self):
        from export.server.items import check_items_flags

        check_items_flags(self.items_delta, self.items_model, self.items_store, self.items_encoder,
                          ranker=self.items_ranker, ranker_out=self.items_ranker_out,
                          ranker_init=self.items_ranker_init, ranker_store=self.items_ranker_store)
        self.allowed_python_modules = tuple(self.allowed_python_modules)
        self.rest_allowed_hosts = tuple(h.lower() for h in self.rest_allowed_hosts)
        for module in self.allowed_python_modules:
            if not all(part.isidentifier() for part in str(module).split(".")):
                raise ValueError(f"allowed python module must be a dotted module name, got {module!r}")
        if not 1 <= self.grpc_max_message_bytes <= 2**31 - 1:
            raise ValueError(f"grpc_max_message_bytes must be in 1..2147483647, got {self.grpc_max_message_bytes}")
        if self.rest_max_body_bytes < 1:
            raise ValueError(f"rest_max_body_bytes must be >= 1, got {self.rest_max_body_bytes}")
        if self.rest_max_connections < 1:
            raise ValueError(f"rest_max_connections must be >= 1, got {self.rest_max_connections}")
        if self.rest_idle_timeout_seconds <= 0:
            raise ValueError(f"rest_idle_timeout_seconds must be > 0, got {self.rest_idle_timeout_seconds}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {self.port}")
        if self.rest_api_port > 65535:
            raise ValueError(f"rest_api_port must be <= 65535, got {self.rest_api_port}")
        if self.file_system_poll_wait_seconds <= 0:
            raise ValueError(
                f"file_system_poll_wait_seconds must be > 0, got {self.file_system_poll_wait_seconds}"
            )
        if self.grpc_max_threads < 1:
            raise ValueError(f"grpc_max_threads must be >= 1, got {self.grpc_max_threads}")
