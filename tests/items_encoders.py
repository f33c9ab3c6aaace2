"""Encoders for the items endpoint tests (`tfrec serve --items_encoder items_encoders:vector_encoder`): real
functions with the `encoder(rows) -> (vectors, sids)` interface of `export.items_add`, deterministic."""

import threading
import time

import numpy as np

CALLS = []  # (thread, start, end) of each call, to check the server runs one at a time
_LOCK = threading.Lock()


def vector_encoder(rows):
    """Each row's vector is its `vector` column (comma-separated floats). Test hooks, by column: `fail`
    = "value" raises ValueError (a problem with the rows), "crash" raises RuntimeError (an encoder bug),
    "nan" returns NaN vectors (malformed output); `sleep` = seconds to take (concurrency tests)."""
    started = time.monotonic()
    kinds = {row.get("fail", "") for row in rows}
    if "value" in kinds:
        raise ValueError("a row asks to be refused")
    if "crash" in kinds:
        raise RuntimeError("the encoder crashed")
    time.sleep(max(float(row.get("sleep", "0") or 0) for row in rows))
    vectors = np.array([[float(v) for v in row["vector"].split(",")] for row in rows], dtype=np.float32)
    if "nan" in kinds:
        vectors[:] = np.nan
    with _LOCK:
        CALLS.append((threading.get_ident(), started, time.monotonic()))
    return vectors, None
