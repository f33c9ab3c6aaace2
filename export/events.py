"""``tfrec events``: bulk event ingestion into a history store, and forgetting a user.

``tfrec events ingest --file events.tsv --store sqlite:///srv/events.db`` (or
``--store redis://127.0.0.1:6379/0``) reads tab-separated lines
``user<TAB>item<TAB>timestamp<TAB>feedback<TAB>event_id`` (UTF-8; an optional
first line naming exactly these columns is a header; ``timestamp`` an integer,
``feedback`` a float).

- Validation first: the whole file is checked before anything is written; any
  malformed line fails the command with its line number and reason (up to 20
  listed) and nothing is written.
- Then the events are appended in chunks of ``--chunk_size`` lines, each chunk one
  transaction (SQLite) / one atomic script (Redis).
- Resumable: appends are idempotent by ``(user, event_id)``, so re-running the
  same command after a crash or a kill appends only what is missing.

``tfrec events delete --user U --store URL`` forgets a user (right to be forgotten).

``tfrec events routes --store URL --model_dir SERVABLE/VERSION --model NAME``
stores an exported R2LED ranker's SID map in the store and builds every user's
SID-prefix buckets (``export.routes``, ``tfrec.history.routes``); ``--clear``
removes them.

Example:
>>> import os, tempfile
>>> folder = tempfile.mkdtemp()
>>> path = os.path.join(folder, "events.tsv")
>>> _ = open(path, "w").write("u1\\ti1\\t10\\t1.0\\te1\\nu1\\ti2\\t11\\t1.0\\te2\\n")
>>> ingest_file(path, "sqlite://" + os.path.join(folder, "h.db"))
{'lines': 2, 'events': 2, 'appended': 2}
>>> ingest_file(path, "sqlite://" + os.path.join(folder, "h.db"))["appended"]
0
"""

from __future__ import annotations

import sys
from typing import Iterator, List, Tuple

from tfrec.history import MAX_APPEND, Event, HistoryStoreError, InvalidEvent, check_event, open_store

HEADER = ("user", "item", "timestamp", "feedback", "event_id")
MAX_LINE_BYTES = 4096  # far above the longest valid line (ids and tokens are bounded)
MAX_ERRORS_LISTED = 20


def parse_line(line: str, number: int) -> Event:
    """The :class:`Event` of one TSV line; ``InvalidEvent`` naming the line and the field otherwise."""
    fields = line.split("\t")
    if len(fields) != len(HEADER):
        raise InvalidEvent("line", f"{len(fields)} tab-separated fields, expected {len(HEADER)} "
                                   f"({', '.join(HEADER)})", f"line {number}")
    user, item, timestamp, feedback, event_id = fields
    try:
        timestamp = int(timestamp)
    except ValueError:
        raise InvalidEvent("timestamp", f"not an integer: {timestamp[:32]!r}", f"line {number}") from None
    try:
        feedback = float(feedback)
    except ValueError:
        raise InvalidEvent("feedback", f"not a number: {feedback[:32]!r}", f"line {number}") from None
    return check_event(Event(user, item, timestamp, feedback, event_id), f"line {number}")


def _parsed(path: str) -> Iterator[Tuple[int, object]]:
    """``(line number, Event or InvalidEvent)`` for every line of ``path`` (a header line skipped)."""
    try:
        handle = open(path, "rb")
    except OSError as err:
        raise ValueError(f"cannot read events file {path}: {err.strerror}") from None
    with handle:
        number = 0
        while True:
            raw = handle.readline(MAX_LINE_BYTES + 1)
            if not raw:
                return
            number += 1
            where = f"line {number}"
            if len(raw) > MAX_LINE_BYTES:
                while raw and not raw.endswith(b"\n"):  # skip the rest of the long line
                    raw = handle.readline(MAX_LINE_BYTES + 1)
                yield number, InvalidEvent("line", f"longer than {MAX_LINE_BYTES} bytes", where)
                continue
            try:
                line = raw.decode("utf-8").rstrip("\n").rstrip("\r")
            except UnicodeDecodeError:
                yield number, InvalidEvent("line", "not UTF-8", where)
                continue
            if number == 1 and tuple(line.split("\t")) == HEADER:
                continue
            try:
                yield number, parse_line(line, number)
            except InvalidEvent as err:
                yield number, err


def read_events(path: str) -> Iterator[Tuple[int, Event]]:
    """``(line number, event)`` for every line of ``path``; ``InvalidEvent`` at the first bad line."""
    for number, event in _parsed(path):
        if isinstance(event, InvalidEvent):
            raise event
        yield number, event


def validate_file(path: str) -> int:
    """Check every line of ``path``; the number of events. ``ValueError`` listing the bad lines."""
    errors, count = [], 0
    for _, event in _parsed(path):
        if isinstance(event, InvalidEvent):
            errors.append(str(event))
            if len(errors) == MAX_ERRORS_LISTED:
                break
        else:
            count += 1
    if errors:
        more = f" (first {MAX_ERRORS_LISTED} listed)" if len(errors) == MAX_ERRORS_LISTED else ""
        raise ValueError(f"{path}: malformed events, nothing written{more}:\n  " + "\n  ".join(errors))
    return count


def ingest_file(path: str, store_url: str, chunk_size: int = 1000, progress: bool = False) -> dict:
    """Validate ``path`` whole, then append its events in chunks (see the module docstring).

    Returns ``{"lines", "events", "appended"}`` (``appended`` < ``events``: already stored).
    """
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or not 1 <= chunk_size <= MAX_APPEND:
        raise ValueError(f"chunk_size must be in [1, {MAX_APPEND}], got {chunk_size!r}")
    total = validate_file(path)
    store = open_store(store_url)
    appended, last_line = 0, 0
    try:
        chunk: List[Event] = []
        for last_line, event in read_events(path):
            chunk.append(event)
            if len(chunk) == chunk_size:
                appended += store.append(chunk)
                chunk = []
                if progress:
                    print(f"tfrec events ingest: committed through line {last_line}", flush=True)
        if chunk:
            appended += store.append(chunk)
    except HistoryStoreError as err:
        raise ValueError(f"history store failed after {appended} new events (re-run to resume): {err}") from None
    finally:
        store.close()
    return {"lines": last_line, "events": total, "appended": appended}


def _cmd_ingest(args) -> None:
    result = ingest_file(args.file, args.store, args.chunk_size, args.progress)
    print(f"tfrec events ingest: {result['events']} events read, {result['appended']} appended "
          f"({result['events'] - result['appended']} already stored)", flush=True)


def _cmd_delete(args) -> None:
    store = open_store(args.store)
    try:
        deleted = store.delete_user(args.user)
    except HistoryStoreError as err:
        raise ValueError(str(err)) from None
    finally:
        store.close()
    print(f"tfrec events delete: {deleted} events of user {args.user!r} deleted", file=sys.stdout, flush=True)


def _cmd_routes(args) -> None:
    routes = None
    if not args.clear:
        if not args.model_dir or not args.model:
            raise ValueError("tfrec events routes needs --model_dir and --model (or --clear)")
        from export.routes import savedmodel_routes

        routes = savedmodel_routes(args.model_dir, args.model, args.bucket_size, args.recent)
    store = open_store(args.store)
    try:
        users = store.set_routes(routes)
    except HistoryStoreError as err:
        raise ValueError(str(err)) from None
    finally:
        store.close()
    if routes is None:
        print("tfrec events routes: SID routes removed", flush=True)
    else:
        print(f"tfrec events routes: {len(routes.sids)} item SIDs of model {args.model!r}, levels {routes.levels}, "
              f"buckets of {routes.bucket_size} built for {users} users", flush=True)


def ingest_and_ask(address: str, rest_url: str, prepared: str, user=None, user_index: int = 0, k: int = 10,
                   recommender: str = "recommender", chunk_size: int = 1000) -> dict:
    """Post a prepared user's history as events, then compare ``recommend`` by id and by history.

    Returns ``{"user", "history", "held_out", "received", "appended", "by_id": [(token, score)],
    "same": bool}`` (see the module docstring).
    """
    import json
    import urllib.request

    import numpy as np

    from export.client import PredictClient
    from export.demo import user_history

    user, history, held_out = user_history(prepared, user, user_index)
    events = [{"user": user, "item": token, "timestamp": i, "event_id": f"{user}:{i}"}
              for i, token in enumerate(history)]
    received = appended = 0
    for start in range(0, len(events), chunk_size):
        body = json.dumps({"events": events[start:start + chunk_size]}).encode("utf-8")
        request = urllib.request.Request(rest_url.rstrip("/") + "/v1/events", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            answer = json.loads(response.read())
        received, appended = received + answer["received"], appended + answer["appended"]
    with PredictClient(address) as client:
        by_id = client.predict(recommender, {"user_id": [user], "exclude_history": [False]}, signature="recommend")
        by_history = client.predict(recommender, {"history": [history], "exclude_history": [False]},
                                    signature="recommend")
    pairs = [(t.decode(), float(s)) for t, s in zip(by_id["item_ids"][0], by_id["scores"][0]) if t][:k]
    same = (by_id["item_ids"].tolist() == by_history["item_ids"].tolist()
            and np.allclose(by_id["scores"], by_history["scores"], rtol=1e-6, atol=1e-6))
    return {"user": user, "history": history, "held_out": held_out, "received": received, "appended": appended,
            "by_id": pairs, "same": bool(same)}


def _cmd_ask(args) -> None:
    from export.demo import item_titles

    result = ingest_and_ask(args.address, args.rest_url, args.prepared, args.user, args.user_index, args.k,
                            args.recommender)
    titles = item_titles(args.dataset, args.data_root)
    print(f"user {result['user']}: {result['received']} events posted to /v1/events "
          f"({result['appended']} new); top-{len(result['by_id'])} by user_id:")
    for rank, (token, score) in enumerate(result["by_id"], 1):
        mark = "  <- held-out next item" if token == result["held_out"] else ""
        print(f"  {rank:2d}. {token:>12}  {score:8.3f}  {titles.get(token, '')[:70]}{mark}")
    if not result["same"]:
        raise ValueError("recommend by user_id differs from the same history sent explicitly")
    print("by user_id == by history: the same top-k and scores", flush=True)


def add_commands(subparsers) -> None:
    events = subparsers.add_parser("events", help="user event histories (serving by user id)")
    commands = events.add_subparsers(dest="events_command", required=True)
    ingest = commands.add_parser("ingest", help="bulk-append a TSV of events (validated whole first; resumable)")
    ingest.add_argument("--file", required=True, help="TSV: user, item, timestamp, feedback, event_id")
    ingest.add_argument("--store", required=True, help="sqlite:///path/events.db or redis://host:port/db")
    ingest.add_argument("--chunk_size", type=int, default=1000, help="events per transaction (default 1000)")
    ingest.add_argument("--progress", action="store_true", help="print a line per committed chunk")
    ingest.set_defaults(func=_cmd_ingest)
    delete = commands.add_parser("delete", help="forget every event of a user")
    delete.add_argument("--user", required=True)
    delete.add_argument("--store", required=True, help="sqlite:///path/events.db or redis://host:port/db")
    delete.set_defaults(func=_cmd_delete)
    routes = commands.add_parser("routes", help="stateful R2LED routes: store a ranker's SID map, build buckets")
    routes.add_argument("--store", required=True, help="sqlite:///path/events.db or redis://host:port/db")
    routes.add_argument("--model_dir", help="an exported R2LED ranker's version folder (tfrec ctr export)")
    routes.add_argument("--model", help="the ranker's name in the server's model config")
    routes.add_argument("--bucket_size", type=int, default=64, help="behaviours per SID-prefix bucket (default 64)")
    routes.add_argument("--recent", type=int, default=64,
                        help="most recent behaviours gathered beside the buckets (default 64)")
    routes.add_argument("--clear", action="store_true", help="remove the store's SID routes")
    routes.set_defaults(func=_cmd_routes)
    ask = commands.add_parser("ask", help="post a prepared user's history as events, then ask recommend by user_id")
    ask.add_argument("--address", default="127.0.0.1:8500", help="host:port of the server's gRPC endpoint")
    ask.add_argument("--rest_url", required=True, help="the server's REST root, e.g. http://127.0.0.1:8501")
    ask.add_argument("--prepared", required=True, help="folder written by `tfrec prepare`")
    ask.add_argument("--dataset", help="bundled dataset whose item titles to print")
    ask.add_argument("--data-root", help="folder of the bundled datasets (default: ../shared/data)")
    ask.add_argument("--user", help="user token (default: --user-index)")
    ask.add_argument("--user-index", type=int, default=0, help="user by position in user_vocab.txt (default 0)")
    ask.add_argument("--k", type=int, default=10)
    ask.add_argument("--recommender", default="recommender", help="model name (default recommender)")
    ask.set_defaults(func=_cmd_ask)
