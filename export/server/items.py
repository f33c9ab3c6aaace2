"""``POST /v1/items``: new catalogue items added to the delta file, and to the CTR ranker, while serving (issue 22 item 5).

The model server's side of ``export.items_add`` (read its module docstring first). With
``tfrec serve --items_delta /srv/delta/items.npz`` and exactly one encoder, ``--items_model RUN``
(the built-in ``tfrec.semantics.new_items.NewItemEncoder`` of a trained DMESR run; ``--items_store DIR``
overrides its semantic store) or ``--items_encoder module:function`` (any function with the
``encoder(rows) -> (vectors, sids)`` interface), the REST endpoint

    ``POST /v1/items`` ``{"items": [{"item_id": "B0NEW1", "title": "...", "generated_text": "..."}, ...]}``

embeds the items with that encoder and adds them to the delta file exactly as ``tfrec items add``
(one code path: ``export.items_add.add_rows``), answering ``{"added", "replaced", "items",
"generation", "seconds"}``. A ``DeltaRetrievalServable`` following the same file
(``export.delta_retrieval``) returns them within its ``reload_seconds``; no restart.

- **the ranker too** (optional): with ``--items_ranker RUN --items_ranker_out BASE`` (a trained ``tfrec ctr
  train`` run and the served ranker's base directory; ``--items_ranker_init sid_neighbours|zero``,
  ``--items_ranker_store DIR`` optional) every add also gives the items rows in the ranker's per-item
  tables and publishes them as its next version under ``BASE`` (``export.ranker_items``, as ``tfrec items
  add --ranker``); a server serving ``BASE`` (this one or TF Serving) picks the version up by polling, so
  the new items get the ranker's own scores with no restart. When the server has a ``--history_store``
  that holds SID routes, the items' codes go into them too (as the CLI's ``--history_store``); a store
  without routes is left alone. The answer then carries ``"ranker": {"added", "items", "version",
  "routes", "init_levels", "seconds"}`` beside the delta's fields (``"seconds"``: the whole add).
- **one code path**: ``export.items_add.add_rows`` with an ``export.ranker_items.RankerTarget``, the
  function ``tfrec items add`` calls. Its order, so that no failure leaves half an add: everything is
  computed and checked first (the ranker's rows and checks, the encoding, the merged delta); then the
  **ranker version is published first** (a folder renamed into place whole), so retrieval never returns
  an item the served ranker does not know; then the delta file is written (atomic rename). A ranker
  export that fails writes nothing to the delta: 500 (INTERNAL) "the ranker's new version could not be
  published ...; nothing was added". A delta write that fails after it (every check passed: a full disk)
  withdraws that version (the server goes back to the previous one) and answers 400 (FAILED_PRECONDITION)
  naming the withdrawn version. Routes a failed add had extended keep the items' codes: an addition that
  is harmless and idempotent (a retry adds nothing there). Items the ranker refuses (one it has already,
  trained or added; a column or text it reads missing) are 400 (INVALID_ARGUMENT) "the ranker refused
  the items: ...", nothing written.
- **who chooses what**: the encoder, the delta file and the ranker (run, base directory, init) are the
  operator's, fixed at start-up (the encoder and the ranker run are loaded then: a bad flag combination,
  an encoder or a run that cannot be loaded, a base directory that cannot be written, or a history
  store whose routes are another ranker's fails start-up naming the flag). Nothing in a request names
  an encoder, a run, a file or a path, and no answer holds a path. When no configured python model
  follows the file (``delta=`` of an ``export.delta_retrieval`` model), or no configured model serves
  ``--items_ranker_out``, start-up logs a warning.
- **rows**: the rules of ``tfrec items add --items`` (one validator, ``export.items_add.check_item_row``):
  each row an object of string values with a non-empty ``item_id`` (1..256 bytes, no control
  characters), no ``item_id`` twice in a request, every value at most ``MAX_FIELD_BYTES`` (8 KiB);
  at most ``MAX_REQUEST_ITEMS`` (1,024) items a request. All rows are checked before anything is
  encoded; a bad row answers 400 (INVALID_ARGUMENT) naming its index and field
  (``items[3] field 'title': must be a string, got int``), nothing written.
- **one add at a time**: a lock serialises encode + write (the encoder need not be thread-safe, and
  the delta's read-modify-write never loses a concurrent request's items); ``add_rows`` also takes an
  ``flock`` on ``<delta>.lock`` (and, with a ranker, on ``<ranker_out>.lock``) for the whole add, so a
  ``tfrec items add`` run beside the server takes turns too and no version drops another add's items.
  The delta file is replaced atomically: a failed add leaves it as it was.
- **errors**: without ``--items_delta`` the endpoint answers UNIMPLEMENTED (REST 501) naming the flag.
  The encoder raising ``ValueError`` (about the rows, e.g. a column the model reads is missing) is
  INVALID_ARGUMENT (400); any other encoder exception or malformed encoder output is INTERNAL (500,
  logged with its traceback on the server); the delta file refusing the items (another width than
  its items, more than ``MAX_DELTA_ITEMS``, unreadable) is FAILED_PRECONDITION (400). The server
  keeps serving in every case.

REST only, as ``POST /v1/events``: gRPC serves TF Serving's fixed protos.

Example (no server: the endpoint object the server holds, with a toy encoder):
>>> import os, tempfile
>>> import numpy as np
>>> delta = os.path.join(tempfile.mkdtemp(), "items.npz")
>>> endpoint = ItemsEndpoint(delta, lambda rows: (np.ones((len(rows), 4), "float32"), None))
>>> result = endpoint.add({"items": [{"item_id": "n1", "title": "Red lipstick"}]})
>>> {k: result[k] for k in ("added", "replaced", "items", "generation")}
{'added': 1, 'replaced': 0, 'items': 1, 'generation': 1}
>>> endpoint.add({"items": [{"item_id": "n2", "title": None}]})
Traceback (most recent call last):
...
export.server.errors.ServingError: items[0] field 'title': must be a string, got NoneType
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from typing import Any, Callable, Optional

import grpc

from export.items_add import (
    MAX_REQUEST_ITEMS,
    DeltaFailed,
    EncoderFailed,
    RankerFailed,
    add_rows,
    check_item_rows,
    load_delta,
    load_encoder,
    model_encoder,
)
from export.server.errors import ServingError, clean_message
from tfrec.ctr.new_items import INITS

logger = logging.getLogger(__name__)

ITEMS_FLAG = "--items_delta"
RANKER_FLAG, RANKER_OUT_FLAG = "--items_ranker", "--items_ranker_out"


class ItemsEndpoint:
    """Adds the items of ``POST /v1/items`` documents to ``delta_path`` with ``encoder``, one add at a time.

    Args:
        delta_path: ``str``, the delta file (``export.items_add``) a ``DeltaRetrievalServable`` follows.
        encoder: ``callable(rows) -> (vectors, sids)`` (see ``export.items_add``).
        max_items: ``int``, most items a request, default ``MAX_REQUEST_ITEMS`` (1,024).
    """

    def __init__(self, delta_path: str, encoder: Callable, max_items: int = MAX_REQUEST_ITEMS, ranker=None,
                 history_store: Optional[str] = None):
        if isinstance(max_items, bool) or not isinstance(max_items, int) or max_items < 1:
            raise ValueError(f"max_items must be a positive int, got {max_items!r}")
        self.delta_path, self.encoder, self.max_items = str(delta_path), encoder, max_items
        self.ranker, self.history_store = ranker, history_store
        self._lock = threading.Lock()

    @classmethod
    def from_options(cls, delta: Optional[str], model: Optional[str] = None, store: Optional[str] = None,
                     encoder: Optional[str] = None, *, ranker: Optional[str] = None,
                     ranker_out: Optional[str] = None, ranker_init: Optional[str] = None,
                     ranker_store: Optional[str] = None,
                     history_store: Optional[str] = None) -> Optional["ItemsEndpoint"]:
        """The endpoint of the ``--items_*`` flags (``None`` without ``--items_delta``); loads the encoder and,
        with ``--items_ranker``, the ranker run (``history_store``: the server's ``--history_store`` URL).

        ``ValueError`` naming the flag for a bad combination, a delta file that cannot be written or read,
        an encoder or a ranker run that cannot be loaded, a ranker base directory that cannot be written, or
        a history store whose SID routes are not the ranker's.
        """
        check_items_flags(delta, model, store, encoder, ranker=ranker, ranker_out=ranker_out,
                          ranker_init=ranker_init, ranker_store=ranker_store)
        if not delta:
            return None
        delta = os.path.abspath(delta)
        folder = os.path.dirname(delta)
        if not os.path.isdir(folder) or not os.access(folder, os.W_OK | os.X_OK):
            raise ValueError(f"{ITEMS_FLAG} {delta}: its folder is missing or not writable")
        try:
            load_delta(delta)
        except ValueError as err:
            raise ValueError(f"{ITEMS_FLAG}: {err}") from None
        if model:
            try:
                loaded = model_encoder(model, store)
            except Exception as err:  # noqa: BLE001 - any failure to load fails start-up, naming the flag
                raise ValueError(f"--items_model {model}: cannot load the encoder: {err}") from None
        else:
            try:
                loaded = load_encoder(encoder)
            except ValueError as err:
                raise ValueError(f"--items_encoder: {err}") from None
        target = load_ranker_target(ranker, ranker_out, ranker_init, ranker_store, history_store) if ranker \
            else None
        return cls(delta, loaded, ranker=target, history_store=history_store)

    def add(self, document: Any) -> dict:
        """Check, encode and add the items of a ``{"items": [...]}`` document; ``ServingError`` as the
        module docstring says. Returns ``{"added", "replaced", "items", "generation", "seconds"}``."""
        if not isinstance(document, dict) or set(document) != {"items"}:
            raise ServingError.invalid_argument('expected a JSON object {"items": [...]}')
        items = document["items"]
        if not isinstance(items, list) or not items:
            raise ServingError.invalid_argument("items must be a non-empty JSON array")
        try:
            rows = check_item_rows(items, lambda index: f"items[{index}]", self.max_items)
        except ValueError as err:
            raise ServingError.invalid_argument(str(err)) from None
        with self._lock:
            try:
                result = add_rows(rows, self.delta_path, self.encoder, ranker=self._ranker_target())
            except (EncoderFailed, RankerFailed) as err:
                logger.error("POST /v1/items: %s", err, exc_info=err.__cause__ or err)
                raise ServingError(grpc.StatusCode.INTERNAL, clean_message(str(err))) from None
            except DeltaFailed as err:
                logger.error("POST /v1/items: %s", err)
                raise ServingError.failed_precondition(str(err)) from None
            except ValueError as err:  # the encoder or the ranker refused the rows
                raise ServingError.invalid_argument(str(err)) from None
        if "ranker" in result:  # no server path in an answer
            result["ranker"] = {k: v for k, v in result["ranker"].items() if k != "path"}
        return result

    def _ranker_target(self):
        """The ranker target of this add: the server's history store joins it while the store has SID routes
        (a store without routes, e.g. one serving a baseline ranker's requests by user id, is left alone)."""
        if self.ranker is None or not self.history_store:
            return self.ranker
        try:
            routed = store_has_routes(self.history_store)
        except Exception as err:  # noqa: BLE001 - the store is down: nothing is written
            raise ServingError(grpc.StatusCode.INTERNAL,
                               clean_message(f"cannot read the history store's SID routes: {err}")) from None
        return dataclasses.replace(self.ranker, history_store=self.history_store) if routed else self.ranker


def store_has_routes(url: str) -> bool:
    """Whether the history store at ``url`` holds SID routes now."""
    from tfrec.history import open_store

    handle = open_store(url)
    try:
        return handle.current_routes(max_age_seconds=0.0) is not None
    finally:
        handle.close()


def load_ranker_target(ranker: str, ranker_out: str, init: Optional[str], store: Optional[str],
                       history_store: Optional[str]):
    """The `export.ranker_items.RankerTarget` of the ``--items_ranker*`` flags, its run loaded (once, at
    start-up); ``ValueError`` naming the flag when the run cannot be loaded, the base directory cannot be
    written or holds an unreadable earlier add, or the history store has SID routes that are not the ranker's."""
    from export.ranker_items import RankerTarget, check_routes_store, earlier_items

    out = os.path.abspath(ranker_out)
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"{RANKER_OUT_FLAG} {out}: exists and is not a directory")
    folder = out if os.path.isdir(out) else os.path.dirname(out)
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"{RANKER_OUT_FLAG} {out}: it (or its folder) is missing or not writable")
    try:
        target = RankerTarget(ranker, out, init=init or INITS[0], store=store).load()
    except Exception as err:  # noqa: BLE001 - any failure to load fails start-up, naming the flag
        raise ValueError(f"{RANKER_FLAG} {ranker}: cannot load the ranker run: {err}") from None
    try:
        earlier_items(out, target.ranker)
    except ValueError as err:
        raise ValueError(f"{RANKER_OUT_FLAG}: {err}") from None
    if history_store:
        from tfrec.history import open_store

        handle = open_store(history_store)
        try:
            if handle.current_routes(max_age_seconds=0.0) is not None:
                check_routes_store(handle, target.ranker)
        except ValueError as err:
            raise ValueError(f"{RANKER_FLAG} with --history_store: {err}") from None
        finally:
            handle.close()
    return target


def check_items_flags(delta: Optional[str], model: Optional[str], store: Optional[str],
                      encoder: Optional[str], *, ranker: Optional[str] = None, ranker_out: Optional[str] = None,
                      ranker_init: Optional[str] = None, ranker_store: Optional[str] = None) -> None:
    """``ValueError`` naming the flag unless the ``--items_*`` flags form a valid combination:
    none, or ``--items_delta`` with exactly one of ``--items_model`` (+ optional ``--items_store``)
    and ``--items_encoder``, and optionally ``--items_ranker`` with ``--items_ranker_out`` (+ optional
    ``--items_ranker_init`` sid_neighbours|zero and ``--items_ranker_store``).

    >>> check_items_flags("/srv/delta/items.npz", None, None, "pkg.mod:encode")
    >>> check_items_flags(None, None, None, "pkg.mod:encode")
    Traceback (most recent call last):
    ...
    ValueError: --items_encoder needs --items_delta (the delta file POST /v1/items adds to)
    >>> check_items_flags("/srv/delta/items.npz", None, None, "pkg.mod:encode", ranker="runs/r2led")
    Traceback (most recent call last):
    ...
    ValueError: --items_ranker needs --items_ranker_out (the served ranker's base directory)
    """
    named = (("--items_model", model), ("--items_store", store), ("--items_encoder", encoder),
             (RANKER_FLAG, ranker), (RANKER_OUT_FLAG, ranker_out), ("--items_ranker_init", ranker_init),
             ("--items_ranker_store", ranker_store))
    if not delta:
        for flag, value in named:
            if value:
                raise ValueError(f"{flag} needs {ITEMS_FLAG} (the delta file POST /v1/items adds to)")
        return
    if ranker and not ranker_out:
        raise ValueError(f"{RANKER_FLAG} needs {RANKER_OUT_FLAG} (the served ranker's base directory)")
    for flag, value in named[4:]:
        if value and not ranker:
            raise ValueError(f"{flag} goes with {RANKER_FLAG} (a trained CTR run)")
    if ranker_init and ranker_init not in INITS:
        raise ValueError(f"--items_ranker_init must be one of {', '.join(INITS)}, got {ranker_init!r}")
    if bool(model) == bool(encoder):
        raise ValueError(f"{ITEMS_FLAG} needs exactly one of --items_model (a trained DMESR run) and "
                         "--items_encoder (module:function)")
    if store and not model:
        raise ValueError("--items_store goes with --items_model")
