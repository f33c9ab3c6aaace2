"""Requests by user id and event ingestion: the model server's side of the history store (issue 22).

With a history store (``ServerOptions.history_store``, ``tfrec serve
--history_store sqlite:///path/events.db`` or ``redis://127.0.0.1:6379/0``):

- **by user id**: any signature with a ``history: string (batch, None)`` input
  (the sequential servable's ``recommend``/``user_embedding``, the ranker's
  ``score``, the two-stage ``recommend``/``recommend_k``) also accepts
  ``user_id: string (batch,)`` in its place. The server reads each user's
  ``history_length`` most recent events (oldest first, right-padded with ``""``)
  and runs the signature on that history, so the answer equals the one for the
  same history sent explicitly. Other inputs (``exclude_history``, ``k``, ...) are
  sent as usual.
- **feedback** (CTR rankers' ``score`` and the two-stage signatures, whose
  inputs include ``history_ratings``, ``history_labels``, ``history_timestamps``,
  ``timestamp`` and ``user``; see ``tfrec.serving``): the server fills them from
  the same events, aligned with the history: ``history_timestamps`` = the events'
  timestamps, ``user`` = the ``user_id``, ``timestamp`` = the request's own
  ``timestamp`` input when it sends one (then the answer equals the by-history
  one), else the server's current time (Unix seconds, ``time.time()``). An
  event's ``feedback`` maps to rating and click (ours, ``feedback_columns``): a
  feedback above 1 is a rating (``history_ratings`` = feedback, ``history_labels``
  = 1 when it is >= ``click_threshold``, default 4 as the bundled MovieLens
  labels); a feedback in ``(0, 1]`` is a click (rating 0 = none, label 1; the
  ingestion default 1.0); ``<= 0`` is a non-click (rating 0, label 0).
- **stateful R2LED routes** (issue 22 item 4, ``tfrec.history.routes``): when
  the store holds a SID map for the model a ``score`` request by user id names
  (``tfrec events routes --model NAME``), the history sent to the ranker is not
  the ``history_length`` most recent events but the union of the candidates'
  SID-prefix buckets and the ``recent`` most recent events, oldest first (with
  their feedback and timestamps as above): read cost bounded by ``candidates x
  levels x bucket_size + recent`` events whatever the user's history length, and
  the ranker's scores are those of the whole history under the condition stated
  in ``tfrec.history.routes``. Keep that bound below the ranker's ``max_history``
  (it reads only that many most recent behaviours of what it is sent).
- **cold start** (ours): a user with no event in the store is answered
  ``NOT_FOUND`` (REST 404) ``user '<id>' has no events in the history store
  (cold start)``, for the whole request. The client falls back (e.g. to popular
  items, or sends a history); we do not invent an answer the model did not give.
- **ingestion**: ``POST /v1/events`` (REST) with ``{"events": [{"user": ..., "item":
  ..., "timestamp": <int>, "event_id": ..., "feedback": <float, default 1>}, ...]}``
  appends the batch atomically (all validated first; a bad event answers 400
  naming its index and field, nothing written) and answers ``{"received": n,
  "appended": m}`` (``m < n``: events already stored, by ``(user, event_id)``).
  REST only: gRPC serves TF Serving's fixed ``PredictionService`` protos, and an
  extra gRPC service would need its own proto that TF Serving clients lack.
- **errors**: a malformed ``user_id`` is INVALID_ARGUMENT; a store that is
  unreachable or times out is UNAVAILABLE (REST 503); the server keeps serving.

Bounds: at most ``max_users`` user ids per request (default 1,024), at most
``MAX_APPEND`` events per ingestion request, ``history_length`` <= the store's
``max_read``. Nothing in a request chooses a file: the store is the server's.

Example:
>>> import os, tempfile
>>> import numpy as np
>>> from tfrec.history import Event, open_store
>>> store = open_store("sqlite:///" + os.path.join(tempfile.mkdtemp(), "h.db"))
>>> _ = store.append([Event("u1", "i3", 2, 1.0, "e2"), Event("u1", "i9", 1, 1.0, "e1"), Event("u2", "i4", 1, 1.0, "e")])
>>> UserHistories(store, history_length=5).histories(np.array([b"u1", b"u2"], dtype=object)).tolist()
[[b'i9', b'i3'], [b'i4', b'']]
>>> store.close()
"""

from __future__ import annotations

import time
from typing import Any, Mapping, Sequence

import numpy as np

from export.server.errors import ServingError
from export.server.servable import Signature
from tfrec.history import MAX_APPEND, InvalidEvent, StoreUnavailable, event_from_mapping

USER_ID = "user_id"
HISTORY = "history"
# Inputs of the CTR signatures the store fills beside ``history`` (``tfrec.serving.CTR_FEEDBACK_INPUTS``);
# ``timestamp`` only when the request does not send it.
STORE_FILLED = ("history_ratings", "history_labels", "history_timestamps", "user")
REQUEST_TIME = "timestamp"
CANDIDATES = "candidates"
DEFAULT_CLICK_THRESHOLD = 4.0
DEFAULT_HISTORY_LENGTH = 256
DEFAULT_MAX_USERS = 1024


def has_history_input(signature: Signature) -> bool:
    """Whether ``signature`` takes a ``history: string (batch, None)`` input (and no ``user_id``)."""
    import tensorflow as tf

    spec = signature.inputs.get(HISTORY)
    return (spec is not None and USER_ID not in signature.inputs and spec.dtype == tf.string
            and spec.shape.rank == 2)


def feedback_columns(feedback: np.ndarray, click_threshold: float = DEFAULT_CLICK_THRESHOLD):
    """``(ratings float32, labels float32)`` of stored event feedback (see the module doc).

    >>> feedback_columns(np.array([5.0, 3.0, 1.0, 0.0, 0.5]))
    (array([5., 3., 0., 0., 0.], dtype=float32), array([1., 0., 1., 0., 1.], dtype=float32))
    """
    feedback = np.asarray(feedback, np.float64)
    rated = feedback > 1.0
    ratings = np.where(rated, feedback, 0.0).astype(np.float32)
    labels = np.where(rated, feedback >= click_threshold, feedback > 0.0).astype(np.float32)
    return ratings, labels


def store_error(err: Exception) -> ServingError:
    """The serving status of a history store error."""
    if isinstance(err, InvalidEvent):
        return ServingError.invalid_argument(str(err))
    if isinstance(err, StoreUnavailable):
        return ServingError.unavailable(str(err))
    return ServingError.from_exception(err)


class UserHistories:
    """Turns ``user_id`` inputs into histories read from a ``tfrec.history.HistoryStore``; appends events.

    Args:
        store: ``HistoryStore`` (owned by the caller).
        history_length: ``int``, most recent events read per user (default 256; use at least the
            longest history the served models read).
        max_users: ``int``, most user ids in one request (default 1,024).
        click_threshold: ``float``, a rating feedback at least this is a click (default 4).
    """

    def __init__(self, store, history_length: int = DEFAULT_HISTORY_LENGTH, max_users: int = DEFAULT_MAX_USERS,
                 click_threshold: float = DEFAULT_CLICK_THRESHOLD):
        self.click_threshold = float(click_threshold)
        for name, value in (("history_length", history_length), ("max_users", max_users)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if history_length > store.max_read:
            raise ValueError(f"history_length={history_length} exceeds the store's max_read={store.max_read}")
        self.store, self.history_length, self.max_users = store, history_length, max_users

    def wants_user_ids(self, signature: Signature, names) -> bool:
        """Whether a request sending input ``names`` to ``signature`` names users instead of a history."""
        return USER_ID in names and HISTORY not in names and has_history_input(signature)

    @staticmethod
    def by_user_signature(signature: Signature, input_names=()) -> Signature:
        """``signature`` with ``history`` replaced by ``user_id: string (batch,)`` (what by-id requests decode to).

        The inputs the store fills (``STORE_FILLED``) go too, and ``timestamp`` unless ``input_names`` has it."""
        import tensorflow as tf

        dropped = {HISTORY, *STORE_FILLED} | ({REQUEST_TIME} if REQUEST_TIME not in input_names else set())
        inputs = {k: v for k, v in signature.inputs.items() if k not in dropped}
        inputs[USER_ID] = tf.TensorSpec([None], tf.string)
        return Signature(signature.name, inputs, signature.outputs, signature.method_name)

    def recent_events(self, user_ids: np.ndarray, items_only: bool = False, targets=None) -> list:
        """Each user's recent ``Event``s (item tokens with ``items_only``, the store's cheap read), oldest
        first (``history_length`` at most); with ``targets`` (one list of item tokens per user), the
        events of the store's stateful routes for them instead (``HistoryStore.route_events``).

        ``ServingError``: NOT_FOUND for a user without events (cold start), INVALID_ARGUMENT for a
        malformed id or too many, UNAVAILABLE when the store fails.
        """
        if user_ids.ndim != 1 or not len(user_ids):
            raise ServingError.invalid_argument(f"{USER_ID} must be a non-empty vector of user ids, "
                                                f"got shape {list(user_ids.shape)}")
        if len(user_ids) > self.max_users:
            raise ServingError.invalid_argument(f"{len(user_ids)} user ids in one request, more than the limit "
                                                f"of {self.max_users}")
        rows = []
        for row, raw in enumerate(user_ids.tolist()):
            try:
                user = raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
            except UnicodeDecodeError:
                raise ServingError.invalid_argument(f"{USER_ID} {raw[:64]!r} is not UTF-8") from None
            try:
                if targets is not None:
                    routes = self.store.routes
                    events = self.store.route_events(user, targets[row], routes.recent if routes else 1)
                else:
                    read = self.store.recent_items if items_only else self.store.recent
                    events = read(user, self.history_length)
            except Exception as err:  # noqa: BLE001 - store errors become statuses
                raise store_error(err) from None
            if not events:
                raise ServingError.not_found(f"user {user[:128]!r} has no events in the history store (cold start: "
                                             "send a history instead, e.g. popular items)")
            rows.append(events)
        return rows

    @staticmethod
    def _padded(rows, value, dtype, fill):
        out = np.full((len(rows), max(len(row) for row in rows)), fill, dtype=dtype)
        for i, row in enumerate(rows):
            out[i, : len(row)] = [value(event) for event in row]
        return out

    def histories(self, user_ids: np.ndarray) -> np.ndarray:
        """``(batch, longest)`` bytes object array: each user's recent items, oldest first, padded ``b""``.

        Errors as :meth:`recent_events`.
        """
        return self._padded(self.recent_events(user_ids, items_only=True), lambda item: item.encode("utf-8"),
                            object, b"")

    def route_targets(self, arrays: Mapping[str, Any], model) -> list:
        """One list of candidate tokens per row when the store's stateful routes serve ``model``
        (a ``score`` request: ``candidates`` sent), else None."""
        try:
            routes = self.store.current_routes()
        except Exception as err:  # noqa: BLE001 - store errors become statuses
            raise store_error(err) from None
        if routes is None or model is None or routes.model != model or CANDIDATES not in arrays:
            return None
        candidates = np.asarray(arrays[CANDIDATES], dtype=object)
        if candidates.ndim != 2:
            return None  # the signature's own validation names the problem
        try:
            return [[c.decode("utf-8") if isinstance(c, bytes) else str(c) for c in row if c not in (b"", "")]
                    for row in candidates.tolist()]
        except UnicodeDecodeError:
            raise ServingError.invalid_argument(f"{CANDIDATES} holds a token that is not UTF-8") from None

    def replace_user_ids(self, arrays: Mapping[str, Any], signature: Signature = None, model: str = None) -> dict:
        """``arrays`` with ``user_id`` replaced by ``history`` read from the store, plus the
        feedback inputs ``signature`` takes (see the module doc); ``model``: the served model's name
        (its ``score`` requests use the store's stateful routes when they were set for it)."""
        arrays = dict(arrays)
        user_ids = np.asarray(arrays.pop(USER_ID), dtype=object)
        wanted = set(signature.inputs) if signature is not None else set()
        if not wanted & set(STORE_FILLED):
            arrays[HISTORY] = self.histories(user_ids)
        else:
            targets = self.route_targets(arrays, model)
            if targets is not None and len(targets) != len(user_ids):
                raise ServingError.invalid_argument(f"{CANDIDATES} needs one row per {USER_ID}")
            rows = self.recent_events(user_ids, targets=targets)
            arrays[HISTORY] = self._padded(rows, lambda e: e.item.encode("utf-8"), object, b"")
            feedback = self._padded(rows, lambda e: e.feedback, np.float64, 0.0)
            ratings, labels = feedback_columns(feedback, self.click_threshold)
            valid = arrays[HISTORY] != b""
            filled = {"history_ratings": np.where(valid, ratings, 0.0).astype(np.float32),
                      "history_labels": np.where(valid, labels, 0.0).astype(np.float32),
                      "history_timestamps": self._padded(rows, lambda e: e.timestamp, np.int64, 0),
                      "user": user_ids}
            arrays.update({k: v for k, v in filled.items() if k in wanted})
        if REQUEST_TIME in wanted and REQUEST_TIME not in arrays:
            arrays[REQUEST_TIME] = np.full(len(user_ids), int(time.time()), np.int64)
        return arrays

    def ingest(self, document: Any) -> dict:
        """Append the events of a ``{"events": [...]}`` document; ``{"received": n, "appended": m}``."""
        if not isinstance(document, dict) or set(document) != {"events"}:
            raise ServingError.invalid_argument('expected a JSON object {"events": [...]}')
        events = document["events"]
        if not isinstance(events, list) or not events:
            raise ServingError.invalid_argument("events must be a non-empty JSON array")
        if len(events) > MAX_APPEND:
            raise ServingError.invalid_argument(f"{len(events)} events in one request, more than the limit "
                                                f"of {MAX_APPEND}")
        try:
            parsed = [event_from_mapping(obj, index) for index, obj in enumerate(events)]
            appended = self.store.append(parsed)
        except Exception as err:  # noqa: BLE001
            raise store_error(err) from None
        return {"received": len(parsed), "appended": appended}


def request_input_names(document: Any) -> Sequence[str]:
    """Input names a REST Predict body sends (named ``inputs`` or ``instances`` objects); ``()`` otherwise."""
    if not isinstance(document, dict):
        return ()
    inputs = document.get("inputs")
    if isinstance(inputs, dict):
        return tuple(inputs)
    instances = document.get("instances")
    if isinstance(instances, list) and instances and isinstance(instances[0], dict):
        return tuple(instances[0])
    return ()
