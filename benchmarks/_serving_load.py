"""The load side of `benchmarks/serving.py`: a `tfrec serve` subprocess and a closed-loop gRPC load generator.

- :class:`ServeProcess`: `tfrec serve --model_config_file ... --port 0 --rest_api_port 0`
  as a subprocess, its address read from the `tfrec serve: gRPC on HOST:PORT` line
  (as `scripts/main.sh` does), models awaited with GetModelStatus, its CPU time
  (/proc) and batch sizes (Prometheus over REST) readable, stopped with SIGTERM.
- :func:`closed_loop` / :func:`measure`: `concurrency` threads each sending
  prebuilt `PredictRequest`s through a `PredictionServiceStub`, the next one
  when the previous answer arrived; latency percentiles and QPS.

Example (the server part needs exported servables and starts a live `tfrec serve`,
so it is skipped; `benchmarks/serving.py` runs it)::

    >>> import tempfile
    >>> config = write_models_config(tempfile.mkdtemp() + "/m.config",
    ...                              [("recommender", "/servables/rec", "tensorflow")])
    >>> print(open(config).read().strip().splitlines()[0])
    model_config_list {
    >>> with ServeProcess("/tmp/m.config", "/tmp/server.log", ["--enable_batching"]) as server:  # doctest: +SKIP
    ...     server.wait_available(["recommender"])
    ...     with PredictClient(server.address) as client:
    ...         request = client.request("recommender", {"history": [["1", "2"]], "exclude_history": [False]},
    ...                                  signature="recommend")
    ...         measure(server, client.stub, [request], concurrency=8, count=200, warmup=20)["p99_ms"]
"""

import collections
import os
import re
import signal
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TFREC = ROOT / ".venv" / "bin" / "tfrec"


# The serving benchmark's server configuration when batching is on (`serving.py`'s defaults;
# `history_store.py` serves by user id with it too).
TF_THREADS = (1, 1)  # intra-op, inter-op
BATCHING = {"max_batch_size": 32, "batch_timeout_micros": 2000, "max_padding_ratio": 2.0}


def server_flags(tf_threads=TF_THREADS, batching=False, max_batch_size=BATCHING["max_batch_size"],
                 batch_timeout_micros=BATCHING["batch_timeout_micros"], num_batch_threads=None,
                 max_padding_ratio=BATCHING["max_padding_ratio"]):
    """`tfrec serve` flags: TF thread pools, and with `batching` the batching flags
    (`max_padding_ratio` None = no `--pad_variable_length_inputs`).

    >>> server_flags(batching=True)[4:7]
    ['--enable_batching', '--max_batch_size', '32']
    """
    flags = ["--tensorflow_intra_op_parallelism", str(tf_threads[0]),
             "--tensorflow_inter_op_parallelism", str(tf_threads[1])]
    if batching:
        flags += ["--enable_batching", "--max_batch_size", str(max_batch_size),
                  "--batch_timeout_micros", str(batch_timeout_micros)]
        flags += ["--num_batch_threads", str(num_batch_threads)] if num_batch_threads else []
        if max_padding_ratio is not None:
            flags += ["--pad_variable_length_inputs", "--max_padding_ratio", f"{max_padding_ratio:g}"]
    return flags


def percentiles_ms(latencies):
    """`{"p50_ms", "p99_ms", "mean_ms"}` of latencies in seconds (None when empty).

    >>> percentiles_ms([0.001, 0.002, 0.003])
    {'p50_ms': 2.0, 'p99_ms': 2.98, 'mean_ms': 2.0}
    """
    if len(latencies) == 0:
        return {"p50_ms": None, "p99_ms": None, "mean_ms": None}
    ms = np.asarray(latencies, dtype=np.float64) * 1e3
    return {"p50_ms": round(float(np.percentile(ms, 50)), 4), "p99_ms": round(float(np.percentile(ms, 99)), 4),
            "mean_ms": round(float(ms.mean()), 4)}



class ServeProcess:
    """A `tfrec serve --model_config_file ... --port 0` subprocess; stopped with SIGTERM.

    The address comes from the server's `tfrec serve: gRPC on HOST:PORT` line (as
    `scripts/main.sh` reads it); `start` then waits until every model is AVAILABLE.

    Example (skipped: it starts a live server on exported servables)::

        >>> with ServeProcess("models.config", "server.log", ["--enable_batching"]) as server:  # doctest: +SKIP
        ...     server.wait_available(["recommender"]); server.address
    """

    def __init__(self, models_config, log_path, flags=(), start_timeout=300.0):
        self.models_config, self.log_path, self.flags = str(models_config), Path(log_path), list(flags)
        self.start_timeout = start_timeout
        self.proc = None
        self.address = self.rest_url = None

    def __enter__(self):
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc):
        self.stop()

    def command(self):
        return [str(TFREC), "serve", "--model_config_file", self.models_config, "--port", "0",
                "--rest_api_port", "0", *self.flags]

    def _log_tail(self, lines=30):
        text = self.log_path.read_text(errors="replace") if self.log_path.is_file() else ""
        return "\n".join(text.splitlines()[-lines:])

    def start(self):
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                         env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONWARNINGS": "ignore"})
        deadline = time.monotonic() + self.start_timeout
        while self.address is None or self.rest_url is None:
            text = self.log_path.read_text(errors="replace")
            grpc_line = re.search(r"^tfrec serve: gRPC on (\S+)", text, re.M)
            rest_line = re.search(r"^tfrec serve: REST on (\S+)", text, re.M)
            self.address = grpc_line and grpc_line.group(1)
            self.rest_url = rest_line and rest_line.group(1)
            if self.proc.poll() is not None:
                raise RuntimeError(f"model server exited (code {self.proc.returncode}); "
                                   f"{self.log_path}:\n{self._log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"model server did not start within {self.start_timeout:.0f} s; "
                                   f"{self.log_path}:\n{self._log_tail()}")
            time.sleep(0.2)
        return self

    def cpu_seconds(self):
        """CPU seconds (user + system) the server process has used so far (Linux `/proc`)."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def wait_available(self, models, timeout=None):
        """Block until every model in `models` has an AVAILABLE version (GetModelStatus)."""
        from export.client import PredictClient
        from export.server.errors import ServingError

        deadline = time.monotonic() + (timeout or self.start_timeout)
        with PredictClient(self.address) as client:
            for model in models:
                while True:
                    try:
                        if any(s["state"] == "AVAILABLE" for s in client.status(model)):
                            break
                    except ServingError:
                        pass
                    if self.proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"model {model!r} did not become AVAILABLE; {self.log_path}:\n"
                                           f"{self._log_tail()}")
                    time.sleep(0.5)

    def cpu_seconds(self):
        """User + system CPU seconds of the server process so far (Linux /proc)."""
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, AttributeError):
            return None
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def batch_sizes(self):
        """`{"model/signature": (rows_sum, calls)}` from the server's Prometheus batch-size histogram."""
        try:
            with urllib.request.urlopen(f"{self.rest_url}/monitoring/prometheus/metrics", timeout=10) as response:
                text = response.read().decode()
        except OSError:
            return {}
        out = collections.defaultdict(lambda: [0.0, 0])
        pattern = r'^tfrec_serving_batch_size_(sum|count)\{model="([^"]*)",signature="([^"]*)"\} (\S+)$'
        for kind, model, signature, value in re.findall(pattern, text, re.M):
            out[f"{model}/{signature}"][0 if kind == "sum" else 1] = float(value)
        return {key: (rows, int(calls)) for key, (rows, calls) in out.items()}

    def stop(self, grace=60.0):
        """SIGTERM (in-flight requests finish), SIGKILL after `grace` seconds."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def write_models_config(path, models):
    """A TF Serving model config file for `[(name, base_path, platform)]` (`export.server.config`)."""
    from google.protobuf import text_format

    from export.server.config import ServedModelConfig, to_model_server_config

    configs = [ServedModelConfig(name, str(base), platform=platform) for name, base, platform in models]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text_format.MessageToString(to_model_server_config(configs)))
    return path


def closed_loop(stub, requests, concurrency, count, timeout=30.0):
    """Send `count` requests with `concurrency` threads, each waiting for its answer before the next.

    Requests are taken in order (cycling over `requests`). Returns `{"latencies"
    (seconds, successful requests), "errors", "error_codes", "wall_seconds"}`.
    """
    import grpc

    lock = threading.Lock()
    state = {"next": 0}
    latencies, codes = [], collections.Counter()
    ready = threading.Barrier(concurrency + 1)

    def worker():
        mine, failed = [], collections.Counter()
        ready.wait()
        while True:
            with lock:
                index = state["next"]
                if index >= count:
                    break
                state["next"] = index + 1
            request = requests[index % len(requests)]
            begun = time.perf_counter()
            try:
                stub.Predict(request, timeout)
            except grpc.RpcError as err:
                failed[err.code().name] += 1
                continue
            mine.append(time.perf_counter() - begun)
        with lock:
            latencies.extend(mine)
            codes.update(failed)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    ready.wait()
    begun = time.perf_counter()
    try:
        for thread in threads:
            thread.join()
    except BaseException:  # Ctrl-C / SIGTERM: no new requests; calls in flight end on their own
        with lock:
            state["next"] = count
        raise
    return {"latencies": latencies, "errors": sum(codes.values()), "error_codes": dict(codes),
            "wall_seconds": time.perf_counter() - begun}


def measure(server, stub, requests, concurrency, count, warmup):
    """One level: warm-up (untimed) then `count` timed requests; the run record's measured fields."""
    if warmup:
        closed_loop(stub, requests, concurrency, warmup)
    batches_before, server_cpu_before = server.batch_sizes(), server.cpu_seconds()
    client_cpu_before = time.process_time()
    result = closed_loop(stub, requests, concurrency, count)
    client_cpu = time.process_time() - client_cpu_before
    server_cpu = server.cpu_seconds()
    batches = {}
    for key, (rows, calls) in server.batch_sizes().items():
        rows0, calls0 = batches_before.get(key, (0.0, 0))
        if calls > calls0:
            batches[key] = {"model_calls": calls - calls0, "mean_rows": round((rows - rows0) / (calls - calls0), 3)}
    wall = result["wall_seconds"]
    ok = len(result["latencies"])
    return {"requests": count, "errors": result["errors"], **percentiles_ms(result["latencies"]),
            "qps": round(ok / wall, 3) if wall > 0 else None, "wall_seconds": round(wall, 3),
            "error_codes": result["error_codes"], "client_cpu_seconds": round(client_cpu, 3),
            "server_cpu_seconds": None if server_cpu is None else round(server_cpu - server_cpu_before, 3),
            "server_batches": batches}
