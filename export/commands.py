"""``tfrec serve`` and ``tfrec query``: the model server and a command-line client.

    tfrec serve --model_config_file models.config [--port 8500 --rest_api_port 8501]
    tfrec serve --model_name recommender --model_base_path /models/recommender \\
                [--enable_batching --max_batch_size 32 --batch_timeout_micros 2000]
                [--enable_per_model_batching_parameters]
    tfrec serve ... --items_delta /srv/delta/items.npz --items_model runs/dmesr-sasrec-beauty
                [--items_store DIR] | --items_encoder module:function      # POST /v1/items
                [--items_ranker RUN --items_ranker_out BASE [--items_ranker_init zero]]
    tfrec query --address 127.0.0.1:8500 --model recommender --signature recommend \\
                --input history=i1,i7,i9 --input k=10 [--format table]
    tfrec query --model recommender --status | --metadata

Flag names follow TF Serving's ``tensorflow_model_server``. With
``--enable_batching --enable_per_model_batching_parameters`` (alias
``--enable_per_model_batching_params``) each SavedModel version is batched with
the parameters of its own ``<version>/batching_params.pbtxt`` and not batched
without one, as in TF Serving (``export.server.models``). Ports default to
8500 (gRPC) and 8501 (REST); 0 picks a free port (printed), a negative REST port
disables REST. The server binds loopback unless ``--host`` says otherwise, and
stops gracefully on SIGTERM/SIGINT (in-flight requests finish).

``--input NAME=VALUE`` values: JSON (``k=10``, ``x=[[1,2,3]]``), ``@file.json``, or
comma-separated tokens (``history=a,b,c``). They are converted to the signature's
dtype, and leading batch dimensions of size 1 are added up to its rank, so
``history=a,b,c`` reaches a ``[batch, length]`` string input as ``[["a","b","c"]]``.
"""

from __future__ import annotations

import json
import signal
import sys
import threading


def add_commands(subparsers) -> None:
    serve = subparsers.add_parser("serve", help="serve SavedModels over gRPC and REST (TF Serving compatible)")
    source = serve.add_argument_group("models (a config file, or one model)")
    source.add_argument("--model_config_file", help="TF Serving model config (text-proto ModelServerConfig)")
    source.add_argument("--model_name", help="name of the single model to serve")
    source.add_argument("--model_base_path", help="folder of numbered versions of the single model")
    serve.add_argument("--host", default="127.0.0.1", help="interface to bind (default loopback 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8500, help="gRPC port (0 = pick a free one)")
    serve.add_argument("--rest_api_port", type=int, default=8501, help="REST port (0 = free one, <0 = off)")
    serve.add_argument("--file_system_poll_wait_seconds", type=float, default=1.0)
    serve.add_argument("--grpc_max_threads", type=int, help="gRPC worker threads (default 4 per CPU, as TF Serving)")
    serve.add_argument("--shutdown_grace_seconds", type=float, default=30.0)
    limits = serve.add_argument_group("security and limits (see README: trust model)")
    limits.add_argument("--allowed_python_modules", nargs="+", default=[], metavar="MODULE",
                        help="modules 'model_platform: python' servables may come from, e.g. export.two_stage "
                             "(default none: python servables refused, also through config reloads)")
    limits.add_argument("--grpc_max_message_bytes", type=int, default=256 << 20,
                        help="largest gRPC message received or sent (default 256 MiB)")
    limits.add_argument("--rest_max_body_bytes", type=int, default=64 << 20,
                        help="largest REST request body (default 64 MiB)")
    limits.add_argument("--rest_max_connections", type=int, default=64,
                        help="REST connections served at once; more are answered 503 (default 64)")
    limits.add_argument("--rest_idle_timeout_seconds", type=float, default=30.0,
                        help="close REST connections idle this long (default 30)")
    limits.add_argument("--rest_allowed_hosts", nargs="+", default=[], metavar="NAME",
                        help="extra Host/Origin names accepted besides loopback names")
    limits.add_argument("--grpc_use_tensor_content", action="store_true",
                        help="pack Predict outputs into tensor_content instead of float_val/int64_val/... "
                             "(TF Serving's default is the typed fields)")
    history = serve.add_argument_group("serving by user id (off by default)")
    history.add_argument("--history_store", metavar="URL",
                         help="history store enabling requests by user_id and POST /v1/events: "
                              "sqlite:///path/events.db or redis://127.0.0.1:6379/0")
    history.add_argument("--history_length", type=int, default=256,
                         help="most recent events read per user for a request by user_id (default 256)")
    items = serve.add_argument_group("new items while serving: POST /v1/items (off by default)")
    items.add_argument("--items_delta", metavar="PATH",
                       help="the delta file (.npz) POST /v1/items adds new items to (the one a served "
                            "export.delta_retrieval model follows); needs --items_model or --items_encoder")
    items.add_argument("--items_model", metavar="RUN",
                       help="the built-in encoder: a trained DMESR run folder (or its model.keras)")
    items.add_argument("--items_store", metavar="DIR",
                       help="with --items_model: the semantic store (default: the model's dmesr.store_path)")
    items.add_argument("--items_encoder", metavar="MODULE:FUNCTION",
                       help="instead of --items_model: a function returning (vectors, sids) for the rows")
    items.add_argument("--items_ranker", metavar="RUN",
                       help="with --items_delta: a trained CTR run (tfrec ctr train) whose ranker gets the posted "
                            "items too, a new version under --items_ranker_out per POST (as tfrec items add "
                            "--ranker; with --history_store, the store's SID routes too when it has them)")
    items.add_argument("--items_ranker_out", metavar="BASE",
                       help="the served ranker's base directory (the new versions go there); with --items_ranker")
    items.add_argument("--items_ranker_init", metavar="INIT",
                       help="a new item's ID row and bias: sid_neighbours (default) or zero; with --items_ranker")
    items.add_argument("--items_ranker_store", metavar="DIR",
                       help="with --items_ranker: the run's semantic store (default: the one it records)")
    serve.add_argument("--tensorflow_intra_op_parallelism", type=int, default=0,
                       help="threads one op may use (0 = TensorFlow's default; 1 suits small models under "
                            "concurrent load, see export/TF_SERVING.md)")
    serve.add_argument("--tensorflow_inter_op_parallelism", type=int, default=0,
                       help="ops of one call run in parallel (0 = TensorFlow's default)")
    batching = serve.add_argument_group("batching")
    batching.add_argument("--enable_batching", action="store_true", help="merge concurrent requests")
    batching.add_argument("--batching_parameters_file", help="TF Serving batching parameters (text format)")
    batching.add_argument("--max_batch_size", type=int, help="rows per batch (default 32)")
    batching.add_argument("--batch_timeout_micros", type=int, help="longest wait for a batch (default 2000)")
    batching.add_argument("--num_batch_threads", type=int, help="batches run in parallel (default: #CPUs)")
    batching.add_argument("--pad_variable_length_inputs", action="store_true",
                          help="right-pad None dimensions to batch requests of different lengths")
    batching.add_argument("--max_padding_ratio", type=float,
                          help="with padding: merge only requests whose lengths are within this factor "
                               "(e.g. 2; default 0 = pad to the longest, as TF Serving)")
    batching.add_argument("--enable_per_model_batching_parameters", "--enable_per_model_batching_params",
                          dest="per_model_batching", action="store_true",
                          help="batch each SavedModel version with its own <version>/batching_params.pbtxt "
                               "(unbatched without one; only num_batch_threads stays server-wide), as TF Serving")
    serve.set_defaults(func=_cmd_serve)

    query = subparsers.add_parser("query", help="call a running model server (gRPC PredictionService)")
    query.add_argument("--address", default="127.0.0.1:8500", help="host:port of the gRPC endpoint")
    query.add_argument("--model", required=True, help="model name")
    query.add_argument("--signature", default="serving_default")
    query.add_argument("--version", type=int, help="model version (default: latest)")
    query.add_argument("--label", help="model version label")
    query.add_argument("--input", action="append", default=[], metavar="NAME=VALUE",
                       help="an input: JSON, @file.json or comma-separated tokens (repeatable)")
    query.add_argument("--output_filter", action="append", default=None, metavar="NAME", help="outputs to fetch")
    query.add_argument("--format", choices=("json", "table"), default="json", help="output format")
    query.add_argument("--timeout", type=float, default=10.0, help="seconds")
    query.add_argument("--status", action="store_true", help="print the model's version status instead")
    query.add_argument("--metadata", action="store_true", help="print the model's signatures instead")
    query.set_defaults(func=_cmd_query)

    from export.events import add_commands as add_events_commands

    add_events_commands(subparsers)
    from export.items_add import add_commands as add_items_commands

    add_items_commands(subparsers)


def _batching_options(args):
    from export.server.config import BatchingOptions, load_batching_parameters

    flags = {
        k: getattr(args, k)
        for k in ("max_batch_size", "batch_timeout_micros", "num_batch_threads", "max_padding_ratio")
        if getattr(args, k) is not None
    }
    if args.pad_variable_length_inputs:
        flags["pad_variable_length_inputs"] = True
    if not (args.enable_batching or args.batching_parameters_file):
        if flags:
            raise ValueError(f"--{next(iter(flags))} needs --enable_batching")
        return None
    options = load_batching_parameters(args.batching_parameters_file) if args.batching_parameters_file else None
    if options is None:
        return BatchingOptions(**flags)
    for key, value in flags.items():
        setattr(options, key, value)
    options.__post_init__()
    return options


def set_tensorflow_threads(intra: int = 0, inter: int = 0) -> None:
    """TensorFlow's op thread pools for this process (TF Serving's `--tensorflow_{intra,inter}_op_parallelism`).

    0 keeps TensorFlow's default (one thread per core for each pool). Must run before
    TensorFlow executes anything; a clear error otherwise.

    >>> set_tensorflow_threads(-1)
    Traceback (most recent call last):
    ...
    ValueError: --tensorflow_intra_op_parallelism must be >= 0, got -1
    """
    for name, value in (("intra", intra), ("inter", inter)):
        if value < 0:
            raise ValueError(f"--tensorflow_{name}_op_parallelism must be >= 0, got {value}")
    if not (intra or inter):
        return
    import tensorflow as tf

    try:
        if intra:
            tf.config.threading.set_intra_op_parallelism_threads(intra)
        if inter:
            tf.config.threading.set_inter_op_parallelism_threads(inter)
    except RuntimeError as err:
        raise ValueError(f"cannot set TensorFlow's thread pools once TensorFlow has started: {err}") from None


def server_options(args):
    """The ``ServerOptions`` of parsed ``tfrec serve`` arguments."""
    from export.server import ServerOptions

    return ServerOptions(
        host=args.host, port=args.port, rest_api_port=args.rest_api_port,
        file_system_poll_wait_seconds=args.file_system_poll_wait_seconds, batching=_batching_options(args),
        per_model_batching=args.per_model_batching,
        **({} if args.grpc_max_threads is None else {"grpc_max_threads": args.grpc_max_threads}),
        shutdown_grace_seconds=args.shutdown_grace_seconds,
        allowed_python_modules=tuple(args.allowed_python_modules),
        grpc_max_message_bytes=args.grpc_max_message_bytes, rest_max_body_bytes=args.rest_max_body_bytes,
        rest_max_connections=args.rest_max_connections, rest_idle_timeout_seconds=args.rest_idle_timeout_seconds,
        rest_allowed_hosts=tuple(args.rest_allowed_hosts), grpc_use_tensor_content=args.grpc_use_tensor_content,
        history_store=args.history_store, history_length=args.history_length,
        items_delta=args.items_delta, items_model=args.items_model, items_store=args.items_store,
        items_encoder=args.items_encoder, items_ranker=args.items_ranker, items_ranker_out=args.items_ranker_out,
        items_ranker_init=args.items_ranker_init, items_ranker_store=args.items_ranker_store,
    )


def _cmd_serve(args) -> None:
    from export.server import ModelServer, load_model_config_file, single_model_config

    if args.model_config_file and (args.model_name or args.model_base_path):
        raise ValueError("pass either --model_config_file or --model_name/--model_base_path, not both")
    if args.model_config_file:
        configs = load_model_config_file(args.model_config_file)
    elif args.model_name and args.model_base_path:
        configs = single_model_config(args.model_name, args.model_base_path)
    else:
        raise ValueError("pass --model_config_file, or both --model_name and --model_base_path")
    set_tensorflow_threads(args.tensorflow_intra_op_parallelism, args.tensorflow_inter_op_parallelism)
    server = ModelServer(configs, server_options(args))
    stop = threading.Event()
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGINT):
            previous[signum] = signal.signal(signum, lambda *_: stop.set())
    try:
        _serve_until(server, configs, stop)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _serve_until(server, configs, stop) -> None:
    server.start()
    not_ready = [c.name for c in configs if not server.registry.is_available(c.name)]
    print(f"tfrec serve: gRPC on {server.grpc_address}", flush=True)
    if server.rest_url:
        print(f"tfrec serve: REST on {server.rest_url}", flush=True)
    print(f"tfrec serve: models {', '.join(c.name for c in configs)}", flush=True)
    if not_ready:
        print(f"tfrec serve: warning: no version available yet for {', '.join(not_ready)} (polling)", flush=True)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        print("tfrec serve: shutting down (finishing in-flight requests)", flush=True)
        server.stop()
        print("tfrec serve: stopped", flush=True)


def parse_input(text: str):
    """``NAME=VALUE`` -> ``(name, value)``: JSON, ``@file.json`` or comma-separated tokens."""
    name, sep, raw = text.partition("=")
    if not sep or not name:
        raise ValueError(f"--input expects NAME=VALUE, got {text!r}")
    if raw.startswith("@"):
        try:
            with open(raw[1:], encoding="utf-8") as f:
                return name, json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"--input {name}: file not found: {raw[1:]}") from None
        except json.JSONDecodeError as err:
            raise ValueError(f"--input {name}: {raw[1:]} is not JSON: {err}") from None
    try:
        return name, json.loads(raw)
    except json.JSONDecodeError:
        pass
    return name, raw.split(",") if "," in raw else raw


def _expand(value, rank):
    """Add leading size-1 dimensions until ``value`` has ``rank`` dimensions."""
    import numpy as np

    current = np.ndim(np.asarray(value, dtype=object))
    while rank is not None and current < rank:
        value, current = [value], current + 1
    return value


def _table(outputs) -> str:
    import numpy as np

    names = sorted(outputs)
    columns = {}
    for name in names:
        array = np.asarray(outputs[name])
        if array.ndim == 2 and array.shape[0] == 1:
            array = array[0]
        if array.ndim != 1:
            return json.dumps(_jsonable(outputs), indent=2)
        columns[name] = [v.decode("utf-8", "replace") if isinstance(v, bytes) else
                         (f"{v:.6g}" if isinstance(v, float) else str(v)) for v in array.tolist()]
    lengths = {len(c) for c in columns.values()}
    if len(lengths) != 1:
        return json.dumps(_jsonable(outputs), indent=2)
    rows = [["#", *names]] + [[str(i), *(columns[n][i] for n in names)] for i in range(lengths.pop())]
    widths = [max(len(r[j]) for r in rows) for j in range(len(rows[0]))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows)


def _jsonable(outputs) -> dict:
    """``{name: nested lists}`` as the REST API writes tensors."""
    from export.server.json_format import outputs_to_json

    return {name: outputs_to_json({name: value}, "columnar")["outputs"] for name, value in outputs.items()}


def _cmd_query(args) -> None:
    from export.client import PredictClient

    with PredictClient(args.address) as client:
        if args.status:
            print(json.dumps(client.status(args.model, args.version, args.label, args.timeout), indent=2))
            return
        if args.metadata:
            print(json.dumps(client.metadata(args.model, args.version, args.label, args.timeout), indent=2))
            return
        if not args.input:
            raise ValueError("pass at least one --input NAME=VALUE (or --status / --metadata)")
        signature = client.signature(args.model, args.signature, args.version, args.label, args.timeout)
        inputs = {}
        for text in args.input:
            name, value = parse_input(text)
            if name == "user_id" and "history" in signature["inputs"]:  # by user id (server --history_store)
                inputs[name] = _expand(value, 1)
                continue
            if name not in signature["inputs"]:
                raise ValueError(
                    f"signature '{args.signature}' has no input {name!r}; inputs: {', '.join(signature['inputs'])}"
                )
            shape = signature["inputs"][name]["shape"]
            inputs[name] = _expand(value, None if shape is None else len(shape))
        outputs = client.predict(
            args.model, inputs, signature=args.signature, version=args.version, label=args.label,
            timeout=args.timeout, output_filter=args.output_filter,
        )
        if args.format == "table":
            print(f"model {outputs.model} version {outputs.version} signature {outputs.signature}")
            print(_table(outputs))
        else:
            print(json.dumps({
                "model_spec": {"name": outputs.model, "version": outputs.version, "signature_name": outputs.signature},
                "outputs": _jsonable(outputs),
            }, indent=2))
    sys.stdout.flush()
