"""The model server under attack (issue 21): bad requests by class, memory, hot swaps, keep-alive latency.

Runs a `tfrec serve` subprocess (loopback, default limits) on a `half_plus_two`-style
model and measures, writing `reports/robustness.json` and `reports/robustness.md`:

- `classes`: the bad requests of `export.server.attack` (REST and gRPC), per class the
  codes returned against the code expected (TF Serving's), and whether a valid request
  succeeded afterwards; `crashes`: server exits;
- `reload_attack`: `HandleReloadConfigRequest` naming `shutil:rmtree` -- the code and
  whether the victim folder survived;
- `metrics`: scrape size before/after 2,000 requests with unknown 1 KB model and signature
  names plus one gRPC request with a 50 MB signature name;
- `large_bodies`: 10 MB and 50 MB JSON predict bodies (the 50 MB one over the 64 MiB default
  limit is accepted) -- status, seconds, server peak RSS above the baseline, RSS after;
- `hot_swap`: four client threads (REST + gRPC) during three version swaps: requests, failures;
- `keep_alive`: REST p50/p99 on one kept-open connection (and on new connections);
- `rss_mib`: server RSS before / after / peak (VmHWM); `loadavg`: `os.getloadavg()` (shared machine).

    .venv/bin/python benchmarks/robustness.py [--per-class 60] [--out reports/robustness.json]
"""

import argparse
import collections
import http.client
import json
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _serving_load import ServeProcess, percentiles_ms, write_models_config  # noqa: E402


def proc_status(pid):
    """`{"rss_mib", "peak_mib"}` of a process (VmRSS, VmHWM)."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024
    return {"rss_mib": round(fields.get("VmRSS", 0), 1), "peak_mib": round(fields.get("VmHWM", 0), 1)}


def reset_peak(pid):
    try:  # writing 5 resets VmHWM to the current RSS (Linux >= 4.0)
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def rest_post(url, body, timeout=300):
    host, port = url.split("//")[1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.request("POST", "/v1/models/half_plus_two:predict", body=body,
                     headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def grpc_predict(channel, value=2.0, timeout=30):
    import numpy as np
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    request = predict_pb2.PredictRequest()
    request.model_spec.name = "half_plus_two"
    request.inputs["x"].CopyFrom(tf.make_tensor_proto(np.array([value], np.float32)))
    response = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout)
    return list(response.outputs["y"].float_val)


def valid_ok(server, channel):
    try:
        return rest_post(server.rest_url, b'{"instances": [2.0]}', timeout=30) == 200 and \
            grpc_predict(channel) == [3.0]
    except Exception:  # noqa: BLE001 - recorded as a failure
        return False


def run_classes(server, channel, per_class, seed):
    from export.server.attack import grpc_cases, rest_cases, send_grpc, send_rest

    rng = random.Random(seed)
    out = {}
    groups = [("rest", rest_cases(rng, per_class, int(server.rest_url.rsplit(":", 1)[1]), max_body_bytes=64 << 20)),
              ("grpc", grpc_cases(rng, per_class, max_message_bytes=256 << 20))]
    for protocol, cases in groups:
        for name, items in cases.items():
            codes = collections.Counter()
            started = time.monotonic()
            for case in items:
                if protocol == "rest":
                    codes[str(send_rest(int(server.rest_url.rsplit(":", 1)[1]), case.payload))] += 1
                else:
                    codes[send_grpc(channel, case, timeout=120)] += 1
            out[f"{protocol}/{name}"] = {
                "requests": len(items), "expected": str(items[0].expected), "codes": dict(codes),
                "all_expected": set(codes) == {str(items[0].expected)},
                "seconds": round(time.monotonic() - started, 2),
                "valid_request_after": valid_ok(server, channel),
                "server_alive": server.proc.poll() is None,
            }
            print(f"  {protocol}/{name}: {dict(codes)} (expected {items[0].expected})", flush=True)
    return out


def reload_attack(server, tmp):
    import grpc
    from tensorflow_serving.apis import model_management_pb2, model_service_pb2_grpc

    # Before the fix the server called shutil.rmtree(<model name>, core): a folder of that
    # name in the server's working folder (ROOT) is the victim; removed again below.
    name = f".tfrec-robustness-victim-{os.getpid()}"
    victim = ROOT / name
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")
    request = model_management_pb2.ReloadConfigRequest()
    request.config.model_config_list.config.add(name=name, base_path="shutil:rmtree", model_platform="python")
    request.config.model_config_list.config.add(name="half_plus_two", base_path=str(Path(tmp) / "half_plus_two"),
                                                model_platform="tensorflow")
    with grpc.insecure_channel(server.address) as channel:
        try:
            model_service_pb2_grpc.ModelServiceStub(channel).HandleReloadConfigRequest(request, 30)
            code = "OK"
        except grpc.RpcError as err:
            code = err.code().name
    intact = (victim / "precious.txt").is_file()
    shutil.rmtree(victim, ignore_errors=True)
    return {"code": code, "victim_folder_intact": intact}


def metrics_flood(server, channel):
    import grpc
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    url = f"{server.rest_url}/monitoring/prometheus/metrics"

    def scrape():
        import urllib.request

        started = time.monotonic()
        with urllib.request.urlopen(url, timeout=120) as response:
            return len(response.read()), time.monotonic() - started

    before, _ = scrape()
    rng = random.Random(2)
    host, port = server.rest_url.split("//")[1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    junk = lambda: "".join(rng.choice("abcdefghij") for _ in range(1024))  # noqa: E731
    for _ in range(1000):
        conn.request("POST", f"/v1/models/{junk()}:predict", body=b'{"instances": [1.0]}')
        conn.getresponse().read()
        conn.request("POST", "/v1/models/half_plus_two:predict",
                     body=json.dumps({"signature_name": junk(), "instances": [1.0]}).encode())
        conn.getresponse().read()
    conn.close()
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "half_plus_two"
    request.model_spec.signature_name = "s" * (50 << 20)
    try:
        prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, 60)
        big = "OK"
    except grpc.RpcError as err:
        big = err.code().name
    after, seconds = scrape()
    return {"scrape_bytes_before": before, "scrape_bytes_after": after, "scrape_seconds_after": round(seconds, 3),
            "requests_with_unknown_names": 2000, "signature_50mb_code": big}


def large_bodies(server):
    out = {}
    for mib in (10, 50):
        count = (mib << 20) // len(b"2.25, ")  # `x` is a vector: one long list of floats
        body = b'{"instances": [' + b", ".join([b"2.25"] * count) + b"]}"
        pid = server.proc.pid
        base = proc_status(pid)["rss_mib"]
        reset_peak(pid)
        started = time.monotonic()
        status = rest_post(server.rest_url, body)
        seconds = time.monotonic() - started
        time.sleep(0.5)
        after = proc_status(pid)
        out[f"{mib}MiB"] = {"body_bytes": len(body), "status": status, "seconds": round(seconds, 2),
                            "rss_before_mib": base, "peak_mib": after["peak_mib"],
                            "peak_above_before_mib": round(after["peak_mib"] - base, 1),
                            "peak_over_body": round((after["peak_mib"] - base) / (len(body) / 2**20), 1),
                            "rss_after_mib": after["rss_mib"]}
        print(f"  {mib} MiB body: {out[f'{mib}MiB']}", flush=True)
    return out


def hot_swap(server, base, seconds_between=3.0, swaps=3):
    import grpc

    from export.server.testing import save_half_plus_two

    stop = threading.Event()
    counts = collections.Counter()
    lock = threading.Lock()

    def rest_client():
        host, port = server.rest_url.split("//")[1].split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        while not stop.is_set():
            try:
                conn.request("POST", "/v1/models/half_plus_two:predict", body=b'{"instances": [2.0]}')
                response = conn.getresponse()
                ok = response.status == 200 and json.loads(response.read()) == {"predictions": [3.0]}
            except Exception:  # noqa: BLE001
                ok = False
                conn.close()
                conn = http.client.HTTPConnection(host, int(port), timeout=30)
            with lock:
                counts["rest"] += 1
                counts["rest_failed"] += not ok

    def grpc_client():
        with grpc.insecure_channel(server.address) as channel:
            while not stop.is_set():
                try:
                    ok = grpc_predict(channel) == [3.0]
                except Exception:  # noqa: BLE001
                    ok = False
                with lock:
                    counts["grpc"] += 1
                    counts["grpc_failed"] += not ok

    threads = [threading.Thread(target=f) for f in (rest_client, rest_client, grpc_client, grpc_client)]
    for t in threads:
        t.start()
    for version in range(2, 2 + swaps):
        time.sleep(seconds_between)
        staging = Path(tempfile.mkdtemp(dir=base.parent))
        save_half_plus_two(str(staging / "v"))
        os.rename(staging / "v", base / str(version))  # published atomically
        shutil.rmtree(staging)
        print(f"  published version {version}", flush=True)
    time.sleep(seconds_between)
    stop.set()
    for t in threads:
        t.join()
    return {"swaps": swaps, "requests": counts["rest"] + counts["grpc"],
            "failed": counts["rest_failed"] + counts["grpc_failed"], **dict(counts)}


def keep_alive(server, count=500):
    host, port = server.rest_url.split("//")[1].split(":")
    body = b'{"instances": [1.0, 2.0, 5.0]}'
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    kept, fresh = [], []
    for i in range(count + 20):
        started = time.perf_counter()
        conn.request("POST", "/v1/models/half_plus_two:predict", body=body)
        response = conn.getresponse()
        response.read()
        if i >= 20:
            kept.append(time.perf_counter() - started)
    conn.close()
    for _ in range(200):
        started = time.perf_counter()
        rest_post(server.rest_url, body)
        fresh.append(time.perf_counter() - started)
    return {"kept_open": {"requests": len(kept), **percentiles_ms(kept)},
            "new_connection": {"requests": len(fresh), **percentiles_ms(fresh)}}


def write_markdown(result, path):
    lines = ["# Model server robustness (issue 21)", "",
             f"`benchmarks/robustness.py`, {result['date']}; load average {result['loadavg']} on "
             f"{result['cores']} shared cores. One `tfrec serve` process (loopback, default limits), "
             "a `half_plus_two`-style model.", "",
             "| class | requests | expected | codes | valid request after |", "|---|---|---|---|---|"]
    for name, row in result["classes"].items():
        lines.append(f"| {name} | {row['requests']} | {row['expected']} | "
                     f"{', '.join(f'{k}: {v}' for k, v in row['codes'].items())} | "
                     f"{'yes' if row['valid_request_after'] else 'NO'} |")
    total = sum(r["requests"] for r in result["classes"].values())
    unexpected = sum(sum(v for k, v in r["codes"].items() if k != r["expected"]) for r in result["classes"].values())
    m, r, h, k = result["metrics"], result["reload_attack"], result["hot_swap"], result["keep_alive"]
    lines += ["", f"- {total} bad requests, {unexpected} answered with another code than TF Serving's; "
                  f"crashes: {result['crashes']}.",
              f"- Reload attack (`shutil:rmtree`): {r['code']}; victim folder intact: {r['victim_folder_intact']}.",
              f"- Metrics: scrape {m['scrape_bytes_before']} B before, {m['scrape_bytes_after']} B after "
              f"{m['requests_with_unknown_names']} requests with unknown 1 KB names and a 50 MB signature name "
              f"({m['signature_50mb_code']}); scrape {m['scrape_seconds_after'] * 1000:.0f} ms.",
              ]
    for name, row in result["large_bodies"].items():
        lines.append(f"- {name} JSON body: {row['status']} in {row['seconds']} s, peak RSS +{row['peak_above_before_mib']}"
                     f" MiB ({row['peak_over_body']}x the body), RSS after {row['rss_after_mib']} MiB "
                     f"(before {row['rss_before_mib']} MiB).")
    lines += [f"- Hot swap: {h['requests']} requests during {h['swaps']} version swaps, {h['failed']} failed.",
              f"- REST keep-alive: p50 {k['kept_open']['p50_ms']} ms, p99 {k['kept_open']['p99_ms']} ms "
              f"(new connections: p50 {k['new_connection']['p50_ms']} ms).",
              f"- Server RSS: {result['rss_mib']['before']} MiB before, {result['rss_mib']['after']} MiB after, "
              f"peak {result['rss_mib']['peak']} MiB.", ""]
    Path(path).write_text("\n".join(lines))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-class", type=int, default=60, help="bad requests per class (default 60)")
    parser.add_argument("--out", default=str(ROOT / "reports" / "robustness.json"))
    args = parser.parse_args()
    import grpc

    from export.server.testing import save_half_plus_two

    tmp = tempfile.mkdtemp(prefix="tfrec-robustness-")
    base = Path(tmp) / "half_plus_two"
    save_half_plus_two(str(base / "1"))
    config = write_models_config(Path(tmp) / "models.config", [("half_plus_two", base, "tensorflow")])
    flags = ["--file_system_poll_wait_seconds", "0.5"]
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cores": os.cpu_count(),
              "loadavg_start": [round(x, 2) for x in os.getloadavg()]}
    try:
        with ServeProcess(config, Path(tmp) / "server.log", flags) as server:
            server.wait_available(["half_plus_two"])
            pid = server.proc.pid
            result["rss_mib"] = {"before": proc_status(pid)["rss_mib"]}
            with grpc.insecure_channel(server.address, options=[("grpc.max_send_message_length", 1 << 30)]) as channel:
                print("bad requests by class", flush=True)
                result["classes"] = run_classes(server, channel, args.per_class, seed=21)
                print("reload attack", flush=True)
                result["reload_attack"] = reload_attack(server, tmp)
                print("metrics flood", flush=True)
                result["metrics"] = metrics_flood(server, channel)
            print("large bodies", flush=True)
            peak_so_far = proc_status(pid)["peak_mib"]
            result["large_bodies"] = large_bodies(server)
            print("hot swap under load", flush=True)
            result["hot_swap"] = hot_swap(server, base)
            print("keep-alive latency", flush=True)
            result["keep_alive"] = keep_alive(server)
            status = proc_status(pid)
            result["rss_mib"].update(after=status["rss_mib"],
                                     peak=max([peak_so_far, status["peak_mib"]] +
                                              [r["peak_mib"] for r in result["large_bodies"].values()]))
            result["crashes"] = 0 if server.proc.poll() is None else 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result["loadavg"] = [round(x, 2) for x in os.getloadavg()]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    write_markdown(result, out.with_suffix(".md"))
    print(f"wrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
